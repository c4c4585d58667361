"""``nnUNetTrainerUAMT``: uncertainty-aware mean teacher (Yu et al., MICCAI 2019) on nnU-Net.

    nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerUAMT

The UAMT baseline of Adiga Vasudeva et al. 2022 (Tables 1-3), as in UA-MT's reference
implementation:

    p_s = softmax f(x_u; theta_s)                    student on the unlabeled patch
    p_t = softmax f(x_u + xi_0; theta_t)             teacher on the noisy patch (the target)
    mu  = 1/K sum_k softmax f(x_u + xi_k; theta_t)   K = 8 further stochastic teacher passes
    U_v = - sum_c mu_v,c log(mu_v,c + 1e-6)          uncertainty: entropy of the mean prediction
    H(t) = (0.75 + 0.25 exp(-5 (1 - t)^2)) ln 2      threshold ramp (the reference's, for any C)
    m_v = [U_v < H(t)] [v not padding]               reliable voxels of the image
    L_c = sum_v m_v mean_c (p_s - p_t)^2 / sum_v m_v (masked MSE normalised by the mask count)
    L = L_sup + lambda_c(t) L_c,  lambda_c(t) = 0.1 exp(-5 (1 - t)^2)

with xi ~ clip(N(0, 0.1^2), -0.2, 0.2) drawn independently per pass, t the training progress
(the reference code uses iteration / max_iterations for the threshold), and the EMA teacher of
``teacher.py``. The reference divides by ``2 * sum(mask)`` with 2 = C: the mean over classes of
the masked voxels, which is what ``mean_c`` above expresses for any C. Its ramp is
``0.75 + 0.25 * sigmoid_rampup`` where sigmoid_rampup(t) = exp(-5 (1 - t)^2), so H(0) =
0.7517 ln 2 (not exactly 0.75 ln 2) and H(1) = ln 2.

The threshold's scale stays ln 2 with more classes, as in the reference and its multi-class ports:
with ln C (``_lnC`` variant, ``threshold_classes = None``) and C = 4 the threshold starts at 1.04
nats, above the entropy of a 50/50 voxel (ln 2 = 0.69), which then counts as reliable and the
mask hardly masks. ``mask_fraction`` (logged per epoch) is the share of image voxels kept.
Padded voxels (outside the image, ``batch_u['valid']`` False) never count.

Speed: the K passes run as one teacher forward of K * B samples (``mc_passes_per_forward = None``)
or in chunks of that many passes per forward (less memory). That is K + 1 teacher forwards' worth
of compute per step -- the cost DAE uncertainty (Adiga Vasudeva et al. 2022) removes with its single
denoiser inference.
Deep supervision: full-resolution outputs only (see ``teacher.py``). Inference uses the student.
"""
# the trainers, registered in nnunet_sud.trainers
__all__ = ["nnUNetTrainerUAMT", "nnUNetTrainerUAMT_lnC"]

import math
from typing import Dict, Optional, Tuple

import torch
from torch import distributed as dist

from nnunet_sud.errors import UserFacingError
from nnunet_sud.losses.consistency import masked_mean, mc_entropy, threshold_mask, weighted_consistency
from nnunet_sud.schedules import GaussianRampBetween
from nnunet_sud.trainers.teacher import nnUNetTrainerMeanTeacherBase


