"""Virtual images and the direct-beam finder."""

from __future__ import annotations

import numpy as np
import pytest

from napari_stem_strain.io.dataset import Dataset
from napari_stem_strain.methods.base import Cancelled
from napari_stem_strain.virtual import (
    VirtualImages,
    annulus_mask,
    disk_mask,
    find_direct_beam,
    virtual_images,
)


def _pattern(shape=(128, 160), centre=(60.3, 70.7), radius=12.0, bragg=0.005, diffuse=0.2,
             hot=True, dose=1000.0, seed=0, g=30.0):
    """A direct beam (top hat with a one-pixel soft edge), six Bragg disks at ``bragg`` of its
    intensity, a diffuse background ``diffuse`` x the beam falling off from the centre, hot
    pixels and Poisson noise."""
    x = np.arange(shape[0])[:, None] - centre[0]
    y = np.arange(shape[1])[None, :] - centre[1]
    p = np.clip(radius + 0.5 - np.hypot(x, y), 0, 1) * dose
    for gx, gy in [(g, 0), (0, g), (g, g), (-g, 0), (0, -g), (-g, -g)]:
        p += np.clip(radius + 0.5 - np.hypot(x - gx, y - gy), 0, 1) * dose * bragg
    p += diffuse * dose * np.exp(-np.hypot(x, y) / 40.0)
    p = np.random.default_rng(seed).poisson(p).astype(np.float64)
    if hot:
        p[5, 5] = 1e3 * dose
        p[-1, 3] = 5e2 * dose
    return p


@pytest.mark.parametrize("kw", [
    {},                                   # Bragg disks at 0.5 % of the beam
    {"bragg": 0.002, "diffuse": 0.8},     # strong diffuse background
    {"bragg": 0.4},                       # strong Bragg disks (still below the beam)
    {"radius": 3.0, "g": 15.0},           # small beam
    {"radius": 30.0, "g": 70.0, "shape": (256, 256), "centre": (131.6, 120.2)},
    {"radius": 1.5, "shape": (16, 16), "centre": (7.2, 8.1), "g": 5.0},  # tiny detector
])
def test_find_direct_beam(kw):
    p = _pattern(**kw)
    cx, cy, r = find_direct_beam(p)
    c = kw.get("centre", (60.3, 70.7))
    assert abs(cx - c[0]) < 0.25 and abs(cy - c[1]) < 0.25
    assert r == pytest.approx(kw.get("radius", 12.0), abs=0.4)


def test_find_direct_beam_flat_and_bad_input():
    assert find_direct_beam(np.zeros((10, 12))) == (4.5, 5.5, 0.0)
    assert find_direct_beam(np.full((8, 8), 3.0))[2] == 0.0
    with pytest.raises(ValueError):
        find_direct_beam(np.zeros((3, 4, 5)))
    p = _pattern(hot=False)
    p[10:12, 10:12] = np.nan
    cx, cy, _ = find_direct_beam(p)
    assert abs(cx - 60.3) < 0.25


def test_masks():
    d = disk_mask((11, 11), (5, 5), 2)
    assert d.sum() == 13 and d[5, 5] and not d[5, 8]
    a = annulus_mask((11, 11), (5, 5), 2)
    assert not (a & d).any() and (a | d).all()


class CountingArray:
    """A 4D array that records which scan rows were read."""

    def __init__(self, a):
        self.a = a
        self.shape = a.shape
        self.dtype = a.dtype
        self.rows_read = 0

    def __getitem__(self, idx):
        out = self.a[idx]
        self.rows_read += out.shape[0] if out.ndim == 4 else 1
        return out


def _scan(Rx=12, Ry=9, Q=48, seed=1):
    rng = np.random.default_rng(seed)
    centre = np.array([23.4, 24.6])
    data = np.zeros((Rx, Ry, Q, Q), np.float32)
    x = np.arange(Q)[:, None]
    y = np.arange(Q)[None, :]
    for i in range(Rx):
        for j in range(Ry):
            c = centre + rng.normal(0, 0.3, 2)  # a little descan
            beam = np.clip(5.5 - np.hypot(x - c[0], y - c[1]), 0, 1) * 1000.0
            crystal = j >= 3  # three columns of vacuum
            if crystal:
                for g in [(12, 0), (0, 12), (-12, 0), (0, -12), (12, 12), (-12, -12)]:
                    beam = beam + 40.0 * np.clip(
                        3.5 - np.hypot(x - c[0] - g[0], y - c[1] - g[1]), 0, 1)
                beam = beam * 0.8  # scattering takes intensity out of the beam
            data[i, j] = beam + rng.poisson(1.0, (Q, Q))
    return data, centre


