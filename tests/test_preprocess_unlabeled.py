"""``nnunet-sud preprocess-unlabeled``: equals nnU-Net's own preprocessing, skips what is done,
refuses bad input with messages that name the file and the fix."""
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import nnunet_sud_cmd, run_cmd
from nnunet_sud.errors import UserFacingError
from nnunet_sud.unlabeled.preprocess import find_unlabeled_cases, preprocess_unlabeled


def _load_b2nd(path):
    import blosc2
    return blosc2.open(urlpath=path, mode="r")[:]


@pytest.mark.parametrize("cfg", ["3d_fullres", "2d"])
def test_output_equals_nnunets_preprocessing_of_the_same_image(synthetic3d, cfg, tmp_path):
    """A labeled training image copied into imagesUnlabeled must come out exactly as nnU-Net
    preprocessed it for training (same crop, normalisation, resampling, same array)."""
    import pickle
    from batchgenerators.utilities.file_and_folder_operations import load_json

    raw, pre = synthetic3d["raw"], synthetic3d["preprocessed"]
    plans = load_json(os.path.join(pre, "nnUNetPlans.json"))
    data_identifier = plans["configurations"][cfg]["data_identifier"]
    out = os.path.join(pre, data_identifier + "_unlabeled")
    case = "syn_lab_002"
    copy = os.path.join(raw, "imagesUnlabeled", "zz_copy_of_syn_lab_002_0000.nii.gz")
    shutil.copy(os.path.join(raw, "imagesTr", case + "_0000.nii.gz"), copy)
    try:
        preprocess_unlabeled(synthetic3d["id"], cfg, num_processes=1, progress=False)
        ours = _load_b2nd(os.path.join(out, "zz_copy_of_syn_lab_002.b2nd"))
        theirs = _load_b2nd(os.path.join(pre, data_identifier, case + ".b2nd"))
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.float32
        assert np.array_equal(ours, theirs)
        with open(os.path.join(out, "zz_copy_of_syn_lab_002.pkl"), "rb") as f:
            props = pickle.load(f)
        with open(os.path.join(pre, data_identifier, case + ".pkl"), "rb") as f:
            props_nnunet = pickle.load(f)
        for k in ("spacing", "shape_before_cropping", "bbox_used_for_cropping",
                  "shape_after_cropping_and_before_resampling"):
            assert np.array_equal(np.asarray(props[k]), np.asarray(props_nnunet[k])), k
        # the loader reads class_locations unconditionally: present, one empty entry per foreground class
        assert sorted(props["class_locations"]) == [1, 2, 3]
        assert all(len(v) == 0 for v in props["class_locations"].values())
        # non-zero mask instead of a label: 0 inside (this image has no zero region) -> all 0
        seg = _load_b2nd(os.path.join(out, "zz_copy_of_syn_lab_002_seg.b2nd"))
        assert seg.shape == (1, *ours.shape[1:]) and set(np.unique(seg)) <= {0, -1}
    finally:
        os.remove(copy)
        for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
            p = os.path.join(out, "zz_copy_of_syn_lab_002" + suffix)
            if os.path.exists(p):
                os.remove(p)


def test_rerun_skips_done_cases_and_reports_the_folder(synthetic3d):
    out = run_cmd(nnunet_sud_cmd("preprocess-unlabeled", "-d", synthetic3d["id"], "-c", "3d_fullres"))
    assert "6 of 6 unlabeled cases already preprocessed" in out
    assert "3d_fullres: 0 case(s) written" in out
    info = json.load(open(os.path.join(synthetic3d["preprocessed"], "nnUNetPlans_3d_fullres_unlabeled.json")))
    assert info["configuration"] == "3d_fullres" and len(info["configuration_fingerprint"]) == 40


def test_interrupted_case_is_redone(synthetic3d):
    out = os.path.join(synthetic3d["preprocessed"], "nnUNetPlans_3d_fullres_unlabeled")
    before = _load_b2nd(os.path.join(out, "syn_unl_003.b2nd"))
    # a run killed mid-case leaves temporary files and no .pkl
    os.remove(os.path.join(out, "syn_unl_003.pkl"))
    open(os.path.join(out, ".tmp_syn_unl_003.b2nd"), "w").write("partial")
    folder, n = preprocess_unlabeled(synthetic3d["id"], "3d_fullres", num_processes=1, progress=False)
    assert n == 1 and not os.path.exists(os.path.join(out, ".tmp_syn_unl_003.b2nd"))
    assert np.array_equal(before, _load_b2nd(os.path.join(out, "syn_unl_003.b2nd")))


