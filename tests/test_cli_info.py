"""``stem-strain info``."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from napari_stem_strain.cli import main

SI100 = "/4DSTEM_simulation/data/datacubes/CBED_array_depth{:04d}/datacube"


def _run(capsys, *argv):
    rc = main(["info", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(err: str, name: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("stem-strain: error:") and name in lines[0]
    assert "Traceback" not in err
    return lines[0]


def test_info_py4dstem(shared_formats, capsys):
    rc, out, _ = _run(capsys, shared_formats / "py4DSTEM_size2x3x4x5.h5")
    assert rc == 0
    assert "py4DSTEM EMD" in out
    assert "(2, 3, 4, 5)" in out
    assert "float32" in out
    assert "0.126797 nm" in out and "A^-1" in out
    assert "on disk" in out


def test_info_png(shared_formats, tmp_path, capsys):
    png = tmp_path / "bf.png"
    rc, out, _ = _run(capsys, shared_formats / "test1.blo", "--png", png)
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    assert imread(png).shape[:2] == (3, 2)
    assert "bright field: wrote" in out and "direct beam" in out


def test_info_several_arrays(shared_formats, tmp_path, capsys):
    path = shared_formats / "Si100_4D.emd"
    rc, out, _ = _run(capsys, path)
    assert rc == 0
    assert SI100.format(0) in out and SI100.format(1) in out and "--dataset" in out
    rc, out, _ = _run(capsys, path, "--dataset", SI100.format(1))
    assert rc == 0
    assert "(11, 11, 8, 8)" in out and "Prismatic EMD" in out
    assert f"* {SI100.format(1)}" in out and f"- {SI100.format(0)}" in out
    rc, _, err = _run(capsys, path, "--png", tmp_path / "x.png")
    assert rc == 2
    assert "several" in _one_line_error(err, path.name)


def test_info_stack_needs_scan_shape(shared_formats, capsys):
    path = shared_formats / "dmTest_3D_int16_64,65,66.dm4"
    rc, _, err = _run(capsys, path)
    assert rc == 2
    assert "--scan-shape" in _one_line_error(err, path.name)
    rc, out, _ = _run(capsys, path, "--scan-shape", 6, 11)
    assert rc == 0
    assert "(6, 11, 65, 64)" in out and "int16" in out and "from caller" in out


@pytest.mark.parametrize("name", ["test_diffraction_pattern.dm3", "001_4x2_6bit.hdr"])
def test_info_bad_real_files(shared_formats, capsys, name):
    rc, _, err = _run(capsys, shared_formats / name)
    assert rc == 2
    _one_line_error(err, name)


def test_info_arina(shared_formats, capsys):
    rc, out, _ = _run(capsys, shared_formats / "test_00_master.h5")
    assert rc == 0
    assert "(4, 4, 192, 192)" in out and "uint32" in out and "(2 files)" in out


def test_info_bad_inputs(tmp_path, capsys):
    rc, _, err = _run(capsys, tmp_path / "missing.h5")
    assert rc == 2
    _one_line_error(err, "missing.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"garbage" * 200)
    rc, _, err = _run(capsys, bad)
    assert rc == 2
    _one_line_error(err, "bad.h5")
    five = tmp_path / "five.npy"
    np.save(five, np.zeros((2, 2, 2, 3, 3), np.float32))
    rc, _, err = _run(capsys, five)
    assert rc == 2
    assert "5D" in _one_line_error(err, "five.npy")


def test_info_png_bad_target(tmp_path, capsys):
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.ones((3, 3, 16, 16), np.float32)
    rc, _, err = _run(capsys, path, "--png", tmp_path / "no" / "such" / "dir" / "x.png")
    assert rc == 2
    _one_line_error(err, "x.png")
    rc, _, err = _run(capsys, path, "--png", tmp_path / "x.jpg")
    assert rc == 2
    _one_line_error(err, "x.jpg")
