"""The browser playground: plain HTTP GETs on the gateway's own port, beside the WebSocket.

websockets calls ``handle`` for every opening handshake; a request without ``Upgrade:
websocket`` is answered here (static files of ``gateway/playground/`` and a small JSON API) and
never reaches the protocol. Static files are looked up in a table built at start, so no request
path ever becomes a filesystem path: there is nothing to traverse.

The JSON API (personas, and stored sessions for replay, which hold other players' words and
audio) answers only on a gateway that has no tokens and listens on loopback: a developer's own
machine. Elsewhere the page itself is served and takes the NPC list from `welcome`.
"""

from __future__ import annotations

import base64
import email.utils
import json
import re
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import structlog
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from gateway import core as C
from schemas import protocol as P
from schemas.streams import Keys, SessionMeta, parse_id

STATIC_DIR = Path(__file__).resolve().parent / "playground"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".wav": "audio/wav",
}
_MAX_ID = 2**63 - 1
_TURN_PATH = re.compile(r"^/api/sessions/([A-Za-z0-9_.-]{1,64})/turns/([0-9]{1,10})$")
_TURNS_LISTED = 20  # per session in the list; the newest sessions first
_SESSIONS_LISTED = 50


def static_table(root: Path = STATIC_DIR) -> dict[str, Path]:
    """URL path -> file, for every servable file under ``root`` (read once, at start)."""
    table = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in CONTENT_TYPES and not p.name.startswith("."):
            table["/" + p.relative_to(root).as_posix()] = p
    if "/index.html" in table:
        table["/"] = table["/index.html"]
    return table


def response(status: int, body: bytes, content_type: str) -> Response:
    code = HTTPStatus(status)
    headers = Headers([
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Connection", "close"),  # websockets answers one request per connection
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-cache"),
        ("X-Content-Type-Options", "nosniff"),
    ])
    return Response(code.value, code.phrase, headers, body)


def json_response(data: Any, status: int = 200) -> Response:
    return response(status, json.dumps(data, separators=(",", ":")).encode(),
                    "application/json")


def error(status: int, message: str) -> Response:
    return json_response({"error": message, "status": status}, status)


class Playground:
    def __init__(self, redis, keys: Keys, personas: dict, local: bool,
                 root: Path = STATIC_DIR):
        self.redis = redis
        self.keys = keys
        self.personas = personas  # id -> core.personas.Persona
        self.local = local  # loopback, no tokens: the JSON API answers
        self.files = static_table(root)
        self.log = structlog.get_logger().bind(component="playground")

    async def handle(self, _connection, request: Request) -> Response | None:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None  # the protocol: go on with the handshake
        path = unquote(urlsplit(request.path).path)
        method = getattr(request, "method", "GET")  # websockets < 14 parses GET only
        if method not in ("GET", "HEAD"):
            out = error(405, f"{method[:10]}: the playground only answers GET and HEAD")
            out.headers["Allow"] = "GET, HEAD"
            return out
        try:
            out = await self._get(path)
        except Exception as exc:  # one bad request must not touch the gateway
            self.log.exception("http_failed", path=path[:80], error=repr(exc)[:200])
            out = error(500, "the server failed on this request")
        if method == "HEAD":  # the same headers (Content-Length included), no body
            out = Response(out.status_code, out.reason_phrase, out.headers, b"")
        return out

    async def _get(self, path: str) -> Response:
        if path.startswith("/api/"):
            return await self._api(path)
        file = self.files.get(path)
        if file is None:
            return error(404, f"no such file: {path[:80]}")
        return response(200, file.read_bytes(), CONTENT_TYPES[file.suffix])

    async def _api(self, path: str) -> Response:
        if not self.local:
            return error(403, "the playground's API answers only on a gateway on loopback "
                              "without tokens")
        if path == "/api/personas":
            return json_response({"personas": [
                {"id": pid, "name": p.name, "voice": p.voice, "greeting": p.greeting}
                for pid, p in sorted(self.personas.items())]})
        if path == "/api/sessions" or path.startswith("/api/sessions/"):
            if path == "/api/sessions":
                return json_response({"sessions": await self.sessions()})
            m = _TURN_PATH.match(path)
            if m is None:
                return error(404, "expected /api/sessions/<sid>/turns/<turn>")
            turn = await self.stored_turn(m.group(1), int(m.group(2)))
            if turn is None:
                return error(404, f"session {m.group(1)!r} has no stored reply for turn "
                                  f"{m.group(2)}")
            return json_response(turn)
        return error(404, f"no such endpoint: {path[:80]}")

    async def sessions(self) -> list[dict]:
        """The newest stored sessions with the turns that have reply audio."""
        sids = await self.redis.zrevrange(self.keys.sessions(), 0, _SESSIONS_LISTED - 1)
        out = []
        for raw in sids:
            sid = raw.decode() if isinstance(raw, bytes) else raw
            fields = await self.redis.hgetall(self.keys.session(sid, "meta"))
            if not fields or b"sid" not in fields:
                continue
            meta = SessionMeta.from_fields(fields)
            out.append({"sid": sid, "npc": meta.npc, "persona": meta.persona,
                        "created": meta.created, "state": meta.state,
                        "turns": await self._turns(self.keys.session(sid, "voice"))})
        out.sort(key=lambda s: -s["created"])
        return out

    async def _turns(self, key: str) -> list[int]:
        turns: list[int] = []
        start = "-"
        while len(turns) < _TURNS_LISTED:
            head = await self.redis.xrange(key, start, "+", count=1)
            if not head:
                break
            turn, _ = parse_id(head[0][0])
            turns.append(turn)
            start = f"{turn + 1}-0"
        return turns

    async def stored_turn(self, sid: str, turn: int) -> dict | None:
        """A stored turn as the wire carried it: the JSON messages and binary frames a client
        got, in stream order (transcript, reply text, audio, face), every segment as if UE had
        said ready, and turn_done with the stored latency marks."""
        span = (f"{turn}-0", f"{turn}-{_MAX_ID}")
        entries = {s: await self.redis.xrange(self.keys.session(sid, s), *span)
                   for s in ("transcript", "reply", "voice", "face")}
        if not entries["voice"]:
            return None
        relay = C.Relay("replay", 1)
        items: list[dict] = []
        timings = await self._timings(sid, turn)
        for stream in ("transcript", "reply", "voice", "face"):
            for eid, fields in entries[stream]:
                eid = eid.decode() if isinstance(eid, bytes) else eid
                if stream == "voice" and b"segment" in fields:
                    relay.ready_segments.add((turn, int(fields[b"segment"])))
                for out in relay.feed(stream, eid, fields):
                    items.append(_item(out, timings))
        meta = await self.redis.hgetall(self.keys.session(sid, "meta"))
        npc = SessionMeta.from_fields(meta).npc if meta and b"sid" in meta else ""
        return {"sid": sid, "turn": turn, "npc": npc, "timings": timings, "items": items}

    async def _timings(self, sid: str, turn: int) -> dict[str, float]:
        raw = await self.redis.hgetall(self.keys.session(sid, "timing"))
        prefix = f"{turn}:"
        return {k.decode()[len(prefix):]: float(v) for k, v in raw.items()
                if k.decode().startswith(prefix)}


def _item(out, timings: dict[str, float]) -> dict:
    if isinstance(out, bytes):
        return {"binary": base64.b64encode(out).decode()}
    if isinstance(out, P.TurnDone) and not out.interrupted:
        out.timings = dict(timings)
    return {"text": P.encode(out)}
