"""Shared fixtures."""

from __future__ import annotations

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
