"""Run one or both strain methods on a dataset and turn their output into result groups.

The CLI (`stem-strain map`), the napari widgets and scripts all come through here, so the
choice of method objects, the reference region and the dask engine live in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .io.results import MethodMaps
from .methods.base import BlockMethod, MethodResult, ProgressCallback, StopCallback
from .strain import check_region, format_region

__all__ = [
    "expand_methods",
    "make_method",
    "run_method_on",
    "run_methods",
    "default_reference",
    "compare_to_truth",
    "calibration_to_truth",
]

def expand_methods(methods: str | Sequence[str]) -> list[str]:
    """``"both"`` -> the default methods (the two shipped ones), ``"all"`` -> every registered
    method (:mod:`~napari_stem_strain.methods.registry`); validate names with a plain
    message."""
    from .methods import registry

    if isinstance(methods, str):
        if methods == "both":
            return registry.default_names()
        methods = list(registry.available()) if methods == "all" else [methods]
    known = registry.available()
    out = []
    for m in methods:
        if m not in known:
            raise ValueError(f"unknown method {m!r}: choose from {', '.join(known)}, both "
                             "or all")
        out.append(m)
    return out


def make_method(
    name: str,
    *,
    model: Any = None,
    device: str = "auto",
    batch_size: int | None = None,
    sample_mask: np.ndarray | None = None,
    reference: str | None = None,
) -> BlockMethod:
    """Build a method object by its registry name (imports the heavy method modules lazily);
    each method receives the options its registry entry lists."""
    from .methods import registry

    return registry.get(name).make(model=model, device=device, batch_size=batch_size,
                                   sample_mask=sample_mask, reference=reference)


def run_method_on(
    method: BlockMethod,
    dataset: Any,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
    dask_address: str | None = None,
) -> MethodResult:
    """Run a prepared-or-not method in this process or on a dask cluster."""
    if dask_address:
        from .distributed import run_method_dask

        return run_method_dask(method, dataset, dask_address, progress=progress,
                               should_stop=should_stop)
    from .methods.runner import run_method

    return run_method(method, dataset, progress=progress, should_stop=should_stop)


def default_reference(sample: np.ndarray, size: int | None = None) -> str:
    """A sensible starting reference region: the square of sample positions farthest from
    vacuum and from the scan edge (the user moves it onto the grain they trust).

    ``size`` defaults to about a sixth of the smaller scan side (at least 2 positions).
    """
    from scipy import ndimage

    sample = np.asarray(sample, dtype=bool)
    Rx, Ry = sample.shape
    size = size or max(2, min(Rx, Ry) // 6)
    size = min(size, Rx, Ry)
    if not sample.any():
        r0, c0 = (Rx - size) // 2, (Ry - size) // 2
        return format_region((slice(r0, r0 + size), slice(c0, c0 + size)))
    padded = np.pad(sample, 1, constant_values=False)
    dist = ndimage.distance_transform_edt(padded)[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    r0 = int(np.clip(r - size // 2, 0, Rx - size))
    c0 = int(np.clip(c - size // 2, 0, Ry - size))
    return format_region((slice(r0, r0 + size), slice(c0, c0 + size)))


def run_methods(
    dataset: Any,
    methods: str | Sequence[str] = "both",
    reference: str | None = None,
    sample_mask: np.ndarray | None = None,
    model: Any = None,
    device: str = "auto",
    batch_size: int | None = None,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
    dask_address: str | None = None,
) -> dict[str, MethodMaps]:
    """Run each named method and return its result group, maps relative to ``reference``.

    ``reference`` defaults to :func:`default_reference` on the first method's sample mask.
    ``sample_mask`` (True = crystal) overrides each method's own background classification.
    Raises :class:`~napari_stem_strain.io.errors.DataError` when the input file changed while
    the methods ran (size, mtime, inode or a checksum of a few blocks).
    """
    from .io.stamp import InputStamp

    names = expand_methods(methods)
    if reference is not None:
        check_region(reference, dataset.scan_shape)  # refuse a wrong region before the work
    source = str(getattr(dataset, "source", "") or "")
    stamp = InputStamp.take(source)  # a file changed mid-run must not give a mixed map
    out: dict[str, MethodMaps] = {}
    for i, name in enumerate(names):
        method = make_method(name, model=model, device=device, batch_size=batch_size,
                             sample_mask=sample_mask, reference=reference)

        def step(done: int, total: int, msg: str = "", _i: int = i) -> None:
            if progress is not None:
                progress(_i * total + done, len(names) * total, msg)

        result = run_method_on(method, dataset, step, should_stop, dask_address)
        if sample_mask is not None:
            result.sample = np.asarray(sample_mask, bool) & result.sample
        if reference is None:
            reference = default_reference(result.sample)
        out[name] = MethodMaps.from_result(result, reference, input_file=source)
    if stamp is not None:
        stamp.check()
        for g in out.values():
            g.input_stamp = stamp.as_attrs()
    return out


def compare_to_truth(groups: dict[str, MethodMaps], truth: Any) -> dict[str, dict[str, float]]:
    """MAE per method and component against a :class:`GroundTruth` (CONVENTIONS.md rules).

    Strain components are dimensionless; ``theta`` is in degrees, wrapped into the lattice's
    symmetry period.
    """
    from .strain import mae

    table: dict[str, dict[str, float]] = {}
    for name, g in groups.items():
        shape = tuple(np.shape(g.maps.exx))
        if shape != tuple(np.shape(truth.exx)):
            raise ValueError(f"cannot compare {name}: its maps are {shape}, the ground truth "
                             f"{tuple(np.shape(truth.exx))} (was the scan re-shaped?)")
        row = {}
        for comp in ("exx", "eyy", "exy"):
            row[comp] = mae(getattr(g.maps, comp), getattr(truth, comp), truth.sample)
        row["theta"] = mae(g.maps.theta, truth.theta, truth.sample, truth.symmetry_deg)
        table[name] = row
    return table


def bias_scatter_to_truth(groups: dict[str, MethodMaps], truth: Any
                          ) -> dict[str, dict[str, tuple[float, float, float]]]:
    """Per method and component, :func:`~napari_stem_strain.strain.bias_and_scatter`
    against a :class:`GroundTruth`: ``(mean |bias|, scatter, max |bias|)`` over its grains.
    Empty when the truth has no grain labels (files from before they were written)."""
    from .strain import bias_and_scatter

    grains = getattr(truth, "grains", None)
    if grains is None:
        return {}
    table: dict[str, dict[str, tuple[float, float, float]]] = {}
    for name, g in groups.items():
        if np.shape(g.maps.exx) != np.shape(truth.exx):
            continue
        table[name] = {
            k: bias_and_scatter(getattr(g.maps, k), getattr(truth, k), grains, truth.sample,
                                truth.symmetry_deg if k == "theta" else None)
            for k in ("exx", "eyy", "exy", "theta")
        }
    return table


def calibration_to_truth(groups: dict[str, MethodMaps], truth: Any
                         ) -> dict[str, dict[str, dict[str, float]]]:
    """How honest each method's error bars are against a :class:`GroundTruth` (issue 13).

    Per method (only those whose maps carry ``sigma``) and component: the standard deviation
    of ``z = (estimate - truth) / sigma`` and the share of positions within 2 sigma, over the
    positions *within single grains* (:func:`~napari_stem_strain.uncertainty.interior_mask`:
    a grain boundary mixes two lattices, which no per-position error model describes).
    """
    from .uncertainty import COMPONENTS, calibration, interior_mask

    where = interior_mask(getattr(truth, "grains", None), truth.sample)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, g in groups.items():
        if g.maps.sigma is None or np.shape(g.maps.exx) != np.shape(truth.exx):
            continue
        table[name] = {
            k: calibration(getattr(g.maps, k), g.maps.sigma[k], getattr(truth, k), where,
                           truth.symmetry_deg if k == "theta" else None)
            for k in COMPONENTS
        }
    return table
