"""Short schedules of SUD and TE for the test suite (a user's own variants). SUD_TEST_CRASH_AT_STEP=k
raises after the k-th training step (counted from 1 over the whole run), like a killed job."""
import os

import torch

from nnunet_sud.trainers import nnUNetTrainerSUD, nnUNetTrainerSUDMeanTeacher, nnUNetTrainerTE


class _Tiny:
    def _tiny(self):
        self.num_epochs = 2
        self.num_iterations_per_epoch = 3
        self.num_val_iterations_per_epoch = 1
        self.save_every = 1

    def train_step(self, batch):
        out = super().train_step(batch)
        crash = os.environ.get("SUD_TEST_CRASH_AT_STEP")
        step = self.current_epoch * self.num_iterations_per_epoch + self._iteration_in_epoch
        if crash is not None and step == int(crash):
            raise RuntimeError(f"simulated crash after step {crash}")
        return out


class nnUNetTrainerSUD_tiny(_Tiny, nnUNetTrainerSUD):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._tiny()


class nnUNetTrainerTE_tiny(_Tiny, nnUNetTrainerTE):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._tiny()


class nnUNetTrainerSUDMeanTeacher_tiny(_Tiny, nnUNetTrainerSUDMeanTeacher):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._tiny()
