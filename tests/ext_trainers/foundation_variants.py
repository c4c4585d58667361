"""A user's own variants, in a folder of their own listed in nnUNet_extTrainer beside ours:
short schedules of our trainers for the test suite (what a user would write for a quick try)."""
import os

from nnunet_sud.trainers import nnUNetTrainerUnlabeledStats


class nnUNetTrainerUnlabeledStats_tiny(nnUNetTrainerUnlabeledStats):
    """2 epochs of 3 iterations. SUD_TEST_CRASH_AT_EPOCH=k raises after epoch k's checkpoint,
    like a killed job, so that --c can be tested."""

    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 3
        self.num_val_iterations_per_epoch = 2
        self.save_every = 1  # a checkpoint_latest after every epoch, so --c has something to resume

    def on_epoch_end(self):
        super().on_epoch_end()
        crash = os.environ.get("SUD_TEST_CRASH_AT_EPOCH")
        if crash is not None and self.current_epoch - 1 == int(crash):
            raise RuntimeError(f"simulated crash after epoch {crash}")
