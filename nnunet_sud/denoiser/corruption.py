"""Label-map corruption for training the denoiser, and applying a trained denoiser.

SUD (Young et al., "SUD: Supervision by Denoising for Medical Image Segmentation",
2022) §3.4, "Learning Denoisers":

    "we log-transform the given one-hot label (segmentation) maps, clip them to a [-3, 0]
    range (-3 and 0 corresponding to the probabilities of 0 and 1 respectively), corrupt them
    using additive Gaussian noise of zero mean and random standard deviation sigma, then finally
    take their softmax. To generate noise across multiple scales, we randomly downsample
    produced Gaussian noise map by s and upsample it to the original scale."
    (sigma, s in [0, 8] for Table 1; Fig. 8 shows the effect of both.)

So, per sample ``b`` with its own ``sigma_b`` and ``s_b``:

    x_b     = softmax_c( clip(log(y_b), -3, 0) + sigma_b * up(n_b) ),   n_b ~ N(0, 1) on a coarse grid

How the scale ``s`` maps to the noise grid (the paper leaves this open; our convention):
    ``s`` is the spacing, in voxels of the map being corrupted, between independent noise
    values. For a map of spatial size ``(n_1, ..., n_d)`` the noise is drawn on a grid of
    ``g_i = max(1, ceil(n_i / s))`` points per axis and upsampled to ``(n_1, ..., n_d)`` by
    (bi/tri)linear interpolation with ``align_corners=True``, then divided by the interpolation's
    own standard deviation at each voxel (a linear blend of independent nodes has a lower
    variance than the nodes: 1/2 midway between two nodes, 1/8 at the centre of a 3d cell). So
    every voxel's noise has standard deviation exactly ``sigma`` whatever ``s``: ``sigma`` sets
    the magnitude, ``s`` only the spatial correlation (about ``s`` voxels), as Fig. 8 of the
    paper describes. ``s <= 1`` means per-voxel (white) noise. Because ``s`` is in voxels, the
    same ``s`` gives the same correlation length on a patch and on a whole case. The noise is
    independent per class channel. ``interpolation='nearest'`` gives blocky noise instead.

Parameters are drawn apart from their application (batchgeneratorsv2 style):
``LabelMapCorruption.get_parameters(batch_size)`` draws ``{'sigma': (B,), 'scale': (B,)}``,
``LabelMapCorruption.apply(x, **params)`` applies them, ``__call__`` does both.

``sigma = 0`` returns ``softmax(clip(log(x)))``: for a map whose probabilities are all at least
``exp(-3)`` this is the input itself; for a one-hot map it is the "clean" encoding the
denoiser sees at ``sigma = 0`` (each voxel's label keeps probability ``1 / (1 + (C-1) e^-3)``,
0.87 for C = 4; the argmax is unchanged).

``apply_denoiser`` feeds a trained denoiser the same encoding without noise (log -> clip ->
softmax), so train and test inputs come from the same family.
"""
import math
import zlib
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

LOG_CLIP_MIN = -3.0
"""Lower clip of the log-probabilities (paper: -3 stands for probability 0)."""

Range = Union[float, int, Tuple[float, float], Sequence[float]]
SIGMA_DISTRIBUTIONS = ("uniform", "squared")


def log_clip(probs: torch.Tensor, low: float = LOG_CLIP_MIN) -> torch.Tensor:
    """``clip(log(probs), low, 0)`` without ever forming ``log(0)``.

    Args:
        probs: (B, C, *spatial) probabilities (one-hot or softmax); any float dtype.
    Returns:
        Tensor of the same shape with values in [low, 0].
    """
    return torch.log(probs.clamp_min(math.exp(low))).clamp(low, 0.0)


def _as_range(r: Range, name: str) -> Tuple[float, float]:
    if isinstance(r, (int, float)):
        lo = hi = float(r)
    else:
        if len(r) != 2:
            raise ValueError(f"{name} must be a number or a (min, max) pair, got {r!r}")
        lo, hi = float(r[0]), float(r[1])
    if lo < 0 or hi < lo:
        raise ValueError(f"{name} must satisfy 0 <= min <= max, got {r!r}")
    return lo, hi


def noise_grid_shape(spatial_shape: Sequence[int], scale: float) -> Tuple[int, ...]:
    """Grid on which noise of scale ``scale`` is drawn: ``max(1, ceil(n / s))`` per axis; ``s <= 1``: full size."""
    if scale <= 1:
        return tuple(int(n) for n in spatial_shape)
    return tuple(max(1, int(math.ceil(n / scale))) for n in spatial_shape)


