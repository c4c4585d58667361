"""The unlabeled stream's case coordinates computed exactly from the positions the SpatialTransform
sampled (``nnunet_sud.unlabeled.coordinates``, exact path) against the same channels interpolated
through the augmentation (the path every pipeline it does not know takes): the same random draws,
the same images, the same ``valid``, coordinates within interpolation error; by-hand numbers for
the pieces; the fallback for pipelines it does not know."""
import math

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

from nnunet_sud.unlabeled.coordinates import (CASE_BOX_KEY, CaseBox, ExactCoordinateSpatialTransform,
                                              channels_at_positions, exact_coordinate_pipeline,
                                              interpolation_share, sample_case_field)
from nnunet_sud.unlabeled.loader import UnlabeledDataLoader
from test_unlabeled_stream import LABELS, InMemoryDataset, initial_patch, nnunet_transforms, smooth_field


# ---------------------------------------------------------------------- the pieces, by hand
def test_interpolation_share_by_hand():
    p = torch.tensor([-1.5, -1.0, -0.25, 0.0, 2.0, 3.0, 3.75, 4.0])
    # voxels 0..3: 1 inside, linear over the one voxel outside each end, 0 beyond
    assert interpolation_share(p, 0, 3).tolist() == [0.0, 0.0, 0.75, 1.0, 1.0, 1.0, 0.25, 0.0]
    assert interpolation_share(torch.tensor([0.0, 1.5, 3.0]), 0, 3) == 1.0  # all inside: no tensor made
    assert interpolation_share(torch.tensor([0.5]), 2, 1).tolist() == [0.0]  # empty interval


def test_channels_at_positions_by_hand():
    # box [-1, 3) x [2, 4) x [3, 5) of a (5, 10, 4) case; positions in box voxels, patch (1, 1, 3)
    box = CaseBox((-1, 2, 3), (3, 4, 5), (5, 10, 4), True)
    pos = [torch.tensor([[[0.5, 1.0, 1.0]]]), torch.tensor([[[0.0, 1.0, 1.0]]]), torch.tensor([[[0.0, 0.5, 1.5]]])]
    out = channels_at_positions(box, pos, (1, 1, 3))
    assert out.shape == (5, 1, 1, 3)
    in_box, inside = out[3, 0, 0], out[4, 0, 0]
    assert in_box.tolist() == [1.0, 1.0, 0.5]  # x = 1.5 is half a voxel past the box's last voxel
    # case z starts at box z = 1 (half the weight of z = 0.5 is padding); case x ends at box x = 0 (x = 4 is outside)
    assert inside.tolist() == [0.5, 0.5, 0.0]
    assert (out[:3, 0, 0] / in_box).T.tolist() == [[-0.5, 2.0, 3.0], [0.0, 3.0, 3.5], [0.0, 3.0, 4.5]]
    # validity only: the inside channel alone
    assert torch.equal(channels_at_positions(box._replace(coordinates=False), pos, (1, 1, 3)), out[4:])


def test_leading_axes_are_carried_voxel_for_voxel():
    # pseudo-2d: 3 slices of the box (z = -1, 0, 1 of a 5-slice case), in-plane positions for a (2, 2) patch
    box = CaseBox((-1, 0, 0), (2, 4, 4), (5, 4, 4), True)
    pos = [torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0, 3.0]])]
    out = channels_at_positions(box, pos, (2, 2))
    assert out.shape == (5, 3, 2, 2)
    assert out[0, :, 0, 0].tolist() == [-1.0, 0.0, 1.0] and (out[0] == out[0, :, :1, :1]).all()
    assert out[4, :, 0, 0].tolist() == [0.0, 1.0, 1.0]  # the padded slice is invalid
    assert out[1, 1].tolist() == [[0.0, 0.0], [2.0, 2.0]] and out[2, 2].tolist() == [[1.0, 3.0], [1.0, 3.0]]


# ---------------------------------------------------------------------- exact against interpolated
def _streams(transforms, cases, patch, ip, seed, n_batches, carry=True):
    """The same loader twice under the same seeds: exact path, then interpolated."""
    out = []
    for exact in (True, False):
        np.random.seed(seed)
        torch.manual_seed(seed)
        dl = UnlabeledDataLoader(InMemoryDataset(cases), 2, ip, patch, LABELS, transforms=transforms)
        dl.exact_coordinates, dl.carry_coordinates = exact, carry
        assert ("exactly" in dl.coordinate_path()) == exact
        out.append([dl.generate_train_batch() for _ in range(n_batches)])
    return out


