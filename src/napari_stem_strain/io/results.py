"""Result files, as ``CONVENTIONS.md`` lays them out.

One HDF5 file per run, one group per method (``/ae``, ``/py4dstem``), each holding float32
``exx, eyy, exy, theta`` of shape ``(Rx, Ry)`` and ``A`` of shape ``(Rx, Ry, 2, 2)``, plus the raw
(un-normalised) ``A_raw`` and the ``sample`` mask so that moving the reference region later
recomputes the maps without re-running a method. Attributes record the reference region, the
input file, the software version, the method's settings (JSON) and the seconds taken.

Writes go to a temporary file in the same folder that is renamed over the final name, so a
crash never leaves a half-written result under the final name; adding a method to an existing
file copies the other groups across.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from ..strain import StrainMaps, format_region, parse_region, strain_maps

__all__ = [
    "MethodMaps",
    "write_results",
    "read_results",
    "ResultFileError",
    "check_writable",
    "MAP_NAMES",
]

MAP_NAMES = ("exx", "eyy", "exy", "theta")


class ResultFileError(ValueError):
    """A result file is missing, unreadable or does not follow the layout."""


@dataclass
class MethodMaps:
    """One method's group of a result file."""

    method: str
    maps: StrainMaps
    A_raw: np.ndarray
    sample: np.ndarray
    reference: str
    symmetry_deg: float = 360.0
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    input_file: str = ""

    @classmethod
    def from_result(
        cls, result: Any, reference: str | tuple[slice, slice], input_file: str = ""
    ) -> MethodMaps:
        """Build from a :class:`~napari_stem_strain.methods.base.MethodResult`."""
        ref = reference if isinstance(reference, str) else format_region(reference)
        maps = strain_maps(result.A, ref, result.symmetry_deg, mask=result.sample)
        return cls(result.method, maps, np.asarray(result.A, np.float32),
                   np.asarray(result.sample, bool), ref, result.symmetry_deg,
                   dict(result.settings), float(result.seconds), str(input_file))

    def with_reference(self, reference: str | tuple[slice, slice]) -> MethodMaps:
        """The same result seen from another reference region (no method re-run)."""
        ref = reference if isinstance(reference, str) else format_region(reference)
        maps = strain_maps(self.A_raw, ref, self.symmetry_deg, mask=self.sample)
        return MethodMaps(self.method, maps, self.A_raw, self.sample, ref, self.symmetry_deg,
                          self.settings, self.seconds, self.input_file)


def check_writable(path: str | os.PathLike, needed_bytes: int = 0) -> None:
    """Fail *before* the work when the output cannot be written (missing folder, no permission,
    not enough free space)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OSError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OSError(f"cannot write {path}: no permission to write in {folder}")
    if path.exists() and not os.access(path, os.W_OK):
        raise OSError(f"cannot write {path}: the file is read-only")
    if needed_bytes:
        import shutil

        free = shutil.disk_usage(folder).free
        if free < needed_bytes:
            raise OSError(
                f"cannot write {path}: {free / 2**20:.0f} MiB free, about "
                f"{needed_bytes / 2**20:.0f} MiB needed"
            )


def _write_group(h5: h5py.File, m: MethodMaps) -> None:
    if m.method in h5:
        del h5[m.method]
    g = h5.create_group(m.method)
    for name, arr in m.maps.as_dict().items():
        g.create_dataset(name, data=np.asarray(arr, np.float32))
    g.create_dataset("A_raw", data=np.asarray(m.A_raw, np.float32))
    g.create_dataset("sample", data=np.asarray(m.sample, bool))
    g.attrs["reference"] = m.reference
    g.attrs["symmetry_deg"] = float(m.symmetry_deg)
    g.attrs["settings"] = json.dumps(m.settings, default=str)
    g.attrs["seconds"] = float(m.seconds)
    g.attrs["input_file"] = m.input_file
    g.attrs["software_version"] = f"napari-stem-strain {__version__}"


def _raised_by_h5py(err: BaseException) -> bool:
    """True when the innermost frame of ``err`` lies inside h5py (the HDF5 library failing to
    write: disk full, file-size limit), not in our code or a caller's."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and f"{os.sep}h5py{os.sep}" in frames[-1].filename


@contextlib.contextmanager
def _closing_as_oserror(h5: h5py.File, path: Path) -> Iterator[h5py.File]:
    """Close ``h5`` on the way out. HDF5 reports a failed write or flush (disk full, file-size
    limit) as RuntimeError; those become the OSError every caller expects from a write."""
    try:
        yield h5
        h5.close()
    except RuntimeError as err:
        with contextlib.suppress(Exception):
            h5.close()
        if _raised_by_h5py(err):
            raise OSError(f"cannot write {path}: {str(err).splitlines()[0]}") from err
        raise
    except BaseException:
        with contextlib.suppress(Exception):
            h5.close()
        raise


