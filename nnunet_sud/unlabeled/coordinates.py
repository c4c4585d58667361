"""The map from augmented patch voxels to case voxels.

nnU-Net's loader crops a box of the (preprocessed) case, padding outside the case, and the
training augmentation then rotates/scales (``grid_sample``, linear), crops to the final patch
and mirrors. We carry the case coordinates of every voxel of the loader's box through that
same pipeline as ``regression_target`` channels: SpatialTransform resamples them with the image
(linear interpolation of a linear field is exact), MirrorTransform flips them, intensity
transforms leave them alone.

Two more channels make this exact at the borders. ``grid_sample`` pads with zeros outside the
loader's box, which would pull interpolated coordinates towards 0 near the box edge; a channel
of ones over the box interpolates to the weight that fell inside the box, and dividing by it
turns the coordinates back into a weighted mean of in-box voxel coordinates (error below
(1 - that weight) voxels). An inside-the-case channel (1 in the case, 0 where the loader pads)
marks a voxel *valid* when it stays above ``VALID_THRESHOLD``: every input voxel that
contributed lay inside the case (and hence inside the box).

Shapes (nnU-Net stores every case as (C, Z, Y, X), also for 2d configurations):
    coordinate channels before augmentation: (5, *box)  [z, y, x, in_box, inside_case]
    after augmentation:    coords (3, *patch) float32 case voxel coordinates (z, y, x)
                           valid  (*patch) bool
    2d configurations: patch is (Y, X); coords still hold (z, y, x), z constant per sample.
"""
from typing import Sequence, Tuple

import torch

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
