"""Adversarial losses of SegMatch (Motaghi et al., "SegMatch: Semi-supervised semantic
segmentation") and DMNet (Fang & Li, MICCAI 2020), on discriminator *logits*.

Discriminators here output logits a; D = sigmoid(a). All terms are written with
``logsigmoid``/``binary_cross_entropy_with_logits`` (log D = logsigmoid(a),
log(1 - D) = logsigmoid(-a)), which is exact and stable in float16/AMP.

SegMatch, eq. 1 (D judges whether a mask fits an image; labeled pairs are "informative"):

    L_D = sum_{(x_l, y_l)} log(1 - D(x_l, y_l)) + sum_{x_u} log D(x_u, M(x_u))

Taken literally (minimised) this is unbounded below: log(1 - D) -> -inf as D -> 1 (the logit
goes to +inf linearly). Its minimiser direction is D(x_l, y_l) -> 1 and D(x_u, M(x_u)) -> 0, which
is also what the gating D(x, y) > tau needs (a high score = "looks like a ground-truth pair").
We implement the bounded, non-saturating form of the same classifier, binary cross-entropy with
labeled pairs as class 1 and (image, prediction) pairs as class 0:

    L_D = - mean_l log D(x_l, y_l) - mean_u log(1 - D(x_u, M(x_u)))

(means instead of sums, so the weight of each set does not depend on the batch sizes). Which
images the predicted pairs come from is the trainer's choice (``nnUNetTrainerSegMatch``'s
``discriminator_negatives``: by default the labeled images' own predictions, x_u -> x_l above).

DMNet, §3.4 (an FCN discriminator on masks only, one output per voxel; 1/0 = ground truth /
prediction):

    L_dis = L_bce(D(Y1), 0) + L_bce(D(Y2), 0) + L_bce(D(Y), 1)   (the last term on labeled data only)
    L_adv = L_bce(D(Y1), 1) + L_bce(D(Y2), 1)                    (labeled and unlabeled data)

L_bce is the paper's sum over pixels; here the mean over (valid) voxels, so lambda1 does not
scale with the patch size.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def masked_bce_with_logits(logits: torch.Tensor, target: float, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean binary cross-entropy of ``logits`` against the constant ``target`` (0 or 1).

    Args:
        logits: (B, ...) discriminator logits, e.g. (B,) or (B, 1, *S).
        target: the label every element should have.
        mask: None, or a bool tensor broadcastable to ``logits`` (e.g. (B, 1, *S)): elements
            that count. With a mask the mean runs over the masked elements only.
    Returns:
        scalar float32.
    """
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(target)), reduction="none")
    if mask is None:
        return bce.mean()
    m = mask.to(bce.dtype).expand_as(bce)
    return (bce * m).sum() / m.sum().clamp_min(1.0)


def segmatch_discriminator_loss(logits_truth: torch.Tensor, logits_predicted: torch.Tensor,
                                weights: Sequence[float] = (1.0, 1.0)) -> torch.Tensor:
    """SegMatch eq. 1 as binary cross-entropy: (image, ground truth) pairs -> 1, (image, predicted
    mask) pairs -> 0.

    Args:
        logits_truth: (B_t,) discriminator logits of labeled (image, ground truth) pairs.
        logits_predicted: (B_p,) logits of (image, predicted mask) pairs (eq. 1: unlabeled images;
            ``nnUNetTrainerSegMatch`` by default: the labeled images' own predictions).
        weights: factors of the two means (under DDP: ``union_mean_weights`` of the set sizes).
    Returns:
        scalar: - w_0 mean log D(x, y) - w_1 mean log(1 - D(x, M(x))); an empty set contributes 0
        (both empty: 0 with the graph of the inputs, so a backward still reaches every parameter).
    """
    terms = [w * masked_bce_with_logits(a, t)
             for a, t, w in ((logits_truth, 1.0, weights[0]), (logits_predicted, 0.0, weights[1])) if a.numel()]
    return sum(terms) if terms else (logits_truth.sum() + logits_predicted.sum()).float() * 0


def dmnet_discriminator_loss(logits_predicted: Sequence[torch.Tensor],
                             logits_ground_truth: Optional[torch.Tensor] = None,
                             masks: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
    """DMNet's L_dis: every predicted mask -> 0, the ground truth (if given) -> 1.

    Args:
        logits_predicted: D's logits (B, 1, *S) for each predicted mask (Y1, Y2; detached inputs).
        logits_ground_truth: D's logits (B, 1, *S) for the one-hot ground truth Y, or None
            (unlabeled data: the term is left out, as in the paper).
        masks: per entry of ``logits_predicted``, None or a (B, 1, *S) bool mask of valid voxels.
    Returns:
        scalar: sum_i L_bce(D(Y_i), 0) [+ L_bce(D(Y), 1)].
    """
    masks = masks if masks is not None else [None] * len(logits_predicted)
    loss = sum(masked_bce_with_logits(a, 0.0, m) for a, m in zip(logits_predicted, masks))
    if logits_ground_truth is not None:
        loss = loss + masked_bce_with_logits(logits_ground_truth, 1.0)
    return loss


def dmnet_adversarial_loss(logits_predicted: Sequence[torch.Tensor],
                           masks: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
    """DMNet's L_adv for the segmenter: sum_i L_bce(D(Y_i), 1) (fool D into "ground truth").

    Args:
        logits_predicted: D's logits (B, 1, *S) for each predicted mask, computed *with* the
            gradient to the segmenter (and none to D).
        masks: as in ``dmnet_discriminator_loss``.
    """
    masks = masks if masks is not None else [None] * len(logits_predicted)
    return sum(masked_bce_with_logits(a, 1.0, m) for a, m in zip(logits_predicted, masks))
