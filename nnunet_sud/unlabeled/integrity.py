"""Integrity of ``imagesUnlabeled``: what nnU-Net's ``--verify_dataset_integrity`` is for imagesTr.

``nnunet-sud preprocess-unlabeled`` runs :func:`check_unlabeled_images` before it writes anything.
Every image file is checked for problems that nnU-Net's readers and preprocessing let through
without an error and that would put wrong data into training:

* a ``.gz`` file whose gzip stream is truncated or corrupt: SimpleITK reads a cut ``.nii.gz``
  without complaint as a smaller image or pads the missing part with zeros, so the whole stream
  is decompressed here (Python's gzip checks the end-of-stream marker and the CRC);
* more than one component per voxel (an RGB or vector image where nnU-Net expects one scalar
  image per channel file; nnU-Net's SimpleITK reader fails on it later with an IndexError);
* NaN or Inf voxels (SimpleITK reads them from NIfTI files as 0, other readers pass them on into
  the preprocessed case; an image that is NaN everywhere becomes a blank case);
* a file that nnU-Net's reader for this dataset cannot read.

These are collected over all cases and raised as one :class:`UserFacingError`. An image that is
smaller than the configuration's patch size after resampling to its spacing is only a warning
(nnU-Net pads such images; it is legitimate but often a sign of a wrong file).
"""
import gzip
import os
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_sud.errors import UserFacingError


def gzip_problem(path: str) -> Optional[str]:
    """None if the whole gzip stream of ``path`` decompresses with a valid CRC, else what is wrong."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except EOFError:
        return "is truncated (its gzip stream ends before the end-of-stream marker)"
    except (OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; CRC and length errors too
        return f"is not a valid gzip file or is corrupt ({e})"
    return None


def components_per_voxel(path: str) -> Optional[int]:
    """Components per voxel from the file header (None when SimpleITK cannot read the header)."""
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader.GetNumberOfComponents()


def nonfinite_voxels(path: str, data: np.ndarray) -> Tuple[int, int]:
    """(number of NaN/Inf voxels, number of voxels) of an image file; ``data``: what nnU-Net's reader
    made of it. NIfTI files are read again with nibabel: SimpleITK (ITK's NIfTI reader) returns
    NaN and Inf voxels as 0."""
    low = path.lower()
    if low.endswith(".nii") or low.endswith(".nii.gz"):
        import nibabel
        img = nibabel.load(path)
        if img.get_data_dtype().kind not in "fc":  # integer voxels cannot be NaN; scaling keeps them finite
            return 0, int(np.prod(img.shape))
        data = np.asanyarray(img.dataobj)
    return int(np.count_nonzero(~np.isfinite(data))), int(data.size)


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], plans: dict, configuration: str) -> List[int]:
    """Image shape (reader order) at the configuration's spacing, axes in the preprocessed order,
    as nnU-Net's preprocessor computes it (before cropping to non-zero)."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    shape = [shape[i] for i in pm.transpose_forward]
    spacing = [spacing[i] for i in pm.transpose_forward]
    target = list(cm.spacing)
    if len(target) < len(shape):  # 2d configurations keep the out-of-plane spacing (as the preprocessor does)
        target = [spacing[0]] + target
    return [int(i) for i in compute_new_shape(shape, spacing, target)]


def _fmt_shape(shape: Sequence) -> str:
    return " x ".join(str(int(s)) for s in shape)


def check_case_images(case: str, image_files: List[str], reader_writer_class, plans: dict,
                      configuration: str) -> Tuple[List[str], List[str]]:
    """(problems, warnings) of one unlabeled case; every message names the file, the problem and the fix."""
    problems = []
    for f in image_files:
        if f.endswith(".gz"):
            p = gzip_problem(f)
            if p is not None:
                problems.append(f"{f} {p}; readers would silently return part of the image or zeros. Copy or "
                                f"export the file again, or remove case '{case}' from imagesUnlabeled.")
                continue
        if reader_writer_class.__name__ != "NaturalImage2DIO":  # that reader turns RGB(A) into channels itself
            n = components_per_voxel(f)
            if n is not None and n > 1:
                problems.append(f"{f} has {n} components per voxel (an RGB or vector image); nnU-Net needs one "
                                f"scalar image per channel file, as in imagesTr. Convert it to the channels of "
                                f"imagesTr (one file each: {case}_0000, {case}_0001, ...) or remove it.")
    if problems:
        return problems, []
    try:
        data, props = reader_writer_class().read_images(image_files)
    except Exception as e:  # readers raise anything (RuntimeError, IndexError, AssertionError, ...)
        return [f"{', '.join(image_files)}: nnU-Net's {reader_writer_class.__name__} cannot read case '{case}' "
                f"({type(e).__name__}: {e}). Check that each file is an image of the dataset's format and that "
                f"all channels share one geometry, or remove the case."], []
    for c, f in enumerate(image_files):
        bad, size = nonfinite_voxels(f, data[c])
        if bad == size:
            problems.append(f"{f}: all {bad} voxels are NaN or Inf, the image holds no data (it would become a "
                            f"blank case). Export it again or remove case '{case}' from imagesUnlabeled.")
        elif bad:
            problems.append(f"{f}: {bad} of {size} voxels ({100.0 * bad / size:.2g}%) are NaN or "
                            f"Inf (SimpleITK reads them from NIfTI as 0, other readers pass them into training). Replace them (e.g. with "
                            f"the background intensity) or remove case '{case}' from imagesUnlabeled.")
    warns = []
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    patch = list(PlansManager(plans).get_configuration(configuration).patch_size)
    shape = resampled_shape(data.shape[1:], props["spacing"], plans, configuration)
    in_plane = shape[-len(patch):]
    if any(s < p for s, p in zip(in_plane, patch)):
        warns.append(f"{image_files[0]}: {_fmt_shape(in_plane)} voxels at the spacing of '{configuration}' (before "
                     f"cropping to non-zero), smaller than its patch size {_fmt_shape(patch)}; nnU-Net pads the "
                     f"image, so its patches are partly padding. Fine if intended; otherwise check the file (a cut "
                     f"or a single slice?) or remove case '{case}'.")
    return problems, warns


def check_unlabeled_images(cases: Dict[str, List[str]], plans: dict, configuration: str,
                           progress: bool = False) -> List[str]:
    """Check every case of imagesUnlabeled ({case: [channel files]}); raise one UserFacingError listing
    all problems, print and return the warnings (images smaller than the patch)."""
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name
    from tqdm import tqdm

    rw = recursive_find_reader_writer_by_name(plans["image_reader_writer"])
    problems, warns = [], []
    for case, files in tqdm(cases.items(), desc="Checking unlabeled images", disable=not progress):
        p, w = check_case_images(case, files, rw, plans, configuration)
        problems += p
        warns += w
    for w in warns:
        print(f"warning: {w}")
    if problems:
        folder = os.path.dirname(next(iter(cases.values()))[0])
        raise UserFacingError(
            f"{len(problems)} problem(s) in {folder} (nothing was preprocessed):\n  " + "\n  ".join(problems))
    return warns
