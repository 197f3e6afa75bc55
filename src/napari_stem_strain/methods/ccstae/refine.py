"""Per-pattern refinement of the encoder's transform against the base lattice.

The encoder is fast but coarse (a 32x32 view). Precision comes from a few batched
Gauss-Newton steps on the *raw* (square-rooted) pattern, starting from the encoder's guess:

* **Per-disk, intensity-free matching.** Around each predicted disk position the pattern is
  sampled on a small patch and fitted as ``a T(o - d) + b + ramp . o`` (``T`` = the data's own
  mean direct beam profile, ``a`` a free per-disk gain, ``b`` and ``ramp`` a free local
  background and its slope). Linearised in ``d`` this is one fixed 6-column least-squares
  problem, so its pseudo-inverse is computed once and
  every disk of every pattern costs one small matrix product. Free gain and offset per disk is
  what makes this cope with dynamical scattering (intensities changing from position to
  position), first-order disks holding <1 % of the beam and diffuse background - no threshold
  or template relative to the direct beam's intensity anywhere.
* **Global affine update.** The disk shifts are combined by weighted least squares
  (weight ``a^2``: the position variance of a disk under uniform sqrt-Poisson noise scales as
  ``1/a^2``) into an update of ``A`` and of the beam position ``t`` (the undiffracted disk at
  ``p = 0`` is one of the disks, so descan is measured by the same fit).
* **Angular polish.** Before the Gauss-Newton steps, the rotation is polished over a few
  degrees around the encoder's guess by the summed disk intensity, widening the capture range.

The base lattice points are ideal lattice points ``h g1 + k g2`` (not peak positions read off a
blurry base image): any fixed error of the base then cancels exactly in ``A_raw A_ref^-1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .preprocess import sample_points

#: Interpolation of the patches the refinement fits (see :func:`.preprocess.sample_points`).
PATCH_MODE = "bilinear"


def sqrt_samples(pats: torch.Tensor, pos: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Square root of samples of the raw pattern: only the sampled points are square-rooted
    (cheaper than the whole detector; the template is built the same way)."""
    return torch.sqrt(torch.clamp(sample_points(pats, pos, mode), min=0))

__all__ = ["DiskTemplate", "make_template", "lattice_points", "refine", "angular_search",
           "fit_lattice"]


@dataclass
class DiskTemplate:
    """Patch offsets ``(P, 2)`` pixels and the design matrix (8 columns, see
    :func:`make_template`) with its pseudo-inverse; the shift is the last two coefficients."""

    offsets: torch.Tensor
    pinv: torch.Tensor
    design: torch.Tensor
    radius: float

    def to(self, device: str | torch.device) -> DiskTemplate:
        return DiskTemplate(self.offsets.to(device), self.pinv.to(device),
                            self.design.to(device), self.radius)


def make_template(pats: torch.Tensor, centres: torch.Tensor, r: float) -> DiskTemplate:
    """Mean square-rooted direct-beam profile of raw patterns ``(B,Qx,Qy)`` around ``centres``.

    Sampling at each pattern's own (sub-pixel) centre averages over pixel phases, so the
    template already contains the blur that bilinear sampling adds during matching.
    """
    h = int(np.ceil(r)) + 2
    ii, jj = np.mgrid[-h:h + 1, -h:h + 1]
    keep = ii ** 2 + jj ** 2 <= (h + 0.5) ** 2
    off = torch.tensor(np.stack([ii[keep], jj[keep]], 1), dtype=torch.float32,
                       device=pats.device)

    def mean_at(shift: tuple[float, float]) -> torch.Tensor:
        pos = centres[:, None, :] + off[None] + torch.tensor(shift, device=off.device)
        return sqrt_samples(pats, pos, PATCH_MODE).mean(0)

    T = mean_at((0.0, 0.0))
    Tr = mean_at((0.5, 0.0)) - mean_at((-0.5, 0.0))
    Tc = mean_at((0.0, 0.5)) - mean_at((0.0, -0.5))
    scale = float(T.max() - T.min())
    if not scale > 0:
        raise ValueError("the direct beam is flat: cannot build a disk template")
    # columns: gain, offset, background ramp (2), gain ramp inside the disk (2), shift (2).
    # Ramps are odd functions like the edge gradients; left out, a sloping diffuse background
    # or an intensity gradient across a disk would read as a shift.
    o = off / h
    Tn = T / scale
    D = torch.stack([Tn, torch.ones_like(T), o[:, 0], o[:, 1], -Tr / scale, -Tc / scale], 1)
    pinv = torch.linalg.pinv(D.double()).float()
    return DiskTemplate(off, pinv, D, float(r))


