"""Which pseudo-labels a student learns from, and how good they are.

A teacher's softmax ``P`` (C, *S) of one unlabeled case (``nnUNetv2_predict --save_probabilities``,
the case's own voxel grid) gives

* the pseudo-label: ``argmax_c P`` (or of the denoised map, ``--denoise``), label values 0..C-1
  (nnU-Net's softmax label set-ups have consecutive labels);
* per voxel (``--voxel-threshold T``): voxels whose teacher confidence ``max_c P`` is below ``T``
  get nnU-Net's ignore label, so the student's loss skips them (nnU-Net's ``DC_and_CE_loss`` with
  ``ignore_label``). Default 0.5: a voxel stays labeled when one class has the majority of the
  teacher's probability;
* per case (``--keep-fraction f``, ``--case-score``): the score is a mean over the voxels the teacher
  labels foreground (``argmax != 0``) of ``max_c P`` (``confidence``, the FixMatch-style mean
  confidence restricted to the structure) or of ``1 - H(P) / log C`` (``entropy``, normalised
  entropy). The ``ceil(f n)`` best-scored of the ``n`` cases are kept (ties: case id); a case in
  which the teacher finds no foreground has no score (NaN) and is never kept by the case filter.
  ``--min-case-score`` additionally drops cases scored below it. Restricting the mean to the
  foreground matters: over all voxels the (confident) background dominates and the score mostly
  measures how small the structure is.

Confidence always comes from the teacher's own softmax, also with ``--denoise``: the denoiser's
output is a shape prior, not a calibrated probability.

The filter follows the recipe of self-training with a quality filter on pseudo-labels (Huang et
al., "Revisiting nnU-Net for Iterative Pseudo Labeling and Efficient Sliding Window Inference",
FLARE 2022; Xie et al., "Self-training with Noisy Student improves ImageNet classification", CVPR
2020, which keep confident pseudo-labels only).
"""
import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_sud.errors import UserFacingError

FILTERS = ("both", "case", "voxel", "none")
CASE_SCORES = ("confidence", "entropy")


@dataclass(frozen=True)
class FilterSettings:
    """``filter``: which filters run (both, case, voxel, none); the rest their parameters."""
    filter: str = "both"
    keep_fraction: float = 0.8
    case_score: str = "confidence"
    min_case_score: float = 0.0
    voxel_threshold: float = 0.5

    @property
    def per_case(self) -> bool:
        return self.filter in ("both", "case")

    @property
    def per_voxel(self) -> bool:
        return self.filter in ("both", "voxel") and self.voxel_threshold > 0

    def check(self) -> "FilterSettings":
        if self.filter not in FILTERS:
            raise UserFacingError(f"--filter {self.filter}: choose one of {', '.join(FILTERS)}")
        if self.case_score not in CASE_SCORES:
            raise UserFacingError(f"--case-score {self.case_score}: choose one of {', '.join(CASE_SCORES)}")
        if not 0 < self.keep_fraction <= 1:
            raise UserFacingError(f"--keep-fraction {self.keep_fraction}: must be in (0, 1] (1 keeps every case)")
        if not 0 <= self.voxel_threshold <= 1:
            raise UserFacingError(f"--voxel-threshold {self.voxel_threshold}: must be in [0, 1] (0 ignores no voxel)")
        if not 0 <= self.min_case_score <= 1:
            raise UserFacingError(f"--min-case-score {self.min_case_score}: must be in [0, 1]")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def voxel_confidence(probs: np.ndarray) -> np.ndarray:
    """max_c P: (C, *S) -> (*S)."""
    return np.asarray(probs).max(0)


def case_score(probs: np.ndarray, kind: str = "confidence") -> float:
    """Mean over the teacher's foreground voxels (argmax != 0) of max_c P (``confidence``) or of
    1 - H(P) / log C (``entropy``); NaN when the teacher labels no voxel foreground."""
    probs = np.asarray(probs, dtype=np.float64)
    fg = probs.argmax(0) != 0
    if not fg.any():
        return float("nan")
    p = probs[:, fg]  # (C, n)
    if kind == "confidence":
        return float(p.max(0).mean())
    if kind == "entropy":
        h = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(0) / math.log(probs.shape[0])
        return float(1.0 - h.mean())
    raise UserFacingError(f"--case-score {kind}: choose one of {', '.join(CASE_SCORES)}")


def n_to_keep(n: int, fraction: float) -> int:
    """ceil(fraction * n), at most n (rounding noise such as 0.8 * 5 = 4.000000000000001 does not count)."""
    return min(n, math.ceil(round(fraction * n, 9)))


def select_cases(scores: Dict[str, float], keep_fraction: float, min_score: float = 0.0) -> List[str]:
    """The ``ceil(keep_fraction * n)`` best-scored cases whose score is at least ``min_score``, NaN
    (no foreground) never; sorted by case id."""
    ranked = sorted((c for c, s in scores.items() if s == s and s >= min_score), key=lambda c: (-scores[c], c))
    return sorted(ranked[:n_to_keep(len(scores), keep_fraction)])


