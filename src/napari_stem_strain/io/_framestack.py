"""A lazy ``(Rx, Ry, Qx, Qy)`` view of diffraction frames stored frame after frame in one or
more HDF5 datasets (Dectris data files, 3D stacks, Velox frame-last stacks, a 4D array read
with another scan shape).

Why not a dask array: a dask graph over h5py datasets is shipped to the cluster whenever a
``distributed.Client`` is the default scheduler (``stem-strain map --dask``), where the
datasets cannot be read. This view reads on slicing, in the calling thread, and reads whole
runs of consecutive frames: ``view[r0:r1]`` costs one contiguous read per data file.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["FrameStack", "FrameList", "frames_3d", "frames_last", "frames_4d"]


class _Source:
    """``n`` frames of ``frame_shape``; ``read(a, b)`` -> ``(b - a, *frame_shape)``."""

    n: int
    frame_shape: tuple[int, int]
    dtype: np.dtype
    dset: Any

    def read(self, a: int, b: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class frames_3d(_Source):
    """``(N, Qx, Qy)`` frames first (Dectris data files, 3D stacks)."""

    def __init__(self, dset: Any) -> None:
        self.dset = dset
        self.n = int(dset.shape[0])
        self.frame_shape = (int(dset.shape[1]), int(dset.shape[2]))
        self.dtype = np.dtype(dset.dtype)

    def read(self, a: int, b: int) -> np.ndarray:
        return np.asarray(self.dset[a:b])


class frames_last(_Source):
    """``(Qx, Qy, N)`` frames last (Velox image stacks)."""

    def __init__(self, dset: Any) -> None:
        self.dset = dset
        self.n = int(dset.shape[2])
        self.frame_shape = (int(dset.shape[0]), int(dset.shape[1]))
        self.dtype = np.dtype(dset.dtype)

    def read(self, a: int, b: int) -> np.ndarray:
        return np.moveaxis(np.asarray(self.dset[:, :, a:b]), 2, 0)


class frames_4d(_Source):
    """A ``(Rx, Ry, Qx, Qy)`` array read as ``Rx * Ry`` frames (another scan shape)."""

    def __init__(self, dset: Any) -> None:
        self.dset = dset
        self.ry = int(dset.shape[1])
        self.n = int(dset.shape[0]) * self.ry
        self.frame_shape = (int(dset.shape[2]), int(dset.shape[3]))
        self.dtype = np.dtype(dset.dtype)

    def read(self, a: int, b: int) -> np.ndarray:
        r0, r1 = a // self.ry, (b - 1) // self.ry + 1
        rows = np.asarray(self.dset[r0:r1]).reshape(-1, *self.frame_shape)
        return rows[a - r0 * self.ry: b - r0 * self.ry]


class FrameList:
    """The frames of ``sources`` in order, as a ``(N, Qx, Qy)`` shape only: what a reader
    hands to the scan-shape rules before :class:`FrameStack` gives it a scan."""

    def __init__(self, sources: list[_Source]) -> None:
        self.sources = list(sources)
        self.shape = (sum(s.n for s in sources), *sources[0].frame_shape)
        self.dtype = np.result_type(*[s.dtype for s in sources])
        self.ndim = 3

    def as_scan(self, scan_shape: tuple[int, int]) -> FrameStack:
        return FrameStack(self.sources, scan_shape)


def _index_list(key: Any, n: int) -> tuple[np.ndarray, bool]:
    """Indices selected along one axis and whether the axis is dropped (an integer)."""
    if isinstance(key, slice):
        return np.arange(n)[key], False
    if isinstance(key, (int, np.integer)):
        i = int(key)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of bounds for axis of size {n}")
        return np.array([i % n]), True
    arr = np.asarray(key)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise IndexError("boolean index does not match the axis")
        return np.flatnonzero(arr), False
    if arr.ndim == 1 and arr.dtype.kind in "iu":
        if arr.size and (arr.max() >= n or arr.min() < -n):
            raise IndexError("index out of bounds")
        return arr % n if arr.size else arr.astype(int), False
    raise TypeError(f"unsupported index {key!r} on a scan axis")


class FrameStack:
    """Lazy ``(Rx, Ry, Qx, Qy)`` over frames ``0 .. Rx*Ry-1`` of ``sources`` in order.

    Indexing: integers, slices (any step), 1D integer or boolean arrays on the scan axes
    (orthogonal indexing), anything numpy accepts on the two pattern axes, ``...``.
    """

    def __init__(self, sources: list[_Source], scan_shape: tuple[int, int]) -> None:
        if not sources:
            raise ValueError("no frames")
        q = {s.frame_shape for s in sources}
        if len(q) != 1:
            raise ValueError(f"the sources disagree on the frame shape: {sorted(q)}")
        self._sources = list(sources)
        self._starts = np.cumsum([0] + [s.n for s in sources])
        rx, ry = int(scan_shape[0]), int(scan_shape[1])
        if rx * ry != int(self._starts[-1]):
            raise ValueError(f"scan {rx}x{ry} does not hold {int(self._starts[-1])} frames")
        self.shape = (rx, ry, *sources[0].frame_shape)
        self.dtype = np.result_type(*[s.dtype for s in sources])

    # numpy-like attributes ------------------------------------------------------------------
    ndim = 4

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"FrameStack(shape={self.shape}, dtype={self.dtype}, files={len(self._sources)})"

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype, copy=False)

    @property
    def sources(self) -> list[Any]:
        return [s.dset for s in self._sources]

    # reading --------------------------------------------------------------------------------
    def _frames(self, ids: np.ndarray) -> np.ndarray:
        """Frames ``ids`` (any order, repeats allowed) as ``(len(ids), Qx, Qy)``."""
        out = np.empty((len(ids), *self.shape[2:]), self.dtype)
        if len(ids) == 0:
            return out
        if len(ids) == 1 or bool(np.all(np.diff(ids) > 0)):  # the usual case: read in place
            self._read_sorted(ids, out)
            return out
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        uniq, inverse = np.unique(sorted_ids, return_inverse=True)
        got = np.empty((len(uniq), *self.shape[2:]), self.dtype)
        self._read_sorted(uniq, got)
        out[order] = got[inverse]
        return out

    def _read_sorted(self, ids: np.ndarray, out: np.ndarray) -> None:
        """Frames ``ids`` (strictly increasing) into ``out``, one read per run of consecutive
        frames within one source."""
        breaks = np.flatnonzero(np.diff(ids) != 1) + 1
        pos = 0
        for run in np.split(ids, breaks):
            a, b = int(run[0]), int(run[-1]) + 1
            while a < b:  # a run may cross from one data file into the next
                k = int(np.searchsorted(self._starts, a, side="right")) - 1
                src, s0 = self._sources[k], int(self._starts[k])
                e = min(b, int(self._starts[k + 1]))
                out[pos: pos + (e - a)] = src.read(a - s0, e - s0)
                pos += e - a
                a = e

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is None for k in key):
            raise TypeError("FrameStack does not support np.newaxis")
        ell = [i for i, k in enumerate(key) if k is Ellipsis]
        if len(ell) > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        if ell:
            i = ell[0]
            fill = 4 - (len(key) - 1)
            key = key[:i] + (slice(None),) * fill + key[i + 1:]
        if len(key) > 4:
            raise IndexError(f"too many indices for a 4D array: {len(key)}")
        key = key + (slice(None),) * (4 - len(key))
        rows, drop_r = _index_list(key[0], self.shape[0])
        cols, drop_c = _index_list(key[1], self.shape[1])
        ids = (rows[:, None] * self.shape[1] + cols[None, :]).ravel()
        frames = self._frames(ids)
        frames = frames.reshape(len(rows), len(cols), *self.shape[2:])
        q = frames[(slice(None), slice(None), *key[2:])]
        if drop_r and drop_c:
            return q[0, 0]
        if drop_r:
            return q[0]
        if drop_c:
            return q[:, 0]
        return q
