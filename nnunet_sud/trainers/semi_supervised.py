"""The shared base of every semi-supervised trainer in nnunet_sud.

``nnUNetTrainerSemiSupervised`` is an ``nnUNetTrainer`` that, for every labeled batch, draws a
batch of unlabeled patches through nnU-Net's planned training augmentation and adds a weighted
unlabeled loss:

    L = L_sup(network(x_l), y_l) + w(t) * L_unl(batch_u)

with ``L_sup`` nnU-Net's own loss (deep supervision included), ``t`` the training progress in
[0, 1] and ``w`` the ``unlabeled_weight`` schedule. A method subclass implements
``unlabeled_loss(batch_u)`` (and, when it has teachers or other state, ``after_optimizer_step``,
``get_extra_state`` and ``set_extra_state``). Everything else lives here, once:

* the unlabeled stream (``nnunet_sud.unlabeled.loader``): same transforms and patch size as the
  labeled stream, random crops, its own worker seeds, and per patch voxel the case voxel it came
  from (``batch_u['coords']``, ``batch_u['valid']``);
* the training progress and the weight ramp;
* logging of the unlabeled loss, weight and any schedule values into nnU-Net's log, its
  logger checkpoint and ``progress.png``;
* the target-quality view (docs/design.md, Target quality): when some unlabeled cases have labels
  (``labelsUnlabeled``, carried by the stream as ``batch_u['seg']``), ``record_target_quality``
  scores what a method learns from (teacher, pseudo-label, stored target, ...) per class and
  logs the epoch's Dice as ``target_dice/<name>``. Those labels never enter a loss;
* extra state in checkpoints: written beside each nnU-Net checkpoint as
  ``<checkpoint>_extra_state.pth``, restored by ``--c``, the one of ``checkpoint_latest`` removed
  with it at the end of training. Both files are written under temporary names and renamed
  together (``nnunet_sud.robust_training``): a killed training keeps its previous checkpoint, and
  an unreadable or mismatched file stops ``--c`` with the file's name and the way forward;
* augmentation workers (labeled and unlabeled streams) that die with the training process;
* clear errors, before anything is built, when the unlabeled data is missing or stale;
* multi-GPU (DDP): each process draws its share of the unlabeled batch, logged values are means
  over all processes' steps, target-quality counts are summed over them
  (``nnunet_sud.trainers.distributed``).

Inference is untouched: model folders of subclasses are ordinary nnU-Net model folders.
"""
# the trainers, registered in nnunet_sud.trainers
__all__ = ["nnUNetTrainerSemiSupervised"]

import numbers
import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import distributed as dist

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context

from nnunet_sud.errors import UserFacingError
from nnunet_sud.network_helpers import unwrap_network
from nnunet_sud.robust_training import (CheckpointError, RobustTrainerMixin, describe_exception, temporary_path,
                                        workers_die_with_parent)
from nnunet_sud.schedules import LinearRamp, Schedule
from nnunet_sud.trainers.distributed import batch_share, gather_concatenated
from nnunet_sud.trainers.epoch_logger import TARGET_DICE_KEY, TARGET_KEPT_KEY, SemiSupervisedLocalLogger
from nnunet_sud.unlabeled.loader import (UnlabeledBatch, UnlabeledDataLoader, cases_with_labels, make_augmenter,
                                          unlabeled_identifiers)
from nnunet_sud.unlabeled.workers import (augmentation_processes, describe_split, seconds_per_batch,
                                          split_augmentation_workers)
from nnunet_sud.unlabeled.preprocess import (INFO_SUFFIX, check_against_raw, configuration_fingerprint,
                                             unlabeled_folder_name)

EXTRA_STATE_SUFFIX = "_extra_state.pth"


def extra_state_file(checkpoint_file: str) -> str:
    return os.path.splitext(checkpoint_file)[0] + EXTRA_STATE_SUFFIX


