"""Where compute device choice lives: one function the CLI, the widgets and workers share."""

from __future__ import annotations

__all__ = ["available_devices", "resolve_device"]


def available_devices() -> list[str]:
    """Devices this machine can run on, best first (``"cuda"`` only when torch sees one)."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.insert(0, "cuda")
    return devices


def resolve_device(choice: str = "auto") -> str:
    """Turn ``auto|cpu|cuda`` into a concrete torch device string.

    ``auto`` picks CUDA when present; asking for ``cuda`` on a machine without one is an error
    with a plain message rather than a torch traceback.
    """
    choice = (choice or "auto").lower()
    if choice not in {"auto", "cpu", "cuda"}:
        raise ValueError(f"device {choice!r} is not one of auto, cpu, cuda")
    have = available_devices()
    if choice == "auto":
        return have[0]
    if choice == "cuda" and "cuda" not in have:
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU on this machine")
    return choice
