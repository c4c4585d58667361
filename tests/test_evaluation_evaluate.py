"""``nnunet-sud evaluate`` end to end on NIfTI files written here with SimpleITK."""
import csv
import json
import math
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_sud.cli import main
from nnunet_sud.evaluation.evaluate import evaluate_folders, classes_from_labels, load_evaluation
from nnunet_sud.evaluation.metrics import dice, hd95, image_diagonal

# SimpleITK spacing is (x, y, z); numpy arrays from GetArrayFromImage are (z, y, x), and nnU-Net
# reports the spacing in array order: (z, y, x).
SPACING_XYZ = (0.7, 0.9, 2.5)
SPACING_ZYX = SPACING_XYZ[::-1]
SHAPE = (12, 20, 18)


def write(path, arr, spacing_xyz=SPACING_XYZ):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing_xyz))
    sitk.WriteImage(img, path, True)


def cube(shape, lo, hi, value, out=None):
    out = np.zeros(shape, np.uint8) if out is None else out
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = value
    return out


def make_cases():
    """{case: (reference, prediction)} arrays (z, y, x), labels 1 and 2, covering every status.

    * c0: label 1 an 8x8x8 cube, prediction shifted by k = 2 slices along z (spacing s = 2.5 mm):
      no surface voxel is farther than k s from the other surface, and each cube's face at its
      leading end (64 of 296 surface voxels, 22% > 5%) is exactly k s away, so HD95 = k s = 5 mm
      (see test_evaluation_metrics for the full derivation); label 2 predicted exactly.
    * c1: label 1 shifted by 1 voxel along y; label 2 missed (absent from the prediction).
    * c2: label 1 identical; label 2 absent from reference and prediction (both empty).
    * c3: label 1 slightly different; label 2 predicted where the reference has none.
    """
    cases = {}
    r = cube(SHAPE, (1, 2, 2), (9, 10, 10), 1)
    p = cube(SHAPE, (3, 2, 2), (11, 10, 10), 1)
    cube(SHAPE, (2, 12, 12), (5, 16, 16), 2, r)
    cube(SHAPE, (2, 12, 12), (5, 16, 16), 2, p)
    cases["c0"] = (r, p)
    r = cube(SHAPE, (2, 3, 3), (8, 11, 12), 1)
    p = cube(SHAPE, (2, 4, 3), (8, 12, 12), 1)
    cube(SHAPE, (8, 14, 14), (10, 17, 17), 2, r)
    cases["c1"] = (r, p)
    r = cube(SHAPE, (3, 5, 5), (7, 12, 12), 1)
    cases["c2"] = (r, r.copy())
    r = cube(SHAPE, (1, 1, 1), (10, 9, 9), 1)
    p = cube(SHAPE, (1, 1, 1), (10, 9, 8), 1)
    cube(SHAPE, (2, 14, 2), (4, 18, 6), 2, p)
    cases["c3"] = (r, p)
    return cases


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    ref, pred = root / "ref", root / "pred"
    ref.mkdir()
    pred.mkdir()
    cases = make_cases()
    for c, (r, p) in cases.items():
        write(str(ref / f"{c}.nii.gz"), r)
        write(str(pred / f"{c}.nii.gz"), p)
    # files that are no segmentations of the set must be ignored
    (pred / "plans.json").write_text("{}")
    return {"root": root, "ref": str(ref), "pred": str(pred), "cases": cases}


def run_cli(*args):
    return main([str(a) for a in args])


