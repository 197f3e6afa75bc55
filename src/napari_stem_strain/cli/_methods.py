"""The ``--method`` choices every sub-command offers, read from the method registry."""

from __future__ import annotations

__all__ = ["method_choices", "method_help"]


def method_choices() -> tuple[str, ...]:
    """Every registered method's name, then ``both`` (the default pair) and ``all``."""
    from ..methods import registry

    return (*registry.available(), "both", "all")


def method_help(default: str) -> str:
    from ..methods import registry

    names = ", ".join(f"{n} = {s.label}" for n, s in registry.available().items())
    return (f"{names}; both = {' + '.join(registry.default_names())}; all = every method "
            f"(default: {default})")
