"""SUD and TE end to end through nnUNetv2_train on CPU: a trained denoiser found through
nnUNet_denoiser, an interrupted run, --c restoring exactly the soft-target store of the checkpoint,
clean-up, and prediction from the model folder alone (nnUNet_denoiser unset) by nnU-Net's predictor
as nnUNetv2_predict sets it up, in process (helpers.predict_in_process; the command itself runs on
our trainers' folders in test_e2e_semi_supervised_base, test_mean_teacher_e2e and
test_e2e_single_slice_2d)."""
import filecmp
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import run_cmd
from helpers import predict_without_denoiser


def _fold(results, dataset, trainer):
    return os.path.join(results, dataset, f"{trainer}__nnUNetPlans__3d_fullres", "fold_0")


def _store_files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".npy"))


@pytest.mark.e2e
def test_sud_train_interrupt_resume_predict(synthetic3d, tiny_denoiser, nnunet_dirs, tmp_path, monkeypatch):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunet_sud.trainers import nnUNetTrainerSUD

    trainer = "nnUNetTrainerSUD_tiny"
    fold = _fold(nnunet_dirs["nnUNet_results"], synthetic3d["name"], trainer)
    shutil.rmtree(os.path.dirname(fold), ignore_errors=True)
    train = ["nnUNetv2_train", str(synthetic3d["id"]), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"]
    env = dict(os.environ, nnUNet_denoiser=tiny_denoiser, SUD_TEST_SKIP_FINAL_VALIDATION="1")

    # without a denoiser SUD refuses before training, naming the command that makes one
    no_den = {k: v for k, v in env.items() if k != "nnUNet_denoiser"}
    p = subprocess.run(train, env=no_den, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert p.returncode != 0 and "-tr nnUNetTrainerLabelDenoiser" in p.stdout, p.stdout[-2000:]
    assert "Epoch 0" not in p.stdout

    # a run killed in the middle of epoch 1 (after step 5 of 6): checkpoint_latest is from epoch 0
    p = subprocess.run(train, env=dict(env, SUD_TEST_CRASH_AT_STEP="5"), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=900)
    assert p.returncode != 0 and "simulated crash after step 5" in p.stdout, p.stdout[-3000:]
    live, snap = os.path.join(fold, "soft_targets"), os.path.join(fold, "soft_targets_checkpoint_latest")
    assert os.path.isdir(snap) and _store_files(snap), "the checkpoint of epoch 0 has a soft-target snapshot"
    assert torch.load(os.path.join(fold, "checkpoint_latest_extra_state.pth"), weights_only=False) == \
        {"soft_target_snapshot": "soft_targets_checkpoint_latest", "current_epoch": 1}
    # steps 4-5 changed the live store after the snapshot
    changed = [f for f in _store_files(live)
               if f not in _store_files(snap) or not filecmp.cmp(os.path.join(live, f), os.path.join(snap, f), False)]
    assert changed

    # resuming restores exactly the snapshot (checked in process, as nnUNetv2_train --c does it)
    pre = synthetic3d["preprocessed"]
    plans = load_json(os.path.join(pre, "nnUNetPlans.json"))
    plans["continue_training"] = True
    t = nnUNetTrainerSUD(plans, "3d_fullres", 0, load_json(os.path.join(pre, "dataset.json")), torch.device("cpu"))
    t.output_folder = fold
    t.store.folder = live
    t.load_checkpoint(os.path.join(fold, "checkpoint_latest.pth"))
    assert t.current_epoch == 1 and _store_files(live) == _store_files(snap)
    for f in _store_files(snap):
        assert filecmp.cmp(os.path.join(live, f), os.path.join(snap, f), shallow=False)
    # ... and nnUNetv2_train --c finishes the run from there
    out = run_cmd(train + ["--c"], env=env)
    assert "Epoch 1" in out and "Epoch 0\n" not in out
    assert out.count("unlabeled data: ") == 1  # the unlabeled data are checked once per training
    assert out.count("label denoiser loaded from ") == 1
    assert f"label denoiser loaded from {os.path.join(tiny_denoiser, 'checkpoint_final.pth')}" in out
    log = torch.load(os.path.join(fold, "checkpoint_final.pth"), weights_only=False)["logging"]
    assert len(log["alpha"]) == 2 and log["alpha"][0] == pytest.approx(np.mean([1, 5 / 6, 4 / 6]))
    assert log["beta"] == [pytest.approx(0.05)] * 2
    assert log["unlabeled_weight"][1] == pytest.approx(4 * np.mean([3 / 6, 4 / 6, 5 / 6]))
    for k in ("prediction", "denoised", "target"):  # what SUD learns from, vs labelsUnlabeled, across --c
        assert len(log["target_dice/" + k]) == 2 and all(len(d) == 3 for d in log["target_dice/" + k]), k
    # side files of the run are gone; the model folder is an ordinary nnU-Net one
    for d in ("soft_targets", "soft_targets_checkpoint_latest", "soft_targets_checkpoint_best"):
        assert not os.path.exists(os.path.join(fold, d))
    assert not os.path.exists(os.path.join(fold, "checkpoint_latest_extra_state.pth"))
    predict_without_denoiser(synthetic3d, trainer, monkeypatch)


@pytest.mark.e2e
def test_sud_mean_teacher_train_predict(synthetic3d, tiny_denoiser, nnunet_dirs, tmp_path, monkeypatch):
    trainer = "nnUNetTrainerSUDMeanTeacher_tiny"
    fold = _fold(nnunet_dirs["nnUNet_results"], synthetic3d["name"], trainer)
    shutil.rmtree(os.path.dirname(fold), ignore_errors=True)
    run_cmd(["nnUNetv2_train", str(synthetic3d["id"]), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"],
            env=dict(os.environ, nnUNet_denoiser=tiny_denoiser, SUD_TEST_SKIP_FINAL_VALIDATION="1"))
    state = torch.load(os.path.join(fold, "checkpoint_final_extra_state.pth"), weights_only=False)
    assert state["ema_step"] == 6 and "teacher_weights" in state  # one EMA update per step, kept for --c
    ckpt = torch.load(os.path.join(fold, "checkpoint_final.pth"), weights_only=False)
    assert not any(k.startswith("teacher") for k in ckpt["network_weights"])  # inference: the student only
    assert {"target_dice/" + k for k in ("student", "teacher", "denoised", "target")} <= set(ckpt["logging"])
    predict_without_denoiser(synthetic3d, trainer, monkeypatch)


@pytest.mark.e2e
def test_te_train_predict(synthetic3d, nnunet_dirs, tmp_path, monkeypatch):
    trainer = "nnUNetTrainerTE_tiny"
    fold = _fold(nnunet_dirs["nnUNet_results"], synthetic3d["name"], trainer)
    shutil.rmtree(os.path.dirname(fold), ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_denoiser"}  # TE needs no denoiser
    env["SUD_TEST_SKIP_FINAL_VALIDATION"] = "1"
    out = run_cmd(["nnUNetv2_train", str(synthetic3d["id"]), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"],
                  env=env)
    assert "target_new_fraction" in out
    assert out.count("unlabeled data: ") == 1  # the unlabeled data are checked once per training
    # nnU-Net's own pipeline: the stream's coordinates take the exact path, said once (tests/test_exact_coordinates.py)
    assert out.count("unlabeled stream: case coordinates computed exactly from the SpatialTransform") == 1
    assert "label denoiser loaded from" not in out  # beta = 0: no denoiser is loaded
    log = torch.load(os.path.join(fold, "checkpoint_final.pth"), weights_only=False)["logging"]
    # the very first step finds no target at all, so epoch 0's mean is at least 1/3
    assert 1 / 3 - 1e-6 <= log["target_new_fraction"][0] <= 1 and 0 <= log["target_new_fraction"][1] <= 1
    assert "target_dice/prediction" in log and "target_dice/target" in log
    assert "target_dice/denoised" not in log  # TE has no denoiser
    predict_without_denoiser(synthetic3d, trainer, monkeypatch)
