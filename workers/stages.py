"""Stage name -> Stage class; imports lazily so a worker loads only its own backends."""

from __future__ import annotations

from core.config import Config
from workers.runtime import Stage


def make_stage(name: str, config: Config) -> Stage:
    if name == "stt":
        from workers.stt.stage import SttStage

        return SttStage(config)
    if name == "llm":
        from workers.llm.stage import LlmStage

        return LlmStage(config)
    if name == "tts":
        from workers.tts.stage import TtsStage

        return TtsStage(config)
    if name == "lipsync":
        from workers.lipsync.stage import LipsyncStage

        return LipsyncStage(config)
    raise ValueError(f"unknown stage {name!r}; known: stt, llm, tts, lipsync")
