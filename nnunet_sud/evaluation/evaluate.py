"""``nnunet-sud evaluate``: Dice and HD95 of a prediction folder against a reference folder.

Reads segmentations in any format nnU-Net reads (through nnU-Net's reader/writer classes:
``.nii.gz``, ``.nrrd``, ``.mha``, ``.png``, ``.tif``, ...), pairs prediction and reference by
case identifier (file name without the file ending), and computes per case and per class
(label or nnU-Net region) the Dice coefficient and HD95 in physical units (the spacing stored
in the files, mm for medical images). Definitions: :mod:`nnunet_sud.evaluation.metrics`.

Outputs (``-o OUT_PREFIX``):

* ``OUT_PREFIX.json``: everything (per case, per class values and status; summary per class;
  settings). NaN is stored as ``null``. Read back with :func:`load_evaluation`.
* ``OUT_PREFIX_per_case.csv``: one row per (case, class).
* ``OUT_PREFIX_summary.csv``: one row per (class, metric): n, mean, median, std, min, max and
  the counts of empty-structure cases.

Per (case, class) status:

* ``ok``: reference and prediction both contain the structure;
* ``both_empty``: neither contains it: Dice = HD95 = NaN, excluded from all statistics and
  counted in ``n_both_empty``;
* ``missed``: in the reference, not in the prediction: Dice 0, HD95 = image diagonal;
* ``false_positive``: in the prediction, not in the reference: Dice 0, HD95 = image diagonal.

Image axes of length 1 (how nnU-Net stores 2d images) are dropped before computing surfaces:
a ``(1, Y, X)`` image is evaluated as a 2d image with its in-plane spacing.
"""
import csv
import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_sud.errors import UserFacingError

FORMAT = "nnunet_sud.evaluation/1"
SPACING_RTOL = 1e-3
STATUSES = ("ok", "both_empty", "missed", "false_positive")
METRICS = ("Dice", "HD95")


@dataclass(frozen=True)
class ClassSpec:
    """One evaluated structure: a label (``labels=(l,)``) or an nnU-Net region (several labels).

    ``key`` follows nnU-Net's ``label_or_region_to_key``: ``"1"`` for a label, ``"(1, 2)"`` for a
    region; ``name`` is the dataset.json name (or the key when labels are given directly).
    """
    key: str
    name: str
    labels: Tuple[int, ...]
    is_region: bool = False

    def mask(self, seg: np.ndarray) -> np.ndarray:
        """Boolean mask of this class in an integer label map (any shape)."""
        if len(self.labels) == 1:
            return seg == self.labels[0]
        return np.isin(seg, self.labels)


def classes_from_labels(labels: Sequence[int]) -> List[ClassSpec]:
    """One :class:`ClassSpec` per integer label (background 0 is not allowed)."""
    out = []
    for lab in labels:
        lab = int(lab)
        if lab == 0:
            raise UserFacingError("--labels: 0 is the background and is not evaluated; give foreground labels "
                                  "only, e.g. --labels 1 2 3")
        out.append(ClassSpec(key=str(lab), name=str(lab), labels=(lab,)))
    if len({c.key for c in out}) != len(out):
        raise UserFacingError(f"--labels contains duplicates: {list(labels)}")
    return out


def classes_from_dataset_json(dataset_json: dict, source: str = "dataset.json") -> Tuple[List[ClassSpec], Optional[int]]:
    """Foreground labels or regions (and the ignore label) of an nnU-Net dataset.json.

    Uses nnU-Net's ``LabelManager``: a dataset whose ``labels`` contain lists of more than one
    label is region based, and each region is one evaluated class (as in nnU-Net's own
    evaluation). Returns ``(classes, ignore_label or None)``.
    """
    from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    if "labels" not in dataset_json:
        raise UserFacingError(f"{source} has no 'labels' entry; is it an nnU-Net v2 dataset.json?")
    try:
        lm = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    except (AssertionError, RuntimeError, ValueError, TypeError) as e:
        raise UserFacingError(f"{source}: nnU-Net cannot interpret its 'labels': {e}") from e
    fg = lm.foreground_regions if lm.has_regions else lm.foreground_labels

    def norm(v):
        if isinstance(v, (list, tuple)):
            return tuple(int(i) for i in v) if len(v) > 1 else int(v[0])
        return int(v)

    names = {}
    for name, value in dataset_json["labels"].items():
        if name == "ignore":
            continue
        names.setdefault(norm(value), name)
    classes = []
    for r in fg:
        r = norm(r)
        labels = r if isinstance(r, tuple) else (r,)
        classes.append(ClassSpec(key=label_or_region_to_key(r), name=names.get(r, label_or_region_to_key(r)),
                                 labels=labels, is_region=isinstance(r, tuple)))
    if not classes:
        raise UserFacingError(f"{source} declares no foreground labels or regions")
    return classes, lm.ignore_label


