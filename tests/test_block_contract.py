"""The block contract: declared per-position outputs, a frozen and small prepared method.

A prepared method is what dask scatters to every worker; it must not grow with the scan
(per-position results are the runner's arrays, never the method's attributes)."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest

from napari_stem_strain.io.dataset import Dataset
from napari_stem_strain.methods.base import A_OUTPUT, SAMPLE_OUTPUT, BlockMethod, Output
from napari_stem_strain.methods.runner import run_method

HEX = (np.array([1.0, 0.0]), np.array([0.5, np.sqrt(3) / 2]))
MB = 2**20


class Tiled:
    """A lazy ``(R, R, Q, Q)`` array that repeats a small scan: a big declared scan whose
    rows are read on demand (nothing of its size is ever held)."""

    def __init__(self, small: np.ndarray, R: int) -> None:
        self.small = small
        self.shape = (R, R, *small.shape[2:])
        self.dtype = small.dtype

    def __getitem__(self, rows: slice) -> np.ndarray:
        r0, r1, _ = rows.indices(self.shape[0])
        sx, sy = self.small.shape[:2]
        idx_r = np.arange(r0, r1) % sx
        idx_c = np.arange(self.shape[1]) % sy
        return self.small[idx_r][:, idx_c]


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory) -> np.ndarray:
    from napari_stem_strain.io.readers import open_dataset
    from napari_stem_strain.simulate import SimulationSettings, simulate_to_file

    path = tmp_path_factory.mktemp("sim") / "tiny.h5"
    simulate_to_file(path, SimulationSettings(scan=(8, 8), pattern=64, seed=1), workers=1)
    with open_dataset(path) as ds:
        return ds.read_rows(0, 8)


def _prepared_ccstae(small: np.ndarray, R: int, **kw):
    from napari_stem_strain.methods.ccstae import CCSTAEMethod
    from napari_stem_strain.methods.ccstae.modelfile import new_model

    method = CCSTAEMethod(new_model(*HEX, n=16, extent=2.6, width=4, seed=1), device="cpu",
                          **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method.prepare(Dataset(Tiled(small, R)))
    return method


@pytest.mark.slow
def test_prepared_ccstae_pickles_small_whatever_the_scan_size(small_scan):
    """<= 2 MB at a 32 x 32 and a 512 x 512 declared scan, and the same size at both: before
    the declared-outputs contract ``prepare`` allocated ~1.8 kB per position on the method
    (16.7 MB at 32 x 32, ~460 MiB at 512 x 512)."""
    sizes = {R: len(pickle.dumps(_prepared_ccstae(small_scan, R))) for R in (32, 512)}
    assert sizes[32] <= 2 * MB and sizes[512] <= 2 * MB, sizes
    assert abs(sizes[512] - sizes[32]) < 1024, sizes


@pytest.mark.slow
def test_a_sample_mask_travels_with_the_blocks_not_the_method(small_scan):
    """A user's mask is a per-position input: the copy sent to workers leaves it behind."""
    mask = np.ones((512, 512), bool)
    method = _prepared_ccstae(small_scan, 512, sample_mask=mask)
    assert method.sample_mask is mask or np.array_equal(method.sample_mask, mask)
    worker = method.for_workers()
    assert not worker.inputs() and method.inputs()  # the client's method keeps it
    assert len(pickle.dumps(worker)) <= 2 * MB
    assert len(pickle.dumps(method)) > len(pickle.dumps(worker)) + 200_000


@pytest.mark.slow
def test_a_run_leaves_the_prepared_method_unchanged(small_scan):
    """Frozen after prepare: processing blocks writes nothing onto the method."""
    method = _prepared_ccstae(small_scan, 8)
    before = pickle.dumps(method)
    res = run_method(method, Dataset(small_scan), prepared=True, block_bytes=2 * 8 * 64 * 64 * 4)
    assert pickle.dumps(method) == before
    assert res.extras["class_prob"].shape == (8, 8)
    assert set(res.extras) == {"class_prob"}  # the pooling scratch is not an extra


class Counts(BlockMethod):
    """A toy method with one extra output of its own (total counts per position)."""

    name = "counts"

    def outputs(self):
        return (A_OUTPUT, SAMPLE_OUTPUT, Output("total", (), "float64", np.nan, extra=True))

    def process_block(self, block, r0):
        tot = block.sum(axis=(-2, -1), dtype=np.float64)
        A = np.broadcast_to(np.eye(2, dtype=np.float32), (*tot.shape, 2, 2))
        return {"A": A, "sample": tot > 0, "total": tot}


def test_declared_output_reaches_extras_and_one_block_equals_many():
    data = np.random.default_rng(0).poisson(3, (5, 4, 6, 6)).astype(np.float32)
    one = run_method(Counts(), Dataset(data))
    many = run_method(Counts(), Dataset(data), block_bytes=1)
    np.testing.assert_array_equal(one.extras["total"], data.sum(axis=(-2, -1)))
    np.testing.assert_array_equal(one.extras["total"], many.extras["total"])


def test_wrong_block_shape_or_missing_output_is_a_clear_error():
    class Bad(Counts):
        def process_block(self, block, r0):
            out = dict(super().process_block(block, r0))
            out["total"] = out["total"][:, :1]
            return out

    class Missing(Counts):
        def process_block(self, block, r0):
            return {"A": np.zeros((*block.shape[:2], 2, 2)),
                    "sample": np.ones(block.shape[:2], bool)}

    data = np.ones((3, 2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="'total'.*declared"):
        run_method(Bad(), Dataset(data))
    with pytest.raises(ValueError, match="did not return"):
        run_method(Missing(), Dataset(data))


def test_per_position_input_rows_reach_process_block():
    class Masked(Counts):
        def __init__(self, mask):
            self.set_input("keep", mask)

        def process_block(self, block, r0, keep):
            out = dict(super().process_block(block, r0))
            out["sample"] = keep
            return out

    mask = np.random.default_rng(1).random((7, 3)) > 0.5
    data = np.ones((7, 3, 4, 4), np.float32)
    res = run_method(Masked(mask), Dataset(data), block_bytes=2 * 3 * 16 * 4)
    np.testing.assert_array_equal(res.sample, mask)
    with pytest.raises(ValueError, match="per-position input 'keep'"):
        run_method(Masked(mask[:2]), Dataset(data))


def test_old_style_pair_still_accepted_only_for_two_outputs():
    class Pair(BlockMethod):
        def process_block(self, block, r0):
            return np.zeros((*block.shape[:2], 2, 2)), np.ones(block.shape[:2], bool)

    res = run_method(Pair(), Dataset(np.ones((2, 2, 3, 3), np.float32)))
    assert res.sample.all() and res.A.dtype == np.float32



