"""The dask engine gives the single-process runner's result exactly, and survives faults.

Clusters run on 127.0.0.1 with one-thread workers; data are a few kilobytes so the whole file
stays well under a minute on two cores. Worker *processes* are used only where the test needs
a process to kill.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import cloudpickle
import h5py
import numpy as np
import pytest

from napari_stem_strain.distributed import (
    ClusterError,
    DatasetRef,
    block_ranges,
    parse_address,
    run_method_dask,
)
from napari_stem_strain.io.dataset import Dataset
from napari_stem_strain.io.errors import DataError
from napari_stem_strain.io.readers import open_dataset
from napari_stem_strain.methods.base import BlockMethod, Cancelled
from napari_stem_strain.methods.runner import run_method

distributed = pytest.importorskip("distributed")

# Worker processes cannot import this test module: ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ComMethod(BlockMethod):
    """A small deterministic method: ``A`` from each pattern's centre of mass and total.

    ``prepare`` derives a threshold from the data (so a worker that re-prepared, or did not
    receive the prepared object, would give a different sample mask).
    """

    name = "com"

    def __init__(self) -> None:
        self.threshold: float | None = None
        self.prepared_times = 0

    def prepare(self, dataset, progress=None, should_stop=None) -> None:
        first = dataset.read_rows(0, 1)
        self.threshold = float(np.median(first.sum(axis=(-2, -1))))
        self.prepared_times += 1

    def process_block(self, block: np.ndarray, r0: int):
        assert self.threshold is not None, "process_block before prepare"
        b = np.asarray(block, np.float64)
        tot = b.sum(axis=(-2, -1))
        qx = np.arange(b.shape[-2])[:, None]
        qy = np.arange(b.shape[-1])[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            cx = (b * qx).sum(axis=(-2, -1)) / tot
            cy = (b * qy).sum(axis=(-2, -1)) / tot
        A = np.empty((*tot.shape, 2, 2), np.float32)
        A[..., 0, 0] = 1 + cx / 100
        A[..., 0, 1] = cy / 100
        # the absolute scan row: a block placed at the wrong rows shows
        A[..., 1, 0] = (r0 + np.arange(b.shape[0]))[:, None] / 1000
        A[..., 1, 1] = 1 + tot / 1e7
        return A, tot > self.threshold


class SlowMethod(ComMethod):
    """ComMethod that takes a while per block, so a worker can be killed mid-run."""

    name = "slow"

    def process_block(self, block, r0):
        time.sleep(0.4)
        return super().process_block(block, r0)


class FlakyMethod(ComMethod):
    """Fails the first attempt at every block; attempts are counted in marker files, which
    every worker (thread or process) sees."""

    name = "flaky"

    def __init__(self, marker_dir: Path) -> None:
        super().__init__()
        self.marker_dir = marker_dir

    def process_block(self, block, r0):
        marker = self.marker_dir / f"{r0}"
        attempts = len(list(self.marker_dir.glob(f"{r0}.*")))
        (marker.with_suffix(f".{attempts}")).touch()
        if attempts == 0:
            raise OSError(f"transient read error at row {r0}")
        return super().process_block(block, r0)


class CrashingMethod(ComMethod):
    """Kills its worker process on one block (a segfaulting library, an OOM kill)."""

    name = "crash"

    def process_block(self, block, r0):
        if r0 == 0:
            os._exit(1)
        return super().process_block(block, r0)


#: LocalCluster options: loopback TCP, dashboard on a free loopback port.
LOOPBACK = {"host": "127.0.0.1", "protocol": "tcp://", "dashboard_address": "127.0.0.1:0"}

SHAPE = (13, 5, 8, 8)


@pytest.fixture(scope="module")
def h5file(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    data = rng.poisson(20, SHAPE).astype(np.uint16)
    data[3, 2] = 0  # an empty pattern: NaN centre of mass must travel through unchanged
    path = tmp_path_factory.mktemp("dist") / "scan.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=data, chunks=(1, *SHAPE[1:]))
    return path


def open_h5(path: Path) -> Dataset:
    """The project's reader: workers reopen the file with it too."""
    return open_dataset(path)


