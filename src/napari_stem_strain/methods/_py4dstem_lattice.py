"""Lattice indexing and fitting for the py4DSTEM baseline (pure numpy, no py4DSTEM inside).

py4DSTEM finds the Bragg disks; this module turns a list of disk positions into the lattice
vectors ``g1, g2`` of one pattern, the way an expert would with the basis in hand:

1. :func:`find_basis` picks, from a set of detected disks, the pair of disk vectors that indexes
   the most disks (ties: the smallest cell), then reduces it to the shortest (Lagrange-Gauss)
   basis - robust to a stray false peak, which a "take the two shortest vectors" rule is not.
2. :func:`index_pattern` rotates the reference basis over one symmetry period (centred on the
   basis, so that every grain within half a period of it is fitted on one symmetry branch)
   to find the rotation that indexes the most disks (grains may be rotated by any angle),
   then alternates re-indexing and a weighted least-squares fit of ``origin + h g1 + k g2``
   over all indexed disks. Fitting the origin jointly with the lattice (as py4DSTEM's
   ``fit_lattice_vectors`` does) makes each position immune to descan without a separate
   origin calibration, and Friedel pairs cancel any error of the direct-beam position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..uncertainty import student_t_variance_factor

__all__ = [
    "LatticeFit",
    "IndexResult",
    "find_basis",
    "fit_lattice",
    "index_pattern",
    "lattice_covariance",
    "reduce_basis",
]


@dataclass
class LatticeFit:
    """The lattice of one pattern: ``peak = origin + h g1 + k g2`` (detector px, (x, y))."""

    g1: np.ndarray
    g2: np.ndarray
    origin: np.ndarray
    n_indexed: int
    rms: float
    #: (2, 2) covariance of ``g1, g2`` (the same for their x and y components, which are
    #: independent), see :func:`lattice_covariance`; None until computed
    cov_g: np.ndarray | None = None

    @property
    def G(self) -> np.ndarray:
        """``[g1 g2]`` as columns."""
        return np.stack([self.g1, self.g2], axis=1)


@dataclass
class IndexResult:
    """Outcome of indexing one pattern.

    ``fit`` is ``None`` when the pattern could not be fitted. ``signal`` is the correlation
    intensity of the disks on the best-rotated lattice relative to the direct beam: near zero in
    vacuum (only noise maxima, which rarely sit on lattice sites), clearly positive in crystal,
    whatever the diffuse background - the feature that tells vacuum from crystal."""

    fit: LatticeFit | None
    signal: float


def reduce_basis(g1: np.ndarray, g2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lagrange-Gauss reduction: the shortest basis of the same lattice, counter-clockwise
    (``g1 x g2 > 0``), so every method run on the same crystal picks the same cell shape."""
    a, b = np.asarray(g1, float).copy(), np.asarray(g2, float).copy()
    for _ in range(100):
        if a @ a > b @ b:
            a, b = b, a
        mu = np.round((a @ b) / (a @ a))
        if mu == 0:
            break
        b = b - mu * a
    if a[0] * b[1] - a[1] * b[0] < 0:
        b = -b
    return a, b


