"""The block contract: declared per-position outputs, a frozen and small prepared method.

A prepared method is what dask scatters to every worker; it must not grow with the scan
(per-position results are the runner's arrays, never the method's attributes)."""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest

from napari_stem_strain.io.dataset import Dataset
from napari_stem_strain.methods.base import (
    A_OUTPUT,
    SAMPLE_OUTPUT,
    BandConsumer,
    BlockMethod,
    Output,
)
from napari_stem_strain.methods.runner import Assembly, run_method

HEX = (np.array([1.0, 0.0]), np.array([0.5, np.sqrt(3) / 2]))
MB = 2**20


class Tiled:
    """A lazy ``(R, R, Q, Q)`` array that repeats a small scan: a big declared scan whose
    rows are read on demand (nothing of its size is ever held)."""

    def __init__(self, small: np.ndarray, R: int, Ry: int | None = None) -> None:
        self.small = small
        self.shape = (R, Ry or R, *small.shape[2:])
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





# ---------------------------------------------------------------- windowed (streamed) outputs


class BoxRows(BandConsumer):
    """Sums a windowed output over ``halo`` rows either side (a toy pooled step); records the
    bands it was fed."""

    def __init__(self, scan_shape, rows, halo):
        self.rows, self.halo = rows, halo
        self.smooth = np.full(scan_shape, np.nan)
        self.bands = []

    def consume(self, r0, r1, h0, window, assembled):
        w = window["w"]
        h1 = h0 + len(w)
        assert h0 == max(0, r0 - self.halo) and h1 == min(len(self.smooth), r1 + self.halo)
        for r in range(r0, r1):
            lo, hi = max(h0, r - self.halo), min(h1, r + self.halo + 1)
            self.smooth[r] = w[lo - h0:hi - h0].sum(axis=(0, 2)) + assembled["total"][r]
        self.bands.append((r0, r1))

    def results(self):
        return {"smooth": self.smooth, "bands": self.bands}


class Smoothed(Counts):
    """Counts with a windowed scratch output (the row index folded into each value, so a row
    placed wrongly shows) consumed by :class:`BoxRows`."""

    name = "smoothed"

    def __init__(self, rows=4, halo=2):
        self.band_rows, self.band_halo = rows, halo

    def outputs(self):
        return (*super().outputs(), Output("w", (3,), "float64", 0.0, window=True))

    def band_consumer(self, scan_shape):
        return BoxRows(scan_shape, self.band_rows, self.band_halo)

    def process_block(self, block, r0):
        out = dict(super().process_block(block, r0))
        rows = (r0 + np.arange(block.shape[0]))[:, None, None]
        out["w"] = out["total"][..., None] * np.array([1.0, 0.5, 0.25]) + 1000.0 * rows
        return out

    def finish(self, out, seconds):
        assert "w" not in out  # never assembled whole
        res = self.result(out, seconds)
        res.extras["smooth"] = out["smooth"]
        res.extras["bands"] = out["bands"]
        return res


def _counts_data(Rx=23, Ry=3):
    return np.random.default_rng(2).poisson(3, (Rx, Ry, 4, 4)).astype(np.float32)


@pytest.mark.parametrize("rows,halo", [(4, 2), (5, 0), (3, 4), (40, 1)])
def test_windowed_output_streams_in_bands_equal_to_the_whole_scan_path(rows, halo):
    """One row per block, one block, or the whole-scan assembly: the same bands in row order
    and the same result, bit for bit."""
    data = _counts_data()
    ds = Dataset(data)
    runs = [run_method(Smoothed(rows, halo), ds, block_bytes=1),
            run_method(Smoothed(rows, halo), ds),
            run_method(Smoothed(rows, halo), ds, block_bytes=1, windowed=False)]
    want = [(r, min(23, r + rows)) for r in range(0, 23, rows)]
    for res in runs:
        assert res.extras["bands"] == want
        np.testing.assert_array_equal(res.extras["smooth"], runs[-1].extras["smooth"])
    assert np.isfinite(runs[0].extras["smooth"]).all()


