"""What the probe inspector draws, computed without Qt: the reference lattice, the Bragg disks a
method's fitted ``A`` predicts for one probe position, and a first sample/vacuum mask.

Why this lives in the core: the overlay is the user's check that a method "saw" the right
disks, so it must be exactly ``centre + A g0`` for the reference lattice vectors ``g0``
(``CONVENTIONS.md``), testable without a display. The reference lattice is measured once from
the mean pattern of the reference region (the same region the maps are normalised to), so
the overlay of a reference-region position lands on the disks by construction and elsewhere
shows how well ``A`` describes that pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "ReferenceLattice",
    "beam_centre",
    "find_disks",
    "reference_lattice",
    "lattice_vectors",
    "predicted_disks",
    "mask_from_virtual",
    "otsu_split",
    "region_mean_pattern",
]


@dataclass
class ReferenceLattice:
    """The reference Bragg lattice in detector pixels, ``(x, y)`` = (row, column).

    ``g1, g2``: primitive reciprocal basis; ``vectors``: every ``h g1 + k g2`` (direct beam
    ``(0, 0)`` included, first) that lands on the detector; ``radius``: direct-beam radius;
    ``disk_radius``: the Bragg disks' own radius (smaller where the direct beam is saturated
    or bloomed, as in ASTAR data; the probe inspector draws rings of this size).
    """

    g1: np.ndarray
    g2: np.ndarray
    vectors: np.ndarray
    radius: float
    centre: np.ndarray
    disk_radius: float = 0.0

    def __post_init__(self) -> None:
        if not self.disk_radius:
            self.disk_radius = self.radius


def beam_centre(pattern: np.ndarray) -> tuple[np.ndarray, float]:
    """``((x0, y0), r)``: centre of mass and radius of the direct beam of one pattern.

    The beam is the connected region above half the smoothed maximum that holds the maximum
    (the brightest feature of any pattern, crystal or vacuum); the half-maximum contour of a
    disk sits at its nominal radius.
    """
    p = ndimage.gaussian_filter(np.asarray(pattern, np.float64), 1.0)
    peak = np.unravel_index(int(np.argmax(p)), p.shape)
    labels, _ = ndimage.label(p >= 0.5 * p[peak])
    region = labels == labels[peak]
    w = np.where(region, p, 0.0)
    xx, yy = np.indices(p.shape)
    tot = w.sum()
    centre = np.array([(xx * w).sum() / tot, (yy * w).sum() / tot])
    return centre, float(np.sqrt(region.sum() / np.pi))


def find_disks(pattern: np.ndarray, centre: np.ndarray, radius: float,
               rel_threshold: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """Bragg-disk positions (detector px) and intensities of one pattern, direct beam excluded.

    Local maxima of the pattern smoothed at the disk size, kept when brighter than
    ``rel_threshold`` of the brightest Bragg disk and at least two beam radii from the centre.
    """
    sigma = max(radius / 2.0, 1.0)
    p = ndimage.gaussian_filter(np.asarray(pattern, np.float64), sigma)
    size = max(3, int(round(1.5 * radius)) | 1)
    is_max = (p == ndimage.maximum_filter(p, size=size)) & (p > np.median(p))
    pts = np.argwhere(is_max).astype(float)
    if len(pts) == 0:
        return np.zeros((0, 2)), np.zeros(0)
    far = np.linalg.norm(pts - centre, axis=1) > 2.0 * radius
    pts = pts[far]
    inten = p[tuple(pts.astype(int).T)] - np.median(p)
    if len(pts) == 0:
        return pts, inten
    keep = inten > rel_threshold * inten.max()
    return pts[keep], inten[keep]


def _primitive_basis(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two shortest non-collinear vectors, ordered counter-clockwise (``g1 x g2 > 0``)."""
    order = np.argsort(np.linalg.norm(vectors, axis=1))
    v = vectors[order]
    g1 = v[0]
    for cand in v[1:]:
        cross = g1[0] * cand[1] - g1[1] * cand[0]
        if abs(cross) > 0.3 * np.linalg.norm(g1) * np.linalg.norm(cand):
            g2 = cand if cross > 0 else -cand
            return g1, g2
    raise ValueError("the reference pattern shows no two non-collinear Bragg disks")


