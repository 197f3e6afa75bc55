"""The fault and bad-input matrix of issue #12: each case is one kind of bad input or fault,
and each must end in a clear one-line error naming the file and the problem, or a correct
result - never a traceback, a hang (every case is bounded in time), a silent partial or wrong
result, a modified input, or code run from a file.

``docs/scaling.md`` ("The fault matrix") lists the kinds and their counts.
"""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_stem_strain.methods.base import BlockMethod
from napari_stem_strain.methods.ccstae.modelfile import new_model
from napari_stem_strain.methods.ccstae.train import train_model

#: Seconds any one case may take (the ``bound(s)`` marker overrides it).
BOUND_S = 60

HEX = (np.array([1.0, 0.0]), np.array([0.5, np.sqrt(3) / 2]))


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_one_line(msg: str, *needles: str) -> None:
    msg = msg.strip()
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    assert "Traceback" not in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


class CaseTimeout(BaseException):
    """A case ran past its bound (a BaseException: no ``except Exception`` may swallow it)."""


@pytest.fixture(autouse=True)
def _bounded(request):
    """Every case is bounded in time: SIGALRM fails a case that runs past its bound (a hang
    becomes a failure, not a stuck suite)."""
    marker = request.node.get_closest_marker("bound")
    seconds = int(marker.args[0]) if marker else BOUND_S

    def alarm(signum, frame):
        raise CaseTimeout(f"case ran past its {seconds} s bound (a hang)")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------ code run from a file


def _train_data(n: int = 16, size: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.rand(n, 1, size, size, generator=g),
            "A": torch.eye(2).repeat(n, 1, 1) + 0.01 * torch.randn(n, 2, 2, generator=g),
            "sample": torch.ones(n, dtype=torch.bool)}


class _Planted:
    """Unpickling this creates the file ``marker`` (stands for any code a pickle may run)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _train(model_seed: int, ck: Path | None, epochs: int = 2):
    return train_model(new_model(*HEX, n=16, width=4, seed=model_seed), _train_data(),
                       epochs=epochs, seed=0, patience=10, batch=8, checkpoint=ck,
                       augment=False)


def test_planted_checkpoint_pickle_runs_no_code(tmp_path):
    """``fit`` resumes from ``OUT.ckpt``: a pickle planted there must never run (it is loaded
    with ``weights_only=True``); the fit starts over and gives the fresh result."""
    marker = tmp_path / "pwned"
    ck = tmp_path / "m.pt.ckpt"
    torch.save({"signature": "x", "payload": _Planted(str(marker))}, ck)
    ref, ref_info = _train(3, None)
    model, info = _train(3, ck)
    assert not marker.exists(), "loading the checkpoint ran code from the file"
    assert [h["val"] for h in info["history"]] == [h["val"] for h in ref_info["history"]]
    for k, v in ref.net.state_dict().items():
        assert torch.equal(v, model.net.state_dict()[k]), k


def test_checkpoint_of_another_init_model_is_not_resumed(tmp_path):
    """A checkpoint left by a fit that started from another ``--init`` model is not resumed:
    the result equals a fresh fit from this model."""
    ck = tmp_path / "m.pt.ckpt"
    _train(3, ck)  # a finished fit from another starting model leaves its checkpoint
    assert ck.exists()
    fresh, fresh_info = _train(5, None)
    model, info = _train(5, ck)
    assert [h["val"] for h in info["history"]] == [h["val"] for h in fresh_info["history"]]
    for k, v in fresh.net.state_dict().items():
        assert torch.equal(v, model.net.state_dict()[k]), k


def test_checkpoint_still_resumes_with_weights_only(tmp_path):
    """The checkpoint holds only what ``weights_only=True`` loads: a cancelled fit resumes and
    ends with the uninterrupted result."""
    from napari_stem_strain.methods.base import Cancelled

    ck = tmp_path / "m.pt.ckpt"
    ref, _ = _train(3, None)
    seen: list[int] = []

    def again(**kw):
        return train_model(new_model(*HEX, n=16, width=4, seed=3), _train_data(), epochs=2,
                           seed=0, patience=10, batch=8, checkpoint=ck, augment=False,
                           progress=lambda d, t, m: seen.append(d), **kw)

    with pytest.raises(Cancelled):
        again(should_stop=lambda: len(seen) >= 1)
    torch.load(ck, weights_only=True)
    seen.clear()
    model, info = again()
    assert seen == [2] and len(info["history"]) == 2
    for k, v in ref.net.state_dict().items():
        assert torch.equal(v, model.net.state_dict()[k]), k


# ------------------------------------------------------------------ the CLI: data loss


def _cli(capsys, *argv: str) -> tuple[int, str]:
    from napari_stem_strain.cli import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("how", ["same path", "other spelling", "symlink", "hard link"])
def test_map_out_naming_the_input_is_refused_before_the_work(tiny_input, tmp_path, capsys,
                                                             no_method_may_run, how):
    src = tmp_path / "in.h5"
    src.write_bytes(tiny_input.read_bytes())
    before, ino = sha(src), src.stat().st_ino
    out = {"same path": src, "other spelling": tmp_path / "." / "in.h5",
           "symlink": tmp_path / "link.h5", "hard link": tmp_path / "hard.h5"}[how]
    if how == "symlink":
        out.symlink_to(src)
    elif how == "hard link":
        out.hardlink_to(src)
    code, err = _cli(capsys, "map", src, "--method", "py4dstem", "--quiet", "--out", out)
    assert code == 2
    assert_one_line(err, "stem-strain: error:", "input")
    assert sha(src) == before and src.stat().st_ino == ino


@pytest.mark.parametrize("how", ["same path", "symlink"])
def test_fit_out_naming_the_input_is_refused_before_the_work(tiny_input, tmp_path, monkeypatch,
                                                             capsys, how):
    """``fit --out`` naming the data file replaced the data with a model file."""
    from napari_stem_strain.methods import ccstae

    src = tmp_path / "in.h5"
    src.write_bytes(tiny_input.read_bytes())
    before = sha(src)
    out = src
    if how == "symlink":
        out = tmp_path / "model.pt"
        out.symlink_to(src)

    def refuse(*a, **k):
        raise AssertionError("fit ran although it was bound to fail")

    monkeypatch.setattr(ccstae, "fit_model", refuse)
    code, err = _cli(capsys, "fit", src, "--quiet", "--out", out)
    assert code == 2
    assert_one_line(err, "stem-strain: error:", "input")
    assert sha(src) == before


def test_write_results_refuses_to_replace_its_input(tiny_input, tmp_path):
    """The library guard behind the CLI's: a result group whose input file is the output."""
    from napari_stem_strain.io.results import MethodMaps, ResultFileError, write_results
    from napari_stem_strain.methods.base import MethodResult

    src = tmp_path / "in.h5"
    src.write_bytes(tiny_input.read_bytes())
    before = sha(src)
    A = np.tile(np.eye(2, dtype=np.float32), (4, 4, 1, 1))
    g = MethodMaps.from_result(MethodResult("ae", A, np.ones((4, 4), bool), {}, 1.0, 60.0),
                               "0:2,0:2", input_file=str(src))
    with pytest.raises(ResultFileError) as err:
        write_results(src, [g])
    assert_one_line(str(err.value), str(src), "input")
    assert sha(src) == before


