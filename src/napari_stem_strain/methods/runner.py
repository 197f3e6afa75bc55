"""Run a :class:`~napari_stem_strain.methods.base.BlockMethod` over a dataset, block by block.

This is the single streaming loop of the project: memory holds one block of patterns plus the
method's declared per-position outputs, whatever the scan size. The dask engine
(:mod:`napari_stem_strain.distributed`) runs the same ``process_block`` calls on workers and
assembles their rows with the same :class:`Assembly`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import (
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
    """The runner-owned whole-scan arrays of a method's declared outputs.

    Allocated once on the side that calls ``finish`` (the client, for dask); each block's rows
    are written where they belong, whatever order blocks complete in."""

    def __init__(self, method: BlockMethod, scan_shape: tuple[int, int]) -> None:
        self.declared: tuple[Output, ...] = tuple(method.outputs())
        names = [o.name for o in self.declared]
        if len(set(names)) != len(names):
            raise ValueError(f"{method.name}: output names must be unique, not {names}")
        self.scan_shape = (int(scan_shape[0]), int(scan_shape[1]))
        self.arrays = {o.name: o.allocate(self.scan_shape) for o in self.declared}

    def results(self) -> dict[str, np.ndarray]:
        """Every output as ``finish`` receives it."""
        return {o.name: o.complete(self.arrays[o.name]) for o in self.declared}

    def put(self, r0: int, r1: int, rows: Mapping[str, np.ndarray]) -> None:
        for o in self.declared:
            o.combine(self.arrays[o.name], r0, r1, rows[o.name])


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
) -> MethodResult | Any:
    """Prepare ``method`` on ``dataset`` (unless ``prepared``) and stream every block through it;
    returns what ``method.finish`` makes (a :class:`MethodResult` for a strain method, e.g.
    :class:`~napari_stem_strain.virtual.VirtualImages` for the virtual detectors).

    ``progress(done_positions, total_positions, message)`` is called after each block;
    ``should_stop()`` is polled between blocks and raises ``Cancelled``.
    """
    t0 = time.perf_counter()
    if not prepared:
        method.prepare(dataset, progress=progress, should_stop=should_stop)
    Rx, Ry = dataset.scan_shape
    inputs = check_inputs(method, (Rx, Ry))
    out = Assembly(method, (Rx, Ry))
    total = Rx * Ry
    budget = block_bytes or method.block_bytes
    for r0, r1, block in dataset.iter_blocks(max_bytes=budget):
        check_stop(should_stop)
        out.put(r0, r1, run_block(method, block, r0, input_rows(inputs, r0, r1), out.declared))
        if progress is not None:
            progress(r1 * Ry, total, f"{method.name}: {r1}/{Rx} rows")
    check_stop(should_stop)
    return method.finish(out.results(), time.perf_counter() - t0)
