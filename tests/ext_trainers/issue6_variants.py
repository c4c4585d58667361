"""Short schedules of SUD^2, SegMatch and DMNet for tests/test_e2e_issue6.py (a user's own variants),
with the crash / skip-validation switches of sud_variants_tiny._Tiny (documented there)."""
import os
import sys

import torch

from nnunet_sud.trainers import nnUNetTrainerDMNet, nnUNetTrainerSegMatch, nnUNetTrainerSUD2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling module, however this one is imported
from sud_variants_tiny import _Tiny  # noqa: E402


class nnUNetTrainerSUD2_tiny(_Tiny, nnUNetTrainerSUD2):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._tiny()


class nnUNetTrainerSegMatch_tiny(_Tiny, nnUNetTrainerSegMatch):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._tiny()


class nnUNetTrainerDMNet_tiny(_Tiny, nnUNetTrainerDMNet):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._tiny()
