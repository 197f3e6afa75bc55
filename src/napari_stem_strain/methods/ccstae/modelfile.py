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
    try:
        torch.save(model.to_dict(), tmp)
        tmp.replace(path)
    except (OSError, RuntimeError) as err:  # disk full, no permission: one line, no temporary
        tmp.unlink(missing_ok=True)
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(f"cannot write the model file {path}: {msg}") from None
    return path


def _bad(path: str, why: str) -> ValueError:
    return ValueError(f"model file {path}: {why}")


#: Accepted ranges of the geometry (a file outside them is damaged or not ours; the bounds
#: also keep an absurd ``n`` or ``width`` from allocating gigabytes before it is refused).
N_RANGE = (8, 512)
WIDTH_RANGE = (1, 256)
EXTENT_RANGE = (0.1, 100.0)
BAND_RANGE = (0.0, 1.0)  # exclusive: scales 1 + band tanh must stay positive
SYMMETRIES = (60.0, 90.0, 180.0)


def _number(where: str, what: str, value: Any, lo: float, hi: float,
            integer: bool = False, open_low: bool = False, open_high: bool = False) -> float:
    """``value`` as a finite number in ``[lo, hi]`` (ends open when asked), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _bad(where, f"{what} is {value!r}, not a number")
    v = float(value)
    if integer and np.isfinite(v) and v != int(v):
        raise _bad(where, f"{what} is {value!r}, not a whole number")
    if (not np.isfinite(v) or v < lo or v > hi or (open_low and v == lo)
            or (open_high and v == hi)):
        lb, hb = "(" if open_low else "[", ")" if open_high else "]"
        raise _bad(where, f"{what} is {value!r}, outside {lb}{lo:g}, {hi:g}{hb}")
    return v


def _vector(where: str, what: str, value: Any) -> np.ndarray:
    try:
        v = np.asarray(value, float)
    except (TypeError, ValueError):
        raise _bad(where, f"its lattice vector {what} is {value!r}, not two numbers") from None
    if v.shape != (2,):
        raise _bad(where, f"its lattice vector {what} is {value!r}, not two numbers")
    if not np.isfinite(v).all():
        raise _bad(where, f"its lattice vector {what} = {v.tolist()} is not finite")
    return v


def _check_dict(d: dict, where: str) -> tuple[dict, np.ndarray, np.ndarray, dict]:
    """Every field checked before anything is built: ``(geometry, g1, g2, training)``."""
    geo, lat, state = d.get("geometry"), d.get("lattice"), d.get("state_dict")
    for name, v in (("geometry", geo), ("lattice", lat), ("state_dict", state)):
        if not isinstance(v, dict):
            raise _bad(where, f"damaged or incomplete ({name} is "
                              f"{'missing' if v is None else type(v).__name__})")
    training = d.get("training", {})
    if not isinstance(training, dict):
        raise _bad(where, f"its training record is a {type(training).__name__}, not a dict")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _bad(where, "damaged or incomplete (state_dict holds something else than tensors)")
    try:
        n = _number(where, "geometry n", geo["n"], *N_RANGE, integer=True)
        width = _number(where, "geometry width", geo["width"], *WIDTH_RANGE, integer=True)
        extent = _number(where, "geometry extent", geo["extent"], *EXTENT_RANGE)
        band = _number(where, "geometry band", geo["band"], *BAND_RANGE,
                       open_low=True, open_high=True)
        sym = lat["symmetry_deg"]
        g1, g2 = _vector(where, "g1", lat["g1"]), _vector(where, "g2", lat["g2"])
    except KeyError as err:
        raise _bad(where, f"damaged or incomplete (no {err.args[0]!r})") from None
    if int(n) % 8:
        raise _bad(where, f"geometry n is {int(n)}, not a multiple of 8")
    if isinstance(sym, bool) or not isinstance(sym, (int, float, np.integer, np.floating)) \
            or float(sym) not in SYMMETRIES:
        raise _bad(where, f"symmetry_deg is {sym!r}, not one of 60 (hexagonal), 90 (square), "
                          "180 (any other lattice)")
    n1, n2 = float(np.linalg.norm(g1)), float(np.linalg.norm(g2))
    if not (n1 > 1e-6 and n2 > 1e-6) or abs(float(np.cross(g1, g2))) < 1e-6 * n1 * n2 \
            or max(n1, n2) > 1e6 * min(n1, n2):
        raise _bad(where, "its base lattice is not two independent 2D vectors")
    if lattice_symmetry(g1, g2, tol=0.05) != float(sym):
        raise _bad(where, f"symmetry_deg {float(sym):g} does not match its lattice g1 = "
                          f"{g1.tolist()}, g2 = {g2.tolist()} (symmetry "
                          f"{lattice_symmetry(g1, g2, tol=0.05):g})")
    # the weights must have the shapes this geometry implies: checked on the stored tensors,
    # so nothing of the declared size is allocated first
    w, k = int(width), int(n) // 8
    expect = {"base": (2, int(n), int(n)), "features.0.weight": (w, 1, 3, 3),
              "head.1.weight": (64, 2 * w * k * k)}
    for key, shape in expect.items():
        got = state.get(key)
        if got is None:
            raise _bad(where, f"damaged or incomplete (its weights lack {key!r})")
        if tuple(got.shape) != shape:
            raise _bad(where, f"its weights do not match its geometry (n {int(n)}, width {w}: "
                              f"{key} should be {shape}, is {tuple(got.shape)})")
    geometry = {"n": int(n), "width": w, "extent": extent, "band": band,
                "symmetry_deg": float(sym)}
    return geometry, g1, g2, training


def model_from_dict(d: Any, where: str = "<memory>") -> Model:
    """Validate a loaded dict and build the :class:`Model` (ValueError, one line, if not)."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise _bad(where, "not a napari-stem-strain CC-ST-AE model")
    if d.get("format_version") != FORMAT_VERSION:
        raise _bad(where, f"format version {d.get('format_version')!r} is not the supported "
                          f"version {FORMAT_VERSION}")
    geo, g1, g2, training = _check_dict(d, where)
    try:
        net = CCSTAE(n=geo["n"], extent=geo["extent"], symmetry_deg=geo["symmetry_deg"],
                     width=geo["width"], band=geo["band"])
        net.load_state_dict(d["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _bad(where, f"damaged or incomplete ({msg})") from None
    if not all(bool(torch.isfinite(v).all()) for v in net.state_dict().values()):
        raise _bad(where, "its weights contain NaN or infinite values")
    net.eval()
    return Model(net, g1, g2, dict(training), where)


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
