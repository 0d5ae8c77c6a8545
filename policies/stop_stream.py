"""Streaming text with stop strings: never emit text that a stop string may still swallow.

A streamed completion arrives in pieces. If ``"# Query:"`` is a stop string and a piece ends in
``"# Qu"``, those characters may be the start of the stop string, so they are held back until
the next piece decides. Emitted text is therefore always a prefix of the final, cut completion.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringStream:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add generated text; return what is now safe to emit ('' once a stop string was seen)."""
        if self.stopped:
            return ""
        self._pending += piece
        cut = _first_stop(self._pending, self.stops)
        if cut is not None:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        keep = _longest_stop_prefix_suffix(self._pending, self.stops)
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(out) :]
        return out

    def flush(self) -> str:
        """The generation ended: text held back as a possible stop-string start is real text."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _longest_stop_prefix_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
