"""``stem-strain fit``: fit a CC-ST-AE model to a dataset (self-supervised)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .progress import ProgressBar

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit",
        help="fit a CC-ST-AE model to a 4D-STEM file (self-supervised, no ground truth)",
        description="Fit a CC-ST-AE model to a dataset, starting from the shipped weights or "
        "another model. The loss is shown per epoch; training stops early when the held-out "
        "loss stops improving; a checkpoint OUT.ckpt lets an interrupted fit resume.",
    )
    p.add_argument("file", type=Path, help="4D-STEM file (any supported format)")
    p.add_argument("--out", type=Path, required=True, help="model file to write (.pt)")
    p.add_argument("--init", default="default",
                   help="starting model: 'default' (shipped weights) or a model file")
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (default 15)")
    p.add_argument("--seed", type=int, default=0, help="random seed (fits are deterministic)")
    p.add_argument("--reference", metavar="r0:r1,c0:c1", default=None,
                   help="a region of one grain, to read the lattice from (default: the most "
                   "strongly diffracting spot of the scan)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--no-resume", action="store_true",
                   help="ignore an existing checkpoint and start over")
    p.add_argument("--dataset", default=None, help="array inside a file holding several")
    p.add_argument("--scan-shape", type=int, nargs=2, metavar=("RX", "RY"), default=None,
                   help="scan shape of a 3D stack of patterns")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io.readers import open_dataset
    from ..methods.ccstae import fit_model, load_model
    from ..strain import parse_region

    if args.reference:
        parse_region(args.reference)
    if args.init != "default":
        load_model(args.init)  # refuse a bad starting model before reading any data
    if not args.out.parent.exists():
        raise ValueError(f"output folder {args.out.parent} does not exist")
    scan_shape = tuple(args.scan_shape) if args.scan_shape else None
    with open_dataset(args.file, dataset=args.dataset, scan_shape=scan_shape) as ds:
        with ProgressBar("fit", quiet=args.quiet, unit="epoch") as bar:
            out = fit_model(ds, init=args.init, epochs=args.epochs, seed=args.seed, out=args.out,
                            progress=bar, resume=not args.no_resume, reference=args.reference,
                            device=args.device)
    info = load_model(out).training
    print(f"wrote {out} ({info.get('lattice_from')} lattice, {info.get('epochs_run')} epochs run, "
          f"weights of epoch {info.get('best_epoch')}, "
          f"best held-out loss {info.get('best_val', float('nan')):.4f}, "
          f"{info.get('seconds')} s)")
    return 0
