"""Pattern preprocessing shared by fitting, mapping and the probe inspector.

Why not the public implementation's 800x800 upsampling: precision comes from the per-pattern
refinement (:mod:`.refine`), which reads the *raw* pattern's exact pixels, so the
encoder only needs a small, coarse, *normalised* view. Every pattern is

1. centred on its own direct beam (thresholded centre of mass: robust to descan, unbiased for a
   flat disk whatever its intensity),
2. resampled on a fixed grid in *lattice units* ``u = (q - c) / L`` (``L`` = length of the
   shortest Bragg vector in detector pixels, measured once per dataset), after binning so that
   the coarse grid does not alias sharp disk edges - so the same model serves any pattern size or
   camera length,
3. square-rooted (Poisson noise becomes roughly uniform, first-order disks holding <1 % of the
   direct beam become visible), the direct beam masked out (it dominates and carries no
   orientation), and standardised per pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DataGeometry",
    "as_patterns",
    "beam_centres",
    "sample_points",
    "encoder_input",
    "unit_grid",
    "measure_geometry",
]


@dataclass
class DataGeometry:
    """What is measured once per dataset: the mean direct-beam position ``c0`` (row, col),
    the direct-beam (disk) radius ``r`` and the lattice unit ``L`` (pixels), all in detector
    pixels."""

    c0: tuple[float, float]
    r: float
    L: float
    pattern_shape: tuple[int, int]

    def as_dict(self) -> dict:
        return {"c0": list(self.c0), "r": self.r, "L": self.L,
                "pattern_shape": list(self.pattern_shape)}


def as_patterns(block: np.ndarray | torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """A block of any leading shape ``(..., Qx, Qy)`` as a float32 ``(B, Qx, Qy)`` tensor.

    Non-finite pixels are refused: a NaN would silently poison every sum they enter.
    """
    t = torch.as_tensor(np.asarray(block, dtype=np.float32) if not isinstance(block, torch.Tensor)
                        else block, dtype=torch.float32)
    t = t.reshape(-1, t.shape[-2], t.shape[-1]).to(device)
    if not bool(torch.isfinite(t).all()):
        raise ValueError("the diffraction patterns contain NaN or infinite pixels")
    return t


def beam_centres(pats: torch.Tensor, c0: tuple[float, float], r: float) -> torch.Tensor:
    """Sub-pixel direct-beam centre ``(B, 2)`` (row, col) of each pattern.

    Centre of mass of the pixels above half the window maximum, in a window around the mean
    beam position: the half-maximum threshold removes diffuse background and neighbouring weak
    disks, and for a (nearly) flat disk gives its geometric centre independent of its brightness.
    """
    Q0, Q1 = pats.shape[-2:]
    win = int(np.ceil(2.0 * r + 4))
    i0 = int(np.clip(round(c0[0]) - win, 0, Q0 - 1))
    i1 = int(np.clip(round(c0[0]) + win + 1, i0 + 1, Q0))
    j0 = int(np.clip(round(c0[1]) - win, 0, Q1 - 1))
    j1 = int(np.clip(round(c0[1]) + win + 1, j0 + 1, Q1))
    w = pats[:, i0:i1, j0:j1]
    mx = w.amax(dim=(1, 2), keepdim=True)
    mn = w.amin(dim=(1, 2), keepdim=True)
    wt = torch.clamp(w - (0.5 * (mx + mn)), min=0)
    tot = wt.sum(dim=(1, 2)).clamp_min(1e-12)
    ri = torch.arange(i0, i1, dtype=pats.dtype, device=pats.device)
    ci = torch.arange(j0, j1, dtype=pats.dtype, device=pats.device)
    cr = (wt.sum(2) * ri).sum(1) / tot
    cc = (wt.sum(1) * ci).sum(1) / tot
    return torch.stack([cr, cc], 1)


def sample_points(img: torch.Tensor, pos: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Samples of ``img`` ``(B, Qx, Qy)`` at ``pos`` ``(B, M, 2)`` (row, col pixels); zero
    outside the detector. Returns ``(B, M)``. ``mode="bicubic"`` for precision work: bilinear
    interpolation blurs by an amount that depends on the sub-pixel phase, which biases disk
    positions by a phase-dependent ~0.02 px."""
    Q0, Q1 = img.shape[-2:]
    gx = pos[..., 1] * (2.0 / (Q1 - 1)) - 1.0
    gy = pos[..., 0] * (2.0 / (Q0 - 1)) - 1.0
    grid = torch.stack([gx, gy], -1).unsqueeze(1)  # (B,1,M,2)
    out = F.grid_sample(img.unsqueeze(1), grid, mode=mode, padding_mode="zeros",
                        align_corners=True)
    return out[:, 0, 0]


def unit_grid(n: int, extent: float, device: str | torch.device = "cpu") -> torch.Tensor:
    """Pixel-centre coordinates ``(n, n, 2)`` (row, col) in lattice units of the encoder's
    ``n x n`` input covering ``[-extent, extent]^2`` - the same convention as
    ``affine_grid(align_corners=False)``, so warps in the model need no extra bookkeeping."""
    v = extent * ((2 * torch.arange(n, dtype=torch.float32, device=device) + 1) / n - 1)
    rr, cc = torch.meshgrid(v, v, indexing="ij")
    return torch.stack([rr, cc], -1)


