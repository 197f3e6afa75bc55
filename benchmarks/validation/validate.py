"""The independent validation set: generate it, score every method on every case, write the
results into ``docs/benchmarks.md`` (section ``validation``).

    nice python benchmarks/validation/validate.py all --write     # generate (cached) + score
    python benchmarks/validation/validate.py generate             # only the data
    python benchmarks/validation/validate.py score --cases hex_sharp_noisefree

Data are cached in ``bench_data/validation/`` (git ignores it). One set of settings for every
case - no per-case knobs: the CC-ST-AE runs as the README tells a user to (``fit`` from the
shipped weights, then map with the fitted model); py4DSTEM runs with its automatic defaults.
Both get the case's reference region. Scores follow CONVENTIONS.md (MAE with the NaN
penalty); besides the MAE each component is split into the mean *per-grain bias* (``|mean
error|`` of each grain, weighted by its positions) and the *within-grain scatter* (mean
``|error - grain mean|``), boundaries included, so a reader sees whether a method loses by
noise or by systematic error.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import (  # noqa: E402
    BENCH_DIR,
    command_line,
    keep_raw_result,
    machine_info,
    markdown_table,
    run_scored,
    write_section,  # noqa: E402
)
from render import Case, render_case  # noqa: E402

from napari_stem_strain.strain import bias_and_scatter  # noqa: E402

FOLDER = BENCH_DIR / "validation"
COMPONENTS = ("exx", "eyy", "exy", "theta")
MAPS = FOLDER / "maps"

#: The cases (renderer: ``render.py``, written apart from the project's simulator). Each names
#: what it changes from ``Case``'s defaults: area-integrated sharp disks, in-disk gradients and
#: fringes, linear descan ramps of < 1 px, dose 1e5, vacuum strip.
CASES = (
    Case("hex_sharp_noisefree", dose=None, fringe=0.0, seed=1),
    Case("hex_sharp_fringes_noisefree", dose=None, seed=2),
    Case("hex_detector_background", edge="soft", background=0.35, seed=3),
    Case("square_psf_weak", lattice="square", spacing=22.0, psf=0.7, bragg=0.004,
         descan=(2.0, -1.0, 1.5, 2.5), dose=2e5, seed=4),
    Case("rect_dynamical", lattice="rect", spacing=20.0, radius=3.5, fringe=0.35,
         background=0.25, dose=5e4, seed=5),
    Case("hex_lowdose_background", edge="soft", background=0.6, dose=2e4, weak_ratio=0.25,
         seed=6),
)


def generate(cases: list[Case], force: bool = False) -> None:
    """Render the cases not cached yet (``force``: all of them)."""
    for c in cases:
        path = FOLDER / c.file_name()
        if path.exists() and not force:
            continue
        t0 = time.perf_counter()
        render_case(c, FOLDER)
        print(f"rendered {c.name} in {time.perf_counter() - t0:.0f} s", flush=True)


def case_files() -> dict[str, Path]:
    """Every case file present: this renderer's and the abTEM ones (``abtem_cases.py``)."""
    return {p.stem: p for p in sorted(FOLDER.glob("*.h5"))}


def generation_seconds(path: Path) -> float | None:
    import h5py

    with h5py.File(path, "r") as h5:
        v = h5.attrs.get("generation_seconds")
    return None if v is None else float(v)


def fitted_model(path: Path, reference: str | None):
    """The CC-ST-AE model a user fits on the case itself (``fit`` from the shipped weights,
    given the reference region), loaded. Its training record holds ``epochs_run``. The one
    place this protocol lives: ``bias_sources.py`` maps re-rendered variants through it."""
    from napari_stem_strain.io.readers import open_dataset
    from napari_stem_strain.methods.ccstae import fit_model, load_model

    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "fitted.pt"
        with open_dataset(path) as ds:
            fit_model(ds, init="default", out=model_path, reference=reference, device="cpu")
        return load_model(model_path)


def _run(m: str, path: Path, info: dict, t0: float):
    """One method on one file, as a user runs it (``fit`` then map for the CC-ST-AE)."""
    from napari_stem_strain.io.ground_truth import read_ground_truth
    from napari_stem_strain.methods.ccstae import CCSTAEMethod
    from napari_stem_strain.methods.py4dstem import Py4DSTEMMethod

    # the reference region goes to both methods, as `stem-strain map --reference` and the
    # widget give it: py4DSTEM finds its lattice basis on the region's mean pattern, the
    # CC-ST-AE samples the region for its template and anchors its symmetry branch there
    ref = read_ground_truth(path).reference
    if m != "ae":
        return run_scored(Py4DSTEMMethod(reference=ref), path)
    model = fitted_model(path, ref)
    info["fit_seconds"] = round(time.perf_counter() - t0, 1)
    info["epochs_run"] = model.training.get("epochs_run")
    return run_scored(CCSTAEMethod(model, device="cpu", reference=ref), path)