# ------------------------------------------------------------------ model files


def _default_dict() -> dict:
    from napari_stem_strain.methods.ccstae.modelfile import DEFAULT_PATH

    return torch.load(DEFAULT_PATH, map_location="cpu", weights_only=True)


def _set(d: dict, where: str, value) -> dict:
    """``d`` with ``where`` (``"lattice.g1"``, ``"training"``) set to ``value``."""
    keys = where.split(".")
    cur = d
    for k in keys[:-1]:
        cur = cur[k]
    cur[keys[-1]] = value
    return d


NAN, INF = float("nan"), float("inf")
BAD_MODELS = [
    ("lattice.g1", [NAN, 0.0]), ("lattice.g1", [INF, 0.0]), ("lattice.g2", [0.5, NAN]),
    ("lattice.g2", [2.0, 0.0]), ("lattice.g1", [1.0, 0.0, 0.0]), ("lattice.g1", "abc"),
    ("lattice.g1", [1e-300, 0.0]),
    ("lattice.symmetry_deg", 0.0), ("lattice.symmetry_deg", -60.0),
    ("lattice.symmetry_deg", NAN), ("lattice.symmetry_deg", 45.0),
    ("lattice.symmetry_deg", 90.0),  # the hexagonal model relabelled square
    ("geometry.band", NAN), ("geometry.band", 0.0), ("geometry.band", -0.1),
    ("geometry.band", 1.5), ("geometry.band", INF),
    ("geometry.extent", NAN), ("geometry.extent", 0.0), ("geometry.extent", -2.6),
    ("geometry.n", 6848), ("geometry.n", 0), ("geometry.n", -8), ("geometry.n", 10**9),
    ("geometry.n", 12), ("geometry.n", 32.5), ("geometry.width", 0),
    ("geometry.width", 100000), ("geometry", [1, 2]),
    ("training", [1, 2]), ("training", "abc"), ("state_dict", [1, 2]),
]


@pytest.mark.bound(20)
@pytest.mark.parametrize(("where", "value"), BAD_MODELS,
                         ids=[f"{w}={v!r}" for w, v in BAD_MODELS])
def test_bad_model_file_is_one_line_and_cheap(tmp_path, monkeypatch, where, value):
    """Refused with one line naming the file, before the network is built (an absurd ``n`` or
    ``width`` allocated gigabytes before the old check)."""
    from napari_stem_strain.methods.ccstae import modelfile

    path = tmp_path / "bad.pt"
    torch.save(_set(_default_dict(), where, value), path)

    def no_net(*a, **k):
        raise AssertionError("the network was built from an invalid model file")

    monkeypatch.setattr(modelfile, "CCSTAE", no_net)
    with pytest.raises(ValueError) as err:
        modelfile.load_model(path)
    assert_one_line(str(err.value), f"model file {path}:")


def test_the_shipped_model_passes_the_checks():
    from napari_stem_strain.methods.ccstae.modelfile import load_model

    m = load_model("default")
    assert m.symmetry_deg == 60.0 and m.net.n == 32


@pytest.mark.bound(90)
def test_map_with_nan_lattice_model_is_one_line_not_a_hang(tiny_input, tmp_path, capsys):
    """A NaN ``g1`` passed validation and ``map`` spun in ``refine.lattice_points``."""
    model = tmp_path / "nan.pt"
    torch.save(_set(_default_dict(), "lattice.g1", [NAN, 0.0]), model)
    out = tmp_path / "out.h5"
    code, err = _cli(capsys, "map", tiny_input, "--quiet", "--device", "cpu", "--model", model,
                     "--out", out)
    assert code == 2 and not out.exists()
    assert_one_line(err, "stem-strain: error:", str(model))