def declared_values(dataset_json: dict) -> List[int]:
    """Every label value a dataset.json declares (background, labels, region members, ignore label)."""
    values = set()
    for v in dataset_json.get("labels", {}).values():
        values.update(int(i) for i in (v if isinstance(v, (list, tuple)) else [v]))
    return sorted(values)


def find_cases(folder: str, file_ending: str) -> Dict[str, str]:
    """``{case_id: path}`` for the files in ``folder`` (not recursive) ending in ``file_ending``."""
    if not os.path.isdir(folder):
        raise UserFacingError(f"folder not found: {folder}")
    out = {}
    for f in sorted(os.listdir(folder)):
        p = os.path.join(folder, f)
        if f.startswith(".") or not f.endswith(file_ending) or not os.path.isfile(p):
            continue
        out[f[: -len(file_ending)]] = p
    return out


def _fmt_list(items: Sequence[str], n: int = 20) -> str:
    items = list(items)
    s = ", ".join(items[:n])
    return s + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def match_cases(pred: Dict[str, str], ref: Dict[str, str], pred_folder: str, ref_folder: str,
                file_ending: str, only_predicted: bool = False) -> List[str]:
    """Case identifiers to evaluate; raises :class:`UserFacingError` on mismatched sets."""
    if not pred:
        raise UserFacingError(f"no files ending in '{file_ending}' in the prediction folder {pred_folder}; "
                              f"check -pred and --file-ending")
    if not ref:
        raise UserFacingError(f"no files ending in '{file_ending}' in the reference folder {ref_folder}; "
                              f"check -ref and --file-ending")
    no_ref = sorted(set(pred) - set(ref))
    if no_ref:
        raise UserFacingError(
            f"{len(no_ref)} prediction(s) in {pred_folder} have no reference in {ref_folder}: {_fmt_list(no_ref)}. "
            f"Point -ref at the folder holding their labels, or remove these predictions.")
    no_pred = sorted(set(ref) - set(pred))
    if no_pred and not only_predicted:
        raise UserFacingError(
            f"{len(no_pred)} reference case(s) in {ref_folder} have no prediction in {pred_folder}: "
            f"{_fmt_list(no_pred)}. Predict them, or pass --only-predicted to evaluate only the "
            f"{len(pred)} predicted case(s).")
    return sorted(pred)


def _read(rw, path: str) -> Tuple[np.ndarray, Tuple[float, ...]]:
    try:
        seg, props = rw.read_seg(path)
    except Exception as e:  # readers raise anything (RuntimeError, OSError, AssertionError, ...)
        raise UserFacingError(f"cannot read segmentation {path}: {type(e).__name__}: {e}") from e
    seg = np.asarray(seg)
    if seg.ndim >= 1 and seg.shape[0] == 1:
        seg = seg[0]  # nnU-Net adds a channel axis
    else:
        raise UserFacingError(f"{path}: expected a single-channel segmentation, got array shape {seg.shape}")
    if np.any(seg != np.round(seg)):
        raise UserFacingError(f"{path}: contains non-integer values; is this a segmentation (label map)?")
    return seg.astype(np.int32), tuple(float(s) for s in props["spacing"])