class nnUNetTrainerUAMT(nnUNetTrainerMeanTeacherBase):
    """Mean teacher whose consistency is restricted to voxels of low Monte-Carlo uncertainty."""

    extra_log_keys = ("uncertainty_threshold", "mask_fraction", "uncertainty_mean", "mc_spread")

    SETTINGS = ("mc_passes", "mc_passes_per_forward", "threshold_fraction", "threshold_classes",
                "consistency_class_reduction", "feature_dropout")
    #: K, stochastic teacher passes for the uncertainty (UA-MT: 8)
    mc_passes: int = 8
    #: passes per teacher forward (None: all K in one forward of K * B samples)
    mc_passes_per_forward: Optional[int] = None
    #: H(t) / ln(threshold_classes)
    threshold_fraction = GaussianRampBetween(0.75, 1.0)
    #: the threshold's scale ln(threshold_classes): 2 as the reference (whatever C is); None: ln C
    threshold_classes: Optional[int] = 2
    #: 'mean' over classes (the reference's division by C); 'sum' gives ||p_s - p_t||^2
    consistency_class_reduction: str = "mean"
    #: UA-MT's reference V-Net: channel dropout 0.5 on the bottleneck and before the output layer, in
    #: student and teacher (``teacher.add_feature_dropout``); 0 switches it off
    feature_dropout: float = 0.5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.require_exclusive_classes()
        #: per epoch: [sum U where the teacher is wrong, wrong voxels, sum U where right, right voxels]
        self._uncertainty_split: Optional[torch.Tensor] = None

    def check_settings(self):
        super().check_settings()
        name = type(self).__name__
        if int(self.mc_passes) < 1:
            raise UserFacingError(f"{name}.mc_passes (K, the stochastic teacher passes of the uncertainty) must be at "
                                  f"least 1, got {self.mc_passes!r}")
        per = self.mc_passes_per_forward
        if per is not None and int(per) < 1:
            raise UserFacingError(f"{name}.mc_passes_per_forward must be at least 1 or None (all K passes in one "
                                  f"forward), got {per!r}")
        if self.threshold_classes is not None and int(self.threshold_classes) < 2:
            raise UserFacingError(f"{name}.threshold_classes (the threshold's scale ln(threshold_classes)) must be at "
                                  f"least 2 or None (ln C), got {self.threshold_classes!r}")

    # ------------------------------------------------------------------ the terms
    def uncertainty_threshold(self, t: float) -> float:
        """H(t) = threshold_fraction(t) * ln 2 (``threshold_classes``; None: ln C, C = classes incl. background)."""
        return self.threshold_fraction(t) * math.log(self.threshold_classes or self.label_manager.num_segmentation_heads)

    def mc_teacher_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """K stochastic teacher passes, batched.

        x: (B, C_in, *patch). Returns (K, B, C, *patch) softmaxes of the teacher on
        x + xi_k, each pass with its own noise, run as ceil(K / passes_per_forward) forwards of
        passes_per_forward * B samples.
        """
        k_total = int(self.mc_passes)
        if k_total < 1:
            raise ValueError(f"mc_passes must be at least 1, got {self.mc_passes}")
        per = int(self.mc_passes_per_forward or k_total)
        chunks = []
        for start in range(0, k_total, per):
            n = min(per, k_total - start)
            x_rep = x.repeat(n, *([1] * (x.ndim - 1)))                  # (n * B, C_in, *patch), pass-major
            chunks.append(self.probabilities(self.teacher_logits(self.perturb(x_rep))))
        p = torch.cat(chunks, 0)
        return p.view(k_total, x.shape[0], *p.shape[1:])

    def uncertainty(self, p_k: torch.Tensor) -> torch.Tensor:
        """U = entropy of the mean of the K passes: (K, B, C, *patch) -> (B, *patch)."""
        return mc_entropy(p_k)

    def consistency_loss(self, p_s: torch.Tensor, p_t: torch.Tensor, p_k: torch.Tensor, t: float,
                         valid: Optional[torch.Tensor] = None):
        """Masked MSE of UA-MT.

        Args:
            p_s: (B, C, *patch) student softmax (with gradient).
            p_t: (B, C, *patch) teacher softmax on the noisy patch.
            p_k: (K, B, C, *patch) softmaxes of the K stochastic teacher passes.
            t: training progress in [0, 1] (for the threshold ramp).
            valid: (B, *patch) bool, False on padding (None: every voxel is image).
        Returns:
            (L_c scalar, U (B, *patch), mask (B, *patch) float, threshold float).
        """
        u = self.uncertainty(p_k)
        threshold = self.uncertainty_threshold(t)
        mask = threshold_mask(u, threshold)
        if valid is not None:
            mask = mask * valid.to(mask.device, mask.dtype)
        loss = weighted_consistency(p_s, p_t, mask, self.consistency_class_reduction)
        return loss, u, mask, threshold

    # ------------------------------------------------------------------ the step
    def unlabeled_loss(self, batch_u: dict) -> Tuple[torch.Tensor, Dict[str, float]]:
        x = batch_u["data"]                                              # (B, C_in, *patch)
        p_s = self.probabilities(self.student_logits(x))                 # f(x; theta_s)
        p_t = self.probabilities(self.teacher_logits(self.perturb(x)))   # f(x + xi_0; theta_t)
        p_k = self.mc_teacher_probabilities(x)                           # f(x + xi_k; theta_t), k = 1..K
        valid = batch_u["valid"]
        loss, u, mask, threshold = self.consistency_loss(p_s, p_t, p_k, self.training_progress(), valid)
        self.record_target_quality(batch_u, {"teacher_certain": mask}, student=p_s, teacher=p_t, teacher_certain=p_t)
        self.record_uncertainty_split(batch_u, p_t, u)
        image = valid.to(u.device)
        return loss, {"uncertainty_threshold": threshold, "mask_fraction": masked_mean(mask, image),
                      "uncertainty_mean": masked_mean(u, image), "mc_spread": masked_mean(p_k.std(0).mean(1), image)}

    # ------------------------------------------------------------------ is U where the teacher errs?
    @torch.no_grad()
    def record_uncertainty_split(self, batch_u: dict, p_t: torch.Tensor, u: torch.Tensor) -> None:
        """Accumulate U over image voxels with a label (labelsUnlabeled) where the teacher's argmax is
        wrong and where it is right; logged per epoch as ``uncertainty_teacher_wrong``/``_right``.
        p_t (B, C, *patch), u (B, *patch). The labels never enter the loss."""
        seg = batch_u.get("seg")
        if seg is None or not self.unlabeled_cases_with_labels:
            return
        seg = seg.to(u.device).long()
        seg = seg[:, 0] if seg.ndim == u.ndim + 1 else seg
        known = (seg >= 0) & batch_u["valid"].to(u.device)
        agree = p_t.argmax(1) == seg
        wrong, right = known & ~agree, known & agree
        sums = torch.stack([u[wrong].sum(), wrong.sum(), u[right].sum(), right.sum()]).double()
        self._uncertainty_split = sums if self._uncertainty_split is None else self._uncertainty_split + sums

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        if not self.unlabeled_cases_with_labels:
            return
        # every rank reduces (also one that met no labelled voxel this epoch), or the others would wait
        sums = self._uncertainty_split
        if sums is None:
            sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        self._uncertainty_split = None
        if self.is_ddp:
            dist.all_reduce(sums)
        u_wrong, n_wrong, u_right, n_right = sums.cpu().tolist()
        local = self.logger.local_logger
        for key, total, n in (("uncertainty_teacher_wrong", u_wrong, n_wrong),
                              ("uncertainty_teacher_right", u_right, n_right)):
            local.register(key, self.current_epoch)
            self.logger.log(key, total / n if n else float("nan"), self.current_epoch)
        self.print_to_log_file(
            f"uncertainty where the teacher is wrong {u_wrong / max(n_wrong, 1):.4f} ({int(n_wrong)} voxels), "
            f"right {u_right / max(n_right, 1):.4f} ({int(n_right)} voxels)")


class nnUNetTrainerUAMT_lnC(nnUNetTrainerUAMT):
    """UA-MT with the threshold scaled by ln C instead of the reference's ln 2."""
    threshold_classes = None