# ------------------------------------------------------------------ dask addresses


@pytest.mark.parametrize(("address", "expected"), [
    ("local", ("local", None)), ("local:3", ("local", 3)), ("LOCAL:2", ("local", 2)),
    ("localhost:3", ("tcp://localhost:3", None)),
    ("localhost:8786", ("tcp://localhost:8786", None)),
    ("tcp://10.0.0.1:8786", ("tcp://10.0.0.1:8786", None)),
    ("10.0.0.1:8786", ("tcp://10.0.0.1:8786", None)),
    ("tcp://[::1]:8786", ("tcp://[::1]:8786", None)),
    ("localhost.example.org:8786", ("tcp://localhost.example.org:8786", None)),
])
def test_dask_address_means_what_it_says(address, expected):
    """Only the literal ``local`` / ``local:N`` starts a local cluster (``localhost:3`` was
    read as 3 local workers, ``localhost:8786`` as 8786 of them)."""
    import os

    from napari_stem_strain.distributed import parse_address

    got = parse_address(address)
    if expected == ("local", None):
        expected = ("local", os.cpu_count() or 1)
    assert got == expected


@pytest.mark.parametrize("address", [
    "foo:bar", "tcp://host:0", "tcp://host:99999", "tcp://:8786", "tcp://host",
    "tls://host:8786", "ucx://host:8786", "inproc://x", "http://host:8787", "local:-1",
    "local:x", "host:8786:1", "local:8786",
])
def test_bad_dask_address_is_one_line(address):
    from napari_stem_strain.distributed import parse_address

    with pytest.raises(ValueError) as err:
        parse_address(address)
    assert_one_line(str(err.value), "dask address", repr(address))


def _server(kind: str):
    """A TCP port that accepts and never answers (``silent``) or answers like HTTP."""
    import socket
    import threading

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    conns = []

    def loop():
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            conns.append(c)
            if kind == "http":
                c.recv(65536)
                c.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=loop, daemon=True).start()

    def close():
        s.close()
        for c in conns:
            c.close()

    return s.getsockname()[1], close


@pytest.mark.bound(60)
@pytest.mark.parametrize("kind", ["silent", "http"])
def test_scheduler_port_that_does_not_speak_dask_is_one_line(tiny_input, tmp_path, capsys,
                                                              kind):
    """A port that accepts TCP but never answers hung in ``Client.__init__`` (the connect
    timeout did not cover the handshake); an HTTP port gave ``MemoryError: 3.07 EiB``."""
    import time

    port, close = _server(kind)
    out = tmp_path / "out.h5"
    t0 = time.monotonic()
    try:
        code, err = _cli(capsys, "map", tiny_input, "--method", "py4dstem", "--quiet",
                         "--out", out, "--dask", f"tcp://127.0.0.1:{port}")
    finally:
        close()
    assert code == 2 and not out.exists()
    assert_one_line(err, "stem-strain: error:", f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 40


# ------------------------------------------------------------------ result files


def _group(method: str = "ae", input_file: str = "", shape=(6, 5)):
    from napari_stem_strain.io.results import MethodMaps
    from napari_stem_strain.methods.base import MethodResult

    A = np.tile(np.eye(2, dtype=np.float32), (*shape, 1, 1))
    return MethodMaps.from_result(MethodResult(method, A, np.ones(shape, bool), {}, 1.0, 60.0),
                                  "0:2,0:2", input_file=input_file)


def test_two_writers_at_once_both_land(tmp_path, monkeypatch):
    """Two writers adding different method groups to one file at the same moment: both groups
    land (each re-reads the file under a lock). Before: one group was silently dropped."""
    import threading
    import time

    from napari_stem_strain.io import results as results_mod

    slow = results_mod._write_group

    def slow_write(h5, m):
        time.sleep(0.3)  # widen the window between reading the old file and renaming
        slow(h5, m)

    monkeypatch.setattr(results_mod, "_write_group", slow_write)
    path = tmp_path / "r.h5"
    errors: list[BaseException] = []

    def write(method):
        try:
            results_mod.write_results(path, [_group(method)])
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=write, args=(m,)) for m in ("ae", "py4dstem")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert sorted(results_mod.read_results(path)) == ["ae", "py4dstem"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5"]


_WRITER = r"""
import sys, time
import numpy as np
from napari_stem_strain.io.results import MethodMaps, write_results
from napari_stem_strain.methods.base import MethodResult
path, method, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
A = np.tile(np.eye(2, dtype=np.float32), (200, 200, 1, 1))
g = MethodMaps.from_result(MethodResult(method, A, np.ones((200, 200), bool), {}, 1.0, 60.0),
                           "0:2,0:2")
time.sleep(max(0.0, start - time.time()))
write_results(path, [g])
"""


@pytest.mark.bound(120)
def test_two_processes_writing_one_result_file_both_land(tmp_path):
    import subprocess
    import sys
    import time

    for attempt in range(3):
        path = tmp_path / f"r{attempt}.h5"
        start = time.time() + 6
        procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), m, str(start)],
                                  stderr=subprocess.PIPE, text=True)
                 for m in ("ae", "py4dstem")]
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
        from napari_stem_strain.io.results import read_results

        assert sorted(read_results(path)) == ["ae", "py4dstem"], f"attempt {attempt}"


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_result_file_mode_follows_the_umask(tmp_path, umask):
    import os

    from napari_stem_strain.io.results import write_results

    old = os.umask(umask)
    try:
        path = write_results(tmp_path / "r.h5", [_group()])
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_replacing_a_result_file_keeps_its_mode(tmp_path):
    from napari_stem_strain.io.results import write_results

    path = write_results(tmp_path / "r.h5", [_group()])
    path.chmod(0o640)
    write_results(path, [_group("py4dstem")])
    assert path.stat().st_mode & 0o777 == 0o640


