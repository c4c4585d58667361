"""Noisy vs denoised label maps: the denoiser's validation (SUD Table 1 and Fig. 7).

For each validation label map and each fixed corruption setting ``(sigma, s)`` the map is
corrupted (``corruption.corrupt_probabilities``, noise seeded by case and setting so that
every epoch and every run sees the same noisy maps; 2d configurations get 2d noise per slice,
as in their training), denoised over the whole case, and both the noisy map (argmax of the
corrupted probabilities) and the denoised map (argmax of the denoiser's logits: tiles of the
patch size at nnU-Net's sliding-window positions, averaged in float32 -- a single pass for maps
of patch size; 2d configurations slice by slice, batched) are scored
against the clean map with Dice and HD95 per foreground label (the package's single metric
definitions, ``nnunet_sud.evaluation.metrics``: Dice NaN when a label is absent from both maps,
HD95 medpy-style, the image diagonal when exactly one map lacks the label), in the preprocessed
voxel space with the configuration's spacing (HD95 in mm if spacing is in mm). Voxels with
nnU-Net's ignore label are not scored.

Maps smaller than the patch are padded with background *before* corruption, so the denoiser
sees the same kind of input at the border as in training (nnU-Net's loader pads label patches
with background as well); scores are taken on the original extent only.

Result layout (also what ``denoiser_validation.json`` holds under ``"final"``)::

    {"labels": [1, 2, ...], "num_cases": N, "cases": [...],
     "settings": [{"sigma": 2.0, "scale": 1.0,
                   "noisy":    {"dice": m, "hd95": m, "per_class": {"1": {"dice": m, "hd95": m}, ...}},
                   "denoised": {...}}, ...],
     "mean": {"noisy": {"dice": m, "hd95": m}, "denoised": {"dice": m, "hd95": m}}}

``m``: mean over cases of the mean over labels (NaN entries skipped).
"""
import contextlib
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from nnunet_sud.denoiser.corruption import corrupt_probabilities, stable_seed
from nnunet_sud.network_helpers import labels_to_one_hot

