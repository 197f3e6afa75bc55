"""Phase sweep: a strained lattice whose whole pattern moves by sub-pixel amounts.

Noise-free patterns of sharp disks integrated over square detector pixels (rendered here, not
by the project's simulator) are shifted as a whole over one pixel in both axes. A method
whose disk positions depend on where a disk falls within a pixel reports a strain that
changes with the shift - and in a real scan the reference grain and every other grain sit at
different phases, so each grain then carries its own bias. Scored as the peak-to-peak spread
of the strain error over the shifts.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_stem_strain.io.dataset import Dataset
from napari_stem_strain.methods.runner import run_method
from napari_stem_strain.strain import strain_maps, strain_to_A

Q, L, R = 128, 25.6, 4.0  # detector px, first-order spacing, disk radius
EDGE = 0.15  # disk edge width (px): a sharp condenser aperture
SUB = 16  # sub-samples per pixel axis: the pixel integrates the disk over its area
N = 5  # shifts per axis: 0, 1/5, ... 4/5 px
STRAIN = (0.01, -0.006, 0.004, 5.0)  # exx, eyy, exy, theta (deg) of the strained block
HEX0 = np.array([[L, 0.0], [L / 2, L * np.sqrt(3) / 2]])


def render(A: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Direct beam at ``centre`` plus disks at ``centre + A g0``, each disk integrated over
    the area of every pixel it touches (pixel ``p`` covers ``[p - 1/2, p + 1/2)``)."""
    hk = np.array([(h, k) for h in range(-6, 7) for k in range(-6, 7)])
    g = hk @ HEX0 @ A.T
    amp = np.where((hk == 0).all(1), 1.0, 0.05 * np.exp(-0.5 * ((g**2).sum(1) / L**2 - 1)))
    img = np.zeros((Q, Q))
    s = (np.arange(SUB) + 0.5) / SUB - 0.5
    w = int(R + 3)
    for q, a in zip(centre + g, amp, strict=True):
        lo = np.floor(q).astype(int) - w
        if (lo < 0).any() or (lo + 2 * w + 1 > Q).any():
            continue
        x = (lo[0] + np.arange(2 * w + 1))[:, None] + s[None, :]  # (pixels, sub-samples)
        y = (lo[1] + np.arange(2 * w + 1))[:, None] + s[None, :]
        d = np.hypot(x.reshape(-1, 1) - q[0], y.reshape(1, -1) - q[1])
        disk = 0.5 * (1 - np.tanh((d - R) / EDGE))
        img[lo[0]:lo[0] + 2 * w + 1, lo[1]:lo[1] + 2 * w + 1] += a * disk.reshape(
            2 * w + 1, SUB, 2 * w + 1, SUB).mean((1, 3))
    return img * 1e4


@pytest.fixture(scope="module")
def sweep() -> np.ndarray:
    """``(N, 2N)`` scan: columns ``0:N`` unstrained (the reference), ``N:2N`` strained; the
    pattern at ``(i, j)`` and ``(i, N + j)`` is shifted by ``(i / N, j / N)`` px."""
    data = np.zeros((N, 2 * N, Q, Q), np.float32)
    A1 = strain_to_A(*STRAIN)
    for i in range(N):
        for j in range(N):
            c = np.array([Q / 2 + i / N, Q / 2 + j / N])
            data[i, j] = render(np.eye(2), c)
            data[i, N + j] = render(A1, c)
    return data


def _spread(method, data: np.ndarray) -> dict[str, float]:
    res = run_method(method, Dataset(data=data))
    maps = strain_maps(res.A, f"0:{N},0:{N}", res.symmetry_deg, res.sample)
    out = {}
    for name, want in zip(("exx", "eyy", "exy", "theta"), STRAIN, strict=True):
        err = getattr(maps, name)[:, N:] - want
        assert np.isfinite(err).all(), name
        out[name] = float(np.ptp(err))
    return out


def test_ccstae_strain_does_not_depend_on_the_sub_pixel_phase(sweep):
    from napari_stem_strain.methods.ccstae import CCSTAEMethod

    spread = _spread(CCSTAEMethod("default", device="cpu"), sweep)
    # the target is 2e-5; measured 1.2 / 0.9 / 0.5e-5 (with the Poisson step's floor at
    # 1e-3 of the beam, before 2026-11-28 stop 19: 2.2 / 1.2 / 0.7e-5; before the pixel-aperture
    # template: 3.4 / 5.1 / 1.2e-5), see docs/benchmarks.md "Phase sweep"
    for name in ("exx", "eyy", "exy"):
        assert spread[name] <= 2.5e-5, (name, spread)
    assert spread["theta"] <= 1e-3, spread  # degrees (2e-5 rad)


def test_py4dstem_strain_phase_dependence_stays_bounded(sweep):
    """The baseline misses the 2e-5 target: py4DSTEM's correlation peaks move with the
    column phase (eyy 1.2e-4 peak to peak, exx 1.2e-5, exy 2.8e-5 when this was written; see
    docs/benchmarks.md, "Phase sweep"). Guarded here so it does not get worse unseen."""
    from napari_stem_strain.methods.py4dstem import Py4DSTEMMethod

    spread = _spread(Py4DSTEMMethod(), sweep)
    assert spread["exx"] <= 2e-5 and spread["exy"] <= 4e-5, spread
    assert spread["eyy"] <= 1.6e-4, spread
    assert spread["theta"] <= 1e-2, spread


def test_template_uses_the_pixel_model_only_when_beams_cover_the_pixel():
    """Beams at many sub-pixel phases: the pixel-aperture model (area-integrated disks pick
    the whole-pixel aperture). Every beam at one phase (no descan): the radial profile - the
    pixel model cannot tell aperture from profile there and was worse (docs/method.md)."""
    import torch

    from napari_stem_strain.methods.ccstae.preprocess import as_patterns
    from napari_stem_strain.methods.ccstae.refine import make_template

    rng = np.random.default_rng(0)
    spread = rng.uniform(0, 1, (40, 2))
    same = np.full((40, 2), 0.3) + rng.normal(0, 0.01, (40, 2))
    for offsets, want in ((spread, 1.0), (same, None)):
        centres = Q / 2 + offsets
        pats = np.stack([render(np.zeros((2, 2)), c) for c in centres])
        tpl = make_template(as_patterns(pats), torch.tensor(centres, dtype=torch.float32), R)
        assert tpl.aperture == want
