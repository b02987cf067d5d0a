"""Synthesize test speech with espeak-ng through ctypes (no TTS module dependency).

The STT tests need real speech without shipping audio files or depending on the TTS
worker, so this calls libespeak-ng directly. espeak-ng keeps all its state (callback,
voice) in process globals, and the TTS worker's own binding sets its callback once; if
both shared one library instance, whichever ran second would steal the other's audio.
So this loads a private copy of the library file, which the dynamic loader maps as a
separate instance with separate globals, initializes it once, and serializes calls.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
import threading

import espeakng_loader
import numpy as np

_AUDIO_OUTPUT_SYNCHRONOUS = 0x02
_ESPEAK_CHARS_UTF8 = 1
_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_rate = 0
_chunks: list[np.ndarray] = []


def _on_audio(wav, num_samples, _events):
    # wav is NULL on the final call; copy out because espeak reuses its buffer.
    if wav and num_samples > 0:
        _chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
    return 0  # 0 = keep synthesizing


# Module-level reference so the ctypes thunk is never garbage-collected while in use.
_callback = _CALLBACK(_on_audio)


def _init() -> ctypes.CDLL:
    global _lib, _rate
    if _lib is None:
        src = espeakng_loader.get_library_path()
        tmp = tempfile.mkdtemp(prefix="parley-espeak-")
        copy = shutil.copy(src, os.path.join(tmp, "stt-tests-" + os.path.basename(src)))
        try:
            lib = ctypes.CDLL(copy)
        finally:
            # Once mapped the file is no longer needed (POSIX keeps the mapping alive).
            shutil.rmtree(tmp, ignore_errors=True)
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [
            ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int
        ]
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0
        )
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({rate})")
        _lib, _rate = lib, rate
    return _lib


def synthesize(text: str, voice: str = "en-us") -> tuple[np.ndarray, int]:
    """Return (int16 mono samples, sample rate) for `text` spoken by espeak-ng."""
    with _lock:
        lib = _init()
        # Re-register each time in case other code in this process set its own callback.
        lib.espeak_SetSynthCallback(_callback)
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"espeak-ng voice {voice!r} not available")
        data = text.encode("utf-8")
        _chunks.clear()
        err = lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, _ESPEAK_CHARS_UTF8, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed ({err})")
        samples = np.concatenate(_chunks) if _chunks else np.zeros(0, np.int16)
        _chunks.clear()
        return samples.astype(np.int16, copy=False), _rate
