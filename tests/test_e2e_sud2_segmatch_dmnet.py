"""SUD^2, SegMatch and DMNet end to end through nnUNetv2_train on CPU, with the tiny budgets of
tests/ext_trainers/tiny_variants.py (2 epochs x 3 iterations), each model folder then predicting
on its own (nnUNet_denoiser unset) through nnU-Net's predictor as nnUNetv2_predict sets it up, in
process (helpers.predict_in_process). DMNet is interrupted in epoch 1 and resumed with --c: the
discriminator (extra state) and the second decoder (network weights) come back as the checkpoint
stored them."""
import math
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


def _train_cmd(synthetic3d, trainer):
    return ["nnUNetv2_train", str(synthetic3d["id"]), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _adam_steps(optimizer_state):
    return {int(s["step"]) for s in optimizer_state["state"].values()}


@pytest.mark.e2e
def test_sud2_train_predict(synthetic3d, tiny_denoiser, nnunet_dirs, tmp_path, monkeypatch):
    trainer = "nnUNetTrainerSUD2_tiny"
    fold = _fold(nnunet_dirs["nnUNet_results"], synthetic3d["name"], trainer)
    shutil.rmtree(os.path.dirname(fold), ignore_errors=True)
    out = run_cmd(_train_cmd(synthetic3d, trainer),
                  env=dict(os.environ, nnUNet_denoiser=tiny_denoiser, SUD_TEST_SKIP_FINAL_VALIDATION="1"))
    assert "noise levels [1.0, 0.5, 0.0]" in out and "latent_decorrelation" in out
    ckpt = _load(os.path.join(fold, "checkpoint_final.pth"))
    log = ckpt["logging"]
    assert len(log["latent_decorrelation"]) == 2 and all(0 <= v <= 1 for v in log["latent_decorrelation"])
    assert log["beta"] == [1.0] * 2  # eq. 9: the target is R(F(f)) itself
    for k in ("prediction", "denoised", "target"):  # target quality (labelsUnlabeled of the synthetic data)
        assert len(log["target_dice/" + k]) == 2 and all(len(d) == 3 for d in log["target_dice/" + k]), k
    # the bottleneck wrapper keeps nnU-Net's state-dict keys: an ordinary nnU-Net model folder
    assert all(k.startswith(("encoder.", "decoder.")) for k in ckpt["network_weights"])
    assert not os.path.exists(os.path.join(fold, "soft_targets"))
    predict_without_denoiser(synthetic3d, trainer, monkeypatch)


@pytest.mark.e2e
def test_segmatch_train_predict(synthetic3d, nnunet_dirs, tmp_path, monkeypatch):
    trainer = "nnUNetTrainerSegMatch_tiny"
    fold = _fold(nnunet_dirs["nnUNet_results"], synthetic3d["name"], trainer)
    shutil.rmtree(os.path.dirname(fold), ignore_errors=True)
    run_cmd(_train_cmd(synthetic3d, trainer), env=dict(os.environ, SUD_TEST_SKIP_FINAL_VALIDATION="1"))
    ckpt = _load(os.path.join(fold, "checkpoint_final.pth"))
    log = ckpt["logging"]
    for k in ("pseudo_label_fraction", "discriminator_score", "discriminator_loss", "discriminator_score_truth",
              "discriminator_score_prediction"):
        assert len(log[k]) == 2 and all(np.isfinite(log[k])), k
    assert all(0 <= v <= 1 for v in log["pseudo_label_fraction"] + log["discriminator_score"])
    # lambda_u ramps exp(-5 (1 - t / 0.25)^2) over steps t = 0, 1/6, ..., 5/6: epoch 0 = (e^-5 + e^-5/9 + 1) / 3
    ramp = [math.exp(-5 * (1 - min(i / 6 / 0.25, 1)) ** 2) for i in range(6)]
    assert log["unlabeled_weight"] == pytest.approx([np.mean(ramp[:3]), 1.0], rel=1e-6)
    assert log["unlabeled_weight"][0] == pytest.approx((math.exp(-5) + math.exp(-5 / 9) + 1) / 3, rel=1e-6)
    assert len(log["target_dice/pseudo_label"]) == 2 and len(log["target_kept/pseudo_label"]) == 2
    # the discriminator is beside the network, trained once per step
    extra = _load(os.path.join(fold, "checkpoint_final_extra_state.pth"))
    assert _adam_steps(extra["discriminator_optimizer"]) == {6}
    assert not any("discrim" in k for k in ckpt["network_weights"])
    predict_without_denoiser(synthetic3d, trainer, monkeypatch)


@pytest.mark.e2e
def test_dmnet_interrupt_resume_predict(synthetic3d, nnunet_dirs, tmp_path, monkeypatch):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunet_sud.trainers import nnUNetTrainerDMNet

    trainer = "nnUNetTrainerDMNet_tiny"
    fold = _fold(nnunet_dirs["nnUNet_results"], synthetic3d["name"], trainer)
    shutil.rmtree(os.path.dirname(fold), ignore_errors=True)
    train = _train_cmd(synthetic3d, trainer)
    env = dict(os.environ, SUD_TEST_SKIP_FINAL_VALIDATION="1")

    # killed after step 5 (in epoch 1): checkpoint_latest is from epoch 0, the discriminator moved on since
    p = subprocess.run(train, env=dict(env, SUD_TEST_CRASH_AT_STEP="5"), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=900)
    assert p.returncode != 0 and "simulated crash after step 5" in p.stdout, p.stdout[-3000:]
    latest = os.path.join(fold, "checkpoint_latest.pth")
    extra = _load(os.path.join(fold, "checkpoint_latest_extra_state.pth"))
    assert extra["current_epoch"] == 1 and _adam_steps(extra["discriminator_optimizer"]) == {3}
    at_crash = _load(os.path.join(fold, "discriminator_at_crash.pth"))
    saved = extra["discriminator_weights"]
    assert any(not torch.equal(at_crash[k], v) for k, v in saved.items())
    ckpt = _load(latest)
    assert any(k.startswith("decoder.second.") for k in ckpt["network_weights"])

    # resuming restores the checkpoint's discriminator and second decoder (in process, as --c does it)
    pre = synthetic3d["preprocessed"]
    plans = load_json(os.path.join(pre, "nnUNetPlans.json"))
    plans["continue_training"] = True
    t = nnUNetTrainerDMNet(plans, "3d_fullres", 0, load_json(os.path.join(pre, "dataset.json")), torch.device("cpu"))
    t.load_checkpoint(latest)
    assert t.current_epoch == 1
    for k, v in t.discriminator.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert any(not torch.equal(v, at_crash[k]) for k, v in t.discriminator.state_dict().items())
    assert _adam_steps(t.discriminator_optimizer.state_dict()) == {3}
    for k, v in t.network.decoder.second.state_dict().items():
        assert torch.equal(v, ckpt["network_weights"]["decoder.second." + k]), k

    # ... and nnUNetv2_train --c finishes the run from there
    out = run_cmd(train + ["--c"], env=env)
    assert "Epoch 1" in out and "Epoch 0\n" not in out
    final = _load(os.path.join(fold, "checkpoint_final_extra_state.pth"))
    assert _adam_steps(final["discriminator_optimizer"]) == {6}  # 3 restored + 3 after resuming
    log = _load(os.path.join(fold, "checkpoint_final.pth"))["logging"]
    assert len(log["dice_difference"]) == 2 and all(0 <= v <= 1 for v in log["dice_difference"])
    assert all(len(log["target_dice/" + k]) == 2 for k in ("decoder1", "decoder2", "average"))  # across --c
    assert "Target dice average" in out
    assert not os.path.exists(os.path.join(fold, "checkpoint_latest_extra_state.pth"))
    predict_without_denoiser(synthetic3d, trainer, monkeypatch)
