"""Writing a converted dataset: nnU-Net raw layout plus ``split.json``.

The dataset is assembled in a hidden staging folder inside the raw folder and renamed into
place only when every case passed its checks, so a failed conversion leaves nothing behind
(and ``--overwrite`` replaces the old dataset only after the new one is complete).

Layout written::

    DatasetXXX_Name/
        dataset.json        channel_names, labels, numTraining, file_ending, numUnlabeled, numTest
        split.json          labeled / unlabeled / test / excluded ids, seed, source, counts
        imagesTr/ labelsTr/ labeled cases            CASE_0000<ending>, CASE<ending>
        imagesUnlabeled/    unlabeled cases          CASE_0000<ending>
        labelsUnlabeled/    the withheld labels of unlabeled cases (CASE<ending>), if any: preprocess-unlabeled
                            carries them so that trainers can measure the quality of their training targets;
                            they never enter a loss (docs/design.md, Target quality)
        imagesTs/ labelsTs/ test cases (labelsTs only for test cases that have a label)
        splits_final.json   grouped 5-fold cross-validation (only when cases are grouped)
"""
import json
import multiprocessing
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from nnunet_sud.errors import UserFacingError
from nnunet_sud.dataset_conversion.caseio import (H5Case, check_label_values, check_same_geometry, label_values,
                                                  load_h5_case, read_geometry, read_label_array, write_array)
from nnunet_sud.dataset_conversion.split import CaseInfo, Split, SplitOptions, assign_roles, grouped_cv_splits

FOLDERS = {"labeled": ("imagesTr", "labelsTr"), "unlabeled": ("imagesUnlabeled", "labelsUnlabeled"),
           "test": ("imagesTs", "labelsTs")}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")


@dataclass
class SourceCase:
    """One case of a source: image channel files (copied) or an h5 case (converted), label optional."""
    case_id: str
    group: str
    image_files: List[str] = field(default_factory=list)
    label_file: Optional[str] = None
    h5: Optional[H5Case] = None
    preset: Optional[str] = None

    @property
    def has_label(self) -> bool:
        return self.h5.has_label if self.h5 is not None else self.label_file is not None

    def info(self) -> CaseInfo:
        return CaseInfo(self.case_id, self.group, self.has_label, self.preset)


