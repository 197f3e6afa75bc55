"""Export dock: the result file, one TIFF per map, a PNG figure of the maps.

Exports what is shown: every method's maps relative to the current reference rectangle and
mask. Files hold the ``CONVENTIONS.md`` units (fractions, degrees); the result file is written
atomically by :func:`napari_stem_strain.io.results.write_results`, the figure is
:func:`napari_stem_strain.figures.plot_maps` (the CLI's too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..io.results import MAP_NAMES
from . import _dialogs
from ._scroll import make_scrollable
from ._session import get_session
from ._workers import notify_error, notify_info

__all__ = ["ExportWidget", "export_tiffs", "export_png", "export_h5"]


def export_h5(results: dict[str, Any], path: Path) -> list[Path]:
    from ..io.results import write_results

    return [write_results(path, list(results.values()), replace=True)]


def tiff_paths(results: dict[str, Any], folder: Path, base: str) -> list[Path]:
    return [folder / f"{base}_{name}_{comp}.tif" for name in results for comp in MAP_NAMES]


#: centimetres per unit of the scan's pixel size (TIFF resolution is per cm or per inch)
_CM_PER_UNIT = {"nm": 1e-7, "Å": 1e-8, "A": 1e-8, "angstrom": 1e-8, "pm": 1e-10,
                "um": 1e-4, "µm": 1e-4, "μm": 1e-4, "mm": 0.1}


def export_tiffs(results: dict[str, Any], folder: Path, base: str,
                 pixel_size: float | None = None, pixel_unit: str | None = None) -> list[Path]:
    """``<base>_<method>_<map>.tif`` float32, fractions (strain) and degrees (theta). The
    scan's pixel size is written as the TIFF resolution (pixels per cm, which ImageJ/Fiji and
    other readers show as a length) and in the JSON metadata."""
    import tifffile

    meta_px: dict[str, Any] = {}
    kw: dict[str, Any] = {}
    if pixel_size and pixel_unit:
        meta_px = {"pixel_size": float(pixel_size), "pixel_unit": str(pixel_unit)}
        cm = _CM_PER_UNIT.get(str(pixel_unit))
        if cm:
            per_cm = 1.0 / (float(pixel_size) * cm)
            kw = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
    out = []
    for name, m in results.items():
        for comp in MAP_NAMES:
            p = folder / f"{base}_{name}_{comp}.tif"
            tifffile.imwrite(p, np.asarray(getattr(m.maps, comp), np.float32),
                             metadata={"method": name, "map": comp,
                                       "unit": "degree" if comp == "theta" else "fraction",
                                       "reference": m.reference, **meta_px}, **kw)
            out.append(p)
    return out


def export_png(results: dict[str, Any], path: Path, truth: Any = None) -> list[Path]:
    from ..figures import plot_maps

    return [plot_maps(results, path, truth=truth, title=path.stem)]


class ExportWidget(QWidget):
    """Folder + base name, and one button per kind of export."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self.folder = QLineEdit(str(Path.cwd()))
        browse = QPushButton("...")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse)
        self.base = QLineEdit("strain")
        form = QFormLayout()
        frow = QHBoxLayout()
        frow.addWidget(self.folder)
        frow.addWidget(browse)
        form.addRow("folder", frow)
        form.addRow("file name", self.base)
        self.h5_button = QPushButton("Result file (.h5)")
        self.h5_button.clicked.connect(lambda: self.export("h5"))
        self.tif_button = QPushButton("TIFF per map")
        self.tif_button.clicked.connect(lambda: self.export("tif"))
        self.png_button = QPushButton("PNG figure")
        self.png_button.clicked.connect(lambda: self.export("png"))
        brow = QHBoxLayout()
        for b in (self.h5_button, self.tif_button, self.png_button):
            brow.addWidget(b)
        self.last = QLabel("")
        self.last.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addLayout(brow)
        lay.addWidget(self.last)
        lay.addStretch(1)
        make_scrollable(self)
        self.session.dataset_changed.connect(self._default_base)
        self._default_base()

    def _default_base(self) -> None:
        src = self.session.info().get("source")
        if src:
            self.base.setText(f"{Path(src).stem}_strain")
            self.folder.setText(str(Path(src).parent))

    def _browse(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Export folder", self.folder.text())
        if d:
            self.folder.setText(d)

    def export(self, kind: str) -> list[Path]:
        """Write one kind of export; returns the files written (``[]`` on a problem, which
        becomes a notification)."""
        results = self.session.results
        if not results:
            notify_error("nothing to export yet: run Strain mapping first")
            return []
        folder = Path(self.folder.text()).expanduser()
        base = self.base.text().strip() or "strain"
        if kind == "h5":
            targets = [folder / f"{base}.h5"]
        elif kind == "tif":
            targets = tiff_paths(results, folder, base)
        else:
            targets = [folder / f"{base}.png"]
        opened = self._open_sources()
        for target in targets:
            if _resolved(target) in opened:
                notify_error(f"Export refused: {target} is an open data file; "
                             "choose another file name")
                return []
        existing = [t for t in targets if t.exists()]
        if existing and not _dialogs.ask_overwrite(existing):
            self.last.setText("export cancelled: no file was replaced")
            return []
        try:
            if not folder.is_dir():
                raise OSError(f"folder {folder} does not exist")
            if kind == "h5":
                files = export_h5(results, folder / f"{base}.h5")
            elif kind == "tif":
                files = export_tiffs(results, folder, base, *self._pixel_size())
            else:
                files = export_png(results, folder / f"{base}.png", self.session.ground_truth)
        except (OSError, ValueError) as err:
            notify_error(f"Export failed: {str(err).splitlines()[0]}")
            return []
        names = ", ".join(f.name for f in files[:4]) + (" ..." if len(files) > 4 else "")
        self.last.setText(f"wrote {len(files)} file(s) to {folder}: {names}")
        notify_info(f"wrote {len(files)} file(s) to {folder}")
        return files

    def _pixel_size(self) -> tuple[float | None, str | None]:
        """The current scan's pixel size and unit, when the file gives one."""
        ds = self.session.dataset
        cal = getattr(ds, "calibration", None)
        size, unit = getattr(cal, "r_pixel_size", None), getattr(cal, "r_units", None)
        return (float(size), str(unit)) if size and unit else (None, None)

    def _open_sources(self) -> set[Path]:
        """The files of every dataset open in the viewer (never export over one)."""
        out = set()
        for layer in self.viewer.layers:
            info = layer.metadata.get("stem_strain") or {}
            ds = info.get("dataset")
            for src in (info.get("source"), getattr(ds, "source", None)):
                if src:
                    out.add(_resolved(Path(src)))
        return out


def _resolved(path: Path) -> Path:
    try:
        return path.expanduser().resolve()
    except OSError:
        return path.expanduser().absolute()
