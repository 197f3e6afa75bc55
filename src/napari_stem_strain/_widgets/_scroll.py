"""Docks that fit small screens: a dock's content scrolls instead of fixing its height.

napari stacks the docks of one side on top of each other, so the window cannot get smaller
than the sum of their minimum heights (four docks: 1377 px - no laptop screen). Inside a
scroll area each dock's minimum is a few rows; the user scrolls a dock made small.
"""

from __future__ import annotations

from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import QFrame, QScrollArea, QVBoxLayout, QWidget

__all__ = ["make_scrollable"]

#: the least height a dock keeps (its first rows stay readable; four docks and their title
#: bars still fit an 800 px high window)
MIN_HEIGHT = 120
#: the most width a dock asks for (napari gives the dock column its widest dock's wish; the
#: canvas gets the rest)
PREFERRED_WIDTH = 380


class _Scroll(QScrollArea):
    def sizeHint(self) -> QSize:  # noqa: N802 - Qt's name
        # the whole content's height (Qt caps a scroll area's wish at 24 text lines, and the
        # dock column then squeezes a long dock to its minimum), at most PREFERRED_WIDTH wide
        hint = super().sizeHint()
        inner = self.widget()
        height = inner.sizeHint().height() + 2 * self.frameWidth() if inner else hint.height()
        return QSize(min(hint.width(), PREFERRED_WIDTH), max(height, hint.height()))


def make_scrollable(widget: QWidget, footer: QWidget | None = None) -> QScrollArea:
    """Move ``widget``'s layout (and its children) into a scroll area that fills ``widget``;
    ``footer`` (e.g. the Run button) stays in view under it."""
    inner = QWidget()
    inner.setLayout(widget.layout())  # Qt takes the layout off ``widget``
    scroll = _Scroll()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
    scroll.setWidget(inner)
    scroll.setMinimumHeight(MIN_HEIGHT)
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(scroll, 1)
    if footer is not None:
        outer.addWidget(footer)
    return scroll