def evaluate_case(case: str, pred_file: str, ref_file: str, rw, classes: Sequence[ClassSpec],
                  ignore_label: Optional[int] = None, allowed_values: Optional[Sequence[int]] = None) -> dict:
    """Metrics of one case for every class.

    Returns ``{"case", "prediction_file", "reference_file", "shape", "spacing", "metrics": {key:
    {"Dice", "HD95", "TP", "FP", "FN", "n_ref", "n_pred", "status"}}}`` where shape/spacing are
    those used for the surfaces (length-1 axes dropped). With ``allowed_values`` (the values
    dataset.json declares), ``"undeclared_values"`` lists the prediction's values outside them.
    """
    from nnunet_sud.evaluation.metrics import confusion_counts, hd95, image_diagonal, squeeze_singleton_axes

    seg_pred, sp_pred = _read(rw, pred_file)
    seg_ref, sp_ref = _read(rw, ref_file)
    undeclared = [] if allowed_values is None else \
        [int(v) for v in np.setdiff1d(np.unique(seg_pred), np.asarray(allowed_values, dtype=seg_pred.dtype))]
    if seg_pred.shape != seg_ref.shape:
        raise UserFacingError(
            f"case {case}: prediction {pred_file} has shape {seg_pred.shape} but reference {ref_file} has "
            f"{seg_ref.shape}. Predictions must be in the reference's image grid (nnUNetv2_predict writes them "
            f"so); check that both come from the same images.")
    if len(sp_pred) != len(sp_ref) or not np.allclose(sp_pred, sp_ref, rtol=SPACING_RTOL, atol=0):
        raise UserFacingError(
            f"case {case}: prediction {pred_file} has spacing {_fmt_spacing(sp_pred)} but reference {ref_file} has "
            f"{_fmt_spacing(sp_ref)} "
            f"(relative tolerance {SPACING_RTOL}). Resample the prediction to the reference's grid.")
    seg_pred, spacing = squeeze_singleton_axes(seg_pred, sp_ref)
    seg_ref, _ = squeeze_singleton_axes(seg_ref, sp_ref)
    ignore = (seg_ref == ignore_label) if ignore_label is not None else None
    diag = image_diagonal(seg_ref.shape, spacing)
    metrics = {}
    for c in classes:
        m_pred, m_ref = c.mask(seg_pred), c.mask(seg_ref)
        if ignore is not None:
            m_pred = m_pred & ~ignore  # ignored voxels are neither counted nor part of any surface
        tp, fp, fn, _ = confusion_counts(m_pred, m_ref, ignore)
        n_pred, n_ref = tp + fp, tp + fn
        if n_pred == 0 and n_ref == 0:
            status, d, h = "both_empty", float("nan"), float("nan")
        else:
            status = "ok" if (n_pred and n_ref) else ("missed" if n_ref else "false_positive")
            d = 2.0 * tp / (2 * tp + fp + fn)
            h = hd95(m_pred, m_ref, spacing, one_empty=diag)
        metrics[c.key] = {"Dice": d, "HD95": h, "TP": tp, "FP": fp, "FN": fn, "n_ref": n_ref, "n_pred": n_pred,
                          "status": status}
    out = {"case": case, "prediction_file": os.path.abspath(pred_file), "reference_file": os.path.abspath(ref_file),
           "shape": list(seg_ref.shape), "spacing": list(spacing), "metrics": metrics}
    if allowed_values is not None:
        out["undeclared_values"] = undeclared
    return out


def _fmt_spacing(sp: Sequence[float]) -> str:
    return "(" + ", ".join(f"{s:.6g}" for s in sp) + ")"


def _case_worker(args):
    return evaluate_case(*args)


