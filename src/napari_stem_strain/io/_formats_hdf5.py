"""HDF5-based formats: py4DSTEM / emdfile EMD 1.0, older py4DSTEM and Prismatic EMD 0.x,
Dectris Arina master files (frames in external data files), Velox EMD image stacks, this
project's own simulated files, and any other HDF5 file holding a 4D array.

Everything stays lazy: a plain 4D dataset is handed out as the h5py dataset itself (slicing
``data[r0:r1]`` reads those rows only); frame streams (Arina), 3D stacks and frame-last stacks
(Velox) become a :class:`~._framestack.FrameStack` over the h5py datasets, which reads runs of
consecutive frames on slicing.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._formats_common import (
    MIN_PATTERN,
    ArrayInfo,
    check_virtual_sources,
    check_written,
    choose_array,
    fail,
    first_line,
    probe,
    probe_frames,
    square_scan,
    to_4d,
)
from ._framestack import FrameList, frames_3d, frames_last
from .dataset import Calibration, Dataset

__all__ = ["open_h5", "inspect_hdf5", "open_hdf5", "is_hdf5"]

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_ARINA_LINK = re.compile(r"^data_\d+$")


def is_hdf5(path: Path) -> bool:
    """True when the file starts with (or holds at a user-block offset) the HDF5 signature."""
    try:
        import h5py

        return bool(h5py.is_hdf5(str(path)))
    except Exception:  # noqa: BLE001
        try:
            with open(path, "rb") as fh:
                return fh.read(8) == _HDF5_SIGNATURE
        except OSError:
            return False


def open_h5(path: Path) -> Any:
    """Open ``path`` read-only with h5py (compression filters registered), or raise a one-line
    :class:`DataError` saying why it is not a readable HDF5 file."""
    import h5py
    import hdf5plugin  # noqa: F401 - registers bitshuffle/LZ4 and friends (Dectris frames)

    try:
        return h5py.File(path, "r")
    except OSError as err:
        msg = str(err)
        low = msg.lower()
        if "signature" in low:
            raise fail(path, "not an HDF5 file (no HDF5 signature; wrong suffix or corrupt)") \
                from err
        if "truncated" in low or "eof" in low:
            raise fail(path, "truncated HDF5 file (shorter than its header says; "
                       "an interrupted copy or acquisition?)") from err
        raise fail(path, f"cannot open as HDF5: {first_line(err)}") from err


# --------------------------------------------------------------------------------------------
# what is in the file


@dataclass
class HDF5Info:
    """What :func:`inspect_hdf5` finds: the format's name and the candidate arrays."""

    format: str
    arrays: list[ArrayInfo] = field(default_factory=list)
    #: name -> how to open it ("h5" plain dataset, "arina" frame stream, "velox" frames last)
    kinds: dict[str, str] = field(default_factory=dict)


def _attr_str(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray) and v.shape == ():
        return _attr_str(v[()])
    return str(v)


def _numeric(dset: Any) -> bool:
    try:
        return np.dtype(dset.dtype).kind in "biuf"
    except TypeError:
        return False


def _is_arina(f: Any) -> bool:
    import h5py

    g = f.get("entry/data")
    if not isinstance(g, h5py.Group):
        return False
    names = [k for k in g.keys() if _ARINA_LINK.match(k)]
    return bool(names)


def _is_velox(f: Any) -> bool:
    if "Version" not in f or "Data" not in f:
        return False
    try:
        raw = f["Version"][()]
        text = _attr_str(raw[0] if np.ndim(raw) else raw)
        return json.loads(text).get("format", "") in ("Velox", "DevelopersKit")
    except Exception:  # noqa: BLE001
        return False


