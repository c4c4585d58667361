"""The label-map denoiser network: an nnU-Net-planned auto-encoder without skip connections.

SUD (Young et al., "SUD: Supervision by Denoising for Medical Image Segmentation",
2022) §3.4 and Fig. 6: "Our denoisers share
the same structure as our U-Net segmenters except for their lack of skip connections." A U-Net
denoiser could copy its input through the skips and only learn to subtract the noise; an
auto-encoder has to reconstruct the label map from the bottleneck, i.e. it learns the latent
space (shape prior) of plausible segmentations.

How the structure is taken from the plans
    The encoder is *the configuration's own encoder*: the plans' ``network_arch_class_name``
    (``PlainConvUNet``, ``ResidualEncoderUNet``, ...) is built with nnU-Net's
    ``get_network_from_plans`` and its ``.encoder`` is kept (same stages, strides, kernels,
    features, norm, dropout, nonlinearity, stem). Only the number of input channels differs:
    the denoiser reads a map over the ``C`` classes, not the image channels.
    The decoder (``SkipFreeDecoder``) mirrors dynamic_network_architectures' ``UNetDecoder``
    stage by stage -- transposed convolution with kernel = stride = the encoder stride, then the
    plans' ``n_conv_per_stage_decoder`` conv-norm-nonlin blocks with the encoder's kernel sizes --
    but each stage takes only the upsampled features (single width, no concatenation).

Deviation from the paper: Fig. 6 of SUD uses max pooling / unpooling in the denoiser; here the
denoiser keeps nnU-Net's strided convolutions and transposed convolutions so that it is
"nnU-Net planned" for any plans (same receptive field and down-sampling as the segmenter).

Deep supervision: supported exactly like nnU-Net's decoder. With
``decoder.deep_supervision = True`` (what nnU-Net's ``set_deep_supervision_enabled`` sets)
the forward returns a list of logits, full resolution first, one per decoder stage; with
``False`` it returns the full-resolution logits only. The 1x1 output convolutions of all
stages always exist, so weights load either way.

Tensor shapes (``C`` = number of classes incl. background, spatial = 2 or 3 axes):
    input  (B, C, *patch)  a probability map (softmax or one-hot encoding, see corruption.py)
    output (B, C, *patch)  logits; or a list [(B, C, *patch), (B, C, *patch / stride_1), ...]
"""
from typing import List, Sequence, Union

import torch
from torch import nn

from nnunet_sud.errors import UserFacingError


class SkipFreeDecoder(nn.Module):
    """Decoder of the label auto-encoder: the mirror of an nnU-Net encoder, without skips.

    Stage ``s`` (``s = 1 .. n_stages - 1``, lowest resolution first) does
    ``ConvTranspose(features[-s] -> features[-(s+1)], kernel = stride = strides[-s])`` then
    ``n_conv_per_stage[s-1]`` blocks ``conv(kernel_sizes[-(s+1)]) - norm - nonlin`` at
    ``features[-(s+1)]`` channels, and (for deep supervision) a 1x1 conv to ``num_classes``.

    ``forward(z)`` takes the bottleneck ``z`` (B, features[-1], *bottleneck) or the list that an
    nnU-Net encoder with ``return_skips=True`` returns, of which only the last entry (the
    bottleneck) is read: no intermediate encoder feature reaches the decoder.
    """

    def __init__(self, encoder: nn.Module, num_classes: int,
                 n_conv_per_stage: Union[int, Sequence[int]], deep_supervision: bool,
                 nonlin_first: bool = False):
        super().__init__()
        from dynamic_network_architectures.building_blocks.helper import get_matching_convtransp
        from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks

        features = list(encoder.output_channels)
        n_stages = len(features)
        if isinstance(n_conv_per_stage, int):
            n_conv_per_stage = [n_conv_per_stage] * (n_stages - 1)
        if len(n_conv_per_stage) != n_stages - 1:
            raise ValueError(f"n_conv_per_stage needs {n_stages - 1} entries (encoder stages - 1), "
                             f"got {list(n_conv_per_stage)}")
        self.deep_supervision = deep_supervision
        self.num_classes = num_classes
        transpconv_op = get_matching_convtransp(conv_op=encoder.conv_op)
        transpconvs, stages, seg_layers = [], [], []
        for s in range(1, n_stages):
            below, here = features[-s], features[-(s + 1)]
            stride = encoder.strides[-s]
            transpconvs.append(transpconv_op(below, here, stride, stride, bias=encoder.conv_bias))
            stages.append(StackedConvBlocks(
                n_conv_per_stage[s - 1], encoder.conv_op, here, here, encoder.kernel_sizes[-(s + 1)], 1,
                encoder.conv_bias, encoder.norm_op, encoder.norm_op_kwargs, encoder.dropout_op,
                encoder.dropout_op_kwargs, encoder.nonlin, encoder.nonlin_kwargs, nonlin_first))
            seg_layers.append(encoder.conv_op(here, num_classes, 1, 1, 0, bias=True))
        self.transpconvs = nn.ModuleList(transpconvs)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(seg_layers)

    def forward(self, z: Union[torch.Tensor, List[torch.Tensor]]):
        x = z[-1] if isinstance(z, (list, tuple)) else z
        outputs = []
        last = len(self.stages) - 1
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(up(x))
            if self.deep_supervision or s == last:
                outputs.append(self.seg_layers[s](x))
        outputs = outputs[::-1]  # full resolution first, as nnU-Net's loss expects
        return outputs if self.deep_supervision else outputs[0]


