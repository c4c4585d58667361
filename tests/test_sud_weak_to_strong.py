"""Weak-to-strong SUD and the choices of SUD's loss D: the target is eq. 8 of the weak view's
prediction (store updated as SUD's, first and repeated visits), the loss meets G(z) voxel by voxel
with the strong logits (every deep-supervision output), D's gradient reaches the network through
the strong view only, each D and each sharpening by hand, settings either way and refused bad
values, lambda_max = 1 with beta = 0.05 held, one real step, and the store snapshot across --c."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import make_trainer
from nnunet_sud.errors import UserFacingError
from nnunet_sud.losses.soft_targets import hard_targets, sharpen_targets, soft_cross_entropy
from nnunet_sud.schedules import Constant, LinearRamp
from nnunet_sud.targets.store import SoftTargetStore
from nnunet_sud.trainers.segmatch import STRONG_VIEW_KEY
from nnunet_sud.trainers.weak_to_strong import RightAngleMove, RightAngleTransform
from test_soft_target_store import whole_case_batch
from test_sud import ConstantDenoiser
from test_trainer_settings import late

# the denoiser's constant output softmax(L): eq. 8 by hand
L = torch.tensor([0.5, -1.0, 2.0, 0.0]).reshape(1, 4, 1, 1, 1)
# G of two samples of the 24x32x32 patch: quarter turns in the only plane of equal sizes, and flips
MOVES = [RightAngleMove(flips=(0,), plane=(1, 2), k=1), RightAngleMove(flips=(2,), plane=(1, 2), k=3)]
MOVES_2 = [RightAngleMove(flips=(1,), plane=(1, 2), k=2), RightAngleMove(flips=(0, 1), plane=(1, 2), k=1)]


class Pointwise(torch.nn.Module):
    """M(x) = W x + b per voxel (1 -> 4 channels): each output voxel depends on its own input voxel
    only, so alignment is checked voxel by voxel. ``scales``: deep-supervision outputs, the k-th on
    the input average-pooled by 2^k."""

    def __init__(self, scales: int = 1):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 4, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, 1.5, -2.0, 0.7]).view(4, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.2, -0.3, 0.1, 0.0]))
        self.scales = scales

    def forward(self, x):
        if self.scales == 1:
            return self.conv(x)
        return [self.conv(F.avg_pool3d(x, 2 ** k) if k else x) for k in range(self.scales)]


def _trainer(dataset, tmp_path, cls=None, **kwargs):
    from nnunet_sud.trainers import nnUNetTrainerSUDWeakToStrong
    t = make_trainer(cls or nnUNetTrainerSUDWeakToStrong, dataset, **kwargs)
    t.store = SoftTargetStore(str(tmp_path / "store"), 4, dtype=np.float32)
    t.denoiser = ConstantDenoiser(L)
    return t


def _batch(t, seed, keys=("u0", "u1"), padding=True):
    """Two whole-case patches (coords = the case grid) with a weak and a known strong view; with
    ``padding`` some voxels of the first are not valid."""
    patch = tuple(t.configuration_manager.patch_size)
    parts = [whole_case_batch(k, patch) for k in keys]
    u = {"keys": list(keys), **{k: torch.cat([p[k] for p in parts]) for k in ("coords", "valid", "case_shapes")}}
    if padding:
        u["valid"][0, :3] = False
    g = torch.Generator().manual_seed(seed)
    u["data"] = torch.randn((len(keys), 1, *patch), generator=g)
    u[STRONG_VIEW_KEY] = 1.5 * u["data"] + 0.2  # I(x_w), as the workers deliver it
    return u


def _fixed_moves(monkeypatch, *moves):
    """G's parameters: ``moves`` in turn, one per call of get_parameters."""
    queue = list(moves)
    monkeypatch.setattr(RightAngleTransform, "get_parameters", lambda self, batch_size, generator=None: queue.pop(0))


