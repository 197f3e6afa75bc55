"""Two datasets in one viewer: each keeps its own results, mask, reference and geometry."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from napari_stem_strain._widgets._layers import map_layer_name
from napari_stem_strain._widgets._session import MASK_LAYER, REFERENCE_LAYER, get_session
from napari_stem_strain._widgets.mapping import MappingWidget
from napari_stem_strain._widgets.probe import ProbeInspector
from napari_stem_strain._widgets.reference import ReferenceWidget


@pytest.fixture
def coarse(tiny_sim, tmp_path):
    """An 8 x 10 scan at 12.8 nm per pixel (the tiny simulation's 1 nm, cut)."""
    path = tmp_path / "coarse.h5"
    with h5py.File(tiny_sim, "r") as src, h5py.File(path, "w") as out:
        d = out.create_dataset("data", data=src["data"][2:10, 1:11])
        d.attrs["r_pixel_size"] = 12.8
        d.attrs["r_units"] = "nm"
    return path


def _nav(viewer, stem):
    return next(layer for layer in viewer.layers
                if layer.name == f"{stem} BF")


def test_two_datasets_each_keep_their_own_state(make_napari_viewer, open_scan, tiny_sim,
                                                coarse, toy_methods, wait_task, errors):
    viewer = make_napari_viewer()
    open_scan(viewer, tiny_sim)
    mapping, probe, ref = MappingWidget(viewer), ProbeInspector(viewer), ReferenceWidget(viewer)
    for w in (mapping, probe, ref):
        viewer.window.add_dock_widget(w)
    session = get_session(viewer)
    wait_task(mapping.run())
    first_maps = session.results["ae"].maps.exx.copy()
    assert first_maps.shape == (12, 12)

    nav2 = open_scan(viewer, coarse)
    assert session.scan_shape == (8, 10) and session.results == {}
    task = mapping.run()
    wait_task(task)
    assert task.status == "done", errors()
    # the second file's maps, rectangle, mask and probe cross use its own 12.8 nm pixels
    exx = viewer.layers[map_layer_name("ae", "exx")]
    assert exx.data.shape == (8, 10)
    for layer in (exx, viewer.layers[REFERENCE_LAYER], viewer.layers[MASK_LAYER],
                  viewer.layers["probe"]):
        np.testing.assert_allclose(layer.scale[-2:], nav2.scale[-2:], err_msg=layer.name)

    # select the first file's image and click on it: its own (empty -> earlier) state
    nav1 = _nav(viewer, "tiny")
    viewer.layers.selection.active = nav1
    assert session.scan_shape == (12, 12)
    probe.pick(nav1.data_to_world((11, 11)))  # IndexError here before
    assert session.probe == (11, 11)
    assert "probe" in probe.numbers.text()
    np.testing.assert_allclose(session.results["ae"].maps.exx, first_maps, equal_nan=True)
    exx = viewer.layers[map_layer_name("ae", "exx")]
    assert exx.data.shape == (12, 12)
    np.testing.assert_allclose(exx.scale[-2:], nav1.scale[-2:])
    assert viewer.layers[MASK_LAYER].data.shape == (12, 12)

    # and back: the second file's results come back, not re-run
    viewer.layers.selection.active = nav2
    assert session.scan_shape == (8, 10) and session.results["ae"].maps.exx.shape == (8, 10)
    assert viewer.layers[map_layer_name("ae", "exx")].data.shape == (8, 10)
    assert errors() == []
