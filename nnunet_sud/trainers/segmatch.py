"""SegMatch: weak/strong consistency with discriminator-gated pseudo-labels, as an nnU-Net trainer.

Motaghi et al., "SegMatch: Semi-supervised semantic segmentation" (seed 003), §3, Algorithm 1.
Per step, with a labeled batch (x_l, y_l) and an unlabeled batch x_u:

    L_s   = nnU-Net's loss on (x_l, y_l)                                     (line 4)
    p_w   = softmax M(T1(x_u)),  Y_hat = argmax p_w       (no gradient)       (line 5)
    m     = gate(x_u, Y_hat)     discriminator: [D(T1(x_u), Y_hat) > tau]     (line 5, §3.3)
    L_u   = sum m valid CE(M(T2(x_u)), Y_hat) / sum valid                    (line 6)
    theta_M <- step on L_s + lambda_u L_u                                    (line 7)
    L_D   = -mean log D(x_l, y_l) - mean log(1 - D(T1(x_u), Y_hat))          (line 8, eq. 1)
    theta_D <- step on L_D                                                   (line 9)

The two views, and why they are aligned exactly
    T1 (weak) is the unlabeled patch exactly as nnU-Net's training pipeline delivers it
    (``batch_u['data']``): a random crop (the paper's random shift) that is mirrored with p = 0.5
    per axis (its random flip) -- plus nnU-Net's own rare rotation/scaling and mild intensity
    augmentations, i.e. the same distribution as the labeled patches. T2 (strong) is T1 followed
    by extra *intensity-only* transforms applied to the tensor (``StrongIntensityAugmentation``:
    RandAugment-style, two random ops of random magnitude per sample, then Cutout, as FixMatch).
    None of them moves a voxel, so T1 T2^-1 in line 6 is the identity: the strong prediction and
    the pseudo-label are compared voxel by voxel with no resampling (no interpolation error, no
    voxels lost at the borders). Geometric strong transforms are left out on purpose: nnU-Net
    already applies rotation/scaling/mirroring before both views.

The discriminator (``ConvDiscriminator``, head "image": strided convs of the plans' first
strides, LeakyReLU, global average -> one logit per sample) reads the image channels and the
one-hot mask. Labeled pairs use the one-hot ground truth; unlabeled pairs the one-hot of the
pseudo-label Y_hat (not the softmax): with soft masks a discriminator could tell the two sets
apart by softness alone instead of by how well the mask fits the image, and the paper gates
on D(X, Y) with Y_hat = argmax(Y). The same forward gives the gate (detached) and L_D.
Its own Adam optimiser (lr 1e-4, poly decay; the paper gives none) lives beside the segmenter;
its state goes into the checkpoint's extra state (``DiscriminatorMixin``), not into
``network_weights``: inference is the plain segmenter.

Hyper-parameters: tau = 0.5 for the discriminator (D > 0.5: "more likely a ground-truth pair"),
0.95 for the confidence gates (FixMatch's default); lambda_u = 1 (constant, FixMatch).
Variants (§3.3's other choices of the "discriminator"): ``_identity`` (all pseudo-labels:
plain consistency), ``_meanConfidence`` (FixMatch per sample), ``_confidenceMap`` (per voxel).
Deep supervision: L_u on the full-resolution output only (the paper has none); nnU-Net's loss
keeps its deep supervision.
"""
# the trainers, registered in nnunet_sud.trainers
__all__ = [
    "nnUNetTrainerSegMatch",
    "nnUNetTrainerSegMatch_identity",
    "nnUNetTrainerSegMatch_meanConfidence",
    "nnUNetTrainerSegMatch_confidenceMap",
]

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from nnunet_sud.errors import UserFacingError
from nnunet_sud.losses.adversarial import segmatch_discriminator_loss
from nnunet_sud.losses.pseudo_labels import (confidence_map_gate, gated_cross_entropy, identity_gate,
                                             mean_confidence_gate, score_gate)
from nnunet_sud.network_helpers import full_resolution, labels_to_one_hot
from nnunet_sud.schedules import Constant
from nnunet_sud.trainers.discriminator import ConvDiscriminator, DiscriminatorMixin, plan_strides
from nnunet_sud.trainers.labeled_batch import LabeledBatchMixin
from nnunet_sud.trainers.semi_supervised import nnUNetTrainerSemiSupervised
from nnunet_sud.trainers.settings import DerivedDefault


# ---------------------------------------------------------------------- the strong view
def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of x (C, *S) with a symmetric kernel and reflect padding:
    zero phase, so a linear ramp is returned unchanged away from the borders (no shift)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    dim = x.ndim - 1
    conv = F.conv3d if dim == 3 else F.conv2d
    out = x[:, None]  # (C, 1, *S): channels as batch
    for ax in range(dim):
        n = out.shape[2 + ax]
        r = min(radius, n - 1)
        kk = k[radius - r: radius + r + 1] if r < radius else k
        kk = kk / kk.sum()
        shape = [1, 1] + [1] * dim
        shape[2 + ax] = kk.numel()
        pad = [0, 0] * dim
        pad[2 * (dim - 1 - ax)] = pad[2 * (dim - 1 - ax) + 1] = r
        if r > 0:
            out = conv(F.pad(out, pad, mode="reflect"), kk.view(shape))
    return out[:, 0]