def _spy(t, name):
    """Record the arguments of the trainer's method ``name`` (and call it)."""
    seen, original = [], getattr(t, name)

    def spy(*args, **kwargs):
        seen.append((args, kwargs))
        return original(*args, **kwargs)
    setattr(t, name, spy)
    return seen


# ---------------------------------------------------------------------- D by hand
def ce_by_hand(p, z, valid):
    """1/|V| sum_V -sum_c z_c log p_c, all classes."""
    m = valid.float()
    return float((-(z * p.log()).sum(1) * m).sum() / m.sum())


def squared_dice_by_hand(p, z, valid, batch=False):
    """1 - mean_{c >= 1} (2 sum z p + s) / (sum z^2 + sum p^2 + s), per sample (or over the batch)."""
    m = valid[:, None].float()
    p, z = p[:, 1:] * m, z[:, 1:] * m
    axes = ((0,) if batch else ()) + tuple(range(2, p.ndim))
    d = (2 * (p * z).sum(axes) + 1e-5) / ((p * p).sum(axes) + (z * z).sum(axes) + 1e-5)
    return 1 - float(d.mean())


def test_each_d_equals_the_hand_computation_over_all_classes(synthetic_plans):
    """Two valid voxels and one of padding, three classes; CE and KL count the background class."""
    from nnunet_sud.trainers import nnUNetTrainerSUD
    logits = torch.tensor([[0.0, 1.0, 3.0], [1.0, 0.0, 0.0], [-4.0, 9.0, 2.0]]).T.reshape(1, 3, 1, 1, 3)
    z = torch.tensor([[0.2, 0.3, 0.5], [0.7, 0.2, 0.1], [0.0, 0.0, 1.0]]).T.reshape(1, 3, 1, 1, 3)
    valid = torch.tensor([True, True, False]).reshape(1, 1, 1, 3)
    rows = [[0.0, 1.0, 3.0], [1.0, 0.0, 0.0]]
    zs = [[0.2, 0.3, 0.5], [0.7, 0.2, 0.1]]
    log_p = [[a - math.log(sum(math.exp(b) for b in row)) for a in row] for row in rows]
    ce = -sum(zc * lp for zv, lv in zip(zs, log_p) for zc, lp in zip(zv, lv)) / 2
    entropy = -sum(zc * math.log(zc) for zv in zs for zc in zv) / 2
    ce_foreground = -sum(zc * lp for zv, lv in zip(zs, log_p) for zc, lp in zip(zv[1:], lv[1:])) / 2
    p = [[math.exp(a) for a in lv] for lv in log_p]
    dice = 1 - sum((2 * sum(p[v][c] * zs[v][c] for v in range(2)) + 1e-5)
                   / (sum(p[v][c] ** 2 + zs[v][c] ** 2 for v in range(2)) + 1e-5) for c in (1, 2)) / 2
    t = make_trainer(nnUNetTrainerSUD, synthetic_plans)
    assert not t.configuration_manager.batch_dice
    expected = {"soft_dice": dice, "kl": ce - entropy, "ce": ce, "ce_dice": ce + dice}
    for target_loss, value in expected.items():
        t.target_loss = target_loss
        # abs: soft_kl_loss takes log(z + 1e-6)
        assert t.soft_target_loss(logits, z, valid).item() == pytest.approx(value, rel=1e-5, abs=1e-5), target_loss
    assert abs(ce - ce_foreground) > 0.1  # the background class counts
    assert soft_cross_entropy(torch.log_softmax(logits, 1), z, valid).item() == pytest.approx(ce, rel=1e-6)
    # the paper's kidney task: soft Dice + KL (use_kl beside "soft_dice")
    t.target_loss, t.use_kl = "soft_dice", True
    assert t.soft_target_loss(logits, z, valid).item() == pytest.approx(dice + ce - entropy, rel=1e-5, abs=1e-5)
    t.use_kl = False
    # sharpened by hand: T = 0.5 squares and renormalises; the hard label is the one-hot argmax
    sharp = [[c * c / sum(d * d for d in zv) for c in zv] for zv in zs]
    assert torch.allclose(sharpen_targets(z, 0.5)[0, :, 0, 0, :2], torch.tensor(sharp).T, atol=1e-6)
    assert torch.equal(hard_targets(z)[0, :, 0, 0], torch.tensor([[0.0, 0, 1], [1, 0, 0], [0, 0, 1]]).T)
    t.target_loss, t.target_temperature = "ce", 0.5
    ce_sharp = -sum(zc * lp for zv, lv in zip(sharp, log_p) for zc, lp in zip(zv, lv)) / 2
    assert t.soft_target_loss(logits, z, valid).item() == pytest.approx(ce_sharp, rel=1e-5)
    t.target_temperature, t.target_hard = 1.0, True
    assert t.soft_target_loss(logits, z, valid).item() == pytest.approx(-(log_p[0][2] + log_p[1][0]) / 2, rel=1e-5)


