"""Personas: who an NPC is. One TOML file per persona in personas/."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class PersonaLine:
    match: list[str]  # words or phrases the player might say
    reply: str


@dataclass
class Persona:
    id: str
    name: str
    voice: str
    system_prompt: str
    fallback: str
    greeting: str = ""
    lines: list[PersonaLine] = field(default_factory=list)
    voice_rate_wpm: int = 175
    voice_pitch: int = 50


def load_persona(path: Path) -> Persona:
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    try:
        return Persona(
            id=path.stem,
            name=data["name"],
            voice=data.get("voice", "en-us"),
            system_prompt=data.get("system_prompt", ""),
            fallback=data["fallback"],
            greeting=data.get("greeting", ""),
            lines=[PersonaLine(match=list(ln["match"]), reply=ln["reply"])
                   for ln in data.get("lines", [])],
            voice_rate_wpm=int(data.get("voice_rate_wpm", 175)),
            voice_pitch=int(data.get("voice_pitch", 50)),
        )
    except KeyError as exc:
        raise ValueError(f"persona {path}: missing required key {exc}") from None


def load_personas(directory: Path) -> dict[str, Persona]:
    personas = {p.stem: load_persona(p) for p in sorted(Path(directory).glob("*.toml"))}
    if not personas:
        raise ValueError(f"no personas (*.toml) in {directory}")
    return personas
