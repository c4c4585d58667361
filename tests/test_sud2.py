"""SUD^2: the decorrelation penalty on constructed latents, the multi-step noise schedule, the
noise-then-denoise steps (and their reduction to SUD's a(f)), where the penalty applies."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_sud.denoiser.corruption import apply_denoiser, denoiser_input
from nnunet_sud.losses.decorrelation import decorrelation_penalty, latent_correlation_matrix
from nnunet_sud.targets.store import SoftTargetStore
from nnunet_sud.trainers.sud2 import BottleneckUNet, denoising_noise_levels
from helpers import make_trainer


# ---------------------------------------------------------------------- the penalty
def test_penalty_is_zero_for_orthogonal_zero_mean_latents():
    # rows of an 8x8 Hadamard matrix without the constant row: zero mean, mutually orthogonal
    had = torch.tensor([[1.]])
    for _ in range(3):
        had = torch.cat([torch.cat([had, had], 1), torch.cat([had, -had], 1)])
    rows = had[1:]
    assert torch.allclose(rows.mean(1), torch.zeros(7)) and torch.allclose(rows @ rows.t(), 8 * torch.eye(7))
    latents = rows.reshape(7, 2, 2, 2)  # (B, C, *spatial): flattened per sample
    assert decorrelation_penalty(latents).item() == pytest.approx(0.0, abs=1e-10)
    assert torch.allclose(latent_correlation_matrix(latents), torch.eye(7), atol=1e-6)


def test_penalty_is_positive_for_correlated_latents_and_one_for_collapse():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 64, generator=g)
    collapsed = base.repeat(4, 1) * torch.tensor([[1.0], [2.0], [0.5], [3.0]]) + torch.tensor([[0.], [1.], [-2.], [5.]])
    assert decorrelation_penalty(collapsed).item() == pytest.approx(1.0, abs=1e-5)  # rho = 1: mode collapse
    anti = torch.cat([base, -base])
    assert decorrelation_penalty(anti).item() == pytest.approx(1.0, abs=1e-5)  # squared: anti-correlation counts
    partly = torch.cat([base, base + 1.5 * torch.randn(1, 64, generator=g)])
    independent = torch.randn(8, 4096, generator=g)
    assert 0.05 < decorrelation_penalty(partly).item() < 0.95
    assert decorrelation_penalty(independent).item() < 5e-3  # ~1/D for independent vectors


def test_penalty_by_hand_and_its_gradient_decorrelates():
    # a = (1,2,3), b = (1,3,2): centred (-1,0,1), (-1,1,0): cov = 1/3, var = 2/3 each -> rho = 0.5
    a, b, c = [1., 2., 3.], [1., 3., 2.], [3., 2., 1.]
    assert decorrelation_penalty(torch.tensor([a, b])).item() == pytest.approx(0.25, abs=1e-5)
    # with c: rho_ac = -1, rho_bc = -0.5 -> mean of squares over the pairs (0.25 + 1 + 0.25) / 3
    assert decorrelation_penalty(torch.tensor([a, b, c])).item() == pytest.approx(0.5, abs=1e-5)
    r = latent_correlation_matrix(torch.tensor([a, b, c]))
    assert torch.allclose(r, torch.tensor([[1., .5, -1.], [.5, 1., -.5], [-1., -.5, 1.]]), atol=1e-6)
    # a single sample has no pair: 0, still differentiable
    one = torch.randn(1, 5, requires_grad=True)
    p = decorrelation_penalty(one)
    p.backward()
    assert p.item() == 0 and one.grad is not None
    # gradient descent on the latents lowers the correlation
    x = torch.tensor([a, b], requires_grad=True)
    for _ in range(50):
        loss = decorrelation_penalty(x)
        g, = torch.autograd.grad(loss, x)
        x = (x - 1.0 * g).detach().requires_grad_(True)
    assert decorrelation_penalty(x).item() < 0.01


# ---------------------------------------------------------------------- multi-step denoising
def test_noise_schedule():
    assert denoising_noise_levels(1.0, 1) == [1.0]                     # eq. 9: one step at sigma_2
    assert denoising_noise_levels(2.0, 3) == [2.0, 1.0, 0.0]
    levels = denoising_noise_levels(1.5, 5)
    assert levels[0] == 1.5 and levels[-1] == 0 and all(x > y for x, y in zip(levels, levels[1:]))
    assert denoising_noise_levels(0.0, 3) == [0.0, 0.0, 0.0]          # iterated projection a(a(a(f)))
    with pytest.raises(ValueError):
        denoising_noise_levels(1.0, 0)
    with pytest.raises(ValueError):
        denoising_noise_levels(-1.0, 2)


class RecordingDenoiser(nn.Module):
    """A fixed (random) 1x1x1 conv 'denoiser' that records every input it gets."""

    def __init__(self, c=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv3d(c, c, 1)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return self.conv(x) * 3


def _probs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(shape, generator=g) * 2, 1)


def test_multistep_calls_the_denoiser_once_per_step_with_decreasing_noise(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerSUD2
    t = make_trainer(nnUNetTrainerSUD2, synthetic_plans)
    assert (t.sigma2, t.denoise_steps, t.lambda2, t.decorrelate) == (1.0, 3, 0.1, "segmenter")
    assert t.noise_levels() == [1.0, 0.5, 0.0]
    t.beta = 1.0  # look at R(F(f)) itself
    t.sigma2, t.denoise_steps = 2.0, 4
    t.denoiser = RecordingDenoiser()
    f = _probs((2, 4, 6, 8, 8), 1)
    torch.manual_seed(3)
    r = t.spatial_denoise(f)
    inputs = t.denoiser.inputs
    assert len(inputs) == 4  # one denoiser call per step
    # step k's input is softmax(clip(log r_{k-1}) + sigma_k nu): the noise is visible in the
    # differences of log-probabilities between classes, std sigma_k sqrt(2) (per-voxel white noise)
    prev = f
    stds = []
    for k, x in enumerate(inputs):
        clean = denoiser_input(prev)
        d = (torch.log(x[:, 1]) - torch.log(x[:, 0])) - (torch.log(clean[:, 1]) - torch.log(clean[:, 0]))
        stds.append(d.std().item() / math.sqrt(2))
        prev = torch.softmax(t.denoiser.conv(x) * 3, 1)
    assert stds[0] == pytest.approx(2.0, rel=0.1) and stds[1] == pytest.approx(4 / 3, rel=0.1)
    assert stds[2] == pytest.approx(2 / 3, rel=0.1) and stds[3] == pytest.approx(0.0, abs=1e-5)
    assert torch.allclose(r, prev, atol=1e-6)  # the result is the last step's softmax


def test_one_noise_free_step_is_suds_denoiser(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerSUD, nnUNetTrainerSUD2, nnUNetTrainerSUD2_decorr, \
        nnUNetTrainerSUD_beta1
    sud, sud2 = make_trainer(nnUNetTrainerSUD_beta1, synthetic_plans), make_trainer(nnUNetTrainerSUD2_decorr, synthetic_plans)
    # SUD^2's target is the denoiser's output itself (eq. 9): beta 1, not SUD's 0.2 / lambda_max
    assert (sud2.sigma2, sud2.denoise_steps) == (0.0, 1) and sud2.beta == sud.beta == 1.0
    assert make_trainer(nnUNetTrainerSUD, synthetic_plans).beta == pytest.approx(0.05)
    den = RecordingDenoiser(seed=5)
    sud.denoiser = sud2.denoiser = den
    f = _probs((2, 4, 4, 6, 6), 2)
    assert torch.equal(sud2.spatial_denoise(f), sud.spatial_denoise(f))
    assert torch.equal(sud2.diffusion_denoise(f), apply_denoiser(den, f))  # R(F(f)) = a(f)
    assert len(den.inputs) == 4
    # the noisy single step differs from it, and from call to call
    noisy = make_trainer(nnUNetTrainerSUD2, synthetic_plans)
    noisy.denoiser, noisy.denoise_steps, noisy.beta = den, 1, 1.0
    assert not torch.allclose(noisy.spatial_denoise(f), noisy.spatial_denoise(f))
    # beta = 0 needs no denoiser at all (TE-like)
    noisy.beta, noisy.denoiser = 0.0, None
    assert torch.equal(noisy.spatial_denoise(f), f)
    assert nnUNetTrainerSUD2.__mro__[1] is nnUNetTrainerSUD  # SUD's store/targets are reused, not copied


# ---------------------------------------------------------------------- where the penalty applies
def _unlabeled_batch(patch, seed, keys=("syn_unl_000", "syn_unl_001")):
    g = torch.Generator().manual_seed(seed)
    grids = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in patch], indexing="ij"))
    b = len(keys)
    return {"data": torch.randn((b, 1, *patch), generator=g), "keys": list(keys),
            "coords": grids[None].repeat(b, *([1] * (len(patch) + 1))),
            "valid": torch.ones((b, *patch), dtype=torch.bool), "case_shapes": torch.tensor([list(patch)] * b)}


def test_network_is_nnunets_with_the_bottleneck_exposed(synthetic_plans):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_sud.trainers import nnUNetTrainerSUD2
    t = make_trainer(nnUNetTrainerSUD2, synthetic_plans)
    t.initialize()
    base = make_trainer(nnUNetTrainer, synthetic_plans)
    base.initialize()
    assert isinstance(t.network, BottleneckUNet)
    assert set(t.network.state_dict()) == set(base.network.state_dict())  # checkpoints interchangeable
    t.network.load_state_dict(base.network.state_dict())
    x = torch.randn(2, 1, *t.configuration_manager.patch_size)
    with torch.no_grad():
        out, h = t.network(x, return_bottleneck=True)
        ref = base.network(x)
        skips = base.network.encoder(x)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(t.network(x), ref))  # the plain forward: nnU-Net's
    assert torch.equal(h, skips[-1]) and h.shape[1] == base.network.encoder.output_channels[-1]


@pytest.mark.parametrize("source", ["segmenter", "denoiser"])
def test_penalty_is_added_with_lambda2_over_lambda_max_and_reaches_the_segmenter(synthetic_plans, tmp_path, source):
    from nnunet_sud.denoiser.network import build_label_denoiser
    from nnunet_sud.trainers import nnUNetTrainerSUD2_decorr
    t = make_trainer(nnUNetTrainerSUD2_decorr, synthetic_plans)
    t.decorrelate = source
    t.initialize()
    t.denoiser = build_label_denoiser(t.plans_manager, t.configuration_manager, 4).eval().requires_grad_(False)
    patch = tuple(t.configuration_manager.patch_size)
    batch = _unlabeled_batch(patch, 0)

    def run(lambda2, store):
        t.store = SoftTargetStore(str(tmp_path / store), 4, dtype=np.float32)
        t.lambda2 = lambda2
        t.network.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss, logs = t.unlabeled_loss(batch)
        return loss, logs

    loss0, logs0 = run(0.0, "a")
    loss1, logs1 = run(0.1, "b")
    with torch.no_grad():
        out, h = t.network(batch["data"], return_bottleneck=True)
        f = torch.softmax(out[0].float(), 1)
        latents = h if source == "segmenter" else t.denoiser.encode(denoiser_input(f))
        expected = decorrelation_penalty(latents).item()
    assert logs1["latent_decorrelation"] == pytest.approx(expected, rel=1e-5) and expected > 0
    assert loss1.item() - loss0.item() == pytest.approx(0.1 / t.lambda_max * expected, rel=1e-4, abs=1e-7)
    # the penalty alone reaches the segmenter's encoder; the frozen denoiser gets nothing
    t.network.zero_grad(set_to_none=True)
    out, h = t.network(batch["data"], return_bottleneck=True)
    t.latent_penalty(h, torch.softmax(out[0].float(), 1)).backward()
    enc_grads = [p.grad for p in t.network.encoder.parameters() if p.grad is not None]
    assert enc_grads and sum(g.abs().sum().item() for g in enc_grads) > 0
    assert all(p.grad is None for p in t.denoiser.parameters())
    if source == "denoiser":
        assert t.needs_denoiser()
