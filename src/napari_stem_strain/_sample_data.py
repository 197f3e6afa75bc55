"""File > Open Sample: two small simulated datasets, made by the project's own simulator.

Generated on first use into a per-user cache folder (about 19 MB each, about a second) and
opened through the same reader as any file, so a sample behaves exactly like user data -
lazy 4D array, virtual images, and the ground truth stored in the file (which makes the MAE
table appear after a run).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["polycrystal_sample", "tmd_sample", "sample_path", "SAMPLES"]

#: Simulator settings of each sample (small and quick: 48x48 scan of 64 px patterns).
SAMPLES: dict[str, dict[str, Any]] = {
    "polycrystal": dict(scan=(48, 48), pattern=64, disk_radius=3.0, lattice="hex",
                        vacuum=False, n_grains=5, dose=1e5, seed=11),
    # a hexagonal transition-metal dichalcogenide flake (WS2/WSe2-like) with vacuum around it
    "tmd_flake": dict(scan=(48, 48), pattern=64, disk_radius=3.0, lattice="hex",
                      vacuum=True, n_grains=3, dose=1e5, seed=7),
}
_VERSION = "v1"


def cache_dir() -> Path:
    """Where generated samples live (``$XDG_CACHE_HOME`` or ``~/.cache``; temp as fallback)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = Path(base) / "napari-stem-strain" / "samples"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    folder = Path(tempfile.gettempdir()) / "napari-stem-strain-samples"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def sample_path(key: str) -> Path:
    """The sample file, simulated now if it is not cached yet."""
    from .simulate import SimulationSettings, simulate_to_file

    path = cache_dir() / f"{key}_{_VERSION}.h5"
    if not path.exists():
        simulate_to_file(path, SimulationSettings(**SAMPLES[key]))
    return path


_LABELS = {"polycrystal": "polycrystal (simulated)", "tmd_flake": "WS2-like flake (simulated)"}


def _layers(key: str) -> list[tuple[Any, ...]]:
    from ._reader import dataset_layers
    from .io.ground_truth import read_ground_truth
    from .io.readers import open_dataset

    path = sample_path(key)
    ds = open_dataset(path)
    return dataset_layers(ds, read_ground_truth(path), label=_LABELS[key])


def polycrystal_sample() -> list[tuple[Any, ...]]:
    """A strained hexagonal polycrystal filling the scan, with ground truth."""
    return _layers("polycrystal")


def tmd_sample() -> list[tuple[Any, ...]]:
    """A WS2/WSe2-like hexagonal flake of a few grains with vacuum around it, ground truth."""
    return _layers("tmd_flake")
