"""The WebSocket gateway: the I/O around gateway.core.

One connection carries many NPC sessions. Inbound messages go through ConnectionCore; the actions
it returns are carried out here (Redis writes, replies). Each session has a relay task that tails
the session's output streams with one blocking XREAD and sends what Relay lets through. The
gateway keeps nothing that Redis does not also hold, so a restarted gateway loses nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time

import structlog
from redis.exceptions import ResponseError
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from core.config import Config
from core.personas import load_personas
from core.redisconn import RETRYABLE, connect, is_stale_id
from core.retry import Backoff
from gateway import access
from gateway import core as C
from gateway.admission import Admission, FleetLoad
from gateway.lifecycle import SessionLifecycle
from gateway.livelink import LiveLinkSender, parse_target
from gateway.livelink_output import LiveLinkOutput
from gateway.mic_hold import MicHold
from gateway.observe import GatewayObserver, sent
from gateway.retention import TRIM_EVERY, trim_session
from gateway.watchdog import start_turn_watch
from schemas import protocol as P
from schemas.streams import (
    WAKE_LISTENER_LUA,
    ControlEntry,
    EventEntry,
    Keys,
    MicEntry,
    ReplyEntry,
    SessionMeta,
    VoiceEntry,
    mic_id,
    now_ms,
    parse_id,
)

STOP_STEP_S = 3.0


class Gateway:
    def __init__(self, config: Config):
        self.config = config
        self.keys = Keys(config.redis.prefix)
        self.redis = connect(config.redis.url, max_connections=4096)
        self.wake_listener = self.redis.register_script(WAKE_LISTENER_LUA)
        self.clustered = config.redis.url.split("://", 1)[0].endswith("+cluster")
        self.lifecycle = SessionLifecycle(self.redis, self.keys, config)
        self._lifecycle_task: asyncio.Task | None = None
        self.fleet_load = FleetLoad(self.redis, self.keys,
                                   stuck_ms=max(1.0, config.gateway.admit_max_queue_ms))
        self.admission = Admission(config.gateway.admit_max_lag_ms,
                                   config.gateway.admit_max_queue_ms)
        self._admission_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        personas = load_personas(config.personas_dir())
        self.personas = {pid: p.voice for pid, p in personas.items()}
        self._persona_info = personas
        g = config.gateway
        self.limits = C.Limits(
            max_frame_bytes=g.max_frame_bytes, max_sessions=g.max_sessions,
            msgs_per_s=g.msgs_per_s, msgs_burst=g.msgs_burst,
            conn_msgs_per_s=g.conn_msgs_per_s, conn_msgs_burst=g.conn_msgs_burst,
            tokens=C.parse_tokens(g.tokens, g.auth_token),
            audio_realtime_factor=g.audio_realtime_factor, audio_burst_s=g.audio_burst_s,
        )
        # names this process in session owners; connections add a counter
        self.gateway_id = secrets.token_hex(6)
        self._conn_ids = itertools.count(1)
        self.attachments = access.Attachments(self.redis, config.redis.prefix)
        self._lease_task: asyncio.Task | None = None
        self.log = structlog.get_logger().bind(component="gateway")
        self.connections: set[Connection] = set()
        self.server = None
        self.livelink: LiveLinkSender | None = None
        self.observer = GatewayObserver(self)

    async def start(self, host: str | None = None, port: int | None = None):
        g = self.config.gateway
        host = g.host if host is None else host
        access.check_listen(host, bool(self.limits.tokens), g.insecure_no_auth)
        tls = access.ssl_context(g.tls_cert, g.tls_key)
        self._lease_task = asyncio.create_task(self._refresh_leases())
        if self.config.lipsync.livelink:
            # The target comes from configuration only: a client must never aim our UDP.
            target = parse_target(self.config.lipsync.livelink)
            self.livelink = await LiveLinkSender(target, fps=self.config.lipsync.fps).open()
            self.log.info("livelink_target", host=target[0], port=target[1])
        playground = None
        if g.playground:
            from gateway.playground_http import Playground

            # its API (stored sessions) only where nobody else can ask: loopback, no tokens
            local = access.is_loopback(host) and not self.limits.tokens
            playground = Playground(self.redis, self.keys, self._persona_info, local).handle
        self.server = await serve(
            self._handler, host or None, g.port if port is None else port,
            process_request=playground,
            max_size=g.ws_max_size, ping_interval=g.ping_interval_s,
            ping_timeout=g.ping_timeout_s, ssl=tls,
            compression=None,  # audio does not compress; deflate only adds latency
        )
        sock = next(iter(self.server.sockets))
        self.port = sock.getsockname()[1]
        grace = self.config.redis.detached_grace_s
        self._lifecycle_task = asyncio.create_task(self.lifecycle.run(
            self.held_sessions, refresh_s=max(1.0, grace / 4), sweep_s=g.sweep_s))
        self._admission_task = asyncio.create_task(self._watch_load(g.admission_poll_s))
        self._watch_task = start_turn_watch(self)
        self.observer.start()
        self.log.info("gateway_listening", host=host or g.host, port=self.port)
        return self.server

    async def _watch_load(self, every_s: float) -> None:
        was = True
        while True:
            try:
                v = self.admission.update(await self.fleet_load.read())
                if v.admit != was:
                    self.log.warning("admission", admit=v.admit, reason=v.reason)
                    was = v.admit
            except RETRYABLE as exc:
                self.log.warning("redis_unavailable", during="admission", error=str(exc))
            except Exception:  # a bad reading must not end admission control for good
                self.log.exception("admission_failed")
            await asyncio.sleep(every_s)

    def held_sessions(self):
        for conn in list(self.connections):
            for state in list(conn.core.sessions.values()):
                yield state.sid

    async def stop(self) -> None:
        await self.observer.stop()  # not ready from now on
        # Each step is bounded: a Redis call caught mid-failover that swallows its task's
        # cancellation (redis-py on Python 3.11) must not keep a stopping gateway alive.
        for task in (self._lifecycle_task, self._admission_task, self._watch_task):
            if task is not None:
                task.cancel()
                await asyncio.wait([task], timeout=STOP_STEP_S)
        if self.server is not None:
            self.server.close()
            await asyncio.wait([asyncio.ensure_future(self.server.wait_closed())],
                               timeout=2 * STOP_STEP_S)
        if self._lease_task is not None:
            self._lease_task.cancel()
        if self.livelink is not None:
            self.livelink.close()
        self.observer.close()
        await asyncio.wait([asyncio.ensure_future(self.redis.aclose())], timeout=STOP_STEP_S)

    async def _handler(self, ws: ServerConnection) -> None:
        conn = Connection(self, ws)
        self.connections.add(conn)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)

    async def _refresh_leases(self) -> None:
        """Keeps this gateway's attachments counted; those of a dead gateway lapse."""
        while True:
            await asyncio.sleep(access.Attachments.LEASE_S / 3)
            held = [(c.member(sid), principal) for c in list(self.connections)
                    for sid, principal in list(c.attached.items())]
            try:
                if held:
                    await self.attachments.refresh(held)
            except RETRYABLE as exc:
                self.log.warning("redis_unavailable", during="lease_refresh", error=str(exc))


