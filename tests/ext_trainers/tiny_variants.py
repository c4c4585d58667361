"""A user's own trainer variants for the test suite: short budgets of our trainers
(:class:`nnunet_sud.budget.Budget`, the mechanism the demo and the benchmarks use too) and the
switches the end-to-end tests use to interrupt a run. This folder is listed in nnUNet_extTrainer
beside the package's own (tests/conftest.py), as a user would set it up.

Switches (environment variables, read while training):

* ``SUD_TEST_CRASH_AT_EPOCH=k`` raises after epoch k's checkpoint, like a killed job (for ``--c``);
* ``SUD_TEST_CRASH_AT_STEP=k`` raises after the k-th training step (counted from 1 over the whole
  run); a trainer with a discriminator first writes the discriminator's weights of that moment to
  ``fold_X/discriminator_at_crash.pth`` (so a test can tell them from the checkpoint's);
* ``SUD_TEST_HANG_AT_STEP=k`` prints "hanging after step k" after the k-th step and sleeps: a hung
  job for a test to kill;
* ``SUD_TEST_SKIP_FINAL_VALIDATION=1`` skips nnU-Net's final validation (prediction of the
  validation case, ~20-30 s of CPU) where a test checks inference through nnUNetv2_predict instead
  (nnU-Net's validation of our base runs in test_e2e_semi_supervised_base).
"""
import os
import time

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_sud.budget import Budget, BudgetVariant
from nnunet_sud.trainers import (nnUNetTrainerDAEUncertainty, nnUNetTrainerDMNet, nnUNetTrainerLabelDenoiser,
                                 nnUNetTrainerMeanTeacher, nnUNetTrainerPostDenoise, nnUNetTrainerSegMatch,
                                 nnUNetTrainerSUD, nnUNetTrainerSUD2, nnUNetTrainerSUDMeanTeacher, nnUNetTrainerTE,
                                 nnUNetTrainerUAMT, nnUNetTrainerUnlabeledStats, nnUNetTrainerWeakToStrong)


class TestSwitches:
    """The SUD_TEST_* switches above; listed first, before BudgetVariant and the trainer."""

    def train_step(self, batch):
        out = super().train_step(batch)
        crash, hang = os.environ.get("SUD_TEST_CRASH_AT_STEP"), os.environ.get("SUD_TEST_HANG_AT_STEP")
        if crash is None and hang is None:
            return out
        step = self.current_epoch * self.num_iterations_per_epoch + self._iteration_in_epoch
        if crash is not None and step == int(crash):
            if getattr(self, "discriminator", None) is not None:
                torch.save(self.discriminator.state_dict(), os.path.join(self.output_folder,
                                                                         "discriminator_at_crash.pth"))
            raise RuntimeError(f"simulated crash after step {crash}")
        if hang is not None and step == int(hang):
            print(f"hanging after step {hang}", flush=True)
            time.sleep(3600)
        return out

    def on_epoch_end(self):
        super().on_epoch_end()
        crash = os.environ.get("SUD_TEST_CRASH_AT_EPOCH")
        if crash is not None and self.current_epoch - 1 == int(crash):
            raise RuntimeError(f"simulated crash after epoch {crash}")

    def perform_actual_validation(self, save_probabilities: bool = False):
        if os.environ.get("SUD_TEST_SKIP_FINAL_VALIDATION") == "1":
            self.print_to_log_file("final validation skipped (SUD_TEST_SKIP_FINAL_VALIDATION=1)")
            return
        super().perform_actual_validation(save_probabilities)


# a checkpoint_latest after every epoch (save_every=1), so --c has something to resume
TWO_BY_THREE = Budget(epochs=2, iterations=3, val_iterations=1, save_every=1)
ONE_BY_TWO = Budget(epochs=1, iterations=2, val_iterations=1, save_every=1)


# ---------------------------------------------------------------------- the semi-supervised base
class nnUNetTrainerUnlabeledStats_tiny(TestSwitches, BudgetVariant, nnUNetTrainerUnlabeledStats):
    budget = Budget(epochs=2, iterations=3, val_iterations=2, save_every=1)


