"""The small interface every strain method shares.

A method walks a :class:`~napari_stem_strain.io.dataset.Dataset` in blocks and returns a
:class:`MethodResult`: a raw affine matrix ``A`` per scan position (relative to the method's own
internal basis; NaN where it could not fit) and a sample mask. Strain always comes from ``A``
through :mod:`napari_stem_strain.strain`, never from a method's own formula.

Progress and cancel are plain callables so the CLI (a progress bar), the napari worker (yields)
and dask tasks can all drive the same code:

* ``progress(done, total, message)`` is called after each block;
* ``should_stop()`` is polled between blocks; when it returns True the method raises
  :class:`Cancelled`, leaving no partial output behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Cancelled",
    "MethodResult",
    "ProgressCallback",
    "StopCallback",
    "check_stop",
    "no_progress",
    "never_stop",
]

ProgressCallback = Callable[[int, int, str], None]
StopCallback = Callable[[], bool]


class Cancelled(Exception):
    """The user asked a running method to stop."""


def no_progress(done: int, total: int, message: str = "") -> None:
    """Default progress callback: says nothing."""


def never_stop() -> bool:
    """Default stop callback: never asks to stop."""
    return False


def check_stop(should_stop: StopCallback | None) -> None:
    """Raise :class:`Cancelled` when ``should_stop()`` says so."""
    if should_stop is not None and should_stop():
        raise Cancelled("cancelled by the user")


@dataclass
class MethodResult:
    """What a method delivers for a scan.

    ``A``: ``(Rx, Ry, 2, 2)`` float32 raw affine per position (NaN where not fitted);
    ``sample``: ``(Rx, Ry)`` bool, True for crystal, False for vacuum/background;
    ``settings``: the parameters the method used (derived or given), for the result file;
    ``seconds``: wall time;
    ``A_cov``: optional ``(Rx, Ry, 4, 4)`` float32 covariance of the raw ``A`` (flattened
    row-major), NaN where ``A`` is NaN - what the per-position error bars come from
    (:mod:`napari_stem_strain.uncertainty`); None when the method does not estimate it.
    """

    method: str
    A: np.ndarray
    sample: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    symmetry_deg: float = 360.0
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    A_cov: np.ndarray | None = None


class BlockMethod:
    """Base class of a strain method that streams the scan in blocks of rows.

    Three phases, so one code path serves a single process, a GPU and dask workers alike:

    1. :meth:`prepare` looks at the dataset (a few sampled positions, virtual images) and fixes
       every data-derived setting; afterwards the object is self-contained and picklable
       (a dask worker receives it once).
    2. :meth:`process_block` maps one block ``(n, Ry, Qx, Qy)`` of scan rows to raw ``A``
       ``(n, Ry, 2, 2)`` and a sample mask ``(n, Ry)``; it must not depend on other blocks, so a
       scan processed in one block or many gives identical results.
    3. :meth:`finish` may post-process the whole (small) ``A`` map, e.g. a global fit of the
       descan, and returns the :class:`MethodResult`.
    """

    name: str = "method"
    #: Preferred block budget in bytes of float32 input (the runner may use less).
    block_bytes: int = 64 * 2**20

    def prepare(
        self,
        dataset: Any,
        progress: ProgressCallback | None = None,
        should_stop: StopCallback | None = None,
    ) -> None:
        """Derive the method's settings from the data (default: nothing to derive)."""

    def process_block(self, block: np.ndarray, r0: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def finish(self, A: np.ndarray, sample: np.ndarray, seconds: float) -> MethodResult:
        return MethodResult(self.name, A, sample, self.settings(), seconds,
                            getattr(self, "symmetry_deg", 360.0))

    def settings(self) -> dict[str, Any]:
        """The settings to record in the result file."""
        return {}
