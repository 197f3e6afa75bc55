"""Faults outside the data: unwritable output, a full disk, a crash mid-write, a cancel.

The rule: an output problem is found *before* the work (``io.results.check_writable``), and a
failure during a write never leaves a half-written file under the final name nor a temporary
file behind. (Worker processes killed mid-run: ``test_distributed.py``.)

Permission checks honestly depend on who runs them: root may write into a mode-0555 folder.
So the "no permission" cases run the check in a forked child that has dropped to the
unprivileged ``nobody`` user; as that user a read-only folder must be refused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from napari_stem_strain.io.results import MethodMaps, check_writable, write_results
from napari_stem_strain.methods.base import Cancelled, MethodResult
from napari_stem_strain.strain import strain_to_A

NOBODY = 65534


def _as_unprivileged(fn: Callable[[], None]) -> tuple[int, str]:
    """Run ``fn`` in a forked child as uid/gid ``nobody`` (when we are root) or as ourselves.

    Returns ``(0, "")`` when ``fn`` returned, ``(1, message)`` when it raised OSError.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 3
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            try:
                fn()
                code = 0
            except OSError as err:
                os.write(w, str(err).encode()[:4000])
                code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        msg = fh.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), msg


@pytest.fixture
def open_folder(tmp_path) -> Path:
    """A folder the unprivileged child can reach (tmp_path's parents are root-only)."""
    d = Path("/tmp") / f"nss-faults-{os.getpid()}-{tmp_path.name}"
    d.mkdir(mode=0o755)
    yield d
    for p in d.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    shutil.rmtree(d)


def _result(shape=(40, 50)) -> MethodResult:
    rng = np.random.default_rng(0)
    exx = rng.normal(0, 0.01, shape)
    A = strain_to_A(exx, 0 * exx, 0 * exx, 0 * exx).astype(np.float32)
    return MethodResult("ae", A, np.ones(shape, bool), {}, 1.0, 60.0)


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ fail before the work


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        check_writable(tmp_path / "nope" / "out.h5")


def test_read_only_folder_is_refused_for_an_unprivileged_user(open_folder):
    ro = open_folder / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    code, msg = _as_unprivileged(lambda: check_writable(ro / "out.h5"))
    assert code == 1, "check_writable accepted a folder the user cannot write"
    assert "no permission" in msg and str(ro) in msg
    # and a writable folder is accepted by the same user
    rw = open_folder / "rw"
    rw.mkdir()
    rw.chmod(0o777)
    assert _as_unprivileged(lambda: check_writable(rw / "out.h5")) == (0, "")


def test_read_only_existing_file_is_refused_for_an_unprivileged_user(open_folder):
    open_folder.chmod(0o777)
    f = open_folder / "out.h5"
    f.write_bytes(b"old")
    f.chmod(0o444)
    code, msg = _as_unprivileged(lambda: check_writable(f))
    assert code == 1 and "read-only" in msg


def test_read_only_folder_root_truth(tmp_path):
    """As root the same folder IS writable, and check_writable must not claim otherwise."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.geteuid() == 0:
            check_writable(ro / "out.h5")  # root may write: no false alarm
        else:
            with pytest.raises(OSError, match="no permission"):
                check_writable(ro / "out.h5")
    finally:
        ro.chmod(0o755)


def test_not_enough_free_space_is_refused(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(OSError, match="MiB free"):
        check_writable(tmp_path / "out.h5", needed_bytes=free + 2**30)
    check_writable(tmp_path / "out.h5", needed_bytes=1024)  # a small need passes


# ------------------------------------------------------------------ failures during a write


def test_crash_mid_write_leaves_old_file_intact(tmp_path, monkeypatch):
    from napari_stem_strain.io import results as results_mod

    path = tmp_path / "r.h5"
    write_results(path, [MethodMaps.from_result(_result(), "0:4,0:4")])
    before = _sha(path)

    def boom(h5, m):
        h5.create_group("half")
        raise RuntimeError("power cut")

    monkeypatch.setattr(results_mod, "_write_group", boom)
    with pytest.raises(RuntimeError, match="power cut"):
        write_results(path, [MethodMaps.from_result(_result(), "0:4,0:4")])
    assert _sha(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5"]


_FULL_DISK_CHILD = r"""
import resource, signal, sys
import numpy as np
from napari_stem_strain.io.results import MethodMaps, write_results
from napari_stem_strain.methods.base import MethodResult
from napari_stem_strain.strain import strain_to_A
shape = (300, 300)
rng = np.random.default_rng(0)
exx = rng.normal(0, 0.01, shape)
A = strain_to_A(exx, 0 * exx, 0 * exx, 0 * exx).astype(np.float32)
g = MethodMaps.from_result(MethodResult("ae", A, np.ones(shape, bool), {}, 1.0, 60.0), "0:4,0:4")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
try:
    write_results(sys.argv[1], [g])
