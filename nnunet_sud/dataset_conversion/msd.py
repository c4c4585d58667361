"""Medical Segmentation Decathlon tasks (``TaskXX_Name/imagesTr, labelsTr, imagesTs, dataset.json``).

nnU-Net's own converter (``nnUNetv2_convert_MSD_dataset``: splits the 4D multi-channel NIfTIs into
``CASE_XXXX.nii.gz`` channel files, copies labels, rewrites dataset.json) runs first, in a
subprocess whose ``nnUNet_raw`` points at a private staging folder (so it never sees or clashes
with the user's datasets). Its output is then split like any folder source:

* imagesTr cases: the labeled pool; ``--labeled`` of them keep their labels (imagesTr/labelsTr), the
  others move to imagesUnlabeled without labels; ``--test-list``/``--num-test`` cases go to
  imagesTs/labelsTs.
* MSD's imagesTs (no public labels): ``--imagests-to unlabeled`` (default: extra unlabeled data),
  ``test`` (imagesTs without labels, for prediction only) or ``exclude``.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

from nnunet_sud.errors import UserFacingError
from nnunet_sud.dataset_conversion.folder import scan_folder
from nnunet_sud.dataset_conversion.split import SplitOptions
from nnunet_sud.dataset_conversion.writer import (DatasetSpec, OutputOptions, check_target, resolve_raw_folder,
                                                  write_dataset)

IMAGESTS_CHOICES = ("unlabeled", "test", "exclude")
_CONVERT = ("import sys; from nnunetv2.dataset_conversion.convert_MSD_dataset import convert_msd_dataset; "
            "convert_msd_dataset(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))")


def check_msd_folder(source: str) -> str:
    """Validate the Decathlon layout before nnU-Net's converter asserts; returns the task name."""
    if not os.path.isdir(source):
        raise UserFacingError(f"source folder {source} does not exist")
    base = os.path.basename(source.rstrip("/\\"))
    parts = base.split("_")
    if len(parts) != 2 or not parts[0].startswith("Task") or not parts[0][4:].isdigit():
        raise UserFacingError(f"{source}: a Decathlon task folder is named TaskXX_Name with a single '_' "
                              f"(e.g. Task02_Heart); nnU-Net's converter derives the task from it. Rename the folder.")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        if not os.path.isdir(os.path.join(source, sub)):
            raise UserFacingError(f"{os.path.join(source, sub)} is missing: a Decathlon task has imagesTr, labelsTr, "
                                  f"imagesTs and dataset.json (create an empty imagesTs if the task has no test "
                                  f"images)")
    if not os.path.isfile(os.path.join(source, "dataset.json")):
        raise UserFacingError(f"{os.path.join(source, 'dataset.json')} is missing")
    return parts[1]


def run_nnunet_msd_converter(source: str, staging: str, dataset_id: int, num_processes: int) -> str:
    """nnU-Net's MSD converter into ``staging`` (as its nnUNet_raw); returns the converted folder."""
    env = os.environ.copy()
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = os.path.join(staging, var)
        os.makedirs(env[var], exist_ok=True)
    p = subprocess.run([sys.executable, "-c", _CONVERT, source, str(dataset_id), str(max(1, num_processes))],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if p.returncode != 0:
        raise UserFacingError(f"nnU-Net's MSD converter failed on {source}:\n{p.stdout[-3000:]}\nCheck that the "
                              f"task folder is an unmodified Decathlon download (4D NIfTI images, dataset.json).")
    done = [d for d in os.listdir(env["nnUNet_raw"]) if d.startswith(f"Dataset{dataset_id:03d}_")]
    if len(done) != 1:
        raise UserFacingError(f"nnU-Net's MSD converter produced no dataset for {source}:\n{p.stdout[-3000:]}")
    return os.path.join(env["nnUNet_raw"], done[0])


def convert_msd(source: str, out: OutputOptions, split: SplitOptions, *, imagests_to: str = "unlabeled") -> str:
    """Convert a Decathlon task with nnU-Net's converter, then apply the semi-supervised split."""
    if imagests_to not in IMAGESTS_CHOICES:
        raise UserFacingError(f"--imagests-to must be one of {', '.join(IMAGESTS_CHOICES)}, got {imagests_to!r}")
    source = os.path.abspath(source)
    task_name = check_msd_folder(source)
    if out.name is None:
        out.name = task_name
    check_target(out)  # fail on an existing id before the (slow) conversion
    raw = resolve_raw_folder(out.raw_folder)
    staging = tempfile.mkdtemp(prefix=".nnunet_sud_msd_", dir=raw)
    try:
        converted = run_nnunet_msd_converter(source, staging, out.dataset_id, out.num_processes)
        with open(os.path.join(converted, "dataset.json")) as f:
            djson = json.load(f)
        tr, ending, n_ch = scan_folder(os.path.join(converted, "imagesTr"), os.path.join(converted, "labelsTr"),
                                       ".nii.gz", "yes")
        unlabeled_tr = [c for c, v in tr.items() if v.label_file is None]
        if unlabeled_tr:
            raise UserFacingError(f"{source}/labelsTr has no label for imagesTr case(s) {', '.join(unlabeled_tr[:5])}")
        cases = list(tr.values())
        if os.listdir(os.path.join(converted, "imagesTs")):
            ts, _, n_ts = scan_folder(os.path.join(converted, "imagesTs"), None, ".nii.gz", "yes")
            if n_ts != n_ch:
                raise UserFacingError(f"{source}/imagesTs images have {n_ts} channel(s), imagesTr {n_ch}")
            clash = sorted(set(ts) & set(tr))
            if clash:
                raise UserFacingError(f"case id(s) {', '.join(clash[:5])} are both in imagesTr and imagesTs of "
                                      f"{source}")
            preset = {"unlabeled": "unlabeled", "test": "test", "exclude": "excluded"}[imagests_to]
            for c in ts.values():
                c.preset = preset
            cases += list(ts.values())
        extra = {k: v for k, v in djson.items()
                 if k not in ("channel_names", "labels", "numTraining", "numTest", "file_ending",
                              "regions_class_order", "converted_by")}
        extra["name"] = djson.get("name", task_name)
        spec = DatasetSpec(channel_names={str(k): v for k, v in djson["channel_names"].items()},
                           labels=djson["labels"], file_ending=ending,
                           regions_class_order=djson.get("regions_class_order"), extra_json=extra,
                           label_hint=f"The task's dataset.json declares the labels {djson['labels']}.")
        out.move = True
        record = {"type": "msd", "path": source, "imagests_to": imagests_to,
                  "converter": "nnunetv2.dataset_conversion.convert_MSD_dataset.convert_msd_dataset"}
        return write_dataset(cases, spec, split, out, record)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
