"""Reference rectangle and mask re-reference the maps at once; the probe inspector's overlay
is the method's A applied to the reference lattice; exports round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_stem_strain import overlay
from napari_stem_strain._widgets._layers import map_layer_name
from napari_stem_strain._widgets._session import (
    BACKGROUND,
    MASK_LAYER,
    REFERENCE_LAYER,
    get_session,
)
from napari_stem_strain._widgets.export import ExportWidget
from napari_stem_strain._widgets.mapping import MappingWidget
from napari_stem_strain._widgets.probe import PROBE_LAYER, ProbeInspector
from napari_stem_strain._widgets.reference import ReferenceWidget
from napari_stem_strain.io.results import read_results
from napari_stem_strain.strain import parse_region, strain_maps


@pytest.fixture
def mapped(make_napari_viewer, open_scan, tiny_sim, toy_methods, wait_task):
    """Viewer with the tiny simulation, all four docks, and a finished toy run."""
    viewer = make_napari_viewer()
    open_scan(viewer, tiny_sim)
    docks = {
        "mapping": MappingWidget(viewer),
        "reference": ReferenceWidget(viewer),
        "probe": ProbeInspector(viewer),
        "export": ExportWidget(viewer),
    }
    for w in docks.values():
        viewer.window.add_dock_widget(w)
    task = docks["mapping"].run()
    wait_task(task)
    assert task.status == "done"
    return viewer, docks


def _rect(r0, r1, c0, c1):
    return np.array([[r0 - 0.5, c0 - 0.5], [r0 - 0.5, c1 - 0.5], [r1 - 0.5, c1 - 0.5],
                     [r1 - 0.5, c0 - 0.5]])


def test_rectangle_and_mask_rereference_at_once(mapped, toy_methods, errors):
    viewer, docks = mapped
    session = get_session(viewer)
    n_runs = len(toy_methods["made"])
    exx = viewer.layers[map_layer_name("ae", "exx")]
    theta = viewer.layers[map_layer_name("ae", "theta")]
    before = exx.data.copy()
    shapes = viewer.layers[REFERENCE_LAYER]
    # the user drags the rectangle to rows 6-8, columns 1-3
    shapes.data = [_rect(6, 9, 1, 4)]
    assert session.reference_region() == "6:9,1:4"
    assert docks["reference"].region_edit.text() == "6:9,1:4"
    raw = session.raw_results["ae"]
    expected = strain_maps(raw.A_raw, "6:9,1:4", 360.0, mask=raw.sample & session.sample_mask())
    np.testing.assert_allclose(exx.data, expected.exx * 100, rtol=1e-5, atol=1e-6,
                               equal_nan=True)
    assert not np.allclose(exx.data, before, equal_nan=True)
    # zero median strain and rotation in the new reference region
    rs, cs = parse_region("6:9,1:4")
    assert abs(np.nanmedian(exx.data[rs, cs])) < 1e-4
    assert abs(np.nanmedian(theta.data[rs, cs])) < 1e-4
    assert len(toy_methods["made"]) == n_runs  # no method was re-run
    # drawing a second rectangle: the newest one is the reference
    shapes.add_rectangles(_rect(0, 3, 0, 3)[[0, 2]])
    assert session.reference_region() == "0:3,0:3"
    assert abs(np.nanmedian(exx.data[0:3, 0:3])) < 1e-3
    # typing a region moves the rectangle
    docks["reference"].region_edit.setText("3:5,3:6")
    docks["reference"].region_edit.returnPressed.emit()
    assert session.reference_region() == "3:5,3:6"

    # a reference on vacuum is refused with a message, the maps stay as they were
    errors_before = len(errors())
    before = exx.data.copy()
    viewer.layers[REFERENCE_LAYER].data = [_rect(0, 3, 10, 12)]  # vacuum columns 10-11
    np.testing.assert_array_equal(exx.data, before)
    new = errors()[errors_before:]
    assert len(new) == 1 and "move it onto the crystal" in new[0]
    # ... and the rectangle and the dock go back to the region the maps still use
    assert session.reference_region() == "3:5,3:6"
    assert docks["reference"].region_edit.text() == "3:5,3:6"
    assert len(viewer.layers[REFERENCE_LAYER].data) == 1

    # painting background blanks the maps there, painting sample brings them back
    viewer.layers[REFERENCE_LAYER].data = [_rect(2, 5, 2, 5)]
    mask = viewer.layers[MASK_LAYER]
    exx = viewer.layers[map_layer_name("py4dstem", "exx")]
    assert np.isfinite(exx.data[7, 7])
    mask.paint((7, 7), BACKGROUND, refresh=True)
    assert np.isnan(exx.data[7, 7])
    mask.paint((7, 7), 1, refresh=True)
    assert np.isfinite(exx.data[7, 7])
    docks["reference"].source.setCurrentText("CC-ST-AE classifier")
    docks["reference"].fill_button.click()
    assert (mask.data == 1).all()  # the toy classifier calls everything sample


def _click(viewer, world):
    """A real left click (Qt event on the vispy canvas) at a world position."""
    from qtpy.QtCore import QPoint, Qt
    from qtpy.QtTest import QTest

    canvas = viewer.window._qt_viewer.canvas
    x, y = canvas.view.scene.transform.map([world[1], world[0], 0, 1])[:2]
    QTest.mouseClick(canvas._scene_canvas.native, Qt.MouseButton.LeftButton,
                     Qt.KeyboardModifier.NoModifier, QPoint(int(round(x)), int(round(y))))


def _drag(viewer, world_from, world_to):
    """A real press - move - release drag on the vispy canvas."""
    from qtpy.QtCore import QPoint, Qt
    from qtpy.QtTest import QTest

    canvas = viewer.window._qt_viewer.canvas
    native = canvas._scene_canvas.native

    def px(w):
        x, y = canvas.view.scene.transform.map([w[1], w[0], 0, 1])[:2]
        return QPoint(int(round(x)), int(round(y)))

    left, none = Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    QTest.mousePress(native, left, none, px(world_from))
    for f in (0.5, 1.0):  # napari throttles move events: let each one land
        QTest.qWait(60)
        QTest.mouseMove(native, px(np.asarray(world_from) + f * np.subtract(world_to,
                                                                          world_from)))
    QTest.qWait(60)
    QTest.mouseRelease(native, left, none, px(world_to))


def test_probe_click_overlays_A_applied_to_reference_lattice(mapped):
    viewer, docks = mapped
    probe = docks["probe"]
    session = get_session(viewer)
    nav = session.nav_layer()
    viewer.layers.selection.active = nav
    _click(viewer, nav.data_to_world((5, 7)))
    assert session.probe == (5, 7)
    assert np.allclose(viewer.layers[PROBE_LAYER].data, [[5, 7]])
    ds = session.dataset
    region = session.reference_region()
    lattice = overlay.reference_lattice(overlay.region_mean_pattern(ds, parse_region(region)))
    pattern = np.asarray(ds.data[5, 7], float)
    centre, _ = overlay.beam_centre(pattern)
    np.testing.assert_allclose(probe.centre, centre)
    assert set(probe.overlay) == {"ae", "py4dstem"}
    for name in ("ae", "py4dstem"):
        A = session.results[name].maps.A[5, 7].astype(float)
        np.testing.assert_allclose(probe.overlay[name], centre + lattice.vectors @ A.T)
    # what is drawn is what was computed: matplotlib offsets are (column, row)
    drawn = probe.ax.collections[0].get_offsets()
    np.testing.assert_allclose(np.asarray(drawn)[:, ::-1], probe.overlay["ae"])
    assert "CC-ST-AE" in probe.numbers.text() and "exx" in probe.numbers.text()
    # dragging over the image moves the probe along and does not pan the camera
    centre_before = tuple(viewer.camera.center)
    _drag(viewer, nav.data_to_world((2, 2)), nav.data_to_world((4, 9)))
    assert session.probe == (4, 9)
    assert tuple(viewer.camera.center) == centre_before
    _click(viewer, nav.data_to_world((5, 7)))
    # a click while the rectangle's layer is active edits shapes, not the probe
    viewer.layers.selection.active = viewer.layers[REFERENCE_LAYER]
    _click(viewer, nav.data_to_world((1, 1)))
    assert session.probe == (5, 7)
    # inside the reference region A ~ I: the predicted disks sit on the measured disks
    rs, cs = parse_region(region)
    r, c = rs.start + 1, cs.start + 1
    viewer.layers.selection.active = viewer.layers[map_layer_name("ae", "exx")]
    _click(viewer, nav.data_to_world((r, c)))
    assert session.probe == (r, c)
    found, _ = overlay.find_disks(probe.pattern, probe.centre, lattice.radius)
    pred = probe.overlay["ae"][1:]
    d = np.linalg.norm(found[:, None] - pred[None], axis=2).min(axis=1)
    assert len(found) >= 4 and np.median(d) < 1.0
    # display toggles redraw without changing the overlay
    probe.scale.setCurrentText("log")
    assert probe.ax.images[0].get_array().max() == pytest.approx(np.log1p(pattern_max(probe)))


def pattern_max(probe):
    """Largest non-negative value of the pattern shown."""
    return float(np.clip(probe.pattern, 0, None).max())


def test_exports_round_trip(mapped, tmp_path):
    viewer, docks = mapped
    session = get_session(viewer)
    exp = docks["export"]
    exp.folder.setText(str(tmp_path))
    exp.base.setText("run1")
    h5 = exp.export("h5")
    assert [p.name for p in h5] == ["run1.h5"]
    back = read_results(h5[0])
    assert set(back) == {"ae", "py4dstem"}
    np.testing.assert_allclose(back["ae"].maps.exx, session.results["ae"].maps.exx,
                               equal_nan=True)
    assert back["ae"].reference == session.reference_region()
    tifs = exp.export("tif")
    assert len(tifs) == 8
    np.testing.assert_allclose(tifffile.imread(tmp_path / "run1_py4dstem_theta.tif"),
                               session.results["py4dstem"].maps.theta, equal_nan=True)
    # the scan's pixel size travels with the maps (1 nm here): TIFF resolution in pixels per cm
    with tifffile.TiffFile(tmp_path / "run1_ae_exx.tif") as tif:
        page = tif.pages[0]
        num, den = page.tags["XResolution"].value
        assert page.tags["ResolutionUnit"].value == 3  # centimetre
        assert num / den == pytest.approx(1e7)
        assert tif.shaped_metadata[0]["pixel_size"] == 1.0
        assert tif.shaped_metadata[0]["pixel_unit"] == "nm"
    png = exp.export("png")
    assert png[0].stat().st_size > 10_000
    # napari's own File > Save Selected Layers with our writer
    viewer.layers.selection = {viewer.layers[map_layer_name("ae", "exx")]}
    out = tmp_path / "saved.h5"
    viewer.layers.save(str(out), selected=True, plugin="napari-stem-strain")
    assert set(read_results(out)) == {"ae"}


def test_export_without_results_explains(make_napari_viewer, tmp_path, errors):
    exp = ExportWidget(make_napari_viewer())
    exp.folder.setText(str(tmp_path))
    assert exp.export("h5") == []
    assert "nothing to export" in errors()[-1]


@pytest.fixture
def mapped_copy(make_napari_viewer, open_scan, tiny_sim, toy_methods, wait_task, tmp_path):
    """A copy of the tiny simulation (tests may try to overwrite it) opened and mapped."""
    import shutil

    src = tmp_path / "scan.h5"
    shutil.copy(tiny_sim, src)
    viewer = make_napari_viewer()
    open_scan(viewer, src)
    mapping, exp = MappingWidget(viewer), ExportWidget(viewer)
    for w in (mapping, exp):
        viewer.window.add_dock_widget(w)
    task = mapping.run()
    wait_task(task)
    assert task.status == "done"
    return viewer, exp, src


def test_export_refuses_to_overwrite_the_open_dataset(mapped_copy, errors, monkeypatch):
    from napari_stem_strain._widgets import _dialogs

    viewer, exp, src = mapped_copy
    asked = []
    monkeypatch.setattr(_dialogs, "ask_overwrite", lambda paths: asked.append(paths) or True)
    before = src.read_bytes()
    assert exp.folder.text() == str(src.parent)
    exp.base.setText("scan")  # scan.h5: the raw data the viewer shows
    assert exp.export("h5") == []
    assert src.read_bytes() == before
    assert asked == []  # refused outright, not even asked
    msg = errors()[-1]
    assert "scan.h5" in msg and "open" in msg and "\n" not in msg


def test_export_asks_before_overwriting_another_file(mapped_copy, errors, monkeypatch):
    from napari_stem_strain._widgets import _dialogs

    viewer, exp, src = mapped_copy
    target = src.parent / "old_result.h5"
    target.write_bytes(b"precious")
    answers = []
    monkeypatch.setattr(_dialogs, "ask_overwrite",
                        lambda paths: answers.append(list(paths)) or False)
    exp.base.setText("old_result")
    assert exp.export("h5") == []
    assert target.read_bytes() == b"precious"
    assert answers == [[target]]
    assert errors() == []
    monkeypatch.setattr(_dialogs, "ask_overwrite", lambda paths: True)
    assert exp.export("h5") == [target]
    assert set(read_results(target)) == {"ae", "py4dstem"}
    # a name not taken yet is written without a question
    monkeypatch.setattr(_dialogs, "ask_overwrite", lambda paths: pytest.fail("asked"))
    exp.base.setText("fresh")
    assert [p.name for p in exp.export("png")] == ["fresh.png"]