def test_window_buffers_out_of_order_blocks_and_drops_rows_no_halo_needs():
    """Blocks arriving out of order (as on dask) wait until the rows above them are in; the
    rows held stay a few bands, never the scan; a missing block is an error, not a map with
    holes."""
    Rx, Ry = 60, 3
    data = _counts_data(Rx, Ry)
    method = Smoothed(rows=4, halo=2)
    blocks = [(r, r + 1) for r in range(Rx)]
    rng = np.random.default_rng(0)
    order = []
    for i in range(0, Rx, 5):  # shuffled within groups of 5 blocks
        order += list(rng.permutation(blocks[i:i + 5]))
    whole = run_method(Smoothed(rows=4, halo=2), Dataset(data), windowed=False)
    for feed, most in ((blocks, 4 + 2 * 2 + 1), (order, 4 + 2 * 2 + 5)):
        asm = Assembly(method, (Rx, Ry))
        assert "w" not in asm.arrays  # never allocated over the whole scan
        for r0, r1 in feed:
            asm.put(r0, r1, dict(method.process_block(data[r0:r1], r0)))
        res = method.finish(asm.results(), 0.0)
        np.testing.assert_array_equal(res.extras["smooth"], whole.extras["smooth"])
        assert asm.max_rows_held <= most, (asm.max_rows_held, most)
    asm = Assembly(method, (Rx, Ry))
    for r0, r1 in blocks[:10] + blocks[11:]:
        asm.put(r0, r1, dict(method.process_block(data[r0:r1], r0)))
    with pytest.raises(RuntimeError, match="never arrived"):
        asm.results()


def test_windowed_output_needs_a_consumer_and_must_be_nav_scratch():
    class NoConsumer(Smoothed):
        def band_consumer(self, scan_shape):
            return None

    with pytest.raises(ValueError, match="band_consumer"):
        run_method(NoConsumer(), Dataset(_counts_data()))
    with pytest.raises(ValueError, match="windowed"):
        Output("x", (), window=True, extra=True)
    with pytest.raises(ValueError, match="windowed"):
        Output("x", (), window=True, kind="sum")


@pytest.mark.slow
def test_ccstae_client_holds_a_window_of_disk_fits_not_the_scan(small_scan, monkeypatch):
    """The pooled last step's per-disk fits (~1.8 kB per position) are streamed: on a tall
    scan (128 x 2, blocks of 2 rows) the memory the runner holds between blocks (traced
    after every block is put in) stays below ONE whole-scan ``disk_fit`` array and stops
    growing once the first bands are consumed - the
    code before windowed outputs allocated it whole (~460 MiB at 512 x 512) - and ``A`` and
    its covariance equal the whole-scan path's, bit for bit."""
    import tracemalloc

    from napari_stem_strain.methods import runner
    from napari_stem_strain.methods.ccstae.infer import DISK_FIT

    Rx, Ry = 128, 2
    method = _prepared_ccstae(small_scan, Rx)
    ds = Dataset(Tiled(small_scan, Rx, Ry))
    K = int(method.engine.P.shape[0])
    whole_bytes = Rx * Ry * K * DISK_FIT * 4
    block = 2 * Ry * 64 * 64 * 4
    held = []
    put = runner.Assembly.put

    def traced_put(self, *args, **kw):
        put(self, *args, **kw)
        held.append(tracemalloc.get_traced_memory()[0])

    monkeypatch.setattr(runner.Assembly, "put", traced_put)
    worker = copy.deepcopy(method)  # before tracing: the method itself is not the runner's
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        res = run_method(worker, ds, prepared=True, block_bytes=block)
    finally:
        tracemalloc.stop()
    assert len(held) == Rx // 2
    most = max(held) - base  # a window of rows, the last block of patterns, A, A_cov, ...
    assert most < 0.6 * whole_bytes, (most, whole_bytes)
    # ... and it does not grow with the rows done
    assert max(held[-16:]) - max(held[16:32]) < 0.05 * whole_bytes, held
    ref = run_method(copy.deepcopy(method), ds, prepared=True, block_bytes=block,
                     windowed=False)
    assert np.isfinite(ref.A).all(axis=(2, 3)).sum() > 100  # a real map
    np.testing.assert_array_equal(res.A, ref.A)
    np.testing.assert_array_equal(res.A_cov, ref.A_cov)
    np.testing.assert_array_equal(res.sample, ref.sample)
