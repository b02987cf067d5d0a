"""Issue 16, server side: session ownership, authentication and caps, hostile input, TLS.

Real gateways (in this process, so two can share one Redis), a real redis-server started by the
tests, real WebSocket clients; no workers are needed, since nothing here waits for a reply. Output
of a session is injected as the workers would write it: an entry in its Redis stream.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from contextlib import asynccontextmanager

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from core.config import Config
from core.redisconn import connect as redis_connect
from gateway.server import Gateway
from schemas import protocol as P
from schemas.streams import Keys, TranscriptEntry


@asynccontextmanager
async def gateways(url: str, n: int = 1, prefix: str | None = None, **settings):
    """``n`` gateways on one Redis (and one key prefix), with ``settings`` in [gateway]."""
    cfg = Config()
    cfg.redis.url = url
    cfg.redis.prefix = prefix or f"t{uuid.uuid4().hex[:8]}"
    for k, v in settings.items():
        setattr(cfg.gateway, k, v)
    gws = [Gateway(cfg) for _ in range(n)]
    for gw in gws:
        await gw.start("127.0.0.1", 0)
    try:
        yield gws
    finally:
        for gw in gws:
            await gw.stop()


def ws_url(gw: Gateway, scheme: str = "ws") -> str:
    return f"{scheme}://127.0.0.1:{gw.port}"


async def send(ws, msg: P.Message | dict | str) -> None:
    if isinstance(msg, P.Message):
        msg = P.encode(msg)
    elif isinstance(msg, dict):
        msg = json.dumps(msg)
    await ws.send(msg)


async def expect(ws, kind: str, timeout: float = 5.0) -> dict:
    """The next text message of ``kind``; binary frames and other messages are skipped."""
    deadline = time.monotonic() + timeout
    while True:
        raw = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        if isinstance(raw, str):
            msg = json.loads(raw)
            if msg["type"] == kind:
                return msg


async def texts(ws, seconds: float) -> list[dict]:
    """Every text message that arrives within ``seconds``."""
    out, deadline = [], time.monotonic() + seconds
    try:
        while (left := deadline - time.monotonic()) > 0:
            raw = await asyncio.wait_for(ws.recv(), left)
            if isinstance(raw, str):
                out.append(json.loads(raw))
    except TimeoutError:
        pass
    return out


async def hello(ws, **kw) -> dict:
    await send(ws, P.Hello(client="test", **kw))
    return json.loads(await asyncio.wait_for(ws.recv(), 5))


async def open_session(ws, session: str, npc: str = "guard") -> dict:
    await send(ws, P.OpenSession(session=session, npc=npc))
    msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert msg["type"] == "opened", msg
    return msg


async def alive(ws) -> bool:
    await send(ws, P.Ping(id=7))
    return (await expect(ws, "pong"))["id"] == 7


def mic(channel: int, seq: int, pcm: bytes = b"\0\0" * 320) -> bytes:
    return P.MicAudio(channel=channel, seq=seq, pcm=pcm).encode()


# --------------------------------------------------------------------------- session ownership


async def test_resume_needs_the_secret_and_takes_the_session_from_its_owner(scratch_url):
    async with gateways(scratch_url, n=2) as (gw1, gw2):
        keys = Keys(gw1.config.redis.prefix)
        async with connect(ws_url(gw1)) as victim, connect(ws_url(gw2)) as thief:
            await hello(victim)
            await hello(thief)
            opened = await open_session(victim, "guard-01")
            sid, secret = opened["sid"], opened["resume_secret"]
            assert len(secret) >= 32  # 192 random bits, URL-safe base64

            # the sid alone grants nothing, and a wrong secret gets the same answer
            for guess in ("", "x" * 32):
                await send(thief, P.Resume(session="mine", sid=sid, resume_secret=guess))
                err = await expect(thief, "error")
                assert err["code"] == "session_not_open" and err["session"] == "mine"
            assert await alive(victim)

            # only a hash is stored, and the secret is never logged
            r = redis_connect(scratch_url)
            stored = await r.hgetall(keys.session(sid, "meta"))
            assert all(secret.encode() not in v for v in stored.values())

            # the rightful client, on another gateway, takes it over
            await send(thief, P.Resume(session="mine", sid=sid, resume_secret=secret))
            again = await expect(thief, "opened")
            assert again["resumed"] is True and "resume_secret" not in again
            told = await expect(victim, "taken_over")
            assert told == {"type": "taken_over", "session": "guard-01"}

            # output now goes to the new owner only
            await r.xadd(keys.session(sid, "transcript"),
                         TranscriptEntry(text="open the gate", final=True).to_fields(),
                         id="1-1")
            got = await expect(thief, "transcript")
            assert got["session"] == "mine" and got["text"] == "open the gate"
            assert [m for m in await texts(victim, 0.5) if m["type"] == "transcript"] == []

            # and the old connection's mic no longer reaches the session
            await victim.send(mic(opened["channel"], 1))
            err = await expect(victim, "error")
            assert err["code"] == "session_not_open"
            await r.aclose()


async def test_one_session_attached_twice_on_one_connection_is_refused(scratch_url):
    async with gateways(scratch_url) as (gw,), connect(ws_url(gw)) as ws1, \
            connect(ws_url(gw)) as ws2:
        await hello(ws1)
        opened = await open_session(ws1, "a")
        await ws1.close()
        await hello(ws2)
        resume = P.Resume(session="b", sid=opened["sid"],
                          resume_secret=opened["resume_secret"])
        await send(ws2, resume)
        assert (await expect(ws2, "opened"))["resumed"]
        for handle in ("b", "c"):
            resume.session = handle
            await send(ws2, resume)
            err = await expect(ws2, "error")
            assert err["code"] == "session_exists" and err["session"] == handle
            assert "already" in err["message"]
        assert await alive(ws2)


# --------------------------------------------------------------------------- authentication


async def test_named_tokens_limit_npcs_and_sessions_fleet_wide(scratch_url):
    tokens = ["game:s3cret:2:guard|merchant", "tools:other"]
    async with gateways(scratch_url, n=2, tokens=tokens) as (gw1, gw2), \
            connect(ws_url(gw1)) as a, connect(ws_url(gw2)) as b:
        await send(a, P.OpenSession(session="x", npc="guard"))
        assert (await expect(a, "error"))["code"] == "not_authenticated"
        for name, secret in (("game", "wrong"), ("nobody", "s3cret"), (None, "s3cret")):
            err = await hello(a, token_name=name, token=secret)
            assert err["code"] == "auth_failed"
        welcome = await hello(a, token_name="game", token="s3cret")
        assert welcome["npcs"] == ["guard", "merchant"]
        assert welcome["token_name"] == "game" and welcome["protocol"] == 2

        await send(a, P.OpenSession(session="w", npc="wizard"))
        err = await expect(a, "error")
        assert err["code"] == "npc_not_allowed" and err["session"] == "w"
        await open_session(a, "g1")
        await open_session(a, "g2", npc="merchant")

        # the token's cap counts on every gateway of the fleet
        await hello(b, token_name="game", token="s3cret")
        await send(b, P.OpenSession(session="g3", npc="guard"))
        err = await expect(b, "error")
        assert err["code"] == "too_many_sessions" and "token 'game'" in err["message"]
        # closing one frees a place
        await send(a, P.CloseSession(session="g1"))
        await expect(a, "closed")
        await open_session(b, "g3")


async def test_sessions_per_address_and_in_total_without_a_token(scratch_url):
    async with gateways(scratch_url, max_sessions_per_address=2, max_sessions_total=3,
                        proxy_header="X-Forwarded-For") as (gw,):
        one = {"X-Forwarded-For": "203.0.113.7"}
        two = {"X-Forwarded-For": "198.51.100.1, 203.0.113.9"}  # the last hop is the client
        async with connect(ws_url(gw), additional_headers=one) as a, \
                connect(ws_url(gw), additional_headers=one) as a2, \
                connect(ws_url(gw), additional_headers=two) as b:
            await open_session(a, "s1")
            await open_session(a2, "s2")
            await send(a2, P.OpenSession(session="s3", npc="guard"))
            err = await expect(a2, "error")
            assert err["code"] == "too_many_sessions" and "address" in err["message"]
            await open_session(b, "s3")
            await send(b, P.OpenSession(session="s4", npc="guard"))
            err = await expect(b, "error")
            assert err["code"] == "too_many_sessions" and "fleet" in err["message"]
        # a connection's sessions stop counting when it goes
        async with connect(ws_url(gw), additional_headers=one) as a3:
            for _ in range(50):
                await send(a3, P.OpenSession(session="s5", npc="guard"))
                if json.loads(await a3.recv())["type"] == "opened":
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("sessions of closed connections kept counting")


async def test_no_unauthenticated_listening_beyond_loopback(scratch_url):
    cfg = Config()
    cfg.redis.url = scratch_url
    gw = Gateway(cfg)
    with pytest.raises(ValueError, match="insecure_no_auth"):
        await gw.start("0.0.0.0", 0)
    await gw.stop()
    async with gateways(scratch_url, insecure_no_auth=True) as (gw,):
        assert gw.port  # told explicitly: it listens
    cfg.gateway.tokens = ["game:s3cret"]
    gw = Gateway(cfg)
    await gw.start("0.0.0.0", 0)
    await gw.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
async def test_wss_with_a_certificate(scratch_url, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    async with gateways(scratch_url, tls_cert=str(cert), tls_key=str(key)) as (gw,):
        trust = ssl.create_default_context(cafile=str(cert))
        async with connect(ws_url(gw, "wss"), ssl=trust) as ws:
            assert (await hello(ws))["type"] == "welcome"
            await open_session(ws, "tls")
        with pytest.raises((OSError, InvalidHandshake)):  # plain ws:// gets no WebSocket
            async with connect(ws_url(gw), open_timeout=2):
                pass


# --------------------------------------------------------------------------- hostile input


async def test_deep_json_is_answered_and_the_connection_and_its_sessions_live(scratch_url):
    async with gateways(scratch_url) as (gw,), connect(ws_url(gw)) as ws:
        await hello(ws)
        opened = await open_session(ws, "keep")
        for text in ("[" * 1000 + "]" * 1000,
                     '{"type":"ping","id":' + '{"a":' * 1000 + "1" + "}" * 1001):
            await ws.send(text)
            err = await expect(ws, "error")
            assert err["code"] == "bad_message" and "deeper" in err["message"]
        assert await alive(ws)
        await ws.send(mic(opened["channel"], 1))  # the session still takes audio
        await send(ws, P.CloseSession(session="keep"))
        assert (await expect(ws, "closed"))["session"] == "keep"


async def test_integers_out_of_range_are_refused(scratch_url):
    async with gateways(scratch_url) as (gw,), connect(ws_url(gw)) as ws:
        await hello(ws)
        await send(ws, {"type": "ping", "id": 2**64})
        err = await expect(ws, "error")
        assert err["code"] == "bad_message" and "0..4294967295" in err["message"]
        opened = await open_session(ws, "m")
        await send(ws, {"type": "ready", "session": "m", "turn": -1, "segment": 0})
        assert (await expect(ws, "error"))["session"] == "m"
        # the last u32 mic seq is used; the chunk after it gets a clear error, not silence
        await ws.send(mic(opened["channel"], P.U32))
        gap = await expect(ws, "error")
        assert gap["code"] == "bad_audio" and "never arrived" in gap["message"]
        await asyncio.sleep(1.05)  # bad_audio comes at most once a second
        await ws.send(mic(opened["channel"], 1))
        err = await expect(ws, "error")
        assert err["code"] == "bad_audio" and "open a new one" in err["message"]


async def test_bad_audio_at_most_once_a_second_with_a_count(scratch_url):
    async with gateways(scratch_url) as (gw,), connect(ws_url(gw)) as ws:
        await hello(ws)
        opened = await open_session(ws, "odd")
        for seq in range(1, 101):
            await ws.send(mic(opened["channel"], seq, b"\0\0\0"))  # half a sample
        errors = [m for m in await texts(ws, 0.5) if m["type"] == "error"]
        assert [e["code"] for e in errors] == ["bad_audio"]
        await asyncio.sleep(0.6)
        await ws.send(mic(opened["channel"], 101, b"\0"))
        err = await expect(ws, "error")
        assert err["suppressed"] == 99 and "99 more" in err["message"]


async def test_errors_do_not_echo_long_input(scratch_url):
    async with gateways(scratch_url) as (gw,), connect(ws_url(gw)) as ws:
        await hello(ws)
        for msg in ({"type": "open", "session": "p", "npc": "guard", "persona": "x" * 10_000},
                    {"type": "x" * 10_000},
                    {"type": "open", "session": "p", "npc": "guard", "format": "y" * 10_000},
                    {"type": "ping", "z" * 10_000: 1}):
            await send(ws, msg)
            err = await expect(ws, "error")
            assert err["code"] in ("bad_message", "unknown_type", "unsupported_format")
            assert len(err["message"]) < 300, err


async def test_protocol_1_gets_a_clear_error(scratch_url):
    async with gateways(scratch_url) as (gw,), connect(ws_url(gw)) as ws:
        err = await hello(ws, protocol=1)
        assert err["code"] == "unsupported_protocol"
        assert "speaks 2" in err["message"] and "client authors" in err["message"]
        assert (await hello(ws))["type"] == "welcome"


async def test_close_codes_rfc6455_requires(scratch_url):
    async with gateways(scratch_url, ws_max_size=100_000) as (gw,):
        async with connect(ws_url(gw)) as ws:
            await ws.send(b'{"type":"ping","id":1,"x":"\xff"}', text=True)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1007
        async with connect(ws_url(gw), max_size=None) as ws:
            await ws.send(b"\x01" * 200_000)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1009


_UPGRADE = (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


async def test_a_client_that_answers_no_ping_is_closed(scratch_url):
    async with gateways(scratch_url, ping_interval_s=0.3, ping_timeout_s=0.3) as (gw,):
        sock = await _raw_client(gw.port)
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        while await asyncio.wait_for(loop.sock_recv(sock, 4096), 10):
            pass  # pings and the close frame, until the server drops the connection
        assert time.monotonic() - t0 < 5  # interval + timeout, plus the close handshake
        sock.close()


async def _raw_client(port: int) -> socket.socket:
    """A bare TCP WebSocket client: it does only what the test makes it do (no auto pong)."""
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    await loop.sock_sendall(sock, _UPGRADE)
    head = b""
    while b"\r\n\r\n" not in head:
        head += await asyncio.wait_for(loop.sock_recv(sock, 1), 5)
    assert head.startswith(b"HTTP/1.1 101")
    return sock


def _text_frame(text: str) -> bytes:
    data, mask = text.encode(), b"\x01\x02\x03\x04"
    assert len(data) < 126
    return (bytes([0x81, 0x80 | len(data)]) + mask
            + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))


async def test_a_client_that_stops_reading_is_closed(scratch_url):
    async with gateways(scratch_url, ping_interval_s=0.3, ping_timeout_s=0.3) as (gw,):
        sock = await _raw_client(gw.port)
        opening = _text_frame(P.encode(P.OpenSession(session="deaf", npc="guard")))
        await asyncio.get_running_loop().sock_sendall(sock, opening)
        for _ in range(50):  # the session is open once the gateway stored its meta
            await asyncio.sleep(0.05)
            conns = list(gw.connections)
            if conns and conns[0].core.sessions:
                break
        sid = conns[0].core.sessions["deaf"].sid
        r = redis_connect(scratch_url)
        key = Keys(gw.config.redis.prefix).session(sid, "transcript")
        for seq in range(1, 401):  # 4 MB of output the client never reads
            entry = TranscriptEntry(text="x" * 10_000, final=False)
            await r.xadd(key, entry.to_fields(), id=f"1-{seq}")
        await r.aclose()
        t0 = time.monotonic()
        while gw.connections and time.monotonic() - t0 < 20:
            await asyncio.sleep(0.1)
        assert not gw.connections, "a client that does not read was kept"
        elapsed = time.monotonic() - t0
        print(f"non-reading client closed after {elapsed:.1f} s")
        assert elapsed < 15  # ping interval + timeout + close timeout (10 s)
        sock.close()
