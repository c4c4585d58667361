"""DMNet: a shared encoder, two different decoders, Dice-difference minimisation on unlabeled
data and an FCN discriminator, as an nnU-Net trainer.

Fang & Li, "DMNet: Difference Minimization Network for Semi-supervised Segmentation in Medical
Images" (MICCAI 2020), §3. Per step, with a labeled batch (X, Y) and an unlabeled batch U:

    Y1, Y2 = softmax of decoder 1 / decoder 2 (shared encoder)
    L_dice = sum_i L_seg(Y_i(X), Y)                                   §3.1 (per decoder)
    L_semi = 1 - 1/K sum_k 2 sum Sh(Y1(U)) Sh(Y2(U)) / sum (Sh(Y1(U)) + Sh(Y2(U)))   §3.2-3.3
             Sh = sharpen, T = 0.5
    L_adv  = sum_i L_bce(D(Y_i(O)), 1)        for O = X and O = U     §3.4
    L_S    = L_dice + lambda1 L_adv + lambda2 L_semi,  lambda1 = 0.01, lambda2 = 0.1     §3.5
    L_dis  = sum_i L_bce(D(Y_i(O)), 0) [+ L_bce(D(Y), 1) for O = X]   (D's own step)

In nnU-Net terms: ``L_sup + w L_unl`` of the base with L_sup = L_dice, L_unl = lambda1 L_adv +
lambda2 L_semi and w = 1 (constant, as the paper's lambdas).

What is nnU-Net's here, and the choices where the paper is silent or the transfer needed one:
* L_seg is nnU-Net's own loss (Dice + CE, deep supervision with nnU-Net's weights) on each
  decoder, summed (the paper: Dice alone, which beat CE alone in its Table 2; nnU-Net's
  default combines both). The logged ``train_losses`` is therefore the sum over two decoders.
* Decoder 1 is nnU-Net's planned ``UNetDecoder`` (transposed-convolution upsampling, the
  planned kernels). Decoder 2 (``InterpolationUNetDecoder``) has the same stages and skips but
  upsamples by a 1x1 projection and (tri/bi)linear interpolation, and its convolutions use the
  planned kernel shapes dilated by 2 (effective kernel 2k - 1: 5 where the plans say 3, same
  cost): a different architecture as the paper asks ("UNet" vs "DeepLab v3+"-style decoder),
  built from the plans for any configuration.
* L_semi, L_adv and L_dis use the full-resolution outputs only (the paper has no deep
  supervision); masked to valid voxels of the unlabeled patch. L_semi averages over all K
  classes (the paper's 1/K sum_k) and over the samples. L_bce is the mean over voxels (the
  paper writes the sum; the mean keeps lambda1 independent of the patch size).
* The discriminator (``ConvDiscriminator``, head "dense") is the paper's FCN: three 3x3(x3)
  convolutions with stride 2 (the plans' first three strides, so every planned patch size
  works; axes the plans do not down-sample stay), each followed by a ReLU, and three
  transposed convolutions back to the patch size (ReLU between them), one logit per voxel.
  Input: the soft masks Y_i (softmax) or the one-hot ground truth, as in the paper (no image).
  L_adv is computed with the discriminator frozen (gradient to the segmenter only); L_dis on
  detached masks, stepped after the segmenter.
* Optimisers: the segmenter keeps nnU-Net's (SGD, lr 1e-2, poly 0.9 per epoch). The
  discriminator uses the paper's own: Adam, lr 1e-5, weight decay 5e-5, poly decay with
  exponent 0.9 over the same epochs (stepped at each epoch start, as nnU-Net's). The paper's
  segmenter was Adam at 1e-4 (ratio D/segmenter 0.1); nnU-Net's SGD rate is not comparable
  to an Adam rate, so we keep the paper's absolute discriminator setting rather than a ratio.
* Inference: the average of the two decoders' softmaxes (§4.2), returned as logits
  log((softmax(o1) + softmax(o2)) / 2) by the network itself in eval mode, so
  ``nnUNetv2_predict`` and nnU-Net's validation need nothing else. Both decoders' weights
  are in ``network_weights``; the discriminator is in the checkpoint's extra state.

Variants (the paper's ablations, Table 3): ``_noAdv`` (DMNet wo adv), ``_noSharpen`` (DMNet wo
sharpen, T = 1), ``_noAdvNoSharpen``, and ``_supervised`` (Supervised DMNet without adv: the two
decoders on the labeled cases alone, the control that separates what the unlabeled data add from
what the two-decoder ensemble adds).
"""
# the trainers, registered in nnunet_sud.trainers
__all__ = [
    "nnUNetTrainerDMNet",
    "nnUNetTrainerDMNet_noAdv",
    "nnUNetTrainerDMNet_noSharpen",
    "nnUNetTrainerDMNet_noAdvNoSharpen",
    "nnUNetTrainerDMNet_supervised",
]

