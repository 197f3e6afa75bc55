"""How far can *any* per-disk fit get on the validation renderer's fringed disks? An oracle
at lattice level, over many seeds.

    nice python benchmarks/validation/fringe_limit.py hex_detector_background --seeds 12
    nice python benchmarks/validation/fringe_limit.py hex_sharp_fringes_noisefree --seeds 12

For each seed the case's grains are rendered noise-free, without the diffuse background, one
pattern per grain (``render.render_pattern``: the same fringes, edge and disks as the case).
Every disk up to the third ring that lies wholly on the detector is then fitted alone, by
nonlinear least squares, with the renderer's *exact* aperture profile (which no method
knows), started at its true position, by three per-disk models:

* ``template``: gain and offset only - a matched template, the family of py4DSTEM's
  cross-correlation with the vacuum probe;
* ``gradient``: gain, offset and a linear in-disk gradient - the CC-ST-AE's disk model;
* ``gradient, relative``: the same with relative weights (each pixel's residual over the
  model's value), the best single-disk figure in ``fringe_disk_models.py``.

Each grain's lattice ``A`` is the uniform-weight affine fit of its disks; its strain is
taken relative to the reference grain's, as the maps are, and compared with the truth. No
noise, no background, no descan, no pooling, no weights to get wrong: what is left is the
fringes' own error - a floor for a method that does not know the fringes' form.

Printed per seed: each model's MAE of exx, eyy, exy (1e-3) over the non-reference grains,
the ratio gradient / template (the issue-10 target asks <= 0.75 of the CC-ST-AE against
py4DSTEM on each strain component), and the largest per-grain |bias| (the target for
noise-free cases asks <= 0.05e-3). A summary gives how often the ratio meets the target in
all three components, and the reference grain's own absolute error, which every other grain
inherits.

Why (stop 24): hex_detector_background misses the ratio, hex_sharp_fringes_noisefree the
0.05e-3 bias, by per-grain biases that earlier stops traced to the fringes inside the disks.
This asks whether a better estimator could meet those targets, or whether they sit below
what the data hold.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares
from scipy.special import erfc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from render import Case, _basis, draw, render_pattern  # noqa: E402
from validate import CASES  # noqa: E402

from napari_stem_strain.strain import A_to_strain, normalise_to_reference, strain_to_A  # noqa: E402

MODELS = ("template", "gradient", "gradient, relative")
HALF = 7  # fitting window half-width, px
SUB = 4  # sub-pixel samples per axis in the model's pixel integration
RINGS = 2.05  # disks out to this many first-order spacings (three rings on hex)


def _fit_disk(img: np.ndarray, q: np.ndarray, case: Case, model: str) -> np.ndarray:
    """One disk's centre by nonlinear least squares with the exact aperture profile."""
    width = 0.05 if case.edge == "sharp" else case.edge_width
    lo = np.round(q).astype(int) - HALF
    n = 2 * HALF + 1
    win = img[lo[0]:lo[0] + n, lo[1]:lo[1] + n]
    s = (np.arange(SUB) + 0.5) / SUB - 0.5
    ii, jj = np.mgrid[0:n, 0:n]
    X = (lo[0] + ii)[:, :, None, None] + s[None, None, :, None]
    Y = (lo[1] + jj)[:, :, None, None] + s[None, None, None, :]
    gradient = model != "template"

    def predict(p: np.ndarray) -> np.ndarray:
        dx, dy = X - p[0], Y - p[1]
        prof = 0.5 * erfc((np.hypot(dx, dy) - case.radius) / (np.sqrt(2) * width))
        if gradient:
            prof = prof * (1 + p[4] * dx / case.radius + p[5] * dy / case.radius)
        return (p[2] * prof).mean((2, 3)) + p[3]

    floor = 1e-3 * win.max()
    if model == "gradient, relative":
        def resid(p):
            m = predict(p)
            return ((m - win) / np.maximum(np.abs(m), floor)).ravel()
    else:
        def resid(p):
            return (predict(p) - win).ravel()
    p0 = np.r_[q, win.max(), 0.0, np.zeros(2 * gradient)]
    return least_squares(resid, p0).x[:2]


