"""The simulator: ground truth (CONVENTIONS.md), physics, noise, determinism, files, CLI."""

from __future__ import annotations

import argparse
import json
import sys

import h5py
import numpy as np
import pytest

from napari_stem_strain.io.ground_truth import GroundTruth, read_ground_truth, write_ground_truth
from napari_stem_strain.simulate import (
    SimulationSettings,
    Simulator,
    reciprocal_basis,
    simulate_array,
    simulate_to_file,
    simulate_truth,
)
from napari_stem_strain.strain import (
    A_to_strain,
    lattice_symmetry,
    parse_region,
    strain_to_A,
    wrap_angle,
)

SMALL = dict(scan=(12, 14), pattern=48, disk_radius=2.5)


def small(**kw) -> SimulationSettings:
    return SimulationSettings(**{**SMALL, **kw})


# ----------------------------------------------------------------------------- ground truth
@pytest.mark.parametrize("lattice,period", [("hex", 60.0), ("square", 90.0), ("rect", 180.0)])
def test_truth_layout_and_reference_grain(lattice, period):
    s = SimulationSettings(scan=(40, 36), lattice=lattice, seed=3)
    gt, A = simulate_truth(s)
    assert gt.symmetry_deg == period
    for k in ("exx", "eyy", "exy", "theta"):
        m = getattr(gt, k)
        assert m.shape == (40, 36) and m.dtype == np.float32
        assert np.isnan(m[~gt.sample]).all() and np.isfinite(m[gt.sample]).all()
    assert gt.sample.dtype == bool and gt.grains.shape == (40, 36)
    assert (gt.grains[~gt.sample] == -1).all() and (gt.grains[gt.sample] >= 0).all()
    assert A.shape == (40, 36, 2, 2)
    # theta wrapped into the symmetry period
    t = gt.theta[gt.sample]
    assert (t > -period / 2).all() and (t <= period / 2).all()
    # the reference rectangle lies wholly inside the reference grain, which is unstrained
    rs, cs = parse_region(gt.reference)
    assert rs.stop - rs.start >= 1 and cs.stop - cs.start >= 1
    assert gt.sample[rs, cs].all()
    ref_grain = np.unique(gt.grains[rs, cs])
    assert ref_grain.tolist() == [0]
    for k in ("exx", "eyy", "exy", "theta"):
        assert np.all(getattr(gt, k)[gt.grains == 0] == 0)
    ref_A = A[gt.grains == 0]
    np.testing.assert_allclose(ref_A, np.broadcast_to(np.eye(2), ref_A.shape), atol=1e-12)
    # a 40x36 scan gets a reference square of a few positions on a side
    assert rs.stop - rs.start >= 3


def test_truth_statistics_and_consistency():
    s = SimulationSettings(scan=(64, 64), seed=1, max_strain=0.02, max_rotation=25.0)
    gt, A = simulate_truth(s)
    assert 0.12 < 1 - gt.sample.mean() < 0.24  # vacuum ~18 %
    assert len(np.unique(gt.grains[gt.sample])) >= 5
    lim = s.max_strain + s.intra_strain + 1e-6
    for k in ("exx", "eyy", "exy"):
        v = getattr(gt, k)[gt.sample]
        assert np.abs(v).max() <= lim
        assert np.abs(v).max() > 0.003  # grains really are strained
    # the maps are exactly what the shared strain maths reads back from the true A
    exx, eyy, exy, th = A_to_strain(A, gt.symmetry_deg)
    for mine, back in zip((gt.exx, gt.eyy, gt.exy, gt.theta), (exx, eyy, exy, th), strict=True):
        np.testing.assert_allclose(mine[gt.sample], back[gt.sample], atol=2e-6)
    # smooth variation inside a grain (not a constant)
    g = np.bincount(gt.grains[gt.sample]).argmax()
    inner = gt.exx[(gt.grains == g)] if g else gt.exx[gt.grains == 1]
    assert np.ptp(inner) > 1e-4


