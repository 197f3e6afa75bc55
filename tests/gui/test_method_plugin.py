"""A method another package registers (entry point) appears in the mapping dock with its
label and colour, runs from it and shows as layers - no edit of this package needed."""

from __future__ import annotations

import numpy as np

from napari_stem_strain._widgets._layers import map_layer_name
from napari_stem_strain._widgets._session import get_session
from napari_stem_strain._widgets.mapping import MappingWidget


def test_plugin_method_runs_from_the_dock(make_napari_viewer, open_scan, tiny_sim, wait_task,
                                          errors, method_plugin):
    viewer = make_napari_viewer()
    open_scan(viewer, tiny_sim)
    w = MappingWidget(viewer)
    viewer.window.add_dock_widget(w)
    box = w.method_boxes[method_plugin]
    assert box.text() == "Toy plugin (a toy)" and not box.isChecked()
    assert w.methods() == ["ae", "py4dstem"]  # the default pair stays the default
    w.use_ae.setChecked(False)
    w.use_py4dstem.setChecked(False)
    box.setChecked(True)
    task = w.run()
    assert task is not None
    wait_task(task)
    assert task.status == "done", errors()
    session = get_session(viewer)
    assert set(session.results) == {method_plugin}
    layer = viewer.layers[map_layer_name(method_plugin, "exx")]
    assert layer.name.startswith("Toy plugin ")
    assert np.isfinite(layer.data).any()