def write_results(
    path: str | os.PathLike, groups: list[MethodMaps], replace: bool = False
) -> Path:
    """Write (or add to) a result file atomically. Existing groups of other methods are kept
    unless ``replace`` is True."""
    path = Path(path)
    check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        with _closing_as_oserror(h5py.File(tmp, "w"), path) as out:
            if path.exists() and not replace:
                try:
                    with h5py.File(path, "r") as old:
                        for name in old:
                            if name not in {g.method for g in groups}:
                                old.copy(name, out)
                        for k, v in old.attrs.items():
                            out.attrs[k] = v
                except OSError as err:
                    raise ResultFileError(
                        f"{path}: existing file is not readable HDF5 ({err})"
                    ) from err
            for m in groups:
                _write_group(out, m)
            if groups:
                out.attrs["reference"] = groups[-1].reference
                out.attrs["input_file"] = groups[-1].input_file
            out.attrs["software_version"] = f"napari-stem-strain {__version__}"
            out.attrs["layout"] = "napari-stem-strain results v1 (CONVENTIONS.md)"
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_results(path: str | os.PathLike) -> dict[str, MethodMaps]:
    """Read every method group of a result file, validating the layout."""
    path = Path(path)
    if not path.exists():
        raise ResultFileError(f"{path}: no such result file")
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        raise ResultFileError(f"{path}: not a readable HDF5 result file ({err})") from err
    out: dict[str, MethodMaps] = {}
    with h5:
        for name, g in h5.items():
            if not isinstance(g, h5py.Group) or "exx" not in g:
                continue
            missing = [k for k in (*MAP_NAMES, "A") if k not in g]
            if missing:
                raise ResultFileError(f"{path}: group /{name} lacks {', '.join(missing)}")
            shape = g["exx"].shape
            if len(shape) != 2:
                raise ResultFileError(f"{path}: /{name}/exx is not a 2D (Rx, Ry) map")
            for k in MAP_NAMES:
                if g[k].shape != shape:
                    raise ResultFileError(
                        f"{path}: /{name}/{k} has shape {g[k].shape}, not {shape}"
                    )
            if g["A"].shape != (*shape, 2, 2):
                raise ResultFileError(f"{path}: /{name}/A has shape {g['A'].shape}")
            maps = StrainMaps(*(g[k][()] for k in (*MAP_NAMES, "A")))
            A_raw = g["A_raw"][()] if "A_raw" in g else maps.A
            sample = g["sample"][()] if "sample" in g else np.isfinite(maps.exx)
            ref = str(g.attrs.get("reference", h5.attrs.get("reference", "")))
            if ref:
                parse_region(ref)
            settings = json.loads(g.attrs.get("settings", "{}"))
            out[name] = MethodMaps(
                name, maps, A_raw, sample, ref, float(g.attrs.get("symmetry_deg", 360.0)),
                settings, float(g.attrs.get("seconds", 0.0)), str(g.attrs.get("input_file", "")),
            )
    if not out:
        raise ResultFileError(f"{path}: holds no method group (/ae, /py4dstem, ...)")
    return out


def _same_input(recorded: str, input_file: str | os.PathLike) -> bool:
    try:
        if os.path.exists(recorded) and os.path.exists(input_file):
            return os.path.samefile(recorded, input_file)
        return Path(recorded).resolve() == Path(input_file).resolve()
    except (OSError, ValueError):
        return False


def check_adds_to_own_results(path: str | os.PathLike, input_file: str | os.PathLike,
                              hint: str = "") -> None:
    """Refuse to add results of ``input_file`` to an existing file ``path`` unless it is a
    result file of that same input (``write_results`` keeps the groups already there, so a
    file of another input would silently mix two datasets' maps). ``hint`` ends the message."""
    path = Path(path)
    if not path.exists():
        return
    recorded: set[str] = set()
    try:
        with h5py.File(path, "r") as h5:
            groups = [g for g in h5.values() if isinstance(g, h5py.Group) and "exx" in g]
            is_result = bool(groups) or str(h5.attrs.get("layout", "")).startswith(
                "napari-stem-strain results")
            recorded = {str(h5.attrs.get("input_file", ""))}
            recorded |= {str(g.attrs.get("input_file", "")) for g in groups}
    except OSError:
        is_result = False
    tail = f": {hint}" if hint else ""
    if not is_result:
        raise ResultFileError(f"{path} exists and is not a napari-stem-strain result file{tail}")
    recorded.discard("")
    other = sorted(r for r in recorded if not _same_input(r, input_file))
    if not recorded:
        raise ResultFileError(f"{path} records no input file, so its results may be of another "
                              f"dataset than {input_file}{tail}")
    if other:
        raise ResultFileError(f"{path} holds results of {other[0]}, not of {input_file}{tail}")
