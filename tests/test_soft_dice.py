"""SUD's soft Dice (eq. 15, squared norms) regresses onto a soft target; nnU-Net's plain-sum form
thresholds it. Hand-made targets, gradients with respect to the probabilities themselves."""
import pytest
import torch

from nnunet_sud.losses.soft_targets import soft_dice_loss


def ramp_target():
    """A soft two-class target whose foreground ramps 0 .. 0.9 over 8 voxels: (1, 2, 1, 1, 8)."""
    fg = torch.linspace(0, 0.9, 8, dtype=torch.float64)
    return torch.stack([1 - fg, fg]).reshape(1, 2, 1, 1, 8)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_squared_form_is_stationary_at_the_target(batch_dice):
    z = ramp_target()
    f = z.clone().requires_grad_(True)
    soft_dice_loss(f, z, smooth=0.0, batch_dice=batch_dice).backward()
    assert f.grad.abs().max() < 1e-12
    # and f = z is the minimum: every small move of f costs
    g = torch.Generator().manual_seed(0)
    base = soft_dice_loss(z, z, smooth=0.0).item()
    assert base == pytest.approx(0.0, abs=1e-12)
    for _ in range(20):
        d = torch.randn(z.shape, generator=g, dtype=torch.float64) * 0.01
        assert soft_dice_loss(z + d, z, smooth=0.0).item() > base


def test_plain_form_is_not_stationary_at_the_target_and_its_optimum_thresholds():
    z = ramp_target()
    f = z.clone().requires_grad_(True)
    soft_dice_loss(f, z, smooth=0.0, form="plain").backward()
    # d/df_i of the plain Dice at f = z: 2 z_i / (2S) - 2<z,z> / (2S)^2 with S = sum z, i.e. a
    # gradient that pushes f up where z > <z,z> / S and down elsewhere (per foreground voxel)
    zf = z[0, 1, 0, 0]
    s, q = zf.sum(), (zf * zf).sum()
    want = -(2 * zf / (2 * s) - 2 * q / (2 * s) ** 2)  # of the loss 1 - d
    assert torch.allclose(f.grad[0, 1, 0, 0], want, atol=1e-12)
    assert f.grad.abs().max() > 0.01
    # a thresholded target beats the soft target itself under the plain form
    hard = (zf > 0.45).double()
    f_hard = torch.stack([1 - hard, hard]).reshape(z.shape)
    assert soft_dice_loss(f_hard, z, smooth=0.0, form="plain") < soft_dice_loss(z, z, smooth=0.0, form="plain")
    assert soft_dice_loss(f_hard, z, smooth=0.0) > soft_dice_loss(z, z, smooth=0.0)  # not so under eq. 15


def test_mask_and_unknown_form():
    z = ramp_target()
    f = torch.full_like(z, 0.5)
    mask = torch.zeros((1, 1, 1, 8), dtype=torch.bool)
    mask[..., :4] = True
    zf, ff = z[0, 1, 0, 0, :4], f[0, 1, 0, 0, :4]
    want = 1 - (2 * (zf * ff).sum() + 1e-5) / ((zf ** 2).sum() + (ff ** 2).sum() + 1e-5)
    assert soft_dice_loss(f, z, mask).item() == pytest.approx(want.item(), rel=1e-9)
    with pytest.raises(ValueError, match="squared"):
        soft_dice_loss(f, z, form="sum")


@pytest.mark.parametrize("batch_dice", [False, True])
def test_plain_form_is_nnunets_soft_dice(batch_dice):
    """The plain form gives nnU-Net's SoftDiceLoss (soft targets, loss mask, no background) as 1 + its value."""
    from nnunetv2.training.loss.dice import SoftDiceLoss
    g = torch.Generator().manual_seed(3)
    f = torch.softmax(torch.randn(2, 3, 4, 5, 6, generator=g, dtype=torch.float64), 1)
    z = torch.softmax(2 * torch.randn(2, 3, 4, 5, 6, generator=g, dtype=torch.float64), 1)
    mask = torch.rand(2, 4, 5, 6, generator=g) > 0.3
    ours = soft_dice_loss(f, z, mask, batch_dice=batch_dice, form="plain")
    theirs = SoftDiceLoss(apply_nonlin=None, batch_dice=batch_dice, do_bg=False, smooth=1e-5, ddp=False)(
        f, z, mask[:, None].double())
    assert ours.item() == pytest.approx(1 + theirs.item(), rel=1e-6)  # nnU-Net sums in float32


def test_dmnet_agreement_is_the_plain_soft_dice_with_gradients_into_both():
    from nnunet_sud.losses.agreement import dice_difference_loss
    g = torch.Generator().manual_seed(4)
    p1 = torch.softmax(torch.randn(2, 3, 8, 8, generator=g), 1).requires_grad_(True)
    p2 = torch.softmax(torch.randn(2, 3, 8, 8, generator=g), 1).requires_grad_(True)
    loss = dice_difference_loss(p1, p2)
    # by hand: 1 - mean over samples and all classes of 2 sum(p1 p2) / (sum p1 + sum p2)
    a, b = p1.detach(), p2.detach()
    want = 1 - ((2 * (a * b).sum((2, 3)) + 1e-5) / (a.sum((2, 3)) + b.sum((2, 3)) + 1e-5)).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    loss.backward()
    assert p1.grad.abs().max() > 0 and p2.grad.abs().max() > 0
    # detach_target=True (SUD's fixed target) stops the second gradient
    q1, q2 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    soft_dice_loss(q1, q2, include_background=True, form="plain").backward()
    assert q2.grad is None and q1.grad.abs().max() > 0