def test_no_vacuum_and_single_grain():
    gt, _ = simulate_truth(SimulationSettings(scan=(16, 16), vacuum=False, n_grains=1))
    assert gt.sample.all()
    assert np.all(gt.exx == 0) and np.all(gt.theta == 0)


def test_tiny_scans_work():
    for scan in [(1, 1), (1, 5), (3, 2)]:
        data, gt = simulate_array(SimulationSettings(scan=scan, pattern=32, disk_radius=2))
        assert data.shape == (*scan, 32, 32)
        rs, cs = parse_region(gt.reference)
        assert gt.sample[rs, cs].all()


def test_rotation_beyond_symmetry_is_wrapped():
    gt, A = simulate_truth(SimulationSettings(scan=(32, 32), max_rotation=80, seed=5))
    assert np.nanmax(np.abs(gt.theta)) <= 30.0


# ---------------------------------------------------------------------------------- physics
def _com(img, centre, radius):
    x, y = np.meshgrid(np.arange(img.shape[0]), np.arange(img.shape[1]), indexing="ij")
    win = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= radius**2
    w = img * win
    return np.array([(w * x).sum(), (w * y).sum()]) / w.sum()


@pytest.mark.parametrize("lattice", ["hex", "square", "rect"])
def test_disks_sit_at_A_g0_plus_centre(lattice):
    s = SimulationSettings(scan=(24, 24), pattern=96, disk_radius=3.0, lattice=lattice, dose=None,
                           noise=0.0, disk_gradient=0.0, seed=2, max_rotation=20)
    sim = Simulator(s)
    gt = sim.truth
    # a position in a strained, rotated grain
    cand = np.argwhere(gt.sample & (gt.grains > 0) & (np.abs(gt.theta) > 2))
    i, j = cand[len(cand) // 2]
    pat = sim.clean_rows(i, i + 1)[0, j]
    centre = sim.center[i, j]
    np.testing.assert_allclose(_com(pat, centre, 3.0 + 2.5), centre, atol=0.1)
    g = sim.A[i, j] @ sim.g0.T  # (2, nref)
    checked = 0
    for k in range(len(sim.g0)):
        pred = centre + g[:, k]
        if np.linalg.norm(g[:, k]) > 1.05 * np.linalg.norm(sim.g0, axis=1).min() * 1.8:
            continue
        if not (8 <= pred[0] <= 96 - 9 and 8 <= pred[1] <= 96 - 9):
            continue
        np.testing.assert_allclose(_com(pat, pred, 3.0 + 2.5), pred, atol=0.1)
        checked += 1
    assert checked >= 4
    # the brightest off-centre pixel belongs to a first-order disk
    masked = pat.copy()
    x, y = np.meshgrid(np.arange(96), np.arange(96), indexing="ij")
    masked[np.hypot(x - centre[0], y - centre[1]) < 3.0 + 4] = 0
    peak = np.array(np.unravel_index(np.argmax(masked), masked.shape))
    first = centre[:, None] + g[:, :6]
    assert np.min(np.linalg.norm(first - peak[:, None], axis=0)) <= 3.0


def test_hex_first_order_alternates_strong_weak():
    s = SimulationSettings(scan=(4, 4), pattern=96, dose=None, dynamical=0.0, vacuum=False,
                           n_grains=1, descan=0.0, disk_gradient=0.0)
    sim = Simulator(s)
    pat = sim.clean_rows(0, 1)[0, 0]
    c = sim.center[0, 0]
    L = s.resolved().g_length
    sums = []
    for a in range(0, 360, 60):
        p = c + L * np.array([np.cos(np.radians(a)), np.sin(np.radians(a))])
        ij = np.round(p).astype(int)
        sums.append(pat[ij[0] - 8:ij[0] + 9, ij[1] - 8:ij[1] + 9].sum())
    sums = np.array(sums)
    strong, weak = sums[0::2], sums[1::2]
    assert np.ptp(strong) < 1e-3 * strong.mean() and np.ptp(weak) < 1e-3 * weak.mean()
    np.testing.assert_allclose(weak / strong, s.hex_weak, rtol=1e-3)
    # first-order disks are weak next to the direct beam
    assert 0.02 < strong.max() / pat.sum() < 0.2


def test_vacuum_patterns_have_no_bragg_disks():
    s = SimulationSettings(scan=(24, 24), pattern=64, disk_radius=3, dose=None, seed=4)
    data, gt = simulate_array(s)
    vac = ~gt.sample
    assert vac.any()
    x, y = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    sim = Simulator(s)
    for i, j in np.argwhere(vac)[:20]:
        c = sim.center[i, j]
        outside = np.hypot(x - c[0], y - c[1]) > 3 + 5
        assert data[i, j][outside].max() < 1e-4 * data[i, j].max()
    # while crystal patterns do have them
    i, j = np.argwhere(gt.sample)[0]
    c = sim.center[i, j]
    outside = np.hypot(x - c[0], y - c[1]) > 3 + 5
    assert data[i, j][outside].max() > 0.01 * data[i, j].max()


def test_bragg_intensity_knob():
    a = Simulator(small(bragg_intensity=0.05, dose=None, vacuum=False)).clean_rows(0, 1)
    b = Simulator(small(bragg_intensity=0.005, dose=None, vacuum=False)).clean_rows(0, 1)
    x, y = np.meshgrid(np.arange(48), np.arange(48), indexing="ij")
    far = np.hypot(x - 24, y - 24) > 2.5 + 6
    ratio = b[..., far].sum() / a[..., far].sum()
    assert 0.09 < ratio < 0.11


# ------------------------------------------------------------------------------------ noise
def test_poisson_total_is_dose():
    dose = 2e4
    data, gt = simulate_array(small(dose=dose, noise=0.4))
    tot = data.sum(axis=(2, 3))
    assert np.all(data == np.round(data)) and data.min() >= 0
    assert abs(tot.mean() - dose) < 3 * np.sqrt(dose / tot.size) + 1
    assert np.all(np.abs(tot - dose) < 6 * np.sqrt(dose))


def test_background_mix_keeps_total_and_fills_pattern():
    clean = Simulator(small(dose=None, noise=0.0)).render_rows(0, 2)
    noisy = Simulator(small(dose=None, noise=0.5)).render_rows(0, 2)
    np.testing.assert_allclose(noisy.sum(axis=(2, 3)), clean.sum(axis=(2, 3)), rtol=1e-4)
    # the background spreads intensity over the whole detector
    assert (noisy > 0).mean() > 0.99
    assert noisy[..., 0, 0].min() > 0


def test_noise_free_dtype_and_zero_noise_limits():
    data, _ = simulate_array(small(dose=None))
    assert data.dtype == np.float32 and data.min() >= 0


# ------------------------------------------------------------------------------ determinism
def test_deterministic_with_seed_and_independent_of_blocking():
    s = small(noise=0.3, dose=1e4)
    a, ga = simulate_array(s)
    b, gb = simulate_array(s)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ga.exx, gb.exx)
    c, _ = simulate_array(small(noise=0.3, dose=1e4, seed=1))
    assert not np.array_equal(a, c)
    sim = Simulator(s)
    rows = np.concatenate([sim.render_rows(r, r + 1) for r in range(s.scan[0])])
    np.testing.assert_array_equal(rows, a)
    for workers in (1, 3):
        d, _ = simulate_array(small(noise=0.3, dose=1e4, scan=(40, 14)), workers=workers)
        if workers == 1:
            ref = d
    np.testing.assert_array_equal(d, ref)


