"""Run a :class:`~napari_stem_strain.methods.base.BlockMethod` over a dataset, block by block.

This is the single streaming loop of the project: memory holds one block of patterns plus the
small ``(Rx, Ry, 2, 2)`` result, whatever the scan size. The dask engine
(:mod:`napari_stem_strain.distributed`) runs the same ``process_block`` calls on workers.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .base import BlockMethod, MethodResult, ProgressCallback, StopCallback, check_stop

__all__ = ["run_method"]


def run_method(
    method: BlockMethod,
    dataset: Any,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
    block_bytes: int | None = None,
    prepared: bool = False,
) -> MethodResult:
    """Prepare ``method`` on ``dataset`` (unless ``prepared``) and stream every block through it.

    ``progress(done_positions, total_positions, message)`` is called after each block;
    ``should_stop()`` is polled between blocks and raises ``Cancelled``.
    """
    t0 = time.perf_counter()
    if not prepared:
        method.prepare(dataset, progress=progress, should_stop=should_stop)
    Rx, Ry = dataset.scan_shape
    A = np.full((Rx, Ry, 2, 2), np.nan, np.float32)
    sample = np.zeros((Rx, Ry), bool)
    total = Rx * Ry
    budget = block_bytes or method.block_bytes
    for r0, r1, block in dataset.iter_blocks(max_bytes=budget):
        check_stop(should_stop)
        a, s = method.process_block(block, r0)
        A[r0:r1] = a
        sample[r0:r1] = s
        if progress is not None:
            progress(r1 * Ry, total, f"{method.name}: {r1}/{Rx} rows")
    check_stop(should_stop)
    return method.finish(A, sample, time.perf_counter() - t0)
