"""Uncertainty calibration: are the per-position error bars (``sigma_*``) honest?

For each file with ground truth and each method, the maps and their standard deviations are
computed as ``stem-strain map`` writes them, and within single grains (positions whose 3x3
neighbourhood is one grain, see :func:`napari_stem_strain.uncertainty.interior_mask`) we report

* ``std_z``: standard deviation of ``z = (estimate - truth) / sigma`` (honest: 1; the target
  is 0.8-1.25);
* ``cover2``: fraction of positions with ``|estimate - truth| <= 2 sigma`` (target 90-98 %);
* ``mean_z`` (bias in units of sigma) and ``std_z_grain``, the standard deviation of ``z``
  after removing each grain's mean error: when ``std_z`` misses but ``std_z_grain`` does not,
  the miss is a per-grain *bias* (systematic error the per-position statistics cannot see),
  not a wrong scatter.

Same protocol as the other benchmarks, one set of settings for every case: on the project's
simulator files the CC-ST-AE maps with the shipped weights (as ``bench_ccstae.py accuracy``);
on the independent validation set (files under ``bench_data/validation``) it is ``fit`` from
the shipped weights first (as ``validation/validate.py``); py4DSTEM runs with its automatic
defaults. Every case uses its ground truth's reference region.

    nice python benchmarks/bench_uncertainty.py run FILE.h5 [FILE.h5 ...] [--methods ae,py4dstem]
    python benchmarks/bench_uncertainty.py run bench_data/validation/*.h5 --kept  # kept runs
    python benchmarks/bench_uncertainty.py report [--write]   # table from the stored results

Results accumulate in ``bench_data/uncertainty.json`` (one entry per case and method, the
latest run wins), so cases can be run one at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "validation"))

from common import BENCH_DIR, keep_raw_result, machine_info, markdown_table, run_scored  # noqa: E402

COMPONENTS = ("exx", "eyy", "exy", "theta")
RESULTS = BENCH_DIR / "uncertainty.json"


def _scored(method: str, path: Path):
    """Run one method on one file by the protocol the module docstring describes."""
    from napari_stem_strain.io.ground_truth import read_ground_truth
    from napari_stem_strain.methods.ccstae import CCSTAEMethod
    from napari_stem_strain.methods.py4dstem import Py4DSTEMMethod

    if path.parent.name == "validation":
        from validate import _run  # the validation protocol (`fit`, then map, for the AE)

        return _run(method, path, {}, time.perf_counter())
    # both methods get the file's reference region, as `stem-strain map --reference` gives it
    ref = read_ground_truth(path).reference
    if method == "py4dstem":
        return run_scored(Py4DSTEMMethod(reference=ref), path)
    return run_scored(CCSTAEMethod("default", device="cpu", reference=ref), path)


def grain_residuals(err: np.ndarray, grains: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """``err`` less each grain's mean error over the positions ``ok`` (NaN elsewhere): the
    within-grain scatter, its per-grain bias removed."""
    resid = np.full(err.shape, np.nan)
    for g in np.unique(grains[ok]):
        sel = ok & (grains == g)
        resid[sel] = err[sel] - err[sel].mean()
    return resid


def grain_scatter_z(err: np.ndarray, sigma: np.ndarray, grains: np.ndarray | None,
                    where: np.ndarray) -> float:
    """Standard deviation of ``z`` once each grain's mean error is removed (the scatter part)."""
    ok = where & np.isfinite(err) & np.isfinite(sigma) & (sigma > 0)
    if grains is None or ok.sum() < 2:
        return float("nan")
    z = grain_residuals(err, grains, ok)[ok] / sigma[ok]
    return float(z.std(ddof=1))


