"""The student's nnU-Net dataset: labeled cases + kept pseudo-labeled cases, the teacher's plans.

Dataset ids: round r of a run writes ``Dataset<S + r - 1>_<teacher name>_selftrain_r<r>``, where
``S = --student-id`` (default: the teacher's id + 100). An id already used by a dataset that this
run did not write (no ``self_training.json`` of the same settings in its raw folder) is refused,
never overwritten.

Raw folder (``nnUNet_raw``), built in a hidden staging folder and renamed into place when complete:

    imagesTr/, labelsTr/   the teacher dataset's labeled cases (hard links, copies across file
                           systems) and the kept unlabeled cases with their filtered pseudo-labels
    dataset.json           the teacher's, with ``"ignore"`` = highest label + 1 added (nnU-Net
                           requires the ignore label to be the largest value) unless the teacher
                           has one; region-based label set-ups are refused (pseudo-labels and
                           their confidence are per class of a softmax)
    self_training.json     who wrote it: the run's settings, the round, the cases

Test cases never enter: neither ``imagesTs`` nor a case that the teacher dataset's ``split.json``
lists as test, whatever folder it sits in. Validation: the student's ``splits_final.json`` is the
teacher's, with the pseudo-labeled cases added to the training cases of the run's fold only (they
were predicted by the teacher of that fold); the teacher's validation cases stay validation cases.
When ``split.json`` groups cases (e.g. frames of one patient), pseudo-labeled cases of a group
with a validation case of the fold stay out of that fold's training too.
"""
import json
import os
import shutil
from typing import Dict, List, Optional, Sequence, Set, Tuple

from nnunet_sud.errors import UserFacingError

MARKER = "self_training.json"


def student_dataset_name(student_id: int, teacher_name: str, round_: int) -> str:
    short = teacher_name.split("_", 1)[1] if "_" in teacher_name else teacher_name
    return f"Dataset{int(student_id):03d}_{short}_selftrain_r{round_}"


def labels_with_ignore(labels: Dict[str, object], regions_class_order=None) -> Tuple[Dict[str, object], int]:
    """The teacher's ``labels`` with an ``ignore`` entry (highest label + 1) and the ignore value."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    if any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values()):
        raise UserFacingError("the teacher dataset uses region-based labels (dataset.json 'labels' with lists): "
                              "self-training makes its pseudo-labels and confidences from a softmax over classes, "
                              "which region-based (sigmoid) training does not have. Use a dataset with plain "
                              "integer labels.")
    try:
        lm = LabelManager(labels, regions_class_order)
    except (AssertionError, RuntimeError, ValueError, TypeError) as e:
        raise UserFacingError(f"the teacher dataset's dataset.json 'labels' are not what nnU-Net accepts: {e}") from None
    if lm.has_ignore_label:
        return dict(labels), int(lm.ignore_label)
    out = dict(labels)
    out["ignore"] = int(max(lm.all_labels)) + 1
    return out, out["ignore"]


def _case_ids(folder: str, file_ending: str, channel_suffix: bool) -> Set[str]:
    if not os.path.isdir(folder):
        return set()
    out = set()
    for f in os.listdir(folder):
        if f.endswith(file_ending) and not f.startswith("."):
            cid = f[:-len(file_ending)]
            out.add(cid[:-5] if channel_suffix and len(cid) > 5 and cid[-5] == "_" and cid[-4:].isdigit() else cid)
    return out


def held_out_cases(raw_folder: str, file_ending: str) -> Set[str]:
    """Case ids that must never train: imagesTs/labelsTs and the ``test`` list of split.json."""
    out = _case_ids(os.path.join(raw_folder, "imagesTs"), file_ending, True)
    out |= _case_ids(os.path.join(raw_folder, "labelsTs"), file_ending, False)
    split_file = os.path.join(raw_folder, "split.json")
    if os.path.isfile(split_file):
        with open(split_file) as f:
            out |= set(json.load(f).get("test", []))
    return out


def case_groups(raw_folder: str) -> Optional[Dict[str, List[str]]]:
    """``groups`` of the teacher dataset's split.json (written by ``nnunet-sud convert`` for grouped cases)."""
    split_file = os.path.join(raw_folder, "split.json")
    if not os.path.isfile(split_file):
        return None
    with open(split_file) as f:
        return json.load(f).get("groups")


