"""The four docks fit a 1280 x 800 screen with a usable canvas."""

from __future__ import annotations

import numpy as np

from napari_stem_strain._widgets import (
    ExportWidget,
    MappingWidget,
    ProbeInspector,
    ReferenceWidget,
)


def test_four_docks_fit_a_1280x800_window(make_napari_viewer, open_scan, tiny_sim, qtbot):
    viewer = make_napari_viewer(show=True)
    open_scan(viewer, tiny_sim)
    for cls in (MappingWidget, ReferenceWidget, ProbeInspector, ExportWidget):
        viewer.window.add_dock_widget(cls(viewer), area="right")
    win = viewer.window._qt_window
    qtbot.wait(200)
    hint = win.minimumSizeHint()
    assert hint.height() <= 760, f"window cannot be lower than {hint.height()} px"
    win.resize(1280, 800)
    qtbot.waitUntil(lambda: win.height() <= 800, timeout=3000)
    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.wait(50)
    assert canvas.width() >= 540, f"canvas only {canvas.width()} px wide"
    assert canvas.height() >= 560


def _probe_after_a_run(viewer, open_scan, tiny_sim, wait_task) -> ProbeInspector:
    """A probe inspector showing the tiny scan's pattern after a (toy) mapping run."""
    open_scan(viewer, tiny_sim)
    mapping, probe = MappingWidget(viewer), ProbeInspector(viewer)
    for w in (mapping, probe):
        viewer.window.add_dock_widget(w)
    wait_task(mapping.run())
    probe.update_view()
    return probe


def test_probe_legend_does_not_cover_the_pattern(make_napari_viewer, open_scan, tiny_sim,
                                                 toy_methods, wait_task):
    viewer = make_napari_viewer()
    probe = _probe_after_a_run(viewer, open_scan, tiny_sim, wait_task)
    assert probe.overlay, "no predicted disks to label"
    fig = probe.figure
    fig.canvas.draw()
    legends = [*fig.legends, *(a.get_legend() for a in fig.axes if a.get_legend())]
    assert legends
    renderer = fig.canvas.get_renderer()
    image = probe.ax.get_window_extent(renderer)
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert box.y0 >= image.y1 - 1, "the legend sits on the pattern"


def test_probe_inspector_states_the_diffraction_calibration(make_napari_viewer, open_scan,
                                                            tiny_sim, toy_methods, wait_task):
    from napari_stem_strain._widgets._session import get_session

    viewer = make_napari_viewer()
    probe = _probe_after_a_run(viewer, open_scan, tiny_sim, wait_task)
    cal = get_session(viewer).dataset.calibration
    text = probe.numbers.text()
    assert f"{cal.q_pixel_size:.4g} 1/nm per pixel" in text
    g = min(np.linalg.norm(probe.lattice.g1), np.linalg.norm(probe.lattice.g2))
    assert f"{g * cal.q_pixel_size:.3g} 1/nm" in text
