"""Which backends this environment can run: ``parley backends [--json]``.

Every backend of every stage is listed with whether it can run here and, when not, why and
which extra installs it. Detection never loads a model: ``importlib.util.find_spec`` first
(cheap, imports nothing but parent packages), then a guarded import of the backend's top
module, because some packages are present but refuse to import (coqui-tts raises ImportError
when torchaudio is missing). The first import of torch costs about 1-2 s; nothing else is
slow. CUDA is asked of torch, or of ctranslate2 when only faster-whisper is installed.

Fields per backend: ``available`` (it would start here), ``why`` (empty, or the reason it
would not / a caveat), ``extra`` (the pip extra that installs it, "" for the default install),
``gpu`` (meant for a GPU), ``default`` (part of the default offline setup), ``selected`` (named
in the loaded config's ``<stage>.backends``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import sys
from dataclasses import dataclass, field

from core.config import Config
from workers.registry import BACKENDS, STAGES, BackendSpec, is_external, load_object

__all__ = ["BACKENDS", "BackendSpec", "cmd_backends", "probe", "render"]


@dataclass
class _Probe:
    cuda: dict = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # module -> why, memoised


def _find(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing or broken
        return False


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def _import(module: str, memo: dict[str, str]) -> str:
    """'' when ``module`` imports, else why not. Imports run once per process."""
    if module not in memo:
        try:
            importlib.import_module(module)
            memo[module] = ""
        except (Exception, SystemExit) as exc:  # anything a broken package may throw
            memo[module] = _first_line(exc)
    return memo[module]


def _missing(module: str, spec: BackendSpec) -> str:
    if module == "workers.lipsync.transformer_backend":
        return "workers/lipsync/transformer_backend.py is not in this checkout"
    if module == "torchaudio" and _find("torch"):
        import torch  # present: say which torchaudio build would match it

        return (f"torchaudio missing: install the torchaudio build for torch "
                f"{torch.__version__} (pip install -e '.[{spec.extra}]')")
    install = f": pip install -e '.[{spec.extra}]'" if spec.extra else " (default install)"
    return f"module {module} not installed{install}"


def _cuda() -> dict:
    """{"available": bool, "devices": n, "name": str, "via": "torch"|"ctranslate2"|""}."""
    if _find("torch"):
        try:
            import torch

            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            name = torch.cuda.get_device_name(0) if n else ""
            return {"available": n > 0, "devices": n, "name": name, "via": "torch"}
        except Exception as exc:  # a broken CUDA install must not break the listing
            return {"available": False, "devices": 0, "name": _first_line(exc), "via": "torch"}
    if _find("ctranslate2"):
        try:
            import ctranslate2

            n = ctranslate2.get_cuda_device_count()
            return {"available": n > 0, "devices": n, "name": "", "via": "ctranslate2"}
        except Exception as exc:
            return {"available": False, "devices": 0, "name": _first_line(exc),
                    "via": "ctranslate2"}
    return {"available": False, "devices": 0, "name": "", "via": ""}


def _check(spec: BackendSpec, state: _Probe) -> tuple[bool, str]:
    if is_external(spec.name):
        return _check_external(spec)
    # the backend's own package first: "vllm not installed" says more than "torch not installed"
    for module in spec.modules[-1:] + spec.modules[:-1]:
        if not _find(module):
            return False, _missing(module, spec)
    for module in spec.modules:
        failure = _import(module, state.failures)
        if failure:
            return False, f"import {module} failed: {failure}"
    if spec.gpu and not state.cuda.get("available"):
        if spec.cpu_build and _installed(spec.cpu_build):
            return True, f"CPU build ({spec.cpu_build}): runs on the CPU (slower)"
        if spec.needs_cuda:
            return False, "no CUDA device (this backend runs on a GPU only)"
        return True, "no CUDA device: runs on the CPU (slower)"
    return True, spec.note


def _external(config: Config) -> tuple[BackendSpec, ...]:
    """Out-of-tree backends (``package.module:Class``) the config names, so they are listed."""
    return tuple(BackendSpec(stage, name, name, (name.partition(":")[0],))
                 for stage in STAGES for name in getattr(config, stage).backends
                 if is_external(name))


def _check_external(spec: BackendSpec) -> tuple[bool, str]:
    try:
        load_object(spec.factory)
    except (Exception, SystemExit) as exc:  # whatever a broken module throws
        return False, f"out-of-tree backend {spec.factory}: {_first_line(exc)}"
    return True, "out-of-tree"


def probe(config: Config | None = None) -> dict:
    """Every backend per stage, as plain JSON-ready data. Loads no model.

    ``{"cuda": {...}, "python": "3.11.7", "stages": {stage: [{"name", "available", "why",
    "extra", "gpu", "default", "selected"}, ...]}}``"""
    defaults = Config()
    config = config or defaults
    state = _Probe()
    state.cuda = _cuda()
    stages: dict[str, list[dict]] = {s: [] for s in STAGES}
    for spec in BACKENDS + _external(config):
        available, why = _check(spec, state)
        if spec.name == "openai" and available and config.llm.openai_url:
            why = f"server {config.llm.openai_url}"
        stages[spec.stage].append({
            "name": spec.name,
            "available": available,
            "why": why,
            "extra": spec.extra,
            "gpu": spec.gpu,
            "default": spec.name in getattr(defaults, spec.stage).backends,
            "selected": spec.name in getattr(config, spec.stage).backends,
        })
    return {"cuda": state.cuda, "python": sys.version.split()[0], "stages": stages}


def render(result: dict) -> str:
    """The probe as a table: one row per backend, then the CUDA line."""
    header = ("STAGE", "BACKEND", "OK", "GPU", "DEFAULT", "EXTRA", "WHY")
    rows = [header]
    for stage, entries in result["stages"].items():
        for e in entries:
            rows.append((stage, e["name"], "yes" if e["available"] else "no",
                         "yes" if e["gpu"] else "", "yes" if e["default"] else "",
                         e["extra"] or "-", e["why"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
             for r in rows]
    cuda = result["cuda"]
    if cuda.get("available"):
        lines.append(f"CUDA: {cuda['devices']} device(s), {cuda['name']} (via {cuda['via']})")
    else:
        via = f" (asked {cuda['via']})" if cuda.get("via") else " (neither torch nor ctranslate2)"
        lines.append(f"CUDA: none{via}")
    missing = [f"{s}/{e['name']}" for s, es in result["stages"].items() for e in es
               if e["selected"] and not e["available"]]
    if missing:
        lines.append(f"selected by the config but unavailable: {', '.join(missing)}")
    return "\n".join(line.rstrip() for line in lines)


def cmd_backends(args) -> int:
    """``parley backends [--json]``; 1 when a backend the config selects cannot run here
    (usable as a container health check), else 0."""
    config = Config.load(getattr(args, "config", None))
    result = probe(config)
    print(json.dumps(result, indent=2) if getattr(args, "json", False) else render(result))
    bad = [e for es in result["stages"].values() for e in es
           if e["selected"] and not e["available"]]
    return 1 if bad else 0
