"""nnUNetv2_train ... -tr nnUNetTrainerLabelDenoiser_short on CPU: the denoiser learns (measured on
held-out label maps), logs noisy-vs-denoised per epoch, writes denoiser_validation.json, and its
model folder works with nnU-Net's checkpoint/predict machinery and with load_denoiser."""
import glob
import json
import os

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from conftest import run_cmd
from nnunet_sud.denoiser.corruption import apply_denoiser, corrupt_probabilities
from nnunet_sud.network_helpers import labels_to_one_hot
from nnunet_sud.evaluation.metrics import dice

TRAINER = "nnUNetTrainerLabelDenoiser_short"


@pytest.fixture(scope="module")
def trained(synthetic3d, nnunet_dirs):
    model = os.path.join(nnunet_dirs["nnUNet_results"], synthetic3d["name"], f"{TRAINER}__nnUNetPlans__3d_fullres")
    fold = os.path.join(model, "fold_0")
    if not os.path.isfile(os.path.join(fold, "denoiser_validation.json")):
        run_cmd(["nnUNetv2_train", str(synthetic3d["id"]), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"])
    return {"model": model, "fold": fold, **synthetic3d}


def _mean(settings, kind, metric="dice"):
    return float(np.mean([s[kind][metric] for s in settings]))


def test_training_writes_an_ordinary_model_folder(trained):
    fold = trained["fold"]
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    assert not os.path.isfile(os.path.join(fold, "checkpoint_latest.pth"))
    assert not os.path.isdir(os.path.join(fold, "validation"))  # no image prediction
    for f in ("plans.json", "dataset.json"):
        assert os.path.isfile(os.path.join(trained["model"], f))
    ckpt = torch.load(os.path.join(fold, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == TRAINER and ckpt["init_args"]["configuration"] == "3d_fullres"
    w = ckpt["network_weights"]
    assert any(k.startswith("decoder.transpconvs") for k in w) and not any(k.startswith("decoder.encoder") for k in w)
    first = w["encoder.stages.0.0.convs.0.conv.weight"]
    assert first.shape[1] == 4  # input = the 4 classes, not the image channel


def test_denoised_beats_noisy_on_held_out_validation_maps(trained):
    res = load_json(os.path.join(trained["fold"], "denoiser_validation.json"))
    final = res["final"]
    splits = load_json(os.path.join(trained["preprocessed"], "splits_final.json"))
    assert final["cases"] == sorted(splits[0]["val"]) and final["num_cases"] == len(splits[0]["val"])
    assert not set(final["cases"]) & set(splits[0]["train"])
    st = final["settings"]
    assert [(s["sigma"], s["scale"]) for s in st] == [(2.0, 2.0), (4.0, 4.0), (8.0, 8.0)]
    print("denoiser_validation.json:", json.dumps([{k: s[k] for k in ("sigma", "scale")} |
                                                   {"noisy": s["noisy"]["dice"], "denoised": s["denoised"]["dice"]}
                                                   for s in st]))
    assert _mean(st, "denoised") > _mean(st, "noisy") + 0.05
    assert st[1]["denoised"]["dice"] > st[1]["noisy"]["dice"] + 0.05  # sigma = s = 4: noisy Dice ~0.1
    for s in st:
        for kind in ("noisy", "denoised"):
            assert 0 <= s[kind]["dice"] <= 1 and s[kind]["hd95"] is not None and s[kind]["hd95"] >= 0
            assert set(s[kind]["per_class"]) == {"1", "2", "3"}
    assert final["mean"]["denoised"]["dice"] == pytest.approx(_mean(st, "denoised"))
    # per-epoch history (one validation case each) is in the json and in the training log
    assert [h["epoch"] for h in res["history"]] == [0, 1]
    assert all(h["num_cases"] == 1 for h in res["history"])
    # the training's log (a later test's --val, kept in a reused NNUNET_SUD_TEST_CACHE, writes a newer one)
    logs = [open(f).read() for f in sorted(glob.glob(os.path.join(trained["fold"], "training_log_*.txt")))]
    log = [text for text in logs if "Epoch 0" in text][-1]
    assert log.count("Denoiser validation, noisy vs denoised (1 case(s))") == 2
    assert "Denoiser validation (all validation cases), noisy vs denoised" in log
    assert res["corruption_train"] == {"sigma": [0.0, 8.0], "scale": [0.0, 8.0], "sigma_distribution": "squared",
                                       "interpolation": "linear"}
    # the trained network and schedule are recorded: the default 3 stages at a quarter of the planned widths
    cfg = load_json(os.path.join(trained["preprocessed"], "nnUNetPlans.json"))["configurations"]["3d_fullres"]
    planned = cfg["architecture"]["arch_kwargs"]["features_per_stage"]
    assert res["network"]["features_per_stage"] == [round(f / 4) for f in planned[:3]]
    assert res["schedule"]["num_epochs"] == 2 and res["schedule"]["num_iterations_per_epoch"] == 150


def test_val_flag_reruns_the_denoiser_validation(trained):
    path = os.path.join(trained["fold"], "denoiser_validation.json")
    before = load_json(path)["final"]
    os.remove(path)
    run_cmd(["nnUNetv2_train", str(trained["id"]), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu", "--val"])
    after = load_json(path)["final"]
    for a, b in zip(before["settings"], after["settings"]):  # same seeded noise, same weights
        assert a["noisy"]["dice"] == pytest.approx(b["noisy"]["dice"], abs=1e-9)
        assert a["denoised"]["dice"] == pytest.approx(b["denoised"]["dice"], abs=1e-3)


def _raw_test_labels(trained):
    import SimpleITK as sitk
    files = sorted(glob.glob(os.path.join(trained["raw"], "labelsTs", "*.nii.gz")))
    assert files
    return [sitk.GetArrayFromImage(sitk.ReadImage(f)).astype(np.int64) for f in files]


def test_load_denoiser_and_apply_on_unseen_test_label_maps(trained, monkeypatch):
    """Independent of the trainer's evaluator: labelsTs maps (never preprocessed nor trained on)."""
    from nnunet_sud.denoiser.loading import load_denoiser
    monkeypatch.setenv("nnUNet_denoiser", trained["fold"])
    net = load_denoiser(trained["id"], "nnUNetPlans", "3d_fullres", 0, "cpu")
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.denoiser_info["trainer_name"] == TRAINER
    gains = []
    for i, lab in enumerate(_raw_test_labels(trained)):
        assert lab.shape == (24, 32, 32)  # the patch size: one forward pass
        oh = labels_to_one_hot(torch.from_numpy(lab)[None], 4)
        for sigma, scale in ((4.0, 4.0), (8.0, 8.0)):
            noisy = corrupt_probabilities(oh, sigma, scale, generator=torch.Generator().manual_seed(100 + i))
            den = apply_denoiser(net, noisy)
            d_noisy = np.nanmean([dice(noisy.argmax(1)[0].numpy() == c, lab == c) for c in (1, 2, 3)])
            d_den = np.nanmean([dice(den.argmax(1)[0].numpy() == c, lab == c) for c in (1, 2, 3)])
            gains.append(d_den - d_noisy)
    print("Dice gain denoised - noisy on labelsTs:", np.round(gains, 3))
    assert np.mean(gains) > 0.05


def test_nnunet_predictor_loads_the_denoiser_folder(trained):
    """nnU-Net's own inference set-up rebuilds the skip-free network through build_network_architecture."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunet_sud.denoiser.network import LabelDenoiserAE
    pred = nnUNetPredictor(use_gaussian=False, use_mirroring=False, perform_everything_on_device=False,
                           device=torch.device("cpu"), allow_tqdm=False)
    pred.initialize_from_trained_model_folder(trained["model"], (0,), "checkpoint_final.pth")
    assert isinstance(pred.network, LabelDenoiserAE) and pred.network.decoder.deep_supervision is False
    lab = _raw_test_labels(trained)[0]
    x = corrupt_probabilities(labels_to_one_hot(torch.from_numpy(lab)[None], 4), 0.0, 1.0)[0]
    logits = pred.predict_sliding_window_return_logits(x)
    assert tuple(logits.shape) == (4, *lab.shape)
    with torch.no_grad():
        direct = pred.network.eval()(x[None])[0]
    # one tile (image = patch): sliding window == a forward pass (up to nnU-Net's fp16 accumulation)
    assert torch.allclose(logits.float(), direct, atol=1e-2 * float(direct.abs().max()))
