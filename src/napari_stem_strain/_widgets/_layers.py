"""How results look as napari layers: names, units, diverging colormap, symmetric limits.

Maps are shown in percent (strain) and degrees (rotation) so the status bar reads in the
units people quote; the files keep the dimensionless fractions of ``CONVENTIONS.md``.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from ..figures import symmetric_limit
from ..io.results import MAP_NAMES, MethodMaps
from ..methods import registry

__all__ = [
    "META_KEY",
    "method_label",
    "method_colour",
    "MAP_UNITS",
    "map_layer_name",
    "strain_colormap",
    "show_results",
    "display_values",
    "sigma_layer_name",
    "unreliable",
]

#: Key of the plugin's entry in ``layer.metadata``.
META_KEY = "stem_strain"

#: (display unit, factor from the file's unit)
MAP_UNITS = {"exx": ("%", 100.0), "eyy": ("%", 100.0), "exy": ("%", 100.0),
             "theta": ("deg", 1.0)}


def method_label(method: str) -> str:
    """The registry's label of ``method`` (its key when unknown)."""
    return registry.label(method)


def method_colour(method: str) -> str:
    """One colour per method (the registry's), shared by overlay points, histograms, table."""
    return registry.colour(method)


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


def sigma_layer_name(method: str, comp: str) -> str:
    unit, _ = MAP_UNITS[comp]
    return f"{method_label(method)} sigma {comp} ({unit})"


def unreliable(m: MethodMaps, limits: tuple[float, float] | None) -> np.ndarray | None:
    """Positions whose error bar exceeds ``limits = (strain %, rotation deg)``, or None.

    One mask for all four maps, so a position is either shown in all of them or greyed in
    all: greyed when any strain sigma exceeds the first limit (percent) or the rotation's
    sigma the second (degrees, the unit the rotation map is read in)."""
    sig = m.maps.sigma
    if limits is None or sig is None:
        return None
    strain_pct, theta_deg = limits
    worst = np.fmax(np.fmax(sig["exx"], sig["eyy"]), sig["exy"]) * 100.0
    return np.asarray(worst > strain_pct) | np.asarray(np.asarray(sig["theta"]) > theta_deg)


def display_values(m: MethodMaps, comp: str, max_sigma: tuple[float, float] | None = None
                   ) -> np.ndarray:
    """A map in display units (percent or degrees); with ``max_sigma`` (strain %, rotation
    deg) the positions :func:`unreliable` names are NaN (shown greyed, as "no value")."""
    out = np.asarray(getattr(m.maps, comp), np.float32) * MAP_UNITS[comp][1]
    bad = unreliable(m, max_sigma)
    if bad is not None:
        out = np.where(bad, np.nan, out).astype(np.float32)
    return out


def show_results(viewer: Any, results: dict[str, MethodMaps],
                 geometry: dict[str, Any] | None = None,
                 max_sigma: tuple[float, float] | None = None) -> list[Any]:
    """Add or update one image layer per method and component (``geometry``: ``scale``,
    ``translate``, ``units`` of the navigation image), and a hidden uncertainty layer per
    method and component whose maps carry ``sigma`` (``max_sigma``: strain %, rotation deg;
    grey out the positions whose error bar exceeds it, see :func:`unreliable`).

    Existing layers are updated in place (data and limits), so re-referencing keeps the
    user's layer order, visibility and zoom.
    """
    layers = []
    created = False
    # one limit per component for every method: one colour means one value in every tile
    lims = {comp: symmetric_limit(*(display_values(m, comp) for m in results.values()))
            for comp in MAP_NAMES}
    for method, m in results.items():
        for comp in MAP_NAMES:
            name = map_layer_name(method, comp)
            data = display_values(m, comp, max_sigma)
            lim = lims[comp]
            meta = {"role": "map", "method": method, "component": comp, "maps": m,
                    "auto_limits": (-lim, lim)}
            if name in viewer.layers:
                layer = viewer.layers[name]
                before = layer.metadata.get(META_KEY) or {}
                old = before.get("auto_limits")
                user = bool(before.get("user_limits")) or (
                    old is not None and not np.allclose(layer.contrast_limits, old))
                layer.data = data
                layer.metadata = {**layer.metadata, META_KEY: meta}
                if geometry:  # maps of another dataset (other pixel size) may be updated
                    layer.scale, layer.translate = geometry["scale"], geometry["translate"]
            else:
                layer = viewer.add_image(data, name=name, colormap=strain_colormap(),
                                         **(geometry or {}), metadata={META_KEY: meta},
                                         interpolation2d="nearest", visible=False)
                created, user = True, False
                _show_colorbar(layer)
            if user:  # limits the user chose stay (re-referencing or masking keeps them)
                kept = tuple(layer.contrast_limits)
                lo, hi = min(-lim, kept[0]), max(lim, kept[1])
                layer.contrast_limits_range = (lo, hi)
                layer.contrast_limits = kept
                meta["user_limits"] = True
            else:
                layer.contrast_limits_range = (-lim, lim)
                layer.contrast_limits = (-lim, lim)
            layers.append(layer)
    if created and layers:
        _below_overlays(viewer, layers)
        # show the first method's exx and select it (napari selected the last one added, a
        # hidden map: the status bar then showed no value)
        layers[0].visible = True
        viewer.layers.selection.active = layers[0]
    if layers:
        _backdrop(viewer, layers, geometry)
        _show_sigma(viewer, results, geometry)
    return layers


