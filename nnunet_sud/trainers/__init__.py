"""All trainer classes of nnunet_sud: the stable import path for users' own variants.

    from nnunet_sud.trainers import nnUNetTrainerSUD

    class nnUNetTrainerSUD_myvariant(nnUNetTrainerSUD):
        ...

nnU-Net finds these classes through the folder printed by ``nnunet-sud trainer-path``
(put it into ``nnUNet_extTrainer``). One import line per trainer module, above ``__all__``.
"""
from nnunet_sud.trainers.semi_supervised import nnUNetTrainerSemiSupervised  # noqa: F401
from nnunet_sud.trainers.unlabeled_stats import nnUNetTrainerUnlabeledStats  # noqa: F401

__all__ = sorted(n for n in dir() if n.startswith("nnUNetTrainer"))