def test_evaluate_end_to_end(folders, tmp_path):
    out = tmp_path / "res" / "ev"
    assert run_cli("evaluate", "-pred", folders["pred"], "-ref", folders["ref"], "-o", out, "--labels", 1, 2) == 0
    res = json.loads((tmp_path / "res" / "ev.json").read_text())   # strict JSON: NaN stored as null
    assert res["cases"] == ["c0", "c1", "c2", "c3"]
    assert [c["key"] for c in res["classes"]] == ["1", "2"]
    diag = image_diagonal(SHAPE, SPACING_ZYX)
    by_case = {pc["case"]: pc["metrics"] for pc in res["per_case"]}
    for pc in res["per_case"]:
        assert pc["spacing"] == pytest.approx(SPACING_ZYX)
        assert pc["shape"] == list(SHAPE)

    # known answers
    assert by_case["c0"]["1"]["HD95"] == pytest.approx(2 * SPACING_ZYX[0])
    assert by_case["c0"]["1"]["Dice"] == pytest.approx(2 * 6 / (8 + 8))     # 6 of 8 slices overlap
    assert by_case["c0"]["2"]["Dice"] == 1.0 and by_case["c0"]["2"]["HD95"] == 0.0
    assert by_case["c1"]["2"]["Dice"] == 0.0 and by_case["c1"]["2"]["status"] == "missed"
    assert by_case["c1"]["2"]["HD95"] == pytest.approx(diag)
    assert by_case["c2"]["2"]["status"] == "both_empty"
    assert by_case["c2"]["2"]["Dice"] is None and by_case["c2"]["2"]["HD95"] is None
    assert by_case["c2"]["1"]["Dice"] == 1.0 and by_case["c2"]["1"]["HD95"] == 0.0
    assert by_case["c3"]["2"]["status"] == "false_positive" and by_case["c3"]["2"]["Dice"] == 0.0
    assert by_case["c3"]["2"]["HD95"] == pytest.approx(diag)

    # every value against the metric functions on the arrays written
    for c, (r, p) in folders["cases"].items():
        for lab in (1, 2):
            m = by_case[c][str(lab)]
            d, h = dice(p == lab, r == lab), hd95(p == lab, r == lab, SPACING_ZYX)
            if np.isnan(d):
                assert m["Dice"] is None and m["HD95"] is None
            else:
                assert m["Dice"] == pytest.approx(d) and m["HD95"] == pytest.approx(h)
            assert m["n_ref"] == int((r == lab).sum()) and m["n_pred"] == int((p == lab).sum())

    # summary: statistics of the finite per-case values; both-empty excluded and counted
    for key in ("1", "2"):
        s = res["summary"][key]
        for metric in ("Dice", "HD95"):
            v = np.array([by_case[c][key][metric] for c in res["cases"] if by_case[c][key][metric] is not None])
            assert s[metric]["n"] == v.size
            assert s[metric]["mean"] == pytest.approx(v.mean())
            assert s[metric]["median"] == pytest.approx(np.median(v))
            assert s[metric]["std"] == pytest.approx(v.std(ddof=1))
    s2 = res["summary"]["2"]
    assert (s2["n_cases"], s2["n_ok"], s2["n_both_empty"], s2["n_missed"], s2["n_false_positive"]) == (4, 1, 1, 1, 1)
    assert s2["Dice"]["n"] == 3
    assert res["foreground_mean"]["Dice"] == pytest.approx(
        np.mean([res["summary"][k]["Dice"]["mean"] for k in ("1", "2")]))

    # CSVs hold the same numbers
    with open(tmp_path / "res" / "ev_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 2
    for row in rows:
        m = by_case[row["case"]][row["class"]]
        for metric in ("Dice", "HD95"):
            if m[metric] is None:
                assert row[metric] == "NaN"
            else:
                assert float(row[metric]) == pytest.approx(m[metric])
        assert row["status"] == m["status"]
    with open(tmp_path / "res" / "ev_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2
    for row in rows:
        st = res["summary"][row["class"]][row["metric"]]
        assert float(row["median"]) == pytest.approx(st["median"])
        assert int(row["n_both_empty"]) == res["summary"][row["class"]]["n_both_empty"]

    # load_evaluation turns null back into NaN
    ev = load_evaluation(str(tmp_path / "res" / "ev.json"))
    assert math.isnan(ev["per_case"][2]["metrics"]["2"]["Dice"])


def test_dice_agrees_with_nnunet_evaluator(folders):
    """Per case and class the same Dice (and NaN for both-empty) as nnU-Net's compute_metrics."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    res = evaluate_folders(folders["pred"], folders["ref"], classes_from_labels([1, 2]))
    for pc in res["per_case"]:
        nn = compute_metrics(pc["reference_file"], pc["prediction_file"], SimpleITKIO(), [1, 2])
        for lab in (1, 2):
            ours, theirs = pc["metrics"][str(lab)], nn["metrics"][lab]
            if np.isnan(theirs["Dice"]):
                assert np.isnan(ours["Dice"])
            else:
                assert ours["Dice"] == pytest.approx(theirs["Dice"], abs=1e-15)
            assert (ours["TP"], ours["FP"], ours["FN"]) == (theirs["TP"], theirs["FP"], theirs["FN"])


def test_regions_from_dataset_json(folders, tmp_path):
    """Region-based dataset.json: one class per region, named as in dataset.json; Dice as nnU-Net."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    dj = {"labels": {"background": 0, "whole": [1, 2], "inner": 2}, "regions_class_order": [1, 2],
          "file_ending": ".nii.gz", "channel_names": {"0": "MR"}, "numTraining": 4}
    djfile = tmp_path / "dataset.json"
    djfile.write_text(json.dumps(dj))
    assert run_cli("evaluate", "-pred", folders["pred"], "-ref", folders["ref"], "-o", tmp_path / "r",
                   "-djfile", djfile) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert [(c["key"], c["name"], c["labels"]) for c in res["classes"]] == [("(1, 2)", "whole", [1, 2]),
                                                                            ("2", "inner", [2])]
    for pc in res["per_case"]:
        nn = compute_metrics(pc["reference_file"], pc["prediction_file"], SimpleITKIO(), [(1, 2), 2])
        r, p = folders["cases"][pc["case"]]
        whole = pc["metrics"]["(1, 2)"]
        assert whole["Dice"] == pytest.approx(nn["metrics"][(1, 2)]["Dice"])
        assert whole["HD95"] == pytest.approx(hd95(p > 0, r > 0, SPACING_ZYX))


def test_2d_images(tmp_path):
    """2d NIfTI files (read by nnU-Net as (1, 1, Y, X)) are evaluated in 2d with their pixel spacing:
    one-pixel bars of length 20 shifted by 20 rows give HD95 = 19.05 * row spacing
    (derivation in test_evaluation_metrics.test_hd95_2d_bars_interpolated_percentile)."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    r = np.zeros((44, 5), np.uint8)
    p = np.zeros((44, 5), np.uint8)
    r[1:21, 2] = 1
    p[21:41, 2] = 1
    spacing_xy = (3.0, 0.8)   # x = columns, y = rows
    write(str(ref / "a.nii.gz"), r, spacing_xy)
    write(str(pred / "a.nii.gz"), p, spacing_xy)
    res = evaluate_folders(str(pred), str(ref), classes_from_labels([1]))
    m = res["per_case"][0]
    assert m["shape"] == [44, 5] and m["spacing"] == pytest.approx([0.8, 3.0])
    assert m["metrics"]["1"]["HD95"] == pytest.approx(19.05 * 0.8)
    assert m["metrics"]["1"]["Dice"] == 0.0 and m["metrics"]["1"]["status"] == "ok"
    # nnU-Net's 2d layout as a 3d file with one slice, (1, Y, X): same answer
    write(str(ref / "b.nii.gz"), r[None], (3.0, 0.8, 1.0))
    write(str(pred / "b.nii.gz"), p[None], (3.0, 0.8, 1.0))
    res = evaluate_folders(str(pred), str(ref), classes_from_labels([1]))
    assert res["per_case"][1]["metrics"]["1"]["HD95"] == pytest.approx(19.05 * 0.8)


def test_parallel_equals_serial(folders):
    a = evaluate_folders(folders["pred"], folders["ref"], classes_from_labels([1, 2]), num_processes=1)
    b = evaluate_folders(folders["pred"], folders["ref"], classes_from_labels([1, 2]), num_processes=2)
    assert json.dumps(a["per_case"], default=str) == json.dumps(b["per_case"], default=str)


# ------------------------------------------------------------------------------ error paths
def copy_folders(folders, tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    shutil.copytree(folders["ref"], ref)
    shutil.copytree(folders["pred"], pred)
    return ref, pred


def test_error_missing_and_extra_cases(folders, tmp_path, capsys):
    ref, pred = copy_folders(folders, tmp_path)
    os.remove(pred / "c1.nii.gz")
    os.remove(pred / "c3.nii.gz")
    assert run_cli("evaluate", "-pred", pred, "-ref", ref, "-o", tmp_path / "x", "--labels", 1) == 2
    err = capsys.readouterr().err
    assert "2 reference case(s)" in err and "c1, c3" in err and "--only-predicted" in err
    assert not (tmp_path / "x.json").exists()
    # --only-predicted evaluates the rest and records what was left out
    assert run_cli("evaluate", "-pred", pred, "-ref", ref, "-o", tmp_path / "x", "--labels", 1,
                   "--only-predicted") == 0
    res = json.loads((tmp_path / "x.json").read_text())
    assert res["cases"] == ["c0", "c2"] and res["reference_cases_not_predicted"] == ["c1", "c3"]
    # a prediction without reference is always an error
    shutil.copy(pred / "c0.nii.gz", pred / "zz.nii.gz")
    assert run_cli("evaluate", "-pred", pred, "-ref", ref, "-o", tmp_path / "x", "--labels", 1,
                   "--only-predicted") == 2
    err = capsys.readouterr().err
    assert "have no reference" in err and "zz" in err


def test_error_shape_and_spacing(folders, tmp_path, capsys):
    ref, pred = copy_folders(folders, tmp_path)
    write(str(pred / "c2.nii.gz"), np.zeros((12, 20, 17), np.uint8))
    assert run_cli("evaluate", "-pred", pred, "-ref", ref, "-o", tmp_path / "x", "--labels", 1) == 2
    err = capsys.readouterr().err
    assert "case c2" in err and "shape" in err and str(pred / "c2.nii.gz") in err

    r, p = folders["cases"]["c2"]
    # within the relative tolerance of 1e-3: accepted
    write(str(pred / "c2.nii.gz"), p, tuple(s * (1 + 2e-4) for s in SPACING_XYZ))
    assert run_cli("evaluate", "-pred", pred, "-ref", ref, "-o", tmp_path / "x", "--labels", 1) == 0
    # beyond it: an error naming both spacings
    write(str(pred / "c2.nii.gz"), p, (0.7, 0.9, 2.51))
    assert run_cli("evaluate", "-pred", pred, "-ref", ref, "-o", tmp_path / "x", "--labels", 1) == 2
    err = capsys.readouterr().err
    assert "case c2" in err and "spacing" in err and "2.51" in err


def test_error_inputs(folders, tmp_path, capsys):
    assert run_cli("evaluate", "-pred", tmp_path / "nope", "-ref", folders["ref"], "-o", tmp_path / "x",
                   "--labels", 1) == 2
    assert "folder not found" in capsys.readouterr().err
    assert run_cli("evaluate", "-pred", folders["pred"], "-ref", folders["ref"], "-o", tmp_path / "x",
                   "--labels", 0, 1) == 2
    assert "background" in capsys.readouterr().err
    assert run_cli("evaluate", "-pred", folders["pred"], "-ref", folders["ref"], "-o", tmp_path / "x",
                   "--labels", 1, "--file-ending", ".nrrd") == 2
    assert "no files ending in '.nrrd'" in capsys.readouterr().err
    ref, pred = copy_folders(folders, tmp_path)
    (pred / "c0.nii.gz").write_bytes(b"not a nifti")
    assert run_cli("evaluate", "-pred", pred, "-ref", ref, "-o", tmp_path / "x", "--labels", 1) == 2
    assert "cannot read segmentation" in capsys.readouterr().err
    bad_dj = tmp_path / "dj.json"
    bad_dj.write_text(json.dumps({"labels": {"cavity": 1}}))
    assert run_cli("evaluate", "-pred", folders["pred"], "-ref", folders["ref"], "-o", tmp_path / "x",
                   "-djfile", bad_dj) == 2
    assert "nnU-Net cannot interpret" in capsys.readouterr().err


def test_error_predicted_values_not_in_dataset_json(folders, tmp_path, capsys):
    """Values dataset.json does not declare would count as background: every such file and its values
    are named (all cases read first), with -np 1 and with worker processes."""
    ref, pred = copy_folders(folders, tmp_path)
    r1, p1 = folders["cases"]["c1"]
    write(str(pred / "c1.nii.gz"), cube(SHAPE, (0, 0, 0), (1, 1, 1), 4, p1.copy()))
    r3, p3 = folders["cases"]["c3"]
    write(str(pred / "c3.nii.gz"), cube(SHAPE, (11, 0, 0), (12, 2, 2), 7, cube(SHAPE, (0, 0, 0), (1, 1, 1), 5,
                                                                                p3.copy())))
    dj = tmp_path / "dataset.json"
    dj.write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nii.gz"}))
    for n_proc in (1, 2):
        assert run_cli("evaluate", "-pred", pred, "-ref", ref, "-o", tmp_path / "x", "-djfile", dj,
                       "-np", n_proc) == 2
        err = capsys.readouterr().err
        assert f"2 prediction(s) in {pred} contain label values that dataset.json does not declare" in err
        assert "(declared: 0, 1, 2): c1.nii.gz: [4], c3.nii.gz: [5, 7]" in err and "c0.nii.gz" not in err
        assert not (tmp_path / "x.json").exists()
    # declared -> evaluated; without dataset.json (--labels) nothing is declared, nothing is checked
    dj.write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2, "c": 4, "d": 5, "e": 7},
                              "file_ending": ".nii.gz"}))
    assert run_cli("evaluate", "-pred", pred, "-ref", ref, "-o", tmp_path / "y", "-djfile", dj) == 0
    assert "undeclared_values" not in (tmp_path / "y.json").read_text()
    assert run_cli("evaluate", "-pred", pred, "-ref", ref, "-o", tmp_path / "z", "--labels", 1, 2) == 0