def test_sud_default_d_is_unchanged(synthetic_plans):
    """nnUNetTrainerSUD's D is still eq. 15's squared soft Dice over the foreground, bit for bit."""
    from nnunet_sud.losses.soft_targets import soft_dice_loss
    from nnunet_sud.trainers import nnUNetTrainerSUD
    t = make_trainer(nnUNetTrainerSUD, synthetic_plans)
    assert (t.target_loss, t.target_temperature, t.target_hard, t.use_kl, t.dice_form) == \
        ("soft_dice", 1.0, False, False, "squared")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn((2, 4, 3, 4, 5), generator=g)
    z = torch.softmax(torch.randn((2, 4, 3, 4, 5), generator=g), 1)
    valid = torch.rand((2, 3, 4, 5), generator=g) > 0.2
    assert torch.equal(t.soft_target_loss(logits, z, valid), soft_dice_loss(torch.softmax(logits, 1), z, valid))


# ---------------------------------------------------------------------- the step
def test_target_is_eq8_of_the_weak_view_and_the_loss_meets_g_of_it(synthetic_plans, tmp_path, monkeypatch):
    t = _trainer(synthetic_plans, tmp_path)
    t.network = Pointwise()
    t.alpha = LinearRamp(0.3, 0.3)  # alpha = 0.3 throughout
    beta = t.beta
    assert beta == 0.05 and t.target_loss == "ce_dice" and not t.configuration_manager.batch_dice
    a = torch.softmax(L, 1).expand(2, 4, *t.configuration_manager.patch_size)
    g = t.geometric_transform()
    _fixed_moves(monkeypatch, MOVES, MOVES_2)
    losses, quality = _spy(t, "soft_target_loss"), _spy(t, "record_target_quality")

    # first visit, some padding: z = beta a(f_w) + (1 - beta) f_w, f_w from the weak view
    u = _batch(t, 0)
    u["data"].requires_grad_(True)
    u[STRONG_VIEW_KEY].requires_grad_(True)
    loss, logs = t.unlabeled_loss(u)
    with torch.no_grad():
        f_w = torch.softmax(t.network(u["data"]), 1)
        f_s = torch.softmax(t.network(u[STRONG_VIEW_KEY]), 1)
    z1 = beta * a + (1 - beta) * f_w
    (outputs, z_moved, valid_moved), _ = losses[0]
    assert torch.allclose(z_moved, g.apply(z1, MOVES), atol=1e-6)
    assert not torch.allclose(z_moved, g.apply(beta * a + (1 - beta) * f_s, MOVES), atol=1e-3)  # not the strong
    assert torch.equal(valid_moved, g.apply(u["valid"], MOVES))
    # voxel by voxel: the logits at a voxel are M of the strong view at the weak voxel z' came from
    strong_logits = t.network(g.apply(u[STRONG_VIEW_KEY], MOVES)).detach()
    assert torch.allclose(outputs.detach(), strong_logits, atol=1e-6)
    assert torch.allclose(g.apply(outputs.detach(), MOVES, inverse=True), t.network(u[STRONG_VIEW_KEY]).detach(),
                          atol=1e-6)
    # D = CE + squared Dice of G(z) against softmax M(x_s) over G(valid), by hand
    p = torch.softmax(strong_logits, 1)
    expected = ce_by_hand(p, z_moved, valid_moved) + squared_dice_by_hand(p, z_moved, valid_moved)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert logs == {"alpha": 0.3, "beta": 0.05, "target_new_fraction": 1.0}
    # target quality in the weak frame: prediction f_w, denoised a(f_w), target z
    maps = quality[0][1]
    assert torch.allclose(maps["prediction"], f_w) and torch.allclose(maps["target"], z1, atol=1e-6)
    assert torch.allclose(maps["denoised"], a, atol=1e-6)
    # the store holds z1 on the valid voxels of each case
    for b, key in enumerate(u["keys"]):
        stored, v = t.store.load_case(key), u["valid"][b].numpy()
        assert np.allclose(stored[:, v], z1[b][:, u["valid"][b]].numpy(), atol=1e-6)
        assert np.isnan(stored[:, ~v]).all()
    # D's gradient reaches the network through the strong view only
    loss.backward()
    assert u["data"].grad is None and u[STRONG_VIEW_KEY].grad.abs().sum() > 0
    w = dict(t.network.named_parameters())
    logits_hand = t.network(g.apply(u[STRONG_VIEW_KEY].detach(), MOVES))
    p_hand = torch.softmax(logits_hand, 1)
    m = valid_moved.float()
    d_hand = (-(z_moved * torch.log_softmax(logits_hand, 1)).sum(1) * m).sum() / m.sum()
    pm, zm = p_hand[:, 1:] * m[:, None], z_moved[:, 1:] * m[:, None]
    d_hand = d_hand + 1 - ((2 * (pm * zm).sum((2, 3, 4)) + 1e-5)
                           / ((pm * pm).sum((2, 3, 4)) + (zm * zm).sum((2, 3, 4)) + 1e-5)).mean()
    grads = torch.autograd.grad(d_hand, list(w.values()))
    for (name, param), grad in zip(w.items(), grads):
        assert torch.allclose(param.grad, grad, atol=1e-6, rtol=1e-4), name

    # a repeated visit, all valid: z = alpha (beta a + (1 - beta) f_w) + (1 - alpha) z^-, where there is a z^-
    u2 = _batch(t, 1, padding=False)
    t.unlabeled_loss(u2)
    with torch.no_grad():
        f_w2 = torch.softmax(t.network(u2["data"]), 1)
    current = beta * a + (1 - beta) * f_w2
    z2 = torch.where(u["valid"][:, None], 0.3 * current + 0.7 * z1, current)
    (_, z_moved, valid_moved), _ = losses[1]
    assert torch.allclose(z_moved, g.apply(z2, MOVES_2), atol=1e-6) and valid_moved.all()
    assert torch.allclose(quality[1][1]["target"], z2, atol=1e-6)
    for b, key in enumerate(u2["keys"]):
        assert np.allclose(t.store.load_case(key), z2[b].numpy(), atol=1e-6)