def test_virtual_images_one_pass_matches_brute_force():
    data, centre = _scan()
    arr = CountingArray(data)
    ds = Dataset(arr)
    vi = virtual_images(ds, max_bytes=3 * 9 * 48 * 48 * 4)  # blocks of 3 rows
    assert isinstance(vi, VirtualImages)
    Rx = data.shape[0]
    assert arr.rows_read <= Rx + 16  # one streaming pass plus a small beam sample
    assert vi.bright_field.shape == (12, 9) and vi.bright_field.dtype == np.float32
    assert vi.dark_field.shape == (12, 9) and vi.dark_field.dtype == np.float32
    assert vi.mean_pattern.shape == (48, 48) and vi.max_pattern.shape == (48, 48)
    np.testing.assert_allclose(vi.mean_pattern, data.mean(axis=(0, 1)), rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(vi.max_pattern, data.max(axis=(0, 1)))
    assert abs(vi.centre[0] - centre[0]) < 0.3 and abs(vi.centre[1] - centre[1]) < 0.3
    assert vi.beam_radius == pytest.approx(5.5, abs=0.6)
    assert vi.bf_radius == pytest.approx(1.1 * vi.beam_radius, rel=0.15)
    assert vi.adf_inner == pytest.approx(2 * vi.bf_radius / 1.1, rel=0.15)
    bf_mask = disk_mask((48, 48), vi.mask_centre, vi.bf_radius)
    adf_mask = annulus_mask((48, 48), vi.mask_centre, vi.adf_inner, vi.adf_outer)
    np.testing.assert_allclose(vi.bright_field, (data * bf_mask).sum(axis=(2, 3)), rtol=1e-4)
    np.testing.assert_allclose(vi.dark_field, (data * adf_mask).sum(axis=(2, 3)), rtol=1e-4)
    # vacuum (first three columns) is brighter in BF and darker in ADF than the crystal
    assert vi.bright_field[:, :3].mean() > vi.bright_field[:, 3:].mean()
    assert vi.dark_field[:, :3].mean() < vi.dark_field[:, 3:].mean()


def test_virtual_images_block_size_independent():
    data, _ = _scan(Rx=7, Ry=5, Q=32)
    ds = Dataset(data)
    a = virtual_images(ds, max_bytes=1)
    b = virtual_images(ds)
    np.testing.assert_allclose(a.bright_field, b.bright_field, rtol=1e-6)
    np.testing.assert_allclose(a.dark_field, b.dark_field, rtol=1e-6)
    np.testing.assert_allclose(a.mean_pattern, b.mean_pattern, rtol=1e-6)


def test_virtual_images_explicit_annulus():
    data, _ = _scan(Rx=4, Ry=4, Q=32)
    vi = virtual_images(Dataset(data), inner=8.0, outer=12.0, bf_radius=3.0)
    assert (vi.adf_inner, vi.adf_outer, vi.bf_radius) == (8.0, 12.0, 3.0)
    ring = annulus_mask((32, 32), vi.mask_centre, 8.0, 12.0)
    np.testing.assert_allclose(vi.dark_field, (data * ring).sum(axis=(2, 3)), rtol=1e-4)
    with pytest.raises(ValueError):
        virtual_images(Dataset(data), inner=5.0, outer=4.0)


def test_progress_and_cancel():
    data, _ = _scan(Rx=6, Ry=4, Q=24)
    calls = []
    virtual_images(Dataset(data), progress=lambda d, t, m: calls.append((d, t)), max_bytes=1)
    assert calls[-1] == (24, 24)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    n = iter(range(100))
    with pytest.raises(Cancelled):
        virtual_images(Dataset(data), should_stop=lambda: next(n) >= 3, max_bytes=1)


def test_empty_detector_and_tiny_patterns():
    """All-zero frames (the Arina test file) and 8x8 patterns (Prismatic) still give images."""
    vi = virtual_images(Dataset(np.zeros((3, 3, 16, 16), np.uint32)))
    assert vi.beam_radius == 0.0 and np.all(vi.bright_field == 0)
    data = np.zeros((2, 2, 8, 8), np.float32)
    data[..., 3:5, 3:5] = 10.0
    data[..., 0, 3] = 1.0  # 3.5 px from the centre: inside the annulus
    vi = virtual_images(Dataset(data))
    assert np.all(vi.bright_field == 40.0) and np.all(vi.dark_field >= 1.0)


def test_simulated_beam(tmp_path):
    from napari_stem_strain.simulate import SimulationSettings, simulate_array

    data, truth = simulate_array(SimulationSettings(scan=(8, 8), pattern=64, noise=0.3,
                                                    seed=3))
    vi = virtual_images(Dataset(data))
    assert vi.beam_radius == pytest.approx(4.0, abs=0.5)
    if truth.center is not None:
        c = np.nanmean(truth.center.reshape(-1, 2), axis=0)
        assert abs(vi.centre[0] - c[0]) < 0.5 and abs(vi.centre[1] - c[1]) < 0.5
        for idx in [(0, 0), (4, 5), (7, 7)]:
            cx, cy, r = find_direct_beam(data[idx])
            assert abs(cx - truth.center[idx][0]) < 0.3 and abs(cy - truth.center[idx][1]) < 0.3


@pytest.mark.parametrize("name, kw", [
    ("001_4x2_6bit.mib", {}),
    ("test1.blo", {}),
    ("test_00_master.h5", {}),
    ("py4DSTEM_size2x3x4x5.h5", {}),
    ("Si100_4D.emd",
     {"dataset": "/4DSTEM_simulation/data/datacubes/CBED_array_depth0000/datacube"}),
])
def test_virtual_images_real_files(shared_formats, name, kw):
    from napari_stem_strain.io import open_dataset

    with open_dataset(shared_formats / name, **kw) as ds:
        vi = virtual_images(ds)
        assert vi.bright_field.shape == ds.scan_shape
        assert vi.mean_pattern.shape == ds.pattern_shape
        assert np.isfinite(vi.bright_field).all() and np.isfinite(vi.dark_field).all()
        if name == "test1.blo":  # the ASTAR pattern's direct beam sits near the middle
            assert abs(vi.centre[0] - 72) < 3 and abs(vi.centre[1] - 73) < 3
