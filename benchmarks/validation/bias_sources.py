"""Where a validation case's per-grain bias comes from: the same draw rendered again with
one ingredient taken away, mapped by the CC-ST-AE with the model ``fit`` makes on the case
itself.

    nice python benchmarks/validation/bias_sources.py hex_lowdose_background
    nice python benchmarks/validation/bias_sources.py hex_lowdose_background --variants noisefree

Variants (each the case's own seed, so the same grains, fringes and background):
``noisefree`` (no shot noise), ``nofringe_noisefree`` (flat disks), ``nobackground_noisefree``,
and, shot noise kept, ``nobackground`` and ``nofringe``. Per grain it prints the mean error and
the standard deviation of exx, eyy, exy (1e-3), relative to the case's reference region, and
the MAE.
Renders are cached in ``bench_data/validation/variants/``.

Why: a per-grain bias that the shot noise does not explain is systematic - the noise-free
render shows it alone; comparing with the noisy data separates what the noise adds (a
dose-dependent bias is an estimator's, not the physics'). Stop 23 found hex_lowdose_background's
noise-free grains biased by up to 1.75e-3 (the fringes inside soft-edged disks: flat disks
leave <= 0.36e-3) and the noisy ones by a different, dose-dependent pattern.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import run_scored  # noqa: E402
from render import render_case  # noqa: E402
from validate import CASES, FOLDER, fitted_model  # noqa: E402

VARIANTS = {
    "case": {},
    "noisefree": {"dose": None},
    "nofringe_noisefree": {"dose": None, "fringe": 0.0},
    "nobackground_noisefree": {"dose": None, "background": 0.0},
    "nobackground": {"background": 0.0},
    "nofringe": {"fringe": 0.0},
}
OUT = FOLDER / "variants"


def per_grain(scored) -> list[str]:
    """One line per strain component: each grain's mean error / std (1e-3), and the MAE."""
    t, maps = scored.truth, scored.maps
    lines = []
    for k in ("exx", "eyy", "exy"):
        e = (getattr(maps, k) - getattr(t, k)) * 1e3
        cells = []
        for g in np.unique(t.grains[t.sample]):
            sel = t.sample & (t.grains == g) & np.isfinite(e)
            cells.append(f"g{g} {np.mean(e[sel]):+.2f}/{np.std(e[sel]):.2f}")
        lines.append(f"  {k}: " + "  ".join(cells) + f"  | MAE {scored.table[k] * 1e3:.3f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    from napari_stem_strain.io.ground_truth import read_ground_truth
    from napari_stem_strain.methods.ccstae import CCSTAEMethod

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("case", choices=[c.name for c in CASES])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args(argv)
    case = {c.name: c for c in CASES}[args.case]
    base = FOLDER / case.file_name()
    if not base.exists():
        render_case(case, FOLDER)
    ref = read_ground_truth(base).reference
    model = fitted_model(base, ref)  # the model a user fits on the case itself
    for name in args.variants:
        path = base
        if VARIANTS[name]:
            c = dataclasses.replace(case, name=f"{case.name}_{name}", **VARIANTS[name])
            path = OUT / c.file_name()
            if not path.exists():
                OUT.mkdir(parents=True, exist_ok=True)
                render_case(c, OUT)
        sc = run_scored(CCSTAEMethod(model, device="cpu", reference=ref), path)
        print(f"{name}:", flush=True)
        print("\n".join(per_grain(sc)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
