"""Direct beam, vacuum and probe template for the py4DSTEM baseline, all measured from the data.

Why these measurements: every setting py4DSTEM's disk detection needs (template, kernel width,
peak spacing, edge margin) scales with the direct-beam disk, and the direct beam is the one
feature every pattern has - in vacuum and in the crystal, at any dose.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = [
    "beam_centre_radius",
    "vacuum_split",
    "subtract_local_background",
    "aligned_mean",
    "edge_width",
]


def beam_centre_radius(pattern: np.ndarray) -> tuple[float, float, float]:
    """``(x0, y0, r)`` of the direct beam of one pattern (detector px).

    The beam is the connected region above half the (lightly smoothed) maximum that holds the
    maximum; its centre of mass is the centre and ``sqrt(area / pi)`` the radius. Half maximum
    because a disk's soft edge crosses it at the disk's nominal radius, and a smoothed maximum
    so that a single hot pixel of shot noise does not become "the beam".
    """
    p = ndimage.gaussian_filter(np.asarray(pattern, np.float64), 1.0)
    peak = np.unravel_index(int(np.argmax(p)), p.shape)
    mask = p > 0.5 * p[peak]
    labels, _ = ndimage.label(mask)
    region = labels == labels[peak]
    w = np.where(region, p, 0.0)
    total = w.sum()
    if total <= 0:
        return float(peak[0]), float(peak[1]), 1.0
    x0, y0 = ndimage.center_of_mass(w)
    return float(x0), float(y0), float(np.sqrt(region.sum() / np.pi))


def vacuum_split(signal: np.ndarray) -> float | None:
    """Threshold on the lattice signal below which a pattern is vacuum, or ``None`` when the
    scan shows no vacuum.

    Otsu's split of the per-position lattice signal, accepted only when it is clearly bimodal:
    the lower class must hold next to no lattice signal (under a quarter of the upper class's)
    and lie several spreads below it. A scan of crystal only (thickness, orientation and
    dynamical contrast) has no such near-empty class.
    """
    f = np.sort(np.asarray(signal, float))
    f = f[np.isfinite(f)]
    if len(f) < 4:
        return None
    best, t_best = -1.0, None
    for i in range(1, len(f)):
        lo, hi = f[:i], f[i:]
        between = len(lo) * len(hi) * (lo.mean() - hi.mean()) ** 2
        if between > best:
            best, t_best = between, 0.5 * (f[i - 1] + f[i])
    lo, hi = f[f <= t_best], f[f > t_best]
    if len(lo) == 0 or len(hi) == 0:
        return None
    spread = max(lo.std(), hi.std(), 1e-12)
    if hi.mean() - lo.mean() < 3.0 * spread or lo.mean() > 0.25 * hi.mean():
        return None
    # put the cut where the vacuum class ends rather than mid-gap: a weakly scattering crystal
    # position is better kept (and maybe left unfitted) than called vacuum
    return float(min(t_best, lo.max() + 0.25 * (hi.min() - lo.max())))


def subtract_local_background(probe: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    """Remove the diffuse background around a vacuum beam: the median of the annulus
    ``1.5 r .. 2.5 r``, a constant under the disk, is subtracted (and the result clipped at 0),
    so the template is the beam and not the halo of the background it sits on."""
    qx, qy = probe.shape
    xx, yy = np.meshgrid(np.arange(qx), np.arange(qy), indexing="ij")
    r = np.hypot(xx - centre[0], yy - centre[1])
    ring = (r > 1.5 * radius) & (r < 2.5 * radius)
    bg = float(np.median(probe[ring])) if ring.any() else 0.0
    return np.clip(probe - bg, 0.0, None)


def aligned_mean(patterns: np.ndarray, centres: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Mean of patterns each shifted (Fourier, sub-pixel) so its direct beam sits at
    ``target``: descan would otherwise smear the average."""
    n, qx, qy = patterns.shape
    kx = np.fft.fftfreq(qx)[:, None]
    ky = np.fft.fftfreq(qy)[None, :]
    acc = np.zeros((qx, qy), np.complex128)
    for i in range(n):
        dx, dy = target - centres[i]
        acc += np.fft.fft2(patterns[i]) * np.exp(-2j * np.pi * (kx * dx + ky * dy))
    return np.clip(np.real(np.fft.ifft2(acc)) / max(n, 1), 0.0, None)


def edge_width(probe: np.ndarray, centre: tuple[float, float]) -> float:
    """10-90 % radial width of the direct-beam edge (px), at least 1 px.

    Used to give a synthetic disk template the same softness as the measured beam."""
    qx, qy = probe.shape
    xx, yy = np.meshgrid(np.arange(qx), np.arange(qy), indexing="ij")
    r = np.hypot(xx - centre[0], yy - centre[1])
    top = float(np.max(probe))
    if top <= 0:
        return 1.0
    r90 = np.sqrt(np.sum(probe > 0.9 * top) / np.pi)
    r10 = np.sqrt(np.sum((probe > 0.1 * top) & (r < 3 * max(r90, 1.0))) / np.pi)
    return float(max(1.0, r10 - r90))
