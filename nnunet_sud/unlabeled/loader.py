"""The unlabeled stream: random crops of unlabeled cases through nnU-Net's training augmentation.

``UnlabeledDataLoader`` is nnU-Net's ``nnUNetDataLoader`` (same bbox sampling, same padding,
same 2d handling) with two differences: crops are always random (unlabeled cases have no class
locations), and every sample carries the case coordinates of its voxels through the
augmentation (see ``coordinates.py``). A batch is a dict:

    data   (B, C, *patch) float32   augmented image patch, as the labeled stream's ``data``
    coords (B, 3, *patch) float32   case voxel (z, y, x) each patch voxel was sampled from
    valid  (B, *patch)   bool       False where the patch shows padding instead of the case
    seg    (B, *patch)   int16      label of cases with one in labelsUnlabeled (see below), else
                                    ``UNKNOWN_LABEL``; also ``UNKNOWN_LABEL`` on invalid voxels
                                    and on nnU-Net's ignore label
    has_label (B,)       bool       whether the sample's case has a label
    keys   list of B case identifiers
    case_shapes (B, 3) int64        preprocessed case shapes (Z, Y, X)

Labels of unlabeled cases (``CASE_label.b2nd``, see ``preprocess.py``) only measure target
quality; they never reach a loss. They travel as a second channel of the segmentation key, so
nnU-Net's transforms move them exactly like the image (same grid, nearest/one-hot label
resampling). Channel 0 stays the non-zero mask (-1 outside) that ``MaskImageTransform`` reads,
so the image is masked the same way with and without a label. Every sample carries the second
channel (all -1 for cases without a label: one value, which SpatialTransform copies without
resampling), so the pipeline and its random draws are the same with and without labels.
nnU-Net's ``RemoveLabelTansform(-1, 0)`` turns -1 (padding; background outside the non-zero
mask of a labeled case) into 0 in every channel; "unknown" is therefore not read from the
channel but from ``has_label`` and ``valid``.

Extra image keys (a hook for methods that need more than one view of a patch): a transform
pipeline may declare ``extra_image_keys``, names of per-sample image tensors (C', *patch) that
its transforms add to the sample dict in the workers (e.g. SegMatch's strong view,
``nnunet_sud.trainers.segmatch``). Each is stacked into the batch under its own name,
(B, C', *patch) float32, beside ``data``.
"""
import os
from typing import List, Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from threadpoolctl import threadpool_limits

from nnunet_sud.unlabeled.coordinates import (CASE_BOX_KEY, VALID_THRESHOLD, CaseBox, case_coordinate_channels,
                                              exact_coordinate_pipeline, split_coordinates)
from nnunet_sud.unlabeled.preprocess import LABEL_PROPERTY, LABEL_SUFFIX

#: value of ``batch['seg']`` where the label is unknown (no label, padding, ignore label)
UNKNOWN_LABEL = -1


class TransformDroppedCoordinatesError(RuntimeError):
    pass


def open_case_label(folder: str, key: str):
    """The preprocessed label of an unlabeled case, (1, *shape) int16, memory-mapped like nnU-Net's seg."""
    import blosc2
    kwargs = {} if os.name == "nt" else {"mmap_mode": "r"}
    return blosc2.open(urlpath=os.path.join(folder, key + LABEL_SUFFIX), mode="r", dparams={"nthreads": 1}, **kwargs)


class UnlabeledBatch(dict):
    """An unlabeled batch on the trainer's side: a dict whose missing ``coords`` says how to get them."""

    def __init__(self, batch: dict, owner: str = "this trainer"):
        super().__init__(batch)
        self.owner = owner

    def __missing__(self, key):
        if key == "coords":
            raise KeyError(f"'coords': {self.owner} has unlabeled_coordinates = False, so the unlabeled stream "
                           f"carries no case coordinates. Set unlabeled_coordinates = True in the trainer class "
                           f"that reads batch_u['coords'].")
        raise KeyError(key)


