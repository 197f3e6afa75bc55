"""Pieces every format reader shares: one-line errors, choosing an array, turning a frame
stack into ``(Rx, Ry, Qx, Qy)`` lazily, and a cheap read probe.

Nothing here reads more than two diffraction patterns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._framestack import FrameList, FrameStack, frames_3d, frames_4d
from .errors import DataError, one_line

__all__ = [
    "ArrayInfo",
    "fail",
    "first_line",
    "check_scan_shape",
    "choose_array",
    "to_4d",
    "probe",
    "probe_frames",
    "check_read_size",
    "check_virtual_sources",
    "check_written",
    "memory_bytes",
    "square_scan",
    "MIN_PATTERN",
]

#: Arrays whose two last axes are smaller than this are not diffraction patterns (they are
#: e.g. the ``(Rx, Ry, 2, 2)`` affine maps of result and ground-truth files).
MIN_PATTERN = 3


@dataclass(frozen=True)
class ArrayInfo:
    """A candidate array inside a file: its name (internal path), shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    #: A detector frame stream ``(N, Qx, Qy)`` whose scan shape follows a rule of its format
    #: (file metadata, else a square scan): listed and chosen like a 4D array.
    stream: bool = False
    #: False for arrays whose two last axes are too small to be patterns (HDF5 walks only)
    pattern_ok: bool = True

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def is_4d(self) -> bool:
        return self.ndim == 4 and self.pattern_ok

    @property
    def is_stack(self) -> bool:
        return self.ndim == 3 and self.pattern_ok and not self.stream

    @property
    def is_4d_like(self) -> bool:
        """A 4D array, or a frame stream that opens as one without a caller's scan_shape."""
        return self.is_4d or (self.stream and self.ndim == 3)


def first_line(err: BaseException | str) -> str:
    """The first line of an exception message, not cut inside a parenthesis (its type name
    when it has none): :func:`.errors.one_line`."""
    return one_line(err)


def fail(path: Path | str, problem: str) -> DataError:
    """A :class:`DataError` whose one-line message names ``path`` and ``problem``."""
    problem = " ".join(str(problem).split())
    return DataError(f"{path}: {problem}")


def _shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def check_scan_shape(path: Path, scan_shape: Any) -> tuple[int, int] | None:
    """Validate a caller's ``scan_shape`` (two positive integers) or pass ``None`` through."""
    if scan_shape is None:
        return None
    try:
        rx, ry = (int(v) for v in scan_shape)
    except (TypeError, ValueError):
        raise fail(path, f"scan_shape must be two integers (Rx, Ry), not {scan_shape!r}") \
            from None
    if rx <= 0 or ry <= 0:
        raise fail(path, f"scan_shape must be positive, not ({rx}, {ry})")
    return rx, ry


def square_scan(n: int) -> tuple[int, int] | None:
    """``(s, s)`` when ``n`` frames form a square scan, else ``None``."""
    s = math.isqrt(int(n))
    return (s, s) if s > 0 and s * s == n else None


def choose_array(
    path: Path,
    arrays: list[ArrayInfo],
    dataset: str | None,
    scan_shape: tuple[int, int] | None,
    kind: str = "array",
) -> ArrayInfo:
    """Pick the array to open among ``arrays`` (every numeric array of the file).

    * ``dataset`` given: that array (a leading ``/`` is optional), whatever its shape; the
      shape is checked later by :func:`to_4d`.
    * otherwise the 4D arrays: the largest; several of the same largest size is ambiguous.
    * no 4D array: the 3D stacks, the same way (the caller must then give ``scan_shape``).
    * nothing usable: an error naming the shape of the largest array found.
    """
    if dataset is not None:
        want = str(dataset).strip("/")
        for a in arrays:
            if a.name.strip("/") == want:
                return a
        names = ", ".join(repr(a.name) for a in arrays if a.is_4d_like or a.is_stack) or "none"
        raise fail(path, f"no {kind} named {dataset!r} (4D arrays and stacks: {names})")
    four = [a for a in arrays if a.is_4d_like]
    pool = four or [a for a in arrays if a.is_stack]
    if not pool:
        if not arrays:
            raise fail(path, "holds no numeric array (not 4D-STEM data)")
        big = max(arrays, key=lambda a: a.size)
        where = f" {big.name!r}" if len(arrays) > 1 else ""
        raise fail(path, f"holds no 4D-STEM data: the largest array{where} has shape "
                   f"{_shape_str(big.shape)} ({big.ndim}D), a 4D (Rx, Ry, Qx, Qy) array or a "
                   "3D stack of patterns is needed")
    top = max(a.size for a in pool)
    best = [a for a in pool if a.size == top]
    if len(best) > 1:
        names = ", ".join(repr(a.name) for a in pool)
        raise fail(path, f"holds several {'4D arrays' if four else '3D stacks'} ({names}): "
                   "choose one with dataset= (--dataset NAME)")
    return best[0]


