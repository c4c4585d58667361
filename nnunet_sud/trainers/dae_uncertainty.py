"""``nnUNetTrainerDAEUncertainty``: uncertainty from a labeling representation (DAE-MT) on nnU-Net.

    nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerLabelDenoiser     # the DAE, once
    nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerDAEUncertainty

DAE-MT: Adiga Vasudeva, Dolz, Lombaert, "Leveraging Labeling Representations in Uncertainty-based
Semi-supervised Segmentation" (MICCAI 2022), §2.1-2.3: a mean teacher whose consistency is weighted
by an uncertainty read off a pre-trained denoising auto-encoder of label maps, with a single DAE
inference per step:

    p_s   = softmax f(x_u; theta_s)                       student on the unlabeled patch
    p_t   = softmax f(x_u + xi; theta_t)                  EMA teacher on the noisy patch
    p_hat = DAE(p_t)                                      plausible segmentation (one inference)
    U_v   = ||p_hat_v - p_t_v||^2                         (sum over classes), in [0, 2]
    w_v   = exp(-kappa U_v) [v not padding],  kappa = 1
    L_c   = sum_v w_v mean_c (p_s,v,c - p_t,v,c)^2 / sum_v w_v
    L     = L_sup + lambda_c(t) L_c,  lambda_c(t) = 0.1 exp(-5 (1 - t)^2)

with xi ~ clip(N(0, 0.1^2), -0.2, 0.2) and EMA decay 0.99 as in its UA-MT code base. The
consistency distance is averaged over classes, as mean teacher's and UA-MT's here: the paper keeps
lambda the same for every method "for a fair comparison", and the sum over classes (its
||.||^2, ``_classSum``) would give DAE-MT C times their weight (2x on LA, 4x on ACDC). The DAE is
this package's label denoiser (``nnUNetTrainerLabelDenoiser``: skip-free auto-encoder planned from
the same plans; the paper's DAE is a skip-free V-net with a dense bottleneck, trained with its
own label corruptions). It is applied to the teacher softmax via
``nnunet_sud.denoiser.corruption.apply_denoiser`` (log -> clip [-3, 0] -> softmax -> DAE ->
softmax), loaded once at the start of training by ``LabelDenoiserMixin`` (the default location or
``$nnUNet_denoiser``; a missing denoiser stops training before anything is built, naming the
``nnUNetv2_train ... -tr nnUNetTrainerLabelDenoiser`` command). It is *not* part of
``self.network``: checkpoints and ``nnUNetv2_predict`` contain and use the student only.

Ablations (small subclasses below):
    Table 3  ``_threshold``  binary mask w_v = [U_v < H(t)] with UA-MT's threshold ramp scaled to
                             U's range: H(t) = (0.75 + 0.25 exp(-5 (1 - t)^2)) U_max, U_max = 2
                             (UA-MT's ln 2 is the largest entropy of its two classes; the paper
                             says only "threshold strategy ... from UAMT")
             ``_entropy``    U_v = entropy of the mean of {p_t, p_hat} (UA-MT's entropy of the
                             mean prediction, with the teacher and its DAE reconstruction as the
                             set of predictions; our reading of "entropy scheme"), w_v = exp(-kappa U_v)
             ``_classSum``   ||p_s - p_t||^2 summed over classes (C times the default's weight)
    Table 4  ``_kappa{0p1,0p5,2,5}``   kappa in {0.1, 0.5, 2, 5} (lambda_max = 0.1)
             ``_lambda{0p01,0p05,0p5,1}`` lambda_max in {0.01, 0.05, 0.5, 1} (kappa = 1)
Deep supervision: full-resolution outputs only (see ``teacher.py``).
"""
# the trainers, registered in nnunet_sud.trainers
__all__ = [
    "nnUNetTrainerDAEUncertainty",
    "nnUNetTrainerDAEUncertainty_threshold",
    "nnUNetTrainerDAEUncertainty_classSum",
    "nnUNetTrainerDAEUncertainty_entropy",
    "nnUNetTrainerDAEUncertainty_kappa0p1",
    "nnUNetTrainerDAEUncertainty_kappa0p5",
    "nnUNetTrainerDAEUncertainty_kappa2",
    "nnUNetTrainerDAEUncertainty_kappa5",
    "nnUNetTrainerDAEUncertainty_lambda0p01",
    "nnUNetTrainerDAEUncertainty_lambda0p05",
    "nnUNetTrainerDAEUncertainty_lambda0p5",
    "nnUNetTrainerDAEUncertainty_lambda1",
]

