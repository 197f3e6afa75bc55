"""The cycle-consistent spatial-transforming autoencoder (CC-ST-AE).

An encoder reads the normalised pattern (:func:`.preprocess.encoder_input`) and predicts an
affine transform ``A = R(theta) S`` (``S`` symmetric: two scales and one shear, each bounded
in a band around identity by ``tanh``) and a class (sample or background). The class chooses
which of two learned *base* patterns the input is compared with. A spatial transformer warps
the input into the base's frame (``x(A v)``) and, for the cycle, the base into the input's frame
(``base(A^-1 u)``); training makes both match (:mod:`.loss`).

Rotation is predicted modulo the lattice's symmetry period as ``(cos n t, sin n t)`` with
``n = 360 / symmetry_deg``: a hexagonal pattern rotated by 60 degrees *is* the same pattern, so
no hand-tuned rotation offsets are needed and the target is continuous across the period.

Coordinates: the input grid is in lattice units ``(row, col)`` on ``[-extent, extent]^2``;
``A`` maps base vectors to measured vectors, ``g = A g0``, in the same ``(row, col)`` order as
``CONVENTIONS.md``. ``torch``'s ``affine_grid`` works in ``(x=col, y=row)`` order, handled in
:func:`_theta_gs` only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CCSTAE", "affine_from_outputs", "ResBlock"]


class ResBlock(nn.Module):
    """Two 3x3 convolutions with a skip connection (keeps gradients healthy in a small net)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.c2(F.relu(self.c1(x))))


def affine_from_outputs(
    o: torch.Tensor, n_sym: int, band: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoder outputs ``(B, 6)`` -> ``(A (B,2,2), theta (B,) radians, S (B,2,2))``.

    ``o = [s1, s2, shear, cos n t, sin n t, class_logit]``; scales ``1 + band tanh``, shear
    ``band tanh``.
    """
    s1 = 1 + band * torch.tanh(o[:, 0])
    s2 = 1 + band * torch.tanh(o[:, 1])
    sh = band * torch.tanh(o[:, 2])
    theta = torch.atan2(o[:, 4], o[:, 3]) / n_sym
    c, s = torch.cos(theta), torch.sin(theta)
    R = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    S = torch.stack([torch.stack([s1, sh], -1), torch.stack([sh, s2], -1)], -2)
    return R @ S, theta, S


def _theta_gs(M: torch.Tensor, t: torch.Tensor | None, extent: float) -> torch.Tensor:
    """``affine_grid`` matrix for sampling at ``M v + t`` (row, col lattice units)."""
    B = M.shape[0]
    th = torch.zeros(B, 2, 3, dtype=M.dtype, device=M.device)
    th[:, 0, 0] = M[:, 1, 1]
    th[:, 0, 1] = M[:, 1, 0]
    th[:, 1, 0] = M[:, 0, 1]
    th[:, 1, 1] = M[:, 0, 0]
    if t is not None:
        th[:, 0, 2] = t[:, 1] / extent
        th[:, 1, 2] = t[:, 0] / extent
    return th


def warp(img: torch.Tensor, M: torch.Tensor, extent: float) -> torch.Tensor:
    """Sample ``img`` ``(B, C, n, n)`` at ``M v`` for every grid point ``v``."""
    grid = F.affine_grid(_theta_gs(M, None, extent), list(img.shape), align_corners=False)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class CCSTAE(nn.Module):
    """Encoder + two learned bases (index 0 background, 1 sample) + spatial transformer."""

    def __init__(self, n: int = 32, extent: float = 2.6, symmetry_deg: float = 60.0,
                 width: int = 8, band: float = 0.1) -> None:
        super().__init__()
        if n % 8:
            raise ValueError(f"encoder input size {n} must be a multiple of 8")
        self.n = int(n)
        self.extent = float(extent)
        self.symmetry_deg = float(symmetry_deg)
        self.band = float(band)
        w = int(width)
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            ResBlock(w), nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            ResBlock(2 * w), nn.AvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * (n // 8) ** 2, 64), nn.ReLU(),
                                  nn.Linear(64, 6))
        self.base = nn.Parameter(torch.zeros(2, n, n))

    @property
    def n_sym(self) -> int:
        return max(1, int(round(360.0 / self.symmetry_deg)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw encoder outputs ``(B, 6)``."""
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Transform and class of each pattern ``x`` ``(B,1,n,n)``, plus both warps."""
        o = self.encode(x)
        A, theta, S = affine_from_outputs(o, self.n_sym, self.band)
        p = torch.sigmoid(o[:, 5])
        # input -> base frame (x(A v)); base -> input frame (base(A^-1 u)) for the cycle
        x_in_base = warp(x, A, self.extent)
        base_s = self.base[1].expand(x.shape[0], 1, self.n, self.n)
        base_in_x = warp(base_s, torch.linalg.inv(A), self.extent)
        return {"A": A, "theta": theta, "S": S, "p": p, "logit": o[:, 5], "raw": o,
                "x_in_base": x_in_base, "base_in_x": base_in_x}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast path for mapping: ``(A (B,2,2), sample probability (B,))`` without warps."""
        o = self.encode(x)
        A, _, _ = affine_from_outputs(o, self.n_sym, self.band)
        return A, torch.sigmoid(o[:, 5])

    def describe(self) -> dict:
        return {"n": self.n, "extent": self.extent, "symmetry_deg": self.symmetry_deg,
                "width": self.features[0].out_channels, "band": self.band}


def rotation_target(theta: torch.Tensor, n_sym: int) -> torch.Tensor:
    """``(cos n t, sin n t)`` target for a rotation ``theta`` (radians)."""
    return torch.stack([torch.cos(n_sym * theta), torch.sin(n_sym * theta)], -1)


def right_polar(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = R(theta) S`` with ``S`` symmetric: returns ``(theta radians, S)``."""
    theta = torch.atan2(A[:, 1, 0] - A[:, 0, 1], A[:, 0, 0] + A[:, 1, 1])
    c, s = torch.cos(theta), torch.sin(theta)
    Rt = torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)
    S = Rt @ A
    return theta, 0.5 * (S + S.transpose(1, 2))