def test_input_file_is_stored_absolute(tiny_input, tmp_path, monkeypatch, capsys):
    from napari_stem_strain.io.results import read_results

    (tmp_path / "in.h5").write_bytes(tiny_input.read_bytes())
    monkeypatch.chdir(tmp_path)
    code, err = _cli(capsys, "map", "in.h5", "--method", "py4dstem", "--quiet",
                     "--out", "out.h5")
    assert code == 0, err
    got = read_results(tmp_path / "out.h5")["py4dstem"].input_file
    assert Path(got).is_absolute() and Path(got).samefile(tmp_path / "in.h5")
    import h5py

    with h5py.File(tmp_path / "out.h5") as h5:
        assert Path(h5.attrs["input_file"]).is_absolute()


def test_stray_temporary_of_a_killed_write_is_cleaned(tmp_path):
    """A write killed mid-way leaves ``.NAME.XXXX.tmp``; the next write of NAME removes it."""
    from napari_stem_strain.io.results import write_results

    stray = tmp_path / ".r.h5.k1ll3d.tmp"
    stray.write_bytes(b"half an HDF5 file")
    other = tmp_path / ".other.h5.abcd.tmp"  # another result's: not ours to remove
    other.write_bytes(b"x")
    write_results(tmp_path / "r.h5", [_group()])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.h5.abcd.tmp", "r.h5"]


# ------------------------------------------------------------------ input changed mid-run


def _truncate(p: Path) -> None:
    with open(p, "r+b") as fh:
        fh.truncate(p.stat().st_size // 2)


def _rewrite_in_place_keeping_mtime(p: Path) -> None:
    """Same size, same mtime, different bytes (a file rewritten in place, mtime restored)."""
    import os

    st = p.stat()
    with open(p, "r+b") as fh:
        fh.seek(st.st_size - 4096)
        block = bytearray(fh.read(4096))
        block[100:200] = bytes(255 - b for b in block[100:200])
        fh.seek(st.st_size - 4096)
        fh.write(block)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def _append(p: Path) -> None:
    with open(p, "ab") as fh:
        fh.write(b"\0" * 4096)


def _replace_by_another(p: Path) -> None:
    other = p.with_name("other.h5")
    other.write_bytes(p.read_bytes())
    other.replace(p)


CHANGES = {"truncated": _truncate, "rewritten in place": _rewrite_in_place_keeping_mtime,
           "appended to": _append, "replaced": _replace_by_another}


@pytest.mark.bound(90)
@pytest.mark.parametrize("change", list(CHANGES))
def test_input_changed_during_the_run_is_refused(tiny_input, tmp_path, monkeypatch, capsys,
                                                 change):
    """A file truncated or rewritten while ``map`` runs gave a half or mixed map with exit 0:
    the input's size, mtime, inode and a checksum of a few blocks are taken at the start and
    the result is not written when they changed."""
    from napari_stem_strain import pipeline

    src = tmp_path / "in.h5"
    src.write_bytes(tiny_input.read_bytes())
    real = pipeline.run_method_on

    def run_then_change(*a, **k):
        res = real(*a, **k)
        CHANGES[change](src)
        return res

    monkeypatch.setattr(pipeline, "run_method_on", run_then_change)
    out = tmp_path / "out.h5"
    code, err = _cli(capsys, "map", src, "--method", "py4dstem", "--quiet", "--out", out)
    assert code == 2, err
    assert_one_line(err, "stem-strain: error:", str(src), "changed")
    assert not out.exists()


def test_unchanged_input_is_mapped(tiny_input, tmp_path, capsys):
    """The control: the same run without a change writes its result."""
    src = tmp_path / "in.h5"
    src.write_bytes(tiny_input.read_bytes())
    code, err = _cli(capsys, "map", src, "--method", "py4dstem", "--quiet", "--out",
                     tmp_path / "out.h5")
    assert code == 0, err


# ------------------------------------------------------------------ tracebacks


@pytest.mark.bound(90)
def test_map_scan_shape_on_a_simulated_file_then_compare(tiny_input, tmp_path, capsys):
    """``--scan-shape`` on a simulated file: its ground truth (8 x 8) does not describe the
    re-shaped scan (4 x 16); the map is written, no comparison is made (it was an IndexError
    in ``compare_to_truth``), and the simulated reference region is not used for it."""
    out = tmp_path / "out.h5"
    code, err = _cli(capsys, "map", tiny_input, "--method", "py4dstem", "--quiet",
                     "--scan-shape", 4, 16, "--out", out)
    assert code == 0, err
    assert out.exists()
    assert "ground truth" in err and "Traceback" not in err


def test_compare_to_truth_of_another_shape_is_one_line():
    from napari_stem_strain.io.ground_truth import GroundTruth
    from napari_stem_strain.pipeline import compare_to_truth

    z = np.zeros((8, 8), np.float32)
    truth = GroundTruth(z, z, z, z, np.ones((8, 8), bool), 60.0, "0:2,0:2")
    with pytest.raises(ValueError) as err:
        compare_to_truth({"ae": _group(shape=(4, 16))}, truth)
    assert_one_line(str(err.value), "(4, 16)", "(8, 8)")


@pytest.fixture(scope="module")
def one_row_input(tmp_path_factory) -> Path:
    from napari_stem_strain.simulate import SimulationSettings, simulate_to_file

    path = tmp_path_factory.mktemp("row") / "row.h5"
    simulate_to_file(path, SimulationSettings(scan=(1, 40), pattern=64, seed=1), workers=1)
    return path


@pytest.mark.bound(60)
def test_fit_on_a_one_row_scan_is_one_line(one_row_input, tmp_path, capsys):
    out = tmp_path / "m.pt"
    code, err = _cli(capsys, "fit", one_row_input, "--quiet", "--device", "cpu", "--out", out)
    assert code == 2
    assert_one_line(err, "stem-strain: error:", str(one_row_input), "1 x 40")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_fit_checks_free_space_before_the_work(tiny_input, tmp_path, monkeypatch, capsys):
    """Only the folder's existence was checked: a full disk failed after the whole fit."""
    import shutil
    from collections import namedtuple

    from napari_stem_strain.methods import ccstae

    def refuse(*a, **k):
        raise AssertionError("fit ran although it was bound to fail")

    monkeypatch.setattr(ccstae, "fit_model", refuse)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2**30, 2**30, 1024))
    code, err = _cli(capsys, "fit", tiny_input, "--quiet", "--out", tmp_path / "m.pt")
    assert code == 2
    assert_one_line(err, "stem-strain: error:", "MiB free")