except OSError as err:
    print("OSError:", str(err).splitlines()[0])
    sys.exit(2)
except BaseException as err:  # anything else reaches the user as a traceback
    print(type(err).__name__ + ":", str(err).splitlines()[0])
    sys.exit(3)
sys.exit(0)
"""


def test_disk_full_during_write_leaves_nothing(tmp_path):
    """A file-size limit makes the write fail part-way, as a full disk does: the error is an
    OSError and neither the final name nor a temporary file remains."""
    out = tmp_path / "big.h5"
    r = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, str(out)],
                       capture_output=True, text=True, timeout=120)
    assert list(tmp_path.iterdir()) == []  # no half-written file, no temporary left
    assert r.returncode != 0, "the write cannot have succeeded under a 256 KiB file limit"
    # the CLI turns OSError into one line; any other type would reach the user as a traceback
    assert r.returncode == 2 and r.stdout.startswith("OSError:"), r.stdout


def test_cancelled_simulation_leaves_nothing(tmp_path):
    from napari_stem_strain.simulate import SimulationSettings, simulate_to_file

    calls = []
    with pytest.raises(Cancelled):
        simulate_to_file(tmp_path / "sim.h5", SimulationSettings(scan=(16, 16), pattern=64),
                         progress=lambda d, t, m: calls.append(d),
                         should_stop=lambda: len(calls) >= 2, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_simulation_to_unwritable_place_fails_before_work(tmp_path):
    from napari_stem_strain.simulate import SimulationSettings, simulate_to_file

    with pytest.raises(OSError, match="does not exist"):
        simulate_to_file(tmp_path / "nope" / "sim.h5", SimulationSettings(scan=(4, 4)))
    free = shutil.disk_usage(tmp_path).free
    too_big = SimulationSettings(scan=(int(np.sqrt(free / 2 / 512**2)) + 64,) * 2, pattern=512)
    with pytest.raises(OSError, match="MiB free"):
        simulate_to_file(tmp_path / "sim.h5", too_big)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ the CLI, end to end


def test_cli_map_to_missing_folder_fails_before_the_work(tiny_input, tmp_path, capsys,
                                                         no_method_may_run):
    from napari_stem_strain.cli import main

    before = _sha(tiny_input)
    code = main(["map", str(tiny_input), "--method", "py4dstem", "--quiet",
                 "--out", str(tmp_path / "nope" / "out.h5")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("stem-strain: error:") and "does not exist" in err
    assert "\n" not in err  # one line, no traceback
    assert _sha(tiny_input) == before


def test_cli_map_with_bad_dask_address_is_one_line(tiny_input, tmp_path, capsys):
    from napari_stem_strain.cli import main

    out = tmp_path / "out.h5"
    code = main(["map", str(tiny_input), "--method", "py4dstem", "--quiet", "--out", str(out),
                 "--dask", "nonsense"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "dask address" in err and "\n" not in err
    assert not out.exists()
