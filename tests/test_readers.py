"""Readers: every real file of ../shared/data/formats, and synthetic edge cases.

Real files are read where they lie (read-only); reference values come from h5py and from
RosettaSciIO's eager (non-lazy) readers.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from napari_stem_strain.io import DataError, Dataset, list_4d_arrays, open_dataset
from napari_stem_strain.io.readers import SUPPORTED_SUFFIXES, inspect_file

SI100 = "/4DSTEM_simulation/data/datacubes/CBED_array_depth{:04d}/datacube"


def _lazy(data) -> bool:
    import dask.array as da

    from napari_stem_strain.io._framestack import FrameStack

    return isinstance(data, h5py.Dataset | da.Array | np.memmap | FrameStack)


def _one_line_naming(err: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    assert path.name in msg
    return msg


# --------------------------------------------------------------------------------------------
# real files


def test_supported_suffixes():
    for s in (".h5", ".hdf5", ".emd", ".dm3", ".dm4", ".mib", ".blo", ".npy"):
        assert s in SUPPORTED_SUFFIXES


def test_py4dstem_emd(shared_formats):
    path = shared_formats / "py4DSTEM_size2x3x4x5.h5"
    assert list_4d_arrays(path) == ["/datacube_root/datacube/data"]
    with open_dataset(path) as ds:
        assert ds.shape == (2, 3, 4, 5)
        assert ds.dtype == np.float32
        assert isinstance(ds.data, h5py.Dataset)
        assert ds.name == "/datacube_root/datacube/data"
        assert ds.metadata["format"].startswith("py4DSTEM EMD")
        cal = ds.calibration
        assert cal.r_pixel_size == pytest.approx(0.126796875)
        assert cal.r_units == "nm"
        assert cal.q_pixel_size == pytest.approx(0.044251566616087125)
        assert cal.q_units == "A^-1"
        with h5py.File(path, "r") as f:
            ref = f["datacube_root/datacube/data"][()]
        np.testing.assert_array_equal(ds.read_rows(0, 2), ref)
        np.testing.assert_array_equal(ds.read_rows(1, 2), ref[1:2])


def test_arina_master(shared_formats):
    path = shared_formats / "test_00_master.h5"
    assert list_4d_arrays(path) == ["/entry/data"]
    with open_dataset(path) as ds:
        assert ds.shape == (4, 4, 192, 192)
        assert ds.dtype == np.uint32
        assert _lazy(ds.data)
        assert "Arina" in ds.metadata["format"] or "ARINA" in ds.metadata["format"]
        assert "square" in ds.metadata["scan_shape_from"]
        assert len(ds.metadata["files"]) == 2  # master + data file
        with h5py.File(shared_formats / "test_00_data_000001.h5", "r") as f:
            import hdf5plugin  # noqa: F401

            ref = f["entry/data/data"][()].reshape(4, 4, 192, 192)
        np.testing.assert_array_equal(ds.read_rows(1, 3), ref[1:3])
    with open_dataset(path, scan_shape=(2, 8)) as ds:
        assert ds.shape == (2, 8, 192, 192)
        assert ds.metadata["scan_shape_from"] == "caller"
    with pytest.raises(DataError) as err:
        open_dataset(path, scan_shape=(3, 5))
    assert "16" in _one_line_naming(err, path)


def test_arina_data_file_alone(shared_formats):
    path = shared_formats / "test_00_data_000001.h5"
    with pytest.raises(DataError) as err:
        open_dataset(path)
    assert "master" in _one_line_naming(err, path)
    with open_dataset(path, scan_shape=(4, 4)) as ds:
        assert ds.shape == (4, 4, 192, 192)


def _rsciio_eager(path: Path):
    import importlib

    from napari_stem_strain.io._formats_rsciio import RSCIIO_FORMATS

    mod = importlib.import_module(RSCIIO_FORMATS[path.suffix.lower()][0])
    return mod.file_reader(str(path))[0]["data"]


@pytest.mark.parametrize("name, shape", [
    ("001_4x2_6bit.mib", (2, 4, 256, 256)),
    ("002_4x2_6bit_roi128.mib", (2, 4, 128, 256)),
    ("test1.blo", (3, 2, 144, 144)),
])
def test_rsciio_4d(shared_formats, name, shape):
    """Merlin "4x2" = 4 positions per scan line x 2 lines: (Rx, Ry) = (2, 4) rows x columns,
    as the frames lie in the file (RosettaSciIO's array order). The blockfile is 3 lines of 2."""
    path = shared_formats / name
    assert list_4d_arrays(path) == [name]
    with open_dataset(path) as ds:
        assert ds.shape == shape
        assert ds.dtype == np.uint8
        assert _lazy(ds.data)
        np.testing.assert_array_equal(np.asarray(ds.data), _rsciio_eager(path))
        np.testing.assert_array_equal(ds.read_rows(1, 2), _rsciio_eager(path)[1:2])


def test_blockfile_calibration(shared_formats):
    with open_dataset(shared_formats / "test1.blo") as ds:
        assert ds.calibration.r_pixel_size == pytest.approx(12.8)
        assert ds.calibration.r_units == "nm"
        assert ds.calibration.q_pixel_size is None  # "cm" on a diffraction axis is not usable


def test_mib_caller_scan_shape(shared_formats):
    path = shared_formats / "001_4x2_6bit.mib"
    with open_dataset(path, scan_shape=(1, 8)) as ds:
        assert ds.shape == (1, 8, 256, 256)
        np.testing.assert_array_equal(ds.read_rows(0, 1).reshape(8, 256, 256),
                                      _rsciio_eager(path).reshape(8, 256, 256))
    with pytest.raises(DataError) as err:
        open_dataset(path, scan_shape=(3, 3))
    assert "8 frames" in _one_line_naming(err, path)


def test_prismatic_two_arrays(shared_formats):
    path = shared_formats / "Si100_4D.emd"
    names = list_4d_arrays(path)
    assert names == [SI100.format(0), SI100.format(1)]
    with pytest.raises(DataError) as err:
        open_dataset(path)
    msg = _one_line_naming(err, path)
    assert all(n in msg for n in names)
    for n in names:
        with open_dataset(path, dataset=n) as ds:
            assert ds.shape == (11, 11, 8, 8)
            assert ds.dtype == np.float32
            assert ds.name == n
            assert ds.metadata["format"] == "Prismatic EMD"
            # Prismatic writes Angstrom values under an "[n_m]" label (Q step = 1/a(Si))
            assert ds.calibration.r_pixel_size == pytest.approx(0.5)
            assert ds.calibration.q_pixel_size == pytest.approx(1 / 5.43, rel=1e-4)
            with h5py.File(path, "r") as f:
                np.testing.assert_array_equal(ds.read_rows(0, 11), f[n][()])
    # a leading slash is optional
    with open_dataset(path, dataset=names[1].lstrip("/")) as ds:
        assert ds.name == names[1]
    with pytest.raises(DataError) as err:
        open_dataset(path, dataset="/no/such/array")
    assert "/no/such/array" in _one_line_naming(err, path)


def test_dm_3d_stack_needs_scan_shape(shared_formats):
    path = shared_formats / "dmTest_3D_int16_64,65,66.dm4"
    assert list_4d_arrays(path) == []
    assert list_4d_arrays(path, include_stacks=True) == [path.name]
    with pytest.raises(DataError) as err:
        open_dataset(path)
    msg = _one_line_naming(err, path)
    assert "scan_shape" in msg and "66" in msg
    with open_dataset(path, scan_shape=(6, 11)) as ds:
        assert ds.shape == (6, 11, 65, 64)
        assert ds.dtype == np.int16
        assert _lazy(ds.data)
        ref = _rsciio_eager(path).reshape(6, 11, 65, 64)
        np.testing.assert_array_equal(ds.read_rows(2, 4), ref[2:4])
        assert ds.calibration.q_pixel_size is None  # nm / pm axes: an image stack, not q
    with pytest.raises(DataError) as err:
        open_dataset(path, scan_shape=(5, 5))
    assert "25" in _one_line_naming(err, path)


def test_dm_tiny_stack(shared_formats):
    path = shared_formats / "test-1.dm4"
    with pytest.raises(DataError, match="scan_shape"):
        open_dataset(path)
    with open_dataset(path, scan_shape=(1, 2)) as ds:
        assert ds.shape == (1, 2, 2, 2)
        assert ds.dtype == np.int16


def test_dm3_single_pattern_is_not_4d(shared_formats):
    path = shared_formats / "test_diffraction_pattern.dm3"
    assert list_4d_arrays(path, include_stacks=True) == []
    with pytest.raises(DataError) as err:
        open_dataset(path)
    msg = _one_line_naming(err, path)
    assert "(87, 87)" in msg and "2D" in msg


def test_merlin_header_points_to_mib(shared_formats):
    path = shared_formats / "001_4x2_6bit.hdr"
    with pytest.raises(DataError, match=r"001_4x2_6bit\.mib"):
        open_dataset(path)


def test_shared_files_untouched(shared_formats):
    """Opening, listing and reading every shared file leaves it byte for byte the same."""
    files = sorted(p for p in shared_formats.iterdir() if p.suffix != ".md")
    before = {p: (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest()) for p in files}
    for p in files:
        for kw in ({}, {"scan_shape": (2, 1)}):
            try:
                list_4d_arrays(p, include_stacks=True)
                with open_dataset(p, **kw) as ds:
                    ds.read_rows(0, 1)
            except DataError:
                pass
    after = {p: (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest()) for p in files}
    assert before == after


def test_inspect_file_formats(shared_formats):
    s = inspect_file(shared_formats / "Si100_4D.emd")
    assert s.format == "Prismatic EMD"
    assert len(s.names()) == 2


# --------------------------------------------------------------------------------------------
# synthetic files


def _h5(path: Path, **arrays) -> Path:
    with h5py.File(path, "w") as f:
        for name, a in arrays.items():
            if isinstance(a, tuple):  # a shape: an empty (zero-size or never written) dataset
                f.create_dataset(name, shape=a, dtype=np.float32)
            else:
                f[name] = a
    return path


def test_hdf5_largest_4d_default_and_choice(tmp_path):
    big = np.arange(4 * 5 * 6 * 7, dtype=np.float32).reshape(4, 5, 6, 7)
    path = _h5(tmp_path / "x.h5", **{"g/big": big, "small": np.ones((2, 2, 6, 7), np.uint16),
                                     "img": np.zeros((9, 9))})
    assert sorted(list_4d_arrays(path)) == ["/g/big", "/small"]
    with open_dataset(path) as ds:
        assert ds.name == "/g/big" and ds.shape == (4, 5, 6, 7)
        np.testing.assert_array_equal(ds.read_rows(1, 3), big[1:3])
        assert ds.metadata["format"] == "HDF5"
    with open_dataset(path, dataset="small") as ds:
        assert ds.shape == (2, 2, 6, 7) and ds.dtype == np.uint16


def test_hdf5_equal_sizes_are_ambiguous(tmp_path):
    a = np.zeros((2, 2, 5, 5), np.float32)
    path = _h5(tmp_path / "two.h5", a=a, b=a)
    with pytest.raises(DataError) as err:
        open_dataset(path)
    msg = _one_line_naming(err, path)
    assert "'/a'" in msg and "'/b'" in msg and "dataset" in msg


def test_hdf5_attrs_calibration_and_ground_truth_ignored(tmp_path):
    """The project's simulated layout: /data with calibration attributes, /ground_truth/A
    (Rx, Ry, 2, 2) is never a candidate."""
    path = tmp_path / "sim.h5"
    with h5py.File(path, "w") as f:
        d = f.create_dataset("data", data=np.ones((3, 4, 8, 8), np.uint16), chunks=(1, 4, 8, 8))
        d.attrs.update(r_pixel_size=1.5, r_units="nm", q_pixel_size=0.02, q_units="1/nm")
        f["ground_truth/A"] = np.zeros((3, 4, 2, 2), np.float32)
        f["ground_truth/center"] = np.zeros((3, 4, 2), np.float32)
    assert list_4d_arrays(path, include_stacks=True) == ["/data"]
    with open_dataset(path) as ds:
        assert ds.shape == (3, 4, 8, 8)
        assert ds.calibration.r_pixel_size == 1.5 and ds.calibration.r_units == "nm"
        assert ds.calibration.q_pixel_size == 0.02 and ds.calibration.q_units == "1/nm"


def test_simulated_file_opens(tmp_path):
    from napari_stem_strain.simulate import SimulationSettings, simulate_to_file

    path = simulate_to_file(tmp_path / "sim.h5",
                            SimulationSettings(scan=(6, 5), pattern=48, seed=1))
    with open_dataset(path) as ds:
        assert ds.shape == (6, 5, 48, 48)
        assert ds.name == "/data"
        assert ds.calibration.q_pixel_size is not None


@pytest.mark.parametrize("suffix", [".h5", ".npy"])
def test_3d_stack_needs_scan_shape(tmp_path, suffix):
    stack = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    path = tmp_path / f"stack{suffix}"
    if suffix == ".npy":
        np.save(path, stack)
    else:
        _h5(path, frames=stack)
    assert list_4d_arrays(path) == []
    assert len(list_4d_arrays(path, include_stacks=True)) == 1
    with pytest.raises(DataError) as err:
        open_dataset(path)
    assert "scan_shape" in _one_line_naming(err, path)
    with open_dataset(path, scan_shape=(2, 3)) as ds:
        assert ds.shape == (2, 3, 5, 4)
        assert ds.metadata["scan_shape_from"] == "caller"
        np.testing.assert_array_equal(ds.read_rows(1, 2), stack.reshape(2, 3, 5, 4)[1:2])
    with pytest.raises(DataError) as err:
        open_dataset(path, scan_shape=(4, 4))
    assert "16" in _one_line_naming(err, path) and "6" in str(err.value)


@pytest.mark.parametrize("suffix", [".h5", ".npy"])
@pytest.mark.parametrize("shape", [(2, 2, 2, 3, 3), (9, 9)])
def test_wrong_dimensionality(tmp_path, suffix, shape):
    a = np.zeros(shape, np.float32)
    path = tmp_path / f"a{suffix}"
    if suffix == ".npy":
        np.save(path, a)
    else:
        _h5(path, a=a)
    assert list_4d_arrays(path) == []
    with pytest.raises(DataError) as err:
        open_dataset(path)
    msg = _one_line_naming(err, path)
    assert str(shape) in msg and f"{len(shape)}D" in msg
    if suffix == ".h5":  # naming it does not help
        with pytest.raises(DataError, match=f"{len(shape)}D"):
            open_dataset(path, dataset="a")


def test_4d_rescan(tmp_path):
    a = np.arange(2 * 6 * 3 * 3, dtype=np.float32).reshape(2, 6, 3, 3)
    path = _h5(tmp_path / "r.h5", data=a)
    with open_dataset(path, scan_shape=(3, 4)) as ds:
        assert ds.shape == (3, 4, 3, 3)
        np.testing.assert_array_equal(np.asarray(ds.read_rows(0, 3)), a.reshape(3, 4, 3, 3))
    np.save(tmp_path / "r.npy", a)
    with open_dataset(tmp_path / "r.npy", scan_shape=(4, 3)) as ds:
        assert ds.shape == (4, 3, 3, 3) and isinstance(ds.data, np.memmap)


@pytest.mark.parametrize("suffix", [".h5", ".npy"])
def test_zero_size(tmp_path, suffix):
    path = tmp_path / f"z{suffix}"
    if suffix == ".npy":
        np.save(path, np.zeros((0, 3, 5, 5), np.float32))
    else:
        _h5(path, data=(0, 3, 5, 5))
    with pytest.raises(DataError) as err:
        open_dataset(path)
    assert "empty" in _one_line_naming(err, path)


def _full_h5(tmp_path: Path, **kw) -> Path:
    path = tmp_path / "full.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=np.random.default_rng(0).random((8, 8, 16, 16),
                                                                       np.float32), **kw)
    return path