from typing import Dict, Optional, Tuple

import torch

from nnunet_sud.denoiser.corruption import apply_denoiser
from nnunet_sud.errors import UserFacingError
from nnunet_sud.losses.consistency import (dae_uncertainty, entropy, exp_reliability, masked_mean, threshold_mask,
                                           weighted_consistency)
from nnunet_sud.schedules import GaussianRampBetween, GaussianRampUp
from nnunet_sud.trainers.denoiser_mixin import LabelDenoiserMixin
from nnunet_sud.trainers.teacher import nnUNetTrainerMeanTeacherBase


#: the largest DAE uncertainty ||p_hat - p_t||^2 of two probability vectors (two different one-hots)
DAE_UNCERTAINTY_MAX = 2.0


class nnUNetTrainerDAEUncertainty(LabelDenoiserMixin, nnUNetTrainerMeanTeacherBase):
    """Mean teacher with voxel weights exp(-kappa ||DAE(p_t) - p_t||^2) (DAE-MT)."""

    extra_log_keys = ("uncertainty_mean", "reliability_mean")

    SETTINGS = ("kappa", "consistency_class_reduction", "feature_dropout")
    #: kappa, the uncertainty weighting factor of w = exp(-kappa U)
    kappa: float = 1.0
    #: "mean" over classes as MT and UA-MT (equal lambda, equal weight); "sum": the paper's ||.||^2
    consistency_class_reduction: str = "mean"
    #: UA-MT's reference V-Net: channel dropout 0.5 on the bottleneck and before the output layer, in
    #: student and teacher (``teacher.add_feature_dropout``); 0 switches it off
    feature_dropout: float = 0.5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.require_exclusive_classes()

    def check_settings(self):
        super().check_settings()
        if not float(self.kappa) >= 0.0:
            raise UserFacingError(f"{type(self).__name__}.kappa (the weight exp(-kappa U) of uncertain voxels) must be "
                                  f">= 0 (0: every voxel counts fully), got {self.kappa!r}")

    # ------------------------------------------------------------------ the denoiser
    def prepare_method(self):
        super().prepare_method()
        self.load_label_denoiser()  # LabelDenoiserMixin: a missing denoiser stops training here

    # ------------------------------------------------------------------ the terms
    def uncertainty(self, p_t: torch.Tensor, p_hat: torch.Tensor) -> torch.Tensor:
        """U = ||p_hat - p_t||^2 per voxel: (B, C, *patch) x 2 -> (B, *patch)."""
        return dae_uncertainty(p_hat, p_t)

    def reliability(self, u: torch.Tensor, t: float) -> torch.Tensor:
        """w = exp(-kappa U): (B, *patch) -> (B, *patch) in (0, 1]."""
        return exp_reliability(u, self.kappa)

    def consistency_loss(self, p_s: torch.Tensor, p_t: torch.Tensor, p_hat: torch.Tensor, t: float,
                         valid: Optional[torch.Tensor] = None):
        """L_c = sum_v w_v d(p_s,v, p_t,v) / sum_v w_v, d the squared distance (class mean or sum).

        Args:
            p_s: (B, C, *patch) student softmax (with gradient).
            p_t: (B, C, *patch) teacher softmax.
            p_hat: (B, C, *patch) denoised teacher softmax DAE(p_t).
            t: training progress in [0, 1].
            valid: (B, *patch) bool, False on padding (None: every voxel is image).
        Returns:
            (L_c scalar, U (B, *patch), w (B, *patch)).
        """
        u = self.uncertainty(p_t, p_hat)
        w = self.reliability(u, t)
        if valid is not None:
            w = w * valid.to(w.device, w.dtype)
        return weighted_consistency(p_s, p_t, w, self.consistency_class_reduction), u, w

    # ------------------------------------------------------------------ the step
    def unlabeled_loss(self, batch_u: dict) -> Tuple[torch.Tensor, Dict[str, float]]:
        x = batch_u["data"]                                              # (B, C_in, *patch)
        p_s = self.probabilities(self.student_logits(x))                 # f(x; theta_s)
        p_t = self.probabilities(self.teacher_logits(self.perturb(x)))   # f(x + xi; theta_t)
        p_hat = apply_denoiser(self.denoiser, p_t)                       # DAE(p_t), one inference
        valid = batch_u["valid"]
        loss, u, w = self.consistency_loss(p_s, p_t, p_hat, self.training_progress(), valid)
        self.record_target_quality(batch_u, student=p_s, teacher=p_t, denoised=p_hat)
        image = valid.to(u.device)
        return loss, {"uncertainty_mean": masked_mean(u, image), "reliability_mean": masked_mean(w, image)}