class Connection:
    def __init__(self, gw: Gateway, ws: ServerConnection):
        self.gw = gw
        self.ws = ws
        self.core = C.ConnectionCore(gw.limits, gw.personas)
        self.relays: dict[str, tuple[C.Relay, asyncio.Task]] = {}
        self.livelink = (LiveLinkOutput(gw.livelink, gw.config.lipsync.fps)
                         if gw.livelink is not None else None)
        self.mic_queues: dict[str, list[MicEntry]] = {}  # per sid, not yet in Redis
        self.mic_writers: dict[str, asyncio.Task] = {}
        self.mic_count: dict[str, int] = {}  # chunks appended per sid (for retention trims)
        self.mic_holds: dict[str, MicHold] = {}  # per sid: recent chunks, for a failover
        self._marked: set[tuple[str, int, str]] = set()
        self._bg: set[asyncio.Task] = set()
        self.redis = gw.redis
        self.keys = gw.keys
        peer = ws.remote_address
        g = gw.config.gateway
        headers = ws.request.headers if ws.request is not None else None
        self.address = access.client_address(peer[0] if peer else "?", headers,
                                              g.proxy_header, g.trusted_proxies)
        self.conn_id = f"{gw.gateway_id}.{next(gw._conn_ids)}"
        self.attached: dict[str, str] = {}  # sid -> the principal it counts against
        self.log = gw.log.bind(peer=f"{peer[0]}:{peer[1]}" if peer else "?", conn=self.conn_id,
                               client=self.address)

    @property
    def principal(self) -> str:
        """Whose sessions these count as: the token's, else the client address's."""
        token = self.core.token
        return f"token:{token.name}" if token is not None else f"addr:{self.address}"

    def member(self, sid: str) -> str:
        return f"{self.conn_id}|{sid}"

    async def run(self) -> None:
        self.log.info("client_connected")
        try:
            async for message in self.ws:
                await self._receive(message)
        except ConnectionClosed:
            pass
        finally:
            for _, task in self.relays.values():
                task.cancel()
            if self.livelink is not None:
                self.livelink.close()
            await asyncio.gather(*(t for _, t in self.relays.values()), return_exceptions=True)
            await self.flush_mic()
            await self._detach_all()
            await self._release_all()
            self.log.info("client_disconnected", sessions=len(self.relays))

    async def _receive(self, message: str | bytes) -> None:
        now = time.monotonic()
        try:
            if isinstance(message, str):
                actions = self.core.receive_text(message, now)
            else:
                actions = self.core.receive_binary(message, now)
            for action in actions:
                await self._do(action)
        except (ConnectionClosed, asyncio.CancelledError):
            raise
        except Exception as exc:  # a server fault answers this message, and the link lives on
            self.log.exception("message_failed", error=repr(exc)[:200])
            await self.send(P.ErrorEvent(code=P.ErrorCode.INTERNAL,
                                         message="the server failed on this message"))

    async def _release(self, sid: str) -> None:
        principal = self.attached.pop(sid, None)
        if principal is None:
            return
        try:
            await self.gw.attachments.release(self.member(sid), principal)
        except RETRYABLE:
            pass  # the lease lapses on its own

    async def _release_all(self) -> None:
        for sid in list(self.attached):
            await self._release(sid)

    async def _admit(self, session: str, sid: str) -> bool:
        """Fleet-wide caps: in total, and per token (or per address without one)."""
        g = self.gw.config.gateway
        token = self.core.token
        cap = (token.max_sessions if token is not None else g.max_sessions_per_address)
        why = await self.gw.attachments.admit(self.member(sid), self.principal,
                                              g.max_sessions_total, cap)
        if why is None:
            self.attached[sid] = self.principal
            return True
        self.log.warning("session_refused", session=sid, reason=why)
        await self.send(P.ErrorEvent(code=P.ErrorCode.TOO_MANY_SESSIONS, message=why,
                                     session=session))
        return False

    async def send(self, message: P.Message | bytes) -> None:
        if not isinstance(message, bytes):
            sent(message)
        data = message if isinstance(message, bytes) else P.encode(message)
        try:
            await self.ws.send(data)
        except ConnectionClosed:
            pass

    async def _do(self, action: C.Action) -> None:
        try:
            await self._dispatch(action)
        except RETRYABLE as exc:
            self.log.warning("redis_unavailable", error=str(exc))
            await self.send(P.ErrorEvent(code=P.ErrorCode.UNAVAILABLE,
                                         message="storage is unavailable; retry shortly",
                                         session=getattr(action, "session", None)))

    async def _dispatch(self, action: C.Action) -> None:
        if isinstance(action, C.Send):
            await self.send(action.message)
        elif isinstance(action, C.AppendMic):
            self._queue_mic(action.session, action.sid, MicEntry(seq=action.seq,
                                                                 pcm=action.pcm))
        elif isinstance(action, C.AppendEndOfUtterance):
            if action.after_seq >= 1:
                self._queue_mic(action.session, action.sid,
                                MicEntry(seq=action.after_seq, end_of_utterance=True))
        elif isinstance(action, C.ReadyAction):
            played_at = now_ms()  # before the face frames go out: UE starts playing now
            relay = self.relays.get(action.session)
            self._control(action.sid, ControlEntry("ready", turn=action.turn,
                                                   segment=action.segment))
            if relay is not None:
                self._timing(relay[0].state, action.turn, "ready")
                # frames first: the face is what UE is waiting for; the bookkeeping can follow
                for out in relay[0].ready(action.turn, action.segment, time.monotonic()):
                    await self._send_out(relay[0], action.turn, out)
            # the play clock for STT's echo gate: when UE started this segment (wall clock,
            # compared there with the arrival of the mic audio around it); a resend is not news
            async with self.redis.pipeline(transaction=False) as p:
                p.sadd(self.keys.session(action.sid, "ready"), f"{action.turn}:{action.segment}")
                if action.first:
                    p.xadd(self.keys.session(action.sid, "events"),
                           EventEntry(kind="playing", turn=action.turn,
                                      code=str(action.segment), ts=played_at).to_fields(),
                           maxlen=self.gw.config.redis.stream_maxlen, approximate=True)
                await p.execute()
            if self.livelink is not None:
                self.livelink.ready(action.session, action.sid, action.turn)
        elif isinstance(action, C.OpenAction):
            await self._open(action)
        elif isinstance(action, C.ResumeAction):
            await self._resume(action)
        elif isinstance(action, C.CloseAction):
            await self._close(action.session, action.sid)
        elif isinstance(action, C.InterruptAction):
            await self._client_interrupt(action)

    def _queue_mic(self, session: str, sid: str, entry: MicEntry) -> None:
        """Mic audio goes to Redis in order, per session, without holding up this connection's
        next message: at 50 players a Redis round trip awaited per 20 ms chunk put the gateway
        450 ms behind its clients. Whatever queued meanwhile goes in one round trip."""
        queue = self.mic_queues.setdefault(sid, [])
        queue.append(entry)
        self._start_mic_writer(session, sid)

    def _start_mic_writer(self, session: str, sid: str) -> None:
        queue = self.mic_queues.setdefault(sid, [])
        if sid not in self.mic_writers:
            task = asyncio.create_task(self._write_mic(session, sid, queue))
            self.mic_writers[sid] = task
            task.add_done_callback(lambda _t, s=sid: self.mic_writers.pop(s, None))

    async def _write_mic(self, session: str, sid: str, queue: list[MicEntry]) -> None:
        hold = self.mic_holds.setdefault(sid, MicHold(give_up_s=self.gw.config.gateway.mic_retry_s))
        backoff = Backoff(cap_s=0.5)
        while queue or hold.suspect:
            batch = queue[:]
            del queue[:len(batch)]
            try:
                if send := hold.to_send(batch):
                    await self._append_mic(sid, send)
            except RETRYABLE as exc:
                self.log.warning("redis_unavailable", during="mic", session=sid, error=str(exc))
                if not hold.failed(time.monotonic()):
                    queue[:0] = batch  # kept in order: a failover takes seconds
                    await backoff.wait()
                    continue
                await self.send(P.ErrorEvent(
                    code=P.ErrorCode.UNAVAILABLE, session=session,
                    message=f"storage is unavailable: {len(batch)} mic message(s) were not "
                            "stored; resend from opened.next_mic_seq after a resume"))
                continue
            hold.stored(batch, time.monotonic())
            backoff.reset()
        self.mic_queues.pop(sid, None)

    async def _append_mic(self, sid: str, entries: list[MicEntry]) -> None:
        """Append, then make sure an STT job listens: a session gets one only while its mic
        sends (an idle NPC holds no worker). One round trip for all of it on one Redis; on a
        Cluster the mic stream and the job streams live on different nodes, whose replies a
        pipeline does not order, and the wake must come after the audio it wakes for."""
        wake = dict(keys=[self.keys.listener(sid), self.keys.jobs("stt")], args=[sid, now_ms()])
        async with self.redis.pipeline(transaction=False) as p:
            for entry in entries:
                # no MAXLEN: retention is by time (gateway/retention.py), so the whole
                # retained conversation replays
                p.xadd(self.keys.session(sid, "mic"), entry.to_fields(),
                       id=mic_id(entry.seq, entry.end_of_utterance))
            if not self.gw.clustered:
                await self.gw.wake_listener(**wake, client=p)
            res = await p.execute(raise_on_error=False)
        for r in res:
            # a resend Redis already has is refused by its ID: that is the point of the IDs
            if isinstance(r, ResponseError) and not is_stale_id(r):
                raise r
        if self.gw.clustered:
            await self.gw.wake_listener(**wake)
        self._maybe_trim(sid, len(entries))

    def _maybe_trim(self, sid: str, appended: int) -> None:
        """Every TRIM_EVERY mic chunks, the session's streams lose what is older than the
        retention period (in the background: it is bookkeeping)."""
        before = self.mic_count.get(sid, 0)
        self.mic_count[sid] = before + appended
        retain_s = self.gw.config.redis.retention_s
        if retain_s <= 0 or before // TRIM_EVERY == (before + appended) // TRIM_EVERY:
            return
        task = asyncio.create_task(trim_session(self.redis, self.keys, sid,
                                                now_ms() - retain_s * 1000))
        self._bg.add(task)
        task.add_done_callback(self._bg_done)

    async def flush_mic(self) -> None:
        """Until every queued mic message is in Redis (before a session is detached)."""
        while self.mic_writers:
            await asyncio.gather(*list(self.mic_writers.values()), return_exceptions=True)

    async def _open(self, a: C.OpenAction) -> None:
        req = a.request
        verdict = self.gw.admission.verdict
        if not verdict.admit:
            # Said before the player speaks: the game can show the NPC as busy and retry.
            self.core.drop(a.session)
            self.log.warning("session_refused", reason=verdict.reason, npc=req.npc)
            await self.send(P.ErrorEvent(
                code=P.ErrorCode.OVERLOADED, session=a.session,
                message=f"the NPC is busy: {verdict.reason}; retry in "
                        f"{verdict.retry_after_ms} ms"))
            return
        meta = SessionMeta(sid=a.sid, session=a.session, npc=req.npc, persona=a.persona,
                           voice=a.voice, sample_rate=req.sample_rate, channels=req.channels,
                           format=req.format, endpoint=req.endpoint or "vad", seed=a.sid)
        opened_at = now_ms()
        try:
            if not await self._admit(a.session, a.sid):
                self.core.drop(a.session)
                return
            async with self.redis.pipeline(transaction=False) as p:
                p.hset(self.keys.session(a.sid, "meta"), mapping=meta.to_fields())
                p.zadd(self.keys.sessions(),
                       {a.sid: now_ms() + self.gw.config.redis.detached_grace_s * 1000})
                await p.execute()
        except RETRYABLE:
            self.core.drop(a.session)
            raise
        state = self.core.sessions[a.session]
        secret = await self._own_new(a.sid)
        self._control(a.sid, ControlEntry("open", ts=opened_at, data={
            "session": a.session, "npc": req.npc, "persona": a.persona,
            "sample_rate": req.sample_rate, "channels": req.channels, "format": req.format,
            "endpoint": meta.endpoint}))
        self.log.info("session_opened", session=a.sid, npc=req.npc, persona=a.persona,
                      rate=req.sample_rate, channels=req.channels, format=req.format)
        await self.send(P.SessionOpened(session=a.session, channel=a.channel, sid=a.sid,
                                        npc=req.npc, persona=a.persona, voice=a.voice,
                                        reply_sample_rate=22050, next_mic_seq=1,
                                        resume_secret=secret))
        self._start_relay(state, {s: "0-0" for s in C.Relay.STREAMS}, min_turn=0)

    async def _resume(self, a: C.ResumeAction) -> None:
        req = a.request
        meta = await self._owned_meta(req)
        if meta is None:
            return
        top = await self.redis.xrevrange(self.keys.session(req.sid, "mic"), count=1)
        next_mic = parse_id(top[0][0])[0] + 1 if top else 1
        ready = {tuple(int(x) for x in m.decode().split(":"))
                 for m in await self.redis.smembers(self.keys.session(req.sid, "ready"))}
        segments = set(ready)
        for _eid, f in await self.redis.xrange(self.keys.session(req.sid, "voice"),
                                              f"{req.turn}-0", f"{req.turn}-{2**63 - 1}"):
            seg = f.get(b"segment")
            if seg is not None:
                segments.add((req.turn, int(seg)))
        if not await self._admit(req.session, req.sid):
            return
        state = self.core.resumed(req, meta.sample_rate, meta.channels, meta.format, next_mic,
                                  segments, ready, time.monotonic())
        await self.redis.hset(self.keys.session(req.sid, "meta"), mapping={"state": "open"})
        await self.gw.lifecycle.attached([req.sid])
        cursors = {"transcript": "", "reply": "", "voice": "", "face": "", "events": "0-0"}
        channel_of = {"transcript": "transcript", "reply": "reply", "voice": "audio",
                      "face": "face"}
        for stream, ch in channel_of.items():
            cursors[stream] = f"{req.turn}-{req.last.get(ch, 0)}" if req.turn else "0-0"
        state.owner_mark = await self._take_over(req.sid)
        self._control(req.sid, ControlEntry("resume", data={  # never the resume secret
            "session": req.session, "turn": req.turn, "last": req.last, "mic_seq": req.mic_seq}))
        self.log.info("session_resumed", session=req.sid, turn=req.turn, last=req.last)
        await self.send(P.SessionOpened(session=req.session, channel=state.channel, sid=req.sid,
                                        npc=meta.npc, persona=meta.persona, voice=meta.voice,
                                        reply_sample_rate=22050, next_mic_seq=next_mic,
                                        resumed=True))
        self._start_relay(state, cursors, min_turn=req.turn, live_since_ms=now_ms())

    async def _owned_meta(self, req: P.Resume) -> SessionMeta | None:
        """The stored session, when the resume proves it may have it; else the error is sent."""
        raw = await self.redis.hgetall(self.keys.session(req.sid, "meta"))
        stored = raw.get(b"secret_hash", b"").decode()
        # One answer for an unknown sid and a wrong secret: no oracle for valid sids.
        if not raw or not access.secret_matches(req.resume_secret, stored):
            self.log.warning("resume_refused", session=req.sid)
            await self.send(P.ErrorEvent(
                code=P.ErrorCode.SESSION_NOT_OPEN,
                message="resume: no stored session with this sid and resume_secret",
                session=req.session))
            return None
        meta = SessionMeta.from_fields(raw)
        if meta.state in ("closed", "ended"):
            await self.send(P.ErrorEvent(code=P.ErrorCode.SESSION_NOT_OPEN,
                                         message=f"resume: session {req.sid!r} was {meta.state}",
                                         session=req.session))
            return None
        try:
            self.core.check_allowed(meta.npc, req.session)
            self.core.check_allowed(meta.persona, req.session)
        except P.ProtocolError as exc:
            await self.send(P.ErrorEvent(code=exc.code, message=exc.message,
                                         session=req.session))
            return None
        return meta

    async def _own_new(self, sid: str) -> str:
        """A new session's resume secret: the client gets it, Redis only its hash."""
        secret, secret_hash = access.new_secret()
        await self.redis.hset(self.keys.session(sid, "meta"),
                              mapping={"secret_hash": secret_hash, "owner": self.conn_id})
        return secret

    async def _take_over(self, sid: str) -> tuple[int, int]:
        """Make this connection the session's one owner. The events entry tells the previous
        owner, on whichever gateway, through the stream its relay already tails; owner entries
        up to the returned id are older than this attachment."""
        async with self.redis.pipeline(transaction=True) as p:
            p.hset(self.keys.session(sid, "meta"),
                   mapping={"state": "open", "owner": self.conn_id})
            p.xadd(self.keys.session(sid, "events"),
                   EventEntry(kind="owner", turn=0, code=self.conn_id).to_fields())
            _, mark = await p.execute()
        return parse_id(mark.decode() if isinstance(mark, bytes) else mark)

    async def _taken_over(self, relay: C.Relay) -> None:
        """Another connection resumed this session: stop serving it here and say so."""
        state = relay.state
        self.relays.pop(state.session, None)
        if self.livelink is not None:
            self.livelink.stop_session(state.session)
        self.core.drop(state.session)
        await self._release(state.sid)
        self.log.info("session_taken_over", session=state.sid)
        await self.send(P.TakenOver(session=state.session))

    def _control(self, sid: str, entry: ControlEntry) -> None:
        """Store a client control message for replay (off the hot path, stamped on arrival)."""
        task = asyncio.create_task(self.redis.xadd(self.keys.session(sid, "control"),
                                                   entry.to_fields()))
        self._bg.add(task)
        task.add_done_callback(self._bg_done)

    def _bg_done(self, task: asyncio.Task) -> None:
        self._bg.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.warning("background_write_failed", error=str(task.exception()))

    def _timing(self, state: C.SessionState, turn: int, name: str) -> None:
        """Latency waterfall: first time ``name`` happened in ``turn`` (off the hot path)."""
        key = (state.sid, turn, name)
        if key in self._marked:
            return
        self._marked.add(key)
        task = asyncio.create_task(self.redis.hsetnx(self.keys.session(state.sid, "timing"),
                                                     f"{turn}:{name}", now_ms()))
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _send_out(self, relay: C.Relay, turn: int, out) -> None:
        if isinstance(out, bytes):
            await self.send(out)
            kind = out[0]
            if kind == P.FrameKind.REPLY_AUDIO:
                self._timing(relay.state, turn, "gw_first_audio")
            elif kind == P.FrameKind.FACE_FRAMES:
                self._timing(relay.state, turn, "gw_first_face")
            return
        if isinstance(out, P.TurnDone) and not out.interrupted:
            raw = await self.redis.hgetall(self.keys.session(relay.state.sid, "timing"))
            prefix = f"{out.turn}:"
            out.timings = {k.decode()[len(prefix):]: float(v) for k, v in raw.items()
                           if k.decode().startswith(prefix)}
        await self.send(out)

    async def _interrupt(self, relay: C.Relay, turn: int, reason: str) -> None:
        """Cancel ``turn`` everywhere: workers see the event (or the marker, if they start
        later) and stop; UE is told to stop playing."""
        sid = relay.state.sid
        outs = relay.interrupt(turn, reason)
        if not outs:
            return
        if self.livelink is not None:
            self.livelink.stop_turn(relay.state.session, turn)
        async with self.redis.pipeline(transaction=False) as p:
            p.set(self.keys.session(sid, "cancel"), turn)
            p.xadd(self.keys.session(sid, "events"),
                   EventEntry(kind="interrupt", turn=turn, code=reason).to_fields())
            p.hsetnx(self.keys.session(sid, "timing"), f"{turn}:interrupt", now_ms())
            await p.execute()
        self.log.info("turn_interrupted", session=sid, turn=turn, reason=reason)
        for out in outs:
            if reason == "client" and isinstance(out, P.StopPlayback):
                continue  # UE stopped on its own; it needs no stop
            await self.send(out)

    async def _client_interrupt(self, action: C.InterruptAction) -> None:
        relay = self.relays.get(action.session)
        if relay is None:
            return
        verdict = relay[0].client_interrupt(time.monotonic())
        late = isinstance(verdict, P.ErrorEvent)
        self._control(action.sid, ControlEntry(
            "interrupt", turn=0 if late else verdict.turn,
            played=-1 if action.played_samples is None else action.played_samples,
            code="too_late" if late else verdict.reason))
        if isinstance(verdict, P.ErrorEvent):  # too late: said so, never ignored silently
            self.log.info("interrupt_too_late", session=action.sid, reason=verdict.message)
            await self.send(verdict)
            return
        self.log.info("interrupt", session=action.sid, turn=verdict.turn, reason=verdict.reason,
                      played=action.played_samples)
        if action.played_samples is not None:
            await self._keep_heard(action.sid, verdict.turn, action.played_samples)
        if verdict.reason == "client":
            await self._interrupt(relay[0], verdict.turn, "client")

    async def _keep_heard(self, sid: str, turn: int, played: int) -> None:
        """History keeps only the words UE played before the cut (TTS word timings)."""
        span = (f"{turn}-0", f"{turn}-{2**63 - 1}")
        voice = await self.redis.xrange(self.keys.session(sid, "voice"), *span)
        reply = await self.redis.xrange(self.keys.session(sid, "reply"), *span)
        texts = {r.segment: r.text for r in (ReplyEntry.from_fields(f) for _, f in reply)
                 if not r.end}
        heard = C.heard_text(texts, [VoiceEntry.from_fields(f) for _, f in voice], played)
        await self.redis.hset(self.keys.session(sid, "history"), f"{turn}:heard", heard)

    def _livelink_feed(self, relay: C.Relay, stream: str, eid: str, fields: dict) -> None:
        ts = relay.turns.get(parse_id(eid)[0]) if stream == "face" else None
        self.livelink.feed(relay.state.session, relay.state.sid, stream, eid, fields,
                           interrupted=ts is not None and ts.interrupted)

    async def _close(self, session: str, sid: str) -> None:
        self._control(sid, ControlEntry("close"))
        writer = self.mic_writers.get(sid)
        if writer is not None:  # what the player said before closing still counts
            await asyncio.gather(writer, return_exceptions=True)
        self.mic_holds.pop(sid, None)
        relay = self.relays.pop(session, None)
        if relay is not None:
            relay[1].cancel()
        if self.livelink is not None:
            self.livelink.stop_session(session)
        await self._mark(sid, "closed")
        await self._release(sid)
        await self.send(P.SessionClosed(session=session))
        self.log.info("session_closed", session=sid)

    async def _mark(self, sid: str, state: str) -> None:
        await self.gw.lifecycle.left(sid, state)

    async def _detach_all(self) -> None:
        # The client may come back and resume; until then the session stays in Redis.
        for state in list(self.core.sessions.values()):
            self._control(state.sid, ControlEntry("detach"))
            try:
                await self._mark(state.sid, "detached")
            except RETRYABLE:
                pass

    def _start_relay(self, state: C.SessionState, cursors: dict[str, str], min_turn: int,
                     live_since_ms: float = 0.0) -> None:
        relay = C.Relay(state, min_turn=min_turn, live_since_ms=live_since_ms)
        task = asyncio.create_task(self._relay_loop(relay, cursors))
        self.relays[state.session] = (relay, task)
        if self.livelink is not None:
            idle = self.livelink.start_session(state.session, state.sid)
            task.add_done_callback(lambda _t: idle.cancel())

    async def _relay_loop(self, relay: C.Relay, cursors: dict[str, str]) -> None:
        sid = relay.state.sid
        keys = {self.keys.session(sid, s): s for s in C.Relay.STREAMS}
        ids = {k: cursors[s] for k, s in keys.items()}
        backoff = Backoff()
        while True:
            try:
                res = await self.redis.xread(ids, block=5000, count=256)
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except RETRYABLE as exc:
                self.log.warning("redis_unavailable", during="relay", session=sid,
                                 error=str(exc))
                if sid in self.mic_holds:  # the mic's last chunks may be gone with a primary
                    self.mic_holds[sid].read_failed()
                    self._start_mic_writer(relay.state.session, sid)
                await backoff.wait()
                continue
            for key, entries in res or []:
                key = key.decode() if isinstance(key, bytes) else key
                stream = keys[key]
                for eid, fields in entries:
                    eid = eid.decode() if isinstance(eid, bytes) else eid
                    ids[key] = eid
                    if stream == "events" and fields.get(b"kind") == b"owner":
                        if (parse_id(eid) > relay.state.owner_mark
                                and fields.get(b"code", b"").decode() != self.conn_id):
                            await self._taken_over(relay)
                            return
                        continue
                    try:
                        if self.livelink is not None:
                            self._livelink_feed(relay, stream, eid, fields)
                        outs = relay.feed(stream, eid, fields, time.monotonic())
                    except (ValueError, KeyError) as exc:
                        self.log.error("bad_stream_entry", stream=stream, id=eid, error=str(exc))
                        continue
                    turn = parse_id(eid)[0] if stream != "events" else 0
                    for out in outs:
                        if isinstance(out, C.InterruptTurn):
                            await self._interrupt(relay, out.turn, out.reason)
                        else:
                            await self._send_out(relay, turn, out)


async def run_gateway(config: Config, host: str | None = None, port: int | None = None,
                      stop: asyncio.Event | None = None) -> None:
    import signal

    gw = Gateway(config)
    await gw.start(host, port)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gw.stop()