def pseudo_label(probs: np.ndarray, labels_from: Optional[np.ndarray] = None, voxel_threshold: float = 0.0,
                 ignore_label: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The pseudo-label map and the mask of its ignored voxels.

    Args:
        probs: the teacher's softmax (C, *S): decides which voxels are uncertain.
        labels_from: probabilities (C, *S) whose argmax gives the labels (the denoised map); default
            ``probs``.
        voxel_threshold: voxels with max_c probs < it get ``ignore_label`` (0: none).
    Returns:
        (labels (*S) int16, ignored (*S) bool).
    """
    probs = np.asarray(probs)
    labels = np.asarray(probs if labels_from is None else labels_from).argmax(0).astype(np.int16)
    ignored = voxel_confidence(probs) < voxel_threshold if voxel_threshold > 0 else np.zeros(labels.shape, bool)
    if ignored.any():
        if ignore_label is None:
            raise ValueError("voxels to ignore but no ignore label")
        labels[ignored] = ignore_label
    return labels, ignored


# ---------------------------------------------------------------------- quality against withheld labels
def dice_per_class(pred: np.ndarray, ref: np.ndarray, classes: Sequence[int],
                   exclude: Optional[np.ndarray] = None) -> Dict[str, float]:
    """{str(class): Dice} of two label maps of equal shape; ``exclude`` (bool) voxels do not count.
    NaN where a class is absent from both (nnunet_sud.evaluation.metrics.dice)."""
    from nnunet_sud.evaluation.metrics import dice
    return {str(c): dice(pred == c, ref == c, exclude) for c in classes}


def case_quality(ref: np.ndarray, classes: Sequence[int], maps: Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]],
                 ref_ignore: Optional[int] = None) -> Dict[str, Dict[str, float]]:
    """Dice per class of each named map ``name: (labels, excluded voxels or None)`` against ``ref``;
    voxels of ``ref`` with the dataset's own ignore label never count."""
    ref = np.asarray(ref)
    base = None if ref_ignore is None else ref == ref_ignore
    out = {}
    for name, (labels, excluded) in maps.items():
        ex = base if excluded is None else (excluded if base is None else excluded | base)
        out[name] = dice_per_class(np.asarray(labels), ref, classes, ex)
    return out


def _nanmean(values) -> float:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def summarize_round(records: Dict[str, dict], classes: Sequence[int]) -> dict:
    """Per round: cases kept, mean fraction of labeled (not ignored) voxels in kept cases and the
    mean Dice per class of each map over the cases with a withheld label: ``teacher`` / ``denoised``
    over every unlabeled case, ``teacher_kept`` and ``pseudo_label`` (ignored voxels excluded)
    over the kept ones."""
    kept = [c for c, r in records.items() if r["kept"]]
    out = {"cases": len(records), "cases_kept": len(kept),
           "voxels_kept": _nanmean(records[c]["voxels_kept"] for c in kept), "dice": {}, "cases_with_label": 0}
    with_label = [c for c, r in records.items() if r.get("dice")]
    out["cases_with_label"] = len(with_label)
    if not with_label:
        return out
    names = {"teacher": with_label, "denoised": with_label,
             "teacher_kept": [c for c in with_label if records[c]["kept"]],
             "pseudo_label": [c for c in with_label if records[c]["kept"]]}
    for name, cases in names.items():
        src = "teacher" if name == "teacher_kept" else name
        if not cases or src not in records[cases[0]]["dice"]:
            continue
        per_class = {str(k): _nanmean(records[c]["dice"][src][str(k)] for c in cases) for k in classes}
        out["dice"][name] = {"per_class": per_class, "mean": _nanmean(per_class.values()), "cases": len(cases)}
    return out


def quality_markdown(rows, class_names: Dict[str, str]) -> str:
    """Markdown table over rounds ``[(round, summarize_round(...)), ...]``: cases and voxels kept, Dice
    per class of the teacher (all cases with a withheld label), the denoised map, the teacher on the
    kept cases and the kept pseudo-labels (ignored voxels excluded)."""
    classes = list(class_names)
    head = ["round", "cases kept", "voxels labeled"]
    maps = [("teacher", "teacher"), ("denoised", "denoised"), ("teacher_kept", "teacher, kept cases"),
            ("pseudo_label", "pseudo-labels")]
    present = [(k, t) for k, t in maps if any(k in s["dice"] for _, s in rows)]
    head += [f"Dice {t} ({'/'.join(class_names[c] for c in classes)})" for _, t in present]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, s in rows:
        cells = [str(r), f"{s['cases_kept']}/{s['cases']}", f"{100 * s['voxels_kept']:.1f}%"]
        for k, _ in present:
            d = s["dice"].get(k)
            cells.append("/".join(f"{d['per_class'][c]:.3f}" for c in classes) + f" (mean {d['mean']:.3f})"
                         if d else "")
        lines.append("| " + " | ".join(cells) + " |")
    note = "" if any(s["cases_with_label"] for _, s in rows) else \
        "\nNo labelsUnlabeled/: the pseudo-labels' Dice is not measured.\n"
    return "\n".join(lines) + "\n" + note
