"""Per-position uncertainty: from a method's covariance of ``A`` to error bars on the strain
maps, and the statistics that say whether those error bars are honest.

Why linear propagation: the precision of one position is a few 1e-4 in strain, so the map
``A -> (exx, eyy, exy, theta)`` is linear to a part in 1e4 over the error's range; the
Jacobian is taken by central differences through :func:`napari_stem_strain.strain.A_to_strain`
itself, so the error bars can never describe different maths from the values they belong to.

Both methods deliver the covariance of their *raw* affine ``A_raw`` (row-major flattened,
``(..., 4, 4)``) from a weighted least-squares fit of disk positions, scaled by that fit's own
reduced chi-square and widened by the Student-t factor of that estimated scale (the
CC-ST-AE's ``refine.affine_covariance``, py4DSTEM's ``lattice_covariance``;
:func:`student_t_variance_factor`): the weights only need to be right *relative* to each
other, and model error that scatters disks off the affine lattice (a wrong template, a
background the model lacks) widens the error bar instead of hiding. The maps are
relative to the reference region, ``A = A_raw A_ref^-1``, so the reference's own uncertainty
enters every position (:func:`reference_covariance`).

Everything is numpy, batched over leading axes, NaN-transparent.
"""

from __future__ import annotations

import numpy as np

from .strain import A_to_strain, check_region, wrap_angle

__all__ = [
    "COMPONENTS",
    "student_t_variance_factor",
    "basis_to_affine_covariance",
    "reference_covariance",
    "normalised_covariance",
    "strain_jacobian",
    "strain_sigma",
    "interior_mask",
    "calibration",
]

COMPONENTS = ("exx", "eyy", "exy", "theta")

#: Relative central-difference step of the Jacobian (entries of ``A`` are ~1: 1e-6 leaves a
#: truncation error ~1e-12 and a round-off error ~1e-10 in float64).
FD_STEP = 1e-6

#: Largest distance (Frobenius) of a reference position's raw ``A`` from the region's median
#: for its scatter to count: strain and rotation in a reference region move ``A`` by ~1e-2 at
#: most, a symmetry-equivalent registration by ~1.
BRANCH_TOL = 0.05

#: A median of N samples of a normal distribution has the variance of a mean of 2N/pi.
MEDIAN_EFFICIENCY = np.pi / 2


def student_t_variance_factor(dof: np.ndarray) -> np.ndarray:
    """``dof / (dof - 2)``: the variance of a Student-t variable of ``dof`` degrees of freedom,
    by which a residual-scaled error bar is widened (capped at 3 below 3 degrees of freedom).

    Why: when the noise scale is estimated from the fit's own ``dof`` residuals, ``(estimate -
    truth) / sigma`` is Student-t, not normal - its standard deviation is 1.22 with 6 disks
    (``dof = 6``), 1.12 with 8. An error bar that is to hold one standard deviation, and a
    +-2 sigma interval that is to hold ~95 % of positions, carry the factor; with many disks it
    is ~1 (1.03 at 21 disks). Both methods' covariances use it."""
    d = np.asarray(dof, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d >= 3, d / np.maximum(d - 2.0, 1.0), 3.0)


def basis_to_affine_covariance(cov_g: np.ndarray, binv: np.ndarray) -> np.ndarray:
    """Covariance of ``A = G B^-1`` (row-major flattened) from that of the columns of
    ``G = [g1 g2]``, when the x and y components of ``g1, g2`` are independent with the same
    ``(2, 2)`` covariance ``cov_g`` (a lattice fit with equal weights on both axes).

    ``A_ij = sum_m G_im Binv_mj``, so ``cov(A_ij, A_kl) = delta_ik (Binv^T cov_g Binv)_jl``.
    """
    binv = np.asarray(binv, np.float64)
    C = np.swapaxes(binv, -1, -2) @ np.asarray(cov_g, np.float64) @ binv
    out = np.zeros((*C.shape[:-2], 4, 4))
    out[..., :2, :2] = C
    out[..., 2:, 2:] = C
    return out


