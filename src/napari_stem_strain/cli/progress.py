"""A terminal progress bar that fits the core's ``progress(done, total, message)`` callback."""

from __future__ import annotations

import sys

from tqdm import tqdm

__all__ = ["ProgressBar"]


class ProgressBar:
    """Callable progress reporter backed by tqdm (quiet when stderr is not a terminal and
    ``quiet`` is set)."""

    def __init__(self, desc: str, quiet: bool = False, unit: str = "it") -> None:
        self._bar: tqdm | None = None
        self._desc = desc
        self._quiet = quiet
        self._unit = unit

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if self._quiet:
            return
        if self._bar is None or self._bar.total != total:
            if self._bar is not None:
                self._bar.close()
            self._bar = tqdm(total=total, desc=self._desc, unit=self._unit, file=sys.stderr,
                             dynamic_ncols=True, leave=True)
        self._bar.n = done
        if message:
            self._bar.set_postfix_str(message, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
