"""One whole turn through a real fleet whose workers run a heavy backend.

A private redis-server, the gateway and one worker per stage as separate processes (started
with this interpreter, so in a backend's own venv the workers load that backend), the
reference client over a real WebSocket, then the turn's stored reply stream. The backend
tests use it to show that a backend works inside a worker: loaded in the stage's start(),
serving a job, released when the worker stops (every process must exit 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from schemas.streams import ReplyEntry


@dataclass
class FleetTurn:
    result: object  # parley.client turn result
    reply: list[ReplyEntry]  # the turn's reply stream, as stored
    log: str  # the fleet's log
    codes: dict  # process -> exit code

    @property
    def answered_by(self) -> str:
        ends = [e for e in self.reply if e.end]
        return ends[-1].backend if ends else ""


async def fleet_turn(tmp_path: Path, env: dict[str, str], *, text: str = "Who are you?",
                     persona: str = "guard", ready_s: float = 120,
                     done_s: float = 180) -> FleetTurn:
    import redis.asyncio as aioredis

    from parley.client import Client
    from schemas.streams import Keys
    from tests.conftest import speech
    from tests.support.fleet import running_fleet

    log_path = tmp_path / "fleet.log"
    with running_fleet(None, log_path, env=env, ready_s=ready_s, clean_exit=False) as fleet:
        client = await Client.connect(f"ws://127.0.0.1:{fleet.port}")
        try:
            await client.open("npc-1", persona, 16000, 1, endpoint="client")
            await client.stream("npc-1", speech(text, 16000), 16000, realtime=False)
            result = await client.wait_done("npc-1", done_s)
        finally:
            await client.close()
        r = aioredis.from_url(fleet.redis_url)
        try:
            entries = await r.xrange(Keys().session(result.sid, "reply"))
        finally:
            await r.aclose()
    return FleetTurn(result=result, reply=[ReplyEntry.from_fields(f) for _, f in entries],
                     log=log_path.read_text(), codes=fleet.exit_codes)
