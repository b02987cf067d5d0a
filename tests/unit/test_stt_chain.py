"""The STT chain: a backend that cannot load hands over to the next one, at start."""

from types import SimpleNamespace

import pytest
import structlog

from parley.config import Config
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
