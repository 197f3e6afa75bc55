"""``stem-strain train-default``: rebuild the shipped CC-ST-AE weights from simulator data."""

from __future__ import annotations

import argparse
from pathlib import Path

from .progress import ProgressBar

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-default",
        help="rebuild the shipped CC-ST-AE weights from simulated data (deterministic)",
        description="Simulate four small hexagonal polycrystals (noise 0 to 0.7) and train the "
        "default model on them; the same seed gives the same weights. A few minutes on 2 CPU "
        "cores.",
    )
    p.add_argument("--out", type=Path, required=True,
                   help="model file to write (required: the shipped weights are never replaced "
                   "by accident; to rebuild them, name src/napari_stem_strain/methods/ccstae/"
                   "weights/default.pt explicitly)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..methods.ccstae.train import train_default

    out = args.out
    if not Path(out).parent.exists():
        raise ValueError(f"output folder {Path(out).parent} does not exist")
    with ProgressBar("train-default", quiet=args.quiet, unit="epoch") as bar:
        path = train_default(out, seed=args.seed, epochs=args.epochs, progress=bar)
    import json

    from ..methods.ccstae import load_model

    side = Path(path).with_suffix(".json")
    side.write_text(json.dumps(load_model(path).to_dict()["training"], indent=1) + "\n")
    print(f"wrote {path} and {side.name}")
    return 0