@dataclass
class DatasetSpec:
    """Everything dataset.json needs besides the counts."""
    channel_names: Dict[str, str]
    labels: Optional[Dict[str, object]]      # None: infer "label_<v>" names from the written labels
    file_ending: str
    regions_class_order: Optional[List[int]] = None
    extra_json: Dict[str, object] = field(default_factory=dict)
    label_hint: str = ""                      # what to do when a label has unexpected values

    def allowed_values(self) -> Optional[List[int]]:
        if self.labels is None:
            return None
        vals = set()
        for v in self.labels.values():
            vals.update(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
        return sorted(vals)


@dataclass
class OutputOptions:
    """Where and how to write."""
    dataset_id: int
    name: Optional[str] = None         # None: the source's default name
    raw_folder: Optional[str] = None
    overwrite: bool = False
    num_processes: int = 1
    move: bool = False                 # move source files instead of copying (staged MSD conversion)
    geometry_tolerance: float = 1e-4   # mm (spacing, origin) and direction cosines
    install_cv_splits: bool = True     # write grouped splits_final.json into nnUNet_preprocessed too
    command: Optional[str] = None      # the command line, recorded in split.json


def sanitize_name(name: str) -> str:
    """A dataset name nnU-Net folder names can carry (letters, digits, '_', '-')."""
    s = re.sub(r"[^A-Za-z0-9_\-]+", "_", name).strip("_-")
    return s or "Converted"


def resolve_raw_folder(raw_folder: Optional[str]) -> str:
    raw = raw_folder or os.environ.get("nnUNet_raw")
    if not raw:
        raise UserFacingError("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw or pass -o FOLDER")
    os.makedirs(raw, exist_ok=True)
    return os.path.abspath(raw)


def _id_prefix(dataset_id: int) -> str:
    return f"Dataset{int(dataset_id):03d}_"


def _existing(folder: Optional[str], dataset_id: int) -> List[str]:
    if not folder or not os.path.isdir(folder):
        return []
    return sorted(d for d in os.listdir(folder)
                  if d.startswith(_id_prefix(dataset_id)) and os.path.isdir(os.path.join(folder, d)))


def check_target(out: OutputOptions) -> str:
    """Validate id and name; refuse an existing dataset id unless --overwrite. Returns the final folder."""
    if not (1 <= int(out.dataset_id) <= 999):
        raise UserFacingError(f"-d {out.dataset_id}: nnU-Net dataset ids are 1..999")
    if not _NAME_RE.fullmatch(out.name):
        raise UserFacingError(f"--name {out.name!r}: use letters, digits, '_' and '-' only")
    raw = resolve_raw_folder(out.raw_folder)
    target = _id_prefix(out.dataset_id) + out.name
    existing = _existing(raw, out.dataset_id)
    if existing and not out.overwrite:
        raise UserFacingError(
            f"dataset id {out.dataset_id} already exists: {os.path.join(raw, existing[0])}. Pass --overwrite to "
            f"replace it (its raw folder is deleted), or choose another id with -d.")
    for var in ("nnUNet_preprocessed", "nnUNet_results"):
        others = [d for d in _existing(os.environ.get(var), out.dataset_id) if d != target]
        if others:
            raise UserFacingError(
                f"{os.path.join(os.environ[var], others[0])} uses dataset id {out.dataset_id} under another name; "
                f"nnU-Net would find two datasets for that id. Remove or rename it, or choose another id with -d "
                f"(or --name {others[0][len(_id_prefix(out.dataset_id)):]}).")
    return os.path.join(raw, target)


# ------------------------------------------------------------------------------------- per case
def _transfer(src: str, dst: str, move: bool) -> None:
    if move:
        shutil.move(src, dst)
    else:
        shutil.copyfile(src, dst)


def _process_file_case(case: SourceCase, role: str, staging: str, spec: DatasetSpec, out: OutputOptions,
                       allowed) -> dict:
    """Check a file-based case (channel geometry, label geometry and values) and copy it into place."""
    img_dir, lab_dir = FOLDERS[role]
    geoms = [read_geometry(f) for f in case.image_files]
    for f, g in zip(case.image_files, geoms):
        if len(g.size) not in (2, 3) or g.components != 1:
            raise UserFacingError(
                f"{f}: {len(g.size)}D image with {g.components} component(s) per voxel; nnU-Net expects one 2D/3D "
                f"file per channel (CASE_0000, CASE_0001, ...). Split 4D/multi-component files into channel files "
                f"(for Decathlon tasks use 'nnunet-sud convert msd').")
    for f, g in zip(case.image_files[1:], geoms[1:]):
        check_same_geometry(geoms[0], g, case.image_files[0], f, out.geometry_tolerance)
    result = {"case": case.case_id, "values": None, "size": list(geoms[0].size),
              "spacing": [float(s) for s in geoms[0].spacing]}
    write_label = lab_dir is not None and case.label_file is not None
    if write_label:
        check_same_geometry(geoms[0], read_geometry(case.label_file), case.image_files[0], case.label_file,
                            out.geometry_tolerance)
        vals = label_values(read_label_array(case.label_file), case.label_file)
        check_label_values(vals, allowed, case.label_file, spec.label_hint)
        result["values"] = vals
    for c, f in enumerate(case.image_files):
        _transfer(f, os.path.join(staging, img_dir, f"{case.case_id}_{c:04d}{spec.file_ending}"), out.move)
    if write_label:
        _transfer(case.label_file, os.path.join(staging, lab_dir, case.case_id + spec.file_ending), out.move)
    return result


def _process_h5_case(case: SourceCase, role: str, staging: str, spec: DatasetSpec, out: OutputOptions,
                     allowed) -> dict:
    """Load an h5 case, check its label values and write image (+ label) as NIfTI."""
    import numpy as np
    img_dir, lab_dir = FOLDERS[role]
    with_label = lab_dir is not None and case.h5.has_label
    image, label, spacing = load_h5_case(case.h5, case.case_id, with_label)
    result = {"case": case.case_id, "values": None, "size": list(image.shape[::-1]),
              "spacing": [float(s) for s in spacing]}
    write_array(image, spacing, os.path.join(staging, img_dir, f"{case.case_id}_0000{spec.file_ending}"))
    if with_label:
        name = f"label of case '{case.case_id}' ({case.h5.files[0]})"
        vals = label_values(label, name)
        check_label_values(vals, allowed, name, spec.label_hint)
        result["values"] = vals
        write_array(label.astype(np.uint8 if vals[-1] < 256 else np.uint16),
                    spacing, os.path.join(staging, lab_dir, case.case_id + spec.file_ending))
    return result


def _process_case(job) -> dict:
    case, role, staging, spec, out, allowed = job
    fn = _process_h5_case if case.h5 is not None else _process_file_case
    return fn(case, role, staging, spec, out, allowed)


def _run_jobs(jobs: list, num_processes: int) -> List[dict]:
    if num_processes <= 1 or len(jobs) <= 1:
        return [_process_case(j) for j in jobs]
    with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
        return list(pool.imap(_process_case, jobs, chunksize=1))


# ------------------------------------------------------------------------------------ dataset
def _infer_labels(results: List[dict]) -> Dict[str, int]:
    vals = set()
    for r in results:
        vals.update(r["values"] or [])
    top = max(vals) if vals else 1
    labels = {"background": 0}
    labels.update({f"label_{v}": v for v in range(1, max(top, 1) + 1)})
    return labels


def _write_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)


