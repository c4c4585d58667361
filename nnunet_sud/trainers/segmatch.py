"""SegMatch: weak/strong consistency with discriminator-gated pseudo-labels, as an nnU-Net trainer.

Motaghi et al., "SegMatch: Semi-supervised semantic segmentation", §3, Algorithm 1.
Per step, with a labeled batch (x_l, y_l) and an unlabeled batch x_u:

    L_s   = nnU-Net's loss on (x_l, y_l)                                     (line 4)
    p_w   = softmax M(T1(x_u)),  Y_hat = argmax p_w       (no gradient)       (line 5)
    m     = gate(x_u, Y_hat)     discriminator: [D(T1(x_u), Y_hat) > tau]     (line 5, §3.3)
    L_u   = sum m valid CE(M(T2(x_u)), Y_hat) / sum valid                    (line 6)
    theta_M <- step on L_s + lambda_u(t) L_u                                 (line 7)
    L_D   = -mean log D(x_r, y_r) - mean log(1 - D(x_r, argmax M(x_r)))      (line 8, eq. 1; see below)
    theta_D <- step on L_D                                                   (line 9)

The two views, both made in the unlabeled loader's workers
    T1 (weak) is the unlabeled patch exactly as nnU-Net's training pipeline delivers it
    (``batch_u['data']``): a random crop (the paper's random shift) that is mirrored with p = 0.5
    per axis (its random flip) -- plus nnU-Net's own rare rotation/scaling and mild intensity
    augmentations, i.e. the same distribution as the labeled patches. T2 (strong) is T1 followed
    by batchgeneratorsv2 transforms, appended to the unlabeled pipeline by
    ``get_unlabeled_transforms`` (``StrongViewTransform``): RandAugment, two ops of random
    magnitude per sample out of brightness, contrast, gamma, Gaussian noise, Gaussian blur,
    sharpening (``strong_transforms()``), then Cutout (``BlankRectangleTransform``), as FixMatch.
    The loader stacks it as ``batch_u[STRONG_VIEW_KEY]`` (an extra image key, see loader.py).
    Intensity-only on purpose: none of these moves a voxel, so T1 T2^-1 in line 6 is the
    identity and the strong prediction meets the pseudo-label voxel by voxel. A geometric strong
    view would have to be aligned through a coordinate map, i.e. the pseudo-label resampled
    onto the strong grid (nearest neighbour: label errors at every object border, where the
    pseudo-label matters most) and voxels rotated out of the patch lost; nnU-Net already gives
    both views its rotation/scaling/mirroring, so the geometric part of FixMatch's strong
    augmentation (rotate, shear, translate) would add little beyond that cost.

The discriminator (``ConvDiscriminator``, head "image": strided convs of the plans' first
strides, LeakyReLU, global average -> one logit per sample) reads the image channels and the
one-hot mask (one-hot of the argmax, never the softmax: soft masks would be told apart by their
softness). What it is trained on departs from eq. 1 as written, which takes (x_l, y_l) as
positives and *unlabeled* (x_u, M(x_u)) as negatives:
  * negatives: the labeled images' own predictions (x_r, argmax M(x_r)) (``discriminator_negatives
    = "labeled"``). Positives and negatives then show the same images, so D can only learn how
    well a mask fits an image. With unlabeled negatives it learns to tell labeled from
    unlabeled *images* (few labeled cases are easily memorised) and outputs ~0 on every
    unlabeled pair, so D > tau opens only where D errs. ``_eq1Negatives`` keeps eq. 1's
    unlabeled negatives; "both" uses the two sets.
  * labeled pairs: only the labeled patches that are random crops (x_r: the first
    round(B (1 - oversample_foreground_percent)) of nnU-Net's batch, ``random_crop_count``), so
    they are cropped like the unlabeled patches; nnU-Net's foreground-oversampled patches
    would teach D "contains foreground -> ground truth". No second labeled loader: no extra
    workers and no extra forward pass (the predictions are the labeled forward of this step).
The same forward gives the gate (detached) and L_D. Its own Adam optimiser (lr 1e-4, poly decay;
the paper gives none) lives beside the segmenter; its state goes into the checkpoint's extra
state (``DiscriminatorMixin``), not into ``network_weights``: inference is the plain segmenter.

Hyper-parameters: tau = 0.5 for the discriminator (D > 0.5: "more likely a ground-truth pair"),
0.95 for the confidence gates (FixMatch's default). lambda_u(t) = lambda_u exp(-5 (1 - t /
lambda_u_rampup)^2), lambda_u = 1 reached at lambda_u_rampup = 0.25 of training (the Gaussian
ramp-up of Laine & Aila, "Temporal ensembling for semi-supervised learning", who ramp over the
first 80 of 300 epochs): early on D is untrained (~0.5) and the pseudo-labels come from an
untrained network, so a constant weight (FixMatch) would train on noise. Both settings are
read when used.
Logged per epoch: ``pseudo_label_fraction`` (the gate fraction: the share of valid unlabeled
voxels whose pseudo-label passes the gate; for D's per-sample gate the voxel-weighted share of
samples), ``discriminator_score`` (mean D on the unlabeled pairs), ``discriminator_score_truth``
/ ``_prediction`` (on the labeled ground-truth / predicted pairs) and ``discriminator_loss``.
Variants (§3.3's other choices of the "discriminator"): ``_identity`` (all pseudo-labels:
plain consistency), ``_meanConfidence`` (FixMatch per sample), ``_confidenceMap`` (per voxel);
``_eq1Negatives`` (D's negatives as in eq. 1).
Deep supervision: L_u on the full-resolution output only (the paper has none); nnU-Net's loss
keeps its deep supervision.
"""
# the trainers, registered in nnunet_sud.trainers
__all__ = [
    "nnUNetTrainerSegMatch",
    "nnUNetTrainerSegMatch_identity",
    "nnUNetTrainerSegMatch_meanConfidence",
    "nnUNetTrainerSegMatch_confidenceMap",
    "nnUNetTrainerSegMatch_eq1Negatives",
]

