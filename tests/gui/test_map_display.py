"""How maps sit in the layer list: below the rectangle, mask and probe cross; a visible map
selected after a run; blank (NaN) positions over a neutral backdrop, not the grey image."""

from __future__ import annotations

import numpy as np

from napari_stem_strain._widgets._layers import META_KEY, map_layer_name
from napari_stem_strain._widgets._session import MASK_LAYER, REFERENCE_LAYER, get_session
from napari_stem_strain._widgets.mapping import MappingWidget
from napari_stem_strain._widgets.probe import PROBE_LAYER, ProbeInspector
from napari_stem_strain.figures import NAN_COLOUR


def _role(layer):
    return (layer.metadata.get(META_KEY) or {}).get("role")


def test_maps_below_overlays_visible_map_selected_nan_backdrop(make_napari_viewer, open_scan,
                                                               tiny_sim, toy_methods,
                                                               wait_task):
    viewer = make_napari_viewer()
    nav = open_scan(viewer, tiny_sim)
    mapping, probe = MappingWidget(viewer), ProbeInspector(viewer)
    for w in (mapping, probe):
        viewer.window.add_dock_widget(w)
    assert PROBE_LAYER in viewer.layers
    wait_task(mapping.run())
    layers = viewer.layers
    maps = [la for la in layers if _role(la) == "map"]
    assert len(maps) == 8
    top_map = max(layers.index(la) for la in maps)
    for name in (MASK_LAYER, REFERENCE_LAYER, PROBE_LAYER):
        assert layers.index(layers[name]) > top_map, f"{name} is hidden under the maps"

    active = layers.selection.active
    assert active is not None and _role(active) == "map" and active.visible

    # the sample has vacuum: blank positions sit on a neutral backdrop, not on the BF image
    session = get_session(viewer)
    assert np.isnan(session.results["ae"].maps.exx).any()
    blank = [la for la in layers if _role(la) == "blank"]
    assert len(blank) == 1
    blank = blank[0]
    assert layers.index(nav) < layers.index(blank) < min(layers.index(la) for la in maps)
    assert blank.visible and blank.opacity == 1.0
    np.testing.assert_allclose(blank.colormap.map(np.array([0.0, 1.0]))[:, :3],
                               [NAN_COLOUR, NAN_COLOUR], atol=0.01)
    np.testing.assert_allclose(blank.scale[-2:], nav.scale[-2:])
    # no map shown -> the backdrop goes too (the image is seen again); one shown -> back
    for la in maps:
        la.visible = False
    assert not blank.visible
    layers[map_layer_name("py4dstem", "theta")].visible = True
    assert blank.visible
    # side by side: no backdrop tile in the grid; back after the grid
    mapping.grid.setChecked(True)
    assert not blank.visible
    mapping.grid.setChecked(False)
    assert blank.visible


def test_scale_bar_is_shown_for_a_calibrated_scan(make_napari_viewer, open_scan, tiny_sim,
                                                  qtbot):
    from napari_stem_strain._reader import scale_bar

    viewer = make_napari_viewer()
    assert not scale_bar(viewer).visible
    open_scan(viewer, tiny_sim)
    qtbot.waitUntil(lambda: scale_bar(viewer).visible, timeout=2000)
