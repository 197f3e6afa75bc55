"""Result files, as ``CONVENTIONS.md`` lays them out.

One HDF5 file per run, one group per method (``/ae``, ``/py4dstem``), each holding float32
``exx, eyy, exy, theta`` of shape ``(Rx, Ry)`` and ``A`` of shape ``(Rx, Ry, 2, 2)``, plus the raw
(un-normalised) ``A_raw`` and the ``sample`` mask so that moving the reference region later
recomputes the maps without re-running a method. A method that estimates its precision adds
``sigma_exx, sigma_eyy, sigma_exy, sigma_theta`` (one standard deviation, same units as the
map) and the raw ``A_cov`` ``(Rx, Ry, 4, 4)`` they come from (so a new reference region
recomputes them too); files without them stay valid. Attributes record the reference region, the
input file, the software version, the method's settings (JSON) and the seconds taken.

Writes go to a temporary file in the same folder that is renamed over the final name, so a
crash never leaves a half-written result under the final name; adding a method to an existing
file copies the other groups across. Writers of one file take a lock (``.NAME.lock``) and re-read
the file under it, so two processes adding groups at once both land; a killed writer's stray
``.NAME.*.tmp`` is removed by the next one. ``input_file`` is stored absolute; a new file gets the
mode the umask allows. A result file that is its own input is refused (:func:`check_not_input`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from glob import escape as glob_escape
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
    "check_not_input",
    "MAP_NAMES",
    "SIGMA_NAMES",
]

MAP_NAMES = ("exx", "eyy", "exy", "theta")
#: Dataset names of the per-position standard deviations (CONVENTIONS.md).
SIGMA_NAMES = tuple(f"sigma_{k}" for k in MAP_NAMES)


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
    #: the input file's size, mtime and block checksum when the run started (``io.stamp``)
    input_stamp: dict[str, Any] = field(default_factory=dict)
    #: covariance of ``A_raw`` (Rx, Ry, 4, 4), row-major; None: the method gave none
    A_cov: np.ndarray | None = None

    @classmethod
    def from_result(
        cls, result: Any, reference: str | tuple[slice, slice], input_file: str = ""
    ) -> MethodMaps:
        """Build from a :class:`~napari_stem_strain.methods.base.MethodResult`."""
        ref = reference if isinstance(reference, str) else format_region(reference)
        A_cov = getattr(result, "A_cov", None)
        A_cov = None if A_cov is None else np.asarray(A_cov, np.float32)
        maps = strain_maps(result.A, ref, result.symmetry_deg, mask=result.sample, A_cov=A_cov)
        # absolute: a relative name means nothing once the result is read from elsewhere
        source = os.path.abspath(input_file) if str(input_file) else ""
        return cls(result.method, maps, np.asarray(result.A, np.float32),
                   np.asarray(result.sample, bool), ref, result.symmetry_deg,
                   dict(result.settings), float(result.seconds), source, A_cov=A_cov)

    def with_reference(self, reference: str | tuple[slice, slice]) -> MethodMaps:
        """The same result seen from another reference region (no method re-run)."""
        ref = reference if isinstance(reference, str) else format_region(reference)
        maps = strain_maps(self.A_raw, ref, self.symmetry_deg, mask=self.sample,
                           A_cov=self.A_cov)
        return MethodMaps(self.method, maps, self.A_raw, self.sample, ref, self.symmetry_deg,
                          self.settings, self.seconds, self.input_file, dict(self.input_stamp),
                          self.A_cov)


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

        try:
            import resource

            limit, infinite = resource.getrlimit(resource.RLIMIT_FSIZE)[0], resource.RLIM_INFINITY
        except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
            limit, infinite = -1, -1
        if limit != infinite and 0 <= limit < needed_bytes:
            raise OSError(
                f"cannot write {path}: the file-size limit (ulimit -f) is "
                f"{limit / 2**20:.2f} MiB, about {needed_bytes / 2**20:.1f} MiB needed"
            )

        free = shutil.disk_usage(folder).free
        if free < needed_bytes:
            raise OSError(
                f"cannot write {path}: {free / 2**20:.0f} MiB free, about "
                f"{needed_bytes / 2**20:.0f} MiB needed"
            )


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` are one file (same inode: same path, a symlink, a hard link)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def check_not_input(path: str | os.PathLike, input_file: str | os.PathLike) -> None:
    """Refuse an output file ``path`` that is the input file itself (the same path, a
    symlink to it or a hard link): writing there would replace the user's data."""
    if input_file and _same_file(path, input_file):
        raise ResultFileError(
            f"{path}: this is the input file {input_file}; writing the output there would "
            "replace the input - choose another output name"
        )


