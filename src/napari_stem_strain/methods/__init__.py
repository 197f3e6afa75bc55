"""Strain methods: one module per method, sharing :mod:`.base`'s interface."""

from .base import Cancelled, MethodResult

__all__ = ["Cancelled", "MethodResult"]