def _refine_peaks(pattern: np.ndarray, pts: np.ndarray, radius: float) -> np.ndarray:
    """Sub-pixel disk centres: intensity-weighted centroid within one radius of each maximum."""
    p = pattern - np.median(pattern)
    xx, yy = np.indices(p.shape)
    out = []
    for x, y in pts:
        w = np.where((xx - x) ** 2 + (yy - y) ** 2 <= (radius + 0.5) ** 2, np.clip(p, 0, None), 0)
        tot = w.sum()
        out.append([(xx * w).sum() / tot, (yy * w).sum() / tot] if tot > 0 else [x, y])
    return np.asarray(out, float)


def _refine_basis(vectors: np.ndarray, g1: np.ndarray, g2: np.ndarray,
                  radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares ``g1, g2`` over every disk the first basis indexes within one radius."""
    G = np.stack([g1, g2], axis=1)
    hk = np.round(vectors @ np.linalg.inv(G).T)
    ok = np.linalg.norm(vectors - hk @ G.T, axis=1) < radius
    if ok.sum() >= 2 and np.linalg.matrix_rank(hk[ok]) == 2:
        coef, *_ = np.linalg.lstsq(hk[ok], vectors[ok], rcond=None)
        return coef[0], coef[1]
    return g1, g2


def lattice_vectors(g1: np.ndarray, g2: np.ndarray, centre: np.ndarray,
                    shape: tuple[int, int], margin: float = 0.0) -> np.ndarray:
    """Every ``h g1 + k g2`` whose disk (at ``centre + g``) lies on a detector of ``shape``;
    the direct beam ``(0, 0)`` first."""
    G = np.stack([np.asarray(g1, float), np.asarray(g2, float)], axis=1)
    span = max(shape) / max(min(np.linalg.norm(g1), np.linalg.norm(g2)), 1e-6)
    n = int(np.ceil(span)) + 1
    hk = np.array([(h, k) for h in range(-n, n + 1) for k in range(-n, n + 1)], float)
    hk = hk[np.argsort(np.abs(hk).sum(1), kind="stable")]
    g = hk @ G.T
    pos = np.asarray(centre, float) + g
    inside = ((pos[:, 0] >= -margin) & (pos[:, 0] <= shape[0] - 1 + margin)
              & (pos[:, 1] >= -margin) & (pos[:, 1] <= shape[1] - 1 + margin))
    return g[inside]


def reference_lattice(pattern: np.ndarray) -> ReferenceLattice:
    """Measure the reference lattice from a (mean) reference pattern.

    Raises ``ValueError`` with a plain message when fewer than two non-collinear Bragg disks
    are visible (a vacuum or amorphous reference).
    """
    pattern = np.asarray(pattern, np.float64)
    centre, radius = beam_centre(pattern)
    pts, _ = find_disks(pattern, centre, radius)
    if len(pts) < 2:
        raise ValueError("the reference pattern shows fewer than two Bragg disks")
    g1, g2 = _primitive_basis(pts - centre)
    g1, g2 = _refine_basis(_refine_peaks(pattern, pts, radius) - centre, g1, g2, radius)
    vecs = lattice_vectors(g1, g2, centre, pattern.shape)
    disk = spot_radius(pattern, _refine_peaks(pattern, pts, radius), radius)
    return ReferenceLattice(g1, g2, vecs, radius, centre, disk)


def spot_radius(pattern: np.ndarray, peaks: np.ndarray, beam_radius: float) -> float:
    """Median half-maximum radius of the Bragg disks at ``peaks`` (above each one's local
    background), at most the direct beam's radius."""
    p = np.asarray(pattern, np.float64)
    half = int(np.ceil(1.5 * beam_radius)) + 2
    radii = []
    for x, y in peaks:
        i, j = int(round(x)), int(round(y))
        if not (half <= i < p.shape[0] - half and half <= j < p.shape[1] - half):
            continue  # a window cut by the detector edge has no honest background
        win = p[i - half:i + half + 1, j - half:j + half + 1]
        border = np.concatenate([win[0], win[-1], win[1:-1, 0], win[1:-1, -1]])
        bg = float(np.median(border))
        top = float(win[half - 1:half + 2, half - 1:half + 2].max())
        if top <= bg:
            continue
        labels, _ = ndimage.label(win >= bg + 0.5 * (top - bg))
        lab = labels[half - 1:half + 2, half - 1:half + 2].max()
        if lab == 0:
            continue
        radii.append(np.sqrt((labels == lab).sum() / np.pi))
    if not radii:
        return float(beam_radius)
    return float(min(np.median(radii), beam_radius))


def predicted_disks(A: np.ndarray, g0: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Disk positions ``centre + A g0`` for each reference vector (rows of ``g0``); NaN rows
    where ``A`` is NaN (background, unfitted)."""
    A = np.asarray(A, np.float64)
    return np.asarray(centre, np.float64) + np.asarray(g0, np.float64) @ A.T


def region_mean_pattern(dataset, region: tuple[slice, slice]) -> np.ndarray:
    """Mean diffraction pattern over a rectangle of scan positions, read lazily row-block-wise."""
    rs, cs = region
    block = dataset.read_rows(rs.start, rs.stop)[:, cs]
    return block.reshape(-1, *block.shape[2:]).mean(axis=0)


def otsu_split(values: np.ndarray) -> float | None:
    """Otsu's threshold of ``values``, or ``None`` unless the histogram is clearly bimodal with
    a distinctly lower class: either near empty (mean under a quarter of the upper's, three
    spreads below it) or - a noise floor lifts vacuum off zero - at least five spreads and a
    quarter of the upper class's mean below it. (Grains of one crystal differ by less: in the
    simulations up to about four spreads and a fifth of the mean.)"""
    f = np.sort(np.asarray(values, float).ravel())
    f = f[np.isfinite(f)]
    if len(f) < 4:
        return None
    n = len(f)
    csum = np.cumsum(f)
    i = np.arange(1, n)
    mean_lo = csum[:-1] / i
    mean_hi = (csum[-1] - csum[:-1]) / (n - i)
    k = int(np.argmax(i * (n - i) * (mean_hi - mean_lo) ** 2))
    lo, hi = f[: k + 1], f[k + 1:]
    spread = max(lo.std(), hi.std(), 1e-12)
    gap = hi.mean() - lo.mean()
    if gap < 3.0 * spread:
        return None
    if lo.mean() > 0.25 * hi.mean() and (gap < 5.0 * spread or gap < 0.25 * hi.mean()):
        return None
    return float(0.5 * (lo.max() + hi.min()))


def mask_from_virtual(bright_field: np.ndarray, dark_field: np.ndarray) -> np.ndarray:
    """A first sample (True) / vacuum (False) mask from the virtual images.

    Vacuum keeps nearly all counts in the direct beam, a crystal scatters part of them out, so
    the scattered share ``ADF / (BF + ADF)`` is near zero in vacuum and clearly above it on the
    crystal. Split by :func:`otsu_split` only when clearly bimodal: a scan of crystal only
    (thickness and orientation contrast) is all sample.
    """
    bf = np.asarray(bright_field, np.float64)
    df = np.asarray(dark_field, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        scattered = df / (bf + df)
    scattered = np.where(np.isfinite(scattered), scattered, 0.0)
    t = otsu_split(scattered)
    if t is None:
        return np.ones(bf.shape, bool)
    return scattered > t
