"""``nnUNetTrainerLabelDenoiser``: trains the label-map denoiser ``a(.)`` of SUD §3.4.

    nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerLabelDenoiser [-p PLANS]

What differs from ``nnUNetTrainer`` (everything else -- data loading, nnU-Net's spatial
augmentation, Dice+CE loss with deep supervision, poly LR, checkpoints -- is nnU-Net's):

* Network: ``build_network_architecture`` returns the skip-free auto-encoder built from the
  configuration's plans (``network.py``); input and output channels = number of classes.
  Before it is built, ``initialize`` keeps the first ``denoiser_num_stages`` (3) planned stages
  and scales their features by ``denoiser_features_scale`` (0.25), and writes that architecture
  into the trainer's copy of the plans (saved with the model, so the predictor and
  ``load_denoiser`` rebuild the same network).
  Region-based label set-ups are refused (``UserFacingError``). Cascade configurations are
  trained on their own label maps without the previous stage.
* Schedule: Adam (``initial_lr`` 2e-3, poly decay), batch ``denoiser_batch_size`` (8), 20 x 100
  steps; ``denoiser_optimizer = 'sgd'`` gives nnU-Net's SGD. Chosen on ACDC_lite / LA_lite label
  maps so that the denoiser stays near the identity on clean maps and improves noisy ones within
  about 20 CPU minutes (docs/denoiser.md, "Choosing the defaults").
* Data: the images are never read. The loader gets the label maps of the training split
  (plus ``labelsDenoiser/`` maps preprocessed with ``nnunet-sud preprocess-denoiser-labels``,
  when present) with a zero dummy image; nnU-Net's spatial transforms (rotation, scaling,
  mirroring, dummy-2d) are kept, its intensity transforms dropped (they only touch images).
* Step: the network input is the corrupted one-hot of the augmented label patch
  (``LabelMapCorruption``: log -> clip [-3, 0] -> + coarse Gaussian noise -> softmax, sigma and s
  in ``corruption_sigma`` / ``corruption_scale``, paper [0, 8]; s uniform, sigma
  ``corruption_sigma_distribution`` 'squared': more nearly clean maps); the target is the
  clean patch. The corruption runs in the main process on the training device (torch's
  RNG is not reseeded in nnU-Net's augmentation workers, so it must not run there).
* Validation: nnU-Net's pseudo Dice is logged as usual (on randomly corrupted patches). In
  addition, every ``denoiser_eval_every`` epochs the whole maps of (up to
  ``denoiser_eval_max_cases``) validation cases are corrupted at the fixed
  ``denoiser_eval_settings`` (sigma, s) and Dice/HD95 of noisy vs denoised maps go to the
  training log (SUD Fig. 7). ``perform_actual_validation`` (run after training and by
  ``--val``) does this on all validation cases and writes ``denoiser_validation.json`` to the
  fold folder (final table + the per-epoch history), instead of predicting images.

Checkpoints are written atomically and augmentation workers die with the training, as for the
semi-supervised trainers (``nnunet_sud.robust_training``).

The trained model folder is an ordinary nnU-Net folder; each checkpoint also carries a
``label_denoiser`` entry (``loading.DENOISER_MARK``) by which ``nnunet_sud.denoiser.loading.load_denoiser``
recognises it when it loads it for the trainers that use a denoiser (``trainers/denoiser_mixin.py``).
"""
# the trainer, registered in nnunet_sud.trainers
__all__ = ["nnUNetTrainerLabelDenoiser"]

import copy
from typing import List, Optional

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join, save_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_sud.denoiser.corruption import LabelMapCorruption
from nnunet_sud.denoiser.data import (DENOISER_LABELS_RAW_FOLDER, LabelMapDataset, dataset_id_of,
                                      denoiser_labels_folder, open_denoiser_labels, raw_denoiser_label_files)
from nnunet_sud.denoiser.evaluation import (DEFAULT_EVAL_SETTINGS, DenoiserEvaluator, evaluate_preprocessed_cases,
                                            format_results)
from nnunet_sud.denoiser.loading import DENOISER_MARK, denoiser_mark
from nnunet_sud.denoiser.network import build_label_denoiser
from nnunet_sud.errors import UserFacingError
from nnunet_sud.network_helpers import full_resolution, labels_to_one_hot, require_exclusive_classes, unwrap_network
from nnunet_sud.robust_training import RobustTrainerMixin

