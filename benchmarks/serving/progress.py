"""A progress bar on stderr: tqdm when it is installed, else a plain one-line bar."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.total, self.desc, self.enabled, self.n = max(total, 1), desc, enabled, 0
        self._bar: Any = None
        self._t0 = time.monotonic()
        self._last_draw = 0.0
        if not enabled:
            return
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True, leave=True)
        except ImportError:
            self._draw(force=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
        else:
            self._draw()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < 0.2 and self.n < self.total:
            return
        self._last_draw = now
        frac = min(1.0, self.n / self.total)
        filled = int(30 * frac)
        sys.stderr.write(f"\r{self.desc} [{'#' * filled}{'.' * (30 - filled)}] {self.n}/{self.total} {now - self._t0:.0f}s")
        sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            self._draw(force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()
