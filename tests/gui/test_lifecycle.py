"""Workers and the viewer's life: closing the viewer stops and disconnects the plugin's
workers, in an event loop or not, and never aborts the interpreter."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from napari_stem_strain._widgets._workers import running_tasks
from napari_stem_strain._widgets.mapping import MappingWidget

SCRIPT = textwrap.dedent("""
    import sys
    import napari
    viewer = napari.Viewer(show=False)
    viewer.open(sys.argv[1], plugin="napari-stem-strain")
    _, dock = viewer.window.add_plugin_dock_widget("napari-stem-strain", "Strain mapping")
    for name in ("Reference and mask", "Probe inspector", "Export"):
        viewer.window.add_plugin_dock_widget("napari-stem-strain", name)
    assert dock.run() is not None
    viewer.close()
    print("closed")
""")


def test_script_closing_the_viewer_during_a_run_exits_cleanly(tiny_sim, tmp_path):
    """A script (no event loop) starts a run, closes the viewer and ends: the worker must not
    emit into deleted Qt objects ("WorkerBaseSignals has been deleted" -> Fatal Python error)."""
    script = tmp_path / "close_during_run.py"
    script.write_text(SCRIPT)
    for _ in range(2):  # the abort came in most runs, not every one
        proc = subprocess.run([sys.executable, str(script), str(tiny_sim)], capture_output=True,
                              text=True, timeout=300)
        assert "has been deleted" not in proc.stderr, proc.stderr[-2000:]
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "closed" in proc.stdout


def test_closing_the_viewer_stops_its_workers_without_events(make_napari_viewer, open_scan,
                                                             tiny_sim, toy_methods):
    """``viewer.close()`` alone (no Qt events processed afterwards) leaves no worker of the
    plugin running and the dock's end-of-run handler already called."""
    toy_methods["delay"] = 0.15  # ~3.6 s of one-row blocks
    viewer = make_napari_viewer()
    open_scan(viewer, tiny_sim)
    w = MappingWidget(viewer)
    viewer.window.add_dock_widget(w)
    task = w.run()
    assert task is not None and task in running_tasks()
    viewer.close()
    assert task not in running_tasks()
    assert task.status == "cancelled"
    assert w._held is None  # the dataset was released (and, its layers gone, closed)


def test_end_of_a_run_comes_after_its_result_even_if_showing_it_processes_events(qtbot):
    """Showing results adds layers, and napari processes Qt events meanwhile (its progress
    bar does): the run's end must still be handled after its result, not in the middle."""
    import time

    from qtpy.QtWidgets import QApplication

    from napari_stem_strain._widgets._workers import Task

    order = []

    def on_done(result):
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.3:  # long enough for the queued 'finished' to arrive
            QApplication.processEvents()
        order.append(("done", result))

    task = Task(lambda progress, should_stop: 42, "toy", on_done=on_done,
                on_end=lambda status: order.append(("end", status)))
    qtbot.waitUntil(lambda: task not in running_tasks(), timeout=5000)
    assert order == [("done", 42), ("end", "done")]
