"""The error every reader raises for a file it cannot serve: one line naming file and problem."""

from __future__ import annotations

__all__ = ["DataError", "one_line"]


class DataError(ValueError):
    """A data file is missing, corrupt, truncated, not 4D-STEM data, or ambiguous.

    The message always names the file and the problem in one line, fit to show a user as is.
    """


def one_line(err: BaseException | str) -> str:
    """An error message as one line: its first line, continued over the next ones while a
    parenthesis or bracket is still open (HDF5 breaks its messages inside parentheses, and a
    plain first line stopped mid-sentence), whitespace collapsed; the type name when empty."""
    text = str(err).strip()
    if not text:
        return type(err).__name__ if isinstance(err, BaseException) else ""
    out: list[str] = []
    depth = 0
    for line in text.splitlines():
        if not line.strip() and not out:
            continue
        if out and (line.lstrip().startswith("Traceback") or not line.strip()):
            break  # an open parenthesis never closed: stop before a traceback or a gap
        out.append(line.strip())
        depth += sum(line.count(c) for c in "([{") - sum(line.count(c) for c in ")]}")
        if depth <= 0 or len(out) >= 4:
            break
    return " ".join(" ".join(out).split())
