"""The napari reader on real files from other software, through viewer.open."""

from __future__ import annotations

import numpy as np
import pytest

from napari_stem_strain import _reader
from napari_stem_strain._reader import napari_get_reader
from napari_stem_strain.io.dataset import Dataset

PLUGIN = "napari-stem-strain"


def _nav(viewer):
    navs = [layer for layer in viewer.layers
            if layer.metadata.get("stem_strain", {}).get("role") == "navigation"]
    assert len(navs) == 1
    return navs[0]


def test_get_reader_accepts_only_supported_single_files(tmp_path):
    assert napari_get_reader(str(tmp_path / "x.txt")) is None
    assert napari_get_reader([str(tmp_path / "a.h5"), str(tmp_path / "b.h5")]) is None
    assert napari_get_reader(str(tmp_path / "scan.H5")) is _reader.read_4dstem
    assert napari_get_reader(str(tmp_path / "scan.blo")) is _reader.read_4dstem


def test_open_py4dstem_file_gives_virtual_images_with_scale(formats, make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open(str(formats / "py4DSTEM_size2x3x4x5.h5"), plugin=PLUGIN)
    nav = _nav(viewer)
    assert nav.data.shape == (2, 3)
    np.testing.assert_allclose(nav.scale, [0.126796875, 0.126796875])
    assert str(nav.units[0]) == "nanometer"
    ds = nav.metadata["stem_strain"]["dataset"]
    assert isinstance(ds, Dataset) and ds.shape == (2, 3, 4, 5)
    assert not isinstance(ds.data, np.ndarray)  # still lazy (h5py dataset)
    # bright field = the sum over the direct-beam disk: compare with a direct computation
    vi = nav.metadata["stem_strain"]["virtual"]
    np.testing.assert_allclose(nav.data, vi.bright_field)
    adf = [layer for layer in viewer.layers if layer.name.endswith("ADF")]
    assert len(adf) == 1 and adf[0].data.shape == (2, 3)


def test_open_blockfile(formats, make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open(str(formats / "test1.blo"), plugin=PLUGIN)
    nav = _nav(viewer)
    assert nav.data.shape == (3, 2)
    np.testing.assert_allclose(nav.scale, [12.8, 12.8])
    assert nav.metadata["stem_strain"]["dataset"].pattern_shape == (144, 144)


def test_file_with_two_4d_arrays_asks_which(formats, make_napari_viewer, monkeypatch):
    asked = {}

    def choose(path, names):
        asked["names"] = names
        return names[1]

    monkeypatch.setattr(_reader, "ask_dataset", choose)
    viewer = make_napari_viewer()
    viewer.open(str(formats / "Si100_4D.emd"), plugin=PLUGIN)
    assert len(asked["names"]) == 2
    ds = _nav(viewer).metadata["stem_strain"]["dataset"]
    assert ds.name == asked["names"][1] and ds.scan_shape == (11, 11)
    # the other array of the same file opens under another name
    monkeypatch.setattr(_reader, "ask_dataset", lambda path, names: names[0])
    viewer.open(str(formats / "Si100_4D.emd"), plugin=PLUGIN)
    names = [layer.name for layer in viewer.layers]
    assert len(set(names)) == len(names) == 4, names
    # ... named after what tells the arrays apart, not "datacube" and napari's "[1]"
    for depth in ("depth0000", "depth0001"):
        assert sum(depth in n for n in names) == 2, names


def test_3d_stack_asks_scan_shape(formats, make_napari_viewer, monkeypatch):
    asked = {}

    def shape(path, n_frames, message=""):
        asked["n"] = n_frames
        asked["message"] = message
        return (6, 11)

    monkeypatch.setattr(_reader, "ask_scan_shape", shape)
    viewer = make_napari_viewer()
    viewer.open(str(formats / "dmTest_3D_int16_64,65,66.dm4"), plugin=PLUGIN)
    assert asked["n"] == 66
    assert _nav(viewer).data.shape == (6, 11)
    # the question speaks to a person, not in the Python API's or the CLI's terms
    assert "scan_shape=" not in asked["message"] and "--scan-shape" not in asked["message"]


def test_cancelled_question_opens_nothing_quietly(formats, make_napari_viewer, monkeypatch,
                                                  errors):
    monkeypatch.setattr(_reader, "ask_scan_shape", lambda *a, **k: None)
    viewer = make_napari_viewer()
    viewer.open(str(formats / "dmTest_3D_int16_64,65,66.dm4"), plugin=PLUGIN)
    assert len(viewer.layers) == 0
    assert errors() == []


@pytest.mark.parametrize("content", [b"\x89HDF\r\n\x1a\n" + b"garbage" * 100, b"not hdf5 at all"])
def test_corrupt_file_is_a_notification(make_napari_viewer, tmp_path, errors, content):
    bad = tmp_path / "broken.h5"
    bad.write_bytes(content)
    viewer = make_napari_viewer()
    viewer.open(str(bad), plugin=PLUGIN)  # must not raise
    assert len(viewer.layers) == 0
    msgs = errors()
    assert len(msgs) == 1 and "broken.h5" in msgs[0]
    assert "Traceback" not in msgs[0]


def test_2d_pattern_file_says_not_4d(formats, make_napari_viewer, errors):
    viewer = make_napari_viewer()
    viewer.open(str(formats / "test_diffraction_pattern.dm3"), plugin=PLUGIN)
    assert len(viewer.layers) == 0
    assert any("no 4D-STEM data" in m for m in errors())


def test_simulated_file_carries_ground_truth(make_napari_viewer, tiny_sim):
    viewer = make_napari_viewer()
    viewer.open(str(tiny_sim), plugin=PLUGIN)
    info = _nav(viewer).metadata["stem_strain"]
    assert info["ground_truth"] is not None
    assert info["ground_truth"].exx.shape == (12, 12)


def test_large_file_streams_virtual_images_in_the_background(make_napari_viewer, tiny_sim,
                                                            monkeypatch, wait_task, qtbot):
    from napari_stem_strain._widgets._session import get_session
    from napari_stem_strain.virtual import virtual_images

    monkeypatch.setattr(_reader, "BACKGROUND_BYTES", 0)  # every file counts as large
    started = []
    real = _reader._virtual_in_background

    def record(ds):
        started.append(real(ds))
        return started[-1]

    monkeypatch.setattr(_reader, "_virtual_in_background", record)
    viewer = make_napari_viewer()
    session = get_session(viewer)
    viewer.open(str(tiny_sim), plugin=PLUGIN)
    nav = _nav(viewer)
    if not started:  # the worker starts from the event loop, after the reader returned
        assert not nav.data.any()  # blank at first: the viewer did not wait
    qtbot.waitUntil(lambda: len(started) == 1, timeout=10_000)
    wait_task(started[0])
    assert started[0].status == "done"
    ds = nav.metadata["stem_strain"]["dataset"]
    np.testing.assert_allclose(nav.data, virtual_images(ds).bright_field, rtol=1e-5)
    # the mask is refilled from the real virtual images: the vacuum columns are background
    mask = session.sample_mask()
    gt = nav.metadata["stem_strain"]["ground_truth"]
    assert (mask == gt.sample).mean() > 0.97


def test_removing_the_layers_of_a_file_closes_it(tmp_path, make_napari_viewer):
    """The file stays open while a layer shows it or a run reads it, and is closed after."""
    import h5py

    from napari_stem_strain._widgets._session import get_session

    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.random.default_rng(0).poisson(5, (4, 5, 16, 16)).astype("f4")
    viewer = make_napari_viewer()
    session = get_session(viewer)
    viewer.open(str(path), plugin=PLUGIN)
    nav = _nav(viewer)
    ds = nav.metadata["stem_strain"]["dataset"]
    assert ds.read_rows(0, 1).shape == (1, 5, 16, 16)
    session.hold(ds)  # a mapping run is reading it
    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    assert ds.read_rows(1, 2).shape == (1, 5, 16, 16)  # still open for the run
    session.release(ds)
    with pytest.raises(Exception):  # noqa: B017,PT011 - h5py's error for a closed file
        ds.read_rows(0, 1)
    with h5py.File(path, "a") as f:  # nothing holds the file any more
        assert f["data"].shape == (4, 5, 16, 16)


def test_result_file_opens_as_its_maps(make_napari_viewer, tmp_path, errors):
    """A result file written by the plugin or ``stem-strain map`` opens as its maps (it was
    refused: "holds no 4D-STEM data ... shape (48, 48, 2, 2)")."""
    from napari_stem_strain._widgets._layers import map_layer_name
    from napari_stem_strain.io.results import MethodMaps, write_results
    from napari_stem_strain.strain import strain_maps

    rng = np.random.default_rng(0)
    A = np.eye(2) + 0.01 * rng.normal(size=(6, 7, 2, 2))
    sample = np.ones((6, 7), bool)
    sample[0, :] = False
    maps = strain_maps(A, "2:5,2:5", 60.0, mask=sample)
    path = tmp_path / "result.h5"
    write_results(path, [MethodMaps("py4dstem", maps, A, sample, "2:5,2:5", 60.0)])
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin=PLUGIN)
    assert errors() == []
    names = [layer.name for layer in viewer.layers]
    assert names == [map_layer_name("py4dstem", c) for c in ("exx", "eyy", "exy", "theta")]
    exx = viewer.layers[map_layer_name("py4dstem", "exx")]
    np.testing.assert_allclose(exx.data, maps.exx * 100, rtol=1e-5, equal_nan=True)
    assert np.isnan(exx.data[0]).all()
    assert exx.contrast_limits[0] == -exx.contrast_limits[1]
