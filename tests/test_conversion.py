"""Dataset conversion (``nnunet-sud convert``) on small generated sources of every layout.

Sources are written by the tests themselves: tiny NIfTIs with SimpleITK, h5 files with h5py, a fake
Decathlon task with 4D NIfTIs. Each conversion writes into a temporary raw folder (``-o``) with ids
950-969, so nothing collides with the shared nnU-Net folders of other tests.
"""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import nnunet_sud_cmd
from nnunet_sud.dataset_conversion.folder import convert_folder, convert_kits19
from nnunet_sud.dataset_conversion.h5_layouts import convert_acdc_h5, convert_la_h5
from nnunet_sud.dataset_conversion.msd import convert_msd
from nnunet_sud.dataset_conversion.split import SplitOptions, resolve_labeled_count
from nnunet_sud.dataset_conversion.writer import OutputOptions
from nnunet_sud.errors import UserFacingError

SHARED_LA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "LA_lite")


# ------------------------------------------------------------------------------------------ helpers
def write_image(arr_zyx, path, spacing=(1.0, 1.5, 2.0), origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    sitk.WriteImage(img, str(path), useCompression=True)


def make_case(rng, shape=(6, 8, 10), n_classes=2):
    """(image float32, label uint8) with a box per class."""
    lab = np.zeros(shape, np.uint8)
    for c in range(1, n_classes + 1):
        z, y = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 3)
        lab[z:z + 2, y:y + 3, 2 * c:2 * c + 2] = c
    img = (lab * 0.5 + rng.normal(0, 0.1, shape)).astype(np.float32)
    return img, lab


def make_folder(root, ids_labeled, ids_unlabeled=(), channels=1, suffix=None, seed=0, **kw):
    """SOURCE/images (+ labels) with single-channel files without suffix unless channels > 1 or suffix."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "labels"), exist_ok=True)
    suffix = channels > 1 if suffix is None else suffix
    for cid in list(ids_labeled) + list(ids_unlabeled):
        img, lab = make_case(rng, **kw)
        for c in range(channels):
            name = f"{cid}_{c:04d}.nii.gz" if suffix else f"{cid}.nii.gz"
            write_image(img + c, os.path.join(root, "images", name))
        if cid in ids_labeled:
            write_image(lab, os.path.join(root, "labels", f"{cid}.nii.gz"))
    return str(root)


def out_opts(tmp_path, dataset_id, name=None, **kw):
    """Write into tmp_path/raw; grouped CV splits only into the raw folder unless asked."""
    kw.setdefault("install_cv_splits", False)
    return OutputOptions(dataset_id=dataset_id, name=name, raw_folder=str(tmp_path / "raw"), **kw)


def load_json(path):
    with open(path) as f:
        return json.load(f)


def folder_files(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def assert_raw_layout(ds, n_lab, n_unl, n_test, channels=1, ending=".nii.gz"):
    """Counts in folders, dataset.json and split.json agree; channel naming is nnU-Net's."""
    dj = load_json(os.path.join(ds, "dataset.json"))
    sp = load_json(os.path.join(ds, "split.json"))
    assert (dj["numTraining"], dj["numUnlabeled"], dj["numTest"]) == (n_lab, n_unl, n_test)
    assert (len(sp["labeled"]), len(sp["unlabeled"]), len(sp["test"])) == (n_lab, n_unl, n_test)
    assert len(dj["channel_names"]) == channels and dj["file_ending"] == ending
    assert folder_files(os.path.join(ds, "imagesTr")) == sorted(
        f"{c}_{i:04d}{ending}" for c in sp["labeled"] for i in range(channels))
    assert folder_files(os.path.join(ds, "labelsTr")) == sorted(f"{c}{ending}" for c in sp["labeled"])
    assert folder_files(os.path.join(ds, "imagesUnlabeled")) == sorted(
        f"{c}_{i:04d}{ending}" for c in sp["unlabeled"] for i in range(channels))
    assert folder_files(os.path.join(ds, "imagesTs")) == sorted(
        f"{c}_{i:04d}{ending}" for c in sp["test"] for i in range(channels))
    return dj, sp


def geometry(path):
    img = sitk.ReadImage(str(path))
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), sitk.GetArrayFromImage(img)


# -------------------------------------------------------------------------------------- split logic
def test_labeled_count_parsing():
    assert resolve_labeled_count("8", 80) == 8
    assert resolve_labeled_count("0.1", 80) == 8
    assert resolve_labeled_count("20%", 80) == 16
    assert resolve_labeled_count("all", 80) == 80
    assert resolve_labeled_count("0.01", 80) == 1  # at least one
    for bad in ("0", "-3", "abc", "1.5", "150%"):
        with pytest.raises(UserFacingError, match="--labeled"):
            resolve_labeled_count(bad, 80)
    with pytest.raises(UserFacingError, match="only 80"):
        resolve_labeled_count("81", 80)


