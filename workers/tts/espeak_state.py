"""Makes espeak-ng's audio a function of its input: the same text and voice, the same samples.

espeak-ng's wave generator carries state from one utterance into the next in file-level and
function-level statics (wavegen.c: the pitch flutter index, the automatic gain control, the
wave phase, the echo buffer, the breath resonators) and the random state of its breath noise.
So the same sentence comes out a few samples longer or shorter and with other samples on every
call (measured: "Hello there." gave 15755, 15753, 15751 samples on three calls), and a replay
of a conversation (parley/replay.py) could not reproduce a reply's PCM.

None of these statics is exported, but the library that the ``espeakng_loader`` wheel ships is
not stripped: its ELF symbol table names them. :class:`WavegenState` finds them there, copies
their bytes once after initialisation, before any synthesis, and writes them back before each
utterance (with the random seed reset through the public ``espeak_ng_SetRandSeed``). Where the
symbols cannot be found (a stripped build) or do not match the loaded library, it does
nothing and says so: the audio is then right, only not reproducible across calls.
"""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

# wavegen.c statics that carry over between utterances (function statics have a ".N" suffix)
CARRIED = frozenset({"Flutter_ix", "agc", "amplitude2", "cycle_count", "h_switch_sign",
                     "glotlast", "echo_buf", "echo_head", "echo_tail", "echo_complete",
                     "wavephase", "hswitch", "rbreath", "end_wave", "wdata"})
_SHT_SYMTAB = 2
_STT_OBJECT = 1
_STT_FUNC = 2


def _symbols(path: str) -> dict[str, list[tuple[int, int, int]]]:
    """ELF64 little-endian symbol table: name -> [(address, size, type)]."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    out: dict[str, list[tuple[int, int, int]]] = {}
    for _name, kind, _f, _a, off, size, link, _i, _al, entsize in sections:
        if kind != _SHT_SYMTAB or not entsize:
            continue
        stroff = sections[link][4]
        for j in range(size // entsize):
            st_name, info, _other, _shndx, value, st_size = struct.unpack_from(
                "<IBBHQQ", data, off + j * entsize)
            end = data.index(b"\0", stroff + st_name)
            name = data[stroff + st_name:end].decode(errors="replace")
            out.setdefault(name.split(".")[0], []).append((value, st_size, info & 0xF))
    return out


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


class WavegenState:
    """The wave generator's carried state, as it was right after initialisation."""

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self.lib = lib
        self.saved: list[tuple[int, bytes]] = []
        self.why_not = ""
        try:
            self._find(path)
        except (OSError, ValueError, struct.error, IndexError) as exc:
            self.saved, self.why_not = [], f"cannot read {path}: {exc}"

    def _find(self, path: str) -> None:
        symbols = _symbols(path)
        info = _DlInfo()
        synth = ctypes.cast(self.lib.espeak_Synth, ctypes.c_void_p).value
        if not ctypes.CDLL(None).dladdr(ctypes.c_void_p(synth), ctypes.byref(info)):
            self.why_not = "dladdr failed"
            return
        base = info.dli_fbase or 0
        # the table must describe the library that is loaded, or we would write elsewhere
        if not any(base + v == synth for v, _, t in symbols.get("espeak_Synth", [])
                   if t == _STT_FUNC):
            self.why_not = "its symbol table does not match the loaded library (stripped?)"
            return
        found = [(name, sym) for name in sorted(CARRIED) for sym in symbols.get(name, [])
                 if sym[2] == _STT_OBJECT and sym[1] > 0]
        names = {name for name, _ in found}
        if "Flutter_ix" not in names:
            self.why_not = "wavegen statics not in its symbol table (stripped?)"
            return
        for _name, (value, size, _) in found:
            self.saved.append((base + value, ctypes.string_at(base + value, size)))
        missing = CARRIED - names  # renamed in another release: reset what we can
        if missing:
            self.why_not = f"not found: {', '.join(sorted(missing))}"
        if hasattr(self.lib, "espeak_ng_SetRandSeed"):
            self.lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]

    @property
    def active(self) -> bool:
        return bool(self.saved)

    def reset(self) -> None:
        """Before an utterance (caller holds espeak's lock)."""
        for addr, data in self.saved:
            ctypes.memmove(addr, data, len(data))
        if self.saved and hasattr(self.lib, "espeak_ng_SetRandSeed"):
            self.lib.espeak_ng_SetRandSeed(1)
