"""``nnUNetTrainerPostDenoise``: a supervised segmenter whose predictions are denoised (SUD's [63]).

SUD (Young et al. 2022, arXiv:2202.02952) compares against "post-denoise": "implements [63] (Larrazabal et
al.) and denoises baseline segmentations using SUD's denoiser" -- a supervised segmenter, and at
inference the label denoiser applied to its output. Here the composition is the saved network:

    SegmenterWithPostDenoiser(x) = segmenter logits                     training (gradients flow)
                                 = log DAE(softmax(segmenter(x)))       inference

so ``nnUNetv2_predict -tr nnUNetTrainerPostDenoise`` (and nnU-Net's final validation) return
denoised segmentations with nothing but the model folder: the denoiser weights are part of
``network_weights``. Two ways to get such a model folder:

1. train it:  ``nnUNetv2_train DATASET CFG FOLD -tr nnUNetTrainerPostDenoise`` -- nnU-Net's
   supervised training of the segmenter (nothing else changes; no unlabeled data), the trained
   label denoiser (``nnUNetTrainerLabelDenoiser``, same plans and configuration, or
   ``$nnUNet_denoiser``) inserted frozen into the network at the start of training and left out
   of the optimizer;
2. compose it: ``nnunet-sud build-postdenoise -d DATASET -c CFG -f FOLD [-tr nnUNetTrainer]``
   from an already trained segmenter (any trainer with nnU-Net's architecture) and the trained
   denoiser, without retraining (``build_postdenoise_model_folder``).

When the composition denoises: in eval mode with deep supervision off -- what nnU-Net's
predictor and final validation use. In training mode, and in eval mode with deep supervision on
(nnU-Net's per-epoch pseudo-Dice validation), it returns the segmenter's logits (the
deep-supervision list), so nnU-Net's loss trains the segmenter as usual.

Inference details: the denoiser sees each sliding-window patch (the segmenter's patch size, which
``load_denoiser`` checks is divisible by the denoiser's down-sampling), not the whole case.
The returned logits are ``log`` of the denoised softmax (clamped at the smallest float), so their
softmax is the denoised map; nnU-Net averages logits over overlapping windows and mirrorings, i.e.
a normalised geometric mean of the denoised maps.

The denoiser's architecture is rebuilt from the model folder's plans at predict time
(``build_label_denoiser`` of the same plans and configuration), so the denoiser must have been
trained on the segmenter's plans/configuration (or one with the same architecture); otherwise the
weights do not fit and a ``UserFacingError`` says so before training.
"""
# the trainers, registered in nnunet_sud.trainers
__all__ = ["nnUNetTrainerPostDenoise"]

import os
import shutil
from typing import Optional, Union

import torch
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_sud.denoiser.corruption import apply_denoiser
from nnunet_sud.denoiser.data import resolve_dataset_name
from nnunet_sud.denoiser.loading import find_denoiser_checkpoint, load_denoiser_checkpoint, train_command
from nnunet_sud.denoiser.network import build_label_denoiser
from nnunet_sud.denoiser.trainer import narrow_architecture
from nnunet_sud.errors import UserFacingError
from nnunet_sud.network_helpers import require_exclusive_classes, unwrap_network
from nnunet_sud.robust_training import atomic_torch_save
from nnunet_sud.trainers.denoiser_mixin import LabelDenoiserMixin

POSTDENOISE_TRAINER = "nnUNetTrainerPostDenoise"


class SegmenterWithPostDenoiser(nn.Module):
    """Segmenter followed by a frozen label denoiser at inference.

    Args:
        segmenter: an nnU-Net network (``.decoder.deep_supervision``), image (B, C_in, *patch)
            -> logits (B, C, *patch) or their deep-supervision list.
        denoiser: label denoiser, probabilities (B, C, *patch) -> logits (B, C, *patch); frozen
            here (``requires_grad = False``, always in eval mode).

    ``forward(x)``: the segmenter's output while training or with deep supervision on;
    otherwise ``log(apply_denoiser(denoiser, softmax(segmenter(x))))`` (B, C, *patch), whose softmax
    is the denoised map. ``decoder`` (and ``encoder``) forward to the segmenter's, for nnU-Net's
    ``set_deep_supervision_enabled``.
    """

    def __init__(self, segmenter: nn.Module, denoiser: nn.Module):
        super().__init__()
        self.segmenter = segmenter
        self.denoiser = denoiser
        self.denoiser.requires_grad_(False)
        self.denoiser.eval()

    @property
    def decoder(self) -> nn.Module:
        return self.segmenter.decoder

    @property
    def encoder(self) -> nn.Module:
        return self.segmenter.encoder

    def train(self, mode: bool = True):
        super().train(mode)
        self.denoiser.eval()  # frozen: never in training mode
        return self

    @property
    def denoises(self) -> bool:
        """True when ``forward`` applies the denoiser (eval mode and deep supervision off)."""
        return not self.training and not getattr(self.segmenter.decoder, "deep_supervision", False)

    def forward(self, x: torch.Tensor):
        logits = self.segmenter(x)
        if not self.denoises:
            return logits
        p_hat = apply_denoiser(self.denoiser, torch.softmax(logits.float(), 1))  # DAE(softmax f(x))
        return torch.log(p_hat.clamp_min(torch.finfo(p_hat.dtype).tiny))