_FULL_DISK_FIT = r"""
import resource, signal, sys
from pathlib import Path
import numpy as np, torch
from napari_stem_strain.methods.ccstae.modelfile import new_model, save_model
from napari_stem_strain.methods.ccstae.train import train_model
what, folder = sys.argv[1], Path(sys.argv[2])
m = new_model(np.array([1.0, 0.0]), np.array([0.5, 3 ** 0.5 / 2]), n=16, width=4)
g = torch.Generator().manual_seed(0)
data = {"x": torch.rand(16, 1, 16, 16, generator=g), "A": torch.eye(2).repeat(16, 1, 1),
        "sample": torch.ones(16, dtype=torch.bool)}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    if what == "checkpoint":
        train_model(m, data, epochs=1, batch=8, checkpoint=folder / "m.pt.ckpt", augment=False)
    else:
        save_model(m, folder / "m.pt")
except OSError as err:
    print("OSError:", str(err).splitlines()[0])
    sys.exit(2)
except BaseException as err:
    print(type(err).__name__ + ":", str(err).splitlines()[0] if str(err) else "")
    sys.exit(3)
sys.exit(0)
"""


@pytest.mark.bound(90)
@pytest.mark.parametrize("what", ["checkpoint", "model"])
def test_disk_full_while_fit_writes_is_one_line_and_leaves_nothing(tmp_path, what):
    """A full disk while ``fit`` writes its checkpoint or model: one OSError line (it was a
    RuntimeError traceback) and no stray ``.tmp``."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _FULL_DISK_FIT, what, str(tmp_path)],
                       capture_output=True, text=True, timeout=80)
    assert r.returncode == 2 and r.stdout.startswith("OSError:"), (r.stdout, r.stderr[-2000:])
    assert "\n" not in r.stdout.strip()
    assert list(tmp_path.iterdir()) == []


_FULL_DISK_WRITE = r"""
import resource, sys
import numpy as np
from napari_stem_strain.io.results import MethodMaps, write_results
from napari_stem_strain.methods.base import MethodResult
n, lim = int(sys.argv[2]), int(sys.argv[3])
A = np.tile(np.eye(2, dtype=np.float32), (n, n, 1, 1))
A[..., 0, 0] += np.random.default_rng(0).normal(0, 0.01, (n, n)).astype(np.float32)
g = MethodMaps.from_result(MethodResult("ae", A, np.ones((n, n), bool), {}, 1.0, 60.0),
                           "0:4,0:4")
resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim))
try:
    write_results(sys.argv[1], [g])
except OSError as err:
    print("OSError:", str(err).splitlines()[0])
    sys.exit(2)
"""


@pytest.mark.bound(60)
@pytest.mark.parametrize(("n", "limit"), [(48, 100 * 1024), (100, 100 * 1024),
                                          (100, 256 * 1024), (300, 100 * 1024)])
def test_disk_full_during_the_result_write_is_one_line(tmp_path, n, limit):
    """The disk filling while HDF5 flushes its metadata gave "Exception ignored ...
    RuntimeError" tracebacks and a segmentation fault (exit 139) - whatever the point where
    the write fails, it is one OSError line and nothing is left behind."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _FULL_DISK_WRITE, str(tmp_path / "o.h5"),
                        str(n), str(limit)], capture_output=True, text=True, timeout=50)
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    assert r.stdout.startswith("OSError:") and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert list(tmp_path.iterdir()) == []


def test_file_size_limit_is_checked_before_the_work(tmp_path):
    """``ulimit -f`` below what the result needs is refused up front, like a full disk."""
    import resource

    from napari_stem_strain.io.results import check_writable

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(OSError) as err:
            check_writable(tmp_path / "o.h5", needed_bytes=2**20)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert_one_line(str(err.value), "o.h5", "ulimit")


