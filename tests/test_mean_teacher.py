"""Mean teacher, UA-MT and DAE-uncertainty trainers: the EMA teacher, the schedules and the
consistency terms on hand computations and constructed cases (in process, no training loop)."""
import math
import os

import pytest
import torch
from torch import nn

from nnunet_sud.errors import UserFacingError
from nnunet_sud.losses.consistency import dae_uncertainty, entropy, mc_entropy, weighted_consistency
from nnunet_sud.network_helpers import unwrap_network
from nnunet_sud.trainers.teacher import EMATeacher
from helpers import make_trainer


def tiny_net(c_in=1, c_out=4):
    return nn.Sequential(nn.Conv3d(c_in, c_out, 1), nn.BatchNorm3d(c_out))


def _fill(module, value):
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def _values(module):
    return {float(v) for p in module.parameters() for v in p.flatten()}


# ---------------------------------------------------------------------- EMA teacher
def test_ema_update_follows_the_reference_warmup_on_hand_computed_values():
    student = tiny_net()
    _fill(student, 1.0)
    teacher = EMATeacher(student, decay=0.6, warmup=True)
    assert teacher.module is not student and all(not p.requires_grad for p in teacher.module.parameters())
    # a_s = min(1 - 1/(s + 1), 0.6) for s = 0, 1, 2, 3: 0, 0.5, 0.6 (capped), 0.6
    expected_teacher = []
    t = 1.0
    for s_value, a in ((3.0, 0.0), (5.0, 0.5), (10.0, 0.6), (0.0, 0.6)):
        t = a * t + (1 - a) * s_value
        expected_teacher.append(t)
    assert expected_teacher == pytest.approx([3.0, 4.0, 6.4, 3.84])
    for (s_value, a), t_expected in zip(((3.0, 0.0), (5.0, 0.5), (10.0, 0.6), (0.0, 0.6)), expected_teacher):
        _fill(student, s_value)
        assert teacher.current_decay() == pytest.approx(a)
        assert teacher.update(student) == pytest.approx(a)
        vals = _values(teacher.module)
        assert max(abs(v - t_expected) for v in vals) < 1e-5
    assert teacher.step == 4

    # constant decay without warm-up: the first update already keeps 60 % of the teacher
    student2 = tiny_net()
    _fill(student2, 1.0)
    const = EMATeacher(student2, decay=0.6, warmup=False)
    _fill(student2, 3.0)
    const.update(student2)
    assert max(abs(v - (0.6 * 1 + 0.4 * 3)) for v in _values(const.module)) < 1e-6


def test_ema_averages_float_buffers_and_copies_counters():
    student = tiny_net()
    teacher = EMATeacher(student, decay=0.99, warmup=True)
    teacher.step = 1                                          # a = 0.5
    bn_s, bn_t = student[1], teacher.module[1]
    with torch.no_grad():
        bn_s.running_mean.fill_(2.0)
        bn_t.running_mean.fill_(0.0)
        bn_s.num_batches_tracked.fill_(7)
    teacher.update(student)
    assert torch.allclose(bn_t.running_mean, torch.full_like(bn_t.running_mean, 1.0))
    assert int(bn_t.num_batches_tracked) == 7


