"""SegMatch: the strong view (batchgeneratorsv2 transforms in the unlabeled workers) is
intensity-only and voxel-aligned with the weak view, the gates of each variant on constructed
scores/confidences, the gated cross-entropy and eq. 1 by hand, the lambda_u ramp, the
discriminator's pairs (random-crop labeled patches, their own predictions as negatives), and one
real step (pseudo-labels from the weak view, discriminator stepped after the segmenter, kept out of
the network weights)."""
import io
import math

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.base.basic_transform import ImageOnlyTransform

from helpers import make_trainer
from nnunet_sud.errors import UserFacingError
from nnunet_sud.losses.adversarial import segmatch_discriminator_loss
from nnunet_sud.losses.pseudo_labels import (confidence_map_gate, gated_cross_entropy, identity_gate,
                                             mean_confidence_gate, score_gate)
from nnunet_sud.trainers.segmatch import STRONG_VIEW_KEY, RandAugmentTransform, StrongViewTransform




def coordinate_image(shape=(6, 8, 10), batch=2):
    """(B, 3, *shape): channel i is the voxel's own coordinate along axis i, scaled to [-1, 1]."""
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    img = torch.stack([2 * g / (s - 1) - 1 for g, s in zip(grids, shape)])
    return img[None].repeat(batch, 1, 1, 1, 1)


def recovered_coordinates(strong_c, weak_c):
    """Each voxel's coordinate read back from the strong view alone, via the value -> coordinate
    map of the weak view. Raises if voxels of different coordinates got the same strong value."""
    pairs = {}
    for s, w in zip(strong_c.flatten().tolist(), weak_c.flatten().tolist()):
        assert pairs.setdefault(s, w) == w, "two coordinates share a strong value: correspondence lost"
    return torch.tensor([pairs[s] for s in strong_c.flatten().tolist()]).view_as(weak_c)


# ---------------------------------------------------------------------- the views
OPS = ("brightness", "contrast", "gamma", "noise", "blur", "sharpen")  # strong_transforms(), in order


def strong_op(t, name):
    return t.strong_transforms()[OPS.index(name)]


def strong_of(transform, x):
    """(image after, strong view) of one sample x (C, *S) through a StrongViewTransform."""
    out = StrongViewTransform(transform)(image=x.clone())
    return out["image"], out[STRONG_VIEW_KEY]


@pytest.mark.parametrize("op", ["brightness", "contrast", "gamma"])
def test_pointwise_ops_keep_every_voxel_at_its_own_coordinates(synthetic3d, op):
    from nnunet_sud.trainers import nnUNetTrainerSegMatch
    t = make_trainer(nnUNetTrainerSegMatch, synthetic3d)
    x = coordinate_image()
    for b in range(2):
        torch.manual_seed(b)
        np.random.seed(b)
        image, y = strong_of(strong_op(t, op), x[b])
        assert torch.equal(image, x[b]) and y.shape == x[b].shape and not torch.allclose(y, x[b])  # a copy changed
        for c in range(3):
            # a strictly increasing map of each voxel's own value: the coordinates come back exactly
            assert torch.equal(recovered_coordinates(y[c], x[b, c]), x[b, c])
            order = torch.argsort(x[b, c].flatten(), stable=True)
            assert (y[c].flatten()[order].diff() >= 0).all()


