"""Open any supported 4D-STEM file as a lazy :class:`~napari_stem_strain.io.dataset.Dataset`.

``open_dataset(path, dataset=None, scan_shape=None)`` is the one entry point; it never reads
a file whole (a 20 GB file opens in about the time it takes to parse its header and read two
patterns), never writes to it, and turns every problem into a one-line
:class:`~napari_stem_strain.io.errors.DataError` naming the file.

Formats (``docs/formats.md`` has the full table):

* HDF5 (``.h5 .hdf5 .hdf .emd``, or any file with the HDF5 signature): py4DSTEM/emdfile EMD
  1.0, py4DSTEM 0.x and Prismatic EMD, Dectris Arina master files, Velox EMD image stacks,
  this project's simulated files, and any HDF5 holding a 4D array (h5py, lazy).
* ``.dm3 .dm4`` (Gatan), ``.mib`` (Quantum Detectors Merlin), ``.blo`` (NanoMegas): via
  RosettaSciIO with ``lazy=True`` (dask over memory maps).
* ``.npy``: ``np.load(mmap_mode="r")``.

Shapes: 4D arrays are ``(Rx, Ry, Qx, Qy)`` in the file's own array order (slow scan axis
first). A 3D stack ``(N, Qx, Qy)`` needs a scan shape: the caller's ``scan_shape`` first, then
one the file records (Arina side metadata, DM "4D STEM Tags", MIB header timestamps); for
detector frame streams (Arina, MIB) a square scan when ``N`` is a perfect square; otherwise a
DataError asking for ``scan_shape``. Any other dimensionality is a DataError naming the shape.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import numpy as np

from ._formats_common import (
    ArrayInfo,
    check_read_size,
    check_scan_shape,
    choose_array,
    fail,
    first_line,
    probe,
)
from ._formats_common import to_4d as _to_4d
from ._formats_hdf5 import inspect_hdf5, is_hdf5, open_hdf5
from ._formats_rsciio import RSCIIO_FORMATS, inspect_rsciio, open_rsciio
from .dataset import Calibration, Dataset
from .errors import DataError

__all__ = [
    "SUPPORTED_SUFFIXES",
    "HDF5_SUFFIXES",
    "list_4d_arrays",
    "open_dataset",
    "inspect_file",
    "FileSummary",
]

#: Suffixes read as HDF5 (any other file with the HDF5 signature is read as HDF5 too).
HDF5_SUFFIXES: tuple[str, ...] = (".h5", ".hdf5", ".hdf", ".emd")

#: Every suffix :func:`open_dataset` reads.
SUPPORTED_SUFFIXES: tuple[str, ...] = (*HDF5_SUFFIXES, ".dm3", ".dm4", ".mib", ".blo", ".npy")


def _check_path(path: Any) -> Path:
    try:
        p = Path(os.fspath(path))
    except TypeError:
        raise DataError(f"{path!r}: not a file path") from None
    if not p.exists():
        if p.is_symlink():
            try:
                os.stat(p)
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise fail(p, "is a symbolic link loop") from None
            raise fail(p, f"is a broken symbolic link (to {os.readlink(p)}, which does not "
                          "exist)")
        raise fail(p, "no such file")
    if p.is_dir():
        raise fail(p, "is a folder, not a file")
    try:
        size = p.stat().st_size
    except OSError as err:
        raise fail(p, f"cannot read: {first_line(err)}") from err
    if size == 0:
        raise fail(p, "is empty (0 bytes)")
    if not os.access(p, os.R_OK):
        raise fail(p, "permission denied")
    return p


def _family(p: Path) -> str:
    suffix = p.suffix.lower()
    if suffix in HDF5_SUFFIXES:
        return "hdf5"
    if suffix in RSCIIO_FORMATS:
        return suffix
    if suffix == ".npy":
        return "npy"
    if suffix == ".hdr" and p.with_suffix(".mib").is_file():
        raise fail(p, f"is the header of a Merlin file: open {p.with_suffix('.mib').name}")
    if is_hdf5(p):
        return "hdf5"
    raise fail(p, f"unsupported file type {suffix or '(no suffix)'!r} "
               f"(supported: {' '.join(SUPPORTED_SUFFIXES)})")


# --------------------------------------------------------------------------------------------
# .npy


def _load_npy(p: Path) -> np.ndarray:
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        msg = first_line(err)
        if "mmap length" in msg or "larger than" in msg or "cannot reshape" in msg:
            raise fail(p, f"truncated .npy file (shorter than its header says): {msg}") from err
        raise fail(p, f"cannot read as .npy: {msg}") from err
    except Exception as err:  # noqa: BLE001
        raise fail(p, f"cannot read as .npy (corrupt?): {first_line(err)}") from err
    if not isinstance(arr, np.ndarray):
        raise fail(p, "not a single .npy array")
    if arr.dtype.kind not in "biuf":
        raise fail(p, f"array of dtype {arr.dtype} is not numeric image data")
    return arr


def _open_npy(p: Path, dataset: str | None, scan_shape: tuple[int, int] | None) -> Dataset:
    arr = _load_npy(p)
    info = [ArrayInfo(p.name, tuple(int(s) for s in arr.shape), arr.dtype)]
    chosen = choose_array(p, info, dataset, scan_shape)
    data, origin = _to_4d(p, arr, "", scan_shape)
    probe(p, data)
    return Dataset(data, calibration=Calibration(), source=p, name=chosen.name,
                   metadata={"format": "NumPy .npy", "reader": "numpy memmap",
                             "scan_shape_from": origin, "files": [str(p.resolve())]})


# --------------------------------------------------------------------------------------------
# public API


class FileSummary:
    """What a file holds, without opening a dataset: format name and candidate arrays."""

    def __init__(self, path: Path, format: str, arrays: list[ArrayInfo]) -> None:
        self.path = path
        self.format = format
        self.arrays = arrays

    def names(self, include_stacks: bool = False) -> list[str]:
        return [a.name for a in self.arrays
                if a.is_4d_like or (include_stacks and a.is_stack)]

    def __repr__(self) -> str:
        return f"FileSummary({str(self.path)!r}, {self.format!r}, {self.arrays!r})"


def inspect_file(path: str | os.PathLike) -> FileSummary:
    """Format name and every numeric array of ``path`` (names, shapes, dtypes). Raises
    :class:`DataError` when the file cannot be read at all."""
    p = _check_path(path)
    fam = _family(p)
    if fam == "hdf5":
        info = inspect_hdf5(p)
        return FileSummary(p, info.format, info.arrays)
    if fam == "npy":
        arr = _load_npy(p)
        return FileSummary(p, "NumPy .npy",
                           [ArrayInfo(p.name, tuple(int(s) for s in arr.shape), arr.dtype)])
    fmt, arrays = inspect_rsciio(p, fam)
    return FileSummary(p, fmt, arrays)


def list_4d_arrays(path: str | os.PathLike, include_stacks: bool = False) -> list[str]:
    """Names of the candidate 4D arrays in ``path``: internal paths for HDF5/EMD files (e.g.
    ``'/datacube_root/datacube/data'``), the file name for single-array formats (``.mib``,
    ``.blo``, ``.npy``, a DM file with one image), ``'image<i>'`` for a DM file with several.
    Detector frame streams that open as 4D (Dectris Arina ``'/entry/data'``) are listed too;
    ``include_stacks=True`` adds 3D stacks that need a ``scan_shape``.

    Any name can be passed back as ``open_dataset(path, dataset=name)``. Raises
    :class:`DataError` when the file cannot be read at all; a readable file with no 4D data
    gives ``[]``.
    """
    return inspect_file(path).names(include_stacks)


def open_dataset(
    path: str | os.PathLike,
    dataset: str | None = None,
    scan_shape: tuple[int, int] | None = None,
) -> Dataset:
    """Open ``path`` as a lazy ``(Rx, Ry, Qx, Qy)`` :class:`Dataset`.

    ``dataset`` names the array inside a file holding several (see :func:`list_4d_arrays`);
    without it the largest 4D array is taken, and several of the same largest size raise a
    :class:`DataError` listing their names. ``scan_shape=(Rx, Ry)`` turns a 3D stack of
    patterns into 4D (or re-shapes the scan of a 4D array with the same number of positions).

    The returned dataset holds the file open; use it as a context manager or call
    :meth:`Dataset.close`.
    """
    p = _check_path(path)
    shape = check_scan_shape(p, scan_shape)
    fam = _family(p)
    try:
        if fam == "hdf5":
            ds = open_hdf5(p, dataset, shape)
        elif fam == "npy":
            ds = _open_npy(p, dataset, shape)
        else:
            ds = open_rsciio(p, fam, dataset, shape)
    except DataError:
        raise
    except MemoryError as err:
        raise fail(p, "out of memory while opening (this should not happen: please report)") \
            from err
    except Exception as err:  # noqa: BLE001 - every reader failure is one line for the user
        raise fail(p, f"cannot read: {type(err).__name__}: {first_line(err)}") from err
    # every method reads whole scan rows: one row must fit in memory
    Rx, Ry, Q0, Q1 = ds.shape
    try:
        check_read_size(p, Ry * Q0 * Q1, f"one scan row ({Ry} patterns of {Q0} x {Q1})",
                        ": the methods read whole scan rows - give a --scan-shape with "
                        "shorter rows")
    except DataError:
        ds.close()
        raise
    return ds
