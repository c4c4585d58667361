"""The map from augmented patch voxels to case voxels.

Interpolated path (any pipeline). nnU-Net's loader crops a box of the (preprocessed) case,
padding outside the case, and the training augmentation then rotates/scales (``grid_sample``,
linear), crops to the final patch and mirrors. We carry the case coordinates of every voxel of
the loader's box through that same pipeline as ``regression_target`` channels: SpatialTransform
resamples them with the image (linear interpolation of a linear field is exact), MirrorTransform
flips them, intensity transforms leave them alone.

Two more channels make this exact at the borders. ``grid_sample`` pads with zeros outside the
loader's box, which would pull interpolated coordinates towards 0 near the box edge; a channel
of ones over the box interpolates to the weight that fell inside the box, and dividing by it
turns the coordinates back into a weighted mean of in-box voxel coordinates (error below
(1 - that weight) voxels). An inside-the-case channel (1 in the case, 0 where the loader pads)
marks a voxel *valid* when it stays above ``VALID_THRESHOLD``: every input voxel that
contributed lay inside the case (and hence inside the box).

Exact path (the default where the pipeline allows). Interpolating five channels of the box costs
the worker more than the image itself on a warped patch. But the coordinates of a patch voxel *are* the position at which
SpatialTransform sampled its input, and batchgeneratorsv2 draws its parameters (affine, elastic
offsets, centre) in ``get_parameters``, apart from their application.
``ExactCoordinateSpatialTransform`` (the same class with ``apply`` extended; the same random draws,
images and segmentations) therefore writes the channels after the spatial step from those
positions: the grid's, un-normalised as ``grid_sample`` does, or the integer crop at
``floor(centre) - patch // 2`` when nothing was drawn. in_box and inside_case follow analytically:
interpolating the indicator of a box (case and loader's box alike are boxes) gives the product over
the axes of the share of each axis' linear weights on the box (``interpolation_share``). The
channels have the layout and meaning of the interpolated ones, so MirrorTransform and every later
transform treat them as before, and ``split_coordinates``/``VALID_THRESHOLD`` read both paths.
Compared on the same draws (1000 samples of nnU-Net's full pipeline: 3d, 3d with the loader
padding every axis, 2d, 2d with padding, pseudo-2d; tests/test_exact_coordinates.py runs a smaller
version and adds elastic deformation, random crops and align_corners): identical
``data``/``seg``/``valid`` (7.3 M voxels), inside_case within 7e-6 and coordinates within 1.5e-5
voxels of the interpolated ones on valid voxels (float rounding of the interpolation). They differ only on invalid voxels near the loader's box
edge, which nothing reads: there the exact coordinates are the sampling position, the interpolated
ones a mean over the in-box neighbours.

The exact step is used only where the pipeline is one this module knows
(``exact_coordinate_pipeline``: batchgeneratorsv2's own SpatialTransform, linear, first in a
ComposeTransforms, nested too, after nothing but pseudo-2d's Convert3DTo2DTransform). Any other
pipeline (e.g. a variant's ``get_training_transforms`` with its own geometric transform first, or
a subclass of SpatialTransform) interpolates the channels as above, never a guess; the trainer
says which path it took, and why, in the training log. The loader hands the exact step a
``CaseBox`` under ``CASE_BOX_KEY`` and a zero-stride placeholder as ``regression_target`` (so that
Convert3DTo2DTransform/Convert2DTo3DTransform reshape it as they would the channels).

Cost: ``benchmarks/data_pipeline.py`` times both paths side by side (rows ``unlabeled`` and
``unlabeled, interpolated coordinates``; docs/benchmarks.md, "Does the data pipeline keep up?").
The exact channels replace an interpolation of five channels by arithmetic on the drawn grid, so
their saving grows with the patch and with the share of warped patches.

Shapes (nnU-Net stores every case as (C, Z, Y, X), also for 2d configurations):
    coordinate channels before augmentation: (5, *box)  [z, y, x, in_box, inside_case]
                           (exact path: a placeholder of that shape, no memory)
    after augmentation:    coords (3, *patch) float32 case voxel coordinates (z, y, x)
                           valid  (*patch) bool
    2d configurations: patch is (Y, X); coords still hold (z, y, x), z constant per sample.
"""
import copy
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert3DTo2DTransform

#: a voxel is valid when its interpolated inside-indicator is 1 up to float error
VALID_THRESHOLD = 1.0 - 1e-4


