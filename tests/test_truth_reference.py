"""The ground truth compared with maps the user re-referenced and masked must be re-referenced
and masked the same way, or the MAE measures the user's choices, not the method."""

from __future__ import annotations

import numpy as np
import pytest

from napari_stem_strain.io.results import MethodMaps
from napari_stem_strain.pipeline import compare_to_truth
from napari_stem_strain.strain import strain_maps


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    from napari_stem_strain.io.ground_truth import read_ground_truth
    from napari_stem_strain.simulate import SimulationSettings, simulate_to_file

    path = tmp_path_factory.mktemp("gt") / "sim.h5"
    simulate_to_file(path, SimulationSettings(scan=(16, 16), pattern=48, vacuum=True,
                                              n_grains=3, seed=4), workers=1)
    return read_ground_truth(path)


def _perfect(truth, region, mask=None):
    """A method that found the true A everywhere, shown relative to ``region``."""
    sample = truth.sample if mask is None else truth.sample & mask
    maps = strain_maps(truth.A, region, truth.symmetry_deg, mask=sample)
    return {"ae": MethodMaps("ae", maps, truth.A, sample, region, truth.symmetry_deg)}


def test_truth_relative_to_another_region_and_mask(truth):
    region = "9:12,9:12"
    assert region != truth.reference
    assert truth.sample[9:12, 9:12].all()
    mask = np.ones(truth.scan_shape, bool)
    mask[:4] = False  # the user painted the top rows background
    perfect = _perfect(truth, region, mask)
    # against the file's truth, a perfect method looks wrong
    assert max(compare_to_truth(perfect, truth)["ae"].values()) > 1e-3
    moved = truth.relative_to(region, mask)
    assert abs(np.nanmedian(moved.exx[9:12, 9:12])) < 1e-3
    assert not moved.sample[:4].any()
    assert max(compare_to_truth(perfect, moved)["ae"].values()) < 1e-4
    # the file's own region and no mask: the truth as stored
    same = truth.relative_to(truth.reference)
    np.testing.assert_allclose(same.exx, truth.exx, atol=1e-6, equal_nan=True)
