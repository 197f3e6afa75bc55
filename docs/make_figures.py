"""Make the simulator figures of ``docs/conventions.md``.

    python docs/make_figures.py [--out docs/images]

writes ``simulated_dataset.png`` (virtual images, patterns and the ground-truth maps of one
simulated scan) and ``simulated_noise.png`` (one pattern at increasing background weight and
decreasing dose). Matplotlib's Agg backend: no display needed. Takes about half a minute.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Circle, Rectangle  # noqa: E402

from napari_stem_strain.simulate import SimulationSettings, Simulator, simulate_array  # noqa: E402
from napari_stem_strain.strain import parse_region  # noqa: E402

HERE = Path(__file__).resolve().parent


def _virtual(data: np.ndarray, centre: np.ndarray, r_in: float, r_out: float) -> np.ndarray:
    """Sum of each pattern over an annulus ``r_in <= r < r_out`` around its own beam centre."""
    Q = data.shape[-1]
    q = np.arange(Q)
    out = np.empty(data.shape[:2])
    for i in range(data.shape[0]):  # row by row: bounded memory
        r = np.hypot(q[None, :, None] - centre[i, :, 0, None, None],
                     q[None, None, :] - centre[i, :, 1, None, None])
        out[i] = (data[i] * ((r >= r_in) & (r < r_out))).sum(axis=(1, 2))
    return out


def _interior(mask: np.ndarray) -> tuple[int, int]:
    """The point of ``mask`` farthest from its edge."""
    from scipy import ndimage

    d = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return tuple(int(v) for v in np.unravel_index(np.argmax(d), d.shape))


def _show_pattern(ax, pat, title, centre=None, spots=None, radius=4.0):
    scale = 1.0 if pat.max() > 100 else 1000.0 / max(pat.max(), 1e-12)  # floats: as counts
    ax.imshow(np.log1p(pat * scale), cmap="inferno", interpolation="nearest")
    ax.set_xlim(-0.5, pat.shape[1] - 0.5)
    ax.set_ylim(pat.shape[0] - 0.5, -0.5)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if spots is not None:
        for s in spots:
            ax.add_patch(Circle((s[1], s[0]), radius + 2.5, fill=False, lw=0.6, color="cyan"))
    if centre is not None:
        ax.plot(centre[1], centre[0], "+", color="lime", ms=6, mew=0.8)


def dataset_figure(out: Path) -> Path:
    s = SimulationSettings(scan=(64, 64), pattern=128, noise=0.3, dose=1e5, seed=0)
    sim = Simulator(s)
    data, gt = simulate_array(s)
    R = s.disk_radius
    bf = _virtual(data, sim.center, 0, R + 1)
    adf = _virtual(data, sim.center, 2 * R, s.pattern / 2)
    rs, cs = parse_region(gt.reference)

    # three positions to show: reference grain, the most rotated grain, vacuum
    ref_pos = ((rs.start + rs.stop) // 2, (cs.start + cs.stop) // 2)
    crystal = gt.sample & (gt.grains > 0)
    g_rot = np.unique(gt.grains[crystal])[np.argmax(
        [np.nanmedian(np.abs(gt.theta[gt.grains == g])) for g in np.unique(gt.grains[crystal])])]
    rot_pos = _interior(gt.grains == g_rot)
    vac_pos = _interior(~gt.sample) if (~gt.sample).any() else ref_pos
    positions = {"A": ref_pos, "B": rot_pos, "C": vac_pos}

    fig, axes = plt.subplots(3, 4, figsize=(14, 10.2), layout="constrained")
    ax = axes[0, 0]
    ax.imshow(bf, cmap="gray")
    ax.set_title("virtual bright field", fontsize=10)
    ax = axes[0, 1]
    ax.imshow(adf, cmap="gray")
    ax.set_title(f"virtual annular dark field ({2 * R:.0f}-{s.pattern // 2} px)", fontsize=10)
    ax = axes[0, 2]
    g = np.where(gt.sample, gt.grains, np.nan)
    ax.imshow(g, cmap="tab10", interpolation="nearest", vmin=0, vmax=10)
    ax.add_patch(Rectangle((cs.start - 0.5, rs.start - 0.5), cs.stop - cs.start,
                           rs.stop - rs.start, fill=False, ec="k", lw=1.5))
    ax.set_title(f"grains (white: vacuum), reference {gt.reference}", fontsize=10)
    for a in axes[0, :3]:
        for name, (i, j) in positions.items():
            a.plot(j, i, "o", mfc="none", mec="red", ms=7)
            a.annotate(name, (j, i), xytext=(4, -4), textcoords="offset points", color="red",
                       fontsize=10, weight="bold")
        a.set_xlabel("y (scan column)", fontsize=8)
        a.set_ylabel("x (scan row)", fontsize=8)
        a.tick_params(labelsize=7)

    clean = sim.clean_rows(rot_pos[0], rot_pos[0] + 1)[0, rot_pos[1]]
    c = sim.center[rot_pos]
    spots = c + (sim.A[rot_pos] @ sim.g0.T).T
    spots = spots[(spots.min(1) > 0) & (spots.max(1) < s.pattern)]
    _show_pattern(axes[0, 3], clean, f"B noise-free, circles: centre + A g0\n"
                  f"theta = {gt.theta[rot_pos]:.1f} deg", c, spots, R)
    for k, (name, pos) in enumerate(positions.items()):
        label = {"A": "reference grain", "B": "rotated grain", "C": "vacuum"}[name]
        _show_pattern(axes[1, k], data[pos], f"{name}: {label} at {pos}\n"
                      f"w = {s.noise}, {s.dose:.0e} e- (log scale)", sim.center[pos])
    mean = data[gt.sample].mean(axis=0)
    _show_pattern(axes[1, 3], mean, "mean crystal pattern (log)")

    lim = np.nanmax(np.abs(np.stack([gt.exx, gt.eyy, gt.exy]))) * 100
    div = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.75")
    for k, name in enumerate(("exx", "eyy", "exy")):
        ax = axes[2, k]
        im = ax.imshow(getattr(gt, name) * 100, cmap=div, vmin=-lim, vmax=lim,
                       interpolation="nearest")
        ax.set_title(f"true {name} (%), grey: vacuum", fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8)
    ax = axes[2, 3]
    tl = gt.symmetry_deg / 2
    cyc = matplotlib.colormaps["twilight_shifted"].with_extremes(bad="0.75")
    im = ax.imshow(gt.theta, cmap=cyc, vmin=-tl, vmax=tl, interpolation="nearest")
    ax.set_title(f"true theta (deg, wrapped to +-{tl:.0f})", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    for a in axes[2]:
        a.add_patch(Rectangle((cs.start - 0.5, rs.start - 0.5), cs.stop - cs.start,
                              rs.stop - rs.start, fill=False, ec="k", lw=1))
        a.tick_params(labelsize=7)
    fig.suptitle(
        f"Simulated {s.lattice} polycrystal: {s.scan[0]}x{s.scan[1]} scan, "
        f"{s.pattern}x{s.pattern} patterns, disk radius {R:g} px, "
        f"first-order intensity {s.bragg_intensity:g} of the direct beam, "
        f"descan {s.descan:g} px (seed {s.seed})", fontsize=11)
    path = out / "simulated_dataset.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def noise_figure(out: Path) -> Path:
    levels = [(0.0, None), (0.0, 1e5), (0.3, 1e5), (0.5, 2e4), (0.7, 5e3)]
    fig, axes = plt.subplots(2, len(levels), figsize=(3 * len(levels), 6.4), layout="constrained")
    for row, bragg in enumerate((0.05, 0.005)):
        for k, (w, dose) in enumerate(levels):
            s = SimulationSettings(scan=(1, 1), pattern=128, noise=w, dose=dose, vacuum=False,
                                   n_grains=1, bragg_intensity=bragg, seed=0)
            sim = Simulator(s)
            pat = sim.render_rows(0, 1)[0, 0]
            d = "no Poisson" if dose is None else f"{dose:.0e} e-"
            _show_pattern(axes[row, k], pat, f"bragg {bragg:g}, w = {w}, {d}")
    fig.suptitle("One pattern (log scale) under the published noise model "
                 "(1 - w) P + w B, then Poisson counts", fontsize=11)
    path = out / "simulated_noise.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE / "images")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for f in (dataset_figure(args.out), noise_figure(args.out)):
        print(f)


if __name__ == "__main__":
    main()
