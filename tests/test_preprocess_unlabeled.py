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
        _remove_case(synthetic3d, "zz_copy_of_syn_lab_002", [out])


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


@pytest.mark.parametrize("plans, flag", [("nnUNetResEncUNetMPlans", " -pl nnUNetPlannerResEncM"),
                                         ("MyPlans", " -overwrite_plans_name MyPlans"), ("nnUNetPlans", "")])
def test_error_plans_not_found_suggests_a_command_that_makes_them(nnunet_dirs, capsys, plans, flag):
    """-p names plans that do not exist: the suggested command, run (planning only), writes exactly them."""
    import re
    from nnunet_sud.dataset_conversion.synthetic import generate_dataset
    generate_dataset(nnunet_dirs["nnUNet_raw"], 996, "3d", 2, 1, 0, seed=0, shape=(8, 8, 8))
    pre = os.path.join(nnunet_dirs["nnUNet_preprocessed"], "Dataset996_Synthetic3D")
    try:
        assert _cli_error("preprocess-unlabeled", "-d", 996, "-c", "3d_fullres", "-p", plans) == 2
        err = capsys.readouterr().err
        assert f"with plans '{plans}'" in err
        cmd = re.search(r"Run: (nnUNetv2_plan_and_preprocess .*)$", err.strip()).group(1)
        assert cmd == "nnUNetv2_plan_and_preprocess -d 996 -c 3d_fullres" + flag
        if flag:  # nnU-Net's own default needs no proof (about a minute per planning run here)
            run_cmd(cmd.split() + ["--no_pp", "-npfp", "1"])
            assert os.path.isfile(os.path.join(pre, plans + ".json"))
    finally:
        shutil.rmtree(pre, ignore_errors=True)
        shutil.rmtree(os.path.join(nnunet_dirs["nnUNet_raw"], "Dataset996_Synthetic3D"), ignore_errors=True)


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
        assert f"{bad} is not a valid gzip file" in err and "remove case 'broken' from imagesUnlabeled" in err
    finally:
        os.remove(bad)


def test_integrity_problems_stop_before_anything_is_written(synthetic3d, capsys):
    """A new case with NaN voxels and a truncated one: one error naming both, the preprocessed
    folder is left exactly as it was (the good new case is not written either)."""
    raw = os.path.join(synthetic3d["raw"], "imagesUnlabeled")
    out = os.path.join(synthetic3d["preprocessed"], "nnUNetPlans_3d_fullres_unlabeled")
    src = os.path.join(synthetic3d["raw"], "imagesTr", "syn_lab_000_0000.nii.gz")
    img = sitk.ReadImage(src)
    a = sitk.GetArrayFromImage(img).astype(np.float32)
    a[3, 4, 5] = np.nan
    nan_img = sitk.GetImageFromArray(a)
    nan_img.CopyInformation(img)
    files = {"zz_nan": os.path.join(raw, "zz_nan_0000.nii.gz"), "zz_cut": os.path.join(raw, "zz_cut_0000.nii.gz"),
             "zz_fine": os.path.join(raw, "zz_fine_0000.nii.gz")}
    sitk.WriteImage(nan_img, files["zz_nan"])
    with open(files["zz_cut"], "wb") as f:
        f.write(open(src, "rb").read()[:2000])
    shutil.copy(src, files["zz_fine"])
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    info_before = open(out + ".json").read()
    try:
        assert _cli_error("preprocess-unlabeled", "-d", synthetic3d["id"], "-c", "3d_fullres", "-np", 1) == 2
        err = capsys.readouterr().err
        assert "2 problem(s)" in err and f"{files['zz_cut']} is truncated" in err
        assert f"{files['zz_nan']}: 1 of {a.size} voxels" in err and files["zz_fine"] not in err
        assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == before
        assert open(out + ".json").read() == info_before
    finally:
        for f in files.values():
            os.remove(f)


