"""Single-slice 2d datasets end to end (PNG-style cases: nnU-Net arrays of shape (1, 1, Y, X)).

``nnunet-sud synthetic --dim 2d`` -> ``nnUNetv2_plan_and_preprocess`` -> ``nnunet-sud
preprocess-unlabeled`` -> ``nnUNetv2_train ... -tr nnUNetTrainerLabelDenoiser_tiny`` (its per-epoch
and final noisy-vs-denoised validation run on (1, Y, X) label maps, where the z axis of size 1 was
once taken for a channel axis) -> ``nnUNetv2_train ... -tr nnUNetTrainerSUD_tiny`` with that
denoiser -> ``nnUNetv2_predict``. All through the real commands, on CPU.
"""
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

from conftest import nnunet_sud_cmd, run_cmd

DATASET_ID = 942  # outside test_conversion.py's 950-969
NAME = "Dataset942_Synthetic2D"


@pytest.mark.e2e
def test_single_slice_2d_denoiser_sud_predict(nnunet_dirs, tmp_path):
    raw = os.path.join(nnunet_dirs["nnUNet_raw"], NAME)
    pre = os.path.join(nnunet_dirs["nnUNet_preprocessed"], NAME)
    res = os.path.join(nnunet_dirs["nnUNet_results"], NAME)
    for f in (raw, pre, res):
        shutil.rmtree(f, ignore_errors=True)
    run_cmd(nnunet_sud_cmd("synthetic", "-d", DATASET_ID, "--dim", "2d", "--labeled", 4, "--unlabeled", 4,
                           "--test", 1, "--shape", 64, 64))
    run_cmd(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "-np", "1"])
    run_cmd(nnunet_sud_cmd("preprocess-unlabeled", "-d", DATASET_ID, "-c", "2d", "-np", 1))
    train_ids = sorted(f[:-len(".nii.gz")] for f in os.listdir(os.path.join(raw, "labelsTr")))
    save_json([{"train": train_ids[:3], "val": train_ids[3:]}], os.path.join(pre, "splits_final.json"))
    cfg = load_json(os.path.join(pre, "nnUNetPlans.json"))["configurations"]["2d"]
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    folder = os.path.join(pre, cfg["data_identifier"])
    _, seg, _, _ = infer_dataset_class(folder)(folder, [train_ids[0]]).load_case(train_ids[0])
    assert seg.shape[:2] == (1, 1) and seg.ndim == 4, "the case under test is a single slice (1, 1, Y, X)"

    # the denoiser: per-epoch evaluation after epoch 0 and the final validation run on (1, Y, X) maps
    den = "nnUNetTrainerLabelDenoiser_tiny"
    out = run_cmd(["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", den, "-device", "cpu"])
    assert "Denoiser validation, noisy vs denoised (1 case(s))" in out
    den_fold = os.path.join(res, f"{den}__nnUNetPlans__2d", "fold_0")
    val = load_json(os.path.join(den_fold, "denoiser_validation.json"))
    assert val["final"]["cases"] == train_ids[3:] and val["configuration"] == "2d"
    assert [(s["sigma"], s["scale"]) for s in val["final"]["settings"]] == [(4.0, 4.0)]
    assert len(val["history"]) == 2  # evaluated after both epochs
    for s in val["final"]["settings"]:
        for kind in ("noisy", "denoised"):
            d = s[kind]["dice"]
            assert d is not None and 0 <= d <= 1  # scored on the map, not on a mangled one

    # SUD with this denoiser, then inference from the model folder
    sud = "nnUNetTrainerSUD_tiny"
    env = dict(os.environ, nnUNet_denoiser=den_fold, SUD_TEST_SKIP_FINAL_VALIDATION="1")
    run_cmd(["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", sud, "-device", "cpu"], env=env)
    sud_fold = os.path.join(res, f"{sud}__nnUNetPlans__2d", "fold_0")
    ckpt = torch.load(os.path.join(sud_fold, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 2

    inp = tmp_path / "in"
    inp.mkdir()
    test_img = sorted(os.listdir(os.path.join(raw, "imagesTs")))[0]
    shutil.copy(os.path.join(raw, "imagesTs", test_img), inp)
    pred_dir = tmp_path / "pred"
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_denoiser"}
    run_cmd(["nnUNetv2_predict", "-i", str(inp), "-o", str(pred_dir), "-d", str(DATASET_ID), "-c", "2d", "-f", "0",
             "-tr", sud, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env=env)
    case = test_img[:-len("_0000.nii.gz")]
    pred = sitk.ReadImage(str(pred_dir / f"{case}.nii.gz"))
    ref = sitk.ReadImage(os.path.join(raw, "labelsTs", f"{case}.nii.gz"))
    assert pred.GetSize() == ref.GetSize() and pred.GetSize()[2] == 1
    labels = {int(v) for v in load_json(os.path.join(raw, "dataset.json"))["labels"].values()}
    assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= labels
