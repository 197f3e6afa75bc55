"""Strain-mapping dock: run, results as layers, histograms, MAE, cancel, close, errors."""

from __future__ import annotations

import numpy as np
import pytest

from napari_stem_strain._widgets._layers import map_layer_name
from napari_stem_strain._widgets._session import get_session
from napari_stem_strain._widgets._workers import running_tasks
from napari_stem_strain._widgets.mapping import MappingWidget
from napari_stem_strain.strain import strain_maps


@pytest.fixture
def setup(make_napari_viewer, open_scan, tiny_sim):
    """A viewer with the tiny simulation open and the mapping dock added."""

    def make():
        viewer = make_napari_viewer()
        open_scan(viewer, tiny_sim)
        w = MappingWidget(viewer)
        viewer.window.add_dock_widget(w)
        return viewer, w

    return make


def test_run_both_methods_shows_maps_in_percent(setup, qtbot, wait_task, toy_methods, errors):
    viewer, w = setup()
    session = get_session(viewer)
    region = session.reference_region()
    gt = session.ground_truth
    assert region == gt.reference  # the simulation's own reference is the default
    task = w.run()
    assert task is not None
    assert not w.run_button.isEnabled() and w.cancel_button.isEnabled()
    wait_task(task)
    assert task.status == "done", errors()
    # the progress bar counted every position of both methods
    assert task.pbar.total == 2 * 144 and task.pbar.n == 2 * 144
    assert [m for m, _ in toy_methods["made"]] == ["ae", "py4dstem"]
    assert toy_methods["made"][0][1]["reference"] == region
    assert set(session.results) == {"ae", "py4dstem"}
    # maps = strain from the toy A, relative to the rectangle, in percent / degrees
    raw = session.raw_results["ae"]
    mask = session.sample_mask()
    expected = strain_maps(raw.A_raw, region, 360.0, mask=raw.sample & mask)
    exx = viewer.layers[map_layer_name("ae", "exx")]
    np.testing.assert_allclose(exx.data, expected.exx * 100, rtol=1e-5, atol=1e-6,
                               equal_nan=True)
    theta = viewer.layers[map_layer_name("py4dstem", "theta")]
    np.testing.assert_allclose(theta.data, expected.theta, atol=1e-4, equal_nan=True)
    lo, hi = exx.contrast_limits
    assert lo == -hi and hi > 0
    assert np.isnan(exx.data[~mask]).all()  # vacuum stays NaN
    assert w.run_button.isEnabled() and w.status.text() == "done"
    # histograms: one step histogram per method in each of the four panels
    axes = w.hist_figure.axes
    assert len(axes) == 4 and all(len(ax.patches) == 2 for ax in axes)
    # MAE table against the file's ground truth
    table = w.mae()
    assert set(table) == {"ae", "py4dstem"}
    assert w.mae_table.rowCount() == 2
    assert float(w.mae_table.item(0, 0).text()) == round(table["ae"]["exx"] * 100, 3)
    assert errors() == []
    # side by side: napari's grid, one row per method, only the maps shown
    w.grid.setChecked(True)
    grid = viewer.canvas.grid
    assert grid.enabled and tuple(grid.shape) == (2, 4)
    layers = list(viewer.layers)

    def cell(method, comp):
        return grid.position(layers.index(viewer.layers[map_layer_name(method, comp)]), layers)

    assert {cell("ae", c)[0] for c in ("exx", "eyy", "exy", "theta")} == {cell("ae", "exx")[0]}
    assert cell("ae", "exx")[0] != cell("py4dstem", "exx")[0]
    print("grid cells", cell("ae", "exx"), cell("ae", "theta"), cell("py4dstem", "exx"))
    visible = [layer.name for layer in viewer.layers if layer.visible]
    assert len(visible) == 8 and all("(%)" in n or "(deg)" in n for n in visible)
    w.grid.setChecked(False)
    assert not viewer.canvas.grid.enabled
    assert viewer.layers["reference region"].visible


def test_cancel_stops_the_run_and_changes_nothing(setup, qtbot, wait_task, toy_methods, errors):
    toy_methods["delay"] = 0.15  # 12 one-row blocks per method: ~3.6 s in all
    viewer, w = setup()
    task = w.run()
    qtbot.waitUntil(lambda: task.pbar.n > 0, timeout=10_000)
    w.cancel_button.click()
    wait_task(task, timeout=10_000)
    assert task.status == "cancelled"
    assert not any("(%)" in layer.name for layer in viewer.layers)
    assert "cancelled" in w.status.text()
    assert errors() == []
    assert w.run_button.isEnabled()


def test_closing_napari_during_a_run_stops_it(setup, qtbot, wait_task, toy_methods):
    toy_methods["delay"] = 0.15
    viewer, w = setup()
    task = w.run()
    qtbot.waitUntil(lambda: task.pbar.n > 0, timeout=10_000)
    viewer.close()  # what File > Exit or the close button does (closeEvent)
    qtbot.waitUntil(lambda: task not in running_tasks(), timeout=10_000)
    assert task.status == "cancelled"
    assert not task.worker.isRunning() if hasattr(task.worker, "isRunning") else True


def test_method_error_is_a_notification(setup, qtbot, wait_task, toy_methods,
                                        errors):
    toy_methods["fail"] = True
    viewer, w = setup()
    task = w.run()
    wait_task(task)
    assert task.status == "failed"
    msgs = errors()
    assert msgs == ["Strain mapping failed: toy method cannot fit these patterns"]
    assert w.run_button.isEnabled()


