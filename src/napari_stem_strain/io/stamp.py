"""Did the input file change while it was being mapped?

A file truncated, appended to or rewritten while a method reads it gives a map of two files or
of zeros past the new end - with no error from the reader. :class:`InputStamp` records the
file's identity (device, inode), size, modification time and a checksum of a few blocks (the
first and last 64 KiB and eight 4 KiB blocks spread between) when a run starts;
:meth:`InputStamp.check` compares them at the end and refuses the result with one line when
anything differs. Cheap: at most 160 KiB read, whatever the file's size.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

__all__ = ["InputStamp"]

_EDGE = 64 * 1024
_BLOCK = 4096
_SPREAD = 8


def _checksum(path: Path, size: int) -> str:
    h = hashlib.sha256()
    offsets = [0, max(0, size - _EDGE)]
    offsets += [size * (i + 1) // (_SPREAD + 1) for i in range(_SPREAD)]
    with open(path, "rb") as fh:
        for off in offsets:
            fh.seek(off)
            h.update(fh.read(_EDGE if off in offsets[:2] else _BLOCK))
    return h.hexdigest()


@dataclass(frozen=True)
class InputStamp:
    """What identifies the content of one input file at one moment."""

    path: str
    device: int
    inode: int
    size: int
    mtime_ns: int
    checksum: str

    @classmethod
    def take(cls, path: str | os.PathLike | None) -> InputStamp | None:
        """The stamp of ``path`` now; None when there is no regular file to stamp (an
        in-memory dataset, a folder of frames)."""
        if path is None or not str(path):
            return None
        p = Path(path)
        try:
            st = p.stat()
            if not p.is_file():
                return None
            return cls(str(p), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                       _checksum(p, st.st_size))
        except OSError:
            return None

    def as_attrs(self) -> dict[str, int | str]:
        """What a result file records of its input (``input_size`` ...)."""
        return {"size": self.size, "mtime_ns": self.mtime_ns, "checksum": self.checksum}

    def check(self) -> None:
        """Raise :class:`DataError` (one line) when the file is no longer what it was."""
        now = InputStamp.take(self.path)
        if now is None:
            raise DataError(f"{self.path}: the input file disappeared while it was being "
                            "mapped; the result was not written")
        what = []
        if (now.device, now.inode) != (self.device, self.inode):
            what.append("replaced by another file")
        if now.size != self.size:
            what.append(f"size {self.size} -> {now.size} bytes")
        if now.mtime_ns != self.mtime_ns:
            what.append("modified")
        if not what and now.checksum != self.checksum:
            what.append("its content differs")
        if what:
            raise DataError(f"{self.path}: the input file changed while it was being mapped "
                            f"({', '.join(what)}); the result was not written - map it again "
                            "once nothing writes to it")