def reference_covariance(A_raw: np.ndarray, A_cov: np.ndarray,
                         region: tuple[slice, slice] | str,
                         mask: np.ndarray | None = None) -> np.ndarray:
    """Covariance ``(4, 4)`` of the reference ``A_ref`` (the median reference over the region,
    :func:`~napari_stem_strain.strain.reference_A`).

    A median of ``N`` noisy values varies like a mean of ``2N/pi``. The spread used is the
    *empirical* covariance of ``A_raw`` in the region (honest when the per-position error bars
    are off, and it includes any real strain variation there, which also moves the median) but
    never less than the mean per-position covariance (a region of few positions has a noisy
    empirical scatter). Positions with NaN ``A`` or outside ``mask`` are ignored.
    """
    rs, cs = check_region(region, np.shape(A_raw)[:2])
    a = np.asarray(A_raw, np.float64)[rs, cs].reshape(-1, 4)
    c = np.asarray(A_cov, np.float64)[rs, cs].reshape(-1, 4, 4)
    ok = np.isfinite(a).all(1) & np.isfinite(c).all((1, 2))
    if mask is not None:
        ok &= np.asarray(mask, bool)[rs, cs].reshape(-1)
    if ok.any():
        # positions registered on another symmetry branch (a hexagonal lattice as R(+30) or
        # R(-30 deg)) describe the same lattice, but their raw entries differ by ~1 and would
        # swamp the region's scatter (abTEM WS2: every error bar 20-50x too wide)
        med = np.median(a[ok], axis=0)
        ok &= np.linalg.norm(np.nan_to_num(a - med, nan=np.inf), axis=1) < BRANCH_TOL
    n = int(ok.sum())
    if n == 0:
        return np.full((4, 4), np.nan)
    model = c[ok].mean(0)
    emp = np.cov(a[ok].T) if n >= 5 else model
    # elementwise maximum of the variances, correlations from the empirical estimate
    var = np.maximum(np.diag(emp), np.diag(model))
    d_emp = np.sqrt(np.clip(np.diag(emp), 1e-300, None))
    corr = emp / np.outer(d_emp, d_emp)
    cov = corr * np.sqrt(np.outer(var, var))
    return MEDIAN_EFFICIENCY * cov / n


