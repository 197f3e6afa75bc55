"""Probe inspector: the diffraction pattern under the mouse, with every method's prediction.

Click or drag on the navigation image (or any strain map) and the dock shows that probe's
pattern (linear / sqrt / log), the Bragg disks each method's fitted ``A`` predicts there -
``centre + A g0`` for the reference lattice ``g0`` (:mod:`napari_stem_strain.overlay`) - one
colour per method, and the numbers: ``A``, strain, rotation and the sample/background class.
A yellow cross in the viewer marks the probe.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QLabel,
    QScrollArea,
    QSizePolicy,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from .. import overlay
from ._layers import META_KEY, method_colour, method_label
from ._scroll import make_scrollable
from ._session import get_session

__all__ = ["ProbeInspector", "PROBE_LAYER"]

PROBE_LAYER = "probe"
_SCALES = ("sqrt", "log", "linear")


class ProbeInspector(QWidget):
    """Diffraction pattern of the probe position with predicted disks and numbers."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        #: predicted disk positions (detector px, (row, col)) per method at the probe
        self.overlay: dict[str, np.ndarray] = {}
        self.pattern: np.ndarray | None = None
        self.centre: np.ndarray | None = None
        self.lattice: overlay.ReferenceLattice | None = None
        self._lattice_key: tuple[Any, ...] | None = None
        self._lattice_error = ""

        self.scale = QComboBox()
        self.scale.addItems(list(_SCALES))
        self.scale.setToolTip("Intensity display: sqrt and log bring out weak Bragg disks")
        self.scale.currentTextChanged.connect(lambda _t: self.redraw())
        self.armed = QCheckBox("Pick with mouse")
        self.armed.setChecked(True)
        self.armed.setToolTip("Click or drag on the scan image to move the probe (dragging "
                              "then does not pan; untick to pan with the mouse)")
        self.armed.toggled.connect(self._set_pan)
        self.show_overlay = QCheckBox("Predicted disks")
        self.show_overlay.setChecked(True)
        self.show_overlay.toggled.connect(lambda _b: self.redraw())
        top = QHBoxLayout()
        top.addWidget(QLabel("display"))
        top.addWidget(self.scale)
        top.addStretch(1)
        top2 = QHBoxLayout()
        top2.addWidget(self.show_overlay)
        top2.addWidget(self.armed)
        top2.addStretch(1)

        self.figure = Figure(figsize=(3.6, 3.6), facecolor="#262930")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumSize(160, 160)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        # the top strip holds the methods' legend, never over the disks
        self.ax = self.figure.add_axes((0.0, 0.0, 1.0, 0.9))
        self.ax.set_axis_off()

        self.numbers = QLabel("click on the scan image to inspect a probe position")
        self.numbers.setTextFormat(Qt.TextFormat.RichText)
        self.numbers.setWordWrap(True)
        self.numbers.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        self.numbers.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        scroll = QScrollArea()
        scroll.setWidget(self.numbers)
        scroll.setWidgetResizable(True)
        scroll.setMinimumHeight(60)
        # pattern above, numbers below; the user moves the split (a small dock scrolls)
        self.splitter = split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.canvas)
        split.addWidget(scroll)
        split.setStretchFactor(0, 1)
        split.setStretchFactor(1, 1)
        split.setChildrenCollapsible(False)

        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addLayout(top2)
        lay.addWidget(split, 1)
        make_scrollable(self)

        self.session.probe_changed.connect(self._on_probe)
        self.session.results_changed.connect(self.update_view)
        self.session.reference_changed.connect(lambda _r: self.update_view())
        self.session.dataset_changed.connect(self._on_dataset)
        self.viewer.mouse_drag_callbacks.append(self._mouse_drag)
        self.viewer.layers.events.inserted.connect(self._on_inserted)
        self._set_pan(True)
        if self.session.dataset is not None:
            self._on_dataset()

    # -------------------------------------------------------------------- mouse
    def _is_scan_image(self, layer: Any) -> bool:
        info = (getattr(layer, "metadata", None) or {}).get(META_KEY, {})
        return layer is not None and layer._type_string == "image" and info.get("role") in {
            "navigation", "map", "virtual"}

    def _alive(self) -> bool:
        """False once Qt deleted this dock (its Python callbacks may still be registered)."""
        try:
            self.armed.isChecked()
            return True
        except RuntimeError:
            return False

    def _on_inserted(self, _event: Any = None) -> None:
        if self._alive():
            self._set_pan(self.armed.isChecked())

    def _set_pan(self, armed: bool) -> None:
        """While picking, dragging over our scan images moves the probe instead of panning."""
        for layer in list(self.viewer.layers):
            if self._is_scan_image(layer):
                layer.mouse_pan = not armed

    def pick(self, world_position: Any) -> None:
        """Move the probe to the scan pixel under a world-coordinate position."""
        nav = self.session.nav_layer()
        if nav is None:
            return
        data = np.asarray(nav.world_to_data(world_position))[-2:]
        r, c = (int(np.floor(v + 0.5)) for v in data)
        shape = self.session.scan_shape
        if shape is None or not (0 <= r < shape[0] and 0 <= c < shape[1]):
            return
        self.session.set_probe(r, c)

    def _mouse_drag(self, viewer: Any, event: Any):
        if not self._alive():
            if self._mouse_drag in viewer.mouse_drag_callbacks:
                viewer.mouse_drag_callbacks.remove(self._mouse_drag)
            return
        if not self.armed.isChecked() or not self._is_scan_image(viewer.layers.selection.active):
            return
        self.pick(event.position)
        yield
        while event.type == "mouse_move":
            self.pick(event.position)
            yield

    # --------------------------------------------------------------- probe data
    def _on_dataset(self) -> None:
        self.lattice, self._lattice_key = None, None
        self.overlay = {}
        shape = self.session.scan_shape
        if shape is not None:
            self.session.probe = None
            self.session.set_probe(shape[0] // 2, shape[1] // 2)

    def _on_probe(self, row: int, col: int) -> None:
        self._mark(row, col)
        self.update_view()

    def _mark(self, row: int, col: int) -> None:
        kw = self.session.layer_kwargs()
        layers = self.viewer.layers
        if PROBE_LAYER in layers:
            layers[PROBE_LAYER].data = [[row, col]]
            layers[PROBE_LAYER].scale = kw["scale"]
            layers[PROBE_LAYER].translate = kw["translate"]
            return
        active = layers.selection.active
        pts = self.viewer.add_points(
            [[row, col]], name=PROBE_LAYER, symbol="cross", size=1.6, face_color="yellow",
            border_color="black", border_width=0.1, **kw)
        pts.metadata[META_KEY] = {"role": "probe"}
        if active is not None:  # keep the user's layer selected (picking keeps working)
            layers.selection.active = active

    def _reference_lattice(self) -> overlay.ReferenceLattice | None:
        ds = self.session.dataset
        region = self.session.reference_region()
        if ds is None or region is None:
            return None
        key = (id(ds), region)
        if key != self._lattice_key:
            from ..strain import parse_region

            self._lattice_key = key
            try:
                mean = overlay.region_mean_pattern(ds, parse_region(region))
                self.lattice = overlay.reference_lattice(mean)
                self._lattice_error = ""
            except ValueError as err:
                self.lattice = None
                self._lattice_error = str(err)
        return self.lattice

    def read_pattern(self, row: int, col: int) -> np.ndarray:
        block = self.session.dataset.data[row:row + 1, col:col + 1]
        if hasattr(block, "compute"):
            block = block.compute()
        return np.asarray(block, np.float64)[0, 0]

    def update_view(self) -> None:
        """Recompute pattern, overlay and numbers for the current probe."""
        probe = self.session.probe
        if self.session.dataset is None or probe is None:
            return
        r, c = probe
        self.pattern = self.read_pattern(r, c)
        self.centre, _ = overlay.beam_centre(self.pattern)
        self.overlay = {}
        lattice = self._reference_lattice() if self.session.results else None
        if lattice is not None:
            for name, m in self.session.results.items():
                A = np.asarray(m.maps.A[r, c], np.float64)
                if np.all(np.isfinite(A)):
                    self.overlay[name] = overlay.predicted_disks(A, lattice.vectors, self.centre)
        self.redraw()
        self.numbers.setText(self._numbers_html(r, c))

    # ------------------------------------------------------------------ drawing
    def redraw(self) -> None:
        ax = self.ax
        ax.clear()
        ax.set_axis_off()
        if self.pattern is None:
            self.canvas.draw_idle()
            return
        p = np.clip(self.pattern, 0, None)
        mode = self.scale.currentText()
        shown = np.sqrt(p) if mode == "sqrt" else np.log1p(p) if mode == "log" else p
        ax.imshow(shown, cmap="gray", interpolation="nearest")
        if self.show_overlay.isChecked():
            from matplotlib.collections import EllipseCollection
            from matplotlib.lines import Line2D

            radius = self.lattice.disk_radius if self.lattice is not None else 3.0
            handles = []
            for i, (name, pts) in enumerate(self.overlay.items()):
                # rings in detector pixels (they scale with the image), one size per method,
                # concentric so coinciding predictions stay visible
                d = np.full(len(pts), 2.0 * radius * (1.0 + 0.3 * i))
                col = method_colour(name)
                ax.add_collection(EllipseCollection(
                    d, d, np.zeros(len(pts)), units="xy", offsets=pts[:, ::-1],
                    offset_transform=ax.transData, facecolors="none", edgecolors=col,
                    linewidths=1.3))
                handles.append(Line2D([], [], marker="o", ls="", mfc="none", mec=col,
                                      label=method_label(name)))
            if handles:
                ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0),
                          ncol=len(handles), fontsize=7, frameon=False, labelcolor="#e0e0e0",
                          borderaxespad=0.2, handletextpad=0.3, columnspacing=1.0)
        h, w = self.pattern.shape
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        self.canvas.draw_idle()

    def _calibration_line(self) -> str:
        """Diffraction-space calibration of the file, and the reference lattice in it."""
        cal = getattr(self.session.dataset, "calibration", None)
        q, unit = getattr(cal, "q_pixel_size", None), getattr(cal, "q_units", None)
        if not q or not unit:
            return "<i>detector: no diffraction calibration in the file (pixels)</i>"
        text = f"<b>detector</b>: {q:.4g} {unit} per pixel"
        if self.lattice is not None:
            g = min(np.linalg.norm(self.lattice.g1), np.linalg.norm(self.lattice.g2)) * q
            text += f"; shortest reference g = {g:.3g} {unit}"
            if unit in ("1/nm", "nm^-1", "1/Å", "1/A"):
                text += f" (d = {1.0 / g:.3g} {unit.replace('1/', '')})"
        return text

    def _numbers_html(self, r: int, c: int) -> str:
        mask = self.session.sample_mask()
        lines = [f"<b>probe</b> row {r}, column {c}"]
        if mask is not None:
            lines[0] += f" &mdash; mask: {'sample' if mask[r, c] else 'background'}"
        for name, m in self.session.results.items():
            col = method_colour(name)
            A = np.asarray(m.maps.A[r, c], float)
            raw_sample = bool(np.asarray(m.sample)[r, c])
            head = f"<b style='color:{col}'>{method_label(name)}</b>: "
            if not np.all(np.isfinite(A)):
                lines.append(head + ("background / not fitted" if raw_sample or mask is None
                                     else "background"))
                continue
            e = [float(getattr(m.maps, k)[r, c]) for k in ("exx", "eyy", "exy", "theta")]
            # issue 13: value +- one standard deviation where the method gave error bars
            sig = m.maps.sigma
            s = ["" if sig is None or not np.isfinite(sig[k][r, c])
                 else f" &plusmn; {(100 if k != 'theta' else 1) * float(sig[k][r, c]):.3f}"
                 for k in ("exx", "eyy", "exy", "theta")]
            lines.append(
                head + f"{'sample' if raw_sample else 'background'}<br>"
                f"<tt>A = [[{A[0, 0]:+.4f}, {A[0, 1]:+.4f}], [{A[1, 0]:+.4f}, {A[1, 1]:+.4f}]]"
                f"</tt><br>exx {100 * e[0]:+.3f}{s[0]} %, eyy {100 * e[1]:+.3f}{s[1]} %, "
                f"exy {100 * e[2]:+.3f}{s[2]} %, &theta; {e[3]:+.3f}{s[3]}&deg;")
        gt = self.session.ground_truth
        if gt is not None and gt.sample[r, c]:
            lines.append(f"<b>ground truth</b>: exx {100 * gt.exx[r, c]:+.2f} %, eyy "
                         f"{100 * gt.eyy[r, c]:+.2f} %, exy {100 * gt.exy[r, c]:+.2f} %, "
                         f"&theta; {gt.theta[r, c]:+.2f}&deg;")
        cal_line = self._calibration_line()
        if cal_line:
            lines.append(cal_line)
        if self.session.results and self.lattice is None and self._lattice_error:
            lines.append(f"<i>no overlay: {self._lattice_error}</i>")
        if mask is not None and not self.session.results:
            lines.append("run a method (Strain mapping) to see its predicted disks")
        return "<br>".join(lines)
