"""The pipeline glue: method names, default reference, streaming runner, MAE table."""

from __future__ import annotations

import numpy as np
import pytest

from napari_stem_strain.io.dataset import Dataset
from napari_stem_strain.io.results import MethodMaps
from napari_stem_strain.methods.base import BlockMethod, Cancelled
from napari_stem_strain.methods.runner import run_method
from napari_stem_strain.pipeline import compare_to_truth, default_reference, expand_methods
from napari_stem_strain.strain import parse_region, strain_to_A


class ScaleFromIntensity(BlockMethod):
    """A toy method: isotropic A from each pattern's mean (enough to test the plumbing)."""

    name = "toy"

    def process_block(self, block, r0):
        s = 1.0 + block.mean(axis=(2, 3))
        A = np.zeros(block.shape[:2] + (2, 2), np.float32)
        A[..., 0, 0] = A[..., 1, 1] = s
        return A, s > 1.0


def test_expand_methods():
    assert expand_methods("both") == ["ae", "py4dstem"]
    with pytest.raises(ValueError, match="unknown method"):
        expand_methods("magic")


def test_default_reference_is_inside_sample():
    sample = np.ones((30, 40), bool)
    sample[:, :10] = False
    rs, cs = parse_region(default_reference(sample))
    assert sample[rs, cs].all()
    assert rs.stop - rs.start >= 2


def test_runner_same_in_one_block_or_many_and_reports_progress():
    data = np.random.default_rng(1).random((9, 5, 4, 4)).astype(np.float32)
    ds = Dataset(data=data)
    seen = []
    one = run_method(ScaleFromIntensity(), ds, block_bytes=10**9)
    many = run_method(ScaleFromIntensity(), ds, block_bytes=1,
                      progress=lambda d, t, m: seen.append((d, t)))
    np.testing.assert_array_equal(one.A, many.A)
    assert seen[-1] == (45, 45) and len(seen) == 9


def test_runner_cancel():
    ds = Dataset(data=np.zeros((4, 4, 2, 2), np.float32))
    with pytest.raises(Cancelled):
        run_method(ScaleFromIntensity(), ds, should_stop=lambda: True)


def test_compare_to_truth_counts_nan_as_worst():
    class Truth:
        exx = np.full((4, 4), 0.01)
        eyy = np.zeros((4, 4))
        exy = np.zeros((4, 4))
        theta = np.zeros((4, 4))
        sample = np.ones((4, 4), bool)
        symmetry_deg = 60.0

    A = strain_to_A(Truth.exx, 0, 0, 0)
    A[:2] = np.eye(2)
    from napari_stem_strain.methods.base import MethodResult

    res = MethodResult("x", A, np.ones((4, 4), bool))
    g = MethodMaps.from_result(res, "0:2,0:4")
    table = compare_to_truth({"x": g}, Truth)
    # rows 0-1 are zero strain (error 0.01 each), rows 2-3 ~0.01 (error ~0)
    assert table["x"]["exx"] == pytest.approx(0.005, abs=2e-4)
    g.maps.exx[3, 3] = np.nan
    assert compare_to_truth({"x": g}, Truth)["x"]["exx"] > table["x"]["exx"]
