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