def test_teacher_copies_the_plain_module_of_compiled_and_ddp_networks(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    student = tiny_net()
    compiled = torch.compile(student)  # an OptimizedModule (nothing is compiled until it is called)
    assert unwrap_network(compiled) is student
    teacher = EMATeacher(compiled)
    assert type(teacher.module) is nn.Sequential
    assert set(teacher.module.state_dict()) == set(student.state_dict())

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(torch.compile(student))
        assert unwrap_network(ddp) is student
        teacher = EMATeacher(ddp, decay=0.5, warmup=False)
        assert type(teacher.module) is nn.Sequential
        w0 = teacher.module[0].weight.clone()
        _fill(student, 2.0)
        teacher.update(ddp)                                  # reads the student's own parameters
        assert torch.allclose(teacher.module[0].weight, 0.5 * w0 + 0.5 * 2.0)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------- schedules and defaults
def test_consistency_weight_and_threshold_ramps(synthetic_plans):
    from nnunet_sud.trainers import (nnUNetTrainerDAEUncertainty, nnUNetTrainerDAEUncertainty_kappa5,
                                     nnUNetTrainerDAEUncertainty_lambda0p5, nnUNetTrainerMeanTeacher,
                                     nnUNetTrainerUAMT)
    ts = (0.0, 0.25, 0.5, 0.9, 1.0)
    gauss = [0.1 * math.exp(-5 * (1 - t) ** 2) for t in ts]
    assert gauss[0] == pytest.approx(0.1 * 0.006737947) and gauss[-1] == pytest.approx(0.1)
    for cls in (nnUNetTrainerMeanTeacher, nnUNetTrainerUAMT, nnUNetTrainerDAEUncertainty):
        tr = make_trainer(cls, synthetic_plans)
        assert [tr.unlabeled_weight(t) for t in ts] == pytest.approx(gauss)
        assert (tr.ema_decay, tr.ema_warmup, tr.teacher_noise_std, tr.teacher_noise_clip) == (0.99, True, 0.1, 0.2)
    uamt = make_trainer(nnUNetTrainerUAMT, synthetic_plans)
    assert uamt.mc_passes == 8
    ln2 = math.log(2)  # the reference's scale, whatever C is (here background + 3 labels)
    assert [uamt.uncertainty_threshold(t) for t in ts] == pytest.approx(
        [(0.75 + 0.25 * math.exp(-5 * (1 - t) ** 2)) * ln2 for t in ts])
    assert uamt.uncertainty_threshold(0.0) == pytest.approx(0.7517 * ln2, abs=1e-4)
    assert uamt.uncertainty_threshold(1.0) == pytest.approx(ln2)
    from nnunet_sud.trainers import nnUNetTrainerUAMT_lnC
    assert make_trainer(nnUNetTrainerUAMT_lnC, synthetic_plans).uncertainty_threshold(1.0) == pytest.approx(math.log(4))
    assert make_trainer(nnUNetTrainerDAEUncertainty, synthetic_plans).kappa == 1.0
    assert make_trainer(nnUNetTrainerDAEUncertainty_kappa5, synthetic_plans).kappa == 5.0
    assert make_trainer(nnUNetTrainerDAEUncertainty_lambda0p5, synthetic_plans).unlabeled_weight(1.0) == pytest.approx(0.5)


def test_teacher_input_noise_is_clipped_gaussian(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerMeanTeacher
    tr = make_trainer(nnUNetTrainerMeanTeacher, synthetic_plans)
    torch.manual_seed(0)
    x = torch.full((4, 1, 40, 40, 40), 3.0)
    noise = tr.perturb(x) - x
    assert float(noise.abs().max()) <= 0.2 + 1e-6
    # P(|N(0, 0.1^2)| > 0.2) = 4.55 %: that fraction sits exactly at the clip bounds
    at_bound = float((noise.abs() > 0.2 - 1e-6).float().mean())
    assert at_bound == pytest.approx(0.0455, abs=0.004)
    assert float(noise.mean()) == pytest.approx(0.0, abs=2e-3)


# ---------------------------------------------------------------------- mean teacher
def test_mean_teacher_consistency_is_the_mean_squared_softmax_difference(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerMeanTeacher
    tr = make_trainer(nnUNetTrainerMeanTeacher, synthetic_plans)
    p_s = torch.tensor([[[0.7, 0.1]], [[0.3, 0.9]]]).permute(1, 0, 2)[None]   # (1, 2 classes, 1, 2)
    p_t = torch.tensor([[[0.5, 0.5]], [[0.5, 0.5]]]).permute(1, 0, 2)[None]
    # voxel 0: (0.2^2 + 0.2^2) / 2 = 0.04; voxel 1: (0.4^2 + 0.4^2) / 2 = 0.16 -> mean 0.1
    assert float(tr.consistency_loss(p_s, p_t)) == pytest.approx(0.1)


def test_mean_teacher_in_process_teacher_lifecycle_and_extra_state(synthetic_plans):
    """initialize -> teacher copy (deep supervision off); a step's gradient reaches the student only;
    after_optimizer_step is the EMA; extra state restores identical weights and the step counter."""
    from nnunet_sud.trainers import nnUNetTrainerMeanTeacher
    tr = make_trainer(nnUNetTrainerMeanTeacher, synthetic_plans)
    tr.initialize()
    student = tr.plain_network()
    assert tr.teacher.module is not student and tr.teacher.module.decoder.deep_supervision is False
    assert student.decoder.deep_supervision is True
    for (k, v), (k2, v2) in zip(student.state_dict().items(), tr.teacher.module.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)

    torch.manual_seed(1)
    patch = tr.configuration_manager.patch_size
    batch_u = {"data": torch.randn(2, 1, *patch), "valid": torch.ones(2, *patch, dtype=torch.bool)}
    loss, logs = tr.unlabeled_loss(batch_u)
    assert loss.ndim == 0 and torch.isfinite(loss) and float(loss.detach()) > 0
    loss.backward()
    # the full-resolution path learns (the deep-supervision heads of lower resolutions are not used)
    assert all(p.grad is not None for p in student.encoder.parameters())
    assert all(p.grad is not None for p in student.decoder.seg_layers[-1].parameters())
    assert all(p.grad is None for p in student.decoder.seg_layers[0].parameters())
    assert all(p.grad is None for p in tr.teacher.module.parameters())

    before = {k: v.clone() for k, v in tr.teacher.module.state_dict().items()}
    tr.teacher.step = 5                                          # a = min(1 - 1/6, 0.99) = 5/6
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    tr.after_optimizer_step()
    sd_s = student.state_dict()
    for k, v in tr.teacher.module.state_dict().items():
        if v.dtype.is_floating_point:
            assert torch.allclose(v, 5 / 6 * before[k] + 1 / 6 * sd_s[k], atol=1e-6), k
    assert tr.teacher.step == 6

    state = tr.get_extra_state()
    assert state["ema_step"] == 6
    other = make_trainer(nnUNetTrainerMeanTeacher, synthetic_plans)
    other.initialize()
    other.set_extra_state(state)
    assert other.teacher.step == 6 and other._teacher_restored
    for k, v in tr.teacher.module.state_dict().items():
        assert torch.equal(other.teacher.module.state_dict()[k], v)
    with pytest.raises(UserFacingError, match="lacks teacher_weights"):
        other.set_extra_state({"ema_step": 3})


# ---------------------------------------------------------------------- UA-MT
def _agree_disagree_passes(k=8, c=4):
    """(K, 1, C, 1, 1, 2): voxel 0 -- all passes say class 2 (one-hot); voxel 1 -- passes cycle
    through all classes, so their mean is uniform."""
    p = torch.zeros(k, 1, c, 1, 1, 2)
    p[:, 0, 2, 0, 0, 0] = 1.0
    for i in range(k):
        p[i, 0, i % c, 0, 0, 1] = 1.0
    return p


def test_uamt_uncertainty_keeps_agreeing_voxels_and_masks_disagreeing_ones(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerUAMT
    tr = make_trainer(nnUNetTrainerUAMT, synthetic_plans)
    p_k = _agree_disagree_passes()
    u = tr.uncertainty(p_k)
    assert u.shape == (1, 1, 1, 2)
    assert float(u[0, 0, 0, 0]) == pytest.approx(0.0, abs=1e-5)            # agreement: zero entropy
    assert float(u[0, 0, 0, 1]) == pytest.approx(math.log(4), abs=1e-5)    # uniform mean: ln C

    p_t = torch.full((1, 4, 1, 1, 2), 0.25)
    p_s = torch.tensor([0.4, 0.2, 0.2, 0.2]).view(1, 4, 1, 1, 1).repeat(1, 1, 1, 1, 2)
    for t in (0.0, 0.5, 0.9):
        loss, _, mask, threshold = tr.consistency_loss(p_s, p_t, p_k, t)
        assert mask.flatten().tolist() == [1.0, 0.0] and threshold < math.log(4)
        # masked MSE normalised by the mask count: mean over classes of voxel 0 only
        assert float(loss) == pytest.approx((0.15 ** 2 + 3 * 0.05 ** 2) / 4)
    # changing the student where the mask is 0 does not change the loss
    p_s2 = p_s.clone()
    p_s2[0, :, 0, 0, 1] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    assert float(tr.consistency_loss(p_s2, p_t, p_k, 0.5)[0]) == float(tr.consistency_loss(p_s, p_t, p_k, 0.5)[0])
    # an all-masked batch gives a zero loss (no division by zero)
    loss, *_ = tr.consistency_loss(p_s, p_t, p_k[..., 1:].repeat(1, 1, 1, 1, 1, 2), 0.0)
    assert float(loss) == 0.0


class _Recorder(nn.Module):
    """1x1x1 conv to 4 classes that records the batch size of every forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 1)
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.conv(x)


def test_uamt_passes_are_batched_in_pass_major_order(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerUAMT
    tr = make_trainer(nnUNetTrainerUAMT, synthetic_plans)
    tr.teacher = EMATeacher(_Recorder())
    x = torch.randn(2, 1, 3, 4, 5)
    p_k = tr.mc_teacher_probabilities(x)
    assert p_k.shape == (8, 2, 4, 3, 4, 5)
    assert tr.teacher.module.calls == [16]                       # one forward of K * B samples
    assert not torch.allclose(p_k[0], p_k[1])                     # independent noise per pass
    tr.teacher.module.calls.clear()
    tr.mc_passes_per_forward = 3
    tr.mc_passes = 8
    assert tr.mc_teacher_probabilities(x).shape == (8, 2, 4, 3, 4, 5)
    assert tr.teacher.module.calls == [6, 6, 4]
    # without noise every pass equals the teacher on x: p_k[k, b] belongs to sample b
    tr.teacher_noise_std = 0.0
    p_k = tr.mc_teacher_probabilities(x)
    ref = torch.softmax(tr.teacher(x), 1)
    assert all(torch.allclose(p_k[k], ref, atol=1e-6) for k in range(8))


# ------------------------------------------- DAE uncertainty (Adiga Vasudeva, Dolz, Lombaert, MICCAI 2022)
def _dae_case():
    """C = 2, three voxels: teacher and DAE agree / mildly / strongly disagree."""
    p_t = torch.tensor([[0.9, 0.8, 0.9], [0.1, 0.2, 0.1]]).view(1, 2, 1, 1, 3)
    p_hat = torch.tensor([[0.9, 0.5, 0.0], [0.1, 0.5, 1.0]]).view(1, 2, 1, 1, 3)
    p_s = torch.tensor([[0.6, 0.6, 0.2], [0.4, 0.4, 0.8]]).view(1, 2, 1, 1, 3)
    return p_s, p_t, p_hat


def test_dae_weights_are_exp_of_minus_kappa_u_and_loss_is_their_weighted_mean(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerDAEUncertainty
    tr = make_trainer(nnUNetTrainerDAEUncertainty, synthetic_plans)
    p_s, p_t, p_hat = _dae_case()
    u_hand = [0.0, 0.3 ** 2 * 2, 0.9 ** 2 * 2]                   # ||p_hat - p_t||^2 = 0, 0.18, 1.62
    d_hand = [0.3 ** 2, 0.2 ** 2, 0.7 ** 2]                      # ||p_s - p_t||^2 / C (class mean, as MT)
    for kappa in (1.0, 5.0):
        tr.kappa = kappa
        p_s_var = p_s.clone().requires_grad_(True)
        loss, u, w = tr.consistency_loss(p_s_var, p_t, p_hat, 0.3)
        assert u.flatten().tolist() == pytest.approx(u_hand)
        w_hand = [math.exp(-kappa * v) for v in u_hand]
        assert w.flatten().tolist() == pytest.approx(w_hand)
        assert float(loss.detach()) == pytest.approx(sum(a * b for a, b in zip(w_hand, d_hand)) / sum(w_hand))
        # each voxel's pull on the student is proportional to its weight
        loss.backward()
        g = p_s_var.grad[0, 0, 0, 0]
        ratio = (g / (p_s - p_t)[0, 0, 0, 0]).tolist()
        assert ratio[1] / ratio[0] == pytest.approx(w_hand[1] / w_hand[0], rel=1e-5)
        assert ratio[2] / ratio[0] == pytest.approx(w_hand[2] / w_hand[0], rel=1e-5)


def test_dae_consistency_has_mean_teachers_weight_and_the_class_sum_is_a_variant(synthetic_plans):
    """Equal lambda, equal weight (the DAE-uncertainty paper compares at equal lambda): with U = 0 (weights 1) DAE-MT's
    consistency is MT's; the paper's sum over classes is C times it."""
    from nnunet_sud.trainers import (nnUNetTrainerDAEUncertainty, nnUNetTrainerDAEUncertainty_classSum,
                                     nnUNetTrainerMeanTeacher)
    g = torch.Generator().manual_seed(3)
    p_s = torch.softmax(torch.randn(2, 4, 3, 3, 3, generator=g), 1)
    p_t = torch.softmax(torch.randn(2, 4, 3, 3, 3, generator=g), 1)
    mt = float(make_trainer(nnUNetTrainerMeanTeacher, synthetic_plans).consistency_loss(p_s, p_t))
    dae = float(make_trainer(nnUNetTrainerDAEUncertainty, synthetic_plans).consistency_loss(p_s, p_t, p_t, 0.5)[0])
    dae_sum = float(make_trainer(nnUNetTrainerDAEUncertainty_classSum, synthetic_plans).consistency_loss(
        p_s, p_t, p_t, 0.5)[0])
    assert dae == pytest.approx(mt, rel=1e-6) and dae_sum == pytest.approx(4 * mt, rel=1e-6)


def test_uamt_threshold_scale_is_ln2_so_a_50_50_voxel_is_unreliable(synthetic_plans):
    """With C = 4, ln C scaling starts the threshold at 1.04 nats: a voxel split 50/50 between two
    classes (entropy ln 2 = 0.69) would count as reliable. The reference's ln 2 masks it."""
    from nnunet_sud.trainers import nnUNetTrainerUAMT, nnUNetTrainerUAMT_lnC
    p_k = torch.zeros(8, 1, 4, 1, 1, 2)
    p_k[:, 0, 1, 0, 0, 0] = 1.0                                   # voxel 0: every pass says class 1
    p_k[0::2, 0, 1, 0, 0, 1] = 1.0                                # voxel 1: half the passes class 1,
    p_k[1::2, 0, 3, 0, 0, 1] = 1.0                                # half class 3: mean 50/50, entropy ln 2
    p = torch.full((1, 4, 1, 1, 2), 0.25)
    for t in (0.0, 0.5, 0.9):  # (at t = 1, H = ln 2 itself: the boundary)
        _, u, mask, _ = make_trainer(nnUNetTrainerUAMT, synthetic_plans).consistency_loss(p, p, p_k, t)
        assert float(u[0, 0, 0, 1]) == pytest.approx(math.log(2), abs=1e-5)
        assert mask.flatten().tolist() == [1.0, 0.0]
    _, _, mask, _ = make_trainer(nnUNetTrainerUAMT_lnC, synthetic_plans).consistency_loss(p, p, p_k, 0.0)
    assert mask.flatten().tolist() == [1.0, 1.0]


def test_padded_voxels_never_count_in_the_mean_teacher_family(synthetic_plans):
    """Voxels outside the image (batch_u['valid'] False) neither add to a consistency loss nor to its
    normaliser: the loss equals the loss of the image voxels alone, whatever the padding holds."""
    from nnunet_sud.trainers import nnUNetTrainerDAEUncertainty, nnUNetTrainerMeanTeacher, nnUNetTrainerUAMT
    g = torch.Generator().manual_seed(5)
    p_s = torch.softmax(torch.randn(1, 4, 1, 2, 3, generator=g), 1)
    p_t = torch.softmax(torch.randn(1, 4, 1, 2, 3, generator=g), 1)
    valid = torch.tensor([[[[True, True, False], [True, False, False]]]])    # (B, *patch): 3 image voxels
    garbage = p_s.clone()
    garbage[..., ~valid[0]] = torch.tensor([1.0, 0.0, 0.0, 0.0])[:, None]
    image = lambda p: p[..., valid[0]][..., None, None, :]                  # noqa: E731  (..., 1, 1, 3)
    mt = make_trainer(nnUNetTrainerMeanTeacher, synthetic_plans)
    hand = float(((p_s - p_t) ** 2).mean(1)[valid].mean())
    assert float(mt.consistency_loss(p_s, p_t, valid)) == pytest.approx(hand)
    assert float(mt.consistency_loss(garbage, p_t, valid)) == pytest.approx(hand)
    p_k = p_t.expand(8, *p_t.shape)                                          # agreeing passes: U = H(p_t)
    uamt = make_trainer(nnUNetTrainerUAMT, synthetic_plans)
    ref = uamt.consistency_loss(image(p_s), image(p_t), image(p_k), 1.0)
    for x in (p_s, garbage):
        loss, _, mask, _ = uamt.consistency_loss(x, p_t, p_k, 1.0, valid)
        assert float(loss) == pytest.approx(float(ref[0])) and float(mask[~valid].sum()) == 0.0
    dae = make_trainer(nnUNetTrainerDAEUncertainty, synthetic_plans)
    p_hat = torch.softmax(torch.randn(1, 4, 1, 2, 3, generator=g), 1)
    ref = dae.consistency_loss(image(p_s), image(p_t), image(p_hat), 0.5)
    for x in (p_s, garbage):
        loss, _, w = dae.consistency_loss(x, p_t, p_hat, 0.5, valid)
        assert float(loss) == pytest.approx(float(ref[0])) and float(w[~valid].sum()) == 0.0


def test_dae_threshold_variant_ignores_uncertain_voxels(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerDAEUncertainty_threshold
    tr = make_trainer(nnUNetTrainerDAEUncertainty_threshold, synthetic_plans)
    p_s, p_t, p_hat = _dae_case()                                  # U = 0, 0.18, 1.62; H(0) = 0.7517 * 2
    loss, u, w = tr.consistency_loss(p_s, p_t, p_hat, 0.0)
    assert w.flatten().tolist() == [1.0, 1.0, 0.0]
    changed = p_s.clone()
    changed[0, :, 0, 0, 2] = torch.tensor([1.0, 0.0])              # the voxel with large U
    assert float(tr.consistency_loss(changed, p_t, p_hat, 0.0)[0]) == float(loss)
    changed[0, :, 0, 0, 1] = torch.tensor([0.0, 1.0])              # a reliable voxel: the loss moves
    assert float(tr.consistency_loss(changed, p_t, p_hat, 0.0)[0]) != pytest.approx(float(loss))
    assert float(loss) == pytest.approx((0.09 + 0.04) / 2)
    # the threshold is on U's own range [0, 2]: U = 1.28 (teacher 0.9/0.1, DAE 0.1/0.9) is kept at the
    # start (H(0) = 1.503; ln 4 scaling would have put it at 1.04 and masked it) and at the end (H(1) = 2)
    p_t2 = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1, 1)
    p_hat2 = torch.tensor([0.1, 0.9]).view(1, 2, 1, 1, 1)
    for t in (0.0, 1.0):
        _, u2, w2 = tr.consistency_loss(p_t2, p_t2, p_hat2, t)
        assert float(u2) == pytest.approx(1.28) and float(w2) == 1.0


def test_dae_entropy_variant_uses_the_entropy_of_teacher_and_reconstruction(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerDAEUncertainty_entropy
    tr = make_trainer(nnUNetTrainerDAEUncertainty_entropy, synthetic_plans)
    p_t = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(1, 2, 1, 1, 2)
    p_hat = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 1, 2)
    u = tr.uncertainty(p_t, p_hat).flatten()
    assert float(u[0]) == pytest.approx(0.0, abs=1e-5) and float(u[1]) == pytest.approx(math.log(2), abs=1e-5)
    _, _, w = tr.consistency_loss(p_t, p_t, p_hat, 0.0)
    assert w.flatten().tolist() == pytest.approx([1.0, 0.5], abs=1e-5)   # exp(-ln 2)


def test_consistency_helpers_validate_shapes():
    p = torch.rand(1, 2, 3, 3, 3)
    with pytest.raises(ValueError, match="differ in shape"):
        weighted_consistency(p, p[:, :, :2])
    with pytest.raises(ValueError, match="class_reduction"):
        weighted_consistency(p, p, class_reduction="max")
    with pytest.raises(ValueError, match="weight shape"):
        weighted_consistency(p, p, torch.ones(1, 2, 2, 2))


def test_mc_entropy_is_the_entropy_of_the_mean_not_the_mean_entropy_by_hand():
    """K = 2 passes, 2 classes, 3 voxels: (a) both one-hot on class 0; (b) one-hot on different
    classes: each pass is certain (entropy 0) but their mean is 50/50, ln 2; (c) (0.8, 0.2) and
    (0.4, 0.6): mean (0.6, 0.4), -(0.6 ln 0.6 + 0.4 ln 0.4) = 0.673012."""
    q = torch.tensor([[[1.0, 1.0, 0.8], [0.0, 0.0, 0.2]],
                      [[1.0, 0.0, 0.4], [0.0, 1.0, 0.6]]]).view(2, 1, 2, 3)  # (K, B, C, voxels)
    assert mc_entropy(q).flatten().tolist() == pytest.approx([0.0, math.log(2), 0.673012], abs=1e-5)
    assert entropy(q[0]).flatten().tolist() == pytest.approx([0.0, 0.0, 0.500402], abs=1e-5)


def test_dae_uncertainty_is_the_squared_distance_of_the_maps_by_hand():
    """U = sum_c (p_hat_c - p_t_c)^2: 0 where they agree, 2 (its maximum) for opposite one-hot maps,
    (0.7 - 0.5)^2 + (0.3 - 0.5)^2 = 0.08 in between; symmetric."""
    p_hat = torch.tensor([[[1.0, 1.0, 0.7], [0.0, 0.0, 0.3]]]).view(1, 2, 3)
    p_t = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]]]).view(1, 2, 3)
    assert dae_uncertainty(p_hat, p_t).flatten().tolist() == pytest.approx([0.0, 2.0, 0.08], abs=1e-6)
    assert torch.equal(dae_uncertainty(p_hat, p_t), dae_uncertainty(p_t, p_hat))