def score_case(path: Path, methods: list[str]) -> dict:
    """Run each method on one case file: MAE table plus bias/scatter per component."""
    out: dict = {}
    for m in methods:
        t0 = time.perf_counter()
        info: dict = {}
        try:
            sc = _run(m, path, info, t0)
        except Exception as exc:  # noqa: BLE001 - a method refusing a case is a result too
            out[m] = {"failed": f"{type(exc).__name__}: {exc}",
                      "seconds": round(time.perf_counter() - t0, 1)}
            print(path.stem, m, "FAILED", out[m]["failed"], flush=True)
            continue
        t = sc.truth
        keep_raw_result(MAPS, path.stem, m, sc.result)
        row = dict(sc.table)
        for k in COMPONENTS:
            period = t.symmetry_deg if k == "theta" else None
            b, s, w = bias_and_scatter(getattr(sc.maps, k), getattr(t, k), t.grains, t.sample,
                                   period)
            row[f"{k}_bias"], row[f"{k}_scatter"], row[f"{k}_maxbias"] = b, s, w
        row["seconds"] = round(time.perf_counter() - t0, 1)
        row.update(info)
        out[m] = row
        print(path.stem, m, json.dumps({k: (round(v, 7) if isinstance(v, float) else v)
                                        for k, v in row.items()}), flush=True)
    return out


def report(results: dict) -> str:
    def f3(v: float) -> str:
        return f"{1e3 * v:.3f}"

    rows, split, ratio = [], [], []
    for name, res in sorted(results.items()):  # by case, whatever order they were scored in
        for m, r in sorted(res.items()):
            label = "CC-ST-AE (fit)" if m == "ae" else "py4DSTEM"
            if "failed" in r:
                rows.append([name, label, "failed:", r["failed"][:80], "", "", "0.0"])
                continue
            rows.append([name, label, f3(r["exx"]), f3(r["eyy"]), f3(r["exy"]),
                         f"{r['theta']:.3f}", f"{100 * r['fitted']:.1f}"])
            split.append([name, label] + [f"{f3(r[k + '_bias'])} / {f3(r[k + '_scatter'])}"
                                          for k in ("exx", "eyy", "exy")]
                         + [f"{r['theta_bias']:.3f} / {r['theta_scatter']:.3f}",
                            "/".join(f3(r[k + "_maxbias"]) for k in ("exx", "eyy", "exy"))])
        if all(m in res and "failed" not in res[m] for m in ("ae", "py4dstem")):
            a, p = res["ae"], res["py4dstem"]
            ratio.append([name] + [f"{a[k] / p[k]:.2f}" if p[k] > 0 else "-"
                                   for k in COMPONENTS]
                         + [f"{100 * a['fitted']:.1f} / {100 * p['fitted']:.1f}"])
    md = [
        "## Independent validation set",
        "",
        f"Machine: {machine_info()}. Command: `{command_line()}`.",
        "",
        "Data: `benchmarks/validation/render.py`, a kinematic renderer written apart from the "
        "project's simulator (pixel-area-integrated disks, sharp or blurred apertures, detector "
        "PSF, rocking-curve gradients and fringes inside each disk, strong/weak reflections, a "
        "diffuse background centred on the detector, linear descan ramps). 40 x 40 scans of "
        "128 px patterns, one uniform deformation per grain. One set of settings for all "
        "cases: CC-ST-AE = `fit` from the shipped weights then map; py4DSTEM automatic. "
        "Time to generate each case: "
        + ", ".join(f"{k} {v:.0f} s" for k in results
                    if (v := generation_seconds(FOLDER / f"{k}.h5")) is not None) + ".",
        "",
        "### MAE (strain 1e-3, rotation deg)",
        "",
        markdown_table(["case", "method", "exx", "eyy", "exy", "theta", "fitted %"], rows),
        "",
        "### CC-ST-AE / py4DSTEM MAE ratio (target <= 0.75 strain, <= 1.0 rotation)",
        "",
        markdown_table(["case", "exx", "eyy", "exy", "theta", "fitted % AE / py4DSTEM"], ratio),
        "",
        "### Bias and scatter (mean per-grain |bias| / within-grain scatter; strain 1e-3)",
        "",
        markdown_table(["case", "method", "exx", "eyy", "exy", "theta (deg)",
                        "max per-grain |bias| exx/eyy/exy"], split),
    ]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=("generate", "score", "all", "report"))
    ap.add_argument("--cases", nargs="*", default=None, help="case names (default: all)")
    ap.add_argument("--methods", nargs="*", default=["ae", "py4dstem"])
    ap.add_argument("--force", action="store_true", help="re-render cached cases")
    ap.add_argument("--write", action="store_true", help="write docs/benchmarks.md")
    ap.add_argument("--json", type=Path, default=FOLDER / "results.json")
    args = ap.parse_args(argv)
    if args.part in ("generate", "all"):
        generate([c for c in CASES if args.cases is None or c.name in args.cases], args.force)
    if args.part == "generate":
        return 0
    # results accumulate in the JSON file, so cases can be scored in separate runs
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    if args.part != "report":
        for name, path in case_files().items():
            if args.cases is None or name in args.cases:
                results[name] = {**results.get(name, {}), **score_case(path, args.methods)}
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=1))
    md = report(results)
    print(md)
    if args.write:
        write_section("validation", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