# ------------------------------------------------------------------------------------------- folder
def test_folder_counts_names_geometry(tmp_path):
    lab_ids = [f"case{i:02d}" for i in range(6)]
    src = make_folder(tmp_path / "src", lab_ids, ["extra0", "extra1"])
    ds = convert_folder(src, out_opts(tmp_path, 950), SplitOptions(labeled="4", seed=3),
                        label_names=["background", "a", "b"])
    assert os.path.basename(ds) == "Dataset950_src"
    dj, sp = assert_raw_layout(ds, 4, 4, 0)
    assert dj["labels"] == {"background": 0, "a": 1, "b": 2}
    # unlabeled = images without label + labeled ones beyond the count (labels withheld: only in labelsUnlabeled)
    assert {"extra0", "extra1"} <= set(sp["unlabeled"])
    assert sorted(sp["withheld_labels"]) == sorted(set(lab_ids) - set(sp["labeled"]))
    assert folder_files(os.path.join(ds, "labelsUnlabeled")) == sorted(f"{c}.nii.gz" for c in sp["withheld_labels"])
    for cid in sp["withheld_labels"]:
        np.testing.assert_array_equal(geometry(os.path.join(ds, "labelsUnlabeled", cid + ".nii.gz"))[3],
                                      geometry(os.path.join(src, "labels", cid + ".nii.gz"))[3])
    assert sp["counts"]["withheld_labels"] == 2 and sp["seed"] == 3 and sp["source"]["type"] == "folder"
    for cid in sp["labeled"]:
        size, spacing, origin, arr = geometry(os.path.join(ds, "labelsTr", cid + ".nii.gz"))
        src_size, src_spacing, src_origin, src_arr = geometry(os.path.join(src, "labels", cid + ".nii.gz"))
        assert (size, spacing, origin) == (src_size, src_spacing, src_origin) == ((10, 8, 6), (1.0, 1.5, 2.0),
                                                                                (0.0, 0.0, 0.0))
        np.testing.assert_array_equal(arr, src_arr)
        assert set(np.unique(arr)) <= {0, 1, 2}
    # without --label-names the labels are inferred from the values found
    ds2 = convert_folder(src, out_opts(tmp_path, 951), SplitOptions(labeled="all"))
    dj2, sp2 = assert_raw_layout(ds2, 6, 2, 0)
    assert dj2["labels"] == {"background": 0, "label_1": 1, "label_2": 2}


def test_folder_split_reproducible(tmp_path):
    src = make_folder(tmp_path / "src", [f"c{i:02d}" for i in range(12)], shape=(4, 5, 6))
    splits = {}
    for did, seed in ((952, 0), (953, 0), (954, 1)):
        ds = convert_folder(src, out_opts(tmp_path, did), SplitOptions(labeled="4", seed=seed))
        splits[did] = load_json(os.path.join(ds, "split.json"))["labeled"]
    assert splits[952] == splits[953]           # same seed -> same split
    assert splits[952] != splits[954]           # different seed -> different split
    ds = convert_folder(src, out_opts(tmp_path, 955), SplitOptions(labeled="4", select="first", seed=5))
    assert load_json(os.path.join(ds, "split.json"))["labeled"] == ["c00", "c01", "c02", "c03"]
    # --split-file reuses an earlier split exactly
    ds = convert_folder(src, out_opts(tmp_path, 956),
                        SplitOptions(split_file=os.path.join(tmp_path, "raw", "Dataset954_src", "split.json")))
    assert load_json(os.path.join(ds, "split.json"))["labeled"] == splits[954]
    # --num-test uses its own seed: the test set does not move when --seed changes
    tests = []
    for did, seed in ((957, 0), (958, 1)):
        ds = convert_folder(src, out_opts(tmp_path, did), SplitOptions(labeled="3", seed=seed, num_test=3))
        sp = load_json(os.path.join(ds, "split.json"))
        assert_raw_layout(ds, 3, 6, 3)
        assert not set(sp["test"]) & set(sp["labeled"] + sp["unlabeled"])
        assert folder_files(os.path.join(ds, "labelsTs")) == sorted(f"{c}.nii.gz" for c in sp["test"])
        tests.append(sp["test"])
    assert tests[0] == tests[1]