# ------------------------------------------------------------------ real files of other software

REAL_FILE_CASES = [
    ("dmTest_3D_int16_64,65,66.dm4", ["--scan-shape", "6", "11"]),
    ("dmTest_3D_int16_64,65,66.dm4", ["--scan-shape", "66", "1"]),
    ("002_4x2_6bit_roi128.mib", []),
]


@pytest.mark.bound(120)
@pytest.mark.parametrize(("name", "extra"), REAL_FILE_CASES,
                         ids=[f"{n} {' '.join(e)}" for n, e in REAL_FILE_CASES])
def test_ccstae_on_odd_real_files_is_one_line(shared_formats, tmp_path, capsys, name, extra):
    """CC-ST-AE on a DM stack re-shaped to 6 x 11 or 66 x 1 (a singular matrix) and on a
    128-pixel-ROI MIB file (an IndexError) gave tracebacks: now one line naming the file and
    the cause - a clean refusal (exit 2), not the CLI's "failed unexpectedly" net (exit 3)."""
    src = shared_formats / name
    before = sha(src)
    out = tmp_path / "out.h5"
    code, err = _cli(capsys, "map", src, "--method", "ae", "--device", "cpu", "--quiet",
                     "--out", out, *extra)
    assert sha(src) == before
    if code == 0:  # a map is fine too, as long as it is a whole one
        from napari_stem_strain.io.results import read_results

        assert read_results(out)["ae"].maps.exx.size > 0
        return
    assert code == 2 and not out.exists(), err
    assert "unexpectedly" not in err
    assert_one_line(err, "stem-strain: error:", name)


# ------------------------------------------------------------------ odd paths


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_bad_symlink_input_is_named_as_such(tmp_path, capsys, kind):
    """A symlink loop was reported as "no such file"."""
    a = tmp_path / "in.h5"
    if kind == "loop":
        b = tmp_path / "b.h5"
        a.symlink_to(b)
        b.symlink_to(a)
        needle = "loop"
    else:
        a.symlink_to(tmp_path / "gone.h5")
        needle = "gone.h5"
    code, err = _cli(capsys, "map", a, "--quiet", "--out", tmp_path / "out.h5")
    assert code == 2
    assert_one_line(err, "stem-strain: error:", str(a), "symbolic link", needle)


@pytest.mark.bound(90)
def test_input_name_that_is_not_utf8_is_mapped(tiny_input, tmp_path, capsys):
    """A file name with a byte that is not UTF-8 failed only after the whole map (HDF5 cannot
    store the name as text); the name is stored with that byte escaped."""
    import os

    src = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/bad\xffname.h5"))
    src.write_bytes(tiny_input.read_bytes())
    out = tmp_path / "out.h5"
    code, err = _cli(capsys, "map", src, "--method", "py4dstem", "--quiet", "--out", out)
    assert code == 0, err
    from napari_stem_strain.io.results import read_results

    assert read_results(out)["py4dstem"].input_file.endswith("bad\\xffname.h5")


# ------------------------------------------------------------------ absurd declared sizes

_OPEN_HUGE = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))
from napari_stem_strain.io.errors import DataError
from napari_stem_strain.io.readers import open_dataset
try:
    with open_dataset(sys.argv[1]) as ds:
        for _ in ds.iter_blocks():
            break
except DataError as err:
    print("DataError:", err)
    sys.exit(2)
except BaseException as err:
    print(type(err).__name__ + ":", err)
    sys.exit(3)
