"""The one strain-maths module every method, file and widget uses.

Conventions (``CONVENTIONS.md``): ``g = A g0`` maps reference Bragg vectors to measured ones,
the real-space deformation gradient is ``F = A^-T``, and the left polar decomposition
``F = V R`` gives the strain ``e = V - I`` (tensor shear) and the rotation ``theta``
(degrees, counter-clockwise from +x toward +y). Everything here is pure numpy, batched over any
leading axes, and NaN-transparent: a position whose ``A`` holds a NaN gives NaN everywhere.

Why a closed form rather than ``scipy.linalg.polar``: for 2x2 matrices the rotation angle of
the left polar decomposition is ``atan2(F10 - F01, F00 + F11)`` (the angle that makes
``F R^T`` symmetric with positive trace), which vectorises over millions of positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "StrainMaps",
    "SYMMETRY_DEG",
    "rotation_matrix",
    "strain_to_F",
    "F_to_A",
    "A_to_F",
    "strain_to_A",
    "polar_decompose",
    "A_to_strain",
    "check_region",
    "reference_A",
    "normalise_to_reference",
    "bias_and_scatter",
    "strain_maps",
    "wrap_angle",
    "mae",
    "parse_region",
    "format_region",
    "lattice_symmetry",
]

#: Rotation symmetry period of each lattice family, degrees.
SYMMETRY_DEG = {"hex": 60.0, "square": 90.0, "rect": 180.0}


@dataclass
class StrainMaps:
    """Strain and rotation maps of one method, already relative to the reference region.

    ``exx, eyy, exy`` are dimensionless fractions, ``theta`` is in degrees wrapped into
    ``(-symmetry_deg/2, symmetry_deg/2]``; ``A`` is the reference-normalised affine matrix.
    """

    exx: np.ndarray
    eyy: np.ndarray
    exy: np.ndarray
    theta: np.ndarray
    A: np.ndarray
    #: one standard deviation of each map (``"exx"`` ... ``"theta"``, same units), relative to
    #: the reference region including its own uncertainty; None when the method gave no
    #: covariance of ``A`` (see :mod:`napari_stem_strain.uncertainty`)
    sigma: dict[str, np.ndarray] | None = None

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"exx": self.exx, "eyy": self.eyy, "exy": self.exy, "theta": self.theta, "A": self.A}


def rotation_matrix(theta_deg: np.ndarray | float) -> np.ndarray:
    """``R = [[cos t, -sin t], [sin t, cos t]]`` (batched over the shape of ``theta_deg``)."""
    t = np.deg2rad(np.asarray(theta_deg, dtype=np.float64))
    c, s = np.cos(t), np.sin(t)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def strain_to_F(exx, eyy, exy, theta_deg) -> np.ndarray:
    """Deformation gradient ``F = V R`` from strain components and rotation (degrees)."""
    exx, eyy, exy, theta_deg = np.broadcast_arrays(
        *(np.asarray(v, dtype=np.float64) for v in (exx, eyy, exy, theta_deg))
    )
    V = np.stack([np.stack([1 + exx, exy], -1), np.stack([exy, 1 + eyy], -1)], -2)
    return V @ rotation_matrix(theta_deg)


def F_to_A(F: np.ndarray) -> np.ndarray:
    """Reciprocal-space affine ``A = F^-T`` (NaN in, NaN out)."""
    return _inv_transpose(F)


def A_to_F(A: np.ndarray) -> np.ndarray:
    """Real-space deformation gradient ``F = A^-T`` (NaN in, NaN out)."""
    return _inv_transpose(A)


def strain_to_A(exx, eyy, exy, theta_deg) -> np.ndarray:
    """The ``A`` a method should find for a crystal with this strain and rotation."""
    return F_to_A(strain_to_F(exx, eyy, exy, theta_deg))


def _inv_transpose(M: np.ndarray) -> np.ndarray:
    M = np.asarray(M, dtype=np.float64)
    a, b, c, d = M[..., 0, 0], M[..., 0, 1], M[..., 1, 0], M[..., 1, 1]
    det = a * d - b * c
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_t = np.stack([np.stack([d, -c], -1), np.stack([-b, a], -1)], -2) / det[..., None, None]
    inv_t[~np.isfinite(det) | (det == 0)] = np.nan
    return inv_t


def polar_decompose(F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left polar decomposition ``F = V R`` of 2x2 matrices: returns ``(V, theta_deg)``.

    Matrices with ``det F <= 0`` (a reflection, never a physical deformation) give NaN.
    """
    F = np.asarray(F, dtype=np.float64)
    t = np.arctan2(F[..., 1, 0] - F[..., 0, 1], F[..., 0, 0] + F[..., 1, 1])
    theta = np.rad2deg(t)
    V = F @ np.swapaxes(rotation_matrix(theta), -1, -2)
    V = 0.5 * (V + np.swapaxes(V, -1, -2))  # symmetric by construction; remove round-off
    det = F[..., 0, 0] * F[..., 1, 1] - F[..., 0, 1] * F[..., 1, 0]
    bad = ~(det > 0)
    theta = np.where(bad, np.nan, theta)
    V = np.where(bad[..., None, None], np.nan, V)
    return V, theta


