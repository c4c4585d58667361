"""SUD / TE: the soft-target update is eq. 8, lambda = 0 is nnUNetTrainer, the schedules are the
paper's (the store itself: test_soft_target_store.py)."""
import copy
import math

import numpy as np
import pytest
import torch

from nnunet_sud.targets.store import SoftTargetStore
from test_soft_target_store import whole_case_batch
from helpers import make_trainer


class ConstantDenoiser(torch.nn.Module):
    """a(f) = softmax(L) whatever f is: makes eq. 8 computable by hand."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits.expand_as(x)


def probs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(shape, generator=g) * 2, 1)


@pytest.fixture
def sud(synthetic_plans, tmp_path):
    from nnunet_sud.trainers import nnUNetTrainerSUD
    t = make_trainer(nnUNetTrainerSUD, synthetic_plans)
    t.store = SoftTargetStore(str(tmp_path / "store"), 4, dtype=np.float32)
    return t


def test_paper_schedules(sud):
    assert sud.lambda_max == 4 and sud.beta == pytest.approx(0.05)  # beta = 0.2 / lambda_max
    assert [sud.unlabeled_weight(t) for t in (0, 0.25, 1)] == [0, 1, 4]
    assert [sud.alpha(t) for t in (0, 0.25, 1)] == [1, 0.75, 0]  # 1 -> 0 as §3.3.2
    from nnunet_sud.trainers import nnUNetTrainerSUD_lambda2, nnUNetTrainerTE
    assert nnUNetTrainerTE.beta == 0 and nnUNetTrainerSUD_lambda2.lambda_max == 2


def test_te_lambda_variants_ramp_to_their_own_lambda_max_without_a_denoiser(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerTE_lambda0p5, nnUNetTrainerTE_lambda1
    for cls, top in ((nnUNetTrainerTE_lambda1, 1.0), (nnUNetTrainerTE_lambda0p5, 0.5)):
        t = make_trainer(cls, synthetic_plans)
        assert [t.unlabeled_weight(p) for p in (0, 0.5, 1)] == pytest.approx([0, top / 2, top])
        assert t.beta == 0 and not t.needs_denoiser()  # TE: no denoiser share, whatever lambda_max is


def test_update_equals_eq8_by_hand(sud):
    case = (2, 3, 4)
    L = torch.tensor([0.5, -1.0, 2.0, 0.0]).reshape(1, 4, 1, 1, 1)
    sud.denoiser = ConstantDenoiser(L)
    a = torch.softmax(L, 1).expand(1, 4, *case)
    b = whole_case_batch("u0", case)
    f1, f2 = probs((1, 4, *case), 1), probs((1, 4, *case), 2)
    # first visit: z_prev := current estimate, so z = beta a(f) + (1 - beta) f whatever alpha is
    z1 = sud.soft_targets(f1, b, alpha=0.3)
    beta = sud.beta
    assert torch.allclose(z1, beta * a + (1 - beta) * f1, atol=1e-6)
    # second visit: z = alpha (beta a(f) + (1 - beta) f) + (1 - alpha) z_prev, z_prev from the store
    z2 = sud.soft_targets(f2, b, alpha=0.3)
    assert torch.allclose(z2, 0.3 * (beta * a + (1 - beta) * f2) + 0.7 * z1, atol=1e-6)
    assert np.allclose(sud.store.load_case("u0"), z2[0].numpy(), atol=1e-6)


def test_beta0_is_temporal_ensembling_and_alpha1_beta1_is_the_red_step(sud):
    case = (2, 3, 4)
    b = whole_case_batch("u1", case)
    f1, f2 = probs((1, 4, *case), 3), probs((1, 4, *case), 4)
    sud.beta = 0.0
    sud.denoiser = None  # TE needs none
    z1 = sud.soft_targets(f1, b, alpha=0.6)
    z2 = sud.soft_targets(f2, b, alpha=0.6)
    assert torch.allclose(z2, 0.6 * f2 + 0.4 * z1, atol=1e-6)
    L = torch.tensor([1.0, 0.0, -1.0, 3.0]).reshape(1, 4, 1, 1, 1)
    sud.denoiser = ConstantDenoiser(L)
    sud.beta = 1.0
    z3 = sud.soft_targets(f1, b, alpha=1.0)
    assert torch.allclose(z3, torch.softmax(L, 1).expand_as(z3), atol=1e-6)  # z = a(f)


def test_spatial_only_variant_ignores_the_stored_history(synthetic_plans, tmp_path):
    """alpha = 1 at every progress: a second visit's target is beta a(f2) + (1 - beta) f2, not a mix with
    the first visit's target, and the store then holds that target."""
    from nnunet_sud.trainers import nnUNetTrainerSUD_lambda1_featureDropout_spatialOnly as Spatial
    t = make_trainer(Spatial, synthetic_plans)
    t.store = SoftTargetStore(str(tmp_path / "store"), 4, dtype=np.float32)
    assert [t.alpha(p) for p in (0, 0.5, 1)] == [1, 1, 1]
    assert t.beta == pytest.approx(0.2) and t.feature_dropout == 0.5 and t.lambda_max == 1
    case = (2, 3, 4)
    L = torch.tensor([0.0, 2.0, -1.0, 1.0]).reshape(1, 4, 1, 1, 1)
    t.denoiser = ConstantDenoiser(L)
    a = torch.softmax(L, 1).expand(1, 4, *case)
    b = whole_case_batch("u2", case)
    f1, f2 = probs((1, 4, *case), 5), probs((1, 4, *case), 6)
    for f in (f1, f2, f2):
        z = t.soft_targets(f, b, alpha=t.alpha(0.9))
        assert torch.allclose(z, 0.2 * a + 0.8 * f, atol=1e-6)
        assert np.allclose(t.store.load_case("u2"), z[0].numpy(), atol=1e-6)


