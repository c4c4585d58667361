"""Training budgets (nnunet_sud.budget): the one mechanism behind the tests' _tiny variants, the
demo's _demo and the benchmarks' _bench variants."""
import os
import sys

import pytest

from helpers import make_trainer
from nnunet_sud.budget import Budget


def test_budget_checkpoints_every_tenth_of_the_run_at_most_every_50_epochs():
    assert [Budget(e, 5).checkpoint_every() for e in (1, 9, 10, 25, 500, 501, 1000)] == [1, 1, 1, 2, 50, 50, 50]
    assert Budget(1000, 5, save_every=3).checkpoint_every() == 3
    for bad in (dict(epochs=0, iterations=1), dict(epochs=2, iterations=1.5), dict(epochs=2, iterations=2,
                                                                                 val_iterations=True)):
        with pytest.raises(ValueError):
            Budget(**bad)


def test_test_variants_get_their_budget_after_nnunets_init(synthetic_plans):
    """A _tiny variant of tests/ext_trainers, built as nnUNetv2_train builds it: the budget replaces
    nnU-Net's 1000 x 250 (and the learning-rate schedule is built from it in initialize)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "ext_trainers"))
    try:
        from tiny_variants import nnUNetTrainerMeanTeacher_tiny, nnUNetTrainerUAMT_tiny
    finally:
        sys.path.pop(0)
    t = make_trainer(nnUNetTrainerUAMT_tiny, synthetic_plans)
    assert (t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch, t.save_every) == (1, 2, 1, 1)
    assert t.mc_passes_per_forward == 4  # the variant's own setting, after the budget
    t = make_trainer(nnUNetTrainerMeanTeacher_tiny, synthetic_plans, initialize=True)
    assert (t.num_epochs, t.num_iterations_per_epoch) == (2, 2)
    assert t.lr_scheduler.max_steps == 2  # nnU-Net's poly schedule reads num_epochs in initialize
    assert t.my_init_kwargs["fold"] == 0 and set(t.my_init_kwargs) == {"plans", "configuration", "fold",
                                                                       "dataset_json", "device"}