import math
from typing import NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_sud.errors import UserFacingError
from nnunet_sud.losses.adversarial import dmnet_adversarial_loss, dmnet_discriminator_loss
from nnunet_sud.losses.agreement import dice_difference_loss, sharpen
from nnunet_sud.network_helpers import full_resolution, labels_to_one_hot, require_exclusive_classes
from nnunet_sud.schedules import Constant
from nnunet_sud.trainers.discriminator import ConvDiscriminator, DiscriminatorMixin, plan_strides
from nnunet_sud.trainers.labeled_batch import LabeledBatchMixin
from nnunet_sud.trainers.semi_supervised import nnUNetTrainerSemiSupervised

Output = Union[torch.Tensor, Sequence[torch.Tensor]]


# ---------------------------------------------------------------------- the network
class DilatedConvNormNonlin(nn.Module):
    """conv (kernel k, dilation d, 'same' padding) -> [dropout] -> norm -> nonlin (or nonlin before norm)."""

    def __init__(self, conv_op, in_channels: int, out_channels: int, kernel_size: Sequence[int], dilation: int,
                 conv_bias: bool, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs,
                 nonlin_first: bool = False):
        super().__init__()
        kernel_size = [int(k) for k in kernel_size]
        padding = [dilation * (k - 1) // 2 for k in kernel_size]
        ops = [conv_op(in_channels, out_channels, kernel_size, 1, padding, dilation=dilation, bias=conv_bias)]
        if dropout_op is not None:
            ops.append(dropout_op(**(dropout_op_kwargs or {})))
        norm = norm_op(out_channels, **(norm_op_kwargs or {})) if norm_op is not None else None
        act = nonlin(**(nonlin_kwargs or {})) if nonlin is not None else None
        tail = [m for m in ((act, norm) if nonlin_first else (norm, act)) if m is not None]
        self.all_modules = nn.Sequential(*ops, *tail)

    def forward(self, x):
        return self.all_modules(x)


class InterpolationUNetDecoder(nn.Module):
    """DMNet's second decoder, built from an nnU-Net encoder like ``UNetDecoder`` but different:

    stage s (lowest resolution first): 1x1 conv features[-s] -> features[-(s+1)] at the low
    resolution, (tri/bi)linear interpolation to the skip's size, concatenation with the skip,
    then ``n_conv_per_stage[s-1]`` conv-norm-nonlin blocks with the encoder's kernel shapes
    dilated by ``dilation``; a 1x1 segmentation layer per stage (deep supervision as
    ``UNetDecoder``: a list, full resolution first, when ``deep_supervision``).
    ``forward(skips)`` takes the encoder's stage outputs (bottleneck last).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, n_conv_per_stage: Union[int, Sequence[int]],
                 deep_supervision: bool, dilation: int = 2, nonlin_first: bool = False):
        super().__init__()
        features = list(encoder.output_channels)
        n_stages = len(features)
        if isinstance(n_conv_per_stage, int):
            n_conv_per_stage = [n_conv_per_stage] * (n_stages - 1)
        if len(n_conv_per_stage) != n_stages - 1:
            raise ValueError(f"n_conv_per_stage needs {n_stages - 1} entries, got {list(n_conv_per_stage)}")
        dim = len(encoder.strides[0])
        self.mode = {2: "bilinear", 3: "trilinear"}[dim]
        self.deep_supervision = deep_supervision
        self.num_classes = num_classes
        projections, stages, seg_layers = [], [], []
        for s in range(1, n_stages):
            below, here = features[-s], features[-(s + 1)]
            kernel = encoder.kernel_sizes[-(s + 1)]
            kernel = list(kernel) if isinstance(kernel, (list, tuple)) else [kernel] * dim
            projections.append(encoder.conv_op(below, here, 1, 1, 0, bias=encoder.conv_bias))
            blocks = [DilatedConvNormNonlin(encoder.conv_op, 2 * here if i == 0 else here, here, kernel, dilation,
                                            encoder.conv_bias, encoder.norm_op, encoder.norm_op_kwargs,
                                            encoder.dropout_op, encoder.dropout_op_kwargs, encoder.nonlin,
                                            encoder.nonlin_kwargs, nonlin_first)
                      for i in range(n_conv_per_stage[s - 1])]
            stages.append(nn.Sequential(*blocks))
            seg_layers.append(encoder.conv_op(here, num_classes, 1, 1, 0, bias=True))
        self.projections = nn.ModuleList(projections)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(seg_layers)

    def forward(self, skips: Sequence[torch.Tensor]):
        x = skips[-1]
        outputs = []
        last = len(self.stages) - 1
        for s in range(len(self.stages)):
            skip = skips[-(s + 2)]
            x = F.interpolate(self.projections[s](x), size=skip.shape[2:], mode=self.mode, align_corners=False)
            x = self.stages[s](torch.cat((x, skip), 1))
            if self.deep_supervision or s == last:
                outputs.append(self.seg_layers[s](x))
        outputs = outputs[::-1]
        return outputs if self.deep_supervision else outputs[0]


class DecoderPair(nn.Module):
    """The two decoders; ``deep_supervision`` reads decoder 1's and sets both (for nnU-Net's
    ``set_deep_supervision_enabled``, which sets ``network.decoder.deep_supervision``)."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first = first
        self.second = second

    @property
    def deep_supervision(self) -> bool:
        return self.first.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool):
        self.first.deep_supervision = enabled
        self.second.deep_supervision = enabled


