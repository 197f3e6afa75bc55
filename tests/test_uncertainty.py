"""Per-position uncertainty (issue 13): covariance of A from each method's weighted fit,
propagation to sigma_exx/eyy/exy/theta, result files, calibration against ground truth."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from napari_stem_strain.io.results import MethodMaps, read_results, write_results
from napari_stem_strain.methods.base import MethodResult
from napari_stem_strain.strain import A_to_strain, strain_maps, strain_to_A, wrap_angle
from napari_stem_strain.uncertainty import (
    COMPONENTS,
    basis_to_affine_covariance,
    calibration,
    interior_mask,
    reference_covariance,
    strain_jacobian,
    strain_sigma,
    student_t_variance_factor,
)


def _random_cov(rng: np.random.Generator, scale: float) -> np.ndarray:
    """A full-rank 4x4 covariance with strong correlations (so a transposed Jacobian or a
    mixed-up row-major order gives visibly different sigmas)."""
    L = rng.normal(size=(4, 4))
    return scale**2 * (L @ L.T + 0.2 * np.eye(4))


def test_propagation_matches_monte_carlo():
    """sigma from linear propagation equals the scatter of strains of sampled A_raw and A_ref."""
    rng = np.random.default_rng(1)
    A_raw = strain_to_A(0.02, -0.01, 0.015, 17.0) @ np.array([[1.1, 0.3], [-0.2, 0.9]])
    A_ref = np.array([[1.1, 0.3], [-0.2, 0.9]]) @ np.linalg.inv(strain_to_A(0.003, 0, 0, 2.0))
    C_raw, C_ref = _random_cov(rng, 2e-3), _random_cov(rng, 1e-3)
    n = 40000
    draws_raw = A_raw + rng.multivariate_normal(np.zeros(4), C_raw, n).reshape(n, 2, 2)
    draws_ref = A_ref + rng.multivariate_normal(np.zeros(4), C_ref, n).reshape(n, 2, 2)
    vals = A_to_strain(draws_raw @ np.linalg.inv(draws_ref), 60.0)
    A = A_raw @ np.linalg.inv(A_ref)
    centre = A_to_strain(A, 60.0)
    sig = strain_sigma(A, C_raw, A_ref, C_ref, 60.0)
    for i, k in enumerate(COMPONENTS):
        d = vals[i] - centre[i]
        if k == "theta":
            d = wrap_angle(d, 60.0)
        assert np.std(d) == pytest.approx(float(sig[k]), rel=0.03), k
    # the reference term matters: leaving it out must change the answer
    no_ref = strain_sigma(A, C_raw, A_ref, None, 60.0)
    assert no_ref["exx"] < 0.95 * sig["exx"]


def test_jacobian_at_the_wrap_boundary():
    """A rotation right at +period/2 must not give a huge derivative from the wrap."""
    A = strain_to_A(0.0, 0.0, 0.0, 30.0)
    J = strain_jacobian(A[None], 60.0)[0]
    assert np.all(np.abs(J) < 200)  # d theta / d A is ~57 deg per unit


def test_nan_positions_have_nan_sigma():
    A = np.tile(np.eye(2), (3, 3, 1, 1))
    A[0, 0] = np.nan
    cov = np.tile(1e-8 * np.eye(4), (3, 3, 1, 1))
    maps = strain_maps(A, "0:3,0:3", 60.0, A_cov=cov)
    for k in COMPONENTS:
        assert np.isnan(maps.sigma[k][0, 0]) and np.all(np.isfinite(maps.sigma[k].flat[1:]))


def test_ccstae_affine_covariance_matches_monte_carlo():
    """The CC-ST-AE's weighted disk-shift fit: predicted covariance of A (residual-scaled)
    equals the scatter of A over noisy repeats, with disk noise 3x what the weights claim."""
    from napari_stem_strain.methods.ccstae.refine import affine_update

    rng = np.random.default_rng(2)
    K, L, B = 13, 20.0, 6000
    P = torch.tensor(rng.normal(size=(K, 2)) * 1.5, dtype=torch.float32)
    P[0] = 0
    w = torch.tensor(rng.uniform(0.5, 4.0, K), dtype=torch.float32)  # inverse variances (px^-2)
    sd = 3.0 / np.sqrt(w.numpy())  # the real noise: 3x the weights' claim
    d = torch.tensor(rng.normal(size=(B, K, 2)) * sd[None, :, None] * 0.05, dtype=torch.float32)
    coef = torch.zeros(B, K, 6)
    coef[..., 0] = 1.0
    coef[..., 4:6] = d
    ok = torch.ones(B, K, dtype=torch.bool)
    A0 = torch.eye(2).expand(B, 2, 2)
    out: dict = {}
    A, _, _ = affine_update(coef, ok, torch.zeros(B, K, 2), A0, torch.zeros(B, 2), P, L, 10.0,
                            w.expand(B, K) / 0.05**2, cov_out=out)
    emp = np.cov(A.reshape(B, 4).double().numpy().T)
    # the residual scale is unbiased; the error bar carries the Student-t factor on top
    dof = 2 * K - 6
    pred = out["A_cov"].double().mean(0).numpy() * (dof - 2) / dof
    assert np.allclose(np.diag(emp), np.diag(pred), rtol=0.08)
    assert np.allclose(emp, pred, atol=0.1 * np.diag(pred).max())


def test_ccstae_error_bars_hold_one_standard_deviation_with_few_disks():
    """With few disks the residual scale is itself uncertain, so (estimate - truth) / sigma is
    Student-t with 2K - 6 degrees of freedom: with 6 disks its standard deviation is 1.22 if
    sigma is only the residual-scaled covariance. The error bar must hold one standard
    deviation of z and its +-2 sigma interval ~95 % (issue 13's calibration targets), however
    few the disks."""
    from napari_stem_strain.methods.ccstae.refine import affine_update

    rng = np.random.default_rng(5)
    K, L, B = 6, 20.0, 20000
    ang = np.arange(K - 1) * 2 * np.pi / (K - 1) + 0.3
    P = torch.tensor(np.vstack([[0.0, 0.0], np.c_[np.cos(ang), np.sin(ang)]]),
                     dtype=torch.float32)
    w = torch.tensor(rng.uniform(1.0, 3.0, K), dtype=torch.float32)
    sd = 0.02 / np.sqrt(w.numpy())
    d = torch.tensor(rng.normal(size=(B, K, 2)) * sd[None, :, None], dtype=torch.float32)
    coef = torch.zeros(B, K, 6)
    coef[..., 0] = 1.0
    coef[..., 4:6] = d
    out: dict = {}
    A, _, _ = affine_update(coef, torch.ones(B, K, dtype=torch.bool), torch.zeros(B, K, 2),
                            torch.eye(2).expand(B, 2, 2), torch.zeros(B, 2), P, L, 10.0,
                            w.expand(B, K), cov_out=out)
    err = (A - torch.eye(2)).reshape(B, 4).double().numpy()
    sigma = np.sqrt(np.diagonal(out["A_cov"].double().numpy(), axis1=1, axis2=2))
    z = err / sigma
    assert np.all(np.abs(z.std(0) - 1.0) < 0.05), z.std(0)
    assert np.all(np.abs((np.abs(z) < 2).mean(0) - 0.95) < 0.02), (np.abs(z) < 2).mean(0)


def test_py4dstem_lattice_covariance_matches_monte_carlo():
    from napari_stem_strain.methods._py4dstem_lattice import (
        LatticeFit,
        fit_lattice,
        lattice_covariance,
    )

    rng = np.random.default_rng(3)
    hk = np.array([(h, k) for h in range(-2, 3) for k in range(-2, 3)], float)
    g1, g2, o = np.array([20.0, 1.0]), np.array([-9.0, 17.0]), np.array([64.0, 63.0])
    w = rng.uniform(1, 10, len(hk))
    basis = np.array([[20.0, -10.0], [0.0, 17.3]])
    binv = np.linalg.inv(basis)
    As, covs = [], []
    for _ in range(3000):
        noise = rng.normal(size=(len(hk), 2)) * 0.2 / np.sqrt(w)[:, None]
        pk = o + hk @ np.stack([g1, g2], 1).T + noise
        a, b, c = fit_lattice(pk, hk, w)
        fit = LatticeFit(a, b, c, len(hk), 0.0)
        covs.append(basis_to_affine_covariance(lattice_covariance(pk, hk, w, fit), binv))
        As.append((fit.G @ binv).reshape(4))
    emp = np.cov(np.array(As).T)
    dof = 2 * len(hk) - 6  # the residual scale is unbiased; the bar adds the Student-t factor
    pred = np.mean(covs, 0) * (dof - 2) / dof
    assert np.allclose(np.diag(emp), np.diag(pred), rtol=0.08)


def _result_with_cov(shape=(6, 7)) -> MethodResult:
    rng = np.random.default_rng(0)
    exx = rng.normal(0, 0.01, shape)
    A = strain_to_A(exx, 0 * exx, 0 * exx, 0 * exx)
    A[:3, :3] = strain_to_A(0, 0, 0, 0)
    sample = np.ones(shape, bool)
    sample[-1, -1] = False
    A[-1, -1] = np.nan
    cov = np.tile(1e-8 * np.eye(4), (*shape, 1, 1)).astype(np.float32)
    cov[-1, -1] = np.nan
    return MethodResult("ae", A.astype(np.float32), sample, {}, 1.0, 60.0, A_cov=cov)


def test_result_file_round_trip_with_and_without_sigma(tmp_path):
    path = tmp_path / "r.h5"
    g = MethodMaps.from_result(_result_with_cov(), "0:3,0:3", input_file="in.h5")
    write_results(path, [g])
    back = read_results(path)["ae"]
    with h5py.File(path) as h5:
        for k in COMPONENTS:
            ds = h5[f"ae/sigma_{k}"]
            assert ds.shape == (6, 7) and ds.dtype == np.float32
    for k in COMPONENTS:
        np.testing.assert_array_equal(back.maps.sigma[k], g.maps.sigma[k])
        assert np.isnan(back.maps.sigma[k][-1, -1])  # NaN where the value is NaN
        assert np.nanmax(back.maps.sigma[k]) > 0
    # a new reference region recomputes the sigmas (the covariance travels in the file)
    moved = back.with_reference("3:6,3:6")
    assert moved.maps.sigma is not None
    assert not np.allclose(moved.maps.sigma["exx"][1, 1], back.maps.sigma["exx"][1, 1])
    # an older file without sigma datasets still opens
    with h5py.File(path, "a") as h5:
        for k in COMPONENTS:
            del h5[f"ae/sigma_{k}"]
        del h5["ae/A_cov"]
    old = read_results(path)["ae"]
    assert old.maps.sigma is None and old.A_cov is None
    assert old.with_reference("3:6,3:6").maps.sigma is None


def test_interior_mask_excludes_boundaries_and_vacuum():
    grains = np.zeros((8, 8), int)
    grains[:, 4:] = 1
    sample = np.ones((8, 8), bool)
    sample[0] = False
    m = interior_mask(grains, sample)
    assert not m[:, 3:5].any()  # the boundary columns
    assert not m[:2].any()  # vacuum row and its neighbours
    assert m[4, 1] and m[4, 6]


def test_calibration_statistics():
    rng = np.random.default_rng(5)
    truth = np.zeros((100, 100))
    sigma = np.full_like(truth, 0.01)
    est = rng.normal(0, 0.01, truth.shape)
    c = calibration(est, sigma, truth, np.ones_like(truth, bool))
    assert c["std_z"] == pytest.approx(1.0, abs=0.03)
    assert c["cover2"] == pytest.approx(0.954, abs=0.01)
    c = calibration(est, sigma / 2, truth, np.ones_like(truth, bool))
    assert c["std_z"] == pytest.approx(2.0, abs=0.06) and c["cover2"] < 0.8


@pytest.fixture(scope="module")
def small_sim(tmp_path_factory):
    from napari_stem_strain.simulate import SimulationSettings, simulate_to_file

    path = tmp_path_factory.mktemp("unc") / "small.h5"
    simulate_to_file(path, SimulationSettings(scan=(24, 24), pattern=128, noise=0.25, seed=3,
                                              n_grains=3), workers=1)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ae", "py4dstem"])
def test_error_bars_are_calibrated_on_a_small_simulated_file(small_sim, method):
    """Within grains the error bars describe the actual errors: std of z in 0.8-1.25 and
    90-98 % of positions within 2 sigma, for every component (the issue's criteria).

    py4DSTEM is held to less, and says so: its scatter is calibrated but it carries a per-grain
    bias relative to the reference grain (mean z ~ -0.8 in exx here; docs/benchmarks.md
    "Uncertainty calibration") that no per-position statistic can see, so its 2-sigma
    coverage falls below 90 %. For it the coverage is checked on the errors with each grain's
    mean removed - what its error bars do describe - and the miss stays in the docs."""
    from napari_stem_strain.io.ground_truth import read_ground_truth
    from napari_stem_strain.io.readers import open_dataset
    from napari_stem_strain.methods.runner import run_method
    from napari_stem_strain.pipeline import make_method

    truth = read_ground_truth(small_sim)
    with open_dataset(small_sim) as ds:
        res = run_method(make_method(method, device="cpu"), ds)
    assert res.A_cov is not None and res.A_cov.shape == (24, 24, 4, 4)
    maps = strain_maps(res.A, truth.reference, res.symmetry_deg, mask=res.sample,
                       A_cov=res.A_cov)
    where = interior_mask(truth.grains, truth.sample)
    assert where.sum() > 150
    for k in COMPONENTS:
        period = truth.symmetry_deg if k == "theta" else None
        est = np.asarray(getattr(maps, k), np.float64)
        if method == "py4dstem":  # each grain's mean error removed (see the docstring)
            err = est - getattr(truth, k)
            if period is not None:
                err = wrap_angle(err, period)
            for g in np.unique(truth.grains[where]):
                sel = where & (truth.grains == g) & np.isfinite(err)
                est = np.where(truth.grains == g, est - err[sel].mean(), est)
        c = calibration(est, maps.sigma[k], getattr(truth, k), where, period)
        assert c["n"] > 0.9 * where.sum(), k
        assert 0.8 <= c["std_z"] <= 1.25, (k, c)
        assert c["cover2"] >= 0.90, (k, c)
        if method == "ae":  # (removing a fitted mean narrows py4DSTEM's spread a little)
            assert c["cover2"] <= 0.98, (k, c)


def test_cli_compare_prints_calibration(tmp_path, capsys):
    """`stem-strain compare` prints, per method and component, std of z and the 2-sigma share;
    estimates drawn with exactly the covariance the file claims give std z ~ 1."""
    from napari_stem_strain.cli import main
    from napari_stem_strain.io.ground_truth import GroundTruth, write_ground_truth

    rng = np.random.default_rng(7)
    shape = (40, 40)
    exx = np.where(np.arange(40)[None, :] < 20, 0.0, 0.01) * np.ones(shape)
    zero = np.zeros(shape)
    A_true = strain_to_A(exx, zero, zero, zero)
    grains = (np.arange(40)[None, :] >= 20) * np.ones(shape, int)
    truth_file = tmp_path / "truth.h5"
    with h5py.File(truth_file, "w") as h5:
        write_ground_truth(h5, GroundTruth(exx.astype(np.float32), *(zero.astype(np.float32),) * 3,
                                           np.ones(shape, bool), 60.0, "0:20,0:20",
                                           grains=grains.astype(np.int32)))
    s = 1e-3
    groups = []
    for name, scale in (("ae", 1.0), ("py4dstem", 3.0)):  # py4dstem: error bars 3x too small
        A = A_true + rng.normal(0, s * scale, (*shape, 2, 2))
        cov = np.tile(s**2 * np.eye(4), (*shape, 1, 1)).astype(np.float32)
        res = MethodResult(name, A.astype(np.float32), np.ones(shape, bool), {}, 1.0, 60.0,
                           A_cov=cov)
        groups.append(MethodMaps.from_result(res, "0:20,0:20", input_file=str(truth_file)))
    out = tmp_path / "r.h5"
    write_results(out, groups)
    assert main(["compare", str(out), "--truth", str(truth_file)]) == 0
    text = capsys.readouterr().out
    assert "error-bar calibration" in text
    rows = {ln.split()[0]: ln.split()[1:] for ln in text.splitlines()
            if ln.split() and ln.split()[0] in ("ae", "py4dstem") and "[" in ln}
    ae = [float(v) for v in rows["ae"][0::2]]
    p4 = [float(v) for v in rows["py4dstem"][0::2]]
    assert len(ae) == 4 and all(0.85 < v < 1.2 for v in ae), ae
    assert all(v > 2.5 for v in p4), p4


def test_reference_uncertainty_ignores_positions_registered_on_another_symmetry_branch():
    """A hexagonal pattern registered as R(+30 deg) at most positions and R(-30 deg) at a few
    describes the same lattice (60 degrees apart): the strain is the same after wrapping, but
    the raw entries differ by ~1. Counted in the reference region's empirical scatter, those
    few made every error bar of an abTEM WS2 case 20-50x too wide. The reference's
    uncertainty must come from the positions on the median's branch only."""
    rng = np.random.default_rng(5)
    n = 36
    A = strain_to_A(rng.normal(0, 1e-3, n), rng.normal(0, 1e-3, n), rng.normal(0, 5e-4, n),
                    30.0 + rng.normal(0, 0.05, n))
    cov = np.broadcast_to(_random_cov(rng, 1e-3), (n, 4, 4)).copy()
    clean = reference_covariance(A.reshape(6, 6, 2, 2), cov.reshape(6, 6, 4, 4), "0:6,0:6")
    mixed = A.copy()
    mixed[:5] = strain_to_A(0.0, 0.0, 0.0, -30.0)  # 5 of 36 on the other branch
    got = reference_covariance(mixed.reshape(6, 6, 2, 2), cov.reshape(6, 6, 4, 4), "0:6,0:6")
    # the same order as without them (fewer positions: a little larger), not ~1e3 x larger
    assert np.all(np.diag(got) < 3 * np.diag(clean)), (np.diag(got), np.diag(clean))


def _scale_calibration(s2_true: np.ndarray, dof: int, rng
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Positions in one grain whose estimate errs by ``N(0, s2_true)``, each with its own
    residual scale from ``dof`` residuals and its 80 same-grain neighbours' pooled scale.
    Returns ``(z, sigma)`` of the per-position Student-t error bar, then of the moderated
    one (:func:`moderated_scale`)."""
    from napari_stem_strain.methods.ccstae.refine import moderated_scale

    n = len(s2_true)
    err = rng.normal(size=n) * np.sqrt(s2_true)
    s2 = s2_true * rng.chisquare(dof, n) / dof
    prior = np.mean(s2_true) * rng.chisquare(80 * dof, n) / (80 * dof)
    post, post_dof = moderated_scale(torch.tensor(s2), torch.full((n,), float(dof)),
                                     torch.tensor(prior), torch.full((n,), 80.0 * dof))
    sig = np.sqrt(s2 * student_t_variance_factor(dof))
    sig_m = np.sqrt(post.numpy() * student_t_variance_factor(post_dof.numpy()))
    return err / sig, sig, err / sig_m, sig_m


def _fifths(z: np.ndarray, sigma: np.ndarray) -> tuple[float, float]:
    """Standard deviation of z in the smallest and in the largest fifth of the sigmas."""
    lo, hi = np.quantile(sigma, [0.2, 0.8])
    return float(z[sigma <= lo].std()), float(z[sigma >= hi].std())


def test_moderated_scale_evens_out_error_bars_in_a_grain():
    """The CC-ST-AE scales each position's covariance by its own residuals: with 8 disks that
    is 10 degrees of freedom, so a position whose residuals came out small by chance gets a
    bar too short (validation hex_lowdose_background: z's standard deviation 1.69 in the
    smallest fifth of sigmas, 0.85 in the largest). The same grain's neighbours measure the
    same scale: shrunk towards them (empirical Bayes), every fifth holds one sigma and the
    +-2 sigma interval ~95 %."""
    rng = np.random.default_rng(11)
    z, sig, zm, sigm = _scale_calibration(np.full(40000, 4e-6), 10, rng)
    lo, hi = _fifths(z, sig)
    assert lo > 1.2 and hi < 0.9, (lo, hi)  # the per-position bar: what goes wrong
    lo, hi = _fifths(zm, sigm)
    assert abs(lo - 1) < 0.05 and abs(hi - 1) < 0.05, (lo, hi)
    assert abs(zm.std() - 1) < 0.03, zm.std()
    assert abs((np.abs(zm) < 2).mean() - 0.954) < 0.01, (np.abs(zm) < 2).mean()


def test_moderated_scale_keeps_scales_that_truly_differ():
    """Where the positions' scales truly differ (here by a factor ~2 either way, as the
    number of disks or the local background may make them), pooling them all would give
    the quiet positions bars too wide and the noisy ones too short (full pooling here: z's
    standard deviation 0.55 and 1.49). The prior's weight is estimated from how much more the
    scales scatter than their residuals explain, so the bars stay calibrated overall and
    within the issue's 0.8-1.25 at both ends (shrinkage pulls each end a little towards the
    middle: 0.81 and 1.15)."""
    rng = np.random.default_rng(12)
    s2_true = 4e-6 * np.exp(rng.normal(0, 0.7, 40000))
    _, _, zm, _ = _scale_calibration(s2_true, 10, rng)
    quiet, noisy = s2_true <= np.quantile(s2_true, 0.2), s2_true >= np.quantile(s2_true, 0.8)
    assert abs(zm.std() - 1) < 0.05, zm.std()
    assert 0.8 < zm[quiet].std() < 1.25 and 0.8 < zm[noisy].std() < 1.25, (
        zm[quiet].std(), zm[noisy].std())
    assert 0.93 < (np.abs(zm) < 2).mean() < 0.97, (np.abs(zm) < 2).mean()