def test_sud_mean_teacher_target_is_the_denoised_teacher_prediction(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerSUDMeanTeacher
    t = make_trainer(nnUNetTrainerSUDMeanTeacher, synthetic_plans)
    assert t.beta == pytest.approx(0.05) and t.unlabeled_weight(0.5) == pytest.approx(2.0)
    t.initialize()
    t.teacher.copy_from(t.network)
    with torch.no_grad():  # make the teacher differ from the student
        for p in t.teacher.module.parameters():
            p.mul_(0.9)
    L = torch.tensor([0.2, 1.0, -1.0, 0.5]).reshape(1, 4, 1, 1, 1)
    t.denoiser = ConstantDenoiser(L)
    patch = tuple(t.configuration_manager.patch_size)
    x = torch.randn(1, 1, *patch)
    valid = torch.ones((1, *patch), dtype=torch.bool)
    captured = {}
    orig = t.soft_target_loss

    def capture(outputs, z, v):
        captured["z"] = z
        return orig(outputs, z, v)
    t.soft_target_loss = capture
    t.unlabeled_loss({"data": x, "valid": valid})
    with torch.no_grad():
        f_t = torch.softmax(t.teacher.module(x).float(), 1)
        f_s = torch.softmax(t.network(x)[0].float(), 1)
    expected = 0.05 * torch.softmax(L, 1).expand_as(f_t) + 0.95 * f_t
    assert torch.allclose(captured["z"], expected, atol=1e-5)
    assert not torch.allclose(captured["z"], 0.05 * torch.softmax(L, 1).expand_as(f_s) + 0.95 * f_s, atol=1e-3)


def test_loss_is_soft_dice_on_valid_voxels_and_needs_no_gradient_through_z(sud):
    from nnunet_sud.losses.soft_targets import soft_dice_loss
    logits = torch.randn(2, 4, 4, 4, 4, requires_grad=True)
    z = probs((2, 4, 4, 4, 4), 5)
    valid = torch.ones(2, 4, 4, 4, dtype=torch.bool)
    valid[:, :, :, 2:] = False
    loss = sud.soft_target_loss(logits, z, valid)
    p = torch.softmax(logits, 1)
    # by hand, per sample and foreground class, over valid voxels (batch_dice of the plans is False here)
    assert not sud.configuration_manager.batch_dice
    m = valid[:, None].float()
    inter = (p[:, 1:] * z[:, 1:] * m).sum((2, 3, 4))
    den = (p[:, 1:] ** 2 * m).sum((2, 3, 4)) + (z[:, 1:] ** 2 * m).sum((2, 3, 4))  # eq. 15: squared norms
    assert loss.item() == pytest.approx(1 - ((2 * inter + 1e-5) / (den + 1e-5)).mean().item(), rel=1e-6)
    sud.dice_form = "plain"  # the _plainDice variants: nnU-Net's sums
    den_plain = (p[:, 1:] * m).sum((2, 3, 4)) + (z[:, 1:] * m).sum((2, 3, 4))
    assert sud.soft_target_loss(logits, z, valid).item() == pytest.approx(
        1 - ((2 * inter + 1e-5) / (den_plain + 1e-5)).mean().item(), rel=1e-6)
    sud.dice_form = "squared"
    # voxels outside valid do not matter
    z2 = z.clone()
    z2[:, :, :, :, 2:] = 0.25
    assert sud.soft_target_loss(logits, z2, valid).item() == pytest.approx(loss.item(), rel=1e-7)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert soft_dice_loss(z, z, valid) < soft_dice_loss(p.detach(), z, valid)


def test_lambda_zero_gives_the_same_update_as_nnunet_trainer(synthetic_plans, tmp_path):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_sud.schedules import Constant
    from nnunet_sud.trainers import nnUNetTrainerTE

    torch.manual_seed(0)
    base = make_trainer(nnUNetTrainer, synthetic_plans)
    te = make_trainer(nnUNetTrainerTE, synthetic_plans)
    te.store = SoftTargetStore(str(tmp_path / "store"), 4)
    te.unlabeled_weight = Constant(0.0)
    base.initialize()
    te.initialize()
    te.network.load_state_dict(base.network.state_dict())
    patch = tuple(base.configuration_manager.patch_size)
    g = torch.Generator().manual_seed(1)
    data = torch.randn((2, 1, *patch), generator=g)
    seg = torch.randint(0, 4, (2, 1, *patch), generator=g).float()
    target = [torch.nn.functional.interpolate(seg, scale_factor=tuple(s), mode="nearest") if i else seg
              for i, s in enumerate(base._get_deep_supervision_scales())]
    batch = {"data": data, "target": target}
    case = tuple(int(i) for i in patch)
    u = whole_case_batch("syn_unl_000", case)
    u["data"] = torch.randn((1, 1, *patch), generator=g)
    te.dataloader_unlabeled = iter([u, u])
    for _ in range(2):  # two steps: momentum buffers too
        out_b = base.train_step(copy.deepcopy(batch))
        out_t = te.train_step(copy.deepcopy(batch))
        assert out_b["loss"] == out_t["loss"]
        assert out_t["unlabeled_weight"] == 0 and math.isfinite(out_t["unlabeled_loss"])
    for (n, p), (_, q) in zip(base.network.named_parameters(), te.network.named_parameters()):
        assert torch.equal(p, q), n


def _two_train_passes(trainer):
    """Two train-mode forward passes (full-resolution output) of the trainer's network on one input."""
    from nnunet_sud.network_helpers import unwrap_network
    net = unwrap_network(trainer.network)
    net.train()
    x = torch.randn(2, 1, *trainer.configuration_manager.patch_size, generator=torch.Generator().manual_seed(0))
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = net(x)
        outs.append(out[0] if isinstance(out, (list, tuple)) else out)
    return net, outs


def test_sud_family_feature_dropout_is_off_by_default_and_a_late_setting_turns_it_on(synthetic_plans):
    """SUD and TE keep the paper's deterministic segmenter (two train passes agree); the _featureDropout
    variants (p = 0.5, the perturbation of Laine and Aila's temporal ensembling) perturb every train
    pass and leave the state dict as it was (nnUNetv2_predict loads the model as usual); a user's
    subclass setting feature_dropout after __init__ is honoured at initialize; p = 1 names the setting."""
    from nnunet_sud.errors import UserFacingError
    from nnunet_sud.trainers import (nnUNetTrainerSUD, nnUNetTrainerSUD_lambda1_featureDropout, nnUNetTrainerTE,
                                     nnUNetTrainerTE_lambda1, nnUNetTrainerTE_lambda1_featureDropout)
    for cls in (nnUNetTrainerSUD, nnUNetTrainerTE, nnUNetTrainerTE_lambda1):
        t = make_trainer(cls, synthetic_plans, initialize=True)
        assert t.feature_dropout == 0, cls.__name__
        _, (o1, o2) = _two_train_passes(t)
        assert torch.equal(o1, o2), cls.__name__
    plain_keys = list(make_trainer(nnUNetTrainerTE_lambda1, synthetic_plans, initialize=True).network.state_dict())
    for cls in (nnUNetTrainerTE_lambda1_featureDropout, nnUNetTrainerSUD_lambda1_featureDropout):
        t = make_trainer(cls, synthetic_plans, initialize=True)
        assert t.feature_dropout == 0.5 and t.lambda_max == 1, cls.__name__
        net, (o1, o2) = _two_train_passes(t)
        assert not torch.allclose(o1, o2), cls.__name__
        assert list(t.network.state_dict()) == plain_keys
        net.eval()
        x = torch.randn(1, 1, *t.configuration_manager.patch_size)
        with torch.no_grad():
            e1, e2 = net(x), net(x)
        assert torch.equal(e1[0], e2[0])  # eval mode (prediction): no dropout
    # SUD keeps the paper's beta = 0.2 / lambda_max; TE has none
    assert make_trainer(nnUNetTrainerSUD_lambda1_featureDropout, synthetic_plans).beta == pytest.approx(0.2)
    assert make_trainer(nnUNetTrainerTE_lambda1_featureDropout, synthetic_plans).beta == 0
    late = make_trainer(nnUNetTrainerTE_lambda1, synthetic_plans)
    late.feature_dropout = 0.5  # a user's variant after super().__init__()
    late.initialize()
    _, (o1, o2) = _two_train_passes(late)
    assert not torch.allclose(o1, o2)
    bad = make_trainer(nnUNetTrainerTE, synthetic_plans)
    bad.feature_dropout = 1.0
    with pytest.raises(UserFacingError, match="feature_dropout"):
        bad.initialize()
