"""Target-quality curves of finished trainings: what each semi-supervised method learned from.

A semi-supervised trainer records, per epoch, the per-class Dice against ``labelsUnlabeled`` of
the maps it makes for itself (``record_target_quality``: SUD's raw prediction, denoised
prediction and stored target; a teacher's prediction; kept pseudo-labels) in nnU-Net's logger
under ``target_dice/<map>`` (and ``target_kept/<map>``, the fraction of voxels a gate keeps).
The logger travels in every nnU-Net checkpoint, so a finished model folder holds the curves.

``read_target_quality(fold_dir)`` pulls them out of ``checkpoint_final.pth`` (or
``checkpoint_latest.pth``); ``target_quality_markdown`` and ``plot_target_quality`` turn the
curves of several trainers into a table (mean Dice over classes at mid-training and at the end,
per map) and a figure (one panel per trainer), as used by the demo and the real-data benchmark.
"""
import math
import os
import warnings
from typing import Dict, Optional, Sequence

import numpy as np

DICE_PREFIX = "target_dice/"
KEPT_PREFIX = "target_kept/"


def _checkpoint_logging(fold_dir: str) -> Optional[dict]:
    import torch
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        path = os.path.join(fold_dir, name)
        if os.path.isfile(path):
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            return ckpt.get("logging") or {}  # nnU-Net's LocalLogger.my_fantastic_logging
    return None


def read_target_quality(fold_dir: str) -> Dict[str, dict]:
    """``{map: {"dice": (E, K) per-epoch per-class Dice (NaN: not recorded), "kept": (E,) or None}}``
    from a model folder's checkpoint; ``{}`` when the training recorded no target quality."""
    logging = _checkpoint_logging(fold_dir) or {}
    out = {}
    for key, values in logging.items():
        if not key.startswith(DICE_PREFIX):
            continue
        name = key[len(DICE_PREFIX):]
        rows = [np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in values]
        width = max((r.size for r in rows), default=0)
        dice = np.full((len(rows), width), np.nan)
        for i, r in enumerate(rows):
            if r.size == width:
                dice[i] = r
        kept = logging.get(KEPT_PREFIX + name)
        out[name] = {"dice": dice, "kept": None if kept is None else np.asarray(kept, dtype=np.float64)}
    return out


def mean_over_classes(dice: np.ndarray) -> np.ndarray:
    """(E, K) -> (E,) mean over the classes recorded that epoch (NaN when none)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(dice, axis=1) if dice.size else np.zeros(0)


def _at(curve: np.ndarray, fraction: float) -> float:
    """The curve's value at ``fraction`` of training: the mean of the recorded epochs in a window of
    a tenth of training (at least one epoch) ending there."""
    finite = np.isfinite(curve)
    if not finite.any():
        return math.nan
    end = int(round(fraction * (len(curve) - 1)))
    start = max(0, end - max(1, len(curve) // 10) + 1)
    window = curve[start:end + 1][finite[start:end + 1]]
    return float(window.mean()) if window.size else math.nan


def target_quality_markdown(curves: Dict[str, Dict[str, dict]], class_names: Sequence[str] = ()) -> str:
    """Table: per trainer and map, mean Dice over classes at mid-training and at the end, per-class
    Dice at the end, and the fraction kept at the end (when the map is gated)."""
    if not any(curves.values()):
        return ""
    k = max((c["dice"].shape[1] for t in curves.values() for c in t.values()), default=0)
    names = list(class_names)[:k] + [f"class {i + 1}" for i in range(len(class_names), k)]
    head = ["trainer", "map", "mean Dice, mid", "mean Dice, end"] + [f"{n}, end" for n in names] + ["kept, end"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for trainer, maps in curves.items():
        for name, c in maps.items():
            mean = mean_over_classes(c["dice"])
            per_class = [_at(c["dice"][:, j], 1.0) if j < c["dice"].shape[1] else math.nan for j in range(k)]
            kept = "" if c["kept"] is None else f"{_at(c['kept'], 1.0):.3f}"
            cells = [trainer, name, f"{_at(mean, 0.5):.3f}", f"{_at(mean, 1.0):.3f}"] + \
                    [f"{v:.3f}" for v in per_class] + [kept]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_target_quality(curves: Dict[str, Dict[str, dict]], png: str, dpi: int = 100) -> Optional[str]:
    """One panel per trainer: mean Dice over classes per map against epochs (solid), fraction kept
    (dashed). Returns the file written, or None when no trainer recorded target quality."""
    trainers = [t for t, maps in curves.items() if maps]
    if not trainers:
        return None
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(trainers), figsize=(6 * len(trainers), 4.5), squeeze=False)
    for ax, trainer in zip(axes[0], trainers):
        for i, (name, c) in enumerate(curves[trainer].items()):
            color = f"C{i}"
            mean = mean_over_classes(c["dice"])
            ax.plot(np.arange(len(mean)), mean, color=color, label=name)
            if c["kept"] is not None:
                ax.plot(np.arange(len(c["kept"])), c["kept"], color=color, ls="--", label=f"{name}: kept")
        ax.set_title(trainer)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_ylabel("mean Dice vs withheld labels")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=dpi)
    plt.close(fig)
    return png


def target_quality_report(fold_dirs: Dict[str, str], report_folder: str, class_names: Sequence[str] = ()) -> dict:
    """Curves of every trainer in ``fold_dirs`` ({trainer: model fold folder}) ->
    ``report_folder/target_quality.png`` and a Markdown table; ``{"markdown": str ("" when no
    trainer recorded target quality), "png": path or None, "curves": {...}}``."""
    curves = {t: read_target_quality(d) for t, d in fold_dirs.items()}
    return {"curves": curves, "markdown": target_quality_markdown(curves, class_names),
            "png": plot_target_quality(curves, os.path.join(report_folder, "target_quality.png"))}
