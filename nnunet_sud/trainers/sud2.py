"""SUD^2 carried over to segmentation: SUD with noise before the denoiser, a decorrelation
penalty on encoder latents, and multi-step denoising.

Chan, Young, Metzler, "SUD^2: Supervision by Denoising Diffusion Models for Image Reconstruction"
(arXiv:2303.09642, 2023), §3-3.1, three changes to SUD (Young et al. 2022; ``nnUNetTrainerSUD``):

1. Noise before the denoiser (eq. 9, against the blurry minimiser of Corollary 3.3):
   D_sigma(f) -> D_sigma(f + nu_2), nu_2 ~ N(0, sigma_2^2 I). Our denoiser works on
   log-probabilities (SUD §3.4: log -> clip to [-3, 0] -> + noise -> softmax), so the noise is
   added there, exactly as the denoiser saw noise in training:
       F_sigma(f) = softmax(clip(log f, -3, 0) + sigma nu),   nu ~ N(0, I) per voxel and class
   (``corrupt_probabilities`` with scale ``sigma2_scale``; the default 1 is per-voxel white noise,
   the paper's N(0, sigma_2^2 I)).
2. Decorrelation (eq. 8, against mode collapse, Corollary 3.2):
   L = L_paired + lambda_1 L_denoiser + lambda_2 L_reg, L_reg the normalised covariance of
   "intermediate latent vectors outputted by the encoder block of our U-net" across the
   mini-batch (``nnunet_sud.losses.decorrelation``: mean pairwise rho^2).
   *Where*: the paper's "our U-net" is the network being trained (f_theta; the denoiser and
   the diffusion model are pre-trained and fixed, §4), and mode collapse is a property of
   f_theta's outputs on the unpaired data. So the default penalises the *segmenter's*
   bottleneck (the last encoder output of nnU-Net's U-Net) on the unlabeled batch
   (``decorrelate = "segmenter"``). The penalty must reach theta through something the
   segmenter computes with gradient: the other reading, the label denoiser's latents of the
   segmenter's outputs ("outputs uncorrelated in latent space"), is offered as
   ``decorrelate = "denoiser"``: L_reg on denoiser.encode(log-clip-softmax(f)) with the
   gradient flowing through the frozen denoiser encoder into f. (Penalising the latents of the
   stored soft targets z would do nothing: z is a constant.)
3. Multi-step denoising (§3.1, D_sigma(f + nu) -> R(F(f))): K noise-then-denoise steps at
   decreasing noise levels in place of SUD's single call of a():
       r_0 = f,   r_k = softmax(a_net(F_{sigma_k}(r_{k-1}))),   k = 1..K,   R(F(f)) = r_K
   Schedule (linear, DDPM-like in that the last reverse step adds no noise):
       K = 1:  sigma_1 = sigma_2                       (eq. 9 exactly)
       K > 1:  sigma_k = sigma_2 (K - k) / (K - 1)     sigma_2 > ... > sigma_K = 0
   so each later step starts from a less noisy version of the previous projection
   (coarse-to-fine, "first project onto the smooth manifold of noisy images, then gradually
   onto less smooth ones"). With sigma_2 = 0 the K steps are the K-fold iterated projection
   a(a(...a(f))); with sigma_2 = 0 and K = 1 it is SUD's a(f) exactly.

The soft-target machinery is SUD's (per-image store, eq. 8 of SUD with alpha and beta):
only ``denoise`` changes (a(f) -> R(F(f)), so the target is beta R(F(f)) + (1 - beta) f), and the penalty is added:

    L_unl = D(z, f) + (lambda_2 / lambda_max) L_reg,     total  L_sup + lambda(t) L_unl

beta = 1 (SUD's default is 0.2 / lambda_max = 0.05). SUD^2 writes SUD as L_paired + lambda_1
||f - D(f)||^2 (eq. 2-3) and its eq. 9 gradient is 2 [f - D(f + nu_2)]: the pseudo-label is the
denoiser's output itself, not a 5 % mix of it into f. With SUD's beta every change below would
move the target by at most 5 % of |R(F(f)) - a(f)|, so the variants would hardly differ from SUD
and from each other. The temporal average (alpha) is kept: the paper allows SUD "with or without
temporal ensembling". The reference for the ablations is therefore SUD with the full denoiser
target, ``nnUNetTrainerSUD_beta1`` (SUD^2 with none of the three changes); against it each variant
changes the target by |R(F(f)) - a(f)| per voxel (changes 1, 3) or adds the penalty (change 2).

lambda(t) ramps 0 -> lambda_max as in SUD, so the penalty ramps with the term it counteracts
and reaches the paper's weights (lambda_1 = lambda_max, lambda_2) at the end of training.
The paper gives no values; ours: sigma_2 = 1 (log-probability units; the denoiser was trained
with sigma in [0, 8]), K = 3, lambda_2 = 0.1.

Variants (one change each, for ablations): ``_noise`` (1 alone), ``_decorr`` (2 alone,
segmenter latents), ``_decorrDenoiser`` (2 alone, denoiser latents), ``_multistep`` (3 alone:
K = 3 without noise), ``_diffusion`` (1 + 3). ``nnUNetTrainerSUD2`` has all three.

Network: nnU-Net's planned U-Net in a wrapper (``BottleneckUNet``) whose ``forward(x,
return_bottleneck=True)`` also returns the encoder's last output; it has the same modules and
state-dict keys as the planned network, and a plain ``forward(x)`` for nnU-Net and
``nnUNetv2_predict`` (compile- and DDP-safe: the flag is an ordinary argument, no hooks).
"""
# the trainers, registered in nnunet_sud.trainers
__all__ = [
    "nnUNetTrainerSUD2",
    "nnUNetTrainerSUD2_noise",
    "nnUNetTrainerSUD2_decorr",
    "nnUNetTrainerSUD2_decorrDenoiser",
    "nnUNetTrainerSUD2_multistep",
    "nnUNetTrainerSUD2_diffusion",
]

