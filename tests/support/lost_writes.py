"""Failure injection: a worker whose stage loses the last output entries of a turn after its
job was acked, as a Cluster failover within the replication lag does (the session's master
dies right after the stage's last writes; the ack, on the ``{jobs}`` master, survives).

    python -m tests.support.lost_writes <stage>

runs the real stage in the real worker runtime, except that, for the turns named in
``PARLEY_TEST_LOSE`` (``stage:turn[,stage:turn...]``, e.g. ``llm:1,tts:2,lipsync:3``), the
first run of the stage's job withholds its last ``PARLEY_TEST_LOSE_LAST`` (default 2) output
entries (so nobody, the gateway included, ever reads them: the state the new master is in)
and completes. The moment of the loss (the ack) goes to ``parley:test:lost:<sid>:<turn>``
(ms since the epoch). A later run of the job (the watchdog's) is left alone.
"""

from __future__ import annotations

import asyncio
import os
import sys

from core.config import Config
from parley.logs import configure
from schemas.streams import now_ms
from workers.runtime import JobContext, Outcome, Stage, Worker, run_worker
from workers.stages import make_stage

OUTPUT = {"stt": "transcript", "llm": "reply", "tts": "voice", "lipsync": "face"}


def lost_key(sid: str, turn: int) -> str:
    return f"parley:test:lost:{sid}:{turn}"


def _targets(stage: str) -> set[int]:
    spec = os.environ.get("PARLEY_TEST_LOSE", "")
    out = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, turn = part.partition(":")
        if name == stage:
            out.add(int(turn))
    return out


class LosingStage(Stage):
    """The real ``inner`` stage; the named turns' last output entries are never written."""

    def __init__(self, inner: Stage):
        super().__init__(inner.config)
        self.inner = inner
        self.name = inner.name
        self.interruptible = inner.interruptible
        self.turns = _targets(inner.name)
        self.last = int(os.environ.get("PARLEY_TEST_LOSE_LAST", "2"))
        self.done: set[tuple[str, int]] = set()

    async def start(self, worker: Worker) -> None:
        await self.inner.start(worker)

    async def stop(self) -> None:
        await self.inner.stop()

    def describe(self) -> dict:
        return {**self.inner.describe(), "losing": sorted(self.turns)}

    async def on_dead(self, worker: Worker, job) -> Outcome:
        return await self.inner.on_dead(worker, job)

    async def handle(self, ctx: JobContext):
        key = (ctx.sid, ctx.turn)
        # a speculative job's output is not the turn's (a failover loses the turn's own writes)
        if ctx.speculative or ctx.turn not in self.turns or key in self.done:
            return await self.inner.handle(ctx)
        self.done.add(key)
        held: list[tuple[int, dict]] = []
        emit = ctx.emit
        stream = OUTPUT[self.name]

        async def withholding(name: str, seq: int, fields: dict) -> bool:
            if name != stream:
                return await emit(name, seq, fields)
            held.append((seq, fields))
            while len(held) > self.last:
                s, f = held.pop(0)
                await emit(name, s, f)
            return True

        async def withholding_many(name: str, entries: list[tuple[int, dict]]) -> int:
            for seq, fields in entries:  # an adopted speculation's copy: the same loss
                await withholding(name, seq, fields)
            return len(entries)

        ctx.emit = withholding  # the turn writer appends through ctx.emit
        ctx.emit_many = withholding_many  # and copies an adopted speculation through this
        outcome = await self.inner.handle(ctx)
        if not isinstance(outcome, Outcome):
            outcome = Outcome(follow=outcome or [])
        ctx.log.warning("test_output_lost", stream=stream, lost=[s for s, _ in held])
        then = outcome.then

        async def mark_lost() -> None:  # after the ack: that is when the loss counts from
            await ctx.redis.set(lost_key(ctx.sid, ctx.turn), now_ms(), ex=3600)
            if then is not None:
                await then()

        outcome.then = mark_lost
        return outcome


def main() -> None:
    stage_name = sys.argv[1]
    config = Config.load()
    configure(f"worker-{stage_name}")
    asyncio.run(run_worker(LosingStage(make_stage(stage_name, config)), config))


if __name__ == "__main__":
    main()
