"""The label-map denoiser applied to a teacher's probabilities: offline SUD (``--denoise``).

SUD (Young et al., "SUD: Supervision by Denoising for Medical Image Segmentation", 2022) pulls its
targets towards ``a(f)``, the denoiser applied to the segmenter's softmax, inside training.
Self-training can use the same spatial prior once per round: the pseudo-label becomes ``argmax
a(P)`` of the teacher's softmax ``P``, without SUD's per-iteration temporal loop.

The denoiser learned label maps in the configuration's preprocessed voxel space (its spacing, crop
and axis order), while ``nnUNetv2_predict`` saves ``P`` on the case's own grid. So ``P`` is mapped
into that space with nnU-Net's own steps (transpose, the crop recorded in the prediction's
properties, ``resampling_fn_probabilities`` to the shape ``DefaultPreprocessor`` computes),
denoised whole-case with tiles of the patch size at nnU-Net's sliding-window positions
(``DenoiserEvaluator.denoise``; 2d configurations slice by slice), and mapped back with the
function ``nnUNetv2_predict`` exports with
(``convert_predicted_logits_to_segmentation_with_correct_shape``). Maps smaller than the patch are
padded with background before the denoiser's input encoding, as the training loader pads labels.
"""
from typing import Tuple

import numpy as np
import torch


def to_preprocessed_space(probs: np.ndarray, properties: dict, plans_manager, configuration_manager) -> np.ndarray:
    """A softmax saved by ``nnUNetv2_predict`` (C, *case grid) -> (C, *preprocessed shape)."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
    p = np.asarray(probs, dtype=np.float32).transpose([0, *[i + 1 for i in plans_manager.transpose_forward]])
    p = p[(slice(None), *[slice(int(a), int(b)) for a, b in properties["bbox_used_for_cropping"]])]
    cropped = tuple(int(s) for s in properties["shape_after_cropping_and_before_resampling"])
    if p.shape[1:] != cropped:
        raise ValueError(f"probabilities of shape {p.shape[1:]} after cropping, the prediction's properties say "
                         f"{cropped}")
    original_spacing = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    target = list(configuration_manager.spacing)
    if len(target) < len(cropped):  # 2d: the spacing between slices stays
        target = [original_spacing[0]] + target
    new_shape = compute_new_shape(cropped, original_spacing, target)
    out = configuration_manager.resampling_fn_probabilities(p, new_shape, original_spacing, target)
    return np.asarray(out.cpu().numpy() if isinstance(out, torch.Tensor) else out, dtype=np.float32)


def pad_with_background(probs: torch.Tensor, patch) -> Tuple[torch.Tensor, tuple]:
    """Pad the last len(patch) axes of (C, *spatial) to at least the patch, with background
    (channel 0 = 1); returns (padded, crop back to the original extent)."""
    k = len(patch)
    spatial = probs.shape[1:]
    pads, crop = [], [slice(None)] * (len(spatial) + 1)
    for ax, (n, p) in enumerate(zip(spatial[-k:], patch)):
        d = max(0, int(p) - int(n))
        pads.append((d // 2, d - d // 2))
        crop[1 + len(spatial) - k + ax] = slice(d // 2, d // 2 + int(n))
    if not any(a or b for a, b in pads):
        return probs, tuple(crop)
    flat = [x for ab in reversed(pads) for x in ab]  # F.pad: last axis first
    bg = torch.nn.functional.pad(probs[:1], flat, value=1.0)
    fg = torch.nn.functional.pad(probs[1:], flat, value=0.0)
    return torch.cat([bg, fg]), tuple(crop)


@torch.no_grad()
def denoise_probabilities(denoiser: torch.nn.Module, probs: np.ndarray, properties: dict, plans_manager,
                          configuration_manager, dataset_json: dict, device: torch.device) -> np.ndarray:
    """``a(P)`` of a teacher's softmax on the case grid (C, *S) -> denoised probabilities (C, *S)."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunet_sud.denoiser.corruption import denoiser_input
    from nnunet_sud.denoiser.evaluation import DenoiserEvaluator

    pre = torch.from_numpy(to_preprocessed_space(probs, properties, plans_manager, configuration_manager))
    padded, crop = pad_with_background(pre, configuration_manager.patch_size)
    x = denoiser_input(padded[None])[0]  # softmax(clip(log p, -3, 0)), what the denoiser was trained on
    evaluator = DenoiserEvaluator(denoiser, plans_manager, configuration_manager, dataset_json, device)
    logits = evaluator.denoise(x)[crop].cpu()
    label_manager = plans_manager.get_label_manager(dataset_json)
    _, denoised = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, plans_manager, configuration_manager, label_manager, properties, return_probabilities=True,
        num_threads_torch=1)
    return np.asarray(denoised, dtype=np.float32)