def test_every_deep_supervision_output_gets_g_of_z_downsampled_as_sud_does(synthetic_plans, tmp_path, monkeypatch):
    """Outputs at full and half resolution: the half-resolution target is the 2x2x2 average of G(z),
    valid where all eight voxels are, weighted as nnU-Net weighs the outputs."""
    from types import SimpleNamespace
    t = _trainer(synthetic_plans, tmp_path)
    t.network = Pointwise(scales=2)
    t.loss = SimpleNamespace(weight_factors=(1.0, 0.5))  # nnU-Net's DeepSupervisionWrapper weights
    _fixed_moves(monkeypatch, MOVES)
    losses = _spy(t, "soft_target_loss")
    u = _batch(t, 2)
    u["valid"][1, :, :, 5] = False
    loss, _ = t.unlabeled_loss(u)
    (outputs, z_moved, valid_moved), _ = losses[0]
    assert [o.shape[2:] for o in outputs] == [(24, 32, 32), (12, 16, 16)]
    z_half = F.avg_pool3d(z_moved, 2)
    valid_half = -F.max_pool3d(-valid_moved[:, None].float(), 2)[:, 0] > 0.5
    assert not valid_half.all() and valid_half.any()
    expected = 0.0
    for weight, out, z, v in ((1.0, outputs[0], z_moved, valid_moved), (0.5, outputs[1], z_half, valid_half)):
        p = torch.softmax(out.detach(), 1)
        expected += weight * (ce_by_hand(p, z, v) + squared_dice_by_hand(p, z, v))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_without_g_the_strong_view_is_the_intensity_view(synthetic_plans, tmp_path):
    from nnunet_sud.trainers import nnUNetTrainerSUDWeakToStrong_noGeometric
    t = _trainer(synthetic_plans, tmp_path, nnUNetTrainerSUDWeakToStrong_noGeometric)
    t.network = Pointwise()
    assert t.geometric_transform() is None
    losses = _spy(t, "soft_target_loss")
    u = _batch(t, 3)
    t.unlabeled_loss(u)
    (outputs, z, valid), _ = losses[0]
    with torch.no_grad():
        f_w = torch.softmax(t.network(u["data"]), 1)
    assert torch.allclose(z, 0.05 * torch.softmax(L, 1) + 0.95 * f_w, atol=1e-6) and torch.equal(valid, u["valid"])
    assert torch.allclose(outputs.detach(), t.network(u[STRONG_VIEW_KEY]).detach(), atol=1e-6)


