"""The offline recognizer: pocketsphinx with the en-US model its wheel carries (Sans-I/O).

Measurements (2-core CPU shared with other jobs, so timings vary +-30 %; RTF = CPU seconds
per audio second; WER on jfk.flac at three levels/noise plus 10 espeak-ng sentences of mixed
voices and levels, fed in 20 ms chunks):

* Speed, jfk.flac (11 s), fresh front end, best of 4 interleaved runs: pocketsphinx defaults
  feed 3.7 s (0.34 RTF) then spend 0.71 s in end_utt() on the fwdflat/bestpath passes, after
  the player stopped talking (under load we also saw 6.0 s + 0.6 s). Without those passes:
  3.9 s + 32 ms. Also with ``maxhmmpf`` 30000 -> 10000 (no WER change): 2.5 s (0.23 RTF)
  + 22 ms, so 4.4 s -> 2.5 s overall. Narrower ``beam``/``pbeam``/``wbeam``
  (1e-40/1e-40/1e-25), ``maxhmmpf`` 5000 or 3000, ``topn`` 2 or ``ds`` 2 save another 20-40 %
  but add 0.1-0.3 WER on clear speech, so they stay at their defaults.
* Accuracy is dominated by cepstral mean normalization, not by the search. Live CMN starts
  from ``cmninit`` (40,3,-1 by default) blended with a 500-frame prior, so within a short
  utterance it barely moves off that guess: WER 0.95 (jfk) / 0.78 (espeak). Each stream
  therefore decodes its first ``cmn_warmup_ms`` (1.5 s), solves for the speaker's own mean
  over those frames, and restarts the utterance from the buffered audio with it. That costs
  one extra 1.5 s decode while the player is still talking and nothing at finish():
  WER 0.47 / 0.48 (0.76 / 0.78 with the warm-up off). Warm-ups of 1 s (mostly preroll and
  onset) and 2-2.5 s (short utterances never reach them) measured worse; re-decoding sub-1.5 s
  utterances at finish() changed nothing measurable, so it is not done.
* The warm-up's extra decode is a burst: ~350 ms of CPU at 1.5 s into the utterance, holding the
  GIL. A question that ends soon after (most game questions are 1.5-2.5 s) waits for it:
  push-to-talk answers came 140-850 ms after ``end_of_utterance`` with a 1.9 s question. So a
  stream hands back the speaker's mean (:meth:`PocketsphinxStream.speaker`), the STT stage keeps
  it with the session, and the session's next utterance starts from it with no warm-up
  (``open_stream(speaker=...)``): same WER, and no burst from the second utterance on.
* The first utterance of a session still has no mean to start from, and its warm-up used to
  re-decode the 1.5 s in one ~350 ms burst inside one feed(): with two players' first
  questions on one worker the bursts stacked and both answers came 130-540 ms late. The
  re-decode is now a backlog that each later feed() works off by ``CATCH_UP`` times its own
  audio (the recognizer runs behind for ~0.5 s and catches up), so no call holds the worker
  for more than a few tens of ms; hypothesis() and finish() decode whatever is left. A short
  first answer restarts as soon as its speaker stops rather than at 1.5 s in its trailing
  silence (see _VOICED_SHARE).
* pocketsphinx's Python binding holds the GIL while it decodes, so running feed() in a worker
  thread does not free the event loop by itself: feed() decodes in 100 ms slices so other
  threads get the GIL in between.
"""

from __future__ import annotations

import os
import threading
from typing import ClassVar, Protocol

import numpy as np
from pocketsphinx import Config, Decoder

RATE = 16000
PARTIAL_EVERY = 4800  # samples (300 ms): hyp() walks the backpointer table, not free
_SLICE_BYTES = 1600 * 2  # 100 ms of int16 per process_raw call: bounds how long the GIL is held

