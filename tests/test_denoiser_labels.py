"""Extra label maps without images (labelsDenoiser/): preprocessing with the plans and their use by
the denoiser trainer; the trainer's data pipeline (zero images, nnU-Net's spatial augmentation,
corrupted one-hot input)."""
import os
import pickle
import shutil

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from conftest import nnunet_sud_cmd, run_cmd
from helpers import make_trainer
from nnunet_sud.denoiser.data import LabelMapDataset
from nnunet_sud.denoiser.preprocess import preprocess_denoiser_labels
from nnunet_sud.denoiser.trainer import nnUNetTrainerLabelDenoiser
from nnunet_sud.errors import UserFacingError


def _read(path):
    return blosc2.open(path, mode="r")[:]


@pytest.fixture(scope="module")
def extra(synthetic3d):
    """labelsDenoiser/ with: a test-set map, a copy of a training map (to compare with nnU-Net's own
    preprocessing) and a map with 2 mm spacing along x (must be resampled to the plans' 1 mm)."""
    raw = synthetic3d["raw"]
    folder = os.path.join(raw, "labelsDenoiser")
    pre = synthetic3d["preprocessed"]
    outs = [os.path.join(pre, f"nnUNetPlans_{c}_denoiser_labels") for c in ("2d", "3d_fullres")]
    shutil.rmtree(folder, ignore_errors=True)
    for o in outs:
        shutil.rmtree(o, ignore_errors=True)
    os.makedirs(folder)
    shutil.copy(os.path.join(raw, "labelsTs", "syn_ts_000.nii.gz"), os.path.join(folder, "extra_ts0.nii.gz"))
    shutil.copy(os.path.join(raw, "labelsTr", "syn_lab_002.nii.gz"), os.path.join(folder, "extra_lab2.nii.gz"))
    im = sitk.ReadImage(os.path.join(raw, "labelsTs", "syn_ts_001.nii.gz"))
    im.SetSpacing((2.0, 1.0, 1.0))  # sitk order: x, y, z
    sitk.WriteImage(im, os.path.join(folder, "extra_wide.nii.gz"))
    # the in-process trainers below write logs into the default model folder: remove what we add
    model = os.path.join(os.environ["nnUNet_results"], synthetic3d["name"],
                         "nnUNetTrainerLabelDenoiser__nnUNetPlans__3d_fullres")
    existed = {os.path.join(r, f) for r, _, fs in os.walk(model) for f in fs}
    yield {"raw_folder": folder, "out3d": outs[1], "out2d": outs[0], **synthetic3d}
    shutil.rmtree(folder, ignore_errors=True)
    for o in outs:
        shutil.rmtree(o, ignore_errors=True)
    for r, _, fs in os.walk(model, topdown=False):
        for f in fs:
            if os.path.join(r, f) not in existed:
                os.remove(os.path.join(r, f))
        if not os.listdir(r):
            os.rmdir(r)


def test_trainer_demands_preprocessing_of_raw_extra_maps(extra):
    tr = make_trainer(nnUNetTrainerLabelDenoiser, extra, initialize=True)
    with pytest.raises(UserFacingError) as e:
        tr.get_tr_and_val_datasets()
    assert "holds 3 label maps but only 0 are preprocessed" in str(e.value)
    assert "nnunet-sud preprocess-denoiser-labels -d 991 -c 3d_fullres -p nnUNetPlans" in str(e.value)


def test_cli_preprocesses_with_the_plans(extra):
    out = run_cmd(nnunet_sud_cmd("preprocess-denoiser-labels", "-d", 991, "-c", "3d_fullres", "2d", "-np", 2))
    assert extra["out3d"] in out and extra["out2d"] in out
    ids = sorted(f[:-9] for f in os.listdir(extra["out3d"]) if f.endswith("_seg.b2nd"))
    assert ids == ["extra_lab2", "extra_ts0", "extra_wide"]
    assert sorted(f[:-9] for f in os.listdir(extra["out2d"]) if f.endswith("_seg.b2nd")) == ids
    # a copy of a training map is preprocessed exactly like nnU-Net preprocessed the original
    own = os.path.join(extra["preprocessed"], "nnUNetPlans_3d_fullres")
    np.testing.assert_array_equal(_read(os.path.join(extra["out3d"], "extra_lab2_seg.b2nd")),
                                  _read(os.path.join(own, "syn_lab_002_seg.b2nd")))
    p_ours = pickle.load(open(os.path.join(extra["out3d"], "extra_lab2.pkl"), "rb"))
    p_own = pickle.load(open(os.path.join(own, "syn_lab_002.pkl"), "rb"))
    assert set(p_ours["class_locations"]) == set(p_own["class_locations"])
    for k in p_own["class_locations"]:
        np.testing.assert_array_equal(p_ours["class_locations"][k], p_own["class_locations"][k])
    assert not _read(os.path.join(extra["out3d"], "extra_lab2.b2nd")).any()  # stored image: zeros
    # 2 mm along x -> resampled to the plans' 1 mm: twice as many voxels along x, labels kept
    wide = _read(os.path.join(extra["out3d"], "extra_wide_seg.b2nd"))
    src = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(extra["raw_folder"], "extra_wide.nii.gz")))
    assert wide.shape == (1, 24, 32, 64)
    assert set(np.unique(wide)) == set(np.unique(src))
    for lab in (1, 2):
        assert abs((wide == lab).sum() / (2 * (src == lab).sum()) - 1) < 0.1
    # running again skips what is done
    assert "0 to preprocess" in run_cmd(nnunet_sud_cmd("preprocess-denoiser-labels", "-d", 991, "-c", "3d_fullres"))