import time
from typing import List, Optional

import torch
from torch import nn

from nnunet_sud.denoiser.corruption import corrupt_probabilities, denoiser_input
from nnunet_sud.errors import UserFacingError
from nnunet_sud.losses.decorrelation import decorrelation_penalty
from nnunet_sud.network_helpers import full_resolution
from nnunet_sud.trainers.sud import nnUNetTrainerSUD


class BottleneckUNet(nn.Module):
    """An nnU-Net U-Net (``.encoder`` returning its stage outputs, ``.decoder``) whose forward can
    also return the bottleneck.

    ``forward(x)``: the network's output (logits or the deep-supervision list), as the planned
    network. ``forward(x, return_bottleneck=True)``: ``(output, bottleneck)``, bottleneck
    (B, features[-1], *patch / total stride). State-dict keys as the wrapped network's.
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.encoder = network.encoder
        self.decoder = network.decoder

    def forward(self, x: torch.Tensor, return_bottleneck: bool = False):
        skips = self.encoder(x)
        out = self.decoder(skips)
        if return_bottleneck:
            return out, skips[-1] if isinstance(skips, (list, tuple)) else skips
        return out


def denoising_noise_levels(sigma2: float, steps: int) -> List[float]:
    """SUD^2's schedule (module doc): [sigma2] for one step, else sigma2 (K - k) / (K - 1), k = 1..K."""
    if steps < 1:
        raise ValueError(f"the number of denoising steps must be at least 1, got {steps}")
    if sigma2 < 0:
        raise ValueError(f"sigma2 must be >= 0, got {sigma2}")
    if steps == 1:
        return [float(sigma2)]
    return [float(sigma2) * (steps - k) / (steps - 1) for k in range(1, steps + 1)]


