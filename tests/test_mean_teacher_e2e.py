"""End to end through the real nnU-Net commands, sequentially in one test sharing conftest's tiny
label denoiser: mean teacher (interrupted, resumed with --c), UA-MT, DAE uncertainty and post-denoise
train on CPU with short-schedule variants (tests/ext_trainers/tiny_variants.py); a
post-denoise model folder is composed from the trained mean teacher with ``nnunet-sud
build-postdenoise`` (the command's ``main``, in process); the model folders predict with plain
``nnUNetv2_predict`` (the composed post-denoise folder) and with nnU-Net's predictor in process (the
others: the command's code path -- trainer looked up by the checkpoint's name through
nnUNet_extTrainer, network built by it and loaded -- without ~20 s of process start-up per call;
plain ``nnUNetv2_predict`` of a semi-supervised trainer's folder is covered by
test_e2e_semi_supervised_base.py)."""
import os
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import run_cmd
from helpers import predict_in_process

CFG = "3d_fullres"


def _base(results, dataset, trainer):
    return os.path.join(results, dataset, f"{trainer}__nnUNetPlans__{CFG}")


def _predict_cli(synthetic3d, trainer, out_dir, env):
    run_cmd(["nnUNetv2_predict", "-i", os.path.join(synthetic3d["raw"], "imagesTs"), "-o", str(out_dir),
             "-d", str(synthetic3d["id"]), "-c", CFG, "-f", "0", "-tr", trainer, "-device", "cpu",
             "--disable_tta", "-npp", "1", "-nps", "1"], env=env)
    preds = sorted(f for f in os.listdir(out_dir) if f.endswith(".nii.gz"))
    assert preds == ["syn_ts_000.nii.gz", "syn_ts_001.nii.gz"]
    segs = []
    for f in preds:
        pred = sitk.ReadImage(str(out_dir / f))
        ref = sitk.ReadImage(os.path.join(synthetic3d["raw"], "labelsTs", f))
        assert pred.GetSize() == ref.GetSize() and np.allclose(pred.GetSpacing(), ref.GetSpacing())
        segs.append(sitk.GetArrayFromImage(pred))
        assert set(np.unique(segs[-1])) <= {0, 1, 2, 3}
    return segs


def _ckpt(base, name="checkpoint_final.pth"):
    return torch.load(os.path.join(base, "fold_0", name), map_location="cpu", weights_only=False)


