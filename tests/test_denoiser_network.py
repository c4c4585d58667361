"""The skip-free auto-encoder built from nnU-Net plans: structure, no skip path, shapes."""
import copy
import os
import pydoc

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_sud.denoiser.network import LabelDenoiserAE, SkipFreeDecoder, build_label_denoiser
from nnunet_sud.errors import UserFacingError

C = 4  # synthetic dataset: background + 3 labels


@pytest.fixture(scope="module")
def plans(synthetic3d):
    return load_json(os.path.join(synthetic3d["preprocessed"], "nnUNetPlans.json"))


def _planned_unet(cm, n):
    return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import, n, n, allow_init=True,
                                  deep_supervision=False)


def _n_params(modules):
    return sum(p.numel() for m in modules for p in m.parameters())


def _resenc_plans(plans):
    """The 3d_fullres configuration turned into a ResidualEncoderUNet one (as the ResEnc presets plan)."""
    p = copy.deepcopy(plans)
    cfg = p["configurations"]["3d_fullres"]
    arch = cfg["architecture"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    kw = arch["arch_kwargs"]
    n = kw.pop("n_conv_per_stage")
    kw["n_blocks_per_stage"] = [1] + [2] * (len(n) - 1)
    return p


@pytest.mark.parametrize("cfg", ["2d", "3d_fullres"])
def test_encoder_is_the_planned_encoder_and_decoder_drops_exactly_the_skip_weights(plans, cfg):
    pm = PlansManager(plans)
    cm = pm.get_configuration(cfg)
    ae = build_label_denoiser(pm, cm, C)
    unet = _planned_unet(cm, C)
    # encoder: same modules, same parameter count and shapes as the segmenter's (input channels = C)
    assert type(ae.encoder) is type(unet.encoder)
    assert [tuple(p.shape) for p in ae.encoder.parameters()] == [tuple(p.shape) for p in unet.encoder.parameters()]
    assert list(ae.encoder.output_channels) == list(cm.network_arch_init_kwargs["features_per_stage"])
    assert [list(s) for s in ae.encoder.strides] == [list(s) for s in cm.network_arch_init_kwargs["strides"]]
    # decoder: nnU-Net's UNetDecoder minus the skip half of each stage's first convolution
    dec_unet = _n_params([unet.decoder.stages, unet.decoder.transpconvs, unet.decoder.seg_layers])
    feats = ae.encoder.output_channels
    kernels = ae.encoder.kernel_sizes
    skip_weights = sum(feats[-(s + 1)] * feats[-(s + 1)] * int(np.prod(kernels[-(s + 1)]))
                       for s in range(1, len(feats)))
    assert _n_params([ae.decoder]) == dec_unet - skip_weights
    # every decoder stage's first conv reads single-width input
    for s, stage in enumerate(ae.decoder.stages, start=1):
        first = next(m for m in stage.modules() if isinstance(m, ae.encoder.conv_op))
        assert first.in_channels == feats[-(s + 1)]
    # norm / nonlinearity as planned
    norm_cls = pydoc.locate(cm.network_arch_init_kwargs["norm_op"])
    convs = [m for m in ae.decoder.stages.modules() if isinstance(m, ae.encoder.conv_op)]
    assert sum(isinstance(m, norm_cls) for m in ae.decoder.modules()) == len(convs)
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in ae.decoder.modules()) == len(convs)


@pytest.mark.parametrize("cfg", ["2d", "3d_fullres"])
def test_shape_round_trip_and_deep_supervision(plans, cfg):
    pm = PlansManager(plans)
    cm = pm.get_configuration(cfg)
    patch = list(cm.patch_size)
    ae = build_label_denoiser(pm, cm, C, deep_supervision=True)
    x = torch.softmax(torch.randn(2, C, *patch), 1)
    outs = ae(x)
    strides = np.cumprod(np.array(cm.network_arch_init_kwargs["strides"]), axis=0)
    assert len(outs) == len(strides) - 1
    for o, st in zip(outs, strides):
        assert tuple(o.shape) == (2, C, *[p // s for p, s in zip(patch, st)])
    ae.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled(False) does
    y = ae(x)
    assert tuple(y.shape) == (2, C, *patch)
    assert torch.allclose(y, outs[0], atol=1e-5)
    # a non-square patch also round-trips (2d: 32 x 64)
    if cfg == "2d":
        assert tuple(ae(torch.rand(1, C, 32, 64)).shape) == (1, C, 32, 64)


def test_no_path_from_encoder_skips_to_decoder(plans):
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    torch.manual_seed(0)
    ae = build_label_denoiser(pm, cm, C).eval()
    unet = _planned_unet(cm, C).eval()
    x = torch.softmax(3 * torch.randn(1, C, *cm.patch_size), 1)

    def zero_skips(module, inputs, output):
        return [torch.zeros_like(t) for t in output[:-1]] + [output[-1]]

    def zero_bottleneck(module, inputs, output):
        return list(output[:-1]) + [torch.zeros_like(output[-1])]

    with torch.no_grad():
        ref_ae, ref_unet = ae(x), unet(x)
        h = ae.encoder.register_forward_hook(zero_skips)
        out_ae = ae(x)
        h.remove()
        h = unet.encoder.register_forward_hook(zero_skips)
        out_unet = unet(x)
        h.remove()
        h = ae.encoder.register_forward_hook(zero_bottleneck)
        out_ae_bn = ae(x)
        h.remove()
    assert torch.equal(out_ae, ref_ae)                         # skips do not matter to the AE ...
    assert (out_unet - ref_unet).abs().max() > 1e-3            # ... while they do to the U-Net (test is sharp)
    assert (out_ae_bn - ref_ae).abs().max() > 1e-3             # the bottleneck is what the decoder reads
    # gradient view: d(output)/d(skip) does not exist
    feats = [f.detach().requires_grad_(True) for f in ae.encoder(x)]
    ae.decoder(feats).sum().backward()
    assert all(f.grad is None for f in feats[:-1])
    assert feats[-1].grad is not None and feats[-1].grad.abs().sum() > 0


def test_residual_encoder_plans(plans):
    p = _resenc_plans(plans)
    pm = PlansManager(p)
    cm = pm.get_configuration("3d_fullres")
    ae = build_label_denoiser(pm, cm, C)
    unet = _planned_unet(cm, C)
    assert type(unet).__name__ == "ResidualEncoderUNet"
    assert type(ae.encoder).__name__ == "ResidualEncoder" and ae.encoder.stem is not None
    assert _n_params([ae.encoder]) == _n_params([unet.encoder])
    x = torch.softmax(torch.randn(1, C, *cm.patch_size), 1)
    assert tuple(ae(x).shape) == (1, C, *cm.patch_size)
    assert isinstance(ae, LabelDenoiserAE) and isinstance(ae.decoder, SkipFreeDecoder)
    assert tuple(ae.encode(x).shape) == (1, ae.encoder.output_channels[-1],
                                         *[s // int(np.prod([st[i] for st in ae.encoder.strides]))
                                           for i, s in enumerate(cm.patch_size)])


def test_architecture_without_nnunet_encoder_is_refused(plans, monkeypatch):
    """Plans naming a network without an nnU-Net style .encoder (e.g. a transformer) get a clear error."""
    import nnunetv2.utilities.get_network_from_plans as gnp

    class NoEncoder(torch.nn.Module):
        pass

    monkeypatch.setattr(gnp, "get_network_from_plans", lambda *a, **k: NoEncoder())
    pm = PlansManager(plans)
    with pytest.raises(UserFacingError, match="no nnU-Net style encoder"):
        build_label_denoiser(pm, pm.get_configuration("2d"), C)
