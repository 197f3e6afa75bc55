"""Take the user guide's screenshots from the real plugin in a real napari window.

Run under a display (``xvfb-run -a -s "-screen 0 1920x1200x24" python
docs/make_screenshots.py``). It opens the WS2/WSe2
flake sample, adds the docks, runs the methods (both when CC-ST-AE's shipped model is
installed, else py4DSTEM alone - the guide says which), clicks a probe, and writes
``docs/images/gui_*.png``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "images"


def _process(seconds: float = 0.3) -> None:
    from qtpy.QtWidgets import QApplication

    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        QApplication.processEvents()
        time.sleep(0.02)


def _save(viewer, name: str) -> Path:
    from qtpy.QtWidgets import QApplication

    _process(0.5)
    viewer.reset_view()
    _process(0.5)
    path = OUT / name
    pix = viewer.window._qt_window.grab()
    pix.save(str(path))
    QApplication.processEvents()
    print("wrote", path)
    return path


def _save_widget(widget, name: str) -> Path:
    _process(0.3)
    path = OUT / name
    widget.grab().save(str(path))
    print("wrote", path)
    return path


def _ae_available() -> bool:
    try:
        from napari_stem_strain.methods.ccstae import load_model

        load_model("default")
        return True
    except Exception as err:  # noqa: BLE001 - the guide explains what is missing
        print("CC-ST-AE shipped model not available:", err)
        return False


def main() -> int:
    import napari
    from qtpy.QtCore import QPoint, Qt
    from qtpy.QtTest import QTest

    from napari_stem_strain._widgets import (
        ExportWidget,
        MappingWidget,
        ProbeInspector,
        ReferenceWidget,
    )
    from napari_stem_strain._widgets._session import get_session
    from napari_stem_strain._widgets._workers import running_tasks

    OUT.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(title="napari-stem-strain")
    viewer.window._qt_window.resize(1900, 1150)
    viewer.open_sample("napari-stem-strain", "tmd_flake")
    mapping = MappingWidget(viewer)
    reference = ReferenceWidget(viewer)
    probe = ProbeInspector(viewer)
    export = ExportWidget(viewer)
    map_dock = viewer.window.add_dock_widget(mapping, name="Strain mapping", area="right")
    ref_dock = viewer.window.add_dock_widget(reference, name="Reference and mask",
                                             area="right")
    viewer.window.add_dock_widget(export, name="Export", area="right", tabify=True)
    probe_dock = viewer.window.add_dock_widget(probe, name="Probe inspector", area="left")
    _process(0.3)
    # the docks scroll when small: give the mapping dock room for its histograms
    win = viewer.window._qt_window
    win.resizeDocks([map_dock, ref_dock], [700, 330], Qt.Orientation.Vertical)
    win.resizeDocks([map_dock], [420], Qt.Orientation.Horizontal)
    win.resizeDocks([probe_dock], [420], Qt.Orientation.Vertical)
    ref_dock.raise_()
    session = get_session(viewer)
    _process(1.0)
    viewer.reset_view()
    _save(viewer, "gui_open.png")

    use_ae = _ae_available()
    mapping.use_ae.setChecked(use_ae)
    task = mapping.run()
    t0 = time.monotonic()
    while task in running_tasks() and time.monotonic() - t0 < 1800:
        _process(0.2)
    print("run", task.status, f"{time.monotonic() - t0:.0f} s")
    if task.status != "done":
        return 1
    nav = session.nav_layer()
    # click a probe in the strained grain, through the real canvas
    viewer.layers.selection.active = nav
    canvas = viewer.window._qt_viewer.canvas
    gt = session.ground_truth
    import numpy as np

    rows, cols = np.nonzero(gt.sample & (np.abs(gt.theta) > 3))
    r, c = int(rows[len(rows) // 2]), int(cols[len(cols) // 2])
    world = nav.data_to_world((r, c))
    x, y = canvas.view.scene.transform.map([world[1], world[0], 0, 1])[:2]
    QTest.mouseClick(canvas._scene_canvas.native, Qt.MouseButton.LeftButton,
                     Qt.KeyboardModifier.NoModifier, QPoint(int(x), int(y)))
    _process(0.5)
    viewer.reset_view()
    first = next(iter(session.results))
    for layer in viewer.layers:
        meta = layer.metadata.get("stem_strain") or {}
        if meta.get("role") == "map" and meta.get("component") == "exx" \
                and meta.get("method") == first:
            viewer.layers.selection.active = layer
    _save(viewer, "gui_maps.png")
    # the error bars: the first method's sigma exx layer (hidden by default) shown on top
    from napari_stem_strain._widgets._layers import sigma_layer_name

    shown = [ly for ly in viewer.layers if ly.visible]
    sigma = viewer.layers[sigma_layer_name(first, "exx")]
    for ly in shown:
        ly.visible = ly.name == nav.name
    sigma.visible = True
    viewer.layers.selection.active = sigma
    _save(viewer, "gui_sigma.png")
    sigma.visible = False
    for ly in shown:
        ly.visible = True
    probe_dock.setFloating(True)  # room for the pattern and the numbers
    probe_dock.resize(470, 820)
    _process(0.5)
    probe.splitter.setSizes([430, 300])
    _process(0.5)
    _save_widget(probe, "gui_probe.png")
    probe_dock.setFloating(False)
    map_dock.setFloating(True)  # the whole dock, unscrolled
    map_dock.resize(470, 900)
    _process(0.5)
    mapping.tabs.setCurrentIndex(0)
    _save_widget(mapping, "gui_histograms.png")
    mapping.tabs.setCurrentIndex(1)
    _save_widget(mapping, "gui_mae.png")
    map_dock.setFloating(False)
    _process(0.3)
    mapping.grid.setChecked(True)
    viewer.reset_view()
    _save(viewer, "gui_grid.png")
    mapping.grid.setChecked(False)
    # a laptop screen: 1280 x 800 with the four docks on the right (they scroll when small)
    win.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, probe_dock)
    win.resize(1280, 800)
    _process(1.0)
    viewer.reset_view()
    _save(viewer, "gui_1280x800.png")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
