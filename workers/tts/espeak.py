"""espeak-ng text-to-speech, in process, through ctypes.

Sans-I/O core: no sockets, no asyncio. It loads the ``libespeak-ng`` that the
``espeakng_loader`` wheel ships, so nothing has to be installed system-wide.

espeak-ng keeps all its state in process globals (one current voice, one
callback, one set of parameters), so every call into it holds ``_LOCK`` and the
library is initialised once per process. Synthesis runs in synchronous mode at
roughly 700x real time (about 1.5 ms per second of audio), so ``synthesize``
renders the whole text inside the call and the returned iterator only slices
the result into short chunks; callers should hand it whole sentences.

The same text and voice give the same samples on every call: the wave generator's carried
state is reset before each utterance (workers/tts/espeak_state.py).

The audio is exactly what espeak-ng produces, including the short pause it
appends after the last phoneme of a clause (typically 100-200 ms at 175 wpm);
nothing is trimmed, so mark positions and audio always agree.
"""

from __future__ import annotations

import ctypes
import difflib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from workers.tts.espeak_state import WavegenState

__all__ = ["EspeakSynth", "PhonemeMark", "SynthChunk", "WordMark"]

# espeak_AUDIO_OUTPUT / options / parameters / flags, from speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 0x02
_INITIALIZE_PHONEME_EVENTS = 0x0001
_INITIALIZE_DONT_EXIT = 0x8000  # otherwise espeak-ng calls exit() on a bad data path
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1
_PARAM_PITCH = 3

# espeak_EVENT_TYPE values.
_EV_LIST_TERMINATED = 0
_EV_WORD = 1
_EV_PHONEME = 7

_EE_OK = 0

RATE_RANGE = (80, 450)  # words per minute espeak-ng accepts without clamping
PITCH_RANGE = (0, 100)

# Chunks handed downstream are at most this long so STT-free stages (lipsync,
# the Live Link sender) can start on the first syllable.
CHUNK_MS = 50


@dataclass(frozen=True)
class PhonemeMark:
    """An espeak-ng phoneme mnemonic (e.g. ``"'oU"``, ``"_:"`` for a pause)."""

    phoneme: str
    sample: int  # start sample within this text's audio


@dataclass(frozen=True)
class WordMark:
    """A word of the input text; offsets are Python ``str`` indices (0-based)."""

    text_start: int
    text_length: int
    sample: int  # start sample within this text's audio


@dataclass
class SynthChunk:
    pcm: np.ndarray  # int16 mono at EspeakSynth.sample_rate
    sample: int  # position of pcm[0] within this text's audio
    phonemes: list[PhonemeMark] = field(default_factory=list)  # marks starting in this chunk
    words: list[WordMark] = field(default_factory=list)


class _EventId(ctypes.Union):
    _fields_ = [
        ("number", ctypes.c_int),
        ("name", ctypes.c_char_p),
        ("string", ctypes.c_char * 8),  # phoneme mnemonic for PHONEME events
    ]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based, in characters of the UTF-8 text
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms
        ("sample", ctypes.c_int),  # samples since the start of this espeak_Synth call
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


class _Voice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),  # (priority byte, NUL-terminated name)*, then 0
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)

class _Collector:
    def __init__(self) -> None:
        self.buffers: list[np.ndarray] = []
        self.phonemes: list[PhonemeMark] = []
        self.words: list[WordMark] = []


# Process-global espeak-ng state, guarded by _LOCK.
_LOCK = threading.Lock()
_lib: ctypes.CDLL | None = None
_wavegen: WavegenState | None = None
_sample_rate = 0
_data_path: str | None = None
_callback_ref = None  # keeps the ctypes thunk alive; espeak holds only a raw pointer
_sink: _Collector | None = None  # where the callback delivers the current synthesis
_voice_table: dict[str, str] = {}  # lower-cased voice/language/name -> espeak identifier
_variant_table: dict[str, str] = {}  # lower-cased variant -> variant file name
_voice_names: list[str] = []