def test_file_round_trip_equals_array(tmp_path):
    s = small(noise=0.2, dose=5e3, seed=7)
    path = simulate_to_file(tmp_path / "sim.h5", s)
    data, gt = simulate_array(s)
    with h5py.File(path, "r") as h5:
        d = h5["data"]
        assert d.shape == data.shape and d.dtype == np.uint16
        assert d.chunks == (1, s.scan[1], s.pattern, s.pattern)
        np.testing.assert_array_equal(d[()].astype(np.float32), data)
        assert d.attrs["r_units"] == "nm" and d.attrs["q_units"] == "1/nm"
        assert d.attrs["q_pixel_size"] > 0 and d.attrs["r_pixel_size"] > 0
        back = SimulationSettings.from_dict(json.loads(d.attrs["simulation_settings"]))
        assert back.resolved() == s.resolved()
        # the biggest 4D dataset is /data
        sizes = {}
        h5.visititems(lambda n, o: sizes.__setitem__(n, o.size)
                      if isinstance(o, h5py.Dataset) and o.ndim == 4 else None)
        assert max(sizes, key=sizes.get) == "data"
    rt = read_ground_truth(path)
    assert isinstance(rt, GroundTruth)
    for k in ("exx", "eyy", "exy", "theta"):
        np.testing.assert_array_equal(getattr(rt, k), getattr(gt, k))
    np.testing.assert_array_equal(rt.sample, gt.sample)
    np.testing.assert_array_equal(rt.grains, gt.grains)
    assert rt.reference == gt.reference and rt.symmetry_deg == 60.0
    assert rt.A.shape == (*s.scan, 2, 2) and rt.center.shape == (*s.scan, 2)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_file_dtypes(tmp_path):
    p = simulate_to_file(tmp_path / "f.h5", small(dose=None))
    with h5py.File(p, "r") as h5:
        assert h5["data"].dtype == np.float32
    p = simulate_to_file(tmp_path / "u32.h5", small(scan=(2, 3), dose=1e7))
    with h5py.File(p, "r") as h5:
        assert h5["data"].dtype == np.uint32
        assert h5["data"][()].max() > 65535
    p = simulate_to_file(tmp_path / "gz.h5", small(scan=(2, 3)), compression="gzip")
    with h5py.File(p, "r") as h5:
        assert h5["data"].compression == "gzip"