class UnlabeledDataLoader(nnUNetDataLoader):
    """Random crops + case coordinates. Arguments as ``nnUNetDataLoader`` (no oversampling).

    ``carry_coordinates`` (attribute, default True): False carries only the inside-the-case
    channel through the augmentation, for trainers that read ``valid`` but never ``coords``
    (the batch then has no ``coords``; ``valid`` is the same).

    ``exact_coordinates`` (attribute, default True): compute the channels from the positions the
    SpatialTransform sampled (``coordinates.exact_coordinate_pipeline``) where the pipeline allows;
    False, or a pipeline it does not know, interpolates them through the augmentation.
    ``coordinate_path()`` says which path the batches take and why.
    """

    carry_coordinates: bool = True
    exact_coordinates: bool = True

    def __init__(self, data, batch_size: int, patch_size: Sequence[int], final_patch_size: Sequence[int],
                 label_manager, transforms=None):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, transforms=transforms)
        # nnU-Net samples from class_locations when an ignore label exists; unlabeled cases have none
        self.has_ignore = False
        self.label_manager = label_manager
        #: per-sample image keys the transforms add, stacked into the batch (module doc)
        self.extra_image_keys = tuple(getattr(transforms, "extra_image_keys", ()))
        self._exact_for = self._exact = None
        self._exact_why = ""

    def exact_transforms(self):
        """The pipeline with the exact coordinate step (``transforms`` with its SpatialTransform
        replaced), or None where the channels are interpolated (``exact_coordinates`` False, or a
        pipeline ``exact_coordinate_pipeline`` does not know)."""
        if not self.exact_coordinates or self.transforms is None:
            return None
        if self._exact_for is not self.transforms:  # found once per pipeline
            self._exact, self._exact_why = exact_coordinate_pipeline(self.transforms)
            self._exact_for = self.transforms
        return self._exact

    def coordinate_path(self) -> str:
        """One line for the training log: how the case coordinates (or ``valid``) cross the augmentation."""
        what = "case coordinates" if self.carry_coordinates else "the inside-the-case channel (valid)"
        if self.exact_transforms() is not None:
            return f"unlabeled stream: {what} computed exactly from the SpatialTransform's sampling positions"
        if self.transforms is None:
            return f"unlabeled stream: {what} cropped with the image (no transforms)"
        why = self._exact_why if self.exact_coordinates else "exact_coordinates = False"
        return (f"unlabeled stream: {what} interpolated through the augmentation (slower), because {why}; "
                f"the exact path needs nnU-Net's SpatialTransform first in a ComposeTransforms "
                f"(nnunet_sud.unlabeled.coordinates)")

    def load_label(self, key: str, properties: dict):
        """The case's preprocessed label (1, *shape) or None when it has none (``LABEL_PROPERTY``).
        Datasets may provide ``load_label(key)``; otherwise ``CASE_label.b2nd`` beside the case."""
        if not (properties or {}).get(LABEL_PROPERTY):
            return None
        load = getattr(self._data, "load_label", None)
        return load(key) if load is not None else open_case_label(self._data.source_folder, key)

    def generate_train_batch(self) -> dict:
        keys = self.get_indices()
        data_all = regr_all = seg_all = None
        extra = {}
        shapes = np.zeros((self.batch_size, 3), dtype=np.int64)
        has_label = torch.zeros(self.batch_size, dtype=torch.bool)
        exact = self.exact_transforms()
        transforms = exact if exact is not None else self.transforms
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for j, key in enumerate(keys):
                data, seg, _, properties = self._data.load_case(key)
                label = self.load_label(key, properties)
                has_label[j] = label is not None
                shape = data.shape[1:]
                shapes[j] = shape
                bbox_lbs, bbox_ubs = self.get_bbox(shape, False, None)
                bbox = [[lo, hi] for lo, hi in zip(bbox_lbs, bbox_ubs)]
                image = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
                # channel 0: nonzero mask from preprocessing (-1 outside), used by use_mask_for_norm masking;
                # channel 1: the label, or -1 (one value, copied without resampling) when there is none
                mask = torch.from_numpy(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
                lab = torch.full_like(mask, -1) if label is None else \
                    torch.from_numpy(crop_and_pad_nd(label, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
                segmentation = torch.cat([mask, lab])
                if self.patch_size_was_2d:
                    image, segmentation = image[:, 0], segmentation[:, 0]
                sample = {"image": image, "segmentation": segmentation}
                if exact is not None:
                    box = CaseBox(tuple(bbox_lbs), tuple(bbox_ubs), tuple(shape), self.carry_coordinates)
                    # a placeholder of the channels' shape (no memory): the exact step writes them
                    regr = torch.zeros(()).expand(box.channels, *image.shape[1:])
                    sample[CASE_BOX_KEY] = box
                else:
                    regr = self.coordinate_channels(bbox_lbs, bbox_ubs, shape)
                    if regr is not None and self.patch_size_was_2d:
                        regr = regr[:, 0]
                sample["regression_target"] = regr
                if transforms is not None:
                    sample = transforms(**sample)
                if regr is not None and sample.get("regression_target") is None:
                    raise TransformDroppedCoordinatesError(
                        "a transform of the training pipeline dropped 'regression_target' (the patch->case "
                        "coordinates of the unlabeled stream). Custom transforms must implement "
                        "_apply_to_regr_target (geometric ones: like _apply_to_image; others: identity).")
                if data_all is None:
                    data_all = torch.empty((self.batch_size, *sample["image"].shape), dtype=torch.float32)
                    regr_all = None if regr is None else \
                        torch.empty((self.batch_size, *sample["regression_target"].shape), dtype=torch.float32)
                    seg_all = torch.full((self.batch_size, *sample["image"].shape[1:]), UNKNOWN_LABEL,
                                         dtype=torch.int16)
                data_all[j] = sample["image"]
                for k in self.extra_image_keys:
                    extra.setdefault(k, torch.empty((self.batch_size, *sample[k].shape), dtype=torch.float32))[j] = \
                        sample[k]
                if regr_all is not None:
                    regr_all[j] = sample["regression_target"]
                if label is not None:
                    seg_all[j] = self._label_channel(sample.get("segmentation"))
        coords, valid = self.split_channels(regr_all, data_all)
        seg_all[~valid] = UNKNOWN_LABEL
        ignore = self.label_manager.ignore_label
        if ignore is not None:
            seg_all[seg_all == ignore] = UNKNOWN_LABEL
        out = {"data": data_all, "valid": valid, "seg": seg_all, "has_label": has_label, "keys": list(keys),
               "case_shapes": torch.from_numpy(shapes), **extra}
        if coords is not None:
            out["coords"] = coords.contiguous()
        return out

    def coordinate_channels(self, bbox_lbs, bbox_ubs, case_shape):
        """The ``regression_target`` of one sample before augmentation (``coordinates.py``): the 5
        coordinate channels, or only the inside-the-case channel without ``carry_coordinates``."""
        return case_coordinate_channels(bbox_lbs, bbox_ubs, case_shape, coordinates=self.carry_coordinates)

    def split_channels(self, regr_all: torch.Tensor, data_all: torch.Tensor):
        """Augmented ``regression_target`` of the batch -> (coords (B, 3, *P) or None, valid (B, *P) bool)."""
        if self.carry_coordinates:
            return split_coordinates(regr_all, data_all.ndim - 2)
        return None, regr_all[:, 0] > VALID_THRESHOLD

    @staticmethod
    def _label_channel(segmentation) -> torch.Tensor:
        """The label channel (1) of the augmented segmentation key."""
        if segmentation is None or isinstance(segmentation, (list, tuple)) or segmentation.shape[0] < 2:
            raise TransformDroppedCoordinatesError(
                "a transform of the training pipeline dropped or merged channels of 'segmentation' (the unlabeled "
                "stream carries [non-zero mask, label] there for cases with a label in labelsUnlabeled). Custom "
                "segmentation transforms must keep the channels (or remove labelsUnlabeled).")
        return segmentation[1].to(torch.int16)


def unlabeled_identifiers(folder: str) -> List[str]:
    """Complete cases of a preprocessed unlabeled folder (a case is complete once its .pkl exists)."""
    return sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".pkl") and not f.startswith("."))


def cases_with_labels(folder: str, identifiers: Sequence[str]) -> List[str]:
    """Cases of a preprocessed unlabeled folder whose properties record a label (``LABEL_PROPERTY``)."""
    import pickle
    out = []
    for key in identifiers:
        with open(os.path.join(folder, key + ".pkl"), "rb") as f:
            if pickle.load(f).get(LABEL_PROPERTY):
                out.append(key)
    return out


def make_augmenter(loader, num_processes: int, seeds: List[int], pin_memory: bool):
    """Background workers for the unlabeled loader, with explicit seeds.

    nnU-Net starts its workers with ``seeds=None``: numpy is reseeded from OS entropy but torch
    is not, so every labeled worker replays the parent's torch RNG (mirroring and every
    RandomTransform gate use torch.rand). Explicit seeds make each unlabeled worker seed numpy
    *and* torch with its own value, so unlabeled augmentation neither repeats across workers nor
    replays the labeled stream.
    """
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

    if num_processes == 0:
        return SingleThreadedAugmenter(loader, None)
    assert len(seeds) == num_processes
    return NonDetMultiThreadedAugmenter(data_loader=loader, transform=None, num_processes=num_processes,
                                        num_cached=max(4, num_processes), seeds=list(seeds),
                                        pin_memory=pin_memory, wait_time=0.002)
