"""Incremental detokenisation: UTF-8-safe text deltas, stop strings cut from the output."""

from __future__ import annotations

from typing import Any

PROMPT_CONTEXT_TOKENS = 5  # prompt tail decoded with the output so leading spaces come out right


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; return the text that is now safe to emit. Sets `stopped` on a stop string."""
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        self._advance(final=False)
        end = len(self.text) if self.stopped else len(self.text) - self.holdback
        return self._emit(end)

    def flush(self) -> str:
        """At finish: decode what waited for more bytes (an unfinished character becomes U+FFFD, as in a full
        decode) and release the text held back for a possible stop string."""
        if not self.stopped and self.read_offset < len(self.ids):
            self._advance(final=True)
        return self._emit(len(self.text))

    def _advance(self, final: bool) -> None:
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            searched_from = max(0, len(self.text) - self.holdback)
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            hits = [i for i in (self.text.find(s, searched_from) for s in self.stop) if i != -1]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