VALIDATION_JSON = "denoiser_validation.json"
_HISTORY_KEY = "denoiser_eval"

# defaults (chosen on ACDC_lite / LA_lite label maps, docs/denoiser.md "Choosing the defaults")
DEFAULT_FEATURES_SCALE = 0.25
DEFAULT_NUM_STAGES = 3
MIN_FEATURES = 4
DEFAULT_BATCH_SIZE = 8
DEFAULT_EPOCHS = 20
DEFAULT_ITERATIONS_PER_EPOCH = 100
DEFAULT_CORRUPTION_SIGMA = (0.0, 8.0)
DEFAULT_CORRUPTION_SCALE = (0.0, 8.0)
DEFAULT_SIGMA_DISTRIBUTION = "squared"
DEFAULT_EVAL_EVERY = 5


def narrow_architecture(arch: dict, features_scale: float = DEFAULT_FEATURES_SCALE,
                        num_stages=DEFAULT_NUM_STAGES) -> dict:
    """In place: a configuration's ``architecture`` dict cut to the first ``num_stages`` planned stages
    (None: all), ``features_per_stage`` x ``features_scale`` (at least ``MIN_FEATURES``), marked as
    adapted (``denoiser_features_scale`` / ``denoiser_num_stages``; marked dicts are left alone).
    Kernels, strides, norm and nonlinearity stay the planned ones. Returns ``arch``."""
    scale = float(features_scale)
    if scale <= 0:
        raise ValueError(f"denoiser_features_scale must be > 0, got {scale}")
    kw = arch["arch_kwargs"]
    if "denoiser_features_scale" in arch:  # plans written by a denoiser trainer are adapted already
        return arch
    planned = len(kw["features_per_stage"])
    n = planned if num_stages is None else int(num_stages)
    if not 2 <= n <= planned:
        raise ValueError(f"denoiser_num_stages must be in [2, {planned}] (the planned stages) or None, got {num_stages}")
    for k in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage"):
        if isinstance(kw.get(k), (list, tuple)):
            kw[k] = list(kw[k])[:n]
    if isinstance(kw.get("n_conv_per_stage_decoder"), (list, tuple)):
        kw["n_conv_per_stage_decoder"] = list(kw["n_conv_per_stage_decoder"])[:n - 1]
    if "n_stages" in kw:
        kw["n_stages"] = n
    kw["features_per_stage"] = [max(MIN_FEATURES, int(round(f * scale))) for f in kw["features_per_stage"]]
    arch["denoiser_features_scale"] = scale
    arch["denoiser_num_stages"] = n
    return arch


def _image_only(t) -> bool:
    """True for transforms that only change the image (nnU-Net's intensity augmentation, masking)."""
    from batchgeneratorsv2.transforms.base.basic_transform import ImageOnlyTransform
    from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
    from batchgeneratorsv2.transforms.utils.random import RandomTransform
    inner = t.transform if isinstance(t, RandomTransform) else t
    return isinstance(inner, (ImageOnlyTransform, MaskImageTransform))


def _drop_image_only(compose):
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    if isinstance(compose, ComposeTransforms):
        return ComposeTransforms([t for t in compose.transforms if not _image_only(t)])
    return compose


