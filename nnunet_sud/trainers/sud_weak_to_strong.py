"""Weak-to-strong SUD: SUD's soft target of the weak view trains a strong view, as an nnU-Net trainer.

    nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerSUDWeakToStrong

SUD (Young et al., "SUD: Supervision by Denoising for Semantic Segmentation", §3.3, eq. 7-8)
builds its target z and trains its student from one forward pass of one view, so early on
(alpha near 1) z = beta a(f) + (1 - beta) f and the only pull on f is the denoiser's share beta of
the target. The paper's conclusion proposes SUD "in tandem with more advanced data augmentation";
this trainer gives it the perturbation gap of weak-to-strong consistency (``weak_to_strong.py``):
the target comes from the weak view, the loss from a strong one. Per step, with an unlabeled batch
of B patches (P = patch size, C classes, C_in input channels):

    x_w  = batch_u['data']                                 (B, C_in, *P) weak view: nnU-Net's augmentation
    f_w  = softmax M(x_w)                                  (B, C, *P)    no gradient
    z    = alpha (beta a(f_w) + (1 - beta) f_w) + (1 - alpha) z^-     eq. (8), in the weak frame
    x_s  = G(I(x_w)),  z' = G(z),  valid' = G(valid)       the strong view; the target moved with it
    L    = L_sup + lambda(t) D(z', M(x_s))                 D over valid', gradient through x_s only

* z is SUD's, unchanged: the same store (read and written in the weak frame through
  ``batch_u['coords']``, the stored history never resampled), denoiser a, and schedules alpha(t)
  1 -> 0 and lambda(t) = lambda_max t. Target quality is recorded in the weak frame too, where
  ``batch_u['seg']`` lives: prediction f_w, denoised a(f_w), target z.
* I is SegMatch's strong intensity view, made in the unlabeled loader's workers; G the exact flips
  and quarter turns of ``weak_to_strong.RightAngleTransform`` (``strong_geometric``), drawn per sample
  and applied on the device to x_s, z and valid with the same parameters. G permutes voxels and
  nothing else, so z' meets the strong logits voxel by voxel. Both come from ``StrongViewMixin``.
* D is SUD's ``soft_target_loss`` (``sud.DenoisedTargetsMixin``: ``target_loss``,
  ``target_temperature``, ``target_hard``) and, as in SUD, applied to every deep-supervision output
  with nnU-Net's weights: z' and valid' are downsampled to each output's size by SUD's
  ``downsample_targets`` (area average; valid where every covered voxel is). This is as exact as SUD's
  own deep supervision: G moves the full-resolution target, and the low-resolution outputs of M(x_s)
  are on the strong view's grid, which is the grid z' is downsampled on; nothing is moved per scale.

Defaults, chosen by reasoning (to be measured on validation):
    target_loss = "ce_dice"   soft CE over all classes (background included: where z says
                              background, a false positive of f costs) + SUD's squared soft Dice
                              (the small structures keep their weight, as in nnU-Net's Dice + CE)
    lambda_max = 1.0          lambda(t) = t: D has about the scale of nnU-Net's Dice + CE, which
                              weak-to-strong weighs 1 (the paper's 4 was chosen for 10^5
                              iterations)
    beta = 0.05               the paper's denoiser share (its Fig. 5 optimum at lambda = 4), held:
                              not 0.2 / lambda_max = 0.2 (``nnUNetTrainerSUD_lambda1_beta005`` is the
                              same z on one view)
    target_temperature = 1, target_hard = False: SUD's soft target (``_hard`` tries the argmax)
    strong_geometric = True   (``_noGeometric``: I only)

Cost: two forward passes of the unlabeled batch (the weak one without gradient) where SUD has one.
Variants: ``_noGeometric`` (G off), ``_softDice`` (SUD's D, "soft_dice"), ``_hard`` (D against the
argmax of z).
"""
# the trainers, registered in nnunet_sud.trainers
__all__ = [
    "nnUNetTrainerSUDWeakToStrong",
    "nnUNetTrainerSUDWeakToStrong_noGeometric",
    "nnUNetTrainerSUDWeakToStrong_softDice",
    "nnUNetTrainerSUDWeakToStrong_hard",
]

from typing import Dict, Tuple

import torch

from nnunet_sud.network_helpers import full_resolution
from nnunet_sud.trainers.sud import nnUNetTrainerSUD
from nnunet_sud.trainers.weak_to_strong import StrongViewMixin


class nnUNetTrainerSUDWeakToStrong(StrongViewMixin, nnUNetTrainerSUD):
    """SUD's target of the weak view, D on the strong view (module doc)."""

    SETTINGS = ("lambda_max", "beta", "target_loss")
    lambda_max: float = 1.0
    beta: float = 0.05
    target_loss: str = "ce_dice"

    def unlabeled_loss(self, batch_u: dict) -> Tuple[torch.Tensor, Dict[str, float]]:
        self.store.prefetch(*self.store_location(batch_u))  # the file reads overlap the forward passes
        x_w, x_s = self.views(batch_u)                                              # (B, C_in, *P)
        with torch.no_grad():
            f_w = torch.softmax(full_resolution(self.network(x_w)).float(), 1)     # (B, C, *P)
        alpha = float(self.alpha(self.training_progress()))
        z = self.soft_targets(f_w, batch_u, alpha)                                  # eq. 8, weak frame
        valid = batch_u["valid"]                                                    # (B, *P) bool
        g = self.geometric_transform()
        if g is not None:
            moves = g.get_parameters(x_s.shape[0])
            x_s, z, valid = g.apply(x_s, moves), g.apply(z, moves), g.apply(valid, moves)
        loss = self.soft_target_loss(self.network(x_s), z, valid)                  # D(G(z), M(G(I(x_w))))
        return loss, {"alpha": alpha, "beta": self.beta, "target_new_fraction": self._new_fraction}


class nnUNetTrainerSUDWeakToStrong_noGeometric(nnUNetTrainerSUDWeakToStrong):
    """Strong view I(x_w) only (no flips or quarter turns)."""
    strong_geometric = False


class nnUNetTrainerSUDWeakToStrong_softDice(nnUNetTrainerSUDWeakToStrong):
    """SUD's D (eq. 15's squared soft Dice over the foreground classes) on the strong view."""
    target_loss = "soft_dice"


class nnUNetTrainerSUDWeakToStrong_hard(nnUNetTrainerSUDWeakToStrong):
    """D against the one-hot argmax of z (a hard label, as weak-to-strong's pseudo-labels)."""
    target_hard = True