def summary_statistics(values: Sequence[float]) -> dict:
    """n, mean, median, std (sample, ddof=1; NaN if n < 2), min, max of the finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    n = int(v.size)
    nan = float("nan")
    return {"n": n,
            "mean": float(v.mean()) if n else nan,
            "median": float(np.median(v)) if n else nan,
            "std": float(v.std(ddof=1)) if n >= 2 else nan,
            "min": float(v.min()) if n else nan,
            "max": float(v.max()) if n else nan}


def summarize(per_case: Sequence[dict], classes: Sequence[ClassSpec]) -> Tuple[dict, dict]:
    """Per class ``{metric: stats, "n_cases", "n_ok", "n_both_empty", "n_missed", "n_false_positive"}``
    and the foreground mean (mean over classes of the per-class means)."""
    summary = {}
    for c in classes:
        entries = [pc["metrics"][c.key] for pc in per_case]
        s = {m: summary_statistics([e[m] for e in entries]) for m in METRICS}
        s["n_cases"] = len(entries)
        for st in STATUSES:
            s[f"n_{st}"] = sum(e["status"] == st for e in entries)
        summary[c.key] = s
    fg = {}
    for m in METRICS:
        means = [summary[c.key][m]["mean"] for c in classes if summary[c.key][m]["n"]]
        fg[m] = float(np.mean(means)) if means else float("nan")
    return summary, fg


def evaluate_folders(pred_folder: str, ref_folder: str, classes: Sequence[ClassSpec], file_ending: str = ".nii.gz",
                     ignore_label: Optional[int] = None, num_processes: int = 1, only_predicted: bool = False,
                     reader_writer_class=None, dataset_json: Optional[dict] = None) -> dict:
    """Evaluate every case; returns the result dict written by :func:`write_evaluation`.

    Args:
        pred_folder, ref_folder: folders of segmentations named ``<case><file_ending>``.
        classes: what to evaluate (:func:`classes_from_labels`, :func:`classes_from_dataset_json`).
        ignore_label: voxels with this reference label are ignored (nnU-Net's ignore label).
        num_processes: worker processes (spawned) for reading and computing; 1 = in-process.
        only_predicted: evaluate the predicted cases only, instead of requiring every reference case.
        reader_writer_class: nnU-Net reader/writer class; by default determined from ``dataset_json``
            (if given) or the file ending, by trying to read the first reference file.
        dataset_json: with it, a prediction holding a label value that dataset.json does not declare is an
            error (UserFacingError naming every such file and its values, after all cases are read): those
            voxels would silently count as background of every class.
    """
    from nnunetv2.imageio.reader_writer_registry import (determine_reader_writer_from_dataset_json,
                                                         determine_reader_writer_from_file_ending)

    pred = find_cases(pred_folder, file_ending)
    ref = find_cases(ref_folder, file_ending)
    cases = match_cases(pred, ref, pred_folder, ref_folder, file_ending, only_predicted)
    if reader_writer_class is None:
        example = ref[cases[0]]
        try:
            if dataset_json is not None:
                reader_writer_class = determine_reader_writer_from_dataset_json(
                    {**dataset_json, "file_ending": file_ending}, example, allow_nonmatching_filename=True,
                    verbose=False)
            else:
                reader_writer_class = determine_reader_writer_from_file_ending(
                    file_ending, example, allow_nonmatching_filename=True, verbose=False)
        except RuntimeError as e:
            raise UserFacingError(f"nnU-Net has no reader for '{file_ending}' files that can open {example}: {e}. "
                                  f"Check --file-ending.") from e
    rw = reader_writer_class()
    allowed = declared_values(dataset_json) if dataset_json is not None else None
    jobs = [(c, pred[c], ref[c], rw, list(classes), ignore_label, allowed) for c in cases]
    if num_processes > 1 and len(jobs) > 1:
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            per_case = pool.map(_case_worker, jobs, chunksize=1)
    else:
        per_case = [_case_worker(j) for j in jobs]
    if allowed is not None:
        _check_declared_values(per_case, allowed, pred_folder)
    summary, fg = summarize(per_case, classes)
    return {
        "format": FORMAT,
        "prediction_folder": os.path.abspath(pred_folder),
        "reference_folder": os.path.abspath(ref_folder),
        "file_ending": file_ending,
        "reader_writer": reader_writer_class.__name__,
        "ignore_label": ignore_label,
        "classes": [{"key": c.key, "name": c.name, "labels": list(c.labels), "is_region": c.is_region}
                    for c in classes],
        "cases": cases,
        "reference_cases_not_predicted": sorted(set(ref) - set(pred)),
        "definitions": {
            "Dice": "2TP/(2TP+FP+FN); NaN if reference and prediction are empty (nnU-Net)",
            "HD95": "95th percentile (numpy linear) of pooled surface distances in both directions; surface = "
                    "mask XOR binary_erosion(mask, generate_binary_structure(ndim, 1)); Euclidean distance "
                    "transform with the file spacing (medpy.metric.binary.hd95)",
            "both_empty": "Dice = HD95 = NaN, excluded from statistics, counted in n_both_empty",
            "one_empty": "Dice = 0, HD95 = image diagonal sqrt(sum((shape*spacing)^2)); counted in n_missed "
                         "(reference only) or n_false_positive (prediction only)",
            "std": "sample standard deviation (ddof=1)",
            "length_one_axes": "dropped before computing surfaces (2d images stored as (1, Y, X))",
        },
        "per_case": per_case,
        "summary": summary,
        "foreground_mean": fg,
    }


def _check_declared_values(per_case: List[dict], allowed: Sequence[int], pred_folder: str) -> None:
    """Raise UserFacingError listing the predictions with label values dataset.json does not declare."""
    bad = [(os.path.basename(pc["prediction_file"]), pc.pop("undeclared_values")) for pc in per_case]
    bad = [(f, v) for f, v in bad if v]
    if bad:
        raise UserFacingError(
            f"{len(bad)} prediction(s) in {pred_folder} contain label values that dataset.json does not declare "
            f"(declared: {', '.join(map(str, allowed))}): "
            f"{_fmt_list([f'{f}: {v}' for f, v in bad], 10)}. Such voxels would count as background for every "
            f"class. Check that the predictions come from a model trained on this dataset and that -djfile is its "
            f"dataset.json, or map these values to declared labels.")


# ---------------------------------------------------------------------------------------- I/O
def _nan_to_none(obj):
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, (np.floating,)):
        return None if np.isnan(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def _none_to_nan(entry: dict) -> dict:
    return {k: (float("nan") if (v is None and k in METRICS) else v) for k, v in entry.items()}


def output_paths(out_prefix: str) -> Dict[str, str]:
    """``{"json", "per_case_csv", "summary_csv"}`` for an output prefix (a trailing .json is dropped)."""
    if out_prefix.endswith(".json"):
        out_prefix = out_prefix[:-5]
    return {"json": out_prefix + ".json", "per_case_csv": out_prefix + "_per_case.csv",
            "summary_csv": out_prefix + "_summary.csv"}


def _csv_val(v):
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    return v


def write_evaluation(result: dict, out_prefix: str) -> Dict[str, str]:
    """Write the JSON and the two CSV files; returns their paths."""
    paths = output_paths(out_prefix)
    d = os.path.dirname(os.path.abspath(paths["json"]))
    os.makedirs(d, exist_ok=True)
    with open(paths["json"], "w") as f:
        json.dump(_nan_to_none(result), f, indent=1, allow_nan=False)
    names = {c["key"]: c["name"] for c in result["classes"]}
    with open(paths["per_case_csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "class", "name", "Dice", "HD95", "n_ref", "n_pred", "status"])
        for pc in result["per_case"]:
            for key, m in pc["metrics"].items():
                w.writerow([pc["case"], key, names[key], _csv_val(m["Dice"]), _csv_val(m["HD95"]), m["n_ref"],
                            m["n_pred"], m["status"]])
    with open(paths["summary_csv"], "w", newline="") as f:
        w = csv.writer(f)
        stats = ["n", "mean", "median", "std", "min", "max"]
        counts = ["n_cases"] + [f"n_{s}" for s in STATUSES]
        w.writerow(["class", "name", "metric"] + stats + counts)
        for key, s in result["summary"].items():
            for m in METRICS:
                w.writerow([key, names[key], m] + [_csv_val(s[m][k]) for k in stats] + [s[k] for k in counts])
    return paths


def load_evaluation(path: str) -> dict:
    """Read a JSON written by :func:`write_evaluation` (``null`` metric values back to NaN)."""
    try:
        with open(path) as f:
            res = json.load(f)
    except FileNotFoundError:
        raise UserFacingError(f"evaluation file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserFacingError(f"{path} is not a JSON file: {e}") from e
    if not isinstance(res, dict) or res.get("format") != FORMAT:
        raise UserFacingError(f"{path} is not an 'nnunet-sud evaluate' output (format {FORMAT}); "
                              f"create it with nnunet-sud evaluate -pred ... -ref ... -o ...")
    for pc in res["per_case"]:
        pc["metrics"] = {k: _none_to_nan(v) for k, v in pc["metrics"].items()}
    for key, s in res["summary"].items():
        for m in METRICS:
            s[m] = {k: (float("nan") if v is None else v) for k, v in s[m].items()}
    return res


# ---------------------------------------------------------------------------------------- CLI
def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="Dice and HD95 (mm) of predictions against references, per case and class",
        description="Computes per case and per class (label or nnU-Net region) Dice and HD95 in physical "
                    "units (spacing from the files; HD95 as medpy.metric.binary.hd95) and per-class mean, median "
                    "and std. Writes OUT_PREFIX.json, OUT_PREFIX_per_case.csv, OUT_PREFIX_summary.csv. "
                    "Both-empty structures give NaN and are excluded from statistics; a structure present "
                    "in only one of the two gives Dice 0 and HD95 = the image diagonal. See docs/evaluation.md.",
    )
    p.add_argument("-pred", required=True, help="folder with predicted segmentations (<case><file_ending>)")
    p.add_argument("-ref", required=True, help="folder with reference segmentations (e.g. labelsTr / labelsTs)")
    p.add_argument("-o", required=True, metavar="OUT_PREFIX", help="output prefix, e.g. results/sud_fold0")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--labels", type=int, nargs="+", help="foreground labels to evaluate, e.g. --labels 1 2 3")
    g.add_argument("-djfile", help="dataset.json: labels or regions (region-based datasets), their names, the "
                                   "ignore label and the file ending")
    p.add_argument("--file-ending", default=None,
                   help="file ending of the segmentations (default: dataset.json's, else .nii.gz)")
    p.add_argument("-np", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--only-predicted", action="store_true",
                   help="evaluate only the cases present in -pred instead of requiring a prediction for every "
                        "reference case")
    p.set_defaults(func=_run)


def _run(args) -> int:
    ignore_label, dataset_json = None, None
    if args.djfile:
        try:
            with open(args.djfile) as f:
                dataset_json = json.load(f)
        except FileNotFoundError:
            raise UserFacingError(f"-djfile: file not found: {args.djfile}") from None
        except json.JSONDecodeError as e:
            raise UserFacingError(f"-djfile: {args.djfile} is not valid JSON: {e}") from e
        classes, ignore_label = classes_from_dataset_json(dataset_json, args.djfile)
        file_ending = args.file_ending or dataset_json.get("file_ending", ".nii.gz")
    else:
        classes = classes_from_labels(args.labels)
        file_ending = args.file_ending or ".nii.gz"
    if args.np < 1:
        raise UserFacingError("-np must be at least 1")
    res = evaluate_folders(args.pred, args.ref, classes, file_ending, ignore_label, args.np, args.only_predicted,
                           dataset_json=dataset_json)
    paths = write_evaluation(res, args.o)
    names = {c["key"]: c["name"] for c in res["classes"]}
    print(f"{len(res['cases'])} case(s) evaluated")
    print(f"{'class':<20} {'Dice mean':>9} {'median':>7} {'HD95 mean':>9} {'median':>7}  both_empty missed fp")
    for key, s in res["summary"].items():
        print(f"{names[key][:20]:<20} {s['Dice']['mean']:9.4f} {s['Dice']['median']:7.4f} "
              f"{s['HD95']['mean']:9.2f} {s['HD95']['median']:7.2f}  {s['n_both_empty']:10d} {s['n_missed']:6d} "
              f"{s['n_false_positive']:2d}")
    print("written: " + ", ".join(paths.values()))
    return 0