def test_folder_multichannel_and_test_list(tmp_path):
    src = make_folder(tmp_path / "src", ["p1", "p2", "p3", "p4"], ["u1"], channels=2)
    with open(tmp_path / "test.list", "w") as f:
        f.write("p4\n")
    ds = convert_folder(src, out_opts(tmp_path, 959, name="MultiCh"), SplitOptions(labeled="2", test_ids=["p4"]),
                        channel_names=["T2", "ADC"])
    dj, sp = assert_raw_layout(ds, 2, 2, 1, channels=2)
    assert dj["channel_names"] == {"0": "T2", "1": "ADC"} and sp["test"] == ["p4"]
    assert folder_files(os.path.join(ds, "labelsTs")) == ["p4.nii.gz"]
    # channel 1 really is channel 1 of the source
    _, _, _, a = geometry(os.path.join(ds, "imagesUnlabeled", "u1_0001.nii.gz"))
    _, _, _, b = geometry(os.path.join(src, "images", "u1_0001.nii.gz"))
    np.testing.assert_array_equal(a, b)


def test_folder_png_2d(tmp_path):
    """Any format nnU-Net reads: 2D PNGs keep their ending and pixels."""
    rng = np.random.default_rng(5)
    for sub in ("images", "labels"):
        os.makedirs(tmp_path / "src" / sub)
    for i in range(3):
        lab = np.zeros((12, 16), np.uint8)
        lab[3:7, 4:9] = 1
        sitk.WriteImage(sitk.GetImageFromArray((rng.random((12, 16)) * 255).astype(np.uint8)),
                        str(tmp_path / "src" / "images" / f"img{i}.png"))
        sitk.WriteImage(sitk.GetImageFromArray(lab), str(tmp_path / "src" / "labels" / f"img{i}.png"))
    ds = convert_folder(str(tmp_path / "src"), out_opts(tmp_path, 961), SplitOptions(labeled="2", seed=0))
    dj, sp = assert_raw_layout(ds, 2, 1, 0, ending=".png")
    _, _, _, arr = geometry(os.path.join(ds, "labelsTr", sp["labeled"][0] + ".png"))
    assert arr.shape == (12, 16) and set(np.unique(arr)) == {0, 1}


def test_folder_group_regex_keeps_patients_together(tmp_path):
    ids = [f"patient{p:03d}_frame{f:02d}" for p in range(1, 9) for f in (1, 12)]
    src = make_folder(tmp_path / "src", ids, shape=(3, 6, 8))
    regex = r"^(patient\d+)_"
    ds = convert_folder(src, out_opts(tmp_path, 960, install_cv_splits=True),
                        SplitOptions(labeled="3", seed=2, num_test=2), group_regex=regex)
    dj, sp = assert_raw_layout(ds, 6, 6, 4)
    patients = lambda cases: {c.split("_")[0] for c in cases}  # noqa: E731
    lab, unl, test = patients(sp["labeled"]), patients(sp["unlabeled"]), patients(sp["test"])
    assert len(lab) == 3 and len(test) == 2 and not (lab & unl) and not (lab & test) and not (unl & test)
    assert sp["groups"]["patient001"] == ["patient001_frame01", "patient001_frame12"]
    # grouped 5-fold CV (3 groups -> 3 folds), frames of a patient never split between train and val
    cv = load_json(os.path.join(ds, "splits_final.json"))
    assert len(cv) == 3
    for fold in cv:
        assert sorted(fold["train"] + fold["val"]) == sorted(sp["labeled"])
        assert not patients(fold["train"]) & patients(fold["val"])
    pre = os.path.join(os.environ["nnUNet_preprocessed"], "Dataset960_src", "splits_final.json")
    assert load_json(pre) == cv
    # a test list holding only one frame of a patient would leak that patient into training
    with pytest.raises(UserFacingError, match="group 'patient002' is split"):
        convert_folder(src, out_opts(tmp_path, 961), SplitOptions(labeled="2", test_ids=["patient002_frame01"]),
                       group_regex=regex)
    with pytest.raises(UserFacingError, match="does not match --group-regex"):
        convert_folder(src, out_opts(tmp_path, 961), SplitOptions(labeled="2"), group_regex=r"^(case\d+)")
    shutil.rmtree(os.path.dirname(pre))


