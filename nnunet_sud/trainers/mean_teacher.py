"""``nnUNetTrainerMeanTeacher``: mean teacher (Tarvainen & Valpola, NeurIPS 2017) on nnU-Net.

    nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerMeanTeacher

The "MT" baseline of Adiga Vasudeva et al. 2022 (Table 1) and of UA-MT (Yu et al., MICCAI 2019), in
the form of UA-MT's reference implementation:

    L = L_sup(f(x_l; theta_s), y_l) + lambda_c(t) * L_c
    L_c = mean_{b, c, v in image} ( softmax f(x_u; theta_s) - softmax f(x_u + xi; theta_t) )^2
    xi ~ clip(N(0, 0.1^2), -0.2, 0.2) per voxel,   lambda_c(t) = 0.1 exp(-5 (1 - t)^2)
    theta_t <- a theta_t + (1 - a) theta_s after every optimizer step (decay 0.99, warm-up)

``L_sup`` is nnU-Net's Dice + CE with deep supervision; ``t`` the fraction of all training
iterations done. The student sees the unlabeled patch as nnU-Net's augmentation delivers it; the
teacher the same patch plus the clipped noise. The squared difference is averaged over classes
and voxels (the reference code's element-wise MSE of the two softmaxes). Consistency is on the
full-resolution output (see ``teacher.py``). Voxels of a patch that lie outside the image
(nnU-Net's padding, ``batch_u['valid']`` False) are left out. ``nnUNetv2_predict`` uses the student.
"""
# the trainers, registered in nnunet_sud.trainers
__all__ = ["nnUNetTrainerMeanTeacher", "nnUNetTrainerMeanTeacher_noDropout", "nnUNetTrainerFeatureDropout"]

from typing import Dict, Optional, Tuple

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_sud.losses.consistency import weighted_consistency
from nnunet_sud.trainers.teacher import check_feature_dropout, install_feature_dropout, nnUNetTrainerMeanTeacherBase


class nnUNetTrainerMeanTeacher(nnUNetTrainerMeanTeacherBase):
    """Mean teacher: MSE between student and EMA-teacher softmaxes on unlabeled patches."""

    SETTINGS = ("consistency_class_reduction", "feature_dropout")
    #: 'mean' over classes as the reference code's element-wise MSE; 'sum' gives ||p_s - p_t||^2
    consistency_class_reduction: str = "mean"
    #: UA-MT's reference V-Net: channel dropout 0.5 on the bottleneck and before the output layer, in
    #: student and teacher (``teacher.add_feature_dropout``); 0 switches it off
    feature_dropout: float = 0.5

    def consistency_loss(self, p_s: torch.Tensor, p_t: torch.Tensor, valid: Optional[torch.Tensor] = None):
        """L_c = mean over image voxels of the squared softmax difference.

        p_s: (B, C, *patch) student softmax (with gradient); p_t: (B, C, *patch) teacher softmax;
        valid: (B, *patch) bool, False on padding (None: all voxels). Returns a scalar.
        """
        weight = None if valid is None else valid.to(p_s.device, torch.float32)
        return weighted_consistency(p_s, p_t, weight, self.consistency_class_reduction)

    def unlabeled_loss(self, batch_u: dict) -> Tuple[torch.Tensor, Dict[str, float]]:
        x = batch_u["data"]                                              # (B, C_in, *patch)
        p_s = self.probabilities(self.student_logits(x))                 # f(x; theta_s)
        p_t = self.probabilities(self.teacher_logits(self.perturb(x)))   # f(x + xi; theta_t)
        self.record_target_quality(batch_u, student=p_s, teacher=p_t)
        return self.consistency_loss(p_s, p_t, batch_u["valid"]), {}


class nnUNetTrainerMeanTeacher_noDropout(nnUNetTrainerMeanTeacher):
    """Mean teacher without feature dropout: student and teacher differ only by the teacher's input
    noise and the EMA (the behaviour before dropout was added; an ablation of the perturbation)."""
    feature_dropout = 0.0


class nnUNetTrainerFeatureDropout(nnUNetTrainer):
    """The supervised control of the mean-teacher family: nnUNetTrainer with the student's feature
    dropout (p = 0.5 on the bottleneck and before the output layer, ``teacher.add_feature_dropout``)
    and nothing else: no unlabeled images, no teacher. MT, UA-MT and DAE-MT regularise the labeled
    loss by this dropout too, so their gain over nnUNetTrainer is the sum of the two; their gain over
    this trainer is what the unlabeled images add."""

    SETTINGS = ("feature_dropout",)
    feature_dropout: float = 0.5

    def check_settings(self):
        """Raise UserFacingError for an invalid setting; runs first in ``initialize`` (nnU-Net's
        ``on_train_start`` and ``--c`` begin with it)."""
        check_feature_dropout(self, "the segmenter (supervised only)")

    def initialize(self):
        if not self.was_initialized:
            self.check_settings()
        super().initialize()
        install_feature_dropout(self, "the segmenter (supervised only)")
