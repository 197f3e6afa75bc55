"""Detector and vendor formats read through RosettaSciIO with ``lazy=True``: Gatan
DigitalMicrograph ``.dm3/.dm4``, Quantum Detectors Merlin ``.mib`` and NanoMegas ASTAR
``.blo``.

RosettaSciIO hands back a dask array whose chunks are memory-mapped slices of the file, plus
HyperSpy-style axis dictionaries. Its lazy arrays put the navigation (scan) axes first in
array order, slow axis first, exactly like ``(Rx, Ry, Qx, Qy)``; the axis dictionaries'
``navigate`` / ``index_in_array`` are still checked and the array transposed (lazily) if a
reader ever returns another order.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ._formats_common import ArrayInfo, choose_array, fail, first_line, probe, square_scan, to_4d
from .dataset import Calibration, Dataset

__all__ = ["RSCIIO_FORMATS", "inspect_rsciio", "open_rsciio"]

#: suffix -> (RosettaSciIO module, format name)
RSCIIO_FORMATS: dict[str, tuple[str, str]] = {
    ".dm3": ("rsciio.digitalmicrograph", "Gatan DigitalMicrograph DM3"),
    ".dm4": ("rsciio.digitalmicrograph", "Gatan DigitalMicrograph DM4"),
    ".mib": ("rsciio.quantumdetector", "Quantum Detectors Merlin MIB"),
    ".blo": ("rsciio.blockfile", "NanoMegas ASTAR blockfile"),
}

_RECIPROCAL_HINTS = ("1/", "^-1", "-1", "\u207b\u00b9", "rad")
_LENGTH_UNITS = {"m", "mm", "um", "\u00b5m", "\u03bcm", "nm", "a", "\u00e5", "angstrom", "pm"}


def _units(u: Any) -> str:
    s = "" if u is None else str(u).strip()
    return "" if s in ("<undefined>", "<Undefined>", "t.b.d.") else s


def _reciprocal(units: str) -> bool:
    return any(h in units.lower() for h in _RECIPROCAL_HINTS)


#: suffix -> the bytes every file of that format starts with (checked before RosettaSciIO
#: parses a header of garbage into an absurd shape)
_SIGNATURES = {".mib": (b"MQ1,",), ".blo": (b"IMGBLO",)}


def _check_signature(path: Path, suffix: str, fmt: str) -> None:
    want = _SIGNATURES.get(suffix)
    if not want:
        return
    with open(path, "rb") as fh:
        head = fh.read(max(len(w) for w in want))
    if not any(head.startswith(w) for w in want):
        raise fail(path, f"not a valid {fmt} (it does not start with {want[0].decode()!r}; "
                   "wrong suffix or corrupt)")


def _read(path: Path, suffix: str, scan_shape: tuple[int, int] | None,
          used: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run the RosettaSciIO reader lazily; every failure becomes one :class:`DataError` line.
    ``used`` (a dict) receives the ``navigation_shape`` passed to the reader, if any."""
    modname, fmt = RSCIIO_FORMATS[suffix]
    _check_signature(path, suffix, fmt)
    try:
        reader = importlib.import_module(modname).file_reader
    except ImportError as err:  # pragma: no cover - rosettasciio is a hard dependency
        raise fail(path, f"reading {fmt} needs RosettaSciIO ({first_line(err)})") from err
    base: dict[str, Any] = {"lazy": True}
    if suffix == ".mib" and scan_shape is not None:
        # RosettaSciIO takes HyperSpy's (x, y) = (columns, rows) order
        base["navigation_shape"] = (int(scan_shape[1]), int(scan_shape[0]))
    elif suffix == ".mib":
        guess = _mib_navigation(path)
        if guess is not None:
            base["navigation_shape"] = guess
    if used is not None and "navigation_shape" in base:
        used["navigation_shape"] = base["navigation_shape"]
    # Chunks of whole scan rows (first axis only) so streaming row blocks reads each byte once;
    # fall back to RosettaSciIO's own chunking when the array has another dimensionality.
    attempts = [{"chunks": ("auto", -1, -1, -1)}, {"chunks": ("auto", -1, -1)}, {}]
    last: BaseException | None = None
    logger = logging.getLogger("rsciio")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        for extra in attempts:
            try:
                out = reader(str(path), **base, **extra)
                break
            except ValueError as err:
                last = err
                if "chunk" in str(err).lower() or "dimension" in str(err).lower() \
                        or "same length" in str(err).lower():
                    continue
                raise fail(path, f"cannot read as {fmt}: {first_line(err)}") from err
            except Exception as err:  # noqa: BLE001 - a reader may fail in any way on bad input
                raise fail(path, f"cannot read as {fmt} (truncated or corrupt?): "
                           f"{type(err).__name__}: {first_line(err)}") from err
        else:
            raise fail(path, f"cannot read as {fmt}: {first_line(last or 'unknown error')}")
    finally:
        logger.setLevel(level)
    if isinstance(out, dict):
        out = [out]
    return list(out)


