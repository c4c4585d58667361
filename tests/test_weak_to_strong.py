"""Weak-to-strong pseudo-labels: G (flips and quarter turns) is exact and keeps image and labels
aligned, the strong logits meet G(argmax of the weak prediction), CE and Dice by hand with padding
left out, w(t) switches on at unlabeled_start, the case filter excludes the highest-entropy cases
(weight 0, kept across a checkpoint), settings by class attribute and by late assignment, one real
step, and a short nnUNetv2_train + nnUNetv2_predict run."""
import io
import math
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import run_cmd
from helpers import make_trainer, predict_without_denoiser
from nnunet_sud.errors import UserFacingError
from nnunet_sud.trainers.segmatch import STRONG_VIEW_KEY
from nnunet_sud.trainers.weak_to_strong import (RightAngleMove, RightAngleTransform, highest_entropy_cases,
                                                mean_entropy, pseudo_label_loss)
from test_trainer_settings import late


def _trainer(dataset, cls=None, **kwargs):
    from nnunet_sud.trainers import nnUNetTrainerWeakToStrong
    return make_trainer(cls or nnUNetTrainerWeakToStrong, dataset, **kwargs)


# ---------------------------------------------------------------------- G
def test_g_is_exact_invertible_and_keeps_labels_aligned():
    g = RightAngleTransform((24, 32, 32))
    assert g.planes == [(1, 2)]  # the only two axes of equal patch size
    torch.manual_seed(0)
    moves = g.get_parameters(64)
    assert {m.plane for m in moves} == {(1, 2)} and {m.k for m in moves} == {0, 1, 2, 3}
    assert {len(m.flips) for m in moves} == {0, 1, 2, 3}
    x = torch.randn(64, 2, 24, 32, 32)
    moved = g.apply(x, moves)
    assert torch.equal(g.apply(moved, moves, inverse=True), x)  # bit-exact
    assert torch.equal(torch.sort(moved.flatten(1)).values, torch.sort(x.flatten(1)).values)  # a permutation
    # image and label moved by the same parameters: each voxel keeps its own label
    ids = torch.arange(24 * 32 * 32, dtype=torch.float64).view(1, 1, 24, 32, 32).repeat(64, 1, 1, 1, 1)
    labels = (ids[:, 0] % 5).long()
    assert torch.equal(g.apply(labels, moves), (g.apply(ids, moves)[:, 0] % 5).long())
    assert any(not torch.equal(g.apply(labels, moves)[b], labels[b]) for b in range(64))
    # no rotation without two equal patch sizes; three planes for a cube
    assert RightAngleTransform((20, 30)).planes == [] and RightAngleTransform((8, 8, 8)).planes == [(0, 1), (0, 2),
                                                                                                    (1, 2)]
    assert all(m.plane is None and m.k == 0 for m in RightAngleTransform((20, 30)).get_parameters(16))


def test_g_moves_each_voxel_where_the_parameters_say():
    """2d, n x n: flip axis 0, then one quarter turn in (0, 1): out[i, j] = x[n-1-j, n-1-i]."""
    n = 4
    x = torch.arange(n * n).view(1, n, n)
    g = RightAngleTransform((n, n))
    out = g.apply(x, [RightAngleMove(flips=(0,), plane=(0, 1), k=1)])[0]
    for i in range(n):
        for j in range(n):
            assert out[i, j] == x[0, n - 1 - j, n - 1 - i]
    assert torch.equal(g.apply(x, [RightAngleMove(flips=(1,))])[0], x[0].flip(1))
    assert torch.equal(g.apply(x, [RightAngleMove()])[0], x[0])
    with pytest.raises(ValueError):
        g.apply(torch.zeros(2, 4, 5), [RightAngleMove()] * 2)


