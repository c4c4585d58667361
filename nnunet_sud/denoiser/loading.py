"""Finding and loading a trained label-map denoiser (for SUD and the other denoiser users).

Where the denoiser is looked for, in this order:

1. ``$nnUNet_denoiser``: a checkpoint file (``.pth`` written by nnU-Net) or a fold folder
   holding ``checkpoint_final.pth`` -- to use a denoiser trained elsewhere (another dataset
   with the same labels, another plans file, a different fold);
2. the default location, the model folder that
   ``nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerLabelDenoiser -p PLANS`` writes::

       $nnUNet_results/DatasetXXX_Name/nnUNetTrainerLabelDenoiser__<PLANS>__<CONFIG>/fold_<FOLD>/checkpoint_final.pth

Which checkpoints hold a denoiser: ``nnUNetTrainerLabelDenoiser`` (and every subclass) writes
``DENOISER_MARK`` ("label_denoiser": format, network class, number of classes) into each of its
checkpoints beside nnU-Net's entries, and the network is rebuilt from the plans the checkpoint
carries (``build_label_denoiser``), so no trainer class is looked up and nothing here imports a
trainer. Checkpoints written before the mark existed are recognised the previous way, by their
``trainer_name``: ``nnUNetTrainerLabelDenoiser`` or a name that starts with it (the package's own
variants, e.g. ``nnUNetTrainerLabelDenoiser_tiny``). A checkpoint with neither, such as a
segmenter's, is refused.

What is checked against the segmenter's set-up (``nnUNet_preprocessed/DatasetXXX/<PLANS>.json``
and its ``dataset.json``): the checkpoint holds a label denoiser (above), the number of classes
is the same, the label set-up is not region-based, the denoiser and the segmenter configuration
are both 2d or both 3d, and the segmenter's patch is divisible by the denoiser's total
down-sampling (so the denoiser can read a segmenter patch). Differences in label names or
configuration name only warn. Every failure raises ``UserFacingError`` naming the file and the
``nnUNetv2_train`` command that makes a matching denoiser.

Quality: ``load_denoiser`` reads the denoiser's recorded validation (``denoiser_validation.json``
beside the checkpoint) and warns loudly (``DenoiserQualityWarning``) when it degrades clean maps
(sigma = 0 row: denoised Dice below ``CLEAN_DICE_MIN``), makes mildly noisy maps (0 < sigma <= 1)
worse and below that, or when there is no such record (quality on clean maps unknown). SUD pulls its targets
towards the denoised prediction: a denoiser that is not near the identity on near-clean maps
pulls them the wrong way.
"""
import json
import os
import warnings
from typing import Tuple, Union

import numpy as np
import torch

from nnunet_sud.denoiser.data import dataset_id_of, resolve_dataset_name
from nnunet_sud.denoiser.network import LabelDenoiserAE, build_label_denoiser
from nnunet_sud.errors import UserFacingError
from nnunet_sud.network_helpers import require_exclusive_classes
from nnunet_sud.unlabeled.preprocess import plan_command

DENOISER_TRAINER = "nnUNetTrainerLabelDenoiser"
ENV_VAR = "nnUNet_denoiser"
CHECKPOINT = "checkpoint_final.pth"
#: the checkpoint entry that marks a label denoiser (written by nnUNetTrainerLabelDenoiser)
DENOISER_MARK = "label_denoiser"
DENOISER_MARK_FORMAT = 1


def denoiser_mark(num_classes: int) -> dict:
    """The ``DENOISER_MARK`` entry of a denoiser checkpoint: format, network class, classes."""
    return {"format": DENOISER_MARK_FORMAT, "network": LabelDenoiserAE.__name__, "num_classes": int(num_classes)}


def train_command(dataset_name: str, configuration: str, fold, plans_identifier: str) -> str:
    """The command that trains the denoiser expected at the default location."""
    return (f"nnUNetv2_train {dataset_id_of(dataset_name)} {configuration} {fold} -tr {DENOISER_TRAINER} "
            f"-p {plans_identifier}")


