"""``stem-strain simulate OUT.h5``: write a simulated polycrystal 4D-STEM dataset with ground
truth (see :mod:`napari_stem_strain.simulate` and ``docs/conventions.md``)."""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["register", "run", "settings_from_args"]


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} is not a positive integer")
    return v


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="write a simulated polycrystal 4D-STEM dataset with ground truth",
        description=(
            "Simulate a kinematic polycrystal 4D-STEM scan (Voronoi grains, one unstrained "
            "reference grain, optional vacuum, descan, diffuse background, Poisson noise) and "
            "write it with its ground-truth strain and rotation maps to an HDF5 file "
            "(/data, /ground_truth)."
        ),
    )
    p.add_argument("out", metavar="OUT.h5", help="output HDF5 file (written atomically)")
    p.add_argument("--scan", nargs=2, type=_positive_int, metavar=("RX", "RY"),
                   default=[64, 64], help="scan shape (default 64 64)")
    p.add_argument("--pattern", type=_positive_int, default=128, metavar="N",
                   help="detector size N (patterns are N x N, default 128)")
    p.add_argument("--disk-radius", type=_float, default=4.0, metavar="PX",
                   help="disk radius in pixels (default 4)")
    p.add_argument("--lattice", choices=("hex", "square", "rect"), default="hex",
                   help="lattice: hex (WS2-like, 60 deg), square (90), rect (180); default hex")
    p.add_argument("--noise", type=_float, default=0.0, metavar="W",
                   help="background weight w in [0, 1): pattern = (1-w) P + w B (default 0)")
    dose = p.add_mutually_exclusive_group()
    dose.add_argument("--dose", type=_float, default=1e5, metavar="D",
                      help="electrons per pattern for Poisson noise (default 1e5)")
    dose.add_argument("--no-poisson", action="store_true",
                      help="no Poisson noise: noise-free float32 patterns")
    p.add_argument("--vacuum", action=argparse.BooleanOptionalAction, default=True,
                   help="include a vacuum region at one edge (default: yes)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--grains", type=_positive_int, default=None, metavar="N",
                   help="number of grains (default: 8 for a 64x64 scan, growing with its side)")
    p.add_argument("--bragg-intensity", type=_float, default=0.05, metavar="F",
                   help="first-order disk intensity relative to the direct beam (default 0.05)")
    p.add_argument("--max-strain", type=_float, default=0.02, metavar="E",
                   help="grain strains uniform in +-E (default 0.02)")
    p.add_argument("--max-rotation", type=_float, default=25.0, metavar="DEG",
                   help="grain rotations uniform in +-DEG degrees (default 25)")
    p.add_argument("--descan", type=_float, default=2.0, metavar="PX",
                   help="amplitude of the direct-beam drift over the scan, pixels (default 2)")
    p.add_argument("--compression", choices=("none", "gzip", "lzf"), default="none",
                   help="HDF5 compression of /data (default none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)

    def one_line_error(message: str) -> None:
        # a bad argument is one clear line on stderr and exit status 2, never a usage dump
        print(f"stem-strain simulate: error: {message} (see stem-strain simulate --help)",
              file=sys.stderr)
        sys.exit(2)

    p.error = one_line_error  # type: ignore[method-assign]


def settings_from_args(args: argparse.Namespace):
    """The :class:`SimulationSettings` the arguments ask for (validated)."""
    from ..simulate import SimulationSettings

    s = SimulationSettings(
        scan=(int(args.scan[0]), int(args.scan[1])),
        pattern=int(args.pattern),
        disk_radius=float(args.disk_radius),
        lattice=args.lattice,
        noise=float(args.noise),
        dose=None if args.no_poisson else float(args.dose),
        vacuum=bool(args.vacuum),
        seed=int(args.seed),
        n_grains=args.grains,
        bragg_intensity=float(args.bragg_intensity),
        max_strain=float(args.max_strain),
        max_rotation=float(args.max_rotation),
        descan=float(args.descan),
    )
    s.resolved()  # validates, derived values included
    return s


def run(args: argparse.Namespace) -> int:
    from ..simulate import simulate_to_file
    from .progress import ProgressBar

    settings = settings_from_args(args)
    t0 = time.perf_counter()
    compression = None if args.compression == "none" else args.compression
    with ProgressBar("simulate", quiet=args.quiet, unit="pattern") as bar:
        path = simulate_to_file(args.out, settings, progress=bar, compression=compression)
    if not args.quiet:
        Rx, Ry = settings.scan
        dt = time.perf_counter() - t0
        print(f"wrote {path} ({Rx}x{Ry} scan, {settings.pattern}x{settings.pattern} patterns, "
              f"{Rx * Ry / max(dt, 1e-9):.0f} patterns/s)", file=sys.stderr)
    return 0
