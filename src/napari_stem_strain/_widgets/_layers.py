"""How results look as napari layers: names, units, diverging colormap, symmetric limits.

Maps are shown in percent (strain) and degrees (rotation) so the status bar reads in the
units people quote; the files keep the dimensionless fractions of ``CONVENTIONS.md``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..figures import symmetric_limit
from ..io.results import MAP_NAMES, MethodMaps

__all__ = [
    "META_KEY",
    "METHOD_LABELS",
    "METHOD_COLOURS",
    "MAP_UNITS",
    "map_layer_name",
    "strain_colormap",
    "show_results",
    "display_values",
]

#: Key of the plugin's entry in ``layer.metadata``.
META_KEY = "stem_strain"

METHOD_LABELS = {"ae": "CC-ST-AE", "py4dstem": "py4DSTEM"}
#: One colour per method, shared by overlay points, histograms and table.
METHOD_COLOURS = {"ae": "#ff8c1a", "py4dstem": "#20c8ff"}
#: (display unit, factor from the file's unit)
MAP_UNITS = {"exx": ("%", 100.0), "eyy": ("%", 100.0), "exy": ("%", 100.0),
             "theta": ("deg", 1.0)}


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def method_colour(method: str) -> str:
    return METHOD_COLOURS.get(method, "#ff40ff")


def map_layer_name(method: str, comp: str) -> str:
    unit, _ = MAP_UNITS[comp]
    return f"{method_label(method)} {comp} ({unit})"


_CMAP: Any = None


def strain_colormap() -> Any:
    """matplotlib's ``RdBu_r`` as a napari colormap: red = tension / counter-clockwise."""
    global _CMAP
    if _CMAP is None:
        from matplotlib import colormaps
        from napari.utils.colormaps import Colormap

        colours = colormaps["RdBu_r"](np.linspace(0, 1, 256))
        _CMAP = Colormap(colours, name="strain RdBu_r", display_name="strain (RdBu_r)")
    return _CMAP


def display_values(m: MethodMaps, comp: str) -> np.ndarray:
    """A map in display units (percent or degrees)."""
    return np.asarray(getattr(m.maps, comp), np.float32) * MAP_UNITS[comp][1]


def show_results(viewer: Any, results: dict[str, MethodMaps],
                 geometry: dict[str, Any] | None = None) -> list[Any]:
    """Add or update one image layer per method and component (``geometry``: ``scale``,
    ``translate``, ``units`` of the navigation image).

    Existing layers are updated in place (data and limits), so re-referencing keeps the
    user's layer order, visibility and zoom.
    """
    layers = []
    created = False
    for method, m in results.items():
        for comp in MAP_NAMES:
            name = map_layer_name(method, comp)
            data = display_values(m, comp)
            lim = symmetric_limit(data)
            meta = {META_KEY: {"role": "map", "method": method, "component": comp,
                               "maps": m}}
            if name in viewer.layers:
                layer = viewer.layers[name]
                layer.data = data
                layer.metadata = {**layer.metadata, **meta}
                if geometry:  # maps of another dataset (other pixel size) may be updated
                    layer.scale, layer.translate = geometry["scale"], geometry["translate"]
            else:
                layer = viewer.add_image(data, name=name, colormap=strain_colormap(),
                                         **(geometry or {}), metadata=meta,
                                         interpolation2d="nearest", visible=False)
                created = True
            layer.contrast_limits_range = (-lim, lim)
            layer.contrast_limits = (-lim, lim)
            layers.append(layer)
    if created and layers:
        # show the first method's exx on top of the navigation image
        layers[0].visible = True
    return layers
