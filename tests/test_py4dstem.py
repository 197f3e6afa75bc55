"""The py4DSTEM baseline: known strain and rotation recovered, polycrystals indexed, vacuum NaN,
progress and cancel, block independence - on tiny scans (64 x 64 px patterns).

The main scan is rendered here directly from CONVENTIONS.md (``g = A g0`` with ``A`` from
``strain.strain_to_A``), independent of the project's simulator, so a sign or axis slip in either
would show; a second test runs on the simulator's own ground truth.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_stem_strain.io.dataset import Dataset
from napari_stem_strain.methods._py4dstem_lattice import (
    find_basis,
    index_pattern,
    reduce_basis,
)
from napari_stem_strain.methods.base import Cancelled
from napari_stem_strain.methods.py4dstem import Py4DSTEMMethod, detect_disks, run_py4dstem
from napari_stem_strain.methods.runner import run_method
from napari_stem_strain.strain import rotation_matrix, strain_maps, strain_to_A, wrap_angle

Q = 64  # detector px
L = 13.0  # first-order reciprocal vector length, px
R = 2.2  # disk radius, px
STRAIN = (0.012, -0.008, 0.005)  # exx, eyy, exy of the strained block
REF = "0:10,0:4"  # reference region (unstrained, unrotated)
HEX0 = np.array([[L, 0.0], [L * np.cos(2 * np.pi / 3), L * np.sin(2 * np.pi / 3)]])


def _disk(xx: np.ndarray, yy: np.ndarray, c: np.ndarray) -> np.ndarray:
    r = np.hypot(xx - c[0], yy - c[1])
    return 0.5 - 0.5 * np.tanh((r - R) / 0.6)


def render(A: np.ndarray, sample: np.ndarray, seed: int = 0) -> np.ndarray:
    """Kinematic hexagonal patterns ``(Rx, Ry, Q, Q)``: direct beam at a drifting centre plus
    disks at ``centre + A g0`` (vacuum: direct beam only). Light Poisson noise."""
    Rx, Ry = sample.shape
    xx, yy = np.meshgrid(np.arange(Q), np.arange(Q), indexing="ij")
    hk = np.array([(h, k) for h in range(-5, 6) for k in range(-5, 6) if (h, k) != (0, 0)])
    g0 = hk @ HEX0
    amp = 0.12 * np.exp(-0.5 * (np.sum(g0**2, 1) / L**2 - 1))
    amp[(hk[:, 0] + hk[:, 1]) % 3 == 2] *= 0.5  # WS2-like strong/weak first-order sets
    keep = np.linalg.norm(g0, axis=1) < 0.75 * Q
    g0, amp = g0[keep], amp[keep]
    rng = np.random.default_rng(seed)
    out = np.zeros((Rx, Ry, Q, Q), np.float32)
    for i in range(Rx):
        for j in range(Ry):
            c = np.array([Q / 2 + 0.8 * (i / Rx - 0.5), Q / 2 - 0.6 * (j / Ry - 0.5)])
            p = _disk(xx, yy, c)
            if sample[i, j]:
                for g, a in zip(g0 @ A[i, j].T, amp, strict=True):
                    if np.all(np.abs(c + g - Q / 2) < Q / 2 + 2 * R):
                        p += a * _disk(xx, yy, c + g)
            lam = p / p.sum() * 2e6
            out[i, j] = rng.poisson(lam)
    return out


@pytest.fixture(scope="module")
def scan() -> dict:
    """10 x 16 scan: columns 0-3 reference, 4-7 uniformly strained, 8-10 a grain at +25 deg,
    11-13 a grain at -25 deg, 14-15 vacuum."""
    Rx, Ry = 10, 16
    exx, eyy, exy, theta = (np.zeros((Rx, Ry)) for _ in range(4))
    exx[:, 4:8], eyy[:, 4:8], exy[:, 4:8] = STRAIN
    theta[:, 8:11] = 25.0
    theta[:, 11:14] = -25.0
    sample = np.ones((Rx, Ry), bool)
    sample[:, 14:] = False
    A = strain_to_A(exx, eyy, exy, theta)
    data = render(A, sample)
    method = Py4DSTEMMethod(reference=REF)
    calls: list[tuple[int, int, str]] = []
    res = run_method(method, Dataset(data), progress=lambda d, t, m: calls.append((d, t, m)),
                     block_bytes=3 * Ry * Q * Q * 4)  # 3 rows per block: several blocks
    maps = strain_maps(res.A, REF, res.symmetry_deg, mask=res.sample)
    return dict(data=data, res=res, maps=maps, method=method, calls=calls, theta=theta,
                sample=sample)


def test_uniform_strain_recovered(scan: dict) -> None:
    m = scan["maps"]
    for name, true in zip(("exx", "eyy", "exy"), STRAIN, strict=True):
        est = getattr(m, name)
        assert np.all(np.isfinite(est[:, 4:8]))
        assert np.max(np.abs(est[:, 4:8] - true)) < 1e-3, name
        assert np.max(np.abs(est[:, 0:4])) < 1e-3, name  # reference stays unstrained
    assert np.max(np.abs(m.theta[:, 4:8])) < 0.05
    assert scan["res"].symmetry_deg == 60.0


def test_rotated_grains_indexed(scan: dict) -> None:
    m = scan["maps"]
    for cols, angle in ((slice(8, 11), 25.0), (slice(11, 14), -25.0)):
        th = m.theta[:, cols]
        assert np.isfinite(th).mean() >= 0.95
        err = wrap_angle(th - angle, 60.0)
        assert np.nanmax(np.abs(err)) < 0.1
        # a rotated, unstrained grain must not show py4DSTEM's spurious 1 - cos(t) strain
        assert np.nanmax(np.abs(m.exx[:, cols])) < 1e-3
        assert np.nanmax(np.abs(m.eyy[:, cols])) < 1e-3


def test_vacuum_is_nan_and_not_sample(scan: dict) -> None:
    res = scan["res"]
    assert not res.sample[:, 14:].any()
    assert res.sample[:, :14].all()
    assert np.isnan(res.A[:, 14:]).all()
    assert np.isnan(scan["maps"].exx[:, 14:]).all()
    assert "vacuum" in res.settings["probe_template"]


def test_no_vacuum_uses_synthetic_probe(scan: dict) -> None:
    """Without vacuum in the scan the template is a synthetic disk of the measured radius, every
    position is crystal, and the strain is still recovered."""
    res = run_py4dstem(Dataset(scan["data"][:, :14]), reference=REF)
    assert res.settings["probe_template"].startswith("synthetic disk")
    assert abs(res.settings["probe_radius"] - R) < 0.5
    assert res.sample.all()
    m = strain_maps(res.A, REF, res.symmetry_deg, mask=res.sample)
    assert np.max(np.abs(m.exx[:, 4:8] - STRAIN[0])) < 1e-3
    assert np.max(np.abs(m.eyy[:, 4:8] - STRAIN[1])) < 1e-3


def test_user_sample_mask_overrides(scan: dict) -> None:
    mask = np.ones((10, 16), bool)
    mask[:, :2] = False  # call two crystal columns background
    mask[:, 14:] = False
    res = run_py4dstem(Dataset(scan["data"][:, :]), reference="0:10,2:4", sample_mask=mask)
    assert np.array_equal(res.sample, mask)
    assert np.isnan(res.A[:, :2]).all() and np.isfinite(res.A[:, 2:14]).all()
    with pytest.raises(ValueError, match="sample mask"):
        run_py4dstem(Dataset(scan["data"]), reference=REF, sample_mask=np.ones((3, 3), bool))


def test_reference_on_vacuum_is_a_plain_error(scan: dict) -> None:
    with pytest.raises(ValueError, match="reference region 0:10,14:16"):
        run_py4dstem(Dataset(scan["data"]), reference="0:10,14:16")


def test_progress_reported(scan: dict) -> None:
    calls = scan["calls"]
    done = [d for d, _, _ in calls]
    assert done[-1] == calls[-1][1] == 10 * 16
    assert done == sorted(done)
    assert sum(1 for d in done if d > 0) >= 3  # one call per block, several blocks


def test_blocks_are_independent(scan: dict) -> None:
    """One block or many give identical A (prepare() fixes every setting)."""
    data = scan["data"][:2]
    m = scan["method"]
    one = run_method(m, Dataset(data), prepared=True)
    many = run_method(m, Dataset(data), prepared=True, block_bytes=1)
    np.testing.assert_array_equal(one.A, many.A)
    # the prepared method is self-contained: a pickled copy (a dask worker's) gives the same
    import pickle

    rows = pickle.loads(pickle.dumps(m)).process_block(data[1:2], 1)
    np.testing.assert_array_equal(rows["A"], one.A[1:2])
    np.testing.assert_array_equal(rows["sample"], one.sample[1:2])
    np.testing.assert_array_equal(rows["A_cov"], one.A_cov[1:2])


def test_no_figures_left_open(scan: dict) -> None:
    import sys

    plt = sys.modules.get("matplotlib.pyplot")
    assert plt is None or plt.get_fignums() == []


def test_cancel_raises(scan: dict) -> None:
    n = {"polls": 0}

    def stop() -> bool:
        n["polls"] += 1
        return n["polls"] > 2

    with pytest.raises(Cancelled):
        run_py4dstem(Dataset(scan["data"]), reference=REF, should_stop=stop)


def test_detect_disks_finds_lattice(scan: dict) -> None:
    m = scan["method"]
    pattern = scan["data"][5, 1]
    peaks = detect_disks(pattern, m)
    centre = peaks[0]  # strongest first: the direct beam
    frac = np.linalg.solve(HEX0.T, (peaks - centre).T).T
    off = np.linalg.norm((frac - np.round(frac)) @ HEX0, axis=1)
    on = off < 0.3
    # the six first-order disks are all found, and most detections are disks (a few maxima
    # above the noise floor may be ringing)
    first = {(int(h), int(k)) for h, k in np.round(frac[on])} & {
        (1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, -1)}
    assert len(first) == 6
    assert on.mean() >= 0.75
    with pytest.raises(ValueError):
        detect_disks(np.zeros((10, 10)), m)


def test_beam_ringing_is_told_from_disks_by_position(scan: dict) -> None:
    """The bare beam's side maxima (template-matching ringing) must not be taken for disks,
    but only where they are: a global cut at 3x the strongest one, wherever it lies, threw away
    every Bragg disk of data whose first-order disks hold ~2 % of the beam when a noisy vacuum
    probe rang at 0.4 % (validation case rect_dynamical with its reference region: "the Bragg
    disks found do not form a lattice")."""
    import dataclasses

    from napari_stem_strain.methods.py4dstem import _basis_from

    st = dataclasses.replace(scan["method"].derived)
    pattern = scan["data"][5, 1].astype(float)
    # ringing as strong as the beam, but far from every disk: no disk is lost to it
    st.artifact_rel, st.artifacts = 1.0, np.array([[0.0, 300.0, 1.0]])
    g1, g2, n = _basis_from(pattern, st, 1.5)
    lengths = np.sort(np.linalg.norm([g1, g2], axis=1))
    np.testing.assert_allclose(lengths, [L, L], rtol=0.05)
    assert n >= 6
    # a maximum where the beam rings, no more than 3x as strong, is ringing; elsewhere not
    from napari_stem_strain.methods.py4dstem import _ringing

    art = np.array([[10.0, 0.0, 0.01]])
    st.artifacts = art
    found = _ringing(np.array([[10.5, 0.3], [10.0, 0.0], [0.0, 10.0]]),
                     np.array([0.02, 0.05, 0.02]), st, 1.0)
    assert found.tolist() == [True, False, False]


def test_simulator_truth_signs_and_axes() -> None:
    """On the project's simulator the maps match its ground truth (signs, axes, rotation)."""
    from napari_stem_strain.simulate import SimulationSettings, simulate_array
    from napari_stem_strain.strain import mae

    data, gt = simulate_array(SimulationSettings(scan=(12, 12), pattern=64, disk_radius=2.0,
                                                 noise=0.0, dose=None, n_grains=3, seed=3))
    res = run_py4dstem(Dataset(data), reference=gt.reference)
    m = strain_maps(res.A, gt.reference, res.symmetry_deg, mask=res.sample)
    assert np.array_equal(res.sample, gt.sample)
    for k in ("exx", "eyy", "exy"):
        assert mae(getattr(m, k), getattr(gt, k), gt.sample) < 1e-3, k
    assert mae(m.theta, gt.theta, gt.sample, gt.symmetry_deg) < 0.1


def test_bad_settings_are_plain_errors() -> None:
    with pytest.raises(ValueError, match="unknown py4DSTEM setting"):
        Py4DSTEMMethod(treshold=3)
    with pytest.raises(ValueError, match="subpixel"):
        Py4DSTEMMethod(subpixel="none")
    with pytest.raises(ValueError, match="r0:r1,c0:c1"):
        Py4DSTEMMethod(reference="nonsense")


# ------------------------------------------------------------------ lattice maths (no py4DSTEM)
def _lattice_points(G: np.ndarray, n: int = 3) -> np.ndarray:
    hk = np.array([(h, k) for h in range(-n, n + 1) for k in range(-n, n + 1) if (h, k) != (0, 0)])
    return hk @ G.T


def test_reduce_basis_gives_shortest_ccw_cell() -> None:
    a, b = reduce_basis(np.array([10.0, 0.0]), np.array([27.0, 9.0]))
    # same lattice (area 90), shortest vectors: (-3, 9) of length sqrt(90), then (10, 0)
    assert np.isclose(abs(a[0] * b[1] - a[1] * b[0]), 90.0)
    assert np.isclose(a @ a, 90.0) and np.isclose(b @ b, 100.0)
    assert a[0] * b[1] - a[1] * b[0] > 0  # counter-clockwise


def test_find_basis_ignores_a_stray_peak() -> None:
    G = HEX0.T
    v = _lattice_points(G, 2)
    v = np.vstack([v, [[3.0, 4.0]]])  # a noise maximum closer than any disk
    inten = np.ones(len(v))
    inten[-1] = 2.0  # and the brightest
    g1, g2, n = find_basis(v, inten, tol=1.0)
    assert n >= len(v) - 1
    assert np.isclose(abs(np.linalg.det(np.stack([g1, g2], 1))), abs(np.linalg.det(G)))
    assert np.isclose(np.linalg.norm(g1), L) and np.isclose(np.linalg.norm(g2), L)


@pytest.mark.parametrize("angle", [0.0, 25.0, -25.0, 47.0, 133.0])
def test_index_pattern_any_rotation(angle: float) -> None:
    A_true = rotation_matrix(angle) @ np.array([[1.01, 0.004], [0.004, 0.995]])
    G = A_true @ HEX0.T
    origin = np.array([31.3, 32.6])
    pts = np.vstack([origin, origin + _lattice_points(G, 2)])
    rng = np.random.default_rng(1)
    pts = pts + rng.normal(0, 0.02, pts.shape)
    inten = np.r_[10.0, np.ones(len(pts) - 1)]
    res = index_pattern(pts, inten, HEX0.T, 60.0, tol=0.2 * L)
    assert res.fit is not None
    A = res.fit.G @ np.linalg.inv(HEX0.T)
    # equal to A_true up to a lattice symmetry rotation (multiple of 60 deg)
    k = np.round(np.rad2deg(np.arctan2(A[1, 0], A[0, 0]) - np.deg2rad(angle)) / 60.0)
    A_sym = A_true @ rotation_matrix(60.0 * k)
    assert np.allclose(A, A_sym, atol=2e-3)
    assert np.allclose(res.fit.origin, origin, atol=0.05)


@pytest.mark.parametrize("angle", [-25.0, -8.0, -0.6, 0.4, 12.0, 29.0])
def test_index_pattern_keeps_the_branch_nearest_the_basis(angle: float) -> None:
    """A grain rotated by less than half a symmetry period from the basis is fitted on the
    basis's own branch (``A`` a rotation by ``angle``, not ``angle + 60``). The rotation search
    used to run over ``[0, 60)`` degrees, so a grain a little clockwise of the basis came out
    as ``R(angle + 60)``: the same lattice, but against a strained reference ``A_ref S
    A_ref^-1`` is no rotation, and every such position carried the reference's strain as an
    error (a validation seed whose reference region a grain boundary crosses: 2e-2 in exx)."""
    A_true = rotation_matrix(angle) @ np.array([[1.012, 0.003], [0.003, 0.993]])
    G = A_true @ HEX0.T
    origin = np.array([31.3, 32.6])
    pts = np.vstack([origin, origin + _lattice_points(G, 2)])
    inten = np.r_[10.0, np.ones(len(pts) - 1)]
    res = index_pattern(pts, inten, HEX0.T, 60.0, tol=0.2 * L)
    assert res.fit is not None
    A = res.fit.G @ np.linalg.inv(HEX0.T)
    assert np.allclose(A, A_true, atol=2e-3), np.rad2deg(np.arctan2(A[1, 0], A[0, 0]))


def test_index_pattern_rejects_noise() -> None:
    """Random maxima (noise, vacuum) almost never pass as a lattice."""
    fits = 0
    for seed in range(50):
        rng = np.random.default_rng(seed)
        pts = rng.uniform(0, 64, (12, 2))
        res = index_pattern(pts, rng.uniform(0.5, 1, 12), HEX0.T, 60.0, tol=0.2 * L)
        fits += res.fit is not None
    assert fits <= 1


def test_benchmark_page_sections(tmp_path) -> None:
    """benchmarks/common.write_section replaces only its own marked section."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import write_section

    page = tmp_path / "b.md"
    write_section("a", "first A", page)
    write_section("b", "only B", page)
    write_section("a", "second A", page)
    text = page.read_text()
    assert "second A" in text and "first A" not in text and "only B" in text
    assert text.count("<!-- BEGIN a -->") == 1 and text.index("second A") < text.index("only B")