@pytest.fixture(scope="module")
def threads_cluster():
    """Two in-process, one-thread workers: fast to start, share memory with the test."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  **LOOPBACK) as cluster:
        yield cluster


def reference(method_cls, path: Path, block_bytes: int | None = None):
    with open_h5(path) as ds:
        return run_method(method_cls(), ds, block_bytes=block_bytes)


def assert_same(res, ref) -> None:
    np.testing.assert_array_equal(res.A, ref.A)
    np.testing.assert_array_equal(res.sample, ref.sample)
    assert res.method == ref.method
    assert res.settings == ref.settings


# ---------------------------------------------------------------------------- basics


def test_parse_address():
    assert parse_address("local:3") == ("local", 3)
    assert parse_address("tcp://10.0.0.1:8786") == ("tcp://10.0.0.1:8786", None)
    for bad in ("local:x", "local:0", "", "nonsense"):
        with pytest.raises(ValueError, match="dask address"):
            parse_address(bad)


def test_block_ranges_cover_scan_once():
    for Rx in (1, 7, 13):
        for rows in (1, 2, 5, 100):
            got = block_ranges(Rx, rows)
            covered = np.concatenate([np.arange(a, b) for a, b in got])
            np.testing.assert_array_equal(covered, np.arange(Rx))


def test_bad_address_fails_before_prepare(h5file):
    m = ComMethod()
    with open_h5(h5file) as ds, pytest.raises(ValueError, match="dask address"):
        run_method_dask(m, ds, "nonsense")
    assert m.prepared_times == 0


def test_unreachable_scheduler_is_one_clear_error(h5file):
    with open_h5(h5file) as ds, pytest.raises(OSError, match="127.0.0.1:9"):
        run_method_dask(ComMethod(), ds, "tcp://127.0.0.1:9", connect_timeout=1)


# ---------------------------------------------------------------------------- identity


def test_identical_to_runner_on_existing_cluster(h5file, threads_cluster):
    ref = reference(ComMethod, h5file)
    calls: list[tuple[int, int]] = []
    m = ComMethod()
    with open_h5(h5file) as ds:
        # 2 rows per block -> 7 blocks spread over 2 workers, finishing out of order
        res = run_method_dask(m, ds, threads_cluster.scheduler_address,
                              progress=lambda d, t, msg: calls.append((d, t)),
                              block_bytes=2 * 5 * 8 * 8 * 4)
    assert_same(res, ref)
    assert np.isnan(res.A[3, 2, 0, 0])  # the empty pattern stayed NaN
    assert m.prepared_times == 1  # prepared once, on the client
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and dones[-1] == 13 * 5
    assert all(t == 13 * 5 for _, t in calls)
    assert len(calls) == 7


def test_local_address_starts_and_closes_cluster(h5file):
    """``local:2`` as the CLI passes it: two worker processes, gone when the run returns."""
    import psutil

    ref = reference(ComMethod, h5file, block_bytes=4 * 5 * 8 * 8 * 4)
    def workers() -> set[int]:
        """Live spawned worker processes (not multiprocessing's long-lived resource tracker)."""
        out = set()
        for p in psutil.Process().children(recursive=True):
            try:
                if p.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.cmdline()):
                    out.add(p.pid)
            except psutil.Error:
                pass
        return out

    before = workers()
    seen: list[set[int]] = []
    with open_h5(h5file) as ds:
        res = run_method_dask(ComMethod(), ds, "local:2", block_bytes=3 * 5 * 8 * 8 * 4,
                              progress=lambda d, t, m: seen.append(workers() - before))
    assert_same(res, ref)
    assert max(len(s) for s in seen) >= 2  # they really were processes (nanny + worker)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = workers() - before
        if not left:
            break
        time.sleep(0.2)
    assert not left, f"worker processes left running: {left}"


