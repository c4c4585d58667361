"""Which pseudo-labels count, and the cross-entropy on them (SegMatch: Motaghi et al.,
"SegMatch: Semi-supervised semantic segmentation"; FixMatch).

SegMatch §3.3: the pseudo mask of an unlabeled image is Y_hat = argmax of the prediction on its
weak view; a gate decides where it is used. The four gates of the paper, each returning a
(B, *S) float mask m in {0, 1} (1 = this voxel's pseudo-label is used):

    discriminator     m_b = [D(x_b, Y_hat_b) > tau]                 per sample (SegMatch)
    identity          m = 1                                        consistency loss only
    mean confidence   m_b = [mean_v max_c p_bcv > tau]              per sample (FixMatch for
                                                                   segmentation: "the mean
                                                                   confidence over the mask")
    confidence map    m_bv = [max_c p_bcv > tau]                   per voxel

Voxels outside ``valid`` (padding of the unlabeled patch) never count and are left out of the
mean confidence.

Loss (Algorithm 1, line 6): L_u = (1 / mu B) sum_b 1{Y_hat_b} H(M(T2(x_b)), Y_hat_b), i.e. the
gated cross-entropy normalised by *all* samples, gated or not (FixMatch). Per voxel:

    L_u = sum_{b,v} m_bv valid_bv CE_bv / sum_{b,v} valid_bv
"""
from typing import Optional

import torch
import torch.nn.functional as F


def _broadcast_sample_gate(gate: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, *S) shaped like ``like`` (B, *S)."""
    return gate.view(-1, *([1] * (like.ndim - 1))).expand_as(like).float()


def identity_gate(probs: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Every pseudo-label is used. probs (B, C, *S) -> (B, *S) ones."""
    return torch.ones_like(probs[:, 0], dtype=torch.float32)


def mean_confidence_gate(probs: torch.Tensor, tau: float, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FixMatch per sample: use sample b iff the mean over its (valid) voxels of max_c p > tau.

    probs (B, C, *S), valid (B, *S) bool or None -> (B, *S) float mask.
    """
    conf = probs.float().amax(1)
    if valid is None:
        mean = conf.flatten(1).mean(1)
    else:
        v = valid.to(conf.dtype)
        mean = (conf * v).flatten(1).sum(1) / v.flatten(1).sum(1).clamp_min(1.0)
    return _broadcast_sample_gate(mean > tau, conf)


def confidence_map_gate(probs: torch.Tensor, tau: float, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per voxel: use voxel v iff max_c p_v > tau. probs (B, C, *S) -> (B, *S) float mask."""
    return (probs.float().amax(1) > tau).float()


def score_gate(scores: torch.Tensor, tau: float, like: torch.Tensor) -> torch.Tensor:
    """SegMatch's discriminator gate: use sample b iff its score D_b > tau.

    Args:
        scores: (B,) discriminator probabilities sigmoid(logits) in [0, 1].
        like: (B, *S) tensor giving the output shape (e.g. the pseudo-label map).
    Returns:
        (B, *S) float mask.
    """
    return _broadcast_sample_gate(scores > tau, like)


def gated_cross_entropy(logits: torch.Tensor, pseudo_labels: torch.Tensor, gate: torch.Tensor,
                        valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum m valid CE(logits, Y_hat) / sum valid   (see module doc).

    Args:
        logits: (B, C, *S) network logits on the strong view (with gradient).
        pseudo_labels: (B, *S) int64 class indices Y_hat (constants).
        gate: (B, *S) float mask m in [0, 1].
        valid: (B, *S) bool or None (all voxels).
    Returns:
        scalar; 0 (with graph) when nothing is gated in.
    """
    ce = F.cross_entropy(logits.float(), pseudo_labels.long(), reduction="none")  # (B, *S)
    v = torch.ones_like(ce) if valid is None else valid.to(ce.dtype)
    return (ce * gate.to(ce.dtype) * v).sum() / v.sum().clamp_min(1.0)