from typing import Dict, Optional, Sequence, Tuple

import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.blank_rectangle import BlankRectangleTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.noise.sharpen import SharpeningTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

from nnunet_sud.errors import UserFacingError
from nnunet_sud.losses.adversarial import segmatch_discriminator_loss
from nnunet_sud.losses.pseudo_labels import (confidence_map_gate, gated_cross_entropy, identity_gate,
                                             mean_confidence_gate, score_gate)
from nnunet_sud.network_helpers import full_resolution, labels_to_one_hot, require_exclusive_classes
from nnunet_sud.schedules import GaussianRampUp
from nnunet_sud.trainers.discriminator import ConvDiscriminator, DiscriminatorMixin, plan_strides
from nnunet_sud.trainers.distributed import union_mean_weights
from nnunet_sud.trainers.labeled_batch import LabeledBatchMixin
from nnunet_sud.trainers.semi_supervised import nnUNetTrainerSemiSupervised
from nnunet_sud.trainers.settings import DerivedDefault


# ---------------------------------------------------------------------- the strong view
#: key of the strong view in the unlabeled sample dict and batch (an extra image key, see loader.py)
STRONG_VIEW_KEY = "strong_image"


class RandAugmentTransform(BasicTransform):
    """RandAugment (Cubuk et al., "RandAugment: Practical automated data augmentation with a reduced
    search space") on a sample: ``n`` of ``transforms``, drawn without replacement per sample and
    applied in random order. Each transform draws its own magnitude from its range, i.e. FixMatch's
    RandAugment with random magnitudes (Sohn et al., "FixMatch: Simplifying semi-supervised learning
    with consistency and confidence")."""

    def __init__(self, transforms: Sequence[BasicTransform], n: int):
        super().__init__()
        if not 0 <= n <= len(transforms):
            raise ValueError(f"n must be in [0, {len(transforms)}], got {n}")
        self.transforms = list(transforms)
        self.n = int(n)

    def get_parameters(self, **data_dict) -> dict:
        return {"chosen": torch.randperm(len(self.transforms))[:self.n].tolist()}

    def apply(self, data_dict: dict, **params) -> dict:
        for i in params["chosen"]:
            data_dict = self.transforms[i](**data_dict)
        return data_dict


class StrongViewTransform(BasicTransform):
    """Adds ``transform(image=<copy of the sample's image>)['image']`` to the sample as ``key``; the
    image and every other key are left as they are (the transforms of batchgeneratorsv2 work in
    place, hence the copy). Put it last in the pipeline: the strong view is then the delivered weak
    view T1 followed by ``transform``."""

    def __init__(self, transform: BasicTransform, key: str = STRONG_VIEW_KEY):
        super().__init__()
        self.transform = transform
        self.key = key

    def apply(self, data_dict: dict, **params) -> dict:
        data_dict[self.key] = self.transform(image=data_dict["image"].clone())["image"]
        return data_dict


