"""Label maps for the denoiser: where they live and how the data loader reads them.

Sources of training label maps for ``nnUNetTrainerLabelDenoiser``:

1. the training split of the dataset (``labelsTr``, preprocessed by nnU-Net), always;
2. optional extra label maps without images: ``nnUNet_raw/DatasetXXX/labelsDenoiser/``
   (same file names/ending as ``labelsTr``: ``<case><file_ending>``), preprocessed with
   ``nnunet-sud preprocess-denoiser-labels -d XXX -c CFG`` into
   ``nnUNet_preprocessed/DatasetXXX/<data_identifier>_denoiser_labels/`` (same on-disk format
   as nnU-Net's folder; the image array stored there is all zeros).

``LabelMapDataset`` joins such folders behind nnU-Net's dataset interface and hands the data
loader a zero "image" of one channel in place of the real one, so images are never read: the
denoiser only needs the (spatially augmented) segmentation.
"""
import os
from typing import List, Optional, Sequence

import numpy as np

from nnunet_sud.errors import UserFacingError

DENOISER_LABELS_RAW_FOLDER = "labelsDenoiser"
DENOISER_LABELS_SUFFIX = "_denoiser_labels"


def denoiser_labels_folder(preprocessed_dataset_folder_base: str, data_identifier: str) -> str:
    """``nnUNet_preprocessed/DatasetXXX/<data_identifier>_denoiser_labels``."""
    return os.path.join(preprocessed_dataset_folder_base, data_identifier + DENOISER_LABELS_SUFFIX)


def raw_denoiser_label_files(raw_dataset_folder: str, file_ending: str) -> List[str]:
    """Sorted label files in ``<raw dataset>/labelsDenoiser`` (empty if the folder does not exist)."""
    folder = os.path.join(raw_dataset_folder, DENOISER_LABELS_RAW_FOLDER)
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.endswith(file_ending) and not f.startswith("."))


def resolve_dataset_name(dataset_name_or_id) -> str:
    """nnU-Net's dataset name for an id or name; ``UserFacingError`` when nnU-Net does not know it."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    s = str(dataset_name_or_id)
    try:
        return maybe_convert_to_dataset_name(s if s.startswith("Dataset") else int(s))
    except ValueError:
        raise UserFacingError(f"dataset {dataset_name_or_id!r} is neither a number nor a name DatasetXXX_Name")
    except RuntimeError as e:
        raise UserFacingError(f"dataset {dataset_name_or_id!r} not found in nnUNet_raw/nnUNet_preprocessed/"
                              f"nnUNet_results: {str(e).splitlines()[0]}") from None


def dataset_id_of(dataset_name: str) -> str:
    """'Dataset991_Synthetic3D' -> '991' (the form nnUNetv2_train takes); the name if it has no id."""
    try:
        return str(int(dataset_name[7:10]))
    except ValueError:
        return dataset_name


class LabelMapDataset:
    """nnU-Net dataset interface over one or more preprocessed folders, images replaced by zeros.

    Args:
        parts: nnU-Net dataset objects (``nnUNetDatasetBlosc2``/``nnUNetDatasetNumpy`` instances).
            Their identifiers must be disjoint.

    ``load_case(key)`` returns ``(zeros (1, *seg.shape[1:]) float32, seg, seg_prev, properties)``;
    ``np.zeros`` is lazily allocated, so only the cropped patch is ever touched.
    """

    def __init__(self, parts: Sequence):
        self.parts = [p for p in parts if p is not None]
        self._owner = {}
        for p in self.parts:
            for k in p.identifiers:
                if k in self._owner:
                    raise UserFacingError(
                        f"label map {k!r} exists in both {self._owner[k].source_folder} and {p.source_folder}; "
                        f"rename the file in {DENOISER_LABELS_RAW_FOLDER}/ and preprocess again")
                self._owner[k] = p
        self.identifiers = sorted(self._owner)
        self.source_folder = self.parts[0].source_folder if self.parts else None

    def __len__(self):
        return len(self.identifiers)

    def __getitem__(self, identifier):
        return self.load_case(identifier)

    def load_case(self, identifier):
        _, seg, seg_prev, properties = self._owner[identifier].load_case(identifier)
        return np.zeros((1, *seg.shape[1:]), dtype=np.float32), seg, seg_prev, properties


def open_denoiser_labels(dataset_class, folder: str) -> Optional[object]:
    """nnU-Net dataset over the preprocessed ``*_denoiser_labels`` folder, or None if absent/empty."""
    if not os.path.isdir(folder):
        return None
    ids = dataset_class.get_identifiers(folder)
    if len(ids) == 0:
        return None
    return dataset_class(folder, ids)