def test_folder_errors(tmp_path):
    src = make_folder(tmp_path / "src", ["a1", "a2", "a3"], ["u1"])
    raw = tmp_path / "raw"
    split = SplitOptions(labeled="2")

    def expect(match, source=src, opts=None, split_opts=split, **kw):
        with pytest.raises(UserFacingError, match=match):
            convert_folder(source, opts or out_opts(tmp_path, 962), split_opts, **kw)
        # nothing half-written is left behind
        assert not [d for d in folder_files(raw) if d.startswith(".") or d.startswith("Dataset962")]

    expect("does not exist", source=str(tmp_path / "nope"))
    expect("asks for 5 labeled cases, but only 3", split_opts=SplitOptions(labeled="5"))
    expect("--test-list names case", split_opts=SplitOptions(labeled="1", test_ids=["zz"]))
    # label with unexpected values
    write_image(np.full((6, 8, 10), 3, np.uint8), os.path.join(src, "labels", "a2.nii.gz"))
    expect(r"unexpected values \[3\]", split_opts=SplitOptions(labeled="all"),
           label_names=["background", "x", "y"])
    write_image(np.full((6, 8, 10), 0.5, np.float32), os.path.join(src, "labels", "a2.nii.gz"))
    expect("non-integer", split_opts=SplitOptions(labeled="all"))
    # geometry: shape, spacing, origin
    write_image(np.zeros((6, 8, 9), np.uint8), os.path.join(src, "labels", "a2.nii.gz"))
    expect("geometry mismatch .*a2.*shape", split_opts=SplitOptions(labeled="all"))
    write_image(np.zeros((6, 8, 10), np.uint8), os.path.join(src, "labels", "a2.nii.gz"), spacing=(1, 1, 1))
    expect("geometry mismatch .*spacing", split_opts=SplitOptions(labeled="all"))
    write_image(np.zeros((6, 8, 10), np.uint8), os.path.join(src, "labels", "a2.nii.gz"), origin=(5, 0, 0))
    expect("geometry mismatch .*origin", split_opts=SplitOptions(labeled="all"))
    os.remove(os.path.join(src, "labels", "a2.nii.gz"))
    # label without image
    write_image(np.zeros((6, 8, 10), np.uint8), os.path.join(src, "labels", "orphan.nii.gz"))
    expect("label\\(s\\) without image: orphan")
    os.remove(os.path.join(src, "labels", "orphan.nii.gz"))
    # existing dataset id, then --overwrite
    ds = convert_folder(src, out_opts(tmp_path, 963), split)
    with pytest.raises(UserFacingError, match="dataset id 963 already exists.*--overwrite"):
        convert_folder(src, out_opts(tmp_path, 963, name="Other"), split)
    ds2 = convert_folder(src, out_opts(tmp_path, 963, name="Other", overwrite=True), SplitOptions(labeled="1"))
    assert not os.path.exists(ds) and load_json(os.path.join(ds2, "dataset.json"))["numTraining"] == 1


def test_folder_refuses_two_image_or_label_folders(tmp_path):
    """images/ and imagesTr/ (or labels/ and labelsTr/) side by side: only one would be converted."""
    src = make_folder(tmp_path / "src", ["a1", "a2"], ["u1"])
    shutil.copytree(os.path.join(src, "images"), os.path.join(src, "imagesTr"))
    with pytest.raises(UserFacingError, match=r"has images/ and imagesTr/: both could hold the images.*"
                                              r"--images-dir images or --images-dir imagesTr"):
        convert_folder(src, out_opts(tmp_path, 964), SplitOptions())
    os.remove(os.path.join(src, "imagesTr", "u1.nii.gz"))
    ds = convert_folder(src, out_opts(tmp_path, 964), SplitOptions(), images_dir="imagesTr")
    assert_raw_layout(ds, 2, 0, 0)  # the folder named is the one used
    shutil.copytree(os.path.join(src, "labels"), os.path.join(src, "labelsTr"))
    with pytest.raises(UserFacingError, match=r"has labels/ and labelsTr/.*--labels-dir labels or --labels-dir "
                                              r"labelsTr"):
        convert_folder(src, out_opts(tmp_path, 965), SplitOptions(), images_dir="images")


@pytest.mark.parametrize("channel_suffix", ["auto", "no"])
def test_folder_refuses_a_case_with_and_without_channel_suffix(tmp_path, channel_suffix):
    """CASE.nii.gz and CASE_0000.nii.gz became two cases: the labeled image also landed in imagesUnlabeled."""
    src = make_folder(tmp_path / "src", ["a1", "a2"], ["u1"])
    shutil.copy(os.path.join(src, "images", "a1.nii.gz"), os.path.join(src, "images", "a1_0000.nii.gz"))
    with pytest.raises(UserFacingError) as e:
        convert_folder(src, out_opts(tmp_path, 966), SplitOptions(), channel_suffix=channel_suffix)
    msg = str(e.value)
    assert f"{os.path.join(src, 'images', 'a1.nii.gz')} and a1_0000.nii.gz" in msg
    assert "'a1' and 'a1_0000'" in msg and "imagesUnlabeled" in msg and "a2" not in msg
    assert not os.path.exists(tmp_path / "raw" / "Dataset966_src")


