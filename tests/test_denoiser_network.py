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


@pytest.mark.parametrize("resenc", [False, True])
def test_trainer_narrows_and_shortens_the_planned_network_and_records_it(plans, synthetic3d, tmp_path, resenc):
    """denoiser_features_scale / denoiser_num_stages: the trainer's network, its saved plans and the
    network load_denoiser_checkpoint rebuilds from the checkpoint all agree; the caller's plans stay as
    they were."""
    from nnunet_sud.denoiser.loading import load_denoiser_checkpoint
    from nnunet_sud.denoiser.trainer import nnUNetTrainerLabelDenoiser

    p = _resenc_plans(plans) if resenc else copy.deepcopy(plans)
    p["continue_training"] = False
    before = copy.deepcopy(p)
    planned = p["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    tr = nnUNetTrainerLabelDenoiser(p, "3d_fullres", 6, load_json(os.path.join(synthetic3d["preprocessed"],
                                                                               "dataset.json")), torch.device("cpu"))
    tr.denoiser_features_scale = 0.5
    tr.denoiser_num_stages = 3
    tr.initialize()
    assert p == before
    want = [int(round(f * 0.5)) for f in planned["features_per_stage"][:3]]
    assert list(tr.network.encoder.output_channels) == want
    assert [list(s) for s in tr.network.encoder.strides] == [list(s) for s in planned["strides"][:3]]
    assert len(tr.network.decoder.stages) == 2
    saved = tr.plans_manager.plans["configurations"]["3d_fullres"]["architecture"]
    assert saved["arch_kwargs"]["features_per_stage"] == want and saved["denoiser_num_stages"] == 3
    # deep supervision follows the shortened network: one output per decoder stage
    tr.network.decoder.deep_supervision = True
    outs = tr.network(torch.zeros(1, C, *tr.configuration_manager.patch_size))
    assert len(outs) == 2 and len(tr._get_deep_supervision_scales()) == 2
    ckpt = str(tmp_path / "den.pth")
    tr.save_checkpoint(ckpt)
    net, info = load_denoiser_checkpoint(ckpt)
    assert list(net.encoder.output_channels) == want
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in tr.network.state_dict().items()}
    # a second initialisation from the saved (already adapted) plans does not narrow again
    tr2 = nnUNetTrainerLabelDenoiser(dict(tr.plans_manager.plans, continue_training=False), "3d_fullres", 6,
                                     tr.dataset_json, torch.device("cpu"))
    tr2.denoiser_features_scale, tr2.denoiser_num_stages = 0.5, 3
    tr2.initialize()
    assert list(tr2.network.encoder.output_channels) == want
    import shutil
    shutil.rmtree(tr.output_folder, ignore_errors=True)