@pytest.mark.parametrize("op", ["blur", "sharpen"])
def test_filters_do_not_shift_the_image(synthetic3d, op):
    """A symmetric filter returns a linear ramp unchanged away from the borders; a shift of one
    voxel along any axis would change it by at least one ramp step (0.3)."""
    from nnunet_sud.trainers import nnUNetTrainerSegMatch
    t = make_trainer(nnUNetTrainerSegMatch, synthetic3d)
    x = coordinate_image((30, 32, 34), 1)
    ramp = (0.3 * x[:, 0] * 29 + 0.5 * x[:, 1] * 31 + 0.7 * x[:, 2] * 33)[:, None] / 2  # steps 0.3, 0.5, 0.7
    for seed in range(3):
        torch.manual_seed(seed)
        np.random.seed(seed)
        _, y = strong_of(strong_op(t, op), ramp[0])
        r = 7 if op == "blur" else 1  # kernel radius (blur: sigma <= 2, 13 taps; sharpen: a 3-tap Laplacian)
        inner = (slice(None), slice(r, -r), slice(r, -r), slice(r, -r))
        assert torch.allclose(y[inner], ramp[0][inner], atol=1e-4)
        for ax in (1, 2, 3):
            shifted = torch.roll(ramp[0], 1, dims=ax)
            assert (shifted[inner] - ramp[0][inner]).abs().min() > 0.29
    # and they do change an image that is not linear
    img = torch.randn(1, 20, 20, 20, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(strong_of(strong_op(t, op), img)[1], img, atol=1e-3)


def test_noise_is_additive_and_cutout_fills_a_box_only(synthetic3d):
    from nnunet_sud.trainers import nnUNetTrainerSegMatch
    t = make_trainer(nnUNetTrainerSegMatch, synthetic3d)
    x = torch.randn(1, 24, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    d = strong_of(strong_op(t, "noise"), x)[1] - x
    assert abs(d.mean().item()) < 0.01 and 0 < d.std().item() <= 0.5 + 0.01  # variance in [0, 0.25]
    t.strong_ops_per_sample = 0  # Cutout alone
    np.random.seed(4)
    view = t.strong_view_transform()
    y = view(image=x.clone())[STRONG_VIEW_KEY]
    changed = (y != x)[0]
    idx = changed.nonzero()
    lo, hi = idx.min(0).values, idx.max(0).values + 1
    box = changed[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    assert box.all() and changed.sum() == box.numel()  # exactly one axis-aligned box changed ...
    assert all(1 <= int(h - l) <= p // 2 for l, h, p in zip(lo, hi, t.configuration_manager.patch_size))
    region = y[0, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    assert torch.all(region == region.flatten()[0])  # ... to one value: the box's own mean intensity
    assert region.flatten()[0].item() == pytest.approx(x[0, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].mean().item(),
                                                      abs=1e-5)


class _Tag(ImageOnlyTransform):
    """x -> 10 x + i: the digits of the result record which ops ran, in order."""

    def __init__(self, i):
        super().__init__()
        self.i = i

    def _apply_to_image(self, img, **params):
        return img * 10 + self.i


def test_randaugment_applies_n_distinct_ops_in_random_order():
    aug = RandAugmentTransform([_Tag(i) for i in range(1, 6)], 2)
    seen = set()
    for seed in range(60):
        torch.manual_seed(seed)
        v = int(aug(image=torch.zeros(1, 1))["image"].item())  # two digits: first op, second op
        first, second = divmod(v, 10)
        assert 1 <= first <= 5 and 1 <= second <= 5 and first != second
        seen.add((first, second))
    assert len(seen) > 12  # of the 20 ordered pairs: both choice and order vary
    assert aug(image=torch.zeros(1, 1)) is not None and RandAugmentTransform([_Tag(1)], 0)(
        image=torch.ones(1, 1))["image"].item() == 1.0
    with pytest.raises(ValueError):
        RandAugmentTransform([_Tag(1)], 2)


def test_strong_view_comes_from_the_unlabeled_workers(synthetic3d, monkeypatch):
    """The trainer's unlabeled stream, with one real worker process: the batch carries the strong
    view beside the weak one, same shape, voxel-aligned (with brightness alone, strong / weak is
    one factor per sample and channel), and the weak view is the one the plain pipeline gives."""
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from nnunet_sud.trainers import nnUNetTrainerSegMatch

    class BrightnessOnly(nnUNetTrainerSegMatch):
        strong_cutout = False
        strong_ops_per_sample = 1

        def strong_transforms(self):
            return super().strong_transforms()[:1]

    monkeypatch.setenv("nnUNet_n_proc_DA", "2")  # split 1 labeled + 1 unlabeled worker
    t = make_trainer(BrightnessOnly, synthetic3d)
    t.initialize()
    stream = t.get_unlabeled_dataloader()
    try:
        assert isinstance(stream, NonDetMultiThreadedAugmenter) and stream.num_processes == 1
        for _ in range(2):
            batch = next(stream)
            weak, strong = t.views(batch)
            assert strong.shape == weak.shape == (t.batch_size, 1, *t.configuration_manager.patch_size)
            nz = weak.abs() > 1e-3
            ratio = strong[nz] / weak[nz]
            for b in range(weak.shape[0]):
                r = (strong[b][nz[b]] / weak[b][nz[b]])
                assert r.std() < 1e-4 and 0.5 <= r.mean() <= 1.5 and abs(r.mean() - 1) > 1e-6
            assert torch.all(strong[~nz].abs() <= 1.5e-3 + 1e-6) and ratio.numel() > 0
    finally:
        stream._finish()
    # a pipeline without the strong view is refused with the way forward
    with pytest.raises(UserFacingError, match="get_unlabeled_transforms"):
        t.views({"data": weak})


# ---------------------------------------------------------------------- gates and losses
def test_gates_on_constructed_scores_and_confidences(synthetic3d):
    from nnunet_sud.trainers import (nnUNetTrainerSegMatch, nnUNetTrainerSegMatch_confidenceMap,
                                     nnUNetTrainerSegMatch_identity, nnUNetTrainerSegMatch_meanConfidence)
    # sample 0 confident everywhere (0.97), sample 1 confident on half the voxels (0.99 / 0.6)
    probs = torch.zeros(2, 3, 2, 4)
    probs[0, 0], probs[0, 1], probs[0, 2] = 0.97, 0.02, 0.01
    probs[1, 1], probs[1, 0], probs[1, 2] = 0.99, 0.005, 0.005
    probs[1, :, :, 2:] = torch.tensor([0.2, 0.6, 0.2])[:, None, None]
    valid = torch.ones(2, 2, 4, dtype=torch.bool)
    assert torch.equal(identity_gate(probs), torch.ones(2, 2, 4))
    # mean confidence: sample 0: 0.97 > 0.95; sample 1: (0.99 + 0.6) / 2 = 0.795
    assert torch.equal(mean_confidence_gate(probs, 0.95, valid)[:, 0, 0], torch.tensor([1., 0.]))
    only_confident = valid.clone()
    only_confident[1, :, 2:] = False  # padding there: sample 1's mean over valid voxels is 0.99
    assert torch.equal(mean_confidence_gate(probs, 0.95, only_confident)[:, 0, 0], torch.tensor([1., 1.]))
    cmap = confidence_map_gate(probs, 0.95, valid)
    assert cmap[0].all() and cmap[1, :, :2].all() and not cmap[1, :, 2:].any()
    assert torch.equal(score_gate(torch.tensor([0.7, 0.3]), 0.5, probs[:, 0]),
                       torch.stack([torch.ones(2, 4), torch.zeros(2, 4)]))
    # the trainer's gate per variant
    scores = torch.tensor([0.4, 0.8])
    expect = {nnUNetTrainerSegMatch: torch.tensor([0., 1.]), nnUNetTrainerSegMatch_identity: torch.tensor([1., 1.]),
              nnUNetTrainerSegMatch_meanConfidence: torch.tensor([1., 0.])}
    for cls, per_sample in expect.items():
        m = make_trainer(cls, synthetic3d).gate(probs, valid, scores if cls is nnUNetTrainerSegMatch else None)
        assert torch.equal(m, per_sample[:, None, None].expand(2, 2, 4)), cls.__name__
    t = make_trainer(nnUNetTrainerSegMatch_confidenceMap, synthetic3d)
    assert t.tau == 0.95 and torch.equal(t.gate(probs, valid, None), cmap)
    assert make_trainer(nnUNetTrainerSegMatch, synthetic3d).tau == 0.5


def test_gated_cross_entropy_and_discriminator_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])[:, :, None, None]  # (B=2, C=2, 1, 1)
    labels = torch.tensor([[[0]], [[0]]])
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 1))
    ce1 = -math.log(1 / (1 + math.e))
    gate = torch.tensor([[[1.0]], [[0.0]]])
    # normalised by all valid voxels, gated or not (FixMatch): (ce0 + 0) / 2
    assert gated_cross_entropy(logits, labels, gate).item() == pytest.approx(ce0 / 2, rel=1e-6)
    assert gated_cross_entropy(logits, labels, torch.ones_like(gate)).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)
    valid = torch.tensor([[[True]], [[False]]])
    assert gated_cross_entropy(logits, labels, torch.ones_like(gate), valid).item() == pytest.approx(ce0, rel=1e-6)
    # eq. 1 as BCE: -mean log D(labeled) - mean log(1 - D(unlabeled)); logits 0 -> 2 ln 2
    assert segmatch_discriminator_loss(torch.zeros(3), torch.zeros(2)).item() == pytest.approx(2 * math.log(2))
    a_l, a_u = torch.tensor([1.0, -0.5]), torch.tensor([0.3])
    sig = torch.sigmoid
    by_hand = -(torch.log(sig(a_l))).mean() - torch.log(1 - sig(a_u)).mean()
    assert segmatch_discriminator_loss(a_l, a_u).item() == pytest.approx(by_hand.item(), rel=1e-6)
    # its minimiser direction: labeled pairs up, unlabeled pairs down
    a_l.requires_grad_(True)
    a_u.requires_grad_(True)
    segmatch_discriminator_loss(a_l, a_u).backward()
    assert (a_l.grad < 0).all() and (a_u.grad > 0).all()