def default_denoiser_folder(dataset_name: str, plans_identifier: str, configuration: str, fold) -> str:
    """``$nnUNet_results/<dataset>/nnUNetTrainerLabelDenoiser__<plans>__<configuration>/fold_<fold>``."""
    from nnunetv2.paths import nnUNet_results
    if not nnUNet_results:
        raise UserFacingError("nnUNet_results is not set: export it as for nnUNetv2_train, or point "
                              f"{ENV_VAR} at a denoiser checkpoint")
    return os.path.join(nnUNet_results, dataset_name, f"{DENOISER_TRAINER}__{plans_identifier}__{configuration}",
                        f"fold_{fold}")


VALIDATION_JSON = "denoiser_validation.json"
CLEAN_DICE_MIN = 0.95
"""Least mean foreground Dice of ``a(y)`` against a clean map ``y`` (the sigma = 0 row of the
denoiser's validation) below which ``load_denoiser`` warns: SUD pulls its targets towards
``a(f)``, and late in training ``f`` is near-clean (SUD §3.3-3.4)."""


class DenoiserQualityWarning(UserWarning):
    """The loaded denoiser degrades clean or mildly noisy label maps, or its quality is unknown."""


def _row_dice(row, kind):
    d = (row.get(kind) or {}).get("dice")
    return None if d is None else float(d)


def recorded_validation_problems(checkpoint_file: str, clean_dice_min: float = CLEAN_DICE_MIN):
    """What the denoiser's recorded validation says against using it; ``None`` if nothing.

    Reads ``denoiser_validation.json`` beside the checkpoint (written by
    ``nnUNetTrainerLabelDenoiser.perform_actual_validation``, layout in ``evaluation.py``) and
    returns a message when its sigma = 0 row (clean maps) has a denoised Dice below
    ``clean_dice_min``, when a row with 0 < sigma <= 1 (mild noise: the regime of a segmenter's
    predictions) is denoised worse than it was noisy and below ``clean_dice_min`` (at sigma = 0.5
    the noisy argmax map is still the clean one, Dice ~1, so "worse than noisy" alone would flag
    every denoiser), or when the file or its sigma = 0 row is missing (quality on clean maps
    unknown).
    """
    folder = os.path.dirname(os.path.abspath(checkpoint_file))
    path = os.path.join(folder, VALIDATION_JSON)
    trainer_cmd = ("run the denoiser's validation again with its training command plus --val (nnUNetv2_train "
                   "DATASET CONFIG FOLD -tr <denoiser trainer> --val) with a sigma = 0 setting in its "
                   "denoiser_eval_settings (the default has one)")
    if not os.path.isfile(path):
        return (f"the denoiser {checkpoint_file} has no recorded validation ({path} not found): its quality on "
                f"clean label maps is unknown. To measure it, {trainer_cmd}.")
    try:
        with open(path) as f:
            settings = json.load(f)["final"]["settings"]
    except Exception as e:
        return f"cannot read the denoiser's recorded validation {path} ({type(e).__name__}: {e}): its quality is unknown."
    clean = [r for r in settings if float(r["sigma"]) == 0]
    problems = []
    if not clean:
        problems.append(f"{path} has no sigma = 0 row (it predates it): the denoiser's quality on clean label maps "
                        f"is unknown. To measure it, {trainer_cmd}")
    for r in clean:
        den = _row_dice(r, "denoised")
        if den is not None and den < clean_dice_min:
            problems.append(f"on clean held-out maps (sigma = 0, s = {float(r['scale']):g}) the denoiser gives mean "
                            f"Dice {den:.3f} against the clean map (needs >= {clean_dice_min:.2f}): it degrades "
                            f"correct segmentations")
    for r in settings:
        sigma = float(r["sigma"])
        den, noisy = _row_dice(r, "denoised"), _row_dice(r, "noisy")
        if 0 < sigma <= 1 and den is not None and noisy is not None and den < min(noisy, clean_dice_min):
            problems.append(f"at sigma = {sigma:g}, s = {float(r['scale']):g} the denoised maps are worse than the "
                            f"noisy ones (Dice {den:.3f} < {noisy:.3f}) and below {clean_dice_min:.2f}")
    if not problems:
        return None
    return (f"the label denoiser {checkpoint_file} may pull targets the wrong way -- its recorded validation "
            f"({path}) says: " + "; ".join(problems) + ". A denoiser used by SUD / DAE uncertainty / post-denoise "
            f"must be near the identity on clean maps. Train it longer or with the package's default schedule "
            f"(nnUNetTrainerLabelDenoiser, docs/denoiser.md), add label maps (labelsDenoiser/ + nnunet-sud "
            f"preprocess-denoiser-labels), and check the new denoiser_validation.json before training with it.")


