"""Consistency losses and voxel-wise uncertainty of the mean-teacher family.

Notation (all tensors are probabilities, not logits):
    p_s    (B, C, *spatial)  student softmax on the unlabeled patch
    p_t    (B, C, *spatial)  teacher softmax on the perturbed patch (a constant: no gradient)
    p_hat  (B, C, *spatial)  denoised teacher prediction DAE(p_t)              (DAE-MT §2.3)
    w      (B, *spatial)     per-voxel weight or mask of the consistency term
    U      (B, *spatial)     per-voxel uncertainty

Squared distance per voxel, ``d_v = reduce_c (p_s,v,c - p_t,v,c)^2`` with ``reduce_c`` either the
sum over classes (``||p_s,v - p_t,v||^2`` as written in DAE-MT §2.3) or the mean over classes
(what the mean-teacher and UA-MT reference implementations compute: an element-wise MSE of the
two softmaxes, averaged over classes and voxels).

Weighted consistency (DAE-MT: Adiga Vasudeva, Dolz, Lombaert, "Leveraging Labeling Representations
in Uncertainty-based Semi-supervised Segmentation", MICCAI 2022, §2.3; UA-MT, Yu et al. MICCAI 2019,
with a binary mask):

    L_c = sum_v w_v d_v / sum_v w_v                                   (sums over batch and voxels)

Uncertainty measures:
    entropy of a prediction     H(p)_v = - sum_c p_v,c log(p_v,c + 1e-6)   (UA-MT, 1e-6 as there)
    Monte-Carlo uncertainty     H(mean_k p^(k))_v over K stochastic passes  (UA-MT)
    DAE uncertainty             U_v = ||p_hat_v - p_t_v||^2 = sum_c (p_hat - p_t)^2   (DAE-MT)
    reliability weight          w_v = exp(-kappa U_v)                           (DAE-MT, kappa = 1)
"""
import math
from typing import Optional

import torch

ENTROPY_EPS = 1e-6
"""Inside the log of the entropy, as in the UA-MT reference implementation."""

_CLASS_REDUCTIONS = ("sum", "mean")


def squared_distance(p_s: torch.Tensor, p_t: torch.Tensor, class_reduction: str = "sum") -> torch.Tensor:
    """Per-voxel squared distance of two probability maps.

    Args:
        p_s: (B, C, *spatial) student probabilities (gradient flows through it).
        p_t: (B, C, *spatial) teacher probabilities (used as a constant, detached here).
        class_reduction: 'sum' -> ||p_s - p_t||^2 per voxel; 'mean' -> that divided by C.
    Returns:
        (B, *spatial) float32.
    """
    if class_reduction not in _CLASS_REDUCTIONS:
        raise ValueError(f"class_reduction must be one of {_CLASS_REDUCTIONS}, got {class_reduction!r}")
    if p_s.shape != p_t.shape:
        raise ValueError(f"student and teacher maps differ in shape: {tuple(p_s.shape)} vs {tuple(p_t.shape)}")
    sq = (p_s.float() - p_t.detach().float()) ** 2
    return sq.sum(1) if class_reduction == "sum" else sq.mean(1)


def weighted_consistency(p_s: torch.Tensor, p_t: torch.Tensor, weight: Optional[torch.Tensor] = None,
                         class_reduction: str = "sum", eps: float = 1e-16) -> torch.Tensor:
    """``sum_v w_v d_v / sum_v w_v`` (DAE-MT, eq. of §2.3; UA-MT's masked MSE for a 0/1 ``w``).

    Args:
        p_s: (B, C, *spatial) student probabilities.
        p_t: (B, C, *spatial) teacher probabilities (no gradient).
        weight: (B, *spatial) or (B, 1, *spatial) non-negative weights (no gradient); None: all ones,
            i.e. the plain mean-teacher consistency (mean of d_v over voxels).
        class_reduction: see ``squared_distance``.
        eps: added to the denominator (an all-zero mask gives a zero loss, as in UA-MT's code).
    Returns:
        Scalar tensor.
    """
    d = squared_distance(p_s, p_t, class_reduction)
    if weight is None:
        return d.mean()
    w = weight.detach().float()
    if w.ndim == d.ndim + 1 and w.shape[1] == 1:
        w = w[:, 0]
    if w.shape != d.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not fit the maps {tuple(p_s.shape)}")
    return (w * d).sum() / (w.sum() + eps)


def entropy(p: torch.Tensor, eps: float = ENTROPY_EPS) -> torch.Tensor:
    """Per-voxel entropy ``-sum_c p_c log(p_c + eps)`` (natural log, so at most ln C).

    Args:
        p: (B, C, *spatial) probabilities.
    Returns:
        (B, *spatial) float32.
    """
    p = p.float()
    return -(p * torch.log(p + eps)).sum(1)


def mc_entropy(p_k: torch.Tensor, eps: float = ENTROPY_EPS) -> torch.Tensor:
    """UA-MT's uncertainty: entropy of the mean of K stochastic predictions.

    Args:
        p_k: (K, B, C, *spatial) probabilities of K passes.
    Returns:
        (B, *spatial): ``H(mean_k p_k)``, 0 where all passes agree on a one-hot prediction,
        ln C where their mean is uniform.
    """
    return entropy(p_k.float().mean(0), eps)


def dae_uncertainty(p_hat: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """DAE-MT §2.3: ``U_v = ||p_hat_v - p_t_v||^2`` (sum over classes), in [0, 2].

    Args:
        p_hat: (B, C, *spatial) the denoiser's reconstruction of the teacher prediction.
        p_t: (B, C, *spatial) the teacher prediction.
    Returns:
        (B, *spatial) float32.
    """
    return ((p_hat.float() - p_t.float()) ** 2).sum(1)


def exp_reliability(uncertainty: torch.Tensor, kappa: float = 1.0) -> torch.Tensor:
    """DAE-MT §2.3 (after URPC): the weight ``exp(-kappa U)`` of each voxel, in (0, 1]."""
    return torch.exp(-float(kappa) * uncertainty.float())


def threshold_mask(uncertainty: torch.Tensor, threshold: float) -> torch.Tensor:
    """UA-MT: 1 where ``U < threshold`` (reliable), 0 elsewhere; float32, same shape as ``U``."""
    return (uncertainty < threshold).float()


def masked_mean(x: torch.Tensor, where: torch.Tensor) -> float:
    """Mean of ``x`` (B, *spatial) over the voxels where ``where`` (B, *spatial, bool) is True; 0 if none."""
    n = int(where.sum())
    return float(x.float()[where].sum() / n) if n else 0.0


def max_entropy(num_classes: int) -> float:
    """ln C, the entropy of the uniform distribution over C classes."""
    return math.log(num_classes)