def _linear_interpolation_std(grid: Sequence[int], spatial: Sequence[int], device) -> torch.Tensor:
    """Std of (multi)linearly interpolated unit white noise at each output voxel, (*spatial).

    With ``align_corners=True`` output voxel ``j`` of an axis sits at grid coordinate
    ``x = j (g - 1) / (n - 1)``; its value blends the two nodes around it with weights
    ``(1 - t, t)``, ``t = x - floor(x)``, so its variance is ``(1 - t)^2 + t^2`` per axis, and
    the product over axes for separable interpolation.
    """
    std = torch.ones((), device=device)
    for ax, (g, n) in enumerate(zip(grid, spatial)):
        if g == 1 or n == 1:
            var = torch.ones(n, device=device)
        else:
            x = torch.arange(n, device=device, dtype=torch.float64) * (g - 1) / (n - 1)
            t = (x - torch.floor(x)).float()
            var = (1 - t) ** 2 + t ** 2
        shape = [1] * len(spatial)
        shape[ax] = n
        std = std * var.sqrt().view(shape)
    return std


def coarse_gaussian_noise(shape: Sequence[int], scale: float, generator: Optional[torch.Generator] = None,
                          device: Union[str, torch.device, None] = None, dtype: torch.dtype = torch.float32,
                          interpolation: str = "linear") -> torch.Tensor:
    """Unit-variance Gaussian noise drawn on the coarse grid of ``scale`` and upsampled to ``shape``.

    Args:
        shape: (C, *spatial), the noise for one sample (2 or 3 spatial axes).
        scale: the paper's s (see module doc); ``<= 1`` gives per-voxel noise.
        generator: optional torch.Generator (its device is where the noise is drawn).
    Returns:
        (C, *spatial) tensor on ``device``.
    """
    c, spatial = int(shape[0]), tuple(int(s) for s in shape[1:])
    grid = noise_grid_shape(spatial, scale)
    gen_device = generator.device if generator is not None else device
    noise = torch.randn((1, c, *grid), generator=generator, device=gen_device, dtype=torch.float32)
    if grid != spatial:
        if interpolation == "linear":
            mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
            noise = F.interpolate(noise, size=spatial, mode=mode, align_corners=True)
            noise = noise / _linear_interpolation_std(grid, spatial, noise.device)
        elif interpolation == "nearest":
            noise = F.interpolate(noise, size=spatial, mode="nearest")
        else:
            raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    return noise[0].to(device=device, dtype=dtype)


def corrupt_probabilities(x: torch.Tensor, sigma: Union[torch.Tensor, Sequence[float], float],
                          scale: Union[torch.Tensor, Sequence[float], float],
                          generator: Optional[torch.Generator] = None, interpolation: str = "linear",
                          log_min: float = LOG_CLIP_MIN) -> torch.Tensor:
    """``softmax(clip(log x, log_min, 0) + sigma * noise_at_scale)`` per sample (SUD §3.4).

    Args:
        x: (B, C, *spatial) one-hot or probability map.
        sigma: noise standard deviation per sample, (B,) or a scalar for all.
        scale: noise scale s per sample, (B,) or a scalar for all.
    Returns:
        (B, C, *spatial) probabilities (softmax over C), dtype float32.
    """
    b = x.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float32).flatten().cpu()
    scale = torch.as_tensor(scale, dtype=torch.float32).flatten().cpu()
    if sigma.numel() == 1:
        sigma = sigma.expand(b)
    if scale.numel() == 1:
        scale = scale.expand(b)
    if sigma.numel() != b or scale.numel() != b:
        raise ValueError(f"need one sigma and one scale per sample (batch {b}), got {sigma.numel()} and {scale.numel()}")
    logits = log_clip(x.float(), log_min)
    noisy = []
    for i in range(b):
        s_i = float(sigma[i])
        if s_i == 0:
            noisy.append(logits[i])
            continue
        n = coarse_gaussian_noise(logits.shape[1:], float(scale[i]), generator, logits.device, logits.dtype,
                                  interpolation)
        noisy.append(logits[i] + s_i * n)
    return torch.softmax(torch.stack(noisy), 1)