def find_denoiser_checkpoint(dataset_name: str, plans_identifier: str, configuration: str, fold) -> str:
    """Path of the denoiser checkpoint to use (``$nnUNet_denoiser`` or the default location)."""
    cmd = train_command(dataset_name, configuration, fold, plans_identifier)
    env = os.environ.get(ENV_VAR)
    if env:
        if os.path.isdir(env):
            ckpt = os.path.join(env, CHECKPOINT)
            if not os.path.isfile(ckpt):
                raise UserFacingError(
                    f"{ENV_VAR}={env} is a folder without {CHECKPOINT} (a fold folder of a finished "
                    f"{DENOISER_TRAINER} training is needed). Point {ENV_VAR} at a checkpoint file or a finished fold "
                    f"folder, or unset it and train the default denoiser: {cmd}")
            return ckpt
        if os.path.isfile(env):
            return env
        raise UserFacingError(f"{ENV_VAR}={env} does not exist. Point it at a denoiser checkpoint (.pth) or fold "
                              f"folder, or unset it and train the default denoiser: {cmd}")
    folder = default_denoiser_folder(dataset_name, plans_identifier, configuration, fold)
    ckpt = os.path.join(folder, CHECKPOINT)
    if os.path.isfile(ckpt):
        return ckpt
    if any(os.path.isfile(os.path.join(folder, f)) for f in ("checkpoint_latest.pth", "checkpoint_best.pth")):
        raise UserFacingError(f"the denoiser training in {folder} has not finished ({CHECKPOINT} missing). "
                              f"Finish it with: {cmd} --c")
    raise UserFacingError(f"no trained label denoiser found at {ckpt}. Train it first with: {cmd}   "
                          f"(or set {ENV_VAR} to a denoiser checkpoint or fold folder)")


def _total_strides(configuration_manager) -> np.ndarray:
    strides = configuration_manager.network_arch_init_kwargs.get("strides")
    if strides is None:
        strides = configuration_manager.pool_op_kernel_sizes
    dim = len(configuration_manager.patch_size)
    s = np.ones(dim, dtype=int)
    for st in strides:
        s *= np.broadcast_to(np.asarray(st, dtype=int), (dim,))
    return s


def _segmenter_setup(dataset_name: str, plans_identifier: str, configuration: str, cmd: str):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    if not nnUNet_preprocessed:
        raise UserFacingError("nnUNet_preprocessed is not set: export it as for nnUNetv2_train")
    base = os.path.join(nnUNet_preprocessed, dataset_name)
    plans_file = os.path.join(base, plans_identifier + ".json")
    ds_file = os.path.join(base, "dataset.json")
    if not os.path.isfile(plans_file) or not os.path.isfile(ds_file):
        raise UserFacingError(f"{plans_file} (or dataset.json beside it) not found: plan and preprocess the dataset "
                              f"({plan_command(dataset_id_of(dataset_name), configuration, plans_identifier)}), then train the denoiser: {cmd}")
    pm = PlansManager(plans_file)
    if configuration not in pm.available_configurations:
        raise UserFacingError(f"configuration {configuration!r} is not in {plans_file} "
                              f"(available: {', '.join(pm.available_configurations)})")
    return pm, pm.get_configuration(configuration), load_json(ds_file)


