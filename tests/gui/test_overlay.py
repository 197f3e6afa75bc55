"""The probe overlay and first mask, without Qt: measured against the simulator's truth."""

from __future__ import annotations

import numpy as np

from napari_stem_strain import overlay
from napari_stem_strain.io.ground_truth import read_ground_truth
from napari_stem_strain.io.readers import open_dataset
from napari_stem_strain.strain import parse_region, strain_to_A
from napari_stem_strain.virtual import virtual_images


def test_reference_lattice_matches_the_simulated_crystal(tiny_sim):
    ds = open_dataset(tiny_sim)
    gt = read_ground_truth(tiny_sim)
    mean = overlay.region_mean_pattern(ds, parse_region(gt.reference))
    lat = overlay.reference_lattice(mean)
    # hexagonal: |g1| = |g2| at 60 degrees (reduced basis, counter-clockwise)
    n1, n2 = np.linalg.norm(lat.g1), np.linalg.norm(lat.g2)
    assert abs(n1 - n2) / n1 < 0.02
    cosang = lat.g1 @ lat.g2 / (n1 * n2)
    assert abs(abs(cosang) - 0.5) < 0.02
    assert lat.g1[0] * lat.g2[1] - lat.g1[1] * lat.g2[0] > 0
    # the direct beam comes first and every vector lands on the detector
    np.testing.assert_array_equal(lat.vectors[0], [0, 0])
    pos = lat.centre + lat.vectors
    assert (pos >= 0).all() and (pos <= 47).all() and len(pos) >= 7
    # the truth's direct-beam centre in the reference region is found to a fraction of a px
    rs, cs = parse_region(gt.reference)
    c, _ = overlay.beam_centre(np.asarray(ds.data[rs.start, cs.start], float))
    assert np.linalg.norm(c - gt.center[rs.start, cs.start]) < 0.3


def test_predicted_disks_follow_A_and_the_truth(tiny_sim):
    ds = open_dataset(tiny_sim)
    gt = read_ground_truth(tiny_sim)
    lat = overlay.reference_lattice(
        overlay.region_mean_pattern(ds, parse_region(gt.reference)))
    g0 = lat.vectors
    A = strain_to_A(0.01, -0.02, 0.005, 10.0)
    pred = overlay.predicted_disks(A, g0, np.array([20.0, 21.0]))
    np.testing.assert_allclose(pred, np.array([20.0, 21.0]) + (A @ g0.T).T)
    assert np.isnan(overlay.predicted_disks(np.full((2, 2), np.nan), g0, [0, 0])).all()
    # with the TRUE A of a strained, rotated position the prediction sits on its disks
    strained = np.argwhere(gt.sample & (np.abs(gt.theta) > 2))
    r, c = strained[len(strained) // 2]
    pattern = np.asarray(ds.data[r, c], float)
    centre, radius = overlay.beam_centre(pattern)
    pred = overlay.predicted_disks(gt.A[r, c], g0, centre)[1:]
    found, _ = overlay.find_disks(pattern, centre, radius)
    d = np.linalg.norm(found[:, None] - pred[None], axis=2).min(axis=1)
    assert len(found) >= 4 and np.median(d) < 1.0
    # while the identity (no strain, no rotation) misses them
    wrong = overlay.predicted_disks(np.eye(2), g0, centre)[1:]
    d_wrong = np.linalg.norm(found[:, None] - wrong[None], axis=2).min(axis=1)
    assert np.median(d_wrong) > 1.0


def test_mask_from_virtual_finds_the_vacuum(tiny_sim):
    ds = open_dataset(tiny_sim)
    gt = read_ground_truth(tiny_sim)
    vi = virtual_images(ds)
    mask = overlay.mask_from_virtual(vi.bright_field, vi.dark_field)
    assert (mask == gt.sample).mean() > 0.97
    # crystal only (no near-empty class): everything is sample
    rng = np.random.default_rng(0)
    bf = rng.uniform(50, 70, (10, 10))
    df = rng.uniform(30, 50, (10, 10))
    assert overlay.mask_from_virtual(bf, df).all()
    assert overlay.otsu_split(np.r_[np.zeros(20) + 0.01, np.ones(30)]) is not None
