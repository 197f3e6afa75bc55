"""Result files follow CONVENTIONS.md, are written atomically and re-reference without re-runs."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from napari_stem_strain.io.results import (
    MethodMaps,
    ResultFileError,
    check_writable,
    read_results,
    write_results,
)
from napari_stem_strain.methods.base import MethodResult
from napari_stem_strain.strain import strain_to_A


def _result(method: str = "ae", shape=(6, 7)) -> MethodResult:
    rng = np.random.default_rng(0)
    exx = rng.normal(0, 0.01, shape)
    A = strain_to_A(exx, 0 * exx, 0 * exx, 0 * exx)
    A[:3, :3] = strain_to_A(0, 0, 0, 0)  # unstrained reference corner
    sample = np.ones(shape, bool)
    sample[-1, -1] = False
    return MethodResult(method, A.astype(np.float32), sample, {"k": 1}, 1.5, 60.0)


def test_round_trip_layout(tmp_path):
    path = tmp_path / "r.h5"
    g = MethodMaps.from_result(_result(), "0:3,0:3", input_file="in.h5")
    write_results(path, [g])
    with h5py.File(path) as h5:
        grp = h5["ae"]
        for k in ("exx", "eyy", "exy", "theta"):
            assert grp[k].shape == (6, 7) and grp[k].dtype == np.float32
        assert grp["A"].shape == (6, 7, 2, 2)
        assert grp.attrs["reference"] == "0:3,0:3"
        assert "napari-stem-strain" in grp.attrs["software_version"]
        assert grp.attrs["seconds"] == 1.5
        assert np.isnan(grp["exx"][-1, -1])  # background is NaN, never zero
    back = read_results(path)["ae"]
    np.testing.assert_array_equal(back.maps.exx, g.maps.exx)
    assert back.settings == {"k": 1} and back.symmetry_deg == 60.0
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_reference_median_is_zero_and_rereference_changes_maps(tmp_path):
    g = MethodMaps.from_result(_result(), "0:3,0:3")
    assert abs(np.nanmedian(g.maps.exx[:3, :3])) < 1e-6
    g2 = g.with_reference("3:6,3:6")
    assert abs(np.nanmedian(g2.maps.exx[3:6, 3:6])) < 1e-6
    assert not np.allclose(g.maps.exx, g2.maps.exx, equal_nan=True)
    np.testing.assert_array_equal(g2.A_raw, g.A_raw)


def test_second_method_is_added_not_replacing(tmp_path):
    path = tmp_path / "r.h5"
    write_results(path, [MethodMaps.from_result(_result("ae"), "0:3,0:3")])
    write_results(path, [MethodMaps.from_result(_result("py4dstem"), "0:3,0:3")])
    assert set(read_results(path)) == {"ae", "py4dstem"}


def test_bad_result_files(tmp_path):
    with pytest.raises(ResultFileError, match="no such result file"):
        read_results(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(ResultFileError, match="not a readable HDF5"):
        read_results(junk)
    partial = tmp_path / "partial.h5"
    with h5py.File(partial, "w") as h5:
        h5.create_dataset("ae/exx", data=np.zeros((2, 2)))
    with pytest.raises(ResultFileError, match="lacks"):
        read_results(partial)


def test_unwritable_output_fails_before_work(tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        check_writable(tmp_path / "nope" / "r.h5")
    with pytest.raises(OSError, match="MiB free"):
        check_writable(tmp_path / "r.h5", needed_bytes=2**62)
