"""The OpenAI-compatible LLM client against a real server: ``transformers serve``.

transformers' own server (FastAPI + uvicorn, ``/v1/chat/completions`` with SSE streaming) runs
here as a subprocess on a tiny random Llama that the tests build (benchmarks/random_models.py).
Nothing about the HTTP side is faked: the client's request body, the server's chat template,
sampling with a seed, the event stream, a 400 for a wrong model name and a client that hangs up
mid-reply are all real. The replies are random letters: the model is untrained.

The last test runs a whole turn through a real fleet (gateway and worker processes, a private
redis-server) whose LLM chain is ``openai,scripted`` pointed at that server.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import structlog

from core.personas import Persona
from workers.llm.backends import FallbackReplyModel
from workers.llm.openai_compat import BackendError, OpenAICompatBackend
from workers.llm.scripted import ScriptedPersonaBackend

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("fastapi", reason="transformers serve needs transformers[serving]")
pytest.importorskip("uvicorn", reason="transformers serve needs transformers[serving]")

PERSONA = Persona(id="guard", name="Brannoc", voice="en-us",
                  system_prompt="You are Brannoc, a gate guard. Answer in one sentence.",
                  fallback="Move along.")
HISTORY = [{"player": "hello", "npc": "Halt."}]
LOG = structlog.get_logger()


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory) -> Path:
    from benchmarks.random_models import build_llama

    return build_llama(tmp_path_factory.mktemp("tiny-lm") / "model")


@pytest.fixture(scope="module")
def server(tiny_lm_dir, tmp_path_factory):
    """``transformers serve`` pinned to the tiny model, on a free port; yields its /v1 URL."""
    from parley.redis_server import free_port

    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "transformers.cli.transformers", "serve", str(tiny_lm_dir),
             "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited {proc.returncode}:\n"
                            f"{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > 120:
                pytest.fail(f"transformers serve not up after 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        print(f"transformers serve up in {time.monotonic() - t0:.1f} s")
        yield f"{base}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def backend(server: str, model: Path | str, **kw) -> OpenAICompatBackend:
    kw.setdefault("first_token_timeout_s", 30.0)  # a loaded CI machine, not a slow model
    return OpenAICompatBackend(server, str(model), **kw)


async def reply(b: OpenAICompatBackend, history=HISTORY, heard="who are you") -> list[str]:
    return [t async for t in b.stream_reply(PERSONA, history, heard)]


async def test_streams_a_reply_token_by_token(server, tiny_lm_dir):
    from benchmarks.random_models import LLAMA_CHARS as CHARS

    b = backend(server, tiny_lm_dir, max_tokens=40, temperature=1.0, seed=3)
    t0 = time.perf_counter()
    stream = b.stream_reply(PERSONA, HISTORY, "who are you")
    first = await anext(stream)
    ttft_ms = (time.perf_counter() - t0) * 1000
    tokens = [first] + [t async for t in stream]
    total_ms = (time.perf_counter() - t0) * 1000
    print(f"tiny LM over HTTP: first token {ttft_ms:.1f} ms, {len(tokens)} tokens "
          f"in {total_ms:.1f} ms")
    assert 1 < len(tokens) <= 40, "one delta per token, up to max_tokens"
    assert set("".join(tokens)) <= set(CHARS)


async def test_the_seed_makes_replies_repeatable_and_the_prompt_reaches_the_model(
        server, tiny_lm_dir):
    b = backend(server, tiny_lm_dir, max_tokens=32, temperature=1.0, seed=11)
    first, again = await reply(b), await reply(b)
    assert first == again, "same prompt and seed: the same reply"
    other_seed = await reply(backend(server, tiny_lm_dir, max_tokens=32, temperature=1.0,
                                     seed=12))
    assert other_seed != first
    # same seed, different history: the persona and history are in what the model sees
    other_history = await reply(b, history=[{"player": "hi", "npc": "Who goes there?"}])
    assert other_history != first


async def test_a_wrong_model_name_is_a_clear_error_and_the_chain_falls_back(server):
    b = backend(server, "no-such/model")
    with pytest.raises(BackendError, match=r"answered 400.*no-such/model"):
        await reply(b)
    chain = FallbackReplyModel([b, ScriptedPersonaBackend()], log=LOG)
    tokens = [t async for t in chain.stream_reply(PERSONA, [], "who are you")]
    assert "".join(tokens) == ScriptedPersonaBackend().choose(PERSONA, "who are you")


async def test_hanging_up_mid_reply_is_prompt_and_the_server_serves_on(server, tiny_lm_dir):
    """A barge-in closes the stream after a few tokens: the HTTP response is closed at once
    (the server sees the disconnect) and the next request is served normally."""
    b = backend(server, tiny_lm_dir, max_tokens=200, temperature=1.0, seed=5)
    stream = b.stream_reply(PERSONA, HISTORY, "tell me everything")
    got = [await anext(stream) for _ in range(3)]
    t0 = time.perf_counter()
    await stream.aclose()
    close_ms = (time.perf_counter() - t0) * 1000
    assert len(got) == 3 and close_ms < 500
    assert await reply(backend(server, tiny_lm_dir, max_tokens=8, seed=1))


async def test_close_releases_the_connection_pool_and_the_backend_stays_usable(
        server, tiny_lm_dir):
    """The LLM stage closes its backends when the worker stops; a closed backend that is
    asked again opens a new pool rather than failing."""
    b = backend(server, tiny_lm_dir, max_tokens=4, seed=1)
    assert await reply(b)
    pool = b._client
    await b.close()
    assert pool.is_closed and b._client is None
    await b.close()  # twice is harmless
    assert await reply(b)
    await b.close()


async def test_a_silent_server_times_out_before_the_first_token(tiny_lm_dir):
    """A server that accepts the connection but never answers (a stuck or overloaded model)
    is a BackendError after first_token_timeout_s, so the chain can fall back in time."""
    async def stall(reader, writer):
        await reader.read(65536)  # take the request, answer nothing
        await asyncio.sleep(30)

    srv = await asyncio.start_server(stall, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        b = OpenAICompatBackend(f"http://127.0.0.1:{port}/v1", "m", first_token_timeout_s=0.3)
        t0 = time.monotonic()
        with pytest.raises(BackendError, match="ReadTimeout"):
            await reply(b)
        assert time.monotonic() - t0 < 2.0
    finally:
        srv.close()


@pytest.mark.slow
async def test_a_fleet_turn_answered_by_the_real_server(server, tiny_lm_dir, tmp_path):
    """The whole loop with the LLM stage talking to the server: the reply the player hears is
    the model's, the reply stream records which backend answered, and audio and face arrive."""
    from tests.backends.fleet_turn import fleet_turn
    from tests.support.turns import check_turn

    turn = await fleet_turn(tmp_path, {
        "PARLEY_LLM_BACKENDS": "openai,scripted", "PARLEY_LLM_OPENAI_URL": server,
        "PARLEY_LLM_OPENAI_MODEL": str(tiny_lm_dir), "PARLEY_LLM_MAX_TOKENS": "48",
        "PARLEY_LLM_FIRST_TOKEN_TIMEOUT_S": "30"}, ready_s=90, done_s=120)
    assert all(c == 0 for c in turn.codes.values()), f"{turn.codes}\n{turn.log[-3000:]}"
    assert turn.answered_by == "openai", turn.log[-3000:]
    scripted = ScriptedPersonaBackend().choose(PERSONA, turn.result.transcript)
    assert turn.result.reply and turn.result.reply != scripted
    check_turn(turn.result, min_audio_s=0.2)  # audio, face at 60 fps, no seq gap, turn_done
