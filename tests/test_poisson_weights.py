"""The CC-ST-AE's Poisson step weighs a weak disk by its own counts, not by the beam's.

The brief's real data: first-order disks may hold well under 1 % of the direct beam. The
last Gauss-Newton step fits every disk's counts with weights ``1 / max(mu, floor)``; the floor
keeps pixels the model puts at (nearly) zero counts from weighing without bound. It used to be
1e-3 of the *beam's* peak: for a disk at 3e-4 of the beam that floor exceeds the disk's own
counts, every one of its pixels gets the same weight, and its position information is lost
(a Cramer-Rao computation on the validation case square_psf_weak: 47 % more strain scatter;
benchmarks/validation/crb.py).
"""

from __future__ import annotations

import numpy as np
import torch

from napari_stem_strain.methods.ccstae import refine as rf
from napari_stem_strain.methods.ccstae.preprocess import as_patterns

Q, R, EDGE, SUB = 64, 4.0, 0.15, 16
BEAM = 1e6  # counts per pixel on the beam's top
WEAK = 3e-4  # the weak disk's level relative to the beam


def _pattern(centre: np.ndarray, disks: list[tuple[np.ndarray, float]], edge: float = EDGE,
             beam: float = BEAM) -> np.ndarray:
    """Expected counts: pixel-area-integrated disks ``(offset from centre, level)``, edge
    width ``edge`` px, ``beam`` counts per pixel on a level-1 disk's top."""
    img = np.zeros((Q, Q))
    s = (np.arange(SUB) + 0.5) / SUB - 0.5
    x = (np.arange(Q)[:, None] + s[None, :]).reshape(-1)
    for off, level in disks:
        q = centre + off
        d = np.hypot(x[:, None] - q[0], x[None, :] - q[1])
        img += level * (0.5 * (1 - np.tanh((d - R) / edge))).reshape(Q, SUB, Q, SUB).mean((1, 3))
    return img * beam