# ---------------------------------------------------------------------- L_u by hand
def test_ce_and_dice_by_hand_with_padding_left_out():
    # B = 1, C = 2, three voxels; the third is padding
    logits = torch.tensor([[[2.0, 0.0, 5.0]], [[0.0, 1.0, -5.0]]])[None]   # (1, 2, 1, 3)
    labels = torch.tensor([[[0, 1, 1]]])                                   # (1, 1, 3)
    valid = torch.tensor([[[True, True, False]]])
    p1 = [1 / (1 + math.exp(2)), 1 / (1 + math.exp(-1))]  # softmax class 1 at the two valid voxels
    ce = (-math.log(1 - p1[0]) - math.log(p1[1])) / 2
    dice = (2 * p1[1] + 1e-5) / (sum(p1) + 1 + 1e-5)  # class 1 only (no background): y = (0, 1)
    assert pseudo_label_loss(logits, labels, valid, dice=False).item() == pytest.approx(ce, rel=1e-6)
    assert pseudo_label_loss(logits, labels, valid).item() == pytest.approx(ce + 1 - dice, rel=1e-6)
    # whatever the padding holds, the loss is the same
    other = logits.clone()
    other[..., 2] = torch.tensor([-3.0, 7.0])[:, None]
    assert pseudo_label_loss(other, torch.tensor([[[0, 1, 0]]]), valid).item() == pytest.approx(
        pseudo_label_loss(logits, labels, valid).item(), rel=1e-7)
    # batch Dice: one ratio over both samples
    two = torch.cat([logits, logits.flip(-1)])
    lab2, val2 = torch.cat([labels, labels.flip(-1)]), torch.cat([valid, valid.flip(-1)])
    batch = (4 * p1[1] + 1e-5) / (2 * sum(p1) + 2 + 1e-5)
    assert pseudo_label_loss(two, lab2, val2, batch_dice=True).item() == pytest.approx(ce + 1 - batch, rel=1e-6)


# ---------------------------------------------------------------------- the step's tensors
def _unlabeled_batch(t, seed, keys=("a", "b")):
    patch = tuple(t.configuration_manager.patch_size)
    g = torch.Generator().manual_seed(seed)
    b = len(keys)
    valid = torch.ones((b, *patch), dtype=torch.bool)
    valid[0, :3] = False  # some padding
    u = {"data": torch.randn((b, 1, *patch), generator=g), "valid": valid, "keys": list(keys)}
    u[STRONG_VIEW_KEY] = 1.5 * u["data"] + 0.2  # a known strong view I(x_w), as the workers deliver it
    return u


def _spy_loss(monkeypatch):
    import nnunet_sud.trainers.weak_to_strong as module
    seen = []
    original = module.pseudo_label_loss

    def spy(logits, labels, valid, **kwargs):
        seen.append((logits.detach(), labels, valid, kwargs))
        return original(logits, labels, valid, **kwargs)
    monkeypatch.setattr(module, "pseudo_label_loss", spy)
    return seen


def test_strong_logits_meet_g_of_the_weak_argmax(synthetic_plans, monkeypatch):
    t = _trainer(synthetic_plans, configuration="2d", initialize=True)
    t.network.eval()
    u = _unlabeled_batch(t, 0)
    seen = _spy_loss(monkeypatch)
    drawn = []
    original = RightAngleTransform.get_parameters
    monkeypatch.setattr(RightAngleTransform, "get_parameters",
                        lambda self, *a, **k: drawn.append(original(self, *a, **k)) or drawn[-1])
    torch.manual_seed(3)
    loss, logs = t.unlabeled_loss(u)
    logits, labels, valid, kwargs = seen[0]
    moves, g = drawn[0], t.geometric_transform()
    assert any(m.k or m.flips for m in moves)
    with torch.no_grad():
        y_hat = t.network(u["data"])[0].argmax(1)
        strong = t.network(g.apply(1.5 * u["data"] + 0.2, moves))[0]
    assert torch.equal(labels, g.apply(y_hat, moves)) and torch.equal(valid, g.apply(u["valid"], moves))
    assert torch.allclose(logits, strong, atol=1e-5)
    assert kwargs == {"dice": True, "batch_dice": True} and logs == {"case_filter_excluded": 0.0}  # 2d: batch Dice
    assert loss.item() == pytest.approx(pseudo_label_loss(strong, labels, valid, **kwargs).item(), rel=1e-5)
    # without G the strong view is I(x_w) and the pseudo-label y_hat itself
    t.strong_geometric = False
    t.unlabeled_loss_terms = "ce"
    t.unlabeled_loss(u)
    logits, labels, valid, kwargs = seen[1]
    assert torch.equal(labels, y_hat) and torch.equal(valid, u["valid"]) and kwargs["dice"] is False
    assert torch.allclose(logits, t.network(1.5 * u["data"] + 0.2)[0].detach(), atol=1e-5)