def _remove_stale_splits(dataset_names: Sequence[str]) -> List[str]:
    """Delete nnUNet_preprocessed/<name>/splits_final.json of replaced datasets (their cases changed)."""
    pre = os.environ.get("nnUNet_preprocessed")
    removed = []
    for n in dataset_names:
        f = os.path.join(pre, n, "splits_final.json") if pre else None
        if f and os.path.isfile(f):
            os.remove(f)
            removed.append(f)
    return removed


def write_dataset(cases: Sequence[SourceCase], spec: DatasetSpec, split_opts: SplitOptions, out: OutputOptions,
                  source: dict, grouped: bool = False) -> str:
    """Split ``cases``, check and write them, dataset.json and split.json. Returns the dataset folder."""
    final = check_target(out)
    raw = os.path.dirname(final)
    split = assign_roles([c.info() for c in cases], split_opts)
    staging = os.path.join(raw, f".nnunet_sud_converting_{os.path.basename(final)}_{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for sub in ("imagesTr", "labelsTr", "imagesUnlabeled", "labelsUnlabeled", "imagesTs", "labelsTs"):
            os.makedirs(os.path.join(staging, sub))
        allowed = spec.allowed_values()
        jobs = [(c, split.roles[c.case_id], staging, spec, out, allowed) for c in cases
                if split.roles[c.case_id] != "excluded"]
        t0 = time.time()
        results = _run_jobs(jobs, out.num_processes)
        # inferred from the labels training sees (labeled, test), not from the withheld ones
        labels = spec.labels if spec.labels is not None else \
            _infer_labels([r for r, j in zip(results, jobs) if j[1] != "unlabeled"])
        n = {r: len(split.cases(r)) for r in ("labeled", "unlabeled", "test", "excluded")}
        _write_dataset_json(staging, spec, labels, n, final)
        cv = grouped_cv_splits(split) if grouped else None
        if cv is not None:
            _write_json(cv, os.path.join(staging, "splits_final.json"))
        withheld = [c.case_id for c in cases if split.roles[c.case_id] == "unlabeled" and c.has_label]
        record = _split_record(split, split_opts, source, withheld, n, grouped)
        if out.command:
            record["command"] = out.command
        _write_json(record, os.path.join(staging, "split.json"))
        for sub in ("labelsTs", "labelsUnlabeled"):
            if not os.listdir(os.path.join(staging, sub)):
                os.rmdir(os.path.join(staging, sub))
        replaced = _existing(raw, out.dataset_id)
        for d in replaced:
            shutil.rmtree(os.path.join(raw, d))
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    removed = _remove_stale_splits(sorted(set(replaced) | {os.path.basename(final)}))
    installed = _install_cv_splits(cv, final) if (cv is not None and out.install_cv_splits) else None
    _print_summary(final, split, n, time.time() - t0, replaced, removed, installed, grouped)
    return final


def _write_dataset_json(staging: str, spec: DatasetSpec, labels: dict, n: dict, final: str) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    extra = dict(spec.extra_json)
    extra.update(numUnlabeled=n["unlabeled"], numTest=n["test"])
    kwargs = {k: extra.pop(k) for k in ("license", "reference", "release", "description")
              if k in extra}
    if "licence" in extra:  # the Decathlon / nnU-Net spelling
        kwargs["license"] = extra.pop("licence")
    kwargs.setdefault("license", "that of the source data set (see its terms of use)")
    generate_dataset_json(staging, dict(spec.channel_names), dict(labels), n["labeled"], spec.file_ending,
                          regions_class_order=spec.regions_class_order,
                          dataset_name=extra.pop("name", os.path.basename(final).split("_", 1)[1]),
                          converted_by="nnunet-sud convert", **kwargs, **extra)


def _split_record(split: Split, opts: SplitOptions, source: dict, withheld: List[str], n: dict,
                  grouped: bool) -> dict:
    """Content of split.json: enough to understand and reproduce the split."""
    import nnunet_sud
    rec = {
        "source": source,
        "seed": opts.seed,
        "selection": split.selection,
        "labeled_request": opts.labeled,
        "test_seed": opts.test_seed if opts.num_test else None,
        "num_test_request": opts.num_test or None,
        "split_file": os.path.abspath(opts.split_file) if opts.split_file else None,
        "counts": {**n, "labeled_groups": len(split.labeled_groups),
                   "labeled_groups_available": split.n_labeled_available,
                   "withheld_labels": len(withheld)},
        "labeled": split.cases("labeled"),
        "unlabeled": split.cases("unlabeled"),
        "test": split.cases("test"),
        "excluded": split.cases("excluded"),
        "withheld_labels": withheld,
        "labeled_groups": split.labeled_groups,
        "created_by": f"nnunet_sud {nnunet_sud.__version__}",
    }
    if grouped:
        rec["groups"] = split.groups
    return rec


def _install_cv_splits(cv: List[dict], final: str) -> Optional[str]:
    pre = os.environ.get("nnUNet_preprocessed")
    if not pre:
        return None
    folder = os.path.join(pre, os.path.basename(final))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "splits_final.json")
    _write_json(cv, path)
    return path


def _print_summary(final, split, n, seconds, replaced, removed, installed, grouped) -> None:
    print(f"wrote {final} in {seconds:.1f} s: {n['labeled']} labeled ({len(split.labeled_groups)} "
          f"{'groups' if grouped else 'cases'}, selection '{split.selection}'), {n['unlabeled']} unlabeled, "
          f"{n['test']} test" + (f", {n['excluded']} excluded" if n["excluded"] else ""))
    if replaced:
        print(f"replaced {', '.join(replaced)}; re-run nnUNetv2_plan_and_preprocess and "
              f"nnunet-sud preprocess-unlabeled: preprocessed data of the old dataset is stale")
    for f in removed:
        print(f"removed stale {f}")
    if installed:
        print(f"grouped cross-validation folds written to {installed}")
    for note in split.notes:
        print(f"note: {note}")