def test_in_memory_dataset(threads_cluster):
    rng = np.random.default_rng(1)
    arr = rng.random((6, 4, 8, 8)).astype(np.float32)
    ref = run_method(ComMethod(), Dataset(arr))
    ds = Dataset(arr)
    assert DatasetRef.from_dataset(ds) is None
    res = run_method_dask(ComMethod(), ds, threads_cluster.scheduler_address,
                          block_bytes=8 * 8 * 4 * 4)
    assert_same(res, ref)


def test_worker_rejects_a_different_file(h5file, tmp_path):
    with open_h5(h5file) as ds:
        ref = DatasetRef.from_dataset(ds)
    other = DatasetRef(ref.path, ref.name, (99, 5, 8, 8), ref.stamp)
    with pytest.raises(DataError, match="495 positions"):  # the reader's own check
        other.open()
    other = DatasetRef(ref.path, ref.name, (13, 5, 8, 9), ref.stamp)
    with pytest.raises(DataError, match="dask worker sees shape"):
        other.open()
    other = DatasetRef(ref.path, ref.name, ref.shape, ref.stamp, (1.0, 2.0))
    with pytest.raises(DataError, match="reads different patterns"):
        other.open()
    assert ref.open().shape == SHAPE  # the true reference opens
    gone = DatasetRef(str(tmp_path / "nope.h5"), "data", ref.shape, ref.stamp)
    with pytest.raises(DataError, match="not found on the dask worker"):
        gone.open()


@pytest.mark.parametrize("name, kwargs", [
    ("test1.blo", {}),                                # RosettaSciIO, lazy dask array
    ("001_4x2_6bit.mib", {}),                         # Merlin, lazy dask array
    ("test_00_master.h5", {}),                        # Arina master + data file
    ("Si100_4D.emd", {"dataset": "/4DSTEM_simulation/data/datacubes/"
                                 "CBED_array_depth0001/datacube"}),  # one of several arrays
    ("dmTest_3D_int16_64,65,66.dm4", {"scan_shape": (6, 11)}),  # a 3D stack re-shaped
])
def test_real_formats_reopen_on_workers(shared_formats, threads_cluster, name, kwargs):
    """Workers reopen each format by path (the dataset choice and the scan shape included),
    and a lazy reader's own dask computations do not deadlock a one-thread worker."""
    with open_dataset(shared_formats / name, **kwargs) as ds:
        ref = run_method(ComMethod(), ds)
        res = run_method_dask(ComMethod(), ds, threads_cluster.scheduler_address, block_bytes=1)
    assert_same(res, ref)


# ---------------------------------------------------------------------------- control & faults


def test_cancel_stops_and_raises(h5file, threads_cluster):
    seen = []
    with open_h5(h5file) as ds, pytest.raises(Cancelled):
        run_method_dask(SlowMethod(), ds, threads_cluster.scheduler_address,
                        progress=lambda d, t, m: seen.append(d),
                        should_stop=lambda: len(seen) >= 1, block_bytes=5 * 8 * 8 * 4)
    assert 1 <= len(seen) < 13


def test_retries_cover_transient_task_errors(h5file, threads_cluster, tmp_path):
    ref = reference(ComMethod, h5file)
    ref.method = "flaky"
    (tmp_path / "a").mkdir()
    with open_h5(h5file) as ds:
        res = run_method_dask(FlakyMethod(tmp_path / "a"), ds, threads_cluster.scheduler_address,
                              block_bytes=4 * 5 * 8 * 8 * 4, retries=2)
    assert_same(res, ref)
    attempts = sorted(p.name for p in (tmp_path / "a").iterdir())
    starts = sorted({int(a.split(".")[0]) for a in attempts})
    assert starts[0] == 0 and len(starts) > 1  # several blocks...
    assert attempts == sorted(f"{r}.{k}" for r in starts for k in (0, 1))  # ...each tried twice
    (tmp_path / "b").mkdir()
    with open_h5(h5file) as ds, pytest.raises(OSError, match="transient read error"):
        run_method_dask(FlakyMethod(tmp_path / "b"), ds, threads_cluster.scheduler_address,
                        retries=0)


