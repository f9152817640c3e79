"""Incremental detokenisation with stop strings.

Text is re-decoded from the generated ids (cheap at these lengths and always right
for multi-token characters); a trailing U+FFFD (an incomplete UTF-8 sequence) and
the last len(longest stop) - 1 characters are held back, so a stream never shows a
half character or the start of a stop string that later completes.
"""

from __future__ import annotations

from collections.abc import Callable


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]) -> None:
        self._decode = decode
        self._stop = list(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""  # text released so far
        self.stopped = False

    def push(self, token_ids: list[int], final: bool) -> str:
        """Add tokens; return the newly released text. ``final`` releases everything held back."""
        self.token_ids.extend(token_ids)
        full = self._decode(self.token_ids)
        for s in self._stop:
            at = full.find(s, max(0, len(self.text) - len(s)))
            if at != -1:
                full = full[:at]
                self.stopped = True
                final = True
        if not final:
            while full.endswith("\ufffd"):
                full = full[:-1]
            if self._hold:
                full = full[: max(len(self.text), len(full) - self._hold)]
        delta = full[len(self.text) :] if full.startswith(self.text) else full[len(self.text) :]
        self.text = full if len(full) >= len(self.text) else self.text
        return delta
