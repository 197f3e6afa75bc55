"""The method registry: one entry per method, read by the pipeline, the CLI and the layers;
another package adds a method through an entry point without editing this one."""

from __future__ import annotations

import numpy as np
import pytest

from napari_stem_strain import pipeline
from napari_stem_strain.methods import registry


def test_builtin_methods_and_both():
    assert list(registry.available())[:2] == ["ae", "py4dstem"]
    assert pipeline.expand_methods("both") == ["ae", "py4dstem"]
    assert registry.label("ae") == "CC-ST-AE" and registry.colour("py4dstem") == "#20c8ff"
    with pytest.raises(ValueError, match="unknown method 'nope'.*ae, py4dstem"):
        pipeline.make_method("nope")


def test_a_method_gets_only_the_options_its_entry_lists():
    m = pipeline.make_method("py4dstem", model="not/for/the/baseline.pt", device="cuda",
                             reference="0:2,0:2")
    assert m.name == "py4dstem" and m.reference is not None


def test_spec_refuses_unknown_options_and_reserved_names():
    with pytest.raises(ValueError, match="unknown option"):
        registry.MethodSpec("x", "m:C", "X", options=("colour_map",))
    with pytest.raises(ValueError, match="both"):
        registry.MethodSpec("both", "m:C", "X")


def test_plugin_method_is_listed_labelled_and_made(method_plugin):
    assert method_plugin in registry.available()
    assert method_plugin not in registry.default_names()  # "both" keeps its meaning
    assert pipeline.expand_methods("all")[-1] == method_plugin
    assert registry.label(method_plugin) == "Toy plugin"
    assert registry.colour(method_plugin) == "#12ab34"
    m = pipeline.make_method(method_plugin, model="x", sample_mask=np.ones((2, 2), bool))
    assert m.name == method_plugin and m.inputs()["sample_mask"].shape == (2, 2)


def test_plugin_method_runs_from_the_cli(method_plugin, tiny_input, tmp_path, capsys):
    from napari_stem_strain.cli import build_parser, main
    from napari_stem_strain.io.results import read_results

    choices = next(a for a in build_parser()._subparsers._group_actions[0].choices["map"]
                   ._actions if a.dest == "method").choices
    assert method_plugin in choices
    out = tmp_path / "r.h5"
    assert main(["map", str(tiny_input), "--method", method_plugin, "--out", str(out),
                 "--quiet"]) == 0
    groups = read_results(out)
    assert list(groups) == [method_plugin]
    g = groups[method_plugin]
    assert np.isfinite(np.asarray(g.maps.exx)).any()
    assert method_plugin in capsys.readouterr().out


def test_broken_plugin_is_skipped_not_fatal(tmp_path, monkeypatch, caplog):
    root = tmp_path / "site"
    info = root / "broken_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken_plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        f"[{registry.ENTRY_POINT_GROUP}]\nbroken = no_such_module_here:SPEC\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(registry, "_PLUGINS", None)
    names = list(registry.available())
    monkeypatch.setattr(registry, "_PLUGINS", None)
    assert names[:2] == ["ae", "py4dstem"] and "broken" not in names
    assert "broken" in caplog.text
