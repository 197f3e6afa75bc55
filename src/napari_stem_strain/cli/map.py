"""``stem-strain map``: strain and rotation maps by one or both methods into a result file."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ._methods import method_choices, method_help
from .progress import ProgressBar

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "map",
        help="map strain and rotation (CC-ST-AE, py4DSTEM or both) into a result file",
        description="Map strain and rotation of a 4D-STEM file. Strain is relative to the median "
        "over the reference region; background positions are NaN.",
    )
    p.add_argument("file", type=Path, help="4D-STEM file (any supported format)")
    p.add_argument("--method", choices=method_choices(), default="ae",
                   help=method_help("ae"))
    p.add_argument("--reference", metavar="r0:r1,c0:c1",
                   help="reference region in scan pixels (half-open). Default: the simulated "
                   "file's reference grain, else a square deep inside the sample")
    p.add_argument("--out", type=Path, required=True, help="result HDF5 file to write")
    p.add_argument("--model", default="default",
                   help="CC-ST-AE model file (default: the shipped weights)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where CC-ST-AE runs (default: auto = CUDA when torch sees a GPU, "
                   "else CPU)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="CC-ST-AE patterns per batch (default: 512 on CPU, 4096 on CUDA)")
    p.add_argument("--dataset", default=None,
                   help="array inside a file holding several (default: the largest 4D "
                   "array; an ambiguous choice is refused, naming the arrays)")
    p.add_argument("--scan-shape", type=int, nargs=2, metavar=("RX", "RY"), default=None,
                   help="scan shape of a 3D stack of patterns (default: from the file's "
                   "metadata or its detector's rule; else the stack is refused)")
    p.add_argument("--dask", metavar="ADDRESS", default=None,
                   help="run on a Dask cluster: a scheduler address or local:N (default: no "
                   "cluster, this process)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (default: a progress bar on stderr)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file (default: add to it only when it holds "
                   "results of this same input file, else refuse)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io.ground_truth import read_ground_truth
    from ..io.readers import open_dataset
    from ..io.results import check_not_input, check_writable, write_results
    from ..io.stamp import InputStamp
    from ..pipeline import expand_methods, run_methods
    from ..strain import parse_region

    if args.reference:
        parse_region(args.reference)
    check_writable(args.out)  # fail before the work, not after
    check_not_input(args.out, args.file)
    t0 = time.perf_counter()
    stamp = InputStamp.take(args.file)  # the result is refused if the input changes meanwhile
    scan_shape = tuple(args.scan_shape) if args.scan_shape else None
    if not args.overwrite:  # never mix the maps of two inputs in one file
        from ..io.results import check_adds_to_own_results

        check_adds_to_own_results(args.out, args.file, hint="choose another --out, or "
                                  "--overwrite to replace the file")
    with open_dataset(args.file, dataset=args.dataset, scan_shape=scan_shape) as ds:
        n_groups = len(expand_methods(args.method))
        # per group: 4 maps + A + A_raw (float32) + sample (bool), plus HDF5 overhead
        check_writable(args.out, needed_bytes=n_groups * ds.scan_shape[0] * ds.scan_shape[1]
                       * (4 * 4 + 2 * 16 + 1) + 2**20)
        truth = read_ground_truth(args.file)  # None unless it is a simulated HDF5 file
        if truth is not None and tuple(truth.scan_shape) != tuple(ds.scan_shape):
            print(f"stem-strain: note: the ground truth of {args.file} is "
                  f"{truth.scan_shape[0]} x {truth.scan_shape[1]}, the scan as read "
                  f"{ds.scan_shape[0]} x {ds.scan_shape[1]}: not compared, and its reference "
                  "region not used", file=sys.stderr)
            truth = None
        reference = args.reference or (truth.reference if truth is not None else None)
        with ProgressBar("map", quiet=args.quiet, unit="pattern") as bar:
            groups = run_methods(ds, args.method, reference=reference, model=args.model,
                                 device=args.device, batch_size=args.batch_size, progress=bar,
                                 dask_address=args.dask)
    if stamp is not None:
        stamp.check()
    write_results(args.out, list(groups.values()), replace=args.overwrite)
    seconds = time.perf_counter() - t0
    n = ds.scan_shape[0] * ds.scan_shape[1]
    ref = next(iter(groups.values())).reference
    print(f"wrote {args.out} ({', '.join(groups)}; reference {ref}; {n} patterns in "
          f"{seconds:.1f} s)")
    if truth is not None:
        from .compare import print_against_truth

        print_against_truth(groups, truth, args.file)
    return 0
