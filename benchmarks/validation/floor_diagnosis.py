"""What the CC-ST-AE's error floor estimates, against what each grain's residuals show.

    nice python benchmarks/validation/floor_diagnosis.py [CASE ...] [--model FITTED.pt]

The pooled last step weights each disk by ``1 / (s2 / w_k + tau2)``: shot noise scaled by
``s2`` plus a floor ``tau2`` for the per-disk model error that does not shrink with
intensity (:func:`napari_stem_strain.methods.ccstae.refine.shift_error_model`, a method of
moments on each position's residuals, pooled over same-grain neighbours). On the validation
set's cases every grain holds one deformation, so the two parts can be told apart from the
truth: a disk's residual averaged over a grain keeps only its systematic part (the noise
averages out), and its scatter about that average is the noise. Per true grain the script
prints

* ``sys rms``: the rms of the grain-mean residual (px), per ring of disks;
* ``noise sd``: the rms scatter of the residuals about their grain mean (px), per ring;
* ``noise obs/model``: that scatter's variance over the error model's ``s2`` times each
  disk's noise factor, median over disks (1: the noise scale is right);
* ``tau``: the floor the method estimated, median over the grain (px).

The residuals are the first (floor-less) pass's, as the error model sees them. With
``--model`` the fitted model is reused; otherwise ``fit`` runs from the shipped weights first,
as ``validate.py`` does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from validate import FOLDER  # noqa: E402

DEFAULT_CASES = ("hex_detector_background", "abtem_si001_thick", "rect_dynamical")


def _captured_run(path: Path, model_path: Path | None) -> tuple[dict, object]:
    """Run the CC-ST-AE on ``path`` and keep, per scan row, the error model's inputs
    (residuals, noise factors) and outputs (``s2``, ``tau2``)."""
    from napari_stem_strain.io.ground_truth import read_ground_truth
    from napari_stem_strain.io.readers import open_dataset
    from napari_stem_strain.methods.ccstae import CCSTAEMethod, fit_model, infer, load_model
    from napari_stem_strain.methods.runner import run_method

    truth = read_ground_truth(path)
    Rx, Ry = truth.grains.shape
    kept: dict = {}
    calls: list = []
    original_model, original_consume = infer.shift_error_model, infer.PooledLastStep.consume

    def error_model(resid, noise_factor, floor_factor, used, A, radius, A_var=None):
        s2, tau2 = original_model(resid, noise_factor, floor_factor, used, A, radius, A_var)
        calls.append((resid.numpy(), noise_factor.numpy(), used.numpy(), s2.numpy(),
                      tau2.numpy()))
        return s2, tau2

    def consume(self, r0, r1, h0, window, assembled):
        n = len(calls)
        original_consume(self, r0, r1, h0, window, assembled)
        if len(calls) == n:
            return
        resid, nf, used, s2, tau2 = calls[-1]
        rows = slice(r0 - h0, r1 - h0)
        if "resid" not in kept:
            K = resid.shape[2]
            kept.update(resid=np.full((Rx, Ry, K, 2), np.nan), nf=np.full((Rx, Ry, K), np.nan),
                        s2=np.full((Rx, Ry), np.nan), tau2=np.full((Rx, Ry), np.nan))
        kept["resid"][r0:r1] = np.where(used[rows][..., None], resid[rows], np.nan)
        kept["nf"][r0:r1] = np.where(used[rows], nf[rows], np.nan)
        kept["s2"][r0:r1], kept["tau2"][r0:r1] = s2[rows], tau2[rows]

    infer.shift_error_model, infer.PooledLastStep.consume = error_model, consume
    try:
        with open_dataset(path) as ds, tempfile.TemporaryDirectory() as tmp:
            if model_path is None:
                model_path = Path(tmp) / "fitted.pt"
                fit_model(ds, init="default", out=model_path, reference=truth.reference,
                          device="cpu")
            method = CCSTAEMethod(load_model(model_path), device="cpu")
            run_method(method, ds)
            kept["radii"] = np.linalg.norm(method.engine.P.cpu().numpy(), axis=1)
    finally:
        infer.shift_error_model, infer.PooledLastStep.consume = original_model, original_consume
    return kept, truth


def diagnose(path: Path, model_path: Path | None = None) -> list[list[str]]:
    """One table row per true grain of the case at ``path`` (see the module docstring)."""
    kept, truth = _captured_run(path, model_path)
    radii = np.round(kept["radii"], 3)
    rings = [np.flatnonzero(radii == r) for r in np.unique(radii) if r > 0]
    rows = []
    for g in np.unique(truth.grains[truth.sample]):
        inside = truth.sample & (truth.grains == g) & np.isfinite(kept["s2"])
        if inside.sum() < 10:
            continue
        r = kept["resid"][inside]  # (n, K, 2)
        mean = np.nanmean(r, axis=0)  # (K, 2): the grain's systematic residual
        var = np.nanvar(r, axis=0).mean(-1)  # (K,): noise variance per coordinate
        model = np.nanmedian(kept["s2"][inside][:, None] * kept["nf"][inside], axis=0)

        def per_ring(x: np.ndarray) -> str:
            return " / ".join(f"{np.sqrt(np.nanmean(x[k])):.3f}" for k in rings)

        ratio = np.nanmedian(var[1:] / model[1:])
        tau = float(np.sqrt(np.nanmedian(kept["tau2"][inside])))
        rows.append([path.stem, str(int(g)), str(int(inside.sum())),
                     per_ring((mean ** 2).mean(-1)), per_ring(var), f"{ratio:.2f}",
                     f"{tau:.3f}"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from common import command_line, machine_info, markdown_table

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", default=list(DEFAULT_CASES))
    ap.add_argument("--model", type=Path, default=None,
                    help="a fitted model to reuse (one case only)")
    args = ap.parse_args(argv)
    if args.model is not None and len(args.cases) != 1:
        ap.error("--model goes with exactly one case")
    rows = []
    for case in args.cases:
        path = FOLDER / f"{case}.h5"
        if not path.exists():
            print(f"{path}: not generated (run validate.py generate)", file=sys.stderr)
            return 1
        rows += diagnose(path, args.model)
    print()
    print(machine_info() + " Command: `" + command_line() + "`.")
    print(markdown_table(["case", "grain", "positions", "sys rms per ring (px)",
                          "noise sd per ring (px)", "noise obs/model", "tau (px)"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