def _rescale01(x: torch.Tensor):
    """Per channel min-max rescaling of x (C, *S) to [0, 1]; returns (y, lo, span)."""
    flat = x.flatten(1)
    lo = flat.amin(1).view(-1, *([1] * (x.ndim - 1)))
    span = (flat.amax(1).view_as(lo) - lo).clamp_min(1e-8)
    return (x - lo) / span, lo, span


class StrongIntensityAugmentation:
    """Intensity-only strong augmentation of a batch of image patches (RandAugment-style).

    For each sample: ``n_ops`` ops drawn without replacement from ``ops``, each with a magnitude
    m ~ U(0, 1) (FixMatch's RandAugment with random magnitudes), then Cutout if ``cutout``.
    Ops (x: one sample (C, *S) of nnU-Net-normalised intensities, per channel):

        brightness   x * (1 + 0.5 m u),                     u ~ U(-1, 1)
        contrast     (x - mean) (1 + 0.75 m u) + mean
        gamma        rescaled to [0, 1] per channel, ^ exp(m u ln 3), rescaled back
        posterize    rescaled to [0, 1], quantised to round(2^(8 - 6 m)) levels, rescaled back
        noise        x + N(0, (0.5 m std)^2)
        blur         Gaussian, sigma = 0.5 + 1.5 m voxels (symmetric kernel, reflect padding)
        sharpen      x + (0.5 + 1.5 m) (x - blur_1(x))      (unsharp mask)
        cutout       a box of up to half the patch per axis at a random place set to the mean

    Every op maps voxel v to voxel v (pointwise maps, zero-phase filters, additive noise, a fill):
    the augmented patch is aligned with its input voxel for voxel.

    Args:
        ops: names of the ops to draw from.
        n_ops: ops per sample (RandAugment's N).
        cutout: apply Cutout after the ops (FixMatch's strong augmentation).
        cutout_max_fraction: largest box side as a fraction of the patch side.
    ``__call__(x, generator=None)``: x (B, C, *S) -> augmented copy (B, C, *S), same dtype/device
    (``generator``: None or a CPU ``torch.Generator``, for reproducible draws in tests).
    """

    ALL_OPS = ("brightness", "contrast", "gamma", "posterize", "noise", "blur", "sharpen")

    def __init__(self, ops: Sequence[str] = ALL_OPS, n_ops: int = 2, cutout: bool = True,
                 cutout_max_fraction: float = 0.5):
        unknown = [o for o in ops if o not in self.ALL_OPS]
        if unknown:
            raise ValueError(f"unknown strong augmentation ops {unknown}; choose from {self.ALL_OPS}")
        if not 0 <= n_ops <= len(ops):
            raise ValueError(f"n_ops must be in [0, {len(ops)}], got {n_ops}")
        self.ops = tuple(ops)
        self.n_ops = int(n_ops)
        self.cutout = bool(cutout)
        self.cutout_max_fraction = float(cutout_max_fraction)

    def __repr__(self):
        return (f"{type(self).__name__}(ops={self.ops}, n_ops={self.n_ops}, cutout={self.cutout}, "
                f"cutout_max_fraction={self.cutout_max_fraction})")

    @staticmethod
    def _rand(generator, *shape):
        """Op parameters are drawn on the CPU (``generator``: None or a CPU torch.Generator)."""
        return torch.rand(shape, generator=generator)

    def apply_op(self, name: str, x: torch.Tensor, m: float, generator: Optional[torch.Generator] = None):
        """One op on one sample x (C, *S) with magnitude m in [0, 1]."""
        u = float(self._rand(generator, 1)) * 2 - 1
        per_channel = (-1,) + (1,) * (x.ndim - 1)
        if name == "brightness":
            return x * (1 + 0.5 * m * u)
        if name == "contrast":
            mean = x.flatten(1).mean(1).view(per_channel)
            return (x - mean) * (1 + 0.75 * m * u) + mean
        if name == "gamma":
            y, lo, span = _rescale01(x)
            return y.pow(math.exp(m * u * math.log(3.0))) * span + lo
        if name == "posterize":
            y, lo, span = _rescale01(x)
            levels = max(2, int(round(2 ** (8 - 6 * m))))
            return torch.round(y * (levels - 1)) / (levels - 1) * span + lo
        if name == "noise":
            std = x.flatten(1).std(1).view(per_channel)
            n = torch.randn_like(x) if generator is None else torch.randn(x.shape, generator=generator).to(x)
            return x + 0.5 * m * std * n
        if name == "blur":
            return _gaussian_blur(x, 0.5 + 1.5 * m)
        if name == "sharpen":
            return x + (0.5 + 1.5 * m) * (x - _gaussian_blur(x, 1.0))
        raise ValueError(name)

    def cutout_box(self, spatial: Sequence[int], generator: Optional[torch.Generator] = None):
        """Random box (per axis: start, stop) with sides in [1, max_fraction * n]."""
        box = []
        for n in spatial:
            side = max(1, int(round(float(self._rand(generator, 1)) * self.cutout_max_fraction * n)))
            start = int(float(self._rand(generator, 1)) * (n - side + 1))
            box.append((start, start + side))
        return box

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # an input transform: full precision (blur convs)
            return self._augment(x, generator)

    def _augment(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        out = []
        for xb in x:
            y = xb
            if self.n_ops:
                order = torch.randperm(len(self.ops), generator=generator)
                for i in order[:self.n_ops].tolist():
                    y = self.apply_op(self.ops[i], y, float(self._rand(generator, 1)), generator)
            if self.cutout:
                box = self.cutout_box(y.shape[1:], generator)
                y = y.clone()
                fill = y.flatten(1).mean(1)
                region = (slice(None),) + tuple(slice(a, b) for a, b in box)
                y[region] = fill.view(-1, *([1] * (y.ndim - 1))).expand_as(y[region])
            out.append(y.to(x.dtype))
        return torch.stack(out)


# ---------------------------------------------------------------------- the trainer
class nnUNetTrainerSegMatch(DiscriminatorMixin, LabeledBatchMixin, nnUNetTrainerSemiSupervised):
    """SegMatch (module doc). Variants change ``gating``/``tau``."""

    #: which pseudo-labels count: "discriminator", "identity", "mean_confidence", "confidence_map"
    gating: str = "discriminator"
    #: threshold tau of the gate
    tau: float = 0.5
    #: lambda_u, weight of L_u (constant)
    lambda_u: float = 1.0
    #: the weight schedule: Constant(lambda_u), read when used (a variant may change lambda_u late)
    unlabeled_weight = DerivedDefault(lambda t: Constant(t.lambda_u))
    #: discriminator: channels of its strided convs, LeakyReLU slope; optimiser in DiscriminatorMixin
    discriminator_features: Tuple[int, ...] = (32, 64, 128)
    discriminator_negative_slope: float = 0.2
    discriminator_lr: float = 1e-4

    extra_log_keys = ("pseudo_label_fraction", "discriminator_score", "discriminator_loss")
    GATES = ("discriminator", "identity", "mean_confidence", "confidence_map")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.check_settings()
        if self.label_manager.has_regions:
            raise UserFacingError(f"{type(self).__name__} needs mutually exclusive classes (argmax pseudo-labels), "
                                  f"but this dataset.json defines region-based labels. Use plain integer labels.")
        self.unlabeled_weight = None  # Constant(lambda_u)
        self.strong_augmentation = StrongIntensityAugmentation()

    def check_settings(self):
        super().check_settings()
        if self.gating not in self.GATES:
            raise UserFacingError(f"{type(self).__name__}.gating must be one of {self.GATES}, got {self.gating!r}")

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

    def views(self, batch_u: dict) -> Tuple[torch.Tensor, torch.Tensor]:
        """(T1(x_u), T2(x_u)): the delivered patch and its intensity-only strong augmentation,
        both (B, C_in, *P), voxel-aligned (module doc)."""
        weak = batch_u["data"]
        return weak, self.strong_augmentation(weak)

    def discriminator_pairs(self, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, C_in + C, *P): image channels and the one-hot of integer ``labels`` (B, *P)."""
        return torch.cat([image, labels_to_one_hot(labels, self.label_manager.num_segmentation_heads,
                                                   image.dtype, has_channel_axis=False)], 1)

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

    # ------------------------------------------------------------------ the step
    def unlabeled_loss(self, batch_u: dict) -> Tuple[torch.Tensor, Dict[str, float]]:
        x_weak, x_strong = self.views(batch_u)
        valid = batch_u["valid"]
        with torch.no_grad():
            p_weak = torch.softmax(full_resolution(self.network(x_weak)).float(), 1)
        y_hat = p_weak.argmax(1)                                                     # pseudo-label (line 5)
        logs = {"discriminator_score": float("nan"), "discriminator_loss": float("nan")}
        scores = None
        if self.discriminator is not None:
            pairs = torch.cat([self.discriminator_pairs(self.labeled_step["data"], self.labeled_segmentation()[:, 0]),
                               self.discriminator_pairs(x_weak, y_hat)])
            logits = self.discriminator(pairs)
            n_l = self.labeled_step["data"].shape[0]
            l_d = segmatch_discriminator_loss(logits[:n_l], logits[n_l:])             # eq. 1 (line 8)
            self.queue_discriminator_loss(l_d)                                       # stepped after theta_M
            scores = torch.sigmoid(logits[n_l:].detach().float())
            logs.update(discriminator_score=float(scores.mean()), discriminator_loss=float(l_d.detach()))
        m = self.gate(p_weak, valid, scores)
        l_u = gated_cross_entropy(full_resolution(self.network(x_strong)), y_hat, m, valid)  # line 6
        self.record_target_quality(batch_u, {"pseudo_label": m}, prediction=p_weak, pseudo_label=y_hat)
        v = valid.float()
        logs["pseudo_label_fraction"] = float((m * v).sum() / v.sum().clamp_min(1.0))
        return l_u, logs


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