def _on_synth(wav, numsamples, events) -> int:
    sink = _sink
    if sink is None:  # cannot happen while _LOCK is held by synthesize; be safe anyway
        return 1
    if numsamples > 0 and wav:
        sink.buffers.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
    i = 0
    while events[i].type != _EV_LIST_TERMINATED:
        ev = events[i]
        if ev.type == _EV_PHONEME:
            sink.phonemes.append(PhonemeMark(ev.id.string.decode("ascii", "replace"), ev.sample))
        elif ev.type == _EV_WORD:
            sink.words.append(WordMark(ev.text_position - 1, ev.length, ev.sample))
        i += 1
    return 0  # 0 = continue synthesis


def _init(data_path: str | None) -> None:
    """Load and initialise libespeak-ng once per process. Caller holds _LOCK."""
    global _lib, _sample_rate, _data_path, _callback_ref, _voice_table, _variant_table
    global _voice_names, _wavegen
    import espeakng_loader

    path = data_path if data_path is not None else espeakng_loader.get_data_path()
    if _lib is not None:
        if path != _data_path:
            raise RuntimeError(
                f"espeak-ng is already initialised with data path {_data_path!r}; "
                f"it is process-global and cannot switch to {path!r}"
            )
        return
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
    lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
        ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
    ]
    rate = lib.espeak_Initialize(
        _AUDIO_OUTPUT_SYNCHRONOUS, 0, path.encode(),
        _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_DONT_EXIT,
    )
    if rate <= 0:  # espeak-ng returns 0 or EE_INTERNAL_ERROR when data is missing
        raise RuntimeError(f"espeak_Initialize failed ({rate}) with data path {path!r}")
    _callback_ref = _SynthCallback(_on_synth)
    lib.espeak_SetSynthCallback(_callback_ref)
    # before any synthesis: the state every utterance starts from (reproducible audio)
    _wavegen = WavegenState(lib, espeakng_loader.get_library_path())
    _voice_table, _variant_table, _voice_names = _build_tables(lib)
    _lib, _sample_rate, _data_path = lib, rate, path


def _iter_voices(lib: ctypes.CDLL, variants: bool) -> Iterator[_Voice]:
    # ListVoices(NULL) leaves the "+variant" files out; this spec lists only them.
    lang = ctypes.create_string_buffer(b"variant")
    spec = _Voice(languages=ctypes.addressof(lang))
    voices = lib.espeak_ListVoices(ctypes.byref(spec) if variants else None)
    i = 0
    while voices[i]:
        yield voices[i].contents
        i += 1


def _languages(v: _Voice) -> Iterator[tuple[int, str]]:
    """(priority, language) pairs of a voice; lower priority numbers fit better."""
    addr = v.languages
    while addr:
        priority = ctypes.string_at(addr, 1)[0]
        if priority == 0:
            break
        lang = ctypes.string_at(addr + 1)
        yield priority, lang.decode()
        addr += 1 + len(lang) + 1


def _build_tables(lib: ctypes.CDLL) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """Map lower-cased voice names to espeak identifiers. Caller holds _LOCK.

    espeak_SetVoiceByName only finds voice files, names and identifiers; many
    languages a voice declares ("en-gb", "fr-fr") are not file names, so we resolve
    every language to the identifier of its best-priority voice ourselves.
    """
    table: dict[str, str] = {}
    best: dict[str, int] = {}
    public: set[str] = set()
    for v in _iter_voices(lib, variants=False):
        ident = v.identifier.decode()
        table[ident.lower()] = ident
        public.add(ident)
        if v.name:
            table.setdefault(v.name.decode().lower(), ident)
        for priority, lang in _languages(v):
            key = lang.lower()
            if priority < best.get(key, 1 << 30):
                best[key] = priority
                table[key] = ident
            public.add(lang)
    variants: dict[str, str] = {}
    for v in _iter_voices(lib, variants=True):
        fname = v.identifier.decode().split("/", 1)[-1]  # "!v/f3" -> "f3"
        variants[fname.lower()] = fname
    return table, variants, sorted(public)