def _mib_navigation(path: Path, max_headers: int = 4096) -> tuple[int, ...] | None:
    """The navigation shape RosettaSciIO would guess for a ``.mib`` file, found by reading at
    most ``max_headers`` frame headers with plain reads.

    RosettaSciIO's own guess touches up to 10 000 frames through a memory map, which with
    kernel read-ahead pulls gigabytes of a large file into memory. The rule is the same:
    ``Frames per Trigger`` of the ``.hdr`` when above 1 (line trigger), else the first jump in
    the frame timestamps (the fly-back at the end of the first scan line). ``None`` lets
    RosettaSciIO decide."""
    try:
        from rsciio.quantumdetector._api import MIBProperties, parse_hdr_file

        prop = MIBProperties()
        prop.parse_file(str(path))
        frame_bytes = int(prop.head_size) + int(np.prod(prop.merlin_size)) * \
            np.dtype(prop.dtype).itemsize
        n_file = (int(prop.file_size) - int(prop.offset)) // frame_bytes
        if n_file <= 0:
            return None
        n, per_trigger = n_file, 1
        hdr = path.with_suffix(".hdr")
        if hdr.is_file():
            info = parse_hdr_file(str(hdr))
            per_trigger = int(info.get("Frames per Trigger (Number)", 1))
            n = int(info.get("Frames in Acquisition (Number)", n_file)) or n_file
        width = per_trigger
        if per_trigger <= 1:
            k = min(n_file, max_headers)
            stamps = []
            with open(path, "rb") as fh:
                for i in range(k):
                    fh.seek(int(prop.offset) + i * frame_bytes)
                    head = fh.read(int(prop.head_size)).decode("ascii", "replace").split(",")
                    stamps.append(head[-4].strip().rstrip("Z"))
            times = np.array(stamps, dtype="datetime64[ns]")
            diffs = np.diff(times).astype(np.float64)
            width = 1
            if diffs.size:
                jumps = np.flatnonzero(diffs - diffs.mean() > 0)
                if jumps.size:
                    width = int(jumps[0]) + 1
        if width <= 1 or n // width < 1:
            return (n_file,)
        return (width, n // width)
    except Exception:  # noqa: BLE001 - any doubt: let RosettaSciIO guess
        return None


def _arrays(path: Path, images: list[dict[str, Any]], stream: bool) -> list[ArrayInfo]:
    out = []
    for i, im in enumerate(images):
        d = im["data"]
        name = path.name if len(images) == 1 else f"image{i}"
        out.append(ArrayInfo(name, tuple(int(s) for s in d.shape), np.dtype(d.dtype),
                             stream=stream and d.ndim == 3))
    return out


def inspect_rsciio(path: Path, suffix: str) -> tuple[str, list[ArrayInfo]]:
    """Format name and the arrays of a RosettaSciIO-read file (lazy: nothing is read)."""
    images = _read(path, suffix, None)
    return RSCIIO_FORMATS[suffix][1], _arrays(path, images, stream=suffix == ".mib")


def _nav_first(data: Any, axes: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
    """Put navigation axes first (array order), signal axes last, without reading."""
    if len(axes) != data.ndim:
        return data, axes
    order = sorted(range(len(axes)), key=lambda i: axes[i].get("index_in_array", i))
    nav = [i for i in order if axes[i].get("navigate", True)]
    sig = [i for i in order if not axes[i].get("navigate", True)]
    perm = [axes[i].get("index_in_array", i) for i in nav + sig]
    if perm != list(range(data.ndim)) and sorted(perm) == list(range(data.ndim)):
        data = data.transpose(perm)
    return data, [axes[i] for i in nav + sig]


def _calibration(axes: list[dict[str, Any]], stack: bool) -> tuple[Calibration, dict[str, Any]]:
    """Scan step from the first navigation axis (not for a reshaped frame stack, whose one
    navigation axis is a frame index) and reciprocal step from the first signal axis when its
    units are reciprocal or angular (``cm`` or ``nm`` on a diffraction axis is not a usable
    calibration)."""
    cal = Calibration()
    raw = [{k: a.get(k) for k in ("name", "size", "scale", "offset", "units")} for a in axes]
    nav = [a for a in axes if a.get("navigate", True)]
    sig = [a for a in axes if not a.get("navigate", True)]
    if nav and not stack:
        u = _units(nav[0].get("units"))
        if u and u.lower() in _LENGTH_UNITS and float(nav[0].get("scale", 1.0)) > 0:
            cal.r_pixel_size, cal.r_units = float(nav[0]["scale"]), u
    if sig:
        u = _units(sig[0].get("units"))
        if u and _reciprocal(u) and float(sig[0].get("scale", 1.0)) > 0:
            cal.q_pixel_size, cal.q_units = float(sig[0]["scale"]), u
    return cal, {"axes": raw}


def _titanx_scan(original: Any, n: int) -> tuple[int, int] | None:
    """NCEM TitanX DM stacks record ``4D STEM Tags.Scan shape X/Y`` (as py4DSTEM reads them:
    rows = Y, columns = X)."""
    found: dict[str, int] = {}

    def walk(d: Any) -> None:
        if not isinstance(d, dict):
            return
        for k, v in d.items():
            if k == "4D STEM Tags" and isinstance(v, dict):
                for kk, vv in v.items():
                    if kk.replace("_", " ") in ("Scan shape X", "Scan shape Y"):
                        try:
                            found[kk[-1]] = int(vv)
                        except (TypeError, ValueError):
                            pass
            walk(v)

    walk(original)
    if "X" in found and "Y" in found and found["X"] * found["Y"] == n:
        return found["Y"], found["X"]
    return None


def open_rsciio(path: Path, suffix: str, dataset: str | None,
                scan_shape: tuple[int, int] | None) -> Dataset:
    fmt = RSCIIO_FORMATS[suffix][1]
    used: dict[str, Any] = {}
    images = _read(path, suffix, scan_shape, used)
    if suffix == ".mib" and scan_shape is not None and len(images) == 1 \
            and int(np.prod(images[0]["data"].shape[:-2])) != scan_shape[0] * scan_shape[1]:
        # RosettaSciIO quietly drops incomplete scan lines; say what the file holds instead
        n = int(np.prod(images[0]["data"].shape[:-2]))
        full = _read(path, suffix, None)
        n = int(np.prod(full[0]["data"].shape[:-2])) if full else n
        raise fail(path, f"scan_shape {tuple(scan_shape)} has {scan_shape[0] * scan_shape[1]} "
                   f"positions but the file holds {n} frames")
    arrays = _arrays(path, images, stream=suffix == ".mib")
    chosen = choose_array(path, arrays, dataset, scan_shape, kind="image")
    im = images[arrays.index(chosen)]
    data, axes = _nav_first(im["data"], list(im.get("axes", [])))
    implied, how = None, ""
    if data.ndim == 3:
        n = int(data.shape[0])
        implied = _titanx_scan(im.get("original_metadata", {}), n)
        how = "DM 4D STEM Tags"
        nav = used.get("navigation_shape")
        if implied is None and suffix == ".mib" and nav is not None and len(nav) == 2 \
                and nav[0] > 1 and n % nav[0] == 0:
            # an interrupted acquisition: RosettaSciIO kept the complete lines, and squeezed
            # a single one away
            implied = (n // nav[0], nav[0])
            how = f"MIB header timestamps ({n // nav[0]} of {nav[1]} lines in the file)"
        if implied is None and suffix == ".mib":
            implied, how = square_scan(n), f"square scan rule ({n} frames)"
    data, origin = to_4d(path, data, "" if chosen.name == path.name else chosen.name,
                         scan_shape, implied, how)
    probe(path, data)
    cal, raw = _calibration(axes, stack=origin != "file")
    files = [str(path.resolve())]
    if suffix == ".mib":
        hdr = path.with_suffix(".hdr")
        if hdr.is_file():
            files.append(str(hdr.resolve()))
        if scan_shape is not None:
            origin = "caller"
        elif origin == "file":
            nav = used.get("navigation_shape")
            origin = "MIB header timestamps"
            if nav is not None and len(nav) == 2 and data.shape[0] < nav[1]:
                origin += f" ({data.shape[0]} of {nav[1]} lines in the file)"
    meta: dict[str, Any] = {
        "format": fmt,
        "reader": "RosettaSciIO (lazy)",
        "scan_shape_from": origin,
        "files": files,
        **raw,
    }
    title = (im.get("metadata") or {}).get("General", {}).get("title")
    if title:
        meta["title"] = str(title)
    return Dataset(data, calibration=cal, source=path, name=chosen.name, metadata=meta)