DEFAULT_EVAL_SETTINGS: Tuple[Tuple[float, float], ...] = ((0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (2.0, 2.0), (4.0, 4.0),
                                                           (8.0, 8.0))
"""Fixed (sigma, s) settings of the denoiser validation. sigma = 0: the clean map itself -- the
denoiser must be near the identity there (a segmenter's late predictions are near-clean, SUD eq. 8
pulls the targets towards a(f)); ``load_denoiser`` warns when this row's denoised Dice is below
0.95. sigma = 0.5: mildly noisy probabilities whose argmax is still almost the clean map (the
regime of real predictions). Then along the diagonal of the paper's training range [0, 8]^2, from
per-voxel noise that flips background voxels everywhere (sigma = 1) to the extreme corner
sigma = s = 8, where denoising becomes inpainting (Fig. 8)."""


def nanmean(values) -> float:
    """Mean over the finite entries (NaN if there are none), without numpy's empty-slice warning."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def label_map_metrics(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int],
                      spacing: Optional[Sequence[float]] = None,
                      valid: Optional[np.ndarray] = None) -> Dict[int, Dict[str, float]]:
    """Per-label Dice and HD95 of two integer label maps (*spatial) of equal shape.

    ``valid`` (boolean, *spatial): voxels outside count for neither map.
    Returns ``{label: {'dice': float, 'hd95': float}}``.
    """
    from nnunet_sud.evaluation.metrics import dice, hd95, squeeze_singleton_axes
    spacing = [1.0] * ref.ndim if spacing is None else list(spacing)
    if 1 in ref.shape:  # nnU-Net's 2d images are (1, Y, X): score them in 2d
        pred, _ = squeeze_singleton_axes(pred, spacing)
        valid = None if valid is None else squeeze_singleton_axes(valid, spacing)[0]
        ref, spacing = squeeze_singleton_axes(ref, spacing)
    out = {}
    for lab in labels:
        p, r = pred == lab, ref == lab
        if valid is not None:
            p, r = p & valid, r & valid
        out[int(lab)] = {"dice": dice(p, r), "hd95": hd95(p, r, spacing)}
    return out


def case_spacing(properties: dict, plans_manager, configuration_manager, ndim: int) -> List[float]:
    """Voxel spacing of a preprocessed case (transposed axis order), ``ndim`` entries.

    3d configurations: the configuration's spacing. 2d: the out-of-plane spacing is the case's own
    (nnU-Net does not resample it), in-plane the configuration's.
    """
    sp = list(configuration_manager.spacing)
    if len(sp) < ndim:
        orig = [properties["spacing"][i] for i in plans_manager.transpose_forward]
        sp = list(orig[:ndim - len(sp)]) + sp
    return [float(s) for s in sp]


class DenoiserEvaluator:
    """Runs the noisy-vs-denoised evaluation of one denoiser network.

    Args:
        network: the denoiser in eval mode (deep supervision off, i.e. it returns one tensor).
        plans_manager, configuration_manager, dataset_json: the denoiser's nnU-Net set-up.
        device: where the network runs.
        settings: fixed (sigma, s) pairs.
        seed: base seed of the noise (with the case key and the setting).
        tile_step_size: sliding-window step (fraction of the patch), as nnU-Net's predictor.
    """

    def __init__(self, network: torch.nn.Module, plans_manager, configuration_manager, dataset_json: dict,
                 device: torch.device, settings: Sequence[Tuple[float, float]] = DEFAULT_EVAL_SETTINGS,
                 seed: int = 12345, tile_step_size: float = 0.5):
        self.plans_manager = plans_manager
        self.configuration_manager = configuration_manager
        self.label_manager = plans_manager.get_label_manager(dataset_json)
        self.num_classes = self.label_manager.num_segmentation_heads
        self.settings = [(float(a), float(b)) for a, b in settings]
        self.seed = seed
        self.device = device
        self.slice_batch = 16
        self.network = network
        self.tile_step_size = tile_step_size

    def _pad(self, seg: np.ndarray):
        patch = list(self.configuration_manager.patch_size)
        spatial = seg.shape
        k = len(patch)
        pads = [(0, 0)] * (len(spatial) - k)
        for n, p in zip(spatial[-k:], patch):
            d = max(0, p - n)
            pads.append((d // 2, d - d // 2))
        crop = tuple(slice(a, a + n) for (a, _), n in zip(pads, spatial))
        return np.pad(seg, pads, constant_values=0), crop

    @torch.no_grad()
    def denoise(self, probs: torch.Tensor) -> torch.Tensor:
        """Denoiser logits (C, *spatial), float32, for a whole map ``probs`` (C, *spatial) at least one
        patch large (``_pad``).

        Tiles of the patch size at nnU-Net's sliding-window positions
        (``compute_steps_for_sliding_window``, step ``tile_step_size``); overlapping tiles are
        averaged uniformly in float32. 2d configurations run every slice, slices batched; a map of
        patch size is a single forward pass.
        """
        from itertools import product
        from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

        patch = tuple(int(p) for p in self.configuration_manager.patch_size)
        k = len(patch)
        c, spatial = probs.shape[0], tuple(probs.shape[1:])
        lead, img = spatial[:-k], spatial[-k:]
        n = int(np.prod(lead)) if lead else 1
        x = probs.reshape(c, n, *img).transpose(0, 1).to(self.device)  # (N, C, *img)
        out = torch.zeros((n, self.num_classes, *img), dtype=torch.float32, device=self.device)
        count = torch.zeros(img, dtype=torch.float32, device=self.device)
        steps = compute_steps_for_sliding_window(img, patch, self.tile_step_size)
        amp = torch.autocast("cuda") if self.device.type == "cuda" else contextlib.nullcontext()
        for start in product(*steps):
            sl = tuple(slice(int(a), int(a) + p) for a, p in zip(start, patch))
            for i in range(0, n, self.slice_batch):
                with amp:
                    y = self.network(x[(slice(i, i + self.slice_batch), slice(None)) + sl])
                out[(slice(i, i + self.slice_batch), slice(None)) + sl] += y.float()
            count[sl] += 1
        out /= count
        return out.transpose(0, 1).reshape(self.num_classes, *spatial)

    @torch.no_grad()
    def evaluate_case(self, key: str, seg: np.ndarray, spacing: Sequence[float]) -> List[Dict]:
        """Scores of one case for every setting.

        Args:
            key: case identifier (seeds the noise).
            seg: preprocessed label map (1, *spatial) or (*spatial); -1 (outside the non-zero
                region) counts as background, the ignore label as unscored.
            spacing: voxel size per spatial axis.
        Returns:
            one dict per setting: {'noisy': {label: {'dice', 'hd95'}}, 'denoised': {...}}.
        """
        seg = np.asarray(seg)
        if seg.ndim == len(spacing) + 1:
            seg = seg[0]
        seg = np.where(seg < 0, 0, seg).astype(np.int16)
        ignore = self.label_manager.ignore_label
        valid = None if ignore is None else seg != ignore
        labels = list(self.label_manager.foreground_labels)
        padded, crop = self._pad(seg)
        # padded is (*spatial) (a 2d configuration's single-slice case: (1, Y, X)): batch axis only, no channel axis
        onehot = labels_to_one_hot(torch.from_numpy(padded)[None].long(), self.num_classes,
                                   has_channel_axis=False)  # (1, C, *spatial)
        slice_wise = len(self.configuration_manager.patch_size) < padded.ndim
        out = []
        for sigma, scale in self.settings:
            gen = torch.Generator().manual_seed(stable_seed(self.seed, key, sigma, scale))
            if slice_wise:  # 2d denoiser: 2d noise per slice, as in its training
                noisy = corrupt_probabilities(onehot[0].transpose(0, 1), sigma, scale, generator=gen).transpose(0, 1)
            else:
                noisy = corrupt_probabilities(onehot, sigma, scale, generator=gen)[0]
            logits = self.denoise(noisy)
            noisy_seg = noisy.argmax(0).cpu().numpy()[crop]
            den_seg = logits.argmax(0).cpu().numpy()[crop]
            out.append({"noisy": label_map_metrics(noisy_seg, seg, labels, spacing, valid),
                        "denoised": label_map_metrics(den_seg, seg, labels, spacing, valid)})
        return out

    def evaluate(self, cases: Iterable[Tuple[str, np.ndarray, Sequence[float]]]) -> Dict:
        """Evaluate ``(key, seg, spacing)`` cases and aggregate (layout: module doc)."""
        labels = [int(x) for x in self.label_manager.foreground_labels]
        per_case, keys = [], []
        for key, seg, spacing in cases:
            keys.append(key)
            per_case.append(self.evaluate_case(key, seg, spacing))
        settings = []
        for si, (sigma, scale) in enumerate(self.settings):
            entry = {"sigma": sigma, "scale": scale}
            for kind in ("noisy", "denoised"):
                per_class = {}
                for lab in labels:
                    per_class[str(lab)] = {m: nanmean(c[si][kind][lab][m] for c in per_case) for m in ("dice", "hd95")}
                entry[kind] = {m: nanmean(nanmean(c[si][kind][lab][m] for lab in labels) for c in per_case)
                               for m in ("dice", "hd95")}
                entry[kind]["per_class"] = per_class
            settings.append(entry)
        mean = {kind: {m: nanmean(s[kind][m] for s in settings) for m in ("dice", "hd95")}
                for kind in ("noisy", "denoised")}
        return {"labels": labels, "num_cases": len(keys), "cases": keys, "settings": settings, "mean": mean}


def format_results(results: Dict, markdown: bool = False) -> str:
    """Human-readable table of ``DenoiserEvaluator.evaluate`` output (one row per setting + mean)."""
    rows = [(f"{s['sigma']:g}", f"{s['scale']:g}", s["noisy"]["dice"], s["denoised"]["dice"],
             s["noisy"]["hd95"], s["denoised"]["hd95"]) for s in results["settings"]]
    m = results["mean"]
    rows.append(("mean", "", m["noisy"]["dice"], m["denoised"]["dice"], m["noisy"]["hd95"], m["denoised"]["hd95"]))
    rows = [tuple(float("nan") if v is None else v for v in r) for r in rows]  # NaN stored as null in json
    head = ("sigma", "s", "Dice noisy", "Dice denoised", "HD95 noisy", "HD95 denoised")
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += [f"| {a} | {b} | {c:.3f} | {d:.3f} | {e:.2f} | {f:.2f} |" for a, b, c, d, e, f in rows]
    else:
        lines = ["{:>6} {:>4} {:>11} {:>14} {:>11} {:>14}".format(*head)]
        lines += ["{:>6} {:>4} {:>11.3f} {:>14.3f} {:>11.2f} {:>14.2f}".format(*r) for r in rows]
    return "\n".join(lines)


def evaluate_preprocessed_cases(evaluator: DenoiserEvaluator, dataset, keys: Sequence[str],
                                max_cases: Optional[int] = None) -> Dict:
    """Evaluate cases of a ``LabelMapDataset`` (or nnU-Net dataset) by key, spacing from their properties."""
    keys = list(keys)[:max_cases] if max_cases else list(keys)

    def gen():
        for k in keys:
            _, seg, _, props = dataset.load_case(k)
            seg = np.asarray(seg[:])
            yield k, seg, case_spacing(props, evaluator.plans_manager, evaluator.configuration_manager, seg.ndim - 1)
    return evaluator.evaluate(gen())
