"""How much foreground each soft-target loss adds when the targets are noisy (docs/sud.md, the soft Dice).

A 1d toy problem, two classes (background, a blob with soft edges): free per-voxel logits are fitted
with Adam to a target that is resampled at every step, z = softmax(log(clean) + noise), as a
segmenter is fitted to targets that differ from visit to visit. Printed: the fitted foreground
mass (sum of f) and argmax area over those of E[z], for SUD's squared soft Dice (eq. 15, foreground
classes), nnU-Net's plain-sum Dice, KL(z || f) and the squared error. 1 = no bias.

    python benchmarks/soft_dice_bias.py            # about 1 min alone on 2 cores
"""
import argparse

import torch

from nnunet_sud.losses.soft_targets import soft_dice_loss, soft_kl_loss

LOSSES = {
    "squared": lambda f, lf, z: soft_dice_loss(f, z, form="squared"),
    "plain": lambda f, lf, z: soft_dice_loss(f, z, form="plain"),
    "kl": lambda f, lf, z: soft_kl_loss(lf, z),
    "mse": lambda f, lf, z: ((f - z) ** 2).sum(1).mean(),
}


def noisy_targets(clean: torch.Tensor, noise: float) -> torch.Tensor:
    """One draw of z: the clean map's log-probabilities plus N(0, (noise * 10 / 3)^2) per voxel and class."""
    return torch.softmax(torch.log(clean.clamp_min(1e-4)) + noise * 10 / 3 * torch.randn_like(clean), 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    x = torch.linspace(-1, 1, args.voxels)
    fg = torch.sigmoid(-(x.abs() - 0.3) * 30)
    clean = torch.stack([1 - fg, fg])[None]  # (1, 2, N)
    print("| noise | loss | foreground mass f / E[z] | argmax area f / E[z] |\n|---:|---|---:|---:|")
    for noise in args.noise:
        with torch.no_grad():
            mean_z = torch.stack([noisy_targets(clean, noise) for _ in range(100)]).mean(0)
        for name, loss in LOSSES.items():
            logits = torch.zeros_like(clean, requires_grad=True)
            opt = torch.optim.Adam([logits], lr=0.05)
            for _ in range(args.steps):
                lf = torch.log_softmax(logits, 1)
                value = loss(lf.exp(), lf, noisy_targets(clean, noise))
                opt.zero_grad()
                value.backward()
                opt.step()
            with torch.no_grad():
                f = torch.softmax(logits, 1)
                mass = (f[0, 1].sum() / mean_z[0, 1].sum()).item()
                area = (f.argmax(1) == 1).sum().item() / max((mean_z.argmax(1) == 1).sum().item(), 1)
            print(f"| {noise} | {name} | {mass:.3f} | {area:.3f} |")


if __name__ == "__main__":
    main()
