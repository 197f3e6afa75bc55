"""Run core functions off the GUI thread with a napari progress bar, Cancel and notifications.

Every long core function takes ``progress(done, total, msg)`` and ``should_stop()`` callables
(``methods/base.py``). :class:`Task` runs one in a napari worker thread and:

* forwards ``progress`` calls to the GUI thread through a Qt signal (queued across threads)
  where they drive a :class:`napari.utils.progress` bar in the activity dock;
* answers ``should_stop()`` with True after :meth:`Task.cancel` *or* after napari asked the
  worker to quit - napari does that for every registered worker when its window closes, so
  closing napari during a run stops the run at the next block instead of leaving a thread;
* turns failures into one-line notifications (never a traceback dialog); ``Cancelled`` is an
  information, not an error.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QObject, Signal

from ..methods.base import Cancelled

__all__ = ["Task", "notify_error", "notify_info", "running_tasks"]

log = logging.getLogger(__name__)

_RUNNING: set[Task] = set()


def running_tasks() -> list[Task]:
    """Tasks started and not yet finished (tests and shutdown use it)."""
    return list(_RUNNING)


def notify_error(message: str) -> None:
    """A napari error notification (the message only, no traceback)."""
    from napari.utils.notifications import show_error

    show_error(message)


def notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


class _Bridge(QObject):
    progressed = Signal(int, int, str)


class Task:
    """One background run of ``fn(progress=..., should_stop=...)``.

    ``on_done(result)`` runs in the GUI thread on success; ``on_end(status)`` always runs last
    with ``"done"``, ``"cancelled"`` or ``"failed"``.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        description: str,
        on_done: Callable[[Any], None] | None = None,
        on_end: Callable[[str], None] | None = None,
        error_prefix: str = "",
    ) -> None:
        from napari.qt.threading import create_worker
        from napari.utils import progress

        self.description = description
        self.status = "running"
        self._fn = fn
        self._on_done = on_done
        self._on_end = on_end
        self._error_prefix = error_prefix
        self._stop = threading.Event()
        self._bridge = _Bridge()
        self._bridge.progressed.connect(self._on_progress)
        self.pbar = progress(total=0, desc=description)
        self.worker = create_worker(self._work, _start_thread=False, _ignore_errors=True)
        self.worker.returned.connect(self._on_returned)
        self.worker.errored.connect(self._on_errored)
        self.worker.finished.connect(self._on_finished)
        _RUNNING.add(self)
        self.worker.start()

    # -- worker thread ------------------------------------------------------
    def should_stop(self) -> bool:
        return self._stop.is_set() or bool(getattr(self.worker, "abort_requested", False))

    def _progress(self, done: int, total: int, message: str = "") -> None:
        try:
            self._bridge.progressed.emit(int(done), int(total), str(message))
        except RuntimeError:  # the GUI side is gone (viewer closed): keep computing quietly
            pass

    def _work(self) -> Any:
        return self._fn(progress=self._progress, should_stop=self.should_stop)

    # -- GUI thread ---------------------------------------------------------
    def cancel(self) -> None:
        """Ask the run to stop at its next block (returns at once)."""
        self._stop.set()
        self.worker.quit()

    @property
    def running(self) -> bool:
        return self.status == "running"

    def _on_progress(self, done: int, total: int, message: str) -> None:
        if self.status != "running":
            return
        if total > 0 and self.pbar.total != total:
            self.pbar.total = total
        target = min(done, total) if total > 0 else done
        if message:
            self.pbar.set_description(f"{self.description}: {message}")
        # update() emits the value event the activity dock listens to (setting n does not)
        self.pbar.update(target - self.pbar.n)

    def _on_returned(self, result: Any) -> None:
        if self.should_stop():
            self.status = "cancelled"
            return
        self.status = "done"
        # a finished run is complete: fill the bar even if the last queued progress signal has
        # not been delivered yet (signals from the worker thread are not ordered with this one)
        if self.pbar.total and self.pbar.n < self.pbar.total:
            self.pbar.update(self.pbar.total - self.pbar.n)
        if self._on_done is not None:
            try:
                self._on_done(result)
            except Exception as err:  # noqa: BLE001 - shown to the user, never a traceback
                log.exception("showing the result of %s failed", self.description)
                self.status = "failed"
                notify_error(f"{self._error_prefix}{err}")

    def _on_errored(self, exc: BaseException) -> None:
        if isinstance(exc, Cancelled) or (self._stop.is_set() and not isinstance(exc, MemoryError)):
            self.status = "cancelled"
            notify_info(f"{self.description}: cancelled")
            return
        self.status = "failed"
        log.error("%s failed", self.description, exc_info=exc)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        notify_error(f"{self._error_prefix}{msg}")

    def _on_finished(self) -> None:
        if self.status == "running":  # aborted by napari before returning
            self.status = "cancelled"
        try:
            self.pbar.close()
        except Exception:  # noqa: BLE001 - closing a bar of a closed viewer
            pass
        _RUNNING.discard(self)
        if self._on_end is not None:
            try:
                self._on_end(self.status)
            except RuntimeError:  # the dock was deleted with its viewer
                pass

    def wait(self, timeout: float = 30.0) -> bool:
        """Block (processing Qt events) until the run ended; True when it did."""
        import time

        from qtpy.QtWidgets import QApplication

        t0 = time.monotonic()
        while self in _RUNNING and time.monotonic() - t0 < timeout:
            QApplication.processEvents()
            time.sleep(0.01)
        return self not in _RUNNING
