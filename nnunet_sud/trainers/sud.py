"""Supervision by denoising (SUD) and temporal ensembling (TE) as nnU-Net trainers.

Young, Shi, Ramakrishnan, Boisvert, ... Dalca, "SUD: Supervision by Denoising for Semantic
Segmentation" (arXiv:2202.02952, 2022), §3.3, eq. 7-8. Per unlabeled patch u_n at iteration n:

    f_n = f(u_n | Theta_n)                                   segmenter softmax   (B, C, *P)
    z_n = alpha (beta a(f_n) + (1 - beta) f_n) + (1 - alpha) z_n^-            eq. (8)
    L   = L_sup(x_n, y_n) + lambda D(z_n, f(u_n | Theta))     z_n fixed        eq. (7)

a() is the trained label-map denoiser (log, clip, denoise, softmax: ``apply_denoiser``), z_n^- the
soft target stored for the same image at its previous visit (kept in case voxel space and
carried through the augmentation by ``SoftTargetStore``; first visit: z_n^- := the current
estimate), D the squared-norm soft Dice of the paper's eq. 15 over valid voxels (its best f is
z itself; optionally + KL(z || f); the ``_plainDice`` variants use nnU-Net's plain sums; other D:
``target_loss``, ``target_temperature``, ``target_hard`` below), applied to every deep-supervision
output with nnU-Net's weights.

Schedules (progress t in [0, 1] over all iterations), as the paper:
    lambda(t) = lambda_max t,  lambda_max = 4                  ``unlabeled_weight``
    beta      = 0.2 / lambda_max = 0.05                        spatial denoising weight
    alpha(t)  = 1 - t           from 1 down to 0 (§3.3.2)      temporal averaging weight
§4 says "vary alpha linearly from 0 to 1"; that contradicts §3.3.2 (targets must adapt early and
converge late; alpha = 0 at the start would freeze the first, random targets), so we follow
§3.3.2. TE is the same with beta = 0 (no denoiser needed).

State: the soft targets live in ``fold_X/soft_targets/`` while training; each checkpoint gets a
snapshot ``fold_X/soft_targets_<checkpoint>/`` so that ``--c`` resumes with exactly that store
(copied to a temporary folder and renamed together with the checkpoint; a missing snapshot, or
one of another epoch, stops ``--c`` with the way forward).
At the end of training they are removed (``keep_soft_targets = True`` keeps them); the model
folder is then an ordinary nnU-Net model folder for ``nnUNetv2_predict``.
"""
# the trainers, registered in nnunet_sud.trainers
__all__ = ["nnUNetTrainerSUD", "nnUNetTrainerTE", "nnUNetTrainerSUDMeanTeacher"]

import math
import os
import shutil
import time
import warnings
from collections import defaultdict
from typing import Optional

import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from torch import distributed as dist

from nnunet_sud.denoiser.corruption import apply_denoiser
from nnunet_sud.errors import UserFacingError
from nnunet_sud.losses.soft_targets import (downsample_targets, hard_targets, sharpen_targets, soft_cross_entropy,
                                            soft_dice_loss, soft_kl_loss)
from nnunet_sud.network_helpers import full_resolution
from nnunet_sud.robust_training import CheckpointError, temporary_path
from nnunet_sud.schedules import LinearRamp
from nnunet_sud.targets.store import SoftTargetStore
from nnunet_sud.trainers.denoiser_mixin import LabelDenoiserMixin
from nnunet_sud.trainers.semi_supervised import nnUNetTrainerSemiSupervised
from nnunet_sud.trainers.settings import DerivedDefault
from nnunet_sud.trainers.teacher import check_feature_dropout, install_feature_dropout, nnUNetTrainerMeanTeacherBase

STORE_DIR = "soft_targets"