@pytest.mark.e2e
def test_mean_teacher_family_trains_resumes_and_predicts(synthetic3d, tiny_denoiser, nnunet_dirs, tmp_path, monkeypatch,
                                                        capsys):
    from nnunet_sud.trainers import nnUNetTrainerMeanTeacher

    results, name, did = nnunet_dirs["nnUNet_results"], synthetic3d["name"], str(synthetic3d["id"])
    trainers = ["nnUNetTrainerMeanTeacher_tiny", "nnUNetTrainerUAMT_tiny", "nnUNetTrainerDAEUncertainty_tiny",
                "nnUNetTrainerPostDenoise_tiny", "nnUNetTrainerPostDenoise"]
    for tr in trainers:  # a cached result folder must not leak a checkpoint_final into the --c step
        shutil.rmtree(_base(results, name, tr), ignore_errors=True)
    env = dict(os.environ, nnUNet_denoiser=tiny_denoiser, SUD_TEST_SKIP_FINAL_VALIDATION="1")
    train = ["nnUNetv2_train", did, CFG, "0", "-device", "cpu", "-tr"]
    den_weights = _ckpt(os.path.dirname(tiny_denoiser))["network_weights"]

    # ---- mean teacher: dies after epoch 0, resumes with --c, teacher state restored exactly
    mt = _base(results, name, "nnUNetTrainerMeanTeacher_tiny")
    p = subprocess.run(train + ["nnUNetTrainerMeanTeacher_tiny"], env=dict(env, SUD_TEST_CRASH_AT_EPOCH="0"),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert p.returncode != 0 and "simulated crash after epoch 0" in p.stdout, p.stdout[-3000:]
    latest = os.path.join(mt, "fold_0", "checkpoint_latest.pth")
    side = torch.load(os.path.join(mt, "fold_0", "checkpoint_latest_extra_state.pth"), weights_only=False)
    assert side["ema_step"] == 2 and side["current_epoch"] == 1          # 2 iterations = 2 EMA updates
    student = torch.load(latest, weights_only=False)["network_weights"]
    assert set(side["teacher_weights"]) == set(student)
    assert any(not torch.equal(side["teacher_weights"][k], student[k]) for k in student)  # an average, not a copy
    # what --c does (maybe_load_checkpoint -> load_checkpoint) restores identical teacher weights and step
    from batchgenerators.utilities.file_and_folder_operations import load_json
    plans = load_json(os.path.join(synthetic3d["preprocessed"], "nnUNetPlans.json"))
    plans["continue_training"] = True
    resumed = nnUNetTrainerMeanTeacher(plans, CFG, 0, load_json(os.path.join(synthetic3d["preprocessed"],
                                                                             "dataset.json")), torch.device("cpu"))
    resumed.load_checkpoint(latest)
    assert resumed.teacher.step == 2
    restored = resumed.teacher.module.state_dict()
    assert all(torch.equal(restored[k], v) for k, v in side["teacher_weights"].items())

    out = run_cmd(train + ["nnUNetTrainerMeanTeacher_tiny", "--c"], env=env)
    assert "EMA teacher: decay 0.99, warm-up True, 2 updates so far" in out and "Epoch 1" in out
    final_side = torch.load(os.path.join(mt, "fold_0", "checkpoint_final_extra_state.pth"), weights_only=False)
    assert final_side["ema_step"] == 4                                   # counted across the interruption
    assert not os.path.exists(os.path.join(mt, "fold_0", "checkpoint_latest_extra_state.pth"))
    mt_final = _ckpt(mt)
    # target quality (the synthetic data labels its unlabeled cases): per-class Dice per epoch, kept by --c
    for key in ("target_dice/student", "target_dice/teacher"):
        dice = mt_final["logging"][key]
        assert len(dice) == 2 and all(len(d) == 3 for d in dice) and np.isfinite(dice[1]).any(), key
    assert "Target dice teacher" in out
    assert set(mt_final["network_weights"]) == set(student)              # the student only: no teacher inside
    predictor, _ = predict_in_process(synthetic3d, mt)
    assert type(predictor.network).__name__ == "PlainConvUNet"

    # ---- UA-MT and DAE uncertainty: train, log their terms, predict with the student
    for tr, keys in (("nnUNetTrainerUAMT_tiny", ("mask_fraction", "uncertainty_threshold", "uncertainty_mean",
                                                 "mc_spread", "uncertainty_teacher_wrong", "uncertainty_teacher_right")),
                     ("nnUNetTrainerDAEUncertainty_tiny", ("reliability_mean", "uncertainty_mean"))):
        run_cmd(train + [tr], env=env)
        ck = _ckpt(_base(results, name, tr))
        assert set(ck["network_weights"]) == set(student)               # no teacher, no denoiser inside
        for k in keys + ("target_kept/teacher_certain" if "UAMT" in tr else "target_dice/denoised",):
            assert len(ck["logging"][k]) == 1 and np.isfinite(ck["logging"][k][0]).any(), k
        side = torch.load(os.path.join(_base(results, name, tr), "fold_0", "checkpoint_final_extra_state.pth"),
                          weights_only=False)
        assert side["ema_step"] == 2
        predictor, _ = predict_in_process(synthetic3d, _base(results, name, tr))
        assert type(predictor.network).__name__ == "PlainConvUNet"
        if "UAMT" in tr:  # feature dropout (0.5 in student and teacher) makes the K teacher passes differ
            assert ck["logging"]["mc_spread"][0] > 1e-4
    dae_mask = ck["logging"]["reliability_mean"][0]
    assert 0 < dae_mask <= 1

    # ---- post-denoise, trained: the denoiser is inside network_weights, untouched by training
    pd = _base(results, name, "nnUNetTrainerPostDenoise_tiny")
    run_cmd(train + ["nnUNetTrainerPostDenoise_tiny"], env=env)
    weights = _ckpt(pd)["network_weights"]
    for k, v in den_weights.items():
        assert torch.equal(weights["denoiser." + k], v), k
    predictor, _ = predict_in_process(synthetic3d, pd)
    assert type(predictor.network).__name__ == "SegmenterWithPostDenoiser"
    assert predictor.network.denoises                                   # the predictor ran it in eval, no deep sup.

    # ---- post-denoise, composed from the trained mean teacher without training; plain nnUNetv2_predict
    from nnunet_sud.cli import main as nnunet_sud_main
    monkeypatch.setenv("nnUNet_denoiser", tiny_denoiser)
    assert nnunet_sud_main(["build-postdenoise", "-d", did, "-c", CFG, "-f", "0",
                            "-tr", "nnUNetTrainerMeanTeacher_tiny"]) == 0
    assert "nnUNetv2_predict" in capsys.readouterr().out
    built = _base(results, name, "nnUNetTrainerPostDenoise")
    assert os.path.isfile(os.path.join(built, "plans.json"))
    assert os.path.isfile(os.path.join(built, "dataset.json")) and os.path.isfile(os.path.join(built, "dataset_fingerprint.json"))
    ck = _ckpt(built)
    assert ck["trainer_name"] == "nnUNetTrainerPostDenoise"
    assert all(torch.equal(ck["network_weights"]["segmenter." + k], v) for k, v in mt_final["network_weights"].items())
    assert all(torch.equal(ck["network_weights"]["denoiser." + k], v) for k, v in den_weights.items())
    from nnunet_sud.errors import UserFacingError
    from nnunet_sud.trainers.post_denoise import build_postdenoise_model_folder
    with pytest.raises(UserFacingError, match="exists already. Pass --overwrite"):
        build_postdenoise_model_folder(did, CFG, 0, "nnUNetTrainerMeanTeacher_tiny")
    segs = _predict_cli(synthetic3d, "nnUNetTrainerPostDenoise", tmp_path / "pred_pd", env)
    _, seg_in_process = predict_in_process(synthetic3d, built)
    assert np.array_equal(segs[0], seg_in_process)
