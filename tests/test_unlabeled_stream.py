"""The unlabeled stream: exact patch->case coordinate map through nnU-Net's real augmentation,
padding flagged, 2d and pseudo-2d configurations, worker seeds."""
import math

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_sud.unlabeled.coordinates import case_coordinate_channels, sample_case_field, split_coordinates
from nnunet_sud.unlabeled.loader import TransformDroppedCoordinatesError, UnlabeledDataLoader, make_augmenter

LABELS = LabelManager({"background": 0, "a": 1, "b": 2}, regions_class_order=None)


class InMemoryDataset:
    """Stands in for nnUNetDatasetBlosc2: same load_case contract, cases held in memory."""

    def __init__(self, cases):
        self.cases = cases
        self.identifiers = sorted(cases)

    def load_case(self, key):
        data = self.cases[key]
        seg = np.zeros((1, *data.shape[1:]), np.int16)
        return data, seg, None, {}


def smooth_field(shape, seed):
    """A non-linear field, so that wrong coordinates cannot hide behind linearity."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    f = np.zeros(shape)
    for _ in range(3):
        k = rng.uniform(0.1, 0.4, len(shape))
        f += np.sin(sum(ki * g for ki, g in zip(k, grids)) + rng.uniform(0, 6))
    return f.astype(np.float32)


def nnunet_transforms(patch_size, dim, geometric_only=True, dummy_2d=False):
    """nnU-Net's own training pipeline (nnUNetTrainer.get_training_transforms) for this patch size;
    with geometric_only, its intensity transforms are dropped so the image can be compared."""
    rotation = (-math.pi, math.pi) if dim == 2 or not dummy_2d else (-math.pi, math.pi)
    if dim == 3 and not dummy_2d:
        rotation = (-30 / 360 * 2 * math.pi, 30 / 360 * 2 * math.pi)
    mirror_axes = tuple(range(dim))
    t = nnUNetTrainer.get_training_transforms(patch_size, rotation, None, mirror_axes, dummy_2d)
    if geometric_only:
        keep = (SpatialTransform, MirrorTransform, Convert3DTo2DTransform, Convert2DTo3DTransform)
        t = ComposeTransforms([x for x in t.transforms if isinstance(x, keep)])
    return t


def initial_patch(patch_size, dim):
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    rot = (-math.pi, math.pi) if dim == 2 else (-30 / 360 * 2 * math.pi,) * 2
    rot = (rot[0], -rot[0]) if dim == 3 else rot
    return tuple(int(i) for i in get_patch_size(patch_size, rot, rot, rot, (0.85, 1.25)))


def collect(loader, n_batches):
    return [loader.generate_train_batch() for _ in range(n_batches)]


def test_coordinate_channels_by_hand():
    regr = case_coordinate_channels([-1, 2, 3], [1, 4, 5], [5, 10, 4])
    assert regr.shape == (5, 2, 2, 2)
    assert (regr[3] == 1).all()
    assert regr[0, :, 0, 0].tolist() == [-1, 0]          # z runs from -1 (padding) to 0
    assert regr[1, 0, :, 0].tolist() == [2, 3]
    assert regr[2, 0, 0, :].tolist() == [3, 4]           # x = 4 is outside a case of width 4
    assert regr[4].sum() == 2 and regr[4, 1, 0, 0] == 1 and regr[4, 1, 0, 1] == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_3d_round_trip_through_real_augmentation(seed):
    np.random.seed(seed)
    torch.manual_seed(seed)
    case_shape = (30, 36, 40)
    field = smooth_field(case_shape, seed)
    patch = (20, 24, 24)
    dl = UnlabeledDataLoader(InMemoryDataset({"c0": field[None], "c1": field[None]}), 4, initial_patch(patch, 3),
                             patch, LABELS, transforms=nnunet_transforms(patch, 3))
    n_warped = n_mirrored = 0
    for b in collect(dl, 25):
        assert b["data"].shape == (4, 1, *patch) and b["coords"].shape == (4, 3, *patch)
        for i in range(4):
            coords, valid = b["coords"][i], b["valid"][i]
            back = sample_case_field(torch.from_numpy(field)[None], coords)[0]
            err = (back - b["data"][i, 0])[valid].abs()
            assert valid.float().mean() > 0.3
            assert err.max() < 1e-3, err.max()
            # valid voxels map inside the case
            for ax, n in enumerate(case_shape):
                assert coords[ax][valid].min() >= -1e-3 and coords[ax][valid].max() <= n - 1 + 1e-3
            frac = (coords - coords.round()).abs().amax()
            n_warped += bool(frac > 1e-3)
            n_mirrored += bool((coords[2][..., 1:] - coords[2][..., :-1])[valid[..., 1:] & valid[..., :-1]].mean() < 0)
    # nnU-Net's pipeline rotates/scales with p=0.2 each and mirrors with p=0.5: both paths were exercised
    assert n_warped >= 5 and n_mirrored >= 20


def test_padding_is_flagged_invalid():
    np.random.seed(3)
    torch.manual_seed(3)
    case_shape = (8, 20, 20)  # smaller than the patch along every axis: the loader pads
    field = smooth_field(case_shape, 3) + 5  # strictly positive: padding (0) is recognisable
    patch = (12, 24, 24)
    dl = UnlabeledDataLoader(InMemoryDataset({"c": field[None]}), 2, initial_patch(patch, 3), patch, LABELS,
                             transforms=nnunet_transforms(patch, 3))
    seen_invalid = 0
    for b in collect(dl, 10):
        for i in range(2):
            coords, valid = b["coords"][i], b["valid"][i]
            img = b["data"][i, 0]
            assert (~valid).sum() > 0
            seen_invalid += int((~valid).sum())
            # every voxel whose coordinates lie clearly outside the case is invalid
            outside = torch.zeros_like(valid)
            for ax, n in enumerate(case_shape):
                outside |= (coords[ax] < -0.51) | (coords[ax] > n - 1 + 0.51)
            assert not (outside & valid).any()
            # the image there is (interpolated) padding: smaller than the field's minimum
            assert (img[valid] > 5 - 3.01).all()
            back = sample_case_field(torch.from_numpy(field)[None], coords)[0]
            assert (back - img)[valid].abs().max() < 1e-3
    assert seen_invalid > 0


def test_2d_configuration_keeps_slice_index():
    np.random.seed(5)
    torch.manual_seed(5)
    case_shape = (6, 40, 36)  # 2d configurations: nnU-Net picks one slice per sample
    field = smooth_field(case_shape, 5)
    patch = (32, 28)
    dl = UnlabeledDataLoader(InMemoryDataset({"c": field[None]}), 4, initial_patch(patch, 2), patch, LABELS,
                             transforms=nnunet_transforms(patch, 2))
    slices = set()
    for b in collect(dl, 10):
        assert b["data"].shape == (4, 1, *patch) and b["coords"].shape == (4, 3, *patch)
        for i in range(4):
            coords, valid = b["coords"][i], b["valid"][i]
            z = coords[0][valid]
            # one slice per sample, on the grid (up to float rounding of the in-box normalisation)
            assert (z - z[0]).abs().max() < 1e-5 and abs(float(z[0]) - round(float(z[0]))) < 1e-5
            slices.add(round(float(z[0])))
            back = sample_case_field(torch.from_numpy(field)[None], coords)[0]
            assert (back - b["data"][i, 0])[valid].abs().max() < 1e-3
    assert len(slices) >= 3


def test_pseudo_2d_augmentation_of_anisotropic_3d():
    np.random.seed(7)
    torch.manual_seed(7)
    case_shape = (10, 40, 40)
    field = smooth_field(case_shape, 7)
    patch = (6, 32, 32)
    dl = UnlabeledDataLoader(InMemoryDataset({"c": field[None]}), 2, (6, 44, 44), patch, LABELS,
                             transforms=nnunet_transforms(patch, 3, dummy_2d=True))
    for b in collect(dl, 10):
        for i in range(2):
            coords, valid = b["coords"][i], b["valid"][i]
            # in-plane rotation only: z stays on the grid, constant within a slice
            assert (coords[0] - coords[0].round())[valid].abs().max() < 1e-4
            back = sample_case_field(torch.from_numpy(field)[None], coords)[0]
            assert (back - b["data"][i, 0])[valid].abs().max() < 1e-3


def test_full_pipeline_keeps_coordinates_and_changes_intensities():
    np.random.seed(11)
    torch.manual_seed(11)
    case_shape = (24, 28, 28)
    field = smooth_field(case_shape, 11)
    patch = (16, 20, 20)
    dl = UnlabeledDataLoader(InMemoryDataset({"c": field[None]}), 2, initial_patch(patch, 3), patch, LABELS,
                             transforms=nnunet_transforms(patch, 3, geometric_only=False))
    max_dev = 0.0
    for b in collect(dl, 20):
        for i in range(2):
            coords, valid = b["coords"][i], b["valid"][i]
            for ax, n in enumerate(case_shape):
                assert coords[ax][valid].min() >= -1e-3 and coords[ax][valid].max() <= n - 1 + 1e-3
            back = sample_case_field(torch.from_numpy(field)[None], coords)[0]
            max_dev = max(max_dev, float((back - b["data"][i, 0])[valid].abs().max()))
    assert max_dev > 0.05  # intensity augmentation happened, and coordinates survived it


def test_transform_dropping_coordinates_is_reported():
    from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform

    class Careless(BasicTransform):  # a custom transform that forgot _apply_to_regr_target
        def _apply_to_image(self, img, **p):
            return img

    field = smooth_field((8, 8, 8), 0)
    dl = UnlabeledDataLoader(InMemoryDataset({"c": field[None]}), 1, (8, 8, 8), (8, 8, 8), LABELS,
                             transforms=ComposeTransforms([Careless()]))
    with pytest.raises(TransformDroppedCoordinatesError, match="_apply_to_regr_target"):
        dl.generate_train_batch()


def _mirror_signatures(seeds, n_batches=24):
    """Batches whose content depends only on torch's RNG (case == patch, mirroring only)."""
    field = smooth_field((6, 6, 6), 0)
    dl = UnlabeledDataLoader(InMemoryDataset({"c": field[None]}), 8, (6, 6, 6), (6, 6, 6), LABELS,
                             transforms=MirrorTransform(allowed_axes=(0, 1, 2)))  # MirrorTransform draws torch.rand
    aug = make_augmenter(dl, len(seeds), seeds, pin_memory=False)
    try:
        sigs = []
        for _ in range(n_batches):
            c = next(aug)["coords"]
            sigs.append(tuple((c[:, :, 0, 0, 0] > 2.5).flatten().tolist()))
        return sigs
    finally:
        aug._finish()