class nnUNetTrainerLabelDenoiser(RobustTrainerMixin, nnUNetTrainer):
    """Label-map denoiser of SUD §3.4 (skip-free auto-encoder on corrupted one-hot labels).

    Settings are the class attributes listed in ``SETTINGS``; nnU-Net's own schedule attributes
    (``initial_lr``, ``num_epochs``, ...) get the denoiser's values in ``__init__``, as in nnU-Net."""

    SETTINGS = ("denoiser_features_scale", "denoiser_num_stages", "denoiser_optimizer", "denoiser_batch_size",
                "corruption_sigma", "corruption_scale", "corruption_sigma_distribution", "corruption_interpolation",
                "use_denoiser_labels", "denoiser_eval_settings", "denoiser_eval_every", "denoiser_eval_max_cases",
                "denoiser_eval_seed")
    #: network: the configuration's planned encoder/decoder stages, features_per_stage scaled by this
    #: factor (label maps are piecewise constant: a quarter of a segmenter's width suffices, see
    #: docs/denoiser.md); 1.0 = the segmenter's widths
    denoiser_features_scale: float = DEFAULT_FEATURES_SCALE
    #: and cut to the first N planned stages (None: all); fewer stages = a larger bottleneck, see docs
    denoiser_num_stages: Optional[int] = DEFAULT_NUM_STAGES
    #: optimisation: Adam (lr 2e-3, poly decay) on its own batch size; 'sgd' = nnU-Net's SGD (lr initial_lr)
    denoiser_optimizer: str = "adam"
    #: None: the plans' batch size
    denoiser_batch_size: Optional[int] = DEFAULT_BATCH_SIZE
    #: corruption (SUD §3.4: sigma, s in [0, 8]); a number fixes the value, a pair is sampled per sample
    corruption_sigma = DEFAULT_CORRUPTION_SIGMA
    corruption_scale = DEFAULT_CORRUPTION_SCALE
    corruption_sigma_distribution: str = DEFAULT_SIGMA_DISTRIBUTION
    corruption_interpolation: str = "linear"
    #: extra label maps without images (labelsDenoiser/, preprocessed); False: training split only
    use_denoiser_labels: bool = True
    #: noisy-vs-denoised validation at fixed (sigma, s)
    denoiser_eval_settings = DEFAULT_EVAL_SETTINGS
    #: epochs; 0 disables the per-epoch evaluation
    denoiser_eval_every: int = DEFAULT_EVAL_EVERY
    #: per-epoch subset of the validation cases (final: all)
    denoiser_eval_max_cases: Optional[int] = 4
    denoiser_eval_seed: int = 12345

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        # own copy: initialize() writes the denoiser's (narrower) architecture into the plans it saves
        plans = copy.deepcopy(plans)
        super().__init__(plans, configuration, fold, dataset_json, device)
        require_exclusive_classes(self.label_manager, type(self).__name__,
                                  "Train the denoiser on a dataset.json with plain integer labels.")
        # the denoiser reads label maps only: no previous-stage segmentation even for cascade configs
        self.is_cascaded = False
        self.folder_with_segs_from_previous_stage = None
        # nnU-Net's schedule attributes, the denoiser's values (Adam's lr; 20 x 100 steps)
        self.initial_lr = 2e-3
        self.num_epochs = DEFAULT_EPOCHS
        self.num_iterations_per_epoch = DEFAULT_ITERATIONS_PER_EPOCH
        self.num_val_iterations_per_epoch = 5
        self._corruption = None
        self._evaluator = None

    def check_settings(self):
        """Raise UserFacingError for an invalid setting (naming it, its value and what to do). Runs
        first in ``initialize``, which nnU-Net's ``on_train_start`` and ``--c`` begin with, so a
        setting changed after ``super().__init__()`` is checked too."""
        name = type(self).__name__
        if self.denoiser_optimizer not in ("adam", "sgd"):
            raise UserFacingError(f"{name}.denoiser_optimizer must be 'adam' or 'sgd' (nnU-Net's), got "
                                  f"{self.denoiser_optimizer!r}")
        try:  # the messages begin with the setting's name
            narrow_architecture(copy.deepcopy(self.configuration_manager.configuration["architecture"]),
                                self.denoiser_features_scale, self.denoiser_num_stages)
        except ValueError as e:
            raise UserFacingError(f"{name}.{e}") from None
        try:  # the messages begin with the name of the argument, the setting's without 'corruption_'
            LabelMapCorruption(self.corruption_sigma, self.corruption_scale, self.corruption_interpolation,
                               sigma_distribution=self.corruption_sigma_distribution)
        except ValueError as e:
            raise UserFacingError(f"{name}.corruption_{e}") from None

    # ------------------------------------------------------------------ network
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        """The skip-free auto-encoder; ``num_input_channels`` (image channels) is ignored: input = classes."""
        return build_label_denoiser(plans_manager, configuration_manager, num_output_channels,
                                    deep_supervision=enable_deep_supervision)

    def _apply_denoiser_architecture(self):
        """The denoiser's network: the first ``denoiser_num_stages`` planned stages, features scaled.

        ``features_per_stage`` is multiplied by ``denoiser_features_scale`` (at least ``MIN_FEATURES``)
        and the per-stage lists (features, kernels, strides, convolutions per stage) are cut to the
        first ``denoiser_num_stages`` stages (``None``: all). Written into the configuration manager
        (what ``build_network_architecture`` and nnU-Net's deep-supervision scales read) and into this
        trainer's own copy of the plans, so the model folder's plans.json and the checkpoint's
        ``init_args`` describe the network that was trained (nnU-Net's predictor and
        ``load_denoiser`` rebuild it from there). Kernels, strides, norm and nonlinearity stay the
        planned ones.
        """
        arch = self.configuration_manager.configuration["architecture"]
        narrow_architecture(arch, self.denoiser_features_scale, self.denoiser_num_stages)
        self.plans_manager.plans["configurations"][self.configuration_name]["architecture"] = copy.deepcopy(arch)

    def complete_checkpoint_file(self, path: str) -> None:
        """Every checkpoint says that it holds a label denoiser (``loading.DENOISER_MARK``), so that
        ``load_denoiser`` recognises it without looking up the trainer class by name."""
        super().complete_checkpoint_file(path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        checkpoint[DENOISER_MARK] = denoiser_mark(self.label_manager.num_segmentation_heads)
        torch.save(checkpoint, path)

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        if self.denoiser_batch_size and not self.is_ddp:
            self.batch_size = int(self.denoiser_batch_size)

    def configure_optimizers(self):
        if self.denoiser_optimizer == "sgd":
            return super().configure_optimizers()
        if self.denoiser_optimizer != "adam":
            raise ValueError(f"denoiser_optimizer must be 'adam' or 'sgd', got {self.denoiser_optimizer!r}")
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
        optimizer = torch.optim.Adam(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def initialize(self):
        if not self.was_initialized:
            self.check_settings()
            self._apply_denoiser_architecture()
        super().initialize()
        self.num_input_channels = self.label_manager.num_segmentation_heads
        hist = self._local_logging()
        if hist is not None:
            hist.setdefault(_HISTORY_KEY, [])

    @property
    def corruption(self) -> LabelMapCorruption:
        if self._corruption is None:
            self._corruption = LabelMapCorruption(self.corruption_sigma, self.corruption_scale,
                                                  self.corruption_interpolation,
                                                  sigma_distribution=self.corruption_sigma_distribution)
        return self._corruption

    # ------------------------------------------------------------------ data
    @staticmethod
    def get_training_transforms(*args, **kwargs):
        """nnU-Net's training transforms without the image-only (intensity) ones."""
        return _drop_image_only(nnUNetTrainer.get_training_transforms(*args, **kwargs))

    def _denoiser_labels_dataset(self):
        if not self.use_denoiser_labels:
            return None
        folder = denoiser_labels_folder(self.preprocessed_dataset_folder_base, self.configuration_manager.data_identifier)
        extra = open_denoiser_labels(self.dataset_class, folder)
        n_pre = 0 if extra is None else len(extra.identifiers)
        from nnunetv2.paths import nnUNet_raw
        if nnUNet_raw:
            raw = raw_denoiser_label_files(join(nnUNet_raw, self.plans_manager.dataset_name),
                                           self.dataset_json["file_ending"])
            if len(raw) > n_pre:
                raise UserFacingError(
                    f"{join(nnUNet_raw, self.plans_manager.dataset_name, DENOISER_LABELS_RAW_FOLDER)} holds {len(raw)} "
                    f"label maps but only {n_pre} are preprocessed in {folder}. Run: nnunet-sud "
                    f"preprocess-denoiser-labels -d {dataset_id_of(self.plans_manager.dataset_name)} "
                    f"-c {self.configuration_name} -p {self.plans_manager.plans_name}")
        if extra is not None:
            self.print_to_log_file(f"Denoiser: {n_pre} extra label maps from {folder}")
        return extra

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        return LabelMapDataset([dataset_tr, self._denoiser_labels_dataset()]), LabelMapDataset([dataset_val])

    # ------------------------------------------------------------------ steps
    def _with_denoiser_input(self, batch: dict) -> dict:
        """Replace the batch's images by corrupted one-hot maps of its (full-resolution) target.

        batch['target']: (B, 1, *patch) labels, or the deep-supervision list of them.
        Returns a new batch whose 'data' is (B, C, *patch) corrupted probabilities on the device.
        """
        seg = full_resolution(batch["target"]).to(self.device, non_blocking=True)
        onehot = labels_to_one_hot(seg, self.label_manager.num_segmentation_heads, has_channel_axis=True)
        batch = dict(batch)
        batch["data"] = self.corruption(onehot)
        return batch

    def train_step(self, batch: dict) -> dict:
        return super().train_step(self._with_denoiser_input(batch))

    def validation_step(self, batch: dict) -> dict:
        return super().validation_step(self._with_denoiser_input(batch))

    # ------------------------------------------------------------------ noisy vs denoised evaluation
    def _local_logging(self):
        lg = getattr(self.logger, "local_logger", self.logger)
        return getattr(lg, "my_fantastic_logging", None)

    def _get_evaluator(self) -> DenoiserEvaluator:
        if self._evaluator is None:
            self._evaluator = DenoiserEvaluator(unwrap_network(self.network), self.plans_manager,
                                                self.configuration_manager,
                                                self.dataset_json, self.device, self.denoiser_eval_settings,
                                                self.denoiser_eval_seed)
        return self._evaluator

    def _val_label_dataset(self, keys):
        if self.dataset_class is None:
            from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        return LabelMapDataset([self.dataset_class(self.preprocessed_dataset_folder, list(keys))])

    def evaluate_denoiser(self, max_cases=None) -> dict:
        """Noisy-vs-denoised Dice/HD95 on the validation label maps at ``denoiser_eval_settings``."""
        net = unwrap_network(self.network)
        was_training = net.training
        ds_state = net.decoder.deep_supervision
        net.decoder.deep_supervision = False
        net.eval()
        try:
            _, val_keys = self.do_split()
            ds = self._val_label_dataset(val_keys)
            return evaluate_preprocessed_cases(self._get_evaluator(), ds, ds.identifiers, max_cases)
        finally:
            net.decoder.deep_supervision = ds_state
            net.train(was_training)

    def _log_history(self, entry):
        hist = self._local_logging()
        if hist is None:
            return
        lst = hist.setdefault(_HISTORY_KEY, [])
        while len(lst) < self.current_epoch:
            lst.append(None)
        if len(lst) == self.current_epoch:
            lst.append(entry)
        else:
            lst[self.current_epoch] = entry

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        super().on_validation_epoch_end(val_outputs)
        if self.local_rank != 0:
            return
        every = int(self.denoiser_eval_every or 0)
        last = self.current_epoch == self.num_epochs - 1
        if every <= 0 or not (self.current_epoch % every == 0 or last):
            self._log_history(None)
            return
        res = self.evaluate_denoiser(self.denoiser_eval_max_cases)
        self._log_history({"epoch": self.current_epoch, "num_cases": res["num_cases"],
                           "settings": [{k: s[k] if k in ("sigma", "scale") else
                                         {m: s[k][m] for m in ("dice", "hd95")} for k in s} for s in res["settings"]],
                           "mean": res["mean"]})
        self.print_to_log_file(f"Denoiser validation, noisy vs denoised ({res['num_cases']} case(s)):\n"
                               + format_results(res), add_timestamp=False)

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Noisy-vs-denoised evaluation on all validation label maps -> ``denoiser_validation.json``.

        Replaces nnU-Net's image prediction (meaningless for a denoiser); ``save_probabilities``
        is ignored.
        """
        if self.local_rank != 0:
            return
        res = self.evaluate_denoiser(None)
        hist = self._local_logging() or {}
        out = {"trainer": type(self).__name__, "configuration": self.configuration_name,
               "fold": self.fold, "plans": self.plans_manager.plans_name,
               "corruption_train": {"sigma": list(self.corruption.sigma), "scale": list(self.corruption.scale),
                                    "sigma_distribution": self.corruption.sigma_distribution,
                                    "interpolation": self.corruption.interpolation},
               "network": {"features_per_stage": list(self.configuration_manager.network_arch_init_kwargs[
                   "features_per_stage"]), "strides": [x if isinstance(x, int) else list(x) for x in
                               self.configuration_manager.network_arch_init_kwargs["strides"]], "features_scale": float(self.denoiser_features_scale)},
               "schedule": {"optimizer": self.denoiser_optimizer, "initial_lr": self.initial_lr,
                            "batch_size": self.batch_size, "num_epochs": self.num_epochs,
                            "num_iterations_per_epoch": self.num_iterations_per_epoch},
               "final": res, "history": [h for h in hist.get(_HISTORY_KEY, []) if h is not None]}
        save_json(_jsonable(out), join(self.output_folder, VALIDATION_JSON), sort_keys=False)
        self.print_to_log_file("Denoiser validation (all validation cases), noisy vs denoised:\n"
                               + format_results(res), also_print_to_console=True, add_timestamp=False)
        self.print_to_log_file(f"written {join(self.output_folder, VALIDATION_JSON)}")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x