def test_folder_test_list_naming_an_unlabeled_image(tmp_path):
    """Before: u1 went to imagesTs without a label (nothing to evaluate it against) and every labeled
    case stayed in training. Now an error naming the case; within a group whose labeled case is in
    the test list, an unlabeled frame goes to the test set with it."""
    src = make_folder(tmp_path / "src", ["a1", "a2", "a3"], ["u1"])
    with pytest.raises(UserFacingError, match=r"--test-list names case\(s\) without a label: u1\. "):
        convert_folder(src, out_opts(tmp_path, 967), SplitOptions(test_ids=["a3", "u1"]))
    grouped = make_folder(tmp_path / "grouped", ["p1_f1", "p2_f1", "p3_f1"], ["p3_f2", "p2_f2"])
    ds = convert_folder(grouped, out_opts(tmp_path, 968), SplitOptions(test_ids=["p3_f1", "p3_f2"]),
                        group_regex=r"^(p\d)_")
    dj, sp = assert_raw_layout(ds, 2, 1, 2)
    assert sp["test"] == ["p3_f1", "p3_f2"] and folder_files(os.path.join(ds, "labelsTs")) == ["p3_f1.nii.gz"]
    with pytest.raises(UserFacingError, match=r"without a label: p2_f2\. "):
        convert_folder(grouped, out_opts(tmp_path, 969), SplitOptions(test_ids=["p3_f1", "p2_f2"]),
                       group_regex=r"^(p\d)_")


# ------------------------------------------------------------------------------------------- la-h5
def make_la_h5(root, train_ids, test_ids, shape_xyz=(10, 8, 6), spacing=None):
    import h5py
    rng = np.random.default_rng(0)
    arrays = {}
    for cid in list(train_ids) + list(test_ids):
        os.makedirs(os.path.join(root, "2018LA_Seg_Training Set", cid), exist_ok=True)
        img, lab = make_case(rng, shape=shape_xyz, n_classes=1)
        with h5py.File(os.path.join(root, "2018LA_Seg_Training Set", cid, "mri_norm2.h5"), "w") as f:
            f.create_dataset("image", data=img)
            f.create_dataset("label", data=lab)
            if spacing is not None:
                f.attrs["spacing"] = spacing
        arrays[cid] = (img, lab)
    for name, ids in (("train.list", train_ids), ("test.list", test_ids)):
        with open(os.path.join(root, name), "w") as f:
            f.write("".join(f"{i}\n" for i in ids))
    return str(root), arrays


def test_la_h5(tmp_path):
    train = ["LA0", "LA1", "LA2", "LA3", "LA4", "LA5"]
    src, arrays = make_la_h5(tmp_path / "LA", train, ["LT0", "LT1"])
    ds = convert_la_h5(src, out_opts(tmp_path, 964), SplitOptions(labeled="2"))
    dj, sp = assert_raw_layout(ds, 2, 4, 2)
    assert sp["labeled"] == ["LA0", "LA1"] and sp["selection"] == "first"  # UA-MT: first N of train.list
    assert dj["labels"] == {"background": 0, "left_atrium": 1} and dj["channel_names"] == {"0": "MRI"}
    assert folder_files(os.path.join(ds, "labelsTs")) == ["LT0.nii.gz", "LT1.nii.gz"]
    assert folder_files(os.path.join(ds, "labelsUnlabeled")) == [f"{c}.nii.gz" for c in train[2:]]  # withheld
    _, _, _, withheld = geometry(os.path.join(ds, "labelsUnlabeled", "LA3.nii.gz"))
    np.testing.assert_array_equal(withheld, arrays["LA3"][1].transpose(2, 1, 0))
    # h5 arrays are (x, y, z): the NIfTI has size (x, y, z), 0.625 mm, same voxels
    size, spacing, _, arr = geometry(os.path.join(ds, "imagesTr", "LA1_0000.nii.gz"))
    assert size == (10, 8, 6) and spacing == (0.625, 0.625, 0.625)
    np.testing.assert_allclose(arr, arrays["LA1"][0].transpose(2, 1, 0))
    _, _, _, lab = geometry(os.path.join(ds, "labelsTs", "LT0.nii.gz"))
    np.testing.assert_array_equal(lab, arrays["LT0"][1].transpose(2, 1, 0))
    assert set(np.unique(lab)) == {0, 1}
    # seeded random selection instead: reproducible, seed-dependent
    picks = []
    for did, seed in ((965, 7), (966, 7), (967, 8)):
        ds = convert_la_h5(src, out_opts(tmp_path, did), SplitOptions(labeled="3", select="random", seed=seed))
        picks.append(load_json(os.path.join(ds, "split.json"))["labeled"])
    assert picks[0] == picks[1] != picks[2]
    # stored spacing wins over the default; label values are checked
    src2, _ = make_la_h5(tmp_path / "LA2", ["A", "B"], [], spacing=[0.5, 0.6, 0.7])
    raw2 = str(tmp_path / "raw2")
    ds = convert_la_h5(src2, OutputOptions(964, None, raw_folder=raw2), SplitOptions(labeled="1"))
    assert geometry(os.path.join(ds, "imagesTr", "A_0000.nii.gz"))[1] == pytest.approx((0.5, 0.6, 0.7))
    import h5py
    with h5py.File(os.path.join(src2, "2018LA_Seg_Training Set", "A", "mri_norm2.h5"), "a") as f:
        f["label"][0, 0, 0] = 255
    with pytest.raises(UserFacingError, match=r"unexpected values \[255\]"):
        convert_la_h5(src2, OutputOptions(965, None, raw_folder=raw2), SplitOptions(labeled="1"))
    os.remove(os.path.join(src2, "2018LA_Seg_Training Set", "B", "mri_norm2.h5"))
    with pytest.raises(UserFacingError, match="case 'B'.*mri_norm2.h5 is missing"):
        convert_la_h5(src2, OutputOptions(965, None, raw_folder=raw2), SplitOptions(labeled="1"))