@pytest.mark.parametrize("kw", [{}, {"chunks": (1, 8, 16, 16), "compression": "gzip"}])
@pytest.mark.parametrize("keep", [0.5, 0.97, 0.01])
def test_truncated_hdf5(tmp_path, kw, keep):
    full = _full_h5(tmp_path, **kw).read_bytes()
    path = tmp_path / "cut.h5"
    path.write_bytes(full[: int(len(full) * keep)])
    with pytest.raises(DataError) as err:
        open_dataset(path)
    assert "truncated" in _one_line_naming(err, path)


def test_truncated_npy(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((4, 4, 8, 8), np.float32))
    raw = (tmp_path / "a.npy").read_bytes()
    path = tmp_path / "cut.npy"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as err:
        open_dataset(path)
    assert "truncated" in _one_line_naming(err, path)


def test_garbage_with_h5_suffix(tmp_path):
    path = tmp_path / "garbage.h5"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(DataError) as err:
        open_dataset(path)
    assert "not an HDF5 file" in _one_line_naming(err, path)
    with pytest.raises(DataError):
        list_4d_arrays(path)


@pytest.mark.parametrize("name", ["garbage.mib", "garbage.dm4", "garbage.blo", "garbage.npy"])
def test_garbage_other_formats(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00\x01not a real file" * 100)
    with pytest.raises(DataError) as err:
        open_dataset(path)
    _one_line_naming(err, path)


def test_missing_unknown_empty(tmp_path):
    with pytest.raises(DataError) as err:
        open_dataset(tmp_path / "nope.h5")
    assert "no such file" in _one_line_naming(err, tmp_path / "nope.h5")
    odd = tmp_path / "data.xyz"
    odd.write_bytes(b"hello")
    with pytest.raises(DataError) as err:
        open_dataset(odd)
    assert "unsupported" in _one_line_naming(err, odd)
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        open_dataset(empty)
    with pytest.raises(DataError, match="folder"):
        open_dataset(tmp_path)


def test_hdf5_content_with_other_suffix(tmp_path):
    path = _full_h5(tmp_path)
    other = tmp_path / "data.nxs"
    other.write_bytes(path.read_bytes())
    with open_dataset(other) as ds:
        assert ds.shape == (8, 8, 16, 16)


def test_bad_scan_shape(tmp_path):
    path = _full_h5(tmp_path)
    for bad in [(0, 4), (-1, 2), ("a", 2), (3,)]:
        with pytest.raises(DataError):
            open_dataset(path, scan_shape=bad)


def test_close_releases_file(tmp_path):
    path = _full_h5(tmp_path)
    ds = open_dataset(path)
    handle = ds._closers[0]
    assert handle.id.valid
    ds.close()
    ds.close()  # twice is fine
    assert not handle.id.valid
    with h5py.File(path, "a") as f:  # not locked by a forgotten reader
        f.attrs["touched"] = 1


def test_arina_multi_file_lazy(tmp_path):
    """A master linking three bitshuffle/LZ4 data files whose frame counts are not multiples of
    the scan width; a side metadata file gives the (non-square) scan shape."""
    import hdf5plugin

    sizes, q = [7, 11, 6], 12
    start = 0
    with h5py.File(tmp_path / "scan_master.h5", "w") as m:
        g = m.create_group("entry/data")
        for i, n in enumerate(sizes):
            name = f"scan_data_{i + 1:06d}.h5"
            with h5py.File(tmp_path / name, "w") as f:
                frames = (np.arange(start, start + n, dtype=np.uint32)[:, None, None]
                          * np.ones((1, q, q), np.uint32))
                f.create_dataset("entry/data/data", data=frames, chunks=(1, q, q),
                                 **hdf5plugin.Bitshuffle(cname="lz4"))
            g[f"data_{i + 1:06d}"] = h5py.ExternalLink(name, "/entry/data/data")
            start += n
    with h5py.File(tmp_path / "scan.h5", "w") as side:
        grp = side.create_group("STEM Metadata")
        grp.attrs["Pixel Size"] = np.array([0.25])
        grp.attrs["Scan Width"] = 6
        grp.attrs["Scan Height"] = 4
    with open_dataset(tmp_path / "scan_master.h5") as ds:
        assert ds.shape == (4, 6, q, q)
        assert ds.calibration.r_pixel_size == 0.25 and ds.calibration.r_units == "nm"
        assert "scan.h5" in ds.metadata["scan_shape_from"]
        rows = ds.read_rows(1, 3)
        np.testing.assert_array_equal(rows[:, :, 0, 0], np.arange(6, 18).reshape(2, 6))
        closers = list(ds._closers)
    assert len(closers) == 4 and not any(c.id.valid for c in closers)
    (tmp_path / "scan_data_000002.h5").unlink()
    with pytest.raises(DataError) as err:
        open_dataset(tmp_path / "scan_master.h5")
    assert "scan_data_000002.h5" in _one_line_naming(err, tmp_path / "scan_master.h5")


@pytest.mark.parametrize("suffix", [".h5", ".npy"])
def test_huge_file_opens_fast_and_small(tmp_path, suffix):
    """An 8.6 GB dataset (sparse on disk) opens in well under seconds, and reading one scan
    row allocates about that row, never the file."""
    import tracemalloc

    shape = (256, 256, 256, 256)
    path = tmp_path / f"huge{suffix}"
    if suffix == ".npy":
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=shape)
        del mm
    else:
        with h5py.File(path, "w") as f:
            f.create_dataset("data", shape=shape, dtype=np.uint16, chunks=(1, 1, 256, 256))
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        with open_dataset(path) as ds:
            assert time.perf_counter() - t0 < 5.0
            assert ds.shape == shape and ds.nbytes > 8e9
            assert _lazy(ds.data)
            _, peak_open = tracemalloc.get_traced_memory()
            rows = ds.read_rows(100, 101)
            assert rows.shape == (1, 256, 256, 256)
            del rows
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    row_bytes = 256 * 256 * 256 * 4
    assert peak_open < 16 * 2**20
    assert peak < 3 * row_bytes