def student_splits(teacher_splits: List[dict], fold: int, pseudo_cases: Sequence[str],
                   groups: Optional[Dict[str, List[str]]] = None) -> Tuple[List[dict], List[str]]:
    """The teacher's splits with ``pseudo_cases`` added to fold ``fold``'s training cases.

    Returns (splits, pseudo cases left out of the fold's training because their group holds one
    of its validation cases)."""
    if not 0 <= fold < len(teacher_splits):
        raise UserFacingError(f"fold {fold} is not in the teacher's splits_final.json ({len(teacher_splits)} folds)")
    val = set(teacher_splits[fold]["val"])
    blocked: Set[str] = set()
    for members in (groups or {}).values():
        if val & set(members):
            blocked |= set(members)
    left_out = sorted(c for c in pseudo_cases if c in blocked)
    overlap = sorted(set(pseudo_cases) & (val | set(teacher_splits[fold]["train"])))
    if overlap:
        raise UserFacingError(f"pseudo-labeled cases {overlap[:5]} are also labeled cases of the teacher's split; "
                              f"imagesUnlabeled and imagesTr must not share case ids")
    splits = [{"train": list(s["train"]), "val": list(s["val"])} for s in teacher_splits]
    splits[fold]["train"] += [c for c in pseudo_cases if c not in blocked]
    return splits, left_out


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def read_marker(raw_folder: str) -> Optional[dict]:
    path = os.path.join(raw_folder, MARKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_student_id(student_id: int, name: str, settings: dict, dataset_folders: Dict[str, str]) -> bool:
    """True when dataset ``name`` exists and was written by a run with these ``settings`` (ours);
    False when the id is free. Raises UserFacingError when the id belongs to anything else."""
    if not 1 <= int(student_id) <= 999:
        raise UserFacingError(f"student dataset id {student_id} is outside nnU-Net's 1-999: choose --student-id "
                              f"so that every round's id (--student-id + round - 1) fits")
    prefix = f"Dataset{int(student_id):03d}_"
    found = {}
    for kind, root in dataset_folders.items():
        if os.path.isdir(root):
            for d in os.listdir(root):
                if d.startswith(prefix):
                    found.setdefault(d, []).append(kind)
    if not found:
        return False
    others = sorted(d for d in found if d != name)
    if others:
        raise UserFacingError(f"dataset id {student_id} is taken by {', '.join(others)} (in "
                              f"{', '.join(found[others[0]])}), which this self-training run did not write. "
                              f"Choose another --student-id (round r uses --student-id + r - 1).")
    marker = read_marker(os.path.join(dataset_folders["nnUNet_raw"], name))
    if marker is None:
        raise UserFacingError(f"{name} exists (in {', '.join(found[name])}) but has no raw folder with "
                              f"{MARKER}: it is not a student dataset of this run. Choose another --student-id or "
                              f"remove {name} from {', '.join(found[name])}.")
    if marker.get("settings") != settings:
        diff = sorted(k for k in set(settings) | set(marker.get("settings", {}))
                      if settings.get(k) != marker.get("settings", {}).get(k))
        raise UserFacingError(f"{name} holds a student of a self-training run with other settings (differing: "
                              f"{', '.join(diff)}). Use another --student-id for these settings, or delete {name} "
                              f"(raw, preprocessed, results) and the run's work folder to start over.")
    return True


def write_student_raw(raw_root: str, name: str, teacher_raw: str, teacher_dataset_json: dict,
                      pseudo_cases: Dict[str, Tuple[List[str], str]], labels: Dict[str, object],
                      held_out: Set[str], marker: dict) -> str:
    """Write ``raw_root/name`` (labeled cases of ``teacher_raw`` + ``pseudo_cases``: {case: (image files,
    filtered label file)}); returns the folder. Replaces an earlier folder of the same run."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    ending = teacher_dataset_json["file_ending"]
    labeled = get_filenames_of_train_images_and_targets(teacher_raw, dict(teacher_dataset_json))
    clash = sorted(set(labeled) & set(pseudo_cases))
    if clash:
        raise UserFacingError(f"cases {clash[:5]} are in imagesTr and imagesUnlabeled of {teacher_raw}: case ids must "
                              f"be unique")
    leaked = sorted((set(labeled) | set(pseudo_cases)) & held_out)
    if leaked:
        raise UserFacingError(f"test cases {leaked[:5]} of {teacher_raw} (imagesTs or split.json 'test') would enter "
                              f"the student dataset; remove them from imagesTr/imagesUnlabeled")
    final = os.path.join(raw_root, name)
    staging = os.path.join(raw_root, f".staging_{name}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.join(staging, "imagesTr"))
    os.makedirs(os.path.join(staging, "labelsTr"))
    cases = {**{c: (v["images"], v["label"]) for c, v in labeled.items()}, **pseudo_cases}
    for case, (images, label) in sorted(cases.items()):
        for ch, img in enumerate(images):
            _link_or_copy(img, os.path.join(staging, "imagesTr", f"{case}_{ch:04d}{ending}"))
        shutil.copyfile(label, os.path.join(staging, "labelsTr", f"{case}{ending}"))
    ds = {k: v for k, v in teacher_dataset_json.items()
          if k not in ("dataset", "numUnlabeled", "numTest", "labels", "numTraining")}
    ds.update(labels=labels, numTraining=len(cases), name=name.split("_", 1)[1],
              description=f"self-training student (round {marker['round']}) of {marker['settings']['teacher_dataset']}: "
                          f"{len(labeled)} labeled + {len(pseudo_cases)} pseudo-labeled cases (nnunet-sud self-train)")
    with open(os.path.join(staging, "dataset.json"), "w") as f:
        json.dump(ds, f, indent=1)
    with open(os.path.join(staging, MARKER), "w") as f:
        json.dump({**marker, "labeled": sorted(labeled), "pseudo_labeled": sorted(pseudo_cases)}, f, indent=1)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(staging, final)
    return final
