"""PNG figures draw blank (NaN) positions in a neutral grey, never in zero's colour."""

from __future__ import annotations

import numpy as np

from napari_stem_strain.figures import plot_maps
from napari_stem_strain.io.results import MethodMaps
from napari_stem_strain.strain import StrainMaps


def test_png_draws_nan_grey_and_zero_in_its_own_colour(tmp_path):
    from matplotlib import colormaps
    from matplotlib.image import imread

    z = np.zeros((20, 20), np.float32)
    z[:10] = np.nan  # top half blank (vacuum), bottom half exactly zero strain
    A = np.where(np.isnan(z)[..., None, None], np.nan, np.eye(2, dtype=np.float32))
    maps = StrainMaps(z, z.copy(), z.copy(), z.copy(), A)
    m = MethodMaps("ae", maps, A, ~np.isnan(z), "10:20,0:20")
    png = plot_maps({"ae": m}, tmp_path / "maps.png")
    rgb = imread(png)[..., :3]
    flat = rgb.reshape(-1, 3)
    zero = np.asarray(colormaps["RdBu_r"](0.5)[:3])
    n_zero = np.sum(np.all(np.abs(flat - zero) < 0.01, axis=1))
    spread = flat.max(1) - flat.min(1)
    grey = (spread < 0.02) & (flat.mean(1) > 0.2) & (flat.mean(1) < 0.8)
    # 4 panels of half zero, half NaN: both fill a good share of the figure
    assert n_zero > 0.03 * len(flat)
    assert grey.sum() > 0.03 * len(flat), "NaN is not drawn as a neutral grey"
    assert np.all(np.abs(flat[grey].mean(0) - zero) > 0.2)


def test_png_rows_name_the_methods(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig",
                        lambda self, *a, **k: figures.append(self) or save(self, *a, **k))
    z = np.zeros((6, 6), np.float32)
    A = np.broadcast_to(np.eye(2, dtype=np.float32), (6, 6, 2, 2)).copy()
    m = MethodMaps("ae", StrainMaps(z, z, z, z, A), A, np.ones((6, 6), bool), "0:3,0:3")
    plot_maps({"ae": m, "py4dstem": m}, tmp_path / "maps.png")
    labels = [ax.get_ylabel() for ax in figures[0].axes if ax.get_ylabel()]
    assert labels == ["CC-ST-AE", "py4DSTEM"]