def _phase_index(frac: torch.Tensor) -> torch.Tensor:
    """The tabulated sub-pixel phase of each disk, as :func:`rf.refine` picks it."""
    iq = torch.round(frac * rf.PHASES).clamp(-(rf.PHASES // 2), rf.PHASES // 2).long()
    iq = iq + rf.PHASES // 2
    return iq[..., 0] * (rf.PHASES + 1) + iq[..., 1]


def _weak_disk_weight(with_beam: bool) -> float:
    """``weight6`` (inverse shift variance) that :func:`rf.poisson_fit` gives the weak disk
    of a noise-free pattern, fitted together with the beam 24 px away (the beam first, as
    the refinement orders them) or alone."""
    rng = np.random.default_rng(0)
    centres = Q / 2 + rng.uniform(0, 1, (40, 2))  # beams at many phases: the pixel model
    beams = np.stack([_pattern(c, [(np.zeros(2), 1.0)]) for c in centres])
    tpl = rf.make_template(as_patterns(beams), torch.tensor(centres, dtype=torch.float32), R)
    c = np.array([Q / 2 - 12.3, Q / 2 + 0.4])
    off = np.array([24.0, 0.0])
    pat = as_patterns(_pattern(c, [(np.zeros(2), 1.0), (off, WEAK)])[None])
    pos = np.stack([c, c + off]) if with_beam else (c + off)[None]
    patch, frac = rf.gather_patches(pat, torch.tensor(pos[None], dtype=torch.float32),
                                    tpl.offsets)
    ph = _phase_index(frac)
    coef8 = (tpl.pinv[ph] @ patch[..., None])[..., 0]
    pf = rf.poisson_fit(patch, ph, coef8, tpl, torch.ones(1))
    return float(pf["weight6"][0, -1])


def test_a_weak_disk_keeps_its_poisson_weight() -> None:
    """Fitted beside a beam 3000x brighter, the weak disk's shift is as precise as fitted
    alone (where nothing brighter sets the floor): with the beam's floor it lost ~2x."""
    alone = _weak_disk_weight(with_beam=False)
    beside = _weak_disk_weight(with_beam=True)
    assert beside > 0.9 * alone, (beside, alone)


def test_shift_variance_of_a_low_count_disk_matches_its_scatter() -> None:
    """At a few counts per pixel most of a disk's pixels sit under the one-count floor, so
    the fit's weights are not the counts' inverse variances; the shift variance the Poisson
    step reports (``1 / weight6``, data in counts) must still be the scatter the shift shows
    over Poisson draws. ``G^-1`` of the weighted fit alone put it 1.5x too high (a floored
    pixel is trusted less than its variance allows); the sandwich ``G^-1 D^T W diag(mu) W D
    G^-1`` with the model's ``mu`` gives it within a few per cent."""
    rng = np.random.default_rng(1)
    edge, top, n = 0.6, 2.0, 3000  # soft edge, 2 counts per pixel on the disk's top
    centres = Q / 2 + rng.uniform(0, 1, (40, 2))
    beams = np.stack([_pattern(c, [(np.zeros(2), 1.0)], edge, top) for c in centres])
    tpl = rf.make_template(as_patterns(beams), torch.tensor(centres, dtype=torch.float32), R)
    c = np.array([Q / 2 + 0.3, Q / 2 + 0.4])
    mu = _pattern(c, [(np.zeros(2), 1.0)], edge, top)
    pats = as_patterns(rng.poisson(np.broadcast_to(mu, (n, Q, Q))).astype(np.float32))
    pos = torch.tensor(np.broadcast_to(c, (n, 1, 2)).copy(), dtype=torch.float32)
    patch, frac = rf.gather_patches(pats, pos, tpl.offsets)
    ph = _phase_index(frac)
    coef8 = (tpl.pinv[ph] @ patch[..., None])[..., 0]
    pf = rf.poisson_fit(patch, ph, coef8, tpl, torch.ones(n))  # data in counts: count = 1
    c6 = pf["coef6"][:, 0].double()
    shifts = (c6[:, 4:6] / c6[:, :1]).numpy()
    empirical = float(shifts.var(0).mean())  # per axis; standard error ~2 %
    predicted = float(np.median(1.0 / pf["weight6"][:, 0].double().numpy()))
    assert 0.88 < predicted / empirical < 1.12, (predicted, empirical)


def test_pooled_step_does_not_shrink_a_faint_disks_offset() -> None:
    """The pooled last step measures each disk's offset as ``shift coefficient / gain`` and
    weighs it by ``gain^2 / variance``. With the position's own fitted gain, a faint disk's
    gain noise (40 % here: a few counts per pixel on background) makes the weighted offset a
    ratio estimator biased towards zero - by ``E[g]^2 / E[g^2]``, ~15 % - which every
    Gauss-Newton step then leaves as error. The grain's pooled gain (a mean over ~80
    same-grain neighbours) is nearly noise-free, and the offsets come out at full size."""
    rng = np.random.default_rng(3)
    n, K = 9, 6
    a = np.linspace(20.0, 60.0, K)  # each reflection's true gain
    delta = rng.normal(0.0, 0.2, (n, n, K, 2))  # true offsets from the predicted positions
    coef8 = np.zeros((n, n, K, 8))
    coef8[..., 0] = a * (1.0 + 0.4 * rng.standard_normal((n, n, K)))  # fitted gains
    coef8[..., 4:6] = a[:, None] * delta  # gain x offset (noise-free: the bias alone)
    A = torch.eye(2).expand(n, n, 2, 2).contiguous()  # one grain
    ok = torch.ones(n, n, K, dtype=torch.bool)
    coef6, w, _ = rf.pooled_coefficients(torch.tensor(coef8, dtype=torch.float32),
                                         torch.zeros(n, n, K, 3, 4), torch.ones(n, n, K), ok,
                                         A, radius=4)
    off = (coef6[..., 4:6] / coef6[..., :1]).double().numpy()
    wn = w.double().numpy()[..., None]
    slope = float((wn * off * delta).sum() / (wn * delta * delta).sum())
    assert 0.97 < slope < 1.03, slope


def test_a_disk_too_faint_for_any_one_position_is_used_where_the_grain_shows_it() -> None:
    """At low dose a weak first-order disk may stand only ~2 sigma out in any one pattern:
    each position's own test (``min_snr``) drops it - and keeps it exactly where noise made
    it look bright. Its gain pooled over the grain is plain, so the pooled step uses it
    everywhere, with the small weight its noise gives it; a reflection that is not there
    (gain zero) stays out, and so does a disk whose patch leaves the detector."""
    rng = np.random.default_rng(5)
    n, K = 9, 4
    true = np.array([60.0, 40.0, 5.0, 0.0])  # strong, strong, faint (2 sigma), absent
    gains = true + 2.5 * rng.standard_normal((n, n, K))
    coef8 = np.zeros((n, n, K, 8))
    coef8[..., 0] = gains
    ok = torch.tensor(gains > 4 * 2.5)  # each position's own 4-sigma test
    inside = torch.ones(n, n, K, dtype=torch.bool)
    inside[:, :2, 1] = False  # disk 1 leaves the detector in two columns of the scan
    A = torch.eye(2).expand(n, n, 2, 2).contiguous()  # one grain
    _, w, used = rf.pooled_coefficients(torch.tensor(coef8, dtype=torch.float32),
                                        torch.zeros(n, n, K, 3, 4), torch.ones(n, n, K), ok, A,
                                        radius=4, inside=inside)
    assert float(ok[..., 2].float().mean()) < 0.1  # the own test keeps the faint disk rarely
    assert bool(used[..., 0].all()) and bool(used[..., 2].all())
    assert bool((w[..., 2] > 0).all())
    # its weight is the pooled gain's (gain^2 / var4, var4 = 1 here), not the position's own
    assert float((w[..., 2].sqrt() - true[2]).abs().max()) < 1.5
    assert not bool(used[..., 3].any())
    assert not bool(used[:, :2, 1].any()) and bool(used[:, 2:, 1].all())


def test_a_faint_disks_in_disk_gradient_is_pooled_where_no_position_finds_the_disk() -> None:
    """The pooled step fixes each disk's in-disk gradient to its neighbours' mean and moves
    the shift by what that changes (``cond``). A disk used for its pooled gain alone - no
    position finds it on its own - must have its gradient pooled too: left at zero, the
    gradient reads as a shift. And over noisy gains the pooled gradient must not be shrunk
    (a gain-squared-weighted mean of ``c / g`` is, by ``E[g]^2 / E[g^2]``)."""
    rng = np.random.default_rng(11)
    n, K = 9, 2
    a = np.array([60.0, 5.0])  # true gains: a strong disk and one at 2 sigma per position
    grad = np.array([0.3, -0.2])  # true in-disk gradient coefficient per unit gain (row x)
    delta = 0.15  # every disk sits 0.15 px from its predicted position (row x)
    coef8 = np.zeros((n, n, K, 8))
    coef8[..., 0] = a + 2.5 * rng.standard_normal((n, n, K))
    coef8[..., 6] = a * grad  # the free fit measured the gradient (noise-free here) ...
    coef8[..., 4] = a * delta  # ... and so the shift, with the gradient fitted
    cond = torch.zeros(n, n, K, 3, 4)
    cond[..., 1, 2] = 1.0  # fixing the gradient to v moves the shift coefficient by c - v
    ok = torch.tensor(coef8[..., 0] > 10.0)
    inside = torch.ones(n, n, K, dtype=torch.bool)
    A = torch.eye(2).expand(n, n, 2, 2).contiguous()
    coef6, _, used = rf.pooled_coefficients(torch.tensor(coef8, dtype=torch.float32), cond,
                                            torch.ones(n, n, K), ok, A, radius=4,
                                            inside=inside)
    assert float(ok[..., 1].float().mean()) < 0.1 and bool(used[..., 1].all())
    off = (coef6[..., 4] / coef6[..., 0]).double().numpy()  # measured offsets (px)
    assert np.abs(off - delta).max() < 0.02, np.abs(off - delta).max()


def test_pixel_model_uses_every_beam_pixel() -> None:
    """The Poisson step's disk model (:class:`rf.PixelModel`) is fitted to the sampled direct
    beams' pixels; its noise enters every disk's shift (errors in variables: the noise in the
    model's derivative shortens each measured shift, and the Gauss-Newton steps leave the
    remainder in ``A`` unaccounted for by the covariance). It used to fit an even subset of
    at most 40 000 pixels - ~240 beams of a 4 px disk, of the ~450 a map samples - so more
    beams stopped making it better (old code: 1.10x the error with 4x the beams). Fitted to
    all of them, its error falls with their number (0.42x here; ``1 / sqrt`` would be 0.5)."""
    rng = np.random.default_rng(11)
    h, P = 6, 169

    def fit(n_beams: int, noise: float) -> torch.Tensor:
        v = torch.tensor(rng.uniform(-h, h, (n_beams, P, 2)))
        level = 0.5 * torch.erfc((torch.linalg.norm(v, dim=-1) - R) / (np.sqrt(2) * 0.6))
        counts = level + noise * torch.tensor(rng.standard_normal((n_beams, P)))
        model = rf.PixelModel.fit(v, counts.clamp_min(0).sqrt(), h)
        rho = torch.linspace(0, h, 200, dtype=torch.float64)
        grid = torch.stack([rho, torch.zeros_like(rho)], -1)
        return model.evaluate(grid)[1]  # the derivative: what the shift is measured with

    truth = fit(2000, 0.0)
    err = [float((fit(n, 0.05) - truth).pow(2).mean().sqrt()) for n in (300, 1200)]
    assert err[1] < 0.7 * err[0], err
