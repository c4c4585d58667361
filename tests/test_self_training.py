"""Self-training's parts on hand-made data: the pseudo-label filter (which voxels become ignore,
which cases are dropped), the quality numbers, the student's label set-up, splits and dataset ids,
and the denoiser's round trip between a prediction's grid and the preprocessed space."""
import json
import math
import os

import numpy as np
import pytest
import torch

from nnunet_sud.errors import UserFacingError
from nnunet_sud.self_training.filtering import (FilterSettings, case_quality, case_score, n_to_keep, pseudo_label,
                                                quality_markdown, select_cases, summarize_round)
from nnunet_sud.self_training.student import (check_student_id, held_out_cases, labels_with_ignore,
                                              student_dataset_name, student_splits)


def _probs(rows):
    """(C, 1, N) from a list of N per-voxel class distributions."""
    return np.asarray(rows, dtype=np.float32).T[:, None, :]


# ---------------------------------------------------------------------- per voxel
def test_voxel_filter_ignores_voxels_below_the_threshold_and_keeps_the_rest():
    p = _probs([[0.90, 0.05, 0.05],   # confident background
                [0.40, 0.35, 0.25],   # no majority: 0.40 < 0.5 -> ignore
                [0.20, 0.50, 0.30],   # exactly at the threshold: kept (only below is ignored)
                [0.10, 0.10, 0.80],   # confident class 2
                [0.30, 0.45, 0.25]])  # 0.45 < 0.5 -> ignore
    labels, ignored = pseudo_label(p, voxel_threshold=0.5, ignore_label=3)
    assert labels.tolist() == [[0, 3, 1, 2, 3]]
    assert ignored.tolist() == [[False, True, False, False, True]]
    # threshold 0 (voxel filter off): plain argmax, nothing ignored, no ignore label needed
    labels, ignored = pseudo_label(p, voxel_threshold=0.0)
    assert labels.tolist() == [[0, 0, 1, 2, 1]] and not ignored.any()
    # a stricter threshold ignores more
    assert pseudo_label(p, voxel_threshold=0.85, ignore_label=3)[0].tolist() == [[0, 3, 3, 3, 3]]


def test_denoised_map_gives_the_labels_but_the_teacher_decides_what_is_uncertain():
    teacher = _probs([[0.9, 0.1, 0.0], [0.45, 0.3, 0.25], [0.2, 0.7, 0.1]])
    denoised = _probs([[0.1, 0.8, 0.1], [0.0, 0.0, 1.0], [0.6, 0.3, 0.1]])
    labels, ignored = pseudo_label(teacher, labels_from=denoised, voxel_threshold=0.5, ignore_label=3)
    assert labels.tolist() == [[1, 3, 0]]  # denoised argmax, except where the teacher is unsure (0.45)
    assert ignored.tolist() == [[False, True, False]]


# ---------------------------------------------------------------------- per case
def test_case_scores_are_means_over_the_teachers_foreground_voxels():
    p = _probs([[0.99, 0.01, 0.00],   # background: not counted
                [0.10, 0.90, 0.00],
                [0.30, 0.60, 0.10]])
    assert case_score(p, "confidence") == pytest.approx((0.90 + 0.60) / 2)
    h1 = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9)) / math.log(3)            # 0.29590
    h2 = -(0.3 * math.log(0.3) + 0.6 * math.log(0.6) + 0.1 * math.log(0.1)) / math.log(3)  # 0.81735
    assert case_score(p, "entropy") == pytest.approx(1 - (h1 + h2) / 2, abs=1e-6)
    assert case_score(p, "entropy") == pytest.approx(0.44337, abs=1e-4)
    assert math.isnan(case_score(_probs([[0.6, 0.4, 0.0], [0.9, 0.05, 0.05]])))  # no foreground: no score


def test_case_filter_keeps_the_best_fraction_rounded_up_and_never_a_case_without_score():
    scores = {"a": 0.9, "b": 0.5, "c": float("nan"), "d": 0.7, "e": 0.7}
    assert select_cases(scores, 0.8) == ["a", "b", "d", "e"]        # ceil(0.8 * 5) = 4; c has no score
    assert select_cases(scores, 0.5) == ["a", "d", "e"]             # ceil(2.5) = 3
    assert select_cases(scores, 0.3) == ["a", "d"]                  # ceil(1.5) = 2, tie d/e broken by id
    assert select_cases(scores, 1.0, min_score=0.6) == ["a", "d", "e"]
    assert select_cases(scores, 1.0) == ["a", "b", "d", "e"]
    assert [n_to_keep(5, 0.8), n_to_keep(10, 0.7), n_to_keep(3, 0.1), n_to_keep(4, 1.0)] == [4, 7, 1, 4]


