"""Benchmark of the CC-ST-AE method against the py4DSTEM baseline (same files, same scoring).

Parts (each can run alone; ``all`` runs them in turn and, with ``--write``, puts one section
``ccstae`` into ``docs/benchmarks.md``):

* ``accuracy``: the published noise levels (w = 0, 0.25, 0.5, 0.7; dose 1e5; 64 x 64 scan of
  128 x 128 px hexagonal polycrystals with vacuum), shipped weights, no fitting; py4DSTEM on the
  same files.
* ``unseen``: a dataset the shipped weights never saw (square lattice, disk radius 3, 96 px
  patterns, w = 0.3): ``fit`` with default settings starting from the shipped weights, then map.
* ``speed``: steady-state mapping throughput on 2 CPU threads (``torch.set_num_threads(2)``)
  for 128 x 128 patterns, and the fit time of the unseen dataset.
* ``memory``: peak RSS of a map of a 64 x 64 and a 256 x 256 scan (the latter a lazily tiled
  view of the former), each in a fresh child process.

    nice python benchmarks/bench_ccstae.py all --write
    python benchmarks/bench_ccstae.py accuracy --noise 0 --no-baseline   # a quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    NOISE_LEVELS,
    command_line,
    get_benchmark_file,
    machine_info,
    markdown_table,
    run_scored,
    write_section,
)

from napari_stem_strain.io.ground_truth import read_ground_truth  # noqa: E402

UNSEEN = {"lattice": "square", "pattern": 96, "disk_radius": 3.0}
UNSEEN_NOISE = 0.3


def _fmt(t: dict) -> list[str]:
    return [f"{1e3 * t['exx']:.2f}", f"{1e3 * t['eyy']:.2f}", f"{1e3 * t['exy']:.2f}",
            f"{t['theta']:.3f}", f"{100 * t['fitted']:.1f}"]


def accuracy(noise: list[float], baseline: bool, scan: int = 64) -> tuple[str, dict]:
    from napari_stem_strain.methods.ccstae import CCSTAEMethod

    rows, raw = [], {}
    for w in noise:
        path = get_benchmark_file(w, scan=scan)
        # the reference region goes to both methods, as `stem-strain map --reference` gives it
        ref = read_ground_truth(path).reference
        ae = run_scored(CCSTAEMethod("default", device="cpu", reference=ref), path)
        raw[w] = {"ae": ae.table, "ae_pps": ae.patterns_per_second}
        rows.append([f"{w:g}", "CC-ST-AE (shipped)"] + _fmt(ae.table)
                    + [f"{ae.patterns_per_second:.0f}"])
        print(rows[-1], flush=True)
        if baseline:
            from napari_stem_strain.methods.py4dstem import Py4DSTEMMethod

            p4 = run_scored(Py4DSTEMMethod(reference=ref), path)
            raw[w]["py4dstem"] = p4.table
            raw[w]["py4dstem_pps"] = p4.patterns_per_second
            rows.append([f"{w:g}", "py4DSTEM"] + _fmt(p4.table)
                        + [f"{p4.patterns_per_second:.1f}"])
            red = [1 - ae.table[k] / p4.table[k] for k in ("exx", "eyy", "exy")]
            rows.append([f"{w:g}", "AE vs py4DSTEM"] + [f"{-100 * r:+.0f} %" for r in red]
                        + [f"{ae.table['theta'] / p4.table['theta']:.2f}x", "",
                           f"{ae.patterns_per_second / p4.patterns_per_second:.0f}x"])
            print(rows[-2:], flush=True)
    hdr = ["w", "method", "exx", "eyy", "exy", "theta (deg)", "fitted %", "patterns/s"]
    return markdown_table(hdr, rows), raw


def unseen(baseline: bool, scan: int = 64) -> tuple[str, dict]:
    import tempfile

    from napari_stem_strain.io.readers import open_dataset
    from napari_stem_strain.methods.ccstae import CCSTAEMethod, fit_model

    path = get_benchmark_file(UNSEEN_NOISE, scan=scan, **UNSEEN)
    ref = read_ground_truth(path).reference
    with tempfile.TemporaryDirectory() as tmp, open_dataset(path) as ds:
        t0 = time.perf_counter()
        model = fit_model(ds, init="default", out=Path(tmp) / "fit.pt", device="cpu",
                          reference=ref)
        fit_s = time.perf_counter() - t0
        ae = run_scored(CCSTAEMethod(model, device="cpu", reference=ref), path)
    rows = [["CC-ST-AE (fit from shipped)"] + _fmt(ae.table)]
    raw = {"ae": ae.table, "fit_seconds": fit_s}
    if baseline:
        from napari_stem_strain.methods.py4dstem import Py4DSTEMMethod

        p4 = run_scored(Py4DSTEMMethod(reference=ref), path)
        raw["py4dstem"] = p4.table
        rows.append(["py4DSTEM"] + _fmt(p4.table))
    print(rows, f"fit {fit_s:.0f} s", flush=True)
    hdr = ["method", "exx", "eyy", "exy", "theta (deg)", "fitted %"]
    desc = (f"{UNSEEN['lattice']} lattice, disk radius {UNSEEN['disk_radius']} px, "
            f"{UNSEEN['pattern']} px patterns, w = {UNSEEN_NOISE}, {scan} x {scan} scan; "
            f"`fit` with default settings took {fit_s:.0f} s")
    return desc + "\n\n" + markdown_table(hdr, rows), raw


def speed(n: int = 4096, threads: int = 2, device: str = "cpu") -> dict:
    """Steady-state patterns/s of the mapping path (engine prepared; blocks as the runner
    hands them out), 128 x 128 patterns, on ``device`` (``cpu``, ``cuda`` or ``auto``)."""
    import torch

    from napari_stem_strain.device import resolve_device
    from napari_stem_strain.io.readers import open_dataset
    from napari_stem_strain.methods.ccstae import CCSTAEMethod

    device = resolve_device(device)
    torch.set_num_threads(threads)
    path = get_benchmark_file(0.25)
    with open_dataset(path) as ds:
        m = CCSTAEMethod("default", device=device)
        m.prepare(ds)
        rows = max(1, n // ds.scan_shape[1])
        block = ds.read_rows(0, rows)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    m.process_block(block[:1], 0)  # warm-up (CUDA: kernels, allocator)
    sync()
    t0 = time.perf_counter()
    m.process_block(block, 0)
    sync()
    dt = time.perf_counter() - t0
    pps = block.shape[0] * block.shape[1] / dt
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"{threads} CPU threads"
    print(f"speed: {pps:.0f} patterns/s on {name}", flush=True)
    return {"patterns_per_second": pps, "threads": threads, "device": device, "name": name,
            "n": int(block.shape[0] * block.shape[1])}


def _child_map(scan: int) -> None:
    """Map a ``scan x scan`` view (tiled lazily from the 64 x 64 w=0.25 file) and print the
    peak RSS (MiB)."""
    import dask.array as da
    import h5py

    from napari_stem_strain.io.dataset import Dataset
    from napari_stem_strain.methods.ccstae import CCSTAEMethod
    from napari_stem_strain.methods.runner import run_method

    path = get_benchmark_file(0.25)
    with h5py.File(path, "r") as f:
        key = next(k for k in f if isinstance(f[k], h5py.Dataset) and f[k].ndim == 4)
        arr = da.from_array(f[key], chunks=(1, -1, -1, -1))
        reps = scan // arr.shape[0]
        big = da.tile(arr, (reps, reps, 1, 1)) if reps > 1 else arr
        t0 = time.perf_counter()
        res = run_method(CCSTAEMethod("default", device="cpu"), Dataset(data=big))
        dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"scan": scan, "peak_mib": peak, "seconds": dt,
                      "finite": int(np.isfinite(res.A[..., 0, 0]).sum())}))


def memory() -> dict:
    out = {}
    for scan in (64, 256):
        p = subprocess.run([sys.executable, __file__, "child", str(scan)], capture_output=True,
                           text=True, check=True)
        out[scan] = json.loads(p.stdout.strip().splitlines()[-1])
        print(out[scan], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("accuracy", "unseen", "speed", "memory", "all", "child"))
    ap.add_argument("scan_arg", nargs="?", type=int, default=64)
    ap.add_argument("--noise", type=float, nargs="*", default=list(NOISE_LEVELS))
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--write", action="store_true", help="write docs/benchmarks.md section")
    ap.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                    help="where `speed` runs CC-ST-AE (default: cpu)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    args = ap.parse_args(argv)
    if args.part == "child":
        _child_map(args.scan_arg)
        return 0
    base = not args.no_baseline
    md = [f"Machine: {machine_info()}. Command: `{command_line()}`. The machine was shared "
          "with other jobs while this ran: timings are noisy (likely pessimistic)."]
    if args.part in ("accuracy", "all"):
        table, _ = accuracy(args.noise, base)
        md += ["### Accuracy on the published noise levels (shipped weights, no fitting)",
               "Strain MAE in 1e-3, rotation MAE in degrees; patterns/s include `prepare`.",
               table]
    if args.part in ("unseen", "all"):
        text, _ = unseen(base)
        md += ["### Data the shipped weights never saw (after `stem-strain fit`)", text]
    if args.part in ("speed", "all"):
        sp = speed(threads=args.threads, device=args.device)
        md += ["### Speed", f"Steady-state map throughput, {sp['n']} patterns of 128 x 128 "
               f"px, `torch.set_num_threads({sp['threads']})`, {sp['device']} "
               f"({sp['name']}): **{sp['patterns_per_second']:.0f} patterns/s**."]
    if args.part in ("memory", "all"):
        mem = memory()
        a, b = mem[64], mem[256]
        md += ["### Memory (streaming)", markdown_table(
            ["scan", "peak RSS (MiB)", "seconds"],
            [[f"{s} x {s}", f"{m['peak_mib']:.0f}", f"{m['seconds']:.1f}"]
             for s, m in ((64, a), (256, b))]),
            f"Ratio 256x256 / 64x64 peak RSS: **{b['peak_mib'] / a['peak_mib']:.2f}**."]
    text = "\n\n".join(md)
    print(text)
    if args.write:
        write_section("ccstae", "## CC-ST-AE\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