class EspeakSynth:
    """espeak-ng synthesiser. Instances are cheap; they all share one engine."""

    name = "espeak"

    def __init__(self, data_path: str | None = None) -> None:
        with _LOCK:
            _init(data_path)
        self.sample_rate: int = _sample_rate  # 22050 for the bundled data

    def voices(self) -> list[str]:
        """Voices ``synthesize`` accepts: languages ("en-us", "en-gb") and identifiers
        ("gmw/en-US"). Matching is case-insensitive; a variant from ``variants()``
        may be appended ("en-us+f3")."""
        return list(_voice_names)

    def variants(self) -> list[str]:
        """Voice variants (timbres) usable as a "+name" suffix, e.g. "f3", "m1", "klatt"."""
        return sorted(_variant_table.values())

    @staticmethod
    def _resolve(voice: str) -> str:
        """User voice string -> argument for espeak_SetVoiceByName, or ValueError."""
        base, _, variant = voice.partition("+")
        ident = _voice_table.get(base.strip().lower())
        var = _variant_table.get(variant.strip().lower()) if variant else ""
        if ident is None or var is None:
            pool = list(_voice_names) if ident is None else list(_variant_table.values())
            wanted = base if ident is None else variant
            close = difflib.get_close_matches(wanted, pool, n=5, cutoff=0.5)
            hint = ", ".join(close or ["en-us", "en-gb", "de", "fr", "es"])
            raise ValueError(f"unknown espeak voice {voice!r}; valid ones include {hint}")
        return f"{ident}+{var}" if var else ident

    def synthesize(
        self, text: str, voice: str = "en-us", rate_wpm: int = 175, pitch: int = 50
    ) -> Iterator[SynthChunk]:
        """Render ``text`` and return its audio as chunks of at most ``CHUNK_MS``.

        The work happens in this call (so a bad voice raises ValueError here);
        iterating only slices. Empty or whitespace-only text gives no chunks.
        Marks are assigned to the chunk containing their sample; marks espeak
        reports at the very end of the audio (a zero-length final pause) are dropped.
        """
        if not RATE_RANGE[0] <= rate_wpm <= RATE_RANGE[1]:
            raise ValueError(f"rate_wpm {rate_wpm} outside {RATE_RANGE}")
        if not PITCH_RANGE[0] <= pitch <= PITCH_RANGE[1]:
            raise ValueError(f"pitch {pitch} outside {PITCH_RANGE}")
        espeak_voice = self._resolve(voice)
        if not text.strip():
            return iter(())
        pcm, phonemes, words = self._render(text, espeak_voice, rate_wpm, pitch)
        return self._chunks(pcm, phonemes, words)

    def _render(
        self, text: str, voice: str, rate_wpm: int, pitch: int
    ) -> tuple[np.ndarray, list[PhonemeMark], list[WordMark]]:
        global _sink
        data = text.encode("utf-8") + b"\0"
        with _LOCK:
            lib = _lib
            assert lib is not None
            if _wavegen is not None:
                _wavegen.reset()  # the same text and voice, the same samples
            # The voice must be set first: selecting a voice resets rate and pitch.
            if lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
                raise RuntimeError(f"espeak-ng could not load voice {voice!r}")
            lib.espeak_SetParameter(_PARAM_RATE, rate_wpm, 0)
            lib.espeak_SetParameter(_PARAM_PITCH, pitch, 0)
            sink = _Collector()
            _sink = sink
            try:
                err = lib.espeak_Synth(
                    data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
                )
            finally:
                _sink = None
        if err != _EE_OK:
            raise RuntimeError(f"espeak_Synth failed with error {err}")
        if sink.buffers:
            pcm = np.concatenate(sink.buffers).astype(np.int16, copy=False)
        else:
            pcm = np.zeros(0, np.int16)
        return pcm, sink.phonemes, sink.words

    def _chunks(
        self, pcm: np.ndarray, phonemes: list[PhonemeMark], words: list[WordMark]
    ) -> Iterator[SynthChunk]:
        step = max(1, self.sample_rate * CHUNK_MS // 1000)
        # Marks arrive in order per type; sort anyway since chunk assignment relies on it.
        phonemes = sorted(phonemes, key=lambda m: m.sample)
        words = sorted(words, key=lambda m: m.sample)
        p = w = 0
        for start in range(0, len(pcm), step):
            end = min(start + step, len(pcm))
            chunk = SynthChunk(pcm[start:end], start)
            while p < len(phonemes) and phonemes[p].sample < end:
                chunk.phonemes.append(phonemes[p])
                p += 1
            while w < len(words) and words[w].sample < end:
                chunk.words.append(words[w])
                w += 1
            yield chunk
