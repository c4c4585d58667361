"""Short schedules of the mean-teacher family and post-denoise for the test suite (a user's own variants)."""
import os

import torch

from nnunet_sud.trainers import (nnUNetTrainerDAEUncertainty, nnUNetTrainerMeanTeacher, nnUNetTrainerPostDenoise,
                                 nnUNetTrainerUAMT)


def _tiny(trainer, epochs, iterations):
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = 1
    trainer.save_every = 1  # a checkpoint_latest after every epoch, so --c has something to resume


class _TestSchedule:
    """SUD_TEST_SKIP_FINAL_VALIDATION=1 skips nnU-Net's final validation (prediction of the
    validation cases, ~30 s on CPU) where a test checks inference through nnUNetv2_predict instead."""

    def perform_actual_validation(self, save_probabilities: bool = False):
        if os.environ.get("SUD_TEST_SKIP_FINAL_VALIDATION") == "1":
            self.print_to_log_file("final validation skipped (SUD_TEST_SKIP_FINAL_VALIDATION=1)")
            return
        super().perform_actual_validation(save_probabilities)


def _maybe_crash(trainer):
    """SUD_TEST_CRASH_AT_EPOCH=k raises after epoch k's checkpoint, like a killed job."""
    crash = os.environ.get("SUD_TEST_CRASH_AT_EPOCH")
    if crash is not None and trainer.current_epoch - 1 == int(crash):
        raise RuntimeError(f"simulated crash after epoch {crash}")


class nnUNetTrainerMeanTeacher_tiny(_TestSchedule, nnUNetTrainerMeanTeacher):
    """2 epochs x 2 iterations, can crash after an epoch (for --c)."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _tiny(self, 2, 2)

    def on_epoch_end(self):
        super().on_epoch_end()
        _maybe_crash(self)


class nnUNetTrainerUAMT_tiny(_TestSchedule, nnUNetTrainerUAMT):
    """1 epoch x 2 iterations, K = 8 passes in chunks of 4 (two teacher forwards of 4 B samples)."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _tiny(self, 1, 2)
        self.mc_passes_per_forward = 4


class nnUNetTrainerDAEUncertainty_tiny(_TestSchedule, nnUNetTrainerDAEUncertainty):
    """1 epoch x 2 iterations."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _tiny(self, 1, 2)


class nnUNetTrainerPostDenoise_tiny(_TestSchedule, nnUNetTrainerPostDenoise):
    """1 epoch x 2 iterations."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _tiny(self, 1, 2)
