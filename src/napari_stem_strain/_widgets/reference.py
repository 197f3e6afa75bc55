"""Reference-region and sample-mask dock.

The reference is a rectangle in a Shapes layer (move or resize it; the maps follow at once);
the mask is a Labels layer (1 = sample, 2 = background) filled from the virtual images or from
CC-ST-AE's classifier and editable with napari's brush. All logic is in the session.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import (
    QComboBox,
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
from ._workers import notify_error

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

        outer = QVBoxLayout(self)
        outer.addWidget(ref_box)
        outer.addWidget(mask_box)
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
    def _update(self) -> None:
        region = self.session.reference_region()
        if region:
            self._show_region(region)
        elif self.session.dataset is None:
            self.region_label.setText("open a 4D-STEM file first")
        self._update_mask_label()

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
