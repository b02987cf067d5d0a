"""Micro-batching benchmark: throughput and per-item latency against ``max_batch``.

    .venv/bin/python -m benchmarks.batching [--seconds 1.2] [--rounds 4] [--clients 16]

A model that really runs here on the CPU serves ``--clients`` closed-loop callers (threads
that submit a window, wait for its result, and submit the next) through one
``workers.batching.MicroBatcher`` per ``max_batch`` in 1, 2, 4, 8, 16. The model is the
lipsync transformer (``workers/lipsync/transformer_backend.py``, random weights, reduced to
width 256 and 2+2 layers so a CPU runs it: 8+8 layers at width 256 already took 1.4 s per
window on a busy 2-core machine; full size is 1024 wide) when that module is in the checkout,
else a stand-in of the same shape: a torch transformer encoder over (128 frames x 256
features) windows, 61 outputs.

Batch sizes are measured in rounds (every size for ``--seconds``, then again) so that
drifting load on a shared machine hits all of them alike; batch 1 is the baseline, in the
same run. Per-item latency is submit -> result, queueing included, so at batch 1 it is
about ``clients x`` one model call. ``items/cpu_s`` divides by this process's CPU time
instead of wall time: on a machine shared with other jobs it shows the compute saved by
batching even when the wall-clock columns drift with the neighbours' load.

The last line is ``batch_speedup=<throughput at best batch / at batch 1> best_batch=<n>
p50_latency_ms_at_best=<ms>``.
"""

from __future__ import annotations

import argparse
import importlib.util
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from workers.batching import MicroBatcher

__all__ = ["LipsyncModel", "StandInLipsync", "load_lipsync", "main", "measure"]

BATCHES = (1, 2, 4, 8, 16)
WINDOW_FRAMES = 128  # frames per window (NeuroSync-style models look at ~2 s at 60 fps)
NUM_FEATURES = 256  # per-frame audio features (workers/lipsync/features.py layout)
NUM_OUTPUTS = 61  # ARKit blendshapes + head/eyes, as in schemas/arkit


@dataclass
class LipsyncModel:
    """A batch fn and what it is: ``infer(list of (frames, features)) -> list of outputs``."""

    infer: Callable[[list[np.ndarray]], list[np.ndarray]]
    description: str
    window_frames: int
    num_features: int
    new_frames_per_window: int  # frames a streaming caller gains per window (for fps maths)
    notes: list[str] = field(default_factory=list)


class StandInLipsync:
    """Stand-in for the lipsync transformer until it is in the checkout: same shapes, random
    weights. Linear in, ``layers`` pre-norm encoder layers, linear out, sigmoid."""

    def __init__(self, width: int = 256, layers: int = 4, heads: int = 8,
                 device: str = "cpu", seed: int = 0) -> None:
        import torch

        torch.manual_seed(seed)
        self.torch = torch
        self.device = device
        layer = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                                 batch_first=True, norm_first=True)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(NUM_FEATURES, width),
            torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False),
            torch.nn.Linear(width, NUM_OUTPUTS),
        ).to(device).eval()
        if device.startswith("cuda"):
            self.net.half()

    def infer_windows(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.stack(batch)).to(self.device)
            x = x.half() if self.device.startswith("cuda") else x
            y = torch.sigmoid(self.net(x)).float().cpu().numpy()
        return list(y)


def _int_attr(obj, *names: str) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_lipsync(width: int | None = 256, device: str = "cpu", prefer_real: bool = True,
                 checkpoint: str | None = None, layers: int | None = None) -> LipsyncModel:
    """The lipsync transformer (random weights unless ``checkpoint``) when it is in the
    checkout, else ``StandInLipsync``. ``width``/``layers`` None: the backend's own full size
    (1024 wide, 8 encoder + 8 decoder layers); the stand-in then uses 1024 and 4 layers."""
    notes: list[str] = []
    if prefer_real and importlib.util.find_spec("workers.lipsync.transformer_backend") is None:
        notes.append("workers/lipsync/transformer_backend.py is not in this checkout; "
                     "measured the stand-in")
    elif prefer_real:
        try:
            from workers.lipsync import transformer_backend as tb

            kwargs: dict = {"checkpoint": checkpoint, "sample_rate": 22050}
            if width is not None:
                kwargs["width"] = width
            if layers is not None:
                kwargs["encoder_layers"] = kwargs["decoder_layers"] = layers
            try:
                model = tb.TransformerLipsync(**kwargs, device=device)
            except TypeError:  # no device argument
                model = tb.TransformerLipsync(**kwargs)
            frames = _int_attr(model, "window_frames", "window", "frames") or WINDOW_FRAMES
            feats = _int_attr(model, "num_features", "in_features") or NUM_FEATURES
            new = _int_attr(model, "hop_frames", "stride_frames", "new_frames") or frames
            probe = np.zeros((frames, feats), np.float32)
            model.infer_windows([probe, probe])  # shapes agree, or fall back below
            if new == frames:
                notes.append("assumed each window yields all of its frames (no hop "
                             "attribute on the model)")
            cfg = getattr(getattr(model, "runner", None), "config", None)
            size = (f"width={cfg.width}, {cfg.encoder_layers}+{cfg.decoder_layers} layers, "
                    f"{cfg.heads} heads" if cfg is not None else f"width={width}")
            weights = checkpoint or "random weights"
            return LipsyncModel(model.infer_windows,
                                f"TransformerLipsync({size}, {frames}x{feats} windows, "
                                f"hop {new}, {weights})", frames, feats, new, notes)
        except Exception as exc:  # an interface we did not guess: measure the stand-in
            if checkpoint:
                raise
            notes.append(f"TransformerLipsync failed here ({type(exc).__name__}: {exc}); "
                         "measured the stand-in")
    if checkpoint:
        raise RuntimeError("a lipsync checkpoint needs workers/lipsync/transformer_backend.py")
    width, layers = width or 1024, layers or 4
    m = StandInLipsync(width=width, layers=layers, device=device)
    desc = (f"stand-in transformer (width {width}, {layers} layers, "
            f"{WINDOW_FRAMES}x{NUM_FEATURES} windows, random weights)")
    return LipsyncModel(m.infer_windows, desc, WINDOW_FRAMES, NUM_FEATURES, WINDOW_FRAMES, notes)


