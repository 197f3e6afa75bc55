"""Scale benchmarks: a map of a file several times larger than the memory the run uses, and
patterns/s with 1 and 2 dask workers.

Every measured map runs in a child process (``child`` sub-command) so that its memory is its
own: the parent polls the resident set size (RSS) of the child *and all its descendants*
(dask worker processes included) every 50 ms with psutil and reports the peak of their sum.
The child times only the map itself (open, stream every block through the method, strain
maps, write the result file), not Python start-up or the dask cluster start.

Before a "cold" run the file's pages are dropped from the OS page cache
(``posix_fadvise(DONTNEED)``), so the map really reads the file from disk.

Methods: ``com`` is a simple BlockMethod defined here (per-pattern centre of mass and total
counts: one pass over every pixel, the I/O-bound floor of any method); ``ae`` and
``py4dstem`` are the project's methods where they are installed and fit the data.

    python benchmarks/bench_scale.py large --gb 4.3 --method com   # > 4x memory, then deletes
    python benchmarks/bench_scale.py dask --gb 0.5 --method com    # 1 vs 2 workers
    python benchmarks/bench_scale.py all --write-docs              # both, into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from napari_stem_strain.methods.base import BlockMethod  # noqa: E402


class ComMethod(BlockMethod):
    """Centre of mass and total counts per pattern as a (made-up) ``A``: touches every pixel
    once, so its speed is the streaming floor (read, convert, reduce) of any real method."""

    name = "com"
    symmetry_deg = 360.0

    def process_block(self, block: np.ndarray, r0: int) -> tuple[np.ndarray, np.ndarray]:
        n, Ry, Qx, Qy = block.shape
        flat = block.reshape(n * Ry, Qx, Qy)
        tot = flat.sum(axis=(1, 2), dtype=np.float64)
        cx = flat.sum(axis=2, dtype=np.float64) @ np.arange(Qx)
        cy = flat.sum(axis=1, dtype=np.float64) @ np.arange(Qy)
        with np.errstate(invalid="ignore", divide="ignore"):
            cx, cy = cx / tot, cy / tot
        A = np.zeros((n * Ry, 2, 2), np.float32)
        A[:, 0, 0] = 1 + 1e-3 * (cx - Qx / 2)
        A[:, 1, 1] = 1 + 1e-3 * (cy - Qy / 2)
        return A.reshape(n, Ry, 2, 2), (tot > 0).reshape(n, Ry)


def make_method(name: str) -> BlockMethod:
    if name == "com":
        return ComMethod()
    from napari_stem_strain.pipeline import make_method as project_method

    return project_method(name, device="cpu")


# ------------------------------------------------------------------------------ child


def _warm_worker(method: str) -> None:
    """Import what the method needs on a worker before the timed run."""
    if method != "com":
        make_method(method)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One timed map; prints a JSON line."""
    from napari_stem_strain.io.readers import open_dataset
    from napari_stem_strain.io.results import MethodMaps, check_writable, write_results
    from napari_stem_strain.methods.runner import run_method

    out = Path(args.out)
    check_writable(out)
    method = make_method(args.method)
    cluster = client = None
    t_cluster = 0.0
    if args.engine != "single":
        import logging

        from distributed import Client, LocalCluster

        t = time.perf_counter()
        n = int(args.engine.split(":")[1])
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               host="127.0.0.1", protocol="tcp://",
                               dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR)
        client = Client(cluster)
        client.wait_for_workers(n)
        client.run(_warm_worker, args.method)  # imports (torch...) are start-up, not mapping
        t_cluster = time.perf_counter() - t
    t0 = time.perf_counter()
    with open_dataset(args.file) as ds:
        t_prep = time.perf_counter()
        method.prepare(ds)
        t_prep = time.perf_counter() - t_prep
        if cluster is not None:
            from napari_stem_strain.distributed import run_method_dask

            res = run_method_dask(method, ds, cluster.scheduler_address, prepared=True,
                                  block_bytes=args.block_mb * 2**20)
        else:
            res = run_method(method, ds, prepared=True, block_bytes=args.block_mb * 2**20)
        shape, nbytes = ds.shape, ds.nbytes
    reference = "0:4,0:4"
    try:
        from napari_stem_strain.io.ground_truth import read_ground_truth

        reference = read_ground_truth(args.file).reference
    except Exception:  # noqa: BLE001 - a file without ground truth: corner reference
        pass
    write_results(out, [MethodMaps.from_result(res, reference, input_file=args.file)],
                  replace=True)
    dt = time.perf_counter() - t0
    if client is not None:
        client.close()
        cluster.close()
    n_pat = shape[0] * shape[1]
    return {
        "method": args.method, "engine": args.engine, "shape": list(shape),
        "file_bytes": nbytes, "seconds": dt, "prepare_seconds": t_prep,
        "cluster_start_seconds": t_cluster, "patterns": n_pat, "patterns_per_s": n_pat / dt,
        "finite_A": int(np.isfinite(res.A).all(axis=(2, 3)).sum()),
    }


