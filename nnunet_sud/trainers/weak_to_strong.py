"""Weak-to-strong pseudo-labels (FixMatch without a threshold) as an nnU-Net trainer.

    nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerWeakToStrong

Follows Sohn et al., "FixMatch: Simplifying semi-supervised learning with consistency and
confidence", in the form nnFilterMatch (2025, the one public semi-supervised trainer for nnU-Net v2
we know of) gives it for segmentation: hard argmax pseudo-labels of the weak view with no
confidence threshold, a strong view with geometric changes (rot90, flips) besides intensity, CE +
Dice on the labeled and on the pseudo-labeled patches, unlabeled data only from a later epoch on,
and a periodic filter that drops a share of the unlabeled cases by whole-case prediction entropy
(15 % in nnFilterMatch, whose own table credits the filter with +0.05 Dice). Each of these is a
setting, so that each can be measured. Per step, with a labeled batch (x_l, y_l) and an unlabeled
batch x_u of B patches (P = patch size, C classes, C_in input channels):

    L_sup  = nnU-Net's loss (Dice + CE, deep supervision) on (x_l, y_l)
    x_w    = batch_u['data']                      (B, C_in, *P) the weak view: nnU-Net's augmentation
    p_w    = softmax M(x_w)                       (B, C, *P)    no gradient
    y_hat  = argmax_c p_w                         (B, *P)
    x_s    = G(I(x_w))                            (B, C_in, *P) the strong view
    L_u    = CE_v(M(x_s), G(y_hat)) + Dice_v(softmax M(x_s), G(y_hat))     v = G(valid) & kept
    L      = L_sup + w(t) L_u,    w(t) = lambda_u for t >= unlabeled_start, 0 before

* I (intensity) is SegMatch's strong view, made in the unlabeled loader's workers
  (``nnunet_sud.trainers.segmatch``: ``strong_transforms``, ``strong_view_transform``, ``views``):
  RandAugment, ``strong_ops_per_sample`` ops of random magnitude out of brightness, contrast,
  gamma, Gaussian noise, Gaussian blur, sharpening, then Cutout (``strong_cutout``).
* G (geometric, ``strong_geometric``) is exact: per sample a flip of each spatial axis (p = 0.5)
  and k quarter turns (k in 0..3) in one plane of two spatial axes with equal patch sizes (no
  rotation where there is none); its parameters are drawn apart from their application
  (``RightAngleTransform.get_parameters``, then ``apply``) and it runs on the device. It permutes
  voxels and nothing else, so the pseudo-label and the valid mask are moved with it, by the same
  parameters, and meet the strong logits voxel by voxel: no interpolation, no voxel lost.
  (The equivalent alternative, G^-1 on the strong logits, is not used.) Target quality is scored
  in the weak frame, where ``batch_u['seg']`` lives.
* CE_v is the mean cross-entropy over the voxels v; Dice_v is nnU-Net's soft Dice (foreground
  classes, smooth 1e-5, ``batch_dice`` of the plans) restricted to v (``unlabeled_loss_terms =
  "ce"`` leaves it out). Both on the full-resolution output only.
* kept: the case filter (``case_filter_fraction`` > 0). Every ``case_filter_every`` epochs from
  ``unlabeled_start`` on, every preprocessed unlabeled case is predicted whole (nnU-Net's sliding
  window with tiles that do not overlap, no mirroring, the current network) and scored by the mean over its voxels of the
  softmax entropy -sum_c p_c log p_c; the round(fraction N) cases of highest entropy are excluded
  until the next pass. Under DDP each process predicts every world-th case and all processes get
  all scores. The excluded set and its epoch are in the checkpoint's extra state.

Deviations from nnFilterMatch / FixMatch:
  * L_sup and L_u are separate means (labeled and unlabeled batches), not one loss over the
    concatenated batch; the unlabeled batch is B_u patches per step (the base's
    ``unlabeled_batch_size``, by default the labeled batch size: FixMatch's mu = 1).
  * L_u has no deep supervision (nnFilterMatch's pseudo-labeled patches go through nnU-Net's loss
    with it); voxels outside the image (padding, ``valid`` False) are left out.
  * The filter does not remove cases from the loader: their patches are still drawn, and get
    weight 0 (L_u is the loss over the kept patches of the step; a step without any is 0).
  * The weak view is not un-augmented: it is the patch as nnU-Net's training augmentation delivers
    it (crop, mirroring, its rare rotation/scaling, mild intensity changes), as the labeled patches.
  * w(t) switches on at ``unlabeled_start`` (a fraction of all iterations, not an epoch count);
    before it, L_u is still computed (its weight is 0), so the cost per step is the same throughout.

Logged per epoch: ``case_filter_excluded`` (the share of the unlabeled patches the filter weighted
0), and with the filter on a line with the excluded count and fraction of the cases; target
quality of the weak prediction and of the pseudo-label.
Variants: ``_noGeometric`` (I only), ``_ce`` (CE only), ``_startAt0`` (unlabeled_start 0),
``_caseFilter`` (nnFilterMatch's 15 % filter).
"""
# the trainers, registered in nnunet_sud.trainers
__all__ = [
    "nnUNetTrainerWeakToStrong",
    "nnUNetTrainerWeakToStrong_noGeometric",
    "nnUNetTrainerWeakToStrong_ce",
    "nnUNetTrainerWeakToStrong_startAt0",
    "nnUNetTrainerWeakToStrong_caseFilter",
]

