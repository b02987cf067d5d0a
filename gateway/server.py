"""The WebSocket gateway: the I/O around the Sans-I/O machines of gateway.core and
gateway.session.

One connection carries many NPC sessions. What a client sends goes to the connection's
ConnectionCore, which hands session messages to that session's Session machine; the effects they
return (sends, Redis writes and reads, relay starts and stops, Live Link output) are carried out
here, and the answers of reads go back to the machine as inputs. Each session has a relay task
that tails the session's output streams with one blocking XREAD and feeds each entry to the
machine. The gateway keeps nothing that Redis does not also hold, so a restarted gateway loses
nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import sys
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
from gateway import session as S
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
    EventEntry,
    Keys,
    MicEntry,
    ReplyEntry,
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
            for session in conn.core.live_sessions():
                yield session.sid

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
    """The executor of one connection: socket and Redis in, typed inputs to the Sans-I/O
    machines (``ConnectionCore`` and its ``Session`` per NPC session), their effects carried
    out, and the answers fed back. It decides nothing about a session itself."""

    def __init__(self, gw: Gateway, ws: ServerConnection):
        self.gw = gw
        self.ws = ws
        self.conn_id = f"{gw.gateway_id}.{next(gw._conn_ids)}"
        self.core = C.ConnectionCore(gw.limits, gw.personas, owner=self.conn_id)
        self.relay_tasks: dict[str, asyncio.Task] = {}  # per session: its XREAD loop
        self.wakes: dict[str, asyncio.Task] = {}  # per session: its pending WakeAt
        self.livelink = (LiveLinkOutput(gw.livelink, gw.config.lipsync.fps)
                         if gw.livelink is not None else None)
        self.mic_queues: dict[str, list[MicEntry]] = {}  # per sid, not yet in Redis
        self.mic_writers: dict[str, asyncio.Task] = {}
        self.mic_count: dict[str, int] = {}  # chunks appended per sid (for retention trims)
        self.mic_holds: dict[str, MicHold] = {}  # per sid: recent chunks, for a failover
        self._bg: set[asyncio.Task] = set()
        self.redis = gw.redis
        self.keys = gw.keys
        peer = ws.remote_address
        g = gw.config.gateway
        headers = ws.request.headers if ws.request is not None else None
        self.address = access.client_address(peer[0] if peer else "?", headers,
                                              g.proxy_header, g.trusted_proxies)
        self.attached: dict[str, str] = {}  # sid -> the principal it counts against
        self.log = gw.log.bind(peer=f"{peer[0]}:{peer[1]}" if peer else "?", conn=self.conn_id,
                               client=self.address)
        self._carriers = {
            S.Send: self._send, S.SendDone: self._send_done, S.AppendMic: self._append,
            S.AppendEndOfUtterance: self._append, S.CheckLoad: self._check_load,
            S.Attach: self._attach, S.Release: self._release_effect,
            S.CreateSession: self._create, S.LoadMeta: self._load_meta,
            S.LoadResume: self._load_resume, S.TakeOver: self._take_over,
            S.Control: self._control, S.Log: self._log, S.StartRelay: self._start_relay,
            S.StopRelay: self._stop_relay, S.FlushMic: self._flush_one,
            S.MarkLeft: self._mark_left, S.MarkPlaying: self._mark_playing,
            S.Timing: self._timing, S.CancelTurn: self._cancel_turn,
            S.KeepHeard: self._keep_heard, S.WakeAt: self._wake_at,
            S.LiveLinkStart: self._livelink, S.LiveLinkFeed: self._livelink,
            S.LiveLinkReady: self._livelink, S.LiveLinkStopTurn: self._livelink,
            S.LiveLinkStopSession: self._livelink,
        }

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
            for task in [*self.relay_tasks.values(), *self.wakes.values()]:
                task.cancel()
            if self.livelink is not None:
                self.livelink.close()
            sessions = len(self.relay_tasks)
            await asyncio.gather(*self.relay_tasks.values(), return_exceptions=True)
            await self.flush_mic()
            await self._apply(self.core.detach_all(time.monotonic(), now_ms()), answer=False)
            await self._release_all()
            self.log.info("client_disconnected", sessions=sessions)

    async def _receive(self, message: str | bytes) -> None:
        now = time.monotonic()
        try:
            if isinstance(message, str):
                effects = self.core.receive_text(message, now, now_ms())
            else:
                effects = self.core.receive_binary(message, now)
            await self._apply(effects)
        except (ConnectionClosed, asyncio.CancelledError):
            raise
        except Exception as exc:  # a server fault answers this message, and the link lives on
            self.log.exception("message_failed", error=repr(exc)[:200])
            await self.send(P.ErrorEvent(code=P.ErrorCode.INTERNAL,
                                         message="the server failed on this message"))

    # -------------------------------------------------------------- carrying effects out

    async def _apply(self, effects: list[S.Effect], answer: bool = True) -> None:
        """Carry ``effects`` out in order; an answer goes back to its session's machine at
        once and its effects come next. ``answer``: a storage failure is the client's answer
        (and ends this batch, as the message's handling failed); else it is only logged."""
        for effect in effects:
            try:
                result = await self._carriers[type(effect)](effect)
            except RETRYABLE as exc:
                self.log.warning("redis_unavailable", error=str(exc))
                session = self._session_of(effect)
                if answer:
                    await self.send(P.ErrorEvent(code=P.ErrorCode.UNAVAILABLE,
                                                 message="storage is unavailable; retry shortly",
                                                 session=session.name if session else None))
                if session is not None:
                    await self._apply(self.core.feed(session, S.StorageFailed(),
                                                     time.monotonic()), answer=False)
                if answer:
                    return
                continue
            if result is not None:
                session = self.core.sessions.get(effect.session)
                if session is not None:
                    await self._apply(self.core.feed(session, result, time.monotonic()), answer)

    def _session_of(self, effect: S.Effect) -> S.Session | None:
        name = getattr(effect, "session", None)
        if name is not None:
            return self.core.sessions.get(name)
        sid = getattr(effect, "sid", None)
        return next((s for s in self.core.sessions.values() if s.sid == sid), None)

    async def send(self, message: P.Message | bytes) -> None:
        if not isinstance(message, bytes):
            sent(message)
        data = message if isinstance(message, bytes) else P.encode(message)
        try:
            await self.ws.send(data)
        except ConnectionClosed:
            pass

    async def _send(self, e: S.Send) -> None:
        await self.send(e.message)

    async def _send_done(self, e: S.SendDone) -> None:
        out = e.message
        raw = await self.redis.hgetall(self.keys.session(e.sid, "timing"))
        prefix = f"{out.turn}:"
        out.timings = {k.decode()[len(prefix):]: float(v) for k, v in raw.items()
                       if k.decode().startswith(prefix)}
        await self.send(out)

    async def _append(self, e: S.AppendMic | S.AppendEndOfUtterance) -> None:
        if isinstance(e, S.AppendMic):
            entry = MicEntry(seq=e.seq, pcm=e.pcm)
        else:
            entry = MicEntry(seq=e.after_seq, end_of_utterance=True)
        self._queue_mic(e.session, e.sid, entry)

    async def _check_load(self, e: S.CheckLoad) -> S.LoadVerdict:
        v = self.gw.admission.verdict
        return S.LoadVerdict(v.admit, v.reason, v.retry_after_ms)

    async def _attach(self, e: S.Attach) -> S.Attached:
        """Fleet-wide caps: in total, and per token (or per address without one)."""
        g = self.gw.config.gateway
        token = self.core.token
        cap = (token.max_sessions if token is not None else g.max_sessions_per_address)
        why = await self.gw.attachments.admit(self.member(e.sid), self.principal,
                                              g.max_sessions_total, cap)
        if why is None:
            self.attached[e.sid] = self.principal
        return S.Attached(why)

    async def _release_effect(self, e: S.Release) -> None:
        await self._release(e.sid)

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

    async def _create(self, e: S.CreateSession) -> S.Created:
        """The new session's meta, its expiry, and its owner with the hash of the resume
        secret (the client gets the secret; Redis never does)."""
        sid = e.meta.sid
        async with self.redis.pipeline(transaction=False) as p:
            p.hset(self.keys.session(sid, "meta"), mapping=e.meta.to_fields())
            p.zadd(self.keys.sessions(),
                   {sid: now_ms() + self.gw.config.redis.detached_grace_s * 1000})
            p.hset(self.keys.session(sid, "meta"),
                   mapping={"secret_hash": e.secret_hash, "owner": e.owner})
            await p.execute()
        return S.Created()

    async def _load_meta(self, e: S.LoadMeta) -> S.MetaLoaded:
        return S.MetaLoaded(await self.redis.hgetall(self.keys.session(e.sid, "meta")))

    async def _load_resume(self, e: S.LoadResume) -> S.ResumeLoaded:
        """Where the session stands: the next mic seq, the segments UE said ready for, and
        those of the resumed turn whose audio went out."""
        top = await self.redis.xrevrange(self.keys.session(e.sid, "mic"), count=1)
        next_mic = parse_id(top[0][0])[0] + 1 if top else 1
        ready = {tuple(int(x) for x in m.decode().split(":"))
                 for m in await self.redis.smembers(self.keys.session(e.sid, "ready"))}
        segments = set(ready)
        for _eid, f in await self.redis.xrange(self.keys.session(e.sid, "voice"),
                                              f"{e.turn}-0", f"{e.turn}-{2**63 - 1}"):
            seg = f.get(b"segment")
            if seg is not None:
                segments.add((e.turn, int(seg)))
        return S.ResumeLoaded(next_mic, segments, ready, now_ms())

    async def _take_over(self, e: S.TakeOver) -> S.TookOver:
        """The events entry tells the previous owner, on whichever gateway, through the stream
        its relay already tails; owner entries up to the returned id are older than this
        attachment."""
        await self.gw.lifecycle.attached([e.sid])
        async with self.redis.pipeline(transaction=True) as p:
            p.hset(self.keys.session(e.sid, "meta"),
                   mapping={"state": "open", "owner": e.owner})
            p.xadd(self.keys.session(e.sid, "events"),
                   EventEntry(kind="owner", turn=0, code=e.owner).to_fields())
            _, mark = await p.execute()
        return S.TookOver(parse_id(mark.decode() if isinstance(mark, bytes) else mark))

    async def _control(self, e: S.Control) -> None:
        """Store a client control message for replay (off the hot path, stamped on arrival)."""
        self._background(self.redis.xadd(self.keys.session(e.sid, "control"),
                                         e.entry.to_fields()))

    def _background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg_done)

    def _bg_done(self, task: asyncio.Task) -> None:
        self._bg.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.warning("background_write_failed", error=str(task.exception()))

    async def _log(self, e: S.Log) -> None:
        getattr(self.log, e.level)(e.event, **e.fields)

    async def _timing(self, e: S.Timing) -> None:
        """Latency waterfall mark (off the hot path)."""
        self._background(self.redis.hsetnx(self.keys.session(e.sid, "timing"),
                                           f"{e.turn}:{e.name}", now_ms()))

    async def _mark_left(self, e: S.MarkLeft) -> None:
        await self.gw.lifecycle.left(e.sid, e.state)

    async def _mark_playing(self, e: S.MarkPlaying) -> None:
        # the play clock for STT's echo gate: when UE started this segment (wall clock,
        # compared there with the arrival of the mic audio around it); a resend is not news
        async with self.redis.pipeline(transaction=False) as p:
            p.sadd(self.keys.session(e.sid, "ready"), f"{e.turn}:{e.segment}")
            if e.first:
                p.xadd(self.keys.session(e.sid, "events"),
                       EventEntry(kind="playing", turn=e.turn, code=str(e.segment),
                                  ts=e.ts).to_fields(),
                       maxlen=self.gw.config.redis.stream_maxlen, approximate=True)
            await p.execute()

    async def _cancel_turn(self, e: S.CancelTurn) -> None:
        """Workers see the event (or the marker, if they start later) and stop."""
        async with self.redis.pipeline(transaction=False) as p:
            p.set(self.keys.session(e.sid, "cancel"), e.turn)
            p.xadd(self.keys.session(e.sid, "events"),
                   EventEntry(kind="interrupt", turn=e.turn, code=e.reason).to_fields())
            p.hsetnx(self.keys.session(e.sid, "timing"), f"{e.turn}:interrupt", now_ms())
            await p.execute()

    async def _keep_heard(self, e: S.KeepHeard) -> None:
        span = (f"{e.turn}-0", f"{e.turn}-{2**63 - 1}")
        voice = await self.redis.xrange(self.keys.session(e.sid, "voice"), *span)
        reply = await self.redis.xrange(self.keys.session(e.sid, "reply"), *span)
        texts = {r.segment: r.text for r in (ReplyEntry.from_fields(f) for _, f in reply)
                 if not r.end}
        heard = C.heard_text(texts, [VoiceEntry.from_fields(f) for _, f in voice], e.played)
        await self.redis.hset(self.keys.session(e.sid, "history"), f"{e.turn}:heard", heard)

    async def _wake_at(self, e: S.WakeAt) -> None:
        old = self.wakes.pop(e.session, None)
        if old is not None:
            old.cancel()
        session = self.core.sessions.get(e.session)
        if session is not None:
            self.wakes[e.session] = asyncio.create_task(self._wake(session, e.at))

    async def _wake(self, session: S.Session, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        if self.wakes.get(session.name) is asyncio.current_task():
            del self.wakes[session.name]
        await self._apply(self.core.feed(session, S.Timer(), time.monotonic()), answer=False)

    async def _livelink(self, e: S.Effect) -> None:
        """Live Link output (gateway/livelink_output.py) follows the session's effects."""
        out = self.livelink
        if out is None:
            return
        if isinstance(e, S.LiveLinkFeed):
            try:
                out.feed(e.session, e.sid, e.stream, e.entry_id, e.fields, e.interrupted)
            except (ValueError, KeyError) as exc:
                self.log.error("bad_stream_entry", stream=e.stream, id=e.entry_id,
                               error=str(exc))
        elif isinstance(e, S.LiveLinkReady):
            out.ready(e.session, e.sid, e.turn)
        elif isinstance(e, S.LiveLinkStopTurn):
            out.stop_turn(e.session, e.turn)
        elif isinstance(e, S.LiveLinkStopSession):
            out.stop_session(e.session)
        elif isinstance(e, S.LiveLinkStart):
            idle = out.start_session(e.session, e.sid)
            task = self.relay_tasks.get(e.session)
            if task is not None:
                task.add_done_callback(lambda _t: idle.cancel())
            else:
                idle.cancel()

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

    async def _flush_one(self, e: S.FlushMic) -> None:
        writer = self.mic_writers.get(e.sid)
        if writer is not None:
            await asyncio.gather(writer, return_exceptions=True)
        self.mic_holds.pop(e.sid, None)

    # -------------------------------------------------------------- the relay

    async def _start_relay(self, e: S.StartRelay) -> None:
        session = self.core.sessions.get(e.session)
        if session is not None:
            self.relay_tasks[e.session] = asyncio.create_task(
                self._relay_loop(session, e.cursors))

    async def _stop_relay(self, e: S.StopRelay) -> None:
        wake = self.wakes.pop(e.session, None)
        if wake is not None and wake is not asyncio.current_task():
            wake.cancel()
        task = self.relay_tasks.pop(e.session, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()  # from within, the loop ends by itself: the session is not live

    async def _relay_loop(self, session: S.Session, cursors: dict[str, str]) -> None:
        """Tails the session's output streams with one blocking XREAD; each entry is an input
        of the session's machine."""
        sid = session.sid
        keys = {self.keys.session(sid, s): s for s in C.Relay.STREAMS}
        ids = {k: cursors[s] for k, s in keys.items()}
        backoff = Backoff()
        while session.live:
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
                    self._start_mic_writer(session.name, sid)
                await backoff.wait()
                continue
            for key, entries in res or []:
                key = key.decode() if isinstance(key, bytes) else key
                for eid, fields in entries:
                    eid = eid.decode() if isinstance(eid, bytes) else eid
                    ids[key] = eid
                    entry = S.StreamEntry(keys[key], eid, fields)
                    await self._apply(self.core.feed(session, entry, time.monotonic()),
                                      answer=False)
                    if not session.live:
                        return


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
    if stuck := await cancel_rest(STOP_STEP_S):
        # asyncio.run waits for every task still running, without a bound: one whose Redis
        # call swallowed its cancellation (see Gateway.stop) would keep the process alive
        # after SIGTERM, as a gateway on a Cluster once did for over 10 s
        gw.log.warning("stop_stragglers", tasks=stuck)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


async def cancel_rest(timeout: float) -> list[str]:
    """Cancel every other task of this loop and wait up to ``timeout`` for them; returns the
    names of those that did not finish."""
    me = asyncio.current_task()
    rest = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    for task in rest:
        task.cancel()
    if not rest:
        return []
    _, pending = await asyncio.wait(rest, timeout=timeout)
    return sorted(t.get_name() for t in pending)
