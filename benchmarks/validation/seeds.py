"""How much of a validation case's score is the luck of its one draw: the same case rendered
again with other seeds, both methods scored on each as ``validate.py`` scores them.

    nice python benchmarks/validation/seeds.py hex_detector_background square_psf_weak [--write]
    nice python benchmarks/validation/seeds.py rect_dynamical --seeds 105 205 --methods ae

Each renderer case (``validate.CASES``) is one random draw of its grains' deformations, the
fringes inside their disks and the shot noise, with 5-6 grains. Per-grain biases and the MAE
ratio CC-ST-AE / py4DSTEM rest on that one draw; a miss can be a method's systematic
weakness or a draw that fell on it. Rendering the same *kind* of data with other seeds (no
other change: same physics, settings and methods) tells which: the per-seed ratios, their
mean and spread. Without ``--seeds`` each case runs its own seed and that seed + 100, 200,
300, 400 (hex_detector_background: 3, 103, ..., 403). Data are cached in
``bench_data/validation/seeds/``; ``--write`` puts the table into docs/benchmarks.md
(section ``seeds``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import command_line, machine_info, write_section  # noqa: E402
from render import render_case  # noqa: E402
from validate import CASES, FOLDER, MAPS, score_case  # noqa: E402

SEED_DIR = FOLDER / "seeds"
RESULTS = SEED_DIR / "results.json"
STRAIN = ("exx", "eyy", "exy")


def seeded(name: str, seed: int):
    """The validation case ``name`` with another seed (its own file name)."""
    case = {c.name: c for c in CASES}[name]
    return dataclasses.replace(case, name=f"{name}_seed{seed}", seed=seed)


def default_seeds(name: str) -> list[int]:
    """The case's own seed and four more, 100 apart: the seeds the report's table lists."""
    own = {c.name: c.seed for c in CASES}[name]
    return [own + 100 * k for k in range(5)]


def run(names: list[str], seeds: list[int] | None,
        methods: tuple[str, ...] = ("ae", "py4dstem")) -> dict:
    """Render (cached) and score every case x seed (``None``: :func:`default_seeds`);
    results merged into ``RESULTS``."""
    SEED_DIR.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in names:
        for s in seeds or default_seeds(name):
            c = seeded(name, s)
            path = SEED_DIR / c.file_name()
            if not path.exists():
                t0 = time.perf_counter()
                render_case(c, SEED_DIR)
                print(f"rendered {c.name} in {time.perf_counter() - t0:.0f} s", flush=True)
            row = score_case(path, methods)
            # merged into what is on disk now, so that runs of other cases (and of the other
            # method on this seed) are kept
            results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
            results.setdefault(name, {}).setdefault(str(s), {}).update(row)
            RESULTS.write_text(json.dumps(results, indent=1))
    return results


def _ratio(row: dict, k: str) -> float | None:
    ae, p4 = row.get("ae", {}), row.get("py4dstem", {})
    if k not in ae or k not in p4 or not p4[k]:
        return None
    return ae[k] / p4[k]


def calibration_figures(name: str, seed: int, method: str) -> dict[str, dict] | None:
    """Issue 13's calibration (``bench_uncertainty.calibrate_maps``: within grains,
    boundaries excluded) of one seed's run, from the raw ``A`` / ``A_cov`` that ``score_case``
    kept; None when the run kept no covariance."""
    from bench_uncertainty import calibrate_maps

    from napari_stem_strain.io.ground_truth import read_ground_truth

    stem = seeded(name, seed).name
    raw = MAPS / f"{stem}_{method}.npz"
    if not raw.exists():
        return None
    d = np.load(raw)
    if "A_cov" not in d:
        return None
    t = read_ground_truth(SEED_DIR / f"{stem}.h5")
    row = calibrate_maps(d["A"], d["A_cov"], d["sample"], float(d["symmetry_deg"]), t)
    return {k: row[k] for k in (*STRAIN, "theta")}


def calibration_report(results: dict) -> str:
    from bench_uncertainty import meets_targets

    lines = ["Error bars (issue 13) on the same runs: std of z / % within 2 sigma per seed "
             "(within grains, boundaries excluded; * misses 0.8-1.25 or 90-98 %), and how many "
             "seeds meet both per component.", "",
             "| case | method | per seed: exx; eyy; exy; theta | seeds meeting exx / eyy / exy "
             "/ theta |", "|---|---|---|---|"]
    for name, by_seed in sorted(results.items()):
        for m, label in (("ae", "CC-ST-AE"), ("py4dstem", "py4DSTEM")):
            cells, met = [], {k: [] for k in (*STRAIN, "theta")}
            for s in sorted(by_seed, key=int):
                cal = calibration_figures(name, int(s), m)
                if cal is None:
                    continue
                for k, c in cal.items():
                    met[k].append(meets_targets(c))
                cells.append(f"{s}: " + "; ".join(
                    f"{c['std_z']:.2f}/{100 * c['cover2']:.0f}{'' if meets_targets(c) else '*'}"
                    for c in cal.values()))
            if cells:
                lines.append(f"| {name} | {label} | " + "<br>".join(cells) + " | "
                             + " / ".join(f"{sum(v)} of {len(v)}" for v in met.values())
                             + " |")
    return "\n".join(lines)


def report(results: dict) -> str:
    lines = [f"Machine: {machine_info()}. Command: `{command_line()}`.", "",
             "CC-ST-AE / py4DSTEM MAE ratio exx / eyy / exy / theta per seed (the case's own "
             "seed marked *), and over the seeds the mean ratio and how many seeds meet the "
             "target (<= 0.75 strain, <= 1.0 rotation).", "",
             "| case | per seed | mean | seeds meeting exx / eyy / exy / theta |",
             "|---|---|---|---|"]
    own = {c.name: c.seed for c in CASES}
    noise_free = {c.name for c in CASES if c.dose is None}
    for name, by_seed in sorted(results.items()):
        cells, ratios = [], {k: [] for k in (*STRAIN, "theta")}
        for s, row in sorted(by_seed.items(), key=lambda kv: int(kv[0])):
            r = {k: _ratio(row, k) for k in ratios}
            if any(v is None for v in r.values()):
                cells.append(f"{s}: failed")
                continue
            for k, v in r.items():
                ratios[k].append(v)
            mark = "*" if int(s) == own.get(name) else ""
            cell = f"{s}{mark}: " + " / ".join(f"{r[k]:.2f}" for k in ratios)
            if name in noise_free:  # the noise-free target: per-grain |bias| <= 0.05e-3
                cell += " (AE max grain bias " + " / ".join(
                    f"{1e3 * row['ae'][k + '_maxbias']:.3f}" for k in STRAIN) + "e-3)"
            cells.append(cell)
        mean = " / ".join(f"{np.mean(v):.2f}" if v else "-" for v in ratios.values())
        meet = " / ".join(
            f"{sum(x <= (1.0 if k == 'theta' else 0.75) for x in v)} of {len(v)}"
            for k, v in ratios.items())
        lines.append(f"| {name} | " + "<br>".join(cells) + f" | {mean} | {meet} |")
    return "\n".join(lines)


#: Which runs the stored table holds (kept with the code, so ``--write`` keeps it).
PROTOCOL = """Since stop 22 every method gets the case's reference region, as `stem-strain map
--reference` gives it (docs/benchmarks.md "Stop 22 ... part 2"). Every row, both methods, is
one run of stop 24's code (the same method code as stop 23's) on 2026-12-07 07:54-08:18 UTC:
`seeds.py square_psf_weak hex_sharp_fringes_noisefree hex_sharp_noisefree
hex_detector_background rect_dynamical hex_lowdose_background`, renders made afresh. Until
stop 24, py4DSTEM's rows of square_psf_weak and the two noise-free cases were stop 21's runs
without the region."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", help="validation case names (renderer cases)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="seeds to run (default: each case's own seed and +100 ... +400)")
    ap.add_argument("--report", action="store_true", help="only print the cached results")
    ap.add_argument("--write", action="store_true", help="write the table into docs")
    ap.add_argument("--methods", nargs="+", default=["ae", "py4dstem"],
                    help="re-run only these (the others' stored results are kept)")
    args = ap.parse_args(argv)
    results = (json.loads(RESULTS.read_text()) if args.report
               else run(args.cases, args.seeds, tuple(args.methods)))
    text = PROTOCOL + "\n\n" + report(results) + "\n\n" + calibration_report(results)
    print(text)
    if args.write:
        write_section("seeds", "## Validation cases over several seeds\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
