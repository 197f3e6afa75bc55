"""Peak memory of ``stem-strain map --method ae --dask local:2`` at 64 x 64 and 512 x 512.

Issue 14's criterion: at 512 x 512 the peak resident set size (RSS) summed over every process
of the run (the CLI's client, the dask scheduler thread, both worker processes) is at most
1.5 x that of a 64 x 64 scan, and the result is bit-identical to one process.

Inputs are cheap: one 64 x 64 scan of 48 px patterns is simulated (the shipped model maps
48 px patterns of the default hexagonal lattice), and the 512 x 512 file tiles it 8 x 8 with
h5py row-by-row writes (uint16, chunks of one scan row), so it is a valid 4D-STEM file of
~1.2 GB without simulating 262 144 patterns. Each map runs as a child process; a sampler
polls, every 50 ms, the RSS of the child and all its descendants with psutil and keeps the
peak of their sum (pages shared between processes are counted once per process, so the sum
is an upper bound of the memory used). The 64 x 64 file is also mapped in one process and
the two result files are compared dataset by dataset, bit for bit.

    python benchmarks/bench_rss.py --workdir /tmp/rss          # both sizes, prints a table
    python benchmarks/bench_rss.py --sizes 64 --workdir /tmp/rss
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import psutil

TILE = 64
PATTERN = 48


def make_tile(workdir: Path) -> Path:
    from napari_stem_strain.simulate import SimulationSettings, simulate_to_file

    path = workdir / f"tile{TILE}_q{PATTERN}.h5"
    if not path.exists():
        simulate_to_file(path, SimulationSettings(scan=(TILE, TILE), pattern=PATTERN, seed=7),
                         workers=1)
    return path


def make_scan(workdir: Path, R: int) -> Path:
    """The tile itself (R = 64) or the tile repeated to R x R, written one scan row at a time."""
    tile = make_tile(workdir)
    if R == TILE:
        return tile
    path = workdir / f"scan{R}_q{PATTERN}.h5"
    if path.exists():
        return path
    with h5py.File(tile, "r") as f:
        data = f["data"][()]
    tmp = path.with_suffix(".part")
    with h5py.File(tmp, "w") as f:
        d = f.create_dataset("data", (R, R, PATTERN, PATTERN), data.dtype,
                             chunks=(1, R, PATTERN, PATTERN))
        cols = np.arange(R) % TILE
        for r in range(R):
            d[r] = data[r % TILE][cols]
    tmp.rename(path)
    return path


def peak_rss(cmd: list[str], env: dict) -> tuple[float, float, int]:
    """Run ``cmd``; (peak summed RSS of it and all descendants in bytes, seconds, rc)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total)
            stop.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode:
        sys.stderr.write(err.decode(errors="replace")[-3000:])
    return peak, time.perf_counter() - t0, proc.returncode


def same_results(a: Path, b: Path) -> tuple[bool, list[str]]:
    """Every numeric dataset of two result files equal, bit for bit (NaN where NaN)."""
    diffs: list[str] = []
    n = 0
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names: list[str] = []
        fa.visititems(lambda k, o: names.append(k) if isinstance(o, h5py.Dataset) else None)
        for k in names:
            if k not in fb:
                diffs.append(f"{k} missing")
                continue
            x, y = fa[k][()], fb[k][()]
            if not (isinstance(x, np.ndarray) and x.dtype.kind in "fiub"):
                continue
            n += 1
            if x.shape != y.shape or not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
                diffs.append(k)
    return not diffs and n > 0, diffs + [f"({n} numeric datasets compared)"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_rss"))
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).with_name("stem-strain"))
    env = dict(os.environ)
    rows = {}
    for R in args.sizes:
        path = make_scan(args.workdir, R)
        out = args.workdir / f"map{R}_dask.h5"
        cmd = [exe, "map", str(path), "--method", "ae", "--device", "cpu", "--dask",
               f"local:{args.workers}", "--out", str(out), "--overwrite", "--quiet"]
        peak, secs, rc = peak_rss(cmd, env)
        rows[R] = {"peak_rss_mib": peak / 2**20, "seconds": secs, "rc": rc,
                   "command": " ".join(cmd)}
        print(f"{R} x {R}: peak summed RSS {peak / 2**20:.0f} MiB, {secs:.0f} s (rc {rc})",
              flush=True)
        if R == min(args.sizes):
            one = args.workdir / f"map{R}_one.h5"
            cmd1 = [exe, "map", str(path), "--method", "ae", "--device", "cpu", "--out",
                    str(one), "--overwrite", "--quiet"]
            peak1, secs1, _ = peak_rss(cmd1, env)
            ok, diffs = same_results(out, one)
            rows[R].update(one_process_peak_rss_mib=peak1 / 2**20, one_process_seconds=secs1,
                           identical_to_one_process=ok, diffs=diffs)
            print(f"{R} x {R} in one process: {peak1 / 2**20:.0f} MiB, {secs1:.0f} s; dask "
                  f"result identical: {ok} {diffs}", flush=True)
    if len(rows) > 1:
        lo, hi = rows[min(rows)], rows[max(rows)]
        print(f"ratio {max(rows)}/{min(rows)}: "
              f"{hi['peak_rss_mib'] / lo['peak_rss_mib']:.3f}")
    rows["machine"] = {"cpus": os.cpu_count(), "ram_gib": psutil.virtual_memory().total / 2**30,
                       "python": platform.python_version(), "platform": platform.platform()}
    (args.workdir / "bench_rss.json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
