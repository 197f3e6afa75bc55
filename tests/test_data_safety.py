"""No silent loss or mix-up of data: ``map --out`` onto a result file of another input, and a
Dectris master whose data file is missing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from napari_stem_strain.io.results import read_results


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory) -> tuple[Path, Path]:
    from napari_stem_strain.simulate import SimulationSettings, simulate_to_file

    folder = tmp_path_factory.mktemp("inputs")
    a, b = folder / "a.h5", folder / "b.h5"
    simulate_to_file(a, SimulationSettings(scan=(6, 6), pattern=64, seed=1), workers=1)
    simulate_to_file(b, SimulationSettings(scan=(6, 6), pattern=64, seed=2), workers=1)
    return a, b


def _map(*args: str) -> tuple[int, str]:
    import contextlib
    import io

    from napari_stem_strain.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["map", *args, "--quiet"])
    return code, err.getvalue().strip()


def test_map_out_holding_another_inputs_results_is_refused(two_inputs, tmp_path, monkeypatch):
    a, b = two_inputs
    out = tmp_path / "res.h5"
    assert _map(str(a), "--method", "py4dstem", "--out", str(out))[0] == 0
    before = _sha(out)

    from napari_stem_strain import pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a method ran although the run was bound to fail")

    with monkeypatch.context() as m:
        m.setattr(pipeline, "run_method_on", refuse)
        code, err = _map(str(b), "--method", "ae", "--out", str(out))
    assert code == 2
    assert err.startswith("stem-strain: error:") and "\n" not in err
    assert "a.h5" in err and "b.h5" in err and "--overwrite" in err
    assert _sha(out) == before

    # the same input adds its other method to the file
    assert _map(str(a), "--method", "ae", "--out", str(out))[0] == 0
    assert set(read_results(out)) == {"ae", "py4dstem"}

    # --overwrite replaces the file: only b's result is left
    assert _map(str(b), "--method", "py4dstem", "--out", str(out), "--overwrite")[0] == 0
    back = read_results(out)
    assert set(back) == {"py4dstem"} and back["py4dstem"].input_file.endswith("b.h5")


def test_map_out_onto_a_file_that_is_no_result_is_refused(two_inputs, tmp_path, monkeypatch):
    a, _ = two_inputs
    other = tmp_path / "calibration.h5"
    with h5py.File(other, "w") as h5:
        h5["gain"] = np.ones((4, 4))
    before = _sha(other)
    from napari_stem_strain import pipeline

    monkeypatch.setattr(pipeline, "run_method_on",
                        lambda *a, **k: pytest.fail("a method ran"))
    code, err = _map(str(a), "--method", "py4dstem", "--out", str(other))
    assert code == 2 and "not a napari-stem-strain result file" in err and "\n" not in err
    assert _sha(other) == before


def _arina(folder: Path, value: int, q: int = 12, n: int = 16) -> Path:
    """``scan_master.h5`` + ``scan_data_000001.h5`` (every frame filled with ``value``)."""
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / "scan_data_000001.h5", "w") as f:
        f.create_dataset("entry/data/data", data=np.full((n, q, q), value, np.uint16))
    with h5py.File(folder / "scan_master.h5", "w") as m:
        m.create_group("entry/data")["data_000001"] = h5py.ExternalLink(
            "scan_data_000001.h5", "/entry/data/data")
    return folder / "scan_master.h5"


def test_dectris_master_never_reads_a_data_file_from_the_working_directory(tmp_path,
                                                                           monkeypatch):
    from napari_stem_strain.io.errors import DataError
    from napari_stem_strain.io.readers import open_dataset

    master = _arina(tmp_path / "acq1", value=1)
    (tmp_path / "acq1" / "scan_data_000001.h5").unlink()  # the data file went missing
    _arina(tmp_path / "acq2", value=2)  # another acquisition, same file names
    monkeypatch.chdir(tmp_path / "acq2")
    with pytest.raises(DataError) as err:
        with open_dataset(master) as ds:
            pytest.fail(f"opened frames of value {ds.read_rows(0, 1).max()} from the cwd")
    msg = str(err.value)
    assert "\n" not in msg and "scan_data_000001.h5" in msg and "missing" in msg
    # with its data file beside it, the master opens its own frames
    _arina(tmp_path / "acq1", value=1)
    with open_dataset(master) as ds:
        assert ds.shape == (4, 4, 12, 12) and ds.read_rows(0, 4).max() == 1


def test_map_help_states_every_default(capsys):
    from napari_stem_strain.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    mp = sub.choices["map"]
    for action in mp._actions:
        if not action.option_strings or action.dest in ("help", "out"):
            continue
        assert action.help and "default" in action.help.lower(), action.option_strings