def _format_name(f: Any) -> str:
    attrs = f.attrs
    if _attr_str(attrs.get("emd_group_type", "")) == "file":
        prog = _attr_str(attrs.get("authoring_program", ""))
        major = _attr_str(attrs.get("version_major", 1))
        ver = f"{major}.{_attr_str(attrs.get('version_minor', 0))}"
        found: list[str] = []

        def visit(_name: str, obj: Any) -> None:
            if _attr_str(obj.attrs.get("python_class", "")) == "DataCube":
                found.append(_name)

        f.visititems(visit)
        who = "py4DSTEM" if found or prog == "emdfile" else (prog or "EMD")
        return f"{who} EMD {ver}"
    if "4DSTEM_simulation" in f:
        return "Prismatic EMD"
    if "4DSTEM_experiment" in f:
        return "py4DSTEM EMD 0.x"
    sv = _attr_str(attrs.get("software_version", ""))
    if sv.startswith("napari-stem-strain"):
        return "napari-stem-strain HDF5 (simulated)" if "ground_truth" in f else \
            "napari-stem-strain HDF5"
    return "HDF5"


def _walk(f: Any) -> list[ArrayInfo]:
    """Every numeric dataset reachable by hard links (external links are not followed)."""
    import h5py

    out: list[ArrayInfo] = []

    def visit(name: str, obj: Any) -> None:
        if not isinstance(obj, h5py.Dataset) or not _numeric(obj):
            return
        if name.split("/")[0] == "ground_truth":  # simulated files' true maps, never data
            return
        shape = tuple(int(s) for s in obj.shape)
        ok = len(shape) < 2 or min(shape[-2:]) >= MIN_PATTERN
        out.append(ArrayInfo("/" + name, shape, np.dtype(obj.dtype), pattern_ok=ok))

    f.visititems(visit)
    multi = [a for a in out if a.ndim >= 2]
    return multi or out


def _arina_frames(path: Path, f: Any) -> tuple[list[Any], list[str]]:
    """The Arina data datasets in order (opened through the master's external links)."""
    g = f["entry/data"]
    dsets: list[Any] = []
    files: list[str] = []
    try:
        for key in sorted(k for k in g.keys() if _ARINA_LINK.match(k)):
            link = g.get(key, getlink=True)
            target = getattr(link, "filename", None)
            try:
                # HDF5 itself would also look for a missing data file in the current directory
                # (another acquisition's frames, silently): data files are beside the master
                d = _external_dataset(path, link) if target else g[key]
            except (KeyError, OSError) as err:
                what = f"data file {target!r}" if target else f"link {key!r}"
                raise fail(path, f"Dectris master: {what} is missing or unreadable "
                           f"({first_line(err)}); keep the *_data_*.h5 files beside the "
                           "master") from err
            dsets.append(d)
            if d.ndim != 3:
                raise fail(path, f"Dectris master: {key} has shape {tuple(d.shape)}, "
                           "expected (frames, Qx, Qy)")
            if target:
                files.append(str((path.parent / target).resolve()))
        if not dsets:
            raise fail(path, "Dectris master: no data_NNNNNN links under /entry/data")
        q = {tuple(d.shape[1:]) for d in dsets}
        if len(q) > 1:
            raise fail(path, f"Dectris master: data files disagree on the frame shape "
                       f"{sorted(q)}")
    except BaseException:
        _close_data_files(f, dsets)
        raise
    return dsets, files


def _close_data_files(master: Any, dsets: list[Any]) -> None:
    for d in dsets:
        with contextlib.suppress(Exception):
            if d.file.filename != master.filename:
                d.file.close()


def _external_dataset(master: Path, link: Any) -> Any:
    """The dataset an external link of ``master`` points to, its file looked up in the
    master's folder only (an absolute link target is used as written)."""
    import h5py

    target = Path(link.filename)
    file = target if target.is_absolute() else master.parent / target
    if not file.is_file():
        raise OSError(f"no file {file}")
    h5 = h5py.File(file, "r")
    try:
        d = h5[link.path]
        if not isinstance(d, h5py.Dataset):
            raise KeyError(f"{link.path} in {target} is not an array")
    except BaseException:
        h5.close()
        raise
    return d


def _velox_stacks(f: Any) -> list[tuple[str, Any]]:
    import h5py

    out = []
    img = f.get("Data/Image")
    if not isinstance(img, h5py.Group):
        return out
    for key in img.keys():
        d = img[key].get("Data") if isinstance(img[key], h5py.Group) else None
        if isinstance(d, h5py.Dataset) and d.ndim == 3 and d.shape[2] > 1 and _numeric(d):
            out.append((f"/Data/Image/{key}/Data", d))
    return out