def to_4d(
    path: Path,
    data: Any,
    name: str,
    scan_shape: tuple[int, int] | None,
    implied_scan: tuple[int, int] | None = None,
    implied_from: str = "",
) -> tuple[Any, str]:
    """Return ``data`` as a lazy ``(Rx, Ry, Qx, Qy)`` array and a note on where the scan
    shape came from.

    * 4D: kept as it is; a caller's ``scan_shape`` with the same number of positions
      re-interprets the scan (lazily), one with another number is an error.
    * 3D ``(N, Qx, Qy)``: the caller's ``scan_shape``, else ``implied_scan`` (file metadata
      or a detector rule, described by ``implied_from``), else an error asking for it.
    * any other dimensionality, or a zero-size array: an error naming the shape.
    """
    shape = tuple(int(s) for s in data.shape)
    label = f"{name!r} " if name else ""
    if len(shape) not in (3, 4):
        raise fail(path, f"array {label}has shape {_shape_str(shape)} ({len(shape)}D): "
                   "only 4D (Rx, Ry, Qx, Qy) arrays or 3D stacks of patterns (with scan_shape) "
                   "can be read")
    if 0 in shape:
        raise fail(path, f"array {label}is empty (zero-size, shape {_shape_str(shape)})")
    if len(shape) == 4:
        if scan_shape is None or tuple(scan_shape) == shape[:2]:
            return data, "file"
        n = shape[0] * shape[1]
        if scan_shape[0] * scan_shape[1] != n:
            raise fail(path, f"scan_shape {tuple(scan_shape)} has "
                       f"{scan_shape[0] * scan_shape[1]} positions but the "
                       f"{'array ' + label if label else 'file '}holds {shape[0]}x{shape[1]} = "
                       f"{n} patterns")
        return _reshape_frames(_flatten_scan(data), scan_shape), "caller"
    n = shape[0]
    if scan_shape is not None:
        if scan_shape[0] * scan_shape[1] != n:
            raise fail(path, f"scan_shape {tuple(scan_shape)} has "
                       f"{scan_shape[0] * scan_shape[1]} positions but the stack {label}holds "
                       f"{n} patterns")
        return _reshape_frames(data, scan_shape), "caller"
    if implied_scan is not None and implied_scan[0] * implied_scan[1] == n:
        return _reshape_frames(data, implied_scan), implied_from or "file"
    what = f"array {label}is" if label else "holds"
    raise fail(path, f"{what} a 3D stack of {n} patterns of {shape[1]}x{shape[2]} with no "
               "scan shape in the file: give scan_shape=(Rx, Ry) (--scan-shape RX RY)")


def _flatten_scan(data: Any) -> Any:
    """``(Rx, Ry, Qx, Qy)`` -> ``(Rx*Ry, Qx, Qy)`` without reading anything."""
    shape = tuple(int(s) for s in data.shape)
    flat = (shape[0] * shape[1], shape[2], shape[3])
    if isinstance(data, np.ndarray):  # np.memmap: a reshape is a view, still lazy
        return data.reshape(flat)
    if _is_dask(data):
        return data.reshape(flat)
    return FrameList([frames_4d(data)])


