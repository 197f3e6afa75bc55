"""Property tests of the one strain-maths module (CONVENTIONS.md)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from napari_stem_strain.strain import (
    A_to_F,
    A_to_strain,
    F_to_A,
    format_region,
    lattice_symmetry,
    mae,
    normalise_to_reference,
    parse_region,
    polar_decompose,
    reference_A,
    rotation_matrix,
    strain_maps,
    strain_to_A,
    strain_to_F,
    wrap_angle,
)

strain_c = st.floats(-0.2, 0.2, allow_nan=False)
angle = st.floats(-179.9, 179.9, allow_nan=False)
any_angle = st.floats(-1e4, 1e4, allow_nan=False)
period = st.sampled_from([60.0, 90.0, 180.0, 360.0])


def _valid(exx, eyy, exy):
    """V = I + e must be positive definite for (V, R) to be a polar decomposition."""
    V = np.array([[1 + exx, exy], [exy, 1 + eyy]])
    return np.all(np.linalg.eigvalsh(V) > 0.05)


@settings(max_examples=200, deadline=None)
@given(strain_c, strain_c, strain_c, angle)
def test_random_F_round_trips(exx, eyy, exy, theta):
    assume(_valid(exx, eyy, exy))
    A = strain_to_A(exx, eyy, exy, theta)
    e = A_to_strain(A)
    np.testing.assert_allclose(e[:3], [exx, eyy, exy], atol=1e-9)
    assert abs(wrap_angle(e[3] - theta)) < 1e-7
    # F and A are inverse-transposes of each other
    F = strain_to_F(exx, eyy, exy, theta)
    np.testing.assert_allclose(A_to_F(A), F, atol=1e-12)
    np.testing.assert_allclose(F_to_A(F), A, atol=1e-12)
    # and F = V R with V symmetric
    V, t = polar_decompose(F)
    np.testing.assert_allclose(V, V.T, atol=1e-12)
    np.testing.assert_allclose(V @ rotation_matrix(t), F, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, (3, 4, 3), elements=st.floats(-0.1, 0.1)),
       arrays(np.float64, (3, 4), elements=angle))
def test_batched_round_trip(e, theta):
    A = strain_to_A(e[..., 0], e[..., 1], e[..., 2], theta)
    assert A.shape == (3, 4, 2, 2)
    exx, eyy, exy, t = A_to_strain(A)
    np.testing.assert_allclose(np.stack([exx, eyy, exy], -1), e, atol=1e-9)
    np.testing.assert_allclose(wrap_angle(t - theta), 0, atol=1e-7)


@settings(max_examples=200, deadline=None)
@given(any_angle)
def test_pure_rotation_gives_zero_strain(theta):
    A = strain_to_A(0.0, 0.0, 0.0, theta)
    exx, eyy, exy, t = A_to_strain(A)
    np.testing.assert_allclose([exx, eyy, exy], 0, atol=1e-12)
    assert abs(wrap_angle(t - theta)) < 1e-7
    # A of a pure rotation is that rotation: reciprocal vectors turn with the crystal
    np.testing.assert_allclose(A, rotation_matrix(theta), atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(any_angle, period)
def test_rotation_reported_within_symmetry(theta, p):
    t = A_to_strain(strain_to_A(0.0, 0.0, 0.0, theta), p)[3]
    assert -p / 2 < t <= p / 2
    assert abs(wrap_angle(t - theta, p)) < 1e-7


@settings(max_examples=100, deadline=None)
@given(st.floats(-0.2, 0.2), st.floats(-180, 180))
def test_known_uniaxial_strain(e, phi):
    # lattice stretched by e along x only: real space F = diag(1+e, 1), so A = diag(1/(1+e), 1)
    A = np.diag([1.0 / (1.0 + e), 1.0])
    exx, eyy, exy, t = A_to_strain(A)
    np.testing.assert_allclose([exx, eyy, exy, t], [e, 0, 0, 0], atol=1e-12)
    # the same strain along a direction n at phi: V = I + e n n^T
    n = np.array([np.cos(np.radians(phi)), np.sin(np.radians(phi))])
    F = np.eye(2) + e * np.outer(n, n)
    exx, eyy, exy, t = A_to_strain(F_to_A(F))
    np.testing.assert_allclose([exx, eyy, exy], [e * n[0] ** 2, e * n[1] ** 2, e * n[0] * n[1]],
                               atol=1e-12)
    assert abs(t) < 1e-9


def test_positive_strain_means_expanded_lattice_and_shorter_g():
    A = strain_to_A(0.01, 0.0, 0.0, 0.0)
    g0 = np.array([10.0, 0.0])
    assert np.linalg.norm(A @ g0) < 10.0  # real-space expansion shrinks reciprocal vectors


def test_theta_counter_clockwise_from_x_toward_y():
    # rotating by +90 takes a reciprocal vector along +x to +y
    A = strain_to_A(0, 0, 0, 90.0)
    np.testing.assert_allclose(A @ np.array([1.0, 0.0]), [0.0, 1.0], atol=1e-12)
    assert A_to_strain(A)[3] == pytest.approx(90.0)


@settings(max_examples=50, deadline=None)
@given(arrays(np.bool_, (4, 5)))
def test_nan_stays_nan(bad):
    rng = np.random.default_rng(0)
    A = strain_to_A(*(rng.uniform(-0.02, 0.02, (4, 5)) for _ in range(3)),
                    rng.uniform(-20, 20, (4, 5)))
    A[bad, 0, 1] = np.nan
    for m in A_to_strain(A, 60.0):
        assert np.isnan(m[bad]).all()
        assert np.isfinite(m[~bad]).all()
    assert np.isnan(A_to_F(A)[bad]).all()


def test_reflection_and_singular_give_nan():
    for A in (np.array([[1.0, 0], [0, -1.0]]), np.zeros((2, 2))):
        assert all(np.isnan(v) for v in A_to_strain(A))


@settings(max_examples=300, deadline=None)
@given(st.one_of(any_angle, st.just(np.nan)), period)
def test_wrap_angle(t, p):
    w = float(wrap_angle(t, p))
    if np.isnan(t):
        assert np.isnan(w)
        return
    assert -p / 2 < w <= p / 2
    k = (t - w) / p
    assert abs(k - round(k)) < 1e-6


def test_wrap_angle_edges():
    assert wrap_angle(-30.0, 60.0) == 30.0
    assert wrap_angle(30.0, 60.0) == 30.0
    assert wrap_angle(90.0, 60.0) == 30.0
    assert wrap_angle(31.0, 60.0) == pytest.approx(-29.0)
    np.testing.assert_array_equal(np.isnan(wrap_angle(np.array([np.nan, 1.0]))), [True, False])


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, 20, elements=st.floats(-0.05, 0.05)),
       arrays(np.bool_, 20), arrays(np.bool_, 20))
def test_mae_with_nan_penalty(truth, dropped, vacuum):
    sample = ~vacuum
    est = truth.copy()
    est[dropped] = np.nan
    est[vacuum] = 123.0  # anything outside the sample is ignored
    m = mae(est, truth, sample)
    if not sample.any():
        assert np.isnan(m)
        return
    penalty = np.abs(truth[sample]).max()
    expected = (dropped & sample).sum() * penalty / sample.sum()
    assert m == pytest.approx(expected, abs=1e-12)
    # dropping positions never beats a bounded honest estimate within the truth's range
    honest = mae(np.zeros_like(truth), truth, sample)
    assert honest <= penalty + 1e-15


def test_mae_wraps_rotation():
    truth = np.array([29.0, -29.0, 0.0])
    est = np.array([-29.0, 29.0, 60.0])
    s = np.ones(3, bool)
    assert mae(est, truth, s, period_deg=60.0) == pytest.approx(4.0 / 3.0)
    assert mae(est, truth, s) == pytest.approx((58 + 58 + 60) / 3)


def test_mae_simple_values():
    assert mae(np.array([1.0, 2.0]), np.array([0.0, 0.0]), np.array([True, True])) == 1.5


def test_reference_A_errors_on_bad_regions():
    A = np.tile(np.eye(2), (8, 8, 1, 1))
    with pytest.raises(ValueError, match="empty or outside"):
        reference_A(A, "3:3,0:4")
    with pytest.raises(ValueError, match="empty or outside"):
        reference_A(A, "20:30,0:4")
    mask = np.ones((8, 8), bool)
    mask[:4, :4] = False
    with pytest.raises(ValueError, match="no fitted sample"):
        reference_A(A, "0:4,0:4", mask)
    B = A.copy()
    B[4:, 4:] = np.nan
    with pytest.raises(ValueError, match="no fitted sample"):
        reference_A(B, "4:8,4:8")
    with pytest.raises(ValueError, match="r0:r1,c0:c1"):
        reference_A(A, "rows 1 to 3")
    # a region partly on vacuum uses only the sample positions
    B = A * 1.0
    B[:2, :2] = 2 * np.eye(2)
    m = np.ones((8, 8), bool)
    m[:2, :2] = False
    np.testing.assert_allclose(reference_A(B, "0:4,0:4", m), np.eye(2))


@settings(max_examples=50, deadline=None)
@given(strain_c, strain_c, strain_c, angle, strain_c, angle)
def test_normalise_to_reference(exx, eyy, exy, theta, eref, tref):
    assume(_valid(exx, eyy, exy))
    A_true = strain_to_A(exx, eyy, exy, theta)
    A_ref = strain_to_A(eref, -eref / 2, 0.0, tref)  # any basis the method happened to use
    A_raw = A_true @ A_ref
    np.testing.assert_allclose(normalise_to_reference(A_raw, A_ref), A_true, atol=1e-10)


def test_strain_maps_zero_in_reference_and_nan_outside_mask():
    rng = np.random.default_rng(1)
    e = rng.uniform(-0.02, 0.02, (3, 10, 12))
    e[:, :4, :4] = 0
    th = rng.uniform(-10, 10, (10, 12))
    th[:4, :4] = 0
    A_true = strain_to_A(e[0], e[1], e[2], th)
    basis = np.array([[20.0, 1.0], [-10.0, 17.0]])
    mask = np.ones((10, 12), bool)
    mask[-2:] = False
    maps = strain_maps(A_true @ basis, "0:4,0:4", 60.0, mask)
    for k, ref in zip(("exx", "eyy", "exy", "theta"), (*e, th), strict=True):
        m = getattr(maps, k)
        assert m.dtype == np.float32
        np.testing.assert_allclose(m[:4, :4], 0, atol=1e-6)
        assert np.isnan(m[~mask]).all()
        np.testing.assert_allclose(m[mask], ref[mask], atol=1e-5)


def test_region_round_trip():
    assert parse_region("1:5, 2:9") == (slice(1, 5), slice(2, 9))
    assert format_region((slice(1, 5), slice(2, 9))) == "1:5,2:9"
    with pytest.raises(ValueError):
        parse_region("1:5")


def test_lattice_symmetry():
    c, s = np.cos(np.radians(120)), np.sin(np.radians(120))
    assert lattice_symmetry([1, 0], [c, s]) == 60.0
    assert lattice_symmetry([1, 0], [0, 1]) == 90.0
    assert lattice_symmetry([1, 0], [0, 1.3]) == 180.0
    assert lattice_symmetry([0, 0], [0, 1]) == 180.0


@pytest.mark.parametrize("basis_deg", [0.0, 30.0, 47.0])
def test_reference_median_strain_is_zero_whatever_the_methods_basis(basis_deg):
    """CONVENTIONS.md: in the reference region the median strain and rotation are zero by
    construction. An element-wise median of the *raw* ``A`` is not: raw entries mix strain
    and rotation through the method's own basis, and with skewed scatter (low dose, a few
    bad fits) the median of the mix is not the mix of the medians (seen: median exx
    -2.6e-3 over the reference of a low-dose multislice case). Must hold for any basis."""
    rng = np.random.default_rng(3)
    n = 400
    # skewed, correlated scatter: most positions near zero, a tail of compressed/rotated ones
    tail = rng.random(n) < 0.3
    exx = rng.normal(0, 1e-3, n) - tail * rng.exponential(4e-3, n)
    eyy = rng.normal(0, 1e-3, n) - tail * rng.exponential(3e-3, n)
    exy = rng.normal(0, 5e-4, n) + tail * rng.exponential(2e-3, n)
    th = rng.normal(0, 0.05, n) + tail * rng.exponential(0.3, n)
    A_true = strain_to_A(exx, eyy, exy, th).reshape(20, 20, 2, 2)
    basis = 21.0 * rotation_matrix(basis_deg) @ np.array([[1.0, 0.5], [0.0, np.sqrt(3) / 2]])
    maps = strain_maps(A_true @ basis, "0:20,0:20", 60.0)
    for k in ("exx", "eyy", "exy"):
        assert abs(np.median(getattr(maps, k))) < 1e-6, k
    assert abs(np.median(maps.theta)) < 1e-4


def test_bias_and_scatter_splits_a_grain_offset_from_the_noise_about_it():
    """Each grain carries its own offset (its systematic error) plus noise: the split must
    give back the offsets' mean magnitude as the bias, the noise alone as the scatter, and
    the largest offset - the part of an MAE that averaging over a grain cannot remove."""
    from napari_stem_strain.strain import bias_and_scatter

    rng = np.random.default_rng(3)
    grains = np.repeat(np.arange(4), 250).reshape(40, 25)
    offsets = np.array([0.0, 2e-3, -1e-3, 0.5e-3])
    noise = rng.choice([-1e-4, 1e-4], grains.shape)  # |noise| exactly 1e-4, mean ~0
    noise -= np.array([noise[grains == g].mean() for g in range(4)])[grains]
    truth = rng.normal(0, 1e-2, grains.shape)
    est = truth + offsets[grains] + noise
    sample = np.ones(grains.shape, bool)
    est[0, 0] = np.nan  # a position the method left unfitted is not part of either
    sample[-1, :] = False  # nor is vacuum
    est[-1, :] = 99.0
    bias, scatter, worst = bias_and_scatter(est, truth, grains, sample)
    counted = sample & np.isfinite(est)  # each grain's bias weighs by its counted positions
    assert bias == pytest.approx(np.abs(offsets)[grains[counted]].mean(), rel=0.01)
    assert scatter == pytest.approx(1e-4, rel=0.05)
    assert worst == pytest.approx(2e-3, rel=1e-3)


def test_bias_and_scatter_wraps_rotation_into_the_symmetry_period():
    """A grain measured at +29.9 deg against a truth of -29.9 deg on a hexagonal lattice is
    0.2 deg off, not 59.8."""
    from napari_stem_strain.strain import bias_and_scatter

    grains = np.zeros((2, 2), int)
    bias, scatter, worst = bias_and_scatter(np.full((2, 2), 29.9), np.full((2, 2), -29.9),
                                            grains, np.ones((2, 2), bool), period_deg=60.0)
    assert bias == pytest.approx(0.2) and worst == pytest.approx(0.2)
    assert scatter == pytest.approx(0.0, abs=1e-12)
