"""Short schedules of SUD, TE and SUD-MT for the test suite (a user's own variants).
SUD_TEST_CRASH_AT_STEP=k raises after the k-th training step (counted from 1 over the whole run),
like a killed job; SUD_TEST_SKIP_FINAL_VALIDATION=1 skips nnU-Net's final validation."""
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

    def perform_actual_validation(self, save_probabilities: bool = False):
        # the e2e tests check inference with nnUNetv2_predict; nnU-Net's validation of our base runs
        # in test_e2e_foundation (SUD_TEST_SKIP_FINAL_VALIDATION as in mean_teacher_variants)
        if os.environ.get("SUD_TEST_SKIP_FINAL_VALIDATION") != "1":
            super().perform_actual_validation(save_probabilities)


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