def _is_dask(data: Any) -> bool:
    return type(data).__module__.startswith("dask.")


def _reshape_frames(data: Any, scan_shape: tuple[int, int]) -> Any:
    """``(N, Qx, Qy)`` -> ``(Rx, Ry, Qx, Qy)`` without reading anything: a numpy view, a dask
    reshape (RosettaSciIO's memory maps), else a :class:`FrameStack` over h5py datasets."""
    rx, ry = int(scan_shape[0]), int(scan_shape[1])
    shape = tuple(int(s) for s in data.shape)
    if isinstance(data, np.ndarray):
        return data.reshape(rx, ry, shape[1], shape[2])
    if isinstance(data, FrameList):
        return data.as_scan((rx, ry))
    if _is_dask(data):
        chunks = data.chunks[0]
        if not (all(c % ry == 0 for c in chunks[:-1]) and len(data.chunks[1]) == 1
                and len(data.chunks[2]) == 1):
            frame = int(np.prod(shape[1:])) * np.dtype(data.dtype).itemsize
            k = max(1, (64 * 2**20) // max(frame, 1) // ry) * ry
            data = data.rechunk((min(k, shape[0]), -1, -1))
        return data.reshape(rx, ry, shape[1], shape[2])
    return FrameStack([frames_3d(data)], (rx, ry))


def memory_bytes() -> int:
    """The memory this process may use: physical memory, or less under ``ulimit -v``."""
    import os

    try:
        mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        mem = 16 * 2**30
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY and soft > 0:
            mem = min(mem, soft)
    except (ImportError, OSError, ValueError):  # pragma: no cover
        pass
    return int(mem)


def check_read_size(path: Path, n_values: int, what: str, hint: str = "") -> None:
    """Refuse, before reading it, a single read of ``n_values`` values (one pattern, one scan
    row) that would take more than a quarter of the memory as float32: a tiny file may declare
    an absurd array, and the allocation would fail (or swap the machine) instead."""
    need, mem = 4 * int(n_values), memory_bytes()
    if need > mem // 4:
        raise fail(path, f"{what} is {need / 2**30:.1f} GiB as float32, more than a quarter "
                         f"of the memory ({mem / 2**30:.1f} GiB){hint}")


def _missing_filters(obj: Any) -> list[str]:
    """The HDF5 filters of dataset ``obj`` (an h5py Dataset) that are not available here."""
    try:
        import h5py

        if not isinstance(obj, h5py.Dataset):
            return []
        plist = obj.id.get_create_plist()
        out = []
        for i in range(plist.get_nfilters()):
            fid, _flags, _values, name = plist.get_filter(i)
            if not h5py.h5z.filter_avail(fid):
                label = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
                out.append(f"{fid}" + (f" ({label})" if label else ""))
        return out
    except Exception:  # noqa: BLE001 - only a better message is at stake
        return []


def _read_failure(path: Path, what: str, err: BaseException, obj: Any = None) -> DataError:
    """The one line for a probe read that failed: a compression filter that is not installed
    is named as such (HDF5 says "can't open directory (/usr/local/lib/plugin)"), anything
    else is a truncated or corrupt file."""
    missing = _missing_filters(obj)
    text = str(err).lower()
    if missing or "can't open directory" in text or "required filter" in text \
            or "plugin" in text:
        which = (f"HDF5 compression filter {', '.join(missing)}" if missing
                 else "an HDF5 compression filter")
        return fail(path, f"the {what} needs {which}, which is not installed here "
                          "(pip install hdf5plugin adds the common ones)")
    return fail(path, f"cannot read the {what} (truncated or corrupt file?): "
                      f"{first_line(err)}")


def check_written(path: Path, dset: Any, what: str = "array") -> None:
    """Refuse a chunked HDF5 array that was only partly written: a file still being written,
    or an acquisition cut short, reads its unwritten chunks as the fill value (zeros) - a
    partial map that looks like vacuum. Counted from the chunk index, without reading data."""
    try:
        import h5py

        if not isinstance(dset, h5py.Dataset) or dset.is_virtual or dset.external:
            return
        if dset.size == 0 or dset.chunks is None:
            return  # contiguous storage is allocated whole at the first write
        n_total = 1
        for n, c in zip(dset.shape, dset.chunks, strict=True):
            n_total *= -(-n // c)
        n_written = dset.id.get_num_chunks()
    except DataError:
        raise
    except Exception:  # noqa: BLE001 - an old HDF5 without the chunk query: cannot tell
        return
    # none written: an all-zero array (a sparse placeholder), which no method maps anyway
    if 0 < n_written < n_total:
        raise fail(path, f"only {n_written} of the {n_total} chunks of the {what} are written "
                         "(a file still being written, or an acquisition cut short): the rest "
                         "would read as zeros")


def check_virtual_sources(path: Path, dset: Any, what: str = "array") -> None:
    """Refuse an HDF5 virtual dataset whose source files are not all there: HDF5 reads a
    missing source as the fill value (zeros), which would give a silently half-empty map.

    A relative source name is looked up as HDF5 does: beside the virtual file (and under
    ``HDF5_VDS_PREFIX`` when set); a name with a printf-style pattern (``%b``) is left to HDF5.
    """
    import os

    try:
        if not getattr(dset, "is_virtual", False):
            return
        sources = dset.virtual_sources()
    except Exception:  # noqa: BLE001 - not an h5py dataset, or no VDS support
        return
    prefix = os.environ.get("HDF5_VDS_PREFIX", "")
    for src in sources:
        name = src.file_name
        if name in (".", "") or "%" in name:
            continue
        p = Path(name)
        if p.is_absolute():
            candidates = [p]
        else:
            candidates = [path.parent / p] + ([Path(prefix) / p] if prefix else [])
        if not any(c.is_file() for c in candidates):
            raise fail(path, f"the {what} is a virtual dataset reading from {name}, which "
                             f"does not exist (beside {path.name} or at that path): its part "
                             "would read as zeros")


def probe(path: Path, data: Any, what: str = "data") -> None:
    """Read the first and the last pattern so a truncated or corrupt file fails now, in one
    clear line, instead of half-way through a long run."""
    shape = tuple(int(s) for s in data.shape)
    if len(shape) >= 2:
        check_read_size(path, shape[-2] * shape[-1],
                        f"one pattern ({shape[-2]} x {shape[-1]}) of the {what}",
                        ": not a diffraction pattern this tool can map")
    if len(shape) == 4:
        check_read_size(path, shape[1] * shape[2] * shape[3],
                        f"one scan row ({shape[1]} patterns of {shape[2]} x {shape[3]})",
                        ": the methods read whole scan rows - give a --scan-shape with "
                        "shorter rows")
    try:
        for idx in ((0, 0), (shape[0] - 1, shape[1] - 1)):
            block = data[idx[0]:idx[0] + 1, idx[1]:idx[1] + 1]
            if hasattr(block, "compute"):
                block = block.compute(scheduler="threads")
            np.asarray(block)
    except Exception as err:  # noqa: BLE001 - any failure here means an unreadable file
        raise _read_failure(path, what, err) from err


def probe_frames(path: Path, dset: Any, what: str = "frames", axis: int = 0) -> None:
    """Like :func:`probe` for a frame stack read directly (an h5py dataset): the first and
    last frame along ``axis`` only, whatever view is built over it."""
    shape = tuple(int(s) for s in dset.shape)
    frame = int(np.prod(shape)) // max(1, shape[axis])
    dims = " x ".join(str(s) for k, s in enumerate(shape) if k != axis)
    check_read_size(path, frame, f"one frame ({dims}) of the {what}",
                    ": not a diffraction pattern this tool can map")
    try:
        n = int(dset.shape[axis])
        for i in (0, n - 1):
            idx = [slice(None)] * dset.ndim
            idx[axis] = i
            np.asarray(dset[tuple(idx)])
    except Exception as err:  # noqa: BLE001
        raise _read_failure(path, what, err, dset) from err


def shape_str(shape: tuple[int, ...]) -> str:
    return _shape_str(shape)