def test_worker_seeds_differ():
    # 8 samples x 3 mirror bits: 2^24 equally likely signatures per batch, so repeats mean replay
    ours = _mirror_signatures([1234, 1235])
    assert len(set(ours)) == len(ours)
    # control: two workers seeded alike replay each other (what nnU-Net's seeds=None does to torch.rand)
    alike = _mirror_signatures([77, 77])
    assert len(set(alike)) < len(alike)


# ---------------------------------------------------------------------- labels of unlabeled cases
class LabelledInMemoryDataset(InMemoryDataset):
    """Cases with labels (as preprocess-unlabeled records them) beside cases without."""

    def __init__(self, cases, labels):
        super().__init__(cases)
        self.labels = labels

    def load_case(self, key):
        from nnunet_sud.unlabeled.preprocess import LABEL_PROPERTY
        data, seg, prev, props = super().load_case(key)
        return data, seg, prev, {LABEL_PROPERTY: {"file": key + ".nii.gz", "sha1": "0"} if key in self.labels else None}

    def load_label(self, key):
        return self.labels[key]


def block_label(shape, block=4):
    """Label of voxel i: sum over axes of i // block, mod 4 (values 0..3, borders at k * block - 0.5).
    Background of one corner block is -1, as nnU-Net stores background outside the non-zero mask."""
    g = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    lab = (sum(x // block for x in g) % 4).astype(np.int16)
    lab[:block, :block, :block][lab[:block, :block, :block] == 0] = -1
    return lab


def test_labels_follow_the_image_through_nnunets_augmentation_and_unknown_stays_unknown():
    """``seg`` is the case label at the voxel ``coords`` names (away from label borders), 0 where the
    case's label says background (also nnU-Net's -1 = background outside the non-zero mask), and
    UNKNOWN_LABEL (not 0) for cases without a label and on padding."""
    from nnunet_sud.unlabeled.loader import UNKNOWN_LABEL
    np.random.seed(23)
    torch.manual_seed(23)
    case_shape, patch, block = (20, 28, 28), (16, 20, 20), 4
    field = smooth_field(case_shape, 21)
    label = block_label(case_shape, block)
    ds = LabelledInMemoryDataset({"lab": field[None], "unl": field[None]}, {"lab": label[None]})
    # nnU-Net's full pipeline, with mask-for-norm and RemoveLabelTansform(-1, 0)
    t = nnUNetTrainer.get_training_transforms(patch, (-30 / 360 * 2 * math.pi, 30 / 360 * 2 * math.pi), None,
                                              (0, 1, 2), False, use_mask_for_norm=[True])
    dl = UnlabeledDataLoader(ds, 2, initial_patch(patch, 3), patch, LABELS, transforms=t)
    checked = n_warped = n_padded = 0
    for b in collect(dl, 20):
        assert b["seg"].shape == (2, *patch) and b["seg"].dtype == torch.int16
        for i, key in enumerate(b["keys"]):
            seg, coords, valid = b["seg"][i], b["coords"][i], b["valid"][i]
            assert bool(b["has_label"][i]) == (key == "lab")
            assert (seg[~valid] == UNKNOWN_LABEL).all()
            n_padded += int((~valid).sum() > 0)
            if key == "unl":
                assert (seg == UNKNOWN_LABEL).all()
                continue
            assert (seg[valid] >= 0).all()
            n_warped += bool((coords - coords.round()).abs().amax() > 1e-3)
            # voxels at least one voxel away from every block border, inside the case
            dist = torch.stack([((c + 0.5) - block * torch.round((c + 0.5) / block)).abs() for c in coords]).amin(0)
            ok = valid & (dist > 1.0)
            idx = [c[ok].round().long() for c in coords]
            expected = torch.from_numpy(label)[tuple(idx)].clamp_min(0)  # -1 (outside the non-zero mask) is background
            assert torch.equal(seg[ok].long(), expected.long())
            checked += int(ok.sum())
    assert checked > 5000 and n_warped >= 2 and n_padded >= 1


def test_labels_do_not_change_the_stream():
    """Same seeds, with and without a label for a case: identical images, coordinates, validity (the
    augmentation's random draws do not depend on the label)."""
    case_shape, patch = (20, 28, 28), (16, 20, 20)
    field = smooth_field(case_shape, 4)
    t = nnUNetTrainer.get_training_transforms(patch, (-30 / 360 * 2 * math.pi, 30 / 360 * 2 * math.pi), None,
                                              (0, 1, 2), False, use_mask_for_norm=[True])
    runs = []
    for labels in ({"a": block_label(case_shape)[None]}, {}):
        np.random.seed(5)
        torch.manual_seed(5)
        dl = UnlabeledDataLoader(LabelledInMemoryDataset({"a": field[None], "b": field[None] + 1}, labels), 2,
                                 initial_patch(patch, 3), patch, LABELS, transforms=t)
        runs.append(collect(dl, 12))
    for with_label, without in zip(*runs):
        assert with_label["keys"] == without["keys"]
        for k in ("data", "coords", "valid"):
            assert torch.equal(with_label[k], without[k]), k
        assert (without["seg"] == -1).all() and not without["has_label"].any()
    assert any(b["has_label"].any() for b in runs[0])