# ---------------------------------------------------------------------- SUD family, SUD^2, SegMatch, DMNet
class nnUNetTrainerSUD_tiny(TestSwitches, BudgetVariant, nnUNetTrainerSUD):
    budget = TWO_BY_THREE


class nnUNetTrainerTE_tiny(TestSwitches, BudgetVariant, nnUNetTrainerTE):
    budget = TWO_BY_THREE


class nnUNetTrainerSUDMeanTeacher_tiny(TestSwitches, BudgetVariant, nnUNetTrainerSUDMeanTeacher):
    budget = TWO_BY_THREE


class nnUNetTrainerSUD2_tiny(TestSwitches, BudgetVariant, nnUNetTrainerSUD2):
    budget = TWO_BY_THREE


class nnUNetTrainerSegMatch_tiny(TestSwitches, BudgetVariant, nnUNetTrainerSegMatch):
    budget = TWO_BY_THREE


class nnUNetTrainerDMNet_tiny(TestSwitches, BudgetVariant, nnUNetTrainerDMNet):
    budget = TWO_BY_THREE


class nnUNetTrainerWeakToStrong_tiny(TestSwitches, BudgetVariant, nnUNetTrainerWeakToStrong):
    """L_u and the case filter (2 of the 6 unlabeled cases) from epoch 1 on."""
    budget = TWO_BY_THREE
    unlabeled_start = 0.5
    case_filter_fraction = 0.34


# ---------------------------------------------------------------------- mean-teacher family, post-denoise
class nnUNetTrainerMeanTeacher_tiny(TestSwitches, BudgetVariant, nnUNetTrainerMeanTeacher):
    budget = Budget(epochs=2, iterations=2, val_iterations=1, save_every=1)


class nnUNetTrainerUAMT_tiny(TestSwitches, BudgetVariant, nnUNetTrainerUAMT):
    """K = 8 passes in chunks of 4 (two teacher forwards of 4 B samples)."""
    budget = ONE_BY_TWO

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.mc_passes_per_forward = 4


class nnUNetTrainerDAEUncertainty_tiny(TestSwitches, BudgetVariant, nnUNetTrainerDAEUncertainty):
    budget = ONE_BY_TWO


class nnUNetTrainerPostDenoise_tiny(TestSwitches, BudgetVariant, nnUNetTrainerPostDenoise):
    budget = ONE_BY_TWO


# ---------------------------------------------------------------------- the label denoiser
class nnUNetTrainerLabelDenoiser_tiny(BudgetVariant, nnUNetTrainerLabelDenoiser):
    """Runs the whole pipeline (train, evaluate, checkpoint, json) in seconds. The denoiser it
    gives is untrained; use it where only the plumbing matters."""
    budget = Budget(epochs=2, iterations=2, val_iterations=1)

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.denoiser_eval_max_cases = 1
        self.denoiser_eval_settings = ((4.0, 4.0),)


class nnUNetTrainerLabelDenoiser_short(BudgetVariant, nnUNetTrainerLabelDenoiser):
    """2 epochs x 150 iterations with the default Adam (lr 2e-3, poly decay) and the default narrow
    network: about a minute of CPU on the synthetic 24x32x32 task, enough for denoised maps to beat
    the noisy ones at moderate to heavy corruption. (2 x 60 at lr 1e-3 was not: one run in two
    learned nothing yet.)"""
    budget = Budget(epochs=2, iterations=150, val_iterations=1)

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.denoiser_eval_every = 1
        self.denoiser_eval_max_cases = 1
        self.denoiser_eval_settings = ((2.0, 2.0), (4.0, 4.0), (8.0, 8.0))

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)


# ---------------------------------------------------------------------- self-training (nnUNetTrainer)
class nnUNetTrainer_selftrainTeacher(BudgetVariant, nnUNetTrainer):
    """The tests predict with nnUNetv2_predict instead of nnU-Net's final validation."""
    budget = Budget(epochs=2, iterations=8, val_iterations=1, save_every=1, final_validation=False)


class nnUNetTrainer_selftrainStudent(TestSwitches, BudgetVariant, nnUNetTrainer):
    """Can crash after an epoch (SUD_TEST_CRASH_AT_EPOCH)."""
    budget = Budget(epochs=2, iterations=3, val_iterations=1, save_every=1, final_validation=False)