def encoder_input(
    pats: torch.Tensor, centres: torch.Tensor, geom: DataGeometry, n: int, extent: float
) -> torch.Tensor:
    """The encoder's normalised view ``(B, 1, n, n)`` of raw patterns (see module doc)."""
    step = geom.L * 2 * extent / n  # detector pixels per encoder pixel
    b = max(1, int(np.floor(step)))
    img = F.avg_pool2d(pats.unsqueeze(1), b, b) if b > 1 else pats.unsqueeze(1)
    grid_u = unit_grid(n, extent, pats.device)  # (n,n,2)
    pos = centres[:, None, None, :] + geom.L * grid_u[None]  # raw pixels (B,n,n,2)
    pos = (pos - (b - 1) / 2.0) / b  # binned pixel coordinates
    H, W = img.shape[-2:]
    g = torch.stack([pos[..., 1] * (2.0 / max(W - 1, 1)) - 1.0,
                     pos[..., 0] * (2.0 / max(H - 1, 1)) - 1.0], -1)
    x = F.grid_sample(img, g, mode="bilinear", padding_mode="zeros", align_corners=True)
    x = torch.sqrt(torch.clamp(x, min=0))
    rad = torch.linalg.norm(grid_u, dim=-1)
    keep = (rad > (1.6 * geom.r + 1.0) / geom.L).to(x.dtype)
    x = x * keep
    m = x.mean(dim=(2, 3), keepdim=True)
    s = x.std(dim=(2, 3), keepdim=True)
    return (x - m) / (s + 1e-3 * m.abs() + 1e-6)


def measure_geometry(
    patterns: np.ndarray | torch.Tensor, rings: int = 1
) -> DataGeometry:
    """Measure the beam position, disk radius and lattice unit from a sample of patterns
    ``(B, Qx, Qy)`` (a few hundred spread over the scan).

    ``L`` is the first peak of the azimuthally averaged, beam-centred, square-rooted pattern
    beyond the direct beam, after removing the smooth trend of the diffuse background: in a
    polycrystal the first-order disks of all grains form a ring at ``|g1|``.
    """
    pats = as_patterns(patterns)
    Q0, Q1 = pats.shape[-2:]
    mean = pats.mean(0)
    k = max(3, (min(Q0, Q1) // 32) | 1)
    sm = F.avg_pool2d(mean[None, None], k, 1, k // 2)[0, 0]
    idx = int(torch.argmax(sm))
    c0 = (float(idx // Q1), float(idx % Q1))
    # disk radius from the mean beam: area above half maximum
    centres = beam_centres(pats, c0, min(Q0, Q1) / 16)
    c0 = (float(centres[:, 0].median()), float(centres[:, 1].median()))
    rho = torch.arange(0, min(Q0, Q1) / 2 - 1, 0.5)
    phi = torch.linspace(0, 2 * np.pi, 97)[:-1]
    ring = torch.stack([rho[:, None] * torch.cos(phi)[None], rho[:, None] * torch.sin(phi)[None]],
                       -1).reshape(-1, 2)
    prof = sample_points(pats, centres[:, None, :] + ring[None]).reshape(
        len(pats), len(rho), len(phi)).mean((0, 2))
    beam = prof[0]
    half = torch.nonzero(prof < 0.5 * beam)
    if len(half) == 0:
        if float(beam) > 0 and bool(torch.isfinite(beam)):
            # the profile never falls to half the beam's level: the beam covers the detector
            # (Prismatic's 8 x 8 px Si100_4D.emd in ../shared), not a missing beam
            raise ValueError(f"the direct beam fills the {Q0} x {Q1} px detector: the "
                             "patterns hold no Bragg disk to measure")
        raise ValueError("no direct beam found in the diffraction patterns")
    r = float(rho[int(half[0])])
    sq = torch.sqrt(torch.clamp(prof, min=0)).numpy()
    start = int(np.searchsorted(rho.numpy(), 1.8 * r + 2))
    if start >= len(sq) - 3:
        raise ValueError("the diffraction patterns are too small to hold any Bragg disk")
    from scipy.ndimage import minimum_filter1d, uniform_filter1d

    wdt = max(5, int(round(8 * r)))
    trend = uniform_filter1d(minimum_filter1d(sq, wdt), wdt)
    det = sq - trend
    det[:start] = -np.inf
    top = float(np.max(det))
    if not np.isfinite(top) or top <= 0:
        raise ValueError("no Bragg disks found beyond the direct beam")
    # the FIRST clear ring (not the strongest: with alternating or dynamical intensities a
    # higher-order ring can be brighter), so that L is the shortest Bragg vector
    peaks = [j for j in range(start + 1, len(det) - 1)
             if det[j] >= det[j - 1] and det[j] >= det[j + 1] and det[j] >= 0.35 * top]
    i = peaks[0] if peaks else int(np.argmax(det))
    if 0 < i < len(sq) - 1:
        a, b_, c = det[i - 1], det[i], det[i + 1]
        den = a - 2 * b_ + c
        off = 0.5 * (a - c) / den if den < 0 else 0.0
    else:
        off = 0.0
    L = float((i + off) * 0.5)
    return DataGeometry(c0=c0, r=r, L=L, pattern_shape=(int(Q0), int(Q1)))