class DecoderOutputs(NamedTuple):
    """Training-mode output of ``DualDecoderUNet``: each entry a logits tensor or a deep-supervision list."""
    first: Output
    second: Output


def average_decoder_logits(first: Output, second: Output) -> Output:
    """log((softmax(a) + softmax(b)) / 2) per output (and per deep-supervision scale), float32.

    Its softmax is the average of the two decoders' softmaxes (DMNet §4.2's inference).
    """
    if isinstance(first, (list, tuple)):
        return [average_decoder_logits(a, b) for a, b in zip(first, second)]
    both = torch.stack([torch.log_softmax(first.float(), 1), torch.log_softmax(second.float(), 1)])
    return torch.logsumexp(both, 0) - math.log(2.0)


class DualDecoderUNet(nn.Module):
    """Shared nnU-Net encoder + ``DecoderPair``.

    forward(x), x (B, C_in, *P):
        training mode   ``DecoderOutputs(first, second)`` (each (B, C, *P) or a DS list)
        eval mode       ``average_decoder_logits(first, second)``: (B, C, *P) logits whose
                        softmax is the mean of the decoders' softmaxes (a DS list if enabled)
    """

    def __init__(self, encoder: nn.Module, first: nn.Module, second: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = DecoderPair(first, second)

    def forward(self, x: torch.Tensor):
        skips = self.encoder(x)
        out = DecoderOutputs(self.decoder.first(skips), self.decoder.second(skips))
        if self.training:
            return out
        return average_decoder_logits(out.first, out.second)


class DualDecoderLoss(nn.Module):
    """nnU-Net's loss on each decoder, summed: L(o1, y) + L(o2, y) for ``DecoderOutputs``;
    L(o, y) for a single (averaged) output, as nnU-Net's validation step passes in eval mode."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    @property
    def weight_factors(self):
        return getattr(self.loss, "weight_factors", None)

    def forward(self, output, target):
        if isinstance(output, DecoderOutputs):
            return self.loss(output.first, target) + self.loss(output.second, target)
        return self.loss(output, target)


def build_dual_decoder_unet(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                            enable_deep_supervision: bool = True, dilation: int = 2) -> DualDecoderUNet:
    """nnU-Net's planned U-Net (its encoder and ``UNetDecoder``) plus an ``InterpolationUNetDecoder``."""
    planned = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                       num_output_channels, enable_deep_supervision)
    encoder, decoder = getattr(planned, "encoder", None), getattr(planned, "decoder", None)
    needed = ("output_channels", "strides", "kernel_sizes", "conv_op", "norm_op", "nonlin", "conv_bias")
    if encoder is None or decoder is None or any(not hasattr(encoder, a) for a in needed):
        raise UserFacingError(
            f"DMNet builds its second decoder from the plans' encoder, but "
            f"{configuration_manager.network_arch_class_name} has no nnU-Net style encoder/decoder. Use plans with "
            f"PlainConvUNet or ResidualEncoderUNet (nnUNetPlans or the nnUNetResEnc* presets).")
    kwargs = configuration_manager.network_arch_init_kwargs
    second = InterpolationUNetDecoder(encoder, num_output_channels, kwargs.get("n_conv_per_stage_decoder", 2),
                                      enable_deep_supervision, dilation, bool(kwargs.get("nonlin_first", False)))
    init = getattr(type(planned), "initialize", None)
    if init is None:
        from dynamic_network_architectures.initialization.weight_init import InitWeights_He
        init = InitWeights_He(1e-2)
    second.apply(init)
    return DualDecoderUNet(encoder, decoder, second)