def one_seed(case: Case) -> dict:
    """Per-grain strain errors (1e-3, relative to the reference grain) of every model, and
    the reference grain's own absolute error, for one draw of ``case``."""
    d = draw(case)
    G0 = _basis(case.lattice, case.spacing)
    b = d.hk @ G0
    c = d.centre(case, case.scan // 2, case.scan // 2)
    A_est = {m: [] for m in MODELS}
    for k in range(case.n_grains):
        A = strain_to_A(*d.params[k])
        img = render_pattern(case, A, c, d.amps, d.hk, d.grain_fringes[k])
        q_true = c + b @ A.T
        use = np.all((q_true > HALF + 1) & (q_true < case.pattern - HALF - 2), axis=1)
        use &= np.linalg.norm(b, axis=1) < RINGS * case.spacing
        X = np.c_[np.ones(use.sum()), b[use]]
        for m in MODELS:
            q = np.array([_fit_disk(img, p, case, m) for p in q_true[use]])
            coef, *_ = np.linalg.lstsq(X, q, rcond=None)
            A_est[m].append(coef[1:].T)
    A_true = [strain_to_A(*p) for p in d.params]
    out = {}
    for m in MODELS:
        rel = []
        for k in range(1, case.n_grains):
            est = np.array(A_to_strain(normalise_to_reference(A_est[m][k], A_est[m][0])))
            tru = np.array(A_to_strain(normalise_to_reference(A_true[k], A_true[0])))
            rel.append((est - tru)[:3] * 1e3)
        ref = np.array(A_to_strain(normalise_to_reference(A_est[m][0], A_true[0])))[:3] * 1e3
        out[m] = {"bias": np.array(rel), "reference": ref}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("case", choices=[c.name for c in CASES if c.psf == 0 and c.fringe > 0])
    ap.add_argument("--seeds", type=int, default=12, help="the case's seed, + 100, + 200, ...")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    base = next(c for c in CASES if c.name == args.case)
    cases = [dataclasses.replace(base, dose=None, background=0.0, seed=base.seed + 100 * i)
             for i in range(args.seeds)]
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(one_seed, cases))
    print(f"{args.case}: noise-free, no background, exact aperture profile, disks to "
          f"{RINGS} spacings, uniform lattice weights. Strain 1e-3.")
    met, maes, worst = 0, {m: [] for m in MODELS}, {m: [] for m in MODELS}
    for case, r in zip(cases, results, strict=True):
        row = []
        for m in MODELS:
            mae = np.abs(r[m]["bias"]).mean(0)
            maes[m].append(mae)
            worst[m].append(np.abs(r[m]["bias"]).max())
            row.append(f"{m} MAE {mae[0]:.2f}/{mae[1]:.2f}/{mae[2]:.2f} "
                       f"max|bias| {np.abs(r[m]['bias']).max():.2f}")
        ratio = np.abs(r["gradient"]["bias"]).mean(0) / np.abs(r["template"]["bias"]).mean(0)
        met += bool((ratio <= 0.75).all())
        ref = r["gradient"]["reference"]
        print(f"seed {case.seed}: " + "; ".join(row)
              + f"; ratio gradient/template {ratio[0]:.2f}/{ratio[1]:.2f}/{ratio[2]:.2f}"
              + "; reference grain's own error (gradient) "
              + f"{ref[0]:+.2f}/{ref[1]:+.2f}/{ref[2]:+.2f}",
              flush=True)
    print("summary:")
    for m in MODELS:
        mae = np.mean(maes[m], 0)
        print(f"  {m}: mean MAE {mae[0]:.3f}/{mae[1]:.3f}/{mae[2]:.3f}; largest per-grain "
              f"|bias| median over seeds {np.median(worst[m]):.3f}, smallest {min(worst[m]):.3f}")
    r = np.mean(maes["gradient"], 0) / np.mean(maes["template"], 0)
    print(f"  gradient / template, ratio of the mean MAEs: {r[0]:.2f}/{r[1]:.2f}/{r[2]:.2f}; "
          f"seeds where the ratio is <= 0.75 in all three components: {met} of {len(cases)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