# pocketsphinx's live CMN keeps a prior worth CMN_WIN=500 frames and renormalizes once it holds
# more than 800 frames, i.e. after 300 new ones. The warm-up estimate assumes that has not
# happened yet, so the warm-up is capped below 3 s.
_CMN_WIN = 500
_MAX_WARMUP_MS = 2500
_MIN_WARMUP_FRAMES = 50  # a mean over fewer frames is too noisy to extrapolate from
# A short first utterance ("No thanks.", ~1 s) reached the warm-up point in its trailing
# silence, and the re-decode landed on the turn's end: final words 100-210 ms after the end
# instead of ~20. So once the speaker has stopped (_STOPPED_SAMPLES of frames 30 dB under the
# loudest so far) after _EARLY_WARMUP_SAMPLES, the restart comes at once, and the re-decode is
# worked off while the end of turn is still being waited for. (Skipping the restart for such
# utterances cost words: 17 of 34 right on 8 espeak sentences, against 22 with it.)
_VOICED_SHARE = 10 ** (-30 / 20)
_STOPPED_SAMPLES = 160 * RATE // 1000
_EARLY_WARMUP_SAMPLES = 800 * RATE // 1000
# After the warm-up restart each feed() decodes up to this many times its own audio of the
# backlog on top: 1.5 s is worked off in ~0.5 s of 20 ms chunks, each call then decoding
# ~80 ms of audio (~20 ms of CPU) instead of one 1.5 s burst.
CATCH_UP = 3
# Once the speaker has stopped, faster: the re-decode is done before the likely end (300 ms of
# silence) asks for the words so far, and a call still decodes 200 ms of audio at most.
CATCH_UP_STOPPED = 8
_CATCH_UP_MAX = 2 * 3200  # bytes of backlog per call at most (200 ms), for large reads

# Digital silence (noise-gated clients, synthetic audio) gives degenerate features. Runs of
# near-zero samples are filled with noise at ~-70 dBFS (10 LSB RMS), far below any real
# microphone's noise floor: espeak sentences padded with 0.3 s of zeros went from WER 0.53 to
# 0.37 (0.30 with a real -60 dBFS noise floor). Filling only runs longer than _SILENT_RUN leaves
# real audio untouched; a fixed table indexed by stream position keeps transcripts
# deterministic and independent of chunk sizes.
_SILENT_RUN = 64  # samples (4 ms)
_COMFORT = np.rint(np.random.default_rng(20240611).standard_normal(1 << 16) * 10).astype("<i2")

# A speech-typical cepstral mean, between those pocketsphinx converges to on jfk.flac and on
# espeak-ng speech; a better first guess than the library's 40,3,-1.
DEFAULT_CMN = "50,10,-10,10,-10,0,-8,-8,0,-2,2,0,-2"


def _parse_cmn(text: str) -> np.ndarray:
    try:
        return np.array([float(v) for v in text.split(",")], dtype=np.float64)
    except ValueError:
        raise ValueError(f"cmn must be comma-separated numbers, got {text!r}") from None


def _format_cmn(vec: np.ndarray) -> str:
    return ",".join(f"{v:.2f}" for v in vec)


SPEAKER_TAG = "pocketsphinx/cmn:"  # speaker() values are this backend's own


def _speaker_cmn(speaker: str) -> str | None:
    """The cepstral mean in a speaker() value; None for another backend's or a bad one."""
    if not speaker.startswith(SPEAKER_TAG):
        return None
    text = speaker[len(SPEAKER_TAG):]
    try:
        _parse_cmn(text)
    except ValueError:
        return None
    return text


def _hyp_text(decoder: Decoder) -> str:
    hyp = decoder.hyp()
    return hyp.hypstr.strip() if hyp is not None else ""


class RecognizerStream(Protocol):
    """One utterance. feed(): 16 kHz mono float32 in, a changed partial hypothesis (at most
    about every 300 ms of audio) or None out. finish(): the final transcript, lowercase words,
    possibly "". speaker(): after finish(), what the stream learned about the speaker, handed
    to the backend's next open_stream(speaker=...) for them ("" if nothing; a backend ignores
    another's). close(): give resources back to the backend (idempotent)."""

    def feed(self, samples: np.ndarray) -> str | None: ...

    def finish(self) -> str: ...

    def speaker(self) -> str: ...  # after finish(): for open_stream(speaker=...); may be ""

    def close(self) -> None: ...