def insert_denoiser(composed: nn.Module, denoiser: nn.Module, source: str = "the label denoiser",
                    hint: str = "") -> None:
    """Copy a trained denoiser's weights into ``composed.denoiser`` (built from the segmenter's plans).

    Raises ``UserFacingError`` when the architectures differ (denoiser trained on other plans or
    configuration), because predict rebuilds the denoiser from the segmenter's plans.
    """
    composed = unwrap_network(composed)
    try:
        composed.denoiser.load_state_dict(denoiser.state_dict())
    except RuntimeError as e:
        raise UserFacingError(
            f"{source} does not fit the denoiser architecture of the segmenter's plans/configuration "
            f"({str(e).splitlines()[0][:300]}). Post-denoise stores the denoiser inside the segmenter's model and "
            f"rebuilds it from the segmenter's plans at predict time, so the denoiser must be trained with the same "
            f"plans and configuration.{(' Train one with: ' + hint) if hint else ''}") from None
    composed.denoiser.requires_grad_(False)
    composed.denoiser.eval()


class nnUNetTrainerPostDenoise(LabelDenoiserMixin, nnUNetTrainer):
    """Supervised nnU-Net training; the saved network denoises its predictions (SUD's post-denoise baseline)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        require_exclusive_classes(self.label_manager, type(self).__name__)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """nnU-Net's planned segmenter + the label denoiser of the same configuration, narrowed as
        ``nnUNetTrainerLabelDenoiser`` narrows it by default (``narrow_architecture``)."""
        import copy
        from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
        segmenter = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                             num_output_channels, enable_deep_supervision)
        denoiser_configuration = copy.deepcopy(configuration_manager.configuration)
        narrow_architecture(denoiser_configuration["architecture"])
        denoiser = build_label_denoiser(plans_manager, ConfigurationManager(denoiser_configuration), num_output_channels,
                                        deep_supervision=False, allow_init=False)
        return SegmenterWithPostDenoiser(segmenter, denoiser)

    def configure_optimizers(self):
        """nnU-Net's optimizer and LR schedule (or a subclass's) over the segmenter's parameters only."""
        composed = self.network
        self.network = unwrap_network(composed).segmenter
        try:
            return super().configure_optimizers()
        finally:
            self.network = composed

    def on_train_start(self):
        denoiser = self.load_label_denoiser()  # LabelDenoiserMixin: fails before anything is built
        super().on_train_start()
        checkpoint = denoiser.denoiser_info["checkpoint"]
        insert_denoiser(self.network, denoiser, f"the denoiser {checkpoint}", self.denoiser_train_command())
        self.denoiser = None  # its weights now live in self.network (the composition's frozen denoiser)
        self.print_to_log_file(f"Post-denoise: label denoiser {checkpoint} inserted into the network "
                               f"(frozen, applied at inference)")