# ---------------------------------------------------------------------- settings
def test_defaults_variants_and_settings_either_way(synthetic_plans):
    from nnunet_sud.trainers import (nnUNetTrainerSUDWeakToStrong, nnUNetTrainerSUDWeakToStrong_hard,
                                     nnUNetTrainerSUDWeakToStrong_noGeometric, nnUNetTrainerSUDWeakToStrong_softDice)
    t = make_trainer(nnUNetTrainerSUDWeakToStrong, synthetic_plans)
    assert (t.lambda_max, t.beta, t.target_loss, t.target_temperature, t.target_hard, t.strong_geometric,
            t.dice_form, t.use_kl) == (1.0, 0.05, "ce_dice", 1.0, False, True, "squared", False)
    assert [t.unlabeled_weight(p) for p in (0, 0.5, 1)] == [0, 0.5, 1] and [t.alpha(p) for p in (0, 1)] == [1, 0]
    assert t.unlabeled_coordinates and isinstance(t.geometric_transform(), RightAngleTransform)
    t.check_settings()
    assert make_trainer(nnUNetTrainerSUDWeakToStrong_noGeometric, synthetic_plans).geometric_transform() is None
    assert make_trainer(nnUNetTrainerSUDWeakToStrong_softDice, synthetic_plans).target_loss == "soft_dice"
    assert make_trainer(nnUNetTrainerSUDWeakToStrong_hard, synthetic_plans).target_hard is True
    changed = dict(target_loss="kl", target_temperature=0.5, strong_geometric=False, lambda_max=2.0, beta=0.1)
    for variant in (late(nnUNetTrainerSUDWeakToStrong, **changed),
                    type("nnUNetTrainerSUDWeakToStrong_class", (nnUNetTrainerSUDWeakToStrong,), changed)):
        v = make_trainer(variant, synthetic_plans)
        assert all(getattr(v, k) == value for k, value in changed.items()), variant.__name__
        assert v.geometric_transform() is None and v.unlabeled_weight(1.0) == 2.0
        v.check_settings()
        z = torch.tensor([0.2, 0.8]).view(1, 2, 1, 1, 1)
        assert torch.allclose(v.loss_target(z), torch.tensor([0.04, 0.64]).view(1, 2, 1, 1, 1) / 0.68)
    # the strong view's transforms follow the strong view's settings (made in the workers)
    v = make_trainer(late(nnUNetTrainerSUDWeakToStrong, strong_ops_per_sample=1, strong_cutout=False),
                     synthetic_plans)
    steps = v.strong_view_transform().transform.transforms
    assert len(steps) == 1 and steps[0].n == 1


