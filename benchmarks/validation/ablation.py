"""What the network does and what the refinement does: the CC-ST-AE's stages one by one.

    nice python benchmarks/validation/ablation.py --write [CASE ...]

On validation cases (``validate.py`` generates them), after ``fit`` from the shipped weights:

1. *encoder alone*: ``A`` straight from the network's 32 x 32 lattice-unit view;
2. *+ angular polish*: the rotation polished over +-10 deg by the summed disk intensity;
3. *+ Gauss-Newton*: the per-disk refinement on exact pixels, each pattern alone
   (``pool_radius=0``);
4. *+ pooling*: the disk nuisances pooled over same-grain neighbours (the full method).

Scored like ``validate.py`` (CONVENTIONS.md MAE over the crystal; strain 1e-3, rotation deg),
all with the case's reference region and the true crystal mask, so only ``A`` differs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import (  # noqa: E402
    command_line,
    machine_info,
    mae_table,
    markdown_table,
    write_section,  # noqa: E402
)
from validate import FOLDER  # noqa: E402

DEFAULT_CASES = ("hex_sharp_fringes_noisefree", "hex_detector_background", "rect_dynamical")


def _encoder_stages(method, ds) -> tuple[np.ndarray, np.ndarray]:
    """Raw ``A`` from the encoder alone and after the angular polish, for every position."""
    from napari_stem_strain.methods.ccstae.preprocess import (
        as_patterns,
        beam_centres,
        encoder_input,
    )
    from napari_stem_strain.methods.ccstae.refine import angular_search

    eng = method.engine
    g, net = eng.geom, eng.model.net
    Rx, Ry = ds.scan_shape
    enc = np.full((Rx, Ry, 2, 2), np.nan, np.float32)
    pol = enc.copy()
    with torch.inference_mode():
        for r in range(Rx):
            pats = as_patterns(ds.read_rows(r, r + 1)[0])
            c = beam_centres(pats, g.c0, g.r)
            A0, _ = net.predict(encoder_input(pats, c, g, net.n, net.extent))
            enc[r] = A0.numpy()
            pol[r] = angular_search(pats, c, A0, eng.P, g.L, eng.polish_deg, 2.0, g.r).numpy()
    return enc, pol


def ablate(path: Path) -> dict[str, dict]:
    from napari_stem_strain.io.ground_truth import read_ground_truth
    from napari_stem_strain.io.readers import open_dataset
    from napari_stem_strain.methods.ccstae import CCSTAEMethod, fit_model, load_model
    from napari_stem_strain.methods.runner import run_method
    from napari_stem_strain.strain import strain_maps

    truth = read_ground_truth(path)
    out: dict[str, dict] = {}
    with open_dataset(path) as ds, tempfile.TemporaryDirectory() as tmp:
        mp = Path(tmp) / "fitted.pt"
        fit_model(ds, init="default", out=mp, reference=truth.reference, device="cpu")
        model = load_model(mp)
        stages = {}
        for label, pool in (("+ Gauss-Newton", 0), ("+ pooling (full method)", None)):
            kw = {} if pool is None else {"pool_radius": pool}
            m = CCSTAEMethod(model, device="cpu", **kw)
            stages[label] = run_method(m, ds).A
        enc, pol = _encoder_stages(m, ds)
        stages = {"encoder alone": enc, "+ angular polish": pol, **stages}
        for label, A in stages.items():
            A = np.where(truth.sample[..., None, None], A, np.nan)
            maps = strain_maps(A, truth.reference, truth.symmetry_deg, mask=truth.sample)
            out[label] = mae_table(maps, truth)
            print(path.stem, label, {k: round(v, 6) for k, v in out[label].items()},
                  flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", default=list(DEFAULT_CASES))
    ap.add_argument("--write", action="store_true", help="write docs/benchmarks.md")
    args = ap.parse_args(argv)
    rows = []
    for name in args.cases:
        for label, t in ablate(FOLDER / f"{name}.h5").items():
            rows.append([name, label, f"{1e3 * t['exx']:.3f}", f"{1e3 * t['eyy']:.3f}",
                         f"{1e3 * t['exy']:.3f}", f"{t['theta']:.3f}"])
    md = "\n".join([
        "## CC-ST-AE ablation: network versus refinement",
        "",
        f"Machine: {machine_info()}. Command: `{command_line()}`.",
        "",
        "Validation cases after `fit`; MAE (strain 1e-3, rotation deg) with the true crystal "
        "mask and the case's reference region.",
        "",
        markdown_table(["case", "stage", "exx", "eyy", "exy", "theta"], rows),
    ])
    print(md)
    if args.write:
        write_section("ablation", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
