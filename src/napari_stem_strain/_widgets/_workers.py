"""Run core functions off the GUI thread with a napari progress bar, Cancel and notifications.

Every long core function takes ``progress(done, total, msg)`` and ``should_stop()`` callables
(``methods/base.py``). :class:`Task` runs one in a napari worker thread and:

* forwards ``progress`` calls to the GUI thread through a Qt signal (queued across threads)
  where they drive a :class:`napari.utils.progress` bar in the activity dock;
* answers ``should_stop()`` with True after :meth:`Task.cancel` *or* after napari asked the
  worker to quit - napari does that for every registered worker when its window closes, so
  closing napari during a run stops the run at the next block instead of leaving a thread;
* turns failures into one-line notifications (never a traceback dialog); ``Cancelled`` is an
  information, not an error;
* belongs to a viewer: when that viewer closes (``viewer.close()`` in a script, or the window's
  close button), :func:`stop_tasks` asks its runs to stop, waits (bounded) for their threads,
  disconnects them and ends them as cancelled - before Qt deletes anything, so a worker never
  emits into a deleted object ("wrapped C/C++ object of type WorkerBaseSignals has been deleted",
  which PyQt turns into an interpreter abort). At interpreter exit the same happens for every
  task still running.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QEvent, QObject, QTimer, Signal

from ..progress import Cancelled

__all__ = ["Task", "call_soon", "notify_error", "notify_info", "running_tasks", "start_worker",
           "stop_tasks"]


def call_soon(fn: Callable[[], Any]) -> None:
    """Run ``fn`` on the Qt event loop once the current event is handled (the reader's
    follow-ups: its layers must be in the viewer first). Qt stays in ``_widgets``."""
    QTimer.singleShot(0, fn)

log = logging.getLogger(__name__)

_RUNNING: set[Task] = set()
#: plain background workers (no Task: e.g. the device probe) still running
_WORKERS: set[Any] = set()
#: seconds a closing viewer waits for its runs to reach their next block
CLOSE_WAIT_S = 10.0


def _unwrap(viewer: Any) -> Any:
    """The viewer itself behind napari's ``PublicOnlyProxy`` (what plugins are handed)."""
    return getattr(viewer, "__wrapped__", viewer)


def _safe_worker_class() -> type:
    """napari's ``FunctionWorker`` whose thread never raises into Qt: once the viewer (or the
    interpreter) is gone, emitting ``finished`` can raise ``RuntimeError`` (deleted signals
    object) and PyQt aborts the interpreter on an exception in ``QRunnable.run``."""
    from napari.qt.threading import FunctionWorker

    class SafeWorker(FunctionWorker):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.ended = threading.Event()

        def run(self) -> None:
            try:
                super().run()
            except RuntimeError:  # the signals' Qt object was deleted: nobody is listening
                pass
            finally:
                self.ended.set()

    return SafeWorker


def start_worker(fn: Callable[[], Any], on_returned: Callable[[Any], None]) -> Any:
    """Run ``fn()`` in a worker thread; ``on_returned(result)`` in the GUI thread. For short
    jobs without progress or Cancel (waited for at interpreter exit)."""
    from napari.qt.threading import create_worker

    worker = create_worker(fn, _start_thread=False, _ignore_errors=True,
                           _worker_class=_safe_worker_class())
    worker.returned.connect(on_returned)
    _WORKERS.add(worker)
    worker.finished.connect(lambda: _WORKERS.discard(worker))
    worker.start()
    return worker


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


#: exceptions the code raises on purpose with a message for the user (bad data, a refused
#: setting, out of memory, unreadable files): shown as they are, no traceback in the terminal
_REFUSALS = (ValueError, OSError, MemoryError)
#: exceptions that mean a bug, whose text ("index -9223372036854653445 is out of bounds")
#: means nothing to the user: a plain sentence is shown, the traceback goes to the log
_INTERNAL = (LookupError, TypeError, AttributeError, ArithmeticError, AssertionError,
             NameError)


