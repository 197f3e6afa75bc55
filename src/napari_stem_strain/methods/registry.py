"""The one table of strain methods: name -> import path, label, colour, options.

The pipeline (:func:`~napari_stem_strain.pipeline.make_method`), the CLI's ``--method``
choices, the layer names and colours and the mapping dock's check boxes all read this table,
so adding a method is one :class:`MethodSpec`: here for the project's own, or - for another
package's - an entry point in the ``napari_stem_strain.methods`` group whose object is a
``MethodSpec``::

    [project.entry-points."napari_stem_strain.methods"]
    mine = "my_package.strain:SPEC"

Entries name their class by import path (LiberTEM's ``filetypes`` table is the model), so
reading the table imports neither torch nor py4DSTEM.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .base import BlockMethod

__all__ = ["ENTRY_POINT_GROUP", "MethodSpec", "available", "default_names", "get",
           "register", "unregister", "label", "colour"]

log = logging.getLogger(__name__)

#: The entry-point group another package adds its methods under.
ENTRY_POINT_GROUP = "napari_stem_strain.methods"

#: Options :func:`~napari_stem_strain.pipeline.make_method` may pass; a method receives those
#: its spec lists in ``options`` (the shipped model means nothing to the baseline).
KNOWN_OPTIONS = ("model", "device", "batch_size", "sample_mask", "reference")

#: Colour of a method whose spec names none (and of a name no spec knows).
FALLBACK_COLOUR = "#ff40ff"


@dataclass(frozen=True)
class MethodSpec:
    """One strain method as every front end sees it.

    ``target``: ``"package.module:Class"``, a :class:`BlockMethod` subclass, imported only when
    a method is made; ``label``: the name people read (layers, legends, tables);
    ``colour``: its line/marker colour; ``options``: which of :data:`KNOWN_OPTIONS` its
    constructor takes; ``default``: run by ``--method both`` and ticked in the dock;
    ``description``: a few words for the dock's check box and the CLI help."""

    name: str
    target: str
    label: str
    colour: str = FALLBACK_COLOUR
    options: tuple[str, ...] = ("sample_mask", "reference")
    default: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.options) - set(KNOWN_OPTIONS))
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown option(s) {unknown}; known: "
                             f"{', '.join(KNOWN_OPTIONS)}")
        if not self.name.isidentifier() or self.name in ("both", "all"):
            raise ValueError(f"method name {self.name!r} must be an identifier, not both/all")

    def load(self) -> type[BlockMethod]:
        """The method class (imports its module)."""
        module, _, attr = self.target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        if not (isinstance(cls, type) and issubclass(cls, BlockMethod)):
            raise TypeError(f"method {self.name!r}: {self.target} is not a BlockMethod class")
        return cls

    def make(self, **options: Any) -> BlockMethod:
        """A new method object, given the options it takes (the others are dropped)."""
        kw = {k: v for k, v in options.items() if k in self.options}
        method = self.load()(**kw)
        method.name = self.name  # results are filed under the registry's name
        return method


_BUILTIN = (
    MethodSpec("ae", "napari_stem_strain.methods.ccstae:CCSTAEMethod", "CC-ST-AE", "#ff8c1a",
               KNOWN_OPTIONS, default=True, description="autoencoder"),
    MethodSpec("py4dstem", "napari_stem_strain.methods.py4dstem:Py4DSTEMMethod", "py4DSTEM",
               "#20c8ff", ("sample_mask", "reference"), default=True,
               description="Bragg disks"),
)
_ADDED: dict[str, MethodSpec] = {}
_PLUGINS: dict[str, MethodSpec] | None = None


def _plugins() -> dict[str, MethodSpec]:
    """Specs from installed packages' entry points (read once; a broken one is logged and
    skipped, so one bad plugin does not take the CLI down)."""
    global _PLUGINS
    if _PLUGINS is None:
        from importlib.metadata import entry_points

        found: dict[str, MethodSpec] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                spec = ep.load()
                if not isinstance(spec, MethodSpec):
                    raise TypeError(f"{ep.value} is a {type(spec).__name__}, not a MethodSpec")
            except Exception as err:  # noqa: BLE001 - a plugin's fault, reported, not fatal
                log.warning("method plugin %r skipped: %s", ep.name, err)
                continue
            found[spec.name] = spec
        _PLUGINS = found
    return _PLUGINS


def available() -> dict[str, MethodSpec]:
    """Every method, in order: the built-in ones, then entry points, then :func:`register`'d
    ones (a later entry of the same name replaces an earlier)."""
    out = {s.name: s for s in _BUILTIN}
    out.update(_plugins())
    out.update(_ADDED)
    return out


def get(name: str) -> MethodSpec:
    """The spec of ``name``; ``ValueError`` naming the choices when there is none."""
    specs = available()
    if name not in specs:
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(specs)}")
    return specs[name]


def default_names() -> list[str]:
    """What ``both`` means: the methods run by default (the two shipped ones)."""
    return [n for n, s in available().items() if s.default]


def register(spec: MethodSpec) -> None:
    """Add (or replace) a method at run time (scripts, tests)."""
    _ADDED[spec.name] = spec


def unregister(names: str | Iterable[str]) -> None:
    for n in [names] if isinstance(names, str) else names:
        _ADDED.pop(n, None)


def label(name: str) -> str:
    spec = available().get(name)
    return spec.label if spec is not None else name


def colour(name: str) -> str:
    spec = available().get(name)
    return spec.colour if spec is not None else FALLBACK_COLOUR
