"""Overlap and surface-distance metrics for binary masks: Dice and HD95.

These functions are the single definition of the metrics used by ``nnunet-sud evaluate`` and
by anything else in the package that reports Dice / HD95 (e.g. denoiser validation). They
work on plain numpy boolean arrays of any dimensionality (2d ``(Y, X)``, 3d ``(Z, Y, X)``, ...);
``spacing`` is given in the same axis order as the array.

Definitions
-----------
Dice (as nnU-Net v2's evaluator, ``nnunetv2.evaluation.evaluate_predictions.compute_metrics``)::

    Dice = 2 TP / (2 TP + FP + FN)

counted over voxels (optionally excluding an ignore mask). Reference and prediction both
empty (``TP + FP + FN == 0``) gives NaN (nnU-Net's convention); exactly one empty gives 0.

HD95 (as ``medpy.metric.binary.hd95``, the implementation UA-MT / SSL4MIS use for LA, ACDC):

1. surface of a mask ``M``: ``M XOR binary_erosion(M, generate_binary_structure(ndim, 1))``,
   i.e. the foreground voxels with at least one face-neighbour (4-neighbourhood in 2d,
   6-neighbourhood in 3d) in the background; voxels outside the image count as background
   (scipy's default ``border_value=0``), so objects touching the image border have surface
   there;
2. for every surface voxel of the prediction, the Euclidean distance (in physical units, using
   ``spacing``) to the nearest surface voxel of the reference (``distance_transform_edt`` of
   the complement of the reference surface), and vice versa;
3. both directions' distances pooled into one array, HD95 = its 95th percentile
   (``numpy.percentile``, default linear interpolation).

The distances are computed between voxel centres, so HD95 is 0 for identical masks and takes
values on the lattice of inter-voxel distances.

Empty structures (medpy raises an error there; we define them):

* both masks empty: HD95 = NaN (no surface to compare; the case does not say anything about
  this structure). Callers report such cases separately and exclude them from statistics.
* exactly one mask empty (structure missed, or predicted where there is none): HD95 =
  ``one_empty`` (default: the image diagonal ``sqrt(sum((shape_i * spacing_i)^2))``, the
  physical extent of the image, an upper bound of any distance between two voxels of it).
  A finite worst-case value keeps such failures inside medians, box plots and paired tests
  instead of silently dropping them.

References
----------
* Isensee et al., nnU-Net, Nature Methods 2021 (Dice evaluation convention).
* Maier, MedPy (``medpy.metric.binary.hd95``, ``__surface_distances``).
* Yu et al., UA-MT, MICCAI 2019; Luo, SSL4MIS (use of medpy's hd95 on LA / ACDC).
"""
__all__ = [
    "dice",
    "hd95",
    "surface_distances",
    "surface_mask",
    "image_diagonal",
    "confusion_counts",
    "squeeze_singleton_axes",
]

from typing import Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage


SpacingLike = Union[None, float, Sequence[float]]


def _normalise_spacing(spacing: SpacingLike, ndim: int) -> np.ndarray:
    """``None`` -> ones; scalar -> same on every axis; sequence -> checked length. float64 (ndim,)."""
    if spacing is None:
        return np.ones(ndim, dtype=np.float64)
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.ndim == 0:
        return np.full(ndim, float(sp))
    if sp.shape != (ndim,):
        raise ValueError(f"spacing has {sp.size} entries but the masks have {ndim} axes")
    if np.any(sp <= 0) or not np.all(np.isfinite(sp)):
        raise ValueError(f"spacing must be positive and finite, got {tuple(sp)}")
    return sp


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(bool, copy=False)
    ref = np.asarray(ref).astype(bool, copy=False)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    return pred, ref


def confusion_counts(pred: np.ndarray, ref: np.ndarray,
                     ignore_mask: Optional[np.ndarray] = None) -> Tuple[int, int, int, int]:
    """Voxel counts ``(TP, FP, FN, TN)`` of boolean masks of equal shape.

    Voxels where ``ignore_mask`` is True are not counted (nnU-Net's ignore label).
    """
    pred, ref = _check_pair(pred, ref)
    if ignore_mask is not None:
        use = ~np.asarray(ignore_mask, dtype=bool)
        pred = pred & use
        ref = ref & use
        n = int(np.count_nonzero(use))
    else:
        n = pred.size
    tp = int(np.count_nonzero(pred & ref))
    n_pred = int(np.count_nonzero(pred))
    n_ref = int(np.count_nonzero(ref))
    fp, fn = n_pred - tp, n_ref - tp
    return tp, fp, fn, n - tp - fp - fn