def _compare(exact, interp, field, min_warped=3, min_invalid=1):
    """Same images and validity, coordinates within float error on valid voxels, and the exact
    coordinates name the case voxels the image was sampled from."""
    n_warped = n_invalid = n_mirrored = 0
    for a, b in zip(exact, interp):
        assert torch.equal(a["data"], b["data"]) and torch.equal(a["seg"], b["seg"]) and a["keys"] == b["keys"]
        assert torch.equal(a["valid"], b["valid"])
        v = a["valid"]
        err = (a["coords"] - b["coords"]).abs().amax(1)[v]
        assert err.numel() == 0 or err.max() < 1e-4, err.max()
        for i in range(len(a["keys"])):
            back = sample_case_field(torch.from_numpy(field)[None], a["coords"][i])[0]
            assert (back - a["data"][i, 0])[v[i]].abs().max() < 1e-3
        c = a["coords"]
        n_warped += int(((c - c.round()).abs().flatten(1).amax(1) > 1e-3).sum())
        n_mirrored += int((c[:, -1, ..., 1] < c[:, -1, ..., 0]).flatten(1).any(1).sum())
        n_invalid += int((~v).sum())
    assert n_warped >= min_warped and n_mirrored >= 3 and n_invalid >= min_invalid


@pytest.mark.parametrize("case_shape, patch", [
    ((30, 36, 40), (20, 24, 24)),   # the patch inside the case (padding only from rotation/scaling)
    ((8, 20, 20), (12, 24, 24)),    # the case smaller than the patch: the loader pads on every axis
])
def test_3d_exact_equals_interpolated(case_shape, patch):
    field = smooth_field(case_shape, 1)
    exact, interp = _streams(nnunet_transforms(patch, 3), {"a": field[None]}, patch, initial_patch(patch, 3),
                             seed=2, n_batches=15)
    _compare(exact, interp, field)


@pytest.mark.parametrize("case_shape", [(6, 40, 36), (6, 20, 16)])  # the second: the loader pads in y and x
def test_2d_exact_equals_interpolated_and_keeps_the_slice(case_shape):
    field = smooth_field(case_shape, 3)
    patch = (32, 28)
    exact, interp = _streams(nnunet_transforms(patch, 2), {"a": field[None]}, patch, initial_patch(patch, 2),
                             seed=4, n_batches=12)
    _compare(exact, interp, field)
    for b in exact:  # one slice per sample, exactly (the interpolated z is a weighted mean: up to float error)
        for z, v in zip(b["coords"][:, 0], b["valid"]):
            assert (z[v] == z[v][0]).all() and z[v][0] == z[v][0].round()


def test_pseudo_2d_exact_equals_interpolated():
    case_shape, patch = (10, 40, 40), (6, 32, 32)
    field = smooth_field(case_shape, 5)
    exact, interp = _streams(nnunet_transforms(patch, 3, dummy_2d=True), {"a": field[None]}, patch, (6, 44, 44),
                             seed=6, n_batches=12)
    _compare(exact, interp, field, min_invalid=0)
    for b in exact:  # in-plane warps only: z on the grid (exactly, on valid voxels)
        z = b["coords"][:, 0][b["valid"]]
        assert torch.equal(z, z.round())


def test_full_pipeline_validity_only_is_the_same_stream():
    """nnU-Net's whole pipeline (intensity transforms too), both channel sets: one stream."""
    case_shape, patch = (20, 26, 24), (12, 16, 16)
    field = smooth_field(case_shape, 7)
    t = nnunet_transforms(patch, 3, geometric_only=False)
    exact, interp = _streams(t, {"a": field[None], "b": field[None] + 1}, patch, initial_patch(patch, 3), 8, 8)
    valid_exact, valid_interp = _streams(t, {"a": field[None], "b": field[None] + 1}, patch, initial_patch(patch, 3),
                                         8, 8, carry=False)
    for a, b, c, d in zip(exact, interp, valid_exact, valid_interp):
        assert "coords" not in c and "coords" not in d
        for k in ("data", "valid", "seg"):
            assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) and torch.equal(a[k], d[k]), k
    assert any((~b["valid"]).any() for b in exact)


@pytest.mark.parametrize("align_corners", [False, True])
def test_elastic_deformation_and_random_crops(align_corners):
    """A SpatialTransform nnU-Net does not use (elastic deformation, random crop centres, wide
    rotations, align_corners either way): still the positions the image was sampled at."""
    case_shape, patch = (24, 30, 30), (12, 16, 16)
    field = smooth_field(case_shape, 9)
    spatial = SpatialTransform(patch, patch_center_dist_from_border=[4, 6, 6], random_crop=True,
                               p_elastic_deform=0.7, elastic_deform_scale=(0.1, 0.2),
                               elastic_deform_magnitude=(1, 3), p_rotation=0.7, rotation=(-0.6, 0.6),
                               p_scaling=0.5, scaling=(0.8, 1.2), align_corners=align_corners)
    t = ComposeTransforms([spatial, MirrorTransform((0, 1, 2))])
    exact, interp = _streams(t, {"a": field[None]}, patch, (20, 24, 24), seed=10, n_batches=10)
    _compare(exact, interp, field)