def test_sud_lambda1_beta005_holds_beta(synthetic_plans):
    """beta = 0.05 beside lambda_max = 1 as class attributes: beta stays 0.05 (not 0.2 / lambda_max)
    and lambda(t) = t; the paper's derived beta is untouched for nnUNetTrainerSUD_lambda1."""
    from nnunet_sud.trainers import nnUNetTrainerSUD, nnUNetTrainerSUD_lambda1, nnUNetTrainerSUD_lambda1_beta005
    t = make_trainer(nnUNetTrainerSUD_lambda1_beta005, synthetic_plans)
    assert t.lambda_max == 1.0 and t.beta == 0.05
    assert [t.unlabeled_weight(p) for p in (0, 0.25, 0.5, 1)] == [0, 0.25, 0.5, 1]
    assert make_trainer(nnUNetTrainerSUD_lambda1, synthetic_plans).beta == pytest.approx(0.2)
    t = make_trainer(type("V", (nnUNetTrainerSUD,), {"lambda_max": 1.0, "beta": 0.05}), synthetic_plans)
    assert t.beta == 0.05 and t.unlabeled_weight(0.3) == pytest.approx(0.3)
    t.check_settings()


@pytest.mark.parametrize("trainer, settings, named", [
    ("nnUNetTrainerSUD", {"target_loss": "dice"}, "target_loss"),
    ("nnUNetTrainerSUD", {"target_temperature": 0.0}, "target_temperature"),
    ("nnUNetTrainerSUD", {"target_temperature": -1.0}, "target_temperature"),
    ("nnUNetTrainerSUD", {"target_temperature": float("nan")}, "target_temperature"),
    ("nnUNetTrainerSUD", {"target_temperature": "1"}, "target_temperature"),
    ("nnUNetTrainerSUD", {"target_hard": "yes"}, "target_hard"),
    ("nnUNetTrainerSUD", {"use_kl": True, "target_loss": "ce"}, "use_kl"),
    ("nnUNetTrainerSUDMeanTeacher", {"target_loss": "mse"}, "target_loss"),
    ("nnUNetTrainerSUDWeakToStrong", {"target_hard": True, "target_temperature": 0.5}, "target_temperature"),
    ("nnUNetTrainerSUDWeakToStrong", {"target_loss": "focal"}, "target_loss"),
    ("nnUNetTrainerSUDWeakToStrong", {"strong_geometric": "yes"}, "strong_geometric"),
    ("nnUNetTrainerSUDWeakToStrong", {"strong_ops_per_sample": 7}, "strong_ops_per_sample"),
    ("nnUNetTrainerSUDWeakToStrong", {"beta": 1.5}, "beta"),
])
def test_invalid_settings_are_refused_before_training(synthetic_plans, trainer, settings, named):
    import nnunet_sud.trainers as trainers
    t = make_trainer(late(getattr(trainers, trainer), **settings), synthetic_plans)
    with pytest.raises(UserFacingError, match=rf"{trainer}_late\.{named} "):
        t.on_train_start()  # checked first: nothing is built
    assert t.dataloader_unlabeled is None and not t.was_initialized
    body = make_trainer(type(trainer + "_class", (getattr(trainers, trainer),), settings), synthetic_plans)
    with pytest.raises(UserFacingError, match=rf"{trainer}_class\.{named} "):
        body.check_settings()


