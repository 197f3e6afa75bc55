"""napari writer: selected strain-map layers saved as one result file (``CONVENTIONS.md``).

The layers show percent/degrees, but what gets written is the method's
:class:`~napari_stem_strain.io.results.MethodMaps` the layer carries in its metadata (the
dimensionless maps, ``A``, ``A_raw``, sample mask, reference, settings), so a saved file is the
same as one the CLI writes. Selecting any one map of a method saves that method's whole group.
"""

from __future__ import annotations

from typing import Any

from .io.results import MethodMaps, write_results

__all__ = ["write_results_layers", "groups_from_layer_data"]


def groups_from_layer_data(layer_data: list[tuple[Any, dict, str]]) -> list[MethodMaps]:
    """The distinct method groups the given layers carry (first occurrence order)."""
    groups: dict[str, MethodMaps] = {}
    for _data, attrs, _ltype in layer_data:
        info = (attrs.get("metadata") or {}).get("stem_strain") or {}
        m = info.get("maps")
        if isinstance(m, MethodMaps) and m.method not in groups:
            groups[m.method] = m
    return list(groups.values())


def write_results_layers(path: str, layer_data: list[tuple[Any, dict, str]]) -> list[str]:
    """Write the result groups of the given layers to ``path``; napari's writer contract.

    Raises ``ValueError`` (napari shows it as a notification) when no layer is a strain map.
    """
    groups = groups_from_layer_data(layer_data)
    if not groups:
        raise ValueError(
            "none of the selected layers is a strain map of napari-stem-strain: select the "
            "maps (e.g. 'CC-ST-AE exx (%)') to save them as a result file"
        )
    return [str(write_results(path, groups, replace=True))]
