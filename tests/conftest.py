"""Shared fixtures."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

#: Small real files written by other software (never copied into the repository).
SHARED_FORMATS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "formats"


@pytest.fixture(scope="session")
def shared_formats() -> Path:
    """``../shared/data/formats`` beside the repository (real files of the field's software);
    the test is skipped when that folder is absent."""
    if not SHARED_FORMATS.is_dir():
        pytest.skip(f"shared format files not found at {SHARED_FORMATS}")
    return SHARED_FORMATS


@pytest.fixture(scope="session")
def tiny_input(tmp_path_factory) -> Path:
    """A tiny simulated 4D file (8 x 8 scan of 64 px patterns) for CLI tests; tests that may
    change a file work on their own copy."""
    from napari_stem_strain.simulate import SimulationSettings, simulate_to_file

    path = tmp_path_factory.mktemp("cli") / "tiny.h5"
    simulate_to_file(path, SimulationSettings(scan=(8, 8), pattern=64, seed=1), workers=1)
    return path


@pytest.fixture
def no_method_may_run(monkeypatch) -> None:
    """Any method run fails the test: for runs that must be refused before the work."""
    from napari_stem_strain import pipeline

    def refuse(*a, **k):
        raise AssertionError("a method ran although the run was bound to fail")

    monkeypatch.setattr(pipeline, "run_method_on", refuse)


# ------------------------------------------------------------------ a third-party method
#: A toy third-party method package, installed into a temporary folder as a real
#: distribution with an entry point in the ``napari_stem_strain.methods`` group (used by
#: the CLI and the GUI plugin tests).

PLUGIN = "toy_strain_plugin"
NAME = "toyplug"
LABEL = "Toy plugin"
COLOUR = "#12ab34"

SOURCE = f'''
"""Another package's strain method: a uniform 1 % expansion wherever there is signal."""
import numpy as np

from napari_stem_strain.methods.base import BlockMethod
from napari_stem_strain.methods.registry import MethodSpec


class ToyMethod(BlockMethod):
    name = "toy"

    def __init__(self, sample_mask=None, reference=None):
        self.set_input("sample_mask", sample_mask)
        self.reference = reference

    def process_block(self, block, r0, sample_mask=None):
        n, Ry = block.shape[:2]
        A = np.broadcast_to(np.eye(2, dtype=np.float32) * 1.01, (n, Ry, 2, 2)).copy()
        A[:, :, 0, 0] += (r0 + np.arange(n))[:, None] * 1e-3  # a map that varies by row
        sample = np.ones((n, Ry), bool) if sample_mask is None else sample_mask
        return A, sample


SPEC = MethodSpec("{NAME}", "{PLUGIN}:ToyMethod", "{LABEL}", "{COLOUR}",
                  options=("sample_mask", "reference"), description="a toy")
'''


@pytest.fixture
def method_plugin(tmp_path_factory, monkeypatch) -> str:
    """Install the toy package (module + dist-info with its entry point) on ``sys.path`` and
    make the registry read entry points afresh; returns the method's name."""
    from napari_stem_strain.methods import registry

    root: Path = tmp_path_factory.mktemp("site")
    (root / f"{PLUGIN}.py").write_text(SOURCE)
    info = root / f"{PLUGIN}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PLUGIN}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(f"""\
        [{registry.ENTRY_POINT_GROUP}]
        {NAME} = {PLUGIN}:SPEC
        """))
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(registry, "_PLUGINS", None)
    yield NAME
    monkeypatch.setattr(registry, "_PLUGINS", None)
