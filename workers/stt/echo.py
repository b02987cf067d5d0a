"""Echo gate: tells the NPC's own voice in the player's mic from the player (Sans-I/O).

Hands-free, the reply that UE plays comes back into the mic, attenuated, delayed by the output
buffer and the room (20-200 ms), and smeared by reverb. The server has that audio (the voice
stream) and UE's play clock (``ready`` per segment, stamped by the gateway with the time it came
in, as every mic chunk is), so it places the reply on the mic's own timeline, in 16 kHz
samples, and asks of every 20 ms mic frame: is there more energy here than the reply could
have put there?

Per frame and band (20 bands, 100 Hz-7.5 kHz) the echo is bounded by ``G_b`` times the loudest
reference frame within the delay window. The first ``learn_ms`` of audible mic signal while the
reply plays are taken as its echo and teach the gate the room: the delay is the lag, within
``min_delay_ms``..``max_delay_ms``, at which the reference's band-power pattern correlates best
with the mic's (normalized cross-correlation of log powers); the window becomes that lag plus
``tail_ms`` of reverb (the whole search range when no lag correlates by ``min_corr``), and
``G_b`` a high quantile of the mic/bound ratios. After that ``G_b`` follows the echo slowly
(up ``rise_db`` a frame, down ``decay_db_s``), never on frames judged to carry a voice. While
learning, audio that does not follow the reply, or is louder than the reply could come back
(``prior_db``), is a voice and learning starts over after it; a reply that sounds with nothing
audible in the mic means no echo; and a mic whose audio began or came back after the ready is
no open mic (a client that sends only while the player talks): nothing is gated then.

A frame carries a second voice when its energy above the noise floor exceeds ``margin_db`` over
the bound by ``snr_db`` over the floor and by ``voice_share`` of the frame, two frames running;
it and the ``hold_ms`` after it pass unchanged. Every other frame within the reply's reach is
echo and becomes comfort noise at the room's floor, band by band (measured only outside the
reply's reach), so whichever VAD follows sees a quiet room: zeros would drag an energy VAD's
floor down, and room noise would then start speech once the reply ends. Audio out of the
reply's reach passes bit for bit. The gate decides; it does not subtract (the recognizer still
gets the raw mic). Cost: two 320-point FFTs per 20 ms frame while a reply plays (three on a
frame it replaces), one otherwise.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import soxr

RATE = 16000
FRAME = 320  # 20 ms
_N_BANDS = 20
_LO_HZ, _HI_HZ = 100.0, 7500.0
_EPS = 1e-12


def _band_matrix() -> np.ndarray:
    """(bins, bands) 0/1 matrix: rfft bins of a 20 ms frame grouped into log-spaced bands."""
    freqs = np.fft.rfftfreq(FRAME, 1 / RATE)
    edges = np.geomspace(_LO_HZ, _HI_HZ, _N_BANDS + 1)
    m = np.zeros((len(freqs), _N_BANDS), np.float64)
    for b in range(_N_BANDS):
        m[(freqs >= edges[b]) & (freqs < edges[b + 1]), b] = 1.0
    for b in range(_N_BANDS):  # the lowest bands are narrower than a bin: give each the nearest
        if not m[:, b].any():
            m[np.argmin(np.abs(freqs - np.sqrt(edges[b] * edges[b + 1]))), b] = 1.0
    return m


_BANDS = _band_matrix()
_WINDOW = np.hanning(FRAME)
_WINDOW_POWER = float(np.sum(_WINDOW ** 2))
_BINS = float(_BANDS.sum())


def _bin_share() -> np.ndarray:
    """(bands, bins): how a band's power spreads over the rfft bins for comfort noise, each
    band evenly over its own bins; a bin in no band (below 100 Hz, above 7.5 kHz) takes its
    nearest band's, so the noise has no hole or shelf there."""
    share = (_BANDS / _BANDS.sum(axis=0)).T  # bin j of band b: 1/width(b)
    freqs = np.fft.rfftfreq(FRAME, 1 / RATE)
    edges = np.geomspace(_LO_HZ, _HI_HZ, _N_BANDS + 1)
    centers = np.sqrt(edges[:-1] * edges[1:])
    for j in np.flatnonzero(_BANDS.sum(axis=1) == 0):
        b = int(np.argmin(np.abs(np.log(max(freqs[j], 1.0) / centers))))
        share[b, j] = 1.0 / _BANDS[:, b].sum()
    per_bin = share.sum(axis=0)  # a bin in two narrow bands averages them
    return share / np.maximum(per_bin, 1.0)


