"""The probe inspector's rings are the size of the Bragg spots, not of a bloomed direct beam."""

from __future__ import annotations

import pytest

from napari_stem_strain import overlay
from napari_stem_strain.io.readers import open_dataset


def test_astar_rings_match_its_small_spots(shared_formats):
    with open_dataset(shared_formats / "test1.blo") as ds:
        Rx, Ry = ds.scan_shape
        region = (slice(max(0, Rx // 2 - 3), Rx // 2 + 3), slice(max(0, Ry // 2 - 3),
                                                                Ry // 2 + 3))
        mean = overlay.region_mean_pattern(ds, region)
    lattice = overlay.reference_lattice(mean)
    assert lattice.radius > 7  # the saturated direct beam is broad ...
    assert 1.0 <= lattice.disk_radius <= 5.0  # ... its ~3 px spots are not


@pytest.mark.parametrize("radius", [2.5, 4.0])
def test_simulated_disk_radius_is_measured(tmp_path, radius):
    from napari_stem_strain.simulate import SimulationSettings, simulate_to_file

    path = tmp_path / "sim.h5"
    simulate_to_file(path, SimulationSettings(scan=(6, 6), pattern=64, disk_radius=radius,
                                              seed=2), workers=1)
    with open_dataset(path) as ds:
        mean = overlay.region_mean_pattern(ds, (slice(0, 6), slice(0, 6)))
    lattice = overlay.reference_lattice(mean)
    assert abs(lattice.disk_radius - radius) < 1.5
