"""Fixtures of the GUI tests: a real napari viewer (napari's ``make_napari_viewer``) under Xvfb
(pytest-xvfb starts it), tiny simulated data, and a toy method standing in where a test is
about the plumbing rather than the science.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_stem_strain.methods.base import BlockMethod

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "formats"
FORMATS = SHARED.resolve()


_QT_PROBE = "from qtpy.QtWidgets import QApplication; QApplication([])"


def qt_display_problem() -> str | None:
    """Why Qt cannot open a window here (``None`` when it can).

    Without a display (no Xvfb for pytest-xvfb to start) or without Qt's X11 libraries, creating
    the ``QApplication`` aborts the interpreter ("Fatal Python error: Aborted"), which would end
    the whole test run; so it is tried once in a child process first.
    """
    try:
        proc = subprocess.run([sys.executable, "-c", _QT_PROBE], capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        return "starting Qt timed out"
    if proc.returncode == 0:
        return None
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                 or os.environ.get("WAYLAND_DISPLAY")):
        cause = "no display, and no Xvfb for pytest-xvfb to start"
    else:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        cause = next((ln for ln in lines if "Could not load" in ln or "connect" in ln),
                     lines[0] if lines else f"exit status {proc.returncode}")
    return f"Qt cannot open a window here ({cause})"


def pytest_collection_modifyitems(config, items):
    gui = [item for item in items
           if "tests/gui/" in str(item.fspath).replace(os.sep, "/")]
    for item in gui:
        item.add_marker(pytest.mark.gui)
    if not gui:
        return
    problem = qt_display_problem()
    if problem is not None:
        skip = pytest.mark.skip(reason=f"{problem}; GUI tests need Xvfb and Qt's X11 libraries: "
                                       "run `bash scripts/system-deps.sh` as root")
        for item in gui:
            item.add_marker(skip)


@pytest.fixture
def formats() -> Path:
    """The shared folder of small real files (skip only where the shared data is absent)."""
    if not FORMATS.is_dir():
        pytest.skip("../shared/data/formats is not present in this checkout")
    return FORMATS


@pytest.fixture(autouse=True)
def _sample_cache(tmp_path_factory, monkeypatch):
    """Samples are generated into a per-session temp cache, not the user's ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "xdg-cache"
    cache.mkdir(exist_ok=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))


@pytest.fixture(scope="session")
def tiny_sim(tmp_path_factory) -> Path:
    """A 12x12 scan of 48 px hexagonal patterns with vacuum and ground truth."""
    from napari_stem_strain.simulate import SimulationSettings, simulate_to_file

    path = tmp_path_factory.mktemp("sim") / "tiny.h5"
    simulate_to_file(path, SimulationSettings(scan=(12, 12), pattern=48, disk_radius=2.5,
                                              lattice="hex", vacuum=True, n_grains=3,
                                              seed=3))
    return path


class RampMethod(BlockMethod):
    """Toy method: ``A_raw = (1 + 0.01 * row) I`` rotated by ``col`` degrees - a known,
    position-dependent answer, so re-referencing and overlays can be checked exactly.
    ``delay`` seconds per block (and one-row blocks) make runs long enough to cancel."""

    name = "toy"

    def __init__(self, name: str = "toy", delay: float = 0.0, fail: bool = False) -> None:
        self.name = name
        self.delay = delay
        self.fail = fail
        self.block_bytes = 1 if delay else 64 * 2**20

    def process_block(self, block, r0):
        if self.delay:
            time.sleep(self.delay)
        if isinstance(self.fail, BaseException):
            raise self.fail
        if self.fail:
            raise RuntimeError("toy method cannot fit these patterns")
        n, Ry = block.shape[:2]
        rows = np.arange(r0, r0 + n, dtype=np.float64)[:, None] * np.ones((1, Ry))
        cols = np.ones((n, 1)) * np.arange(Ry, dtype=np.float64)[None, :]
        s = 1.0 + 0.01 * rows
        t = np.deg2rad(cols)
        A = np.empty((n, Ry, 2, 2), np.float32)
        A[..., 0, 0] = s * np.cos(t)
        A[..., 0, 1] = -s * np.sin(t)
        A[..., 1, 0] = s * np.sin(t)
        A[..., 1, 1] = s * np.cos(t)
        return A, np.ones((n, Ry), bool)


@pytest.fixture
def toy_methods(monkeypatch):
    """Make ``pipeline.run_methods`` build :class:`RampMethod` objects for 'ae'/'py4dstem'.

    Returns a dict of options the test may change (``delay``, ``fail``) before running.
    """
    from napari_stem_strain import pipeline

    opts = {"delay": 0.0, "fail": False, "made": []}

    def make_method(name, **kwargs):
        opts["made"].append((name, kwargs))
        return RampMethod(name, delay=opts["delay"], fail=opts["fail"])

    monkeypatch.setattr(pipeline, "make_method", make_method)
    return opts


def error_messages() -> list[str]:
    """Messages of the napari error notifications so far."""
    from napari.utils.notifications import NotificationSeverity, notification_manager

    return [str(n.message) for n in notification_manager.records
            if n.severity == NotificationSeverity.ERROR]


@pytest.fixture
def errors():
    """Collects error notifications raised during the test (cleared at start)."""
    from napari.utils.notifications import notification_manager

    notification_manager.records.clear()
    return error_messages


def _open_scan(viewer, path):
    """Open a file through the plugin's reader; returns the navigation layer."""
    viewer.open(str(path), plugin="napari-stem-strain")
    navs = [layer for layer in viewer.layers
            if layer.metadata.get("stem_strain", {}).get("role") == "navigation"]
    assert navs, f"{path} did not open"
    return navs[-1]


@pytest.fixture
def open_scan():
    """``open_scan(viewer, path) -> navigation layer`` through the plugin's reader."""
    return _open_scan


@pytest.fixture
def wait_task(qtbot):
    """``wait_task(task, timeout_ms)``: process Qt events until a plugin task has ended."""
    from napari_stem_strain._widgets._workers import running_tasks

    def wait(task, timeout=60_000):
        assert task is not None
        qtbot.waitUntil(lambda: task not in running_tasks(), timeout=timeout)

    return wait


@pytest.fixture(autouse=True)
def private_plugin_settings(tmp_path_factory):
    """Every GUI test gets an empty settings store of its own: a remembered choice (e.g. a Dask
    address) must neither leak between tests nor touch the user's real settings."""
    from qtpy.QtCore import QSettings

    folder = tmp_path_factory.mktemp("qsettings")
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(folder))
    yield folder
