"""Write a large simulated 4D-STEM file quickly, for the larger-than-memory benchmarks.

Rendering every pattern of a multi-gigabyte scan with :mod:`napari_stem_strain.simulate` takes
minutes (about 700 patterns/s per core at 128x128), so this script renders a *tile* of scan
rows once (``simulate_array``, real simulator, real noise) and writes it again and again down
the scan until the requested number of rows is reached; the ground truth is tiled the same
way. The file has the simulator's layout (``/data`` in chunks of one scan row, uint16 counts,
``/ground_truth``), so every reader and method treats it like any simulated file, and it is
written under a temporary name and renamed, like everything else the project writes.

Usage::

    python benchmarks/make_large.py OUT.h5 --scan 256 512 --pattern 128 [--tile 16]

prints the size and the seconds taken. ``--gb`` picks the number of rows for a target size.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from napari_stem_strain.io.ground_truth import GroundTruth, write_ground_truth
from napari_stem_strain.io.results import check_writable
from napari_stem_strain.simulate import SimulationSettings, simulate_array

__all__ = ["make_large", "main"]


def _tile_truth(gt: GroundTruth, reps: int, rows: int) -> GroundTruth:
    def tile(a: np.ndarray | None) -> np.ndarray | None:
        if a is None:
            return None
        return np.concatenate([a] * reps, axis=0)[:rows]

    return GroundTruth(tile(gt.exx), tile(gt.eyy), tile(gt.exy), tile(gt.theta),
                       tile(gt.sample), gt.symmetry_deg, gt.reference, tile(gt.grains),
                       tile(gt.A), tile(gt.center), gt.lattice)


def make_large(path: str | os.PathLike, rows: int, cols: int, pattern: int = 128,
               tile: int = 16, seed: int = 0, dose: float = 1e5) -> Path:
    """Write a ``(rows, cols, pattern, pattern)`` uint16 file by repeating a simulated tile of
    ``tile`` scan rows; returns the path."""
    path = Path(path)
    tile = max(1, min(tile, rows))
    nbytes = rows * cols * pattern * pattern * 2
    check_writable(path, needed_bytes=nbytes + 2**28)
    settings = SimulationSettings(scan=(tile, cols), pattern=pattern, seed=seed, dose=dose,
                                  noise=0.1)
    block, gt = simulate_array(settings)
    block = np.minimum(block, np.iinfo(np.uint16).max).astype(np.uint16)
    reps = -(-rows // tile)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as h5:
            dset = h5.create_dataset("data", shape=(rows, cols, pattern, pattern),
                                     dtype=np.uint16, chunks=(1, cols, pattern, pattern))
            dset.attrs["dims"] = "Rx,Ry,Qx,Qy"
            dset.attrs["simulation_settings"] = settings.to_json()
            dset.attrs["tiled_rows"] = tile
            for r0 in range(0, rows, tile):
                r1 = min(rows, r0 + tile)
                dset[r0:r1] = block[: r1 - r0]
            write_ground_truth(h5, _tile_truth(gt, reps, rows))
            h5.attrs["title"] = (f"large benchmark file: a {tile}-row simulated tile repeated "
                                 f"to {rows}x{cols}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--scan", nargs=2, type=int, default=(256, 512), metavar=("RX", "RY"))
    p.add_argument("--gb", type=float, default=None,
                   help="target size in GB (sets RX for the given RY and pattern)")
    p.add_argument("--pattern", type=int, default=128)
    p.add_argument("--tile", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rows, cols = a.scan
    if a.gb:
        rows = max(1, int(a.gb * 1e9 // (cols * a.pattern**2 * 2)))
    t0 = time.perf_counter()
    out = make_large(a.out, rows, cols, a.pattern, a.tile, a.seed)
    dt = time.perf_counter() - t0
    size = out.stat().st_size
    print(f"wrote {out}: {rows}x{cols} scan of {a.pattern}x{a.pattern} uint16, "
          f"{size / 1e9:.2f} GB in {dt:.1f} s ({size / 1e6 / dt:.0f} MB/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
