"""Short schedules of the label denoiser trainer (a user's own variants, used by the test suite)."""
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_sud.trainers import nnUNetTrainerLabelDenoiser


class nnUNetTrainerLabelDenoiser_tiny(nnUNetTrainerLabelDenoiser):
    """2 epochs x 2 iterations: runs the whole pipeline (train, evaluate, checkpoint, json) in seconds.
    The denoiser it gives is untrained; use it where only the plumbing matters."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
        self.denoiser_eval_max_cases = 1
        self.denoiser_eval_settings = ((4.0, 4.0),)


class nnUNetTrainerLabelDenoiser_short(nnUNetTrainerLabelDenoiser):
    """2 epochs x 150 iterations with the default Adam (lr 2e-3, poly decay) and the default narrow
    network: about a minute of CPU on the synthetic 24x32x32 task, enough for denoised maps to beat
    the noisy ones at moderate to heavy corruption. (2 x 60 at lr 1e-3 was not: one run in two
    learned nothing yet.)"""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 150
        self.num_val_iterations_per_epoch = 1
        self.denoiser_eval_every = 1
        self.denoiser_eval_max_cases = 1
        self.denoiser_eval_settings = ((2.0, 2.0), (4.0, 4.0), (8.0, 8.0))

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)