import math
import time
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np
import torch
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

from nnunet_sud.errors import UserFacingError
from nnunet_sud.losses.pseudo_labels import gated_cross_entropy
from nnunet_sud.losses.soft_targets import soft_dice_loss
from nnunet_sud.network_helpers import full_resolution, labels_to_one_hot, require_exclusive_classes
from nnunet_sud.schedules import Step
from nnunet_sud.trainers.distributed import gather_concatenated, is_distributed
from nnunet_sud.trainers.segmatch import STRONG_VIEW_KEY, nnUNetTrainerSegMatch
from nnunet_sud.trainers.semi_supervised import nnUNetTrainerSemiSupervised
from nnunet_sud.trainers.settings import DerivedDefault
from nnunet_sud.unlabeled.loader import unlabeled_identifiers


# ---------------------------------------------------------------------- G: flips and quarter turns
@dataclass(frozen=True)
class RightAngleMove:
    """G of one sample: flip the spatial axes ``flips``, then ``k`` quarter turns in the plane of the
    spatial axes ``plane`` (``torch.rot90`` with ``dims=plane``); ``plane`` None: no turn."""
    flips: Tuple[int, ...] = ()
    plane: Optional[Tuple[int, int]] = None
    k: int = 0


class RightAngleTransform:
    """G: per sample, flips and quarter turns of the spatial axes (the last ``len(patch_size)`` axes
    of a tensor), exact and invertible; parameters drawn (``get_parameters``) apart from their
    application (``apply``), as batchgeneratorsv2 does. Quarter turns only in planes of two axes
    with equal patch sizes: the patch keeps its shape."""

    def __init__(self, patch_size: Sequence[int], p_flip: float = 0.5):
        self.patch_size = tuple(int(s) for s in patch_size)
        n = len(self.patch_size)
        self.p_flip = float(p_flip)
        #: the planes a quarter turn may be drawn in
        self.planes = [(a, b) for a in range(n) for b in range(a + 1, n) if self.patch_size[a] == self.patch_size[b]]

    def get_parameters(self, batch_size: int, generator: Optional[torch.Generator] = None) -> List[RightAngleMove]:
        n = len(self.patch_size)
        flips = torch.rand((batch_size, n), generator=generator) < self.p_flip
        planes = torch.randint(max(len(self.planes), 1), (batch_size,), generator=generator)
        turns = torch.randint(4, (batch_size,), generator=generator)
        return [RightAngleMove(tuple(a for a in range(n) if flips[b, a]),
                               self.planes[int(planes[b])] if self.planes else None,
                               int(turns[b]) if self.planes else 0) for b in range(batch_size)]

    def apply(self, x: torch.Tensor, moves: Sequence[RightAngleMove], inverse: bool = False) -> torch.Tensor:
        """G (or G^-1) of ``x`` (B, ..., *patch_size), sample b moved by ``moves[b]``."""
        n = len(self.patch_size)
        if tuple(x.shape[-n:]) != self.patch_size or x.shape[0] != len(moves):
            raise ValueError(f"expected (B={len(moves)}, ..., *{self.patch_size}), got {tuple(x.shape)}")
        lead = x.ndim - 1 - n  # axes of a sample before its spatial axes
        out = []
        for xb, m in zip(x, moves):
            flips = [lead + a for a in m.flips]
            plane = None if m.plane is None else (lead + m.plane[0], lead + m.plane[1])
            turn = plane is not None and m.k % 4 != 0
            if inverse and turn:
                xb = torch.rot90(xb, -m.k, plane)
            if flips:
                xb = torch.flip(xb, flips)
            if not inverse and turn:
                xb = torch.rot90(xb, m.k, plane)
            out.append(xb)
        return torch.stack(out)


