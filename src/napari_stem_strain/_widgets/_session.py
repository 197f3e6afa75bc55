"""The state the docks of one viewer share, with no Qt in it.

Why a session object: the reference rectangle, the sample mask, the probe position and the
results are edited in different docks but must stay consistent - moving the rectangle
re-references every method's maps (:meth:`MethodMaps.with_reference`, no re-run), repaints the
layers, the histograms and the probe overlay. One session per viewer holds them and emits
psygnal signals the docks listen to.

Results are kept *raw* (as the methods delivered them); what is shown is always derived:
``raw.sample & user mask`` re-referenced to the current rectangle. So un-painting the mask or
moving the rectangle back restores the earlier maps exactly.

Several datasets in one viewer: the session works on one *current* dataset (the last opened,
or the one whose image the user selects). Each dataset keeps its own results, mask, rectangle
and probe: switching saves the current one's and restores (or, the first time, creates) the
other's; the mask, rectangle, probe cross and maps take the geometry of the current dataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import weakref
from typing import Any

import numpy as np
from psygnal import Signal

from ..io.results import MethodMaps
from ..strain import format_region, parse_region
from ._layers import META_KEY, show_results

__all__ = ["StrainSession", "get_session", "existing_session",
           "REFERENCE_LAYER", "MASK_LAYER", "SAMPLE", "BACKGROUND"]

log = logging.getLogger(__name__)

REFERENCE_LAYER = "reference region"
MASK_LAYER = "sample mask"
#: Label values of the mask layer (0, unpainted, also counts as background).
SAMPLE, BACKGROUND = 1, 2

_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def existing_session(viewer: Any) -> StrainSession | None:
    """The session of ``viewer`` if it has one (never creates one): for adapters such as the
    reader that act on a session only when the user already works with one."""
    return _SESSIONS.get(viewer)


def get_session(viewer: Any) -> StrainSession:
    """The one session of ``viewer`` (created on first use)."""
    s = _SESSIONS.get(viewer)
    if s is None:
        s = StrainSession(viewer)
        _SESSIONS[viewer] = s
    return s


def _notify_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


class StrainSession:
    """Dataset, reference region, sample mask, probe and results of one viewer."""

    results_changed = Signal()
    reference_changed = Signal(str)
    probe_changed = Signal(int, int)
    dataset_changed = Signal()
    #: the sample mask changed (painting, undo/redo, fill), with or without results
    mask_changed = Signal()

    def __init__(self, viewer: Any) -> None:
        self._viewer_ref = weakref.ref(viewer)
        self.raw_results: dict[str, MethodMaps] = {}
        self.results: dict[str, MethodMaps] = {}
        self.probe: tuple[int, int] | None = None
        self._last_region: str | None = None
        self._last_error: str | None = None
        self._dataset_key: int | None = None
        self._current: Any = None  # the current dataset (see ``nav_layer``)
        #: saved state of the other datasets (id -> raw results, mask, region, probe)
        self._states: dict[int, dict[str, Any]] = {}
        self._busy = False
        self._mask_key: int | None = None
        # datasets a worker is reading (id -> [dataset, count]) and ones to close afterwards
        self._held: dict[int, list[Any]] = {}
        self._close_later: set[int] = set()
        viewer.layers.events.inserted.connect(self._on_layer_inserted)
        viewer.layers.events.removed.connect(self._on_layer_removed)
        viewer.layers.selection.events.active.connect(self._on_active)

    # ------------------------------------------------------------------ dataset
    @property
    def viewer(self) -> Any:
        v = self._viewer_ref()
        if v is None:
            raise RuntimeError("the viewer of this session was closed")
        return v

    def nav_layer(self) -> Any | None:
        """The navigation image of the current dataset (before there is one: the selected
        navigation image, else the most recently added)."""
        layers = self.viewer.layers
        navs = [layer for layer in layers if _info(layer).get("role") == "navigation"]
        if self._current is not None:
            for layer in reversed(navs):
                if _info(layer).get("dataset") is self._current:
                    return layer
        active = layers.selection.active
        if active is not None and active in navs:
            return active
        return navs[-1] if navs else None

    def info(self) -> dict[str, Any]:
        """The plugin's metadata of the navigation layer (dataset, virtual images, truth)."""
        nav = self.nav_layer()
        return _info(nav) if nav is not None else {}

    @property
    def dataset(self) -> Any | None:
        return self.info().get("dataset")

    @property
    def ground_truth(self) -> Any | None:
        return self.info().get("ground_truth")

    @property
    def scan_shape(self) -> tuple[int, int] | None:
        ds = self.dataset
        return ds.scan_shape if ds is not None else None

    def geometry(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """``(scale, translate)`` of the navigation image, shared by every scan-space layer."""
        nav = self.nav_layer()
        if nav is None:
            return (1.0, 1.0), (0.0, 0.0)
        return tuple(nav.scale[-2:]), tuple(nav.translate[-2:])  # type: ignore[return-value]

    def layer_kwargs(self) -> dict[str, Any]:
        """``scale``, ``translate`` and ``units`` for a new scan-space layer (napari warns
        when layers of one canvas disagree on units)."""
        scale, translate = self.geometry()
        kw: dict[str, Any] = {"scale": scale, "translate": translate}
        nav = self.nav_layer()
        if nav is not None:
            kw["units"] = tuple(nav.units[-2:])
        return kw

    def _on_layer_inserted(self, event: Any) -> None:
        layer = event.value
        info = _info(layer)
        if info.get("role") == "navigation" and not self._busy:
            self.new_dataset(info.get("dataset"))

    def _on_active(self, event: Any = None) -> None:
        """Selecting an image of another dataset makes that dataset current."""
        if self._busy:
            return
        try:
            active = self.viewer.layers.selection.active
        except RuntimeError:
            return
        info = _info(active)
        ds = info.get("dataset")
        if ds is not None and info.get("role") in ("navigation", "virtual") \
                and ds is not self._current:
            self.new_dataset(ds)

    def _on_layer_removed(self, event: Any) -> None:
        """Close a dataset's file once no layer shows it any more (the BF and ADF images of
        one file share it) - later, if a run is still reading it."""
        ds = _info(event.value).get("dataset")
        if ds is None:
            return
        try:
            layers = list(self.viewer.layers)
        except RuntimeError:
            layers = []
        if any(_info(layer).get("dataset") is ds for layer in layers):
            return
        self._states.pop(id(ds), None)
        if ds is self._current:
            self._current = None
            if any(_info(layer).get("role") == "navigation" for layer in layers):
                self.new_dataset()
        if id(ds) in self._held:
            self._close_later.add(id(ds))
        else:
            _close(ds)

    def hold(self, ds: Any) -> None:
        """A worker starts reading ``ds``: removing its layers must not close it yet."""
        entry = self._held.setdefault(id(ds), [ds, 0])
        entry[1] += 1

    def release(self, ds: Any) -> None:
        """The worker is done with ``ds``; close it now if its layers went meanwhile."""
        entry = self._held.get(id(ds))
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self._held[id(ds)]
            if id(ds) in self._close_later:
                self._close_later.discard(id(ds))
                _close(ds)

    def new_dataset(self, ds: Any = None) -> None:
        """Make ``ds`` (default: the newest navigation image's) the current dataset: save the
        state of the one before, restore ``ds``'s (or fit a new rectangle and mask to it)."""
        if ds is None:
            self._current = None
            ds = self.dataset
        elif not any(_info(layer).get("role") == "navigation"
                     and _info(layer).get("dataset") is ds for layer in self.viewer.layers):
            return  # e.g. its ADF image was added before its navigation image
        key = id(ds) if ds is not None else None
        if key == self._dataset_key and ds is self._current:
            return
        if self._dataset_key is not None and self._dataset_key != key:
            self._states[self._dataset_key] = self._snapshot()
        self._current = ds
        self._dataset_key = key
        state = self._states.pop(key, None) if key is not None else None
        self.raw_results, self.results = {}, {}
        self.probe = None
        self._mask_key = None
        self._last_region = None
        if ds is not None:
            if state is None:
                self.ensure_layers(reset=True)
            else:
                self._restore(state)
        if self.raw_results:
            self.refresh()
        else:
            self._remove_maps()
        self.dataset_changed.emit()
        self.results_changed.emit()

    def _snapshot(self) -> dict[str, Any]:
        mask = self.mask_layer(create=False)
        return {"raw_results": dict(self.raw_results), "probe": self.probe,
                "region": self.reference_region(),
                "mask": None if mask is None else np.array(mask.data, copy=True)}

    def _restore(self, state: dict[str, Any]) -> None:
        self._busy = True
        try:
            self.raw_results = dict(state["raw_results"])
            self.ensure_layers()
            mask = state["mask"]
            if mask is not None and mask.shape == self.scan_shape:
                self.mask_layer(create=True).data = mask
            self.probe = state["probe"]
        finally:
            self._busy = False
        self.set_reference_region(state["region"] or self.default_region())

    def _remove_maps(self) -> None:
        """Map layers of another dataset do not stay over this one."""
        layers = self.viewer.layers
        for layer in [la for la in layers if _info(la).get("role") in ("map", "blank")]:
            layers.remove(layer)

    def _fit_geometry(self) -> None:
        """Scan-space layers of the plugin take the current dataset's scale and offset."""
        kw = self.layer_kwargs()
        for layer in self.viewer.layers:
            if _info(layer).get("role") in ("mask", "reference", "map", "probe", "blank"):
                layer.scale, layer.translate = kw["scale"], kw["translate"]
                if "units" in kw:
                    with contextlib.suppress(Exception):
                        layer.units = kw["units"]

    # ------------------------------------------------------------ scan layers
    def ensure_layers(self, reset: bool = False) -> None:
        """Create (or with ``reset`` re-create for a new scan) the mask and the rectangle."""
        if self.dataset is None:
            return
        self._current = self.dataset
        self._dataset_key = id(self._current)
        self._busy = True
        try:
            fresh = self.mask_layer(create=False) is None
            mask = self.mask_layer(create=True)
            if reset or fresh or mask.data.shape != self.scan_shape:
                self._replace_mask_layer()
                self.fill_mask("virtual")
            ref = self.reference_layer(create=True)
            self._fit_geometry()
            if reset or len(ref.data) == 0:
                self.set_reference_region(self.default_region())
        finally:
            self._busy = False

    def reference_layer(self, create: bool = True) -> Any | None:
        layers = self.viewer.layers
        if REFERENCE_LAYER in layers:
            return layers[REFERENCE_LAYER]
        if not create:
            return None
        layer = self.viewer.add_shapes(
            name=REFERENCE_LAYER, **self.layer_kwargs(), edge_color="yellow",
            face_color=[1, 1, 0, 0.05], edge_width=0.2, ndim=2,
        )
        layer.metadata[META_KEY] = {"role": "reference"}
        layer.events.data.connect(self._on_reference_edit)
        return layer

    def mask_layer(self, create: bool = True) -> Any | None:
        layers = self.viewer.layers
        if MASK_LAYER in layers:
            return layers[MASK_LAYER]
        if not create:
            return None
        return self._add_mask_layer()

    def _add_mask_layer(self) -> Any:
        shape = self.scan_shape or (1, 1)
        from napari.utils.colormaps import DirectLabelColormap

        # background: green (no colour of the red-blue strain maps, whose blank NaN pixels
        # show it through); sample and unpainted: transparent
        cmap = DirectLabelColormap(color_dict={
            None: [0, 0, 0, 0], 0: [0, 0, 0, 0], SAMPLE: [0, 0, 0, 0],
            BACKGROUND: [0.1, 0.75, 0.35, 0.8]})
        layer = self.viewer.add_labels(np.zeros(shape, np.uint8), name=MASK_LAYER,
                                       **self.layer_kwargs(), opacity=0.6,
                                       colormap=cmap)
        layer.metadata[META_KEY] = {"role": "mask"}
        layer.selected_label = BACKGROUND
        # paint fires before a stroke's pixels land, labels_update after; data: replaced
        layer.events.paint.connect(self._on_mask_edit)
        layer.events.labels_update.connect(self._on_mask_edit)
        layer.events.data.connect(self._on_mask_edit)
        # undo / redo rewrite the pixels and only emit set_data
        layer.events.set_data.connect(self._on_mask_edit)
        # keep the rectangle drawn above the mask
        if REFERENCE_LAYER in self.viewer.layers:
            layers = self.viewer.layers
            layers.move(layers.index(layer), layers.index(layers[REFERENCE_LAYER]))
        return layer

    def _replace_mask_layer(self) -> None:
        layers = self.viewer.layers
        if MASK_LAYER in layers:
            old = layers[MASK_LAYER]
            if old.data.shape == self.scan_shape:
                kw = self.layer_kwargs()
                old.scale, old.translate = kw["scale"], kw["translate"]
                return
            layers.remove(old)
        self._add_mask_layer()

    # ----------------------------------------------------------------- mask
    def fill_mask(self, source: str = "virtual", undoable: bool = False) -> None:
        """Fill the mask from the virtual images (``"virtual"``) or from the methods' own
        sample classification (``"classifier"``: the first registered method's with a result,
        CC-ST-AE's when present). ``undoable``: as
        one step of the mask layer's undo history (the dock's Fill button)."""
        from ..overlay import mask_from_virtual

        layer = self.mask_layer(create=True)
        if source == "classifier":
            from ..methods import registry

            ranked = [n for n in registry.available() if n in self.raw_results]
            key = ranked[0] if ranked else next(iter(self.raw_results), None)
            raw = None if key is None else self.raw_results[key]
            if raw is None:
                raise ValueError("no method result yet: run a method to use its classifier")
            sample = np.asarray(raw.sample, bool)
        else:
            vi = self.info().get("virtual")
            if vi is None:
                sample = np.ones(self.scan_shape or layer.data.shape, bool)
            else:
                sample = mask_from_virtual(vi.bright_field, vi.dark_field)
        new = np.where(sample, SAMPLE, BACKGROUND).astype(np.uint8)
        if undoable and layer.data.shape == new.shape:
            changed = np.nonzero(np.asarray(layer.data) != new)
            if changed[0].size:
                layer.data_setitem(changed, new[changed])
            return
        layer.data = new

    def sample_mask(self) -> np.ndarray | None:
        """True where the user's mask says crystal (``None`` without a mask layer)."""
        layer = self.mask_layer(create=False)
        if layer is None or layer.data.shape != self.scan_shape:
            return None
        return np.asarray(layer.data) == SAMPLE

    def _on_mask_edit(self, event: Any = None) -> None:
        if self._busy:
            return
        mask = self.sample_mask()
        key = None if mask is None else hash(mask.tobytes())
        if key != self._mask_key:  # labels_update also fires for display-only refreshes
            self._mask_key = key
            self.mask_changed.emit()
            self.refresh()

    # ------------------------------------------------------------ reference
    def default_region(self) -> str:
        """The file's own reference (simulations record one), else the square of sample
        positions farthest from vacuum and edge (``pipeline.default_reference``)."""
        from ..pipeline import default_reference

        gt = self.ground_truth
        if gt is not None and gt.reference:
            return gt.reference
        mask = self.sample_mask()
        if mask is None:
            mask = np.ones(self.scan_shape, bool)
        return default_reference(mask)

    def set_reference_region(self, region: str) -> None:
        """Draw the rectangle for ``region`` (``"r0:r1,c0:c1"``, scan pixels, half-open)."""
        rs, cs = parse_region(region)
        layer = self.reference_layer(create=True)
        # pixel i covers [i - 0.5, i + 0.5] in napari's data coordinates
        rect = np.array([[rs.start - 0.5, cs.start - 0.5], [rs.start - 0.5, cs.stop - 0.5],
                         [rs.stop - 0.5, cs.stop - 0.5], [rs.stop - 0.5, cs.start - 0.5]])
        layer.data = [rect]
        layer.shape_type = ["rectangle"]
        self._on_reference_edit()

    def reference_region(self) -> str | None:
        """The rectangle as ``"r0:r1,c0:c1"`` clipped to the scan (the last shape drawn wins);
        ``None`` when there is no rectangle or it lies outside the scan."""
        layer = self.reference_layer(create=False)
        shape = self.scan_shape
        if layer is None or shape is None or len(layer.data) == 0:
            return None
        verts = np.asarray(layer.data[-1])[:, -2:]
        lo = np.floor(verts.min(0) + 0.5).astype(int)
        hi = np.floor(verts.max(0) + 0.5).astype(int)
        lo = np.clip(lo, 0, shape)
        hi = np.clip(hi, 0, shape)
        hi = np.maximum(hi, np.minimum(lo + 1, shape))
        if np.any(hi <= lo):
            return None
        return format_region((slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1]))))

    def _on_reference_edit(self, event: Any = None) -> None:
        region = self.reference_region()
        if region is None or region == self._last_region:
            return
        previous, self._last_region = self._last_region, region
        if not self.refresh() and previous is not None:
            # refused (e.g. on vacuum): the rectangle and the dock go back to the region the
            # maps still use, rather than show one they do not
            self.set_reference_region(previous)
            return
        self.reference_changed.emit(region)

    # --------------------------------------------------------------- results
    def set_results(self, raw: dict[str, MethodMaps], dataset: Any = None) -> None:
        """Store freshly computed results (any reference) of ``dataset`` (default: the current
        one) and show them - or keep them for when that dataset is current again."""
        if dataset is not None and dataset is not self.dataset:
            state = self._states.get(id(dataset))
            if state is not None:
                state["raw_results"] = {**state["raw_results"], **raw}
            return
        self.raw_results = {**self.raw_results, **raw}
        self.refresh()

    def refresh(self) -> bool:
        """Recompute what is shown from the raw results, the mask and the rectangle; False
        when the rectangle was refused (a notification says why; nothing changed)."""
        if not self.raw_results:
            return True
        region = self.reference_region()
        mask = self.sample_mask()
        try:
            shown = {}
            for name, raw in self.raw_results.items():
                m = raw
                if mask is not None:
                    m = dataclasses.replace(raw, sample=np.asarray(raw.sample, bool) & mask)
                shown[name] = m.with_reference(region or raw.reference)
        except ValueError as err:
            msg = str(err)
            if msg != self._last_error:
                self._last_error = msg
                _notify_error(f"Cannot use this reference: {msg}")
            return False
        self._last_error = None
        self.results = shown
        show_results(self.viewer, shown, self.layer_kwargs(), self.max_sigma)
        self.results_changed.emit()
        return True

    #: issue 13: (strain %, rotation deg): positions whose error bar exceeds either limit are
    #: greyed out; None: off
    max_sigma: tuple[float, float] | None = None

    def set_max_sigma(self, value: tuple[float, float] | None) -> None:
        """Grey out (None: show again) the positions whose error bar exceeds ``value`` =
        (strain sigma in %, rotation sigma in degrees)."""
        self.max_sigma = None if value is None else (float(value[0]), float(value[1]))
        self.refresh()

    # ----------------------------------------------------------------- probe
    def set_probe(self, row: int, col: int) -> None:
        shape = self.scan_shape
        if shape is None:
            return
        row = int(np.clip(row, 0, shape[0] - 1))
        col = int(np.clip(col, 0, shape[1] - 1))
        if self.probe == (row, col):
            return
        self.probe = (row, col)
        self.probe_changed.emit(row, col)


def _info(layer: Any) -> dict[str, Any]:
    try:
        return layer.metadata.get(META_KEY, {}) or {}
    except AttributeError:
        return {}


def _close(ds: Any) -> None:
    close = getattr(ds, "close", None)
    if callable(close):
        close()