"""


@pytest.mark.bound(60)
@pytest.mark.parametrize(("shape", "needle"), [((1000, 1000, 4096, 4096), "scan row"),
                                               ((2, 2, 65535, 65535), "pattern")])
def test_absurd_declared_size_is_refused_at_open(tmp_path, shape, needle):
    """A 1.4 kB file declaring rows of 1000 x 4096^2 or 65535^2 patterns: refused at open in
    one line saying why, before anything of that size is allocated (it tried the allocation:
    "out of memory", or a "truncated or corrupt file?" guess)."""
    import subprocess
    import sys

    import h5py

    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", shape=shape, dtype="uint16", chunks=(1, 1, 256, 256))
    r = subprocess.run([sys.executable, "-c", _OPEN_HUGE, str(path)], capture_output=True,
                       text=True, timeout=50)
    assert r.returncode == 2, (r.stdout, r.stderr[-1500:])
    assert_one_line(r.stdout, "DataError:", str(path), needle, "GiB")
    assert "corrupt" not in r.stdout


# ------------------------------------------------------------------ a dask worker dies


class Com(BlockMethod):
    """A small deterministic method (a block placed at the wrong rows shows in ``A``)."""

    name = "com"

    def __init__(self, marker: str = "") -> None:
        import os

        self.marker, self.home_pid = str(marker), os.getpid()
        self.threshold = 0.0

    def prepare(self, dataset, progress=None, should_stop=None) -> None:
        self.threshold = float(np.median(dataset.read_rows(0, 1).sum(axis=(-2, -1))))

    def process_block(self, block, r0):
        b = np.asarray(block, np.float64)
        tot = b.sum(axis=(-2, -1))
        A = np.zeros((*tot.shape, 2, 2), np.float32)
        A[..., 0, 0] = 1 + tot / 1e6
        A[..., 1, 1] = 1 + (r0 + np.arange(b.shape[0]))[:, None] / 1000
        return A, tot > self.threshold

    def _die_once(self) -> None:
        """Kill this worker process, once (an atomically created marker file says it
        happened), never in the process that built the method."""
        import os

        if not self.marker or os.getpid() == self.home_pid:
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os._exit(1)


class DiesOnArrival(Com):
    """A large method whose first unpickling on a worker kills that worker: the worker dies
    while the method is scattered to it ("Stream is closed" failed the run)."""

    name = "arrival"

    def __init__(self, marker: str = "") -> None:
        super().__init__(marker)
        self.payload = np.ones(2**20)  # 8 MiB: the scatter takes a moment

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._die_once()


class DiesSoonAfterArrival(Com):
    """A large method whose first worker dies a moment after receiving it, while the blocks
    are being handed out."""

    name = "soon"

    def __init__(self, marker: str = "", delay: float = 0.3) -> None:
        super().__init__(marker)
        self.delay = delay
        self.payload = np.ones(2**20)

    def __setstate__(self, state) -> None:
        import threading
        import time

        self.__dict__.update(state)

        def later():
            time.sleep(self.delay)
            self._die_once()

        threading.Thread(target=later, daemon=True).start()

    def process_block(self, block, r0):
        import time

        time.sleep(0.1)
        return super().process_block(block, r0)


class DiesMidRun(Com):
    """Kills its worker on its first block: the scheduler drops the tasks that needed the
    method that worker held ("lost the block of rows 0:4 4 times" failed the run)."""

    name = "midrun"

    def __init__(self, marker: str = "") -> None:
        super().__init__(marker)
        self.payload = np.ones(2**20)

    def process_block(self, block, r0):
        import time

        time.sleep(0.1)
        self._die_once()
        return super().process_block(block, r0)


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory) -> Path:
    import h5py

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("dask") / "scan.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=rng.poisson(20, (24, 5, 8, 8)).astype(np.uint16),
                         chunks=(1, 5, 8, 8))
    return path


@pytest.mark.bound(150)
@pytest.mark.parametrize("cls", [DiesOnArrival, DiesSoonAfterArrival, DiesMidRun])
def test_a_dask_worker_dying_does_not_fail_the_run(scan_file, tmp_path, cls):
    """One of two local worker processes dies (while receiving the method, or on its first
    block): the run completes on the other, with the single-process result exactly."""
    import logging

    import distributed

    from napari_stem_strain.distributed import run_method_dask
    from napari_stem_strain.io.readers import open_dataset
    from napari_stem_strain.methods.runner import run_method

    with open_dataset(scan_file) as ds:
        ref = run_method(Com(), ds)
    marker = tmp_path / "died"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", protocol="tcp://",
                                  dashboard_address="127.0.0.1:0",
                                  silence_logs=logging.CRITICAL) as cluster, \
            open_dataset(scan_file) as ds:
        res = run_method_dask(cls(str(marker)), ds, cluster.scheduler_address,
                              block_bytes=2 * 5 * 8 * 8 * 4)
    assert marker.exists(), "no worker died: the case tested nothing"
    np.testing.assert_array_equal(res.A, ref.A)
    np.testing.assert_array_equal(res.sample, ref.sample)


# ------------------------------------------------------------------ unclear messages


@pytest.mark.parametrize("chunked_4d", [True, False])
def test_missing_hdf5_filter_is_named(tmp_path, capsys, chunked_4d):
    """An array compressed with a filter that is not installed read as "can't open directory
    (/usr/local/lib/plugin)" under a "truncated or corrupt file?" guess."""
    import h5py

    src = tmp_path / "lzf.h5"
    data = np.random.default_rng(0).poisson(5, (4, 4, 16, 16)).astype("uint16")
    with h5py.File(src, "w") as f:
        f.create_dataset("data", data=data, chunks=(1, 1, 16, 16) if chunked_4d else None,
                         compression="lzf")
    raw = bytearray(src.read_bytes())
    at = raw.rfind((32000).to_bytes(2, "little"), 0, raw.find(b"lzf\0"))
    raw[at:at + 2] = (32999).to_bytes(2, "little")  # a filter id no library provides
    bad = tmp_path / "unknown_filter.h5"
    bad.write_bytes(bytes(raw))
    code, err = _cli(capsys, "info", bad)
    assert code == 2
    assert_one_line(err, "stem-strain: error:", str(bad), "filter", "not installed")
    assert "corrupt" not in err and "/usr/local/lib/plugin" not in err


@pytest.mark.parametrize("how", ["deleted", "renamed folder"])
def test_virtual_dataset_with_a_missing_source_is_refused(tmp_path, capsys, how):
    """An HDF5 virtual dataset whose source file is missing read the missing part as zeros
    (fill value) without a word: a silently half-empty map."""
    import shutil

    import h5py

    folder = tmp_path / "acq"
    folder.mkdir()
    for i in range(2):
        with h5py.File(folder / f"src{i}.h5", "w") as f:
            f["data"] = np.random.default_rng(i).poisson(5, (4, 4, 16, 16)).astype("uint16")
    layout = h5py.VirtualLayout(shape=(8, 4, 16, 16), dtype="uint16")
    for i in range(2):
        src = f"src{i}.h5" if how == "deleted" else str(folder / f"src{i}.h5")
        layout[4 * i:4 * i + 4] = h5py.VirtualSource(src, "data", shape=(4, 4, 16, 16))
    vds = folder / "vds.h5"
    with h5py.File(vds, "w") as f:
        f.create_virtual_dataset("data", layout, fillvalue=0)
    from napari_stem_strain.io.readers import open_dataset

    with open_dataset(vds) as ds:  # the control: all sources there
        assert ds.read_rows(4, 8).any()
    if how == "deleted":
        (folder / "src1.h5").unlink()
    else:
        moved = tmp_path / "moved"
        shutil.copytree(folder, moved)
        shutil.rmtree(folder)
        vds = moved / "vds.h5"  # its absolute source paths point to the old folder
    code, err = _cli(capsys, "info", vds)
    assert code == 2
    assert_one_line(err, "stem-strain: error:", str(vds), "src", "does not exist")


