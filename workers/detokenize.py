"""Token ids to text as they are generated: incremental decoding, stop strings on generated text
only, and each token's string and raw bytes (for OpenAI ``logprobs``)."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

from policies.stop_stream import StopStringStream

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing id list piece by piece; a piece is held back while it ends in an
    incomplete UTF-8 sequence (decoded as U+FFFD), so the pieces join to ``decode(all ids)``."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] is context already emitted, decoded again for spacing
        self._read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """What the held-back ids decode to at the end (a lone partial character stays U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=True)
        self._prefix = self._read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""


class TextAssembler:
    """Generated ids -> the text a client sees: incremental decoding, then stop strings (matched on
    generated text only, never across the prompt boundary), then an optional ``finalize`` (e.g.
    URIAL's cut at a partial ``# Query:`` line). ``finalize(text)`` must be a prefix of ``text``
    and of ``finalize(text + more)``; only text that stays in the final result is emitted, so the
    streamed pieces join to exactly the non-streamed text."""

    def __init__(self, tokenizer: Any, stops: list[str], finalize: Callable[[str], str] | None = None) -> None:
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopStringStream(stops)
        self._finalize = finalize
        self._raw = ""  # text past the stop-string gate
        self.emitted = ""

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    def push(self, token_id: int) -> str:
        self._raw += self._stops.push(self._detok.push(token_id))
        return self._emit(self._finalize(self._raw) if self._finalize else self._raw)

    def finish(self) -> str:
        if not self._stops.stopped:
            self._raw += self._stops.push(self._detok.flush())
            self._raw += self._stops.flush()
        return self._emit(self._finalize(self._raw) if self._finalize else self._raw)

    def _emit(self, safe: str) -> str:
        if len(safe) <= len(self.emitted) or not safe.startswith(self.emitted):
            return ""
        piece, self.emitted = safe[len(self.emitted) :], safe
        return piece


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def token_bytes(tokenizer: Any, token_id: int) -> list[int]:
    """The raw bytes one token stands for (a byte-level BPE token may be part of a character)."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if piece is None:
        return []
    if token_id in tokenizer.all_special_ids:
        return list(piece.encode("utf-8"))
    decoder = _byte_decoder()
    if piece and all(ch in decoder for ch in piece):
        return [decoder[ch] for ch in piece]
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # SentencePiece byte fallback
        return [int(piece[3:5], 16)]
    return list(piece.replace("\u2581", " ").encode("utf-8"))


def token_text(tokenizer: Any, token_id: int) -> str:
    """A token's text as clients see it in logprobs (bytes that are not whole characters decode to U+FFFD)."""
    return bytes(token_bytes(tokenizer, token_id)).decode("utf-8", errors="replace")