def _vec_kron(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Batched Kronecker product of ``(..., 2, 2)`` matrices: ``(..., 4, 4)``."""
    return (A[..., :, None, :, None] * B[..., None, :, None, :]).reshape(
        *np.broadcast_shapes(A.shape[:-2], B.shape[:-2]), 4, 4)


def normalised_covariance(A: np.ndarray, A_cov: np.ndarray, A_ref: np.ndarray,
                          ref_cov: np.ndarray | None = None) -> np.ndarray:
    """Covariance of the reference-normalised ``A = A_raw A_ref^-1`` (row-major flattened).

    ``dA = dA_raw R - A dA_ref R`` with ``R = A_ref^-1``; in row-major vectorisation
    ``vec(X B) = (I kron B^T) vec(X)`` and ``vec(A X R) = (A kron R^T) vec(X)``. The two
    terms are independent (one position barely moves the median of many).
    """
    R = np.linalg.inv(np.asarray(A_ref, np.float64))
    Kraw = _vec_kron(np.eye(2), R.T)
    cov = Kraw @ np.asarray(A_cov, np.float64) @ Kraw.T
    if ref_cov is not None:
        Kref = _vec_kron(np.asarray(A, np.float64), np.broadcast_to(R.T, np.shape(A)))
        cov = cov + Kref @ np.asarray(ref_cov, np.float64) @ np.swapaxes(Kref, -1, -2)
    return cov


def strain_jacobian(A: np.ndarray, symmetry_deg: float = 360.0,
                    step: float = FD_STEP) -> np.ndarray:
    """``d(exx, eyy, exy, theta) / d vec(A)``: ``(..., 4, 4)`` by central differences through
    :func:`~napari_stem_strain.strain.A_to_strain` (theta differences wrapped into the period,
    so a value at the wrap boundary does not jump)."""
    A = np.asarray(A, np.float64)
    J = np.empty((*A.shape[:-2], 4, 4))
    for k in range(4):
        dA = np.zeros((2, 2))
        dA.flat[k] = step
        plus = A_to_strain(A + dA, symmetry_deg)
        minus = A_to_strain(A - dA, symmetry_deg)
        for c in range(4):
            diff = plus[c] - minus[c]
            if c == 3:
                diff = wrap_angle(diff, symmetry_deg)
            J[..., c, k] = diff / (2 * step)
    return J


def strain_sigma(A: np.ndarray, A_cov: np.ndarray, A_ref: np.ndarray,
                 ref_cov: np.ndarray | None = None,
                 symmetry_deg: float = 360.0) -> dict[str, np.ndarray]:
    """One standard deviation of ``exx, eyy, exy`` (fractions) and ``theta`` (degrees) per
    position, by linear propagation of the raw ``A_cov`` and the reference's ``ref_cov``
    through ``A = A_raw A_ref^-1`` and the polar decomposition.

    ``A`` is the *normalised* affine (what the maps come from). NaN wherever ``A`` or
    ``A_cov`` holds a NaN.
    """
    A = np.asarray(A, np.float64)
    cov = normalised_covariance(A, A_cov, A_ref, ref_cov)
    J = strain_jacobian(A, symmetry_deg)
    var = np.einsum("...ck,...kl,...cl->...c", J, cov, J)
    with np.errstate(invalid="ignore"):
        sig = np.sqrt(np.where(var >= 0, var, np.nan))
    bad = ~(np.isfinite(A).all((-1, -2)) & np.isfinite(cov).all((-1, -2)))
    sig[bad] = np.nan
    return {c: sig[..., i] for i, c in enumerate(COMPONENTS)}


def interior_mask(grains: np.ndarray | None, sample: np.ndarray, radius: int = 1
                  ) -> np.ndarray:
    """Sample positions *within single grains*: their ``(2 radius + 1)^2`` neighbourhood
    (clipped at the scan edge) is all sample and all one grain. Boundaries are excluded from
    calibration statistics because there a position mixes two lattices, which no per-position
    error model of one lattice describes. Without grain labels: the sample interior."""
    sample = np.asarray(sample, bool)
    lab = np.zeros(sample.shape, np.int64) if grains is None else np.asarray(grains, np.int64)
    lab = np.where(sample, lab, -(2**40))
    Rx, Ry = sample.shape
    pad = np.pad(lab, radius, mode="edge")
    ok = sample.copy()
    for di in range(-radius, radius + 1):
        for dj in range(-radius, radius + 1):
            ok &= pad[radius + di:radius + di + Rx, radius + dj:radius + dj + Ry] == lab
    return ok


def calibration(est: np.ndarray, sigma: np.ndarray, truth: np.ndarray, where: np.ndarray,
                period_deg: float | None = None) -> dict[str, float]:
    """How well error bars describe the actual errors over the positions ``where``.

    Returns ``std_z`` (standard deviation of ``(est - truth) / sigma``; 1 for honest error
    bars), ``mean_z`` (its mean: bias in units of sigma), ``cover2`` (fraction with
    ``|est - truth| <= 2 sigma``; 0.954 for a normal error), ``n`` (positions with a finite
    estimate and sigma; a NaN estimate has no error bar to judge) and ``n_missing`` (positions
    of ``where`` that had none). With ``period_deg`` the difference is wrapped first.
    """
    err = np.asarray(est, np.float64) - np.asarray(truth, np.float64)
    if period_deg is not None:
        err = wrap_angle(err, period_deg)
    sig = np.asarray(sigma, np.float64)
    where = np.asarray(where, bool)
    ok = where & np.isfinite(err) & np.isfinite(sig) & (sig > 0)
    n = int(ok.sum())
    if n < 2:
        return {"std_z": float("nan"), "mean_z": float("nan"), "cover2": float("nan"),
                "n": n, "n_missing": int(where.sum()) - n}
    z = err[ok] / sig[ok]
    return {"std_z": float(z.std(ddof=1)), "mean_z": float(z.mean()),
            "cover2": float(np.mean(np.abs(z) <= 2.0)), "n": n,
            "n_missing": int(where.sum()) - n}
