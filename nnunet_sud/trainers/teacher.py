"""The exponential-moving-average (EMA) teacher of the mean-teacher family, in one place.

Mean teacher (Tarvainen & Valpola, NeurIPS 2017; Adiga Vasudeva et al. 2022, "DAE-MT", §2.1): the teacher has
the student's architecture and weights that follow the student's by an EMA after every optimizer
step,

    theta_t <- a_s theta_t + (1 - a_s) theta_s,      a_s = min(1 - 1 / (s + 1), decay)

with decay 0.99 (DAE-MT, UA-MT). ``a_s`` is the warm-up of the reference implementations
("use the true average until the exponential average is more correct"): with it the teacher is
the plain average of all student iterates as long as that average is younger than the EMA's
memory. ``s`` counts the EMA updates done *before* this one, so the first update (s = 0, a = 0)
copies the student -- UA-MT passes its iteration counter before incrementing it; Tarvainen et
al.'s code passes the incremented step (first a = 0.5). ``ema_warmup = False`` uses a constant
``decay``. Floating-point buffers (BatchNorm running statistics, if any) are averaged like
parameters, other buffers copied. nnU-Net's networks use InstanceNorm without running statistics
and no dropout. UA-MT's reference V-Net has channel dropout (p = 0.5) on the bottleneck and on the
last decoder features, active in the student's and the teacher's passes (both in train mode), and
that dropout is what makes student and teacher see different networks and UA-MT's K teacher
passes differ. ``add_feature_dropout`` puts the same two dropouts into an nnU-Net U-Net as forward
hooks (no module and no state-dict key changes, so model folders stay ordinary and
``nnUNetv2_predict``, in eval mode, is unaffected); ``feature_dropout`` (0.5 for MT, UA-MT and
DAE-MT, 0 for the base) switches it on. The teacher is kept in train mode like the student, as in
the reference code (``ema_teacher_train_mode``), so its dropout is active too.

What lives here (``unwrap_network`` and ``full_resolution`` live in ``nnunet_sud.network_helpers``)
    ``add_feature_dropout(net, p)`` UA-MT's two channel dropouts as hooks of an nnU-Net U-Net
    ``EMATeacher``                  the teacher copy, its update, its state
    ``nnUNetTrainerMeanTeacherBase`` an ``nnUNetTrainerSemiSupervised`` that owns an ``EMATeacher``
                                    of ``self.network``: created in ``initialize`` (so ``--c``
                                    can restore it), synchronised to the student at the start
                                    of a fresh training (after ``-pretrained_weights``), updated
                                    in ``after_optimizer_step``, saved and restored through the
                                    base's extra checkpoint state (weights + EMA step counter).
                                    It also offers the pieces every method uses: the student's
                                    and the teacher's full-resolution logits, UA-MT's clamped
                                    Gaussian input noise, softmax probabilities.

Deep supervision: with nnU-Net's deep supervision on, the student returns a list of logits
(full resolution first). The consistency terms of all methods here use the full-resolution
output only (as the papers, which have no deep supervision); the teacher's own deep supervision
is switched off so it computes only that output. ``full_resolution(output)`` picks it.

Inference: the teacher is not part of ``self.network``; the saved ``network_weights`` (what
``nnUNetv2_predict`` uses) are the student's, as the papers evaluate the student. The teacher
weights are in ``checkpoint_*_extra_state.pth`` beside each checkpoint.
"""
# the trainers, registered in nnunet_sud.trainers
__all__ = ["nnUNetTrainerMeanTeacherBase"]

import copy
from typing import Dict, Tuple

import torch
from torch import nn

from nnunet_sud.errors import UserFacingError
from nnunet_sud.network_helpers import full_resolution, require_exclusive_classes, set_deep_supervision, unwrap_network
from nnunet_sud.schedules import GaussianRampUp
from nnunet_sud.trainers.semi_supervised import nnUNetTrainerSemiSupervised


