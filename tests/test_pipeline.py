"""The pipeline glue: method names, default reference, streaming runner, MAE table."""

from __future__ import annotations

import numpy as np
import pytest

from napari_stem_strain.io.dataset import Dataset
from napari_stem_strain.io.results import MethodMaps
from napari_stem_strain.methods.base import BlockMethod, Cancelled
from napari_stem_strain.methods.runner import run_method
from napari_stem_strain.pipeline import compare_to_truth, default_reference, expand_methods
from napari_stem_strain.strain import parse_region, strain_to_A


class ScaleFromIntensity(BlockMethod):
    """A toy method: isotropic A from each pattern's mean (enough to test the plumbing)."""

    name = "toy"

    def process_block(self, block, r0):
        s = 1.0 + block.mean(axis=(2, 3))
        A = np.zeros(block.shape[:2] + (2, 2), np.float32)
        A[..., 0, 0] = A[..., 1, 1] = s
        return A, s > 1.0


def test_expand_methods():
    assert expand_methods("both") == ["ae", "py4dstem"]
    with pytest.raises(ValueError, match="unknown method"):
        expand_methods("magic")


def test_default_reference_is_inside_sample():
    sample = np.ones((30, 40), bool)
    sample[:, :10] = False
    rs, cs = parse_region(default_reference(sample))
    assert sample[rs, cs].all()
    assert rs.stop - rs.start >= 2


def test_runner_same_in_one_block_or_many_and_reports_progress():
    data = np.random.default_rng(1).random((9, 5, 4, 4)).astype(np.float32)
    ds = Dataset(data=data)
    seen = []
    one = run_method(ScaleFromIntensity(), ds, block_bytes=10**9)
    many = run_method(ScaleFromIntensity(), ds, block_bytes=1,
                      progress=lambda d, t, m: seen.append((d, t)))
    np.testing.assert_array_equal(one.A, many.A)
    assert seen[-1] == (45, 45) and len(seen) == 9


def test_runner_cancel():
    ds = Dataset(data=np.zeros((4, 4, 2, 2), np.float32))
    with pytest.raises(Cancelled):
        run_method(ScaleFromIntensity(), ds, should_stop=lambda: True)


def test_compare_to_truth_counts_nan_as_worst():
    class Truth:
        exx = np.full((4, 4), 0.01)
        eyy = np.zeros((4, 4))
        exy = np.zeros((4, 4))
        theta = np.zeros((4, 4))
        sample = np.ones((4, 4), bool)
        symmetry_deg = 60.0

    A = strain_to_A(Truth.exx, 0, 0, 0)
    A[:2] = np.eye(2)
    from napari_stem_strain.methods.base import MethodResult

    res = MethodResult("x", A, np.ones((4, 4), bool))
    g = MethodMaps.from_result(res, "0:2,0:4")
    table = compare_to_truth({"x": g}, Truth)
    # rows 0-1 are zero strain (error 0.01 each), rows 2-3 ~0.01 (error ~0)
    assert table["x"]["exx"] == pytest.approx(0.005, abs=2e-4)
    g.maps.exx[3, 3] = np.nan
    assert compare_to_truth({"x": g}, Truth)["x"]["exx"] > table["x"]["exx"]


def test_cli_compare_splits_each_methods_error_into_grain_bias_and_scatter(tmp_path, capsys):
    """`stem-strain compare` on a file whose truth has grain labels also prints, per method
    and component, the mean per-grain |bias| and the within-grain scatter. A method whose
    second grain is offset by 2e-3 in exx (and otherwise only noisy) must show that bias in
    exx and none elsewhere - the split tells a systematic error from noise, which the MAE
    alone cannot."""
    import h5py

    from napari_stem_strain.cli import main
    from napari_stem_strain.io.ground_truth import GroundTruth, write_ground_truth
    from napari_stem_strain.io.results import write_results
    from napari_stem_strain.methods.base import MethodResult

    rng = np.random.default_rng(11)
    shape = (30, 30)
    grains = (np.arange(30)[None, :] >= 15) * np.ones(shape, int)
    zero = np.zeros(shape, np.float32)
    truth_file = tmp_path / "truth.h5"
    with h5py.File(truth_file, "w") as h5:
        write_ground_truth(h5, GroundTruth(zero, zero, zero, zero, np.ones(shape, bool), 60.0,
                                           "0:15,0:15", grains=grains.astype(np.int32)))
    exx = 2e-3 * grains + rng.normal(0, 1e-4, shape)
    A = strain_to_A(exx, rng.normal(0, 1e-4, shape), rng.normal(0, 1e-4, shape), 0.0)
    res = MethodResult("ae", A.astype(np.float32), np.ones(shape, bool))
    out = tmp_path / "r.h5"
    write_results(out, [MethodMaps.from_result(res, "0:15,0:15", input_file=str(truth_file))])
    assert main(["compare", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bias" in text and "scatter" in text
    row = next(ln.split() for ln in text.splitlines() if ln.startswith("ae") and "/" in ln)
    cells = [tuple(float(v) for v in c.split("/")) for c in row[1:]]  # "bias/scatter" in 1e-3
    (bx, sx), (by, sy), (bxy, sxy) = cells[:3]
    assert bx == pytest.approx(1.0, abs=0.05)  # grain 0 unbiased, grain 1 by 2e-3: mean 1e-3
    assert sx == pytest.approx(0.08, abs=0.02)  # mean |N(0, 1e-4)| = 0.08e-3
    assert by < 0.03 and bxy < 0.03


def test_cli_compare_with_another_reference_re_references_the_truth_too(tmp_path, capsys):
    """`compare --reference R` re-references the maps to R; the truth must follow, as the
    plugin's MAE table does, or a reference inside a strained grain adds that grain's strain
    to every error (it printed 11.7e-3 instead of 0.4e-3 on the demo file)."""
    import h5py

    from napari_stem_strain.cli import main
    from napari_stem_strain.io.ground_truth import GroundTruth, write_ground_truth
    from napari_stem_strain.io.results import write_results
    from napari_stem_strain.methods.base import MethodResult
    from napari_stem_strain.strain import strain_maps

    rng = np.random.default_rng(2)
    shape = (30, 30)
    grains = (np.arange(30)[None, :] >= 15) * np.ones(shape, int)
    A_true = strain_to_A(1e-2 * grains, -5e-3 * grains, 0.0, 3.0 * grains)
    sample = np.ones(shape, bool)
    own = "0:15,0:15"
    t = strain_maps(A_true, own, 60.0, sample)
    truth_file = tmp_path / "truth.h5"
    with h5py.File(truth_file, "w") as h5:
        write_ground_truth(h5, GroundTruth(*(np.float32(getattr(t, k))
                                             for k in ("exx", "eyy", "exy", "theta")),
                                           sample, 60.0, own, grains=grains.astype(np.int32),
                                           A=A_true.astype(np.float32)))
    A = A_true + rng.normal(0, 1e-4, (*shape, 2, 2))
    res = MethodResult("ae", A.astype(np.float32), sample)
    out = tmp_path / "r.h5"
    write_results(out, [MethodMaps.from_result(res, own, input_file=str(truth_file))])

    def exx_mae(*extra):
        assert main(["compare", str(out), *extra]) == 0
        text = capsys.readouterr().out
        return float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("ae ")))

    plain = exx_mae()
    assert plain < 0.2  # 1e-3 units: the noise alone
    assert exx_mae("--reference", "5:10,20:25") == pytest.approx(plain, abs=0.05)


