"""Short schedules of SUD, TE and SUD-MT for the test suite (a user's own variants); ``_Tiny`` is
shared with issue6_variants.py: 2 epochs x 3 iterations, a checkpoint_latest after every epoch.

SUD_TEST_CRASH_AT_STEP=k raises after the k-th training step (counted from 1 over the whole run),
like a killed job; a trainer with a discriminator first writes the discriminator's weights of that
moment to ``fold_X/discriminator_at_crash.pth`` (so a test can tell them from the checkpoint's).
SUD_TEST_HANG_AT_STEP=k prints "hanging after step k" after the k-th step and sleeps, a hung job
for a test to kill. SUD_TEST_SKIP_FINAL_VALIDATION=1 skips nnU-Net's final validation (~20 s of
CPU) where the test checks inference through nnUNetv2_predict instead (nnU-Net's validation of our
base runs in test_e2e_foundation)."""
import os
import time

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
            if getattr(self, "discriminator", None) is not None:
                torch.save(self.discriminator.state_dict(), os.path.join(self.output_folder,
                                                                         "discriminator_at_crash.pth"))
            raise RuntimeError(f"simulated crash after step {crash}")
        hang = os.environ.get("SUD_TEST_HANG_AT_STEP")
        if hang is not None and step == int(hang):
            print(f"hanging after step {hang}", flush=True)
            time.sleep(3600)
        return out

    def perform_actual_validation(self, save_probabilities: bool = False):
        if os.environ.get("SUD_TEST_SKIP_FINAL_VALIDATION") == "1":
            self.print_to_log_file("final validation skipped (SUD_TEST_SKIP_FINAL_VALIDATION=1)")
            return
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