def test_no_workers_left_is_a_clear_error(h5file):
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                       **LOOPBACK)
    try:
        killed = []

        def kill_all(done, total, msg):
            if not killed:
                killed.append(True)
                cluster.scale(0)

        t0 = time.monotonic()
        with open_h5(h5file) as ds, pytest.raises(ClusterError, match="no workers left"):
            run_method_dask(SlowMethod(), ds, cluster.scheduler_address, progress=kill_all,
                            block_bytes=5 * 8 * 8 * 4, no_worker_timeout=1.5)
        assert time.monotonic() - t0 < 30
    finally:
        cluster.close()


@pytest.mark.slow
def test_killed_worker_process_run_still_completes(h5file):
    """SIGKILL one of two worker processes mid-run: its blocks are re-run, result exact."""
    ref = reference(ComMethod, h5file)
    ref.method = "slow"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  **LOOPBACK) as cluster, \
            distributed.Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        killed: list[int] = []

        def kill_one(done, total, msg):
            if not killed:
                killed.append(pids[0])
                os.kill(pids[0], signal.SIGKILL)

        with open_h5(h5file) as ds:
            res = run_method_dask(SlowMethod(), ds, cluster.scheduler_address,
                                  progress=kill_one, block_bytes=5 * 8 * 8 * 4)
        assert killed
        assert_same(res, ref)
        assert pids[0] not in client.run(os.getpid).values()  # it really died


@pytest.mark.slow
def test_block_that_kills_every_worker_gives_clear_error(h5file):
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                     **LOOPBACK) as cluster, \
            open_h5(h5file) as ds, pytest.raises(ClusterError, match="kept killing workers"):
        run_method_dask(CrashingMethod(), ds, cluster.scheduler_address,
                        block_bytes=5 * 8 * 8 * 4)


def test_a_run_leaves_the_global_dask_scheduler_alone(h5file, threads_cluster):
    """The run's Client must not become dask's default: while it runs, other dask work in
    the same process (napari computing a lazy layer, a dask-backed reader) would be sent to
    the cluster, and a Client closed out of order leaves ``scheduler='dask.distributed'``
    set for good - seen in CI as reader tests failing with 'no Client active' after the
    distributed tests."""
    import dask

    before = dask.config.get("scheduler", None)
    during: list = []

    def look(done, total, msg):
        during.append(dask.config.get("scheduler", None))

    with open_h5(h5file) as ds:
        run_method_dask(ComMethod(), ds, threads_cluster.scheduler_address, progress=look)
    assert during and all(s == before for s in during), during
    assert dask.config.get("scheduler", None) == before


def test_windowed_outputs_identical_on_dask(h5file, threads_cluster):
    """An output declared window=True is fed to the method's band consumer as rows complete
    (blocks of one row, in completion order on two workers): the result equals one
    process's, and the bands arrive in row order."""
    from test_block_contract import Smoothed

    with open_h5(h5file) as ds:
        ref = run_method(Smoothed(rows=3, halo=2), ds, windowed=False)
        res = run_method_dask(Smoothed(rows=3, halo=2), ds, threads_cluster.scheduler_address,
                              block_bytes=SHAPE[1] * 8 * 8 * 4)
    np.testing.assert_array_equal(res.extras["smooth"], ref.extras["smooth"])
    assert res.extras["bands"] == [(r, min(13, r + 3)) for r in range(0, 13, 3)]
    assert_same(res, ref)


# ---------------------------------------------------------------------------- real methods