class nnUNetTrainerSemiSupervised(RobustTrainerMixin, nnUNetTrainer):
    """Base class: labeled nnU-Net training plus an unlabeled stream and a weighted unlabeled loss.

    Subclass hooks:
        unlabeled_loss(batch_u) -> (loss: scalar tensor, logs: dict of floats)   required
        after_optimizer_step()                     e.g. EMA teacher update
        get_extra_state() -> dict / set_extra_state(dict)   state beside the checkpoint
    Class attribute ``extra_log_keys``: names of the floats ``unlabeled_loss`` returns in
    ``logs`` that are averaged per epoch and logged/plotted (e.g. ("alpha", "beta")).
    ``unlabeled_loss`` calls ``record_target_quality(batch_u, name=map, ...)`` with what the
    method learns from; it is a no-op unless some unlabeled cases have labels.
    """

    extra_log_keys: Tuple[str, ...] = ()

    #: the method settings this class declares (``nnunet_sud.trainers.settings.method_settings``)
    SETTINGS = ("unlabeled_batch_size", "unlabeled_weight", "unlabeled_worker_fraction", "worker_split_batches",
                "unlabeled_coordinates")
    #: unlabeled patches per step, over all processes like the plans' batch size (None: the
    #: labeled batch size); under DDP each process draws its share (``unlabeled_batch_size_here``)
    unlabeled_batch_size: Optional[int] = None
    #: w(t), weight of the unlabeled loss as a function of training progress t in [0, 1]
    unlabeled_weight: Schedule = LinearRamp(0.0, 1.0)
    #: share of the augmentation workers for the unlabeled stream; None: measured (``nnunet_sud.unlabeled.workers``)
    unlabeled_worker_fraction: Optional[float] = None
    #: batches of each stream timed (after one untimed) to measure that share
    worker_split_batches: int = 2
    #: carry the case coordinates (``batch_u['coords']``) through the augmentation; a trainer that
    #: reads only ``valid`` sets False (4 fewer channels through the unlabeled stream's transforms)
    unlabeled_coordinates: bool = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.dataloader_unlabeled = None
        self.unlabeled_worker_seeds = None
        self._iteration_in_epoch = 0
        self.logger.local_logger = SemiSupervisedLocalLogger(self._logged_keys())
        #: unlabeled cases with a label in labelsUnlabeled (set when the unlabeled loader is built)
        self.unlabeled_cases_with_labels = []
        self._target_maps: Dict[str, bool] = {}            # name -> has a kept mask, in call order
        self._target_counts: Dict[str, torch.Tensor] = {}  # name -> (3, n_classes) TP, FP, FN
        self._target_kept: Dict[str, torch.Tensor] = {}    # name -> (2,) kept, labelled voxels

    # ------------------------------------------------------------------ paths and checks
    @property
    def preprocessed_unlabeled_folder(self) -> str:
        return os.path.join(self.preprocessed_dataset_folder_base,
                            unlabeled_folder_name(self.configuration_manager.data_identifier))

    def check_unlabeled_data(self):
        """Raise UserFacingError unless preprocessed unlabeled data for these plans is present."""
        folder = self.preprocessed_unlabeled_folder
        dataset = self.plans_manager.dataset_name
        cmd = (f"nnunet-sud preprocess-unlabeled -d {dataset} -c {self.configuration_name} "
               f"-p {self.plans_manager.plans_name}")
        if self.is_cascaded:
            raise UserFacingError(
                f"{type(self).__name__} does not support cascade configurations ('{self.configuration_name}' needs "
                f"previous-stage predictions for every unlabeled image). Use 3d_lowres or 3d_fullres.")
        if not os.path.isdir(folder) or not unlabeled_identifiers(folder):
            raise UserFacingError(
                f"{type(self).__name__} needs preprocessed unlabeled images, but {folder} is missing or empty. "
                f"Put the unlabeled images into nnUNet_raw/{dataset}/imagesUnlabeled and run: {cmd}")
        info_file = folder + INFO_SUFFIX
        note = f"no {info_file}: not checked against imagesUnlabeled"
        if os.path.isfile(info_file):
            import json
            with open(info_file) as f:
                info = json.load(f)
            if info.get("configuration_fingerprint") != configuration_fingerprint(self.plans_manager.plans,
                                                                                 self.configuration_name):
                raise UserFacingError(
                    f"{folder} was preprocessed with other plans than {self.plans_manager.plans_name}/"
                    f"{self.configuration_name} now say (the plans changed since). Re-run: {cmd}")
            problem, note = check_against_raw(folder, info)
            if problem:
                raise UserFacingError(f"{folder} does not match the unlabeled images: {problem.rstrip('.')}. Re-run: {cmd}")
        self.print_to_log_file(f"unlabeled data: {len(unlabeled_identifiers(folder))} cases in {folder}; {note}")

    def plain_network(self) -> torch.nn.Module:
        """``self.network`` without torch.compile/DDP wrappers (shares the parameters)."""
        return unwrap_network(self.network)

    # ------------------------------------------------------------------ training progress
    def training_progress(self) -> float:
        """Fraction t in [0, 1] of all training iterations done before the current step."""
        it = self.current_epoch * self.num_iterations_per_epoch + self._iteration_in_epoch
        return min(it / float(self.num_epochs * self.num_iterations_per_epoch), 1.0)

    # ------------------------------------------------------------------ data
    def check_settings(self):
        """Raise UserFacingError for an invalid setting (naming the trainer, the setting, the value and
        what to do). Runs first in ``on_train_start`` and in ``initialize`` (``--c`` initializes before
        ``on_train_start``), i.e. before anything is built and after every change of a setting, be it
        a class attribute of a variant or an assignment after ``super().__init__()``. Subclasses
        extend it."""
        name = type(self).__name__
        size = self.unlabeled_batch_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1):
            raise UserFacingError(f"{name}.unlabeled_batch_size must be a positive number of patches or None (the "
                                  f"labeled batch size), got {size!r}")
        fraction = self.unlabeled_worker_fraction
        if fraction is not None and not 0.0 <= float(fraction) <= 1.0:
            raise UserFacingError(f"{name}.unlabeled_worker_fraction (the unlabeled stream's share of the "
                                  f"augmentation workers) must be in [0, 1] or None (measured), got {fraction!r}")
        if int(self.worker_split_batches) < 1:
            raise UserFacingError(f"{name}.worker_split_batches (batches timed to split the workers) must be at "
                                  f"least 1, got {self.worker_split_batches!r}")

    def initialize(self):
        if not self.was_initialized:
            self.check_settings()  # --c initializes before on_train_start
        super().initialize()

    def prepare_method(self):
        """Load what the method needs besides the data (e.g. a trained denoiser), before the network
        and the loaders are built, so that a missing piece stops training at once. Subclasses extend it."""

    def on_train_start(self):
        # settings, unlabeled data, the method's own pieces: each checked once, before anything is built
        self.check_settings()
        self.check_unlabeled_data()
        self.prepare_method()
        super().on_train_start()

    def get_dataloaders(self):
        """nnU-Net's labeled loaders and the unlabeled stream, sharing the ``nnUNet_n_proc_DA``
        workers by measured cost (``augmentation_worker_split``)."""
        n_labeled, self.unlabeled_workers = self.augmentation_worker_split(self.augmentation_workers_total())
        with augmentation_processes(n_labeled):  # nnU-Net's own loaders, with the labeled share
            dl_tr, dl_val = super().get_dataloaders()
        with workers_die_with_parent():  # as the labeled streams' workers (RobustTrainerMixin)
            self.dataloader_unlabeled = self.get_unlabeled_dataloader()
        return dl_tr, dl_val

    def augmentation_workers_total(self) -> int:
        """Augmentation workers of both streams together: nnU-Net's count for its labeled stream
        (``get_allowed_n_proc_DA``: ``nnUNet_n_proc_DA``, at most the CPU count)."""
        return get_allowed_n_proc_DA()

    def augmentation_worker_split(self, total: int) -> Tuple[int, int]:
        """(labeled, unlabeled) workers summing to ``total``; from 3 workers on, the share follows
        what a batch of each stream costs, timed here on single-threaded loaders (a few seconds)."""
        costs = None
        if total >= 3 and self.unlabeled_worker_fraction is None:
            with augmentation_processes(0):  # nnU-Net's loaders without workers, only to time them
                dl_tr, _ = super().get_dataloaders()
            unlabeled = self.build_unlabeled_loader()
            costs = seconds_per_batch({"labeled": getattr(dl_tr, "data_loader", dl_tr).generate_train_batch,
                                       "unlabeled": unlabeled.generate_train_batch}, self.worker_split_batches)
        c_l, c_u = (costs["labeled"], costs["unlabeled"]) if costs else (1.0, 1.0)
        split = split_augmentation_workers(total, c_l, c_u, unlabeled_fraction=self.unlabeled_worker_fraction)
        self.print_to_log_file(describe_split(total, split, costs, self.unlabeled_worker_fraction))
        return split

    def get_unlabeled_transforms(self):
        """nnU-Net's training pipeline with this trainer's settings, without deep-supervision
        downsampling of the (meaningless) unlabeled segmentation."""
        rotation_for_DA, do_dummy_2d_data_aug, _, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        # no region conversion: the segmentation key carries [non-zero mask, label] (loader.py) and the
        # labels stay integer labels; no loss reads it
        return self.get_training_transforms(
            self.configuration_manager.patch_size, rotation_for_DA, None, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels, regions=None,
            ignore_label=self.label_manager.ignore_label)

    def unlabeled_batch_size_here(self) -> int:
        """Unlabeled patches this process draws per step: its share of ``unlabeled_batch_size``,
        split over the DDP processes as nnU-Net splits the labeled batch (so that the ratio of
        unlabeled to labeled patches does not depend on the number of GPUs); None: the labeled
        batch of this process."""
        if self.unlabeled_batch_size is None:
            return self.batch_size
        world = dist.get_world_size() if self.is_ddp else 1
        if int(self.unlabeled_batch_size) < world:
            raise UserFacingError(
                f"{type(self).__name__}.unlabeled_batch_size = {self.unlabeled_batch_size} is split over {world} "
                f"GPUs (-num_gpus), which leaves some without unlabeled patches. Set it to at least {world}.")
        return batch_share(int(self.unlabeled_batch_size), world, self.local_rank)

    def build_unlabeled_loader(self) -> UnlabeledDataLoader:
        """The unlabeled stream's batch generator (no workers): random crops of the preprocessed
        unlabeled cases through ``get_unlabeled_transforms``."""
        folder = self.preprocessed_unlabeled_folder
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        dataset = infer_dataset_class(folder)(folder, unlabeled_identifiers(folder))
        self.unlabeled_cases_with_labels = cases_with_labels(folder, dataset.identifiers)
        initial_patch_size = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[2]
        loader = UnlabeledDataLoader(dataset, self.unlabeled_batch_size_here(), initial_patch_size,
                                     self.configuration_manager.patch_size, self.label_manager,
                                     transforms=self.get_unlabeled_transforms())
        loader.carry_coordinates = bool(self.unlabeled_coordinates)
        return loader

    def get_unlabeled_dataloader(self):
        """The unlabeled stream with its share of the workers (``self.unlabeled_workers``, set by
        ``get_dataloaders``; else the split of ``nnUNet_n_proc_DA``), started."""
        loader = self.build_unlabeled_loader()
        self.print_to_log_file(loader.coordinate_path())  # exact or interpolated (and why), once per training
        if self.unlabeled_cases_with_labels:
            self.print_to_log_file(
                f"{len(self.unlabeled_cases_with_labels)} of {len(loader.indices)} "
                f"unlabeled cases have a label (labelsUnlabeled): target quality is logged as {TARGET_DICE_KEY}<name>; "
                f"these labels never enter a loss")
        n_proc = getattr(self, "unlabeled_workers", None)
        if n_proc is None:
            n_proc = self.augmentation_worker_split(self.augmentation_workers_total())[1]
        base = int(np.random.randint(0, 2 ** 31 - 10_000)) + 1000 * self.local_rank
        self.unlabeled_worker_seeds = [base + i for i in range(max(n_proc, 1))]
        augmenter = make_augmenter(loader, n_proc, self.unlabeled_worker_seeds[:n_proc],
                                   pin_memory=self.device.type == "cuda")
        _ = next(augmenter)  # start the workers now, not inside the first training step
        return augmenter

    def on_train_end(self):
        super().on_train_end()  # saves checkpoint_final, removes checkpoint_latest.pth, stops loaders
        latest = extra_state_file(os.path.join(self.output_folder, "checkpoint_latest.pth"))
        if self.local_rank == 0 and os.path.isfile(latest):
            os.remove(latest)
        if self.dataloader_unlabeled is not None and hasattr(self.dataloader_unlabeled, "_finish"):
            self.dataloader_unlabeled._finish()

    # ------------------------------------------------------------------ the step
    def on_train_epoch_start(self):
        self._iteration_in_epoch = 0
        super().on_train_epoch_start()

    def unlabeled_loss(self, batch_u: dict) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Loss on one unlabeled batch (tensors already on ``self.device``), inside autocast.

        batch_u: data (B, C, *patch), coords (B, 3, *patch), valid (B, *patch) bool, keys, case_shapes.
        Returns (scalar loss, {name: float} for logging; names listed in ``extra_log_keys`` are logged).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement unlabeled_loss")

    def after_optimizer_step(self):
        """Called after every optimizer step (EMA teachers, target stores, ...)."""

    def _unlabeled_batch_to_device(self, batch_u: dict) -> dict:
        out = UnlabeledBatch(batch_u, owner=type(self).__name__)
        for k in ("data", "coords", "valid", "seg"):
            if k in batch_u:
                out[k] = batch_u[k].to(self.device, non_blocking=True)
        return out

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [i.to(self.device, non_blocking=True) for i in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        batch_u = self._unlabeled_batch_to_device(next(self.dataloader_unlabeled))
        weight = float(self.unlabeled_weight(self.training_progress()))

        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(data)
            l_sup = self.loss(output, target)
            l_unl, logs = self.unlabeled_loss(batch_u)
            loss = l_sup + weight * l_unl

        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        self.after_optimizer_step()
        self._iteration_in_epoch += 1
        out = {"loss": l_sup.detach().cpu().numpy(), "unlabeled_loss": float(l_unl.detach()),
               "unlabeled_weight": weight}
        out.update({k: float(logs[k]) for k in self.extra_log_keys})
        return out

    # ------------------------------------------------------------------ target quality (docs/design.md, Target quality)
    def target_classes(self) -> list:
        """Scored classes: foreground labels, or foreground regions (each a label or a tuple of labels)."""
        lm = self.label_manager
        return list(lm.foreground_regions) if lm.has_regions else list(lm.foreground_labels)

    @torch.no_grad()
    def record_target_quality(self, batch_u: dict, kept: Optional[dict] = None, **maps: torch.Tensor) -> None:
        """Score what the method learns from against the labels some unlabeled cases have.

        Never part of a loss: no gradient, nothing returned; a no-op unless the batch has labelled
        voxels (cases in labelsUnlabeled, see ``nnunet_sud.unlabeled.loader``).

        Args:
            batch_u: the unlabeled batch: ``seg`` (B, *P) labels (``UNKNOWN_LABEL`` where unknown),
                ``valid`` (B, *P) bool, ``has_label`` (B,) bool.
            kept: optional {map name: (B, *P) mask (bool, or nonzero = kept)} of the voxels the method
                learns from (pseudo-label gates, uncertainty masks). That map is scored on kept voxels
                only, and the fraction kept (of the valid labelled voxels) is logged as
                ``target_kept/<name>``.
            maps: name=(B, C, *P) class probabilities or logits at the patch resolution (argmax over C;
                region-based datasets: (B, R, *P) sigmoid probabilities, region r predicted where > 0.5),
                or name=(B, *P) integer label maps. ``None`` values are skipped.

        Accumulates per foreground class (region) TP, FP, FN over valid voxels with a known label; at
        epoch end ``target_dice/<name>`` = per class 2 TP / (2 TP + FP + FN) (NaN: class absent from
        labels and map) goes to nnU-Net's logger, log file and ``progress.png``. DDP: counts are summed
        over ranks.
        """
        if not self.unlabeled_cases_with_labels:
            return
        for name in maps:
            if maps[name] is not None and name not in self._target_maps:
                self._target_maps[name] = kept is not None and name in kept
        has_label = batch_u.get("has_label")  # (B,) on the CPU: no device synchronisation
        if "seg" not in batch_u or (has_label is not None and not bool(torch.as_tensor(has_label).any())):
            return
        seg = batch_u["seg"]
        known = (seg >= 0) & batch_u["valid"].to(seg.device)
        lm = self.label_manager
        classes = self.target_classes()
        if not lm.has_regions:
            known &= seg < lm.num_segmentation_heads
        for name, m in maps.items():
            if m is None:
                continue
            voxels = known
            if kept is not None and name in kept:
                voxels = known & (kept[name] != 0).to(known.device)
                k = self._target_kept.setdefault(name, torch.zeros(2, dtype=torch.int64, device=seg.device))
                k += torch.stack([voxels.sum(), known.sum()])
            counts = self._target_counts.setdefault(
                name, torch.zeros((3, len(classes)), dtype=torch.int64, device=seg.device))
            counts += self._confusion_counts(m.detach(), seg, voxels, classes)

    def _confusion_counts(self, m: torch.Tensor, seg: torch.Tensor, voxels: torch.Tensor, classes: list):
        """(3, n_classes) TP, FP, FN of map ``m`` against ``seg`` on ``voxels`` (all (B, *P) but m)."""
        truth = seg[voxels].long()
        lm = self.label_manager
        if lm.has_regions:
            out = []
            for r, region in enumerate(classes):
                region = torch.as_tensor(region, device=truth.device).reshape(-1)
                t = torch.isin(truth, region)
                p = (m[:, r] > 0.5)[voxels] if m.ndim == seg.ndim + 1 else torch.isin(m[voxels].long(), region)
                out.append(torch.stack([(p & t).sum(), (p & ~t).sum(), (~p & t).sum()]))
            return torch.stack(out, 1)
        n = lm.num_segmentation_heads
        pred = (m.argmax(1) if m.ndim == seg.ndim + 1 else m)[voxels].long().clamp(0, n - 1)
        conf = torch.bincount(pred * n + truth, minlength=n * n).view(n, n)  # [predicted, true]
        tp = conf.diagonal()
        counts = torch.stack([tp, conf.sum(1) - tp, conf.sum(0) - tp])
        return counts[:, torch.as_tensor(classes, device=counts.device)]

    def _log_target_quality(self):
        """Log and print the epoch's target Dice per map (and fraction kept), then reset the counts."""
        local = self.logger.local_logger
        n_classes = len(self.target_classes())
        logged = set()
        for name, has_kept in self._target_maps.items():
            counts = self._target_counts.get(name)
            counts = counts.clone() if counts is not None else torch.zeros((3, n_classes), dtype=torch.int64,
                                                                           device=self.device)
            kept = self._target_kept.get(name)
            kept = kept.clone() if kept is not None else torch.zeros(2, dtype=torch.int64, device=self.device)
            if self.is_ddp:
                dist.all_reduce(counts)
                dist.all_reduce(kept)
            tp, fp, fn = counts.double().cpu()
            denom = 2 * tp + fp + fn
            dice = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.full_like(tp, float("nan"))).tolist()
            key = TARGET_DICE_KEY + name
            local.register(key, self.current_epoch)
            self.logger.log(key, dice, self.current_epoch)
            logged.add(key)
            line = f"Target dice {name} {[round(d, 4) for d in dice]}"
            if has_kept:
                k, total = kept.double().cpu().tolist()
                fraction = k / total if total > 0 else float("nan")
                key = TARGET_KEPT_KEY + name
                local.register(key, self.current_epoch)
                self.logger.log(key, fraction, self.current_epoch)
                logged.add(key)
                line += f" (kept {round(fraction, 4)} of labelled voxels)"
            self.print_to_log_file(line)
        # keys of an earlier run (--c) that this run does not record: one NaN per epoch keeps the lists aligned
        for key in local.target_keys():
            if key not in logged:
                self.logger.log(key, float("nan"), self.current_epoch)
        self._target_counts.clear()
        self._target_kept.clear()

    # ------------------------------------------------------------------ logging
    def _logged_keys(self):
        return ("unlabeled_loss", "unlabeled_weight", *self.extra_log_keys)

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)  # nnU-Net logs 'loss' (the supervised loss) as train_losses
        outputs = collate_outputs(train_outputs)
        for k in self._logged_keys():
            values = gather_concatenated(np.asarray(outputs[k], dtype=np.float64))  # DDP: all processes' steps
            value = float(np.mean(values))
            self.logger.log(k, value, self.current_epoch)
            self.print_to_log_file(f"{k} {np.round(value, decimals=4)}")
        self._log_target_quality()

    # ------------------------------------------------------------------ checkpoint extras
    def get_extra_state(self) -> dict:
        """State beyond nnU-Net's checkpoint (teachers, stores, discriminators, schedule state).
        Subclasses extend the dict of ``super().get_extra_state()``."""
        return {}

    def set_extra_state(self, state: dict):
        """Restore what ``get_extra_state`` returned."""

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank == 0 and not self.disable_checkpointing:
            state = self.get_extra_state()
            if state:
                state["current_epoch"] = self.current_epoch + 1  # as nnU-Net stores it in the checkpoint
                target = extra_state_file(filename)
                torch.save(state, temporary_path(target))
                self.stage_checkpoint_file(temporary_path(target), target)  # renamed with the checkpoint
        super().save_checkpoint(filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's checkpoint (checked readable first), then the extra state beside it. Any problem
        raises a ``CheckpointError`` naming the file and the way forward; ``set_extra_state`` of a
        subclass raises ``CheckpointError(problem)`` for its own side files and gets the advice appended."""
        super().load_checkpoint(filename_or_checkpoint)
        if not isinstance(filename_or_checkpoint, str):
            return
        checkpoint = filename_or_checkpoint
        expected = self.get_extra_state()
        side = extra_state_file(checkpoint)
        if not os.path.isfile(side):
            if expected:
                raise self.unusable_checkpoint(
                    checkpoint, f"{checkpoint} has no {os.path.basename(side)} beside it: the state of "
                                f"{type(self).__name__} beyond the network ({', '.join(sorted(expected))}) is "
                                f"missing, so training cannot resume exactly. Copy that file along with the "
                                f"checkpoint if you have it.")
            return
        try:
            state = torch.load(side, map_location=self.device, weights_only=False)
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file, whatever torch raises for it
            raise self.unusable_checkpoint(
                checkpoint, f"{side} cannot be read ({describe_exception(e)}); it was probably cut short by a "
                            f"killed process or a full disk.") from None
        if state.get("current_epoch") != self.current_epoch:
            raise self.unusable_checkpoint(
                checkpoint, f"{side} belongs to epoch {state.get('current_epoch')} but {checkpoint} to epoch "
                            f"{self.current_epoch}: the two files are out of step.")
        try:
            self.set_extra_state(state)
        except CheckpointError as e:
            raise self.unusable_checkpoint(checkpoint, str(e)) from None