# ---------------------------------------------------------------------- one real step
def _batches(t, seed):
    patch = tuple(t.configuration_manager.patch_size)
    g = torch.Generator().manual_seed(seed)
    data = torch.randn((2, 1, *patch), generator=g)
    seg = torch.randint(0, 4, (2, 1, *patch), generator=g).float()
    target = [seg if i == 0 else torch.nn.functional.interpolate(seg, scale_factor=tuple(s), mode="nearest")
              for i, s in enumerate(t._get_deep_supervision_scales())]
    u = {"data": torch.randn((2, 1, *patch), generator=g), "valid": torch.ones((2, *patch), dtype=torch.bool),
         "coords": torch.zeros((2, 3, *patch)), "keys": ["a", "b"], "case_shapes": torch.tensor([patch, patch])}
    u[STRONG_VIEW_KEY] = 1.5 * u["data"] + 0.2  # a known strong view, as the workers deliver it
    return {"data": data, "target": target}, u


def test_step_pseudo_labels_from_the_weak_view_and_discriminator_after_the_segmenter(synthetic3d):
    from nnunet_sud.trainers import nnUNetTrainerSegMatch, nnUNetTrainerSegMatch_identity
    # identity gating: L_u = mean CE(M(strong), argmax M(weak)), by hand with a known strong view
    t = make_trainer(nnUNetTrainerSegMatch_identity, synthetic3d)
    t.initialize()
    assert t.discriminator is None and t.get_extra_state() == {}
    labeled, u = _batches(t, 0)
    loss, logs = t.unlabeled_loss(u)
    with torch.no_grad():
        y_hat = t.network(u["data"])[0].argmax(1)
        expected = torch.nn.functional.cross_entropy(t.network(1.5 * u["data"] + 0.2)[0], y_hat)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and logs["pseudo_label_fraction"] == 1.0

    # discriminator gating: one full train_step
    torch.manual_seed(0)
    t = make_trainer(nnUNetTrainerSegMatch, synthetic3d)
    t.initialize()
    labeled, u = _batches(t, 1)
    t.dataloader_unlabeled = iter([u])
    d_before = {k: v.clone() for k, v in t.discriminator.state_dict().items()}
    seg_before = {k: v.clone() for k, v in t.network.state_dict().items()}
    scores = []
    orig_gate = t.gate

    def spy(p, v, s):
        scores.append(s)
        return orig_gate(p, v, s)
    t.gate = spy
    out = t.train_step(labeled)
    assert scores[0].shape == (2,) and ((scores[0] > 0) & (scores[0] < 1)).all()
    assert out["pseudo_label_fraction"] == pytest.approx(float((scores[0] > 0.5).float().mean()))
    assert math.isfinite(out["discriminator_loss"]) and out["discriminator_score"] == pytest.approx(
        scores[0].mean().item(), rel=1e-6)
    assert any(not torch.equal(d_before[k], v) for k, v in t.discriminator.state_dict().items())
    assert any(not torch.equal(seg_before[k], v) for k, v in t.network.state_dict().items())
    assert t.discriminator_optimizer.state_dict()["state"][0]["step"] == 1
    # the discriminator is no part of the segmenter (inference = plain segmenter) ...
    assert set(t.network.state_dict()) == set(seg_before) and not any("discrim" in k for k in seg_before)
    # ... but of the checkpoint's extra state: saved and loaded into a fresh trainer (another
    # random discriminator), it restores the stepped discriminator and its Adam moments
    buf = io.BytesIO()
    torch.save(t.get_extra_state(), buf)
    torch.manual_seed(1)
    fresh = make_trainer(nnUNetTrainerSegMatch, synthetic3d)
    fresh.initialize()
    d_stepped = t.discriminator.state_dict()
    assert any(not torch.equal(fresh.discriminator.state_dict()[k], v) for k, v in d_stepped.items())
    fresh.set_extra_state(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    assert all(torch.equal(fresh.discriminator.state_dict()[k], v) for k, v in d_stepped.items())
    restored, stepped = fresh.discriminator_optimizer.state_dict(), t.discriminator_optimizer.state_dict()
    assert restored["state"][0]["step"] == 1 and restored["state"].keys() == stepped["state"].keys()
    assert all(torch.equal(restored["state"][i]["exp_avg"], stepped["state"][i]["exp_avg"]) for i in stepped["state"])
    assert t.labeled_step is None  # cleared after the step


# ---------------------------------------------------------------------- the ramp and the discriminator's pairs
def test_lambda_u_ramps_up_by_lambda_u_rampup(synthetic3d):
    from nnunet_sud.schedules import Constant
    from nnunet_sud.trainers import nnUNetTrainerSegMatch
    t = make_trainer(nnUNetTrainerSegMatch, synthetic3d)
    assert (t.lambda_u, t.lambda_u_rampup) == (1.0, 0.25)
    # lambda_u exp(-5 (1 - t / 0.25)^2): 0.0067 at the start, exp(-1.25) half way, 1 from 0.25 on
    assert t.unlabeled_weight(0.0) == pytest.approx(math.exp(-5))
    assert t.unlabeled_weight(0.125) == pytest.approx(math.exp(-1.25))
    assert [t.unlabeled_weight(p) for p in (0.25, 0.6, 1.0)] == [1.0, 1.0, 1.0]
    t.lambda_u, t.lambda_u_rampup = 2.0, 0.5  # read when used
    assert t.unlabeled_weight(0.25) == pytest.approx(2 * math.exp(-1.25)) and t.unlabeled_weight(0.5) == 2.0
    t.unlabeled_weight = Constant(1.0)  # an explicit schedule replaces the ramp
    assert t.unlabeled_weight(0.0) == 1.0


def _step_with_spied_discriminator(t, labeled, u):
    """unlabeled_loss inside a train step's context; returns (loss, logs, D's input, D's logits, L_D)."""
    seen = {}

    def hook(module, inputs, output):
        seen["pairs"], seen["logits"] = inputs[0].detach(), output
    handle = t.discriminator.register_forward_hook(hook)
    t.labeled_step = {"data": labeled["data"], "target": labeled["target"]}
    t.labeled_step["output"] = t.network(labeled["data"])
    try:
        loss, logs = t.unlabeled_loss(u)
    finally:
        handle.remove()
        t.labeled_step = None
    return loss, logs, seen["pairs"], seen["logits"], t._pending_discriminator_loss


def test_discriminator_pairs_random_crop_labeled_patches_and_their_own_predictions(synthetic3d):
    """Batch of 3 labeled patches with oversample 0.33: nnU-Net's loader crops the first
    round(3 * 0.67) = 2 at random and forces foreground into the third. D sees [those 2 with their
    ground truth | the same 2 with the segmenter's argmax | the unlabeled pairs]; L_D is the BCE of
    the truth pairs -> 1 and the chosen negatives -> 0, by hand from D's logits (2d: fast)."""
    from nnunet_sud.trainers import nnUNetTrainerSegMatch
    torch.manual_seed(0)
    t = make_trainer(nnUNetTrainerSegMatch, synthetic3d, "2d")
    t.initialize()
    t.network.eval()  # the spied forward and the recomputed one agree exactly
    labeled, u = _batches(t, 3)
    labeled = {"data": torch.cat([labeled["data"], labeled["data"][:1] + 1]),
               "target": [torch.cat([s, s[:1]]) for s in labeled["target"]]}
    assert t.oversample_foreground_percent == 0.33 and t.discriminator_negatives == "labeled"
    n, c = 2, t.label_manager.num_segmentation_heads
    with torch.no_grad():
        prediction = t.network(labeled["data"])[0].argmax(1)
        y_hat = t.network(u["data"])[0].argmax(1)
    one_hot = lambda y: torch.nn.functional.one_hot(y.long(), c).movedim(-1, 1).float()  # noqa: E731
    truth = labeled["target"][0][:n, 0]
    assert not torch.equal(prediction[:n], truth)  # an untrained segmenter: the negatives differ from the truth
    for negatives in ("labeled", "unlabeled", "both"):  # read when used
        t.discriminator_negatives = negatives
        _, logs, pairs, logits, l_d = _step_with_spied_discriminator(t, labeled, u)
        assert pairs.shape[0] == 2 * n + 2 and logits.shape == (2 * n + 2,)
        assert torch.equal(pairs[:n], torch.cat([labeled["data"][:n], one_hot(truth)], 1))
        assert torch.equal(pairs[n:2 * n], torch.cat([labeled["data"][:n], one_hot(prediction[:n])], 1))
        assert torch.equal(pairs[2 * n:], torch.cat([u["data"], one_hot(y_hat)], 1))
        a = logits.detach().double()
        neg = {"labeled": a[n:2 * n], "unlabeled": a[2 * n:], "both": a[n:]}[negatives]
        by_hand = -torch.nn.functional.logsigmoid(a[:n]).mean() - torch.nn.functional.logsigmoid(-neg).mean()
        assert l_d.item() == pytest.approx(by_hand.item(), rel=1e-5)
        assert logs["discriminator_loss"] == pytest.approx(by_hand.item(), rel=1e-5)
        d = torch.sigmoid(a)
        assert logs["discriminator_score_truth"] == pytest.approx(d[:n].mean().item(), rel=1e-6)
        assert logs["discriminator_score_prediction"] == pytest.approx(d[n:2 * n].mean().item(), rel=1e-6)
        assert logs["discriminator_score"] == pytest.approx(d[2 * n:].mean().item(), rel=1e-6)
        # the gate fraction: the unlabeled samples with D > tau, as a share of their (all valid) voxels
        assert logs["pseudo_label_fraction"] == pytest.approx((d[2 * n:] > t.tau).double().mean().item())
        # L_D reaches D only through the pairs it names: by default the unlabeled logits get no gradient
        grads = torch.autograd.grad(l_d, logits)[0]
        assert (grads[:n] != 0).all() and (grads[n:2 * n] != 0).all() == (negatives != "unlabeled")
        assert (grads[n:2 * n] == 0).all() == (negatives == "unlabeled")
        assert (grads[2 * n:] == 0).all() == (negatives == "labeled")


def test_no_random_crop_in_the_labeled_share_still_steps_the_discriminator(synthetic3d):
    """Under DDP nnU-Net may give a process only oversampled patches (its oversample 1.0): no labeled
    pairs, L_D = 0, and the discriminator still takes its (collective) step with zero gradients."""
    from nnunet_sud.trainers import nnUNetTrainerSegMatch
    t = make_trainer(nnUNetTrainerSegMatch, synthetic3d, "2d")
    t.initialize()
    t.oversample_foreground_percent = 1.0
    labeled, u = _batches(t, 4)
    _, logs, pairs, _, l_d = _step_with_spied_discriminator(t, labeled, u)
    assert pairs.shape[0] == 2 and l_d.item() == 0.0 and math.isnan(logs["discriminator_score_truth"])
    t.queue_discriminator_loss(l_d)
    t.after_optimizer_step()
    assert all(p.grad is not None and not p.grad.any() for p in t.discriminator.parameters())


@pytest.mark.parametrize("setting, value, match", [
    ("lambda_u_rampup", 0.0, "lambda_u_rampup"),
    ("discriminator_negatives", "images", "discriminator_negatives"),
    ("probabilistic_oversampling", True, "probabilistic_oversampling"),
    ("oversample_foreground_percent", 1.0, "oversample_foreground_percent"),
    ("strong_ops_per_sample", 7, "strong_ops_per_sample"),
])
def test_settings_that_break_the_method_are_refused(synthetic3d, setting, value, match):
    from nnunet_sud.trainers import nnUNetTrainerSegMatch, nnUNetTrainerSegMatch_identity
    t = make_trainer(nnUNetTrainerSegMatch, synthetic3d)
    setattr(t, setting, value)
    with pytest.raises(UserFacingError, match=match):
        t.check_settings()
    if setting in ("probabilistic_oversampling", "oversample_foreground_percent", "discriminator_negatives"):
        t = make_trainer(nnUNetTrainerSegMatch_identity, synthetic3d)  # no discriminator: no constraint
        setattr(t, setting, value)
        t.check_settings()


def test_region_based_labels_are_refused_before_training(synthetic_plans):
    """Argmax pseudo-labels need mutually exclusive classes: a dataset.json with regions stops SegMatch
    in its constructor, naming the trainer and the regions."""
    from nnunet_sud.trainers import nnUNetTrainerSegMatch
    regions = {"background": 0, "whole": [1, 2, 3], "core": [2, 3]}
    with pytest.raises(UserFacingError, match=r"nnUNetTrainerSegMatch needs mutually exclusive classes .*"
                                              r"region-based labels .*\[\(1, 2, 3\), \(2, 3\)\]"):
        make_trainer(nnUNetTrainerSegMatch, synthetic_plans, dataset_edit=lambda ds: ds.update(
            labels=regions, regions_class_order=[1, 2]))
