"""load_denoiser: the default location, nnUNet_denoiser, and every error path (UserFacingError naming
the file and the nnUNetv2_train command that makes a matching denoiser)."""
import copy
import os
import shutil

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_sud.denoiser.loading import DENOISER_MARK, ENV_VAR, default_denoiser_folder, load_denoiser
from nnunet_sud.denoiser.network import LabelDenoiserAE
from nnunet_sud.denoiser.trainer import nnUNetTrainerLabelDenoiser
from nnunet_sud.errors import UserFacingError

CFG = "3d_fullres"
PLANS = "nnUNetPlans"


def _cmd(fold, cfg=CFG):
    return f"nnUNetv2_train 991 {cfg} {fold} -tr nnUNetTrainerLabelDenoiser -p {PLANS}"


SCRATCH_FOLD = 7  # the checkpoint-writing trainers' own output folders (removed afterwards)


def _save(trainer_cls, plans, cfg, dataset_json, path, fold=SCRATCH_FOLD, **settings):
    plans = copy.deepcopy(plans)
    plans["continue_training"] = False
    tr = trainer_cls(plans, cfg, fold, dataset_json, torch.device("cpu"))
    for k, v in settings.items():
        setattr(tr, k, v)
    tr.initialize()
    tr.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def ckpts(synthetic3d, tmp_path_factory, nnunet_dirs):
    """Checkpoints written by real (untrained) trainers: denoisers 3d/2d, a segmenter, mismatching ones."""
    d = tmp_path_factory.mktemp("denoiser_ckpts")
    pre = synthetic3d["preprocessed"]
    plans = load_json(os.path.join(pre, "nnUNetPlans.json"))
    ds = load_json(os.path.join(pre, "dataset.json"))
    out = {"dir": str(d), "plans": plans, "dataset_json": ds}
    out["den3d"] = _save(nnUNetTrainerLabelDenoiser, plans, CFG, ds, str(d / "den3d.pth"))
    out["den2d"] = _save(nnUNetTrainerLabelDenoiser, plans, "2d", ds, str(d / "den2d.pth"))
    out["seg"] = _save(nnUNetTrainer, plans, CFG, ds, str(d / "seg.pth"))
    ds3 = copy.deepcopy(ds)
    ds3["labels"] = {"background": 0, "cavity": 1, "wall": 2}
    out["den3cls"] = _save(nnUNetTrainerLabelDenoiser, plans, CFG, ds3, str(d / "den3cls.pth"))
    coarse = copy.deepcopy(plans)
    coarse["configurations"][CFG]["architecture"]["arch_kwargs"]["strides"] = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [4, 2, 2]]
    out["den_stride16"] = _save(nnUNetTrainerLabelDenoiser, coarse, CFG, ds, str(d / "den_stride16.pth"),
                                denoiser_num_stages=None)  # all planned stages: down-sampling 16 x 8 x 8
    yield out
    # leave no model folders behind for other test modules
    for f in (2, 3, 4, SCRATCH_FOLD):
        shutil.rmtree(default_denoiser_folder(synthetic3d["name"], PLANS, CFG, f), ignore_errors=True)
    shutil.rmtree(default_denoiser_folder(synthetic3d["name"], PLANS, "2d", SCRATCH_FOLD), ignore_errors=True)
    shutil.rmtree(os.path.join(nnunet_dirs["nnUNet_results"], synthetic3d["name"], f"nnUNetTrainer__{PLANS}__{CFG}",
                               f"fold_{SCRATCH_FOLD}"), ignore_errors=True)
    for model in (f"nnUNetTrainer__{PLANS}__{CFG}", f"nnUNetTrainerLabelDenoiser__{PLANS}__{CFG}",
                  f"nnUNetTrainerLabelDenoiser__{PLANS}__2d"):
        folder = os.path.join(nnunet_dirs["nnUNet_results"], synthetic3d["name"], model)
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)


def _variant(ckpts, name, edit):
    ck = torch.load(ckpts["den3d"], map_location="cpu", weights_only=False)
    edit(ck)
    path = os.path.join(ckpts["dir"], name)
    torch.save(ck, path)
    return path