def test_without_data_explains_and_devices_show_what_is_present(make_napari_viewer, qtbot,
                                                                 errors, open_scan, tiny_sim):
    from napari_stem_strain.device import available_devices

    viewer = make_napari_viewer()
    w = MappingWidget(viewer)
    assert w.run() is None
    assert "open a 4D-STEM file" in errors()[-1]
    w.use_ae.setChecked(False)
    w.use_py4dstem.setChecked(False)
    assert w.run() is None
    qtbot.waitUntil(lambda: w.devices_known, timeout=60_000)
    items = [w.device.itemData(i) for i in range(w.device.count())]
    assert items == ["auto", "cpu", "cuda"]
    cuda_enabled = w.device.model().item(2).isEnabled()
    assert cuda_enabled == ("cuda" in available_devices())
    assert ("CUDA" in w.device_info.text())
    # docks opened before the data: opening a file then brings rectangle and mask
    open_scan(viewer, tiny_sim)
    session = get_session(viewer)
    assert session.reference_region() == session.ground_truth.reference
    assert session.sample_mask() is not None and session.sample_mask().sum() > 100


def test_model_choices_reach_the_pipeline(setup, wait_task, toy_methods, monkeypatch, tmp_path,
                                          errors):
    from napari_stem_strain.methods import ccstae

    viewer, w = setup()
    session = get_session(viewer)
    # a model file that does not exist is refused before anything runs
    w.model.setCurrentText("model file...")
    assert w.model_path.isVisibleTo(w) and not w.epochs.isVisibleTo(w)
    w.model_path.setText(str(tmp_path / "missing.pt"))
    assert w.run() is None
    assert "does not exist" in errors()[-1]
    # an existing file is handed to the pipeline as the CC-ST-AE model
    model_file = tmp_path / "fitted.pt"
    model_file.write_bytes(b"x")
    w.model_path.setText(str(model_file))
    w.use_py4dstem.setChecked(False)
    wait_task(w.run())
    assert toy_methods["made"][-1] == ("ae", toy_methods["made"][-1][1])
    assert toy_methods["made"][-1][1]["model"] == str(model_file)
    # "fit on this dataset now": fit first (same reference, device, epochs), then map with it
    fits = []

    def fake_fit(dataset, init="default", epochs=None, seed=0, out="model.pt", progress=None,
                 should_stop=None, reference=None, device="auto", **kw):
        fits.append(dict(dataset=dataset, epochs=epochs, out=out, reference=reference,
                         device=device))
        progress(1, 2, "epoch 1")
        return out

    monkeypatch.setattr(ccstae, "fit_model", fake_fit)
    w.model.setCurrentText("fit on this dataset now")
    assert w.epochs.isVisibleTo(w)
    w.epochs.setValue(3)
    task = w.run()
    wait_task(task)
    assert task.status == "done", errors()
    assert len(fits) == 1 and fits[0]["epochs"] == 3
    assert fits[0]["dataset"] is session.dataset
    assert fits[0]["reference"] == session.reference_region()
    assert toy_methods["made"][-1][1]["model"] == fits[0]["out"]


def test_dask_cluster_from_settings_maps_the_same(setup, wait_task, errors, monkeypatch):
    """The dock's Dask address (kept in the plugin settings) sends the real py4DSTEM method's
    blocks to a real local cluster; the maps equal those of a run on this machine."""
    from napari_stem_strain._widgets import mapping

    viewer, w = setup()
    session = get_session(viewer)
    w.use_ae.setChecked(False)
    wait_task(w.run(), timeout=120_000)
    here = session.raw_results["py4dstem"].A_raw.copy()
    assert np.isfinite(here).any()
    from napari_stem_strain import distributed

    real, calls = distributed.run_method_dask, []

    def counted(method, dataset, address, **kw):
        calls.append(address)
        return real(method, dataset, address, **kw)

    monkeypatch.setattr(distributed, "run_method_dask", counted)
    w.dask_address.setText("local:1")
    task = w.run()
    wait_task(task, timeout=120_000)
    assert task.status == "done", errors()
    assert calls == ["local:1"]  # the blocks really went to the cluster
    np.testing.assert_array_equal(session.raw_results["py4dstem"].A_raw, here)
    assert mapping._settings().value(mapping.DASK_KEY) == "local:1"
    # a new dock starts with the remembered address
    assert mapping.MappingWidget(viewer).dask_address.text() == "local:1"


def test_mae_cells_split_the_error_into_grain_bias_and_scatter(setup, wait_task, toy_methods,
                                                                errors):
    """Each MAE cell's tooltip gives the mean per-grain |bias| and the within-grain scatter
    (same units as the cell): whether a method's error is systematic or noise, which the MAE
    alone does not say (docs/benchmarks.md "Bias and scatter")."""
    from napari_stem_strain.pipeline import bias_scatter_to_truth

    viewer, w = setup()
    session = get_session(viewer)
    wait_task(w.run())
    assert errors() == []
    gt = session.ground_truth.relative_to(session.reference_region(), session.sample_mask())
    split = bias_scatter_to_truth(session.results, gt)
    assert set(split) == {"ae", "py4dstem"}
    for i, method in enumerate(("ae", "py4dstem")):
        b, s, _ = split[method]["exx"]
        tip = w.mae_table.item(i, 0).toolTip()
        assert "bias" in tip and "scatter" in tip, tip
        assert f"{b * 100:.3f}" in tip and f"{s * 100:.3f}" in tip, tip
