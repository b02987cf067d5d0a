"""Coqui TTS (the ``coqui-tts`` package, import name ``TTS``) as a Parley TTS backend.

Same interface as ``EspeakSynth``: ``name``, ``sample_rate`` and
``synthesize(text, voice, rate_wpm, pitch) -> Iterator[SynthChunk]``. Chunks are int16 of
``chunk_ms`` (the last one of a text may be shorter) and carry no phoneme or word marks, so the
lipsync stage falls back to its audio-driven mapper.

* Model: a local directory (``config.json`` plus one ``*.pth`` checkpoint; XTTS also wants its
  ``vocab.json`` and ``speakers_xtts.pth`` beside it; an optional ``vocoder/`` subdirectory with
  its own ``config.json`` and checkpoint), a checkpoint file, or a Coqui model name such as
  ``tts_models/en/vctk/vits`` (downloaded to ``TTS_HOME`` on first use, so bake it into the
  image; worker hosts usually have no internet).
* Voice: ``persona.voice`` picks the speaker of a multi-speaker model, through the ``voices``
  map (persona voice -> speaker) or by the speaker's own name (case-insensitive). An empty
  voice uses the ``speaker`` default. A voice that is a ``.wav`` path clones that voice on
  models that support cloning (XTTS). Anything else raises ValueError naming the speakers.
  Single-speaker models ignore the voice, so espeak voice names in personas do no harm there.
* Rate: ``rate_wpm / 175`` becomes XTTS's ``speed`` (clamped to 0.5..2); other models speak
  at their own rate. Pitch is ignored: no Coqui model exposes it.
* Streaming: models with ``inference_stream`` (XTTS) yield audio while they generate, ~20 GPT
  tokens per piece; the others are run one sentence at a time, so the first chunk comes after
  the first sentence rather than after the whole text.

One synthesis runs at a time per backend (a lock): XTTS keeps per-call state on the model
(the GPT prefix embedding), so interleaved calls would corrupt each other, and a GPU runs
them one after another anyway. Run more worker processes for more parallel voices.

Testing: ``tests/backends/test_tts_coqui.py`` covers everything around the model call (model
directory resolution, sample rate from config, speaker/language mapping, error messages,
float -> int16 chunking, sentence streaming) with a fake engine, and, where ``TTS`` imports,
runs ``_CoquiEngine`` on tiny random VITS models (single- and multi-speaker) that it builds
itself; ``scripts/backend-env.sh coqui`` makes an environment where it does. XTTS streaming and
cloning run only against a real model named in ``PARLEY_COQUI_MODEL``.
"""

from __future__ import annotations

import difflib
import json
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from workers.tts.espeak import SynthChunk

__all__ = ["CoquiBackend", "ModelSpec", "PcmChunker", "resolve_model", "split_sentences"]