def _cli_error(*args):
    from nnunet_sud.cli import main
    return main([str(a) for a in args])


def test_error_dataset_not_planned(nnunet_dirs, capsys):
    from nnunet_sud.dataset_conversion.synthetic import generate_dataset
    generate_dataset(nnunet_dirs["nnUNet_raw"], 993, "3d", 2, 1, 0, seed=0, shape=(8, 8, 8))
    assert _cli_error("preprocess-unlabeled", "-d", 993, "-c", "3d_fullres") == 2
    err = capsys.readouterr().err
    assert "nnUNetPlans.json not found" in err and "nnUNetv2_plan_and_preprocess -d 993" in err


def test_error_unknown_dataset(capsys):
    assert _cli_error("preprocess-unlabeled", "-d", 998, "-c", "3d_fullres") == 2
    assert "998" in capsys.readouterr().err


def test_error_configuration_not_in_plans(synthetic3d, capsys):
    assert _cli_error("preprocess-unlabeled", "-d", synthetic3d["id"], "-c", "3d_lowres") == 2
    err = capsys.readouterr().err
    assert "configuration '3d_lowres' is not in" in err and "2d, 3d_fullres" in err


def _raw_folder(tmp_path, files):
    folder = tmp_path / "imagesUnlabeled"
    folder.mkdir()
    img = sitk.GetImageFromArray(np.zeros((4, 4, 4), np.float32))
    for f in files:
        if f.endswith(".nii.gz"):
            sitk.WriteImage(img, str(folder / f))
        else:
            (folder / f).write_text("x")
    return str(folder)


def test_errors_missing_and_empty_folder(tmp_path):
    with pytest.raises(UserFacingError, match="does not exist"):
        find_unlabeled_cases(str(tmp_path / "imagesUnlabeled"), ".nii.gz", 1)
    (tmp_path / "imagesUnlabeled").mkdir()
    with pytest.raises(UserFacingError, match="is empty"):
        find_unlabeled_cases(str(tmp_path / "imagesUnlabeled"), ".nii.gz", 1)


def test_error_wrong_file_ending(tmp_path):
    folder = _raw_folder(tmp_path, ["a_0000.nii.gz", "b_0000.mha"])
    with pytest.raises(UserFacingError, match=r"b_0000\.mha: wrong file ending; this dataset uses '\.nii\.gz'"):
        find_unlabeled_cases(folder, ".nii.gz", 1)


def test_error_bad_channel_naming(tmp_path):
    folder = _raw_folder(tmp_path, ["a.nii.gz"])
    with pytest.raises(UserFacingError, match=r"a\.nii\.gz: name does not follow nnU-Net's channel naming"):
        find_unlabeled_cases(folder, ".nii.gz", 1)


def test_error_wrong_number_of_channels(tmp_path):
    folder = _raw_folder(tmp_path, ["a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz",
                                    "c_0000.nii.gz"])
    with pytest.raises(UserFacingError, match=r"case 'c' .* has channels \[0\], but dataset.json declares 2"):
        find_unlabeled_cases(folder, ".nii.gz", 2)
    with pytest.raises(UserFacingError, match=r"case 'a' .* has channels \[0, 1\], but dataset.json declares 1"):
        find_unlabeled_cases(folder, ".nii.gz", 1)


def test_good_multichannel_grouping(tmp_path):
    folder = _raw_folder(tmp_path, ["a_0001.nii.gz", "a_0000.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz"])
    cases = find_unlabeled_cases(folder, ".nii.gz", 2)
    assert list(cases) == ["a", "b"]
    assert [os.path.basename(f) for f in cases["a"]] == ["a_0000.nii.gz", "a_0001.nii.gz"]


def test_error_unreadable_image(synthetic3d, capsys):
    bad = os.path.join(synthetic3d["raw"], "imagesUnlabeled", "broken_0000.nii.gz")
    with open(bad, "wb") as f:
        f.write(b"this is not a nifti file")
    try:
        assert _cli_error("preprocess-unlabeled", "-d", synthetic3d["id"], "-c", "3d_fullres", "-np", 1) == 2
        err = capsys.readouterr().err
        assert "could not preprocess unlabeled case 'broken'" in err and bad in err
    finally:
        os.remove(bad)
