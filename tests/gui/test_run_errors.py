"""What a failed or refused run tells the user: one human line, no raw internals, and no
traceback in the terminal for a clean refusal."""

from __future__ import annotations

import logging

import pytest

from napari_stem_strain._widgets.mapping import MappingWidget


@pytest.fixture
def dock(make_napari_viewer, open_scan, tiny_sim):
    viewer = make_napari_viewer()
    open_scan(viewer, tiny_sim)
    w = MappingWidget(viewer)
    viewer.window.add_dock_widget(w)
    return w


def test_clean_refusal_is_one_line_without_traceback(dock, wait_task, toy_methods, errors,
                                                     caplog):
    toy_methods["fail"] = ValueError("no direct beam found in the patterns (all empty?)")
    with caplog.at_level(logging.DEBUG):
        task = dock.run()
        wait_task(task)
    assert task.status == "failed"
    assert errors() == ["Strain mapping failed: no direct beam found in the patterns "
                        "(all empty?)"]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_internal_error_is_not_shown_raw(dock, wait_task, toy_methods, errors):
    toy_methods["fail"] = IndexError("index -9223372036854653445 is out of bounds for axis 0 "
                                     "with size 8")
    task = dock.run()
    wait_task(task)
    assert task.status == "failed"
    (msg,) = errors()
    assert msg.startswith("Strain mapping failed: ") and "\n" not in msg
    assert "-9223" not in msg and "index" not in msg.lower().split(":", 1)[1][:12]
    assert "internal error" in msg


@pytest.mark.parametrize("address", ["foo:bar", "tcp://host:port", "host:99999", "local:x"])
def test_typo_in_dask_address_is_explained_before_the_run(dock, toy_methods, errors,
                                                          address):
    dock.dask_address.setText(address)
    assert dock.run() is None
    assert toy_methods["made"] == []
    msg = errors()[-1]
    assert "Dask" in msg and address in msg and "\n" not in msg
    assert "invalid literal" not in msg
    assert dock.run_button.isEnabled()


def test_unreadable_file_message_leads_with_the_cause(make_napari_viewer, tmp_path, errors):
    """A toast is short: the file's name and the cause, not a long folder path first (napari
    cuts long toasts, and the cause was the part cut off)."""
    import h5py
    import numpy as np

    deep = tmp_path / ("a_rather_long_folder_name_" * 3) / "acquisitions" / "2026-11-28"
    deep.mkdir(parents=True)
    path = deep / "flat.h5"
    with h5py.File(path, "w") as h5:
        h5["image"] = np.zeros((87, 87), np.float32)
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-stem-strain")
    (msg,) = errors()
    assert msg.startswith("flat.h5: ") and "no 4D-STEM data" in msg
    assert str(deep) not in msg


def test_progress_names_methods_as_the_user_knows_them(dock, qtbot, wait_task, toy_methods):
    toy_methods["delay"] = 0.1
    dock.use_py4dstem.setChecked(False)
    task = dock.run()
    qtbot.waitUntil(lambda: task.pbar.n > 0, timeout=10_000)
    desc = task.pbar.desc
    dock.cancel()
    wait_task(task)
    assert "CC-ST-AE" in desc and "rows" in desc
    assert "ae:" not in desc


def test_model_fitted_in_the_dock_is_kept_where_the_user_can_find_it(dock, wait_task,
                                                                     toy_methods, monkeypatch,
                                                                     tmp_path):
    import os
    from pathlib import Path

    from napari_stem_strain._widgets.mapping import MODEL_FILE, MODEL_FIT
    from napari_stem_strain.methods import ccstae

    written = []

    def fake_fit(ds, out, **kwargs):
        Path(out).write_bytes(b"weights")
        written.append(Path(out))
        return Path(out)

    monkeypatch.setattr(ccstae, "fit_model", fake_fit)
    dock.use_py4dstem.setChecked(False)
    dock.model.setCurrentText(MODEL_FIT)
    task = dock.run()
    wait_task(task)
    assert task.status == "done"
    (model,) = written
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "napari-stem-strain" / "models"
    assert model.parent == cache and model.name.startswith("tiny")
    # the dock now offers that file for the next run and says where it is
    assert dock.model.currentText() == MODEL_FILE
    assert dock.model_path.text() == str(model)
    assert str(model) in dock.status.text()


def test_progress_shows_the_total_at_once(dock, qtbot, wait_task, toy_methods):
    """The bar has its total and a 'preparing' line before the first block is done (CC-ST-AE
    loads its model for seconds first: the bar showed nothing meanwhile)."""
    toy_methods["delay"] = 0.5
    task = dock.run()
    qtbot.waitUntil(lambda: task.pbar.total > 0, timeout=10_000)
    assert task.pbar.n == 0
    assert "preparing" in task.pbar.desc
    dock.cancel()
    wait_task(task)