def inspect_hdf5(path: Path, f: Any | None = None) -> HDF5Info:
    """Format name and candidate arrays of an HDF5 file (``f``: an already open file)."""
    own = f is None
    if own:
        f = open_h5(path)
    try:
        if _is_arina(f):
            fmt = "Dectris Arina master"
            det = f.get("entry/instrument/detector/description")
            if det is not None:
                fmt = f"Dectris {_attr_str(det[()]).replace('Dectris ', '')} master"
            try:
                dsets, _ = _arina_frames(path, f)
            except Exception:  # noqa: BLE001 - listing must not need the data files
                return HDF5Info(fmt, [], {})
            n = sum(int(d.shape[0]) for d in dsets)
            a = ArrayInfo("/entry/data", (n, *map(int, dsets[0].shape[1:])),
                          np.dtype(dsets[0].dtype), stream=True)
            _close_data_files(f, dsets)
            return HDF5Info(fmt, [a], {a.name: "arina"})
        if _is_velox(f):
            arrays, kinds = [], {}
            for name, d in _velox_stacks(f):
                h, w, n = (int(s) for s in d.shape)
                arrays.append(ArrayInfo(name, (n, h, w), np.dtype(d.dtype)))
                kinds[name] = "velox"
            for a in _walk(f):
                if a.ndim == 4:
                    arrays.append(a)
                    kinds[a.name] = "h5"
            return HDF5Info("Velox EMD", arrays, kinds)
        arrays = _walk(f)
        return HDF5Info(_format_name(f), arrays, {a.name: "h5" for a in arrays})
    finally:
        if own:
            f.close()


# --------------------------------------------------------------------------------------------
# calibration

_UNCALIBRATED = {"", "pixel", "pixels", "px", "none", "[px]", "<undefined>"}


def _clean_units(units: str, prismatic: bool = False) -> str | None:
    u = units.strip()
    if prismatic:
        # Prismatic labels its axes "[n_m]" / "[n_m^-1]" but writes the values in Angstrom:
        # the Si100 example's Q step is 0.18416 = 1/5.43, i.e. 1/a(Si) in 1/A.
        u = {"[n_m]": "A", "[n_m^-1]": "A^-1"}.get(u, u)
    u = u.strip("[]")
    if u in ("A", "Ang", "angstrom", "Angstrom"):
        u = "\u00c5"  # "A" alone reads as ampere to unit libraries (pint, napari)
    return None if u.lower() in _UNCALIBRATED else u


def _scalar(v: Any) -> Any:
    v = v[()] if hasattr(v, "shape") and getattr(v, "shape", None) == () else v
    if isinstance(v, np.ndarray) and v.size == 1:
        v = v.reshape(()).item()
    return v


def _calibration_from_attrs(d: Any) -> Calibration | None:
    a = d.attrs
    keys = {k.lower(): k for k in a.keys()}
    if "r_pixel_size" not in keys and "q_pixel_size" not in keys:
        return None
    cal = Calibration()
    for axis in ("r", "q"):
        size = keys.get(f"{axis}_pixel_size")
        units = keys.get(f"{axis}_units") or keys.get(f"{axis}_pixel_units")
        if size is not None:
            try:
                setattr(cal, f"{axis}_pixel_size", float(_scalar(a[size])))
            except (TypeError, ValueError):
                pass
        if units is not None:
            setattr(cal, f"{axis}_units", _clean_units(_attr_str(a[units])))
    return cal


