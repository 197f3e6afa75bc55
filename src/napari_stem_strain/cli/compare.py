"""``stem-strain compare``: MAE of each method in a result file against ground truth."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register", "format_table", "format_bias_scatter", "format_calibration",
           "print_against_truth"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="mean absolute error of each method against a simulated file's ground truth",
        description="MAE per component over sample positions (CONVENTIONS.md: NaN counts as the "
        "largest true value; rotation wrapped into the symmetry period).",
    )
    p.add_argument("result", type=Path, help="result HDF5 file written by `stem-strain map`")
    p.add_argument("--truth", type=Path, default=None,
                   help="simulated file holding /ground_truth (default: the result's input file)")
    p.add_argument("--reference", default=None,
                   help="re-reference the maps to this region r0:r1,c0:c1 before comparing")
    p.set_defaults(func=run)


def format_table(table: dict[str, dict[str, float]]) -> str:
    """A plain-text table: strain MAE in 1e-3, rotation in degrees."""
    lines = [f"{'method':<10} {'exx 1e-3':>9} {'eyy 1e-3':>9} {'exy 1e-3':>9} {'theta deg':>10}"]
    for name, row in table.items():
        lines.append(
            f"{name:<10} {row['exx'] * 1e3:9.3f} {row['eyy'] * 1e3:9.3f} "
            f"{row['exy'] * 1e3:9.3f} {row['theta']:10.3f}"
        )
    return "\n".join(lines)


def _component_table(title: str, table: dict, width: int, cell) -> str:
    """A per-method table with one column per component (exx, eyy, exy, theta): ``title``,
    a header, and per method ``cell(component, value)`` right-aligned in ``width``. Empty
    for an empty ``table``."""
    if not table:
        return ""
    comps = ("exx", "eyy", "exy", "theta")
    lines = [title, f"{'method':<10} " + " ".join(f"{c:>{width}}" for c in comps)]
    for name, row in table.items():
        lines.append(f"{name:<10} " + " ".join(cell(c, row[c]).rjust(width) for c in comps))
    return "\n".join(lines)


def format_bias_scatter(table: dict[str, dict[str, tuple[float, float, float]]]) -> str:
    """Per method and component ``bias/scatter``: the mean per-grain |bias| and the scatter
    about it (strain 1e-3, rotation degrees). Empty when the truth has no grain labels."""

    def cell(comp: str, v: tuple[float, float, float]) -> str:
        k = 1.0 if comp == "theta" else 1e3
        return f"{v[0] * k:.3f}/{v[1] * k:.3f}"

    return _component_table("error split by grain: mean per-grain |bias| / within-grain "
                            "scatter (strain 1e-3, theta deg)", table, 13, cell)


def format_calibration(table: dict[str, dict[str, dict[str, float]]]) -> str:
    """Calibration of the error bars (issue 13): per method and component the standard
    deviation of ``(estimate - truth) / sigma`` (honest: 1) and the share within 2 sigma
    (honest: 95 %), within single grains. Empty when no method carries sigma maps."""
    return _component_table(
        "error-bar calibration within grains: std of (estimate - truth)/sigma "
        "[share within 2 sigma]", table, 14,
        lambda comp, r: f"{r['std_z']:.2f} [{100 * r['cover2']:.0f}%]")


def run(args: argparse.Namespace) -> int:
    from ..io.ground_truth import read_ground_truth
    from ..io.results import read_results

    groups = read_results(args.result)
    truth_path = args.truth or Path(next(iter(groups.values())).input_file or "")
    if not str(truth_path) or not truth_path.exists():
        raise ValueError(
            f"{args.result}: no ground truth to compare with; give --truth SIMULATED.h5"
        )
    truth = read_ground_truth(truth_path)
    if truth is None:
        raise ValueError(f"{truth_path}: holds no /ground_truth group (not a simulated file)")
    shape = truth.exx.shape
    for name, g in groups.items():
        if g.maps.exx.shape != shape:
            raise ValueError(
                f"{args.result}: /{name} maps are {g.maps.exx.shape}, ground truth is {shape}"
            )
    if args.reference:
        groups = {k: g.with_reference(args.reference) for k, g in groups.items()}
    print_against_truth(groups, truth, truth_path)
    return 0


def print_against_truth(groups: dict, truth, truth_path: Path) -> None:
    """Print the MAE table, its split into per-grain bias and scatter, and the error bars'
    calibration of every method in ``groups`` against ``truth`` (``compare``, and ``map`` on
    a simulated file).

    The truth is first taken relative to the maps' reference region, as the plugin's MAE
    table does: compared with the file's own reference instead, a region inside a strained
    grain would add that grain's strain to every error.
    """
    from ..pipeline import bias_scatter_to_truth, calibration_to_truth, compare_to_truth

    region = next(iter(groups.values())).reference if groups else None
    if region and region != truth.reference:
        truth = truth.relative_to(region)
        if truth.reference != region:
            print(f"note: the truth of {truth_path} could not be re-referenced to {region} "
                  f"(no true A in the file, or no sample position there); the errors include "
                  f"that region's strain against {truth.reference}", file=sys.stderr)
    print(format_table(compare_to_truth(groups, truth)))
    split = format_bias_scatter(bias_scatter_to_truth(groups, truth))  # systematic vs noise
    if split:
        print(split)
    calib = format_calibration(calibration_to_truth(groups, truth))  # issue 13
    if calib:
        print(calib)
