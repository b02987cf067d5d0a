"""The offline recognizer: pocketsphinx with the en-US model its wheel carries."""

from __future__ import annotations

import threading
from typing import ClassVar

import numpy as np
from pocketsphinx import Config, Decoder

PARTIAL_EVERY = 4800  # samples (300 ms at 16 kHz): hypothesis lookups are not free


class _Stream:
    def __init__(self, backend: PocketsphinxBackend, decoder: Decoder):
        self._backend = backend
        self._decoder = decoder
        self._since_partial = 0
        self._last = ""
        decoder.start_utt()

    def feed(self, samples: np.ndarray) -> str | None:
        pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
        self._decoder.process_raw(pcm.tobytes(), False, False)
        self._since_partial += len(pcm)
        if self._since_partial < PARTIAL_EVERY:
            return None
        self._since_partial = 0
        hyp = self._decoder.hyp()
        text = hyp.hypstr.strip() if hyp is not None else ""
        if text and text != self._last:
            self._last = text
            return text
        return None

    def finish(self) -> str:
        self._decoder.end_utt()
        hyp = self._decoder.hyp()
        return hyp.hypstr.strip() if hyp is not None else ""

    def close(self) -> None:
        if self._decoder is not None:
            self._backend._release(self._decoder)
            self._decoder = None


class PocketsphinxBackend:
    name = "pocketsphinx"

    # The second passes (fwdflat, bestpath) re-decode the whole utterance after the player
    # stops: on jfk.flac (11 s) finish() took 833 ms with them, 41 ms without, for a transcript
    # of the same (poor) quality. The player is waiting then, so they are off by default.
    DEFAULTS: ClassVar[dict] = {"fwdflat": False, "bestpath": False}

    def __init__(self, model_dir: str | None = None, pool_size: int = 4, **decoder_options):
        self.pool_size = pool_size
        self.options = {**self.DEFAULTS, **decoder_options}
        if model_dir:
            self.options.setdefault("hmm", f"{model_dir}/en-us")
        self._idle: list[Decoder] = []
        self._lock = threading.Lock()

    def _new(self) -> Decoder:
        cfg = Config(**self.options)
        cfg["loglevel"] = "FATAL"
        return Decoder(cfg)

    def warm(self) -> None:
        with self._lock:
            if not self._idle:
                self._idle.append(self._new())

    def open_stream(self) -> _Stream:
        with self._lock:
            decoder = self._idle.pop() if self._idle else None
        # creating a decoder loads the model (~330 ms here): only when the pool is empty
        return _Stream(self, decoder or self._new())

    def _release(self, decoder: Decoder) -> None:
        with self._lock:
            if len(self._idle) < self.pool_size:
                self._idle.append(decoder)