def test_truncated_mib_keeps_complete_lines(shared_formats, tmp_path):
    """An interrupted Merlin acquisition: RosettaSciIO keeps the complete scan lines; a single
    line stays a line (1, 4), never a made-up square."""
    src = shared_formats / "001_4x2_6bit.mib"
    raw = src.read_bytes()
    path = tmp_path / "cut.mib"
    path.write_bytes(raw[: int(len(raw) * 0.9)])  # 7 of 8 frames
    (tmp_path / "cut.hdr").write_bytes(src.with_suffix(".hdr").read_bytes())
    with open_dataset(path) as ds:
        assert ds.shape == (1, 4, 256, 256)
        assert "1 of 2 lines" in ds.metadata["scan_shape_from"]


@pytest.mark.parametrize("name", ["test1.blo", "dmTest_3D_int16_64,65,66.dm4"])
def test_truncated_vendor_files(shared_formats, tmp_path, name):
    raw = (shared_formats / name).read_bytes()
    path = tmp_path / name
    path.write_bytes(raw[: int(len(raw) * 0.9)])
    with pytest.raises(DataError) as err:
        open_dataset(path, scan_shape=(6, 11) if "66" in name else None)
    assert "truncated" in _one_line_naming(err, path)


def test_framestack_indexing_matches_numpy(tmp_path):
    """The lazy frame view over several files indexes like the numpy array it stands for."""
    from napari_stem_strain.io._framestack import FrameStack, frames_3d, frames_4d, frames_last

    rng = np.random.default_rng(0)
    full = rng.integers(0, 1000, (5, 6, 4, 3)).astype(np.uint16)
    flat = full.reshape(30, 4, 3)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["a"] = flat[:7]
        f["b"] = np.moveaxis(flat[7:19], 0, 2)  # frames last
        f["c"] = flat[19:30].reshape(11, 1, 4, 3)  # a 4D array read as frames
        view = FrameStack([frames_3d(f["a"]), frames_last(f["b"]), frames_4d(f["c"])], (5, 6))
        assert view.shape == full.shape and view.dtype == full.dtype and len(view) == 5
        keys = [np.s_[:], np.s_[1:3], np.s_[4], np.s_[-1, 2], np.s_[::2, ::-1],
                np.s_[..., 1:3, 0], np.s_[2, :, 1], np.s_[[0, 3, 1], 2:5],
                np.s_[:, np.array([True, False] * 3)], np.s_[1:4, 2, ..., ::-1]]
        for key in keys:
            np.testing.assert_array_equal(view[key], full[key], err_msg=str(key))
        np.testing.assert_array_equal(np.asarray(view), full)
        with pytest.raises(IndexError):
            view[5]
    ds = Dataset(view)
    with pytest.raises(Exception):  # noqa: B017 - the file is closed: reading fails loudly
        ds.read_rows(0, 1)


def test_velox_like_frame_last_stack(tmp_path):
    """A Velox EMD keeps image stacks as (height, width, frames): read as (N, Qx, Qy) frames."""
    import json

    frames = np.arange(6 * 5 * 4, dtype=np.uint16).reshape(6, 5, 4)  # (N, Qx, Qy)
    path = tmp_path / "velox.emd"
    with h5py.File(path, "w") as f:
        f["Version"] = np.array([json.dumps({"format": "Velox", "version": 11}).encode()])
        f["Data/Image/abc123/Data"] = np.moveaxis(frames, 0, 2)
        f["Data/Image/def456/Data"] = np.zeros((5, 4, 1), np.uint16)  # a single image
    assert list_4d_arrays(path, include_stacks=True) == ["/Data/Image/abc123/Data"]
    with pytest.raises(DataError, match="scan_shape"):
        open_dataset(path)
    with open_dataset(path, scan_shape=(2, 3)) as ds:
        assert ds.metadata["format"] == "Velox EMD"
        assert ds.shape == (2, 3, 5, 4)
        np.testing.assert_array_equal(ds.read_rows(0, 2), frames.reshape(2, 3, 5, 4))
