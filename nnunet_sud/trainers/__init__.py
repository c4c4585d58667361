"""All trainer classes of nnunet_sud: the stable import path for users' own variants.

    from nnunet_sud.trainers import nnUNetTrainerSUD

    class nnUNetTrainerSUD_myvariant(nnUNetTrainerSUD):
        ...

nnU-Net finds these classes through the folder printed by ``nnunet-sud trainer-path``
(put it into ``nnUNet_extTrainer``).

``__all__`` convention (the whole package): a module that exports names lists them in a literal
``__all__`` right below its docstring; a trainer module lists its trainer classes there. This
package star-imports every trainer module (one line per module) and its ``__all__`` is theirs
together: adding a trainer is adding its name to its module's ``__all__``.
"""
from nnunet_sud.denoiser import trainer as _denoiser_trainer
from nnunet_sud.denoiser.trainer import *  # noqa: F401,F403
from nnunet_sud.trainers import (dae_uncertainty, dmnet, mean_teacher, post_denoise, segmatch, semi_supervised, sud,
                                 sud2, sud_variants, sud_weak_to_strong, teacher, uamt, unlabeled_stats,
                                 weak_to_strong)
from nnunet_sud.trainers.semi_supervised import *  # noqa: F401,F403
from nnunet_sud.trainers.unlabeled_stats import *  # noqa: F401,F403
from nnunet_sud.trainers.teacher import *  # noqa: F401,F403
from nnunet_sud.trainers.mean_teacher import *  # noqa: F401,F403
from nnunet_sud.trainers.uamt import *  # noqa: F401,F403
from nnunet_sud.trainers.dae_uncertainty import *  # noqa: F401,F403
from nnunet_sud.trainers.post_denoise import *  # noqa: F401,F403
from nnunet_sud.trainers.sud import *  # noqa: F401,F403
from nnunet_sud.trainers.sud_variants import *  # noqa: F401,F403
from nnunet_sud.trainers.sud2 import *  # noqa: F401,F403
from nnunet_sud.trainers.segmatch import *  # noqa: F401,F403
from nnunet_sud.trainers.dmnet import *  # noqa: F401,F403
from nnunet_sud.trainers.weak_to_strong import *  # noqa: F401,F403
from nnunet_sud.trainers.sud_weak_to_strong import *  # noqa: F401,F403

_TRAINER_MODULES = (semi_supervised, unlabeled_stats, _denoiser_trainer, teacher, mean_teacher, uamt, dae_uncertainty,
                    post_denoise, sud, sud_variants, sud2, segmatch, dmnet, weak_to_strong, sud_weak_to_strong)
__all__ = sorted(name for module in _TRAINER_MODULES for name in module.__all__)