def channel_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout of whole feature channels (``nn.Dropout2d``/``Dropout3d``) of x (B, C, *S), S 2d or 3d."""
    if not training or p == 0:
        return x
    drop = torch.nn.functional.dropout3d if x.ndim == 5 else torch.nn.functional.dropout2d
    return drop(x, p, training=True)


def add_feature_dropout(module: nn.Module, p: float) -> list:
    """UA-MT's perturbation (Yu et al., "Uncertainty-aware self-ensembling model for semi-supervised
    3D left atrium segmentation", MICCAI 2019, reference V-Net): channel dropout with probability p on
    the encoder's last output (the bottleneck) and on the input of the full-resolution segmentation
    layer, active while the module is in train mode.

    module: an nnU-Net style U-Net (``encoder`` returning its skips, ``decoder.seg_layers``), not
    wrapped (see ``unwrap_network``). Adds a forward hook and a forward pre-hook; the modules,
    parameters and state dict stay as they are. Returns the hook handles (``.remove()`` undoes it).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"feature dropout probability must be in [0, 1), got {p}")
    encoder, decoder = getattr(module, "encoder", None), getattr(module, "decoder", None)
    if encoder is None or not hasattr(decoder, "seg_layers"):
        raise ValueError(f"{type(module).__name__} is not an nnU-Net style U-Net (encoder, decoder.seg_layers)")

    def bottleneck(mod, inputs, skips):
        skips = list(skips)
        skips[-1] = channel_dropout(skips[-1], p, mod.training)
        return skips

    def before_head(mod, inputs):
        return (channel_dropout(inputs[0], p, mod.training), *inputs[1:])

    return [encoder.register_forward_hook(bottleneck), decoder.seg_layers[-1].register_forward_pre_hook(before_head)]


def check_feature_dropout(trainer, where: str) -> None:
    """Raise ``UserFacingError`` unless ``trainer.feature_dropout`` is a probability in [0, 1); ``where``
    names the network(s) it drops channels of."""
    p = trainer.feature_dropout
    if not 0.0 <= float(p) < 1.0:
        raise UserFacingError(f"{type(trainer).__name__}.feature_dropout (the dropout probability of {where}) must "
                              f"be in [0, 1), got {p}")


def install_feature_dropout(trainer, where: str) -> None:
    """``add_feature_dropout`` with ``trainer.feature_dropout`` on the trainer's (unwrapped) network, at
    ``initialize``; a bad probability or a network that is not an nnU-Net U-Net stops with the
    trainer's name and the setting; p = 0 adds nothing. ``where`` goes into the training log line."""
    check_feature_dropout(trainer, where)
    name, p = type(trainer).__name__, trainer.feature_dropout
    if p == 0:
        return
    try:
        add_feature_dropout(unwrap_network(trainer.network), float(p))
    except ValueError as e:
        raise UserFacingError(f"{name}: feature_dropout = {p} needs an nnU-Net style U-Net ({e}). "
                              f"Set feature_dropout = 0 for this network.")
    trainer.print_to_log_file(f"feature dropout p = {p} on the bottleneck and before the output layer, {where}")