def wrap_angle(theta_deg: np.ndarray | float, period_deg: float = 360.0) -> np.ndarray:
    """Wrap angles into ``(-period/2, period/2]`` (NaN stays NaN)."""
    t = np.asarray(theta_deg, dtype=np.float64)
    half = period_deg / 2.0
    w = np.mod(t + half, period_deg) - half  # [-half, half)
    return np.where(w == -half, half, w)


def A_to_strain(
    A: np.ndarray, symmetry_deg: float = 360.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(exx, eyy, exy, theta_deg)`` from ``A`` (already relative to the reference)."""
    V, theta = polar_decompose(A_to_F(A))
    return (
        V[..., 0, 0] - 1.0,
        V[..., 1, 1] - 1.0,
        V[..., 0, 1],
        wrap_angle(theta, symmetry_deg),
    )


def parse_region(text: str) -> tuple[slice, slice]:
    """Parse ``"r0:r1,c0:c1"`` (half-open, scan pixels) into two slices."""
    try:
        rows, cols = text.replace(" ", "").split(",")
        r0, r1 = (int(v) for v in rows.split(":"))
        c0, c1 = (int(v) for v in cols.split(":"))
    except ValueError as err:
        raise ValueError(
            f"reference region {text!r} is not of the form r0:r1,c0:c1 (e.g. 0:16,0:16)"
        ) from err
    return slice(r0, r1), slice(c0, c1)


def format_region(region: tuple[slice, slice]) -> str:
    """The inverse of :func:`parse_region`."""
    r, c = region
    return f"{r.start}:{r.stop},{c.start}:{c.stop}"


def _region_slices(region: tuple[slice, slice] | str) -> tuple[slice, slice]:
    return parse_region(region) if isinstance(region, str) else region


def check_region(
    region: tuple[slice, slice] | str, scan_shape: tuple[int, ...]
) -> tuple[slice, slice]:
    """Parse ``region`` and check it overlaps an ``(Rx, Ry)`` scan - cheap, so callers can
    refuse a wrong reference region *before* running a method. Returns the two slices.

    A region reaching past the scan edge is clipped (numpy slicing); one that is empty or lies
    wholly outside raises ``ValueError``.
    """
    rs, cs = _region_slices(region)
    Rx, Ry = int(scan_shape[0]), int(scan_shape[1])
    r0, r1, _ = rs.indices(Rx)
    c0, c1, _ = cs.indices(Ry)
    if r1 <= r0 or c1 <= c0:
        raise ValueError(
            f"reference region {format_region((rs, cs))} is empty or outside the "
            f"{Rx}x{Ry} scan"
        )
    return rs, cs


def reference_A(
    A: np.ndarray, region: tuple[slice, slice] | str, mask: np.ndarray | None = None
) -> np.ndarray:
    """Element-wise median of ``A`` over the reference region (ignoring NaN and masked-out
    positions).

    Raises ``ValueError`` with a plain message when the region is empty, lies outside the scan
    or holds no fitted (finite, sample) position - the three ways a user can get it wrong.
    """
    rs, cs = check_region(region, A.shape[:2])
    block = np.asarray(A[rs, cs], dtype=np.float64).reshape(-1, 2, 2)
    ok = np.all(np.isfinite(block), axis=(1, 2))
    if mask is not None:
        ok &= np.asarray(mask[rs, cs]).reshape(-1).astype(bool)
    if not ok.any():
        raise ValueError(
            f"reference region {format_region((rs, cs))} holds no fitted sample position "
            "(all vacuum or unfitted): move it onto the crystal"
        )
    return _median_reference(block[ok])


def _median_reference(A: np.ndarray, iterations: int = 20, tol: float = 1e-10) -> np.ndarray:
    """The reference ``A_ref`` whose normalised strain and rotation have zero median over
    the region's ``A`` ``(N, 2, 2)``.

    Why not the element-wise median of ``A``: a method's raw entries mix strain and rotation
    through its own internal basis, and where the scatter is skewed (low dose, a few poor
    fits) the median of a mix is not the mix of the medians. The reference then depends on
    the method's basis and the region's median strain is not zero (seen: -2.6e-3 in exx on a
    low-dose multislice case). Starting from the element-wise median, the reference is moved
    by the deformation that the current medians describe until they vanish (a few steps)."""
    A_ref = np.median(A, axis=0)
    for _ in range(iterations):
        exx, eyy, exy, theta = A_to_strain(A @ np.linalg.inv(A_ref))
        med = [float(np.nanmedian(x)) for x in (exx, eyy, exy, theta)]
        if not all(np.isfinite(med)):
            break
        A_ref = strain_to_A(*med) @ A_ref
        if max(abs(med[0]), abs(med[1]), abs(med[2]), abs(np.radians(med[3]))) < tol:
            break
    return A_ref


def normalise_to_reference(A_raw: np.ndarray, A_ref: np.ndarray) -> np.ndarray:
    """Express per-position ``A_raw`` relative to the reference: ``A = A_raw A_ref^-1``.

    A method's raw matrix maps its own internal basis ``b`` (a learned base pattern, a
    lattice guess) to the measured vectors, ``g = A_raw b``; the reference vectors are
    ``g0 = A_ref b``, so ``g = A_raw A_ref^-1 g0``.
    """
    return np.asarray(A_raw, dtype=np.float64) @ np.linalg.inv(np.asarray(A_ref, dtype=np.float64))


def strain_maps(
    A_raw: np.ndarray,
    region: tuple[slice, slice] | str,
    symmetry_deg: float = 360.0,
    mask: np.ndarray | None = None,
    A_cov: np.ndarray | None = None,
) -> StrainMaps:
    """Reference-normalised strain maps from a method's raw ``A`` of shape ``(Rx, Ry, 2, 2)``.

    Positions outside ``mask`` (background) become NaN in every map. With ``A_cov`` (the raw
    ``A``'s covariance, ``(Rx, Ry, 4, 4)`` row-major) the maps carry their standard deviations
    (``StrainMaps.sigma``, see :mod:`napari_stem_strain.uncertainty`).
    """
    A_raw = np.asarray(A_raw, dtype=np.float64)
    A_ref = reference_A(A_raw, region, mask)
    A = normalise_to_reference(A_raw, A_ref)
    if mask is not None:
        A[~np.asarray(mask, dtype=bool)] = np.nan
    exx, eyy, exy, theta = A_to_strain(A, symmetry_deg)
    f32 = np.float32
    sigma = None
    if A_cov is not None:
        from .uncertainty import reference_covariance, strain_sigma

        ref_cov = reference_covariance(A_raw, A_cov, region, mask)
        values = {"exx": exx, "eyy": eyy, "exy": exy, "theta": theta}
        sigma = {k: np.where(np.isfinite(values[k]), v, np.nan).astype(f32)
                 for k, v in strain_sigma(A, A_cov, A_ref, ref_cov, symmetry_deg).items()}
    return StrainMaps(exx.astype(f32), eyy.astype(f32), exy.astype(f32), theta.astype(f32),
                      A.astype(f32), sigma)


def mae(
    estimate: np.ndarray,
    truth: np.ndarray,
    sample: np.ndarray,
    period_deg: float | None = None,
) -> float:
    """Mean absolute error over sample positions, as ``CONVENTIONS.md`` defines it.

    A sample position the method left NaN counts as an error as large as the largest true
    magnitude of the component, so dropping hard positions never helps a score. With
    ``period_deg`` the difference is wrapped into the symmetry period (rotation).
    """
    sample = np.asarray(sample, dtype=bool)
    est = np.asarray(estimate, dtype=np.float64)[sample]
    tru = np.asarray(truth, dtype=np.float64)[sample]
    if tru.size == 0:
        return float("nan")
    diff = est - tru
    if period_deg is not None:
        diff = wrap_angle(diff, period_deg)
    err = np.abs(diff)
    penalty = float(np.nanmax(np.abs(tru))) if np.isfinite(tru).any() else 0.0
    err = np.where(np.isfinite(err), err, penalty)
    return float(err.mean())


def bias_and_scatter(
    estimate: np.ndarray,
    truth: np.ndarray,
    grains: np.ndarray,
    sample: np.ndarray,
    period_deg: float | None = None,
) -> tuple[float, float, float]:
    """Split a map's error into a per-grain bias and the scatter about it.

    Returns ``(mean |bias|, scatter, max |bias|)``: each grain's mean error (its bias), the
    mean of its magnitude weighted by the grain's positions, the mean absolute deviation of
    the errors about their grain's bias, and the largest bias. Only sample positions the
    method fitted count (NaN is left out here; :func:`mae` is the score that penalises it).

    Why: in a crystal of uniform grains a method's error has two kinds. Noise scatters from
    position to position and averages out over a grain; a systematic error (the contrast
    inside the Bragg disks, the reference region's own error that every value inherits) is
    the same at every position of a grain. The MAE mixes them. Only the scatter is what a
    per-position error bar can describe, and only the bias survives averaging a grain.
    ``period_deg`` wraps rotation errors into the symmetry period first.
    """
    err = np.asarray(estimate, np.float64) - np.asarray(truth, np.float64)
    if period_deg is not None:
        err = wrap_angle(err, period_deg)
    grains = np.asarray(grains)
    ok = np.asarray(sample, bool) & np.isfinite(err)
    bias_sum = scatter_sum = worst = 0.0
    for g in np.unique(grains[ok]):
        e = err[ok & (grains == g)]
        b = float(e.mean())
        bias_sum += abs(b) * e.size
        scatter_sum += float(np.abs(e - b).sum())
        worst = max(worst, abs(b))
    n = int(ok.sum())
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    return bias_sum / n, scatter_sum / n, worst


def lattice_symmetry(g1: np.ndarray, g2: np.ndarray, tol: float = 0.03) -> float:
    """Rotation symmetry period (degrees) of the 2D lattice spanned by ``g1, g2``.

    Hexagonal (equal lengths at 60/120 degrees) -> 60; square (equal, 90) -> 90; anything
    else -> 180 (every 2D lattice has two-fold symmetry).
    """
    g1 = np.asarray(g1, float)
    g2 = np.asarray(g2, float)
    n1, n2 = np.linalg.norm(g1), np.linalg.norm(g2)
    if not (n1 > 0 and n2 > 0):
        return 180.0
    equal = abs(n1 - n2) / max(n1, n2) < tol
    cosang = abs(float(g1 @ g2) / (n1 * n2))
    if equal and abs(cosang - 0.5) < tol:
        return 60.0
    if equal and cosang < tol:
        return 90.0
    return 180.0