# ---------------------------------------------------------------------- w(t) and settings
def test_weight_is_zero_before_unlabeled_start_and_lambda_u_after(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerWeakToStrong, nnUNetTrainerWeakToStrong_startAt0
    t = _trainer(synthetic_plans)
    assert [t.unlabeled_weight(p) for p in (0.0, 0.0999, 0.1, 0.5, 1.0)] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert _trainer(synthetic_plans, nnUNetTrainerWeakToStrong_startAt0).unlabeled_weight(0.0) == 1.0
    t = make_trainer(late(nnUNetTrainerWeakToStrong, lambda_u=2.0, unlabeled_start=0.5), synthetic_plans)
    assert [t.unlabeled_weight(p) for p in (0.49, 0.5)] == [0.0, 2.0]


def test_settings_by_class_attribute_and_by_late_assignment(synthetic_plans):
    from nnunet_sud.trainers import (nnUNetTrainerWeakToStrong, nnUNetTrainerWeakToStrong_caseFilter,
                                     nnUNetTrainerWeakToStrong_ce, nnUNetTrainerWeakToStrong_noGeometric)
    t = _trainer(synthetic_plans)
    assert (t.strong_geometric, t.strong_ops_per_sample, t.strong_cutout, t.unlabeled_loss_terms, t.lambda_u,
            t.unlabeled_start, t.case_filter_fraction) == (True, 2, True, "ce_dice", 1.0, 0.1, 0.0)
    assert t.case_filter_every == 100 and isinstance(t.geometric_transform(), RightAngleTransform)  # 1000 epochs
    t.num_epochs = 50
    assert t.case_filter_every == 5  # derived when read
    assert _trainer(synthetic_plans, nnUNetTrainerWeakToStrong_noGeometric).geometric_transform() is None
    assert _trainer(synthetic_plans, nnUNetTrainerWeakToStrong_ce).unlabeled_loss_terms == "ce"
    assert _trainer(synthetic_plans, nnUNetTrainerWeakToStrong_caseFilter).case_filter_fraction == 0.15
    t = make_trainer(late(nnUNetTrainerWeakToStrong, strong_geometric=False, strong_ops_per_sample=1,
                          strong_cutout=False, case_filter_every=3), synthetic_plans)
    assert t.geometric_transform() is None and t.case_filter_every == 3
    view = t.strong_view_transform().transform.transforms  # RandAugment over 1 op, no Cutout
    assert len(view) == 1 and view[0].n == 1
    t.check_settings()


@pytest.mark.parametrize("setting, value", [
    ("strong_geometric", "yes"), ("strong_ops_per_sample", 7), ("strong_cutout", 1),
    ("unlabeled_loss_terms", "dice"), ("lambda_u", -1.0), ("unlabeled_start", 1.0),
    ("case_filter_fraction", 1.0), ("case_filter_every", 0), ("case_filter_tile_step_size", 0.0),
])
def test_invalid_settings_are_refused_before_training(synthetic_plans, setting, value):
    from nnunet_sud.trainers import nnUNetTrainerWeakToStrong
    t = make_trainer(late(nnUNetTrainerWeakToStrong, **{setting: value}), synthetic_plans)
    with pytest.raises(UserFacingError, match=rf"nnUNetTrainerWeakToStrong_late\.{setting} must be"):
        t.on_train_start()  # checked first: nothing is built
    assert t.dataloader_unlabeled is None and not t.was_initialized


# ---------------------------------------------------------------------- the case filter
def test_entropies_and_the_excluded_top_fraction_by_hand():
    # two classes with logits (a, 0): p = sigmoid(a), H = -p ln p - (1 - p) ln(1 - p)
    def h(a):
        p = 1 / (1 + math.exp(-a))
        return -p * math.log(p) - (1 - p) * math.log(1 - p)
    logits = torch.zeros(2, 3, 4)
    logits[0, 0] = 2.0
    logits[0, 1:] = -1.0
    assert mean_entropy(logits) == pytest.approx((h(2.0) * 4 + h(-1.0) * 8) / 12, rel=1e-6)
    assert mean_entropy(torch.zeros(4, 5, 5)) == pytest.approx(math.log(4), rel=1e-6)
    entropies = {"c0": 0.1, "c1": 0.9, "c2": 0.5, "c3": 0.7, "c4": 0.2, "c5": 0.9}
    assert highest_entropy_cases(entropies, 0.34) == {"c1", "c5"}  # round(2.04)
    assert highest_entropy_cases(entropies, 0.5) == {"c1", "c5", "c3"}
    assert highest_entropy_cases(entropies, 0.15) == {"c1"}  # round(0.9); tie 0.9 broken by name
    assert highest_entropy_cases(entropies, 0.0) == frozenset()


class _ConstructedPredictor:
    """Stands in for nnU-Net's sliding window: case i (in call order) gets two-class logits (a_i, 0)."""

    def __init__(self, a):
        self.a, self.calls = list(a), 0

    def predict_sliding_window_return_logits(self, data):
        logits = torch.zeros((2, *data.shape[1:]))
        logits[0] = self.a[self.calls]
        self.calls += 1
        return logits


def test_case_filter_excludes_the_highest_entropy_cases_and_survives_a_checkpoint(synthetic3d, monkeypatch):
    from nnunet_sud.trainers import nnUNetTrainerWeakToStrong
    from nnunet_sud.unlabeled.loader import unlabeled_identifiers
    t = make_trainer(late(nnUNetTrainerWeakToStrong, case_filter_fraction=0.34, case_filter_every=3,
                          unlabeled_start=0.1), synthetic3d, "2d", initialize=True)
    t.num_epochs = 10
    due = []
    for epoch in range(10):
        t.current_epoch = epoch
        due += [epoch] if t.case_filter_due() else []
    assert due == [1, 4, 7]  # from the first epoch at t >= 0.1, every third
    keys = unlabeled_identifiers(t.preprocessed_unlabeled_folder)
    assert len(keys) == 6
    a = [0.0, 4.0, 0.3, 6.0, 2.0, 1.0]  # |a| small: entropy high; cases 0 and 2 are the most uncertain
    monkeypatch.setattr(t, "case_filter_predictor", lambda: _ConstructedPredictor(a))
    t.current_epoch = 4
    t.update_case_filter()
    assert t.case_filter_excluded == {keys[0], keys[2]} and t.case_filter_epoch == 4
    assert t.case_filter_entropies[keys[0]] == pytest.approx(math.log(2), rel=1e-6)
    # their patches get weight 0: L_u is that of the kept patches alone
    seen = _spy_loss(monkeypatch)
    t.network.eval()
    t.strong_geometric = False
    u = _unlabeled_batch(t, 1, keys=(keys[0], keys[1], keys[2]))
    loss, logs = t.unlabeled_loss(u)
    logits, labels, valid, _ = seen[0]
    assert logits.shape[0] == 1 and logs["case_filter_excluded"] == pytest.approx(2 / 3)
    alone = {k: v[1:2] for k, v in u.items() if k != "keys"}
    alone["keys"] = [keys[1]]
    assert loss.item() == pytest.approx(t.unlabeled_loss(alone)[0].item(), rel=1e-5)
    everything_excluded = dict(u, keys=[keys[0], keys[2], keys[0]])
    loss, logs = t.unlabeled_loss(everything_excluded)
    assert loss.item() == 0.0 and logs["case_filter_excluded"] == 1.0
    # the extra state carries the excluded set and its epoch to a resumed training
    buf = io.BytesIO()
    torch.save(t.get_extra_state(), buf)
    fresh = make_trainer(late(nnUNetTrainerWeakToStrong, case_filter_fraction=0.34), synthetic3d, "2d")
    assert fresh.case_filter_excluded == frozenset() and fresh.case_filter_epoch is None
    fresh.set_extra_state(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    assert fresh.case_filter_excluded == {keys[0], keys[2]} and fresh.case_filter_epoch == 4
    assert fresh.case_filter_entropies == t.case_filter_entropies
    assert _trainer(synthetic3d, configuration="2d").get_extra_state() == {}  # no filter, no side file


def test_case_entropies_predict_every_unlabeled_case_whole(synthetic3d):
    """nnU-Net's sliding window with the training network, on the whole 24x32x32 volumes."""
    t = _trainer(synthetic3d, initialize=True)
    entropies = t.case_entropies()
    assert len(entropies) == 6 and all(0 < h <= math.log(4) for h in entropies.values())
    assert t.network.training and t.network.decoder.deep_supervision  # left as training needs them


# ---------------------------------------------------------------------- one real step, and end to end
def test_one_train_step_moves_the_weights(synthetic_plans):
    t = _trainer(synthetic_plans, configuration="2d", initialize=True)
    t.unlabeled_start = 0.0
    patch = tuple(t.configuration_manager.patch_size)
    g = torch.Generator().manual_seed(0)
    seg = torch.randint(0, 4, (2, 1, *patch), generator=g).float()
    target = [seg if i == 0 else torch.nn.functional.interpolate(seg, scale_factor=tuple(s), mode="nearest")
              for i, s in enumerate(t._get_deep_supervision_scales())]
    t.dataloader_unlabeled = iter([_unlabeled_batch(t, 2)])
    before = {k: v.clone() for k, v in t.network.state_dict().items()}
    out = t.train_step({"data": torch.randn((2, 1, *patch), generator=g), "target": target})
    assert out["unlabeled_weight"] == 1.0 and math.isfinite(out["unlabeled_loss"]) and out["unlabeled_loss"] > 0
    assert any(not torch.equal(before[k], v) for k, v in t.network.state_dict().items())


@pytest.mark.e2e
def test_weak_to_strong_train_predict(synthetic3d, nnunet_dirs, monkeypatch):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunet_sud.trainers import nnUNetTrainerWeakToStrong
    trainer = "nnUNetTrainerWeakToStrong_tiny"
    base = os.path.join(nnunet_dirs["nnUNet_results"], synthetic3d["name"], f"{trainer}__nnUNetPlans__3d_fullres")
    shutil.rmtree(base, ignore_errors=True)
    out = run_cmd(["nnUNetv2_train", str(synthetic3d["id"]), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"],
                  env=dict(os.environ, SUD_TEST_SKIP_FINAL_VALIDATION="1"))
    assert "case filter: predicting 6 unlabeled cases" in out and "2 of 6 unlabeled cases excluded" in out
    fold = os.path.join(base, "fold_0")
    ckpt = torch.load(os.path.join(fold, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    log = ckpt["logging"]
    assert log["unlabeled_weight"] == [0.0, 1.0] and log["case_filter_excluded"][0] == 0.0
    assert all(np.isfinite(log["unlabeled_loss"])) and len(log["target_dice/pseudo_label"]) == 2
    extra = torch.load(os.path.join(fold, "checkpoint_final_extra_state.pth"), weights_only=False)
    assert extra["case_filter"]["epoch"] == 1 and len(extra["case_filter"]["excluded"]) == 2
    # a resumed training restores the filter from the checkpoint
    pre = synthetic3d["preprocessed"]
    plans = load_json(os.path.join(pre, "nnUNetPlans.json"))
    plans["continue_training"] = True
    t = nnUNetTrainerWeakToStrong(plans, "3d_fullres", 0, load_json(os.path.join(pre, "dataset.json")),
                                  torch.device("cpu"))
    t.case_filter_fraction = 0.34
    t.load_checkpoint(os.path.join(fold, "checkpoint_final.pth"))
    assert t.case_filter_excluded == set(extra["case_filter"]["excluded"]) and t.case_filter_epoch == 1
    predict_without_denoiser(synthetic3d, trainer, monkeypatch)
