"""DMNet: sharpen and the Dice-difference loss by hand, the adversarial losses by hand, the
dual-decoder network (two different decoders from the plans, deep supervision switched on both,
inference = the average of the decoders' softmaxes), and one real step."""
import math

import pytest
import torch
from torch import nn

from nnunet_sud.losses.adversarial import dmnet_adversarial_loss, dmnet_discriminator_loss, masked_bce_with_logits
from nnunet_sud.losses.agreement import dice_difference_loss, sharpen
from nnunet_sud.trainers.discriminator import ConvDiscriminator, plan_strides
from nnunet_sud.trainers.dmnet import DecoderOutputs, DualDecoderUNet, InterpolationUNetDecoder
from helpers import make_trainer
from nnunet_sud.errors import UserFacingError


# ---------------------------------------------------------------------- losses by hand
def test_sharpen_by_hand():
    p = torch.tensor([0.6, 0.3, 0.1]).view(1, 3, 1)
    # T = 0.5: squares 0.36, 0.09, 0.01 over their sum 0.46
    assert torch.allclose(sharpen(p, 0.5).flatten(), torch.tensor([0.36, 0.09, 0.01]) / 0.46, atol=1e-6)
    # T = 1/3: cubes
    cubes = torch.tensor([0.216, 0.027, 0.001])
    assert torch.allclose(sharpen(p, 1 / 3).flatten(), cubes / cubes.sum(), atol=1e-6)
    assert torch.equal(sharpen(p, 1.0), p)
    one_hot = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1)
    assert torch.allclose(sharpen(one_hot, 0.5), one_hot)  # zeros stay zero (no NaN from log 0)
    with pytest.raises(ValueError):
        sharpen(p, 0.0)


def test_dice_difference_by_hand():
    # one sample, two classes, two voxels
    p1 = torch.tensor([[[0.8, 0.4], [0.2, 0.6]]])
    p2 = torch.tensor([[[0.6, 0.1], [0.4, 0.9]]])
    # class 0: 2 (0.48 + 0.04) / (1.2 + 0.7); class 1: 2 (0.08 + 0.54) / (0.8 + 1.3)
    d0, d1 = 2 * 0.52 / 1.9, 2 * 0.62 / 2.1
    assert dice_difference_loss(p1, p2, smooth=0).item() == pytest.approx(1 - (d0 + d1) / 2, rel=1e-6)
    assert dice_difference_loss(p1, p2, include_background=False, smooth=0).item() == pytest.approx(1 - d1, rel=1e-6)
    # masked: only voxel 0 counts
    mask = torch.tensor([[True, False]])
    m0, m1 = 2 * 0.48 / 1.4, 2 * 0.08 / 0.6
    assert dice_difference_loss(p1, p2, mask, smooth=0).item() == pytest.approx(1 - (m0 + m1) / 2, rel=1e-6)
    one_hot = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert dice_difference_loss(one_hot, one_hot).item() == pytest.approx(0.0, abs=1e-6)
    # gradient reaches both predictions ("backpropagated through two terms")
    a, b = p1.clone().requires_grad_(True), p2.clone().requires_grad_(True)
    dice_difference_loss(a, b).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_adversarial_losses_by_hand():
    z = torch.zeros(2, 1, 3, 3)
    assert dmnet_discriminator_loss([z, z], z).item() == pytest.approx(3 * math.log(2))
    assert dmnet_discriminator_loss([z, z]).item() == pytest.approx(2 * math.log(2))  # unlabeled: no ground truth
    a = torch.tensor([2.0, -1.0]).view(1, 1, 2)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731  softplus: -log sigmoid(-v) = bce(v, 0)
    assert masked_bce_with_logits(a, 0.0).item() == pytest.approx((sp(2) + sp(-1)) / 2, rel=1e-6)
    assert masked_bce_with_logits(a, 1.0).item() == pytest.approx((sp(-2) + sp(1)) / 2, rel=1e-6)
    mask = torch.tensor([True, False]).view(1, 1, 2)
    assert masked_bce_with_logits(a, 1.0, mask).item() == pytest.approx(sp(-2), rel=1e-6)
    assert dmnet_adversarial_loss([a, a], [mask, None]).item() == pytest.approx(sp(-2) + (sp(-2) + sp(1)) / 2, rel=1e-6)