class LabelDenoiserAE(nn.Module):
    """Skip-free auto-encoder ``a(.)`` of SUD §3.4: ``decoder(encoder(x)[-1])``.

    ``encoder`` is the planned nnU-Net encoder (it may return all stage outputs, as inside a
    U-Net; only the bottleneck is passed on), ``decoder`` a ``SkipFreeDecoder``.
    ``encode(x)`` gives the bottleneck latents (B, features[-1], *bottleneck), e.g. for latent
    penalties (SUD^2); ``decode(z)`` maps latents to logits.
    """

    def __init__(self, encoder: nn.Module, decoder: SkipFreeDecoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    @property
    def num_classes(self) -> int:
        return self.decoder.num_classes

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        return z[-1] if isinstance(z, (list, tuple)) else z

    def decode(self, z: torch.Tensor):
        return self.decoder(z)

    def forward(self, x: torch.Tensor):
        return self.decoder(self.encoder(x))


def build_label_denoiser(plans_manager, configuration_manager, num_classes: int,
                         deep_supervision: bool = False, allow_init: bool = True) -> LabelDenoiserAE:
    """Build the skip-free auto-encoder for one configuration of the plans.

    ``num_classes`` is both the number of input and of output channels (the label manager's
    ``num_segmentation_heads``). Works for 2d and 3d configurations and for any architecture
    class whose network exposes an nnU-Net style ``.encoder`` (``output_channels``, ``strides``,
    ``kernel_sizes``, ``conv_op``, norm/dropout/nonlin attributes) -- PlainConvUNet and
    ResidualEncoderUNet do. Weights are initialised with the planned class's ``initialize``
    (He init for nnU-Net's U-Nets) when ``allow_init``.
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch_name = configuration_manager.network_arch_class_name
    arch_kwargs = configuration_manager.network_arch_init_kwargs
    planned = get_network_from_plans(arch_name, arch_kwargs,
                                     configuration_manager.network_arch_init_kwargs_req_import,
                                     num_classes, num_classes, allow_init=False, deep_supervision=False)
    encoder = getattr(planned, "encoder", None)
    needed = ("output_channels", "strides", "kernel_sizes", "conv_op", "norm_op", "nonlin", "conv_bias")
    if encoder is None or any(not hasattr(encoder, a) for a in needed):
        raise UserFacingError(
            f"The label-map denoiser is built from the plans' encoder, but {arch_name} has no nnU-Net style "
            f"encoder (needs .encoder with {', '.join(needed)}). Use plans with PlainConvUNet or "
            f"ResidualEncoderUNet (nnUNetPlans or the nnUNetResEnc* presets).")
    n_dec = arch_kwargs.get("n_conv_per_stage_decoder", 2)
    decoder = SkipFreeDecoder(encoder, num_classes, n_dec, deep_supervision,
                              nonlin_first=bool(arch_kwargs.get("nonlin_first", False)))
    model = LabelDenoiserAE(encoder, decoder)
    if allow_init:
        init = getattr(type(planned), "initialize", None)
        if init is None:
            from dynamic_network_architectures.initialization.weight_init import InitWeights_He
            init = InitWeights_He(1e-2)
        model.apply(init)
    del planned
    return model
