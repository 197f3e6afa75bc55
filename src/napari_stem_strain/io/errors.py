"""The error every reader raises for a file it cannot serve: one line naming file and problem."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A data file is missing, corrupt, truncated, not 4D-STEM data, or ambiguous.

    The message always names the file and the problem in one line, fit to show a user as is.
    """
