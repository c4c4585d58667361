"""``nnunet-sud compare``: Markdown table, box plots, paired differences and Wilcoxon tests on
evaluations produced by ``nnunet-sud evaluate`` from NIfTI files written here."""
import csv
import json
import re

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.patches import PathPatch
from scipy.stats import wilcoxon

from nnunet_sud.cli import main
from nnunet_sud.errors import UserFacingError
from nnunet_sud.evaluation.compare import (compare, load_evaluations, parse_named, plot_boxplots, plot_paired,
                                           paired_differences, wilcoxon_p)

SHAPE = (10, 24, 24)
SPACING_XYZ = (0.8, 0.8, 2.0)
N_CASES = 9
METHODS = ("base", "better", "same")   # "same" predicts exactly what "base" predicts


def write(path, arr):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(SPACING_XYZ)
    sitk.WriteImage(img, str(path), True)


def sphere(center, radius):
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    # physical distances (z spacing 2.0, in-plane 0.8)
    d = np.sqrt(((zz - center[0]) * 2.0) ** 2 + ((yy - center[1]) * 0.8) ** 2 + ((xx - center[2]) * 0.8) ** 2)
    return d <= radius


def make_label(rng, jitter):
    """Label 1 a ball, label 2 a smaller ball beside it; `jitter` voxels of random displacement."""
    c1 = np.array([5, 9, 9]) + rng.integers(-jitter, jitter + 1, 3) * np.array([0, 1, 1])
    c2 = np.array([5, 16, 16]) + rng.integers(-jitter, jitter + 1, 3) * np.array([0, 1, 1])
    out = np.zeros(SHAPE, np.uint8)
    out[sphere(c1, 5.0)] = 1
    out[sphere(c2, 3.0)] = 2
    return out


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory):
    """Three methods evaluated on the same 9 cases: 'better' deviates less from the reference
    than 'base'; 'same' is a copy of 'base'; in one case 'base' misses label 2."""
    from nnunet_sud.evaluation.evaluate import classes_from_labels, evaluate_folders, write_evaluation

    root = tmp_path_factory.mktemp("cmp")
    rng = np.random.default_rng(5)
    folders = {m: root / m for m in ("ref",) + METHODS}
    for f in folders.values():
        f.mkdir()
    for i in range(N_CASES):
        ref = make_label(np.random.default_rng(100 + i), 0)
        base = make_label(rng, 3)
        if i == 4:
            base[base == 2] = 0
        better = make_label(rng, 1)
        write(folders["ref"] / f"case{i}.nii.gz", ref)
        write(folders["base"] / f"case{i}.nii.gz", base)
        write(folders["same"] / f"case{i}.nii.gz", base)
        write(folders["better"] / f"case{i}.nii.gz", better)
    paths = {}
    for m in METHODS:
        res = evaluate_folders(str(folders[m]), str(folders["ref"]), classes_from_labels([1, 2]))
        paths[m] = write_evaluation(res, str(root / f"eval_{m}"))["json"]
    return {"root": root, "paths": paths, "folders": folders}


def raw_values(path, key, metric):
    """Per-case values straight from the JSON (null -> NaN), sorted by case."""
    res = json.load(open(path))
    vals = {pc["case"]: pc["metrics"][key][metric] for pc in res["per_case"]}
    return np.array([np.nan if vals[c] is None else vals[c] for c in sorted(vals)], dtype=float)


def named(evaluations):
    return [(m, evaluations["paths"][m]) for m in METHODS]