@torch.no_grad()
def noisy_denoise(denoiser: nn.Module, probs: torch.Tensor, sigma: float, scale: float = 1.0) -> torch.Tensor:
    """One noise-then-denoise step: softmax(a_net(softmax(clip(log p, -3, 0) + sigma nu))).

    Args:
        denoiser: the trained label denoiser (logits out; a deep-supervision list is allowed).
        probs: (B, C, *P) probabilities.
        sigma: noise std in log-probability units (0: ``apply_denoiser`` exactly).
        scale: noise scale s of ``corrupt_probabilities`` (<= 1: per-voxel white noise).
    Returns:
        (B, C, *P) float32 probabilities.
    """
    x = corrupt_probabilities(probs.detach(), sigma, scale) if sigma > 0 else denoiser_input(probs.detach())
    return torch.softmax(full_resolution(denoiser(x)).float(), 1)


class nnUNetTrainerSUD2(nnUNetTrainerSUD):
    """SUD^2 for segmentation (module doc). Class attributes select the changes."""

    SETTINGS = ("sigma2", "sigma2_scale", "denoise_steps", "lambda2", "decorrelate")
    #: beta = 1: eq. 9 pulls f towards R(F(f)) itself (SUD^2 reads SUD as f -> D(f), eq. 2-3), not
    #: towards SUD's 0.05 R(F(f)) + 0.95 f, which would dilute every change below to 5 %
    beta = 1.0
    #: sigma_2, std of the noise added to the log-probabilities before the (first) denoiser call
    sigma2: float = 1.0
    #: spatial scale s of that noise (corruption.py; <= 1: per voxel, the paper's N(0, sigma_2^2 I))
    sigma2_scale: float = 1.0
    #: K, number of noise-then-denoise steps (1: a single call, as SUD)
    denoise_steps: int = 3
    #: lambda_2 of eq. 8 (0 switches the penalty off)
    lambda2: float = 0.1
    #: whose latents are decorrelated: "segmenter" (bottleneck of self.network) or "denoiser"
    decorrelate: str = "segmenter"

    extra_log_keys = ("alpha", "beta", "target_new_fraction", "latent_decorrelation")

    def check_settings(self):
        super().check_settings()
        name = type(self).__name__
        if self.decorrelate not in ("segmenter", "denoiser"):
            raise UserFacingError(f"{name}.decorrelate must be 'segmenter' or 'denoiser', got {self.decorrelate!r}")
        try:
            denoising_noise_levels(self.sigma2, self.denoise_steps)
        except ValueError as e:
            raise UserFacingError(f"{name}: sigma2 = {self.sigma2!r}, denoise_steps = {self.denoise_steps!r}: {e}. "
                                  f"Set sigma2 >= 0 and denoise_steps >= 1.") from None

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """nnU-Net's planned network, wrapped in ``BottleneckUNet`` when it has an nnU-Net style
        encoder/decoder (otherwise unchanged; then only ``decorrelate = "denoiser"`` works)."""
        net = nnUNetTrainerSUD.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                          num_output_channels, enable_deep_supervision)
        if hasattr(net, "encoder") and hasattr(net, "decoder"):
            return BottleneckUNet(net)
        return net

    # ------------------------------------------------------------------ set-up
    def needs_denoiser(self) -> bool:
        return super().needs_denoiser() or (self.lambda2 > 0 and self.decorrelate == "denoiser")

    def on_train_start(self):
        super().on_train_start()
        if self.lambda2 > 0 and self.decorrelate == "segmenter" and \
                not isinstance(self.plain_network(), BottleneckUNet):
            raise UserFacingError(f"{type(self).__name__} decorrelates the segmenter's encoder latents, but the "
                                  f"planned architecture {self.configuration_manager.network_arch_class_name} has "
                                  f"no nnU-Net style encoder/decoder. Use decorrelate = 'denoiser' or lambda2 = 0.")
        self.print_to_log_file(f"SUD^2: sigma_2 {self.sigma2} (scale {self.sigma2_scale}), noise levels "
                               f"{self.noise_levels()}, lambda_2 {self.lambda2} on {self.decorrelate} latents")

    # ------------------------------------------------------------------ change 1 + 3: R(F(f))
    def noise_levels(self) -> List[float]:
        """sigma_1 > ... > sigma_K of the multi-step denoising (module doc)."""
        return denoising_noise_levels(self.sigma2, self.denoise_steps)

    @torch.no_grad()
    def diffusion_denoise(self, f: torch.Tensor) -> torch.Tensor:
        """R(F(f)): K noise-then-denoise steps; f (B, C, *P) probabilities -> (B, C, *P)."""
        r = f
        for sigma in self.noise_levels():
            r = noisy_denoise(self.denoiser, r, sigma, self.sigma2_scale)
        return r

    def denoise(self, f: torch.Tensor) -> torch.Tensor:
        """R(F(f)) in place of SUD's a(f), so SUD's beta a(f) + (1 - beta) f becomes beta R(F(f)) + (1 - beta) f."""
        t0 = time.perf_counter()
        r = self.diffusion_denoise(f)
        self.component_times["denoiser"] += time.perf_counter() - t0
        return r

    # ------------------------------------------------------------------ change 2: L_reg
    def latent_penalty(self, bottleneck: Optional[torch.Tensor], f: torch.Tensor) -> torch.Tensor:
        """L_reg on the chosen latents: the segmenter's bottleneck (B, F, *b), or the denoiser's
        encoding of the segmenter's softmax f (B, C, *P) (gradient through the frozen encoder)."""
        if self.decorrelate == "denoiser":
            latents = self.denoiser.encode(denoiser_input(f))
        else:
            latents = bottleneck
        return decorrelation_penalty(latents)

    # ------------------------------------------------------------------ the step
    def unlabeled_loss(self, batch_u: dict):
        """L_unl = D(z, f) + (lambda_2 / lambda_max) L_reg, z SUD's eq. 8 target with R(F(f))."""
        bottleneck = None
        self.store.prefetch(*self.store_location(batch_u))  # the file reads overlap the forward pass
        if isinstance(self.plain_network(), BottleneckUNet):
            outputs, bottleneck = self.network(batch_u["data"], return_bottleneck=True)
        else:
            outputs = self.network(batch_u["data"])
        f = torch.softmax(full_resolution(outputs).float(), 1)
        alpha = float(self.alpha(self.training_progress()))
        # SUD's store: alpha-average of beta R(F(f)) + (1-beta) f; records prediction, R(F(f)) and target
        z = self.soft_targets(f.detach(), batch_u, alpha)
        loss = self.soft_target_loss(outputs, z, batch_u["valid"])
        if self.lambda2 > 0:
            l_reg = self.latent_penalty(bottleneck, f)
            loss = loss + (self.lambda2 / self.lambda_max) * l_reg
            l_reg = float(l_reg.detach())
        elif bottleneck is not None:  # logged anyway: how correlated the latents are without the penalty
            l_reg = float(decorrelation_penalty(bottleneck.detach()))
        else:
            l_reg = float("nan")
        return loss, {"alpha": alpha, "beta": self.beta, "target_new_fraction": self._new_fraction,
                      "latent_decorrelation": l_reg}


