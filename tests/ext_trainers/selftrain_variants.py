"""Tiny teacher and student schedules for the self-training tests (a user's own variants of
nnUNetTrainer, as ``--teacher-trainer``/``--student-trainer`` take them). Both skip nnU-Net's final
validation (the tests predict with nnUNetv2_predict instead). The student writes a checkpoint after
every epoch; SUD_TEST_CRASH_AT_EPOCH=k makes it raise after epoch k's checkpoint, like a killed job."""
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class _Tiny(nnUNetTrainer):
    """``epochs`` x ``iterations``, one validation iteration, a checkpoint_latest after every epoch,
    no final validation."""
    epochs, iterations = 2, 3

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch = self.epochs, self.iterations
        self.num_val_iterations_per_epoch = 1
        self.save_every = 1

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("final validation skipped (self-training test variant)")


class nnUNetTrainer_selftrainTeacher(_Tiny):
    """2 epochs x 8 iterations."""
    epochs, iterations = 2, 8


class nnUNetTrainer_selftrainStudent(_Tiny):
    """2 epochs x 3 iterations; can crash after an epoch."""

    def on_epoch_end(self):
        super().on_epoch_end()
        crash = os.environ.get("SUD_TEST_CRASH_AT_EPOCH")
        if crash is not None and self.current_epoch - 1 == int(crash):
            raise RuntimeError(f"simulated crash after epoch {crash}")
