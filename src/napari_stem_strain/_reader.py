"""napari reader: a 4D-STEM file opens as its virtual bright-field (and annular dark-field)
image, with the real-space scale of the scan; the 4D data stay lazy on disk.

The :class:`~napari_stem_strain.io.dataset.Dataset` rides along in the navigation layer's
``metadata["stem_strain"]`` (with the virtual images and any ground truth), which is where the
docks find it. Asking which array (files with several 4D arrays) and which scan shape (3D frame
stacks) goes through :func:`ask_dataset` / :func:`ask_scan_shape`, module attributes that tests
replace. A file that cannot be read becomes one napari error notification naming the file and
the problem - never a traceback.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .io.errors import DataError
from .io.results import ResultFileError

__all__ = ["napari_get_reader", "read_4dstem", "dataset_layers", "open_interactively",
           "ask_dataset", "ask_scan_shape"]

log = logging.getLogger(__name__)

#: Suffixes the manifest registers (kept in step with ``io.readers.SUPPORTED_SUFFIXES``).
_FALLBACK_SUFFIXES = (".h5", ".hdf5", ".hdf", ".emd", ".mib", ".blo", ".dm3", ".dm4", ".npy")

LayerData = tuple[Any, ...]


def ask_dataset(path: str, names: list[str]) -> str | None:
    """Which of several 4D arrays to open (a Qt dialog; tests monkeypatch this name)."""
    from ._widgets._dialogs import ask_dataset as dialog

    return dialog(path, names)


def ask_scan_shape(path: str, n_frames: int | None, message: str = "") -> tuple[int, int] | None:
    """The scan shape of a frame stack (a Qt dialog; tests monkeypatch this name)."""
    from ._widgets._dialogs import ask_scan_shape as dialog

    return dialog(path, n_frames, message)


def _suffixes() -> tuple[str, ...]:
    try:
        from .io.readers import SUPPORTED_SUFFIXES

        # .hdr: a Merlin header dropped by mistake gets a message naming its .mib
        return (*(s.lower() for s in SUPPORTED_SUFFIXES), ".hdr")
    except ImportError:  # readers not installed in this build
        return _FALLBACK_SUFFIXES


def napari_get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """Return :func:`read_4dstem` for one file with a supported suffix, else ``None`` (so napari
    offers the file to other readers)."""
    if isinstance(path, list | tuple):
        if len(path) != 1:
            return None
        path = path[0]
    name = str(path).lower()
    if any(name.endswith(s) for s in _suffixes()):
        return read_4dstem
    return None


def _needs_scan_shape(message: str) -> bool:
    m = message.lower()
    return "scan_shape" in m or "scan shape" in m


def _frame_count(message: str) -> int | None:
    m = re.search(r"(\d+)\s+(?:frames|patterns|diffraction)", message)
    return int(m.group(1)) if m else None


def open_interactively(path: str) -> Any | None:
    """Open ``path`` lazily, asking the user whatever the file does not say.

    Returns ``None`` when the user cancels a question; raises :class:`DataError` otherwise.
    """
    from .io.readers import list_4d_arrays, open_dataset

    dataset: str | None = None
    scan_shape: tuple[int, int] | None = None
    names = list_4d_arrays(path)
    if len(names) > 1:  # open_dataset would take the largest: let the user choose
        dataset = ask_dataset(str(path), names)
        if dataset is None:
            return None
    for _ in range(3):
        try:
            ds = open_dataset(path, dataset=dataset, scan_shape=scan_shape)
            if dataset is not None:
                ds.metadata["chosen_by_user"] = True
            return ds
        except DataError as err:
            msg = str(err)
            if scan_shape is None and _needs_scan_shape(msg):
                scan_shape = ask_scan_shape(str(path), _frame_count(msg),
                                            for_people(short_message(msg, path)))
                if scan_shape is None:
                    return None
                continue
            raise
    raise DataError(f"{path}: could not be opened with the answers given")


#: last path parts that name no particular array (the part above tells arrays apart)
_GENERIC_PARTS = {"data", "datacube", "array", "signal", "dataset"}


def array_label(name: str) -> str:
    """A short name for an array of a file: its last path part, or the one above when that
    is generic (two depths of a Prismatic file are ``.../CBED_array_depth0000/datacube`` and
    ``.../CBED_array_depth0001/datacube``)."""
    parts = [p for p in name.strip("/").split("/") if p]
    while len(parts) > 1 and parts[-1].lower() in _GENERIC_PARTS:
        parts.pop()
    return parts[-1] if parts else name


def for_people(message: str) -> str:
    """A reader message without the Python API's and the command line's hints
    (``give scan_shape=(Rx, Ry) (--scan-shape RX RY)``): the plugin asks instead."""
    message = re.sub(r"[:;,]?\s*(or\s+)?give scan_shape=\(Rx, Ry\)(\s*\(--scan-shape RX RY\))?",
                     "", message)
    return message.strip()


def _units_ok(units: str | None) -> bool:
    if not units:
        return False
    try:
        import pint

        pint.get_application_registry().Unit(units)
        return True
    except Exception:  # noqa: BLE001 - any unit napari cannot parse is left out
        return False


#: Datasets larger than this compute their virtual images in a background worker: the viewer
#: opens at once with blank images that fill in when the streamed pass is done.
BACKGROUND_BYTES = 512 * 2**20


def dataset_layers(ds: Any, ground_truth: Any = None, label: str | None = None,
                   background: bool | None = None) -> list[LayerData]:
    """Layer data of an opened dataset: annular dark field, then bright field on top (the
    navigation image, carrying the dataset). Layers are named after the file (``label``
    overrides), plus the array's name when the user chose one of several.

    ``background`` (default: larger than :data:`BACKGROUND_BYTES`) returns blank images at once
    and streams the virtual images in a worker with a progress bar and Cancel.
    """
    import numpy as np

    from .virtual import virtual_images

    if background is None:
        background = ds.nbytes > BACKGROUND_BYTES
    if background:
        vi = None
        bf_data = df_data = np.zeros(ds.scan_shape, np.float32)
    else:
        vi = virtual_images(ds)
        bf_data, df_data = vi.bright_field, vi.dark_field
    cal = ds.calibration
    step = float(cal.r_pixel_size) if cal.r_pixel_size else 1.0
    common: dict[str, Any] = {"scale": (step, step)}
    if cal.r_pixel_size and _units_ok(cal.r_units):
        common["units"] = (cal.r_units, cal.r_units)
    if label is None:
        label = Path(ds.source).stem if ds.source else (ds.name or "4D-STEM")
        if ds.metadata.get("chosen_by_user") and ds.name:
            label = f"{label} {array_label(ds.name)}"
    info = {"role": "navigation", "dataset": ds, "virtual": vi, "ground_truth": ground_truth,
            "source": str(ds.source or "")}
    adf = (df_data, {**common, "name": f"{label} ADF", "colormap": "gray", "visible": False,
                     "metadata": {"stem_strain": {"role": "virtual", "kind": "ADF",
                                                  "dataset": ds}}},
           "image")
    bf = (bf_data, {**common, "name": f"{label} BF", "colormap": "gray",
                    "metadata": {"stem_strain": info}}, "image")
    from ._widgets._workers import call_soon

    if background:
        call_soon(lambda: _virtual_in_background(ds))
    if "units" in common:  # a calibrated scan: show napari's scale bar once the layers are in
        call_soon(_show_scale_bar)
    return [adf, bf]


def _show_scale_bar() -> None:
    import napari

    viewer = napari.current_viewer()
    if viewer is not None:
        scale_bar(viewer).visible = True


def scale_bar(viewer: Any) -> Any:
    """napari's scale bar overlay (``viewer.canvas.overlays`` since 0.9, ``viewer.scale_bar``
    before)."""
    overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)
    bar = getattr(overlays, "scale_bar", None) if overlays is not None else None
    return bar if bar is not None else viewer.scale_bar


def _virtual_in_background(ds: Any) -> Any:
    """Stream the virtual images of ``ds`` in a worker; fill the layers when done."""
    from ._widgets._workers import Task
    from .virtual import virtual_images

    def job(progress: Any, should_stop: Any) -> Any:
        return virtual_images(ds, progress=progress, should_stop=should_stop)

    import napari

    return Task(job, "Virtual images", on_done=lambda vi: _fill_virtual(ds, vi),
                error_prefix=f"{Path(str(ds.source or 'data')).name}: virtual images failed: ",
                viewer=napari.current_viewer())


def _fill_virtual(ds: Any, vi: Any, viewer: Any = None, reset_reference: bool = True) -> None:
    """Put finished virtual images into every layer of ``ds`` and refresh the mask (and, with
    ``reset_reference``, the default reference rectangle)."""
    import napari

    from ._widgets._session import existing_session

    viewer = viewer if viewer is not None else napari.current_viewer()
    if viewer is None:
        return
    for layer in viewer.layers:
        info = layer.metadata.get("stem_strain") or {}
        if info.get("dataset") is not ds:
            continue
        if info.get("role") == "navigation":
            info["virtual"] = vi
            layer.data = vi.bright_field
            layer.reset_contrast_limits()
        elif info.get("kind") == "ADF":
            layer.data = vi.dark_field
            layer.reset_contrast_limits()
    session = existing_session(viewer)
    if session is not None and session.dataset is ds:
        session.fill_mask("virtual")
        if reset_reference:
            session.set_reference_region(session.default_region())


def read_4dstem(path: str | list[str]) -> list[LayerData]:
    """The reader napari calls. Errors become a notification and no layer."""
    from napari.utils.notifications import show_error

    if isinstance(path, list | tuple):
        path = path[0]
    try:
        if _is_result_file(str(path)):
            return result_layers(str(path))
        ds = open_interactively(str(path))
        if ds is None:
            return [(None,)]
        from .io.ground_truth import read_ground_truth

        return dataset_layers(ds, read_ground_truth(path))
    except (DataError, ResultFileError) as err:
        log.info("%s", err)
        show_error(for_people(short_message(str(err), path)))
    except Exception as err:  # noqa: BLE001 - any failure is a notification, not a traceback
        log.exception("reading %s failed", path)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        show_error(f"{Path(path).name}: cannot be read ({first})")
    return [(None,)]


def _is_result_file(path: str) -> bool:
    """A result file of this project (``io.results``: method groups with maps), not data."""
    if not path.lower().endswith((".h5", ".hdf5", ".hdf")):
        return False
    try:
        import h5py

        with h5py.File(path, "r") as h5:
            if str(h5.attrs.get("layout", "")).startswith("napari-stem-strain results"):
                return True
            # older result files without the layout attribute: method groups only (a
            # simulated data file also holds maps, in /ground_truth, beside its 4D data)
            groups = [k for k, g in h5.items() if isinstance(g, h5py.Group)
                      and "exx" in g and "A" in g and k != "ground_truth"]
            return bool(groups) and all(isinstance(h5[k], h5py.Group) for k in h5)
    except (OSError, ValueError):
        return False


def result_layers(path: str) -> list[LayerData]:
    """A result file's maps as image layers (percent and degrees, the strain colormap,
    limits symmetric about zero, one shared limit per component)."""
    from ._widgets._layers import META_KEY, display_values, map_layer_name, strain_colormap
    from .figures import symmetric_limit
    from .io.results import MAP_NAMES, read_results

    results = read_results(path)
    lims = {c: symmetric_limit(*(display_values(m, c) for m in results.values()))
            for c in MAP_NAMES}
    out: list[LayerData] = []
    for method, m in results.items():
        for comp in MAP_NAMES:
            out.append((display_values(m, comp), {
                "name": map_layer_name(method, comp), "colormap": strain_colormap(),
                "contrast_limits": (-lims[comp], lims[comp]), "interpolation2d": "nearest",
                "visible": not out,
                "metadata": {META_KEY: {"role": "result", "method": method,
                                        "component": comp, "maps": m, "source": path}}},
                "image"))
    return out


def short_message(message: str, path: Any) -> str:
    """``message`` with a leading full path cut to the file's name: napari's toasts are short,
    and the cause after a long folder path was what got cut off."""
    for lead in (str(path), str(Path(path).expanduser().resolve())):
        if message.startswith(lead + ":"):
            return Path(path).name + message[len(lead):]
    return message