def test_filter_settings_are_checked_with_the_option_named():
    assert FilterSettings().per_case and FilterSettings().per_voxel
    assert not FilterSettings(filter="case").per_voxel and not FilterSettings(filter="voxel").per_case
    assert not FilterSettings(voxel_threshold=0.0).per_voxel
    for kwargs, option in (({"keep_fraction": 0.0}, "--keep-fraction"), ({"voxel_threshold": 1.5}, "--voxel-threshold"),
                           ({"filter": "most"}, "--filter"), ({"case_score": "x"}, "--case-score")):
        with pytest.raises(UserFacingError, match=option):
            FilterSettings(**kwargs).check()


# ---------------------------------------------------------------------- quality
def test_pseudo_label_dice_excludes_ignored_voxels_and_the_summary_averages_per_class():
    ref = np.array([[0, 1, 1, 2, 2, 0]])
    teacher = np.array([[0, 1, 0, 2, 1, 0]])
    pseudo = np.array([[0, 1, 3, 2, 3, 0]])  # the two wrong voxels were ignored
    q = case_quality(ref, [1, 2], {"teacher": (teacher, None), "pseudo_label": (pseudo, pseudo == 3)})
    # teacher: class 1 TP 1, FP 1, FN 1 -> 2/4; class 2: TP 1, FN 1 -> 2/3
    assert q["teacher"] == {"1": pytest.approx(0.5), "2": pytest.approx(2 / 3)}
    assert q["pseudo_label"] == {"1": 1.0, "2": 1.0}  # on the voxels the student learns from
    records = {"u1": {"kept": True, "voxels_kept": 4 / 6, "dice": q},
               "u2": {"kept": False, "voxels_kept": 1.0,
                      "dice": {"teacher": {"1": 0.0, "2": float("nan")}, "pseudo_label": {"1": 0.0, "2": float("nan")}}},
               "u3": {"kept": True, "voxels_kept": 1.0}}  # no withheld label
    s = summarize_round(records, [1, 2])
    assert (s["cases"], s["cases_kept"], s["cases_with_label"]) == (3, 2, 2)
    assert s["voxels_kept"] == pytest.approx((4 / 6 + 1) / 2)
    assert s["dice"]["teacher"]["per_class"] == {"1": pytest.approx(0.25), "2": pytest.approx(2 / 3)}  # NaN skipped
    assert s["dice"]["teacher_kept"]["per_class"] == {"1": pytest.approx(0.5), "2": pytest.approx(2 / 3)}
    assert s["dice"]["pseudo_label"]["per_class"] == {"1": 1.0, "2": 1.0} and s["dice"]["pseudo_label"]["cases"] == 1
    md = quality_markdown([(1, s)], {"1": "RV", "2": "LV"})
    assert "| 1 | 2/3 | 83.3% | 0.250/0.667 (mean 0.458) |" in md and "Dice pseudo-labels (RV/LV)" in md


# ---------------------------------------------------------------------- the student dataset
def test_ignore_label_is_the_highest_label_plus_one_and_regions_are_refused():
    labels, ignore = labels_with_ignore({"background": 0, "a": 1, "b": 2})
    assert ignore == 3 and labels == {"background": 0, "a": 1, "b": 2, "ignore": 3}
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    assert LabelManager(labels, None).ignore_label == 3  # what nnU-Net 2.8.1 accepts
    assert labels_with_ignore({"background": 0, "a": 1, "ignore": 2}) == ({"background": 0, "a": 1, "ignore": 2}, 2)
    with pytest.raises(UserFacingError, match="region-based"):
        labels_with_ignore({"background": 0, "whole": [1, 2], "core": 2}, [1, 2])


def test_student_splits_keep_validation_cases_and_put_pseudo_cases_in_the_folds_training_only():
    teacher = [{"train": ["l0", "l1", "l2"], "val": ["l3"]}, {"train": ["l1", "l2", "l3"], "val": ["l0"]}]
    splits, left_out = student_splits(teacher, 0, ["u0", "u1", "u2"], groups={"p0": ["l3", "u2"], "p1": ["u0", "l1"]})
    assert splits[0] == {"train": ["l0", "l1", "l2", "u0", "u1"], "val": ["l3"]}
    assert left_out == ["u2"]  # its patient p0 has the validation case l3
    assert splits[1] == teacher[1]  # other folds: the teacher's (their teachers did not make these pseudo-labels)
    with pytest.raises(UserFacingError, match="fold 2"):
        student_splits(teacher, 2, ["u0"])
    with pytest.raises(UserFacingError, match="share case ids"):
        student_splits(teacher, 0, ["l3"])