DEFAULT_RATE_WPM = 175  # what the personas assume is "normal speed"
SPEED_RANGE = (0.5, 2.0)  # XTTS sounds broken outside roughly this range
# Checkpoint names Coqui releases and its trainer use, best first.
_CHECKPOINT_NAMES = ("model.pth", "model_file.pth", "best_model.pth", "checkpoint.pth")
# *.pth files in an XTTS directory that are not the model.
_NOT_CHECKPOINTS = ("speakers", "dvae", "mel_stats", "speaker_embeddings")
_NAME_PREFIXES = ("tts_models/",)
_INSTALL = "pip install -e '.[tts-coqui]'"


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from, read from disk without the TTS package."""

    name: str  # a Coqui model name, or "" for a local model
    config_path: Path | None = None
    model_path: Path | None = None
    vocoder_path: Path | None = None
    vocoder_config_path: Path | None = None
    sample_rate: int | None = None  # None for model names until loaded
    model_type: str = ""  # config.json "model": "xtts", "vits", "tacotron2", ...
    languages: tuple[str, ...] = ()  # from config.json, where it lists them (XTTS does)

    @property
    def local(self) -> bool:
        return not self.name


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"coqui config {path} is not valid JSON: {exc}") from None


def _sample_rate(config: dict, where: Path) -> int:
    # Coqui's Synthesizer plays output_sample_rate when set (XTTS: 24000 while its mel
    # input runs at 22050), else sample_rate.
    audio = config.get("audio") or {}
    rate = audio.get("output_sample_rate") or audio.get("sample_rate")
    if not isinstance(rate, int) or rate <= 0:
        raise ValueError(f"coqui config {where} has no audio.sample_rate")
    return rate


def _find_checkpoint(directory: Path) -> Path:
    for name in _CHECKPOINT_NAMES:
        if (directory / name).is_file():
            return directory / name
    candidates = sorted(p for p in directory.glob("*.pth")
                        if not p.stem.lower().startswith(_NOT_CHECKPOINTS))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise FileNotFoundError(f"no model checkpoint (*.pth) in {directory}")
    names = ", ".join(p.name for p in candidates)
    raise ValueError(f"several checkpoints in {directory} ({names}); pass the file itself "
                     f"as the model, or rename the one to use to model.pth")


def resolve_model(model: str) -> ModelSpec:
    """A local model directory or checkpoint file, or a Coqui model name, as a ``ModelSpec``.

    Reads only ``config.json``; never imports TTS or loads weights."""
    if not model or not model.strip():
        raise ValueError("coqui backend needs a model: a local directory or a name like "
                         "tts_models/en/vctk/vits")
    path = Path(model).expanduser()
    if path.exists():
        directory = path if path.is_dir() else path.parent
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"no config.json in {directory} (coqui model directory)")
        checkpoint = path if path.is_file() else _find_checkpoint(directory)
        config = _read_config(config_path)
        rate = _sample_rate(config, config_path)
        vocoder = vocoder_config = None
        if (directory / "vocoder" / "config.json").is_file():
            vocoder_config = directory / "vocoder" / "config.json"
            vocoder = _find_checkpoint(directory / "vocoder")
            # the vocoder makes the waveform, so its rate is the output rate
            rate = _sample_rate(_read_config(vocoder_config), vocoder_config)
        languages = config.get("languages") or []
        return ModelSpec(name="", config_path=config_path, model_path=checkpoint,
                         vocoder_path=vocoder, vocoder_config_path=vocoder_config,
                         sample_rate=rate, model_type=str(config.get("model", "")),
                         languages=tuple(str(x) for x in languages))
    if model.startswith(_NAME_PREFIXES) or "/" not in model:
        return ModelSpec(name=model, model_type="xtts" if "xtts" in model else "")
    raise FileNotFoundError(f"coqui model {model!r} does not exist; Coqui model names look like "
                            "tts_models/<language>/<dataset>/<model>")


def split_sentences(text: str) -> list[str]:
    """Sentences, split after . ! ? (and … ;) followed by whitespace; never empty strings.

    The LLM stage already sends speakable fragments, so this rarely splits anything; it
    bounds the wait for the first audio when a caller hands over a paragraph."""
    parts = re.split(r"(?<=[.!?…;])\s+", text.strip())
    return [p for p in (s.strip() for s in parts) if p]


def float_to_int16(wav: Any) -> np.ndarray:
    """Model output (list, numpy array or torch tensor, float in [-1, 1]) -> int16 mono."""
    if hasattr(wav, "detach"):  # a torch tensor; no torch import needed to recognise one
        wav = wav.detach().float().cpu().numpy()
    x = np.asarray(wav, dtype=np.float32).reshape(-1)
    x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    return np.rint(np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)


class PcmChunker:
    """Regroups audio pieces of any length into int16 chunks of exactly ``chunk_ms``.

    Streaming models hand out pieces of whatever size their decoder makes (XTTS: 20 GPT
    tokens, about 0.9 s of audio); downstream wants short, even chunks, and the remainder of one
    piece is carried into the next so no short chunk appears mid-stream."""

    def __init__(self, sample_rate: int, chunk_ms: int = 50) -> None:
        if chunk_ms <= 0:
            raise ValueError(f"chunk_ms must be > 0, got {chunk_ms}")
        self.step = max(1, sample_rate * chunk_ms // 1000)
        self._pending = np.zeros(0, np.int16)
        self.sample = 0  # position of the next chunk's first sample

    def push(self, wav: Any) -> list[SynthChunk]:
        pcm = float_to_int16(wav)
        if self._pending.size:
            pcm = np.concatenate([self._pending, pcm])
        full = len(pcm) // self.step * self.step
        out = [self._emit(pcm[i:i + self.step]) for i in range(0, full, self.step)]
        self._pending = pcm[full:].copy()
        return out

    def flush(self) -> list[SynthChunk]:
        if not self._pending.size:
            return []
        chunk = self._emit(self._pending)
        self._pending = np.zeros(0, np.int16)
        return [chunk]

    def _emit(self, pcm: np.ndarray) -> SynthChunk:
        chunk = SynthChunk(pcm=pcm, sample=self.sample)
        self.sample += len(pcm)
        return chunk


class Engine(Protocol):
    """What ``CoquiBackend`` needs from a loaded model; ``_CoquiEngine`` is the real one."""

    sample_rate: int
    speakers: list[str]  # empty for single-speaker models
    languages: list[str]  # empty for single-language models
    streams: bool  # has inference_stream (XTTS)
    clones: bool  # accepts a reference wav as the voice
    has_speed: bool  # accepts speed=

    def synthesize(self, text: str, speaker: str | None, speaker_wav: str | None,
                   language: str | None, speed: float | None) -> Any: ...

    def stream(self, text: str, speaker: str | None, speaker_wav: str | None,
               language: str | None, speed: float | None) -> Iterable[Any]: ...


class CoquiBackend:
    """Coqui TTS; see the module docstring. ``engine`` replaces the model (tests)."""

    name = "coqui"

    def __init__(self, model: str, device: str = "cpu", speaker: str | None = None,
                 language: str | None = None, chunk_ms: int = 50,
                 voices: Mapping[str, str] | None = None, engine: Engine | None = None) -> None:
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
        if chunk_ms <= 0:
            raise ValueError(f"chunk_ms must be > 0, got {chunk_ms}")
        # with an injected engine (tests) the model string is optional
        self.spec = resolve_model(model) if engine is None or model else ModelSpec("<engine>")
        self.device = device
        self.chunk_ms = chunk_ms
        self.voices = {k.lower(): v for k, v in (voices or {}).items()}
        self.engine: Engine = engine if engine is not None else _CoquiEngine(self.spec, device)
        self._lock = threading.Lock()
        if self.spec.sample_rate and self.engine.sample_rate != self.spec.sample_rate:
            raise RuntimeError(f"model plays at {self.engine.sample_rate} Hz but its config "
                               f"says {self.spec.sample_rate} Hz")
        self.sample_rate: int = int(self.engine.sample_rate)
        self.language = self._resolve_language(language)
        self.speaker = self._check_speaker(speaker) if speaker else None
        if self.engine.speakers and not self.speaker:
            self.speaker = self.engine.speakers[0]  # so an empty voice still speaks

    @classmethod
    def from_config(cls, config, **kwargs) -> CoquiBackend:
        """Build from ``config.tts.coqui_*`` settings (see docs/backends/tts.md); absent
        settings take the defaults. ``coqui_voices`` is a list of ``persona_voice=speaker``."""
        tts = config.tts
        pairs = getattr(tts, "coqui_voices", []) or []
        voices = dict(p.split("=", 1) for p in pairs if "=" in p)
        return cls(model=getattr(tts, "coqui_model", ""),
                   device=getattr(tts, "coqui_device", "") or "cpu",
                   speaker=getattr(tts, "coqui_speaker", "") or None,
                   language=getattr(tts, "coqui_language", "") or None,
                   voices={k.strip(): v.strip() for k, v in voices.items()}, **kwargs)

    # -- voices -------------------------------------------------------------------------------

    def speakers(self) -> list[str]:
        return list(self.engine.speakers)

    def _resolve_language(self, language: str | None) -> str | None:
        langs = list(self.engine.languages)
        if not langs:
            if language:
                raise ValueError(f"coqui model is single-language; drop language={language!r}")
            return None
        if language is None:
            if "en" in langs:
                return "en"
            raise ValueError(f"coqui model is multi-lingual: set language, one of "
                             f"{', '.join(langs)}")
        if language not in langs:
            raise ValueError(f"coqui model has no language {language!r}; it has "
                             f"{', '.join(langs)}")
        return language

    def _unknown(self, voice: str) -> ValueError:
        names = list(self.engine.speakers)
        close = difflib.get_close_matches(voice, names, n=3, cutoff=0.5)
        shown = names[:40]
        more = f" ... and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        return ValueError(
            f"coqui model has no speaker {voice!r}.{hint} Speakers ({len(names)}): "
            f"{', '.join(shown)}{more}. Map persona voices to speakers with "
            f"tts.coqui_voices = [\"{voice}=<speaker>\"]")

    def _check_speaker(self, name: str) -> str:
        by_lower = {s.lower(): s for s in self.engine.speakers}
        found = by_lower.get(name.lower())
        if found is None:
            raise self._unknown(name)
        return found

    def resolve_voice(self, voice: str | None) -> tuple[str | None, str | None]:
        """A persona voice -> (speaker, speaker_wav) for this model, or ValueError."""
        if not self.engine.speakers and not self.engine.clones:
            return None, None  # single speaker: there is nothing to choose
        wanted = (voice or "").strip()
        wanted = self.voices.get(wanted.lower(), wanted)
        if not wanted:
            if self.speaker is None:
                raise ValueError("coqui model needs a voice: set tts.coqui_speaker or "
                                 "persona voices")
            return self.speaker, None
        if wanted.lower().endswith(".wav"):
            if not self.engine.clones:
                raise ValueError(f"coqui model cannot clone a voice from {wanted}")
            if not Path(wanted).expanduser().is_file():
                raise FileNotFoundError(f"reference voice {wanted} does not exist")
            return None, str(Path(wanted).expanduser())
        return self._check_speaker(wanted), None

    # -- synthesis ----------------------------------------------------------------------------

    def synthesize(self, text: str, voice: str = "", rate_wpm: int = DEFAULT_RATE_WPM,
                   pitch: int = 50) -> Iterator[SynthChunk]:
        """Audio of ``text`` as chunks. The voice is checked here (ValueError now, like
        espeak); the model runs while the iterator is consumed. ``pitch`` is ignored."""
        speaker, speaker_wav = self.resolve_voice(voice)
        if rate_wpm <= 0:
            raise ValueError(f"rate_wpm must be > 0, got {rate_wpm}")
        speed = None
        if self.engine.has_speed:
            speed = min(max(rate_wpm / DEFAULT_RATE_WPM, SPEED_RANGE[0]), SPEED_RANGE[1])
        if not text.strip():
            return iter(())
        return self._run(text.strip(), speaker, speaker_wav, speed)

    def _run(self, text: str, speaker: str | None, speaker_wav: str | None,
             speed: float | None) -> Iterator[SynthChunk]:
        chunker = PcmChunker(self.sample_rate, self.chunk_ms)
        with self._lock:  # see the module docstring: one synthesis at a time
            if self.engine.streams:
                pieces: Iterable[Any] = self.engine.stream(text, speaker, speaker_wav,
                                                           self.language, speed)
            else:
                pieces = (self.engine.synthesize(s, speaker, speaker_wav, self.language, speed)
                          for s in split_sentences(text))
            for piece in pieces:
                yield from chunker.push(piece)
        yield from chunker.flush()


class _CoquiEngine:
    """The loaded Coqui model: ``TTS.api.TTS`` and the parts of its model the backend uses."""

    def __init__(self, spec: ModelSpec, device: str) -> None:
        # TTS raises ImportError without torch, torchaudio or (from torch 2.9) torchcodec
        try:
            from TTS.api import TTS
            from TTS.utils import synthesizer
        except ImportError as exc:
            raise ImportError(f"the coqui TTS backend cannot import TTS ({exc}). "
                              f"Install it with {_INSTALL}") from exc
        if spec.local:
            kwargs: dict[str, Any] = {"model_path": str(spec.model_path),
                                      "config_path": str(spec.config_path)}
            if spec.vocoder_path:
                kwargs["vocoder_path"] = str(spec.vocoder_path)
                kwargs["vocoder_config_path"] = str(spec.vocoder_config_path)
            api = TTS(progress_bar=False, **kwargs)
        else:
            api = TTS(spec.name, progress_bar=False)
        api.to(device)  # `gpu=` is deprecated in coqui-tts 0.2x
        synth = api.synthesizer
        if synth is None or synth.tts_model is None:
            raise RuntimeError(f"{spec.name or spec.model_path} is not a text-to-speech model")
        self.api = api
        self.model = synth.tts_model
        self.sample_rate = int(synth.output_sample_rate)
        self.speakers = list(api.speakers or [])  # api.speakers is None for one speaker
        self.languages = list(api.languages or []) if api.is_multi_lingual else []
        self.streams = hasattr(self.model, "inference_stream")
        self.clones = bool(getattr(self.model.config, "supports_cloning", False))
        self.has_speed = self.streams  # XTTS; the others drop speed= silently
        # Synthesizer.tts appends this many zeros after every call (0.45 s at 22050 Hz), a
        # pause meant for whole texts; the TTS stage joins fragments itself, so it is cut off.
        self._pad = int(getattr(synthesizer, "PAD_SILENCE_SAMPLES", 0))
        self._latents: dict[str, tuple[Any, Any]] = {}

    def synthesize(self, text, speaker, speaker_wav, language, speed):
        extra = {"speed": speed} if speed is not None else {}
        wav = self.api.tts(text=text, speaker=speaker, language=language,
                           speaker_wav=speaker_wav, split_sentences=False, **extra)
        pad = self._pad
        if pad and len(wav) >= pad and not np.any(np.asarray(wav[-pad:])):
            wav = wav[:-pad]
        return wav

    def _conditioning(self, speaker, speaker_wav):
        key = speaker_wav or speaker
        if key not in self._latents:
            if speaker_wav:
                self._latents[key] = self.model.get_conditioning_latents(audio_path=[speaker_wav])
            else:
                entry = self.model.speaker_manager.speakers[speaker]
                self._latents[key] = (entry["gpt_cond_latent"], entry["speaker_embedding"])
        return self._latents[key]

    def stream(self, text, speaker, speaker_wav, language, speed):
        manager = getattr(self.model, "speaker_manager", None)
        if not speaker_wav and (manager is None or speaker not in manager.speakers):
            # a voice saved in the model's voice directory: only XTTS's own lookup finds it
            yield self.synthesize(text, speaker, speaker_wav, language, speed)
            return
        latent, embedding = self._conditioning(speaker, speaker_wav)
        yield from self.model.inference_stream(
            text, language, latent, embedding, speed=speed or 1.0,
            enable_text_splitting=True)