def test_exact_step_refuses_a_sample_that_does_not_fit_its_box():
    spatial = ExactCoordinateSpatialTransform.replacing(
        SpatialTransform((4, 4, 4), patch_center_dist_from_border=0, random_crop=False))
    sample = {"image": torch.zeros((1, 6, 6, 6)), "regression_target": torch.zeros(()).expand(5, 6, 6, 6),
              CASE_BOX_KEY: CaseBox((0, 0, 0), (6, 6, 7), (6, 6, 7), True)}  # the box is 7 wide, the image 6
    with pytest.raises(RuntimeError, match="do not fit the loader's box"):
        spatial(**sample)
    # without a box it is batchgeneratorsv2's SpatialTransform
    out = spatial(image=torch.arange(216.0).reshape(1, 6, 6, 6))
    assert torch.equal(out["image"], torch.arange(216.0).reshape(1, 6, 6, 6)[:, 1:5, 1:5, 1:5])


# ---------------------------------------------------------------------- the fallback
class Transpose(BasicTransform):
    """A geometric transform the exact step does not know (it swaps y and x of every key)."""

    def _apply_to_image(self, img, **params):
        return img.transpose(-1, -2).contiguous()

    _apply_to_regr_target = _apply_to_segmentation = _apply_to_image


class MySpatial(SpatialTransform):
    pass


def _spatial(patch, **kw):
    kw = {"p_rotation": 0.5, "rotation": (-0.5, 0.5), "p_scaling": 0.3, **kw}
    return SpatialTransform(patch, patch_center_dist_from_border=0, random_crop=False, **kw)


@pytest.mark.parametrize("pipeline, why, box", [
    (lambda p: ComposeTransforms([Transpose(), _spatial(p), MirrorTransform((0, 1, 2))]), "Transpose runs before",
     (16, 20, 20)),
    (lambda p: ComposeTransforms([RandomTransform(_spatial(p), 0.5)]), "RandomTransform runs before", (12, 16, 16)),
    (lambda p: ComposeTransforms([MySpatial(p, 0, False)]), "MySpatial runs before", (16, 20, 20)),
    (lambda p: ComposeTransforms([_spatial(p, mode_image="nearest")]), "mode_image='nearest'", (16, 20, 20)),
    (lambda p: ComposeTransforms([MirrorTransform((0, 1, 2))]), "MirrorTransform runs before", (12, 16, 16)),
    (lambda p: MirrorTransform((0, 1, 2)), "not a ComposeTransforms", (12, 16, 16)),
])
def test_unknown_pipelines_interpolate_and_say_why(pipeline, why, box):
    case_shape, patch = (16, 20, 20), (12, 16, 16)
    field = smooth_field(case_shape, 11)
    t = pipeline(patch)
    assert exact_coordinate_pipeline(t)[0] is None and why in exact_coordinate_pipeline(t)[1]
    np.random.seed(12)
    torch.manual_seed(12)
    dl = UnlabeledDataLoader(InMemoryDataset({"a": field[None]}), 2, box, patch, LABELS, transforms=t)
    line = dl.coordinate_path()
    assert "interpolated through the augmentation" in line and why in line
    for _ in range(3):  # and the interpolated coordinates are right (nearest: both nearest, the same voxel)
        b = dl.generate_train_batch()
        for i in range(2):
            back = sample_case_field(torch.from_numpy(field)[None], b["coords"][i])[0]
            assert (back - b["data"][i, 0])[b["valid"][i]].abs().max() < 1e-3


def test_nested_pipelines_are_found_and_left_untouched():
    """SegMatch nests nnU-Net's pipeline in a ComposeTransforms with attributes; the exact pipeline is
    a copy along the path to the SpatialTransform, the user's object stays as it was."""
    patch = (12, 16, 16)
    inner = nnunet_transforms(patch, 3, geometric_only=False)
    outer = ComposeTransforms([inner, MirrorTransform((0,))])
    outer.extra_image_keys = ("x",)
    exact, why = exact_coordinate_pipeline(outer)
    assert why == "" and exact.extra_image_keys == ("x",) and type(exact) is ComposeTransforms
    assert type(exact.transforms[0].transforms[0]) is ExactCoordinateSpatialTransform
    assert exact.transforms[0].transforms[1:] == inner.transforms[1:] and exact.transforms[1] is outer.transforms[1]
    assert type(inner.transforms[0]) is SpatialTransform and outer.transforms[0] is inner
    assert vars(exact.transforms[0].transforms[0]) == vars(inner.transforms[0])  # every setting kept