def test_held_out_cases_come_from_imagesTs_labelsTs_and_split_json(tmp_path):
    for folder, name in (("imagesTs", "t1_0000.nii.gz"), ("imagesTs", "t1_0001.nii.gz"), ("labelsTs", "t2.nii.gz"),
                         ("imagesTr", "l1_0000.nii.gz")):
        os.makedirs(tmp_path / folder, exist_ok=True)
        (tmp_path / folder / name).write_bytes(b"")
    (tmp_path / "split.json").write_text(json.dumps({"test": ["t3"], "labeled": ["l1"]}))
    assert held_out_cases(str(tmp_path), ".nii.gz") == {"t1", "t2", "t3"}


def test_student_dataset_ids_are_checked_before_anything_is_written(tmp_path):
    folders = {k: str(tmp_path / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for f in folders.values():
        os.makedirs(f)
    settings = {"teacher_dataset": "Dataset991_X", "fold": "0"}
    name = student_dataset_name(801, "Dataset991_X", 1)
    assert name == "Dataset801_X_selftrain_r1"
    assert check_student_id(801, name, settings, folders) is False  # free
    os.makedirs(os.path.join(folders["nnUNet_preprocessed"], "Dataset802_Other"))
    with pytest.raises(UserFacingError, match="taken by Dataset802_Other"):
        check_student_id(802, student_dataset_name(802, "Dataset991_X", 2), settings, folders)
    os.makedirs(os.path.join(folders["nnUNet_results"], name))
    with pytest.raises(UserFacingError, match="not a student dataset of this run"):
        check_student_id(801, name, settings, folders)
    os.makedirs(os.path.join(folders["nnUNet_raw"], name))
    with open(os.path.join(folders["nnUNet_raw"], name, "self_training.json"), "w") as f:
        json.dump({"settings": settings, "round": 1}, f)
    assert check_student_id(801, name, settings, folders) is True  # ours: resumable
    with pytest.raises(UserFacingError, match="differing: fold"):
        check_student_id(801, name, {**settings, "fold": "1"}, folders)
    with pytest.raises(UserFacingError, match="outside nnU-Net's 1-999"):
        check_student_id(1000, "Dataset1000_X_selftrain_r1", settings, folders)


# ---------------------------------------------------------------------- offline denoising: coordinates
class _IdentityDenoiser(torch.nn.Module):
    """Returns log of its input: the 'denoised' map is the denoiser's input encoding itself."""

    def forward(self, x):
        return torch.log(x)


def test_denoising_maps_a_prediction_into_preprocessed_space_and_back_exactly(synthetic3d):
    """A prediction on a case grid with another axis order and a crop box: mapped into the
    preprocessed space of the 2d configuration (same spacing, so no resampling), through an
    identity denoiser and back, its argmax is unchanged voxel for voxel; a wrong transpose or
    crop would move it."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_sud.self_training.denoise import denoise_probabilities, to_preprocessed_space
    plans = load_json(os.path.join(synthetic3d["preprocessed"], "nnUNetPlans.json"))
    plans["transpose_forward"], plans["transpose_backward"] = [1, 2, 0], [2, 0, 1]
    pm = PlansManager(plans)
    cm = pm.get_configuration("2d")
    dataset_json = load_json(os.path.join(synthetic3d["raw"], "dataset.json"))
    rng = np.random.default_rng(0)
    grid = (20, 6, 40)  # the reader's axis order; transposed forward: (6, 40, 20)
    bbox = [[1, 5], [3, 37], [2, 18]]  # in the transposed order
    props = {"spacing": [float(cm.spacing[1]), 3.0, float(cm.spacing[0])],  # transposed: (3, sp0, sp1)
             "shape_before_cropping": (6, 40, 20), "bbox_used_for_cropping": bbox,
             "shape_after_cropping_and_before_resampling": (4, 34, 16)}
    logits = rng.normal(size=(4, *grid)).astype(np.float32) * 3
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    pre = to_preprocessed_space(probs, props, pm, cm)
    assert pre.shape == (4, 4, 34, 16)
    np.testing.assert_allclose(pre, probs.transpose(0, 2, 3, 1)[:, 1:5, 3:37, 2:18], atol=1e-6)
    out = denoise_probabilities(_IdentityDenoiser(), probs, props, pm, cm, dataset_json, torch.device("cpu"))
    assert out.shape == probs.shape
    inside = np.zeros((6, 40, 20), bool)
    inside[1:5, 3:37, 2:18] = True
    inside = inside.transpose(2, 0, 1)  # back to the reader's axis order
    assert (out.argmax(0)[inside] == probs.argmax(0)[inside]).all()
    assert (out.argmax(0)[~inside] == 0).all()  # outside the crop: background, as nnU-Net exports
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)


# ---------------------------------------------------------------------- what the command refuses up front
def _selftrain_args(*extra):
    from nnunet_sud.cli import build_parser
    return build_parser().parse_args(["self-train", "-d", "871", "-c", "2d", "--device", "cpu", *map(str, extra)])


def _teacher_tree(tmp_path, monkeypatch, synthetic3d, labels=None, test_in_unlabeled=False, plans_edit=None):
    """A minimal teacher dataset Dataset871_T in a fresh nnU-Net tree (the synthetic task's plans)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    folders = {k: tmp_path / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    raw, pre = folders["nnUNet_raw"] / "Dataset871_T", folders["nnUNet_preprocessed"] / "Dataset871_T"
    for d in (raw / "imagesUnlabeled", raw / "imagesTs", pre, folders["nnUNet_results"]):
        os.makedirs(d)
    for k, v in folders.items():
        monkeypatch.setenv(k, str(v))
    save_json({"channel_names": {"0": "MRI"}, "labels": labels or {"background": 0, "a": 1}, "numTraining": 1,
               "file_ending": ".nii.gz"}, str(raw / "dataset.json"))
    (raw / "imagesUnlabeled" / "u1_0000.nii.gz").write_bytes(b"")
    (raw / "imagesTs" / ("u1_0000.nii.gz" if test_in_unlabeled else "t1_0000.nii.gz")).write_bytes(b"")
    plans = load_json(os.path.join(synthetic3d["preprocessed"], "nnUNetPlans.json"))
    plans["dataset_name"] = "Dataset871_T"
    if plans_edit:
        plans_edit(plans)
    save_json(plans, str(pre / "nnUNetPlans.json"))
    return folders


def test_self_train_refuses_what_cannot_work_before_anything_runs(tmp_path, monkeypatch, synthetic3d):
    from nnunet_sud.self_training.pipeline import SelfTraining
    folders = _teacher_tree(tmp_path / "a", monkeypatch, synthetic3d, test_in_unlabeled=True)
    with pytest.raises(UserFacingError, match=r"imagesUnlabeled .* holds test cases \(u1"):
        SelfTraining(_selftrain_args())
    _teacher_tree(tmp_path / "b", monkeypatch, synthetic3d, labels={"background": 0, "whole": [1, 2], "core": 2})
    with pytest.raises(UserFacingError, match="region-based"):
        SelfTraining(_selftrain_args())

    def cascade(plans):
        plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    _teacher_tree(tmp_path / "c", monkeypatch, synthetic3d, plans_edit=cascade)
    from nnunet_sud.cli import build_parser
    with pytest.raises(UserFacingError, match="cascade stage"):
        SelfTraining(build_parser().parse_args(["self-train", "-d", "871", "-c", "3d_cascade_fullres"]))
    folders = _teacher_tree(tmp_path / "d", monkeypatch, synthetic3d)
    with pytest.raises(UserFacingError, match="--student-trainer nnUNetTrainerSUD: .*semi-supervised"):
        SelfTraining(_selftrain_args("--student-trainer", "nnUNetTrainerSUD"))
    with pytest.raises(UserFacingError, match="--student-trainer nnUNetTrainerNoSuchThing: nnU-Net finds no such"):
        SelfTraining(_selftrain_args("--student-trainer", "nnUNetTrainerNoSuchThing"))
    with pytest.raises(UserFacingError, match="not both"):
        SelfTraining(_selftrain_args("--teacher-trainer", "nnUNetTrainer", "--teacher-model", str(tmp_path)))
    # an existing model folder whose plans are not the teacher dataset's: the students could not reuse them
    model = tmp_path / "nnUNetTrainer__nnUNetPlans__2d"
    os.makedirs(model / "fold_0")
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"")
    plans = json.load(open(folders["nnUNet_preprocessed"] / "Dataset871_T" / "nnUNetPlans.json"))
    plans["configurations"]["2d"]["batch_size"] += 1
    (model / "plans.json").write_text(json.dumps(plans))
    (model / "dataset.json").write_text((folders["nnUNet_raw"] / "Dataset871_T" / "dataset.json").read_text())
    with pytest.raises(UserFacingError, match="its plans.json differs from .* pass -p <NAME>"):
        SelfTraining(_selftrain_args("--teacher-model", str(model)))
    # nothing was written by the refused runs
    assert not os.listdir(folders["nnUNet_results"])
    assert sorted(os.listdir(folders["nnUNet_raw"])) == ["Dataset871_T"]