# ---------------------------------------------------------------------- a real step, and --c
def _labeled_batch(t, seed):
    patch = tuple(t.configuration_manager.patch_size)
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(0, 4, (2, 1, *patch), generator=g).float()
    target = [seg if i == 0 else F.interpolate(seg, scale_factor=tuple(s), mode="nearest")
              for i, s in enumerate(t._get_deep_supervision_scales())]
    return {"data": torch.randn((2, 1, *patch), generator=g), "target": target}


def _slice_batch(t, seed, keys=("u0", "u1")):
    """2d: each patch is the whole slice z = 1 of a case of 3 such slices."""
    patch = tuple(t.configuration_manager.patch_size)
    yy, xx = torch.meshgrid(*[torch.arange(float(n)) for n in patch], indexing="ij")
    b = len(keys)
    g = torch.Generator().manual_seed(seed)
    data = torch.randn((b, 1, *patch), generator=g)
    return {"keys": list(keys), "coords": torch.stack([torch.ones_like(yy), yy, xx])[None].repeat(b, 1, 1, 1),
            "valid": torch.ones((b, *patch), dtype=torch.bool), "case_shapes": torch.tensor([(3, *patch)] * b),
            "data": data, STRONG_VIEW_KEY: 1.5 * data + 0.2}


def test_one_train_step_moves_the_weights_and_fills_the_store(synthetic_plans, tmp_path):
    t = _trainer(synthetic_plans, tmp_path, configuration="2d", initialize=True)
    t.denoiser = ConstantDenoiser(L[..., 0])  # (1, 4, 1, 1): 2d
    t.unlabeled_weight = Constant(1.0)
    t.dataloader_unlabeled = iter([_slice_batch(t, 4)])
    before = {k: v.clone() for k, v in t.network.state_dict().items()}
    out = t.train_step(_labeled_batch(t, 5))
    assert out["unlabeled_weight"] == 1.0 and math.isfinite(out["unlabeled_loss"]) and out["unlabeled_loss"] > 0
    assert out["alpha"] == 1.0 and out["target_new_fraction"] == 1.0
    assert any(not torch.equal(before[k], v) for k, v in t.network.state_dict().items())
    assert sorted(t.store.keys()) == ["u0", "u1"]
    assert np.isfinite(t.store.load_case("u0")[:, 1]).all() and np.isnan(t.store.load_case("u0")[:, 0]).all()


def test_the_store_snapshot_comes_back_with_the_checkpoint(synthetic_plans, tmp_path):
    """SUD's mechanism unchanged: save_checkpoint snapshots the store, --c restores it."""
    from nnunetv2.run.run_training import maybe_load_checkpoint

    def trainer(continue_training):
        def edit(plans):
            plans["continue_training"] = continue_training
        t = _trainer(synthetic_plans, tmp_path, configuration="2d", plans_edit=edit)
        t.output_folder = str(tmp_path / "fold_0")
        t.store.folder = os.path.join(t.output_folder, "soft_targets")
        os.makedirs(t.store.folder, exist_ok=True)
        return t

    def write(t, value):
        b = whole_case_batch("case_a", (4, 5, 6))
        t.store.write(b["keys"], b["coords"], b["valid"], b["case_shapes"], torch.full((1, 4, 4, 5, 6), value))

    t = trainer(False)
    t.initialize()
    write(t, 0.25)
    t.current_epoch = 0
    t.save_checkpoint(os.path.join(t.output_folder, "checkpoint_latest.pth"))
    write(t, 0.75)  # after the checkpoint: --c must not see it
    assert t.get_extra_state()["soft_target_snapshot"] == "soft_targets_checkpoint_latest"
    r = trainer(True)
    maybe_load_checkpoint(r, True, False)
    assert r.current_epoch == 1 and (r.store.load_case("case_a") == 0.25).all()
