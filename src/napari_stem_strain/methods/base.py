"""The small interface every strain method shares.

A method walks a :class:`~napari_stem_strain.io.dataset.Dataset` in blocks and returns a
:class:`MethodResult`: a raw affine matrix ``A`` per scan position (relative to the method's own
internal basis; NaN where it could not fit) and a sample mask. Strain always comes from ``A``
through :mod:`napari_stem_strain.strain`, never from a method's own formula.

Progress and cancel follow :mod:`napari_stem_strain.progress` (re-exported here):
``progress(done, total, message)`` after each block, ``should_stop()`` polled between blocks,
:class:`Cancelled` raised when it says so.

Per-position state never lives on the method object (LiberTEM's UDF result buffers with
``kind='nav'`` are the model): a method *declares* its per-position outputs
(:class:`Output`: name, trailing shape, dtype), ``process_block`` *returns* them for its rows,
and the runner - one process or dask - owns, fills and hands the whole arrays to ``finish``.
Per-position *inputs* (a user's sample mask) are declared the same way and the runner slices
their rows for each block. So a prepared method is frozen and small when pickled whatever the
scan size, and the runner needs no knowledge of any method's internals.

A per-position output that is scratch for a *local* post-processing step (a fit pooled over a
few neighbouring rows) may be declared ``window=True``: the runner then never assembles it
over the whole scan but feeds it, band by band in row order as rows complete, to the
method's :class:`BandConsumer` (:meth:`BlockMethod.band_consumer`), and drops each row once
no band's halo needs it. The side that calls ``finish`` so holds a window of a few bands of
such an output, whatever the scan size and whatever order blocks complete in.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "A_OUTPUT",
    "BandConsumer",
    "BlockMethod",
    "Cancelled",
    "MethodResult",
    "Output",
    "SAMPLE_OUTPUT",
    "ProgressCallback",
    "StopCallback",
    "check_stop",
    "no_progress",
    "never_stop",
]

from ..progress import (
    Cancelled,
    ProgressCallback,
    StopCallback,
    check_stop,
    never_stop,
    no_progress,
)


@dataclass
class MethodResult:
    """What a method delivers for a scan.

    ``A``: ``(Rx, Ry, 2, 2)`` float32 raw affine per position (NaN where not fitted);
    ``sample``: ``(Rx, Ry)`` bool, True for crystal, False for vacuum/background;
    ``settings``: the parameters the method used (derived or given), for the result file;
    ``seconds``: wall time; ``extras``: the per-position outputs declared with ``extra=True``;
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


#: How the runner combines an output's block values: ``nav`` - per position, each block's
#: rows written in place (LiberTEM's ``kind='nav'``); ``sum`` / ``max`` - one array of
#: ``shape`` for the whole scan, block values added / maximised in (``kind='sig'`` with a
#: merge; a ``sum`` is exact, so order-free, for integer counts in float64); ``cat`` - a
#: variable number of items ``(m, *shape)`` per block (a sample of positions), concatenated
#: in scan order whatever order blocks complete in.
KINDS = ("nav", "sum", "max", "cat")


