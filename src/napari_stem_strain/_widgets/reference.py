"""Reference-region and sample-mask dock.

The reference is a rectangle in a Shapes layer (move or resize it; the maps follow at once);
the mask is a Labels layer (1 = sample, 2 = background) filled from the virtual images or from
CC-ST-AE's classifier and editable with napari's brush. All logic is in the session.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..strain import parse_region
from ._scroll import make_scrollable
from ._session import BACKGROUND, SAMPLE, get_session
from ._workers import Task, notify_error

__all__ = ["ReferenceWidget"]

_SOURCES = {"virtual-image threshold": "virtual", "CC-ST-AE classifier": "classifier"}


class ReferenceWidget(QWidget):
    """Move the reference rectangle, type a region, fill and paint the sample mask."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)

        ref_box = QGroupBox("Reference region (strain = 0 here)")
        self.region_label = QLabel("open a 4D-STEM file first")
        self.region_label.setWordWrap(True)
        self.region_edit = QLineEdit()
        self.region_edit.setPlaceholderText("r0:r1,c0:c1")
        self.region_edit.setToolTip("Rows r0..r1-1 and columns c0..c1-1 of the scan; Enter "
                                    "moves the rectangle there")
        self.region_edit.returnPressed.connect(self._apply_typed)
        self.reset_button = QPushButton("Default rectangle")
        self.reset_button.setToolTip("The file's reference (simulations) or the square of "
                                     "sample farthest from vacuum and edges")
        self.reset_button.clicked.connect(self.reset_reference)
        lay = QVBoxLayout(ref_box)
        lay.addWidget(self.region_label)
        row = QHBoxLayout()
        row.addWidget(self.region_edit)
        row.addWidget(self.reset_button)
        lay.addLayout(row)

        mask_box = QGroupBox("Sample / background mask")
        self.source = QComboBox()
        self.source.addItems(list(_SOURCES))
        self.fill_button = QPushButton("Fill mask")
        self.fill_button.clicked.connect(self.fill_mask)
        self.paint_bg = QPushButton("Paint background")
        self.paint_bg.clicked.connect(lambda: self._paint(BACKGROUND))
        self.paint_sample = QPushButton("Paint sample")
        self.paint_sample.clicked.connect(lambda: self._paint(SAMPLE))
        mlay = QVBoxLayout(mask_box)
        r1 = QHBoxLayout()
        r1.addWidget(self.source)
        r1.addWidget(self.fill_button)
        r2 = QHBoxLayout()
        r2.addWidget(self.paint_sample)
        r2.addWidget(self.paint_bg)
        mlay.addLayout(r1)
        mlay.addLayout(r2)
        self.mask_label = QLabel("")
        self.mask_label.setWordWrap(True)  # a long count must not widen the dock
        mlay.addWidget(self.mask_label)

        # virtual detector: the BF disk and ADF annulus the images (and the automatic mask)
        # come from; 0 = automatic (from the measured direct beam)
        vd_box = QGroupBox("Virtual detector (detector pixels, 0 = automatic)")
        vlay = QFormLayout(vd_box)
        self.bf_radius = QDoubleSpinBox()
        self.adf_inner = QDoubleSpinBox()
        self.adf_outer = QDoubleSpinBox()
        for sb in (self.bf_radius, self.adf_inner, self.adf_outer):
            sb.setRange(0.0, 10_000.0)
            sb.setDecimals(1)
            sb.setSpecialValueText("auto")
        vlay.addRow("BF radius", self.bf_radius)
        vlay.addRow("ADF inner radius", self.adf_inner)
        vlay.addRow("ADF outer radius", self.adf_outer)
        self.virtual_button = QPushButton("Recompute virtual images")
        self.virtual_button.setToolTip("One streamed pass over the file; the automatic mask "
                                       "is refilled from the new images")
        self.virtual_button.clicked.connect(self.recompute_virtual)
        vlay.addRow(self.virtual_button)
        self.virtual_label = QLabel("")
        self.virtual_label.setWordWrap(True)
        vlay.addRow(self.virtual_label)
        self.virtual_task: Task | None = None

        outer = QVBoxLayout(self)
        outer.addWidget(ref_box)
        outer.addWidget(mask_box)
        outer.addWidget(vd_box)
        outer.addStretch(1)
        make_scrollable(self)

        self.session.reference_changed.connect(self._show_region)
        self.session.dataset_changed.connect(self._update)
        self.session.results_changed.connect(self._update_mask_label)
        self.session.mask_changed.connect(self._update_mask_label)
        if self.session.dataset is not None:
            self.session.ensure_layers()
        self._update()

    # ------------------------------------------------------------------------------
    def _show_detector(self) -> None:
        vi = self.session.info().get("virtual")
        if vi is None:
            self.virtual_label.setText("")
            return
        outer = "detector edge" if vi.adf_outer == float("inf") else f"{vi.adf_outer:.1f}"
        self.virtual_label.setText(
            f"in use: BF radius {vi.bf_radius:.1f}, ADF {vi.adf_inner:.1f} to {outer} px "
            f"(direct beam radius {vi.beam_radius:.1f} px)")

    def recompute_virtual(self) -> Task | None:
        """Recompute the virtual images of the current file with the detector set here."""
        ds = self.session.dataset
        if ds is None:
            notify_error("open a 4D-STEM file first")
            return None
        if self.virtual_task is not None and self.virtual_task.running:
            notify_error("the virtual images are being computed already")
            return None
        inner = self.adf_inner.value() or None
        outer = self.adf_outer.value() or None
        if inner is not None and outer is not None and outer <= inner:
            notify_error(f"ADF outer radius {outer:g} must be larger than the inner {inner:g}")
            return None
        bf = self.bf_radius.value() or None

        def job(progress: Any, should_stop: Any) -> Any:
            from ..virtual import virtual_images

            return virtual_images(ds, inner=inner, outer=outer, bf_radius=bf,
                                  progress=progress, should_stop=should_stop)

        viewer = self.viewer

        def done(vi: Any) -> None:
            from .._reader import _fill_virtual

            _fill_virtual(ds, vi, viewer=getattr(viewer, "__wrapped__", viewer),
                          reset_reference=False)
            self._show_detector()
            self._update_mask_label()

        self.session.hold(ds)
        self.virtual_button.setEnabled(False)

        def ended(_status: str) -> None:
            self.session.release(ds)
            self.virtual_button.setEnabled(True)

        self.virtual_task = Task(job, "Virtual images", on_done=done, on_end=ended,
                                 error_prefix="Virtual images failed: ", viewer=viewer)
        return self.virtual_task

    def _update(self) -> None:
        region = self.session.reference_region()
        if region:
            self._show_region(region)
        elif self.session.dataset is None:
            self.region_label.setText("open a 4D-STEM file first")
        self._update_mask_label()
        self._show_detector()

    def _show_region(self, region: str) -> None:
        rs, cs = parse_region(region)
        n = (rs.stop - rs.start) * (cs.stop - cs.start)
        self.region_label.setText(f"rows {rs.start}-{rs.stop - 1}, columns {cs.start}-"
                                  f"{cs.stop - 1} ({n} positions)")
        if self.region_edit.text() != region:
            self.region_edit.setText(region)

    def _update_mask_label(self) -> None:
        mask = self.session.sample_mask()
        if mask is None:
            self.mask_label.setText("")
            return
        self.mask_label.setText(f"{int(mask.sum())} sample, {int((~mask).sum())} background "
                                "positions (1 = sample, 2 = background)")

    def _apply_typed(self) -> None:
        text = self.region_edit.text().strip()
        try:
            rs, cs = parse_region(text)
            shape = self.session.scan_shape
            if shape is None:
                raise ValueError("open a 4D-STEM file first")
            if not (0 <= rs.start < rs.stop <= shape[0] and 0 <= cs.start < cs.stop <= shape[1]):
                raise ValueError(f"region {text} is empty or outside the {shape[0]}x{shape[1]} "
                                 "scan")
        except ValueError as err:
            notify_error(str(err))
            return
        self.session.set_reference_region(text)

    def reset_reference(self) -> None:
        if self.session.dataset is None:
            notify_error("open a 4D-STEM file first")
            return
        self.session.set_reference_region(self.session.default_region())

    def fill_mask(self) -> None:
        if self.session.dataset is None:
            notify_error("open a 4D-STEM file first")
            return
        try:
            self.session.fill_mask(_SOURCES[self.source.currentText()], undoable=True)
        except ValueError as err:
            notify_error(str(err))
        self._update_mask_label()

    def _paint(self, label: int) -> None:
        layer = self.session.mask_layer(create=self.session.dataset is not None)
        if layer is None:
            notify_error("open a 4D-STEM file first")
            return
        self.viewer.layers.selection.active = layer
        layer.selected_label = label
        layer.mode = "paint"