def lattice_points(g1: np.ndarray, g2: np.ndarray, pmax: float) -> np.ndarray:
    """All lattice points ``h g1 + k g2`` with ``|p| <= pmax``, the origin first: ``(K, 2)``."""
    g1, g2 = np.asarray(g1, float), np.asarray(g2, float)
    n = int(np.ceil(pmax / max(1e-6, min(np.linalg.norm(g1), np.linalg.norm(g2))) * 2)) + 1
    pts = [(0.0, 0.0)]
    for h in range(-n, n + 1):
        for k in range(-n, n + 1):
            if h == 0 and k == 0:
                continue
            p = h * g1 + k * g2
            if np.linalg.norm(p) <= pmax:
                pts.append((float(p[0]), float(p[1])))
    return np.asarray(pts, np.float32)


def _rot(theta: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def angular_search(
    pats: torch.Tensor, t: torch.Tensor, A0: torch.Tensor, P: torch.Tensor, L: float,
    span_deg: float, step_deg: float, r: float,
) -> torch.Tensor:
    """Rotate ``A0`` (B,2,2) by the angle in ``[-span, span]`` that maximises the summed
    pattern intensity at the predicted disk centres (five points per disk, so a disk is hit
    even when off by up to about its radius); parabolic sub-step. Returns the new ``A``."""
    dth = torch.arange(-span_deg, span_deg + 1e-6, step_deg, device=A0.device) * (np.pi / 180)
    J = len(dth)
    Rj = _rot(dth)  # (J,2,2)
    Pq = P[1:]  # without the direct beam
    cross = torch.tensor([[0, 0], [0.5, 0], [-0.5, 0], [0, 0.5], [0, -0.5]], dtype=P.dtype,
                         device=P.device) * r
    B = A0.shape[0]
    A = Rj[None] @ A0[:, None]  # (B,J,2,2)
    pos = t[:, None, None, :] + L * torch.einsum("bjxy,ky->bjkx", A, Pq)  # (B,J,K,2)
    pos = pos[:, :, :, None, :] + cross  # (B,J,K,5,2)
    s = sqrt_samples(pats, pos.reshape(B, -1, 2)).reshape(B, J, -1).sum(-1)
    best = torch.argmax(s, 1)
    ib = best.clamp(1, J - 2)
    sm, s0, sp = (s.gather(1, (ib + k)[:, None])[:, 0] for k in (-1, 0, 1))
    den = sm - 2 * s0 + sp
    off = torch.where(den < 0, 0.5 * (sm - sp) / den.clamp(max=-1e-12), torch.zeros_like(den))
    off = torch.where(best == ib, off.clamp(-1, 1), torch.zeros_like(off))
    ang = dth[ib] + off * (step_deg * np.pi / 180)
    return _rot(ang) @ A0


def refine(
    pats: torch.Tensor, t: torch.Tensor, A: torch.Tensor, P: torch.Tensor, L: float,
    tpl: DiskTemplate, steps: int = 4, min_snr: float = 4.0, count_snr: float = 10.0,
    disk_weights: torch.Tensor | None = None, extra: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gauss-Newton refinement of ``A`` (B,2,2, lattice units) and beam position ``t`` (B,2 px).

    Returns ``(A, t, n_disks, rms)``: ``n_disks`` counts the diffracted disks (beam excluded)
    that were clearly significant (``count_snr``) in the last step; ``rms`` (px) is the
    weighted scatter of the disk shifts around the affine fit - large when the data's lattice
    is not the base's.
    """
    B = A.shape[0]
    Q0, Q1 = pats.shape[-2:]
    K, npix = P.shape[0], tpl.offsets.shape[0]
    h = float(tpl.offsets.abs().max())
    X = torch.cat([P, torch.ones(K, 1, dtype=P.dtype, device=P.device)], 1)  # (K,3)
    G = (tpl.design.T.double() @ tpl.design.double())
    G32 = G.float()
    # variance of the gain estimate per unit noise: for the significance test
    g00 = torch.linalg.inv(G)[0, 0].float()
    n_ok = torch.zeros(B, dtype=torch.long, device=A.device)
    for _ in range(max(1, steps)):
        pos = t[:, None, :] + L * torch.einsum("bxy,ky->bkx", A, P)  # (B,K,2)
        pts = (pos[:, :, None, :] + tpl.offsets).reshape(B, K * npix, 2)
        patch = sqrt_samples(pats, pts, PATCH_MODE).reshape(B, K, npix)
        coef = patch @ tpl.pinv.T  # (B,K,8)
        # residual power without forming the residual: |p|^2 - c^T (D^T D) c
        fitted = torch.einsum("bki,ij,bkj->bk", coef, G32, coef)
        sigma2 = ((patch * patch).sum(-1) - fitted).clamp(min=0) / max(1, npix - G.shape[0])
        a = coef[..., 0]
        inside = ((pos[..., 0] > h) & (pos[..., 0] < Q0 - 1 - h)
                  & (pos[..., 1] > h) & (pos[..., 1] < Q1 - 1 - h))
        # noise floor: 1e-4 of the beam's amplitude (1e-8 of its intensity in sqrt units), so
        # that exactly-zero noise-free vacuum never looks like a significant disk
        floor = (1e-4 * a[:, :1].abs()) ** 2 + 1e-30
        snr = a / torch.sqrt(sigma2 * g00 + floor)
        ok = inside & (snr > min_snr)
        a_safe = torch.where(ok, a, torch.ones_like(a))
        d = (coef[..., -2:] / a_safe[..., None]).clamp(-h / 2, h / 2)
        if disk_weights is None:
            w = torch.where(ok, a ** 2, torch.zeros_like(a))  # (B,K)
        else:
            # fixed per-disk weights: per-disk biases (e.g. an intensity gradient inside a disk)
            # then combine the same way at every position and cancel against the reference,
            # instead of wandering with the position-dependent intensities
            w = torch.where(ok, disk_weights[None].expand_as(a), torch.zeros_like(a))
            w[:, 0] = torch.where(ok[:, 0], a[:, 0] ** 2, torch.zeros_like(a[:, 0]))
        # weak disks (> min_snr) still help the fit; only clear ones (> count_snr) count as
        # evidence of a lattice: smooth diffuse background alone can fake a few weak "disks"
        n_ok = (ok & (snr > count_snr))[:, 1:].sum(1)
        # weighted least squares for the update [dA | dt] from shifts d = dA p + dt
        Xw = X[None] * w[..., None]  # (B,K,3)
        M = Xw.transpose(1, 2) @ X[None]  # (B,3,3)
        rhs = Xw.transpose(1, 2) @ d  # (B,3,2)
        tr = M.diagonal(dim1=1, dim2=2).sum(-1)
        ridge = (1e-6 * tr + 1e-12)[:, None, None] * torch.eye(3, device=A.device)
        sol = torch.linalg.solve(M.double() + ridge.double(), rhs.double()).float()
        A = A + sol[:, :2, :].transpose(1, 2) / L
        t = t + sol[:, 2, :]
        # weighted rms (px) of what the affine update leaves unexplained
        res = d - X[None] @ sol
        rms = torch.sqrt((w * (res ** 2).sum(-1)).sum(1) / w.sum(1).clamp_min(1e-30))
        if extra is not None:
            extra["gain"] = a
    return A, t, n_ok, rms


def fit_lattice(points: np.ndarray, weights: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Reduced lattice basis ``(g1, g2)`` from peak positions ``(K, 2)`` (origin excluded).

    ``g1`` = the shortest vector, ``g2`` = the shortest one not parallel to it, then both
    refined by least squares over every peak indexed to its nearest lattice point.
    """
    pts = np.asarray(points, float)
    pts = pts[np.linalg.norm(pts, axis=1) > 1e-6]
    if len(pts) < 2:
        raise ValueError("fewer than two Bragg disks found: cannot determine the lattice")
    nrm = np.linalg.norm(pts, axis=1)
    order = np.argsort(nrm)
    g1 = pts[order[0]]
    g2 = None
    for i in order[1:]:
        v = pts[i]
        cosang = abs(v @ g1) / (np.linalg.norm(v) * np.linalg.norm(g1))
        if cosang < np.cos(np.deg2rad(25)):
            g2 = v
            break
    if g2 is None:
        raise ValueError("the Bragg disks are collinear: cannot determine a 2D lattice")
    g1, g2 = _reduce(g1, g2)
    w = np.ones(len(pts)) if weights is None else np.asarray(weights, float)
    for _ in range(2):
        G = np.stack([g1, g2], 1)
        hk = np.rint(np.linalg.solve(G, pts.T).T)
        good = np.linalg.norm(pts - hk @ G.T, axis=1) < 0.25 * np.linalg.norm(g1)
        good &= np.abs(hk).sum(1) > 0
        if good.sum() < 2:
            break
        sw = np.sqrt(w[good])[:, None]
        sol, *_ = np.linalg.lstsq(hk[good] * sw, pts[good] * sw, rcond=None)
        g1, g2 = _reduce(sol[0], sol[1])
    return np.asarray(g1), np.asarray(g2)


def _reduce(g1: np.ndarray, g2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lagrange-Gauss reduction: the shortest basis of the same lattice, acute angle (so a
    square lattice found as ``(1,0), (1,1)`` becomes ``(1,0), (0,1)`` and is seen as square)."""
    g1, g2 = np.asarray(g1, float), np.asarray(g2, float)
    for _ in range(32):
        if g2 @ g2 < g1 @ g1:
            g1, g2 = g2, g1
        m = np.rint((g1 @ g2) / (g1 @ g1))
        if m == 0:
            break
        g2 = g2 - m * g1
    if g1 @ g2 < 0:
        g2 = -g2
    return g1, g2
