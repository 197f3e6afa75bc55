"""Compare side by side: one colour means one value in every tile, and turning the grid off
puts the layers back as they were."""

from __future__ import annotations

import dataclasses

import numpy as np

from napari_stem_strain._widgets._layers import map_layer_name
from napari_stem_strain._widgets._session import get_session
from napari_stem_strain._widgets.mapping import MappingWidget
from napari_stem_strain.io.results import MAP_NAMES


def test_grid_shares_limits_and_restores_visibility(make_napari_viewer, open_scan, tiny_sim,
                                                    toy_methods, wait_task):
    viewer = make_napari_viewer()
    open_scan(viewer, tiny_sim)
    w = MappingWidget(viewer)
    viewer.window.add_dock_widget(w)
    wait_task(w.run())
    session = get_session(viewer)
    # py4DSTEM sees a stronger strain gradient than CC-ST-AE
    raw = session.raw_results["py4dstem"]
    A = np.array(raw.A_raw, copy=True)
    rows = np.arange(A.shape[0])[:, None]
    A[..., 0, 0] *= 1 + 0.004 * rows
    session.set_results({"py4dstem": dataclasses.replace(raw, A_raw=A)})
    for comp in MAP_NAMES:
        ae = viewer.layers[map_layer_name("ae", comp)]
        py = viewer.layers[map_layer_name("py4dstem", comp)]
        assert tuple(ae.contrast_limits) == tuple(py.contrast_limits), comp

    maps = [viewer.layers[map_layer_name(m, c)] for m in ("ae", "py4dstem") for c in MAP_NAMES]
    # every map carries its colour bar (drawn while the map is shown)
    assert all(layer.colorbar.visible for layer in maps)
    shown = {layer.name: layer.visible for layer in viewer.layers}
    w.grid.setChecked(True)
    assert all(layer.visible for layer in maps)
    # each tile says what it is
    assert all(layer.name_overlay.visible for layer in maps)
    w.grid.setChecked(False)
    assert {layer.name: layer.visible for layer in viewer.layers} == shown
    assert not any(layer.name_overlay.visible for layer in maps)