# ---------------------------------------------------------------------- errors before training
@pytest.mark.parametrize("trainer_name", ["nnUNetTrainerDAEUncertainty", "nnUNetTrainerPostDenoise"])
def test_missing_denoiser_stops_training_before_anything_is_built(trainer_name, synthetic3d, monkeypatch, tmp_path):
    import nnunetv2.paths
    import nnunet_sud.trainers as trainers
    monkeypatch.setattr(nnunetv2.paths, "nnUNet_results", str(tmp_path))   # no trained denoiser there
    monkeypatch.delenv("nnUNet_denoiser", raising=False)
    tr = make_trainer(getattr(trainers, trainer_name), synthetic3d)
    with pytest.raises(UserFacingError, match=r"no trained label denoiser found.*"
                                              r"nnUNetv2_train 991 3d_fullres 0 -tr nnUNetTrainerLabelDenoiser"):
        tr.on_train_start()
    assert tr.network is None and tr.dataloader_train is None


def test_uamt_and_dae_refuse_region_based_labels(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerDAEUncertainty, nnUNetTrainerUAMT
    regions = {"background": 0, "whole": [1, 2, 3], "core": [2, 3]}
    for cls in (nnUNetTrainerUAMT, nnUNetTrainerDAEUncertainty):
        with pytest.raises(UserFacingError, match=f"{cls.__name__} needs mutually exclusive classes .*region-based"):
            make_trainer(cls, synthetic_plans, dataset_edit=lambda ds: ds.update(labels=regions,
                                                                                 regions_class_order=[1, 2]))


# ---------------------------------------------------------------------- feature dropout (UA-MT's V-Net)
def _captured_bottleneck(net, x):
    """Run net on x and return what the decoder received as the bottleneck (after the hooks)."""
    seen = {}
    h = net.decoder.register_forward_pre_hook(lambda mod, args: seen.setdefault("skips", args[0]))
    out = net(x)
    h.remove()
    return seen["skips"][-1], out


def test_feature_dropout_drops_whole_bottleneck_channels_in_train_mode_only(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerMeanTeacher_noDropout
    from nnunet_sud.trainers.teacher import add_feature_dropout
    tr = make_trainer(nnUNetTrainerMeanTeacher_noDropout, synthetic_plans)
    tr.initialize()
    net = tr.plain_network()
    keys = list(net.state_dict())
    torch.manual_seed(0)
    x = torch.randn(4, 1, *tr.configuration_manager.patch_size)
    net.train()
    clean, clean_out = _captured_bottleneck(net, x)
    handles = add_feature_dropout(net, 0.5)
    assert list(net.state_dict()) == keys  # no module or state-dict change: model folders stay ordinary
    torch.manual_seed(1)
    dropped, out1 = _captured_bottleneck(net, x)
    # every (sample, channel) of the bottleneck is either zero or the clean one scaled by 1 / (1 - p)
    per_channel = dropped.flatten(2)
    zero = (per_channel == 0).all(-1)
    assert torch.allclose(per_channel[~zero], 2 * clean.flatten(2)[~zero], atol=1e-5)
    assert 0.3 < zero.float().mean() < 0.7, zero.float().mean()  # about p of 4 x 320 channels
    torch.manual_seed(2)
    _, out2 = _captured_bottleneck(net, x)
    assert not torch.allclose(out1[0], out2[0])  # stochastic in train mode
    net.eval()
    with torch.no_grad():
        ev = net(x)
    for h in handles:
        h.remove()
    with torch.no_grad():
        ev_plain = net(x)
    assert torch.equal(ev[0] if isinstance(ev, (list, tuple)) else ev,
                       ev_plain[0] if isinstance(ev_plain, (list, tuple)) else ev_plain)  # eval: identity
    net.train()
    torch.manual_seed(1)
    _, out_removed = _captured_bottleneck(net, x)
    assert torch.allclose(out_removed[0], clean_out[0], atol=1e-6)  # removed hooks leave the clean network


def test_mean_teacher_family_perturbs_student_and_teacher_by_dropout(synthetic_plans):
    """MT, UA-MT and DAE-MT default to p = 0.5 in student and teacher (the teacher copies the hooks);
    the _noDropout variant and a setting changed after __init__ are honoured; invalid p stops early."""
    from nnunet_sud.trainers import (nnUNetTrainerDAEUncertainty, nnUNetTrainerMeanTeacher,
                                     nnUNetTrainerMeanTeacher_noDropout, nnUNetTrainerUAMT)
    for cls in (nnUNetTrainerMeanTeacher, nnUNetTrainerUAMT, nnUNetTrainerDAEUncertainty):
        assert make_trainer(cls, synthetic_plans).feature_dropout == 0.5, cls.__name__
    x = torch.randn(2, 1, *make_trainer(nnUNetTrainerMeanTeacher, synthetic_plans).configuration_manager.patch_size)

    def two_passes(tr):
        outs = []
        for seed in (3, 4):
            torch.manual_seed(seed)
            with torch.no_grad():
                outs.append((tr.student_logits(x), tr.teacher_logits(x)))
        return outs

    mt = make_trainer(nnUNetTrainerMeanTeacher, synthetic_plans)
    mt.initialize()
    (s1, t1), (s2, t2) = two_passes(mt)
    assert not torch.allclose(s1, s2) and not torch.allclose(t1, t2)
    plain = make_trainer(nnUNetTrainerMeanTeacher_noDropout, synthetic_plans)
    plain.initialize()
    (s1, t1), (s2, t2) = two_passes(plain)
    assert torch.equal(s1, s2) and torch.equal(t1, t2)
    late = make_trainer(nnUNetTrainerMeanTeacher, synthetic_plans)
    late.feature_dropout = 0.0  # a user's variant after super().__init__()
    late.initialize()
    (s1, _), (s2, _) = two_passes(late)
    assert torch.equal(s1, s2)
    bad = make_trainer(nnUNetTrainerMeanTeacher, synthetic_plans)
    bad.feature_dropout = 1.0
    with pytest.raises(UserFacingError, match="feature_dropout"):
        bad.initialize()


def test_feature_dropout_control_is_nnunet_with_the_students_dropout_only(synthetic_plans):
    """nnUNetTrainerFeatureDropout: plain nnUNetTrainer (no unlabeled stream, no teacher) whose network
    drops bottleneck channels in train mode with MT's p; eval mode (nnUNetv2_predict) is the plain
    network; p read at initialize; a bad p names the setting."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_sud.trainers import nnUNetTrainerFeatureDropout, nnUNetTrainerMeanTeacher
    tr = make_trainer(nnUNetTrainerFeatureDropout, synthetic_plans)
    assert type(tr).__mro__[1] is nnUNetTrainer and not hasattr(tr, "teacher")
    assert tr.feature_dropout == make_trainer(nnUNetTrainerMeanTeacher, synthetic_plans).feature_dropout == 0.5
    tr.initialize()
    net = unwrap_network(tr.network)
    torch.manual_seed(0)
    x = torch.randn(2, 1, *tr.configuration_manager.patch_size)
    net.train()
    masks = []
    for seed in (1, 2):  # train mode: about half of the bottleneck channels zero, a new draw each pass
        torch.manual_seed(seed)
        masks.append((_captured_bottleneck(net, x)[0].flatten(2) == 0).all(-1))
        assert 0.3 < masks[-1].float().mean() < 0.7
    assert not torch.equal(*masks)
    plain = make_trainer(nnUNetTrainer, synthetic_plans)
    plain.initialize()
    plain_net = unwrap_network(plain.network)
    plain_net.load_state_dict(net.state_dict())  # same keys: an ordinary model folder
    net.eval(), plain_net.eval()
    with torch.no_grad():
        assert torch.equal(net(x)[0], plain_net(x)[0])
    late = make_trainer(nnUNetTrainerFeatureDropout, synthetic_plans)
    late.feature_dropout = 0.0  # a user's variant after super().__init__()
    late.initialize()
    late_net = unwrap_network(late.network).train()
    outs = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(late_net(x)[0])
    assert torch.equal(*outs)
    for p in (1.0, -0.1):
        bad = make_trainer(nnUNetTrainerFeatureDropout, synthetic_plans)
        bad.feature_dropout = p
        with pytest.raises(UserFacingError, match="nnUNetTrainerFeatureDropout.feature_dropout"):
            bad.initialize()


def test_uamt_logs_mc_spread_and_uncertainty_where_the_teacher_is_wrong(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerUAMT
    tr = make_trainer(nnUNetTrainerUAMT, synthetic_plans)
    tr.unlabeled_cases_with_labels = ["case"]
    # 2 x 3 voxels, 2 classes; teacher argmax per voxel: 1 0 1 / 0 0 1
    p0 = torch.tensor([[[0.2, 0.9, 0.4], [0.6, 0.8, 0.1]]])          # class 0 probability (B=1, Y=2, X=3)
    p_t = torch.stack([p0, 1 - p0], 1)                                 # (1, 2, 2, 3)
    u = torch.tensor([[[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]])
    seg = torch.tensor([[[1, 1, -1], [0, 1, 1]]], dtype=torch.int16)    # -1: no label there
    valid = torch.tensor([[[True, True, True], [True, True, False]]])
    # known and valid: (0,0) right, (0,1) wrong, (1,0) right, (1,1) wrong; (0,2) unknown, (1,2) padding
    tr.record_uncertainty_split({"seg": seg, "valid": valid}, p_t, u)
    tr.record_uncertainty_split({"seg": seg, "valid": valid}, p_t, u)  # accumulates over the epoch
    assert tr._uncertainty_split.tolist() == pytest.approx([2 * (0.2 + 0.5), 4, 2 * (0.1 + 0.4), 4])
    tr.unlabeled_cases_with_labels = []
    tr._uncertainty_split = None
    tr.record_uncertainty_split({"seg": seg, "valid": valid}, p_t, u)
    assert tr._uncertainty_split is None  # nothing to score without labelsUnlabeled
