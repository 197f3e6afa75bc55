"""``stem-strain``: the command line over the core.

Each sub-command lives in its own small module exposing ``register(subparsers)``; ``main``
turns every expected failure (bad input, unwritable output, cancel) into one clear line on
stderr and a non-zero exit status (2), never a traceback. An unexpected failure - a bug - is
one line too (exit status 3) naming the command, the file and the error;
``STEM_STRAIN_DEBUG=1`` lets its traceback through, and numerical ``RuntimeWarning``s, which
are otherwise silenced.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from .. import __version__

__all__ = ["main", "build_parser"]

_COMMANDS = ("simulate", "info", "map", "fit", "compare", "demo", "train_default")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stem-strain",
        description="Strain and rotation maps from 4D-STEM data: CC-ST-AE and py4DSTEM.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``stem-strain``; returns the exit status."""
    from ..io.errors import DataError, one_line
    from ..io.results import ResultFileError
    from ..methods.base import Cancelled

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            if not os.environ.get("STEM_STRAIN_DEBUG"):
                # numerical RuntimeWarnings of numpy/torch (a NaN in a degenerate pattern) are
                # no message a user can act on: stderr keeps to the one line that matters
                warnings.filterwarnings("ignore", category=RuntimeWarning)
            return int(args.func(args) or 0)
    except Cancelled:
        print("stem-strain: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("stem-strain: interrupted", file=sys.stderr)
        return 130
    except (DataError, ResultFileError, ValueError, OSError, KeyError) as err:
        msg = one_line(err)
        path = getattr(args, "file", None)
        if path is not None and Path(str(path)).name not in msg:
            msg = f"{args.command}{_on(args)}: {msg}"  # say which file the refusal is about
        print(f"stem-strain: error: {msg}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"stem-strain: error: {args.command}{_on(args)}: out of memory", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the last net: one line, never a traceback
        if os.environ.get("STEM_STRAIN_DEBUG"):
            raise
        msg = one_line(str(err))
        print(f"stem-strain: error: {args.command}{_on(args)} failed unexpectedly "
              f"({type(err).__name__}{': ' + msg if msg else ''}); please report it - "
              "STEM_STRAIN_DEBUG=1 shows the traceback", file=sys.stderr)
        return 3


def _on(args: argparse.Namespace) -> str:
    """`` on FILE`` for a command that reads one."""
    path = getattr(args, "file", None)
    return f" on {path}" if path else ""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
