"""End to end through the real nnU-Net commands: a semi-supervised trainer built on the base
(nnUNetTrainerUnlabeledStats, via a user's own short-schedule variant in tests/ext_trainers)
is found through nnUNet_extTrainer, trains on CPU, is interrupted, resumes with --c, and its
model folder predicts with plain nnUNetv2_predict."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import run_cmd
from helpers import make_trainer
from nnunet_sud.budget import Budget
from nnunet_sud.trainers import nnUNetTrainerUnlabeledStats

TRAINER = "nnUNetTrainerUnlabeledStats_tiny"


def _fold(results, dataset, trainer, cfg="3d_fullres"):
    return os.path.join(results, dataset, f"{trainer}__nnUNetPlans__{cfg}", "fold_0")


@pytest.mark.e2e
def test_train_interrupt_resume_predict(synthetic3d, nnunet_dirs, tmp_path):
    fold = _fold(nnunet_dirs["nnUNet_results"], synthetic3d["name"], TRAINER)
    shutil.rmtree(fold, ignore_errors=True)  # a kept test cache (NNUNET_SUD_TEST_CACHE) holds the last run's final checkpoint
    train = ["nnUNetv2_train", str(synthetic3d["id"]), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"]

    # 1) a run that dies after epoch 0 (checkpoint_latest written, no checkpoint_final)
    env = dict(os.environ, SUD_TEST_CRASH_AT_EPOCH="0")
    p = subprocess.run(train, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert p.returncode != 0 and "simulated crash after epoch 0" in p.stdout, p.stdout[-3000:]
    assert os.path.isfile(os.path.join(fold, "checkpoint_latest.pth"))
    assert not os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    state = torch.load(os.path.join(fold, "checkpoint_latest_extra_state.pth"), weights_only=False)
    assert state == {"unlabeled_patches_seen": 3 * 2, "current_epoch": 1}  # 3 iterations x batch 2

    # 2) --c resumes from checkpoint_latest with the extra state, finishes, validates
    out = run_cmd(train + ["--c"])
    assert "Epoch 1" in out and "Epoch 0\n" not in out
    ckpt = torch.load(os.path.join(fold, "checkpoint_final.pth"), weights_only=False)
    assert ckpt["trainer_name"] == TRAINER and ckpt["current_epoch"] == 2
    final_state = torch.load(os.path.join(fold, "checkpoint_final_extra_state.pth"), weights_only=False)
    assert final_state["unlabeled_patches_seen"] == 2 * 3 * 2  # counted across the interruption
    # nnU-Net removes checkpoint_latest.pth at the end; its side file goes with it
    assert not os.path.exists(os.path.join(fold, "checkpoint_latest.pth"))
    assert not os.path.exists(os.path.join(fold, "checkpoint_latest_extra_state.pth"))
    # the unlabeled values are in nnU-Net's logger checkpoint, one per epoch, both epochs
    log = ckpt["logging"]
    assert len(log["unlabeled_weight"]) == 2 and len(log["train_losses"]) == 2
    assert log["unlabeled_weight"][0] == pytest.approx(np.mean([0, 1 / 6, 2 / 6]))  # linear ramp over 6 its
    assert log["unlabeled_weight"][1] == pytest.approx(np.mean([3 / 6, 4 / 6, 5 / 6]))
    assert all(0 < v <= 1 for v in log["unlabeled_valid_fraction"])
    # ... and in the text log and progress.png (nnU-Net's 3 panels + ours: taller than nnU-Net's 30x54 in)
    logs = [f for f in os.listdir(fold) if f.startswith("training_log")]
    text = "".join(open(os.path.join(fold, f)).read() for f in logs)
    assert "unlabeled_valid_fraction" in text and "unlabeled_weight" in text
    img = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(fold, "progress.png")))
    assert img.shape[0] / img.shape[1] == pytest.approx(72 / 30, rel=0.02)
    assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))

    # 3) plain nnUNetv2_predict finds the trainer again (through nnUNet_extTrainer) and predicts
    out_dir = tmp_path / "pred"
    run_cmd(["nnUNetv2_predict", "-i", os.path.join(synthetic3d["raw"], "imagesTs"), "-o", str(out_dir),
             "-d", str(synthetic3d["id"]), "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-device", "cpu",
             "--disable_tta", "-npp", "1", "-nps", "1"])
    preds = sorted(f for f in os.listdir(out_dir) if f.endswith(".nii.gz"))
    assert preds == ["syn_ts_000.nii.gz", "syn_ts_001.nii.gz"]
    for f in preds:
        pred = sitk.ReadImage(str(out_dir / f))
        ref = sitk.ReadImage(os.path.join(synthetic3d["raw"], "labelsTs", f))
        assert pred.GetSize() == ref.GetSize() and np.allclose(pred.GetSpacing(), ref.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2, 3}


def test_trainer_refuses_missing_unlabeled_data_before_building_anything(synthetic3d, monkeypatch):
    """The check runs first in on_train_start: no network, no loaders, no workers yet."""
    from nnunet_sud.errors import UserFacingError

    pre = synthetic3d["preprocessed"]
    trainer = make_trainer(nnUNetTrainerUnlabeledStats, synthetic3d, "3d_fullres")
    monkeypatch.setattr(type(trainer), "preprocessed_unlabeled_folder",
                        property(lambda self: os.path.join(pre, "nowhere_unlabeled")))
    with pytest.raises(UserFacingError, match=r"nowhere_unlabeled is missing or empty.*imagesUnlabeled.*"
                                              r"nnunet-sud preprocess-unlabeled -d Dataset991_Synthetic3D "
                                              r"-c 3d_fullres -p nnUNetPlans"):
        trainer.on_train_start()
    assert trainer.network is None and trainer.dataloader_train is None


def test_trainer_refuses_stale_unlabeled_data(synthetic3d):
    from nnunet_sud.errors import UserFacingError

    def replan(plans):  # the user re-planned since
        plans["configurations"]["3d_fullres"]["spacing"] = [1.5, 1.5, 1.5]
    trainer = make_trainer(nnUNetTrainerUnlabeledStats, synthetic3d, "3d_fullres", plans_edit=replan)
    with pytest.raises(UserFacingError, match="preprocessed with other plans.*Re-run: nnunet-sud preprocess-unlabeled"):
        trainer.on_train_start()


def test_2d_configuration_trains_on_the_unlabeled_stream(synthetic3d, monkeypatch):
    """In process, 2d: the stream delivers 2d patches with (z, y, x) coordinates, steps run and log."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")  # one worker per stream (unlabeled/workers.py)
    trainer = make_trainer(nnUNetTrainerUnlabeledStats, synthetic3d, "2d")
    Budget(1, 2).apply(trainer)
    trainer.on_train_start()
    try:
        batch_u = next(trainer.dataloader_unlabeled)
        patch = tuple(trainer.configuration_manager.patch_size)
        assert len(patch) == 2 and batch_u["data"].shape[2:] == patch
        assert batch_u["coords"].shape == (batch_u["data"].shape[0], 3, *patch)
        assert len(set(trainer.unlabeled_worker_seeds)) == len(trainer.unlabeled_worker_seeds)
        trainer.on_train_epoch_start()
        outs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(2)]
        assert [o["unlabeled_weight"] for o in outs] == [0.0, 0.5]
        assert all(np.isfinite(o["loss"]) for o in outs)
        assert trainer.unlabeled_patches_seen == 2 * batch_u["data"].shape[0]
    finally:
        for dl in (trainer.dataloader_train, trainer.dataloader_val, trainer.dataloader_unlabeled):
            dl._finish()