# ---------------------------------------------------------------------- labelsUnlabeled
def _copy_labeled_case_as_unlabeled(synthetic3d, case, name, with_label=True):
    """Copy a training case's image (and label) into imagesUnlabeled (and labelsUnlabeled) as ``name``."""
    raw = synthetic3d["raw"]
    os.makedirs(os.path.join(raw, "labelsUnlabeled"), exist_ok=True)
    image = os.path.join(raw, "imagesUnlabeled", name + "_0000.nii.gz")
    label = os.path.join(raw, "labelsUnlabeled", name + ".nii.gz")
    shutil.copy(os.path.join(raw, "imagesTr", case + "_0000.nii.gz"), image)
    if with_label:
        shutil.copy(os.path.join(raw, "labelsTr", case + ".nii.gz"), label)
    return image, label


def _remove_case(synthetic3d, name, out_folders):
    """Remove a case added by a test from raw and preprocessed data; a re-run of preprocess-unlabeled
    puts the folder's manifest back in step with imagesUnlabeled (or training tests would refuse it)."""
    raw = synthetic3d["raw"]
    for f in (os.path.join(raw, "imagesUnlabeled", name + "_0000.nii.gz"),
              os.path.join(raw, "labelsUnlabeled", name + ".nii.gz")):
        if os.path.exists(f):
            os.remove(f)
    for out in out_folders:
        for suffix in (".b2nd", "_seg.b2nd", "_label.b2nd", ".pkl"):
            if os.path.exists(os.path.join(out, name + suffix)):
                os.remove(os.path.join(out, name + suffix))
        cfg = os.path.basename(out)[len("nnUNetPlans_"):-len("_unlabeled")]
        assert preprocess_unlabeled(synthetic3d["id"], cfg, num_processes=1, progress=False)[1] == 0


@pytest.mark.parametrize("cfg", ["3d_fullres", "2d"])
def test_label_is_preprocessed_as_nnunet_preprocesses_a_labeled_case(synthetic3d, cfg):
    """CASE_label.b2nd equals nnU-Net's CASE_seg.b2nd of the same image + label as a training case;
    image and non-zero mask are those of the case without a label."""
    import pickle
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunet_sud.unlabeled.preprocess import LABEL_PROPERTY, label_record

    pre = synthetic3d["preprocessed"]
    data_identifier = load_json(os.path.join(pre, "nnUNetPlans.json"))["configurations"][cfg]["data_identifier"]
    out = os.path.join(pre, data_identifier + "_unlabeled")
    case, name = "syn_lab_003", "zz_labelled_copy"
    _, label_file = _copy_labeled_case_as_unlabeled(synthetic3d, case, name)
    try:
        _, n = preprocess_unlabeled(synthetic3d["id"], cfg, num_processes=1, progress=False)
        assert n == 1
        ours = _load_b2nd(os.path.join(out, name + "_label.b2nd"))
        theirs = _load_b2nd(os.path.join(pre, data_identifier, case + "_seg.b2nd"))
        assert ours.dtype == theirs.dtype == np.int16 and ours.shape == theirs.shape
        assert np.array_equal(ours, theirs) and set(np.unique(ours)) >= {0, 1, 2, 3}
        assert np.array_equal(_load_b2nd(os.path.join(out, name + ".b2nd")),
                              _load_b2nd(os.path.join(pre, data_identifier, case + ".b2nd")))
        # the training inputs are those of the case without a label: the non-zero mask, not the label
        seg = _load_b2nd(os.path.join(out, name + "_seg.b2nd"))
        assert set(np.unique(seg)) <= {0, -1}
        with open(os.path.join(out, name + ".pkl"), "rb") as f:
            props = pickle.load(f)
        assert props[LABEL_PROPERTY] == label_record(label_file) and props[LABEL_PROPERTY]["file"] == name + ".nii.gz"
        assert all(len(v) == 0 for v in props["class_locations"].values())  # labels never steer the crops
    finally:
        _remove_case(synthetic3d, name, [out])


