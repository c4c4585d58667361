"""End to end: a converted dataset is accepted by nnU-Net's planning/preprocessing and by
``nnunet-sud preprocess-unlabeled`` (real commands, via subprocess, in the session's nnU-Net folders).
"""
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import nnunet_sud_cmd, run_cmd

DATASET_ID = 949  # outside test_conversion.py's 950-969
DATASET_NAME = "Dataset949_ConvE2E"


def _write(arr_zyx, path, spacing=(1.0, 1.0, 1.5)):
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path), useCompression=True)


def _make_source(root, n_labeled=8, n_unlabeled=2, shape=(16, 20, 20)):
    """Folder source: images/<case>.nii.gz (no channel suffix), labels/ for the first n_labeled cases."""
    rng = np.random.default_rng(0)
    os.makedirs(root / "images")
    os.makedirs(root / "labels")
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    for i in range(n_labeled + n_unlabeled):
        c = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
        r = rng.uniform(3, 5)
        lab = (((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= r * r).astype(np.uint8)
        lab[(lab == 1) & (xx > c[2] + 1)] = 2
        img = (100 + 50 * lab + rng.normal(0, 10, shape)).astype(np.float32)
        _write(img, root / "images" / f"scan{i:02d}.nii.gz")
        if i < n_labeled:
            _write(lab, root / "labels" / f"scan{i:02d}.nii.gz")
    return str(root)


@pytest.mark.e2e
def test_converted_dataset_plans_and_preprocesses(tmp_path, nnunet_dirs):
    src = _make_source(tmp_path / "scans")
    shutil.rmtree(os.path.join(nnunet_dirs["nnUNet_preprocessed"], DATASET_NAME), ignore_errors=True)
    out = run_cmd(nnunet_sud_cmd("convert", "folder", src, "-d", DATASET_ID, "--name", "ConvE2E", "--labeled", 5,
                                 "--seed", 1, "--channel-names", "MRI", "--label-names", "background", "core", "rim",
                                 "--overwrite"))
    raw = os.path.join(nnunet_dirs["nnUNet_raw"], DATASET_NAME)
    assert raw in out
    with open(os.path.join(raw, "split.json")) as f:
        split = json.load(f)
    assert len(split["labeled"]) == 5 and len(split["unlabeled"]) == 5

    run_cmd(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1",
             "--verify_dataset_integrity"])
    run_cmd(nnunet_sud_cmd("preprocess-unlabeled", "-d", DATASET_ID, "-c", "3d_fullres", "-np", 1))

    pre = os.path.join(nnunet_dirs["nnUNet_preprocessed"], DATASET_NAME)
    with open(os.path.join(pre, "nnUNetPlans.json")) as f:
        data_identifier = json.load(f)["configurations"]["3d_fullres"]["data_identifier"]
    labeled = sorted(f[:-4] for f in os.listdir(os.path.join(pre, data_identifier)) if f.endswith(".pkl"))
    unlabeled = sorted(f[:-4] for f in os.listdir(os.path.join(pre, data_identifier + "_unlabeled"))
                       if f.endswith(".pkl"))
    assert labeled == sorted(split["labeled"])
    assert unlabeled == sorted(split["unlabeled"])
    # planning saw the labeled cases only (docs/design.md, Data flow)
    with open(os.path.join(pre, "dataset_fingerprint.json")) as f:
        assert len(json.load(f)["spacings"]) == 5