@dataclass(frozen=True)
class Output:
    """One array a method produces: per position ``(Rx, Ry, *shape)`` (``kind="nav"``) or a
    whole-scan reduction of ``shape`` (``kind="sum"``/``"max"``), of ``dtype``.

    The runner allocates it filled with ``fill``, combines each block's value into it and
    hands it to :meth:`BlockMethod.finish`. ``extra=True`` puts it into
    ``MethodResult.extras`` (and so into the result file); ``extra=False`` marks scratch that
    ``finish`` consumes. ``window=True`` (a ``nav`` scratch output only) streams it to the
    method's :class:`BandConsumer` band by band instead: it is never assembled whole and
    ``finish`` does not receive it.
    """

    name: str
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    fill: Any = 0
    extra: bool = False
    kind: str = "nav"
    window: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"output {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.window and (self.kind != "nav" or self.extra):
            raise ValueError(f"output {self.name!r}: only a per-position (kind='nav') scratch "
                             "output (extra=False) can be windowed")

    def allocate(self, scan_shape: tuple[int, int]) -> np.ndarray | list:
        """The whole-scan array, before any block arrived (a list of ``(r0, items)`` for
        ``cat``, see :meth:`complete`)."""
        if self.kind == "cat":
            return []
        lead = tuple(scan_shape) if self.kind == "nav" else ()
        return np.full((*lead, *self.shape), self.fill, np.dtype(self.dtype))

    def combine(self, into: np.ndarray, r0: int, r1: int, value: np.ndarray) -> None:
        """Put one block's value into the whole-scan array."""
        if self.kind == "nav":
            into[r0:r1] = value
        elif self.kind == "cat":
            into.append((r0, value))
        elif self.kind == "sum":
            into += value
        else:
            np.maximum(into, value, out=into)

    def rows(self, value: Any, n: int, Ry: int) -> np.ndarray:
        """``value`` as this output's rows of a block of ``n`` scan rows (its value, for a
        reduction), checked, so a method that returns a wrong shape fails at its block rather
        than as a garbled map."""
        arr = np.asarray(value, np.dtype(self.dtype))
        if self.kind == "cat":
            if arr.shape[1:] != tuple(self.shape):
                raise ValueError(f"output {self.name!r}: items of shape {arr.shape[1:]}, "
                                 f"declared {tuple(self.shape)}")
            return arr
        want = (n, Ry, *self.shape) if self.kind == "nav" else tuple(self.shape)
        if arr.shape != want:
            raise ValueError(f"output {self.name!r}: a block of {n} x {Ry} positions gave shape "
                             f"{arr.shape}, declared {want}")
        return arr

    def complete(self, combined: np.ndarray | list) -> np.ndarray:
        """The array ``finish`` receives: a ``cat`` output's items in scan order."""
        if self.kind != "cat":
            return combined
        parts = [v for _, v in sorted(combined, key=lambda rv: rv[0])]
        if not parts:
            return np.zeros((0, *self.shape), np.dtype(self.dtype))
        return np.concatenate(parts)

    def nbytes_per_position(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


#: The two outputs every method has: the raw affine per position and the sample mask.
A_OUTPUT = Output("A", (2, 2), "float32", np.nan)
SAMPLE_OUTPUT = Output("sample", (), "bool", False)


class BandConsumer:
    """Client-side consumer of a method's windowed outputs (``Output(window=True)``).

    The runner calls :meth:`consume` once per band of :attr:`rows` scan rows, in row order
    (bands ``0:rows``, ``rows:2 rows``, ...), as soon as every row the band needs - the band
    plus :attr:`halo` rows either side, clipped to the scan - has arrived, whatever order
    blocks complete in; then :meth:`results` once, whose entries are added to what ``finish``
    receives. A consumer must give the same result however it is fed, so a band sees exactly
    the rows it would see if the whole scan were assembled first.
    """

    #: Scan rows per band.
    rows: int = 16
    #: Rows either side of a band that :meth:`consume` needs (rows of the windowed outputs).
    halo: int = 0

    def consume(self, r0: int, r1: int, h0: int, window: Mapping[str, np.ndarray],
                assembled: Mapping[str, np.ndarray]) -> None:
        """Process band ``r0:r1``. ``window[name]``: rows ``h0:h1`` of each windowed output
        (``h0 = max(0, r0 - halo)``, ``h1 = min(Rx, r1 + halo)``); ``assembled``: the
        runner's whole-scan arrays of the other outputs, complete in rows ``0:h1`` (read
        them, never write them: a later band's halo may read those rows)."""
        raise NotImplementedError

    def results(self) -> dict[str, Any]:
        """What the bands produced, added to the outputs ``finish`` receives (names that are
        not declared outputs)."""
        return {}


class BlockMethod:
    """Base class of a strain method that streams the scan in blocks of rows.

    Three phases, so one code path serves a single process, a GPU and dask workers alike:

    1. :meth:`prepare` looks at the dataset (a few sampled positions, virtual images) and fixes
       every data-derived setting; afterwards the object is frozen, self-contained and small
       when pickled (a dask worker receives it once), whatever the scan size.
    2. :meth:`process_block` maps one block ``(n, Ry, Qx, Qy)`` of scan rows to the rows of
       every declared output (:meth:`outputs`), as a mapping ``name -> (n, Ry, *shape)``; a
       method with no outputs beyond ``A`` and ``sample`` may return the pair ``(A, sample)``.
       Rows of the declared per-position inputs (:meth:`inputs`) arrive as keyword arguments.
       It must not depend on other blocks nor change the object, so a scan processed in one
       block or many, here or on dask, gives identical results.
    3. :meth:`finish` receives every output assembled over the whole scan, may post-process
       them (e.g. a fit pooled over neighbouring positions) and returns the
       :class:`MethodResult`. Outputs declared ``window=True`` are instead fed, band by band
       as rows complete, to :meth:`band_consumer`'s consumer, and ``finish`` receives what
       that consumer produced (:meth:`BandConsumer.results`).
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

    def outputs(self) -> tuple[Output, ...]:
        """The per-position outputs :meth:`process_block` returns, ``A`` and ``sample`` first.
        Valid after :meth:`prepare` (a trailing shape may depend on the data)."""
        return (A_OUTPUT, SAMPLE_OUTPUT)

    def band_consumer(self, scan_shape: tuple[int, int]) -> BandConsumer | None:
        """A fresh consumer of the windowed outputs for one run over a scan of
        ``scan_shape`` (needed when an output is declared ``window=True``; default: none).
        Called on the side that calls ``finish``; its state is per run, never the method's."""
        return None

    def inputs(self) -> Mapping[str, np.ndarray]:
        """Per-position inputs ``name -> (Rx, Ry, ...)`` whose rows the runner passes to
        :meth:`process_block` as keyword arguments (default: none). They travel with each
        block, never with the method (see :meth:`for_workers`)."""
        return getattr(self, "_inputs", {})

    def set_input(self, name: str, value: np.ndarray | None) -> None:
        """Declare (or, with ``None``, drop) a per-position input."""
        inputs = dict(self.inputs())
        if value is None:
            inputs.pop(name, None)
        else:
            inputs[name] = np.asarray(value)
        self._inputs = inputs

    def for_workers(self) -> BlockMethod:
        """A shallow copy without the per-position inputs: what is sent to dask workers, so
        its size does not grow with the scan."""
        clone = copy.copy(self)
        clone._inputs = {}
        return clone

    def process_block(self, block: np.ndarray, r0: int, **inputs: np.ndarray
                      ) -> Mapping[str, np.ndarray] | tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def finish(self, out: Mapping[str, np.ndarray], seconds: float) -> MethodResult:
        """The result from the assembled outputs (default: as they are)."""
        return self.result(out, seconds)

    def result(self, out: Mapping[str, np.ndarray], seconds: float,
               A: np.ndarray | None = None, sample: np.ndarray | None = None) -> MethodResult:
        """A :class:`MethodResult` of ``out`` (``A``/``sample`` replaced when given), with
        every output declared ``extra`` in its extras: one declaration adds one extra."""
        extras = {o.name: out[o.name] for o in self.outputs() if o.extra}
        return MethodResult(self.name, out["A"] if A is None else A,
                            out["sample"] if sample is None else sample, self.settings(),
                            seconds, getattr(self, "symmetry_deg", 360.0), extras)

    def settings(self) -> dict[str, Any]:
        """The settings to record in the result file."""
        return {}


def block_outputs(method: BlockMethod, returned: Any, n: int, Ry: int,
                  declared: tuple[Output, ...] | None = None) -> dict[str, np.ndarray]:
    """What ``process_block`` returned, as ``name -> rows`` of every declared output, checked
    against the declaration (the pair ``(A, sample)`` accepted for the two-output case)."""
    declared = declared or method.outputs()
    if isinstance(returned, tuple):
        if len(declared) != 2 or len(returned) != 2:
            raise TypeError(f"{method.name}: process_block returned a tuple, but the method "
                            f"declares {[o.name for o in declared]}: return a mapping")
        returned = {"A": returned[0], "sample": returned[1]}
    missing = [o.name for o in declared if o.name not in returned]
    if missing:
        raise ValueError(f"{method.name}: process_block did not return {missing}")
    return {o.name: o.rows(returned[o.name], n, Ry) for o in declared}


def input_rows(inputs: Mapping[str, np.ndarray], r0: int, r1: int) -> dict[str, np.ndarray]:
    """Rows ``r0:r1`` of every per-position input (copies: they travel to workers)."""
    return {k: np.array(v[r0:r1]) for k, v in inputs.items()}