class PocketsphinxStream:
    """One utterance on a pooled decoder. Use it from one thread at a time."""

    def __init__(self, backend: PocketsphinxBackend, decoder: Decoder, cmn: str,
                 warmup_samples: int, speaker: str = ""):
        self._backend = backend
        self._decoder: Decoder | None = decoder
        own = _speaker_cmn(speaker)
        # a mean carried from this speaker's earlier utterance needs no warm-up
        self._adapted = own is not None
        self._cmn_prior = own or cmn
        self._warmup_samples = warmup_samples
        # int16 audio kept for the warm-up restart; None once restarted or when disabled.
        self._warm: bytearray | None = (bytearray() if warmup_samples > 0 and not self._adapted
                                        else None)
        self._backlog = bytearray()  # int16 audio fed but not decoded yet (see CATCH_UP)
        self._frames = 0  # decoded frames at finish(), for speaker()
        self._ended = False  # end_utt() done (after finish(): see there)
        self._fed = 0
        self._loudest = 0.0  # the loudest 20 ms frame's RMS during the warm-up (int16)
        self._quiet = 0  # samples since the last frame within 30 dB of it (see _VOICED_SHARE)
        self._frame_sq, self._frame_n = 0.0, 0  # the 20 ms frame being measured
        self._zero_run = 0  # near-zero samples at the end of what was fed so far
        self._since_partial = 0
        self._last = ""
        self._final: str | None = None
        # Fresh front end (noise estimate, CMN) for every stream: transcripts then depend on
        # this utterance only, not on who used the pooled decoder before. Takes ~0.1 ms.
        decoder.reinit_feat()
        decoder.set_cmn(self._cmn_prior)
        decoder.start_utt()

    def _stops_at(self, q: np.ndarray) -> int | None:
        """Track the speaker's level over ``q`` (about to be fed) in 20 ms frames counted from
        the stream's start, so the result does not depend on how the audio is chunked; the
        offset into ``q`` where the early warm-up restart is due, or None."""
        out = None
        i = 0
        while i < len(q):
            take = min(len(q) - i, 320 - self._frame_n)
            part = q[i:i + take].astype(np.float64)
            self._frame_sq += float(np.dot(part, part))
            self._frame_n += take
            i += take
            if self._frame_n < 320:
                break
            level = float(np.sqrt(self._frame_sq / 320))
            self._frame_sq, self._frame_n = 0.0, 0
            self._loudest = max(self._loudest, level)
            self._quiet = 0 if level >= self._loudest * _VOICED_SHARE else self._quiet + 320
            if (out is None and self._warm is not None and self._quiet >= _STOPPED_SAMPLES
                    and self._fed + i >= _EARLY_WARMUP_SAMPLES):
                out = i
        return out

    def _process(self, pcm: bytes) -> None:
        for i in range(0, len(pcm), _SLICE_BYTES):
            self._decoder.process_raw(pcm[i:i + _SLICE_BYTES], False, False)

    def _restart_with_speaker_cmn(self) -> None:
        # After end_utt the live mean is (prior*500 + sum)/(500 + n) over the n non-silent
        # frames; solving for sum/n gives this speaker's own mean. n_frames() also counts the
        # digital-silence frames CMN skips, which only shortens the step away from the prior.
        decoder = self._decoder
        audio, self._warm = bytes(self._warm), None
        frames = decoder.n_frames()
        decoder.end_utt()
        own = self._own_mean(frames)
        if own is not None:
            decoder.set_cmn(own)
            self._cmn_prior, self._adapted = own, True
        decoder.start_utt()
        self._backlog[:0] = audio  # decoded again by the next feeds, not in one burst

    def _catch_up(self, budget: int | None = None) -> None:
        """Decode ``budget`` bytes of the backlog (all of it when None)."""
        n = len(self._backlog) if budget is None else min(budget, len(self._backlog))
        if n:
            chunk = bytes(self._backlog[:n])
            del self._backlog[:n]
            self._process(chunk)

    def _own_mean(self, frames: int) -> str | None:
        """The speaker's own mean, from the live mean after end_utt() over ``frames``."""
        if frames < _MIN_WARMUP_FRAMES:
            return None
        prior = _parse_cmn(self._cmn_prior)
        blended = _parse_cmn(self._decoder.get_cmn())
        n = min(len(prior), len(blended))
        return _format_cmn(prior[:n] + (blended[:n] - prior[:n]) * (_CMN_WIN + frames) / frames)

    @property
    def adapted(self) -> bool:
        """Decoding with this speaker's own mean: carried in, or found by the warm-up."""
        return self._adapted

    def speaker(self) -> str:
        """After finish(): what this utterance learned about the speaker, for the next one
        (``open_stream(speaker=...)``); "" when it heard too little to say."""
        if self._final is None or self._decoder is None or not self._end_utt():
            return ""
        own = self._own_mean(self._frames)  # this utterance's own (end_utt updated the mean)
        if own is None:
            return f"{SPEAKER_TAG}{self._cmn_prior}" if self._adapted else ""
        if self._adapted:  # carried from earlier ones: average, so one odd utterance moves it half
            own = _format_cmn((_parse_cmn(own) + _parse_cmn(self._cmn_prior)) / 2)
        return f"{SPEAKER_TAG}{own}"

    def _fill_digital_silence(self, q: np.ndarray) -> None:
        # Only inside runs of _SILENT_RUN near-zero samples, counted across chunks, so real
        # audio (whose own noise never stays within 1 LSB that long) is passed through as is.
        silent = np.abs(q) <= 1
        if not silent.any():
            self._zero_run = 0
            return
        idx = np.arange(len(q))
        last_loud = np.maximum.accumulate(np.where(silent, -1, idx))
        run = np.where(last_loud < 0, idx + 1 + self._zero_run, idx - last_loud)
        fill = np.flatnonzero(run >= _SILENT_RUN)
        q[fill] = _COMFORT[(fill + self._fed) & (len(_COMFORT) - 1)]
        self._zero_run = int(run[-1])

    def feed(self, samples: np.ndarray) -> str | None:
        """Decode 16 kHz mono float32. Returns a new partial hypothesis when it changed,
        checked about every 300 ms of audio; otherwise None."""
        if self._decoder is None or self._final is not None:
            raise RuntimeError("feed() on a finished or closed recognizer stream")
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        if not len(x):
            return None
        q = np.clip(np.rint(x * 32768.0), -32768, 32767).astype("<i2")
        self._fill_digital_silence(q)
        pcm = q.tobytes()
        stop = self._stops_at(q) if self._warm is not None or self._backlog else None
        if self._warm is not None:
            # Split at the warm-up point (or where the speaker stopped) so that a large chunk
            # (a whole utterance, in sequential mode) is not decoded twice: only the warm-up
            # audio is.
            at = self._warmup_samples - self._fed
            if stop is not None:
                at = min(at, stop)
            head = pcm[: 2 * at]
            pcm = pcm[len(head):]
            self._process(head)
            self._warm += head
            self._fed += len(head) // 2
            if self._fed >= self._warmup_samples or (stop is not None and stop <= at):
                self._restart_with_speaker_cmn()
        self._fed += len(pcm) // 2
        if self._backlog:
            self._backlog += pcm
            n = len(x) * 2  # this call's audio, in bytes
            rate = CATCH_UP_STOPPED if self._quiet >= _STOPPED_SAMPLES else CATCH_UP
            self._catch_up(n + min(n * rate, _CATCH_UP_MAX))
        else:
            self._process(pcm)
        self._since_partial += len(x)
        if self._since_partial < PARTIAL_EVERY:
            return None
        self._since_partial = 0
        text = _hyp_text(self._decoder)
        if text and text != self._last:
            self._last = text
            return text
        return None

    def hypothesis(self) -> str:
        """The best hypothesis of everything fed so far, now (not only every 300 ms): what
        a speculative reply starts on. Measured equal to finish()'s text whenever the speaker
        did not go on (docs/endpointing.md)."""
        if self._final is not None:
            return self._final
        if self._decoder is None:
            raise RuntimeError("hypothesis() on a closed recognizer stream")
        self._catch_up()
        return _hyp_text(self._decoder)

    def finish(self) -> str:
        """Final transcript: lowercase words, "" when nothing was recognized. Idempotent.

        It is the search's best path at the last frame fed, read without ending the utterance:
        end_utt() took 100-250 ms of CPU after jfk.flac's 11 s (it finishes the search over
        every word that ended in it) and gave the same words on every utterance we tried (12
        of 12, jfk and espeak sentences). end_utt() runs later, in speaker() or close(), once
        the transcript is on its way: the final words are hypothesis() at the last frame.
        """
        if self._final is None:
            if self._decoder is None:
                raise RuntimeError("finish() on a closed recognizer stream")
            self._catch_up()
            self._frames = self._decoder.n_frames()
            self._final = self.hypothesis()
        return self._final

    def _end_utt(self) -> bool:
        """End the decoder's utterance once; False when the decoder refused (unknown state)."""
        if self._ended:
            return True
        self._ended = True
        try:
            self._decoder.end_utt()
        except RuntimeError:
            return False
        return True

    def close(self) -> None:
        """Give the decoder back to the backend's pool. Idempotent."""
        if self._decoder is None:
            return
        ok = self._end_utt()
        decoder, self._decoder = self._decoder, None
        if ok:  # a decoder in an unknown state must not go back into the pool
            self._backend._release(decoder)

    def __enter__(self) -> PocketsphinxStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PocketsphinxBackend:
    name = "pocketsphinx"
    holds_gil = True  # its decoder does not release the GIL while it decodes
    finishes_late = True  # end_utt() runs in speaker()/close(), after the final words

    # See the module docstring for the measurements behind these.
    DEFAULTS: ClassVar[dict] = {"fwdflat": False, "bestpath": False, "maxhmmpf": 10000}

    def __init__(self, model_dir: str | None = None, pool_size: int = 4,
                 cmn: str = DEFAULT_CMN, cmn_warmup_ms: int = 1500, **decoder_options):
        if pool_size < 0:
            raise ValueError(f"pool_size must be >= 0, got {pool_size}")
        if not 0 <= cmn_warmup_ms <= _MAX_WARMUP_MS:
            raise ValueError(f"cmn_warmup_ms must be 0..{_MAX_WARMUP_MS}, got {cmn_warmup_ms}")
        _parse_cmn(cmn)  # fail here rather than in the first stream
        self.pool_size = pool_size
        self.cmn = cmn
        self.warmup_samples = cmn_warmup_ms * RATE // 1000
        self.options = {**self.DEFAULTS, **decoder_options}
        if model_dir:
            # The layout of the wheel's model/en-us: acoustic model folder, LM, dictionary.
            self.options.setdefault("hmm", os.path.join(model_dir, "en-us"))
            for key, name in (("lm", "en-us.lm.bin"), ("dict", "cmudict-en-us.dict")):
                path = os.path.join(model_dir, name)
                if os.path.exists(path):
                    self.options.setdefault(key, path)
        self.options.setdefault("loglevel", "FATAL")  # INFO is several lines per utterance
        self._idle: list[Decoder] = []
        self._lock = threading.Lock()

    def _new(self) -> Decoder:
        # Loads acoustic model, LM and dictionary (~330 ms): only when no decoder is idle.
        return Decoder(Config(**self.options))

    def warm(self) -> None:
        """Fill the pool ahead of the first utterances (no-op when it is full): a decoder built
        on demand holds the GIL ~330 ms, which under load is 330 ms of every other player's
        recognition on this worker."""
        while True:
            with self._lock:
                if len(self._idle) >= max(1, self.pool_size):
                    return
            self._release(self._new())  # built outside the lock: streams may open meanwhile

    def open_stream(self, speaker: str = "") -> PocketsphinxStream:
        """Start an utterance on an idle pooled decoder (a new one only if none is idle);
        ``speaker``: what an earlier stream's speaker() said about this speaker."""
        with self._lock:
            decoder = self._idle.pop() if self._idle else None
        if decoder is None:
            decoder = self._new()
        return PocketsphinxStream(self, decoder, self.cmn, self.warmup_samples, speaker)

    def _release(self, decoder: Decoder) -> None:
        with self._lock:
            if len(self._idle) < self.pool_size:
                self._idle.append(decoder)