# ---------------------------------------------------------------------- L_u and the case filter
def pseudo_label_loss(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, dice: bool = True,
                      batch_dice: bool = False) -> torch.Tensor:
    """CE (+ soft Dice) of ``logits`` (B, C, *P) towards integer ``labels`` (B, *P) over the voxels
    ``valid`` (B, *P) bool: sum_v CE / |v| + 1 - mean_{c >= 1} (2 sum_v p_c y_c + s) / (sum_v p_c +
    sum_v y_c + s), s = 1e-5 (nnU-Net's soft Dice, per sample or over the batch)."""
    loss = gated_cross_entropy(logits, labels, valid.float(), valid)
    if dice:
        probs = torch.softmax(logits.float(), 1)
        one_hot = labels_to_one_hot(labels, logits.shape[1], probs.dtype, has_channel_axis=False)
        loss = loss + soft_dice_loss(probs, one_hot, valid, include_background=False, batch_dice=batch_dice,
                                     form="plain")
    return loss


def mean_entropy(logits: torch.Tensor) -> float:
    """Mean over voxels of the softmax entropy -sum_c p_c log p_c of ``logits`` (C, *S)."""
    log_p = torch.log_softmax(logits.float(), 0)
    return float(-(log_p.exp() * log_p).sum(0).mean())


def highest_entropy_cases(entropies: Dict[str, float], fraction: float) -> FrozenSet[str]:
    """The round(fraction N) of the N cases with the highest entropy (ties: by name)."""
    n = int(round(fraction * len(entropies)))
    ranked = sorted(entropies, key=lambda k: (-entropies[k], k))
    return frozenset(ranked[:n])


# ---------------------------------------------------------------------- the strong view x_s = G(I(x_w))
class StrongViewMixin:
    """The strong view of a semi-supervised trainer (module doc): I, SegMatch's intensity view, made in
    the unlabeled workers (``views`` gives (x_w, I(x_w))), and G, exact flips and quarter turns on the
    device (``geometric_transform``). Also used by ``sud_weak_to_strong``."""

    SETTINGS = ("strong_geometric", "strong_ops_per_sample", "strong_cutout")
    #: G: flips and quarter turns of the strong view (False: intensity-only strong view)
    strong_geometric: bool = True
    #: I: RandAugment ops per sample (of SegMatch's ``strong_transforms()``), then Cutout or not
    strong_ops_per_sample: int = 2
    strong_cutout: bool = True

    # I: SegMatch's strong intensity view, made in the unlabeled workers
    strong_transforms = nnUNetTrainerSegMatch.strong_transforms
    strong_view_transform = nnUNetTrainerSegMatch.strong_view_transform
    views = nnUNetTrainerSegMatch.views

    def check_settings(self):
        super().check_settings()
        name = type(self).__name__
        for setting in ("strong_geometric", "strong_cutout"):
            if not isinstance(getattr(self, setting), bool):
                raise UserFacingError(f"{name}.{setting} must be True or False, got {getattr(self, setting)!r}")
        n_ops = len(self.strong_transforms())
        if not isinstance(self.strong_ops_per_sample, int) or not 0 <= self.strong_ops_per_sample <= n_ops:
            raise UserFacingError(f"{name}.strong_ops_per_sample must be an integer in [0, {n_ops}] (the number of "
                                  f"strong_transforms()), got {self.strong_ops_per_sample!r}")

    def get_unlabeled_transforms(self):
        """nnU-Net's pipeline (the weak view), then I as an extra image key, in the workers."""
        pipeline = ComposeTransforms([super().get_unlabeled_transforms(), self.strong_view_transform()])
        pipeline.extra_image_keys = (STRONG_VIEW_KEY,)
        return pipeline

    def geometric_transform(self) -> Optional[RightAngleTransform]:
        """G, or None without a geometric strong view (read when used)."""
        return RightAngleTransform(self.configuration_manager.patch_size) if self.strong_geometric else None


