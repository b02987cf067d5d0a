"""Cuts a streamed reply into speakable fragments (Sans-I/O).

The first fragment is cut early, at the first clause boundary after a few words, because TTS
cannot start before it and the player is waiting; later fragments are whole sentences, which
sound more natural. A boundary only counts once the character after the punctuation has arrived
(whitespace), so "3.5" and "Dr. Smith" are never split.
"""

from __future__ import annotations

import re

ABBREVIATIONS = frozenset(
    ["mr", "mrs", "ms", "dr", "st", "sr", "jr", "prof", "mt", "ft", "vs", "etc", "e.g", "i.e",
     "no", "vol", "approx", "capt", "col", "gen", "lt", "sgt"]
)
SENTENCE_END = ".!?…"
CLAUSE_END = ",;:—"
_WORD_BEFORE = re.compile(r"([\w.]+)[.]$")


class Fragmenter:
    def __init__(self, first_min_words: int = 3, max_chars: int = 240):
        self.first_min_words = first_min_words
        self.max_chars = max_chars
        self.buffer = ""
        self.emitted = 0

    def push(self, token: str) -> list[str]:
        """Add streamed text; return the fragments that are now complete."""
        self.buffer += token
        out: list[str] = []
        while True:
            cut = self._find_cut()
            if cut is None:
                break
            frag, self.buffer = self.buffer[:cut].strip(), self.buffer[cut:].lstrip()
            if frag:
                out.append(frag)
                self.emitted += 1
        return out

    def flush(self) -> list[str]:
        frag, self.buffer = self.buffer.strip(), ""
        if frag:
            self.emitted += 1
            return [frag]
        return []

    def _find_cut(self) -> int | None:
        text = self.buffer
        first = self.emitted == 0
        for i, ch in enumerate(text[:-1]):
            if not text[i + 1].isspace():
                continue
            if ch in SENTENCE_END:
                if ch == "." and self._is_abbreviation(text[: i + 1]):
                    continue
                return i + 1
            elif first and ch in CLAUSE_END and len(text[:i].split()) >= self.first_min_words:
                return i + 1
        if len(text) > self.max_chars:  # a run-on with no punctuation: cut at the last space
            space = text.rfind(" ", 0, self.max_chars)
            return space if space > 0 else self.max_chars
        return None

    @staticmethod
    def _is_abbreviation(text: str) -> bool:
        m = _WORD_BEFORE.search(text)
        if not m:
            return False
        word = m.group(1).lower()
        # single letters ("J. R. R.") and known abbreviations; digits before "." are decimals or
        # ordinals only when a digit follows, which the whitespace rule already handles
        return word in ABBREVIATIONS or (len(word) == 1 and word.isalpha())
