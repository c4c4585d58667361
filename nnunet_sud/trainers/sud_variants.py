"""One-line variants of SUD for the paper's ablations (Young et al., Fig. 5: beta sweep at
lambda_max = 4; lambda_max; the kidney task's soft Dice + KL) and the plain-sum Dice (nnU-Net's
form, whose optimum is a thresholded target: SUD/TE as hard pseudo-label sharpening), and TE at
smaller lambda_max, with and without the feature dropout of the mean-teacher family."""
# the trainers, registered in nnunet_sud.trainers
__all__ = [
    "nnUNetTrainerSUD_beta0p01",
    "nnUNetTrainerSUD_beta0p02",
    "nnUNetTrainerSUD_beta0p1",
    "nnUNetTrainerSUD_beta0p2",
    "nnUNetTrainerSUD_beta0p5",
    "nnUNetTrainerSUD_beta1",
    "nnUNetTrainerSUD_lambda1",
    "nnUNetTrainerSUD_lambda1_beta005",
    "nnUNetTrainerSUD_lambda2",
    "nnUNetTrainerSUD_lambda8",
    "nnUNetTrainerSUD_KL",
    "nnUNetTrainerTE_lambda0p5",
    "nnUNetTrainerTE_lambda1",
    "nnUNetTrainerTE_lambda1_featureDropout",
    "nnUNetTrainerSUD_lambda1_featureDropout",
    "nnUNetTrainerSUD_lambda1_featureDropout_spatialOnly",
    "nnUNetTrainerSUD_plainDice",
    "nnUNetTrainerTE_plainDice",
    "nnUNetTrainerSUDMeanTeacher_plainDice",
]

from nnunet_sud.schedules import LinearRamp
from nnunet_sud.trainers.sud import nnUNetTrainerSUD, nnUNetTrainerSUDMeanTeacher, nnUNetTrainerTE


class nnUNetTrainerSUD_beta0p01(nnUNetTrainerSUD):
    beta = 0.01


class nnUNetTrainerSUD_beta0p02(nnUNetTrainerSUD):
    beta = 0.02


class nnUNetTrainerSUD_beta0p1(nnUNetTrainerSUD):
    beta = 0.1


class nnUNetTrainerSUD_beta0p2(nnUNetTrainerSUD):
    beta = 0.2


class nnUNetTrainerSUD_beta0p5(nnUNetTrainerSUD):
    beta = 0.5


class nnUNetTrainerSUD_beta1(nnUNetTrainerSUD):
    """The full denoiser target z = alpha a(f) + (1 - alpha) z^- (Chan, Young, Metzler's reading of
    SUD, eq. 2-3 of SUD^2): the reference of the SUD^2 ablations, which all use beta = 1."""
    beta = 1.0


class nnUNetTrainerSUD_lambda1(nnUNetTrainerSUD):
    lambda_max = 1.0  # beta = 0.2 / lambda_max = 0.2


class nnUNetTrainerSUD_lambda1_beta005(nnUNetTrainerSUD):
    """lambda_max = 1 with the paper's beta = 0.05 held (not 0.2 / lambda_max): against
    ``_lambda1``, the denoiser's share alone; the one-view reference of ``nnUNetTrainerSUDWeakToStrong``."""
    lambda_max, beta = 1.0, 0.05


class nnUNetTrainerSUD_lambda2(nnUNetTrainerSUD):
    lambda_max = 2.0


class nnUNetTrainerSUD_lambda8(nnUNetTrainerSUD):
    lambda_max = 8.0


class nnUNetTrainerSUD_KL(nnUNetTrainerSUD):
    use_kl = True


class nnUNetTrainerTE_lambda0p5(nnUNetTrainerTE):
    """TE with a weaker self-consistency term (lambda_max = 0.5 instead of the paper's 4, which was
    chosen for 10^5 iterations). Not yet measured."""
    lambda_max = 0.5


class nnUNetTrainerTE_lambda1(nnUNetTrainerTE):
    """TE at lambda_max = 1 instead of the paper's 4 (chosen for 10^5 iterations): a self-consistency
    term that does not outweigh the supervised loss at a short budget."""
    lambda_max = 1.0


class nnUNetTrainerTE_lambda1_featureDropout(nnUNetTrainerTE_lambda1):
    """TE at lambda_max = 1 with channel dropout p = 0.5 (bottleneck and before the output layer), as
    Laine and Aila's temporal ensembling perturbs its network. Compare with
    ``nnUNetTrainerFeatureDropout`` (the same dropout, labeled images only): the difference is what
    the unlabeled images add."""
    feature_dropout = 0.5


class nnUNetTrainerSUD_lambda1_featureDropout(nnUNetTrainerSUD_lambda1):
    """SUD at lambda_max = 1 (the paper's beta = 0.2 / lambda_max = 0.2) with the dropout of
    ``nnUNetTrainerTE_lambda1_featureDropout``: against it, what the denoiser adds."""
    feature_dropout = 0.5


class nnUNetTrainerSUD_lambda1_featureDropout_spatialOnly(nnUNetTrainerSUD_lambda1_featureDropout):
    """SUD's spatial half alone: alpha = 1 all through training, so the target is the denoised mix of the
    same pass, z_n = beta a(f_n) + (1 - beta) f_n (beta = 0.2), and the stored history never enters it.
    With eq. 15's Dice the (1 - beta) f_n share gives no gradient at f = z: the unlabeled loss pulls f
    a fifth of the way towards a(f), under the dropout. A diagnostic, not the paper's method: against
    ``nnUNetTrainerSUD_lambda1_featureDropout`` it tells the spatial half of eq. 8 from the temporal
    average. The store is still
    written (alpha = 1 replaces the stored target), so logs and ``--c`` work as in SUD."""
    alpha = LinearRamp(1.0, 1.0)


class nnUNetTrainerSUD_plainDice(nnUNetTrainerSUD):
    dice_form = "plain"


class nnUNetTrainerTE_plainDice(nnUNetTrainerTE):
    dice_form = "plain"


class nnUNetTrainerSUDMeanTeacher_plainDice(nnUNetTrainerSUDMeanTeacher):
    dice_form = "plain"