# ---------------------------------------------------------------------- composing without training
def build_postdenoise_model_folder(dataset_name_or_id: Union[int, str], configuration: str, fold,
                                   segmenter_trainer: str = "nnUNetTrainer", plans_identifier: str = "nnUNetPlans",
                                   checkpoint_name: str = "checkpoint_final.pth", overwrite: bool = False,
                                   results_folder: Optional[str] = None) -> str:
    """Write ``nnUNetTrainerPostDenoise__<plans>__<cfg>/fold_<fold>`` from a trained segmenter + denoiser.

    The segmenter is ``<segmenter_trainer>__<plans>__<cfg>/fold_<fold>/<checkpoint_name>`` (any
    trainer whose network is nnU-Net's planned architecture); the denoiser is found like
    ``load_denoiser`` does (``$nnUNet_denoiser`` or the ``nnUNetTrainerLabelDenoiser`` folder of the
    same plans/configuration/fold). Copies plans.json, dataset.json, dataset_fingerprint.json
    and writes ``checkpoint_final.pth`` (composed weights, ``trainer_name`` nnUNetTrainerPostDenoise,
    the segmenter's init args/optimizer/logging). Returns the new fold folder.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager


    if results_folder is None:
        from nnunetv2.paths import nnUNet_results as results_folder
    if not results_folder:
        raise UserFacingError("nnUNet_results is not set: export it as for nnUNetv2_train")
    name = resolve_dataset_name(dataset_name_or_id)
    if segmenter_trainer == POSTDENOISE_TRAINER:
        raise UserFacingError(f"-tr names the segmenter to compose, not {POSTDENOISE_TRAINER} itself")
    fold_dir = f"fold_{fold}"
    seg_base = os.path.join(results_folder, name, f"{segmenter_trainer}__{plans_identifier}__{configuration}")
    seg_ckpt = os.path.join(seg_base, fold_dir, checkpoint_name)
    if not os.path.isfile(seg_ckpt):
        raise UserFacingError(
            f"no trained segmenter at {seg_ckpt}. Train it first (nnUNetv2_train {name} {configuration} {fold} -tr "
            f"{segmenter_trainer} -p {plans_identifier}) or name its trainer/plans/checkpoint with -tr/-p/-chk")
    for f in ("plans.json", "dataset.json"):
        if not os.path.isfile(os.path.join(seg_base, f)):
            raise UserFacingError(f"{os.path.join(seg_base, f)} is missing: {seg_base} is not a complete nnU-Net "
                                  f"model folder")
    out_base = os.path.join(results_folder, name, f"{POSTDENOISE_TRAINER}__{plans_identifier}__{configuration}")
    out_ckpt = os.path.join(out_base, fold_dir, "checkpoint_final.pth")
    if os.path.isfile(out_ckpt) and not overwrite:
        raise UserFacingError(f"{out_ckpt} exists already. Pass --overwrite to replace it.")

    cmd = train_command(name, configuration, fold, plans_identifier)
    den_ckpt = find_denoiser_checkpoint(name, plans_identifier, configuration, fold)
    denoiser, den_info = load_denoiser_checkpoint(den_ckpt, cmd)

    checkpoint = torch.load(seg_ckpt, map_location="cpu", weights_only=False)
    if checkpoint.get("init_args", {}).get("configuration", configuration) != configuration:
        raise UserFacingError(f"{seg_ckpt} was trained on configuration {checkpoint['init_args']['configuration']}, "
                              f"not {configuration}")
    plans = load_json(os.path.join(seg_base, "plans.json"))
    dataset_json = load_json(os.path.join(seg_base, "dataset.json"))
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    lm = pm.get_label_manager(dataset_json)
    require_exclusive_classes(lm, "Post-denoise")
    if den_info["num_classes"] != lm.num_segmentation_heads:
        raise UserFacingError(f"the denoiser {den_ckpt} has {den_info['num_classes']} classes, the segmenter "
                              f"{seg_ckpt} {lm.num_segmentation_heads}. Train a matching denoiser: {cmd}")
    composed = nnUNetTrainerPostDenoise.build_network_architecture(
        pm, cm, determine_num_input_channels(pm, cm, dataset_json), lm.num_segmentation_heads, False)
    try:
        composed.segmenter.load_state_dict(checkpoint["network_weights"])
    except RuntimeError as e:
        raise UserFacingError(f"{seg_ckpt}: its weights do not fit nnU-Net's planned network for {configuration} "
                              f"({str(e).splitlines()[0][:300]}); post-denoise composes nnU-Net's architecture "
                              f"only (trainer {checkpoint.get('trainer_name')})") from None
    insert_denoiser(composed, denoiser, f"the denoiser {den_ckpt}", cmd)

    os.makedirs(os.path.join(out_base, fold_dir), exist_ok=True)
    for f in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        src = os.path.join(seg_base, f)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_base, f))
    checkpoint["network_weights"] = composed.state_dict()
    checkpoint["trainer_name"] = POSTDENOISE_TRAINER
    checkpoint["postdenoise_source"] = {"segmenter_checkpoint": os.path.abspath(seg_ckpt),
                                        "segmenter_trainer": checkpoint.get("trainer_name", segmenter_trainer),
                                        "denoiser_checkpoint": den_info["checkpoint"]}
    atomic_torch_save(checkpoint, out_ckpt)
    save_json(checkpoint["postdenoise_source"], os.path.join(out_base, fold_dir, "postdenoise_source.json"))
    return os.path.join(out_base, fold_dir)