def test_default_location_loads_a_frozen_eval_network(ckpts, synthetic3d, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    folder = default_denoiser_folder(synthetic3d["name"], PLANS, CFG, 2)
    os.makedirs(folder, exist_ok=True)
    shutil.copy(ckpts["den3d"], os.path.join(folder, "checkpoint_final.pth"))
    for ds in (991, "991", synthetic3d["name"]):
        net = load_denoiser(ds, PLANS, CFG, 2, torch.device("cpu"))
        assert isinstance(net, LabelDenoiserAE)
        assert not net.training and all(not m.training for m in net.modules())
        assert not any(p.requires_grad for p in net.parameters())
        assert net.decoder.deep_supervision is False
    assert net.denoiser_info["checkpoint"] == os.path.join(folder, "checkpoint_final.pth")
    assert net.denoiser_info["num_classes"] == 4 and net.denoiser_info["configuration"] == CFG
    ck = torch.load(ckpts["den3d"], map_location="cpu", weights_only=False)["network_weights"]
    for k, v in net.state_dict().items():
        assert torch.equal(v, ck[k]), k
    y = net(torch.softmax(torch.randn(1, 4, 24, 32, 32), 1))
    assert tuple(y.shape) == (1, 4, 24, 32, 32)


def test_env_var_names_a_checkpoint_file_or_a_fold_folder(ckpts, monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, ckpts["den3d"])
    net = load_denoiser(991, PLANS, CFG, 4, "cpu")  # fold 4 has nothing at the default location
    assert net.denoiser_info["checkpoint"] == os.path.abspath(ckpts["den3d"])
    fold = tmp_path / "fold_0"
    fold.mkdir()
    shutil.copy(ckpts["den3d"], fold / "checkpoint_final.pth")
    monkeypatch.setenv(ENV_VAR, str(fold))
    assert load_denoiser(991, PLANS, CFG, 4, "cpu").denoiser_info["checkpoint"] == str(fold / "checkpoint_final.pth")


def test_missing_denoiser_names_the_training_command(ckpts, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(UserFacingError) as e:
        load_denoiser(991, PLANS, CFG, 4, "cpu")
    msg = str(e.value)
    assert _cmd(4) in msg and "fold_4" in msg and "checkpoint_final.pth" in msg and ENV_VAR in msg


def test_unfinished_training_says_continue(ckpts, synthetic3d, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    folder = default_denoiser_folder(synthetic3d["name"], PLANS, CFG, 3)
    os.makedirs(folder, exist_ok=True)
    shutil.copy(ckpts["den3d"], os.path.join(folder, "checkpoint_latest.pth"))
    try:
        with pytest.raises(UserFacingError, match="has not finished") as e:
            load_denoiser(991, PLANS, CFG, 3, "cpu")
        assert _cmd(3) + " --c" in str(e.value)
    finally:
        os.remove(os.path.join(folder, "checkpoint_latest.pth"))


def test_env_var_errors(ckpts, monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nope.pth"))
    with pytest.raises(UserFacingError, match="does not exist") as e:
        load_denoiser(991, PLANS, CFG, 0, "cpu")
    assert "nope.pth" in str(e.value) and _cmd(0) in str(e.value)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(UserFacingError, match="folder without checkpoint_final.pth") as e:
        load_denoiser(991, PLANS, CFG, 0, "cpu")
    assert _cmd(0) in str(e.value)


@pytest.mark.parametrize("case,match", [
    ("garbage", "cannot read the denoiser checkpoint"),
    ("not_nnunet", "is not an nnU-Net training checkpoint"),
    ("seg", "written by nnUNetTrainer, which is not a label denoiser"),
    ("unmarked_unknown_trainer", "written by MyOwnThing, which is not a label denoiser: the checkpoint has no "
                                 "'label_denoiser' entry"),
    ("bad_mark", "'label_denoiser' entry .* is not one this version of nnunet_sud reads"),
    ("mark_classes", "'label_denoiser' entry says 3 classes, its dataset.json 4"),
    ("den3cls", "has 3 classes but Dataset991_Synthetic3D"),
    ("den2d", "is 2d but the segmenter configuration 3d_fullres is 3d"),
    ("den_stride16", r"down-samples by \[16, 8, 8\] but the segmenter's patch \[24, 32, 32\]"),
    ("bad_weights", "weights do not fit the network"),
    ("bad_plans", "cannot restore its plans/configuration"),
])
def test_bad_checkpoints(ckpts, monkeypatch, case, match):
    if case == "garbage":
        path = os.path.join(ckpts["dir"], "garbage.pth")
        open(path, "wb").write(b"this is not a checkpoint")
    elif case == "not_nnunet":
        path = os.path.join(ckpts["dir"], "plain.pth")
        torch.save({"state_dict": {}}, path)
    elif case == "unmarked_unknown_trainer":
        path = _variant(ckpts, "unknown.pth", lambda ck: (ck.pop(DENOISER_MARK), ck.update(trainer_name="MyOwnThing")))
    elif case == "bad_mark":
        path = _variant(ckpts, "bad_mark.pth", lambda ck: ck[DENOISER_MARK].update(format=99))
    elif case == "mark_classes":
        path = _variant(ckpts, "mark_classes.pth", lambda ck: ck[DENOISER_MARK].update(num_classes=3))
    elif case == "bad_weights":
        path = _variant(ckpts, "bad_weights.pth", lambda ck: ck["network_weights"].pop(
            next(k for k in ck["network_weights"] if k.startswith("decoder.stages"))))
    elif case == "bad_plans":
        path = _variant(ckpts, "bad_plans.pth", lambda ck: ck["init_args"].update(configuration="3d_nonexistent"))
    else:
        path = ckpts[case]
    monkeypatch.setenv(ENV_VAR, path)
    with pytest.raises(UserFacingError, match=match) as e:
        load_denoiser(991, PLANS, CFG, 0, "cpu")
    msg = str(e.value)
    assert path in msg or os.path.abspath(path) in msg
    assert _cmd(0) in msg


def test_denoiser_checkpoints_are_marked_and_recognised_by_the_mark_or_the_old_trainer_name(ckpts, monkeypatch):
    """Every checkpoint the denoiser trainer writes says what it holds; the loader builds the network
    from that and the checkpoint's plans, whatever the trainer is called. Checkpoints from before the
    mark load by their trainer's name (nnUNetTrainerLabelDenoiser or a name starting with it)."""
    ck = torch.load(ckpts["den3d"], map_location="cpu", weights_only=False)
    assert ck[DENOISER_MARK] == {"format": 1, "network": "LabelDenoiserAE", "num_classes": 4}
    assert torch.load(ckpts["den2d"], map_location="cpu", weights_only=False)[DENOISER_MARK]["num_classes"] == 4
    assert DENOISER_MARK not in torch.load(ckpts["seg"], map_location="cpu", weights_only=False)
    loadable = {
        "renamed": _variant(ckpts, "renamed_trainer.pth", lambda c: c.update(trainer_name="MyOwnDenoiser")),
        "old": _variant(ckpts, "old_format.pth", lambda c: c.pop(DENOISER_MARK)),
        "old_variant": _variant(ckpts, "old_variant.pth", lambda c: (
            c.pop(DENOISER_MARK), c.update(trainer_name="nnUNetTrainerLabelDenoiser_tiny"))),
    }
    for name, path in loadable.items():
        monkeypatch.setenv(ENV_VAR, path)
        net = load_denoiser(991, PLANS, CFG, 0, "cpu")
        assert isinstance(net, LabelDenoiserAE), name
        for k, v in net.state_dict().items():
            assert torch.equal(v, ck["network_weights"][k]), (name, k)


def test_denoiser_modules_import_no_trainer():
    """Imports run from trainers to the denoiser only: loading a denoiser pulls in no trainer module."""
    import subprocess
    import sys
    code = ("import sys, nnunet_sud.denoiser.loading, nnunet_sud.denoiser.network, nnunet_sud.denoiser.corruption; "
            "bad = sorted(m for m in sys.modules if m.startswith('nnunet_sud.trainers') "
            "or m == 'nnunet_sud.experiment'); "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_label_name_and_configuration_differences_only_warn(ckpts, monkeypatch):
    def rename(ck):
        ck["init_args"]["dataset_json"] = copy.deepcopy(ck["init_args"]["dataset_json"])
        ck["init_args"]["dataset_json"]["labels"] = {"background": 0, "a": 1, "b": 2, "c": 3}
    monkeypatch.setenv(ENV_VAR, _variant(ckpts, "renamed.pth", rename))
    with pytest.warns(UserWarning, match="label names differ"):
        load_denoiser(991, PLANS, CFG, 0, "cpu")


def test_dataset_plans_and_configuration_errors(ckpts, monkeypatch):
    monkeypatch.setenv(ENV_VAR, ckpts["den3d"])
    with pytest.raises(UserFacingError, match="dataset 998 not found"):
        load_denoiser(998, PLANS, CFG, 0, "cpu")
    with pytest.raises(UserFacingError, match="neither a number nor a name"):
        load_denoiser("nine", PLANS, CFG, 0, "cpu")
    with pytest.raises(UserFacingError, match="nnUNetPlansXL.json .* not found") as e:
        load_denoiser(991, "nnUNetPlansXL", CFG, 0, "cpu")
    assert "nnUNetv2_train 991 3d_fullres 0 -tr nnUNetTrainerLabelDenoiser -p nnUNetPlansXL" in str(e.value)
    with pytest.raises(UserFacingError, match="configuration '3d_lowres' is not in"):
        load_denoiser(991, PLANS, "3d_lowres", 0, "cpu")


def test_region_based_datasets_are_refused(ckpts, nnunet_dirs, monkeypatch):
    ds = copy.deepcopy(ckpts["dataset_json"])
    ds["labels"] = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "vessel": 3}
    ds["regions_class_order"] = [1, 2, 3]
    plans = copy.deepcopy(ckpts["plans"])
    plans["dataset_name"] = "Dataset994_Regions"
    pre = os.path.join(nnunet_dirs["nnUNet_preprocessed"], "Dataset994_Regions")
    os.makedirs(pre, exist_ok=True)
    try:
        save_json(plans, os.path.join(pre, "nnUNetPlans.json"))
        save_json(ds, os.path.join(pre, "dataset.json"))
        monkeypatch.setenv(ENV_VAR, ckpts["den3d"])
        with pytest.raises(UserFacingError, match="region-based labels"):
            load_denoiser(994, PLANS, CFG, 0, "cpu")
        plans["continue_training"] = False
        with pytest.raises(UserFacingError, match="region-based labels"):
            nnUNetTrainerLabelDenoiser(plans, CFG, 0, ds, torch.device("cpu"))
    finally:
        shutil.rmtree(pre, ignore_errors=True)
        shutil.rmtree(os.path.join(nnunet_dirs["nnUNet_results"], "Dataset994_Regions"), ignore_errors=True)


def _validation(rows):
    """A denoiser_validation.json 'final' block: rows (sigma, s, noisy Dice, denoised Dice)."""
    return {"trainer": "nnUNetTrainerLabelDenoiser", "final": {"settings": [
        {"sigma": a, "scale": b, "noisy": {"dice": n, "hd95": 1.0}, "denoised": {"dice": d, "hd95": 1.0}}
        for a, b, n, d in rows]}}


@pytest.mark.parametrize("rows,expected", [
    (None, ["no recorded validation", "quality on clean label maps is unknown", "--val"]),
    ([(1.0, 1.0, 0.62, 0.70), (2.0, 2.0, 0.15, 0.60)], ["no sigma = 0 row", "unknown"]),
    ([(0.0, 1.0, 1.0, 0.42), (1.0, 1.0, 0.62, 0.70)], ["sigma = 0, s = 1", "Dice 0.420", "needs >= 0.95",
                                                        "degrades correct segmentations"]),
    ([(0.0, 1.0, 1.0, 0.97), (0.5, 1.0, 0.93, 0.90)], ["sigma = 0.5, s = 1", "Dice 0.900 < 0.930",
                                                        "below 0.95"]),
])
def test_recorded_validation_that_degrades_clean_maps_warns_loudly(ckpts, monkeypatch, tmp_path, rows, expected):
    from nnunet_sud.denoiser.loading import DenoiserQualityWarning
    fold = tmp_path / "fold_0"
    fold.mkdir()
    shutil.copy(ckpts["den3d"], fold / "checkpoint_final.pth")
    if rows is not None:
        save_json(_validation(rows), str(fold / "denoiser_validation.json"))
    monkeypatch.setenv(ENV_VAR, str(fold))
    with pytest.warns(DenoiserQualityWarning) as rec:
        load_denoiser(991, PLANS, CFG, 0, "cpu")
    msg = " ".join(str(w.message) for w in rec if w.category is DenoiserQualityWarning)
    for e in expected:
        assert e in msg, msg
    assert str(fold / ("denoiser_validation.json" if rows is not None else "checkpoint_final.pth")) in msg


def test_recorded_validation_near_identity_on_clean_maps_is_silent(ckpts, monkeypatch, tmp_path):
    import warnings
    from nnunet_sud.denoiser.loading import DenoiserQualityWarning, recorded_validation_problems
    fold = tmp_path / "fold_0"
    fold.mkdir()
    shutil.copy(ckpts["den3d"], fold / "checkpoint_final.pth")
    # sigma = 0.5 noisy maps are the clean ones (Dice ~1): 0.987 there is as good as the clean row
    rows = [(0.0, 1.0, 1.0, 0.95), (0.5, 1.0, 1.0, 0.987), (1.0, 1.0, 0.60, 0.94), (8.0, 8.0, 0.04, 0.5)]
    save_json(_validation(rows), str(fold / "denoiser_validation.json"))
    assert recorded_validation_problems(str(fold / "checkpoint_final.pth")) is None
    monkeypatch.setenv(ENV_VAR, str(fold))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DenoiserQualityWarning)
        load_denoiser(991, PLANS, CFG, 0, "cpu")
    # a stricter threshold flags the same record
    assert "Dice 0.950 against the clean map" in recorded_validation_problems(str(fold / "checkpoint_final.pth"), 0.96)