def calibrate_maps(A: np.ndarray, A_cov: np.ndarray, sample: np.ndarray,
                   symmetry_deg: float, t) -> dict:
    """Per component, the calibration of one run's raw ``A`` / ``A_cov`` against the ground
    truth ``t`` within grain interiors: std_z, mean_z, cover2, std_z_grain, n, n_missing,
    median sigma and rms error (strain: fraction; theta: degrees); and ``n_interior``."""
    from napari_stem_strain.strain import strain_maps, wrap_angle
    from napari_stem_strain.uncertainty import calibration, interior_mask

    maps = strain_maps(A, t.reference, symmetry_deg, mask=sample, A_cov=A_cov)
    where = interior_mask(t.grains, t.sample, 1)
    row: dict = {"n_interior": int(where.sum())}
    for k in COMPONENTS:
        period = t.symmetry_deg if k == "theta" else None
        est, tru, sig = getattr(maps, k), getattr(t, k), maps.sigma[k]
        c = calibration(est, sig, tru, where, period)
        err = np.asarray(est, float) - np.asarray(tru, float)
        if period is not None:
            err = wrap_angle(err, period)
        c["std_z_grain"] = grain_scatter_z(err, np.asarray(sig, float), t.grains, where)
        ok = where & np.isfinite(err)
        c["median_sigma"] = float(np.nanmedian(np.where(ok, sig, np.nan))) if ok.any() \
            else float("nan")
        c["rms_err"] = float(np.sqrt(np.mean(err[ok] ** 2))) if ok.any() else float("nan")
        row[k] = c
    return row


def _calibrate_kept(path: Path, method: str) -> dict:
    """:func:`calibrate_maps` of the run ``validate.py score`` kept for this case and method:
    the same run its MAE came from (the CC-ST-AE's ``fit`` is not repeated)."""
    from validate import FOLDER, MAPS  # where validate.py keeps its results and raw maps

    from napari_stem_strain.io.ground_truth import read_ground_truth

    kept = MAPS / f"{path.stem}_{method}.npz"
    scored = FOLDER / "results.json"
    failed = (json.loads(scored.read_text()).get(path.stem, {}).get(method, {}).get("failed")
              if scored.exists() else None)
    if failed:  # the method refused the case in validate.py: that is the result
        return {"failed": failed}
    if not kept.exists():
        return {"failed": f"no kept run {kept} (run validate.py score first)"}
    z = np.load(kept)
    if "A_cov" not in z:
        return {"failed": "the method gave no covariance"}
    return {"kept_run": str(kept.relative_to(BENCH_DIR)),
            **calibrate_maps(z["A"], z["A_cov"], z["sample"], float(z["symmetry_deg"]),
                             read_ground_truth(path))}


def calibrate_case(path: Path, methods: list[str], kept: bool = False) -> dict:
    """Per method: :func:`calibrate_maps` of its run on ``path``, and the seconds it took.
    ``kept``: calibrate the validation run ``validate.py score`` kept instead of running the
    method again (:func:`_calibrate_kept`)."""
    out: dict = {}
    for m in methods:
        if kept:
            out[m] = _calibrate_kept(path, m)
            print(path.stem, m, json.dumps(out[m]), flush=True)
            continue
        t0 = time.perf_counter()
        try:
            sc = _scored(m, path)
        except Exception as exc:  # noqa: BLE001 - a method refusing a case is a result too
            out[m] = {"failed": f"{type(exc).__name__}: {exc}"}
            print(path.stem, m, "FAILED", out[m]["failed"], flush=True)
            continue
        t, r = sc.truth, sc.result
        if r.A_cov is None:
            out[m] = {"failed": "the method gave no covariance"}
            continue
        keep_raw_result(BENCH_DIR / "uncertainty", path.stem, m, r)
        row = {"seconds": round(time.perf_counter() - t0, 1),
               **calibrate_maps(r.A, r.A_cov, r.sample, r.symmetry_deg, t)}
        out[m] = row
        print(path.stem, m, json.dumps(row), flush=True)
    return out


def _load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def meets_targets(c: dict) -> bool:
    """Issue 13's targets for one component's calibration: std z 0.8-1.25, 90-98 % in 2 sigma."""
    return 0.8 <= c["std_z"] <= 1.25 and 0.90 <= c["cover2"] <= 0.98


