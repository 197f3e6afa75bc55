"""`stem-strain fit` and `train-default` on the command line (tiny simulated file)."""

from __future__ import annotations

import pytest

from napari_stem_strain.cli import main
from napari_stem_strain.methods.ccstae import load_model


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    from napari_stem_strain.simulate import SimulationSettings, simulate_to_file

    path = tmp_path_factory.mktemp("d") / "tiny.h5"
    simulate_to_file(path, SimulationSettings(scan=(8, 8), pattern=64, disk_radius=3.0,
                                              noise=0.1, seed=5, vacuum=False))
    return path


def test_fit_cli_writes_a_loadable_model_and_resumes(tiny_file, tmp_path, capsys):
    out = tmp_path / "m.pt"
    rc = main(["fit", str(tiny_file), "--out", str(out), "--epochs", "2", "--quiet",
               "--device", "cpu", "--seed", "1"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    m = load_model(out)
    assert m.symmetry_deg == 60.0
    assert m.training["epochs"] == 2 and m.training["seed"] == 1
    assert not (tmp_path / "m.pt.ckpt").exists()  # checkpoint removed after success


def test_fit_cli_refuses_bad_input(tiny_file, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00junk")
    rc = main(["fit", str(tiny_file), "--out", str(tmp_path / "m.pt"), "--init", str(bad),
               "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "model file" in err and len(err.strip().splitlines()) == 1
    rc = main(["fit", str(tiny_file), "--out", str(tmp_path / "m.pt"), "--reference", "oops",
               "--quiet"])
    assert rc == 2
    rc = main(["fit", str(tiny_file), "--out", str(tmp_path / "nodir" / "m.pt"), "--quiet"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_train_default_needs_an_explicit_out(capsys):
    """Without ``--out`` the command must refuse rather than replace the shipped weights."""
    from napari_stem_strain.methods.ccstae.modelfile import DEFAULT_PATH

    before = DEFAULT_PATH.read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(["train-default", "--quiet"])
    assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err
    assert DEFAULT_PATH.read_bytes() == before