_SHARE = _bin_share()


def band_power(frames: np.ndarray) -> np.ndarray:
    """(n, FRAME) samples -> (n, bands) power."""
    spec = np.fft.rfft(frames * _WINDOW, axis=-1)
    return (spec.real ** 2 + spec.imag ** 2) @ _BANDS


@dataclass
class EchoConfig:
    min_delay_ms: int = 0  # UE stamps ready as it starts playing: no echo before that
    max_delay_ms: int = 300  # output buffer + air; the search window's far end
    tail_ms: int = 100  # reverb beyond the direct path
    margin_db: float = 6.0  # a second voice must exceed the echo bound by this much
    snr_db: float = 6.0  # ... and be this far above the room's noise floor
    voice_share: float = 0.3  # ... and carry this share of the frame's energy above the floor
    prior_db: float = 0.0  # before the room is known, an echo is no louder than the reply
    learn_ms: int = 400  # the reply's first audible echo, taken as echo, to learn delay and gain
    learn_quantile: float = 0.9  # of the learned ratios: an odd reverb spike is not the gain
    min_corr: float = 0.4  # the learned audio must follow the reply this well to be its echo
    quiet_ms: int = 200  # reply this long beyond the delay window, nothing heard: no echo
    loud_db: float = -45.0  # a reference frame this loud (dBFS) would be heard if echoed
    probe_frames: int = 6  # after this much audible audio, ...
    no_echo_corr: float = 0.2  # ... one that follows the reply this poorly is a voice, and so is
    voice_ratio_db: float = -10.0  # one below min_corr this loud against the reply
    decay_db_s: float = 3.0  # how fast the learned echo gain forgets a loud moment
    rise_db: float = 0.5  # how fast, per frame, it follows a louder echo after learning
    hold_ms: int = 200  # a second voice's frames keep the gate open this long after
    noise_window_ms: int = 2000  # minimum statistics for the noise floor


@dataclass
class _Segment:
    ready_at: int | None = None  # mic position UE started it at (None: no ready yet)
    start: int | None = None  # placed: mic position of its first sample
    first: int | None = None  # its first sample in the turn's reply
    rate: int = 0
    length: int = 0  # reply samples so far
    chunks: list[tuple[int, np.ndarray]] = field(default_factory=list)  # before placement
    complete: bool = False  # a later segment (or the turn's end) has begun