def failure_message(exc: BaseException) -> str:
    """One line for the user about a failed run."""
    if isinstance(exc, _INTERNAL) and not isinstance(exc, _REFUSALS):
        return (f"an internal error ({type(exc).__name__}) stopped the run - please report it "
                "with the terminal's log")
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def progress_text(message: str) -> str:
    """A core progress message for people: the method's name, not its key (``ae: 3/48 rows``
    -> ``CC-ST-AE 3/48 rows``)."""
    from ..methods import registry

    key, sep, rest = message.partition(": ")
    if sep and key in registry.available():
        return f"{registry.label(key)} {rest}"
    return message


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
        viewer: Any = None,
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
        self._detached = False
        self._showing = False  # inside on_done (see _on_returned)
        self._finish_pending = False
        viewer = _unwrap(viewer) if viewer is not None else None
        self._viewer_ref = weakref.ref(viewer) if viewer is not None else None
        if viewer is not None:
            watch_viewer(viewer)
        self._bridge = _Bridge()
        self._bridge.progressed.connect(self._on_progress)
        self.pbar = progress(total=0, desc=description)
        self.worker = create_worker(self._work, _start_thread=False, _ignore_errors=True,
                                    _worker_class=_safe_worker_class())
        self.worker.returned.connect(self._on_returned)
        self.worker.errored.connect(self._on_errored)
        self.worker.finished.connect(self._on_finished)
        _RUNNING.add(self)
        self.worker.start()

    @property
    def viewer(self) -> Any:
        """The viewer this run belongs to (``None``: none, or closed and collected)."""
        return self._viewer_ref() if self._viewer_ref is not None else None

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

    def shutdown(self, timeout: float = CLOSE_WAIT_S) -> bool:
        """Stop the run for good (its viewer is going): ask it to stop, wait up to ``timeout``
        s for its thread *without* processing Qt events, disconnect it and end it as
        cancelled (``on_end`` runs now). True when the thread has ended."""
        if self._detached:
            return True
        self._stop.set()
        self.worker.quit()
        ended = self.worker.ended.wait(timeout)
        self._detached = True
        for signal, slot in ((self.worker.returned, self._on_returned),
                             (self.worker.errored, self._on_errored),
                             (self.worker.finished, self._on_finished),
                             (self._bridge.progressed, self._on_progress)):
            try:
                signal.disconnect(slot)
            except (RuntimeError, TypeError):  # already disconnected or deleted
                pass
        self._settle()
        if not ended:
            log.warning("%s did not stop within %.0f s of its viewer closing",
                        self.description, timeout)
            return False
        self._call_on_end()
        return True

    def _settle(self) -> None:
        """End the run's bookkeeping: a run still marked running was cancelled; its progress
        bar closes and it leaves the set of running tasks."""
        if self.status == "running":
            self.status = "cancelled"
        try:
            self.pbar.close()
        except Exception:  # noqa: BLE001 - closing a bar of a closed viewer
            pass
        _RUNNING.discard(self)

    def _call_on_end(self) -> None:
        if self._on_end is not None:
            try:
                self._on_end(self.status)
            except RuntimeError:  # the dock's widgets were deleted with its viewer
                pass

    def _on_progress(self, done: int, total: int, message: str) -> None:
        if self.status != "running" or self._detached:
            return
        if total > 0 and self.pbar.total != total:
            self.pbar.total = total
        target = min(done, total) if total > 0 else done
        if message:
            self.pbar.set_description(f"{self.description}: {progress_text(message)}")
        # update() emits the value event the activity dock listens to (setting n does not)
        self.pbar.update(target - self.pbar.n)

    def _on_returned(self, result: Any) -> None:
        if self._detached:
            return
        if self.should_stop():
            self.status = "cancelled"
            return
        self.status = "done"
        # napari's progress bar and new layers process Qt events, which may deliver the
        # queued 'finished' meanwhile: its handling waits until the result is shown
        self._showing = True
        try:
            # a finished run is complete: fill the bar even if the last queued progress signal
            # has not been delivered yet (signals from the worker thread are not ordered with
            # this one)
            if self.pbar.total and self.pbar.n < self.pbar.total:
                self.pbar.update(self.pbar.total - self.pbar.n)
            if self._on_done is not None:
                try:
                    self._on_done(result)
                except Exception as err:  # noqa: BLE001 - shown to the user, no traceback
                    log.exception("showing the result of %s failed", self.description)
                    self.status = "failed"
                    notify_error(f"{self._error_prefix}{err}")
        finally:
            self._showing = False
        if self._finish_pending:
            self._finish_pending = False
            self._on_finished()

    def _on_errored(self, exc: BaseException) -> None:
        if self._detached:
            return
        if isinstance(exc, Cancelled) or (self._stop.is_set() and not isinstance(exc, MemoryError)):
            self.status = "cancelled"
            notify_info(f"{self.description}: cancelled")
            return
        self.status = "failed"
        notify_error(f"{self._error_prefix}{failure_message(exc)}")
        if isinstance(exc, _REFUSALS):  # a clean refusal: its message says it all
            log.info("%s failed: %s", self.description, exc)
        else:
            log.error("%s failed", self.description, exc_info=exc)

    def _on_finished(self) -> None:
        if self._detached:
            return
        if self._showing:  # delivered while the result is being shown: end after it
            self._finish_pending = True
            return
        self._settle()  # still "running" here: aborted by napari before returning
        self._call_on_end()

    def wait(self, timeout: float = 30.0) -> bool:
        """Block (processing Qt events) until the run ended; True when it did."""
        import time

        from qtpy.QtWidgets import QApplication

        t0 = time.monotonic()
        while self in _RUNNING and time.monotonic() - t0 < timeout:
            QApplication.processEvents()
            time.sleep(0.01)
        return self not in _RUNNING


