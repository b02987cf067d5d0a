"""LLM stage: the turn's final transcript in, the reply out as speakable fragments."""

from __future__ import annotations

import asyncio
import json

from core.config import Config
from core.personas import Persona, load_personas
from schemas.streams import Job, ReplyEntry, now_ms
from workers import registry, speculation
from workers.llm.backends import FallbackReplyModel
from workers.llm.fragmenter import Fragmenter
from workers.runtime import JobContext, Stage


def make_backend(name: str, config: Config):
    """One LLM backend by its registered name or ``package.module:Class``."""
    return registry.make_backend("llm", name, config)


def make_chain(config: Config, log=None) -> FallbackReplyModel:
    return FallbackReplyModel.from_config([make_backend(n, config) for n in config.llm.backends],
                                          config, log)


class LlmStage(Stage):
    name = "llm"

    def __init__(self, config: Config):
        super().__init__(config)
        self.personas: dict[str, Persona] = load_personas(config.personas_dir())
        self.chain = make_chain(config)

    def describe(self) -> dict:
        return {"backends": self.chain.names, "personas": sorted(self.personas)}

    async def start(self, worker) -> None:
        # vLLM builds its engine here, before the first job: a model load must not count
        # against a player's turn
        self.chain.attach()
        await self.chain.warm()

    async def stop(self) -> None:
        # vLLM runs the model in child processes and the openai backend keeps a connection
        # pool: both are released here, after the last job, not left to interpreter exit
        await self.chain.close()

    async def handle(self, ctx: JobContext) -> list[Job]:
        # One round trip, not four: each is ~0.2-1 ms on the way to the first audio. TTS
        # starts now and tails the reply stream: it speaks fragment 1 while we write 2 (once
        # per turn: a takeover asks again and the guard in Redis answers). A persona this
        # worker lacks fails the turn below, and the TTS job ends with it.
        meta, writer, history, _ = await asyncio.gather(
            ctx.meta(), ctx.writer("reply"), self._history(ctx),
            ctx.enqueue("tts", adopt=ctx.job.adopt))
        persona = self.personas.get(meta.persona)
        if persona is None:
            raise LookupError(f"persona {meta.persona!r} is not loaded by this worker")
        await ctx.mark("llm_start")
        if ctx.job.adopt:
            full = await self._adopt(ctx, writer)
            if full is not None:
                await self._remember(ctx, full)
                return []
            writer = await ctx.writer("reply")  # the model itself, after what was copied
        t0 = now_ms()
        frag = Fragmenter()
        texts: list[str] = []

        async def put(text: str) -> None:
            texts.append(text)
            # a takeover re-makes the same fragments; the writer skips what is published
            await writer.put(ReplyEntry(segment=len(texts) - 1, text=text).to_fields())
            if len(texts) == 1:
                await ctx.mark("first_fragment")
                await ctx.mark("llm_first_fragment_ms", now_ms() - t0)

        answered: list[str] = []
        tokens = self.chain.stream_reply(persona, history, ctx.job.text, used=answered)
        async for token in tokens:
            await ctx.mark("first_token")
            for text in frag.push(token):
                await put(text)
        for text in frag.flush():
            await put(text)
        full = " ".join(texts)
        # which backend answered is kept with the turn: replaying a conversation must show
        # whether the model or a fallback spoke ("a>b": a failed mid-reply, b continued)
        backend = ">".join(answered)
        await writer.put(ReplyEntry(segment=len(texts), text=full, end=True,
                                    backend=backend).to_fields())
        if not ctx.speculative:  # an adopted speculation's reply is the turn's, then
            await self._remember(ctx, full)
        ctx.log.info("reply_done", segments=len(texts), chars=len(full), backend=backend)
        return []

    @staticmethod
    async def _remember(ctx: JobContext, full: str) -> None:
        # Keyed by turn so a re-run writes the same field, never a second copy.
        await ctx.redis.hset(ctx.key("history"), str(ctx.turn),
                             json.dumps({"player": ctx.job.text, "npc": full}))

    async def _adopt(self, ctx: JobContext, writer) -> str | None:
        """The reply the speculation made on the same words (workers/speculation.py), copied
        into the turn's stream as it comes; its full text, or None when it cannot complete."""
        end = await speculation.adopt(ctx, "reply", writer,
                                      lambda f: ReplyEntry.from_fields(f).end, ("llm",),
                                      marks=("first_token", "first_fragment"))
        return None if end is None else ReplyEntry.from_fields(end).text

    async def _history(self, ctx: JobContext) -> list[dict]:
        """Earlier turns, oldest first; where the player cut the NPC off, only what was heard."""
        raw = {k.decode(): v for k, v in (await ctx.redis.hgetall(ctx.key("history"))).items()}
        turns = []
        for key, value in raw.items():
            if ":" in key or int(key) >= ctx.turn:
                continue
            entry = json.loads(value)
            heard = raw.get(f"{key}:heard")
            if heard is not None:
                entry["npc"] = heard.decode()
                entry["interrupted"] = True
            turns.append((int(key), entry))
        return [t for _, t in sorted(turns)]