def _calibration_from_emd_metadata(d: Any) -> Calibration | None:
    """py4DSTEM 0.14 (emdfile): ``<root>/metadatabundle/calibration`` beside the DataCube."""
    import h5py

    node = d.parent
    while True:
        cal_group = node.get("metadatabundle/calibration")
        if isinstance(cal_group, h5py.Group):
            break
        if node.name == "/":
            return None
        node = node.parent

    def read(key: str) -> Any:
        obj = cal_group.get(key)
        return None if obj is None else _scalar(obj[()])

    cal = Calibration()
    for axis, key in (("r", "R"), ("q", "Q")):
        size, units = read(f"{key}_pixel_size"), read(f"{key}_pixel_units")
        units = None if units is None else _clean_units(_attr_str(units))
        if size is not None and units is not None:
            cal.__dict__[f"{axis}_pixel_size"] = float(size)
            cal.__dict__[f"{axis}_units"] = units
    if cal.r_pixel_size is None and cal.q_pixel_size is None:
        return None
    return cal


def _calibration_from_dims(d: Any, prismatic: bool) -> Calibration | None:
    """EMD dim vectors: ``dim0..dim3`` (EMD 1.0) or ``dim1..dim4`` (EMD 0.x, Prismatic)."""
    g = d.parent
    base = 0 if "dim0" in g else 1
    out: list[tuple[float | None, str | None]] = []
    for i in range(4):
        v = g.get(f"dim{base + i}")
        if v is None or v.ndim != 1 or v.shape[0] < 2:
            out.append((None, None))
            continue
        vals = v[:2]
        step = float(vals[1] - vals[0])
        units = _clean_units(_attr_str(v.attrs.get("units", "")), prismatic)
        out.append((step if step > 0 and units else None, units))
    if all(s is None for s, _ in out):
        return None
    return Calibration(r_pixel_size=out[0][0], r_units=out[0][1] if out[0][0] else None,
                       q_pixel_size=out[2][0], q_units=out[2][1] if out[2][0] else None)


def _calibration(d: Any, fmt: str) -> tuple[Calibration, str]:
    for how, fn in (("attributes", _calibration_from_attrs),
                    ("EMD calibration metadata", _calibration_from_emd_metadata),
                    ("EMD dim vectors", lambda x: _calibration_from_dims(x, "Prismatic" in fmt))):
        try:
            cal = fn(d)
        except Exception:  # noqa: BLE001 - calibration is best effort, never fatal
            cal = None
        if cal is not None:
            return cal, how
    return Calibration(), "none in file"


# --------------------------------------------------------------------------------------------
# Dectris Arina


def _arina_side_metadata(path: Path, n: int) -> tuple[tuple[int, int] | None, Calibration, str]:
    """Scan shape and step from the ``<name>.h5`` metadata file some Arina setups write beside
    ``<name>_master.h5`` (group ``STEM Metadata``; ``Pixel Size`` in nm, as py4DSTEM and
    RosettaSciIO read it). Returns ``(scan_shape or None, calibration, note)``."""
    import h5py

    name = path.name
    if not name.endswith("_master.h5"):
        return None, Calibration(), ""
    side = path.with_name(name[: -len("_master.h5")] + ".h5")
    if not side.is_file():
        return None, Calibration(), ""
    cal = Calibration()
    scan = None
    try:
        with h5py.File(side, "r") as f:
            grp = f.get("STEM Metadata")
            if grp is None:
                return None, cal, ""
            attrs = {re.sub(r"[\s_]", "", k.lower()): grp.attrs[k] for k in grp.attrs}
            if "pixelsize" in attrs:
                cal.r_pixel_size = float(np.ravel(attrs["pixelsize"])[0])
                cal.r_units = "nm"
            for wk, hk in (("scanwidth", "scanheight"), ("scansizex", "scansizey"),
                           ("scanshapex", "scanshapey"), ("numberofpixelsx", "numberofpixelsy"),
                           ("width", "height"), ("nx", "ny")):
                if wk in attrs and hk in attrs:
                    w = int(np.ravel(attrs[wk])[0])
                    h = int(np.ravel(attrs[hk])[0])
                    if w * h == n:
                        scan = (h, w)  # rows (Rx) = height, columns (Ry, fast) = width
                        break
    except Exception:  # noqa: BLE001 - side metadata is optional
        return None, Calibration(), ""
    return scan, cal, side.name