def stop_tasks(viewer: Any = None, timeout: float = CLOSE_WAIT_S) -> None:
    """End the runs of ``viewer`` (every run when ``None``, and runs whose viewer is gone) -
    see :meth:`Task.shutdown`; with ``viewer=None`` also wait for the plain workers."""
    import time

    viewer = _unwrap(viewer) if viewer is not None else None
    t_end = time.monotonic() + timeout
    for task in list(_RUNNING):
        owner = task.viewer
        if viewer is None or owner is None or owner is viewer:
            task.shutdown(max(0.0, t_end - time.monotonic()))
    if viewer is None:
        for worker in list(_WORKERS):
            worker.ended.wait(max(0.0, t_end - time.monotonic()))
            _WORKERS.discard(worker)


class _CloseWatcher(QObject):
    """Stops a viewer's runs when its main window closes: at once for a programmatic close
    (``viewer.close()``: nothing can refuse it), after the event for the user's close button
    (napari may ask to confirm; the window is then hidden), and when the window is deleted."""

    def __init__(self, viewer: Any, window: Any) -> None:
        super().__init__(window)
        self._viewer_ref = weakref.ref(viewer)
        window.installEventFilter(self)
        viewer_ref = self._viewer_ref
        window.destroyed.connect(lambda *_: _stop_for(viewer_ref))

    def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 - Qt's name
        if event.type() == QEvent.Type.Close:
            if event.spontaneous():
                ref = self._viewer_ref
                QTimer.singleShot(0, lambda: _stop_if_hidden(ref, obj))
            else:
                _stop_for(self._viewer_ref)
        return False


def _stop_for(viewer_ref: Any) -> None:
    viewer = viewer_ref()
    if viewer is not None:
        stop_tasks(viewer)
    else:
        _stop_orphans()


def _stop_orphans() -> None:
    for task in list(_RUNNING):
        if task._viewer_ref is not None and task.viewer is None:
            task.shutdown()


def _stop_if_hidden(viewer_ref: Any, window: Any) -> None:
    try:
        hidden = not window.isVisible()
    except RuntimeError:  # already deleted
        hidden = True
    if hidden:
        _stop_for(viewer_ref)


_WATCHERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def watch_viewer(viewer: Any) -> None:
    """Make closing ``viewer``'s window end its runs (idempotent)."""
    viewer = _unwrap(viewer)
    if viewer in _WATCHERS:
        return
    try:
        window = viewer.window._qt_window
    except AttributeError:  # headless viewer or one already closed
        return
    _WATCHERS[viewer] = _CloseWatcher(viewer, window)


@atexit.register
def _stop_all_at_exit() -> None:
    """A script that ends with runs going (viewer closed or not): stop and wait for them
    before Python and Qt tear their objects down."""
    if _RUNNING or _WORKERS:
        stop_tasks(None, timeout=30.0)
