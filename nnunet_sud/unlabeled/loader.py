"""The unlabeled stream: random crops of unlabeled cases through nnU-Net's training augmentation.

``UnlabeledDataLoader`` is nnU-Net's ``nnUNetDataLoader`` (same bbox sampling, same padding,
same 2d handling) with two differences: crops are always random (unlabeled cases have no class
locations), and every sample carries the case coordinates of its voxels through the
augmentation (see ``coordinates.py``). A batch is a dict:

    data   (B, C, *patch) float32   augmented image patch, as the labeled stream's ``data``
    coords (B, 3, *patch) float32   case voxel (z, y, x) each patch voxel was sampled from
    valid  (B, *patch)   bool       False where the patch shows padding instead of the case
    keys   list of B case identifiers
    case_shapes (B, 3) int64        preprocessed case shapes (Z, Y, X)
"""
import os
from typing import List, Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from threadpoolctl import threadpool_limits

from nnunet_sud.unlabeled.coordinates import case_coordinate_channels, split_coordinates


class TransformDroppedCoordinatesError(RuntimeError):
    pass


class UnlabeledDataLoader(nnUNetDataLoader):
    """Random crops + case coordinates. Arguments as ``nnUNetDataLoader`` (no oversampling)."""

    def __init__(self, data, batch_size: int, patch_size: Sequence[int], final_patch_size: Sequence[int],
                 label_manager, transforms=None):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, transforms=transforms)
        # nnU-Net samples from class_locations when an ignore label exists; unlabeled cases have none
        self.has_ignore = False

    def generate_train_batch(self) -> dict:
        keys = self.get_indices()
        data_all = regr_all = None
        shapes = np.zeros((self.batch_size, 3), dtype=np.int64)
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for j, key in enumerate(keys):
                data, seg, _, _ = self._data.load_case(key)
                shape = data.shape[1:]
                shapes[j] = shape
                bbox_lbs, bbox_ubs = self.get_bbox(shape, False, None)
                bbox = [[lo, hi] for lo, hi in zip(bbox_lbs, bbox_ubs)]
                image = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
                # nonzero mask from preprocessing (-1 outside): used by use_mask_for_norm masking
                mask = torch.from_numpy(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
                regr = case_coordinate_channels(bbox_lbs, bbox_ubs, shape)
                if self.patch_size_was_2d:
                    image, mask, regr = image[:, 0], mask[:, 0], regr[:, 0]
                sample = {"image": image, "segmentation": mask, "regression_target": regr}
                if self.transforms is not None:
                    sample = self.transforms(**sample)
                if sample.get("regression_target") is None:
                    raise TransformDroppedCoordinatesError(
                        "a transform of the training pipeline dropped 'regression_target' (the patch->case "
                        "coordinates of the unlabeled stream). Custom transforms must implement "
                        "_apply_to_regr_target (geometric ones: like _apply_to_image; others: identity).")
                if data_all is None:
                    data_all = torch.empty((self.batch_size, *sample["image"].shape), dtype=torch.float32)
                    regr_all = torch.empty((self.batch_size, *sample["regression_target"].shape),
                                           dtype=torch.float32)
                data_all[j] = sample["image"]
                regr_all[j] = sample["regression_target"]
        coords, valid = split_coordinates(regr_all, data_all.ndim - 2)
        return {"data": data_all, "coords": coords.contiguous(), "valid": valid, "keys": list(keys),
                "case_shapes": torch.from_numpy(shapes)}


def unlabeled_identifiers(folder: str) -> List[str]:
    """Complete cases of a preprocessed unlabeled folder (a case is complete once its .pkl exists)."""
    return sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".pkl") and not f.startswith("."))


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
