"""Shared helpers of the benchmarks: cached simulated data, scoring, and the results page.

* :func:`get_benchmark_file` simulates a benchmark dataset once into ``bench_data/`` (git
  ignored) and returns its path; later runs reuse it, so every method scores the same patterns.
* :func:`run_scored` runs a :class:`~napari_stem_strain.methods.base.BlockMethod` on a file and
  scores it against the file's ground truth with :func:`mae_table` (``strain.mae``, i.e. the
  CONVENTIONS.md MAE with its NaN penalty).
* :func:`write_section` puts a markdown section into ``docs/benchmarks.md`` between
  ``<!-- BEGIN name -->`` / ``<!-- END name -->`` markers, so several benchmarks share the page
  and re-running one replaces only its own section. :func:`machine_info` records where and when.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_stem_strain.io.ground_truth import GroundTruth, read_ground_truth
from napari_stem_strain.strain import StrainMaps, mae, strain_maps

__all__ = [
    "ROOT",
    "BENCH_DIR",
    "PAGE",
    "NOISE_LEVELS",
    "get_benchmark_file",
    "mae_table",
    "run_scored",
    "Scored",
    "markdown_table",
    "write_section",
    "machine_info",
    "command_line",
]

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "bench_data"
PAGE = ROOT / "docs" / "benchmarks.md"
#: Background weights ``w`` of the published benchmark (dose 1e5 electrons per pattern).
NOISE_LEVELS = (0.0, 0.25, 0.5, 0.7)

_PAGE_HEADER = """# Benchmarks

Measured figures of napari-stem-strain's methods on simulated data with ground truth
(`napari_stem_strain.simulate`; the data are cached in `bench_data/`, which git ignores).
MAE follows CONVENTIONS.md: mean absolute error over all crystal positions, grain boundaries
included; a crystal position a method left NaN counts as large as the largest true value of
that component; rotation errors are wrapped into the lattice's symmetry period. Strain MAE is
in units of 1e-3 (0.1 %), rotation in degrees. Each section records the command that produced
it and the machine it ran on.
"""


def get_benchmark_file(
    noise: float,
    dose: float | None = 1e5,
    scan: int = 64,
    pattern: int = 128,
    lattice: str = "hex",
    seed: int = 0,
    folder: Path | None = None,
    **settings: Any,
) -> Path:
    """Path of the simulated benchmark file for these settings, simulating it if missing.

    The name encodes every setting, so different benchmarks never overwrite each other's data;
    ``settings`` are passed on to :class:`~napari_stem_strain.simulate.SimulationSettings`.
    """
    from napari_stem_strain.simulate import SimulationSettings, simulate_to_file

    folder = Path(folder or BENCH_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    extra = "".join(f"_{k}{v}" for k, v in sorted(settings.items()))
    d = "none" if dose is None else f"{dose:g}"
    name = f"{lattice}_s{scan}_p{pattern}_w{noise:.2f}_d{d}_seed{seed}{extra}.h5"
    path = folder / name
    if not path.exists():
        s = SimulationSettings(scan=(scan, scan), pattern=pattern, lattice=lattice, noise=noise,
                               dose=dose, seed=seed, **settings)
        simulate_to_file(path, s)
    return path


def mae_table(result_maps: StrainMaps | dict[str, np.ndarray], truth: GroundTruth) -> dict:
    """MAE of each component against the ground truth (CONVENTIONS.md, via ``strain.mae``).

    Returns fractions for ``exx, eyy, exy``, degrees for ``theta``, and ``fitted``: the share of
    crystal positions the method gave a finite value.
    """
    maps = result_maps.as_dict() if isinstance(result_maps, StrainMaps) else result_maps
    out: dict[str, float] = {}
    for k in ("exx", "eyy", "exy"):
        out[k] = mae(maps[k], getattr(truth, k), truth.sample)
    out["theta"] = mae(maps["theta"], truth.theta, truth.sample, truth.symmetry_deg)
    fin = np.isfinite(np.asarray(maps["exx"]))[truth.sample]
    out["fitted"] = float(fin.mean()) if fin.size else float("nan")
    return out


@dataclass
class Scored:
    """One method run on one benchmark file."""

    path: Path
    result: Any  # MethodResult
    maps: StrainMaps
    truth: GroundTruth
    table: dict
    seconds: float
    n_patterns: int

    @property
    def patterns_per_second(self) -> float:
        return self.n_patterns / self.seconds if self.seconds > 0 else float("nan")


def run_scored(method: Any, path: Path, progress: Any = None) -> Scored:
    """Run ``method`` (a BlockMethod) on the file at ``path`` and score it against the file's
    ground truth, with the truth's reference region. Wall time includes ``prepare``."""
    from napari_stem_strain.io.readers import open_dataset
    from napari_stem_strain.methods.runner import run_method

    truth = read_ground_truth(path)
    if truth is None:
        raise ValueError(f"{path}: holds no ground truth")
    with open_dataset(path) as ds:
        t0 = time.perf_counter()
        result = run_method(method, ds, progress=progress)
        seconds = time.perf_counter() - t0
        n = ds.scan_shape[0] * ds.scan_shape[1]
    maps = strain_maps(result.A, truth.reference, result.symmetry_deg, mask=result.sample)
    return Scored(path, result, maps, truth, mae_table(maps, truth), seconds, n)


def keep_raw_result(folder: Path, case: str, method: str, result: Any) -> Path:
    """Save a run's raw per-position ``A`` (and ``A_cov`` when the method gave one), its
    sample mask and symmetry as ``folder/CASE_METHOD.npz``, so a change of the strain maths
    or of the error-bar propagation can be re-scored without re-running the method
    (py4DSTEM takes minutes per case)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{case}_{method}.npz"
    arrays = {"A": result.A, "sample": result.sample, "symmetry_deg": result.symmetry_deg}
    if getattr(result, "A_cov", None) is not None:
        arrays["A_cov"] = result.A_cov
    np.savez_compressed(path, **arrays)
    return path


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table (floats already formatted by the caller)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def machine_info() -> str:
    """One line: CPU model, cores (``nproc``), Python, date (UTC)."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    date = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{model}, nproc={nproc}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}; {date}")


def command_line() -> str:
    """The command that is running, relative to the repository root, for the record."""
    argv = list(sys.argv)
    try:
        argv[0] = str(Path(argv[0]).resolve().relative_to(ROOT))
    except ValueError:
        pass
    return "python " + " ".join(shlex.quote(a) for a in argv)


def write_section(name: str, markdown: str, page: Path | None = None) -> Path:
    """Put ``markdown`` into the page between ``<!-- BEGIN name -->`` and ``<!-- END name -->``
    (replacing what was there, or appending a new section). The page is written atomically."""
    page = Path(page or PAGE)
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = page.read_text() if page.exists() else _PAGE_HEADER
    block = f"{begin}\n{markdown.strip()}\n{end}"
    if begin in text and end in text and text.index(begin) < text.index(end):
        i, j = text.index(begin), text.index(end) + len(end)
        text = text[:i] + block + text[j:]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    tmp = page.with_name(f".{page.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, page)
    return page