# ---------------------------------------------------------------------- the trainer
class nnUNetTrainerSegMatch(DiscriminatorMixin, LabeledBatchMixin, nnUNetTrainerSemiSupervised):
    """SegMatch (module doc). Variants change ``gating``/``tau``/``discriminator_negatives``."""

    SETTINGS = ("gating", "tau", "lambda_u", "lambda_u_rampup", "unlabeled_weight", "discriminator_negatives",
                "discriminator_features", "discriminator_negative_slope", "discriminator_lr", "strong_ops_per_sample",
                "strong_cutout")
    #: which pseudo-labels count: "discriminator", "identity", "mean_confidence", "confidence_map"
    gating: str = "discriminator"
    #: threshold tau of the gate
    tau: float = 0.5
    #: lambda_u, the weight of L_u once ramped up, and the training fraction by which it is reached
    lambda_u: float = 1.0
    lambda_u_rampup: float = 0.25
    #: the weight schedule lambda_u exp(-5 (1 - t / lambda_u_rampup)^2), read when used (a variant may
    #: change lambda_u or lambda_u_rampup late); assign a schedule (e.g. Constant(1.0)) to replace it
    unlabeled_weight = DerivedDefault(lambda t: GaussianRampUp(t.lambda_u, t.lambda_u_rampup))
    #: D's negatives: "labeled" (the labeled images' own predictions), "unlabeled" (eq. 1 as written:
    #: the unlabeled pairs) or "both"; its positives are always the labeled ground-truth pairs
    discriminator_negatives: str = "labeled"
    #: discriminator: channels of its strided convs, LeakyReLU slope; optimiser in DiscriminatorMixin
    discriminator_features: Tuple[int, ...] = (32, 64, 128)
    discriminator_negative_slope: float = 0.2
    discriminator_lr: float = 1e-4
    #: the strong view: RandAugment ops per sample (of ``strong_transforms()``), then Cutout or not
    strong_ops_per_sample: int = 2
    strong_cutout: bool = True

    #: the losses read batch_u['valid'] only (both views are voxel-aligned): no case coordinates carried
    unlabeled_coordinates = False
    extra_log_keys = ("pseudo_label_fraction", "discriminator_score", "discriminator_loss",
                      "discriminator_score_truth", "discriminator_score_prediction")
    GATES = ("discriminator", "identity", "mean_confidence", "confidence_map")
    NEGATIVES = ("labeled", "unlabeled", "both")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        require_exclusive_classes(self.label_manager, type(self).__name__)

    def check_settings(self):
        super().check_settings()
        name = type(self).__name__
        if self.gating not in self.GATES:
            raise UserFacingError(f"{name}.gating must be one of {self.GATES}, got {self.gating!r}")
        if not self.lambda_u_rampup > 0:
            raise UserFacingError(f"{name}.lambda_u_rampup must be a positive fraction of training (the lambda_u "
                                  f"ramp ends there), got {self.lambda_u_rampup!r}; for no ramp set "
                                  f"unlabeled_weight = Constant(lambda_u)")
        if not 0 <= self.strong_ops_per_sample <= len(self.strong_transforms()):
            raise UserFacingError(f"{name}.strong_ops_per_sample must be in [0, {len(self.strong_transforms())}] "
                                  f"(the number of strong_transforms()), got {self.strong_ops_per_sample!r}")
        if not self.needs_discriminator():
            return
        if self.discriminator_negatives not in self.NEGATIVES:
            raise UserFacingError(f"{name}.discriminator_negatives must be one of {self.NEGATIVES}, got "
                                  f"{self.discriminator_negatives!r}")
        if self.probabilistic_oversampling:
            raise UserFacingError(f"{name} trains its discriminator on the labeled patches that are random crops, "
                                  f"which nnU-Net's loader puts first in the batch unless probabilistic_oversampling "
                                  f"is set. Set probabilistic_oversampling = False.")
        if random_crop_count(self.configuration_manager.batch_size, self.oversample_foreground_percent) == 0:
            raise UserFacingError(f"{name}: oversample_foreground_percent = {self.oversample_foreground_percent} "
                                  f"with batch size {self.configuration_manager.batch_size} leaves no labeled patch "
                                  f"that is a random crop for the discriminator. Lower oversample_foreground_percent.")

    # ------------------------------------------------------------------ the strong view
    def strong_transforms(self) -> list:
        """The strong view's RandAugment pool: batchgeneratorsv2's intensity transforms, each with a
        random magnitude, per channel. None moves a voxel (pointwise maps, zero-phase filters with
        reflect/replicate padding, additive noise): the strong view stays voxel-aligned with T1."""
        per_channel = dict(synchronize_channels=False, p_per_channel=1)
        return [
            MultiplicativeBrightnessTransform(BGContrast((0.5, 1.5)), **per_channel),
            ContrastTransform(BGContrast((0.25, 1.75)), preserve_range=False, **per_channel),
            GammaTransform(BGContrast((1 / 3, 3)), p_invert_image=0, p_retain_stats=0, **per_channel),
            GaussianNoiseTransform(noise_variance=(0, 0.25), **per_channel),
            GaussianBlurTransform(blur_sigma=(0.5, 2.0), synchronize_axes=True, **per_channel),
            SharpeningTransform(strength=(0.1, 0.5), p_per_channel=1),
        ]

    def strong_view_transform(self) -> StrongViewTransform:
        """T2 after T1: RandAugment over ``strong_transforms()``, then Cutout (one box of up to half the
        patch per axis, filled with its own mean intensity), written as ``STRONG_VIEW_KEY``."""
        steps = [RandAugmentTransform(self.strong_transforms(), self.strong_ops_per_sample)]
        if self.strong_cutout:
            sides = tuple((1, max(1, int(p) // 2) + 1) for p in self.configuration_manager.patch_size)
            steps.append(BlankRectangleTransform(sides, torch.mean, num_rectangles=1, p_per_channel=1))
        return StrongViewTransform(ComposeTransforms(steps))

    def get_unlabeled_transforms(self):
        """nnU-Net's pipeline (the weak view, ``data``), then the strong view as an extra image key: both
        are made in the unlabeled loader's workers."""
        pipeline = ComposeTransforms([super().get_unlabeled_transforms(), self.strong_view_transform()])
        pipeline.extra_image_keys = (STRONG_VIEW_KEY,)
        return pipeline

    def views(self, batch_u: dict) -> Tuple[torch.Tensor, torch.Tensor]:
        """(T1(x_u), T2(x_u)): the delivered patch and its strong view from the workers, both
        (B, C_in, *P) on the device, voxel-aligned (module doc)."""
        if STRONG_VIEW_KEY not in batch_u:
            raise UserFacingError(f"the unlabeled batch of {type(self).__name__} has no strong view "
                                  f"('{STRONG_VIEW_KEY}'): an override of get_unlabeled_transforms() must build on "
                                  f"super().get_unlabeled_transforms()")
        return batch_u["data"], batch_u[STRONG_VIEW_KEY].to(batch_u["data"].device, non_blocking=True)

    # ------------------------------------------------------------------ pieces
    def needs_discriminator(self) -> bool:
        return self.gating == "discriminator"

    def build_discriminator(self):
        """D(image, one-hot mask) -> one logit per sample."""
        cm = self.configuration_manager
        return ConvDiscriminator(self.num_input_channels + self.label_manager.num_segmentation_heads,
                                 len(cm.patch_size), self.discriminator_features,
                                 plan_strides(cm, len(self.discriminator_features)), head="image",
                                 negative_slope=self.discriminator_negative_slope)

    def discriminator_pairs(self, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, C_in + C, *P): image channels and the one-hot of integer ``labels`` (B, *P)."""
        return torch.cat([image, labels_to_one_hot(labels, self.label_manager.num_segmentation_heads,
                                                   image.dtype, has_channel_axis=False)], 1)

    def discriminator_labeled_batch(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """D's labeled images, their ground truth and the segmenter's own prediction of this step (no
        gradient), (n, C_in, *P), (n, *P), (n, *P): the labeled patches that are random crops, i.e. the
        first round(B (1 - oversample_foreground_percent)) of the batch (nnU-Net's loader forces
        foreground into the last ones), so that D's labeled pairs are cropped like the unlabeled ones."""
        n = random_crop_count(self.labeled_step["data"].shape[0], self.oversample_foreground_percent)
        with torch.no_grad():
            prediction = full_resolution(self.labeled_step["output"])[:n].argmax(1)
        return self.labeled_step["data"][:n], self.labeled_segmentation()[:n, 0], prediction

    def gate(self, probs_weak: torch.Tensor, valid: torch.Tensor,
             discriminator_scores: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, *P) mask of the pseudo-labels used; probs_weak (B, C, *P), scores (B,) or None."""
        if self.gating == "discriminator":
            return score_gate(discriminator_scores, self.tau, probs_weak[:, 0])
        if self.gating == "identity":
            return identity_gate(probs_weak, valid)
        if self.gating == "mean_confidence":
            return mean_confidence_gate(probs_weak, self.tau, valid)
        return confidence_map_gate(probs_weak, self.tau, valid)

    def discriminator_step_loss(self, x_weak: torch.Tensor, y_hat: torch.Tensor):
        """One forward of D on [labeled truth | labeled prediction | unlabeled prediction] pairs:
        (L_D, the unlabeled pairs' scores D (B_u,) detached, logs)."""
        x_l, y_l, p_l = self.discriminator_labeled_batch()
        n = x_l.shape[0]
        logits = self.discriminator(torch.cat([self.discriminator_pairs(x_l, y_l), self.discriminator_pairs(x_l, p_l),
                                               self.discriminator_pairs(x_weak, y_hat)]))
        truth, predicted_l, predicted_u = logits[:n], logits[n:2 * n], logits[2 * n:]
        negatives = {"labeled": predicted_l, "unlabeled": predicted_u,
                     "both": torch.cat([predicted_l, predicted_u])}[self.discriminator_negatives]
        # eq. 1 (line 8), see module doc; n = 0 (a DDP process whose labeled share is all oversampled):
        # the empty sets add 0, and the process still takes part in the discriminator's collective step
        # (DDP: the processes' shares of labeled random crops differ, so each mean is weighted to make
        # the averaged gradient the union's, see nnunet_sud.trainers.distributed)
        l_d = segmatch_discriminator_loss(truth, negatives, union_mean_weights([n, negatives.shape[0]]))
        d = torch.sigmoid(logits.detach().float())
        logs = {"discriminator_loss": float(l_d.detach()), "discriminator_score": float(d[2 * n:].mean()),
                "discriminator_score_truth": float(d[:n].mean()) if n else float("nan"),
                "discriminator_score_prediction": float(d[n:2 * n].mean()) if n else float("nan")}
        return l_d, d[2 * n:], logs

    # ------------------------------------------------------------------ the step
    def unlabeled_loss(self, batch_u: dict) -> Tuple[torch.Tensor, Dict[str, float]]:
        x_weak, x_strong = self.views(batch_u)
        valid = batch_u["valid"]
        with torch.no_grad():
            p_weak = torch.softmax(full_resolution(self.network(x_weak)).float(), 1)
        y_hat = p_weak.argmax(1)                                                     # pseudo-label (line 5)
        logs = {k: float("nan") for k in self.extra_log_keys}
        scores = None
        if self.discriminator is not None:
            l_d, scores, d_logs = self.discriminator_step_loss(x_weak, y_hat)
            self.queue_discriminator_loss(l_d)                                       # stepped after theta_M
            logs.update(d_logs)
        m = self.gate(p_weak, valid, scores)
        l_u = gated_cross_entropy(full_resolution(self.network(x_strong)), y_hat, m, valid)  # line 6
        self.record_target_quality(batch_u, {"pseudo_label": m}, prediction=p_weak, pseudo_label=y_hat)
        v = valid.float()
        logs["pseudo_label_fraction"] = float((m * v).sum() / v.sum().clamp_min(1.0))  # the gate fraction
        return l_u, logs


def random_crop_count(batch_size: int, oversample_foreground_percent: float) -> int:
    """How many samples of a batch of nnU-Net's loader are random crops: the first
    round(B (1 - p)); the others are forced to contain foreground (``_oversample_last_XX_percent``)."""
    return int(round(batch_size * (1 - oversample_foreground_percent)))


class nnUNetTrainerSegMatch_identity(nnUNetTrainerSegMatch):
    """D(x, y) = y: every pseudo-label is used (consistency loss only)."""
    gating = "identity"
    extra_log_keys = ("pseudo_label_fraction",)


class nnUNetTrainerSegMatch_meanConfidence(nnUNetTrainerSegMatch):
    """FixMatch for segmentation: a sample's pseudo-label is used if its mean confidence > tau."""
    gating = "mean_confidence"
    tau = 0.95
    extra_log_keys = ("pseudo_label_fraction",)


class nnUNetTrainerSegMatch_confidenceMap(nnUNetTrainerSegMatch):
    """Per voxel: a voxel's pseudo-label is used if its confidence > tau."""
    gating = "confidence_map"
    tau = 0.95
    extra_log_keys = ("pseudo_label_fraction",)


class nnUNetTrainerSegMatch_eq1Negatives(nnUNetTrainerSegMatch):
    """D's negatives as eq. 1 writes them: the unlabeled (image, pseudo-label) pairs (module doc)."""
    discriminator_negatives = "unlabeled"
