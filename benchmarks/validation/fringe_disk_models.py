"""How far fringes inside one disk move its fitted position, for candidate disk models.

    nice python benchmarks/validation/fringe_disk_models.py [--trials 20]

One Bragg disk rendered as ``render.py`` renders it (pixel-area integrated, sharp or
Gaussian-blurred aperture edge, a linear gradient plus a ``cos(pi (fx u + fy v) + ph)`` fringe
of amplitude 0.15 inside the disk, random per trial as in the validation set), noise-free, at
a random sub-pixel position. Each candidate model is fitted by nonlinear least squares over
the disk position (the model's linear coefficients solved exactly at each step), with the
*exact* aperture profile, so the only error left is what the model makes of the fringes. The
figure is the rms position error over the trials (px) - the per-disk bias that the
CC-ST-AE's strain inherits (a 0.02 px error on a first-order disk 24 px out is ~1e-3 strain).

Models: the in-disk contrast ``c(u, v)`` multiplying the disk is a polynomial of degree 0
(gain only: what template cross-correlation measures), 1 (gain and linear gradient: the
CC-ST-AE's disk model), 2, 3 or 4, or angular harmonics ``rho^(m+2j) (cos m t, sin m t)``
(contrast free along the radius, "the shift measured on the edge"); all with a free offset and
background ramp. Pixel weights: ``1 / I^p`` with ``p = 1`` (Poisson, what the last step uses)
or ``p = 2`` (relative residuals, i.e. a multiplicative model error).

This is the synthetic check that issue 10 asked for before judging a disk model on the
validation set; results are in docs/benchmarks.md ("What biases the CC-ST-AE on
hex_detector_background").
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
from scipy.optimize import least_squares
from scipy.special import erfc

R = 4.0  # disk radius, px
SUB = 12  # sub-samples per pixel and axis (pixel-area integration)
N = 33  # patch size, px
FRINGE = 0.15  # amplitude of the in-disk gradient and fringe, as in the validation set
_S = (np.arange(SUB) + 0.5) / SUB - 0.5
_X = (np.arange(N)[:, None] + _S[None]).reshape(-1)
_II, _JJ = np.mgrid[0:N, 0:N]

Basis = list[Callable[[np.ndarray, np.ndarray], np.ndarray]]


def render(p: np.ndarray, width: float, contrast: Callable | None) -> np.ndarray:
    """Pixel-integrated disk at ``p`` whose aperture edge is blurred by ``width`` px, times
    ``contrast(u, v)`` (``u, v`` in disk radii from its centre)."""
    dx, dy = _X[:, None] - p[0], _X[None, :] - p[1]
    disk = 0.5 * erfc((np.hypot(dx, dy) - R) / (np.sqrt(2) * width))
    if contrast is not None:
        disk = disk * contrast(dx / R, dy / R)
    return disk.reshape(N, SUB, N, SUB).mean((1, 3))


def polynomial(deg: int) -> Basis:
    return [lambda u, v, i=i, j=j: u ** i * v ** j
            for i in range(deg + 1) for j in range(deg + 1 - i)]


def harmonics(n_radial: int, m_max: int) -> Basis:
    out: Basis = [lambda u, v: np.ones_like(u + v), lambda u, v: u * u + v * v]
    for m in range(1, m_max + 1):
        for j in range(n_radial):
            out.append(lambda u, v, m=m, j=j: np.hypot(u, v) ** (m + 2 * j)
                       * np.cos(m * np.arctan2(v, u)))
            out.append(lambda u, v, m=m, j=j: np.hypot(u, v) ** (m + 2 * j)
                       * np.sin(m * np.arctan2(v, u)))
    return out


def fit(img: np.ndarray, p0: np.ndarray, width: float, basis: Basis, power: float
        ) -> np.ndarray:
    """Position of the disk in ``img`` by weighted least squares of ``sum_b c_b (b . disk)
    + offset + ramp``, weights ``1 / (I + 0.01)^power``."""
    c = np.round(p0)
    m = (_II - c[0]) ** 2 + (_JJ - c[1]) ** 2 <= (R + 2) ** 2
    y = img[m]
    sw = 1.0 / (np.abs(y) + 0.01) ** (power / 2)

    def residual(p: np.ndarray) -> np.ndarray:
        cols = [render(p, width, b)[m] for b in basis]
        D = np.stack(cols + [np.ones(m.sum()), (_II[m] - c[0]) / 6, (_JJ[m] - c[1]) / 6], 1)
        coef, *_ = np.linalg.lstsq(D * sw[:, None], y * sw, rcond=None)
        return (D @ coef - y) * sw

    return least_squares(residual, p0, x_scale=0.1, xtol=1e-12, ftol=1e-14, gtol=1e-14,
                         diff_step=1e-4).x


MODELS: dict[str, tuple[Basis, float]] = {
    "gain only, Poisson weights": (polynomial(0), 1.0),
    "linear gradient, Poisson weights (CC-ST-AE)": (polynomial(1), 1.0),
    "polynomial degree 2, Poisson": (polynomial(2), 1.0),
    "polynomial degree 3, Poisson": (polynomial(3), 1.0),
    "angular harmonics m <= 1, Poisson": (harmonics(2, 1), 1.0),
    "angular harmonics m <= 2, Poisson": (harmonics(2, 2), 1.0),
    "linear gradient, relative weights": (polynomial(1), 2.0),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    args = ap.parse_args(argv)
    print("| model | sharp edge (0.05 px) | soft edge (0.6 px) |\n|---|---|---|")
    errs: dict[str, dict[float, list]] = {k: {0.05: [], 0.6: []} for k in MODELS}
    for width in (0.05, 0.6):
        rng = np.random.default_rng(0)
        for _ in range(args.trials):
            p = 16.0 + rng.uniform(-0.5, 0.5, 2)
            gx, gy = rng.uniform(-1, 1, 2)
            fx, fy = 2 * rng.uniform(-1, 1, 2)
            ph = np.pi * rng.uniform(-1, 1)

            def contrast(u, v, gx=gx, gy=gy, fx=fx, fy=fy, ph=ph):
                return (1 + FRINGE * (gx * u + gy * v)
                        + FRINGE * np.cos(np.pi * (fx * u + fy * v) + ph))

            img = render(p, width, contrast) + 0.02  # a little flat background
            for name, (basis, power) in MODELS.items():
                errs[name][width].append(fit(img, p + 0.02, width, basis, power) - p)
    for name, e in errs.items():
        rms = {w: float(np.sqrt((np.asarray(v) ** 2).mean())) for w, v in e.items()}
        print(f"| {name} | {rms[0.05]:.4f} px | {rms[0.6]:.4f} px |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
