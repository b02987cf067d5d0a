"""LLM stage: the turn's final transcript in, the reply out as speakable fragments."""

from __future__ import annotations

import json

from parley.config import Config
from schemas.streams import Job, ReplyEntry
from workers.llm.fragmenter import Fragmenter
from workers.llm.personas import Persona, load_personas
from workers.llm.scripted import ScriptedPersonaBackend
from workers.runtime import JobContext, Stage

BACKENDS = {"scripted": ScriptedPersonaBackend}


def make_backend(name: str, config: Config):
    try:
        return BACKENDS[name]()
    except KeyError:
        raise ValueError(f"unknown llm backend {name!r}; known: {', '.join(BACKENDS)}") from None


class LlmStage(Stage):
    name = "llm"

    def __init__(self, config: Config):
        super().__init__(config)
        self.personas: dict[str, Persona] = load_personas(config.personas_dir())
        self.backends = [make_backend(n, config) for n in config.llm.backends]

    def describe(self) -> dict:
        return {"backends": [b.name for b in self.backends], "personas": sorted(self.personas)}

    async def handle(self, ctx: JobContext) -> list[Job]:
        meta = await ctx.meta()
        persona = self.personas.get(meta.persona)
        if persona is None:
            raise LookupError(f"persona {meta.persona!r} is not loaded by this worker")
        published = await ctx.progress("reply")
        if published == 0:
            # TTS starts now and tails the reply stream: it speaks fragment 1 while we write 2.
            await ctx.enqueue("tts")
        history = await self._history(ctx)
        frag = Fragmenter()
        seq = 0
        texts: list[str] = []

        async def put(text: str) -> None:
            nonlocal seq
            seq += 1
            texts.append(text)
            if seq > published:  # a takeover continues after what is already published
                await ctx.emit("reply", seq, ReplyEntry(segment=seq - 1, text=text).to_fields())

        backend = self.backends[0]
        async for token in backend.stream_reply(persona, history, ctx.job.text):
            for text in frag.push(token):
                await put(text)
        for text in frag.flush():
            await put(text)
        full = " ".join(texts)
        await ctx.emit("reply", seq + 1, ReplyEntry(segment=seq, text=full, end=True).to_fields())
        # Keyed by turn so a re-run writes the same field, never a second copy.
        await ctx.redis.hset(ctx.key("history"), str(ctx.turn),
                             json.dumps({"player": ctx.job.text, "npc": full}))
        ctx.log.info("reply_done", segments=seq, chars=len(full))
        return []

    async def _history(self, ctx: JobContext) -> list[dict]:
        raw = await ctx.redis.hgetall(ctx.key("history"))
        turns = sorted((int(k), json.loads(v)) for k, v in raw.items() if int(k) < ctx.turn)
        return [t for _, t in turns]