# ------------------------------------------------------------------------------------------ acdc-h5
def make_acdc_h5(root, train_patients, val_patients, test_patients, slice_only=()):
    """SSL4MIS ACDC: 3D frames (z, y, x) in data/, frames listed in slice_only only as 2D slices."""
    import h5py
    rng = np.random.default_rng(1)
    os.makedirs(os.path.join(root, "data", "slices"), exist_ok=True)
    arrays = {}
    lists = {"train": train_patients, "val": val_patients, "test": test_patients}
    for name, patients in lists.items():
        with open(os.path.join(root, f"{name}.list"), "w") as lf:
            for p in patients:
                for fr in ("frame01", "frame12"):
                    fid = f"patient{p:03d}_{fr}"
                    lf.write(fid + "\n")
                    img, lab = make_case(rng, shape=(4, 7, 9), n_classes=3)
                    arrays[fid] = (img, lab)
                    if fid in slice_only:
                        for s in range(img.shape[0]):
                            with h5py.File(os.path.join(root, "data", "slices", f"{fid}_slice_{s}.h5"), "w") as f:
                                f.create_dataset("image", data=img[s])
                                f.create_dataset("label", data=lab[s])
                    else:
                        with h5py.File(os.path.join(root, "data", fid + ".h5"), "w") as f:
                            f.create_dataset("image", data=img)
                            f.create_dataset("label", data=lab)
    return str(root), arrays


def test_acdc_h5_by_patient(tmp_path):
    src, arrays = make_acdc_h5(tmp_path / "ACDC", [1, 2, 3, 4, 5, 6], [7], [8, 9],
                               slice_only=("patient002_frame12", "patient008_frame01"))
    ds = convert_acdc_h5(src, out_opts(tmp_path, 950), SplitOptions(labeled="2"))
    dj, sp = assert_raw_layout(ds, 4, 8, 4)
    assert sp["labeled"] == ["patient001_frame01", "patient001_frame12", "patient002_frame01", "patient002_frame12"]
    assert sp["excluded"] == ["patient007_frame01", "patient007_frame12"]  # --val-to exclude (default)
    assert dj["labels"] == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
    # frames stacked back from slices equal the original volume; nominal spacing
    for fid, folder in (("patient002_frame12", "labelsTr"), ("patient008_frame01", "labelsTs")):
        size, spacing, _, lab = geometry(os.path.join(ds, folder, fid + ".nii.gz"))
        assert size == (9, 7, 4) and spacing == (1.5625, 1.5625, 10.0)
        np.testing.assert_array_equal(lab, arrays[fid][1])
    _, _, _, img = geometry(os.path.join(ds, "imagesTr", "patient002_frame12_0000.nii.gz"))
    np.testing.assert_allclose(img, arrays["patient002_frame12"][0])
    # random patients: both frames together, reproducible, seed-dependent; val joins the unlabeled pool
    picks = []
    for did, seed in ((951, 3), (952, 3), (953, 4)):
        ds = convert_acdc_h5(src, out_opts(tmp_path, did), SplitOptions(labeled="2", select="random", seed=seed),
                             val_to="unlabeled")
        sp = load_json(os.path.join(ds, "split.json"))
        assert len(sp["labeled"]) == 4 and len({c[:10] for c in sp["labeled"]}) == 2
        assert "patient007_frame01" in sp["unlabeled"]
        picks.append(sp["labeled"])
    assert picks[0] == picks[1] != picks[2]
    with pytest.raises(UserFacingError, match="asks for 7 labeled groups, but only 6"):
        convert_acdc_h5(src, out_opts(tmp_path, 954), SplitOptions(labeled="7"))
    os.remove(os.path.join(src, "data", "slices", "patient002_frame12_slice_1.h5"))
    with pytest.raises(UserFacingError, match="patient002_frame12_slice_1.h5 are missing"):
        convert_acdc_h5(src, out_opts(tmp_path, 954), SplitOptions(labeled="2"))