def test_adding_or_removing_a_label_redoes_that_case(synthetic3d):
    import pickle
    from nnunet_sud.unlabeled.preprocess import LABEL_PROPERTY

    out = os.path.join(synthetic3d["preprocessed"], "nnUNetPlans_3d_fullres_unlabeled")
    name = "zz_label_later"
    _, label_file = _copy_labeled_case_as_unlabeled(synthetic3d, "syn_lab_001", name, with_label=False)

    def record():
        with open(os.path.join(out, name + ".pkl"), "rb") as f:
            return pickle.load(f)[LABEL_PROPERTY]
    try:
        assert preprocess_unlabeled(synthetic3d["id"], "3d_fullres", num_processes=1, progress=False)[1] == 1
        assert record() is None and not os.path.exists(os.path.join(out, name + "_label.b2nd"))
        data = _load_b2nd(os.path.join(out, name + ".b2nd"))
        shutil.copy(os.path.join(synthetic3d["raw"], "labelsTr", "syn_lab_001.nii.gz"), label_file)
        assert preprocess_unlabeled(synthetic3d["id"], "3d_fullres", num_processes=1, progress=False)[1] == 1
        assert record()["file"] == name + ".nii.gz" and os.path.exists(os.path.join(out, name + "_label.b2nd"))
        assert np.array_equal(data, _load_b2nd(os.path.join(out, name + ".b2nd")))  # the image does not change
        assert preprocess_unlabeled(synthetic3d["id"], "3d_fullres", num_processes=1, progress=False)[1] == 0
        os.remove(label_file)
        assert preprocess_unlabeled(synthetic3d["id"], "3d_fullres", num_processes=1, progress=False)[1] == 1
        assert record() is None and not os.path.exists(os.path.join(out, name + "_label.b2nd"))
    finally:
        _remove_case(synthetic3d, name, [out])


def test_error_label_without_image(synthetic3d, capsys):
    stray = os.path.join(synthetic3d["raw"], "labelsUnlabeled", "nobody.nii.gz")
    os.makedirs(os.path.dirname(stray), exist_ok=True)
    shutil.copy(os.path.join(synthetic3d["raw"], "labelsTr", "syn_lab_000.nii.gz"), stray)
    try:
        assert _cli_error("preprocess-unlabeled", "-d", synthetic3d["id"], "-c", "3d_fullres", "-np", 1) == 2
        err = capsys.readouterr().err
        assert stray in err and "no image 'nobody_0000.nii.gz' in imagesUnlabeled" in err and "remove the label" in err
    finally:
        os.remove(stray)


def test_error_label_of_wrong_shape(synthetic3d):
    out = os.path.join(synthetic3d["preprocessed"], "nnUNetPlans_3d_fullres_unlabeled")
    name = "zz_bad_label"
    _, label_file = _copy_labeled_case_as_unlabeled(synthetic3d, "syn_lab_000", name, with_label=False)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.uint8)), label_file)
    try:
        with pytest.raises(UserFacingError, match=r"label .*zz_bad_label\.nii\.gz does not have the shape of its image"):
            preprocess_unlabeled(synthetic3d["id"], "3d_fullres", num_processes=1, progress=False)
    finally:
        _remove_case(synthetic3d, name, [out])


# ---------------------------------------------------------------------- in step with imagesUnlabeled
def _info(synthetic3d):
    return json.load(open(os.path.join(synthetic3d["preprocessed"], "nnUNetPlans_3d_fullres_unlabeled.json")))


def test_removed_and_replaced_images_are_followed(synthetic3d, capsys):
    """A removed image's case leaves the folder, a file replaced under the same name is read again,
    a file only touched (same bytes) is not; the manifest lists exactly imagesUnlabeled."""
    from nnunet_sud.unlabeled.preprocess import file_sha1

    raw, pre = synthetic3d["raw"], synthetic3d["preprocessed"]
    out = os.path.join(pre, "nnUNetPlans_3d_fullres_unlabeled")
    run = lambda: preprocess_unlabeled(synthetic3d["id"], "3d_fullres", num_processes=1, progress=False)[1]  # noqa
    a, _ = _copy_labeled_case_as_unlabeled(synthetic3d, "syn_lab_001", "zz_gone", with_label=False)
    b, _ = _copy_labeled_case_as_unlabeled(synthetic3d, "syn_lab_002", "zz_replaced", with_label=False)
    try:
        run()
        capsys.readouterr()
        assert sorted(_info(synthetic3d)["cases"]) == sorted([f"syn_unl_{i:03d}" for i in range(6)] +
                                                             ["zz_gone", "zz_replaced"])
        os.remove(a)
        shutil.copy(os.path.join(raw, "imagesTr", "syn_lab_003_0000.nii.gz"), b)  # same name, other image
        assert run() == 1
        printed = capsys.readouterr().out
        assert f"1 case(s) removed from {out}: their image is no longer in" in printed and "zz_gone" in printed
        assert "1 case(s) redone because their image in" in printed and "changed: zz_replaced" in printed
        assert not [f for f in os.listdir(out) if f.startswith("zz_gone")]
        assert np.array_equal(_load_b2nd(os.path.join(out, "zz_replaced.b2nd")),
                              _load_b2nd(os.path.join(pre, "nnUNetPlans_3d_fullres", "syn_lab_003.b2nd")))
        info = _info(synthetic3d)
        assert "zz_gone" not in info["cases"] and info["cases"]["zz_replaced"][0]["sha1"] == file_sha1(b)
        os.utime(b, ns=(1, 1))  # touched, same bytes: nothing to redo
        assert run() == 0 and _info(synthetic3d)["cases"]["zz_replaced"][0]["mtime_ns"] == 1
    finally:
        _remove_case(synthetic3d, "zz_gone", [out])
        _remove_case(synthetic3d, "zz_replaced", [out])