class DenoisedTargetsMixin(LabelDenoiserMixin):
    """What SUD and SUD-MT share: lambda/beta hyper-parameters, the spatial denoising step
    beta a(f) + (1 - beta) f and the soft-target loss D(z, f). The denoiser itself (labels check,
    loading, whether it is needed) is ``LabelDenoiserMixin``'s.

    D(z, f), with f = softmax(logits) and z the soft target, both (B, C, *S), over the valid
    voxels V (``valid`` (B, *S)); c runs over all C classes, c >= 1 over the foreground ones:

        "soft_dice"  1 - mean_{c >= 1} d_c,  d_c = (2 sum_V z_c f_c + s) / (sum_V z_c^2 + sum_V f_c^2 + s)
                     (``dice_form = "squared"``: the paper's eq. 15, Appendix A; "plain": sums of z_c
                     and f_c in the denominator, nnU-Net's form), per sample or over the batch
                     (``batch_dice`` of the plans), s = 1e-5
        "kl"         1/|V| sum_V sum_c z_c (log z_c - log f_c)          KL(z || f), background included
        "ce"         1/|V| sum_V -sum_c z_c log f_c                     soft cross-entropy, background included
        "ce_dice"    "ce" + "soft_dice"

    "kl" and "ce" differ by the entropy of z, a constant in f: the same gradient (only the logged
    value differs; KL is 0 at f = z). The paper's D is eq. 15's soft Dice ("soft_dice", the default);
    its kidney task used Dice + KL (``use_kl = True`` beside "soft_dice": ``nnUNetTrainerSUD_KL``); §3.3
    allows any segmentation loss ("cross entropy, Dice loss etc.", after eq. 7). Unlike the foreground
    Dice, the terms over all classes weigh background voxels: a false positive of f far from any
    structure costs where z says background.

    The target D sees may be sharpened first (the stored z is never sharpened): z^(1/T) / sum_c z_c^(1/T)
    with T = ``target_temperature`` (1: none), or the one-hot of argmax_c z_c (``target_hard``).
    """

    SETTINGS = ("lambda_max", "beta", "unlabeled_weight", "use_kl", "dice_form", "target_loss", "target_temperature",
                "target_hard")
    #: lambda_max of the linear ramp of the unlabeled weight lambda
    lambda_max: float = 4.0
    #: beta, the spatial (denoiser) weight; default 0.2 / lambda_max as in the paper (read when used,
    #: so a variant that changes lambda_max after __init__ gets the paper's beta for it)
    beta = DerivedDefault(lambda t: 0.2 / t.lambda_max)
    #: lambda(t) = lambda_max t (read when used; assign a Schedule to replace it)
    unlabeled_weight = DerivedDefault(lambda t: LinearRamp(0.0, t.lambda_max))
    #: add KL(z || f) to the soft Dice (the paper's kidney task)
    use_kl: bool = False
    #: D's form: "squared" (eq. 15, best f = z) or "plain" (nnU-Net's sums, best f = thresholded z)
    dice_form: str = "squared"
    #: D: "soft_dice" (the paper's), "kl", "ce" or "ce_dice" (class doc); the Dice terms use dice_form
    target_loss: str = "soft_dice"
    #: T of the target's sharpening z^(1/T) / sum_c z_c^(1/T) before D (1: none)
    target_temperature: float = 1.0
    #: D against the one-hot argmax of z (a hard label) instead of z
    target_hard: bool = False
    #: target_loss -> its terms
    TARGET_LOSSES = {"soft_dice": ("dice",), "kl": ("kl",), "ce": ("ce",), "ce_dice": ("ce", "dice")}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        #: seconds spent per component (read by benchmarks/sud_speed.py)
        self.component_times = defaultdict(float)

    def check_settings(self):
        super().check_settings()
        name = type(self).__name__
        if self.dice_form not in ("squared", "plain"):
            raise UserFacingError(f"{name}.dice_form must be 'squared' (eq. 15) or 'plain', got {self.dice_form!r}")
        if self.target_loss not in self.TARGET_LOSSES:
            raise UserFacingError(f"{name}.target_loss must be one of {tuple(self.TARGET_LOSSES)}, got "
                                  f"{self.target_loss!r}")
        for setting in ("use_kl", "target_hard"):
            if not isinstance(getattr(self, setting), bool):
                raise UserFacingError(f"{name}.{setting} must be True or False, got {getattr(self, setting)!r}")
        if self.use_kl and self.target_loss != "soft_dice":
            raise UserFacingError(f"{name}.use_kl = True adds KL(z || f) to the soft Dice; target_loss = "
                                  f"{self.target_loss!r} has a KL or cross-entropy term already (the two differ by a "
                                  f"constant in f). Set use_kl = False, or target_loss = 'soft_dice'.")
        temperature = self.target_temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
                not math.isfinite(temperature) or temperature <= 0:
            raise UserFacingError(f"{name}.target_temperature must be a number > 0 (1: no sharpening), got "
                                  f"{temperature!r}")
        if self.target_hard and temperature != 1:
            raise UserFacingError(f"{name}.target_temperature = {temperature!r} with target_hard = True: the hard "
                                  f"label is the argmax whatever the temperature. Set target_temperature = 1.0.")
        if not 0.0 <= float(self.beta) <= 1.0:
            raise UserFacingError(f"{name}.beta (the denoiser's share of the target) must be in [0, 1], got "
                                  f"{self.beta}")

    def needs_denoiser(self) -> bool:
        """The denoiser is called only for beta > 0 (TE: beta = 0)."""
        return self.beta > 0

    @torch.no_grad()
    def denoise(self, f: torch.Tensor) -> torch.Tensor:
        """a(f): the denoiser on f (B, C, *P) probabilities (no gradient). SUD^2 overrides it."""
        t0 = time.perf_counter()
        a_f = apply_denoiser(self.denoiser, f)
        self.component_times["denoiser"] += time.perf_counter() - t0
        return a_f

    def spatial_denoise(self, f: torch.Tensor, a_f: Optional[torch.Tensor] = None) -> torch.Tensor:
        """beta a(f) + (1 - beta) f   for f (B, C, *P) probabilities (no gradient); ``a_f``: a(f)
        when already computed."""
        if self.beta == 0:
            return f
        return self.beta * (self.denoise(f) if a_f is None else a_f) + (1 - self.beta) * f

    def soft_target_term(self, logits: torch.Tensor, z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """D(z, f) at one resolution (class doc): the terms of ``target_loss`` between f = softmax(logits)
        and z, both (B, C, *S), over the voxels ``valid`` (B, *S) (+ KL(z || f) with ``use_kl``)."""
        logits = logits.float()
        terms = self.TARGET_LOSSES[self.target_loss]
        term = 0
        if "ce" in terms:
            term = soft_cross_entropy(torch.log_softmax(logits, 1), z, valid)
        if "dice" in terms:
            term = term + soft_dice_loss(torch.softmax(logits, 1), z, valid,
                                         batch_dice=self.configuration_manager.batch_dice, form=self.dice_form)
        if "kl" in terms or self.use_kl:
            term = term + soft_kl_loss(torch.log_softmax(logits, 1), z, valid)
        return term

    def loss_target(self, z: torch.Tensor) -> torch.Tensor:
        """The target D sees (B, C, *S): z, sharpened by ``target_temperature`` or made hard (``target_hard``)."""
        return hard_targets(z) if self.target_hard else sharpen_targets(z, self.target_temperature)

    def soft_target_loss(self, outputs, z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """D(z, f) summed over deep-supervision outputs with nnU-Net's weights (its
        ``DeepSupervisionWrapper``; z, sharpened by ``loss_target``, and valid are downsampled to each
        output's size)."""
        z = self.loss_target(z)
        weights = getattr(self.loss, "weight_factors", None)  # None: nnU-Net's loss without deep supervision
        if not isinstance(outputs, (list, tuple)) or weights is None:
            return self.soft_target_term(full_resolution(outputs), z, valid)
        targets, masks = zip(*downsample_targets(z, valid, [o.shape[2:] for o in outputs]))
        return DeepSupervisionWrapper(self.soft_target_term, weights)(outputs, targets, masks)


class nnUNetTrainerSUD(DenoisedTargetsMixin, nnUNetTrainerSemiSupervised):
    """SUD (eq. 8). Variants change the class attributes (``lambda_max``, ``beta``, ``use_kl``; see
    ``sud_variants.py``)."""

    SETTINGS = ("alpha", "keep_soft_targets", "snapshot_store_for_best", "feature_dropout")
    #: alpha(t), the temporal averaging weight of the new estimate, 1 -> 0 (§3.3.2)
    alpha = LinearRamp(1.0, 0.0)
    #: keep fold_X/soft_targets after training
    keep_soft_targets: bool = False
    #: snapshot the store with checkpoint_best too (exact --c from best; costs a copy per new best)
    snapshot_store_for_best: bool = True
    #: channel dropout p on the bottleneck and before the output layer (``teacher.add_feature_dropout``),
    #: in train mode only, so the labeled loss and f both see it: the perturbation of Laine and Aila's
    #: temporal ensembling ("Temporal ensembling for semi-supervised learning", ICLR 2017). 0 (default,
    #: the SUD paper's segmenter): none. Read at ``initialize``
    feature_dropout: float = 0.0

    extra_log_keys = ("alpha", "beta", "target_new_fraction")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # write-behind: the store's updates run in a background thread, off the training step
        self.store = SoftTargetStore(os.path.join(self.output_folder, STORE_DIR),
                                     self.label_manager.num_segmentation_heads, write_behind=True)
        self._store_restored = False
        self._store_snapshot = None

    # ------------------------------------------------------------------ set-up
    def check_settings(self):
        super().check_settings()
        check_feature_dropout(self, "the segmenter")

    def initialize(self):
        super().initialize()
        install_feature_dropout(self, "the segmenter")  # here: --c initializes before on_train_start

    def prepare_method(self):
        super().prepare_method()
        self.load_label_denoiser()
        if not self._store_restored and self.local_rank == 0:
            self.store.clear()  # a fresh training starts without targets
        if self.is_ddp:
            dist.barrier()

    # ------------------------------------------------------------------ the method
    @torch.no_grad()
    def soft_targets(self, f: torch.Tensor, batch_u: dict, alpha: float) -> torch.Tensor:
        """z_n = alpha (beta a(f_n) + (1 - beta) f_n) + (1 - alpha) z_n^-   (eq. 8) on the patch;
        the store takes the same update in case space (only the new estimate is resampled)."""
        a_f = self.denoise(f) if self.beta > 0 else None
        current = self.spatial_denoise(f, a_f)
        t0 = time.perf_counter()
        where = self.store_location(batch_u)
        z_prev = self.store.read(*where)  # prefetched before the forward pass (unlabeled_loss)
        first_visit = torch.isnan(z_prev).any(1, keepdim=True)
        z = torch.where(first_visit, current, alpha * current + (1 - alpha) * torch.nan_to_num(z_prev))
        self.store.update(*where, current, alpha)
        self.component_times["store"] += time.perf_counter() - t0
        self._new_fraction = float(first_visit[:, 0][batch_u["valid"]].float().mean()) \
            if batch_u["valid"].any() else 0.0
        self.record_target_quality(batch_u, prediction=f, denoised=a_f, target=z)
        return z

    @staticmethod
    def store_location(batch_u: dict) -> tuple:
        """The arguments that place the unlabeled batch in the store: keys, coords, valid, case_shapes."""
        return batch_u["keys"], batch_u["coords"], batch_u["valid"], batch_u["case_shapes"]

    def unlabeled_loss(self, batch_u: dict):
        self.store.prefetch(*self.store_location(batch_u))  # the file reads overlap the forward pass
        outputs = self.network(batch_u["data"])
        f = torch.softmax(full_resolution(outputs).float(), 1)
        alpha = float(self.alpha(self.training_progress()))
        z = self.soft_targets(f.detach(), batch_u, alpha)
        loss = self.soft_target_loss(outputs, z, batch_u["valid"])
        return loss, {"alpha": alpha, "beta": self.beta, "target_new_fraction": self._new_fraction}

    # ------------------------------------------------------------------ state
    def _snapshot_dir(self, checkpoint_name: str) -> str:
        return os.path.join(self.output_folder, f"{STORE_DIR}_{checkpoint_name}")

    def save_checkpoint(self, filename: str) -> None:
        name = os.path.splitext(os.path.basename(filename))[0]
        final = name == "checkpoint_final"
        take = not final and (name != "checkpoint_best" or self.snapshot_store_for_best)
        self.store.wait()  # this rank's queued updates are in the files
        if self.is_ddp:
            dist.barrier()  # no rank writes targets while rank 0 copies them
        self._store_snapshot = None
        if take and self.local_rank == 0 and not self.disable_checkpointing:
            dest = self._snapshot_dir(name)
            self.store.snapshot(temporary_path(dest), epoch=self.current_epoch + 1)  # as the checkpoint's epoch
            self.stage_checkpoint_file(temporary_path(dest), dest)  # renamed together with the checkpoint
            self._store_snapshot = os.path.basename(dest)
        if self.is_ddp:
            dist.barrier()
        super().save_checkpoint(filename)
        if self.is_ddp:
            dist.barrier()  # rank 0 renames the staged snapshot with the checkpoint: no rank reads it before

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "soft_target_snapshot": self._store_snapshot}

    def set_extra_state(self, state: dict):
        super().set_extra_state(state)
        snap = state.get("soft_target_snapshot")
        if snap:
            folder = os.path.join(self.output_folder, snap)
            if not os.path.isdir(folder):
                raise CheckpointError(f"the soft-target snapshot {folder} of this checkpoint is missing, so "
                                      f"{type(self).__name__} cannot resume with the soft targets of that moment.")
            epoch = self.store.snapshot_epoch(folder)
            if epoch is not None and epoch != self.current_epoch:
                raise CheckpointError(f"the soft-target snapshot {folder} belongs to epoch {epoch}, the checkpoint "
                                      f"to epoch {self.current_epoch}: the two are out of step.")
            if self.local_rank == 0:
                self.store.restore(folder)
            self._store_restored = True
        elif self.current_epoch < self.num_epochs:
            warnings.warn("this checkpoint has no soft-target snapshot: training resumes with the soft targets "
                          "as they are on disk")
            self._store_restored = True

    def on_train_end(self):
        super().on_train_end()
        self.store.close()
        if self.local_rank == 0 and not self.keep_soft_targets:
            for name in ("checkpoint_latest", "checkpoint_best"):
                shutil.rmtree(self._snapshot_dir(name), ignore_errors=True)
            shutil.rmtree(self.store.folder, ignore_errors=True)


class nnUNetTrainerTE(nnUNetTrainerSUD):
    """Temporal ensembling: SUD with beta = 0, z_n = alpha f_n + (1 - alpha) z_n^- (no denoiser)."""
    beta = 0.0
    extra_log_keys = ("alpha", "target_new_fraction")


class nnUNetTrainerSUDMeanTeacher(DenoisedTargetsMixin, nnUNetTrainerMeanTeacherBase):
    """SUD's proposed extension (Young et al. §5.1, Fig. 18) in a memory-free form: the soft target
    comes from an EMA teacher's prediction on the same patch, denoised in space, no store:

        f_t = teacher(u_n),   z_n = beta a(f_t) + (1 - beta) f_t,   L = L_sup + lambda D(z_n, f(u_n | Theta))

    The temporal averaging of SUD's per-image targets is done by the teacher's weights instead
    (EMA decay 0.99). lambda ramps 0 -> lambda_max = 4 and beta = 0.2 / lambda_max, as SUD.
    """

    def prepare_method(self):
        super().prepare_method()
        self.load_label_denoiser()

    def unlabeled_loss(self, batch_u: dict):
        outputs = self.network(batch_u["data"])
        with torch.no_grad():
            f_t = torch.softmax(self.teacher_logits(batch_u["data"]).float(), 1)
            a_t = self.denoise(f_t) if self.beta > 0 else None
            z = self.spatial_denoise(f_t, a_t)
            if self.unlabeled_cases_with_labels:  # the student's softmax only when it will be scored
                self.record_target_quality(batch_u, student=torch.softmax(full_resolution(outputs).float(), 1),
                                           teacher=f_t, denoised=a_t, target=z)
        return self.soft_target_loss(outputs, z, batch_u["valid"]), {}
