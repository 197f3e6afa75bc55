"""``stem-strain``: the command line over the core.

Each sub-command lives in its own small module exposing ``register(subparsers)``; ``main``
turns every expected failure (bad input, unwritable output, cancel) into one clear line on
stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

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
    from ..io.errors import DataError
    from ..io.results import ResultFileError
    from ..methods.base import Cancelled

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Cancelled:
        print("stem-strain: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("stem-strain: interrupted", file=sys.stderr)
        return 130
    except (DataError, ResultFileError, ValueError, OSError, KeyError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"stem-strain: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
