"""The CC-ST-AE on a CUDA GPU: device placement, the out-of-memory fallback, CPU agreement,
the worker thread and dask. Marked ``cuda``; skipped only when torch sees no GPU
(``benchmarks/gpu_check.sh`` runs them on a GPU machine). The fallback's logic is also
tested without a GPU in tests/test_ccstae.py (a stand-in engine)."""

from __future__ import annotations

import copy
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_stem_strain.io.readers import open_dataset
from napari_stem_strain.methods.runner import run_method

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU")]

HEX = (np.array([1.0, 0.0]), np.array([0.5, np.sqrt(3) / 2]))


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    from napari_stem_strain.simulate import SimulationSettings, simulate_to_file

    path = tmp_path_factory.mktemp("cuda") / "sim.h5"
    simulate_to_file(path, SimulationSettings(scan=(16, 16), pattern=64, seed=2), workers=1)
    return path


def _method(device: str, **kw):
    from napari_stem_strain.methods.ccstae import CCSTAEMethod
    from napari_stem_strain.methods.ccstae.modelfile import new_model

    return CCSTAEMethod(new_model(*HEX, n=16, extent=2.6, width=4, seed=1), device=device, **kw)


def _prepared(device: str, path: Path, **kw):
    m = _method(device, **kw)
    with warnings.catch_warnings(), open_dataset(path) as ds:
        warnings.simplefilter("ignore")
        m.prepare(ds)
    return m


def test_engine_lives_on_the_gpu(sim):
    eng = _prepared("cuda", sim).engine
    assert eng.device == "cuda" and eng.P.is_cuda
    assert all(p.is_cuda for p in eng.model.net.parameters())
    for name in ("offsets", "profile", "slope", "pinv", "gram", "g00", "cond", "design",
                 "design_lin"):
        assert getattr(eng.tpl, name).is_cuda, name
    # a pickled copy (what a dask worker gets) rebuilds its tables on the same device
    import pickle

    tpl = pickle.loads(pickle.dumps(eng.tpl))
    assert tpl.pinv.is_cuda and torch.equal(tpl.pinv, eng.tpl.pinv)


def test_gpu_map_equals_cpu_map_within_tolerance(sim):
    with open_dataset(sim) as ds:
        cpu = run_method(_method("cpu"), ds)
        gpu = run_method(_method("cuda"), ds)
    both = cpu.sample & gpu.sample
    assert both.sum() >= 0.9 * max(cpu.sample.sum(), 1)
    np.testing.assert_allclose(gpu.A[both], cpu.A[both], atol=2e-4)
    assert gpu.settings["device"] == "cuda"


def test_gpu_one_block_equals_many(sim):
    m = _prepared("cuda", sim)
    with open_dataset(sim) as ds:
        one = run_method(m, ds, prepared=True, block_bytes=2**30)
        many = run_method(copy.deepcopy(m), ds, prepared=True, block_bytes=3 * 16 * 64 * 64 * 4)
    np.testing.assert_array_equal(one.A, many.A)


def test_out_of_memory_halves_the_chunk_on_the_gpu(sim, monkeypatch):
    """A real CUDA run whose engine runs out of memory while its chunk exceeds 64 patterns:
    the chunk is halved until it fits and the map is finished, equal to a small-chunk run."""
    from napari_stem_strain.methods.ccstae.infer import Engine

    m = _prepared("cuda", sim)
    m.engine.cuda_chunk = 256
    ref_m = copy.deepcopy(m)
    ref_m.engine.cuda_chunk = 64
    real = Engine._run
    calls = {"oom": 0}

    def tight(self, pats, init):
        if len(pats) > 64:
            calls["oom"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory (forced by the test)")
        return real(self, pats, init)

    with open_dataset(sim) as ds:
        ref = run_method(ref_m, ds, prepared=True)
        monkeypatch.setattr(Engine, "_run", tight)
        res = run_method(m, ds, prepared=True)
    assert calls["oom"] == 2 and m.engine.cuda_chunk == 64
    np.testing.assert_array_equal(res.A, ref.A)


def test_gpu_run_in_a_worker_thread(sim):
    """The napari dock runs methods in a worker thread: CUDA work there gives the same map."""
    with open_dataset(sim) as ds:
        here = run_method(_method("cuda"), ds)
        out: dict = {}

        def work() -> None:
            try:
                out["res"] = run_method(_method("cuda"), ds)
            except BaseException as err:  # noqa: BLE001 - re-raised in the test thread
                out["err"] = err

        t = threading.Thread(target=work)
        t.start()
        t.join(300)
    assert "err" not in out, out.get("err")
    np.testing.assert_array_equal(out["res"].A, here.A)


def test_gpu_on_dask_equals_one_process(sim):
    distributed = pytest.importorskip("distributed")
    from napari_stem_strain.distributed import run_method_dask

    m = _prepared("cuda", sim)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, \
            open_dataset(sim) as ds:
        ref = run_method(copy.deepcopy(m), ds, prepared=True)
        res = run_method_dask(m, ds, cluster.scheduler_address, prepared=True,
                              block_bytes=4 * 16 * 64 * 64 * 4)
    np.testing.assert_array_equal(res.A, ref.A)
    np.testing.assert_array_equal(res.extras["class_prob"], ref.extras["class_prob"])
