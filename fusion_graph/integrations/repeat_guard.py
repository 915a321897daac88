"""Ending a reply that starts to loop: small models repeat a sentence until ``max_tokens``.

:class:`RepeatGuard` reads a reply as it is generated. When a complete sentence of at least
:data:`MIN_WORDS` words comes round again (compared without case, punctuation or spacing),
the reply ends before that repeat. Text is released as it arrives, except a sentence that
so far reads like the start of an earlier one: it is held back until it either turns out to
be new (then it is released) or completes the repeat (then it is dropped), so even a stream
never shows the repeated sentence. The embedded model's decoders use it alongside
llama.cpp's repetition penalty, which discourages loops without sentence boundaries.
"""

from __future__ import annotations

import re

__all__ = ["MIN_WORDS", "RepeatGuard", "repeated_sentences"]

MIN_WORDS = 3
"""Sentences shorter than this may repeat ("Yes." twice is not a loop)."""

_SENTENCE_END = re.compile(r"[.!?](?=\s)|\n")
_NOT_WORD = re.compile(r"[^\w\s]+")
_SPACE = re.compile(r"\s+")


def _normal(sentence: str) -> str:
    return _SPACE.sub(" ", _NOT_WORD.sub(" ", sentence.lower())).strip()


class RepeatGuard:
    """Feed a reply's pieces in order; :meth:`feed` returns the text that may be shown now and
    :attr:`stopped` turns True once the reply should end. :meth:`finish` returns the text
    still held back when the reply ends for another reason. An inactive guard passes every
    piece through and never stops (for text that repeats on purpose)."""

    def __init__(self, *, active: bool = True) -> None:
        self.active = active
        self.text = ""
        self.stopped = False
        self._released = 0
        self._sentence_start = 0
        self._seen: set[str] = set()

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        if not self.active:
            return self._release(len(self.text))
        for end in _SENTENCE_END.finditer(self.text, self._sentence_start):
            stop = end.end()
            sentence = _normal(self.text[self._sentence_start : stop])
            if len(sentence.split()) >= MIN_WORDS and sentence in self._seen:
                self.text = self.text[: self._sentence_start].rstrip()
                self.stopped = True
                return self._release(len(self.text))
            if sentence:
                self._seen.add(sentence)
            self._sentence_start = stop
        pending = _normal(self.text[self._sentence_start :])
        if pending and any(seen.startswith(pending) for seen in self._seen):
            return self._release(self._sentence_start)
        return self._release(len(self.text))

    def finish(self) -> str:
        """The text held back (a reply that ended mid-way through a possible repeat)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        upto = max(upto, self._released)
        out = self.text[self._released : upto]
        self._released = upto
        return out


def repeated_sentences(text: str) -> dict[str, int]:
    """Sentences of at least :data:`MIN_WORDS` words that occur more than once in ``text``,
    normalised as the guard compares them, with their counts."""
    counts: dict[str, int] = {}
    start = 0
    for end in [*(m.end() for m in _SENTENCE_END.finditer(text)), len(text)]:
        sentence = _normal(text[start:end])
        start = end
        if len(sentence.split()) >= MIN_WORDS:
            counts[sentence] = counts.get(sentence, 0) + 1
    return {s: c for s, c in counts.items() if c > 1}
