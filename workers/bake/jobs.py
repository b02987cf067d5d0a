"""The rq job: bake one line. Runs in a bake worker, whose renderer is built once at start."""

from __future__ import annotations

import asyncio
import os
import time

import structlog

from workers.bake.lines import Line, baked
from workers.bake.render import LineRenderer, write_outputs

_renderer: LineRenderer | None = None
_loop: asyncio.AbstractEventLoop | None = None


def setup(config) -> LineRenderer:
    """Loads the TTS and lipsync backends once per worker process."""
    global _renderer, _loop
    if _renderer is None:
        _loop = asyncio.new_event_loop()
        renderer = LineRenderer(config)
        _loop.run_until_complete(renderer.start())
        _renderer = renderer
    return _renderer


def teardown() -> None:
    global _renderer, _loop
    if _renderer is not None and _loop is not None:
        _loop.run_until_complete(_renderer.stop())
        _loop.close()
    _renderer, _loop = None, None


def bake_line(line: dict, out_dir: str) -> dict:
    """Render ``line`` into ``out_dir`` unless it is there already (a retry, or a second job
    for the same line after a worker was thought dead)."""
    ln = Line.from_dict(line)
    log = structlog.get_logger().bind(line=ln.id, npc=ln.npc)
    if baked(out_dir, ln):
        return {"id": ln.id, "skipped": True}
    if _renderer is None:  # an rq worker started without `parley bake-worker`
        from core.config import Config

        setup(Config.load())
    assert _renderer is not None and _loop is not None
    t0 = time.perf_counter()
    rendered = _loop.run_until_complete(_renderer.render(ln))
    render_ms = round((time.perf_counter() - t0) * 1000, 1)
    meta = write_outputs(out_dir, ln, rendered,
                         extra={"render_ms": render_ms, "worker_pid": os.getpid()})
    log.info("line_baked", audio_s=meta["audio_s"], frames=meta["frames"], render_ms=render_ms)
    return {"id": ln.id, "audio_s": meta["audio_s"], "frames": meta["frames"],
            "render_ms": render_ms}
