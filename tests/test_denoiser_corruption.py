"""Label-map corruption (SUD §3.4) and applying a denoiser: measured statistics."""
import math

import numpy as np
import pytest
import torch

from nnunet_sud.denoiser.corruption import (LOG_CLIP_MIN, LabelMapCorruption, apply_denoiser, coarse_gaussian_noise,
                                            corrupt_probabilities, denoiser_input, log_clip, noise_grid_shape)
from nnunet_sud.network_helpers import labels_to_one_hot

C = 4


def random_labels(shape, seed=0, classes=C):
    """Blocky random label map (B, 1, *spatial)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, classes, (shape[0], 1, *[max(1, s // 4) for s in shape[1:]]), generator=g)
    return torch.nn.functional.interpolate(coarse.float(), size=tuple(shape[1:]), mode="nearest").long()


def recovered_noise(probs_noisy, x_clean):
    """Noise differences n_c - n_0 recovered from the softmax output (softmax is shift invariant)."""
    lp = torch.log(probs_noisy)
    l0 = log_clip(x_clean)
    return (lp[:, 1:] - lp[:, :1]) - (l0[:, 1:] - l0[:, :1])


def lag1_autocorrelation(noise, axis):
    a = noise - noise.mean()
    n = a.shape[axis]
    x = a.narrow(axis, 0, n - 1)
    y = a.narrow(axis, 1, n - 1)
    return float((x * y).mean() / (a * a).mean())


def test_one_hot_log_clip_and_sigma_zero():
    seg = random_labels((2, 16, 20, 12))
    seg[0, 0, 0, 0, 0] = 5    # an ignore label beyond the classes
    seg[1, 0, 1, 1, 1] = -1   # nnU-Net's padding value
    oh = labels_to_one_hot(seg, C)
    assert oh.shape == (2, C, 16, 20, 12)
    valid = (seg[:, 0] >= 0) & (seg[:, 0] < C)
    assert torch.equal(oh.argmax(1)[valid], seg[:, 0][valid])
    assert torch.equal(oh.sum(1), valid.float())
    assert oh[0, :, 0, 0, 0].sum() == 0 and oh[1, :, 1, 1, 1].sum() == 0
    lc = log_clip(oh)
    assert lc.min() == LOG_CLIP_MIN and lc.max() == 0
    assert set(torch.unique(lc).tolist()) == {LOG_CLIP_MIN, 0.0}
    out = corrupt_probabilities(oh, 0.0, 5.0)
    # sigma = 0: the clean encoding; label kept with probability 1 / (1 + (C-1) e^-3), unknown voxels uniform
    p_label = 1 / (1 + (C - 1) * math.exp(LOG_CLIP_MIN))
    known = oh.sum(1) > 0
    assert torch.allclose(out.max(1).values[known], torch.full_like(out.max(1).values[known], p_label), atol=1e-6)
    assert torch.equal(out.argmax(1)[known], oh.argmax(1)[known])
    assert torch.allclose(out[0, :, 0, 0, 0], torch.full((C,), 1 / C))
    # a soft map inside the clip range comes back unchanged
    soft = torch.softmax(0.5 * torch.randn(2, C, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1), 1)
    assert soft.min() > math.exp(LOG_CLIP_MIN)
    assert torch.allclose(corrupt_probabilities(soft, 0.0, 1.0), soft, atol=1e-6)
    assert torch.allclose(LabelMapCorruption(0.0, (0, 8))(soft), soft, atol=1e-6)


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.0, 4.0, 8.0])
def test_output_is_a_distribution_and_noise_has_std_sigma_at_every_scale(scale):
    seg = random_labels((16, 24, 32, 32), seed=1)
    oh = labels_to_one_hot(seg, C)
    sigma = 2.5
    out = corrupt_probabilities(oh, sigma, scale, generator=torch.Generator().manual_seed(3))
    assert out.shape == oh.shape and out.dtype == torch.float32
    assert (out >= 0).all() and torch.allclose(out.sum(1), torch.ones_like(out.sum(1)), atol=1e-5)
    d = recovered_noise(out, oh)
    # n_c - n_0 of independent N(0, sigma^2) channels: variance 2 sigma^2, whatever s
    assert abs(float(d.var()) / (2 * sigma ** 2) - 1) < 0.15, float(d.var())
    assert abs(float(d.mean())) < 0.3


def test_larger_scale_gives_spatially_correlated_noise():
    shape = (3, 32, 32, 32)
    corr = {}
    for s in (1.0, 2.0, 4.0, 8.0):
        n = torch.stack([coarse_gaussian_noise(shape, s, torch.Generator().manual_seed(i)) for i in range(4)])
        corr[s] = np.mean([lag1_autocorrelation(n, ax) for ax in (2, 3, 4)])
        assert abs(float(n.std()) - 1) < 0.08  # unit std at every scale (sigma only sets the magnitude)
    assert abs(corr[1.0]) < 0.05                       # per-voxel: white noise
    assert corr[2.0] > 0.3 and corr[4.0] > 0.7 and corr[8.0] > 0.85
    assert corr[1.0] < corr[2.0] < corr[4.0] < corr[8.0]
    # 2d noise too, and blocky 'nearest' noise is piecewise constant over s voxels
    n2 = coarse_gaussian_noise((2, 64, 64), 8.0, torch.Generator().manual_seed(0))
    assert lag1_autocorrelation(n2[None], 2) > 0.85
    nb = coarse_gaussian_noise((1, 32, 32), 4.0, torch.Generator().manual_seed(0), interpolation="nearest")
    assert len(torch.unique(nb)) == 8 * 8


def test_noise_grid_mapping():
    assert noise_grid_shape((24, 32, 32), 0) == (24, 32, 32)
    assert noise_grid_shape((24, 32, 32), 1) == (24, 32, 32)
    assert noise_grid_shape((24, 32, 32), 8) == (3, 4, 4)
    assert noise_grid_shape((24, 32, 32), 3) == (8, 11, 11)
    assert noise_grid_shape((5, 7), 100) == (1, 1)


def test_parameters_drawn_apart_from_application():
    corr = LabelMapCorruption(sigma=(0, 8), scale=(1, 3))
    params = corr.get_parameters(1000, torch.Generator().manual_seed(0))
    assert set(params) == {"sigma", "scale"}
    assert params["sigma"].shape == (1000,) and params["scale"].shape == (1000,)
    assert params["sigma"].min() >= 0 and params["sigma"].max() <= 8
    assert params["scale"].min() >= 1 and params["scale"].max() <= 3
    assert abs(float(params["sigma"].mean()) - 4) < 0.4          # uniform over the range
    fixed = LabelMapCorruption(sigma=2.0, scale=4.0).get_parameters(3)
    assert torch.equal(fixed["sigma"], torch.full((3,), 2.0)) and torch.equal(fixed["scale"], torch.full((3,), 4.0))
    # apply() is deterministic given parameters and generator state; per-sample parameters differ
    oh = labels_to_one_hot(random_labels((2, 16, 16)), C)
    p = {"sigma": torch.tensor([0.0, 6.0]), "scale": torch.tensor([1.0, 4.0])}
    a = corr.apply(oh, generator=torch.Generator().manual_seed(7), **p)
    b = corr.apply(oh, generator=torch.Generator().manual_seed(7), **p)
    assert torch.equal(a, b)
    assert torch.allclose(a[0], corrupt_probabilities(oh[:1], 0.0, 1.0)[0])   # sample 0: no noise
    assert not torch.allclose(a[1], corrupt_probabilities(oh[1:], 0.0, 1.0)[0])
    with pytest.raises(ValueError):
        LabelMapCorruption(sigma=(3, 1))
    with pytest.raises(ValueError):
        corrupt_probabilities(oh, torch.tensor([1.0, 2.0, 3.0]), 1.0)


def test_apply_denoiser_gives_no_gradient_to_the_segmenter():
    torch.manual_seed(0)
    segmenter = torch.nn.Conv2d(1, C, 3, padding=1)
    denoiser = torch.nn.Conv2d(C, C, 3, padding=1)
    for p in denoiser.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 1, 16, 16)
    probs = torch.softmax(segmenter(x), 1)
    target = apply_denoiser(denoiser, probs)
    assert target.shape == probs.shape and not target.requires_grad and target.grad_fn is None
    assert torch.allclose(target.sum(1), torch.ones(2, 16, 16), atol=1e-5)
    expected = target.detach()
    # a consistency loss against the target only trains the segmenter through its own output
    loss = ((probs - target) ** 2).sum()
    loss.backward()
    g_full = segmenter.weight.grad.clone()
    segmenter.zero_grad()
    probs2 = torch.softmax(segmenter(x), 1)
    ((probs2 - expected.detach()) ** 2).sum().backward()
    assert torch.allclose(g_full, segmenter.weight.grad, atol=1e-6)
    # deep-supervision lists: the full-resolution entry is used
    class DS(torch.nn.Module):
        def forward(self, t):
            return [t * 2, t[..., ::2, ::2]]
    assert torch.allclose(apply_denoiser(DS(), probs), torch.softmax(2 * denoiser_input(probs), 1), atol=1e-6)


def test_denoiser_input_floors_probabilities_at_e_minus_3_by_hand():
    """denoiser_input = softmax(clip(log p, -3, 0)): a map whose probabilities are all >= e^-3 comes
    back unchanged; (0.9, 0.1, 0, 0) becomes (0.9, 0.1, e^-3, e^-3) / (1 + 2 e^-3)."""
    p = torch.tensor([[0.4, 0.9], [0.3, 0.1], [0.2, 0.0], [0.1, 0.0]]).view(1, 4, 2)
    x = denoiser_input(p)
    assert x[0, :, 0].tolist() == pytest.approx([0.4, 0.3, 0.2, 0.1], abs=1e-6)
    assert x[0, :, 1].tolist() == pytest.approx([0.818499, 0.090944, 0.045279, 0.045279], abs=1e-6)


def test_apply_denoiser_by_hand_with_an_identity_denoiser():
    """log -> clip -> softmax -> denoiser -> softmax, with a denoiser that returns its input: a
    one-hot voxel enters as (1, e^-3) / (1 + e^-3) = (0.952574, 0.047426) and leaves as its softmax
    (0.712006, 0.287994); a 50/50 voxel stays 50/50."""
    identity = torch.nn.Conv1d(2, 2, 1, bias=False)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(2)[..., None])
    p = torch.tensor([[1.0, 0.5], [0.0, 0.5]]).view(1, 2, 2)
    assert denoiser_input(p)[0, :, 0].tolist() == pytest.approx([0.952574, 0.047426], abs=1e-6)
    out = apply_denoiser(identity, p)
    assert out[0, :, 0].tolist() == pytest.approx([0.712006, 0.287994], abs=1e-6)
    assert out[0, :, 1].tolist() == pytest.approx([0.5, 0.5], abs=1e-6)


def test_one_hot_axis_is_said_not_guessed_single_slice_2d():
    """A single-slice 2d case (1, Y, X) batched as (B, 1, Y, X) has no channel axis: its z axis of
    size 1 must survive; with a channel axis (B, 1, 1, Y, X) only that axis is replaced."""
    seg = torch.tensor([[[0, 1, 2], [3, 1, 0]]])[None]             # (B=1, z=1, Y=2, X=3), no channel axis
    oh = labels_to_one_hot(seg, C, has_channel_axis=False)
    assert oh.shape == (1, C, 1, 2, 3)
    assert torch.equal(oh.argmax(1), seg) and torch.equal(oh.sum(1), torch.ones_like(seg).float())
    assert oh[0, :, 0, 1, 0].tolist() == [0, 0, 0, 1]                 # label 3 at (z=0, y=1, x=0)
    oh_c = labels_to_one_hot(seg[:, None], C, has_channel_axis=True)  # (B, 1, 1, 2, 3): channel axis given
    assert torch.equal(oh_c, oh)
    # a 2d training batch (B, 1, Y, X) of nnU-Net targets
    tgt = random_labels((3, 8, 6))
    assert torch.equal(labels_to_one_hot(tgt, C, has_channel_axis=True), labels_to_one_hot(tgt[:, 0], C,
                                                                                          has_channel_axis=False))
    with pytest.raises(ValueError, match="expected"):
        labels_to_one_hot(torch.zeros(2, 3, 4, 4, dtype=torch.long), C, has_channel_axis=True)


def test_squared_sigma_distribution_puts_half_the_samples_in_the_lowest_quarter():
    g = torch.Generator().manual_seed(0)
    p = LabelMapCorruption((0.0, 8.0), (0.0, 8.0), sigma_distribution="squared").get_parameters(20000, g)
    s = p["sigma"]
    assert float(s.min()) >= 0 and float(s.max()) <= 8
    assert abs(float((s < 2.0).float().mean()) - 0.5) < 0.02      # P(8 u^2 < 2) = P(u < 1/2)
    assert abs(float(s.mean()) - 8 / 3) < 0.1                     # E[8 u^2] = 8/3
    assert abs(float(p["scale"].mean()) - 4) < 0.1                # the scale stays uniform
    with pytest.raises(ValueError, match="sigma_distribution"):
        LabelMapCorruption(sigma_distribution="normal")
