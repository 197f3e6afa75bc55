"""Strain-mapping dock: pick methods, model and device, Run/Cancel, and look at the results.

Everything scientific happens in :func:`napari_stem_strain.pipeline.run_methods` (and
``ccstae.fit_model`` for "fit on this dataset now"), run by a :class:`~._workers.Task` in a
worker thread. Results go to the session, which shows them as layers; this dock adds the
side-by-side grid, histograms of every map and, when the file holds ground truth, the MAE table
(``pipeline.compare_to_truth``, ``CONVENTIONS.md`` rules).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ..io.results import MAP_NAMES
from ..methods import registry
from ._layers import (
    MAP_UNITS,
    META_KEY,
    display_values,
    method_colour,
    method_label,
    show_tile_names,
    sync_backdrop,
)
from ._scroll import make_scrollable
from ._session import get_session
from ._workers import Task, notify_error

__all__ = ["MappingWidget", "MODEL_SHIPPED", "MODEL_FILE", "MODEL_FIT"]

MODEL_SHIPPED = "shipped model"
MODEL_FILE = "model file..."
MODEL_FIT = "fit on this dataset now"
DASK_KEY = "mapping/dask_address"


def _settings() -> Any:
    """The plugin's persistent settings (Qt's per-user store)."""
    from qtpy.QtCore import QSettings

    return QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope,
                     "napari-stem-strain", "napari-stem-strain")


def _probe_devices() -> tuple[list[str], str]:
    """``(available devices, a sentence for the user)`` (imports torch)."""
    from ..device import available_devices

    have = available_devices()
    if "cuda" in have:
        import torch

        return have, f"torch sees CUDA: {torch.cuda.get_device_name(0)}"
    return have, "torch sees no CUDA GPU: CC-ST-AE runs on the CPU"


def fitted_model_path(ds: Any) -> Path:
    """A new file for a model fitted in the dock: ``<cache>/napari-stem-strain/models/
    <data name>-<date-time>.pt`` (``$XDG_CACHE_HOME`` or ``~/.cache``), never an existing one."""
    import os
    import time

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = Path(base) / "napari-stem-strain" / "models"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.mkdtemp(prefix="stem-strain-fit-"))
    stem = Path(str(getattr(ds, "source", "") or "data")).stem or "data"
    base_name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = folder / f"{base_name}.pt", 1
    while path.exists():
        i += 1
        path = folder / f"{base_name}-{i}.pt"
    return path


def dask_address_problem(address: str) -> str | None:
    """Why ``address`` is no Dask address (one line), or ``None``: ``local``, ``local:N`` or
    ``[scheme://]host:port`` with a port number."""
    import re

    text = address.strip()
    local = re.fullmatch(r"(?i)local(?::(.*))?", text)
    if local:
        n = local.group(1)
        if n is None or (n.isdigit() and int(n) >= 1):
            return None
        return f"Dask cluster {address!r}: expected local:N with N a number of workers (1 or more)"
    m = re.fullmatch(r"(?:([a-z][a-z0-9+.-]*)://)?(\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+)"
                     r":([^:/]*)/?", text)
    if m is None:
        return (f"Dask cluster {address!r} is not an address: expected host:port "
                "(e.g. tcp://host:8786) or local:N")
    port = m.group(3)
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return (f"Dask cluster {address!r}: the port must be a number from 1 to 65535 "
                "(e.g. tcp://host:8786)")
    return None


def _grid(viewer: Any) -> Any:
    """napari's grid settings (``viewer.canvas.grid`` since 0.9, ``viewer.grid`` before)."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid


def _sigma_limit_box(maximum: float, suffix: str, tip: str) -> QDoubleSpinBox:
    """A spin box for one limit of "Mask where sigma >" (starts at 0.1, 0.01 steps)."""
    box = QDoubleSpinBox()
    box.setRange(0.001, maximum)
    box.setDecimals(3)
    box.setSingleStep(0.01)
    box.setValue(0.1)
    box.setSuffix(suffix)
    box.setToolTip(tip)
    return box


class MappingWidget(QWidget):
    """Run CC-ST-AE and/or py4DSTEM on the current dataset and compare the maps."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self.task: Task | None = None
        self._held: Any = None  # the dataset the running task reads (see ``session.hold``)
        self._fitted: Path | None = None  # the model the last run fitted
        self._hidden_for_grid: list[Any] = []
        self._maps_before_grid: dict[Any, bool] = {}

        # -- methods -----------------------------------------------------------------
        run_box = QGroupBox("Methods")
        form = QFormLayout(run_box)
        #: one check box per registered method (the registry's label and description;
        #: the default methods ticked)
        self.method_boxes: dict[str, QCheckBox] = {}
        for name, spec in registry.available().items():
            box = QCheckBox(f"{spec.label} ({spec.description})" if spec.description
                            else spec.label)
            box.setChecked(spec.default)
            form.addRow(box)
            self.method_boxes[name] = box
        self.use_ae = self.method_boxes["ae"]
        self.use_py4dstem = self.method_boxes["py4dstem"]
        self.model = QComboBox()
        self.model.addItems([MODEL_SHIPPED, MODEL_FILE, MODEL_FIT])
        self.model.setToolTip("CC-ST-AE weights: the model shipped with the plugin, a model "
                              "file fitted earlier (stem-strain fit), or fit one on this "
                              "dataset before mapping")
        self.model.currentTextChanged.connect(self._model_changed)
        form.addRow("CC-ST-AE model", self.model)
        self.model_path = QLineEdit()
        self.model_path.setPlaceholderText("fitted model file (.pt)")
        browse = QPushButton("...")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse_model)
        self._path_row = QWidget()
        prow = QHBoxLayout(self._path_row)
        prow.setContentsMargins(0, 0, 0, 0)
        prow.addWidget(self.model_path)
        prow.addWidget(browse)
        form.addRow(self._path_row)
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 10_000)
        self.epochs.setValue(20)
        self._epochs_label = QLabel("fit epochs")
        form.addRow(self._epochs_label, self.epochs)
        self.device = QComboBox()
        self.device_info = QLabel("looking for a CUDA GPU ...")
        self.device_info.setWordWrap(True)
        self._fill_devices()
        form.addRow("device", self.device)
        form.addRow(self.device_info)
        # a Dask cluster to spread the scan over; remembered between sessions (QSettings)
        self.dask_address = QLineEdit(str(_settings().value(DASK_KEY, "") or ""))
        self.dask_address.setPlaceholderText("none (this machine); tcp://host:8786 or local:2")
        self.dask_address.setToolTip("Dask scheduler address: the scan is split into blocks "
                                     "mapped by the cluster's workers (same result file)")
        self.dask_address.editingFinished.connect(
            lambda: _settings().setValue(DASK_KEY, self.dask_address.text().strip()))
        form.addRow("Dask cluster", self.dask_address)

        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        brow = QHBoxLayout()
        brow.addWidget(self.run_button)
        brow.addWidget(self.cancel_button)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        # -- results -----------------------------------------------------------------
        self.grid = QCheckBox("Compare side by side")
        self.grid.setToolTip("napari's grid: one row per method, columns exx, eyy, exy, theta; "
                             "only the maps are shown meanwhile")
        self.grid.toggled.connect(self.set_grid)
        # issue 13: grey out positions whose error bar is larger than a threshold
        self.sigma_mask = QCheckBox("Mask where \u03c3 >")
        self.sigma_mask.setToolTip(
            "grey out, in every map of that method, the positions whose standard deviation "
            "exceeds either limit: any strain component's (in %) or the rotation's (in degrees)")
        self.sigma_limit = _sigma_limit_box(100.0, " %",
                                            "largest strain standard deviation shown (percent)")
        self.sigma_limit_deg = _sigma_limit_box(
            90.0, "\u00b0", "largest rotation standard deviation shown (degrees)")
        self.sigma_mask.toggled.connect(self._sigma_mask_changed)
        self.sigma_limit.valueChanged.connect(self._sigma_mask_changed)
        self.sigma_limit_deg.valueChanged.connect(self._sigma_mask_changed)
        self.hist_z = QCheckBox("Histograms: (estimate \u2212 truth) / \u03c3")
        self.hist_z.setToolTip("error-normalised residual against the file's ground truth, "
                               "within grains; honest error bars give a unit normal (line)")
        self.hist_z.toggled.connect(self._draw_histograms)
        srow = QHBoxLayout()
        srow.addWidget(self.sigma_mask)
        srow.addWidget(self.sigma_limit)
        srow.addWidget(self.sigma_limit_deg)
        srow.addStretch(1)
        self.tabs = QTabWidget()
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.hist_figure = Figure(figsize=(4, 3.4), facecolor="#262930")
        self.hist_canvas = FigureCanvasQTAgg(self.hist_figure)
        self.hist_canvas.setMinimumHeight(260)
        self.tabs.addTab(self.hist_canvas, "Histograms")
        self.mae_table = QTableWidget(0, 4)
        self.mae_table.setHorizontalHeaderLabels(
            [f"{c} ({MAP_UNITS[c][0]})" for c in MAP_NAMES])
        self.mae_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.mae_note = QLabel("Mean absolute error against the file's ground truth, "
                               "re-referenced to the reference rectangle, over the positions "
                               "that are sample in both the truth and the mask "
                               "(CONVENTIONS.md). Hover a cell: its per-grain bias and "
                               "within-grain scatter.")
        self.mae_note.setWordWrap(True)
        mae_page = QWidget()
        mlay = QVBoxLayout(mae_page)
        mlay.addWidget(self.mae_note)
        mlay.addWidget(self.mae_table)
        self.tabs.addTab(mae_page, "MAE vs truth")

        lay = QVBoxLayout(self)
        lay.addWidget(run_box)
        lay.addWidget(self.grid)
        lay.addLayout(srow)
        lay.addWidget(self.hist_z)
        lay.addWidget(self.tabs, 1)
        # Run / Cancel and the status stay in view below the scrolling part
        footer = QWidget()
        flay = QVBoxLayout(footer)
        flay.setContentsMargins(9, 0, 9, 6)
        flay.addLayout(brow)
        flay.addWidget(self.status)
        make_scrollable(self, footer=footer)

        self._model_changed(self.model.currentText())
        self.session.results_changed.connect(self.update_results)
        self.session.dataset_changed.connect(self.update_results)
        if self.session.dataset is not None:
            self.session.ensure_layers()
        self.update_results()

    # ---------------------------------------------------------------- settings
    def _fill_devices(self) -> None:
        """Device choices. Asking torch what is present means importing torch (seconds), so
        that happens in a worker thread; the combo is usable at once with "auto"."""
        import sys

        self.device.addItem("auto", "auto")
        self.device.addItem("CPU", "cpu")
        self.device.addItem("CUDA", "cuda")
        self.devices_known = False
        if "torch" in sys.modules:
            self._show_devices(_probe_devices())
            return
        from ._workers import start_worker

        self._device_worker = start_worker(_probe_devices, self._show_devices)

    def _show_devices(self, found: tuple[list[str], str]) -> None:
        have, text = found
        try:
            self.device.setItemText(0, f"auto ({have[0]})")
            item = self.device.model().item(2)
            if "cuda" in have:
                self.device.setItemText(2, "CUDA GPU")
            else:
                self.device.setItemText(2, "CUDA (not available)")
                if item is not None:
                    item.setEnabled(False)
                if self.device.currentIndex() == 2:
                    self.device.setCurrentIndex(0)
            self.device_info.setText(text)
            self.devices_known = True
        except RuntimeError:  # dock closed meanwhile
            pass

    def _model_changed(self, text: str) -> None:
        self._path_row.setVisible(text == MODEL_FILE)
        self.epochs.setVisible(text == MODEL_FIT)
        self._epochs_label.setVisible(text == MODEL_FIT)

    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "CC-ST-AE model file", "",
                                              "model (*.pt *.pth);;all files (*)")
        if path:
            self.model_path.setText(path)

    def methods(self) -> list[str]:
        """The ticked methods' registry names, in registry order."""
        return [name for name, box in self.method_boxes.items() if box.isChecked()]

    # -------------------------------------------------------------------- run
    def run(self) -> Task | None:
        """Start a run in a worker thread (returns the task; ``None`` when refused)."""
        if self.task is not None and self.task.running:
            notify_error("a strain mapping run is already going: cancel it first")
            return None
        ds = self.session.dataset
        if ds is None:
            notify_error("open a 4D-STEM file (or File > Open Sample) before running")
            return None
        methods = self.methods()
        if not methods:
            notify_error("tick at least one method ("
                         + " or ".join(method_label(m) for m in self.method_boxes) + ")")
            return None
        self.session.ensure_layers()
        region = self.session.reference_region()
        device = self.device.currentData()
        choice = self.model.currentText()
        model: Any = None
        takes_model = any("model" in registry.get(m).options for m in methods)
        if takes_model and choice == MODEL_FILE:
            model = self.model_path.text().strip()
            if not model or not Path(model).is_file():
                notify_error(f"model file {model!r} does not exist: choose a fitted model")
                return None
        fit_epochs = self.epochs.value() if takes_model and choice == MODEL_FIT else 0
        dask_address = self.dask_address.text().strip() or None
        if dask_address:
            problem = dask_address_problem(dask_address)
            if problem:
                notify_error(problem)
                return None
            _settings().setValue(DASK_KEY, dask_address)

        fit_out = fitted_model_path(ds) if fit_epochs else None

        n_total = len(methods) * int(np.prod(ds.scan_shape))

        def job(progress: Any, should_stop: Any) -> Any:
            from ..pipeline import run_methods

            # the bar shows its total at once (loading a model takes seconds before any block)
            progress(0, n_total, "preparing (loading the model, locating the direct beam)")
            use_model = model
            if fit_out is not None:
                from ..methods.ccstae import fit_model

                fitted = fit_model(ds, init="default", epochs=fit_epochs, seed=0, out=fit_out,
                                   progress=progress, should_stop=should_stop,
                                   reference=region, device=device)
                use_model = fitted if fitted is not None else fit_out
            return run_methods(ds, methods, reference=region, model=use_model, device=device,
                               progress=progress, should_stop=should_stop,
                               dask_address=dask_address)

        session = self.session

        def done(raw: Any) -> None:
            # before showing the maps: showing them processes Qt events, which may deliver
            # the run's end (``_ended``) meanwhile
            if fit_out is not None and fit_out.is_file():
                self._fitted = fit_out
                # offer the fitted model for the next run (no refit)
                self.model_path.setText(str(fit_out))
                self.model.setCurrentText(MODEL_FILE)
            session.set_results(raw, dataset=ds)

        names = " + ".join(method_label(m) for m in methods)
        self.status.setText(f"running {names} ...")
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.session.hold(ds)
        self._held = ds
        self._fitted = None
        self.task = Task(job, f"Strain mapping ({names})", on_done=done,
                         on_end=self._ended, error_prefix="Strain mapping failed: ",
                         viewer=self.viewer)
        return self.task

    def cancel(self) -> None:
        if self.task is not None and self.task.running:
            self.task.cancel()
            self.status.setText("cancelling (stops after the current block) ...")

    def _ended(self, status: str) -> None:
        held, self._held = self._held, None
        if held is not None:
            self.session.release(held)
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        text = {"done": "done", "cancelled": "cancelled: no maps were changed",
                "failed": "failed (see the notification)"}.get(status, status)
        if status == "done" and self._fitted is not None:
            text += f"; fitted model saved as {self._fitted} (chosen for the next run)"
        self.status.setText(text)

    # ---------------------------------------------------------------- results
    def update_results(self) -> None:
        self._draw_histograms()
        self._fill_mae()
        if self.grid.isChecked():
            self.set_grid(True)

    def _sigma_mask_changed(self, *_: Any) -> None:
        self.session.set_max_sigma((self.sigma_limit.value(), self.sigma_limit_deg.value())
                                   if self.sigma_mask.isChecked() else None)

    def residual_z(self) -> dict[str, dict[str, np.ndarray]]:
        """Per method and component, ``(estimate - truth) / sigma`` within single grains
        (issue 13); ``{}`` without ground truth or error bars."""
        gt = self._truth_for_maps()
        if gt is None:
            return {}
        from ..strain import wrap_angle
        from ..uncertainty import interior_mask

        where = interior_mask(gt.grains, gt.sample)
        out: dict[str, dict[str, np.ndarray]] = {}
        for name, m in self.session.results.items():
            if m.maps.sigma is None or np.shape(m.maps.exx) != np.shape(gt.exx):
                continue
            out[name] = {}
            for comp in MAP_NAMES:
                err = np.asarray(getattr(m.maps, comp), float) - np.asarray(getattr(gt, comp))
                if comp == "theta":
                    err = wrap_angle(err, gt.symmetry_deg)
                with np.errstate(divide="ignore", invalid="ignore"):
                    z = err / np.asarray(m.maps.sigma[comp], float)
                out[name][comp] = z[where & np.isfinite(z)]
        return out

    def _draw_histograms(self, *_: Any) -> None:
        fig = self.hist_figure
        fig.clear()
        results = self.session.results
        zs = self.residual_z()
        self.hist_z.setEnabled(bool(zs))
        if self.hist_z.isChecked() and zs:
            self._draw_z_histograms(zs)
            return
        if not results:
            fig.text(0.5, 0.5, "histograms of the maps appear here after a run",
                     ha="center", va="center", color="#b0b0b0", fontsize=9)
            self.hist_canvas.draw_idle()
            return
        axes = fig.subplots(2, 2)
        for ax, comp in zip(axes.ravel(), MAP_NAMES, strict=True):
            ax.set_facecolor("#262930")
            ax.tick_params(colors="#d0d0d0", labelsize=7)
            for s in ax.spines.values():
                s.set_color("#808080")
            unit = MAP_UNITS[comp][0]
            ax.set_title(f"{comp} ({unit})", color="#e0e0e0", fontsize=8)
            vals = [display_values(m, comp) for m in results.values()]
            finite = [v[np.isfinite(v)] for v in vals]
            if not any(f.size for f in finite):
                continue
            allv = np.concatenate([f for f in finite if f.size])
            # a flat map (e.g. all zero) still gets readable bins
            lim = max(float(np.percentile(np.abs(allv), 99.5)), 1e-3)
            bins = np.linspace(-lim, lim, 41)
            for name, f in zip(results, finite, strict=True):
                if f.size:
                    ax.hist(np.clip(f, -lim, lim), bins=bins, histtype="step", linewidth=1.4,
                            color=method_colour(name), label=method_label(name))
        axes[0, 0].legend(fontsize=7, framealpha=0.5)
        fig.tight_layout(pad=0.6)
        self.hist_canvas.draw_idle()

    def _draw_z_histograms(self, zs: dict[str, dict[str, np.ndarray]]) -> None:
        fig = self.hist_figure
        axes = fig.subplots(2, 2)
        bins = np.linspace(-5, 5, 41)
        x = np.linspace(-5, 5, 201)
        for ax, comp in zip(axes.ravel(), MAP_NAMES, strict=True):
            ax.set_facecolor("#262930")
            ax.tick_params(colors="#d0d0d0", labelsize=7)
            for s in ax.spines.values():
                s.set_color("#808080")
            ax.set_title(f"{comp}: (est \u2212 truth) / \u03c3", color="#e0e0e0", fontsize=8)
            for name, row in zs.items():
                z = row[comp]
                if z.size:
                    ax.hist(np.clip(z, -5, 5), bins=bins, histtype="step", linewidth=1.4,
                            density=True, color=method_colour(name),
                            label=f"{method_label(name)} (std {np.std(z):.2f})")
            ax.plot(x, np.exp(-x * x / 2) / np.sqrt(2 * np.pi), color="#e0e0e0",
                    linewidth=0.8, linestyle="--")
            ax.legend(fontsize=6, framealpha=0.5)
        fig.tight_layout(pad=0.6)
        self.hist_canvas.draw_idle()

    def _truth_for_maps(self):
        """The file's ground truth as the maps are shown - relative to the user's rectangle,
        over the positions sample in both the truth and the user's mask (positions painted
        background are no method's error) - or None without truth or results."""
        gt = self.session.ground_truth
        if gt is None or not self.session.results:
            return None
        return gt.relative_to(self.session.reference_region(), self.session.sample_mask())

    def mae(self, truth=None) -> dict[str, dict[str, float]]:
        """MAE per method and component (file units) against the ground truth, or ``{}``.
        ``truth``: :meth:`_truth_for_maps`, when the caller has it already."""
        gt = truth if truth is not None else self._truth_for_maps()
        if gt is None:
            return {}
        from ..pipeline import compare_to_truth

        return compare_to_truth(self.session.results, gt)

    def bias_scatter(self, truth=None) -> dict[str, dict[str, tuple[float, float, float]]]:
        """Per method and component the MAE split into mean per-grain |bias| and
        within-grain scatter (``pipeline.bias_scatter_to_truth``), against the same truth as
        :meth:`mae`; ``{}`` without ground truth or its grain labels."""
        gt = truth if truth is not None else self._truth_for_maps()
        if gt is None:
            return {}
        from ..pipeline import bias_scatter_to_truth

        return bias_scatter_to_truth(self.session.results, gt)

    def _fill_mae(self) -> None:
        truth = self._truth_for_maps()  # re-referencing maps the whole scan: once here
        table = self.mae(truth)
        split = self.bias_scatter(truth)
        self.tabs.setTabEnabled(1, self.session.ground_truth is not None)
        self.mae_table.setRowCount(len(table))
        self.mae_table.setVerticalHeaderLabels([method_label(m) for m in table])
        for i, (method, row) in enumerate(table.items()):
            for j, comp in enumerate(MAP_NAMES):
                unit, k = MAP_UNITS[comp]
                item = QTableWidgetItem(f"{row[comp] * k:.3f}")
                if method in split:  # systematic (same in a whole grain) against noise
                    b, sc, worst = split[method][comp]
                    item.setToolTip(f"mean per-grain |bias| {b * k:.3f} {unit}, within-grain "
                                    f"scatter {sc * k:.3f} {unit} (largest grain bias "
                                    f"{worst * k:.3f} {unit})")
                self.mae_table.setItem(i, j, item)

    # ------------------------------------------------------------------- grid
    def set_grid(self, on: bool) -> None:
        """Side by side: every map visible in napari's grid, one row per method; the other
        layers are hidden meanwhile (and shown again after)."""
        viewer = self.viewer
        maps = [layer for layer in viewer.layers
                if (layer.metadata.get(META_KEY) or {}).get("role") == "map"]
        if on and maps:
            if not _grid(viewer).enabled:  # remember the maps' own visibility for later
                self._maps_before_grid = {layer: layer.visible for layer in maps}
            for layer in viewer.layers:
                if layer not in maps and layer.visible:
                    layer.visible = False
                    self._hidden_for_grid.append(layer)
            for layer in maps:
                layer.visible = True
            n_methods = len({(layer.metadata[META_KEY]["method"]) for layer in maps})
            grid = _grid(viewer)
            grid.shape = (n_methods, len(MAP_NAMES))
            grid.enabled = True
            show_tile_names(viewer, True)
            sync_backdrop(viewer)  # the blank backdrop would be a tile of its own
            viewer.reset_view()  # every tile whole, not a zoomed fragment
        else:
            was_grid = _grid(viewer).enabled
            _grid(viewer).enabled = False
            show_tile_names(viewer, False)
            for layer, visible in self._maps_before_grid.items():
                if layer in viewer.layers:
                    layer.visible = visible
            self._maps_before_grid = {}
            for layer in self._hidden_for_grid:
                if layer in viewer.layers:
                    layer.visible = True
            self._hidden_for_grid = []
            sync_backdrop(viewer)
            if was_grid:
                viewer.reset_view()
