"""The automatic sample/vacuum mask finds the vacuum in noisy scans too (a uniform noise floor
lifts the vacuum's scattered share well above zero), and still calls a crystal-only scan all
sample."""

from __future__ import annotations

import pytest

from napari_stem_strain.io.ground_truth import read_ground_truth
from napari_stem_strain.io.readers import open_dataset
from napari_stem_strain.overlay import mask_from_virtual
from napari_stem_strain.simulate import SimulationSettings, simulate_to_file
from napari_stem_strain.virtual import virtual_images


def _mask_and_truth(tmp_path, **kw):
    path = tmp_path / "scan.h5"
    simulate_to_file(path, SimulationSettings(scan=(24, 24), pattern=48, **kw), workers=1)
    with open_dataset(path) as ds:
        vi = virtual_images(ds)
    return mask_from_virtual(vi.bright_field, vi.dark_field), read_ground_truth(path).sample


@pytest.mark.parametrize("noise", [0.1, 0.25, 0.5])
def test_vacuum_found_in_noisy_scans(tmp_path, noise):
    mask, truth = _mask_and_truth(tmp_path, vacuum=True, noise=noise, seed=1)
    assert (~truth).sum() > 50
    assert (mask == truth).mean() > 0.98


@pytest.mark.parametrize("noise,seed", [(0.0, 3), (0.5, 1), (0.8, 1)])
def test_crystal_only_scan_stays_all_sample(tmp_path, noise, seed):
    mask, truth = _mask_and_truth(tmp_path, vacuum=False, noise=noise, seed=seed, n_grains=4)
    assert truth.all()
    assert mask.all()
