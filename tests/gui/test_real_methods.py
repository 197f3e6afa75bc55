"""The real methods, run from the mapping dock on a tiny simulated scan with ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from napari_stem_strain._widgets._session import get_session
from napari_stem_strain._widgets.mapping import MappingWidget
from napari_stem_strain._widgets.probe import ProbeInspector
from napari_stem_strain.overlay import find_disks
from napari_stem_strain.strain import parse_region


@pytest.mark.parametrize("method", ["py4dstem", "ae"])
def test_real_method_from_the_dock(method, make_napari_viewer, open_scan, tiny_sim, wait_task,
                                   errors):
    viewer = make_napari_viewer()
    open_scan(viewer, tiny_sim)
    w = MappingWidget(viewer)
    probe = ProbeInspector(viewer)
    viewer.window.add_dock_widget(w)
    viewer.window.add_dock_widget(probe)
    w.use_ae.setChecked(method == "ae")
    w.use_py4dstem.setChecked(method == "py4dstem")
    w.device.setCurrentIndex(1)  # CPU
    task = w.run()
    wait_task(task, timeout=300_000)
    assert task.status == "done", errors()
    session = get_session(viewer)
    assert set(session.results) == {method}
    table = w.mae()[method]
    # well under the simulated strains (up to 2 %) and rotations (up to 25 degrees)
    assert table["exx"] < 0.004 and table["eyy"] < 0.004 and table["exy"] < 0.004, table
    assert table["theta"] < 1.0, table
    # the overlay of a reference position lands on that pattern's disks
    rs, cs = parse_region(session.reference_region())
    session.set_probe(rs.start + 1, cs.start + 1)
    assert set(probe.overlay) == {method}
    found, _ = find_disks(probe.pattern, probe.centre, probe.lattice.radius)
    pred = probe.overlay[method][1:]
    d = np.linalg.norm(found[:, None] - pred[None], axis=2).min(axis=1)
    assert len(found) >= 4 and np.median(d) < 1.0
    assert errors() == []
