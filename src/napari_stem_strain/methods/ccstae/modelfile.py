"""The CC-ST-AE model file: one ``torch.save`` dict, validated on load.

Contents (``FORMAT_VERSION`` 1)::

    format            "napari-stem-strain/ccstae"
    format_version    1
    geometry          encoder input size n, extent (lattice units), width, band
    lattice           g1, g2 (base lattice, lattice units, (row, col)), symmetry_deg, kind
    training          what it was trained on and with which settings (free-form dict)
    state_dict        encoder weights and the two learned bases

Geometry is stored in *lattice units* (detector pixels divided by the measured length of the
shortest Bragg vector), so one file serves any pattern size or camera length; a file is refused
only when it cannot describe the data (see :meth:`Model.check_data`).
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...strain import lattice_symmetry
from .model import CCSTAE

__all__ = ["Model", "load_model", "save_model", "FORMAT", "FORMAT_VERSION", "DEFAULT_PATH"]

FORMAT = "napari-stem-strain/ccstae"
FORMAT_VERSION = 1
DEFAULT_PATH = Path(__file__).parent / "weights" / "default.pt"


@dataclass
class Model:
    """A trained CC-ST-AE: the network plus its base lattice and provenance."""

    net: CCSTAE
    g1: np.ndarray
    g2: np.ndarray
    training: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def symmetry_deg(self) -> float:
        return float(self.net.symmetry_deg)

    @property
    def lattice_kind(self) -> str:
        return {60.0: "hex", 90.0: "square"}.get(self.symmetry_deg, "rect")

    def copy(self) -> Model:
        return Model(copy.deepcopy(self.net), self.g1.copy(), self.g2.copy(),
                     copy.deepcopy(self.training), self.source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "geometry": self.net.describe(),
            "lattice": {"g1": [float(v) for v in self.g1], "g2": [float(v) for v in self.g2],
                        "symmetry_deg": self.symmetry_deg, "kind": self.lattice_kind},
            "training": self.training,
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
        }


def new_model(g1: np.ndarray, g2: np.ndarray, n: int = 32, extent: float = 2.6,
              width: int = 8, seed: int = 0) -> Model:
    """A fresh (untrained) model for the lattice ``g1, g2`` (lattice units)."""
    sym = lattice_symmetry(np.asarray(g1), np.asarray(g2), tol=0.05)
    torch.manual_seed(seed)
    net = CCSTAE(n=n, extent=extent, symmetry_deg=sym, width=width)
    return Model(net, np.asarray(g1, float), np.asarray(g2, float))


def save_model(model: Model, path: str | Path) -> Path:
    """Write ``model`` atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(model.to_dict(), tmp)
    tmp.replace(path)
    return path


def _bad(path: str, why: str) -> ValueError:
    return ValueError(f"model file {path}: {why}")


def model_from_dict(d: Any, where: str = "<memory>") -> Model:
    """Validate a loaded dict and build the :class:`Model` (ValueError, one line, if not)."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise _bad(where, "not a napari-stem-strain CC-ST-AE model")
    if d.get("format_version") != FORMAT_VERSION:
        raise _bad(where, f"format version {d.get('format_version')!r} is not the supported "
                          f"version {FORMAT_VERSION}")
    try:
        geo, lat = d["geometry"], d["lattice"]
        net = CCSTAE(n=int(geo["n"]), extent=float(geo["extent"]),
                     symmetry_deg=float(lat["symmetry_deg"]), width=int(geo["width"]),
                     band=float(geo["band"]))
        net.load_state_dict(d["state_dict"])
        g1 = np.asarray(lat["g1"], float)
        g2 = np.asarray(lat["g2"], float)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _bad(where, f"damaged or incomplete ({msg})") from None
    if g1.shape != (2,) or g2.shape != (2,) or abs(np.cross(g1, g2)) < 1e-6:
        raise _bad(where, "its base lattice is not two independent 2D vectors")
    if not all(bool(torch.isfinite(v).all()) for v in net.state_dict().values()):
        raise _bad(where, "its weights contain NaN or infinite values")
    net.eval()
    return Model(net, g1, g2, dict(d.get("training", {})), where)


def load_model(path_or_default: str | Path | Model | None = "default") -> Model:
    """Load a model file (``"default"``/``None``: the shipped weights).

    Anything that is not a CC-ST-AE model of this format version is refused with a one-line
    ``ValueError`` naming the file and the problem.
    """
    if isinstance(path_or_default, Model):
        return path_or_default
    if path_or_default is None or str(path_or_default) == "default":
        path = DEFAULT_PATH
        if not path.exists():
            raise ValueError(f"the shipped default model {path} is missing: reinstall the "
                             "package or run `stem-strain train-default`")
    else:
        path = Path(path_or_default)
    if not path.exists():
        raise _bad(str(path), "no such file")
    try:
        raw = path.read_bytes()
        d = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise _bad(str(path), f"cannot be read as a model ({type(err).__name__})") from None
    return model_from_dict(d, str(path))