class nnUNetTrainerSUD2_noise(nnUNetTrainerSUD2):
    """Change 1 alone: one denoiser call on f + nu_2 (eq. 9), no penalty."""
    sigma2 = 1.0
    denoise_steps = 1
    lambda2 = 0.0


class nnUNetTrainerSUD2_decorr(nnUNetTrainerSUD2):
    """Change 2 alone: SUD's a(f) plus the penalty on the segmenter's bottleneck."""
    sigma2 = 0.0
    denoise_steps = 1
    lambda2 = 0.1


class nnUNetTrainerSUD2_decorrDenoiser(nnUNetTrainerSUD2_decorr):
    """Change 2 alone, on the denoiser's latents of the segmenter's softmax."""
    decorrelate = "denoiser"


class nnUNetTrainerSUD2_multistep(nnUNetTrainerSUD2):
    """Change 3 alone: three noise-free denoiser passes a(a(a(f)))."""
    sigma2 = 0.0
    denoise_steps = 3
    lambda2 = 0.0


class nnUNetTrainerSUD2_diffusion(nnUNetTrainerSUD2):
    """Changes 1 + 3: three noise-then-denoise steps at sigma_2 = 1, 0.5, 0; no penalty."""
    sigma2 = 1.0
    denoise_steps = 3
    lambda2 = 0.0