def test_cancel_leaves_nothing(tmp_path):
    from napari_stem_strain.methods.base import Cancelled

    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(Cancelled):
        simulate_to_file(tmp_path / "c.h5", small(scan=(40, 14)), should_stop=stop)
    assert list(tmp_path.iterdir()) == []


def test_progress_reports_positions(tmp_path):
    seen = []
    simulate_to_file(tmp_path / "p.h5", small(), progress=lambda d, t, m="": seen.append((d, t)))
    assert seen[-1] == (12 * 14, 12 * 14)


def test_ground_truth_io(tmp_path):
    gt, _ = simulate_truth(small())
    with h5py.File(tmp_path / "g.h5", "w") as h5:
        write_ground_truth(h5, gt)
        write_ground_truth(h5, gt)  # replacing works
    back = read_ground_truth(tmp_path / "g.h5")
    np.testing.assert_array_equal(back.theta, gt.theta)
    with h5py.File(tmp_path / "none.h5", "w") as h5:
        h5["data"] = np.zeros((2, 2, 4, 4))
    assert read_ground_truth(tmp_path / "none.h5") is None
    assert read_ground_truth(tmp_path / "missing.h5") is None
    (tmp_path / "text.h5").write_text("not hdf5")
    assert read_ground_truth(tmp_path / "text.h5") is None


def test_reciprocal_basis_symmetry():
    for lattice, period in (("hex", 60), ("square", 90), ("rect", 180)):
        b = reciprocal_basis(lattice, 20.0, angle_deg=13.0)
        assert lattice_symmetry(b[0], b[1]) == period
    b = reciprocal_basis("hex", 20.0, 13.0)
    np.testing.assert_allclose(np.degrees(np.arctan2(b[0, 1], b[0, 0])), 13.0)