def test_compare_cli_outputs(evaluations, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare"] + [f"{m}={p}" for m, p in named(evaluations)] + ["-o", str(out), "--baseline", "base"]
    assert main(args) == 0
    for name in ("comparison.md", "boxplots.png", "paired_differences.png", "paired_differences.csv",
                 "comparison.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    for png in ("boxplots.png", "paired_differences.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image
        img = matplotlib.image.imread(str(out / png))
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100

    md = (out / "comparison.md").read_text()
    # Table-3 style: header, one row per method, median Dice / HD95 per class, best in bold
    lines = md.splitlines()
    hi = lines.index(next(l for l in lines if l.startswith("| Method | 1 Dice")))
    assert lines[hi] == "| Method | 1 Dice | 1 HD95 (mm) | 2 Dice | 2 HD95 (mm) |"
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]] for l in lines[hi + 2: hi + 2 + 3]}
    assert set(rows) == set(METHODS)
    for ci, (key, metric) in enumerate([("1", "Dice"), ("1", "HD95"), ("2", "Dice"), ("2", "HD95")]):
        dec = 3 if metric == "Dice" else 2
        medians = {m: np.nanmedian(raw_values(evaluations["paths"][m], key, metric)) for m in METHODS}
        best = (max if metric == "Dice" else min)(round(v, dec) for v in medians.values())
        for m in METHODS:
            cell = rows[m][ci]
            assert cell.strip("*") == f"{medians[m]:.{dec}f}"
            assert cell.startswith("**") == (round(medians[m], dec) == best)
    # "better" beats "base" here by construction; "same" ties with "base" (both bold or neither)
    assert rows["better"][0].startswith("**")
    assert [c.startswith("**") for c in rows["same"]] == [c.startswith("**") for c in rows["base"]]
    assert "Paired per-case improvement over base" in md

    # paired table: mean / median improvement and Wilcoxon p equal to scipy on the raw values
    with open(out / "paired_differences.csv") as f:
        prow = list(csv.DictReader(f))
    assert len(prow) == 2 * 2 * 2   # 2 methods x 2 classes x 2 metrics
    for r in prow:
        b = raw_values(evaluations["paths"]["base"], r["class"], r["metric"])
        m = raw_values(evaluations["paths"][r["method"]], r["class"], r["metric"])
        ok = np.isfinite(b) & np.isfinite(m)
        d = (m - b)[ok] if r["metric"] == "Dice" else (b - m)[ok]
        assert int(r["n_pairs"]) == d.size
        assert float(r["mean_improvement"]) == pytest.approx(d.mean())
        assert float(r["median_improvement"]) == pytest.approx(np.median(d))
        if r["method"] == "same":
            assert np.all(d == 0) and float(r["p_wilcoxon"]) == 1.0
        else:
            assert float(r["p_wilcoxon"]) == pytest.approx(wilcoxon(d).pvalue, rel=1e-12)
        # the Markdown shows the same p-value
        assert re.search(rf"\| {r['method']} \| {r['name']} \| {r['metric']}[^|]*\| {d.size} \|", md)
    better_dice = [r for r in prow if r["method"] == "better" and r["metric"] == "Dice"]
    assert all(float(r["mean_improvement"]) > 0 for r in better_dice)


def test_boxplot_figure_has_one_box_per_class_and_method(evaluations):
    evals = load_evaluations(named(evaluations))
    fig, axes = plot_boxplots(evals)
    assert set(axes) == {"Dice", "HD95"}
    for metric, ax in axes.items():
        boxes = [p for p in ax.patches if isinstance(p, PathPatch)]
        assert len(boxes) == 2 * len(METHODS)       # 2 classes x 3 methods
        assert [b.get_gid() for b in boxes] == [f"box:{k}:{m}" for k in ("1", "2") for m in METHODS]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2"]
        # each box shows its per-case values: its median line sits at the data median
        medians = {l.get_gid(): l.get_ydata()[0] for l in ax.lines if (l.get_gid() or "").startswith("median:")}
        assert len(medians) == len(boxes)
        for key in ("1", "2"):
            for m in METHODS:
                v = raw_values(evaluations["paths"][m], key, metric)
                assert medians[f"median:{key}:{m}"] == pytest.approx(np.median(v[np.isfinite(v)]))
    legend = axes["Dice"].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == list(METHODS)


def test_paired_plot_and_rows(evaluations):
    evals = load_evaluations(named(evaluations))
    rows = paired_differences(evals, "base")
    assert {(r["method"], r["class"], r["metric"]) for r in rows} == {
        (m, k, met) for m in ("better", "same") for k in ("1", "2") for met in ("Dice", "HD95")}
    fig, axes = plot_paired(rows, evals, "base")
    assert len(axes) == 2 * 2
    # the case where base missed label 2 is a finite pair (Dice 0, HD95 = diagonal), not dropped
    r = next(r for r in rows if r["method"] == "better" and r["class"] == "2" and r["metric"] == "HD95")
    assert r["n_pairs"] == N_CASES and r["differences"][r["cases"].index("case4")] > 0