@pytest.mark.bound(90)
def test_cli_map_with_another_reference_compares_with_the_truth_re_referenced(tiny_input,
                                                                               tmp_path,
                                                                               capsys):
    """`map --reference R` on a simulated file prints the MAE against the truth re-referenced
    to R, as `compare --reference` and the plugin do: a region inside a strained grain must
    not add that grain's strain to every error."""
    from napari_stem_strain.cli import main
    from napari_stem_strain.io.ground_truth import read_ground_truth

    truth = read_ground_truth(tiny_input)
    own = truth.grains[parse_region(truth.reference)]
    # a 2 x 2 region wholly inside another grain, the one most strained against the reference
    best = None
    for r in range(7):
        for c in range(7):
            g = truth.grains[r:r + 2, c:c + 2]
            if (g == g[0, 0]).all() and g[0, 0] >= 0 and not (own == g[0, 0]).any():
                size = abs(float(truth.exx[r, c]))
                if best is None or size > best[0]:
                    best = (size, f"{r}:{r + 2},{c}:{c + 2}")
    assert best is not None and best[0] > 2e-3, best

    out = tmp_path / "r.h5"
    assert main(["map", str(tiny_input), "--method", "py4dstem", "--quiet", "--out", str(out),
                 "--reference", best[1]]) == 0
    text = capsys.readouterr().out
    printed = float(next(ln.split()[1] for ln in text.splitlines()
                         if ln.startswith("py4dstem ")))
    from napari_stem_strain.io.results import read_results

    groups = read_results(out)
    assert groups["py4dstem"].reference == best[1]
    right = compare_to_truth(groups, truth.relative_to(best[1]))["py4dstem"]["exx"] * 1e3
    wrong = compare_to_truth(groups, truth)["py4dstem"]["exx"] * 1e3  # the file's reference
    assert abs(wrong - right) > 1.0  # the check can tell the two apart
    assert printed == pytest.approx(right, abs=1e-3)


def test_cli_compare_says_in_one_line_when_the_truth_cannot_follow_the_reference(tmp_path,
                                                                                 capsys):
    """A truth file without the true ``A`` (older files) cannot be re-referenced: `compare
    --reference` still prints its tables, and one stderr line says the errors include the
    region's strain against the file's own reference."""
    import h5py

    from napari_stem_strain.cli import main
    from napari_stem_strain.io.ground_truth import GroundTruth, write_ground_truth
    from napari_stem_strain.io.results import write_results
    from napari_stem_strain.methods.base import MethodResult

    shape = (10, 10)
    z = np.zeros(shape, np.float32)
    truth_file = tmp_path / "truth.h5"
    with h5py.File(truth_file, "w") as h5:
        write_ground_truth(h5, GroundTruth(z, z, z, z, np.ones(shape, bool), 60.0, "0:4,0:4"))
    res = MethodResult("ae", strain_to_A(z, z, z, z).astype(np.float32), np.ones(shape, bool))
    out = tmp_path / "r.h5"
    write_results(out, [MethodMaps.from_result(res, "0:4,0:4", input_file=str(truth_file))])
    assert main(["compare", str(out), "--reference", "5:9,5:9"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("method")
    notes = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(notes) == 1 and "could not be re-referenced to 5:9,5:9" in notes[0], notes
    assert "Traceback" not in captured.err
