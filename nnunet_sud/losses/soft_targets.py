"""Soft Dice, KL and cross-entropy between a network's softmax and soft targets, masked to valid
voxels, and the sharpening of soft targets (temperature, argmax).

Used by SUD and temporal ensembling (Young et al., "SUD: Supervision by Denoising for Medical
Image Segmentation", 2023, eq. 7-8: lambda * D(z_n, f(u_n | Theta)) with z_n fixed), and, with
both arguments keeping their gradients, by DMNet's agreement of two decoders
(``losses/agreement.py``): ``soft_dice_loss`` is the package's one soft Dice.

Why not nnU-Net's ``SoftDiceLoss``: its form is the "plain" one below (with ``do_bg=False`` and
``ddp=False`` it gives the same number, tests/test_soft_dice.py), but SUD's default is the squared
form of eq. 15, which nnU-Net does not have, and one implementation of both forms keeps the
``_plainDice`` variants comparable with the default. Deep supervision goes through nnU-Net's
``DeepSupervisionWrapper`` (``trainers/sud.py``), with the targets downsampled here
(``downsample_targets``).
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F


DICE_FORMS = ("squared", "plain")


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
                   include_background: bool = False, batch_dice: bool = False,
                   smooth: float = 1e-5, form: str = "squared", detach_target: bool = True) -> torch.Tensor:
    """Soft Dice loss 1 - mean_c d_c between a softmax f and a soft target z, over valid voxels.

    ``form="squared"`` (default): SUD's Dice (Young et al., "SUD: Supervision by Denoising for
    Medical Image Segmentation", Appendix A, eq. 15; the V-Net Dice of Milletari et al.)

        d_c = (2 sum(m z f) + s) / (sum(m z^2) + sum(m f^2) + s)

    Its best f for a soft z is f = z (the gradient vanishes there): the segmenter regresses onto
    the soft target, which is what SUD's denoising step (eq. 8) assumes.

    ``form="plain"``: nnU-Net's soft Dice (tp = sum z f, fp = sum (1 - z) f, fn = sum z (1 - f),
    so 2 tp + fp + fn = sum z + sum f)

        d_c = (2 sum(m z f) + s) / (sum(m z) + sum(m f) + s)

    Its best f for a soft z is a thresholded z (f -> 1 where z is large enough, 0 elsewhere):
    hard pseudo-labels, not the soft target. Kept as a named variant (``_plainDice`` trainers); it
    is also DMNet's L_semi (two predictions, both with gradient: ``detach_target=False``).

    Args:
        probs:  (B, C, *S) softmax of the network (gradients flow through it).
        target: (B, C, *S) soft targets (constants unless ``detach_target`` is False).
        mask:   (B, *S) bool, voxels that count; None: all.
        include_background: count class 0 (nnU-Net's default for softmax outputs: no).
        batch_dice: sum over the batch before the ratio (nnU-Net's ``batch_dice`` of the plans).
        form: "squared" or "plain", see above.
        detach_target: treat ``target`` as a constant (SUD's fixed z); False: gradients flow into
            both arguments (DMNet: each decoder learns from the other).
    Returns:
        scalar loss in [0, 1].
    """
    if form not in DICE_FORMS:
        raise ValueError(f"soft Dice form {form!r}: use one of {DICE_FORMS}")
    target = (target.detach() if detach_target else target).to(probs.dtype)
    if not include_background:
        probs, target = probs[:, 1:], target[:, 1:]
    if mask is not None:
        m = mask[:, None].to(probs.dtype)
        probs, target = probs * m, target * m
    axes = tuple(range(2, probs.ndim))
    if batch_dice:
        axes = (0,) + axes
    inter = (probs * target).sum(axes)
    if form == "squared":
        denom = (probs * probs).sum(axes) + (target * target).sum(axes)
    else:
        denom = probs.sum(axes) + target.sum(axes)
    dice = (2 * inter + smooth) / (denom + smooth).clamp(min=1e-8)
    return 1 - dice.mean()


def soft_kl_loss(log_probs: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
                 eps: float = 1e-6) -> torch.Tensor:
    """Mean over valid voxels of KL(z || f) = sum_c z_c (log z_c - log f_c), all classes (background
    included).

    Args:
        log_probs: (B, C, *S) log-softmax of the network.
        target:    (B, C, *S) soft targets (constants).
        mask:      (B, *S) bool or None.
    """
    z = target.detach().to(log_probs.dtype).clamp(min=0)
    kl = (z * (torch.log(z + eps) - log_probs)).sum(1)  # (B, *S)
    return masked_voxel_mean(kl, mask)


def soft_cross_entropy(log_probs: torch.Tensor, target: torch.Tensor,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over valid voxels of the soft cross-entropy -sum_c z_c log f_c, all classes (background
    included). It differs from ``soft_kl_loss`` by the entropy of z, a constant in f: the same
    gradient, but 0 is not its minimum (H(z) is).

    Args:
        log_probs: (B, C, *S) log-softmax of the network.
        target:    (B, C, *S) soft targets (constants).
        mask:      (B, *S) bool or None.
    """
    z = target.detach().to(log_probs.dtype)
    return masked_voxel_mean(-(z * log_probs).sum(1), mask)


def masked_voxel_mean(values: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of per-voxel ``values`` (B, *S) over the voxels of ``mask`` (B, *S) bool (None: all; none
    valid: 0)."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1)


def sharpen_targets(target: torch.Tensor, temperature: float) -> torch.Tensor:
    """z^(1/T) / sum_c z_c^(1/T) for soft targets z (B, C, *S); T = 1 returns z itself. The argmax is
    kept; T < 1 sharpens, T > 1 flattens."""
    if temperature == 1:
        return target
    powered = target.clamp(min=0) ** (1.0 / temperature)
    return powered / powered.sum(1, keepdim=True).clamp(min=torch.finfo(powered.dtype).tiny)


def hard_targets(target: torch.Tensor) -> torch.Tensor:
    """One-hot (B, C, *S) of argmax_c z_c: the soft target as a hard label (ties: the lowest class)."""
    return torch.zeros_like(target).scatter_(1, target.argmax(1, keepdim=True), 1.0)


def downsample_targets(target: torch.Tensor, mask: torch.Tensor, shapes: Sequence[Sequence[int]]):
    """Soft targets and masks at the resolutions of deep-supervision outputs.

    target (B, C, *S) -> area-averaged (B, C, *s); mask (B, *S) -> valid only where every voxel it
    covers is valid (min pooling), for each s in ``shapes``.
    """
    out: List = []
    for s in shapes:
        s = tuple(int(i) for i in s)
        if s == tuple(target.shape[2:]):
            out.append((target, mask))
            continue
        t = F.adaptive_avg_pool3d(target, s) if target.ndim == 5 else F.adaptive_avg_pool2d(target, s)
        inv = (~mask)[:, None].float()
        inv = F.adaptive_max_pool3d(inv, s) if target.ndim == 5 else F.adaptive_max_pool2d(inv, s)
        out.append((t, inv[:, 0] == 0))
    return out