def load_denoiser_checkpoint(checkpoint_file: str, cmd: str = "") -> Tuple[torch.nn.Module, dict]:
    """Build the denoiser of a checkpoint and load its weights (CPU, eval mode, not frozen).

    Returns ``(network, info)``, info = {'trainer_name', 'configuration', 'num_classes',
    'labels', 'patch_size', 'plans_manager', 'configuration_manager', 'dataset_json', 'checkpoint'}.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    hint = f" Train a matching denoiser with: {cmd}" if cmd else ""
    try:
        ckpt = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserFacingError(f"cannot read the denoiser checkpoint {checkpoint_file}: {type(e).__name__}: {e}.{hint}")
    if not isinstance(ckpt, dict) or not {"network_weights", "init_args", "trainer_name"} <= set(ckpt):
        raise UserFacingError(f"{checkpoint_file} is not an nnU-Net training checkpoint (no network_weights/"
                              f"init_args/trainer_name).{hint}")
    name = ckpt["trainer_name"]
    mark = ckpt.get(DENOISER_MARK)
    if mark is None and not name.startswith(DENOISER_TRAINER):  # before the mark: known by the trainer's name
        raise UserFacingError(f"{checkpoint_file} was written by {name}, which is not a label denoiser: the "
                              f"checkpoint has no {DENOISER_MARK!r} entry (written by {DENOISER_TRAINER} and its "
                              f"subclasses) and is not a {DENOISER_TRAINER} checkpoint from before that entry "
                              f"existed. A segmenter's checkpoint cannot be used as a denoiser.{hint}")
    if mark is not None and (not isinstance(mark, dict) or mark.get("format") != DENOISER_MARK_FORMAT
                             or mark.get("network") != LabelDenoiserAE.__name__):
        raise UserFacingError(f"{checkpoint_file}: its {DENOISER_MARK!r} entry {mark!r} is not one this version of "
                              f"nnunet_sud reads (format {DENOISER_MARK_FORMAT}, network {LabelDenoiserAE.__name__})."
                              f"{hint}")
    init = ckpt["init_args"]
    try:
        plans = dict(init["plans"])
        plans.pop("continue_training", None)
        pm = PlansManager(plans)
        cm = pm.get_configuration(init["configuration"])
        lm = pm.get_label_manager(init["dataset_json"])
    except Exception as e:
        raise UserFacingError(f"{checkpoint_file}: cannot restore its plans/configuration ({type(e).__name__}: {e}).{hint}")
    require_exclusive_classes(lm, f"the label denoiser {checkpoint_file}", f"Train it on plain integer labels.{hint}")
    n = lm.num_segmentation_heads
    if mark is not None and mark.get("num_classes") != n:
        raise UserFacingError(f"{checkpoint_file}: its {DENOISER_MARK!r} entry says {mark.get('num_classes')} classes, "
                              f"its dataset.json {n}: the checkpoint is inconsistent.{hint}")
    net = build_label_denoiser(pm, cm, n, deep_supervision=False)
    try:
        net.load_state_dict(ckpt["network_weights"])
    except RuntimeError as e:
        raise UserFacingError(f"{checkpoint_file}: weights do not fit the network its plans describe "
                              f"({str(e).splitlines()[0]}).{hint}")
    net.eval()
    info = {"trainer_name": name, "configuration": init["configuration"], "num_classes": n,
            "labels": dict(init["dataset_json"].get("labels", {})), "patch_size": list(cm.patch_size),
            "plans_manager": pm, "configuration_manager": cm, "dataset_json": init["dataset_json"],
            "checkpoint": os.path.abspath(checkpoint_file)}
    return net, info


def load_denoiser(dataset_name_or_id: Union[int, str], plans_identifier: str, configuration: str, fold,
                  device: Union[str, torch.device, None] = None) -> torch.nn.Module:
    """Load the trained label denoiser for a segmenter's dataset/plans/configuration/fold.

    Args:
        dataset_name_or_id: the segmenter's dataset (id or DatasetXXX_Name).
        plans_identifier: the segmenter's plans (e.g. 'nnUNetPlans').
        configuration: the segmenter's configuration (e.g. '3d_fullres').
        fold: the fold (the default location is the same fold of the denoiser trainer).
        device: where to put the network (default CPU).
    Returns:
        The skip-free auto-encoder in eval mode with ``requires_grad=False`` on every parameter
        and deep supervision off: ``(B, C, *patch)`` probabilities -> ``(B, C, *patch)`` logits
        (use ``nnunet_sud.denoiser.corruption.apply_denoiser``). ``.denoiser_info`` holds where it
        came from (checkpoint, trainer, configuration, classes, patch size).
    Raises:
        UserFacingError: missing or unfinished denoiser, unreadable checkpoint, not a denoiser,
            mismatching classes / dimensionality / down-sampling, unknown dataset or plans.
    Warns:
        DenoiserQualityWarning: its recorded validation shows it degrades clean (sigma = 0) or mildly
            noisy maps, or there is no such record (``recorded_validation_problems``).
    """
    name = resolve_dataset_name(dataset_name_or_id)
    cmd = train_command(name, configuration, fold, plans_identifier)
    pm_s, cm_s, ds_s = _segmenter_setup(name, plans_identifier, configuration, cmd)
    lm_s = pm_s.get_label_manager(ds_s)
    require_exclusive_classes(lm_s, f"A label denoiser (and every method that uses one, for {name})")
    ckpt_file = find_denoiser_checkpoint(name, plans_identifier, configuration, fold)
    net, info = load_denoiser_checkpoint(ckpt_file, cmd)
    problem = recorded_validation_problems(ckpt_file)
    if problem is not None:
        warnings.warn("\n" + "!" * 80 + "\nWARNING (nnunet_sud): " + problem + "\n" + "!" * 80,
                      DenoiserQualityWarning, stacklevel=2)
    where = f"the denoiser {ckpt_file} (configuration {info['configuration']})"
    if info["num_classes"] != lm_s.num_segmentation_heads:
        raise UserFacingError(f"{where} has {info['num_classes']} classes but {name} ({plans_identifier}) has "
                              f"{lm_s.num_segmentation_heads}. Train a denoiser for this dataset: {cmd}")
    dim_d, dim_s = len(info["patch_size"]), len(cm_s.patch_size)
    if dim_d != dim_s:
        raise UserFacingError(f"{where} is {dim_d}d but the segmenter configuration {configuration} is {dim_s}d. "
                              f"Train a denoiser for this configuration: {cmd}")
    total = _total_strides(info["configuration_manager"])
    patch = np.asarray(cm_s.patch_size, dtype=int)
    if np.any(patch % total):
        raise UserFacingError(f"{where} down-samples by {total.tolist()} but the segmenter's patch "
                              f"{patch.tolist()} is not divisible by it. Train a denoiser for this "
                              f"configuration: {cmd}")
    names_d = {str(v): k for k, v in info["labels"].items()}
    names_s = {str(v): k for k, v in ds_s.get("labels", {}).items()}
    if names_d != names_s:
        warnings.warn(f"{where}: label names differ from {name}'s dataset.json ({names_d} vs {names_s}); "
                      f"make sure the label values mean the same structures")
    if info["configuration"] != configuration:
        warnings.warn(f"{where} was trained on configuration {info['configuration']}, the segmenter uses "
                      f"{configuration}: its shape prior is at that configuration's spacing")
    if device is not None:
        net = net.to(torch.device(device) if isinstance(device, str) else device)
    for p in net.parameters():
        p.requires_grad_(False)
    net.eval()
    net.denoiser_info = {k: v for k, v in info.items()
                         if k not in ("plans_manager", "configuration_manager", "dataset_json")}
    return net
