"""The playground on the gateway's port: static files and the JSON API over real HTTP, the
WebSocket beside them on the same port, stored turns read back from a real Redis.

Gateways run in this process on the tests' redis-server; no workers are needed: a stored turn is
written to Redis as the workers write it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from contextlib import asynccontextmanager

import httpx
import numpy as np
from websockets.asyncio.client import connect

from core.config import Config
from gateway.playground_http import CONTENT_TYPES, STATIC_DIR
from gateway.server import Gateway
from schemas import protocol as P
from schemas.streams import FaceEntry, Keys, ReplyEntry, SessionMeta, TranscriptEntry, VoiceEntry


@asynccontextmanager
async def gateway(url: str, **settings):
    cfg = Config()
    cfg.redis.url = url
    cfg.redis.prefix = f"t{uuid.uuid4().hex[:8]}"
    cfg.gateway.playground = True
    for k, v in settings.items():
        setattr(cfg.gateway, k, v)
    gw = Gateway(cfg)
    await gw.start("127.0.0.1", 0)
    try:
        yield gw
    finally:
        await gw.stop()


async def get(gw: Gateway, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}", timeout=10) as c:
        return await c.get(path)


async def raw_get(gw: Gateway, path: str, method: str = "GET") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_static_files_with_their_types_and_nothing_else(redis_server):
    async with gateway(redis_server.url) as gw:
        index = await get(gw, "/")
        assert index.status_code == 200
        assert index.headers["content-type"] == "text/html; charset=utf-8"
        assert '<script type="module"' in index.text
        assert index.headers["x-content-type-options"] == "nosniff"
        for f in STATIC_DIR.rglob("*"):
            if f.is_file() and f.suffix in CONTENT_TYPES:
                r = await get(gw, "/" + f.relative_to(STATIC_DIR).as_posix())
                assert r.status_code == 200, f
                assert r.headers["content-type"] == CONTENT_TYPES[f.suffix]
                assert r.content == f.read_bytes()
        # no traversal, however spelled (sent raw: an HTTP client would normalise the path),
        # and nothing outside the table
        for path in ("/../server.py", "/%2e%2e/server.py", "/..%2fserver.py", "/nope.js",
                     "//etc/passwd", "/playground.py", "/%2Fetc%2Fpasswd", "/index.html/..",
                     "/../../../../etc/passwd", "/./index.html/../../core/config.py"):
            status, body = await raw_get(gw, path)
            assert status == 404, (path, status)
            assert json.loads(body)["status"] == 404
        # the WebSocket stays where it was, on the same port
        async with connect(f"ws://127.0.0.1:{gw.port}/") as ws:
            await ws.send(P.encode(P.Hello(protocol=2, client="test")))
            welcome = json.loads(await ws.recv())
            assert welcome["type"] == "welcome" and "guard" in welcome["npcs"]


async def test_head_and_other_methods(redis_server):
    async with gateway(redis_server.url) as gw:
        assert await raw_get(gw, "/", "HEAD") == (200, b"")
        status, body = await raw_get(gw, "/api/personas", "POST")
        assert status == 405 and "GET and HEAD" in json.loads(body)["error"]


async def test_personas_endpoint(redis_server):
    async with gateway(redis_server.url) as gw:
        r = await get(gw, "/api/personas")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        people = {p["id"]: p for p in r.json()["personas"]}
        assert people["guard"]["name"] and people["guard"]["voice"]
        assert "system_prompt" not in people["guard"]  # the page needs no more than this
        assert (await get(gw, "/api/nothing")).status_code == 404


async def test_off_unless_configured(redis_server):
    async with gateway(redis_server.url, playground=False) as gw:
        r = await get(gw, "/")
        assert r.status_code == 426  # websockets' own answer to a plain GET


async def _store_turn(gw: Gateway, sid: str, turn: int) -> tuple[np.ndarray, np.ndarray]:
    keys: Keys = gw.keys
    r = gw.redis
    meta = SessionMeta(sid=sid, session="s", npc="guard", persona="guard",
                       voice="en-gb-scotland", sample_rate=16000, channels=1, format="s16le")
    await r.hset(keys.session(sid, "meta"), mapping=meta.to_fields())
    await r.zadd(keys.sessions(), {sid: 1e15})
    await r.xadd(keys.session(sid, "transcript"),
                 TranscriptEntry(text="open the gate", final=True).to_fields(), id=f"{turn}-1")
    for seq, (seg, text, end) in enumerate([(0, "The gate opens at dawn.", False),
                                            (1, "The gate opens at dawn.", True)], 1):
        await r.xadd(keys.session(sid, "reply"),
                     ReplyEntry(segment=seg, text=text, end=end).to_fields(), id=f"{turn}-{seq}")
    pcm = (np.sin(np.arange(4410) / 5) * 8000).astype("<i2")
    chunks = [(0, pcm[:2205], False), (2205, pcm[2205:], True)]
    for seq, (at, part, last) in enumerate(chunks, 1):
        await r.xadd(keys.session(sid, "voice"),
                     VoiceEntry(segment=0, sample=at, rate=22050, pcm=part.tobytes(),
                                last_in_segment=last).to_fields(), id=f"{turn}-{seq}")
    await r.xadd(keys.session(sid, "voice"),
                 VoiceEntry(segment=1, sample=4410, rate=22050, end=True).to_fields(),
                 id=f"{turn}-3")
    samples = np.round(np.arange(12) * 22050 / 60).astype(np.int64)
    values = np.zeros((12, 61), np.float32)
    values[:, 17] = np.linspace(0, 0.8, 12)  # JawOpen
    await r.xadd(keys.session(sid, "face"),
                 FaceEntry(segment=0, samples=samples, values=values).to_fields(), id=f"{turn}-1")
    await r.xadd(keys.session(sid, "face"),
                 FaceEntry(segment=0, samples=samples[:0], values=values[:0], first_index=12,
                           end=True).to_fields(), id=f"{turn}-2")
    await r.hset(keys.session(sid, "timing"), mapping={f"{turn}:eos": 1000.0,
                                                       f"{turn}:gw_first_audio": 1400.0})
    return pcm, values


async def test_a_stored_turn_comes_back_as_the_wire_carried_it(redis_server):
    async with gateway(redis_server.url) as gw:
        sid = "replay-me.0123456789abcdef"
        pcm, values = await _store_turn(gw, sid, 3)
        listed = (await get(gw, "/api/sessions")).json()["sessions"]
        mine = [s for s in listed if s["sid"] == sid]
        assert mine and mine[0]["turns"] == [3] and mine[0]["npc"] == "guard"
        turn = (await get(gw, f"/api/sessions/{sid}/turns/3")).json()
        texts = [P.decode_text(i["text"], P.SERVER_MESSAGES) for i in turn["items"] if "text" in i]
        frames = [P.decode_binary(base64.b64decode(i["binary"])) for i in turn["items"]
                  if "binary" in i]
        assert [type(m).__name__ for m in texts] == ["Transcript", "ReplyText", "ReplyText",
                                                     "TurnDone"]
        assert texts[-1].timings == {"eos": 1000.0, "gw_first_audio": 1400.0}
        audio = [f for f in frames if isinstance(f, P.ReplyAudio)]
        face = [f for f in frames if isinstance(f, P.FaceFrames)]
        assert b"".join(a.pcm for a in audio) == pcm.tobytes()
        assert np.array_equal(np.concatenate([f.values for f in face]), values)
        missing = await get(gw, f"/api/sessions/{sid}/turns/4")
        assert missing.status_code == 404 and "turn 4" in missing.json()["error"]
        assert (await get(gw, "/api/sessions/bad%20sid/turns/1")).status_code == 404


async def test_the_api_only_on_loopback_without_tokens(redis_server):
    async with gateway(redis_server.url, tokens=["qa:secret-secret"]) as gw:
        for path in ("/api/sessions", "/api/sessions/x/turns/1", "/api/personas"):
            r = await get(gw, path)
            assert r.status_code == 403 and "tokens" in r.json()["error"], path
        assert (await get(gw, "/")).status_code == 200  # the page itself is public


async def test_a_broken_request_does_not_touch_the_gateway(redis_server):
    async with gateway(redis_server.url) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GARBAGE / HTTP/1.1\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert (await get(gw, "/api/personas")).status_code == 200
