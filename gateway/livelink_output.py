"""Live Link Face output of one client connection: each session's face sent over UDP to UE.

The connection drives it with what it already sees: the session's stream entries (reply rate,
face frames), UE's ``ready`` (the turn's clock starts), interrupts and closes. Between replies
the idle face runs (blinks, gaze, head), paused while a reply of that session plays, on one
frame timeline per session so UE's frame numbers never jump back.
"""

from __future__ import annotations

import asyncio
import time
import zlib

from gateway.livelink import LiveLinkPlayer, LiveLinkSender
from schemas.streams import FaceEntry, parse_id


class LiveLinkOutput:
    def __init__(self, sender: LiveLinkSender, fps: int):
        self.sender = sender
        self.fps = fps
        # (session, turn) -> the turn's player, paced on the reply audio's clock
        self.players: dict[tuple[str, int], tuple[LiveLinkPlayer, asyncio.Task]] = {}
        self.reply_rates: dict[str, int] = {}
        self.session_t0: dict[str, float] = {}  # each session's timeline starts here
        self.idle: dict[str, asyncio.Task] = {}

    def start_session(self, session: str, sid: str) -> asyncio.Task:
        """The idle face of a session now relayed; the caller cancels the task it returns
        when that relay ends."""
        old = self.idle.pop(session, None)
        if old is not None:
            old.cancel()
        task = self.idle[session] = asyncio.create_task(self._idle(session, sid))
        task.add_done_callback(lambda t: self.idle.pop(session, None) if
                               self.idle.get(session) is t else None)
        return task

    def stop_session(self, session: str) -> None:
        task = self.idle.pop(session, None)
        if task is not None:
            task.cancel()
        for key, (_, task) in list(self.players.items()):
            if key[0] == session:
                task.cancel()

    def stop_turn(self, session: str, turn: int) -> None:
        """UE stopped the voice: its face stops with it."""
        player = self.players.get((session, turn))
        if player is not None:
            player[1].cancel()

    def close(self) -> None:
        for session in list(self.idle):
            self.stop_session(session)
        for _, task in list(self.players.values()):
            task.cancel()

    def ready(self, session: str, sid: str, turn: int) -> None:
        """UE is about to play ``turn``: its Live Link clock starts now (once per turn)."""
        player = self._player(session, sid, turn)
        if not player.schedule.started:
            now = time.monotonic()
            t0 = self.session_t0.setdefault(session, now)
            player.frame_offset = round((now - t0) * self.fps)
            player.start(now)

    def feed(self, session: str, sid: str, stream: str, eid: str, fields: dict,
             interrupted: bool) -> None:
        """A stream entry of the session; ``interrupted``: UE stopped this entry's turn."""
        if stream == "voice":
            rate = fields.get(b"rate")
            if rate:
                self.reply_rates[session] = int(rate)
        elif stream == "face":
            if interrupted:
                return  # a new player would hold the idle face back for nothing
            face = FaceEntry.from_fields(fields)
            player = self._player(session, sid, parse_id(eid)[0])
            if face.end:
                player.finish()
            else:
                player.add(face.samples, face.values)

    def _player(self, session: str, sid: str, turn: int) -> LiveLinkPlayer:
        key = (session, turn)
        if key not in self.players:
            player = LiveLinkPlayer(self.sender, subject=sid,
                                    rate=self.reply_rates.get(session, 22050))
            task = asyncio.create_task(player.run())
            task.add_done_callback(lambda _t, k=key: self.players.pop(k, None))
            self.players[key] = (player, task)
        return self.players[key][0]

    async def _idle(self, session: str, sid: str) -> None:
        from core.idle_face import IdleFace

        idle = IdleFace(fps=self.fps, seed=zlib.crc32(sid.encode()))
        frame = 0
        t0 = self.session_t0.setdefault(session, time.monotonic())
        while True:
            frame += 1
            await asyncio.sleep(max(0.0, t0 + frame / self.fps - time.monotonic()))
            values = idle.next(1)[0]  # the idle clock runs on, so blinks stay natural
            if any(k[0] == session for k in self.players):
                continue
            self.sender.send(sid, frame, values)
