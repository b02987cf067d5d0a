"""The lipsync worker serving the transformer: a real worker process's code path (runtime,
stage, micro-batcher, model) against a real Redis, with a tiny checkpoint the test saves in the
published format."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from core.config import Config  # noqa: E402
from schemas.streams import FaceEntry, Job, Keys, SessionMeta, VoiceEntry  # noqa: E402
from workers.lipsync.stage import LipsyncStage  # noqa: E402
from workers.lipsync.transformer_model import FaceTransformer, ModelConfig  # noqa: E402
from workers.runtime import Worker  # noqa: E402


async def test_lipsync_worker_runs_the_transformer_batched(scratch_url, redis_client, tmp_path):
    torch.manual_seed(0)
    model = FaceTransformer(ModelConfig(width=64, encoder_layers=1, decoder_layers=1, heads=4))
    ckpt = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), ckpt)
    cfg = Config.load(env={"PARLEY_REDIS_URL": scratch_url,
                           "PARLEY_LIPSYNC_BACKENDS": "transformer,audio",
                           "PARLEY_LIPSYNC_TRANSFORMER_CHECKPOINT": str(ckpt),
                           "PARLEY_LIPSYNC_TRANSFORMER_HEADS": "4",
                           "PARLEY_LIPSYNC_TRANSFORMER_DEVICE": "cpu"})
    keys = Keys()
    sid = "tx.1"
    await redis_client.hset(keys.session(sid, "meta"), mapping=SessionMeta(
        sid=sid, session="tx", npc="guard", persona="guard", voice="en-us", sample_rate=16000,
        channels=1, format="s16le").to_fields())
    rate, n = 22050, 22050 * 3  # three seconds: more than one 128-frame window
    rng = np.random.default_rng(0)
    pcm = (rng.standard_normal(n) * 3000).astype("<i2")
    step = 1102
    seq = 0
    for start in range(0, n, step):
        seq += 1
        chunk = pcm[start:start + step]
        await redis_client.xadd(keys.session(sid, "voice"), VoiceEntry(
            segment=0, sample=start, rate=rate, pcm=chunk.tobytes(),
            last_in_segment=start + step >= n).to_fields(), id=f"1-{seq}")
    await redis_client.xadd(keys.session(sid, "voice"), VoiceEntry(
        segment=1, sample=n, rate=rate, end=True).to_fields(), id=f"1-{seq + 1}")
    await redis_client.xadd(keys.jobs("lipsync"), Job(stage="lipsync", sid=sid, turn=1)
                            .to_fields())
    stage = LipsyncStage(cfg)
    worker = Worker(stage, cfg, consumer="tx-test")
    task = asyncio.create_task(worker.run())
    try:
        for _ in range(600):
            face = await redis_client.xrange(keys.session(sid, "face"))
            if face and FaceEntry.from_fields(face[-1][1]).end:
                break
            await asyncio.sleep(0.05)
    finally:
        worker.request_stop()
        await task
    entries = [FaceEntry.from_fields(f) for _, f in face]
    assert entries[-1].end
    frames = sum(len(e.samples) for e in entries if not e.end)
    assert frames == entries[-1].first_index == -(-n * 60 // rate)
    assert stage.batcher is not None and stage.batcher.stats().items >= 2
    values = np.concatenate([e.values for e in entries if not e.end])
    assert np.isfinite(values).all() and (values[:, :52] >= 0).all()
