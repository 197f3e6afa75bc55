"""Error bars in napari (issue 13): hidden sigma layers, value +- sigma in the probe
inspector, "mask where sigma >" greys positions, z histograms against ground truth."""

from __future__ import annotations

import numpy as np

from napari_stem_strain._widgets._layers import map_layer_name, sigma_layer_name
from napari_stem_strain._widgets._session import get_session
from napari_stem_strain._widgets.mapping import MappingWidget
from napari_stem_strain.io.results import MethodMaps
from napari_stem_strain.methods.base import MethodResult


def _results_with_sigma(truth) -> dict[str, MethodMaps]:
    """The truth's A plus noise, with error bars: small on the left half, 10x on the right."""
    rng = np.random.default_rng(0)
    shape = truth.exx.shape
    s = np.where(np.arange(shape[1])[None, :] < shape[1] // 2, 1e-4, 1e-3) * np.ones(shape)
    A = np.asarray(truth.A, float) + rng.normal(size=(*shape, 2, 2)) * s[..., None, None]
    cov = (s[..., None, None] ** 2 * np.eye(4)).astype(np.float32)
    cov[~truth.sample] = np.nan
    res = MethodResult("ae", A.astype(np.float32), np.asarray(truth.sample, bool), {}, 1.0,
                       truth.symmetry_deg, A_cov=cov)
    return {"ae": MethodMaps.from_result(res, truth.reference)}


def test_sigma_layers_mask_inspector_and_z_histograms(make_napari_viewer, open_scan, tiny_sim,
                                                       qtbot):
    viewer = make_napari_viewer()
    open_scan(viewer, tiny_sim)
    w = MappingWidget(viewer)
    viewer.window.add_dock_widget(w)
    session = get_session(viewer)
    truth = session.ground_truth
    session.set_results(_results_with_sigma(truth))
    # one hidden uncertainty layer per component, in display units
    for comp in ("exx", "eyy", "exy", "theta"):
        layer = viewer.layers[sigma_layer_name("ae", comp)]
        assert not layer.visible
        assert np.nanmax(layer.data) > 0
    exx = viewer.layers[map_layer_name("ae", "exx")]
    shown_before = np.isfinite(exx.data)
    # mask where strain sigma > 0.05 %: the right half (sigma ~0.1 %) greys out, the left
    # stays (the rotation limit, 10 deg, masks nothing)
    half = exx.data.shape[1] // 2
    theta = viewer.layers[map_layer_name("ae", "theta")]
    w.sigma_limit_deg.setValue(10.0)
    w.sigma_mask.setChecked(True)
    w.sigma_limit.setValue(0.05)
    assert np.isnan(exx.data[:, half:]).all() and np.isnan(theta.data[:, half:]).all()
    assert (np.isfinite(exx.data[:, :half]) == shown_before[:, :half]).all()
    assert np.isfinite(exx.data[:, :half]).any()
    # the rotation's limit is in degrees: its sigma is ~0.06 deg on the right, ~0.006 on the
    # left, so 0.02 deg masks the right half alone, whatever the strain limit
    w.sigma_limit.setValue(100.0)
    assert (np.isfinite(exx.data) == shown_before).all()
    w.sigma_limit_deg.setValue(0.02)
    assert np.isnan(exx.data[:, half:]).all()
    assert (np.isfinite(exx.data[:, :half]) == shown_before[:, :half]).all()
    w.sigma_mask.setChecked(False)
    assert (np.isfinite(exx.data) == shown_before).all()
    # probe inspector: value +- sigma
    from napari_stem_strain._widgets.probe import ProbeInspector

    insp = ProbeInspector(viewer)
    r, c = np.argwhere(np.isfinite(exx.data))[0]
    assert "&plusmn;" in insp._numbers_html(int(r), int(c))
    # histograms of (estimate - truth) / sigma against the file's ground truth
    assert w.hist_z.isEnabled()
    w.hist_z.setChecked(True)
    axes = w.hist_figure.axes
    assert len(axes) == 4 and all(len(ax.patches) == 1 for ax in axes)
    zs = w.residual_z()["ae"]
    assert 0.7 < np.std(zs["exx"]) < 1.4
