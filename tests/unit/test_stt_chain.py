"""The STT chain: a backend that cannot load hands over to the next one, at start."""

from types import SimpleNamespace

import pytest
import structlog

from core.config import Config
from workers.stt.stage import SttStage


async def test_missing_model_falls_back_to_pocketsphinx(tmp_path):
    cfg = Config.load(env={"PARLEY_STT_BACKENDS": "faster-whisper,pocketsphinx",
                           "PARLEY_STT_MODEL": str(tmp_path / "no-such-model")})
    stage = SttStage(cfg)
    await stage.start(SimpleNamespace(log=structlog.get_logger()))
    assert stage.backend.name == "pocketsphinx"
    assert stage.describe()["chain"] == ["faster-whisper", "pocketsphinx"]


async def test_no_backend_that_loads_is_a_clear_error(tmp_path):
    cfg = Config.load(env={"PARLEY_STT_BACKENDS": "faster-whisper",
                           "PARLEY_STT_MODEL": str(tmp_path / "nothing")})
    with pytest.raises(RuntimeError, match="no stt backend could load: faster-whisper"):
        await SttStage(cfg).start(SimpleNamespace(log=structlog.get_logger()))


def test_whisperx_auto_device_follows_ctranslate2_and_threads_come_from_config(monkeypatch):
    """stt.device = "auto" picks the GPU only where CTranslate2 sees one (whisperX has no auto),
    int8 becomes float16 on a GPU, and stt.cpu_threads reaches the backend."""
    import sys
    import types

    from core.config import Config
    from workers.stt import stage

    made = {}

    class Recorder:
        def __init__(self, model, **kw):
            made.update(kw)

    monkeypatch.setattr("workers.stt.whisperx_backend.WhisperXBackend", Recorder)
    cfg = Config.load(env={"PARLEY_STT_CPU_THREADS": "2"})
    for devices, want in ((0, ("cpu", "int8")), (1, ("cuda", "float16"))):
        fake_ct2 = types.SimpleNamespace(get_cuda_device_count=lambda n=devices: n)
        monkeypatch.setitem(sys.modules, "ctranslate2", fake_ct2)
        stage.make_backend("whisperx", cfg)
        assert (made["device"], made["compute_type"]) == want
        assert made["cpu_threads"] == 2
