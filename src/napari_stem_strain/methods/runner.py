"""Run a :class:`~napari_stem_strain.methods.base.BlockMethod` over a dataset, block by block.

This is the single streaming loop of the project: memory holds one block of patterns plus the
method's declared per-position outputs (of its windowed outputs, a few bands of rows),
whatever the scan size. The dask engine
(:mod:`napari_stem_strain.distributed`) runs the same ``process_block`` calls on workers and
assembles their rows with the same :class:`Assembly`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import (
    BandConsumer,
    BlockMethod,
    MethodResult,
    Output,
    ProgressCallback,
    StopCallback,
    block_outputs,
    check_stop,
    input_rows,
)

__all__ = ["Assembly", "run_block", "run_method"]


class Assembly:
    """The runner-owned arrays of a method's declared outputs.

    Allocated once on the side that calls ``finish`` (the client, for dask); each block's rows
    are written where they belong, whatever order blocks complete in.

    Outputs declared ``window=True`` are never allocated over the whole scan: a block's rows
    of them wait in :attr:`pending` until every row above them has arrived (blocks complete
    out of order on dask), then join the contiguous :attr:`buffer`; every band of the
    method's :class:`~napari_stem_strain.methods.base.BandConsumer` whose rows and halo are
    in is fed to it at once, and buffered rows no later band's halo needs are dropped. So the
    rows held are a few bands plus whatever blocks arrived ahead of an unfinished one
    (:attr:`max_rows_held` records the most). ``windowed=False`` assembles them whole and
    feeds the bands from the whole arrays at the end - the reference the window must equal.
    """

    def __init__(self, method: BlockMethod, scan_shape: tuple[int, int],
                 windowed: bool = True) -> None:
        self.declared: tuple[Output, ...] = tuple(method.outputs())
        names = [o.name for o in self.declared]
        if len(set(names)) != len(names):
            raise ValueError(f"{method.name}: output names must be unique, not {names}")
        self.scan_shape = (int(scan_shape[0]), int(scan_shape[1]))
        self.window = tuple(o for o in self.declared if o.window)
        self.consumer: BandConsumer | None = None
        if self.window:
            self.consumer = method.band_consumer(self.scan_shape)
            if self.consumer is None:
                raise ValueError(f"{method.name}: outputs {[o.name for o in self.window]} are "
                                 "declared window=True but band_consumer() gives no consumer")
            if int(self.consumer.rows) < 1 or int(self.consumer.halo) < 0:
                raise ValueError(f"{method.name}: a band consumer needs rows >= 1 and "
                                 "halo >= 0")
        self.windowed = bool(self.window) and windowed
        self.whole = tuple(o for o in self.declared if not (o.window and self.windowed))
        self.arrays = {o.name: o.allocate(self.scan_shape) for o in self.whole}
        #: blocks of windowed rows that arrived before a row above them: ``r0 -> (r1, rows)``
        self.pending: dict[int, tuple[int, dict[str, np.ndarray]]] = {}
        #: contiguous windowed rows ``(r0, r1, rows)``, in order, from the lowest still needed
        self.buffer: list[tuple[int, int, dict[str, np.ndarray]]] = []
        #: every row above this one has arrived
        self.arrived = 0
        #: first row of the next band to consume
        self.next_band = 0
        #: most scan rows of windowed outputs held at once (buffer and pending)
        self.max_rows_held = 0

    def put(self, r0: int, r1: int, rows: Mapping[str, np.ndarray]) -> None:
        for o in self.whole:
            o.combine(self.arrays[o.name], r0, r1, rows[o.name])
        if not self.windowed:
            return
        if r0 in self.pending or r0 < self.arrived:
            raise ValueError(f"rows {r0}:{r1} arrived twice")
        self.pending[r0] = (r1, {o.name: rows[o.name] for o in self.window})
        while self.arrived in self.pending:
            start = self.arrived
            self.arrived, part = self.pending.pop(start)
            self.buffer.append((start, self.arrived, part))
        self.max_rows_held = max(self.max_rows_held, self.rows_held())
        self._feed()

    def rows_held(self) -> int:
        """Scan rows of the windowed outputs held now."""
        return (sum(b - a for a, b, _ in self.buffer)
                + sum(b - a for a, (b, _) in self.pending.items()))

    def _next_band(self, upto: int) -> tuple[int, int, int, int] | None:
        """The next band ``(r0, r1, h0, h1)`` if its rows and halo lie in ``0:upto``
        (marked consumed), else None."""
        Rx = self.scan_shape[0]
        band, halo = int(self.consumer.rows), int(self.consumer.halo)
        r0 = self.next_band
        r1 = min(Rx, r0 + band)
        h1 = min(Rx, r1 + halo)
        if r0 >= Rx or h1 > upto:
            return None
        self.next_band = r1
        return r0, r1, max(0, r0 - halo), h1

    def _feed(self) -> None:
        while (band := self._next_band(self.arrived)) is not None:
            r0, r1, h0, h1 = band
            window = {o.name: self._rows(o.name, h0, h1) for o in self.window}
            self.consumer.consume(r0, r1, h0, window, self.arrays)
            # rows above the next band's halo are needed by no band any more
            keep_from = max(0, self.next_band - int(self.consumer.halo))
            while self.buffer and self.buffer[0][1] <= keep_from:
                self.buffer.pop(0)

    def _rows(self, name: str, h0: int, h1: int) -> np.ndarray:
        """Rows ``h0:h1`` of a windowed output, from the buffered blocks."""
        parts = [rows[name][max(h0, a) - a:min(h1, b) - a]
                 for a, b, rows in self.buffer if a < h1 and b > h0]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def results(self) -> dict[str, Any]:
        """Every output as ``finish`` receives it (the windowed ones replaced by what the
        band consumer produced)."""
        out = {o.name: o.complete(self.arrays[o.name]) for o in self.whole
               if not o.window}
        if self.consumer is None:
            return out
        if self.windowed:
            if self.next_band < self.scan_shape[0] or self.pending:
                raise RuntimeError(f"rows from {self.arrived} on never arrived: the bands "
                                   f"from row {self.next_band} were not consumed")
        else:
            while (band := self._next_band(self.scan_shape[0])) is not None:
                r0, r1, h0, h1 = band
                window = {o.name: self.arrays[o.name][h0:h1] for o in self.window}
                self.consumer.consume(r0, r1, h0, window, self.arrays)
        produced = self.consumer.results()
        clash = sorted(set(produced) & {o.name for o in self.declared})
        if clash:
            raise ValueError(f"band consumer results {clash} clash with declared outputs")
        out.update(produced)
        return out


def check_inputs(method: BlockMethod, scan_shape: tuple[int, ...]) -> Mapping[str, np.ndarray]:
    """The method's per-position inputs, refused with a plain message when they do not cover
    the scan."""
    inputs = method.inputs()
    for k, v in inputs.items():
        if tuple(v.shape[:2]) != tuple(scan_shape[:2]):
            raise ValueError(f"{method.name}: the per-position input {k!r} has shape "
                             f"{tuple(v.shape)}, the scan is {tuple(scan_shape[:2])}")
    return inputs


def run_block(method: BlockMethod, block: np.ndarray, r0: int,
              inputs: Mapping[str, np.ndarray], declared: tuple[Output, ...] | None = None
              ) -> dict[str, np.ndarray]:
    """One block through the method: its declared outputs' rows (``inputs``: this block's rows
    of the per-position inputs). The one place a block is processed, here or on a worker."""
    n, Ry = block.shape[:2]
    return block_outputs(method, method.process_block(block, r0, **inputs), n, Ry, declared)


def run_method(
    method: BlockMethod,
    dataset: Any,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
    block_bytes: int | None = None,
    prepared: bool = False,
    windowed: bool = True,
) -> MethodResult | Any:
    """Prepare ``method`` on ``dataset`` (unless ``prepared``) and stream every block through it;
    returns what ``method.finish`` makes (a :class:`MethodResult` for a strain method, e.g.
    :class:`~napari_stem_strain.virtual.VirtualImages` for the virtual detectors).

    ``progress(done_positions, total_positions, message)`` is called after each block;
    ``should_stop()`` is polled between blocks and raises ``Cancelled``. ``windowed=False``
    assembles outputs declared ``window=True`` over the whole scan (the reference path;
    identical results, more memory).
    """
    t0 = time.perf_counter()
    if not prepared:
        method.prepare(dataset, progress=progress, should_stop=should_stop)
    Rx, Ry = dataset.scan_shape
    inputs = check_inputs(method, (Rx, Ry))
    out = Assembly(method, (Rx, Ry), windowed)
    total = Rx * Ry
    budget = block_bytes or method.block_bytes
    for r0, r1, block in dataset.iter_blocks(max_bytes=budget):
        check_stop(should_stop)
        out.put(r0, r1, run_block(method, block, r0, input_rows(inputs, r0, r1), out.declared))
        if progress is not None:
            progress(r1 * Ry, total, f"{method.name}: {r1}/{Rx} rows")
    check_stop(should_stop)
    return method.finish(out.results(), time.perf_counter() - t0)