class DualDecoderMixin:
    """DMNet's network for an nnU-Net trainer: ``DualDecoderUNet`` from the plans (also what
    ``nnUNetv2_predict`` builds) and nnU-Net's loss on each decoder, summed (``DualDecoderLoss``).
    Averaging two softmaxes needs mutually exclusive classes: region-based labels stop the constructor."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        require_exclusive_classes(self.label_manager, type(self).__name__)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_dual_decoder_unet(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                       enable_deep_supervision)

    def _build_loss(self):
        return DualDecoderLoss(super()._build_loss())


# ---------------------------------------------------------------------- the trainer
class nnUNetTrainerDMNet(DualDecoderMixin, DiscriminatorMixin, LabeledBatchMixin, nnUNetTrainerSemiSupervised):
    """DMNet (module doc). Variants change ``adversarial``/``temperature``."""

    #: the losses read batch_u['valid'] only: no case coordinates through the augmentation
    unlabeled_coordinates = False

    SETTINGS = ("lambda1", "lambda2", "temperature", "adversarial", "unlabeled_weight", "discriminator_lr",
                "discriminator_weight_decay", "discriminator_poly_exponent", "discriminator_features")
    #: w = 1 (constant): the lambdas are inside L_unl
    unlabeled_weight = Constant(1.0)
    #: lambda1 (L_adv) and lambda2 (L_semi) of L_S = L_dice + lambda1 L_adv + lambda2 L_semi
    lambda1: float = 0.01
    lambda2: float = 0.1
    #: sharpening temperature T (1: no sharpening)
    temperature: float = 0.5
    #: use the discriminator (L_adv, L_dis)
    adversarial: bool = True
    #: the paper's discriminator optimiser: Adam lr 1e-5, weight decay 5e-5, poly 0.9
    discriminator_lr: float = 1e-5
    discriminator_weight_decay: float = 5e-5
    discriminator_poly_exponent: float = 0.9
    discriminator_features = (32, 64, 128)

    extra_log_keys = ("dice_difference", "adversarial_loss", "discriminator_loss")

    def check_settings(self):
        super().check_settings()
        if not 0 < float(self.temperature) <= 1:
            raise UserFacingError(f"{type(self).__name__}.temperature (the sharpening temperature T of L_semi) must "
                                  f"be in (0, 1] (1: no sharpening), got {self.temperature!r}")

    def needs_discriminator(self) -> bool:
        return self.adversarial and self.lambda1 > 0

    def build_discriminator(self) -> nn.Module:
        cm = self.configuration_manager
        return ConvDiscriminator(self.label_manager.num_segmentation_heads, len(cm.patch_size),
                                 self.discriminator_features, plan_strides(cm, len(self.discriminator_features)),
                                 head="dense", negative_slope=0.0)

    @staticmethod
    def decoder_probabilities(output: DecoderOutputs):
        """[softmax(decoder 1), softmax(decoder 2)] at full resolution, float32, with gradient."""
        return [torch.softmax(full_resolution(o).float(), 1) for o in output]

    def unlabeled_loss(self, batch_u: dict):
        """lambda1 L_adv(X and U) + lambda2 L_semi(U); queues L_dis for the discriminator."""
        p_u = self.decoder_probabilities(self.network(batch_u["data"]))
        valid = batch_u["valid"]
        l_semi = dice_difference_loss(sharpen(p_u[0], self.temperature), sharpen(p_u[1], self.temperature), valid)
        self.record_target_quality(batch_u, decoder1=p_u[0], decoder2=p_u[1],
                                   average=(p_u[0].detach() + p_u[1].detach()) / 2)  # the inference output
        loss = self.lambda2 * l_semi
        logs = {"dice_difference": float(l_semi.detach()), "adversarial_loss": float("nan"),
                "discriminator_loss": float("nan")}
        if self.discriminator is not None:
            p_l = self.decoder_probabilities(self.labeled_step["output"])
            y = labels_to_one_hot(self.labeled_segmentation(), self.label_manager.num_segmentation_heads, p_l[0].dtype,
                                  has_channel_axis=True)
            n_l, n_u = p_l[0].shape[0], p_u[0].shape[0]
            m_u = valid[:, None]
            # L_dis: D sees detached masks; predicted -> 0, ground truth -> 1
            d = self.discriminator(torch.cat([p_l[0].detach(), p_l[1].detach(), y, p_u[0].detach(), p_u[1].detach()]))
            d_l1, d_l2, d_y, d_u1, d_u2 = torch.split(d, [n_l, n_l, n_l, n_u, n_u])
            l_dis = dmnet_discriminator_loss([d_l1, d_l2], d_y) + \
                dmnet_discriminator_loss([d_u1, d_u2], None, [m_u, m_u])
            self.queue_discriminator_loss(l_dis)
            # L_adv: the segmenter tries to make D say "ground truth"; D's weights get no gradient
            with self.frozen_discriminator() as disc:
                a = disc(torch.cat([p_l[0], p_l[1], p_u[0], p_u[1]]))
            a_l1, a_l2, a_u1, a_u2 = torch.split(a, [n_l, n_l, n_u, n_u])
            l_adv = dmnet_adversarial_loss([a_l1, a_l2]) + dmnet_adversarial_loss([a_u1, a_u2], [m_u, m_u])
            loss = loss + self.lambda1 * l_adv
            logs.update(adversarial_loss=float(l_adv.detach()), discriminator_loss=float(l_dis.detach()))
        return loss, logs


class nnUNetTrainerDMNet_noAdv(nnUNetTrainerDMNet):
    """DMNet wo adv (Table 3): no discriminator."""
    adversarial = False
    extra_log_keys = ("dice_difference",)


class nnUNetTrainerDMNet_noSharpen(nnUNetTrainerDMNet):
    """DMNet wo sharpen (Table 3): T = 1."""
    temperature = 1.0


class nnUNetTrainerDMNet_noAdvNoSharpen(nnUNetTrainerDMNet_noAdv):
    """DMNet wo adv wo sharpen (Table 3)."""
    temperature = 1.0


class nnUNetTrainerDMNet_supervised(DualDecoderMixin, nnUNetTrainer):
    """Supervised DMNet without adv (Table 3): DMNet's network and L_dice on the labeled cases alone.

    Shared encoder, decoder 1 and decoder 2 as ``nnUNetTrainerDMNet``; loss sum_i L_seg(Y_i(X), Y)
    (``DualDecoderLoss``), no unlabeled stream, no L_semi, no discriminator; inference averages the
    decoders' softmaxes. What DMNet gains over this trainer is what its unlabeled terms add; what
    this trainer gains over ``nnUNetTrainer`` is the second decoder's (an ensemble of two decoders).
    """