@pytest.fixture(scope="module")
def tiny_sim(tmp_path_factory) -> Path:
    from napari_stem_strain.simulate import SimulationSettings, simulate_to_file

    path = tmp_path_factory.mktemp("sim") / "tiny.h5"
    simulate_to_file(path, SimulationSettings(scan=(8, 8), pattern=64, seed=1), workers=1)
    return path


def _prepared_pair(method, path: Path):
    """Prepare once (the slow part), then hand identical copies to both engines."""
    import copy
    import warnings

    with warnings.catch_warnings(), open_dataset(path) as ds:
        warnings.simplefilter("ignore")
        method.prepare(ds)
    return method, copy.deepcopy(method)


@pytest.mark.slow
def test_py4dstem_identical_on_dask(tiny_sim, threads_cluster):
    from napari_stem_strain.methods.py4dstem import Py4DSTEMMethod

    local, remote = _prepared_pair(Py4DSTEMMethod(), tiny_sim)
    with open_dataset(tiny_sim) as ds:
        ref = run_method(local, ds, prepared=True)
        res = run_method_dask(remote, ds, threads_cluster.scheduler_address, prepared=True,
                              block_bytes=2 * 8 * 64 * 64 * 4)
    assert np.isfinite(ref.A).all(axis=(2, 3)).sum() > 16  # a real map, not all NaN
    assert_same(res, ref)
    assert res.symmetry_deg == ref.symmetry_deg


@pytest.mark.slow
def test_ccstae_identical_on_dask(tiny_sim, threads_cluster):
    """CC-ST-AE with a small untrained network (its Gauss-Newton refinement still fits every
    sample position) and the true sample mask: no dependence on the shipped weights."""
    from napari_stem_strain.io.ground_truth import read_ground_truth
    from napari_stem_strain.methods.ccstae import CCSTAEMethod
    from napari_stem_strain.methods.ccstae.modelfile import new_model

    hexagonal = (np.array([1.0, 0.0]), np.array([0.5, np.sqrt(3) / 2]))
    model = new_model(*hexagonal, n=16, extent=2.6, width=4, seed=1)
    mask = read_ground_truth(tiny_sim).sample
    local, remote = _prepared_pair(CCSTAEMethod(model, device="cpu", sample_mask=mask),
                                   tiny_sim)
    with open_dataset(tiny_sim) as ds:
        ref = run_method(local, ds, prepared=True)
        res = run_method_dask(remote, ds, threads_cluster.scheduler_address, prepared=True,
                              block_bytes=2 * 8 * 64 * 64 * 4)
    assert np.isfinite(ref.A).all(axis=(2, 3)).sum() > 16
    assert_same(res, ref)
    # per-position extras (class probability) come back from the workers too
    assert set(res.extras) == set(ref.extras) and ref.extras
    for k, v in ref.extras.items():
        np.testing.assert_array_equal(res.extras[k], v, err_msg=f"extras[{k!r}]")


def test_virtual_images_identical_on_dask(h5file, threads_cluster):
    """Virtual detectors run through the same block contract: on dask (blocks of 2 rows, in
    completion order) they give the one-process images, patterns and beam, bit for bit."""
    from napari_stem_strain.virtual import virtual_images

    seen = []
    with open_h5(h5file) as ds:
        ref = virtual_images(ds)
        res = virtual_images(ds, dask_address=threads_cluster.scheduler_address,
                             max_bytes=2 * 5 * 8 * 8 * 4, progress=lambda d, t, m: seen.append(d))
    for k in ("bright_field", "dark_field", "mean_pattern", "max_pattern"):
        np.testing.assert_array_equal(getattr(res, k), getattr(ref, k), err_msg=k)
    assert (res.centre, res.beam_radius, res.mask_centre) == (ref.centre, ref.beam_radius,
                                                              ref.mask_centre)
    assert seen[-1] == SHAPE[0] * SHAPE[1] and len(seen) > 3  # progress per block on dask
    assert ref.bright_field.any() and ref.dark_field.any()