def _text(name: str) -> str:
    """A file name as text HDF5 can store: bytes that are not UTF-8 (a name the system gave
    Python as surrogate escapes) are written as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _write_group(h5: h5py.File, m: MethodMaps) -> None:
    if m.method in h5:
        del h5[m.method]
    g = h5.create_group(m.method)
    for name, arr in m.maps.as_dict().items():
        g.create_dataset(name, data=np.asarray(arr, np.float32))
    g.create_dataset("A_raw", data=np.asarray(m.A_raw, np.float32))
    g.create_dataset("sample", data=np.asarray(m.sample, bool))
    if m.maps.sigma is not None:
        for k in MAP_NAMES:
            g.create_dataset(f"sigma_{k}", data=np.asarray(m.maps.sigma[k], np.float32))
    if m.A_cov is not None:
        g.create_dataset("A_cov", data=np.asarray(m.A_cov, np.float32))
    g.attrs["reference"] = m.reference
    g.attrs["symmetry_deg"] = float(m.symmetry_deg)
    g.attrs["settings"] = json.dumps(m.settings, default=str)
    g.attrs["seconds"] = float(m.seconds)
    g.attrs["input_file"] = _text(m.input_file)
    for k, v in m.input_stamp.items():
        g.attrs[f"input_{k}"] = v
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


#: How long (s) a writer waits for another writer of the same result file to finish.
LOCK_WAIT_S = 120.0


def _umask() -> int:
    """The process umask, read without changing it where the system tells it."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # elsewhere: the classic read-by-setting (restored at once)
    os.umask(old)
    return old


@contextlib.contextmanager
def _locked(path: Path, wait_s: float | None = None) -> Iterator[None]:
    """Hold the writers' lock of result file ``path`` (``.NAME.lock`` beside it).

    Every writer re-reads the file under this lock, so two processes adding method groups at
    once both land; a writer that cannot get the lock within ``wait_s`` seconds is refused
    with one line. The lock file is removed on release (checked by inode, so a writer that
    opened it just before never holds a removed one); a killed writer's lock is released by
    the system and its file reused."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no inter-process lock
        yield
        return
    import time

    wait_s = LOCK_WAIT_S if wait_s is None else wait_s
    lock = path.with_name(f".{path.name}.lock")
    t_end = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:  # another user's lock file: a read-only handle locks too
            fd = os.open(lock, os.O_RDONLY)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > t_end:
                        raise ResultFileError(
                            f"{path}: another process is writing this result file (waited "
                            f"{wait_s:.0f} s for {lock.name}); try again when it is done"
                        ) from None
                    time.sleep(0.05)
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder before us removed this lock file: take the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def _remove_stray_temporaries(path: Path) -> None:
    """Remove ``.NAME.*.tmp`` left by a writer of ``path`` that was killed (called under the
    lock, so no live writer's temporary is touched)."""
    for stray in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            stray.unlink()


def write_results(
    path: str | os.PathLike, groups: list[MethodMaps], replace: bool = False
) -> Path:
    """Write (or add to) a result file atomically. Existing groups of other methods are kept
    unless ``replace`` is True.

    Concurrent writers of one file are serialised by a lock file, and each re-reads the file
    under it, so every writer's groups land. A new file gets the mode the umask allows (a
    replaced file keeps its mode)."""
    path = Path(path)
    check_writable(path)
    for g in groups:
        check_not_input(path, g.input_file)
    with _locked(path):
        _remove_stray_temporaries(path)
        _write_locked(path, groups, replace)
    return path


def _write_locked(path: Path, groups: list[MethodMaps], replace: bool) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        try:
            mode = path.stat().st_mode & 0o7777
        except OSError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        # HDF5 builds the file in memory and Python writes the bytes: a disk that fills (or a
        # file-size limit) during the write is then a plain OSError. Straight to disk, HDF5
        # failing to flush its metadata printed "Exception ignored" tracebacks and crashed
        # the interpreter (segmentation fault) at exit.
        buf = io.BytesIO()
        with _closing_as_oserror(h5py.File(buf, "w"), path) as out:
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
                out.attrs["input_file"] = _text(groups[-1].input_file)
            out.attrs["software_version"] = f"napari-stem-strain {__version__}"
            out.attrs["layout"] = "napari-stem-strain results v1 (CONVENTIONS.md)"
        try:
            with open(tmp, "wb") as fh:
                fh.write(buf.getbuffer())
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as err:
            raise OSError(f"cannot write {path}: {err.strerror or err}") from None
        del buf
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
            sigma = None
            if all(k in g for k in SIGMA_NAMES):  # older files have none: still valid
                if any(g[k].shape != shape for k in SIGMA_NAMES):
                    raise ResultFileError(f"{path}: /{name} sigma maps are not of shape {shape}")
                sigma = {k: g[f"sigma_{k}"][()] for k in MAP_NAMES}
            A_cov = g["A_cov"][()] if "A_cov" in g and g["A_cov"].shape == (*shape, 4, 4) \
                else None
            maps = StrainMaps(*(g[k][()] for k in (*MAP_NAMES, "A")), sigma=sigma)
            A_raw = g["A_raw"][()] if "A_raw" in g else maps.A
            sample = g["sample"][()] if "sample" in g else np.isfinite(maps.exx)
            ref = str(g.attrs.get("reference", h5.attrs.get("reference", "")))
            if ref:
                parse_region(ref)
            settings = json.loads(g.attrs.get("settings", "{}"))
            out[name] = MethodMaps(
                name, maps, A_raw, sample, ref, float(g.attrs.get("symmetry_deg", 360.0)),
                settings, float(g.attrs.get("seconds", 0.0)), str(g.attrs.get("input_file", "")),
                A_cov=A_cov,
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
