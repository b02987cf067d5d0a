"""GPU check: load every GPU backend, print per-stage latency and throughput.

    python -m benchmarks.gpu_check            # on a CUDA machine, in the worker's image
    python -m benchmarks.gpu_check --cpu      # the CPU-capable parts, small (proves the script)
    python -m benchmarks.gpu_check --only lipsync,stt

Models come from the environment; where none is given a tiny random one is built on the fly
(weights random, so the output text/audio is noise: this checks loading, memory and speed,
not quality):

* ``PARLEY_GPU_CHECK_WHISPER``: a CTranslate2 Whisper directory (faster-whisper format) for
  faster-whisper and WhisperX. Unset: a 1-layer, width-64 Whisper is built with transformers
  and converted with ctranslate2 (needs torch + transformers; ~5 s).
* ``PARLEY_GPU_CHECK_LLM``: a Hugging Face model directory for vLLM. Unset: a 2-layer,
  width-64 LLaMA with a byte-level tokenizer is built with transformers and saved.
* ``PARLEY_COQUI_MODEL`` (+ ``PARLEY_COQUI_SPEAKER``): a Coqui model directory or name.
  Unset: skipped (no tiny Coqui model can be built without the package's trainer).
* ``PARLEY_GPU_CHECK_LIPSYNC_CHECKPOINT``: weights for the lipsync transformer. Unset: random
  weights at the backend's full size, 1024 wide with 8+8 layers (``--cpu``: width 256, 2+2).

Lipsync capacity: windows/s of ``infer_windows`` at batch 1..64 (``--cpu``: 1..8), times the
new frames a stream gains per window, divided by 60 = how many 60 fps streams the device
sustains at that batch size; the call's latency is printed beside it, since a batch that takes
longer than one hop of audio cannot keep a stream real-time however many it serves.

Every part is guarded: a missing package, model or device prints ``skipped: why`` and the
rest goes on. Exit code 1 only when a part failed after it started (a real error).

Measured with ``--cpu`` on the 2-core dev machine, shared with other jobs (load average 2-7,
so numbers moved up to 10x between runs): whole run 20-60 s; tiny Whisper built in 3-5 s, the
11 s utterance decoded in 137-247 ms (int8, 64 tokens at most); reduced lipsync transformer
64-724 ms per window at batch 1, 3-42 streams at 60 fps at its best batch.
whisperX, vLLM and Coqui were skipped there (not installed / no CUDA / no torchaudio).
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

__all__ = ["build_tiny_llama", "build_tiny_whisper", "main"]

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


# --- tiny random models -------------------------------------------------------------------------


def _byte_tokenizer(specials: list[str]):
    """A byte-level tokenizer with no merges: 256 byte tokens, then ``specials`` in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return tok, vocab


def build_tiny_whisper(out: Path) -> Path:
    """A random 1-layer Whisper in CTranslate2 format that faster-whisper loads offline.

    faster-whisper reads ``tokenizer.json`` from the model directory (else it downloads one),
    and finds its special tokens by name, so the vocabulary is laid out as Whisper's: text
    tokens, <|endoftext|>, <|startoftranscript|>, languages, tasks, ..., <|notimestamps|>, then
    the 1501 timestamp tokens 0.00..30.00 that must follow it."""
    _need("torch", "transformers", "ctranslate2", "tokenizers")
    import ctranslate2
    import torch
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        WhisperConfig,
        WhisperForConditionalGeneration,
    )

    langs = ["en", "de", "fr"]
    specials = (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{x}|>" for x in langs]
                + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
                   "<|nospeech|>", "<|notimestamps|>"]
                + [f"<|{i * 0.02:.2f}|>" for i in range(1501)])
    torch.manual_seed(0)  # the same random model every run, so timings compare
    tok, vocab = _byte_tokenizer(specials)
    eot, sot = vocab["<|endoftext|>"], vocab["<|startoftranscript|>"]
    cfg = WhisperConfig(vocab_size=len(vocab), num_mel_bins=80, d_model=64, encoder_layers=1,
                        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=1500,
                        max_target_positions=448, decoder_start_token_id=sot,
                        eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
                        # the defaults name GPT-2 ids (220, 50256), outside this vocabulary:
                        # CTranslate2 then writes out of bounds
                        suppress_tokens=[], begin_suppress_tokens=[eot])
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, suppress_tokens=[],
        begin_suppress_tokens=[eot], is_multilingual=True,
        lang_to_id={f"<|{x}|>": vocab[f"<|{x}|>"] for x in langs},
        no_timestamps_token_id=vocab["<|notimestamps|>"])
    hf = out / "whisper-hf"
    model.save_pretrained(hf)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            additional_special_tokens=specials[1:]).save_pretrained(hf)
    ct2 = out / "whisper-ct2"
    ctranslate2.converters.TransformersConverter(str(hf)).convert(str(ct2), force=True)
    (ct2 / "tokenizer.json").write_bytes((hf / "tokenizer.json").read_bytes())
    return ct2


def build_tiny_llama(out: Path) -> Path:
    """A random 2-layer LLaMA (width 64) with a byte-level tokenizer, saved for vLLM."""
    _need("torch", "transformers", "tokenizers")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    tok, vocab = _byte_tokenizer(["<s>", "</s>"])
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=1024, bos_token_id=vocab["<s>"],
                      eos_token_id=vocab["</s>"])
    path = out / "llama-tiny"
    LlamaForCausalLM(cfg).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>"
                            ).save_pretrained(path)
    return path


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
        if self._whisper is None:
            t0 = time.perf_counter()
            self._whisper = build_tiny_whisper(self.work)
            print(f"  built a tiny random Whisper in {time.perf_counter() - t0:.1f} s")
        return self._whisper, "tiny random Whisper (d_model 64, 1+1 layers)"

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
        self.require_device(cpu_ok=True)
        wx = _import("whisperx")
        path, what = self.whisper_model()
        compute = "float16" if self.device == "cuda" else "int8"
        t0 = time.perf_counter()
        model = wx.load_model(str(path), self.device, compute_type=compute, language="en")
        print(f"  model: {what}; {compute} on {self.device}; loaded in "
              f"{time.perf_counter() - t0:.1f} s")
        audio = _speech_16k()
        for batch in (1, 8, 16):
            model.transcribe(audio, batch_size=batch)  # warm-up
            times, _ = _timed(lambda b=batch: model.transcribe(audio, batch_size=b), 3)
            print(f"  batch_size {batch}: {len(audio) / 16000:.1f} s utterance, {_ms(times)}")

    def llm_vllm(self) -> None:
        self.require_device(cpu_ok=False)
        vllm = _import("vllm")
        env = os.environ.get("PARLEY_GPU_CHECK_LLM")
        path = Path(env) if env else build_tiny_llama(self.work)
        what = "PARLEY_GPU_CHECK_LLM" if env else "tiny random LLaMA (width 64, 2 layers)"
        t0 = time.perf_counter()
        llm = vllm.LLM(model=str(path), dtype="float16", gpu_memory_utilization=0.5,
                       max_model_len=1024, enforce_eager=not env)
        print(f"  model: {what}; loaded in {time.perf_counter() - t0:.1f} s")
        prompt = "You are a gruff gate guard. The player says: who are you?\nGuard:"
        first = vllm.SamplingParams(max_tokens=1, temperature=0.0)
        times, _ = _timed(lambda: llm.generate([prompt], first, use_tqdm=False), 5)
        print(f"  first token (prefill + 1 token, one request): {_ms(times)}")
        for n in (1, 16, 64):
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
        if not model:
            raise Skip("set PARLEY_COQUI_MODEL to a Coqui model directory or name")
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