def test_wilcoxon_p_edge_cases():
    assert wilcoxon_p(np.zeros(6)) == 1.0
    assert np.isnan(wilcoxon_p(np.zeros(0)))
    d = np.array([0.01, 0.03, -0.02, 0.05, 0.04, 0.0, 0.06, 0.02])
    assert wilcoxon_p(d) == pytest.approx(wilcoxon(d).pvalue)
    assert wilcoxon_p(np.array([np.nan, 0.1, 0.2, 0.3, -0.05, 0.15])) == pytest.approx(
        wilcoxon([0.1, 0.2, 0.3, -0.05, 0.15]).pvalue)


def test_compare_without_baseline(evaluations, tmp_path):
    res = compare(named(evaluations)[:2], str(tmp_path / "o"))
    assert set(res["files"]) == {"boxplots", "markdown", "json"}
    assert "Paired" not in (tmp_path / "o" / "comparison.md").read_text()


def test_compare_errors(evaluations, tmp_path, capsys):
    from nnunet_sud.evaluation.evaluate import classes_from_labels, evaluate_folders, write_evaluation

    f = evaluations["folders"]
    # fewer cases
    res = evaluate_folders(str(f["base"]), str(f["ref"]), classes_from_labels([1, 2]))
    res["cases"] = res["cases"][:-2]
    res["per_case"] = res["per_case"][:-2]
    fewer = write_evaluation(res, str(tmp_path / "fewer"))["json"]
    assert main(["compare", f"base={evaluations['paths']['base']}", f"x={fewer}", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "different cases" in err and "case7, case8" in err
    # other classes
    res = evaluate_folders(str(f["base"]), str(f["ref"]), classes_from_labels([1]))
    one = write_evaluation(res, str(tmp_path / "one"))["json"]
    assert main(["compare", f"base={evaluations['paths']['base']}", f"x={one}", "-o", str(tmp_path / "o")]) == 2
    assert "different classes" in capsys.readouterr().err
    # baseline not given among names; malformed pairs; not an evaluation file
    assert main(["compare", f"a={evaluations['paths']['base']}", f"b={evaluations['paths']['better']}",
                 "-o", str(tmp_path / "o"), "--baseline", "zz"]) == 2
    assert "--baseline zz" in capsys.readouterr().err
    with pytest.raises(UserFacingError, match="NAME=path.json"):
        parse_named(["just_a_path.json"])
    with pytest.raises(UserFacingError, match="twice"):
        parse_named(["a=x.json", "a=y.json"])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"mean": {}}))
    assert main(["compare", f"a={other}", "-o", str(tmp_path / "o")]) == 2
    assert "not an 'nnunet-sud evaluate' output" in capsys.readouterr().err


def test_gap_closed_against_an_upper_bound(evaluations, tmp_path):
    """'better' as the upper bound: it closes its own gap (not listed), 'same' closes none (0), by
    the mean Dice over cases computed here from the raw per-case values."""
    res = compare(named(evaluations), str(tmp_path / "gap"), baseline="base", upper="better")
    rows = {r["method"]: r for r in res["gap_closed"]}
    assert set(rows) == {"same"}
    assert rows["same"]["mean"] == 0 and all(v == 0 for v in rows["same"]["per_class"].values())
    # swap roles: 'same' as a method against base -> better, and 'better' against same -> better
    res = compare([("base", evaluations["paths"]["base"]), ("better", evaluations["paths"]["better"]),
                   ("half", evaluations["paths"]["same"])], str(tmp_path / "gap2"), baseline="half", upper="better")
    r = {r["method"]: r for r in res["gap_closed"]}["base"]
    for key in ("1", "2"):
        b = np.nanmean(raw_values(evaluations["paths"]["same"], key, "Dice"))  # 'half' is a copy of base
        u = np.nanmean(raw_values(evaluations["paths"]["better"], key, "Dice"))
        m = np.nanmean(raw_values(evaluations["paths"]["base"], key, "Dice"))
        assert r["per_class"][key] == pytest.approx((m - b) / (u - b) if u > b else np.nan, nan_ok=True)
    md = (tmp_path / "gap2" / "comparison.md").read_text()
    assert "## Fraction of the half -> better gap closed" in md
    saved = json.load(open(tmp_path / "gap2" / "comparison.json"))
    assert saved["upper"] == "better" and saved["gap_closed"][0]["method"] == "base"
    with pytest.raises(UserFacingError, match="--upper"):
        compare(named(evaluations), str(tmp_path / "bad"), baseline=None, upper="better")
