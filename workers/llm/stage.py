"""LLM stage: the turn's final transcript in, the reply out as speakable fragments."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from parley.config import Config, PipelineConfig
from schemas.streams import Job, ReplyEntry, now_ms
from workers.llm.fragmenter import Fragmenter
from workers.llm.personas import Persona, load_personas
from workers.llm.scripted import ScriptedPersonaBackend
from workers.loader import is_object_ref, load_object
from workers.runtime import JobContext, Stage

BACKENDS = ("scripted", "openai", "vllm")


def make_backend(name: str, config: Config):
    if is_object_ref(name):  # "package.module:Class", e.g. the benchmarks' simulated models
        return load_object(name)(config)
    cfg = config.llm
    if name == "scripted":
        return ScriptedPersonaBackend()
    if name == "vllm":
        from workers.llm.vllm_backend import VllmBackend

        engine_args: dict = {}
        if cfg.vllm_enforce_eager:
            engine_args["enforce_eager"] = True
        if cfg.vllm_kv_cache_gib > 0:
            engine_args["kv_cache_memory_bytes"] = int(cfg.vllm_kv_cache_gib * (1 << 30))
        return VllmBackend(cfg.vllm_model, tensor_parallel_size=cfg.vllm_tensor_parallel_size,
                           gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                           max_model_len=cfg.vllm_max_model_len, seed=cfg.seed,
                           max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                           engine_args=engine_args)
    if name == "openai":
        from workers.llm.openai_compat import OpenAICompatBackend

        return OpenAICompatBackend(cfg.openai_url, cfg.openai_model, cfg.openai_api_key,
                                   connect_timeout_s=cfg.connect_timeout_s,
                                   first_token_timeout_s=cfg.first_token_timeout_s,
                                   max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                   seed=cfg.seed)
    raise ValueError(f"unknown llm backend {name!r}; known: {', '.join(BACKENDS)}")


async def with_fallback(backends, persona, history, heard, log,
                        answered: list[str] | None = None) -> AsyncIterator[str]:
    """Tokens from the first backend that answers; one that fails before its first token
    hands over to the next. After the first token a failure ends the reply where it is: a
    different model cannot continue another's sentence. The name of the backend that answered
    is appended to ``answered``."""
    for i, backend in enumerate(backends):
        started = False
        try:
            async for token in backend.stream_reply(persona, history, heard):
                if not started and answered is not None:
                    answered.append(backend.name)
                started = True
                yield token
            return
        except Exception as exc:  # any backend failure: try the next one
            last = i == len(backends) - 1
            log.warning("llm_backend_failed", backend=backend.name, error=str(exc),
                        started=started, fallback=None if last else backends[i + 1].name)
            if started or last:
                if not started:
                    raise
                return


async def simulated_gpu_timing(tokens: AsyncIterator[str], cfg: PipelineConfig
                               ) -> AsyncIterator[str]:
    """SIMULATED model speed for benchmarks: time to first token, then a steady token rate."""
    first = True
    async for token in tokens:
        await asyncio.sleep((cfg.sim_llm_ttft_ms / 1000) if first
                            else 1 / cfg.sim_llm_tokens_per_s)
        first = False
        yield token


class LlmStage(Stage):
    name = "llm"

    def __init__(self, config: Config):
        super().__init__(config)
        self.personas: dict[str, Persona] = load_personas(config.personas_dir())
        self.backends = [make_backend(n, config) for n in config.llm.backends]

    def describe(self) -> dict:
        return {"backends": [b.name for b in self.backends], "personas": sorted(self.personas)}

    async def start(self, worker) -> None:
        # vLLM builds its engine here, before the first job: a model load must not count
        # against a player's turn
        await self._each_backend("warm")

    async def stop(self) -> None:
        # vLLM runs the model in child processes and the openai backend keeps a connection
        # pool: both are released here, after the last job, not left to interpreter exit
        await self._each_backend("close")

    async def _each_backend(self, method: str) -> None:
        for backend in self.backends:
            call = getattr(backend, method, None)
            if call is not None:
                result = call()
                if asyncio.iscoroutine(result):
                    await result

    async def handle(self, ctx: JobContext) -> list[Job]:
        # one round trip, not three: each is ~0.2 ms on the way to the first audio
        meta, published, history = await asyncio.gather(
            ctx.meta(), ctx.progress("reply"), self._history(ctx))
        persona = self.personas.get(meta.persona)
        if persona is None:
            raise LookupError(f"persona {meta.persona!r} is not loaded by this worker")
        sequential = self.config.pipeline.mode == "sequential"
        if not sequential:
            # TTS starts now and tails the reply stream: it speaks fragment 1 while we write 2.
            # Once per turn: a takeover asks again and the guard in Redis answers.
            await ctx.enqueue("tts")
        await ctx.mark("llm_start")
        t0 = now_ms()
        frag = Fragmenter()
        seq = 0
        texts: list[str] = []

        async def put(text: str) -> None:
            nonlocal seq
            seq += 1
            texts.append(text)
            if seq > published:  # a takeover continues after what is already published
                await ctx.emit("reply", seq, ReplyEntry(segment=seq - 1, text=text).to_fields())
            if seq == 1:
                await ctx.mark("first_fragment")
                await ctx.mark("llm_first_fragment_ms", now_ms() - t0)

        answered: list[str] = []
        tokens = with_fallback(self.backends, persona, history, ctx.job.text, ctx.log, answered)
        if self.config.pipeline.profile == "gpu-sim":
            tokens = simulated_gpu_timing(tokens, self.config.pipeline)
        whole: list[str] = []
        async for token in tokens:
            await ctx.mark("first_token")
            if sequential:  # the whole-file design: nothing leaves before the reply is complete
                whole.append(token)
                continue
            for text in frag.push(token):
                await put(text)
        if sequential and whole:
            await put("".join(whole).strip())
        for text in frag.flush():
            await put(text)
        full = " ".join(texts)
        # which backend answered is kept with the turn: replaying a conversation must show
        # whether the model or a fallback spoke
        backend = answered[0] if answered else ""
        await ctx.emit("reply", seq + 1, ReplyEntry(segment=seq, text=full, end=True,
                                                    backend=backend).to_fields())
        # Keyed by turn so a re-run writes the same field, never a second copy.
        await ctx.redis.hset(ctx.key("history"), str(ctx.turn),
                             json.dumps({"player": ctx.job.text, "npc": full}))
        ctx.log.info("reply_done", segments=seq, chars=len(full), backend=backend)
        return [Job(stage="tts", sid=ctx.sid, turn=ctx.turn)] if sequential else []

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