def test_trainer_trains_on_split_plus_extra_maps_and_validates_on_the_split_only(extra):
    tr = make_trainer(nnUNetTrainerLabelDenoiser, extra, initialize=True)
    splits = load_json(os.path.join(extra["preprocessed"], "splits_final.json"))
    ds_tr, ds_val = tr.get_tr_and_val_datasets()
    assert isinstance(ds_tr, LabelMapDataset)
    assert ds_tr.identifiers == sorted(splits[0]["train"] + ["extra_lab2", "extra_ts0", "extra_wide"])
    assert ds_val.identifiers == sorted(splits[0]["val"])
    data, seg, _, props = ds_tr.load_case("extra_wide")
    assert data.shape == (1, 24, 32, 64) and not data.any() and seg.shape == (1, 24, 32, 64)
    assert "class_locations" in props
    tr.use_denoiser_labels = False
    assert tr.get_tr_and_val_datasets()[0].identifiers == sorted(splits[0]["train"])


def test_preprocess_errors(extra):
    folder = extra["raw_folder"]
    with pytest.raises(UserFacingError, match="configuration '3d_lowres' not in"):
        preprocess_denoiser_labels(991, "3d_lowres")
    with pytest.raises(UserFacingError, match="nnUNetPlansXL.json"):
        preprocess_denoiser_labels(991, "3d_fullres", "nnUNetPlansXL")
    with pytest.raises(UserFacingError, match="not found"):
        preprocess_denoiser_labels(998, "3d_fullres")
    bad = os.path.join(folder, "bad_values.nii.gz")
    arr = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "extra_ts0.nii.gz")))
    arr[0, 0, 0] = 7
    sitk.WriteImage(sitk.GetImageFromArray(arr), bad)
    try:
        with pytest.raises(UserFacingError, match=r"bad_values.nii.gz: label values \[7\] are not in dataset.json"):
            preprocess_denoiser_labels(991, "3d_fullres", num_processes=1)
    finally:
        os.remove(bad)
    clash = os.path.join(folder, "syn_lab_001.nii.gz")
    shutil.copy(os.path.join(folder, "extra_ts0.nii.gz"), clash)
    try:
        with pytest.raises(UserFacingError, match=r"named like training cases: \['syn_lab_001'\]"):
            preprocess_denoiser_labels(991, "3d_fullres")
    finally:
        os.remove(clash)
    moved = folder + "_away"
    os.rename(folder, moved)
    try:
        with pytest.raises(UserFacingError, match="no label maps ending in .nii.gz in .*labelsDenoiser"):
            preprocess_denoiser_labels(991, "3d_fullres")
    finally:
        os.rename(moved, folder)


def test_training_batches_are_corrupted_one_hot_labels(extra, monkeypatch):
    """nnU-Net's loader + spatial augmentation on label maps only; the step input is the corrupted
    one-hot of the augmented target (sigma = 0: exactly its clean encoding)."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # single-threaded loader in this process
    tr = make_trainer(nnUNetTrainerLabelDenoiser, extra, initialize=True)
    tr.corruption_sigma = 0.0
    names = [type(t).__name__ for t in tr.get_training_transforms(
        [24, 32, 32], (-0.5, 0.5), None, (0, 1, 2), False).transforms]
    assert "SpatialTransform" in names and "MirrorTransform" in names
    assert not any("Gamma" in n or "Noise" in n or "Brightness" in n or "Contrast" in n for n in names)
    dl_tr, dl_val = tr.get_dataloaders()
    batch = next(dl_tr)
    target = batch["target"][0]
    assert batch["data"].shape[1] == 1 and not batch["data"].any()  # images never read
    # the denoiser's own batch size (denoiser_batch_size = 8), not the plans' (2)
    assert tuple(target.shape) == (8, 1, 24, 32, 32) and target.min() >= 0 and target.max() <= 3
    x = tr._with_denoiser_input(batch)["data"]
    assert tuple(x.shape) == (8, 4, 24, 32, 32)
    assert torch.allclose(x.sum(1), torch.ones_like(x.sum(1)), atol=1e-5)
    assert torch.equal(x.argmax(1), target[:, 0].long())
    tr.corruption_sigma, tr._corruption = 6.0, None
    noisy = tr._with_denoiser_input(batch)["data"]
    assert (noisy.argmax(1) != target[:, 0]).float().mean() > 0.2
    out = tr.train_step(batch)
    assert np.isfinite(out["loss"])