# ---------------------------------------------------------------------- the network
def test_two_different_decoders_and_inference_averages_their_softmaxes(synthetic_plans):
    from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
    from nnunet_sud.trainers import nnUNetTrainerDMNet
    t = make_trainer(nnUNetTrainerDMNet, synthetic_plans)
    t.initialize()
    net = t.network
    assert isinstance(net, DualDecoderUNet)
    assert isinstance(net.decoder.first, UNetDecoder) and isinstance(net.decoder.second, InterpolationUNetDecoder)
    first_kinds = {type(m) for m in net.decoder.first.modules()}
    second_convs = [m for m in net.decoder.second.modules() if isinstance(m, nn.Conv3d) and m.kernel_size[0] == 3]
    assert nn.ConvTranspose3d in first_kinds and not any(isinstance(m, nn.ConvTranspose3d)
                                                          for m in net.decoder.second.modules())
    assert second_convs and all(m.dilation == (2, 2, 2) for m in second_convs)
    keys = set(net.state_dict())
    assert any(k.startswith("decoder.first.") for k in keys) and any(k.startswith("decoder.second.") for k in keys)

    x = torch.randn(2, 1, *t.configuration_manager.patch_size)
    # nnU-Net switches deep supervision through network.decoder: both decoders follow
    t.set_deep_supervision_enabled(False)
    assert not net.decoder.first.deep_supervision and not net.decoder.second.deep_supervision
    net.eval()
    with torch.no_grad():
        out = net(x)
        skips = net.encoder(x)
        o1, o2 = net.decoder.first(skips), net.decoder.second(skips)
    assert out.shape == o1.shape == (2, 4, *t.configuration_manager.patch_size)
    avg = (torch.softmax(o1, 1) + torch.softmax(o2, 1)) / 2
    assert torch.allclose(torch.softmax(out, 1), avg, atol=1e-6)
    assert not torch.allclose(torch.softmax(o1, 1), torch.softmax(o2, 1), atol=1e-3)  # really two decoders
    # the predictor's view: build as nnUNetv2_predict does (no deep supervision), load the weights
    pred_net = nnUNetTrainerDMNet.build_network_architecture(t.plans_manager, t.configuration_manager, 1, 4, False)
    pred_net.load_state_dict(net.state_dict())
    pred_net.eval()
    with torch.no_grad():
        assert torch.allclose(pred_net(x), out, atol=1e-6)
    # training mode: both decoders' deep-supervision lists; eval with deep supervision: averaged lists
    t.set_deep_supervision_enabled(True)
    net.train()
    with torch.no_grad():
        train_out = net(x)
        net.eval()
        val_out = net(x)
    n_ds = len(t._get_deep_supervision_scales())  # one output per decoder stage
    assert isinstance(train_out, DecoderOutputs) and len(train_out.first) == len(train_out.second) == n_ds == 3
    assert isinstance(val_out, list) and len(val_out) == n_ds
    for v, a, b in zip(val_out, train_out.first, train_out.second):
        assert torch.allclose(torch.softmax(v, 1), (torch.softmax(a, 1) + torch.softmax(b, 1)) / 2, atol=1e-6)
    # nnU-Net's loss on each decoder, summed
    seg = torch.randint(0, 4, (2, 1, *t.configuration_manager.patch_size)).float()
    target = [seg if i == 0 else nn.functional.interpolate(seg, scale_factor=tuple(s), mode="nearest")
              for i, s in enumerate(t._get_deep_supervision_scales())]
    inner = t.loss.loss.loss  # LabeledOutputTap -> DualDecoderLoss -> nnU-Net's deep-supervision loss
    both = t.loss(train_out, target)
    assert both.item() == pytest.approx((inner(train_out.first, target) + inner(train_out.second, target)).item(),
                                        rel=1e-6)


