"""All trainer classes of nnunet_sud: the stable import path for users' own variants.

    from nnunet_sud.trainers import nnUNetTrainerSUD

    class nnUNetTrainerSUD_myvariant(nnUNetTrainerSUD):
        ...

nnU-Net finds these classes through the folder printed by ``nnunet-sud trainer-path``
(put it into ``nnUNet_extTrainer``). One import line per trainer module, above ``__all__``.
"""
from nnunet_sud.trainers.semi_supervised import nnUNetTrainerSemiSupervised  # noqa: F401
from nnunet_sud.trainers.unlabeled_stats import nnUNetTrainerUnlabeledStats  # noqa: F401
from nnunet_sud.denoiser.trainer import nnUNetTrainerLabelDenoiser  # noqa: F401
from nnunet_sud.trainers.teacher import nnUNetTrainerMeanTeacherBase  # noqa: F401
from nnunet_sud.trainers.mean_teacher import nnUNetTrainerMeanTeacher, nnUNetTrainerMeanTeacher_noDropout  # noqa: F401
from nnunet_sud.trainers.uamt import nnUNetTrainerUAMT, nnUNetTrainerUAMT_lnC  # noqa: F401
from nnunet_sud.trainers.dae_uncertainty import *  # noqa: F401,F403  (nnUNetTrainerDAEUncertainty + ablation variants)
from nnunet_sud.trainers.post_denoise import nnUNetTrainerPostDenoise  # noqa: F401
from nnunet_sud.trainers.sud import nnUNetTrainerSUD, nnUNetTrainerSUDMeanTeacher, nnUNetTrainerTE  # noqa: F401
from nnunet_sud.trainers.sud_variants import *  # noqa: F401,F403
from nnunet_sud.trainers.sud2 import *  # noqa: F401,F403  (nnUNetTrainerSUD2 + one-change variants)
from nnunet_sud.trainers.segmatch import *  # noqa: F401,F403  (nnUNetTrainerSegMatch + gating variants)
from nnunet_sud.trainers.dmnet import *  # noqa: F401,F403  (nnUNetTrainerDMNet + ablation variants)

__all__ = sorted(n for n in dir() if n.startswith("nnUNetTrainer"))
