"""Integrity checks of imagesUnlabeled (``nnunet_sud.unlabeled.integrity``) on tiny generated images:
truncated gzip, multi-component, NaN/Inf voxels and images smaller than the patch."""
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_sud.errors import UserFacingError
from nnunet_sud.unlabeled.integrity import check_unlabeled_images

_ARCH = {"network_class_name": "unused", "arch_kwargs": {}, "_kw_requires_import": []}
PLANS = {"image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
         "configurations": {"3d_fullres": {"spacing": [2.0, 1.0, 1.0], "patch_size": [8, 16, 16],
                                           "architecture": _ARCH},
                            "2d": {"spacing": [1.0, 1.0], "patch_size": [16, 16], "architecture": _ARCH}}}


def _write(folder, name, array, spacing=(1.0, 1.0, 2.0)):
    """Write a (z, y, x) array as ``folder/name``; spacing in SimpleITK order (x, y, z)."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    path = os.path.join(str(folder), name)
    sitk.WriteImage(img, path)
    return path


def _good(folder, name="good_0000.nii.gz"):
    return _write(folder, name, np.random.default_rng(0).random((10, 20, 20)).astype(np.float32))


def test_good_image_passes_without_warnings(tmp_path, capsys):
    assert check_unlabeled_images({"good": [_good(tmp_path)]}, PLANS, "3d_fullres") == []
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("keep", [300, 0.5])
def test_truncated_gzip_is_an_error(tmp_path, keep):
    good = _good(tmp_path)
    raw = open(good, "rb").read()
    cut = os.path.join(tmp_path, "cut_0000.nii.gz")
    with open(cut, "wb") as f:
        f.write(raw[:keep if isinstance(keep, int) else int(len(raw) * keep)])
    sitk.ReadImage(cut)  # SimpleITK reads the cut file without an error: the check must not rely on it
    with pytest.raises(UserFacingError) as e:
        check_unlabeled_images({"cut": [cut], "good": [good]}, PLANS, "3d_fullres")
    msg = str(e.value)
    assert f"{cut} is truncated" in msg and "export the file again" in msg and "1 problem(s)" in msg
    assert good not in msg


def test_multicomponent_image_is_an_error(tmp_path):
    scalar = sitk.GetImageFromArray(np.ones((10, 20, 20), np.float32))
    rgb = os.path.join(tmp_path, "rgb_0000.nii.gz")
    sitk.WriteImage(sitk.Compose([scalar] * 3), rgb)
    with pytest.raises(UserFacingError, match=r"rgb_0000\.nii\.gz has 3 components per voxel .* one scalar image "
                                              r"per channel file"):
        check_unlabeled_images({"rgb": [rgb]}, PLANS, "3d_fullres")


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd"])
def test_nan_and_inf_voxels_are_an_error(tmp_path, ending):
    """NIfTI: SimpleITK returns NaN/Inf as 0, so the file itself is read; other formats keep them."""
    a = np.ones((10, 20, 20), np.float32)
    a[0, 0, 0], a[1, 2, 3] = np.nan, -np.inf
    some = _write(tmp_path, "some_0000" + ending, a)
    blank = _write(tmp_path, "blank_0000" + ending, np.full((10, 20, 20), np.nan, np.float32))
    with pytest.raises(UserFacingError) as e:
        check_unlabeled_images({"blank": [blank], "some": [some], "good": [_good(tmp_path)]}, PLANS, "3d_fullres")
    msg = str(e.value)
    assert "2 problem(s)" in msg
    assert f"{some}: 2 of 4000 voxels (0.05%) are NaN or Inf" in msg and "remove case 'some'" in msg
    assert f"{blank}: all 4000 voxels are NaN or Inf" in msg and "blank case" in msg


def test_unreadable_file_is_an_error(tmp_path):
    bad = os.path.join(tmp_path, "bad_0000.nrrd")
    with open(bad, "w") as f:
        f.write("not an image")
    with pytest.raises(UserFacingError, match=r"bad_0000\.nrrd: nnU-Net's SimpleITKIO cannot read case 'bad'"):
        check_unlabeled_images({"bad": [bad]}, PLANS, "3d_fullres")


def test_all_problems_are_listed_in_one_error(tmp_path):
    rgb = os.path.join(tmp_path, "rgb_0000.nii.gz")
    sitk.WriteImage(sitk.Compose([sitk.GetImageFromArray(np.ones((4, 4, 4), np.float32))] * 2), rgb)
    cut = os.path.join(tmp_path, "cut_0000.nii.gz")
    with open(cut, "wb") as f:
        f.write(open(_good(tmp_path), "rb").read()[:100])
    nan = _write(tmp_path, "nan_0000.nii.gz", np.full((10, 20, 20), np.nan, np.float32))
    with pytest.raises(UserFacingError) as e:
        check_unlabeled_images({"cut": [cut], "nan": [nan], "rgb": [rgb]}, PLANS, "3d_fullres")
    lines = str(e.value).splitlines()
    assert lines[0].startswith(f"3 problem(s) in {tmp_path}") and "nothing was preprocessed" in lines[0]
    assert [ln.split()[0].rstrip(":") for ln in lines[1:]] == [cut, nan, rgb]


@pytest.mark.parametrize("cfg, expect", [("3d_fullres", "5 x 12 x 20 voxels"), ("2d", "12 x 20 voxels")])
def test_image_smaller_than_patch_warns_with_sizes(tmp_path, capsys, cfg, expect):
    # (z, y, x) = (10, 12, 20) at spacing z 1 mm: 5 slices at 3d_fullres's 2 mm, 12 < 16 in-plane
    small = _write(tmp_path, "small_0000.nii.gz", np.ones((10, 12, 20), np.float32), spacing=(1.0, 1.0, 1.0))
    warns = check_unlabeled_images({"small": [small]}, PLANS, cfg)  # a warning, not an error
    out = capsys.readouterr().out
    patch = " x ".join(map(str, PLANS["configurations"][cfg]["patch_size"]))
    assert len(warns) == 1 and f"warning: {small}: {expect} at the spacing of '{cfg}'" in out
    assert f"smaller than its patch size {patch}" in out