# ------------------------------------------------------------------------------ parent


def drop_page_cache(path: Path) -> None:
    """Evict ``path`` from the OS page cache so the next read comes from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure(file: Path, method: str, engine: str, block_mb: int = 64,
            cold: bool = True, limit_mb: int = 0) -> dict[str, Any]:
    """Run one map in a child process, polling the RSS of its whole process tree.

    ``limit_mb`` > 0 also caps the child's virtual address space (``RLIMIT_AS``): a hard
    proof that the map fits, usable for methods that do not import torch (torch reserves
    gigabytes of address space it never touches)."""
    import psutil

    if cold:
        drop_page_cache(file)
    with tempfile.TemporaryDirectory(dir=file.parent) as d:
        out = Path(d) / "result.h5"
        # /usr/bin/time reports the kernel's peak RSS of the map process itself (%M, KiB);
        # the child's own getrusage would inherit the parent's high-water mark across fork.
        timer = ["/usr/bin/time", "-f", "MAXRSS_KB %M"] if Path("/usr/bin/time").exists() \
            else []
        cmd = [*timer, sys.executable, str(Path(__file__).resolve()), "child", "--file", str(file),
               "--method", method, "--engine", engine, "--out", str(out),
               "--block-mb", str(block_mb)]
        def cap() -> None:
            if limit_mb:
                import resource

                resource.setrlimit(resource.RLIMIT_AS, (limit_mb * 2**20, limit_mb * 2**20))

        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=ROOT, preexec_fn=cap)
        ps = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            total = 0
            try:
                for p in [ps, *ps.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            peak = max(peak, total)
            time.sleep(0.05)
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"child failed ({proc.returncode}): {stderr[-2000:]}")
        result = json.loads(stdout.strip().splitlines()[-1])
        kernel = [ln for ln in stderr.splitlines() if ln.startswith("MAXRSS_KB ")]
    result["peak_rss_tree_mb"] = peak / 2**20
    result["rlimit_as_mb"] = limit_mb
    if kernel:
        result["kernel_peak_rss_main_mb"] = int(kernel[-1].split()[1]) / 1024
    result["cold_cache"] = cold
    return result


def machine() -> str:
    import psutil

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
            f"(shared with other jobs), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"Python {platform.python_version()}, load average "
            f"{os.getloadavg()[0]:.1f} when the report was written")


def ensure_file(path: Path, gb: float, cols: int, pattern: int) -> tuple[Path, bool]:
    """Make the benchmark file in a separate process (this one stays small)."""
    if path.exists():
        return path, False
    rows = max(1, int(gb * 1e9 // (cols * pattern**2 * 2)))
    t = time.perf_counter()
    subprocess.run([sys.executable, str(HERE / "make_large.py"), str(path), "--scan", str(rows),
                    str(cols), "--pattern", str(pattern)], check=True, cwd=ROOT)
    print(f"made {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s",
          file=sys.stderr)
    return path, True


def bench_large(a: argparse.Namespace) -> dict[str, Any]:
    path, made = ensure_file(Path(a.dir) / "large.h5", a.gb, a.cols, a.pattern)
    try:
        r = measure(path, a.method, "single", a.block_mb, cold=True, limit_mb=a.limit_mb)
    finally:
        if made and not a.keep:
            path.unlink()
    peak = max(r["peak_rss_tree_mb"], r.get("kernel_peak_rss_main_mb", 0.0))
    r["ratio_file_to_peak_rss"] = r["file_bytes"] / (peak * 2**20)
    return r


def bench_dask(a: argparse.Namespace) -> list[dict[str, Any]]:
    path, made = ensure_file(Path(a.dir) / "dask.h5", a.gb, a.cols, a.pattern)
    rows = []
    try:
        with open(path, "rb") as fh:  # warm the page cache: every engine reads from memory
            while fh.read(64 * 2**20):
                pass
        # engines interleaved, each run `repeat` times; the fastest run of each is reported
        # (on a shared machine the slow runs measure the other jobs, not the engine)
        runs: dict[str, list[dict[str, Any]]] = {"single": [], "local:1": [], "local:2": []}
        for _ in range(max(1, a.repeat)):
            for engine, done in runs.items():
                done.append(measure(path, a.method, engine, a.block_mb, cold=False))
        for done in runs.values():
            best = max(done, key=lambda r: r["patterns_per_s"])
            best["all_patterns_per_s"] = [round(r["patterns_per_s"]) for r in done]
            rows.append(best)
    finally:
        if made and not a.keep:
            path.unlink()
    return rows


def markdown(large: dict[str, Any] | None, dask_rows: list[dict[str, Any]] | None,
             cmdline: str, where: str | None = None, when: str | None = None) -> str:
    """The docs section for one benchmark run (``where``/``when`` default to now, here)."""
    when = when or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"Machine: {where or machine()}. Command: `{cmdline}` ({when}).", ""]
    method = (large or (dask_rows or [{}])[0]).get("method")
    if method == "com":
        lines += ["Method `com`: the simple centre-of-mass BlockMethod of `bench_scale.py` (one "
                  "pass over every pixel: the streaming floor of any method).", ""]
    elif method == "ae":
        lines += ["Method `ae`: CC-ST-AE with the shipped default model on the CPU (torch "
                  f"{_torch_version()}); `prepare` (geometry, template) is inside the timing.",
                  ""]
    if large:
        lines += [
            "**Larger than memory.** "
            f"A {large['file_bytes'] / 1e9:.2f} GB uint16 file ({large['shape']}) mapped "
            f"with `{large['method']}` in one process, page cache dropped first: peak RSS of "
            f"the process {large.get('kernel_peak_rss_main_mb', large['peak_rss_tree_mb']):.0f}"
            f" MiB (kernel high-water mark; 50 ms polling saw {large['peak_rss_tree_mb']:.0f} "
            f"MiB) while the file is "
            f"{large['file_bytes'] / 2**20:.0f} MiB (file / peak RSS = "
            f"{large['ratio_file_to_peak_rss']:.1f}x); {large['patterns_per_s']:.0f} patterns/s "
            f"({large['seconds']:.0f} s for {large['patterns']} patterns, result file "
            "written). " + (
                f"The process ran under a hard address-space limit (RLIMIT_AS) of "
                f"{large['rlimit_as_mb']} MiB, "
                f"{large['file_bytes'] / 2**20 / max(large['rlimit_as_mb'], 1):.1f}x smaller "
                "than the file." if large.get("rlimit_as_mb") else
                "No hard limit was set (torch reserves large virtual address space, so "
                "RLIMIT_AS is unusable): the figure is the measured peak RSS."), ""]
    if dask_rows:
        lines += ["**Dask workers** (file in page cache; one-thread worker processes on "
                  "127.0.0.1; cluster start not timed):", "",
                  "| engine | patterns/s (best) | seconds | peak RSS, all processes (MiB) |",
                  "|---|---:|---:|---:|"]
        for r in dask_rows:
            label = "one process, no dask" if r["engine"] == "single" else r["engine"]
            every = r.get("all_patterns_per_s", [])
            runs = f" (runs: {', '.join(map(str, every))})" if len(every) > 1 else ""
            lines.append(f"| {label} | {r['patterns_per_s']:.0f}{runs} | {r['seconds']:.1f} | "
                         f"{r['peak_rss_tree_mb']:.0f} |")
        by = {r["engine"]: r["patterns_per_s"] for r in dask_rows}
        if "local:1" in by and "local:2" in by:
            lines += ["", f"2 workers / 1 worker = {by['local:2'] / by['local:1']:.2f}x "
                      f"(method `{dask_rows[0]['method']}`, "
                      f"{dask_rows[0]['shape']} scan). On two cores shared with other jobs "
                      "(see the load average) this ratio measures the contention as much as "
                      "the engine. Workers run one thread each (dask sets OMP_NUM_THREADS=1); "
                      "the one-process run uses torch's default threads."]
    return "\n".join(lines) + "\n"


def _torch_version() -> str:
    try:
        import torch

        return f"{torch.__version__}, {torch.get_num_threads()} threads"
    except ImportError:  # pragma: no cover
        return "not installed"


def write_docs(md: str) -> None:
    """Replace this benchmark's section of ``docs/benchmarks.md`` (benchmarks/common.py)."""
    from common import write_section

    write_section("scale", "## Scale: larger than memory, dask workers\n\n" + md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="napari-stem-strain scale benchmarks")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("child")
    c.add_argument("--file", required=True)
    c.add_argument("--method", default="com")
    c.add_argument("--engine", default="single")
    c.add_argument("--out", required=True)
    c.add_argument("--block-mb", type=int, default=64)
    r = sub.add_parser("report", help="render saved --json results into docs/benchmarks.md")
    r.add_argument("json", nargs="+")
    r.add_argument("--write-docs", action="store_true")
    for name in ("large", "dask", "all"):
        s = sub.add_parser(name)
        s.add_argument("--method", default="com")
        s.add_argument("--gb", type=float, default=4.3 if name == "large" else 0.5)
        s.add_argument("--dask-gb", type=float, default=0.5)
        s.add_argument("--cols", type=int, default=512)
        s.add_argument("--pattern", type=int, default=128)
        s.add_argument("--block-mb", type=int, default=64)
        s.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "nss-bench-scale"))
        s.add_argument("--keep", action="store_true")
        s.add_argument("--write-docs", action="store_true")
        s.add_argument("--json", default=None, help="also save the results here")
        s.add_argument("--repeat", type=int, default=1,
                       help="dask: runs per engine, the fastest reported")
        s.add_argument("--limit-mb", type=int, default=512,
                       help="RLIMIT_AS of the large map's process, MiB (0: none; use 0 for "
                            "torch methods)")
    a = p.parse_args(argv)
    if a.cmd == "child":
        print(json.dumps(child(a)))
        return 0
    if a.cmd == "report":
        runs = [json.loads(Path(f).read_text()) for f in a.json]
        md = "\n".join(markdown(r["large"], r["dask"], r["command"], r["machine"], r["when"])
                       for r in runs)
        print(md)
        if a.write_docs:
            write_docs(md)
        return 0
    Path(a.dir).mkdir(parents=True, exist_ok=True)
    large = bench_large(a) if a.cmd in ("large", "all") else None
    if a.cmd == "all":
        a.gb = a.dask_gb
    dask_rows = bench_dask(a) if a.cmd in ("dask", "all") else None
    cmdline = "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:] if argv is None
                                                            else argv)
    record = {"large": large, "dask": dask_rows, "command": cmdline, "machine": machine(),
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    md = markdown(large, dask_rows, cmdline, record["machine"], record["when"])
    print(json.dumps(record, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(record, indent=1))
    print(md)
    if a.write_docs:
        write_docs(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
