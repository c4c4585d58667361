"""Training budgets: a trainer variant that trains for fewer (or more) epochs and iterations.

nnU-Net changes a trainer's schedule with a subclass that sets ``num_epochs``,
``num_iterations_per_epoch``, ... after ``super().__init__()``. Every short run of this project
(the test suite's ``_tiny`` variants, ``nnunet-sud demo``'s ``_demo`` variants, the benchmarks'
``_bench`` variants, trainers built in process by the benchmark scripts) does it through
:class:`Budget`, so a budget means the same everywhere::

    from nnunet_sud.budget import Budget, BudgetVariant
    from nnunet_sud.trainers import nnUNetTrainerSUD

    class nnUNetTrainerSUD_short(BudgetVariant, nnUNetTrainerSUD):
        budget = Budget(epochs=20, iterations=50)

A module of such classes in a folder listed in ``nnUNet_extTrainer`` makes
``nnUNetv2_train ... -tr nnUNetTrainerSUD_short`` work (:func:`variants_source` writes one).
"""
import random
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch


@dataclass(frozen=True)
class Budget:
    """``epochs`` x ``iterations`` training steps, ``val_iterations`` validation batches per epoch
    (None: nnU-Net's 50), a ``checkpoint_latest.pth`` every ``save_every`` epochs (None: every tenth
    of the budget, at most nnU-Net's 50, so that an interrupted short run resumes with ``--c`` from
    where it stopped rather than from scratch), and nnU-Net's final validation (prediction of the
    validation cases after training) or a log line instead (``final_validation=False``; a label-map
    denoiser keeps its own: it is the clean/noisy quality record ``denoiser_validation.json`` that the
    trainers using the denoiser check)."""
    epochs: int
    iterations: int
    val_iterations: Optional[int] = None
    save_every: Optional[int] = None
    final_validation: bool = True

    def __post_init__(self):
        for name in ("epochs", "iterations", "val_iterations", "save_every"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"Budget.{name} must be a positive integer, got {v!r}")

    def checkpoint_every(self) -> int:
        return self.save_every if self.save_every is not None else max(1, min(50, self.epochs // 10))

    def apply(self, trainer) -> None:
        """Set the trainer's schedule attributes (after its ``__init__``, before ``initialize``:
        nnU-Net's poly learning rate reads ``num_epochs`` there)."""
        trainer.num_epochs = self.epochs
        trainer.num_iterations_per_epoch = self.iterations
        if self.val_iterations is not None:
            trainer.num_val_iterations_per_epoch = self.val_iterations
        trainer.save_every = self.checkpoint_every()

    def __str__(self):
        return f"{self.epochs} epochs x {self.iterations} iterations"


def keeps_final_validation(cls) -> bool:
    """True for trainers whose final validation is a record others read (the label-map denoiser's)."""
    from nnunet_sud.denoiser.trainer import nnUNetTrainerLabelDenoiser
    return isinstance(cls, type) and issubclass(cls, nnUNetTrainerLabelDenoiser)


class BudgetVariant:
    """Mixin, listed before the trainer class: applies the class attribute ``budget`` after the
    trainer's own ``__init__`` and skips the final validation where the budget says so."""
    budget: Budget = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if not isinstance(self.budget, Budget):
            raise TypeError(f"{type(self).__name__}: set the class attribute budget = Budget(...)")
        self.budget.apply(self)

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.budget.final_validation or keeps_final_validation(type(self)):
            return super().perform_actual_validation(save_probabilities)
        self.print_to_log_file(f"final validation skipped ({type(self).__name__}: Budget(final_validation="
                               f"False)); predict the test cases with nnUNetv2_predict instead")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators of this process."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class SeededVariant:
    """Mixin, listed first: seeds Python, NumPy and torch with the class attribute ``seed`` before the
    trainer is built, so that what nnU-Net draws in the training process (the network's initial
    weights; the unlabeled stream's worker seeds, drawn from NumPy) repeats for the same seed.
    What stays non-deterministic: nnU-Net's labeled-stream workers reseed themselves from the
    operating system (``NonDetMultiThreadedAugmenter`` with ``seeds=None``), batches of both streams
    arrive in the order the workers finish them, and threaded CPU / cuDNN kernels may sum in
    another order. A resumed training (``--c``) reseeds with the same seed."""
    seed: Optional[int] = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"{type(self).__name__}: set the class attribute seed = <int>")
        seed_everything(self.seed)
        super().__init__(plans, configuration, fold, dataset_json, device)


def variants_source(budgets: Dict[str, Tuple[int, int]], val_iterations: int, suffix: str,
                    final_validation: bool = True, purpose: str = "",
                    runs: Optional[Dict[str, int]] = None) -> str:
    """Source of a module defining ``<trainer><suffix>(BudgetVariant, <trainer>)`` for each
    ``trainer: (epochs, iterations)``, all with ``val_iterations`` validation batches; written into a
    folder of ``nnUNet_extTrainer`` it makes the variants trainable by name. With ``runs``
    (``{run suffix: seed}``), each trainer instead gets one seeded variant per run,
    ``<trainer><suffix><run suffix>(SeededVariant, BudgetVariant, <trainer>)`` (repeated trainings
    of one budget, each in its own model folder)."""
    lines = [f'"""Training budgets{(" of " + purpose) if purpose else ""}: a user\'s own trainer variants '
             '(written by nnunet_sud.budget.variants_source)."""',
             "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: F401",
             "from nnunet_sud.budget import Budget, BudgetVariant, SeededVariant  # noqa: F401",
             "from nnunet_sud.trainers import *  # noqa: F401,F403", ""]
    for t, (epochs, iters) in budgets.items():
        budget = (f"    budget = Budget(epochs={int(epochs)}, iterations={int(iters)}, "
                  f"val_iterations={int(val_iterations)}, final_validation={bool(final_validation)})")
        if runs is None:
            lines += [f"class {t}{suffix}(BudgetVariant, {t}):", budget, "", ""]
            continue
        for run_suffix, seed in runs.items():
            lines += [f"class {t}{suffix}{run_suffix}(SeededVariant, BudgetVariant, {t}):", budget,
                      f"    seed = {int(seed)}", "", ""]
    return "\n".join(lines).rstrip("\n") + "\n"

