"""The in-memory handle on a 4D-STEM dataset that every pass over the data shares.

A :class:`Dataset` wraps a *lazy* ``(Rx, Ry, Qx, Qy)`` array (a dask array, a memory map or an
h5py dataset) plus its calibration. Nothing reads the whole file: virtual images, the
py4DSTEM baseline, CC-ST-AE fitting and mapping, and dask workers all walk the scan through
:meth:`Dataset.iter_blocks`, which hands out blocks of whole scan rows sized to a memory
budget. One streaming path means memory stays bounded whatever the scan size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Calibration", "Dataset", "DEFAULT_BLOCK_BYTES", "rows_per_block"]

#: Default memory budget of one block handed out by :meth:`Dataset.iter_blocks` (float32).
DEFAULT_BLOCK_BYTES = 64 * 2**20


@dataclass
class Calibration:
    """Pixel sizes and units where the file records them (``None`` where it does not)."""

    r_pixel_size: float | None = None
    r_units: str | None = None
    q_pixel_size: float | None = None
    q_units: str | None = None

    def as_attrs(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Dataset:
    """A lazy 4D-STEM array with its calibration and provenance.

    ``data`` supports numpy-style slicing along the scan axes and ``shape``/``dtype``; slicing
    a block of rows returns (after ``np.asarray``) that block only.
    """

    data: Any
    calibration: Calibration = field(default_factory=Calibration)
    source: Path | None = None
    name: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    _closers: list[Any] = field(default_factory=list, repr=False)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def scan_shape(self) -> tuple[int, int]:
        return self.shape[0], self.shape[1]

    @property
    def pattern_shape(self) -> tuple[int, int]:
        return self.shape[2], self.shape[3]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def read_rows(self, r0: int, r1: int, dtype: Any = np.float32) -> np.ndarray:
        """Scan rows ``r0:r1`` as a numpy array of ``dtype`` (a copy, never a view of the file)."""
        try:
            block = self.data[r0:r1]
            if hasattr(block, "compute"):
                # threads: never ship a graph over open file handles to a distributed client
                block = block.compute(scheduler="threads")
            return np.asarray(block, dtype=dtype)
        except OSError as err:  # damage the open-time probe (first/last pattern) did not reach
            from .errors import DataError

            what = self.source or self.name or "dataset"
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(
                f"{what}: cannot read scan rows {r0}:{r1} (truncated or corrupt file?): {detail}"
            ) from err

    def iter_blocks(
        self, max_bytes: int = DEFAULT_BLOCK_BYTES, dtype: Any = np.float32
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(r0, r1, block)`` with ``block = data[r0:r1]`` as ``dtype``, in scan order,
        each block at most ``max_bytes`` (but at least one scan row)."""
        n = rows_per_block(self.shape, max_bytes, np.dtype(dtype).itemsize)
        Rx = self.shape[0]
        for r0 in range(0, Rx, n):
            r1 = min(Rx, r0 + n)
            yield r0, r1, self.read_rows(r0, r1, dtype)

    def close(self) -> None:
        """Release open file handles (safe to call twice)."""
        while self._closers:
            obj = self._closers.pop()
            try:
                obj.close()
            except Exception:  # noqa: BLE001 - closing must never raise
                pass

    def __enter__(self) -> Dataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rows_per_block(shape: tuple[int, ...], max_bytes: int, itemsize: int = 4) -> int:
    """How many scan rows fit in ``max_bytes`` (at least one)."""
    row_bytes = int(np.prod(shape[1:])) * itemsize
    return max(1, int(max_bytes // max(row_bytes, 1)))
