"""LabelDenoiserMixin: which trainers need the label denoiser (asked of the class, as the demo, the
benchmarks and self-training ask before training), and the one region-label check."""
import copy
import os

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_sud.errors import UserFacingError
from nnunet_sud.experiment import needs_denoiser, trainer_class
from nnunet_sud.trainers import (nnUNetTrainerDAEUncertainty_kappa2, nnUNetTrainerMeanTeacher, nnUNetTrainerPostDenoise,
                                 nnUNetTrainerSUD, nnUNetTrainerSUD2_decorr, nnUNetTrainerSUD2_decorrDenoiser,
                                 nnUNetTrainerSUD_lambda8, nnUNetTrainerSUDMeanTeacher, nnUNetTrainerTE)
from nnunet_sud.trainers.denoiser_mixin import LabelDenoiserMixin


class _SUDWithoutDenoiser(nnUNetTrainerSUD):
    beta = 0.0  # a user's "SUD" that is TE: the old name match said it needed a denoiser


class _TEWithDenoiser(nnUNetTrainerTE):
    beta = 0.3


class _SUD2NoPenalty(nnUNetTrainerSUD2_decorrDenoiser):
    lambda2 = 0.0
    beta = 0.0


@pytest.mark.parametrize("cls,expected", [
    (nnUNetTrainerSUD, True), (nnUNetTrainerSUD_lambda8, True), (nnUNetTrainerSUDMeanTeacher, True),
    (nnUNetTrainerTE, False), (nnUNetTrainerPostDenoise, True), (nnUNetTrainerDAEUncertainty_kappa2, True),
    (nnUNetTrainerSUD2_decorr, True), (_SUDWithoutDenoiser, False), (_TEWithDenoiser, True), (_SUD2NoPenalty, False),
])
def test_the_class_says_whether_it_needs_the_denoiser(cls, expected):
    assert cls.needs_denoiser_by_default() is expected


def test_derived_beta_is_read_from_the_class():
    """SUD's beta = 0.2 / lambda_max is derived when read, also on the instance-less question."""
    probe = nnUNetTrainerSUD_lambda8.__new__(nnUNetTrainerSUD_lambda8)
    assert probe.beta == pytest.approx(0.025)
    # the beta = 0 variant of SUD^2's denoiser-latent penalty still needs the denoiser for the penalty
    assert nnUNetTrainerSUD2_decorrDenoiser.needs_denoiser_by_default()


@pytest.mark.parametrize("name,expected", [
    ("nnUNetTrainerSUD", True), ("nnUNetTrainerTE", False), ("nnUNetTrainerTE_plainDice", False),
    ("nnUNetTrainerSUD2_multistep", True), ("nnUNetTrainerPostDenoise", True),
    ("nnUNetTrainerDAEUncertainty_entropy", True), ("nnUNetTrainerMeanTeacher", False),
    ("nnUNetTrainerLabelDenoiser", False), ("nnUNetTrainer", False), ("nnUNetTrainerNoSuchThing", False),
])
def test_experiment_asks_the_trainer_class(name, expected):
    assert needs_denoiser(name) is expected


def test_experiment_finds_trainers_outside_the_package():
    """A user's variant in nnUNet_extTrainer (tests/ext_trainers) is found through nnU-Net's search."""
    cls = trainer_class("nnUNetTrainerLabelDenoiser_tiny")
    assert cls is not None and cls.__name__ == "nnUNetTrainerLabelDenoiser_tiny"
    assert not needs_denoiser("nnUNetTrainerLabelDenoiser_tiny")
    assert issubclass(nnUNetTrainerPostDenoise, LabelDenoiserMixin)
    assert not issubclass(nnUNetTrainerMeanTeacher, LabelDenoiserMixin)


def test_region_based_labels_stop_every_denoiser_user_before_loading(synthetic3d):
    pre = synthetic3d["preprocessed"]
    plans = load_json(os.path.join(pre, "nnUNetPlans.json"))
    plans["continue_training"] = False
    ds = copy.deepcopy(load_json(os.path.join(pre, "dataset.json")))
    ds["labels"] = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "vessel": 3}
    ds["regions_class_order"] = [1, 2, 3]
    for cls in (nnUNetTrainerSUD, nnUNetTrainerTE):
        tr = cls(copy.deepcopy(plans), "3d_fullres", 0, ds, torch.device("cpu"))
        with pytest.raises(UserFacingError, match=f"{cls.__name__} needs mutually exclusive classes .* region-based"):
            tr.load_label_denoiser()
        assert tr.denoiser is None
