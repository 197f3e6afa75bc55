"""Cramer-Rao floor of one pattern's strain on a validation case, against both methods'
within-grain scatter.

    nice python benchmarks/validation/crb.py square_psf_weak hex_detector_background [--write]

For a few crystal positions of a renderer case (``validate.CASES``), the pattern's expected
counts are rendered again by ``render.py`` itself (the same draw: structure factors, fringes,
background, descan); the Jacobian of the counts with respect to the four entries of ``A`` and
the beam position is taken by central differences, and the Poisson Fisher information
``J^T diag(1/lambda) J`` is inverted and propagated to strain and rotation through the shared
strain maths. Every disk intensity, fringe and the background are treated as *known*, so this
is a floor that no estimator which has to measure them reaches.

Why: where the CC-ST-AE misses issue 10's 0.75 x py4DSTEM by *scatter* (square_psf_weak exy),
this says whether the target is reachable at all - an unbiased method cannot scatter less than
the floor, so if py4DSTEM's scatter is already within 1 / 0.75 of it, no method can beat it by
the target's margin on that case. The scatter of each method is the within-grain standard
deviation over grain interiors (boundaries excluded) of its cached validation run
(``bench_data/validation/maps``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import command_line, machine_info, write_section  # noqa: E402
from render import draw  # noqa: E402
from validate import CASES, FOLDER, MAPS  # noqa: E402

from napari_stem_strain.strain import SYMMETRY_DEG, strain_to_A  # noqa: E402
from napari_stem_strain.uncertainty import strain_sigma  # noqa: E402

COMPONENTS = ("exx", "eyy", "exy", "theta")
#: central-difference steps: ``A`` entries (largest disk move ~0.1 px at 50 px) and beam (px)
STEP_A, STEP_C = 2e-3, 0.1


def crb_sigma(name: str, n_positions: int = 12, seed: int = 0) -> dict[str, float]:
    """Median over ``n_positions`` crystal positions (grain interiors) of the Cramer-Rao
    standard deviation of each component (strain fraction; theta in degrees)."""
    from scipy import ndimage

    case = {c.name: c for c in CASES}[name]
    if case.dose is None:
        raise ValueError(f"{name} is noise-free: no Cramer-Rao floor")
    d = draw(case)
    interior = np.zeros_like(d.sample)
    for g in np.unique(d.labels):
        interior |= ndimage.binary_erosion(d.labels == g, iterations=2)
    cand = np.argwhere(interior & d.sample)
    rng = np.random.default_rng(seed)
    pos = cand[rng.choice(len(cand), min(n_positions, len(cand)), replace=False)]
    out = []
    for i, j in pos:
        g = int(d.labels[i, j])
        A = strain_to_A(*d.params[g])
        c = d.centre(case, i, j)
        lam = d.expected(case, A, c, g).reshape(-1)
        cols = []
        for k in range(6):
            dA, dc = np.zeros(4), np.zeros(2)
            if k < 4:
                dA[k] = STEP_A
            else:
                dc[k - 4] = STEP_C
            step = STEP_A if k < 4 else STEP_C
            hi = d.expected(case, A + dA.reshape(2, 2), c + dc, g).reshape(-1)
            lo = d.expected(case, A - dA.reshape(2, 2), c - dc, g).reshape(-1)
            cols.append((hi - lo) / (2 * step))
        J = np.stack(cols, 1)
        F = J.T @ (J / np.maximum(lam, 1e-12)[:, None])
        cov = np.linalg.inv(F)[:4, :4]
        sig = strain_sigma(A, cov, np.eye(2), None, SYMMETRY_DEG[case.lattice])
        out.append([float(sig[k]) for k in COMPONENTS])
    return dict(zip(COMPONENTS, np.median(np.array(out), 0).tolist(), strict=True))


def within_grain_sd(name: str, method: str) -> dict[str, float] | None:
    """Within-grain standard deviation of a method's cached validation run (interiors)."""
    from bench_uncertainty import grain_residuals

    from napari_stem_strain.io.ground_truth import read_ground_truth
    from napari_stem_strain.strain import strain_maps, wrap_angle
    from napari_stem_strain.uncertainty import interior_mask

    raw = MAPS / f"{name}_{method}.npz"
    if not raw.exists():
        return None
    m = np.load(raw)
    t = read_ground_truth(FOLDER / f"{name}.h5")
    maps = strain_maps(m["A"], t.reference, float(m["symmetry_deg"]), mask=m["sample"])
    where = interior_mask(t.grains, t.sample, 1)
    out = {}
    for k in COMPONENTS:
        e = getattr(maps, k) - getattr(t, k)
        if k == "theta":
            e = wrap_angle(e, t.symmetry_deg)
        ok = where & np.isfinite(e)
        out[k] = float(np.nanstd(grain_residuals(e, t.grains, ok)))
    return out


def report(names: list[str]) -> str:
    lines = [f"Machine: {machine_info()}. Command: `{command_line()}`.", "",
             "Cramer-Rao standard deviation of one pattern (disk intensities, fringes and "
             "background known) and each method's within-grain standard deviation (grain "
             "interiors of the cached validation run), strain 1e-3 / rotation deg; in brackets "
             "the method's over the floor. Last column: the smallest scatter ratio to "
             "py4DSTEM any unbiased method could reach, floor / py4DSTEM.", "",
             "| case | component | floor | CC-ST-AE | py4DSTEM | floor / py4DSTEM |",
             "|---|---|---|---|---|---|"]
    for name in names:
        crb = crb_sigma(name)
        ae, p4 = within_grain_sd(name, "ae"), within_grain_sd(name, "py4dstem")
        for k in COMPONENTS:
            s = 1.0 if k == "theta" else 1e3
            f = crb[k] * s

            def cell(x: dict | None, k: str = k, s: float = s, f: float = f) -> str:
                return "-" if x is None else f"{x[k] * s:.3f} ({x[k] * s / f:.2f})"

            best = "-" if p4 is None else f"{f / (p4[k] * s):.2f}"
            lines.append(f"| {name} | {k} | {f:.3f} | {cell(ae)} | {cell(p4)} | {best} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--write", action="store_true", help="write docs/benchmarks.md")
    args = ap.parse_args(argv)
    text = report(args.cases)
    print(text)
    if args.write:
        write_section("crb-validation", "## Cramer-Rao floor on validation cases\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
