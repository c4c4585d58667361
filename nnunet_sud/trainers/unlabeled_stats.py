"""A diagnostic trainer: nnU-Net's supervised training plus statistics of the unlabeled stream.

Trains exactly like ``nnUNetTrainer`` (its unlabeled loss is zero) while drawing the unlabeled
stream and logging, per epoch, the mean intensity of unlabeled patches, the fraction of patch
voxels that show the case (not padding) and the fraction of patches that were mirrored or
resampled (detected from the coordinate map). It also counts the unlabeled patches it has seen,
a number kept across ``--c`` through the base's extra checkpoint state. Use it to check that ``preprocess-unlabeled`` and
the stream work on a dataset before spending hours on a real method.
"""
# the trainers, registered in nnunet_sud.trainers
__all__ = ["nnUNetTrainerUnlabeledStats"]

import torch

from nnunet_sud.trainers.semi_supervised import nnUNetTrainerSemiSupervised


class nnUNetTrainerUnlabeledStats(nnUNetTrainerSemiSupervised):
    extra_log_keys = ("unlabeled_mean_intensity", "unlabeled_valid_fraction", "unlabeled_warped_fraction")

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.unlabeled_patches_seen = 0

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "unlabeled_patches_seen": self.unlabeled_patches_seen}

    def set_extra_state(self, state: dict):
        super().set_extra_state(state)
        self.unlabeled_patches_seen = int(state["unlabeled_patches_seen"])

    def unlabeled_loss(self, batch_u):
        self.unlabeled_patches_seen += batch_u["data"].shape[0]
        x, coords, valid = batch_u["data"], batch_u["coords"], batch_u["valid"]
        n_spatial = x.ndim - 2
        # an un-warped, un-mirrored patch has coordinates increasing by exactly 1 along each patch axis
        warped = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for ax in range(n_spatial):
            c = coords[:, 3 - n_spatial + ax]  # the case axis that patch axis ax runs along (unwarped)
            step = c.narrow(1 + ax, 1, c.shape[1 + ax] - 1) - c.narrow(1 + ax, 0, c.shape[1 + ax] - 1)
            ok = valid.narrow(1 + ax, 1, c.shape[1 + ax] - 1) & valid.narrow(1 + ax, 0, c.shape[1 + ax] - 1)
            dev = ((step - 1).abs() * ok).flatten(1).amax(1)
            warped |= dev > 1e-3
        logs = {
            "unlabeled_mean_intensity": float(x.mean()),
            "unlabeled_valid_fraction": float(valid.float().mean()),
            "unlabeled_warped_fraction": float(warped.float().mean()),
        }
        return torch.zeros((), device=x.device), logs