def test_training_refuses_unlabeled_data_that_disagrees_with_imagesUnlabeled(synthetic3d, capsys, tmp_path):
    from helpers import make_trainer
    from nnunet_sud.trainers import nnUNetTrainerUnlabeledStats

    raw = os.path.join(synthetic3d["raw"], "imagesUnlabeled")
    out = os.path.join(synthetic3d["preprocessed"], "nnUNetPlans_3d_fullres_unlabeled")
    preprocess_unlabeled(synthetic3d["id"], "3d_fullres", num_processes=1, progress=False)
    trainer = make_trainer(nnUNetTrainerUnlabeledStats, synthetic3d, "3d_fullres")
    capsys.readouterr()
    trainer.check_unlabeled_data()
    assert f"unlabeled data: 6 cases in {out}; matches {raw} (6 cases)" in capsys.readouterr().out
    img = os.path.join(raw, "syn_unl_002_0000.nii.gz")
    original = open(img, "rb").read()
    new, away = os.path.join(raw, "zz_new_0000.nii.gz"), str(tmp_path / "syn_unl_002_0000.nii.gz")
    info_file = out + ".json"
    info = open(info_file).read()
    try:
        shutil.move(img, away)
        shutil.copy(os.path.join(synthetic3d["raw"], "imagesTr", "syn_lab_000_0000.nii.gz"), new)
        with pytest.raises(UserFacingError, match=r"does not match the unlabeled images: 1 case\(s\) preprocessed but "
                                                  r"no longer in .*imagesUnlabeled \(syn_unl_002\); 1 case\(s\) in "
                                                  r".*not preprocessed \(zz_new\)\. Re-run: nnunet-sud "
                                                  r"preprocess-unlabeled -d Dataset991_Synthetic3D"):
            trainer.check_unlabeled_data()
        os.remove(new)
        shutil.move(away, img)
        shutil.copy(os.path.join(synthetic3d["raw"], "imagesTr", "syn_lab_000_0000.nii.gz"), img)
        with pytest.raises(UserFacingError, match=r"1 case\(s\) whose image changed since \(syn_unl_002\)"):
            trainer.check_unlabeled_data()
        with open(img, "wb") as f:  # the same bytes again (new mtime): read and found unchanged
            f.write(original)
        trainer.check_unlabeled_data()
        with open(info_file, "w") as f:  # a run that did not finish
            json.dump({**json.loads(info), "cases": None}, f)
        with pytest.raises(UserFacingError, match="the last run of preprocess-unlabeled on it did not finish"):
            trainer.check_unlabeled_data()
        with open(info_file, "w") as f:  # written by an older nnunet_sud: logged, not refused
            json.dump({k: v for k, v in json.loads(info).items() if k != "cases"}, f)
        capsys.readouterr()
        trainer.check_unlabeled_data()
        assert "6 cases in" in capsys.readouterr().out and "not checked against imagesUnlabeled" in open(
            trainer.log_file).read()
    finally:
        if os.path.exists(away):
            shutil.move(away, img)
        with open(img, "wb") as f:
            f.write(original)
        if os.path.exists(new):
            os.remove(new)
        with open(info_file, "w") as f:
            f.write(info)