def case_coordinate_channels(bbox_lbs: Sequence[int], bbox_ubs: Sequence[int],
                             case_shape: Sequence[int], coordinates: bool = True) -> torch.Tensor:
    """Coordinates of the loader's crop box [lbs, ubs) in a case of ``case_shape``.

    Returns (len(case_shape) + 2, *box) float32: one channel per case axis holding that axis'
    voxel index (also outside the case, where the loader pads), a channel of ones (the box) and
    an inside-the-case channel; with ``coordinates=False`` only the inside-the-case channel
    (1, *box). Written in place by broadcasting (one allocation; no meshgrid copies).
    """
    axes = [torch.arange(lo, hi, dtype=torch.float32) for lo, hi in zip(bbox_lbs, bbox_ubs)]
    n = len(axes)
    out = torch.empty((n + 2 if coordinates else 1, *[len(a) for a in axes]), dtype=torch.float32)
    inside = out[-1]
    inside.fill_(1.0)
    for d, (a, size) in enumerate(zip(axes, case_shape)):
        view = [1] * n
        view[d] = -1
        inside.mul_(((a >= 0) & (a <= size - 1)).float().view(view))
        if coordinates:
            out[d] = a.view(view)
    if coordinates:
        out[n].fill_(1.0)
    return out


def split_coordinates(regr: torch.Tensor, n_spatial: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Augmented channels (B, 5, *patch) or (5, *patch) -> coords (.., 3, *patch), valid (.., *patch) bool.

    ``n_spatial`` is the number of patch axes (2 or 3); the channel axis is the one before them.
    """
    c_axis = regr.ndim - n_spatial - 1
    n = regr.shape[c_axis]
    in_box = regr.narrow(c_axis, n - 2, 1).clamp_min(1e-6)
    coords = regr.narrow(c_axis, 0, n - 2) / in_box
    valid = regr.select(c_axis, n - 1) > VALID_THRESHOLD
    return coords, valid


def sample_case_field(field: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of a case field at case voxel coordinates.

    field:  (C, Z, Y, X) tensor in case voxel space
    coords: (3, *P) case voxel coordinates (z, y, x), any patch shape P
    returns (C, *P); outside the case, values are extrapolated with zeros (mask with ``valid``).
    """
    c, z, y, x = field.shape
    size = torch.tensor([z, y, x], dtype=coords.dtype, device=coords.device)
    pts = coords.reshape(3, -1).T  # (N, 3) in (z, y, x)
    # grid_sample wants (x, y, z) normalised to [-1, 1] with align_corners=True: -1 -> 0, 1 -> n-1
    norm = 2 * pts / (size - 1).clamp(min=1) - 1
    grid = norm.flip(-1).reshape(1, 1, 1, -1, 3).to(field.dtype)
    out = torch.nn.functional.grid_sample(field[None], grid, mode="bilinear", padding_mode="zeros",
                                          align_corners=True)
    return out.reshape(c, *coords.shape[1:])


# ---------------------------------------------------------------------- exact path (module doc)
#: key of the sample dict holding the loader's ``CaseBox`` on the exact path, read by ``ExactCoordinateSpatialTransform``
CASE_BOX_KEY = "unlabeled_case_box"


class CaseBox(NamedTuple):
    """The loader's crop box [lbs, ubs) of one sample in case voxels (all case axes, also in 2d
    configurations), the case's shape, and whether the five channels (True) or only the
    inside-the-case channel (False) are wanted."""
    lbs: Tuple[int, ...]
    ubs: Tuple[int, ...]
    case_shape: Tuple[int, ...]
    coordinates: bool

    @property
    def channels(self) -> int:
        return len(self.lbs) + 2 if self.coordinates else 1


def interpolation_share(p: torch.Tensor, lo: int, hi: int, p_range: Optional[Tuple[float, float]] = None):
    """Share of the linear-interpolation weight of positions ``p`` (along one axis) that falls on the
    integer positions lo..hi: 1 inside [lo, hi], falling linearly to 0 one voxel outside (the weights
    (1 - f, f) of floor(p) and floor(p) + 1). Python 1.0 where every position is inside (the usual
    case), which ``p_range`` (min, max of ``p``, else computed) decides without a pass over ``p``."""
    if hi < lo:
        return torch.zeros_like(p)
    p_min, p_max = p_range if p_range is not None else _range(p)
    if lo <= p_min and p_max <= hi:
        return 1.0
    return torch.minimum(p - (lo - 1), (hi + 1) - p).clamp_(0.0, 1.0)


def _range(p: torch.Tensor) -> Tuple[float, float]:
    lo, hi = torch.aminmax(p)
    return float(lo), float(hi)


def channels_at_positions(box: CaseBox, positions: Sequence[torch.Tensor], patch_shape: Sequence[int],
                          ranges: Optional[Sequence[Tuple[float, float]]] = None) -> torch.Tensor:
    """The augmented coordinate channels of ``coordinates.py`` (the same layout and meaning as the
    interpolated ones) from the positions at which the patch sampled the loader's box.

    positions: one tensor per trailing box axis (the axes the spatial transform resampled), in box
    voxels (0 = the box's first voxel), each broadcastable to ``patch_shape``. Leading box axes (2d
    configurations: the one slice; pseudo-2d augmentation: the slices) are carried voxel for voxel.
    Returns (channels, *leading box sizes, *patch_shape) float32: [z, y, x] * in_box, in_box,
    inside_case (``box.coordinates``), else [inside_case]. in_box and inside_case are the
    linear-interpolation weight on box and case voxels: per axis ``interpolation_share``, and their
    product over the axes, which is what interpolating the indicator of a box (separable) gives.
    ``ranges``: (min, max) of each of ``positions`` where known (else computed).
    """
    n_lead = len(box.lbs) - len(positions)
    sizes = [hi - lo for lo, hi in zip(box.lbs, box.ubs)]
    lead, k = sizes[:n_lead], len(patch_shape)
    in_box, inside = 1.0, 1.0
    for i, (d, p) in enumerate(zip(range(n_lead, len(sizes)), positions)):
        lo, size, p_range = box.lbs[d], box.case_shape[d], ranges[i] if ranges is not None else _range(p)
        in_box = in_box * interpolation_share(p, 0, sizes[d] - 1, p_range)
        inside = inside * interpolation_share(p, max(0, -lo), min(sizes[d], size - lo) - 1, p_range)
    # leading axes: voxel for voxel, inside the case or not (python numbers for the one slice of 2d)
    lead_inside, lead_coords = 1.0, []
    for d in range(n_lead):
        if sizes[d] == 1:
            z = float(box.lbs[d])
            lead_inside = lead_inside * float(0 <= z <= box.case_shape[d] - 1)
        else:
            view = [1] * (n_lead + k)
            view[d] = -1
            z = torch.arange(box.lbs[d], box.ubs[d], dtype=torch.float32).view(view)
            lead_inside = lead_inside * ((z >= 0) & (z <= box.case_shape[d] - 1)).float()
        lead_coords.append(z)

    def put(channel, value, weight, offset=0):  # channel = (value + offset) * weight, in place
        channel.fill_(value + offset) if isinstance(value, float) else channel.copy_(value)
        if offset and not isinstance(value, float):
            channel.add_(offset)
        if not isinstance(weight, float):  # a python weight is 1.0 (interpolation_share)
            channel.mul_(weight)

    out = torch.empty((box.channels, *lead, *patch_shape), dtype=torch.float32)
    put(out[-1], lead_inside, inside)
    if box.coordinates:
        for d, z in enumerate(lead_coords):
            put(out[d], z, in_box)
        for d, p in zip(range(n_lead, len(sizes)), positions):
            put(out[d], p, in_box, box.lbs[d])
        put(out[len(sizes)], 1.0, in_box)
    return out


class ExactCoordinateSpatialTransform(SpatialTransform):
    """batchgeneratorsv2's ``SpatialTransform`` that writes the exact coordinate channels.

    The parameters are drawn by ``SpatialTransform.get_parameters`` (the same random numbers, the
    same image and segmentation); for a sample carrying a ``CaseBox`` under ``CASE_BOX_KEY`` the
    ``regression_target`` it receives is a placeholder of the right shape (see the loader), and the
    channels are computed from the positions at which the image was sampled: the grid's positions
    un-normalised as ``grid_sample`` does (``align_corners`` honoured), or the integer crop at
    ``floor(centre) - patch // 2`` when neither rotation, scaling nor deformation was drawn. Samples
    without a ``CaseBox`` are transformed exactly as ``SpatialTransform`` does.
    """

    @classmethod
    def replacing(cls, transform: SpatialTransform) -> "ExactCoordinateSpatialTransform":
        """A copy of ``transform`` (all its settings) of this class."""
        new = copy.copy(transform)
        new.__class__ = cls
        return new

    def apply(self, data_dict, **params):
        box = data_dict.pop(CASE_BOX_KEY, None)
        if box is None:
            return super().apply(data_dict, **params)
        placeholder = data_dict.pop("regression_target", None)
        spatial = tuple(data_dict["image"].shape[1:])
        n_lead = len(box.lbs) - len(spatial)
        sizes = tuple(hi - lo for lo, hi in zip(box.lbs, box.ubs))
        stacked = box.channels * math.prod(sizes[:n_lead])
        if placeholder is None or sizes[n_lead:] != spatial or tuple(placeholder.shape) != (stacked, *spatial):
            raise RuntimeError(f"exact coordinates: the sample reached {type(self).__name__} with image "
                               f"{tuple(data_dict['image'].shape)} and regression_target "
                               f"{None if placeholder is None else tuple(placeholder.shape)}, which do not fit "
                               f"the loader's box {sizes} ({box.channels} channels)")
        data_dict = super().apply(data_dict, **params)
        patch = tuple(int(i) for i in self.patch_size)
        positions, ranges = self.sampled_positions(spatial, **params)
        out = channels_at_positions(box, positions, patch, ranges)
        data_dict["regression_target"] = out.reshape(stacked, *patch)
        return data_dict

    def sampled_positions(self, input_shape: Sequence[int], **params):
        """(per axis of the input, the input voxel positions at which the patch was sampled,
        broadcastable to the patch shape; their (min, max) per axis where known without a pass, else None)."""
        k = len(input_shape)
        if params["grid"] is None:  # the crop path of SpatialTransform._apply_to_image (crop_tensor)
            out, ranges = [], []
            for d, (c, size) in enumerate(zip(params["center_location_in_pixels"], self.patch_size)):
                view = [1] * k
                view[d] = -1
                start = math.floor(c) - int(size) // 2
                out.append(torch.arange(start, start + int(size), dtype=torch.float32).view(view))
                ranges.append((float(start), float(start + int(size) - 1)))
            return out, ranges
        grid = params["grid"]  # (*patch, k), last axis (x, y[, z]) in [-1, 1]
        out = []
        for d, size in enumerate(input_shape):
            g = grid[..., k - 1 - d]
            if self.align_corners:
                out.append((g + 1) * ((size - 1) / 2))
            else:
                out.append(g * (size / 2) + (size - 1) / 2)
        return out, None


def _leaves(transform, path=()):
    """(path of indices through nested ComposeTransforms, transform) in the order they run."""
    if type(transform) is ComposeTransforms:
        for i, t in enumerate(transform.transforms):
            yield from _leaves(t, path + (i,))
    else:
        yield path, transform


def _replaced(compose, path, new):
    """A copy of the nested ComposeTransforms ``compose`` with the transform at ``path`` replaced (the
    other transforms and the attributes of every level are shared with the original)."""
    out = copy.copy(compose)
    out.transforms = list(compose.transforms)
    out.transforms[path[0]] = new if len(path) == 1 else _replaced(compose.transforms[path[0]], path[1:], new)
    return out


def exact_coordinate_pipeline(transforms) -> Tuple[Optional[ComposeTransforms], str]:
    """(a copy of ``transforms`` whose SpatialTransform writes the exact coordinates, '') where the
    pipeline is one this module knows, else (None, why not).

    Known: ComposeTransforms (nested too) whose transforms up to the first SpatialTransform are
    ``Convert3DTo2DTransform`` (pseudo-2d augmentation) or none, that SpatialTransform exactly of
    batchgeneratorsv2's class (not a subclass, not wrapped), sampling the image linearly with zero
    or constant padding. The transforms after it see the same channels as on the interpolated path,
    whatever they are.
    """
    if type(transforms) is not ComposeTransforms:
        return None, f"the pipeline is a {type(transforms).__name__}, not a ComposeTransforms"
    for path, t in _leaves(transforms):
        if type(t) is Convert3DTo2DTransform:
            continue
        if type(t) is not SpatialTransform:
            return None, (f"{type(t).__name__} runs before (or instead of) batchgeneratorsv2's SpatialTransform")
        if t.mode_image != "bilinear" or t.padding_mode_image not in ("zeros", "constant"):
            return None, (f"its SpatialTransform samples with mode_image={t.mode_image!r}, "
                          f"padding_mode_image={t.padding_mode_image!r} (known: 'bilinear' with 'zeros'/'constant')")
        return _replaced(transforms, path, ExactCoordinateSpatialTransform.replacing(t)), ""
    return None, "it has no SpatialTransform"
