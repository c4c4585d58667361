"""Every method setting of every trainer has one form: a declared class attribute, read when used.

A variant changes it either way -- a class attribute in its body, or an assignment after
``super().__init__()`` (nnU-Net's style) -- and both reach the value the trainer reads. The trap:
a setting given its default in ``__init__`` overwrote a subclass's class attribute; a default
computed in ``__init__`` from another setting (SUD's lambda(t) = lambda_max t and
beta = 0.2 / lambda_max, SegMatch's lambda_u) kept the old value when a variant changed that
setting afterwards; a setting checked only in ``__init__`` was never checked."""
import math

import pytest
import torch

import nnunet_sud.trainers as trainers
from nnunet_sud.errors import UserFacingError
from nnunet_sud.trainers.settings import DerivedDefault, method_settings
from helpers import make_trainer

#: every trainer class that nnunet_sud exports (bases included: users subclass them too)
TRAINERS = [getattr(trainers, name) for name in trainers.__all__]
#: (trainer, setting) for every setting of every trainer
SETTINGS = [(cls, name) for cls in TRAINERS for name in method_settings(cls)]
DERIVED = [(cls, name) for cls, name in SETTINGS if isinstance(method_settings(cls)[name], DerivedDefault)]


def late(base, **settings):
    """A variant in nnU-Net's style: ``super().__init__()``, then ``self.<setting> = value``."""
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        for k, v in settings.items():
            setattr(self, k, v)
    return type(base.__name__ + "_late", (base,), {"__init__": __init__})


def in_class_body(base, **settings):
    """A variant that sets class attributes: ``class X(base): <setting> = value``."""
    return type(base.__name__ + "_class", (base,), settings)


class Marker:
    """A value no trainer has by default: a setting that reads it back was not overwritten."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"Marker({self.name})"


@pytest.fixture(scope="module")
def changed_either_way(synthetic_plans):
    """trainer class -> (its settings' markers, [trainer of a variant that sets them all in its class
    body, trainer of one that assigns them all after super().__init__()]), built once per class."""
    built = {}

    def get(cls):
        if cls not in built:
            markers = {name: Marker(f"{cls.__name__}.{name}") for name in method_settings(cls)}
            built[cls] = markers, [make_trainer(variant, synthetic_plans)
                                   for variant in (in_class_body(cls, **markers), late(cls, **markers))]
        return built[cls]
    return get


@pytest.mark.parametrize("cls, setting", SETTINGS, ids=[f"{c.__name__}.{n}" for c, n in SETTINGS])
def test_a_setting_changed_either_way_reaches_the_trainer(changed_either_way, cls, setting):
    markers, variants = changed_either_way(cls)
    for t in variants:
        assert getattr(t, setting) is markers[setting], f"{type(t).__name__}.{setting} reads {getattr(t, setting)!r}"


@pytest.mark.parametrize("cls", TRAINERS, ids=[c.__name__ for c in TRAINERS])
def test_init_sets_no_setting_and_every_setting_is_declared(synthetic_plans, cls):
    """``__init__`` sets state only; a derived default is a listed setting; the declared values are
    those the trainer reads."""
    settings = method_settings(cls)
    t = make_trainer(cls, synthetic_plans)
    assigned = sorted(k for k in vars(t) if k in settings or k.startswith("_setting_"))
    assert not assigned, f"{cls.__name__}.__init__ assigns the settings {assigned}"
    for klass in cls.__mro__:
        for name, value in vars(klass).items():
            assert not isinstance(value, DerivedDefault) or name in settings, f"{klass.__name__}.{name}"
    for name, value in settings.items():
        if not isinstance(value, DerivedDefault):
            assert getattr(t, name) is value, name


class Reads:
    """Records the attributes a derived default reads of the trainer."""

    def __init__(self, trainer):
        self.trainer, self.names = trainer, []

    def __getattr__(self, name):
        self.names.append(name)
        return getattr(self.trainer, name)


def compared(value):
    """A schedule by its values over training, anything else as it is."""
    return [value(t) for t in (0.0, 0.1, 0.3, 0.6, 1.0)] if callable(value) else value


@pytest.mark.parametrize("cls, setting", DERIVED, ids=[f"{c.__name__}.{n}" for c, n in DERIVED])
def test_a_derived_default_follows_what_it_derives_from(synthetic_plans, cls, setting):
    """Each attribute the default reads (a setting: changed either way; nnU-Net's own, e.g.
    num_epochs: after super().__init__()) moves the derived value as the default says."""
    derived = method_settings(cls)[setting]
    default = make_trainer(cls, synthetic_plans)
    reads = Reads(default)
    derived.default(reads)
    sources = sorted(set(reads.names))
    assert sources, f"{cls.__name__}.{setting} derives from nothing"
    for source in sources:
        before = getattr(default, source)
        assert isinstance(before, (int, float)) and not isinstance(before, bool), (source, before)
        changed = 2 * before + 1
        variants = [late(cls, **{source: changed})]
        if source in method_settings(cls):
            variants.append(in_class_body(cls, **{source: changed}))
        for variant in variants:
            t = make_trainer(variant, synthetic_plans)
            assert getattr(t, source) == changed
            value = getattr(t, setting)
            assert compared(value) == compared(derived.default(t)), (variant.__name__, source)
            assert compared(value) != compared(getattr(default, setting)), (variant.__name__, source)


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
    ("nnUNetTrainerSUD2", "denoise_steps", 0),
    ("nnUNetTrainerUnlabeledStats", "unlabeled_batch_size", 0),
    ("nnUNetTrainerMeanTeacher", "ema_decay", 1.5),
    ("nnUNetTrainerMeanTeacher", "consistency_class_reduction", "max"),
    ("nnUNetTrainerUAMT", "mc_passes", 0),
    ("nnUNetTrainerDAEUncertainty", "kappa", -1.0),
    ("nnUNetTrainerDMNet", "temperature", 0.0),
    ("nnUNetTrainerFeatureDropout", "feature_dropout", 1.0),
    ("nnUNetTrainerLabelDenoiser", "denoiser_optimizer", "rmsprop"),
    ("nnUNetTrainerLabelDenoiser", "corruption_sigma_distribution", "cubic"),
    ("nnUNetTrainerLabelDenoiser", "denoiser_num_stages", 1),
])
def test_invalid_setting_set_late_stops_training_before_anything_is_built(synthetic_plans, trainer, setting, value):
    t = make_trainer(late(getattr(trainers, trainer), **{setting: value}), synthetic_plans)
    with pytest.raises(UserFacingError, match=rf"{type(t).__name__}.*{setting}.*{value!r}"):
        t.check_settings()
    # the same check is the first thing training does: nothing is initialised, no loader started
    with pytest.raises(UserFacingError, match=setting):
        t.on_train_start()
    assert not t.was_initialized and getattr(t, "dataloader_train", None) is None
