"""A synthetic semi-supervised segmentation task in the nnU-Net raw layout.

Every case shows the same anatomy-like arrangement, jittered per case:

* label 1 ``cavity``: an ellipsoid (ellipse in 2d) near the centre of a body ellipsoid;
* label 2 ``wall``: a shell of about two voxels around the cavity (like a myocardium);
* label 3 ``vessel``: a capsule (thick segment) leaving the wall in a roughly fixed direction.

The whole arrangement is rotated, scaled and shifted a little per case, so shapes and layout
are consistent across cases (a shape prior helps). Images are weak-contrast and noisy: the
structures differ from the body by less than the noise standard deviation, a smooth
multiplicative bias field varies the intensities, the image is blurred, and distractor blobs
with the cavity's intensity lie elsewhere in the body. A model that only looks at local
intensities confuses blobs with cavities and leaks through the weak wall; one that knows
the shapes does not. That is the situation semi-supervised methods with a shape prior
(denoisers of label maps) are meant to improve.

Layout written (nnU-Net v2 raw format, ``.nii.gz``, single channel ``0000``)::

    DatasetXXX_Synthetic<dim>/
        dataset.json
        imagesTr/  labelsTr/        labeled cases   syn_lab_000_0000.nii.gz, syn_lab_000.nii.gz
        imagesUnlabeled/            unlabeled cases syn_unl_000_0000.nii.gz
        labelsUnlabeled/            their labels    syn_unl_000.nii.gz (only to measure target quality:
                                                    preprocess-unlabeled carries them, no loss reads them)
        imagesTs/  labelsTs/        test cases      syn_ts_000_0000.nii.gz,  syn_ts_000.nii.gz

Arrays are generated in (z, y, x) order; 2d cases are single-slice volumes of shape (1, y, x)
(how nnU-Net stores 2d data in NIfTI).
"""
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from nnunet_sud.errors import UserFacingError

LABELS = {"background": 0, "cavity": 1, "wall": 2, "vessel": 3}
DEFAULT_SHAPE = {"3d": (32, 40, 40), "2d": (1, 64, 64)}
DEFAULT_SPACING = {"3d": (1.0, 1.0, 1.0), "2d": (1.0, 1.0, 1.0)}


@dataclass
class PhantomParams:
    """Appearance of the phantom. Intensities are relative to a body value of 0.5."""
    body: float = 0.5
    cavity: float = 0.85
    wall: float = 0.62
    vessel: float = 0.8
    noise_std: float = 0.22
    blur_sigma: float = 0.8
    bias_strength: float = 0.25
    n_distractors: int = 2


def _rotation(ndim_space: int, rng: np.random.Generator, max_deg: float) -> np.ndarray:
    if ndim_space == 2:
        a = np.deg2rad(rng.uniform(-max_deg, max_deg))
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    r = np.eye(3)
    for axes in ((0, 1), (0, 2), (1, 2)):
        a = np.deg2rad(rng.uniform(-max_deg, max_deg))
        m = np.eye(3)
        i, j = axes
        m[i, i], m[i, j], m[j, i], m[j, j] = np.cos(a), -np.sin(a), np.sin(a), np.cos(a)
        r = r @ m
    return r


def _smooth_field(shape: Tuple[int, ...], rng: np.random.Generator, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter
    f = gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="wrap")
    return f / (np.abs(f).max() + 1e-8)


def generate_case(shape: Sequence[int], rng: np.random.Generator,
                  params: PhantomParams = PhantomParams()) -> Tuple[np.ndarray, np.ndarray]:
    """One case. ``shape`` is (z, y, x); z == 1 gives a 2d case.

    Returns (image float32 of ``shape``, label uint8 of ``shape`` with values in LABELS).
    """
    from scipy.ndimage import gaussian_filter

    shape = tuple(int(s) for s in shape)
    is2d = shape[0] == 1
    space = shape[1:] if is2d else shape
    nd = len(space)
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in space], indexing="ij")
    pts = np.stack(grids, -1)  # (*space, nd)
    size = np.array(space, dtype=np.float64)
    centre = size / 2 + rng.uniform(-0.06, 0.06, nd) * size
    rot = _rotation(nd, rng, 20.0)
    scale = rng.uniform(0.85, 1.15)
    local = (pts - centre) @ rot  # coordinates in the phantom's frame

    def ellipsoid(c, radii):
        return (((local - c) / radii) ** 2).sum(-1) <= 1.0

    body = ellipsoid(np.zeros(nd), 0.46 * size * np.array([1.0] * nd))
    cav_r = 0.17 * size * scale * rng.uniform(0.9, 1.1, nd)
    cav_c = np.zeros(nd)
    cavity = ellipsoid(cav_c, cav_r)
    wall_t = 2.0 * rng.uniform(0.9, 1.2)
    wall = ellipsoid(cav_c, cav_r + wall_t) & ~cavity
    # vessel: capsule from the wall outwards, canonical direction (last axis) + jitter
    direction = np.zeros(nd)
    direction[-1] = 1.0
    direction[0] = 0.35
    direction += rng.uniform(-0.15, 0.15, nd)
    direction /= np.linalg.norm(direction)
    a = cav_c + direction * (cav_r.max() + wall_t * 0.5)
    b = a + direction * 0.22 * size.min() * scale
    radius = max(1.5, 0.055 * size.min() * scale)
    ab = b - a
    t = np.clip(((local - a) @ ab) / (ab @ ab), 0, 1)
    dist = np.linalg.norm(local - (a + t[..., None] * ab), axis=-1)
    vessel = (dist <= radius) & ~cavity & ~wall

    label = np.zeros(space, np.uint8)
    label[cavity] = LABELS["cavity"]
    label[wall] = LABELS["wall"]
    label[vessel] = LABELS["vessel"]
    label[~body] = 0

    img = np.where(body, params.body, 0.05)
    img = np.where(label == 1, params.cavity, img)
    img = np.where(label == 2, params.wall, img)
    img = np.where(label == 3, params.vessel, img)
    # distractor blobs: cavity-like intensity, elsewhere in the body, never touching the anatomy
    occupied = gaussian_filter((label > 0).astype(float), 2) > 0.01
    for _ in range(params.n_distractors):
        for _attempt in range(20):
            c = rng.uniform(0.15, 0.85, nd) * size
            r = rng.uniform(0.05, 0.09) * size.min()
            blob = (((pts - c) / r) ** 2).sum(-1) <= 1
            if not (blob & occupied).any() and (blob & body).sum() == blob.sum():
                img = np.where(blob, params.cavity, img)
                break
    bias = 1.0 + params.bias_strength * _smooth_field(space, rng, sigma=max(space) / 4)
    img = img * bias
    img = gaussian_filter(img, params.blur_sigma)
    img = img + rng.normal(0, params.noise_std, space)
    if is2d:
        img, label = img[None], label[None]
    return img.astype(np.float32), label