def _open_arina(path: Path, f: Any, scan_shape: tuple[int, int] | None,
                fmt: str) -> Dataset:
    dsets, files = _arina_frames(path, f)
    closers = [f] + [d.file for d in dsets if d.file.filename != f.filename]
    n = sum(int(d.shape[0]) for d in dsets)
    side_scan, cal, side_name = _arina_side_metadata(path, n)
    if side_scan is not None:
        implied, how = side_scan, f"Arina metadata file {side_name}"
    else:
        implied, how = square_scan(n), f"square scan rule ({n} frames)"
    frames = FrameList([frames_3d(d) for d in dsets])
    if scan_shape is None and implied is None:
        for c in closers:
            c.close()
        raise fail(path, f"Dectris master holds {n} frames, not a square scan, and no scan "
                   "shape in its metadata: give scan_shape=(Rx, Ry) (--scan-shape RX RY)")
    try:
        data, origin = to_4d(path, frames, "/entry/data", scan_shape, implied, how)
        for d in dsets:  # first and last frame of every data file
            probe_frames(path, d, f"frames of {Path(d.file.filename).name}")
    except Exception:
        for c in closers:
            c.close()
        raise
    meta: dict[str, Any] = {
        "format": fmt,
        "frames": n,
        "scan_shape_from": "caller" if origin == "caller" else origin,
        "files": [str(path.resolve()), *files] + ([str(path.with_name(side_name).resolve())]
                                                  if side_name else []),
    }
    det = f.get("entry/instrument/detector")
    if det is not None:
        for key in ("x_pixel_size", "count_time", "frame_time"):
            if key in det:
                meta[f"detector_{key}"] = float(det[key][()])
        if "detectorSpecific/compression" in det:
            meta["compression"] = _attr_str(det["detectorSpecific/compression"][()])
    ds = Dataset(data, calibration=cal, source=path, name="/entry/data", metadata=meta,
                 _closers=closers)
    return ds


# --------------------------------------------------------------------------------------------
# opening


def open_hdf5(path: Path, dataset: str | None, scan_shape: tuple[int, int] | None) -> Dataset:
    """Open the chosen array of an HDF5 file as a lazy :class:`Dataset`."""
    f = open_h5(path)
    try:
        info = inspect_hdf5(path, f)
        if info.kinds.get("/entry/data") == "arina" or (not info.arrays and _is_arina(f)):
            if dataset is not None and dataset.strip("/") not in ("entry/data", ""):
                raise fail(path, f"no array named {dataset!r} (a Dectris master holds one "
                           "frame stream, '/entry/data')")
            return _open_arina(path, f, scan_shape, info.format)
        chosen = choose_array(path, info.arrays, dataset, scan_shape)
        d = f[chosen.name]
        check_virtual_sources(path, d, f"array {chosen.name!r}")
        kind = info.kinds.get(chosen.name, "h5")
        if kind == "h5" and d.ndim == 3 and scan_shape is None and "image_nr_low" in d.attrs:
            raise fail(path, f"is a Dectris data file ({d.shape[0]} frames): open the "
                       "*_master.h5 beside it, or give scan_shape=(Rx, Ry)")
        if kind == "velox":
            data, origin = to_4d(path, FrameList([frames_last(d)]), chosen.name, scan_shape)
            probe_frames(path, d, f"array {chosen.name!r}", axis=2)
        else:
            data, origin = to_4d(path, d, chosen.name, scan_shape)
            if d.ndim == 3:
                probe_frames(path, d, f"array {chosen.name!r}")
            else:
                probe(path, data, f"array {chosen.name!r}")
        check_written(path, d, f"array {chosen.name!r}")
        cal, cal_from = _calibration(d, info.format)
        meta = {
            "format": info.format,
            "calibration_from": cal_from,
            "scan_shape_from": origin,
            "files": [str(path.resolve())],
        }
        if getattr(d, "compression", None):
            meta["compression"] = str(d.compression)
        n4 = [a.name for a in info.arrays if a.is_4d_like]
        if len(n4) > 1:
            meta["arrays"] = n4
        return Dataset(data, calibration=cal, source=path, name=chosen.name, metadata=meta,
                       _closers=[f])
    except BaseException:
        try:
            f.close()
        except Exception:  # noqa: BLE001
            pass
        raise
