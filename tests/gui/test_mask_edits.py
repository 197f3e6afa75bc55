"""Mask edits the user can trust: undo updates the maps and the counter, Fill can be undone,
the counter follows painting before any run, and colour limits the user set survive edits."""

from __future__ import annotations

import numpy as np
import pytest

from napari_stem_strain._widgets._layers import map_layer_name
from napari_stem_strain._widgets._session import BACKGROUND, MASK_LAYER, SAMPLE, get_session
from napari_stem_strain._widgets.mapping import MappingWidget
from napari_stem_strain._widgets.reference import ReferenceWidget


@pytest.fixture
def docks(make_napari_viewer, open_scan, tiny_sim):
    viewer = make_napari_viewer()
    open_scan(viewer, tiny_sim)
    mapping, ref = MappingWidget(viewer), ReferenceWidget(viewer)
    for w in (mapping, ref):
        viewer.window.add_dock_widget(w)
    return viewer, mapping, ref


def _counts(ref):
    return ref.mask_label.text().split(" positions")[0]


def test_counter_follows_painting_before_a_run(docks):
    viewer, _, ref = docks
    mask = viewer.layers[MASK_LAYER]
    before = _counts(ref)
    mask.paint((6, 6), BACKGROUND if mask.data[6, 6] == SAMPLE else SAMPLE, refresh=True)
    assert _counts(ref) != before
    mask.undo()
    assert _counts(ref) == before


def test_undo_of_a_stroke_after_a_run_updates_maps_and_counter(docks, toy_methods, wait_task):
    viewer, mapping, ref = docks
    wait_task(mapping.run())
    mask = viewer.layers[MASK_LAYER]
    exx = viewer.layers[map_layer_name("ae", "exx")]
    assert mask.data[6, 6] == SAMPLE and np.isfinite(exx.data[6, 6])
    before = _counts(ref)
    mask.paint((6, 6), BACKGROUND, refresh=True)
    assert np.isnan(exx.data[6, 6]) and _counts(ref) != before
    mask.undo()
    assert np.isfinite(exx.data[6, 6])
    assert _counts(ref) == before


def test_fill_mask_can_be_undone(docks, toy_methods, wait_task):
    viewer, mapping, ref = docks
    wait_task(mapping.run())
    mask = viewer.layers[MASK_LAYER]
    painted = mask.data.copy()
    assert (painted == BACKGROUND).any()
    ref.source.setCurrentText("CC-ST-AE classifier")
    ref.fill_button.click()
    assert (mask.data == SAMPLE).all()  # the toy classifier calls everything sample
    mask.undo()
    np.testing.assert_array_equal(mask.data, painted)
    session = get_session(viewer)
    assert np.isnan(session.results["ae"].maps.exx[painted == BACKGROUND]).all()


def test_user_colour_limits_survive_reference_and_mask_edits(docks, toy_methods, wait_task):
    viewer, mapping, ref = docks
    wait_task(mapping.run())
    exx = viewer.layers[map_layer_name("ae", "exx")]
    exx.contrast_limits = (-5.0, 5.0)
    get_session(viewer).set_reference_region("6:9,1:4")
    viewer.layers[MASK_LAYER].paint((6, 6), BACKGROUND, refresh=True)
    assert tuple(exx.contrast_limits) == (-5.0, 5.0)
    # layers the user did not touch still follow the data
    eyy = viewer.layers[map_layer_name("ae", "eyy")]
    assert eyy.contrast_limits[0] == -eyy.contrast_limits[1]


def test_mae_uses_the_users_reference_and_mask(docks, toy_methods, wait_task):
    from napari_stem_strain.pipeline import compare_to_truth

    viewer, mapping, _ = docks
    wait_task(mapping.run())
    session = get_session(viewer)
    session.set_reference_region("6:9,6:9")
    viewer.layers[MASK_LAYER].paint((7, 3), BACKGROUND, refresh=True)
    gt = session.ground_truth
    expected = compare_to_truth(
        session.results, gt.relative_to("6:9,6:9", session.sample_mask()))
    assert mapping.mae() == expected
    assert mapping.mae() != compare_to_truth(session.results, gt)


def test_virtual_detector_radii_can_be_set(docks, wait_task):
    viewer, _, ref = docks
    session = get_session(viewer)
    nav = session.nav_layer()
    before = np.array(nav.data, copy=True)
    auto = session.info()["virtual"]
    assert "in use: BF radius" in ref.virtual_label.text()
    ref.bf_radius.setValue(1.0)
    ref.adf_inner.setValue(6.0)
    ref.adf_outer.setValue(12.0)
    task = ref.recompute_virtual()
    wait_task(task)
    assert task.status == "done"
    vi = session.info()["virtual"]
    assert (vi.bf_radius, vi.adf_inner, vi.adf_outer) == (1.0, 6.0, 12.0)
    assert vi.bf_radius != auto.bf_radius
    assert not np.allclose(nav.data, before)
    assert "BF radius 1.0, ADF 6.0 to 12.0 px" in ref.virtual_label.text()
    # an annulus turned inside out is refused before any work
    ref.adf_outer.setValue(3.0)
    assert ref.recompute_virtual() is None