# ---------------------------------------------------------------------- Table 3 ablations
class nnUNetTrainerDAEUncertainty_threshold(nnUNetTrainerDAEUncertainty):
    """DAE-MT Table 3 "Ours (threshold)": w_v = [U_v < H(t)], H(t) = (0.75 + 0.25 exp(-5(1-t)^2)) U_max,
    U_max = 2 the largest ||p_hat - p_t||^2 (UA-MT's ramp on U's own range)."""

    SETTINGS = ("threshold_fraction",)
    #: H(t) / U_max
    threshold_fraction = GaussianRampBetween(0.75, 1.0)

    def reliability(self, u, t):
        return threshold_mask(u, self.threshold_fraction(t) * DAE_UNCERTAINTY_MAX)


class nnUNetTrainerDAEUncertainty_classSum(nnUNetTrainerDAEUncertainty):
    """The paper's ||p_s - p_t||^2 summed over classes: C times the consistency weight of MT/UA-MT."""
    consistency_class_reduction = "sum"


class nnUNetTrainerDAEUncertainty_entropy(nnUNetTrainerDAEUncertainty):
    """DAE-MT Table 3 "Ours (entropy)": U_v = H((p_t + p_hat) / 2), w_v = exp(-kappa U_v)."""

    def uncertainty(self, p_t, p_hat):
        return entropy(0.5 * (p_t.float() + p_hat.float()))


# ---------------------------------------------------------------------- Table 4 ablations
class nnUNetTrainerDAEUncertainty_kappa0p1(nnUNetTrainerDAEUncertainty):
    """DAE-MT Table 4: kappa = 0.1."""
    kappa = 0.1


class nnUNetTrainerDAEUncertainty_kappa0p5(nnUNetTrainerDAEUncertainty):
    """DAE-MT Table 4: kappa = 0.5."""
    kappa = 0.5


class nnUNetTrainerDAEUncertainty_kappa2(nnUNetTrainerDAEUncertainty):
    """DAE-MT Table 4: kappa = 2."""
    kappa = 2.0


class nnUNetTrainerDAEUncertainty_kappa5(nnUNetTrainerDAEUncertainty):
    """DAE-MT Table 4: kappa = 5."""
    kappa = 5.0


class nnUNetTrainerDAEUncertainty_lambda0p01(nnUNetTrainerDAEUncertainty):
    """DAE-MT Table 4: lambda_c(t) = 0.01 exp(-5 (1 - t)^2)."""
    unlabeled_weight = GaussianRampUp(0.01)


class nnUNetTrainerDAEUncertainty_lambda0p05(nnUNetTrainerDAEUncertainty):
    """DAE-MT Table 4: lambda_c(t) = 0.05 exp(-5 (1 - t)^2)."""
    unlabeled_weight = GaussianRampUp(0.05)


class nnUNetTrainerDAEUncertainty_lambda0p5(nnUNetTrainerDAEUncertainty):
    """DAE-MT Table 4: lambda_c(t) = 0.5 exp(-5 (1 - t)^2)."""
    unlabeled_weight = GaussianRampUp(0.5)


class nnUNetTrainerDAEUncertainty_lambda1(nnUNetTrainerDAEUncertainty):
    """DAE-MT Table 4: lambda_c(t) = 1 exp(-5 (1 - t)^2)."""
    unlabeled_weight = GaussianRampUp(1.0)
