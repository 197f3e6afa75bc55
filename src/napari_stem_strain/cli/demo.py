"""``stem-strain demo``: the main job end to end on built-in simulated data.

Simulates a small WS2-like polycrystal with ground truth, maps it with both methods, writes the
result file and a PNG figure, and prints each method's MAE - a one-command check that an
installation works and a first look at what the two methods deliver.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._methods import method_choices, method_help
from .progress import ProgressBar

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="simulate a small polycrystal and map it with both methods")
    p.add_argument("--out-dir", type=Path, default=Path("demo_output"))
    p.add_argument("--scan", type=int, nargs=2, default=(48, 48), metavar=("RX", "RY"))
    p.add_argument("--noise", type=float, default=0.25, help="background weight w")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--method", choices=method_choices(), default="both",
                   help=method_help("both"))
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..figures import plot_maps
    from ..io.ground_truth import read_ground_truth
    from ..io.readers import open_dataset
    from ..io.results import write_results
    from ..pipeline import compare_to_truth, run_methods
    from ..simulate import SimulationSettings, simulate_to_file
    from .compare import format_table

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    data = out / "demo_polycrystal.h5"
    settings = SimulationSettings(scan=tuple(args.scan), noise=args.noise, seed=args.seed)
    with ProgressBar("simulate", quiet=args.quiet, unit="pattern") as bar:
        simulate_to_file(data, settings, progress=bar)
    truth = read_ground_truth(data)
    with open_dataset(data) as ds, ProgressBar("map", quiet=args.quiet, unit="pattern") as bar:
        groups = run_methods(ds, args.method, reference=truth.reference, progress=bar)
    result = write_results(out / "demo_result.h5", list(groups.values()))
    png = plot_maps(groups, out / "demo_maps.png", truth=truth,
                    title=f"simulated WS2-like polycrystal, w = {args.noise}")
    print(f"data:   {data}\nresult: {result}\nfigure: {png}")
    print(format_table(compare_to_truth(groups, truth)))
    return 0
