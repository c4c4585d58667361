"""Settings changed the nnU-Net way, after ``super().__init__()`` in a user's variant, take effect.

The trap: a default computed in ``__init__`` from another setting (SUD's lambda(t) = lambda_max t
and beta = 0.2 / lambda_max, SegMatch's lambda_u) kept the old value when a variant
changed that setting afterwards; a setting checked only in ``__init__`` was never checked."""
import math

import pytest
import torch

from nnunet_sud.errors import UserFacingError
from helpers import make_trainer


def late(base, **settings):
    """A variant in nnU-Net's style: ``super().__init__()``, then ``self.<setting> = value``."""
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        for k, v in settings.items():
            setattr(self, k, v)
    return type(base.__name__ + "_late", (base,), {"__init__": __init__})


def test_sud_lambda_max_changed_late_moves_the_ramp_and_beta(synthetic_plans):
    from nnunet_sud.schedules import LinearRamp
    from nnunet_sud.trainers import nnUNetTrainerSUD, nnUNetTrainerSUD_beta0p1, nnUNetTrainerTE
    t = make_trainer(late(nnUNetTrainerSUD, lambda_max=8.0), synthetic_plans)
    assert [t.unlabeled_weight(p) for p in (0.0, 0.5, 1.0)] == [0.0, 4.0, 8.0]
    assert t.beta == pytest.approx(0.2 / 8)
    # what was set explicitly stays as set, whatever lambda_max becomes
    t = make_trainer(late(nnUNetTrainerSUD_beta0p1, lambda_max=2.0), synthetic_plans)
    assert t.beta == pytest.approx(0.1) and t.unlabeled_weight(1.0) == pytest.approx(2.0)
    t = make_trainer(late(nnUNetTrainerSUD, lambda_max=8.0, unlabeled_weight=LinearRamp(1.0, 1.0),
                                    beta=0.3), synthetic_plans)
    assert t.unlabeled_weight(0.0) == 1.0 and t.beta == pytest.approx(0.3)
    t = make_trainer(late(nnUNetTrainerTE, lambda_max=8.0), synthetic_plans)
    assert t.beta == 0.0 and t.unlabeled_weight(0.5) == pytest.approx(4.0)  # TE never uses a denoiser
    # None returns to the derived default
    t.unlabeled_weight = None
    assert t.unlabeled_weight(0.25) == pytest.approx(2.0)


def test_sud_mean_teacher_lambda_max_changed_late(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerSUDMeanTeacher
    t = make_trainer(late(nnUNetTrainerSUDMeanTeacher, lambda_max=2.0), synthetic_plans)
    assert t.unlabeled_weight(1.0) == pytest.approx(2.0) and t.beta == pytest.approx(0.1)


def test_segmatch_lambda_u_changed_late(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerSegMatch
    t = make_trainer(late(nnUNetTrainerSegMatch, lambda_u=0.25), synthetic_plans)
    assert [t.unlabeled_weight(p) for p in (0.25, 0.7)] == [0.25, 0.25]  # the ramp's top follows lambda_u
    assert t.unlabeled_weight(0.0) == pytest.approx(0.25 * math.exp(-5))
    t = make_trainer(late(nnUNetTrainerSegMatch, lambda_u=0.25, lambda_u_rampup=0.5), synthetic_plans)
    assert t.unlabeled_weight(0.25) == pytest.approx(0.25 * math.exp(-1.25)) and t.unlabeled_weight(0.5) == 0.25


def test_mean_teacher_decay_changed_late_reaches_the_teacher(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerMeanTeacher
    t = make_trainer(late(nnUNetTrainerMeanTeacher, ema_decay=0.9, ema_warmup=False), synthetic_plans)
    t.initialize()
    assert (t.teacher.decay, t.teacher.current_decay()) == (0.9, 0.9)


@pytest.mark.parametrize("trainer, setting, value", [
    ("nnUNetTrainerSUD", "dice_form", "cubed"),
    ("nnUNetTrainerSUD", "beta", 1.5),
    ("nnUNetTrainerSUD2", "decorrelate", "both"),
    ("nnUNetTrainerSegMatch", "gating", "coin"),
    ("nnUNetTrainerSegMatch", "lambda_u_rampup", -1.0),
    ("nnUNetTrainerSegMatch", "discriminator_negatives", "images"),
])
def test_invalid_setting_set_late_stops_training_before_anything_is_built(synthetic_plans, trainer, setting, value):
    import nnunet_sud.trainers as T
    t = make_trainer(late(getattr(T, trainer), **{setting: value}), synthetic_plans)
    with pytest.raises(UserFacingError, match=setting):
        t.check_settings()
    # the same check is the first thing training does: nothing is initialised, no loader started
    with pytest.raises(UserFacingError, match=setting):
        t.on_train_start()
    assert not t.was_initialized and getattr(t, "dataloader_train", None) is None