def dice(pred: np.ndarray, ref: np.ndarray, ignore_mask: Optional[np.ndarray] = None) -> float:
    """Dice coefficient ``2 TP / (2 TP + FP + FN)`` of two boolean masks of equal shape.

    Args:
        pred, ref: arrays of any shape (non-zero = foreground), e.g. ``(Z, Y, X)``.
        ignore_mask: optional boolean array of the same shape; True voxels are not counted.

    Returns:
        Dice in [0, 1]; NaN when both masks are empty (nnU-Net's convention); 0 when exactly one is.
    """
    tp, fp, fn, _ = confusion_counts(pred, ref, ignore_mask)
    denom = 2 * tp + fp + fn
    return float("nan") if denom == 0 else 2.0 * tp / denom


def surface_mask(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Surface voxels of a boolean mask: ``mask XOR binary_erosion(mask, structure)``.

    ``structure = generate_binary_structure(mask.ndim, connectivity)``; connectivity 1 (medpy's
    default) = face neighbours. Voxels outside the array count as background.
    """
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, iterations=1)


def _union_bbox(a: np.ndarray, b: np.ndarray) -> Tuple[slice, ...]:
    """Bounding box of ``a | b`` grown by one voxel, clipped to the array.

    Computing surfaces and distance maps inside this box gives exactly the values of the full
    array: the extra voxel of background keeps the erosion unchanged where an object does not
    touch the box border, and where it does, the box border is the image border; all surface
    voxels lie inside the box, so nearest-surface distances are the same.
    """
    union = a | b
    slices = []
    for ax in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != ax)
        idx = np.flatnonzero(union.any(axis=other))
        slices.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, union.shape[ax])))
    return tuple(slices)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: SpacingLike = None,
                      connectivity: int = 1) -> np.ndarray:
    """Distances from every surface voxel of ``a`` to the nearest surface voxel of ``b``.

    Args:
        a, b: boolean masks of equal shape, both non-empty.
        spacing: voxel size per axis (same order as the array axes); None = 1.
        connectivity: passed to ``generate_binary_structure`` to define the surface.

    Returns:
        float64 array of shape ``(number of surface voxels of a,)``, in units of ``spacing``.
    """
    a, b = _check_pair(a, b)
    if not a.any() or not b.any():
        raise ValueError("surface_distances needs two non-empty masks")
    sp = _normalise_spacing(spacing, a.ndim)
    box = _union_bbox(a, b)
    a, b = a[box], b[box]
    surf_a = surface_mask(a, connectivity)
    surf_b = surface_mask(b, connectivity)
    dist_to_b = ndimage.distance_transform_edt(~surf_b, sampling=sp)
    return dist_to_b[surf_a]


def image_diagonal(shape: Sequence[int], spacing: SpacingLike = None) -> float:
    """Physical diagonal of an image, ``sqrt(sum_i (shape_i * spacing_i)^2)``."""
    sp = _normalise_spacing(spacing, len(shape))
    return float(np.sqrt(np.sum((np.asarray(shape, dtype=np.float64) * sp) ** 2)))


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: SpacingLike = None, connectivity: int = 1,
         one_empty: Union[str, float] = "diagonal") -> float:
    """95th percentile of the symmetric surface distances (medpy's ``hd95`` definition).

    Args:
        pred, ref: masks of equal shape (non-zero = foreground), e.g. ``(Z, Y, X)`` or ``(Y, X)``.
        spacing: voxel size per axis in array order (e.g. mm); scalar or None (= 1).
        connectivity: surface definition, see :func:`surface_mask` (1 as medpy's default).
        one_empty: value returned when exactly one mask is empty: ``"diagonal"`` (default,
            :func:`image_diagonal` of the masks' shape and spacing) or a number (e.g. NaN).

    Returns:
        HD95 in units of ``spacing``; NaN when both masks are empty.
    """
    pred, ref = _check_pair(pred, ref)
    sp = _normalise_spacing(spacing, pred.ndim)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return float("nan")
    if has_pred != has_ref:
        if isinstance(one_empty, str):
            if one_empty != "diagonal":
                raise ValueError(f"one_empty must be 'diagonal' or a number, got {one_empty!r}")
            return image_diagonal(pred.shape, sp)
        return float(one_empty)
    d = np.concatenate([surface_distances(pred, ref, sp, connectivity),
                        surface_distances(ref, pred, sp, connectivity)])
    return float(np.percentile(d, 95))


def squeeze_singleton_axes(arr: np.ndarray, spacing: Sequence[float]) -> Tuple[np.ndarray, Tuple[float, ...]]:
    """Drop the axes of length 1 (and their spacing) from a spatial array.

    nnU-Net stores 2d images as ``(1, Y, X)`` with a dummy spacing on the first axis; surfaces of
    such images must be computed in 2d (in 3d every voxel of a one-slice object would be a
    surface voxel). At least one axis is kept.
    """
    keep = [i for i, s in enumerate(arr.shape) if s > 1]
    if not keep:
        keep = [arr.ndim - 1]
    if len(spacing) != arr.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match array shape {arr.shape}")
    drop = tuple(i for i in range(arr.ndim) if i not in keep)
    return arr.squeeze(axis=drop) if drop else arr, tuple(float(spacing[i]) for i in keep)