class EchoGate:
    """One session's mic, 16 kHz mono float32, against the reply audio UE plays."""

    GAP_MS = 300

    def __init__(self, base: int = 0, cfg: EchoConfig | None = None,
                 open_since_ms: float | None = None):
        """``open_since_ms``: the arrival of the mic chunk just before ``base`` (the previous
        utterance's last), when this gate continues a mic that was sending: a reply that
        starts within a frame of the turn's end is then still a reply into an open mic."""
        self.cfg = cfg = cfg or EchoConfig()
        self._open_since = open_since_ms
        self.position = base  # mic samples pushed so far, on the listener's timeline
        self._frame_base = base
        self._buf = np.zeros(0, np.float32)  # the partial frame
        self._lo = cfg.min_delay_ms * RATE // 1000 // FRAME
        self._delay_hi = cfg.max_delay_ms * RATE // 1000 // FRAME
        self._tail = cfg.tail_ms * RATE // 1000 // FRAME
        self._hi = self._delay_hi + self._tail
        self._lags = range(self._lo, self._hi + 1)  # until the delay is known
        self.delay_ms: int | None = None
        self._history: list[tuple[int, np.ndarray]] = []
        self._voiced = 0
        self._quiet = 0  # learning: frames of loud reference with nothing audible in the mic
        self._quiet_gain = 0.0
        self._quiet_need = self._hi + cfg.quiet_ms * RATE // 1000 // FRAME
        self._loud = 10 ** (cfg.loud_db / 10) * _WINDOW_POWER * _BINS
        self._margin = 10 ** (cfg.margin_db / 10)
        self._snr = 10 ** (cfg.snr_db / 10)
        self._decay = 10 ** (-cfg.decay_db_s * FRAME / RATE / 10)
        self._rise = 10 ** (cfg.rise_db / 10)
        self._prior = 10 ** (cfg.prior_db / 10)
        self._learn = max(1, cfg.learn_ms * RATE // 1000 // FRAME)
        self._hold = cfg.hold_ms * RATE // 1000 // FRAME
        # reference audio on the mic timeline: samples [ref_start, ref_start + len(ref))
        self._ref = np.zeros(0, np.float32)
        self._ref_start = base
        self._ref_cache: dict[int, np.ndarray] = {}
        self._segments: dict[tuple[int, int], _Segment] = {}
        self._open_turns: set[int] = set()
        self._cut: set[int] = set()  # turns the player cut off: their audio no longer plays
        self._pending: list[tuple[tuple[int, int], float]] = []  # readies anchored by time
        self._offsets: deque[float] = deque(maxlen=50)  # see _clock
        self._resumed_ts: float | None = None  # when the mic's audio began, or came back
        self._ready_ts: float | None = None  # when UE said ready for the reply, first
        self._gain = np.zeros(_N_BANDS)
        self._learned = 0
        self._held = 0
        self._noise_mins: deque[np.ndarray] = deque(maxlen=8)
        self._noise_sub: np.ndarray | None = None
        self._noise_n = 0
        self._noise_sub_frames = max(1, cfg.noise_window_ms * RATE // 1000 // FRAME // 8)
        self._smooth: np.ndarray | None = None
        self._shape = np.zeros(FRAME // 2 + 1)  # comfort noise's amplitude per rfft bin
        self._echo = False  # the last frame's verdict, for the partial frame that follows
        self._rng = np.random.default_rng(0)
        self._frames = 0  # whole frames judged since the gate began
        self.echo_frames = 0
        self.voice_frames = 0  # frames in reach of the reference that carried a second voice

    # ------------------------------------------------------------------ the play clock

    def played(self, turn: int, segment: int, at: int | None = None,
               ts_ms: float | None = None) -> None:
        """UE started (turn, segment): at mic position ``at``, or at wall time ``ts_ms``, which
        the next mic push (stamped with its arrival time) turns into a position."""
        if turn in self._cut:
            return
        self._open_turns.add(turn)  # its audio is wanted now, before the ready is placed
        if at is not None:
            self._segment(turn, segment).ready_at = at
            self._place(turn)
        else:
            self._pending.append(((turn, segment), ts_ms or 0.0))
            self._ready_ts = min(self._ready_ts or ts_ms or 0.0, ts_ms or 0.0)

    def reference(self, turn: int, segment: int, sample: int, pcm: np.ndarray,
                  rate: int) -> None:
        """Reply audio (int16 or float) of ``segment`` at ``sample`` of the turn's reply."""
        if turn in self._cut:
            return
        x = np.asarray(pcm)
        x = (x.astype(np.float32) / 32768.0) if x.dtype.kind == "i" else x.astype(np.float32)
        for (t, s), seg in self._segments.items():  # segments play in order, one after another
            if t == turn and s < segment:
                seg.complete = True
        seg = self._segment(turn, segment)
        seg.rate = rate
        seg.first = sample if seg.first is None else min(seg.first, sample)
        seg.length = max(seg.length, sample + len(x) - seg.first)
        seg.chunks.append((sample, x))
        self._place(turn)

    def turn_end(self, turn: int) -> None:
        """All of ``turn``'s reply audio has been given."""
        self._open_turns.discard(turn)
        for (t, _), seg in self._segments.items():
            if t == turn:
                seg.complete = True
        self._place(turn)

    @property
    def playing_turns(self) -> list[int]:
        """Turns UE started whose reply audio has not all been given yet."""
        return sorted(self._open_turns)

    @property
    def in_reach(self) -> bool:
        """Could the mic be hearing a reply now?"""
        return self._in_reach(self._frames)

    def describe(self) -> dict:
        """For the log line of an utterance that starts while a reply is in reach."""
        return {"echo_delay_ms": self.delay_ms, "echo_learned": self._learned,
                "echo_frames": self.echo_frames, "voice_frames": self.voice_frames,
                "echo_turns": sorted({t for t, _ in self._segments}),
                "echo_placed": [(k[1], s.start) for k, s in sorted(self._segments.items())],
                "echo_ref": (self._ref_start, len(self._ref)), "echo_at": self.position}

    def cut(self) -> None:
        """The player barged in: UE stops the reply now; no more of it will sound."""
        keep = max(0, self.position - self._ref_start)
        self._ref = self._ref[:keep]
        for key in list(self._segments):
            self._cut.add(key[0])
        self._open_turns.clear()
        self._ref_cache.clear()

    def _segment(self, turn: int, segment: int) -> _Segment:
        return self._segments.setdefault((turn, segment), _Segment())

    def _place(self, turn: int) -> None:
        """Segments play back to back from their ready on: place each one whose ready and first
        audio are known, once the one before it is complete."""
        prev_end: int | None = None
        for key in sorted(k for k in self._segments if k[0] == turn):
            seg = self._segments[key]
            if seg.start is None:
                if seg.ready_at is None or seg.first is None:
                    return
                seg.start = seg.ready_at if prev_end is None else max(seg.ready_at, prev_end)
            for sample, x in seg.chunks:
                self._write(seg.start + round((sample - seg.first) * RATE / seg.rate), x, seg.rate)
            seg.chunks.clear()
            if not seg.complete:
                return
            prev_end = seg.start + round(seg.length * RATE / seg.rate)

    def _write(self, at: int, x: np.ndarray, rate: int) -> None:
        y = soxr.resample(x, rate, RATE) if rate != RATE else x
        end = at + len(y)
        if end <= self._ref_start:
            return
        if not len(self._ref):
            self._ref_start = at
        if at < self._ref_start:
            y, at = y[self._ref_start - at:], self._ref_start
        need = end - self._ref_start
        if need > len(self._ref):
            self._ref = np.concatenate([self._ref, np.zeros(need - len(self._ref), np.float32)])
        self._ref[at - self._ref_start:end - self._ref_start] += y
        lo, hi = (at - self._frame_base) // FRAME, (end - self._frame_base) // FRAME + 1
        for f in range(lo, hi + 1):
            self._ref_cache.pop(f, None)

    # ------------------------------------------------------------------ the mic

    def push(self, samples: np.ndarray, ts_ms: float | None = None) -> np.ndarray:
        """Mic samples in (stamped with their arrival time, for readies given by time); the same
        number out, echo frames replaced by comfort noise."""
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        end = self.position + len(x)
        if ts_ms is not None:
            self._clock(ts_ms, end)
        if self._pending:
            # a ready is placed by the mic audio that arrived after it (see _clock)
            later = [p for p in self._pending if ts_ms is not None and p[1] > ts_ms]
            for (turn, segment), ready_ms in self._pending:
                if (turn, segment) not in {k for k, _ in later}:
                    at = end if ts_ms is None else round((ready_ms - min(self._offsets))
                                                         * RATE / 1000)
                    self.played(turn, segment, at=at)
            self._pending = later
        self.position = end
        held = len(self._buf)
        buf = np.concatenate([self._buf, x]) if held else x
        n = len(buf) // FRAME
        self._buf = buf[n * FRAME:].copy()
        echo = np.zeros(n, bool)
        if n:
            power = band_power(buf[:n * FRAME].reshape(n, FRAME).astype(np.float64))
            for i in range(n):
                echo[i] = self._judge(power[i])
                self._frames += 1
            self._prune()
        tail_echo = bool(echo[-1]) if n else self._echo
        if not echo.any() and not (tail_echo and len(self._buf)):
            self._echo = tail_echo
            return x
        out = buf.copy()
        for i in np.flatnonzero(echo):
            out[i * FRAME:(i + 1) * FRAME] = self._noise(FRAME)
        if tail_echo and len(self._buf):  # the partial frame follows the last verdict
            out[n * FRAME:] = self._noise(len(self._buf))
        self._echo = tail_echo
        return out[held:]

    def _clock(self, ts_ms: float, end: int) -> None:
        """The mic's capture clock against the arrival clock: arrival minus audio time, at its
        smallest over the last second of chunks (the least delayed ones; a chunk held up in
        the network or in a busy client arrives late, and is not when it was captured). A
        jump by more than ``GAP_MS`` is a gap in the mic (the client stopped sending): the
        clock starts anew there."""
        offset = ts_ms - end * 1000 / RATE
        if not self._offsets or offset - min(self._offsets) > self.GAP_MS:
            self._offsets.clear()
            since, self._open_since = self._open_since, None
            # the first chunk continues the previous job's mic unless it came after a gap
            self._resumed_ts = (since if since is not None and ts_ms - since <= self.GAP_MS
                                else ts_ms)
        self._offsets.append(offset)

    def _noise(self, n: int) -> np.ndarray:
        """Comfort noise with the room's own spectrum (its floor per band): white noise at
        the room's level is a hiss the room does not have, and a VAD heard it start with the
        reply (an 8 kHz mic has nothing above 4 kHz) as the player speaking over it."""
        out = []
        for _ in range(-(-n // FRAME)):
            spec = np.fft.rfft(self._rng.standard_normal(FRAME)) * self._shape
            out.append(np.fft.irfft(spec, FRAME))
        return np.concatenate(out)[:n].astype(np.float32)

    def _ref_power(self, f: int) -> np.ndarray:
        p = self._ref_cache.get(f)
        if p is None:  # the frames from f on in one go: one FFT call, not one per frame
            n = 50
            a = self._frame_base + f * FRAME - self._ref_start
            seg = np.zeros(n * FRAME, np.float64)
            lo, hi = max(0, a), min(len(self._ref), a + n * FRAME)
            if hi > lo:
                seg[lo - a:hi - a] = self._ref[lo:hi]
            for i, row in enumerate(band_power(seg.reshape(n, FRAME))):
                self._ref_cache.setdefault(f + i, row)
            p = self._ref_cache[f]
        return p

    def _track_noise(self, m: np.ndarray, update: bool) -> np.ndarray:
        """Minimum statistics of the room, from frames the reply cannot reach: during a reply
        without pauses the minimum would be the echo's, and so would the comfort noise."""
        if not update and (self._noise_mins or self._noise_sub is not None):
            floor = self._noise_sub if self._noise_sub is not None else self._noise_mins[-1]
            for old in self._noise_mins:
                floor = np.minimum(floor, old)
            return floor
        s = m if self._smooth is None else self._smooth + 0.3 * (m - self._smooth)
        self._smooth = s
        self._noise_sub = s.copy() if self._noise_sub is None else np.minimum(self._noise_sub, s)
        floor = self._noise_sub
        for old in self._noise_mins:
            floor = np.minimum(floor, old)
        self._noise_n += 1
        if self._noise_n >= self._noise_sub_frames:
            self._noise_mins.append(self._noise_sub)
            self._noise_sub, self._noise_n = None, 0
        return floor

    def _judge(self, m: np.ndarray) -> bool:
        """One mic frame's band power: True when it is echo only."""
        f = self._frames
        reach = self._in_reach(f)
        noise = self._track_noise(m, update=not reach)
        if not reach:
            return False
        signal = np.maximum(m - noise, 0.0)
        audible = signal.sum() > self._snr * noise.sum()
        if self._learned < self._learn:
            return self._learning(f, signal, noise, audible)
        bound = self._bound(f, self._lags)
        if bound.sum() < 1e-9:  # digital silence in the reply: nothing to hear
            return False
        excess = np.maximum(signal - self._margin * self._gain * bound, 0.0).sum()
        if self._is_voice(excess if audible else 0.0, signal, noise):
            self._held = self._hold
            self.voice_frames += 1
            return False
        if not self._voiced:
            # slow to rise: a second voice that swells from a whisper must not teach the gain
            ratio = signal / (bound + _EPS)
            self._gain = np.clip(ratio, self._gain * self._decay, self._gain * self._rise)
        if self._held:
            self._held -= 1
            return False
        return self._verdict(noise)

    def _bound(self, f: int, lags: range) -> np.ndarray:
        """Per band, the loudest reference frame the mic frame ``f`` can hear over ``lags``."""
        return np.max([self._ref_power(f - lag) for lag in lags], axis=0)

    def _learning(self, f: int, signal: np.ndarray, noise: np.ndarray, audible: bool) -> bool:
        """Before the room is known. The reply's first audible stretch is taken as its echo
        and teaches delay and gain, as long as it looks like the echo: audio that does not
        follow the reply at any lag (a headset: no echo at all, and the player speaks) is a
        voice, and learning starts again after it."""
        if self._held:
            self._held -= 1
            return False
        if (self._resumed_ts is not None and self._ready_ts is not None
                and self._resumed_ts >= self._ready_ts):
            # the mic was off when UE began the reply (its first audio, or its first after a
            # gap, came in after the ready): a client that sends only while the player talks,
            # not an open mic; what it sends now is the player
            return False
        if not audible:
            bound = self._bound(f, self._lags)
            if bound.sum() > self._loud:
                # the reply sounds and the mic stays quiet: any echo is below what is audible
                self._quiet += 1
                # broadband: per band, a band the reply barely used would allow any gain
                self._quiet_gain = max(self._quiet_gain,
                                       self._snr * noise.sum() / (bound.sum() + _EPS))
                if self._quiet >= self._quiet_need and not self._learned:
                    self._learned = self._learn  # a headset, or speakers far away
                    self._gain = np.full(_N_BANDS, self._quiet_gain)
            return self._verdict(noise)
        self._quiet = 0
        self._quiet_gain = 0.0
        # louder than the reply itself could come back (by margin_db, in its share of the
        # frame) at every delay the echo could have: the player, talking before the room is
        # known
        excess = min(np.maximum(signal - self._margin * self._prior
                                * self._bound(f, range(lag, lag + self._tail + 1)), 0.0).sum()
                     for lag in range(self._lo, self._delay_hi + 1))
        if self._is_voice(excess, signal, noise):
            return self._not_echo()
        self._history.append((f, signal))
        self._learned += 1
        probe = self._learned - self.cfg.probe_frames
        if probe >= 0 and (probe % 4 == 0 or self._learned == self._learn):
            lag, corr = self._best_lag()
            if corr < self.cfg.min_corr and (corr < self.cfg.no_echo_corr or self._loud_voice()):
                return self._not_echo()
            if self._learned == self._learn:
                self._calibrate(lag if corr >= self.cfg.min_corr else None)
        return self._verdict(noise)

    def _is_voice(self, excess: float, signal: np.ndarray, noise: np.ndarray) -> bool:
        """Energy beyond the echo bound, enough over the floor and of the frame, two frames
        running (one odd frame is not a voice)."""
        if (excess > self._snr * noise.sum() and excess > self.cfg.voice_share * signal.sum()):
            self._voiced += 1
            return self._voiced >= 2
        self._voiced = 0
        return False

    def _not_echo(self) -> bool:
        """What learning took for echo was a voice: let it through, learn again after it."""
        self._history.clear()
        self._learned = 0
        self._held = self._hold
        self.voice_frames += 1
        return False

    def _loud_voice(self) -> bool:
        """Louder than a reply that comes back through the room can be (speakers are heard
        well below the reply's own level; a player speaks into the mic)."""
        ratios = [sig.sum() / (self._bound(f, self._lags).sum() + _EPS) for f, sig in self._history]
        return float(np.median(ratios)) > 10 ** (self.cfg.voice_ratio_db / 10)

    def _best_lag(self) -> tuple[int, float]:
        """The lag at which the reference's band-power pattern best matches the mic's over the
        frames learned so far (normalized cross-correlation of log powers), and that match."""
        frames = list(self._history)
        mic = np.log(np.array([sig for _, sig in frames]) + 1e-10).ravel()
        best, best_corr = self._lo, -1.0
        if mic.std() == 0:
            return best, best_corr
        for lag in range(self._lo, self._delay_hi + 1):
            lags = range(lag, lag + self._tail // 2 + 1)  # the early reverb with it
            ref = np.array([self._bound(f, lags) for f, _ in frames])
            ref = np.log(ref + 1e-9 * (ref.max() + _EPS)).ravel()
            if ref.std() == 0:
                continue
            corr = float(np.corrcoef(mic, ref)[0, 1])
            if corr > best_corr:
                best, best_corr = lag, corr
        return best, best_corr

    def _calibrate(self, lag: int | None) -> None:
        """The delay window from the best lag (None: too faint to tell; the whole window);
        the gain per band, a high quantile of the learned frames' mic/bound ratios."""
        frames = list(self._history)
        self._history.clear()
        if lag is not None:
            self.delay_ms = lag * FRAME * 1000 // RATE
            self._lags = range(max(self._lo, lag - 1), lag + self._tail + 1)
        ratios = np.array([sig / (self._bound(f, self._lags) + _EPS) for f, sig in frames])
        self._gain = np.quantile(ratios, self.cfg.learn_quantile, axis=0)

    def _in_reach(self, f: int) -> bool:
        """Can frame ``f`` hold echo of the reference placed so far?"""
        if not len(self._ref):
            return False
        start = self._frame_base + f * FRAME
        return (start - self._hi * FRAME < self._ref_start + len(self._ref)
                and start + FRAME - self._lo * FRAME > self._ref_start)

    def _verdict(self, noise: np.ndarray) -> bool:
        # comfort noise at the floor: noise of variance v per bin shows v * sum(hann^2)
        self._shape = np.sqrt(noise @ _SHARE / _WINDOW_POWER)
        self.echo_frames += 1
        return True

    def _prune(self) -> None:
        keep = self._frames - self._hi - 2
        for f in [f for f in self._ref_cache if f < keep]:
            del self._ref_cache[f]
        cut = self._frame_base + keep * FRAME - self._ref_start
        if cut > 48000:  # keep the buffer short without copying it every frame
            self._ref = self._ref[cut:]
            self._ref_start += cut
