"""Virtual detectors over a lazy 4D-STEM dataset, streamed in one pass.

:func:`virtual_images` measures the direct beam on a small sample of scan rows, then walks the
scan once through :meth:`Dataset.iter_blocks` to build the virtual bright field (a disk around
the beam), the virtual annular dark field (an annulus outside it), and the mean and maximum
patterns. The beam centre and radius it reports are measured again on the final mean pattern.

Coordinates follow ``CONVENTIONS.md``: ``x`` is the first detector axis (row, ``Qx``), ``y``
the second (column, ``Qy``), in pixels from the first pixel's centre.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from .io.dataset import DEFAULT_BLOCK_BYTES
from .methods.base import BlockMethod, Output
from .progress import ProgressCallback, StopCallback, check_stop

__all__ = ["VirtualDetectors", "VirtualImages", "virtual_images", "find_direct_beam",
           "disk_mask", "annulus_mask"]

#: The bright-field disk is this many beam radii wide (room for a little descan).
BF_FACTOR = 1.1
#: The default annular dark field starts at this many beam radii.
ADF_FACTOR = 2.0


@dataclass
class VirtualImages:
    """The virtual images of a scan and the direct beam they were built around.

    ``bright_field``/``dark_field``: ``(Rx, Ry)`` float32 sums inside the bright-field disk and
    the dark-field annulus; ``mean_pattern``/``max_pattern``: ``(Qx, Qy)`` float32;
    ``beam_radius`` (px) and ``centre`` ``(x, y)`` (px): the direct beam measured on the mean
    pattern. ``bf_radius``, ``adf_inner``, ``adf_outer`` and ``mask_centre`` are the detector
    geometry actually used (``adf_outer`` may be ``inf``: out to the detector edge).
    """

    bright_field: np.ndarray
    dark_field: np.ndarray
    mean_pattern: np.ndarray
    max_pattern: np.ndarray
    beam_radius: float
    centre: tuple[float, float]
    bf_radius: float = 0.0
    adf_inner: float = 0.0
    adf_outer: float = float("inf")
    mask_centre: tuple[float, float] = (0.0, 0.0)


def _radius_grid(shape: tuple[int, int], centre: tuple[float, float]) -> np.ndarray:
    x = np.arange(shape[0], dtype=np.float64)[:, None] - centre[0]
    y = np.arange(shape[1], dtype=np.float64)[None, :] - centre[1]
    return np.hypot(x, y)


def disk_mask(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    """Boolean disk of ``radius`` px around ``centre`` (x = row, y = column)."""
    return _radius_grid(shape, centre) <= radius


def annulus_mask(shape: tuple[int, int], centre: tuple[float, float], inner: float,
                 outer: float = float("inf")) -> np.ndarray:
    """Boolean annulus ``inner < r <= outer`` around ``centre``."""
    r = _radius_grid(shape, centre)
    return (r > inner) & (r <= outer)


def _remove_spikes(p: np.ndarray, factor: float = 4.0) -> np.ndarray:
    """Replace isolated hot pixels (brighter than ``factor`` x their brightest neighbour) by
    that neighbour; a beam, even one pixel wide, lights its neighbours too."""
    if min(p.shape) < 3:
        return p
    footprint = np.ones((3, 3), bool)
    footprint[1, 1] = False
    nb = ndimage.maximum_filter(p, footprint=footprint, mode="constant", cval=float(p.min()))
    floor = float(np.median(p))
    noise = float(np.median(np.abs(p - floor)))
    spikes = (p - floor) > factor * np.maximum(nb - floor, 0.0) + 10.0 * noise + 1e-12
    if not spikes.any() or spikes.sum() > 0.01 * p.size + 1:
        return p
    out = p.copy()
    out[spikes] = nb[spikes]
    return out


def find_direct_beam(pattern: Any) -> tuple[float, float, float]:
    """Centre ``(cx, cy)`` and radius (px) of the direct beam in a diffraction pattern.

    The direct beam is taken to be the brightest feature (true of any 4D-STEM mean pattern):

    1. isolated hot pixels are removed, then noise by a 3x3 median (patterns of 32 px and
       more), and the pattern is smoothed by a small Gaussian;
    2. the background is the median of the smoothed pattern (Bragg disks and the beam cover a
       small part of the detector; a smooth diffuse background sits at or near it);
    3. the beam is the connected region around the maximum above half-way between background
       and peak; its radius is that of a disk of the same area (the half-height edge of a
       smoothed top-hat is its true edge), its centre the background-subtracted
       intensity-weighted centroid over that region grown by one pixel.

    Bragg disks weaker than half the beam's peak above background never join it. A flat or
    empty pattern gives the detector centre and radius 0.
    """
    p = np.asarray(pattern, dtype=np.float64)
    if p.ndim != 2 or p.size == 0:
        raise ValueError(f"find_direct_beam needs a 2D pattern, not shape {p.shape}")
    p = np.where(np.isfinite(p), p, 0.0)
    nx, ny = p.shape
    geometric = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    p = _remove_spikes(p)
    if min(nx, ny) >= 32:
        p = ndimage.median_filter(p, size=3, mode="nearest")
    sigma = max(0.5, min(nx, ny) / 256.0)
    s = ndimage.gaussian_filter(p, sigma, mode="nearest") if min(nx, ny) >= 8 else p
    bg = float(np.median(s))
    peak_idx = np.unravel_index(int(np.argmax(s)), s.shape)
    peak = float(s[peak_idx])
    if not np.isfinite(peak) or peak <= bg or peak - bg <= 1e-12 * max(abs(peak), 1.0):
        return geometric[0], geometric[1], 0.0
    above = s > bg + 0.5 * (peak - bg)
    labels, _ = ndimage.label(above)
    region = labels == labels[peak_idx]
    area = float(region.sum())
    radius = float(np.sqrt(area / np.pi))
    grown = ndimage.binary_dilation(region) if radius >= 1.0 else region
    w = np.clip(s - bg, 0.0, None) * grown
    total = float(w.sum())
    if total <= 0:
        return float(peak_idx[0]), float(peak_idx[1]), radius
    xs = np.arange(nx, dtype=np.float64)
    ys = np.arange(ny, dtype=np.float64)
    cx = float((w.sum(axis=1) * xs).sum() / total)
    cy = float((w.sum(axis=0) * ys).sum() / total)
    return cx, cy, radius


def _sample_rows(Rx: int, Ry: int, pattern_px: int, budget_bytes: int = 32 * 2**20,
                 max_rows: int = 16) -> list[int]:
    """A few scan rows spread over the scan, at most ``budget_bytes`` of float32 in all."""
    per_row = max(1, Ry * pattern_px * 4)
    n = int(max(1, min(Rx, max_rows, budget_bytes // per_row)))
    return sorted({int(round(v)) for v in np.linspace(0, Rx - 1, n)})


class VirtualDetectors(BlockMethod):
    """Virtual bright field, annular dark field, mean and max patterns as a per-position
    computation of the block contract (LiberTEM's ``ApplyMasksUDF``): one streaming path with
    the strain maps, so it runs in one process or on dask, with progress, cancel and the
    read-error wrapping of the runner.

    :meth:`prepare` measures the direct beam on a few sampled rows and fixes the detector
    masks; each block then gives its rows of the two images and its share of the pattern
    sum (float64: exact for counts, so the sum does not depend on how the scan was cut) and
    maximum; :meth:`finish` measures the beam again on the mean pattern."""

    name = "virtual images"
    block_bytes = DEFAULT_BLOCK_BYTES
    #: patterns per matrix product inside a block (bounds the float64 copy)
    CHUNK = 1024

    def __init__(self, inner: float | None = None, outer: float | None = None,
                 bf_radius: float | None = None) -> None:
        self.inner, self.outer, self.bf_radius = inner, outer, bf_radius
        self.geometry: dict[str, Any] | None = None
        self.masks: np.ndarray | None = None

    def prepare(self, dataset: Any, progress: ProgressCallback | None = None,
                should_stop: StopCallback | None = None) -> None:
        Rx, Ry, Qx, Qy = (int(v) for v in dataset.shape)
        check_stop(should_stop)
        if progress is not None:
            progress(0, Rx * Ry, "virtual images: locating the direct beam")
        # 1. direct beam from a small sample of rows (a few MB, not a pass over the data)
        acc = np.zeros((Qx, Qy), np.float64)
        count = 0
        for r in _sample_rows(Rx, Ry, Qx * Qy):
            rows = dataset.read_rows(r, r + 1)
            acc += rows.sum(axis=(0, 1), dtype=np.float64)
            count += rows.shape[0] * rows.shape[1]
            check_stop(should_stop)
        cx, cy, radius = find_direct_beam(acc / max(count, 1))
        beam_r = radius if radius > 0 else min(Qx, Qy) / 8.0
        centre = (cx, cy)
        r_bf = float(self.bf_radius) if self.bf_radius is not None else BF_FACTOR * beam_r
        r_in = float(self.inner) if self.inner is not None else ADF_FACTOR * beam_r
        if self.outer is not None:
            r_out = float(self.outer)
        else:
            edge = min(cx + 0.5, Qx - 0.5 - cx, cy + 0.5, Qy - 0.5 - cy)
            r_out = float(edge) if edge > r_in else float("inf")
        if r_out <= r_in:
            raise ValueError(f"the dark-field annulus is empty: inner {r_in:g} >= outer "
                             f"{r_out:g} px")
        ring = annulus_mask((Qx, Qy), centre, r_in, r_out)
        if not ring.any() and self.inner is None and self.outer is None:
            # a detector too small for an annulus at 2 R (e.g. 8x8 simulations): all outside BF
            r_in, r_out = r_bf, float("inf")
            ring = annulus_mask((Qx, Qy), centre, r_in, r_out)
        masks = np.stack([disk_mask((Qx, Qy), centre, r_bf).ravel(), ring.ravel()], axis=1)
        self.masks = masks.astype(np.float64)
        self.geometry = {"bf_radius": r_bf, "adf_inner": r_in, "adf_outer": r_out,
                         "mask_centre": (float(cx), float(cy)), "pattern_shape": (Qx, Qy)}

    def outputs(self) -> tuple[Output, ...]:
        shape = self._geometry()["pattern_shape"]
        return (Output("bright_field", (), "float32", 0.0),
                Output("dark_field", (), "float32", 0.0),
                Output("pattern_sum", shape, "float64", 0.0, kind="sum"),
                Output("pattern_max", shape, "float32", -np.inf, kind="max"))

    def process_block(self, block: np.ndarray, r0: int) -> dict[str, np.ndarray]:
        n, Ry, Qx, Qy = block.shape
        flat = block.reshape(n * Ry, Qx * Qy)
        vals = np.empty((n * Ry, 2), np.float64)
        # float64 sums of each pattern's masked pixels: exact for counts, so a position's
        # value does not depend on how many patterns share its matrix product
        for i in range(0, len(flat), self.CHUNK):
            vals[i:i + self.CHUNK] = flat[i:i + self.CHUNK].astype(np.float64) @ self.masks
        return {"bright_field": vals[:, 0].reshape(n, Ry),
                "dark_field": vals[:, 1].reshape(n, Ry),
                "pattern_sum": flat.sum(axis=0, dtype=np.float64).reshape(Qx, Qy),
                "pattern_max": flat.max(axis=0).reshape(Qx, Qy)}

    def finish(self, out: Mapping[str, np.ndarray], seconds: float) -> VirtualImages:
        g = self._geometry()
        total = out["bright_field"].size
        mean = (out["pattern_sum"] / max(total, 1)).astype(np.float32)
        mcx, mcy, mr = find_direct_beam(mean)
        return VirtualImages(
            bright_field=out["bright_field"],
            dark_field=out["dark_field"],
            mean_pattern=mean,
            max_pattern=out["pattern_max"],
            beam_radius=float(mr),
            centre=(float(mcx), float(mcy)),
            bf_radius=g["bf_radius"],
            adf_inner=g["adf_inner"],
            adf_outer=g["adf_outer"],
            mask_centre=g["mask_centre"],
        )

    def _geometry(self) -> dict[str, Any]:
        if self.geometry is None:
            raise RuntimeError("VirtualDetectors.prepare() must run first")
        return self.geometry


def virtual_images(
    ds: Any,
    inner: float | None = None,
    outer: float | None = None,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
    bf_radius: float | None = None,
    max_bytes: int | None = None,
    dask_address: str | None = None,
) -> VirtualImages:
    """Virtual bright field, annular dark field, mean and max patterns of ``ds`` in one pass
    (:class:`VirtualDetectors` through the runner; on the dask cluster at ``dask_address``
    when given).

    The direct beam (centre, radius ``R``) is first measured on the mean of a few sampled scan
    rows. Bright field: sum inside ``bf_radius`` (default ``1.1 R``) of that centre. Annular
    dark field: ``inner < r <= outer`` with ``inner`` default ``2 R`` and ``outer`` default the
    largest full circle on the detector (out to the detector edge when that is inside
    ``inner``). ``progress(done, total, message)`` is called after each block; ``should_stop()``
    is polled between blocks and raises :class:`~napari_stem_strain.progress.Cancelled`.
    """
    method = VirtualDetectors(inner=inner, outer=outer, bf_radius=bf_radius)
    if dask_address:
        from .distributed import run_method_dask

        return run_method_dask(method, ds, dask_address, progress=progress,
                               should_stop=should_stop, block_bytes=max_bytes)
    from .methods.runner import run_method

    return run_method(method, ds, progress=progress, should_stop=should_stop,
                      block_bytes=max_bytes)