def report(results: dict) -> str:
    """The markdown section: one row per case and method."""
    rows = []
    for case in sorted(results):
        for m, row in results[case].items():
            if "failed" in row:
                rows.append([case, m, *(["-"] * 4), f"failed: {row['failed'][:60]}"])
                continue
            cells, misses = [], []
            for k in COMPONENTS:
                c = row[k]
                cells.append(f"{c['std_z']:.2f} / {100 * c['cover2']:.0f}%")
                if not meets_targets(c):
                    kind = ("too wide" if c["std_z"] < 0.8 else
                            "bias" if abs(c["mean_z"]) > 0.5 or c["std_z_grain"] < 0.8 * c["std_z"]
                            else "scatter")
                    misses.append(f"{k} ({kind}: mean z {c['mean_z']:+.2f}, "
                                  f"within-grain std z {c['std_z_grain']:.2f})")
            note = "miss: " + "; ".join(misses) if misses else "ok"
            rows.append([case, m, *cells, f"{row['n_interior']} pos.; {note}"])
    return markdown_table(["case", "method", "exx std z / 2σ", "eyy", "exy", "theta", "notes"],
                          rows)


#: What the misses mean (written from the table above; kept with the code that makes it).
NOTES = """**Where the targets stand** (issue 13: std z 0.8-1.25 and 90-98 % within 2 sigma, for
both methods, on the simulator files and the validation set). Both methods were re-run in
stop 24 (2026-12-07: validation scored 08:19-08:22 UTC, calibrated 08:22 UTC; simulator files
08:22-08:24 UTC), with stop 23's method code, each given the case's reference region as
`stem-strain map --reference` gives it (docs/benchmarks.md "Stop 22 ... part 2"). Against
stop 23's table every figure moved by at most 0.03 in std z and 1 point of coverage. Over
hex_lowdose_background's five seeds the CC-ST-AE meets both figures on 18 of 20 components;
the misses are 87 % and 89 % within 2 sigma. py4DSTEM meets them on 20 of 20 (section
"Validation cases over several seeds"). Why every remaining miss is a component whose error
is mostly per-grain bias, and what correct error bars could do there: docs/benchmarks.md
"Stop 24".
- Validation cases: scored by `validate.py score` (`fit` re-run per case), then calibrated
  from the runs it kept (`bench_uncertainty.py run bench_data/validation/*.h5 --kept`), so
  the MAE and the error bars of a case come from one run.
- Simulator files: `bench_uncertainty.py run`.

* Simulator: the CC-ST-AE meets both figures on all four files (0.93-1.01 / 94-97 %).
  py4DSTEM meets them on three. On w = 0 its eyy holds 89 % within 2 sigma, one point short,
  from bias (mean z +0.69); it held 93 % before stop 22, when its lattice basis came from
  sampled patterns instead of the reference region's mean pattern.
* Validation, CC-ST-AE, met in full on four cases:
  - **abtem_ws2_3layer**;
  - **abtem_ws2_3layer_lowdose**;
  - **square_psf_weak**;
  - **hex_lowdose_background** (1.09-1.15 / 92-93 %).

  Also met: abtem_si001_thick exx / exy / theta, hex_detector_background eyy / exy / theta,
  rect_dynamical eyy / exy / theta.
* Validation, py4DSTEM: **hex_lowdose_background** is met in full since stop 22 (0.89-0.96 /
  96-97 %). Before, it failed the case for want of the reference region.
* **The sandwich (stop 20).** The Poisson step weighs each pixel by `1 / max(mu, floor)`;
  where the floor (1 % of the disk's peak, one detector count) caps the weight, the weights
  are not inverse variances and `G^-1` of the weighted fit overstates the shift's variance -
  on a disk of 2 counts per pixel by 1.59x (test
  `test_shift_variance_of_a_low_count_disk_matches_its_scatter`, Monte Carlo over 3000
  Poisson draws; the sandwich `G^-1 D^T W diag(mu) W D G^-1` gives 0.88-1.12). So faint
  disks were trusted less, relative to bright ones, than their scatter warrants, and the
  affine fit's covariance (which assumes right relative weights) misstated the result.
  **hex_lowdose_background** moved from exx / exy 1.22 / 90 % and 1.25 / 89 % to 1.21 /
  91 % and 1.20 / 89.8 % (eyy 1.13 / 92 %, theta 1.20 / 91 %).
* **The residual scale borrowed from the grain (stop 20).** What was left at
  hex_lowdose_background was per position, not per grain and not spatial (within-grain
  residuals of z: lag-1 correlation below 0.06): binned by the position's own sigma, z's
  standard deviation ran from 1.69 in the smallest fifth of sigmas to 0.85 in the largest
  (square_psf_weak 1.14 to 0.91, rect_dynamical exx 1.53 to 0.94) - each position's covariance
  was scaled by its own residuals, 10 degrees of freedom with 8 disks, so a bar was short or
  long by the luck of those residuals. Each scale is now shrunk towards the same-grain
  neighbours' by empirical Bayes (`refine.moderated_scale`: limma's moderated variances, the
  prior's weight estimated from the data; tests
  `test_moderated_scale_evens_out_error_bars_in_a_grain` and
  `test_moderated_scale_keeps_scales_that_truly_differ`). The fifths are now even
  (hex_lowdose_background 1.22 / 1.13 / 1.16 / 1.17 / 1.15 in exx, square_psf_weak 1.04 to
  0.96) and the sigma maps far less noisy (hex_lowdose_background's middle 60 % of sigma exx
  spans 4.5-5.3e-3 instead of 4.2-6.3e-3), so "Mask where sigma >" masks positions that are
  less precise rather than unlucky ones. The issue's two figures move by at most 1.5 points
  (every case: before / after in the git history of this section): hex_lowdose_background
  exx 1.21 / 91 % -> 1.18 / 92 %, exy 1.20 / 89.8 % -> 1.19 / 89.2 % (still 0.8 points
  short), theta 1.20 / 91.0 % -> 1.20 / 90.4 %. What is left there is a level: within-grain
  std z 1.15-1.17 at every sigma, i.e. the residuals of a position's disks understate its
  error by ~16 % at this dose (60 % background, 2e4 electrons).
* **The disk model's own noise (stop 21).** Taken apart (docs/benchmarks.md "Stop 21": no
  background, 10x the dose, one grain without descan each bring it to ~1.0; weights,
  moderation, pooling, fringes and edges do not matter), the 16 % came from the Poisson
  step's disk model: fitted to an even subset of 40 000 beam pixels, its derivative carried
  the beams' shot noise, which shortens every measured shift (errors in variables) and
  leaves error in `A` that the covariance does not describe. Fitted to every sampled beam
  pixel (test `test_pixel_model_uses_every_beam_pixel`), **hex_lowdose_background meets
  both figures in every component**: exx / eyy / exy / theta 1.12 / 92 %, 1.08 / 93 %,
  1.13 / 91 %, 1.13 / 93 % (within-grain std z 1.07-1.10; was 1.15-1.17). About 8 % is left,
  not explained yet.
* Still missed, by *bias* (a whole grain off relative to the reference grain, within-grain std
  z near 1 - the accuracy issue's per-grain biases, which per-position statistics cannot see):
  CC-ST-AE hex_detector_background exx (1.15 / 67 %), rect_dynamical exx (1.24 / 85 %),
  abtem_si001_thick eyy (1.18 / 85 %: one grain's eyy bias; 1.29 / 79 % before stop 21),
  hex_sharp_noisefree eyy (85 %; a bias of 0.01e-3, but noise-free error bars are smaller
  still),
  hex_sharp_fringes_noisefree (noise-free: the residuals are all model error); py4DSTEM on
  most cases (rect_dynamical, abtem_ws2_3layer eyy / theta, both noise-free cases,
  square_psf_weak exx / eyy). py4DSTEM's bars are too wide on abtem_si001_thick (std z
  0.65-0.79).
* Over five seeds of three renderer cases (docs/benchmarks.md "Validation cases over several
  seeds") the same picture: the AE's misses are per-grain biases on the fringe cases.
* Three changes (stops 16-17) made the AE's bars hold. (1) The error floor: a weighted fit's
  covariance is right only when the weights are right *relative to each other*; the
  chi-square scale fixed the overall level but not the Poisson weights' over-trust of the
  strongest disks. (2) The branch fix (the WS2
  rotation offset). (3) **The Student-t factor**: the noise scale is estimated from the fit's
  own `dof = 2 n - 6` residuals, so (estimate - truth) / sigma is Student-t, std
  `sqrt(dof / (dof - 2))` = 1.12-1.22 with 6-8 disks. Every error bar now carries `dof / (dof -
  2)` (`uncertainty.student_t_variance_factor`, both methods; test
  `test_ccstae_error_bars_hold_one_standard_deviation_with_few_disks`, which fails without it).
  Effect: hex_lowdose_background (8 disks) 1.34-1.41 / 86-87 % -> 1.21-1.26 / 88-91 %; at 21
  disks (~1.03) 1-3 %.
* Stop 18: hex_lowdose_background's narrow error bars (within-grain std z 1.18-1.23, every
  position ~20 % short, no outliers) were not a covariance problem then: at that noise a
  position pooled 6 of its 81 neighbours, so the pooled step used each pattern's own free
  in-disk gradient,
  whose noise the 6-column covariance did not describe. With the grain pooled whole the
  bars hold (1.14-1.19 / 91-92 %) and the map is 15-17 % more precise.
  Tried, not kept: taking the covariance straight from the fitted error model (weights as
  absolute inverse variances, no per-position chi-square): hex_lowdose_background 1.39 ->
  1.34, but square_psf_weak 1.14 -> 1.29 (the window-pooled model misjudges the per-position
  noise there); the Student-t factor does the first part without the second.
* Earlier fix kept: the reference's own uncertainty uses only positions within 0.05
  (Frobenius) of the region's median `A` (a reference region on two symmetry branches made the
  WS2 error bars 20-50x too wide); with one branch per map it no longer triggers there, but
  protects methods that do not canonicalise.

hex_lowdose_background: py4DSTEM fits nothing in its reference region (validation section).

**Speed with the error bars** (the CC-ST-AE computes its covariance in every position's last
Gauss-Newton step and again in the pooled step). Measured 2026-11-28 05:20 UTC on the 2-core
machine, runs alternated between the code before the error bars (d3d42e5, a detached
worktree) and after: steady state `python benchmarks/bench_ccstae.py speed --no-baseline`
2412 / 2029 patterns/s before, 2348 / 2510 after; a whole `stem-strain map
bench_data/hex_s64_p128_w0.25_d100000_seed0.h5 --method ae` (64 x 64, prepare and pooled
step included) 6.47 / 6.56 s before, 6.17 / 6.70 s after. No slowdown beyond the machine's
run-to-run noise (~10 %); the issue's limit is 10 %. After the error floor: 2658 patterns/s
and a whole map +1.5 % (docs/benchmarks.md "Error floor and symmetry branch")."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("files", nargs="+", type=Path)
    r.add_argument("--methods", default="ae,py4dstem")
    r.add_argument("--kept", action="store_true",
                   help="validation files: calibrate the runs validate.py score kept "
                        "(bench_data/validation/maps) instead of running the methods again")
    rep = sub.add_parser("report")
    rep.add_argument("--write", action="store_true", help="write the docs/benchmarks.md section")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        for f in args.files:
            res = calibrate_case(f, args.methods.split(","), kept=args.kept)
            allres = _load()  # re-read: another run may have added cases meanwhile
            allres.setdefault(f.stem, {}).update(res)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(allres, indent=1))
        return 0
    md = report(_load())
    print(md)
    if args.write:
        from common import write_section

        text = ("## Uncertainty calibration\n\n"
                "How the error bars are made: each method's covariance of its raw `A` comes "
                "from its own weighted least-squares fit (CC-ST-AE: the last Gauss-Newton "
                "step's weighted disk-shift fit, after pooling; py4DSTEM: the weighted lattice "
                "fit of the indexed disks), scaled by that fit's reduced chi-square and its "
                "Student-t factor dof/(dof-2) (no "
                "absolute noise model, no tuning factor: model error that scatters the disks "
                "widens the error bar), and is propagated linearly through `A_raw A_ref^-1` "
                "and the polar decomposition, the reference median's own uncertainty "
                "(pi/2 x the region's scatter / N) included "
                "(`src/napari_stem_strain/uncertainty.py`).\n\n"
                "Per-position error bars against ground truth, within single grains (3x3 "
                "neighbourhood one grain; boundaries excluded). Each cell: standard deviation "
                "of z = (estimate - truth) / sigma (target 0.8-1.25) / share of positions "
                "within 2 sigma (target 90-98 %).\n\n" + md +
                f"\n\nMachine: {machine_info()}. Commands: `nice python "
                "benchmarks/bench_uncertainty.py run FILES...` (the files named in the table, "
                "simulator files from `bench_data/`, validation files from "
                "`bench_data/validation/`), then `python benchmarks/bench_uncertainty.py report "
                "--write`.\n\n" + NOTES)
        write_section("uncertainty", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