class EMATeacher:
    """An EMA copy of a student network (Tarvainen & Valpola 2017).

    Args:
        student: the student (may be wrapped by torch.compile/DDP: the plain module is copied).
        decay: the EMA decay (``alpha`` in the papers), 0.99 in DAE-MT and UA-MT.
        warmup: use ``min(1 - 1 / (step + 1), decay)`` (reference code) instead of ``decay``.
        train_mode: the mode the teacher is kept in (reference code: ``ema_model.train()``).

    ``teacher(x)`` runs the teacher without gradient and returns its full-resolution logits
    (deep supervision is switched off in the copy). ``update(student)`` does one EMA step.
    ``state_dict()``/``load_state_dict()`` hold the weights and the step counter.
    """

    def __init__(self, student: nn.Module, decay: float = 0.99, warmup: bool = True, train_mode: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.module = copy.deepcopy(unwrap_network(student))
        for p in self.module.parameters():
            p.requires_grad_(False)
        set_deep_supervision(self.module, False)
        self.module.train(train_mode)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        #: number of EMA updates done so far
        self.step = 0

    def current_decay(self) -> float:
        """The decay the next ``update`` uses: ``min(1 - 1/(step + 1), decay)`` or ``decay``."""
        return min(1.0 - 1.0 / (self.step + 1), self.decay) if self.warmup else self.decay

    def _pairs(self, student: nn.Module):
        s = unwrap_network(student)
        t_params, s_params = list(self.module.parameters()), list(s.parameters())
        t_bufs, s_bufs = list(self.module.buffers()), list(s.buffers())
        if len(t_params) != len(s_params) or len(t_bufs) != len(s_bufs):
            raise RuntimeError("teacher and student networks differ in structure")
        return t_params, s_params, t_bufs, s_bufs

    @torch.no_grad()
    def update(self, student: nn.Module) -> float:
        """theta_t <- a theta_t + (1 - a) theta_s with a = ``current_decay()``; returns a."""
        a = self.current_decay()
        t_params, s_params, t_bufs, s_bufs = self._pairs(student)
        for t, s in zip(t_params, s_params):
            t.lerp_(s.detach().to(t.dtype), 1.0 - a)  # t + (1 - a)(s - t) = a t + (1 - a) s
        for t, s in zip(t_bufs, s_bufs):
            if t.dtype.is_floating_point:
                t.lerp_(s.to(t.dtype), 1.0 - a)
            else:
                t.copy_(s)
        self.step += 1
        return a

    @torch.no_grad()
    def copy_from(self, student: nn.Module, reset_step: bool = True) -> None:
        """Make the teacher equal to the student (start of training)."""
        t_params, s_params, t_bufs, s_bufs = self._pairs(student)
        for t, s in zip(t_params + t_bufs, s_params + s_bufs):
            t.copy_(s)
        if reset_step:
            self.step = 0

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits (B, C, *patch) at full resolution, no gradient."""
        return full_resolution(self.module(x))

    def state_dict(self) -> dict:
        return {"weights": self.module.state_dict(), "step": self.step, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.step = int(state["step"])


class nnUNetTrainerMeanTeacherBase(nnUNetTrainerSemiSupervised):
    """Semi-supervised trainer with an EMA teacher of ``self.network`` (mean-teacher family).

    Settings (class attributes; a variant changes them in its class body or after ``super().__init__``):
        ema_decay = 0.99                    EMA decay (DAE-MT §3, UA-MT)
        ema_warmup = True                   a_s = min(1 - 1/(s+1), ema_decay) (reference code)
        ema_teacher_train_mode = True       mode of the teacher copy (see module doc)
        teacher_noise_std = 0.1             UA-MT's teacher input noise: clip(N(0, 0.1^2), +-0.2)
        teacher_noise_clip = 0.2
        feature_dropout = 0.0               p of ``add_feature_dropout`` in student and teacher (0: none;
                                            MT, UA-MT and DAE-MT use the reference's 0.5)
        unlabeled_weight = GaussianRampUp(0.1)   lambda_c(t) = 0.1 exp(-5 (1 - t)^2)

    A method subclass implements ``unlabeled_loss(batch_u)`` with the helpers
    ``student_logits``, ``teacher_logits``, ``perturb`` and ``probabilities``; ``self.teacher``
    is the ``EMATeacher``. Subclasses extending the checkpoint state call ``super()`` in
    ``get_extra_state``/``set_extra_state``.
    """

    SETTINGS = ("ema_decay", "ema_warmup", "ema_teacher_train_mode", "teacher_noise_std", "teacher_noise_clip",
                "feature_dropout", "unlabeled_weight")
    ema_decay: float = 0.99
    ema_warmup: bool = True
    ema_teacher_train_mode: bool = True
    teacher_noise_std: float = 0.1
    teacher_noise_clip: float = 0.2
    feature_dropout: float = 0.0
    unlabeled_weight = GaussianRampUp(0.1)

    #: the losses read batch_u['valid'] only: no case coordinates through the augmentation
    unlabeled_coordinates = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.teacher: EMATeacher = None
        self._teacher_restored = False

    # ------------------------------------------------------------------ teacher life cycle
    def check_settings(self):
        super().check_settings()
        name = type(self).__name__
        check_feature_dropout(self, "student and teacher")
        if not 0.0 <= float(self.ema_decay) <= 1.0:
            raise UserFacingError(f"{name}.ema_decay (the teacher's EMA decay) must be in [0, 1], got "
                                  f"{self.ema_decay!r}")
        for setting in ("teacher_noise_std", "teacher_noise_clip"):
            if not float(getattr(self, setting)) >= 0.0:
                raise UserFacingError(f"{name}.{setting} (the teacher's input noise) must be >= 0 (0: no noise), "
                                      f"got {getattr(self, setting)!r}")
        reduction = getattr(self, "consistency_class_reduction", "mean")  # a setting of MT, UA-MT and DAE-MT
        if reduction not in ("mean", "sum"):
            raise UserFacingError(f"{name}.consistency_class_reduction must be 'mean' (over classes, as the "
                                  f"reference code) or 'sum' (||p_s - p_t||^2), got {reduction!r}")

    def initialize(self):
        super().initialize()  # checks the settings first (the base's initialize)
        install_feature_dropout(self, "student and teacher")
        # the teacher is a copy of the student, hooks included
        self.teacher = EMATeacher(self.network, self.ema_decay, self.ema_warmup, self.ema_teacher_train_mode)

    def on_train_start(self):
        super().on_train_start()
        if not self._teacher_restored:
            # a fresh start: the teacher starts as the student (including -pretrained_weights)
            self.teacher.copy_from(self.network)
        self.print_to_log_file(f"EMA teacher: decay {self.ema_decay}, warm-up {self.ema_warmup}, "
                               f"{self.teacher.step} updates so far; consistency weight {self.unlabeled_weight}")

    def after_optimizer_step(self):
        super().after_optimizer_step()
        self.teacher.update(self.network)

    def get_extra_state(self) -> dict:
        state = super().get_extra_state()
        if self.teacher is not None:
            t = self.teacher.state_dict()
            state.update({"teacher_weights": t["weights"], "ema_step": t["step"]})
        else:  # before initialize: announce the keys this trainer needs
            state.update({"teacher_weights": None, "ema_step": None})
        return state

    def set_extra_state(self, state: dict):
        super().set_extra_state(state)
        missing = [k for k in ("teacher_weights", "ema_step") if state.get(k) is None]
        if missing:
            raise UserFacingError(f"the extra checkpoint state of {type(self).__name__} lacks {', '.join(missing)} "
                                  f"(written by another trainer?): the EMA teacher cannot be restored. Start anew "
                                  f"without --c.")
        self.teacher.load_state_dict({"weights": state["teacher_weights"], "step": state["ema_step"]})
        self._teacher_restored = True

    # ------------------------------------------------------------------ pieces of the step
    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher input noise of UA-MT: ``x + clip(N(0, std^2), -clip, clip)`` per voxel and channel.

        x: (B, C_in, *patch) normalised image patch -> same shape.
        """
        noise = torch.randn_like(x) * self.teacher_noise_std
        return x + noise.clamp(-self.teacher_noise_clip, self.teacher_noise_clip)

    def student_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Student (``self.network``, with gradient) full-resolution logits (B, C, *patch)."""
        return full_resolution(self.network(x))

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher full-resolution logits (B, C, *patch), no gradient."""
        return self.teacher(x)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over classes (sigmoid for region-based set-ups), float32, keeps the gradient."""
        logits = logits.float()
        return torch.sigmoid(logits) if self.label_manager.has_regions else torch.softmax(logits, 1)

    def require_exclusive_classes(self):
        """Raise for region-based label set-ups (methods whose uncertainty needs a softmax)."""
        require_exclusive_classes(self.label_manager, type(self).__name__)

    def unlabeled_loss(self, batch_u: dict) -> Tuple[torch.Tensor, Dict[str, float]]:
        raise NotImplementedError(f"{type(self).__name__} must implement unlabeled_loss")