def test_3d_lowres_configuration(synthetic3d, monkeypatch):
    """3d_lowres: a lower-resolution configuration with its own data identifier (nnU-Net plans it
    only for large images, so it is added to a copy of the plans here), preprocessed by nnU-Net
    and by preprocess-unlabeled, and trained on in process."""
    import json
    from batchgenerators.utilities.file_and_folder_operations import load_json

    pre = synthetic3d["preprocessed"]
    plans = load_json(os.path.join(pre, "nnUNetPlans.json"))
    plans["plans_name"] = "nnUNetPlansLowres"
    plans["configurations"]["3d_lowres"] = {
        "inherits_from": "3d_fullres", "data_identifier": "nnUNetPlansLowres_3d_lowres",
        "spacing": [1.5, 1.5, 1.5], "patch_size": [16, 24, 24], "median_image_size_in_voxels": [16, 21, 21]}
    with open(os.path.join(pre, "nnUNetPlansLowres.json"), "w") as f:
        json.dump(plans, f)
    run_cmd(["nnUNetv2_preprocess", "-d", str(synthetic3d["id"]), "-plans_name", "nnUNetPlansLowres",
             "-c", "3d_lowres", "-np", "1"])
    run_cmd([sys.executable, "-m", "nnunet_sud.cli", "preprocess-unlabeled", "-d", str(synthetic3d["id"]),
             "-c", "3d_lowres", "-p", "nnUNetPlansLowres", "-np", "1"])
    unl = os.path.join(pre, "nnUNetPlansLowres_3d_lowres_unlabeled")
    assert len([f for f in os.listdir(unl) if f.endswith(".pkl")]) == 6

    monkeypatch.setenv("nnUNet_n_proc_DA", "2")  # one worker per stream (unlabeled/workers.py)
    t = make_trainer(nnUNetTrainerUnlabeledStats, synthetic3d, "3d_lowres", plans_identifier="nnUNetPlansLowres")
    Budget(1, 2).apply(t)
    t.on_train_start()
    try:
        b = next(t.dataloader_unlabeled)
        assert b["data"].shape[2:] == (16, 24, 24)
        # lowres cases are 16x21x21 (24x32x32 at 1 mm resampled to 1.5 mm): coordinates stay inside
        assert tuple(b["case_shapes"][0].tolist()) == (16, 21, 21)
        for ax, n in enumerate((16, 21, 21)):
            c = b["coords"][:, ax][b["valid"]]
            assert c.min() >= -1e-3 and c.max() <= n - 1 + 1e-3
        assert (~b["valid"]).any()  # the 24-voxel patch is wider than the 21-voxel case: padding flagged
        t.on_train_epoch_start()
        out = t.train_step(next(t.dataloader_train))
        assert np.isfinite(out["loss"])
    finally:
        for dl in (t.dataloader_train, t.dataloader_val, t.dataloader_unlabeled):
            dl._finish()
