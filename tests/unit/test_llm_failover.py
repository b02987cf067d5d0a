"""Backend failover: a backend that really fails hands the turn to the next in the chain."""

import time
from pathlib import Path

import pytest
import structlog

from core.config import Config
from core.personas import load_personas
from parley.redis_server import free_port
from workers.llm.backends import FallbackReplyModel
from workers.llm.openai_compat import BackendError, OpenAICompatBackend, chat_messages
from workers.llm.scripted import ScriptedPersonaBackend
from workers.llm.stage import make_backend

PERSONA = load_personas(Path(__file__).resolve().parents[2] / "personas")["guard"]


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"  # a port nothing listens on


async def test_unreachable_server_falls_back_to_the_scripted_persona():
    chain = FallbackReplyModel([OpenAICompatBackend(dead_url(), "any-model"),
                                ScriptedPersonaBackend()], log=structlog.get_logger())
    t0 = time.monotonic()
    tokens = [t async for t in chain.stream_reply(PERSONA, [], "who are you")]
    assert "".join(tokens) == ScriptedPersonaBackend().choose(PERSONA, "who are you")
    assert time.monotonic() - t0 < 2.0, "a refused connection must fail fast"


async def test_the_last_backend_failing_is_an_error_not_silence():
    chain = FallbackReplyModel([OpenAICompatBackend(dead_url(), "m")])
    with pytest.raises(BackendError, match="ConnectError"):
        [t async for t in chain.stream_reply(PERSONA, [], "hi")]


def test_chain_is_built_from_configuration():
    cfg = Config.load(env={"PARLEY_LLM_BACKENDS": "openai,scripted",
                           "PARLEY_LLM_OPENAI_URL": "http://h:1/v1",
                           "PARLEY_LLM_OPENAI_MODEL": "m"})
    names = [make_backend(n, cfg).name for n in cfg.llm.backends]
    assert names == ["openai", "scripted"]
    with pytest.raises(ValueError, match="openai_url"):
        make_backend("openai", Config.load(env={}))
    with pytest.raises(ValueError, match="unknown llm backend"):
        make_backend("gpt-9", cfg)


def test_messages_carry_persona_and_history():
    msgs = chat_messages(PERSONA, [{"player": "hi", "npc": "Halt."}], "who are you")
    assert msgs[0]["role"] == "system" and "Brannoc" in msgs[0]["content"]
    assert [m["role"] for m in msgs[1:]] == ["user", "assistant", "user"]
    assert msgs[-1]["content"] == "who are you"


def test_a_continuation_carries_the_reply_so_far_and_asks_for_the_rest():
    from workers.llm.openai_compat import CONTINUE

    msgs = chat_messages(PERSONA, [], "who are you", prefix="I am Brannoc, keeper")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[2]["content"] == "I am Brannoc, keeper"
    assert msgs[3]["content"] == CONTINUE
    assert chat_messages(PERSONA, [], "who are you")[-1]["role"] == "user"