# ---------------------------------------------------------------------- one real step
def test_step_losses_and_discriminator_update(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerDMNet, nnUNetTrainerDMNet_noAdv
    torch.manual_seed(0)
    t = make_trainer(nnUNetTrainerDMNet, synthetic_plans)
    assert (t.lambda1, t.lambda2, t.temperature, t.discriminator_lr, t.discriminator_weight_decay) == \
        (0.01, 0.1, 0.5, 1e-5, 5e-5)
    assert t.unlabeled_weight(0.3) == 1.0
    t.initialize()
    patch = tuple(t.configuration_manager.patch_size)
    g = torch.Generator().manual_seed(1)
    seg = torch.randint(0, 4, (2, 1, *patch), generator=g).float()
    target = [seg if i == 0 else nn.functional.interpolate(seg, scale_factor=tuple(s), mode="nearest")
              for i, s in enumerate(t._get_deep_supervision_scales())]
    labeled = {"data": torch.randn((2, 1, *patch), generator=g), "target": target}
    valid = torch.ones((2, *patch), dtype=torch.bool)
    valid[:, :, :4] = False
    u = {"data": torch.randn((2, 1, *patch), generator=g), "valid": valid, "coords": torch.zeros((2, 3, *patch))}
    t.dataloader_unlabeled = iter([u])
    d0 = {k: v.clone() for k, v in t.discriminator.state_dict().items()}
    net0 = {k: v.clone() for k, v in t.network.state_dict().items()}

    # the unlabeled loss by hand, with the step's own tensors
    captured = {}
    orig = t.unlabeled_loss

    def spy(batch_u):
        loss, logs = orig(batch_u)
        captured.update(loss=loss.item(), logs=logs, out_l=t.labeled_step["output"])
        return loss, logs
    t.unlabeled_loss = spy
    out = t.train_step(labeled)
    t.network.load_state_dict(net0)
    disc = ConvDiscriminator(4, 3, t.discriminator_features, plan_strides(t.configuration_manager), head="dense")
    disc.load_state_dict(d0)
    with torch.no_grad():
        t.network.train()
        o_l, o_u = t.network(labeled["data"]), t.network(u["data"])
        p_l = [torch.softmax(o[0], 1) for o in o_l]
        p_u = [torch.softmax(o[0], 1) for o in o_u]
        l_semi = dice_difference_loss(sharpen(p_u[0], 0.5), sharpen(p_u[1], 0.5), valid)
        m = valid[:, None]
        l_adv = sum(masked_bce_with_logits(disc(p), 1.0) for p in p_l) + \
            sum(masked_bce_with_logits(disc(p), 1.0, m) for p in p_u)
        y = nn.functional.one_hot(seg[:, 0].long(), 4).permute(0, 4, 1, 2, 3).float()
        l_dis = sum(masked_bce_with_logits(disc(p), 0.0) for p in p_l) + masked_bce_with_logits(disc(y), 1.0) + \
            sum(masked_bce_with_logits(disc(p), 0.0, m) for p in p_u)
    assert captured["logs"]["dice_difference"] == pytest.approx(l_semi.item(), rel=1e-5)
    assert captured["logs"]["adversarial_loss"] == pytest.approx(l_adv.item(), rel=1e-5)
    assert captured["logs"]["discriminator_loss"] == pytest.approx(l_dis.item(), rel=1e-5)
    assert captured["loss"] == pytest.approx(0.01 * l_adv.item() + 0.1 * l_semi.item(), rel=1e-5)
    assert out["unlabeled_loss"] == pytest.approx(captured["loss"], rel=1e-6)
    assert isinstance(captured["out_l"], DecoderOutputs)  # the labeled forward ran once, reused

    # the discriminator took exactly one Adam step (lr 1e-5) on L_dis alone
    assert t.discriminator_optimizer.state_dict()["state"][0]["step"] == 1
    disc.zero_grad()
    p_l_d = [p.detach() for p in p_l]
    p_u_d = [p.detach() for p in p_u]
    l = sum(masked_bce_with_logits(disc(p), 0.0) for p in p_l_d) + masked_bce_with_logits(disc(y), 1.0) + \
        sum(masked_bce_with_logits(disc(p), 0.0, m) for p in p_u_d)
    l.backward()
    ref_opt = torch.optim.Adam(disc.parameters(), 1e-5, weight_decay=5e-5)
    ref_opt.step()
    for (k, v), (_, r) in zip(t.discriminator.state_dict().items(), disc.state_dict().items()):
        assert torch.allclose(v, r, atol=1e-9), k
    assert any(not torch.equal(d0[k], v) for k, v in t.discriminator.state_dict().items())

    # without the adversarial part there is no discriminator (nor its checkpoint state) at all
    n = make_trainer(nnUNetTrainerDMNet_noAdv, synthetic_plans)
    assert not n.needs_discriminator() and n.get_extra_state() == {} and n.extra_log_keys == ("dice_difference",)


def test_region_based_labels_are_refused_before_training(synthetic_plans):
    """The Dice difference of two softmax decoders needs mutually exclusive classes: a dataset.json with
    regions stops DMNet in its constructor, naming the trainer."""
    from nnunet_sud.trainers import nnUNetTrainerDMNet
    regions = {"background": 0, "whole": [1, 2, 3], "core": [2, 3]}
    with pytest.raises(UserFacingError, match=r"nnUNetTrainerDMNet needs mutually exclusive classes .*region-based"):
        make_trainer(nnUNetTrainerDMNet, synthetic_plans, dataset_edit=lambda ds: ds.update(
            labels=regions, regions_class_order=[1, 2]))


def test_supervised_control_trains_both_decoders_on_labels_alone(synthetic_plans):
    """Supervised DMNet without adv: DMNet's network, nnU-Net's step on the labeled batch alone, loss =
    nnU-Net's loss on each decoder summed, no unlabeled stream and no discriminator; the step moves both
    decoders."""
    from nnunet_sud.trainers import nnUNetTrainerDMNet_supervised
    from nnunet_sud.trainers.semi_supervised import nnUNetTrainerSemiSupervised
    torch.manual_seed(0)
    t = make_trainer(nnUNetTrainerDMNet_supervised, synthetic_plans)
    assert not isinstance(t, nnUNetTrainerSemiSupervised) and not hasattr(t, "discriminator")
    t.initialize()
    assert isinstance(t.network, DualDecoderUNet)
    patch = tuple(t.configuration_manager.patch_size)
    g = torch.Generator().manual_seed(2)
    seg = torch.randint(0, 4, (2, 1, *patch), generator=g).float()
    target = [seg if i == 0 else nn.functional.interpolate(seg, scale_factor=tuple(s), mode="nearest")
              for i, s in enumerate(t._get_deep_supervision_scales())]
    batch = {"data": torch.randn((2, 1, *patch), generator=g), "target": target}
    before = {k: v.clone() for k, v in t.network.state_dict().items()}
    with torch.no_grad():
        o = t.network(batch["data"])
        inner = t.loss.loss  # DualDecoderLoss -> nnU-Net's deep-supervision loss
        expected = (inner(o.first, target) + inner(o.second, target)).item()
        single = inner(o.first, target).item()
    out = t.train_step(batch)
    assert float(out["loss"]) == pytest.approx(expected, rel=1e-5)
    assert expected > single * 1.5  # really the sum over two decoders, not one
    after = t.network.state_dict()
    for part in ("encoder.", "decoder.first.", "decoder.second."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(part)), part
    # regions cannot be averaged as softmaxes: refused before training, naming the trainer
    regions = {"background": 0, "whole": [1, 2, 3], "core": [2, 3]}
    with pytest.raises(UserFacingError, match=r"nnUNetTrainerDMNet_supervised needs mutually exclusive classes"):
        make_trainer(nnUNetTrainerDMNet_supervised, synthetic_plans, dataset_edit=lambda ds: ds.update(
            labels=regions, regions_class_order=[1, 2]))