# ------------------------------------------------------------------------------------------- kits19
def test_kits19_regions(tmp_path):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    rng = np.random.default_rng(2)
    root = tmp_path / "kits19" / "data"
    for i in range(5):
        d = root / f"case_{i:05d}"
        os.makedirs(d)
        img, lab = make_case(rng, n_classes=2)
        write_image(img * 100, d / "imaging.nii.gz", spacing=(0.8, 0.8, 3.0))
        if i < 4:  # the last case has no segmentation (like KiTS19's test cases)
            write_image(lab, d / "segmentation.nii.gz", spacing=(0.8, 0.8, 3.0))
    ds = convert_kits19(str(tmp_path / "kits19"), out_opts(tmp_path, 955),
                        SplitOptions(labeled="2", seed=0, num_test=1))
    dj, sp = assert_raw_layout(ds, 2, 2, 1)
    assert "case_00004" in sp["unlabeled"] and dj["channel_names"] == {"0": "CT"}
    assert dj["labels"] == {"background": 0, "kidney": [1, 2], "tumor": 2} and dj["regions_class_order"] == [1, 2]
    lm = LabelManager(dj["labels"], dj["regions_class_order"])
    regions = [tuple(np.atleast_1d(r).tolist()) for r in lm.foreground_regions]
    assert lm.has_regions and regions == [(1, 2), (2,)]
    # nnU-Net's region -> label conversion: tumor voxels count as kidney and come back as 2
    _, _, _, lab = geometry(os.path.join(ds, "labelsTr", sp["labeled"][0] + ".nii.gz"))
    onehot = np.stack([np.isin(lab, r) for r in regions]).astype(np.float32)
    back = lm.convert_logits_to_segmentation(onehot * 20 - 10)  # confident logits
    np.testing.assert_array_equal(np.asarray(back), lab)
    ds = convert_kits19(str(tmp_path / "kits19"), out_opts(tmp_path, 956), SplitOptions(), regions=False,
                        drop_unlabeled_images=True)
    dj, sp = assert_raw_layout(ds, 4, 0, 0)
    assert dj["labels"] == {"background": 0, "kidney": 1, "tumor": 2} and "regions_class_order" not in dj
    write_image(np.full((6, 8, 10), 3, np.uint8), root / "case_00001" / "segmentation.nii.gz", spacing=(0.8, 0.8, 3.0))
    with pytest.raises(UserFacingError, match=r"case_00001.*unexpected values \[3\].*1 kidney, 2 tumor"):
        convert_kits19(str(tmp_path / "kits19"), out_opts(tmp_path, 957), SplitOptions())


# ---------------------------------------------------------------------------------------------- msd
def make_msd_task(root, n_tr=4, n_ts=2, channels=2):
    """Fake Decathlon task: 4D NIfTI images (x, y, z, channel), 3D labels, MSD dataset.json."""
    rng = np.random.default_rng(3)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(root / sub)
    training = []
    for i in range(n_tr + n_ts):
        cid = f"fake_{i:03d}"
        img, lab = make_case(rng)
        img4 = sitk.JoinSeries([sitk.GetImageFromArray(img + c) for c in range(channels)])
        img4.SetSpacing((1.0, 1.5, 2.0, 1.0))
        sub = "imagesTr" if i < n_tr else "imagesTs"
        sitk.WriteImage(img4, str(root / sub / f"{cid}.nii.gz"))
        if i < n_tr:
            write_image(lab, root / "labelsTr" / f"{cid}.nii.gz")
            training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
    djson = {"name": "Fake", "description": "fake task", "reference": "none", "licence": "CC-BY-SA 4.0",
             "release": "1.0", "tensorImageSize": "4D", "modality": {str(c): f"MR{c}" for c in range(channels)},
             "labels": {"0": "background", "1": "a", "2": "b"}, "numTraining": n_tr, "numTest": n_ts,
             "training": training, "test": [f"./imagesTs/fake_{i:03d}.nii.gz" for i in range(n_tr, n_tr + n_ts)]}
    with open(root / "dataset.json", "w") as f:
        json.dump(djson, f)
    return str(root)