@pytest.mark.bound(60)
def test_another_users_lock_file_does_not_stop_a_writer(tmp_path):
    """A result folder shared by two users: the lock file the other user left (mode 0644) is
    locked through a read-only handle instead of failing with "Permission denied"."""
    import os
    import shutil

    from napari_stem_strain.io.results import read_results, write_results

    if os.geteuid() != 0:
        pytest.skip("needs root to act as two users")
    folder = Path("/tmp") / f"nss-lock-{os.getpid()}-{tmp_path.name}"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    try:
        lock = folder / ".r.h5.lock"
        lock.write_bytes(b"")
        lock.chmod(0o644)  # root's, read-only for others
        pid = os.fork()
        if pid == 0:  # the child, as nobody: never return into pytest
            code = 3
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                write_results(folder / "r.h5", [_group()])
                code = 0
            except BaseException:  # noqa: BLE001
                code = 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert list(read_results(folder / "r.h5")) == ["ae"]
    finally:
        shutil.rmtree(folder)


def test_result_records_the_input_stamp(tiny_input, tmp_path, capsys):
    """Each result group records the input's size, mtime and checksum taken at the start."""
    import h5py

    from napari_stem_strain.io.stamp import InputStamp

    src = tmp_path / "in.h5"
    src.write_bytes(tiny_input.read_bytes())
    out = tmp_path / "out.h5"
    code, err = _cli(capsys, "map", src, "--method", "py4dstem", "--quiet", "--out", out)
    assert code == 0, err
    now = InputStamp.take(src)
    with h5py.File(out) as h5:
        g = h5["py4dstem"]
        assert int(g.attrs["input_size"]) == now.size
        assert int(g.attrs["input_mtime_ns"]) == now.mtime_ns
        assert g.attrs["input_checksum"] == now.checksum


@pytest.mark.bound(120)
def test_cli_stderr_is_one_line_in_a_real_process(shared_formats, tmp_path):
    """In a real process (pytest captures warnings itself): numpy's RuntimeWarnings printed
    two more lines (the warning and its source line) beside the one error line."""
    import subprocess
    import sys

    src = shared_formats / "dmTest_3D_int16_64,65,66.dm4"
    code = ("import sys; from napari_stem_strain.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "map", str(src), "--method", "ae",
                        "--device", "cpu", "--quiet", "--scan-shape", "6", "11",
                        "--out", str(tmp_path / "o.h5")],
                       capture_output=True, text=True, timeout=110)
    assert r.returncode in (2, 3)
    assert_one_line(r.stderr, "stem-strain: error:", src.name)


ODD_MESSAGES = [
    ("Can't write data (file write failed: time = Sat Nov 28 01:42:29 2026\n, filename = "
     "'o.h5', errno = 28, error message = 'No space left on device')\nmore detail",
     "error message = 'No space left on device')"),
    ("unable to open file (file signature not found)\n\nTraceback (most recent call last):\n"
     "  File x", "(file signature not found)"),
    ("\n\n  leading blank lines then the message\nsecond", "leading blank lines then the message"),
]


@pytest.mark.parametrize(("text", "ends"), ODD_MESSAGES)
def test_error_lines_are_not_cut_mid_sentence(monkeypatch, capsys, text, ends):
    """The CLI printed the first line of a message: HDF5's messages break a line inside a
    parenthesis ("(file write failed: time = ... 2026" and nothing after)."""
    from napari_stem_strain.cli import info

    def boom(args):
        raise OSError(text)

    monkeypatch.setattr(info, "run", boom)
    code, err = _cli(capsys, "info", "x.h5")
    assert code == 2
    assert_one_line(err, "stem-strain: error:")
    assert err.endswith(ends), err


@pytest.mark.parametrize("layout", ["half written", "one chunk written"])
def test_hdf5_array_not_fully_written_is_refused(tmp_path, capsys, layout):
    """A file still being written (or an acquisition cut short) reads its unwritten chunks as
    the fill value: a partial map with exit 0. Chunks that were never written are counted at
    open."""
    import h5py

    path = tmp_path / "partial.h5"
    data = np.random.default_rng(0).poisson(5, (8, 4, 16, 16)).astype("uint16")
    with h5py.File(path, "w") as f:
        d = f.create_dataset("data", shape=data.shape, dtype="uint16", chunks=(1, 4, 16, 16))
        if layout == "half written":
            d[:4] = data[:4]  # the writer got half-way
        else:
            d[0] = data[0]
    code, err = _cli(capsys, "info", path)
    assert code == 2
    assert_one_line(err, "stem-strain: error:", str(path), "written")
