"""File > Open Sample: both samples are generated, cached, and open like a file."""

from __future__ import annotations

import numpy as np
import pytest

from napari_stem_strain import _sample_data


@pytest.mark.parametrize("key", ["polycrystal", "tmd_flake"])
def test_open_sample(make_napari_viewer, key):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-stem-strain", key)
    navs = [layer for layer in viewer.layers
            if layer.metadata.get("stem_strain", {}).get("role") == "navigation"]
    assert len(navs) == 1
    info = navs[0].metadata["stem_strain"]
    assert info["dataset"].shape == (48, 48, 64, 64)
    gt = info["ground_truth"]
    assert gt is not None and gt.symmetry_deg == 60.0
    # the flake has vacuum around it, the polycrystal fills the scan
    assert (not gt.sample.all()) == (key == "tmd_flake")
    assert np.isfinite(navs[0].data).all()
    # cached: a second request reuses the file
    path = _sample_data.sample_path(key)
    mtime = path.stat().st_mtime_ns
    assert _sample_data.sample_path(key).stat().st_mtime_ns == mtime
