"""Losses that make two predictions of the same unlabeled image agree (DMNet: Fang & Li,
MICCAI 2020).

Fang & Li, "DMNet: Difference Minimization Network for Semi-supervised Segmentation in Medical
Images" (MICCAI 2020), §3.2-3.3:

    Sharpen(Y_hat, T)_c = Y_hat_c^(1/T) / sum_k Y_hat_k^(1/T),   T in (0, 1)          (§3.2)
    L_semi(U) = 1 - (1/K) sum_k  2 sum_hw Y1_hwk Y2_hwk / sum_hw (Y1_hwk + Y2_hwk)     (§3.3)

with Y1, Y2 the sharpened soft masks of the two decoders. Gradients flow through *both* masks
("the loss can be backpropagated through two terms"): each decoder learns from the other.
L_semi is the package's soft Dice (``losses/soft_targets.soft_dice_loss``) in its plain form, over
all classes, with gradients into both arguments.
"""
from typing import Optional

import torch

from nnunet_sud.losses.soft_targets import soft_dice_loss


def sharpen(probs: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Sharpen(p, T) = p^(1/T) / sum_c p_c^(1/T) over the class axis (MixMatch's sharpening).

    Args:
        probs: (B, C, *S) probabilities (softmax over C).
        temperature: T in (0, 1] (T = 1: unchanged; T -> 0: one-hot of the argmax). DMNet: 0.5.
    Returns:
        (B, C, *S) float32 probabilities, differentiable.
    """
    if not 0 < temperature <= 1:
        raise ValueError(f"sharpening temperature must be in (0, 1], got {temperature}")
    p = probs.float()
    if temperature == 1:
        return p
    # p^(1/T) / sum p^(1/T) = softmax(log(p) / T): no underflow of p^(1/T) for small p
    return torch.softmax(torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)) / temperature, 1)


def dice_difference_loss(p1: torch.Tensor, p2: torch.Tensor, mask: Optional[torch.Tensor] = None,
                         include_background: bool = True, smooth: float = 1e-5) -> torch.Tensor:
    """DMNet's L_semi: 1 - mean over samples and classes of 2 sum(p1 p2) / (sum p1 + sum p2)
    (``soft_dice_loss(p1, p2, form="plain", include_background=True, detach_target=False)``).

    Args:
        p1, p2: (B, C, *S) soft masks of the two decoders (both keep their gradients).
        mask: (B, *S) bool, voxels that count (e.g. ``batch_u['valid']``); None: all.
        include_background: average over all K classes as the paper's 1/K sum_k (default) or
            over foreground classes only.
        smooth: added to numerator and denominator (nnU-Net's 1e-5), so empty classes count as
            agreement.
    Returns:
        scalar in [0, 1]; 0 when p1 = p2 is one-hot.
    """
    return soft_dice_loss(p1.float(), p2.float(), mask, include_background=include_background, smooth=smooth,
                          form="plain", detach_target=False)
