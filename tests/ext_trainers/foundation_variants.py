"""A user's own variants, in a folder of their own listed in nnUNet_extTrainer beside ours:
short schedules of our trainers for the test suite (what a user would write for a quick try)."""
from nnunet_sud.trainers import nnUNetTrainerUnlabeledStats


class nnUNetTrainerUnlabeledStats_tiny(nnUNetTrainerUnlabeledStats):
    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 3
        self.num_val_iterations_per_epoch = 2
        self.save_every = 1  # a checkpoint_latest after every epoch, so --c has something to resume
