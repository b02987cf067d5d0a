"""The offline LLM backend: a scripted persona that answers with its best-matching line.

Matching is word overlap with crude stemming, weighted so longer phrases count more: the
offline recognizer's transcripts are noisy, so a keyword or two must be enough.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from core.personas import Persona

_WORD = re.compile(r"[a-z0-9']+")
_STOP = frozenset(["a", "an", "the", "is", "are", "am", "to", "of", "and", "or", "i", "you", "me",
                   "my", "your", "it", "do", "does", "what", "how"])


def _stem(word: str) -> str:
    for suffix in ("ing", "ers", "er", "es", "s", "ed"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def _terms(text: str) -> list[str]:
    return [_stem(w) for w in _WORD.findall(text.lower())]


class ScriptedPersonaBackend:
    """Picks the persona line whose match phrases best cover what the player said."""

    name = "scripted"

    def choose(self, persona: Persona, heard: str) -> str:
        words = set(_terms(heard))
        best, best_score = None, 0.0
        for line in persona.lines:
            score = 0.0
            for phrase in line.match:
                terms = _terms(phrase)
                hits = [t for t in terms if t in words]
                if terms and len(hits) == len(terms):
                    # a whole phrase heard; content words count more than function words
                    score += sum(0.3 if t in _STOP else 1.0 for t in terms)
            if score > best_score:
                best, best_score = line.reply, score
        return best if best is not None else persona.fallback

    async def stream_reply(self, persona: Persona, history: list[dict],
                           heard: str, prefix: str = "") -> AsyncIterator[str]:
        reply = self.choose(persona, heard)
        if prefix:
            # Continuing a reply cut off mid-way: the rest of our line when the reply so far is
            # its beginning, else our line as a sentence of its own after it.
            rest = reply[len(prefix):] if reply.startswith(prefix) else " " + reply
            for token in _tokens(rest):
                yield token
            return
        for token in _tokens(reply):
            yield token


def _tokens(text: str) -> list[str]:
    """Word-sized tokens with their leading space, as a streaming model hands them over."""
    tokens = [w if i == 0 else " " + w for i, w in enumerate(text.split(" "))]
    return tokens[1:] if tokens and not tokens[0] else tokens
