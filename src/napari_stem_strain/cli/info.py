"""``stem-strain info FILE``: what a 4D-STEM file holds, read lazily (format, shape, dtype,
calibration, size on disk, the 4D arrays of a file holding several), and optionally its
virtual bright-field image as a PNG."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["register", "run", "describe", "write_png"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="show format, shape, dtype, calibration and size of a 4D-STEM file",
        description="Describe a 4D-STEM file without reading it whole: format, shape, dtype, "
        "calibration, size on disk and, for files holding several, the list of 4D arrays. "
        "--png also streams the file once to write its virtual bright-field image.",
    )
    p.add_argument("file", type=Path, help="4D-STEM file (any supported format)")
    p.add_argument("--dataset", default=None, metavar="NAME",
                   help="array inside a file holding several (names as listed by info)")
    p.add_argument("--scan-shape", type=int, nargs=2, metavar=("RX", "RY"), default=None,
                   help="scan shape of a 3D stack of patterns (or to re-shape the scan)")
    p.add_argument("--png", type=Path, default=None, metavar="OUT.png",
                   help="write the virtual bright-field image to this PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar for --png")
    p.set_defaults(func=run)


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"  # pragma: no cover


def _size_on_disk(files: list[str]) -> tuple[int, int]:
    seen, total = set(), 0
    for f in files:
        key = os.path.realpath(f)
        if key in seen:
            continue
        seen.add(key)
        try:
            total += os.path.getsize(key)
        except OSError:
            pass
    return total, len(seen)


def _calibration_text(cal: Any) -> str:
    parts = []
    if cal.r_pixel_size:
        parts.append(f"scan step {cal.r_pixel_size:.6g} {cal.r_units or ''}".rstrip())
    if cal.q_pixel_size:
        parts.append(f"detector pixel {cal.q_pixel_size:.6g} {cal.q_units or ''}".rstrip())
    return ", ".join(parts) if parts else "none in the file (pixels)"


def _array_lines(summary: Any, chosen: str | None) -> list[str]:
    lines = []
    for a in summary.arrays:
        if not (a.is_4d_like or a.is_stack):
            continue
        mark = "*" if chosen is not None and a.name.strip("/") == chosen.strip("/") else "-"
        kind = "" if a.is_4d else (" (frame stream)" if a.stream else " (3D stack)")
        shape = "(" + ", ".join(str(s) for s in a.shape) + ")"
        lines.append(f"  {mark} {a.name}  {shape} {a.dtype}{kind}")
    return lines


def describe(ds: Any, summary: Any = None) -> list[str]:
    """The lines ``info`` prints for an open dataset (``summary``: :func:`inspect_file`'s)."""
    Rx, Ry, Qx, Qy = ds.shape
    meta = ds.metadata
    on_disk, nfiles = _size_on_disk(list(meta.get("files", [])) or [str(ds.source)])
    lines = [
        f"file:        {ds.source}",
        f"format:      {meta.get('format', '?')}",
    ]
    if ds.name:
        lines.append(f"array:       {ds.name}")
    lines += [
        f"shape:       ({Rx}, {Ry}, {Qx}, {Qy})  = scan {Rx} x {Ry}, patterns {Qx} x {Qy}",
        f"dtype:       {ds.dtype}",
        f"scan shape:  from {meta.get('scan_shape_from', 'file')}",
        f"calibration: {_calibration_text(ds.calibration)}",
        f"size:        {_human(on_disk)} on disk"
        + (f" ({nfiles} files)" if nfiles > 1 else "")
        + f", {_human(ds.nbytes)} as an array",
    ]
    if meta.get("compression"):
        lines.append(f"compression: {meta['compression']}")
    if summary is not None:
        arrays = _array_lines(summary, ds.name)
        if len(arrays) > 1:
            lines.append(f"arrays:      {len(arrays)} (the one shown is marked *)")
            lines += arrays
    return lines


def write_png(image: Any, out: Path) -> None:
    """Write a 2D image as a grey-scale PNG (robust contrast: 0.5-99.5 percentiles), with
    matplotlib's Agg canvas (no display, no pyplot state)."""
    import numpy as np
    from matplotlib.image import imsave

    img = np.asarray(image, dtype=np.float64)
    finite = img[np.isfinite(img)]
    if finite.size:
        lo, hi = np.percentile(finite, [0.5, 99.5])
        if hi <= lo:
            lo, hi = float(finite.min()), float(finite.max()) + 1e-12
    else:
        lo, hi = 0.0, 1.0
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"{out}: --png needs a .png file name")
    imsave(out, np.nan_to_num(img, nan=lo), cmap="gray", vmin=lo, vmax=hi, format="png")


def run(args: argparse.Namespace) -> int:
    from ..io.errors import DataError
    from ..io.readers import inspect_file, open_dataset

    if args.png is not None:  # fail before any work when the PNG cannot be written
        from ..io.results import check_writable

        if Path(args.png).suffix.lower() != ".png":
            raise ValueError(f"{args.png}: --png needs a .png file name")
        check_writable(args.png)
    summary = inspect_file(args.file)
    scan_shape = tuple(args.scan_shape) if args.scan_shape else None
    try:
        ds = open_dataset(args.file, dataset=args.dataset, scan_shape=scan_shape)
    except DataError as err:
        several = [a for a in summary.arrays if a.is_4d_like]
        if args.dataset is None and len(several) > 1 and "several" in str(err) \
                and args.png is None:
            print(f"file:        {summary.path}")
            print(f"format:      {summary.format}")
            total, _ = _size_on_disk([str(summary.path)])
            print(f"size:        {_human(total)} on disk")
            print(f"arrays:      {len(several)} 4D arrays; choose one with --dataset NAME")
            for line in _array_lines(summary, None):
                print(line)
            return 0
        raise
    with ds:
        for line in describe(ds, summary):
            print(line)
        if args.png is not None:
            from ..virtual import virtual_images
            from .progress import ProgressBar

            quiet = args.quiet or not sys.stderr.isatty()
            with ProgressBar("virtual images", quiet=quiet, unit="pattern") as bar:
                vi = virtual_images(ds, progress=bar)
            write_png(vi.bright_field, args.png)
            cx, cy = vi.centre
            print(f"direct beam: centre ({cx:.2f}, {cy:.2f}) px, radius {vi.beam_radius:.2f} px")
            print(f"bright field: wrote {args.png} (disk of {vi.bf_radius:.1f} px)")
    return 0
