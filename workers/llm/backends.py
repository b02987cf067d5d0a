"""The LLM stage's backend interface, its registered backends and its fallback chain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

from core.personas import Persona
from workers.fallback import FallbackChain, NoBackend, StallTimeout


class ReplyModel(Protocol):
    """Streams the NPC's reply to what the player said, as text deltas (tokens).

    ``prefix`` is reply text already spoken (by another backend that failed mid-reply): the
    model continues after it and yields only the rest. Optional methods: ``warm()`` (load
    before the first job), ``close()`` (release after the last), ``probe()`` (a small request
    that succeeds when the backend works again); each may be sync or async.
    """

    name: str

    def stream_reply(self, persona: Persona, history: list[dict], heard: str,
                     prefix: str = "") -> AsyncIterator[str]: ...


def scripted(config):
    from workers.llm.scripted import ScriptedPersonaBackend

    return ScriptedPersonaBackend()


def openai(config):
    from workers.llm.openai_compat import OpenAICompatBackend

    cfg = config.llm
    return OpenAICompatBackend(cfg.openai_url, cfg.openai_model, cfg.openai_api_key,
                               connect_timeout_s=cfg.connect_timeout_s,
                               first_token_timeout_s=cfg.first_token_timeout_s,
                               max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                               seed=cfg.seed)


def vllm(config):
    from workers.llm.vllm_backend import VllmBackend

    cfg = config.llm
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


_PROBE_PERSONA = Persona(id="probe", name="probe", voice="", system_prompt="Answer in one word.",
                         fallback="Yes.")


class FallbackReplyModel(FallbackChain):
    """A :class:`ReplyModel` over an ordered chain of them.

    A backend that fails or stalls mid-reply hands over to the next, which is asked to
    continue after the text already yielded: the reply goes on with no repeat. When the last
    one fails after some text, the reply ends there; before any text, the error is raised.
    """

    stage = "llm"

    async def stream_reply(self, persona: Persona, history: list[dict], heard: str,
                           prefix: str = "", used: list[str] | None = None
                           ) -> AsyncIterator[str]:
        """``used`` collects the names of the backends that produced text, in order."""
        said = prefix
        order = self.order()
        event = None
        error: BaseException | None = None
        for n, i in enumerate(order):
            backend = self.backends[i]
            timeout = self.timeout_for(len(order) - n - 1)
            kwargs = {"prefix": said} if said else {}
            tokens = backend.stream_reply(persona, history, heard, **kwargs).__aiter__()
            started = False
            try:
                while True:
                    try:
                        # a timeout in this task, not a new one: a backend's stream may hold
                        # task-bound state (httpx's connection, vLLM's request)
                        async with asyncio.timeout(timeout):
                            token = await tokens.__anext__()
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        raise StallTimeout(f"no token in {timeout:.1f}s") from None
                    if not started:
                        started = True
                        self.first_output(event)
                        if used is not None:
                            used.append(backend.name)
                    said += token
                    yield token
            except Exception as exc:  # any backend failure: the next one continues
                error = exc
                to = order[n + 1] if n + 1 < len(order) else None
                event = self.failed(i, exc, to)
            finally:
                closer = getattr(tokens, "aclose", None)
                if closer is not None:
                    await closer()
        if said == prefix:
            raise error if error is not None else NoBackend("no llm backend")
        self.log.warning("reply_cut_short", chars=len(said), error=str(error))

    async def default_probe(self, backend) -> None:
        async for _ in backend.stream_reply(_PROBE_PERSONA, [], "Hello."):
            break

    async def warm(self) -> None:
        await self.each("warm")

    async def close(self) -> None:
        await self.aclose()
        await self.each("close")