@dataclass
class Result:
    max_batch: int
    items: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time: immune to other load on the machine
    latencies_ms: list[float] = field(default_factory=list)
    batches: int = 0

    @property
    def throughput(self) -> float:
        return self.items / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    @property
    def per_cpu_second(self) -> float:
        return self.items / self.cpu_seconds if self.cpu_seconds else 0.0

    @property
    def mean_batch(self) -> float:
        return self.items / self.batches if self.batches else 0.0


def measure(model: LipsyncModel, max_batch: int, clients: int, seconds: float,
            window_ms: float, result: Result) -> None:
    """Run ``clients`` closed-loop callers for ``seconds``; add what they did to ``result``."""
    rng = np.random.default_rng(max_batch)
    windows = [rng.standard_normal((model.window_frames, model.num_features)).astype(np.float32)
               for _ in range(clients)]
    with MicroBatcher(model.infer, max_batch=max_batch, window_ms=window_ms) as batcher:
        batcher.submit(windows[0])  # first call pays one-off allocation; not counted
        warm = batcher.stats()
        stop = time.perf_counter() + seconds
        lat: list[list[float]] = [[] for _ in range(clients)]

        def client(i: int) -> None:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                batcher.submit(windows[i])
                lat[i].append((time.perf_counter() - t0) * 1000)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        c0 = time.process_time()
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - c0
        st = batcher.stats()
    result.seconds += elapsed
    result.cpu_seconds += cpu
    result.items += st.items - warm.items
    result.batches += st.batches - warm.batches
    for x in lat:
        result.latencies_ms.extend(x)


def run(model: LipsyncModel, batches=BATCHES, clients: int = 16, seconds: float = 1.2,
        rounds: int = 4, window_ms: float = 2.0) -> list[Result]:
    results = {b: Result(b) for b in batches}
    for _ in range(rounds):
        for b in batches:
            measure(model, b, clients, seconds, window_ms, results[b])
    return [results[b] for b in batches]


def report(results: list[Result], model: LipsyncModel) -> str:
    base = results[0].throughput
    lines = [f"model: {model.description}", *[f"note: {n}" for n in model.notes],
             f"{'max_batch':>9}  {'items/s':>8}  {'speedup':>7}  {'items/cpu_s':>11}  "
             f"{'mean_batch':>10}  {'p50_ms':>8}  {'p95_ms':>8}  {'items':>6}"]
    for r in results:
        lines.append(f"{r.max_batch:>9}  {r.throughput:>8.1f}  {r.throughput / base:>6.2f}x  "
                     f"{r.per_cpu_second:>11.1f}  {r.mean_batch:>10.2f}  {r.pct(50):>8.1f}  "
                     f"{r.pct(95):>8.1f}  {r.items:>6}")
    best = max(results, key=lambda r: r.throughput)
    lines.append(f"batch_speedup={best.throughput / base:.2f} best_batch={best.max_batch} "
                 f"p50_latency_ms_at_best={best.pct(50):.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.batching", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.2, help="per batch size per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clients", type=int, default=16, help="concurrent closed-loop callers")
    ap.add_argument("--window-ms", type=float, default=2.0, help="MicroBatcher window")
    ap.add_argument("--width", type=int, default=256, help="model width (full: 1024)")
    ap.add_argument("--layers", type=int, default=2,
                    help="encoder (and decoder) layers (full: 8); reduced so a CPU runs it")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)),
                    help="comma-separated max_batch values; the first is the baseline")
    ap.add_argument("--stand-in", action="store_true",
                    help="measure the stand-in even when the lipsync transformer exists")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("skipped: torch not installed (pip install -e '.[lipsync-transformer]')")
        return 1
    batches = tuple(int(b) for b in args.batches.split(","))
    model = load_lipsync(args.width, "cpu", prefer_real=not args.stand_in, layers=args.layers)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
          f"{args.clients} clients, window {args.window_ms} ms, "
          f"{args.rounds} rounds x {args.seconds} s per batch size", flush=True)
    results = run(model, batches, args.clients, args.seconds, args.rounds, args.window_ms)
    print(report(results, model))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