def _rotation(phi_rad: np.ndarray) -> np.ndarray:
    c, s = np.cos(phi_rad), np.sin(phi_rad)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def fit_lattice(
    peaks: np.ndarray, hk: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least squares of ``peaks = origin + h g1 + k g2``; returns ``(g1, g2, origin)``."""
    M = np.column_stack([np.ones(len(hk)), hk[:, 0], hk[:, 1]])
    sw = np.sqrt(weights)[:, None]
    coef, *_ = np.linalg.lstsq(M * sw, peaks * sw, rcond=None)
    return coef[1], coef[2], coef[0]


def lattice_covariance(peaks: np.ndarray, hk: np.ndarray, weights: np.ndarray,
                       fit: LatticeFit) -> np.ndarray:
    """Covariance ``(2, 2)`` of ``(g1, g2)`` from the weighted fit :func:`fit_lattice` made.

    Each axis of ``peaks = origin + h g1 + k g2`` is a linear least-squares problem with design
    ``[1, h, k]`` and the same weights, so both share ``(M^T W M)^-1``; its ``g`` block scaled
    by the reduced chi-square of the residuals (``2n`` coordinates, 6 parameters) is the
    covariance (times :func:`..uncertainty.student_t_variance_factor`: the scale is estimated
    from those residuals). Why residual-based: the weights (disk intensities) only say how
    disks compare, not how many pixels of scatter one has; the residuals do, and they include
    model error (a peak finder's sub-pixel bias, a disk cut by the detector edge) the
    intensities never show.
    NaN with fewer than 4 peaks (no degree of freedom left).
    """
    hk = np.asarray(hk, float)
    w = np.asarray(weights, float)
    M = np.column_stack([np.ones(len(hk)), hk[:, 0], hk[:, 1]])
    res = np.asarray(peaks, float) - fit.origin - hk @ fit.G.T
    dof = 2 * len(hk) - 6
    if dof <= 0:
        return np.full((2, 2), np.nan)
    s2 = float(np.sum(w[:, None] * res ** 2)) / dof * float(student_t_variance_factor(dof))
    try:
        Minv = np.linalg.inv((M * w[:, None]).T @ M)
    except np.linalg.LinAlgError:
        return np.full((2, 2), np.nan)
    return s2 * Minv[1:, 1:]


def _assign(
    d: np.ndarray, G: np.ndarray, tol: float, intensity: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest lattice site of each vector ``d`` under basis ``G``; keep one disk per site (the
    strongest) and only disks within ``tol`` px of their site. Returns ``(hk, keep)``."""
    hk = np.round(np.linalg.solve(G, d.T).T)
    resid = np.linalg.norm(d - hk @ G.T, axis=1)
    keep = resid < tol
    if keep.any():
        # one disk per lattice site: the strongest wins (a noise maximum next to a disk must not
        # pull the fit)
        order = np.argsort(-intensity)
        seen: set[tuple[int, int]] = set()
        for i in order:
            if not keep[i]:
                continue
            key = (int(hk[i, 0]), int(hk[i, 1]))
            if key in seen:
                keep[i] = False
            else:
                seen.add(key)
    return hk, keep


def find_basis(
    vectors: np.ndarray, intensity: np.ndarray, tol: float, n_candidates: int = 12
) -> tuple[np.ndarray, np.ndarray, int]:
    """The reduced basis ``(g1, g2)`` that indexes the most of ``vectors`` (relative to the
    direct beam, which must not be among them) and how many it indexes.

    Candidates are pairs among the ``n_candidates`` strongest vectors; every pair of lattice
    vectors spanning a cell larger than the true one indexes fewer disks, so the winner is the
    primitive cell. Raises ``ValueError`` when fewer than two non-collinear disks exist.
    """
    v = np.asarray(vectors, float)
    inten = np.asarray(intensity, float)
    if len(v) < 2:
        raise ValueError("fewer than two Bragg disks found: cannot determine the lattice")
    order = np.argsort(-inten)[:n_candidates]
    cand = v[order]
    best: tuple[int, float, float, np.ndarray, np.ndarray] | None = None
    for i in range(len(cand)):
        for j in range(i + 1, len(cand)):
            a, b = cand[i], cand[j]
            area = abs(a[0] * b[1] - a[1] * b[0])
            if area < 0.2 * np.linalg.norm(a) * np.linalg.norm(b):  # nearly collinear
                continue
            G = np.stack([a, b], axis=1)
            d = np.vstack([v, -v])  # Friedel mates count too (one may lie off the detector)
            _, keep = _assign(d, G, tol, np.concatenate([inten, inten]))
            n = int(keep.sum())
            score = (n, -area, -(a @ a + b @ b))
            if best is None or score > best[:3]:
                best = (*score, a, b)  # type: ignore[assignment]
    if best is None:
        raise ValueError("all Bragg disks found lie on one line: cannot determine the lattice")
    g1, g2 = reduce_basis(best[3], best[4])
    # refine on every disk the basis indexes
    G = np.stack([g1, g2], axis=1)
    hk, keep = _assign(v, G, tol, inten)
    n = int(keep.sum())
    if n >= 3 and np.linalg.matrix_rank(hk[keep]) == 2:
        # the direct beam is the origin of these vectors: fit through it (origin fixed at 0)
        coef, *_ = np.linalg.lstsq(hk[keep], v[keep], rcond=None)
        g1, g2 = reduce_basis(coef[0], coef[1])
    return g1, g2, n


def _trim_outliers(
    peaks: np.ndarray, hk: np.ndarray, keep: np.ndarray, w: np.ndarray, fit: LatticeFit,
    min_peaks: int, max_drop: int = 5,
) -> tuple[LatticeFit, np.ndarray]:
    """Drop, one at a time, disks far off the fitted lattice (beyond 4 robust sigmas, at least
    0.25 px) and refit. Such a disk is real but mis-measured - typically cut by the detector
    edge - and within the indexing tolerance it would drag the whole fit by a pixel. Returns
    the fit and the disks it kept."""
    keep = keep.copy()
    for _ in range(max_drop):
        res = np.linalg.norm(peaks - fit.origin - hk @ fit.G.T, axis=1)
        idx = np.flatnonzero(keep)
        scale = 1.4826 * float(np.median(res[idx]))
        worst = idx[int(np.argmax(res[idx]))]
        if res[worst] <= max(4.0 * scale, 0.25):
            break
        trial = keep.copy()
        trial[worst] = False
        if int((trial & np.any(hk != 0, axis=1)).sum()) < min_peaks:
            break
        keep = trial
        g1, g2, origin = fit_lattice(peaks[keep], hk[keep], w[keep])
        G = np.stack([g1, g2], axis=1)
        r = peaks[keep] - origin - hk[keep] @ G.T
        fit = LatticeFit(g1, g2, origin, int((keep & np.any(hk != 0, axis=1)).sum()),
                         float(np.sqrt(np.mean(np.sum(r**2, 1)))))
    return fit, keep


def index_pattern(
    peaks: np.ndarray,
    intensity: np.ndarray,
    basis: np.ndarray,
    symmetry_deg: float,
    tol: float,
    min_peaks: int = 4,
    step_deg: float = 1.0,
    max_strain: float = 0.25,
    max_rms: float | None = None,
) -> IndexResult:
    """Index one pattern's disks (absolute detector px) against ``basis`` (columns ``b1, b2``)
    at whatever rotation fits best, and least-squares fit its lattice. ``None`` when the pattern
    cannot be fitted (too few disks indexed, or a lattice further than ``max_strain`` from the
    basis, which would be a mis-indexing rather than a strain), with the lattice signal.

    The strongest disk is taken as the direct beam (the CONVENTIONS.md origin). ``max_rms``
    (default ``0.15 tol``) bounds the fit's rms residual: real disks sit on their sites to a
    fraction of a pixel, while noise maxima that happen to index give loose fits.
    """
    max_rms = 0.15 * tol if max_rms is None else max_rms
    peaks = np.asarray(peaks, float)
    inten = np.asarray(intensity, float)
    if len(peaks) < 2:
        return IndexResult(None, 0.0)
    centre = peaks[np.argmax(inten)]
    d = peaks - centre
    is_centre = np.arange(len(d)) == np.argmax(inten)

    # 1. rotation search over one symmetry period (vectorised over angles), centred on the
    #    basis: a grain within half a period of it is fitted on the basis's own branch, so all
    #    positions of a map share one branch (test_index_pattern_keeps_the_branch_nearest_the_
    #    basis); a period starting at 0 put every grain clockwise of the basis on the next one
    phis = np.deg2rad(np.arange(-symmetry_deg / 2, symmetry_deg / 2, step_deg))
    Gs = _rotation(phis) @ basis  # (nphi, 2, 2)
    Ginv = np.linalg.inv(Gs)
    frac = np.einsum("pij,nj->pni", Ginv, d[~is_centre])
    hk = np.round(frac)
    resid = np.linalg.norm(np.einsum("pij,pnj->pni", Gs, frac - hk), axis=2)
    soft = np.clip(1.0 - resid / tol, 0.0, None)
    soft[np.all(hk == 0, axis=2)] = 0.0
    best = int(np.argmax(soft.sum(axis=1)))
    G = Gs[best]
    top = float(inten[is_centre][0])
    signal = float(np.sum(soft[best] * inten[~is_centre])) / top if top > 0 else 0.0
    if len(peaks) < min_peaks + 1:
        return IndexResult(None, signal)

    # 2. alternate indexing and least squares. Weights: the correlation intensity (a disk's
    #    position variance under shot noise falls as 1/intensity, so this is inverse-variance
    #    weighting; measured better than sqrt or uniform weights on the benchmark), capped at 4x
    #    the median disk so the direct beam does not swamp the Bragg disks.
    w_all = np.clip(inten, 0.0, None)
    w_cap = np.median(w_all[~is_centre]) * 4.0 if (~is_centre).any() else 1.0
    w_all = np.minimum(w_all, w_cap) + 1e-12
    origin = centre.copy()
    fit: LatticeFit | None = None
    prev_keep: np.ndarray | None = None
    for _ in range(6):
        hk, keep = _assign(peaks - origin, G, tol, inten)
        n_bragg = int((keep & np.any(hk != 0, axis=1)).sum())
        if n_bragg < min_peaks or np.linalg.matrix_rank(hk[keep]) < 2:
            return IndexResult(None, signal)
        g1, g2, origin = fit_lattice(peaks[keep], hk[keep], w_all[keep])
        G = np.stack([g1, g2], axis=1)
        res = peaks[keep] - origin - hk[keep] @ G.T
        fit = LatticeFit(g1, g2, origin, n_bragg, float(np.sqrt(np.mean(np.sum(res**2, 1)))))
        if prev_keep is not None and np.array_equal(keep, prev_keep):
            break
        prev_keep = keep
    if fit is not None and prev_keep is not None:
        fit, kept = _trim_outliers(peaks, hk, prev_keep, w_all, fit, min_peaks)
        fit.cov_g = lattice_covariance(peaks[kept], hk[kept], w_all[kept], fit)  # issue 13
    if fit is None or fit.rms > max_rms:
        return IndexResult(None, signal)
    # sanity: the fitted cell must stay close to the (rotated) basis cell
    A = fit.G @ np.linalg.inv(basis)
    sv = np.linalg.svd(A, compute_uv=False)
    if np.linalg.det(A) <= 0 or sv.max() > 1 + max_strain or sv.min() < 1 - max_strain:
        return IndexResult(None, signal)
    return IndexResult(fit, signal)
