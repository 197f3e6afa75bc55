"""The two questions the reader may have to ask: which 4D array, and what scan shape.

Kept apart from :mod:`napari_stem_strain._reader` so tests replace them (monkeypatch the
names in ``_reader``) instead of clicking modal dialogs.
"""

from __future__ import annotations

from qtpy.QtWidgets import (
    QApplication,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QInputDialog,
    QLabel,
    QMessageBox,
    QSpinBox,
)

__all__ = ["ask_dataset", "ask_overwrite", "ask_scan_shape", "factor_pairs"]


def _parent():
    app = QApplication.instance()
    return app.activeWindow() if app is not None else None


def ask_dataset(path: str, names: list[str]) -> str | None:
    """Let the user pick one of several 4D arrays of a file (``None``: cancelled)."""
    name, ok = QInputDialog.getItem(
        _parent(), "Choose the 4D-STEM data",
        f"{path}\nholds several 4D arrays. Open which one?", list(names), 0, False,
    )
    return str(name) if ok and name else None


def factor_pairs(n: int) -> list[tuple[int, int]]:
    """Every ``(rows, cols)`` with ``rows * cols == n``, most square first."""
    pairs = [(r, n // r) for r in range(1, n + 1) if n % r == 0]
    return sorted(pairs, key=lambda p: (abs(p[0] - p[1]), -p[0]))


def ask_scan_shape(path: str, n_frames: int | None, message: str = "") -> tuple[int, int] | None:
    """Ask the scan shape of a frame stack (``None``: cancelled). Proposes the most square
    factorisation of the frame count."""
    dlg = QDialog(_parent())
    dlg.setWindowTitle("Scan shape of a frame stack")
    form = QFormLayout(dlg)
    text = message or f"{path} is a stack of diffraction frames without a scan shape."
    lab = QLabel(text + "\nHow many scan rows and columns?")
    lab.setWordWrap(True)
    form.addRow(lab)
    rows, cols = QSpinBox(), QSpinBox()
    for sb in (rows, cols):
        sb.setRange(1, 1_000_000)
    if n_frames:
        r, c = factor_pairs(n_frames)[0]
        rows.setValue(r)
        cols.setValue(c)
        form.addRow(QLabel(f"{n_frames} frames"))
    form.addRow("scan rows", rows)
    form.addRow("scan columns", cols)
    buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok
                               | QDialogButtonBox.StandardButton.Cancel)
    buttons.accepted.connect(dlg.accept)
    buttons.rejected.connect(dlg.reject)
    form.addRow(buttons)
    if dlg.exec() != QDialog.DialogCode.Accepted:
        return None
    return rows.value(), cols.value()


def ask_overwrite(paths: list) -> bool:
    """Ask before replacing existing files (True: replace them)."""
    names = "\n".join(str(p) for p in paths[:6]) + ("\n..." if len(paths) > 6 else "")
    what = "This file exists" if len(paths) == 1 else f"These {len(paths)} files exist"
    answer = QMessageBox.question(
        _parent(), "Replace existing files?", f"{what}:\n{names}\n\nReplace?",
        QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
        QMessageBox.StandardButton.No)
    return answer == QMessageBox.StandardButton.Yes
