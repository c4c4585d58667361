"""SUD / TE: the soft-target update is eq. 8, the store round-trips through real augmented
patches, lambda = 0 is nnUNetTrainer, the schedules are the paper's."""
import copy
import math
import os

import numpy as np
import pytest
import torch

from nnunet_sud.targets.store import SoftTargetStore
from test_unlabeled_stream import InMemoryDataset, LABELS, initial_patch, nnunet_transforms, smooth_field
from nnunet_sud.unlabeled.coordinates import sample_case_field
from nnunet_sud.unlabeled.loader import UnlabeledDataLoader


def make_trainer(synthetic3d, cls, cfg="3d_fullres"):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    pre = synthetic3d["preprocessed"]
    plans = load_json(os.path.join(pre, "nnUNetPlans.json"))
    plans["continue_training"] = False
    return cls(plans, cfg, 0, load_json(os.path.join(pre, "dataset.json")), torch.device("cpu"))


class ConstantDenoiser(torch.nn.Module):
    """a(f) = softmax(L) whatever f is: makes eq. 8 computable by hand."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits.expand_as(x)


def identity_batch(key, case_shape):
    """An unwarped patch covering the whole case: coords = the case grid, all valid."""
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in case_shape], indexing="ij")
    return {"keys": [key], "coords": torch.stack(grids)[None], "valid": torch.ones((1, *case_shape), dtype=torch.bool),
            "case_shapes": torch.tensor([case_shape])}


def probs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(shape, generator=g) * 2, 1)


@pytest.fixture
def sud(synthetic3d, tmp_path):
    from nnunet_sud.trainers import nnUNetTrainerSUD
    t = make_trainer(synthetic3d, nnUNetTrainerSUD)
    t.store = SoftTargetStore(str(tmp_path / "store"), 4, dtype=np.float32)
    return t


def test_paper_schedules(sud):
    assert sud.lambda_max == 4 and sud.beta == pytest.approx(0.05)  # beta = 0.2 / lambda_max
    assert [sud.unlabeled_weight(t) for t in (0, 0.25, 1)] == [0, 1, 4]
    assert [sud.alpha(t) for t in (0, 0.25, 1)] == [1, 0.75, 0]  # 1 -> 0 as §3.3.2
    from nnunet_sud.trainers import nnUNetTrainerSUD_lambda2, nnUNetTrainerTE
    assert nnUNetTrainerTE.beta == 0 and nnUNetTrainerSUD_lambda2.lambda_max == 2


def test_update_equals_eq8_by_hand(sud):
    case = (2, 3, 4)
    L = torch.tensor([0.5, -1.0, 2.0, 0.0]).reshape(1, 4, 1, 1, 1)
    sud.denoiser = ConstantDenoiser(L)
    a = torch.softmax(L, 1).expand(1, 4, *case)
    b = identity_batch("u0", case)
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
    b = identity_batch("u1", case)
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


def test_sud_mean_teacher_target_is_the_denoised_teacher_prediction(synthetic3d):
    from nnunet_sud.trainers import nnUNetTrainerSUDMeanTeacher
    t = make_trainer(synthetic3d, nnUNetTrainerSUDMeanTeacher)
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
    den = (p[:, 1:] * m).sum((2, 3, 4)) + (z[:, 1:] * m).sum((2, 3, 4))
    assert loss.item() == pytest.approx(1 - ((2 * inter + 1e-5) / (den + 1e-5)).mean().item(), rel=1e-6)
    # voxels outside valid do not matter
    z2 = z.clone()
    z2[:, :, :, :, 2:] = 0.25
    assert sud.soft_target_loss(logits, z2, valid).item() == pytest.approx(loss.item(), rel=1e-7)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert soft_dice_loss(z, z, valid) < soft_dice_loss(p.detach(), z, valid)


def _augmented_batches(field, patch, n, seed, geometric=True):
    np.random.seed(seed)
    torch.manual_seed(seed)
    cases = {"a": field[None], "b": field[None] * 0.5}
    t = nnunet_transforms(patch, 3) if geometric else None
    if not geometric:
        from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
        t = MirrorTransform(allowed_axes=(0, 1, 2))
    ip = initial_patch(patch, 3) if geometric else patch
    dl = UnlabeledDataLoader(InMemoryDataset(cases), 2, ip, patch, LABELS, transforms=t)
    return [dl.generate_train_batch() for _ in range(n)], cases


def _field_values(cases, b, i):
    f = torch.from_numpy(cases[b["keys"][i]])
    return torch.cat([sample_case_field(f, b["coords"][i]), 1 - sample_case_field(f, b["coords"][i])])


def linear_field(shape):
    g = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    return (0.03 * g[0] - 0.02 * g[1] + 0.025 * g[2] - 0.2).astype(np.float32)


def low_frequency_field(shape):
    g = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    return (0.5 * np.sin(0.12 * g[0] + 0.1 * g[1] + 1) * np.cos(0.09 * g[2] - 0.5)).astype(np.float32)


@pytest.mark.parametrize("kind,dtype,tol", [("linear", np.float32, 1e-3), ("smooth", np.float16, 0.01)])
def test_store_round_trip_through_real_augmented_patches(tmp_path, kind, dtype, tol):
    """Write a known field through augmented patches, read it back through other patches.
    A linear field survives linear interpolation exactly (error: float rounding only); a smooth
    one within the interpolation error of two linear interpolations plus float16 storage."""
    field = (linear_field if kind == "linear" else low_frequency_field)((20, 24, 24))
    store = SoftTargetStore(str(tmp_path / "s"), 2, dtype=dtype)
    writes, cases = _augmented_batches(field, (14, 16, 16), 40, seed=1)
    n_warped = 0
    for b in writes:
        vals = torch.stack([_field_values(cases, b, i) for i in range(2)])
        vals = torch.where(b["valid"][:, None], vals, torch.full_like(vals, 7.0))  # padding: a marker value
        store.write(b["keys"], b["coords"], b["valid"], b["case_shapes"], vals)
        n_warped += int(((b["coords"] - b["coords"].round()).abs().amax() > 1e-3).item())
    assert n_warped > 3
    # padding never written: the marker appears nowhere in the store
    for k in ("a", "b"):
        stored = store.load_case(k)
        assert not np.any(np.abs(stored[np.isfinite(stored)] - 7.0) < 1)
    reads, _ = _augmented_batches(field, (14, 16, 16), 20, seed=2)
    errs, seen = [], 0
    for b in reads:
        got = store.read(b["keys"], b["coords"], b["valid"], b["case_shapes"])
        for i in range(2):
            want = _field_values(cases, b, i)
            ok = b["valid"][i] & torch.isfinite(got[i]).all(0)
            seen += int(ok.sum())
            errs.append((got[i][:, ok] - want[:, ok]).abs().max().item() if ok.any() else 0.0)
            assert torch.isnan(got[i][:, ~b["valid"][i]]).all()  # invalid voxels read as "no target"
    assert seen > 10000
    assert max(errs) < tol, max(errs)


def test_store_is_exact_for_unwarped_patches(tmp_path):
    field = smooth_field((10, 12, 12), 9) / 3
    store = SoftTargetStore(str(tmp_path / "s"), 2, dtype=np.float32)
    batches, cases = _augmented_batches(field, (10, 12, 12), 6, seed=3, geometric=False)
    for b in batches[:3]:
        store.write(b["keys"], b["coords"], b["valid"], b["case_shapes"],
                    torch.stack([_field_values(cases, b, i) for i in range(2)]))
    for b in batches[3:]:
        got = store.read(b["keys"], b["coords"], b["valid"], b["case_shapes"])
        for i in range(2):
            assert torch.allclose(got[i], _field_values(cases, b, i), atol=1e-6)


def test_unvisited_voxels_read_as_no_target(tmp_path):
    store = SoftTargetStore(str(tmp_path / "s"), 2)
    b = identity_batch("c", (4, 4, 4))
    assert torch.isnan(store.read(b["keys"], b["coords"], b["valid"], b["case_shapes"])).all()
    half = dict(b, valid=b["valid"].clone())
    half["valid"][:, :2] = False
    store.write(half["keys"], half["coords"], half["valid"], half["case_shapes"], torch.full((1, 2, 4, 4, 4), 0.5))
    got = store.read(b["keys"], b["coords"], b["valid"], b["case_shapes"])
    assert torch.isnan(got[0, :, :2]).all() and (got[0, :, 2:] == 0.5).all()


def test_lambda_zero_gives_the_same_update_as_nnunet_trainer(synthetic3d, tmp_path):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_sud.schedules import Constant
    from nnunet_sud.trainers import nnUNetTrainerTE

    torch.manual_seed(0)
    base = make_trainer(synthetic3d, nnUNetTrainer)
    te = make_trainer(synthetic3d, nnUNetTrainerTE)
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
    u = identity_batch("syn_unl_000", case)
    u["data"] = torch.randn((1, 1, *patch), generator=g)
    te.dataloader_unlabeled = iter([u, u])
    for _ in range(2):  # two steps: momentum buffers too
        out_b = base.train_step(copy.deepcopy(batch))
        out_t = te.train_step(copy.deepcopy(batch))
        assert out_b["loss"] == out_t["loss"]
        assert out_t["unlabeled_weight"] == 0 and math.isfinite(out_t["unlabeled_loss"])
    for (n, p), (_, q) in zip(base.network.named_parameters(), te.network.named_parameters()):
        assert torch.equal(p, q), n