# ---------------------------------------------------------------------- the trainer
class nnUNetTrainerWeakToStrong(StrongViewMixin, nnUNetTrainerSemiSupervised):
    """Weak-to-strong pseudo-labels (module doc); every knob below is a class attribute (the strong
    view's: ``StrongViewMixin``)."""

    #: "ce_dice" or "ce"
    unlabeled_loss_terms: str = "ce_dice"
    #: w(t) = lambda_u from the training fraction unlabeled_start on, 0 before
    lambda_u: float = 1.0
    unlabeled_start: float = 0.1
    unlabeled_weight = DerivedDefault(lambda t: Step(t.lambda_u, t.unlabeled_start))
    #: the share of unlabeled cases excluded by the entropy filter (0: no filter; nnFilterMatch: 0.15)
    case_filter_fraction: float = 0.0
    #: epochs between filter passes (default: ten passes over the training)
    case_filter_every = DerivedDefault(lambda t: max(1, round(t.num_epochs / 10)))
    #: the filter's sliding-window step as a fraction of the patch (nnU-Net's inference uses 0.5; tiles
    #: that do not overlap are enough to rank cases, and 2-8 times fewer in 3d)
    case_filter_tile_step_size: float = 1.0
    SETTINGS = ("unlabeled_loss_terms", "lambda_u", "unlabeled_start", "unlabeled_weight", "case_filter_fraction",
                "case_filter_every", "case_filter_tile_step_size")
    LOSS_TERMS = ("ce_dice", "ce")

    #: the losses read batch_u['valid'] only: no case coordinates carried
    unlabeled_coordinates = False
    extra_log_keys = ("case_filter_excluded",)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        #: the case filter's state: excluded cases, the epoch of the pass, all cases' entropies
        self.case_filter_excluded: FrozenSet[str] = frozenset()
        self.case_filter_epoch: Optional[int] = None
        self.case_filter_entropies: Dict[str, float] = {}

    def check_settings(self):
        super().check_settings()
        name = type(self).__name__

        def refuse(setting, requirement):
            raise UserFacingError(f"{name}.{setting} must be {requirement}, got {getattr(self, setting)!r}")

        if self.unlabeled_loss_terms not in self.LOSS_TERMS:
            refuse("unlabeled_loss_terms", f"one of {self.LOSS_TERMS}")
        if not _is_number(self.lambda_u) or not self.lambda_u >= 0:
            refuse("lambda_u", "a number >= 0")
        if not _is_number(self.unlabeled_start) or not 0 <= self.unlabeled_start < 1:
            refuse("unlabeled_start", "a fraction of training in [0, 1)")
        if not _is_number(self.case_filter_fraction) or not 0 <= self.case_filter_fraction < 1:
            refuse("case_filter_fraction", "a fraction of the unlabeled cases in [0, 1)")
        every = self.case_filter_every
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            refuse("case_filter_every", "a whole number of epochs >= 1")
        if not _is_number(self.case_filter_tile_step_size) or not 0 < self.case_filter_tile_step_size <= 1:
            refuse("case_filter_tile_step_size", "in (0, 1]")
        require_exclusive_classes(self.label_manager, name)

    # ------------------------------------------------------------------ the step
    def unlabeled_loss(self, batch_u: dict) -> Tuple[torch.Tensor, Dict[str, float]]:
        x_weak, x_strong = self.views(batch_u)                             # x_w, I(x_w): (B, C_in, *P)
        valid = batch_u["valid"]                                           # (B, *P) bool
        with torch.no_grad():
            p_w = torch.softmax(full_resolution(self.network(x_weak)).float(), 1)   # (B, C, *P)
        y_hat = p_w.argmax(1)                                              # (B, *P)
        kept = self.kept_samples(batch_u["keys"])                          # (B,) bool, on the CPU
        # target quality in the weak frame (batch_u['seg']); with the filter, the pseudo-labels kept
        filtered = {"pseudo_label": kept.to(valid.device).view(-1, *[1] * (valid.ndim - 1)).expand_as(valid)} \
            if self.case_filter_fraction > 0 else None
        self.record_target_quality(batch_u, filtered, prediction=p_w, pseudo_label=y_hat)
        g = self.geometric_transform()
        if g is not None:
            moves = g.get_parameters(x_weak.shape[0])
            x_strong, y_hat, valid = g.apply(x_strong, moves), g.apply(y_hat, moves), g.apply(valid, moves)
        logits = full_resolution(self.network(x_strong))                   # M(G(I(x_w))): (B, C, *P)
        logs = {"case_filter_excluded": 1.0 - float(kept.float().mean())}
        if not kept.all():
            if not kept.any():
                return (logits * 0).sum(), logs
            index = kept.nonzero()[:, 0].to(logits.device)
            logits, y_hat, valid = logits[index], y_hat[index], valid[index]
        return pseudo_label_loss(logits, y_hat, valid, dice=self.unlabeled_loss_terms == "ce_dice",
                                 batch_dice=bool(self.configuration_manager.batch_dice)), logs

    # ------------------------------------------------------------------ the case filter
    def kept_samples(self, keys: Sequence[str]) -> torch.Tensor:
        """(B,) bool on the CPU: False for the patches of cases the filter excludes."""
        return torch.tensor([k not in self.case_filter_excluded for k in keys], dtype=torch.bool)

    def case_filter_start_epoch(self) -> int:
        """The first epoch that starts at a training fraction >= unlabeled_start."""
        per_epoch = self.num_iterations_per_epoch
        total = float(self.num_epochs * per_epoch)
        return next((e for e in range(self.num_epochs) if e * per_epoch / total >= self.unlabeled_start),
                    self.num_epochs)

    def case_filter_due(self) -> bool:
        """Whether the filter is computed at the start of the current epoch."""
        if not self.case_filter_fraction > 0:
            return False
        start = self.case_filter_start_epoch()
        return self.current_epoch >= start and (self.current_epoch - start) % int(self.case_filter_every) == 0

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if self.case_filter_due():
            self.update_case_filter()
        if self.case_filter_fraction > 0:
            n = len(self.case_filter_entropies)
            computed = "not computed yet" if self.case_filter_epoch is None else \
                f"computed at epoch {self.case_filter_epoch}"
            self.print_to_log_file(f"case filter: {len(self.case_filter_excluded)} of {n} unlabeled cases excluded "
                                   f"({len(self.case_filter_excluded) / max(n, 1):.3f}), {computed}")

    def update_case_filter(self) -> None:
        """Score every unlabeled case (``case_entropies``) and exclude the highest ``case_filter_fraction``."""
        self.case_filter_entropies = self.case_entropies()
        self.case_filter_excluded = highest_entropy_cases(self.case_filter_entropies, self.case_filter_fraction)
        self.case_filter_epoch = self.current_epoch
        if self.case_filter_excluded:
            threshold = min(self.case_filter_entropies[k] for k in self.case_filter_excluded)
            self.print_to_log_file(f"case filter: excluded the cases of mean entropy >= {threshold:.4f} "
                                   f"(all cases: {min(self.case_filter_entropies.values()):.4f} .. "
                                   f"{max(self.case_filter_entropies.values()):.4f})")

    def case_filter_predictor(self):
        """nnU-Net's sliding-window predictor around the training network: no mirroring, Gaussian
        weighting, on the trainer's device (the compiled network where there is one; not the DDP wrapper)."""
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from torch.nn.parallel import DistributedDataParallel
        predictor = nnUNetPredictor(tile_step_size=self.case_filter_tile_step_size, use_gaussian=True,
                                    use_mirroring=False, perform_everything_on_device=True, device=self.device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.manual_initialization(self.network, self.plans_manager, self.configuration_manager, None,
                                        self.dataset_json, type(self).__name__, None)
        network = self.network
        predictor.network = network.module if isinstance(network, DistributedDataParallel) else network
        return predictor

    @torch.no_grad()
    def case_entropies(self) -> Dict[str, float]:
        """Mean voxel entropy of the current network's whole-case prediction, per preprocessed unlabeled
        case. Under DDP each process predicts every world-th case; every process returns all of them."""
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        from torch import distributed as dist
        folder = self.preprocessed_unlabeled_folder
        keys = unlabeled_identifiers(folder)
        world, rank = (dist.get_world_size(), dist.get_rank()) if is_distributed() else (1, 0)
        mine = keys[rank::world]
        dataset = infer_dataset_class(folder)(folder, mine)
        predictor = self.case_filter_predictor()
        self.print_to_log_file(f"case filter: predicting {len(keys)} unlabeled cases"
                               + (f" ({len(mine)} in this process)" if world > 1 else ""))
        entropies, start, report_every = [], time.time(), max(1, len(mine) // 10)
        self.set_deep_supervision_enabled(False)
        try:
            for i, key in enumerate(mine):
                data = torch.from_numpy(np.asarray(dataset.load_case(key)[0][:], dtype=np.float32))
                entropies.append(mean_entropy(predictor.predict_sliding_window_return_logits(data)))
                if (i + 1) % report_every == 0 or i + 1 == len(mine):
                    self.print_to_log_file(f"case filter: {i + 1}/{len(mine)} cases, {time.time() - start:.1f} s")
        finally:
            self.set_deep_supervision_enabled(self.enable_deep_supervision)
            self.network.train()
        all_keys = gather_concatenated(np.asarray(mine, dtype=object))
        all_entropies = gather_concatenated(np.asarray(entropies, dtype=np.float64))
        return {str(k): float(h) for k, h in zip(all_keys, all_entropies)}

    # ------------------------------------------------------------------ checkpoint extras
    def get_extra_state(self) -> dict:
        state = super().get_extra_state()
        if self.case_filter_fraction > 0:
            state["case_filter"] = {"excluded": sorted(self.case_filter_excluded), "epoch": self.case_filter_epoch,
                                    "entropies": dict(self.case_filter_entropies)}
        return state

    def set_extra_state(self, state: dict):
        super().set_extra_state(state)
        saved = state.get("case_filter")
        if saved is not None:
            self.case_filter_excluded = frozenset(saved["excluded"])
            self.case_filter_epoch = saved["epoch"]
            self.case_filter_entropies = dict(saved["entropies"])


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class nnUNetTrainerWeakToStrong_noGeometric(nnUNetTrainerWeakToStrong):
    """Intensity-only strong view (I without G): SegMatch's consistency with nnU-Net's Dice added."""
    strong_geometric = False


class nnUNetTrainerWeakToStrong_ce(nnUNetTrainerWeakToStrong):
    """L_u = CE only (no soft Dice on the pseudo-labels)."""
    unlabeled_loss_terms = "ce"


class nnUNetTrainerWeakToStrong_startAt0(nnUNetTrainerWeakToStrong):
    """Unlabeled loss from the first step on (unlabeled_start = 0)."""
    unlabeled_start = 0.0


class nnUNetTrainerWeakToStrong_caseFilter(nnUNetTrainerWeakToStrong):
    """nnFilterMatch's filter: the 15 % unlabeled cases of highest prediction entropy get weight 0."""
    case_filter_fraction = 0.15
