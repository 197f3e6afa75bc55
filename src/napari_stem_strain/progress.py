"""The progress/cancel protocol every long computation speaks (bottom layer: imports nothing
of the package, so the simulator, the readers, the methods and dask tasks all use it without
importing each other).

Progress and cancel are plain callables so the CLI (a progress bar), the napari worker (yields)
and dask tasks can all drive the same code:

* ``progress(done, total, message)`` is called after each unit of work (a block);
* ``should_stop()`` is polled between units; when it returns True the computation raises
  :class:`Cancelled`, leaving no partial output behind.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Cancelled", "ProgressCallback", "StopCallback", "check_stop", "no_progress",
           "never_stop"]

ProgressCallback = Callable[[int, int, str], None]
StopCallback = Callable[[], bool]


class Cancelled(Exception):
    """The user asked a running computation to stop."""


def no_progress(done: int, total: int, message: str = "") -> None:
    """Default progress callback: says nothing."""


def never_stop() -> bool:
    """Default stop callback: never asks to stop."""
    return False


def check_stop(should_stop: StopCallback | None) -> None:
    """Raise :class:`Cancelled` when ``should_stop()`` says so."""
    if should_stop is not None and should_stop():
        raise Cancelled("cancelled by the user")