class LabelMapCorruption:
    """Random label-map corruption of SUD §3.4 with per-sample ``sigma`` and ``s``.

    Args:
        sigma: noise standard deviation, a number or a (min, max) range sampled uniformly per
            sample. Paper: [0, 8].
        scale: noise scale s (grid spacing in voxels, see module doc), number or (min, max).
            Paper: [0, 8].
        interpolation: 'linear' (smooth, default) or 'nearest' (blocky) upsampling of the noise.
        log_min: lower clip of the log-probabilities (paper: -3).
        sigma_distribution: how ``sigma`` is drawn from its range ``[lo, hi]``: 'uniform' (the paper)
            or 'squared' (``lo + (hi - lo) u^2``, u uniform: density falling with sigma, half the
            samples in the lowest quarter of the range -- more nearly clean maps).

    Usage::

        corrupt = LabelMapCorruption((0, 8), (0, 8))
        params = corrupt.get_parameters(onehot.shape[0])        # {'sigma': (B,), 'scale': (B,)}
        noisy = corrupt.apply(onehot, **params)                  # (B, C, *spatial) softmax
        noisy = corrupt(onehot)                                   # both steps
    """

    def __init__(self, sigma: Range = (0.0, 8.0), scale: Range = (0.0, 8.0), interpolation: str = "linear",
                 log_min: float = LOG_CLIP_MIN, sigma_distribution: str = "uniform"):
        self.sigma = _as_range(sigma, "sigma")
        self.scale = _as_range(scale, "scale")
        if sigma_distribution not in SIGMA_DISTRIBUTIONS:
            raise ValueError(f"sigma_distribution must be one of {SIGMA_DISTRIBUTIONS}, got {sigma_distribution!r}")
        self.sigma_distribution = sigma_distribution
        if interpolation not in ("linear", "nearest"):
            raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
        self.interpolation = interpolation
        self.log_min = float(log_min)

    def get_parameters(self, batch_size: int, generator: Optional[torch.Generator] = None) -> dict:
        """Draw ``sigma`` and ``scale`` (each a float tensor of shape (batch_size,), on the CPU)."""
        def draw(lo, hi, power=1):
            u = torch.rand(batch_size, generator=generator, device=generator.device if generator else None)
            return (lo + (hi - lo) * u ** power).float().cpu()
        sigma = draw(*self.sigma, power=2 if self.sigma_distribution == "squared" else 1)
        return {"sigma": sigma, "scale": draw(*self.scale)}

    def apply(self, x: torch.Tensor, sigma, scale, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Corrupt ``x`` (B, C, *spatial) with the given per-sample parameters; returns softmax probabilities."""
        return corrupt_probabilities(x, sigma, scale, generator, self.interpolation, self.log_min)

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.apply(x, generator=generator, **self.get_parameters(x.shape[0], generator))

    def __repr__(self):
        return (f"{type(self).__name__}(sigma={self.sigma}, scale={self.scale}, "
                f"interpolation={self.interpolation!r}, log_min={self.log_min}, "
                f"sigma_distribution={self.sigma_distribution!r})")


def denoiser_input(probs: torch.Tensor, log_min: float = LOG_CLIP_MIN) -> torch.Tensor:
    """The noise-free denoiser encoding of a probability map: ``softmax(clip(log p, log_min, 0))``.

    Args:
        probs: (B, C, *spatial) probabilities (e.g. a segmenter's softmax).
    Returns:
        (B, C, *spatial) float32 probabilities.
    """
    return torch.softmax(log_clip(probs.float(), log_min), 1)


@torch.no_grad()
def apply_denoiser(denoiser: torch.nn.Module, probs: torch.Tensor, log_min: float = LOG_CLIP_MIN) -> torch.Tensor:
    """Denoise a segmenter's softmax: log -> clip to [log_min, 0] -> (softmax) -> denoiser -> softmax.

    This is ``a(f)`` of SUD eq. 8. It runs under ``torch.no_grad()`` and on a detached input,
    so no gradient reaches the segmenter (the soft target is a constant). The clipped logs are
    turned back into probabilities before the denoiser because that is what it was trained on
    (``LabelMapCorruption`` ends with a softmax); for maps with all probabilities >= e^-3 this
    is the input itself.

    Args:
        denoiser: a trained label denoiser (e.g. from ``nnunet_sud.denoiser.loading.load_denoiser``);
            if it returns a deep-supervision list, the full-resolution entry is used.
        probs: (B, C, *patch) softmax of the segmenter, C = the denoiser's number of classes.
    Returns:
        (B, C, *patch) float32 probabilities of the denoised map.
    """
    out = denoiser(denoiser_input(probs.detach(), log_min))
    if isinstance(out, (list, tuple)):
        out = out[0]
    return torch.softmax(out.float(), 1)


def stable_seed(*parts) -> int:
    """A seed that is the same across processes and runs for the same parts (str/int/float)."""
    return zlib.crc32("|".join(map(str, parts)).encode()) & 0x7FFFFFFF
