"""Publication-style figures of strain maps (matplotlib, no GUI backend needed).

Used by ``stem-strain demo``/``map --png`` and the plugin's PNG export, so a figure looks the
same wherever it was made: one row per method (plus ground truth when known), columns exx, eyy,
exy in percent and theta in degrees, diverging colormap with limits symmetric about zero and
shared down each column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_maps", "symmetric_limit", "NAN_COLOUR", "method_label"]

#: How the methods are named for people (figures, the plugin's layers and tables).
def method_label(name: str) -> str:
    """The name people read for a method (the registry's label)."""
    from .methods.registry import label

    return label(name)

#: Blank positions (NaN: vacuum, background, not fitted) - a neutral grey, far from the white
#: of zero strain in the diverging colormap (the napari maps use it too).
NAN_COLOUR = (0.4, 0.4, 0.4)

_COMPONENTS = (("exx", "exx (%)", 100.0), ("eyy", "eyy (%)", 100.0),
               ("exy", "exy (%)", 100.0), ("theta", "theta (deg)", 1.0))


def symmetric_limit(*maps: np.ndarray, percentile: float = 99.0) -> float:
    """A colour limit symmetric about zero that ignores NaN and the worst outliers."""
    vals = np.concatenate([np.abs(np.asarray(m, float)[np.isfinite(m)]).ravel() for m in maps]
                          or [np.zeros(1)])
    if vals.size == 0:
        return 1.0
    lim = float(np.percentile(vals, percentile))
    return lim if lim > 0 else 1.0


def plot_maps(groups: dict[str, Any], path: str | Path, truth: Any = None,
              title: str | None = None) -> Path:
    """Save a grid of maps: rows = methods (``MethodMaps``) and optional ground truth."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    cmap = colormaps["RdBu_r"].with_extremes(bad=NAN_COLOUR)
    rows: list[tuple[str, dict[str, np.ndarray]]] = []
    if truth is not None:
        t = {c: np.where(truth.sample, getattr(truth, c), np.nan) for c, _, _ in _COMPONENTS}
        rows.append(("ground truth", t))
    for name, g in groups.items():
        rows.append((method_label(name),
                     {c: getattr(g.maps, c) for c, _, _ in _COMPONENTS}))
    fig, axes = plt.subplots(len(rows), 4, figsize=(13, 3.1 * len(rows)), squeeze=False,
                             constrained_layout=True)
    for j, (comp, label, scale) in enumerate(_COMPONENTS):
        lim = symmetric_limit(*(r[1][comp] * scale for r in rows))
        for i, (name, maps) in enumerate(rows):
            ax = axes[i, j]
            im = ax.imshow(maps[comp] * scale, cmap=cmap, vmin=-lim, vmax=lim,
                           interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label)
            if j == 0:
                ax.set_ylabel(name)
            if i == len(rows) - 1:
                fig.colorbar(im, ax=axes[:, j], shrink=0.8, location="bottom")
    if any(not np.all(np.isfinite(maps[c])) for _, maps in rows for c, _, _ in _COMPONENTS):
        note = "grey: no value (vacuum, background or not fitted)"
        title = f"{title}\n{note}" if title else note
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
