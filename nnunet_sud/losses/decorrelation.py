"""The normalised-covariance penalty of SUD^2 against mode collapse.

Chan, Young, Metzler, "SUD^2: Supervision by Denoising Diffusion Models for Image Reconstruction"
(arXiv:2303.09642, 2023), §3, after Corollary 3.2:

    "we introduce an additional penalty L_reg = cov(A, B) / (sigma_A sigma_B) which computes the
    normalized covariance between intermediate latent vectors outputted by the encoder block of
    our U-net. By minimizing L_reg over all latent vectors in a mini-batch, we encourage network
    to produce outputs which are uncorrelated in latent space."                      (eq. 8)

A and B are the latent vectors of two samples of the mini-batch (the whole encoder output of a
sample, flattened to one vector of D = channels x bottleneck voxels components); the covariance
and the standard deviations are taken over those D components, so cov(A, B) / (sigma_A sigma_B)
is the Pearson correlation rho_AB of the two vectors.

How the pairs are combined (the paper gives the term for one pair only): the penalty is the mean
of rho_AB^2 over all pairs A != B of the batch. Squared, not signed: the stated aim is outputs that
are *uncorrelated* (rho = 0); minimising the signed rho would reward anti-correlation instead,
which cannot hold for more than two vectors at once (the mean pairwise correlation of n vectors is
at least -1 / (n - 1)) and would keep pushing pairs past zero. rho^2 is zero exactly for
uncorrelated vectors, positive for correlated or anti-correlated ones, and smooth at zero.
"""
import torch


def latent_correlation_matrix(latents: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pearson correlations between the latent vectors of a batch.

    Args:
        latents: (B, *feature) -- e.g. an encoder bottleneck (B, C, *spatial); each sample is
            flattened to one vector of D components.
        eps: added to the vector norms, so a constant vector (zero variance) has correlation 0
            with every other vector instead of an undefined one.
    Returns:
        (B, B) float32 matrix R with R_ab = cov(a, b) / (sigma_a sigma_b) (1 on the diagonal,
        up to eps); differentiable with respect to ``latents``.
    """
    v = latents.reshape(latents.shape[0], -1)
    # float32 whatever autocast says: D can be tens of thousands of terms
    with torch.autocast(device_type=v.device.type, enabled=False):
        v = v.float()
        v = v - v.mean(1, keepdim=True)
        v = v / (v.norm(dim=1, keepdim=True) + eps)
        return v @ v.t()


def decorrelation_penalty(latents: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """SUD^2's L_reg over a batch: the mean over pairs a != b of rho_ab^2 (see module doc).

    Args:
        latents: (B, *feature) latent vectors of B samples.
    Returns:
        scalar in [0, 1]; 0 for B < 2 (no pair), still attached to the graph.
    """
    b = latents.shape[0]
    r = latent_correlation_matrix(latents, eps)
    if b < 2:
        return r.sum() * 0.0
    off = ~torch.eye(b, dtype=torch.bool, device=r.device)
    return r[off].pow(2).mean()
