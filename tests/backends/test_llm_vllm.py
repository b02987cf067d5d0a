"""The vLLM backend's glue, with a stand-in engine (vLLM itself needs a GPU and is not installed).

FakeVllmEngine, TokenizerDouble and SamplingParamsDouble are TEST DOUBLES with the shapes the
backend uses: ``generate(prompt, params, request_id)`` yielding outputs whose
``outputs[0].text`` is the cumulative text, ``abort(request_id)``, ``get_tokenizer()`` and
``apply_chat_template(messages, add_generation_prompt=..., tokenize=...)``. The last two tests
build prompts with a real transformers tokenizer and chat template (made offline).
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field

import pytest
import structlog

from workers.llm.personas import Persona
from workers.llm.stage import with_fallback
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
        async for token in with_fallback([backend], PERSONA, [], "hi", structlog.get_logger()):
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