def _show_sigma(viewer: Any, results: dict[str, MethodMaps],
                geometry: dict[str, Any] | None) -> list[Any]:
    """One hidden layer per method and component with error bars (issue 13): the standard
    deviation in display units, ``magma`` from 0 to the 99th percentile. Hidden by default:
    they are for checking, not the first look. Updated in place like the maps."""
    out = []
    for method, m in results.items():
        if m.maps.sigma is None:
            continue
        for comp in MAP_NAMES:
            name = sigma_layer_name(method, comp)
            data = np.asarray(m.maps.sigma[comp], np.float32) * MAP_UNITS[comp][1]
            finite = data[np.isfinite(data)]
            hi = float(np.percentile(finite, 99)) if finite.size else 1.0
            hi = hi if hi > 0 else 1.0
            meta = {"role": "sigma", "method": method, "component": comp, "maps": m}
            if name in viewer.layers:
                layer = viewer.layers[name]
                layer.data = data
                layer.metadata = {**layer.metadata, META_KEY: meta}
                if geometry:
                    layer.scale, layer.translate = geometry["scale"], geometry["translate"]
            else:
                active = viewer.layers.selection.active
                layer = viewer.add_image(data, name=name, colormap="magma",
                                         **(geometry or {}), metadata={META_KEY: meta},
                                         interpolation2d="nearest", visible=False)
                viewer.layers.selection.active = active
                _below_overlays(viewer, [layer])
            layer.contrast_limits_range = (0.0, hi)
            layer.contrast_limits = (0.0, hi)
            out.append(layer)
    return out


def _show_colorbar(layer: Any) -> None:
    """napari's colour bar of the layer (napari 0.6+; drawn while the layer is shown)."""
    bar = getattr(layer, "colorbar", None)
    if bar is not None:
        bar.visible = True


def show_tile_names(viewer: Any, on: bool) -> None:
    """Each map's name on its tile of the side-by-side grid (napari's layer-name overlay)."""
    for layer in viewer.layers:
        if _role(layer) == "map":
            overlay = getattr(layer, "name_overlay", None)
            if overlay is not None:
                overlay.visible = on


#: roles of the plugin's overlays, kept above the maps (rectangle, mask, probe cross)
_OVERLAYS = ("mask", "reference", "probe")
BLANK_LAYER = "no value (NaN)"
_SYNCED: weakref.WeakSet = weakref.WeakSet()  # map layers whose visibility drives the backdrop


def _role(layer: Any) -> str | None:
    return ((getattr(layer, "metadata", None) or {}).get(META_KEY) or {}).get("role")


def _below_overlays(viewer: Any, new: list[Any]) -> None:
    """Move the new map layers under the lowest overlay (they would hide them on top)."""
    ll = viewer.layers
    for layer in new:
        over = [ll.index(la) for la in ll if _role(la) in _OVERLAYS]
        i = ll.index(layer)
        if over and i > min(over):
            ll.move(i, min(over))


def _backdrop(viewer: Any, maps: list[Any], geometry: dict[str, Any] | None) -> Any:
    """A uniform neutral layer right under the maps: blank (NaN) positions of a shown map then
    read as "no value" (``figures.NAN_COLOUR``), not as the grey image beneath - whose
    mid-grey looks like zero strain. Shown while any map is shown."""
    from napari.utils.colormaps import Colormap

    from ..figures import NAN_COLOUR

    ll = viewer.layers
    shape = np.shape(maps[0].data)
    layer = next((la for la in ll if _role(la) == "blank"), None)
    if layer is None:
        active = ll.selection.active  # adding a layer selects it: keep the user's selection
        colour = [*NAN_COLOUR, 1.0]
        layer = viewer.add_image(
            np.zeros(shape, np.uint8), name=BLANK_LAYER, **(geometry or {}),
            colormap=Colormap([colour, colour], name="no value", display_name="no value"),
            contrast_limits=(0, 1), opacity=1.0,
            metadata={META_KEY: {"role": "blank"}})
        if active is not None:
            ll.selection.active = active
    elif np.shape(layer.data) != shape:
        layer.data = np.zeros(shape, np.uint8)
    if geometry:
        layer.scale, layer.translate = geometry["scale"], geometry["translate"]
    lowest = min(ll.index(la) for la in ll if _role(la) == "map")
    i = ll.index(layer)
    if i > lowest:
        ll.move(i, lowest)
    elif i < lowest - 1:
        ll.move(i, lowest)  # moving down-list shifts the maps by one: lands right below
    for m in maps:
        if m not in _SYNCED:
            m.events.visible.connect(lambda _e, v=viewer: sync_backdrop(v))
            _SYNCED.add(m)
    sync_backdrop(viewer)
    return layer


def sync_backdrop(viewer: Any) -> None:
    """The backdrop is visible while a map is (never in the side-by-side grid)."""
    ll = viewer.layers
    blank = next((la for la in ll if _role(la) == "blank"), None)
    if blank is None:
        return
    grid = getattr(getattr(viewer, "canvas", None), "grid", None) or getattr(viewer, "grid",
                                                                              None)
    in_grid = bool(getattr(grid, "enabled", False))
    blank.visible = not in_grid and any(la.visible for la in ll if _role(la) == "map")