def test_msd(tmp_path):
    src = make_msd_task(tmp_path / "Task99_Fake")
    ds = convert_msd(src, out_opts(tmp_path, 958), SplitOptions(labeled="2", seed=1))
    assert os.path.basename(ds) == "Dataset958_Fake"
    dj, sp = assert_raw_layout(ds, 2, 4, 0, channels=2)
    assert {"fake_004", "fake_005"} <= set(sp["unlabeled"])  # MSD imagesTs -> unlabeled (default)
    assert dj["channel_names"] == {"0": "MR0", "1": "MR1"} and dj["labels"] == {"background": 0, "a": 1, "b": 2}
    assert dj["licence"] == "CC-BY-SA 4.0" and dj["description"] == "fake task"
    size, spacing, _, arr = geometry(os.path.join(ds, "imagesUnlabeled", "fake_004_0001.nii.gz"))
    assert size == (10, 8, 6) and spacing == (1.0, 1.5, 2.0)
    np.testing.assert_allclose(arr, sitk.GetArrayFromImage(sitk.ReadImage(
        os.path.join(src, "imagesTs", "fake_004.nii.gz")))[1])
    assert not [d for d in os.listdir(tmp_path / "raw") if d.startswith(".")]  # staging removed
    ds = convert_msd(src, out_opts(tmp_path, 959), SplitOptions(labeled="all", num_test=1), imagests_to="test")
    dj, sp = assert_raw_layout(ds, 3, 0, 3, channels=2)
    assert len(folder_files(os.path.join(ds, "labelsTs"))) == 1  # only the drawn test case has a label
    with pytest.raises(UserFacingError, match="TaskXX_Name"):
        convert_msd(str(tmp_path / "raw"), out_opts(tmp_path, 960), SplitOptions())


# --------------------------------------------------------------------------------------- real data
@pytest.mark.skipif(not os.path.isdir(SHARED_LA), reason="../shared/data/LA_lite is absent")
def test_la_lite_geometry_preserved(tmp_path):
    with open(os.path.join(SHARED_LA, "train.list")) as f:
        ids = [line.strip() for line in f if line.strip()][:5]
    with open(tmp_path / "few.list", "w") as f:
        f.write("\n".join(ids[:4]) + "\n")
    ds = convert_folder(SHARED_LA, out_opts(tmp_path, 961, name="LAfew"),
                        SplitOptions(labeled="2", select="first", test_ids=[ids[4]]),
                        train_ids=ids[:4], channel_names=["MRI"], label_names=["background", "left_atrium"])
    dj, sp = assert_raw_layout(ds, 2, 2, 1)
    assert sp["labeled"] == ids[:2] and len(sp["excluded"]) == 80 - 5
    for cid, folder, sub in [(c, "imagesTr", "images") for c in ids[:2]] + [(ids[4], "labelsTs", "labels")]:
        name = f"{cid}_0000.nii.gz" if sub == "images" else f"{cid}.nii.gz"
        size, spacing, origin, arr = geometry(os.path.join(ds, folder, name))
        src_size, _, src_origin, src_arr = geometry(os.path.join(SHARED_LA, sub, cid + ".nii.gz"))
        assert size == src_size and spacing == pytest.approx((1.25, 1.25, 1.25)) and origin == src_origin
        np.testing.assert_array_equal(arr, src_arr)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_folder_and_errors(tmp_path):
    src = make_folder(tmp_path / "src", ["a", "b", "c"], ["d"], shape=(3, 4, 5))
    raw = str(tmp_path / "raw")
    with open(tmp_path / "src" / "test.list", "w") as f:
        f.write("c\n")
    p = subprocess.run(nnunet_sud_cmd("convert", "folder", src, "-d", 962, "-o", raw, "--labeled", "50%",
                                      "--test-list", "test.list", "--seed", 4),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    ds = os.path.join(raw, "Dataset962_src")
    assert p.stdout.strip().endswith(ds)
    _, sp = assert_raw_layout(ds, 1, 2, 1)
    assert sp["test"] == ["c"] and sp["seed"] == 4
    assert sp["command"].startswith("nnunet-sud convert folder") and "--labeled 50%" in sp["command"]
    p = subprocess.run(nnunet_sud_cmd("convert", "folder", src, "-d", 962, "-o", raw), capture_output=True, text=True)
    assert p.returncode == 2 and "already exists" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run(nnunet_sud_cmd("convert", "la-h5", src, "-d", 963, "-o", raw, "--labeled", "zero"),
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--labeled" in p.stderr