def _write(arr: np.ndarray, spacing_zyx: Sequence[float], path: str) -> None:
    import SimpleITK as sitk
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    sitk.WriteImage(im, path, useCompression=True)


def generate_dataset(raw_folder: str, dataset_id: int, dim: str = "3d", n_labeled: int = 8,
                     n_unlabeled: int = 16, n_test: int = 4, seed: int = 0,
                     shape: Optional[Sequence[int]] = None, name: Optional[str] = None,
                     params: PhantomParams = PhantomParams()) -> str:
    """Write the synthetic dataset; returns the dataset folder. Same seed -> same files."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    if dim not in DEFAULT_SHAPE:
        raise UserFacingError(f"--dim must be '2d' or '3d', got {dim!r}")
    if not (1 <= int(dataset_id) <= 999):
        raise UserFacingError(f"dataset id must be in 1..999 (nnU-Net's DatasetXXX), got {dataset_id}")
    if n_labeled < 2:
        raise UserFacingError("--labeled must be at least 2 (nnU-Net needs a train/val split)")
    shape = tuple(shape) if shape is not None else DEFAULT_SHAPE[dim]
    if dim == "2d" and len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or (dim == "2d") != (shape[0] == 1):
        raise UserFacingError(f"--shape {shape} does not fit --dim {dim} (2d: Y X or 1 Y X; 3d: Z Y X)")
    name = name or f"Synthetic{dim.upper()}"
    folder = os.path.join(raw_folder, f"Dataset{int(dataset_id):03d}_{name}")
    for sub in ("imagesTr", "labelsTr", "imagesUnlabeled", "labelsUnlabeled", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    rng = np.random.default_rng(seed)
    spacing = DEFAULT_SPACING[dim]
    groups = (("imagesTr", "labelsTr", "syn_lab", n_labeled),
              ("imagesUnlabeled", "labelsUnlabeled", "syn_unl", n_unlabeled),
              ("imagesTs", "labelsTs", "syn_ts", n_test))
    for img_dir, lab_dir, prefix, n in groups:
        for i in range(n):
            img, lab = generate_case(shape, rng, params)
            case = f"{prefix}_{i:03d}"
            _write(img, spacing, os.path.join(folder, img_dir, f"{case}_0000.nii.gz"))
            if lab_dir is not None:
                _write(lab, spacing, os.path.join(folder, lab_dir, f"{case}.nii.gz"))
    generate_dataset_json(folder, {0: "MRI"}, labels=dict(LABELS), num_training_cases=n_labeled,
                          file_ending=".nii.gz", dataset_name=name,
                          description="nnunet_sud synthetic semi-supervised task",
                          numUnlabeled=n_unlabeled, numTest=n_test, seed=seed)
    return folder


def add_parser(sub) -> None:
    p = sub.add_parser("synthetic", help="write the synthetic semi-supervised dataset (nnU-Net raw layout)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    p.add_argument("--dim", choices=("2d", "3d"), default="3d")
    p.add_argument("--labeled", type=int, default=8)
    p.add_argument("--unlabeled", type=int, default=16)
    p.add_argument("--test", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs="+", default=None, help="Z Y X (3d) or Y X (2d)")
    p.add_argument("-o", "--raw-folder", default=None, help="defaults to $nnUNet_raw")
    p.set_defaults(func=_run)


def _run(args) -> int:
    raw = args.raw_folder or os.environ.get("nnUNet_raw")
    if not raw:
        raise UserFacingError("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw or pass -o FOLDER")
    folder = generate_dataset(raw, args.dataset_id, args.dim, args.labeled, args.unlabeled, args.test,
                              args.seed, args.shape)
    print(folder)
    return 0