def test_lattice_angle_keeps_truth_frame():
    s = SimulationSettings(scan=(24, 24), pattern=96, dose=None, lattice_angle=17.0,
                           disk_gradient=0, seed=2)
    sim = Simulator(s)
    i, j = np.argwhere(sim.truth.sample & (sim.truth.grains > 0))[0]
    g = strain_to_A(sim.truth.exx[i, j], sim.truth.eyy[i, j], sim.truth.exy[i, j],
                    sim.truth.theta[i, j]) @ sim.g0[0]
    pat = sim.clean_rows(i, i + 1)[0, j]
    # the truth A and the wrapped truth angle describe the same set of spots (modulo symmetry)
    pred = sim.center[i, j] + g
    assert pat[tuple(np.round(pred).astype(int))] > 0.5 * s.bragg_intensity
    assert abs(wrap_angle(sim.truth.theta[i, j], 60)) <= 30


# -------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("kw", [
    dict(noise=1.0), dict(noise=-0.1), dict(scan=(0, 4)), dict(pattern=4), dict(dose=0),
    dict(lattice="tri"), dict(disk_radius=0), dict(n_grains=0), dict(dynamical=1.5),
    dict(g_length=3.0),
])
def test_bad_settings_raise(kw):
    with pytest.raises(ValueError):
        SimulationSettings(**kw).resolved()


def test_overlapping_disks_are_refused():
    with pytest.raises(ValueError, match="would overlap"):
        SimulationSettings(pattern=32, disk_radius=4).resolved()


# -------------------------------------------------------------------------------------- CLI
def _cli(argv):
    """Run ``stem-strain`` with ``argv``; falls back to a parser with only ``simulate`` when
    another sub-command module is not there yet."""
    try:
        from napari_stem_strain.cli import build_parser, main

        build_parser()
    except ImportError:
        from napari_stem_strain.cli import simulate as cmd

        def main(argv):
            p = argparse.ArgumentParser(prog="stem-strain")
            cmd.register(p.add_subparsers(dest="command"))
            args = p.parse_args(argv)
            try:
                return args.func(args)
            except (ValueError, OSError) as err:
                print(f"stem-strain: error: {err}", file=sys.stderr)
                return 2

    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_cli_writes_file(tmp_path, capsys):
    out = tmp_path / "cli.h5"
    rc = _cli(["simulate", str(out), "--scan", "6", "5", "--pattern", "32", "--disk-radius", "2",
               "--noise", "0.2", "--dose", "3000", "--seed", "3", "--grains", "3",
               "--bragg-intensity", "0.01", "--quiet"])
    assert rc == 0
    with h5py.File(out, "r") as h5:
        assert h5["data"].shape == (6, 5, 32, 32)
        s = SimulationSettings.from_dict(json.loads(h5["data"].attrs["simulation_settings"]))
    assert s.n_grains == 3 and s.bragg_intensity == 0.01 and s.seed == 3
    gt = read_ground_truth(out)
    assert gt is not None and gt.exx.shape == (6, 5)
    rc = _cli(["simulate", str(tmp_path / "np.h5"), "--scan", "3", "3", "--pattern", "32",
               "--disk-radius", "2", "--no-poisson", "--no-vacuum", "--lattice", "rect", "--quiet"])
    assert rc == 0
    with h5py.File(tmp_path / "np.h5", "r") as h5:
        assert h5["data"].dtype == np.float32
        assert h5["ground_truth"]["sample"][()].all()
        assert h5["ground_truth"].attrs["symmetry_deg"] == 180


@pytest.mark.parametrize("args", [
    ["--noise", "1.2"], ["--noise", "x"], ["--scan", "0", "4"], ["--pattern", "-3"],
    ["--dose", "-5"], ["--lattice", "tri"], ["--disk-radius", "0"], ["--grains", "0"],
    ["--pattern", "32"], ["--scan", "4"], ["--dose", "1e5", "--no-poisson"],
])
def test_cli_bad_arguments_one_line(tmp_path, capsys, args):
    out = tmp_path / "bad.h5"
    rc = _cli(["simulate", str(out), "--quiet", *args])
    assert rc != 0
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_cli_missing_folder(tmp_path, capsys):
    rc = _cli(["simulate", str(tmp_path / "nope" / "x.h5"), "--quiet"])
    assert rc != 0
    assert "does not exist" in capsys.readouterr().err
