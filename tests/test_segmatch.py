"""SegMatch: the strong view is intensity-only and voxel-aligned with the weak view, the gates of
each variant on constructed scores/confidences, the gated cross-entropy and eq. 1 by hand, and
one real step (pseudo-labels from the weak view, discriminator stepped after the segmenter,
kept out of the network weights)."""
import io
import math

import pytest
import torch

from nnunet_sud.losses.adversarial import segmatch_discriminator_loss
from nnunet_sud.losses.pseudo_labels import (confidence_map_gate, gated_cross_entropy, identity_gate,
                                             mean_confidence_gate, score_gate)
from nnunet_sud.trainers.segmatch import StrongIntensityAugmentation
from helpers import make_trainer

POINTWISE = ("brightness", "contrast", "gamma", "posterize")


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
@pytest.mark.parametrize("op", ["brightness", "contrast", "gamma"])
def test_pointwise_ops_keep_every_voxel_at_its_own_coordinates(op):
    x = coordinate_image()
    aug = StrongIntensityAugmentation(ops=(op,), n_ops=1, cutout=False)
    y = aug(x, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and not torch.allclose(y, x)
    for b in range(2):
        for c in range(3):
            # a strictly increasing map of each voxel's own value: the coordinates come back exactly
            assert torch.equal(recovered_coordinates(y[b, c], x[b, c]), x[b, c])
            order = torch.argsort(x[b, c].flatten(), stable=True)
            assert (y[b, c].flatten()[order].diff() >= 0).all()


def test_posterize_is_a_monotone_function_of_the_voxel_value():
    x = coordinate_image((5, 6, 40), 1)
    aug = StrongIntensityAugmentation(ops=("posterize",), n_ops=1, cutout=False)
    y = aug.apply_op("posterize", x[0], m=1.0)  # 4 levels
    for c in range(3):
        order = torch.argsort(x[0, c].flatten(), stable=True)
        assert (y[c].flatten()[order].diff() >= 0).all()
        for v in x[0, c].unique():  # a function of the value alone: equal inputs, equal outputs
            assert y[c][x[0, c] == v].unique().numel() == 1
    assert y[2].unique().numel() == 4


@pytest.mark.parametrize("op", ["blur", "sharpen"])
def test_filters_do_not_shift_the_image(op):
    """A symmetric filter returns a linear ramp unchanged away from the borders; a shift of one
    voxel along any axis would change it by at least one ramp step (0.3)."""
    x = coordinate_image((20, 22, 24), 1)
    ramp = (0.3 * x[:, 0] * 19 + 0.5 * x[:, 1] * 21 + 0.7 * x[:, 2] * 23)[:, None] / 2  # steps 0.3, 0.5, 0.7
    aug = StrongIntensityAugmentation(ops=(op,), n_ops=1, cutout=False)
    y = aug.apply_op(op, ramp[0], m=1.0)
    r = 6 if op == "blur" else 3  # kernel radius: 3 sigma (blur at m = 1: sigma 2; sharpen: sigma 1)
    inner = (slice(None), slice(r, -r), slice(r, -r), slice(r, -r))
    assert torch.allclose(y[inner], ramp[0][inner], atol=1e-4)
    for ax in (1, 2, 3):
        shifted = torch.roll(ramp[0], 1, dims=ax)
        assert (shifted[inner] - ramp[0][inner]).abs().min() > 0.29


def test_noise_is_additive_and_cutout_fills_a_box_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 24, 32, 32, generator=g)
    aug = StrongIntensityAugmentation(ops=("noise",), n_ops=1, cutout=False)
    d = aug.apply_op("noise", x, m=1.0, generator=g) - x
    assert abs(d.mean().item()) < 0.01 and d.std().item() == pytest.approx(0.5 * x.std().item(), rel=0.03)
    cut = StrongIntensityAugmentation(ops=("noise",), n_ops=0, cutout=True)
    xb = x[None]
    y = cut(xb, torch.Generator().manual_seed(4))
    changed = (y != xb)[0, 0]
    idx = changed.nonzero()
    lo, hi = idx.min(0).values, idx.max(0).values + 1
    box = changed[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    assert box.all() and changed.sum() == box.numel()  # exactly one axis-aligned box changed
    assert torch.all(y[0, 0, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == y[0, 0, lo[0], lo[1], lo[2]])


def test_trainer_views_are_the_delivered_patch_and_its_intensity_only_augmentation(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerSegMatch
    t = make_trainer(nnUNetTrainerSegMatch, synthetic_plans)
    x = coordinate_image((24, 32, 32))
    weak, strong = t.views({"data": x})
    assert weak is x and strong.shape == x.shape and not torch.allclose(strong, x)  # default: 2 ops + cutout
    # with the pointwise ops only, each voxel of the strong view still carries its own coordinates
    t.strong_augmentation = StrongIntensityAugmentation(ops=POINTWISE[:3], n_ops=2, cutout=False)
    torch.manual_seed(0)
    weak, strong = t.views({"data": x})
    for b in range(2):
        for c in range(3):
            assert torch.equal(recovered_coordinates(strong[b, c], weak[b, c]), x[b, c])


# ---------------------------------------------------------------------- gates and losses
def test_gates_on_constructed_scores_and_confidences(synthetic_plans):
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
        m = make_trainer(cls, synthetic_plans).gate(probs, valid, scores if cls is nnUNetTrainerSegMatch else None)
        assert torch.equal(m, per_sample[:, None, None].expand(2, 2, 4)), cls.__name__
    t = make_trainer(nnUNetTrainerSegMatch_confidenceMap, synthetic_plans)
    assert t.tau == 0.95 and torch.equal(t.gate(probs, valid, None), cmap)
    assert make_trainer(nnUNetTrainerSegMatch, synthetic_plans).tau == 0.5


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
    return {"data": data, "target": target}, u


def test_step_pseudo_labels_from_the_weak_view_and_discriminator_after_the_segmenter(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerSegMatch, nnUNetTrainerSegMatch_identity
    # identity gating: L_u = mean CE(M(strong), argmax M(weak)), by hand with a known strong view
    t = make_trainer(nnUNetTrainerSegMatch_identity, synthetic_plans)
    t.initialize()
    assert t.discriminator is None and t.get_extra_state() == {}
    labeled, u = _batches(t, 0)
    t.strong_augmentation = lambda x: 1.5 * x + 0.2
    loss, logs = t.unlabeled_loss(u)
    with torch.no_grad():
        y_hat = t.network(u["data"])[0].argmax(1)
        expected = torch.nn.functional.cross_entropy(t.network(1.5 * u["data"] + 0.2)[0], y_hat)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and logs["pseudo_label_fraction"] == 1.0

    # discriminator gating: one full train_step
    torch.manual_seed(0)
    t = make_trainer(nnUNetTrainerSegMatch, synthetic_plans)
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
    fresh = make_trainer(nnUNetTrainerSegMatch, synthetic_plans)
    fresh.initialize()
    d_stepped = t.discriminator.state_dict()
    assert any(not torch.equal(fresh.discriminator.state_dict()[k], v) for k, v in d_stepped.items())
    fresh.set_extra_state(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    assert all(torch.equal(fresh.discriminator.state_dict()[k], v) for k, v in d_stepped.items())
    restored, stepped = fresh.discriminator_optimizer.state_dict(), t.discriminator_optimizer.state_dict()
    assert restored["state"][0]["step"] == 1 and restored["state"].keys() == stepped["state"].keys()
    assert all(torch.equal(restored["state"][i]["exp_avg"], stepped["state"][i]["exp_avg"]) for i in stepped["state"])
    assert t.labeled_step is None  # cleared after the step
