"""File-based sources: a folder of images with labels for some of them, and KiTS19.

``folder``: ``SOURCE/images`` (or ``imagesTr``) and ``SOURCE/labels`` (or ``labelsTr``), any
format nnU-Net reads, matched by case id. Multi-channel cases use nnU-Net's channel naming
``CASE_0000<ending>``; single-channel files may lack the suffix. Images without a label are
unlabeled; labeled cases beyond ``--labeled`` become unlabeled too (labels withheld). Files are
copied byte for byte (geometry and storage type are preserved) and renamed to nnU-Net's naming.

``kits19``: ``SOURCE/case_XXXXX/imaging.nii.gz`` + ``segmentation.nii.gz`` (or ``SOURCE/data/...``
as in the kits19 repository), labels kidney 1, tumor 2. dataset.json declares the evaluation
regions of the SUD paper: kidney = {1, 2} (tumor counts as kidney) and tumor = {2}.
"""
import json
import os
from typing import Dict, List, Optional, Sequence

from nnunet_sud.errors import UserFacingError
from nnunet_sud.dataset_conversion.caseio import (choose_file_ending, group_channels, list_image_files,
                                                  supported_file_endings)
from nnunet_sud.dataset_conversion.split import SplitOptions, compile_group_regex, group_of
from nnunet_sud.dataset_conversion.writer import (DatasetSpec, OutputOptions, SourceCase, sanitize_name,
                                                  write_dataset)

IMAGE_DIR_CANDIDATES = ("images", "imagesTr")
LABEL_DIR_CANDIDATES = ("labels", "labelsTr")

KITS_LABELS_REGIONS = {"background": 0, "kidney": [1, 2], "tumor": 2}
KITS_REGIONS_CLASS_ORDER = [1, 2]
KITS_LABELS_PLAIN = {"background": 0, "kidney": 1, "tumor": 2}


def _find_dir(source: str, given: Optional[str], candidates: Sequence[str], what: str,
              required: bool = True) -> Optional[str]:
    """``given`` (relative to ``source`` unless absolute) or the one existing candidate.

    Two existing candidates (e.g. ``images/`` and ``imagesTr/``) are an error: which one holds the
    cases is the user's choice, not the order of our list."""
    if given:
        path = given if os.path.isabs(given) else os.path.join(source, given)
        if not os.path.isdir(path):
            raise UserFacingError(f"{what} folder {path} does not exist")
        return path
    found = [c for c in candidates if os.path.isdir(os.path.join(source, c))]
    if len(found) > 1:
        raise UserFacingError(
            f"{source} has {' and '.join(f'{c}/' for c in found)}: both could hold the {what}, and only one is "
            f"converted. Say which with --{what}-dir {found[0]} or --{what}-dir {found[1]} (or remove or rename "
            f"the other folder).")
    if found:
        return os.path.join(source, found[0])
    if required:
        raise UserFacingError(f"no {what} folder in {source}: expected one of {', '.join(candidates)} "
                              f"(or name it with --{what}-dir)")
    return None


def _source_dataset_json(source: str) -> dict:
    """dataset.json of the source when it already is an nnU-Net raw dataset (else {})."""
    path = os.path.join(source, "dataset.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise UserFacingError(f"{path} is not valid JSON ({e}); fix or remove it") from None


def _labels_from_names(names: Sequence[str]) -> Dict[str, int]:
    if not names or names[0] != "background":
        raise UserFacingError(f"--label-names {' '.join(names)}: the first name is value 0 and must be 'background'")
    if len(set(names)) != len(names):
        raise UserFacingError(f"--label-names {' '.join(names)}: names must be unique")
    return {n: i for i, n in enumerate(names)}


def scan_folder(images_dir: str, labels_dir: Optional[str], file_ending: Optional[str] = None,
                channel_suffix: str = "auto", group_regex: Optional[str] = None):
    """Cases of an image folder and a label folder, matched by case id.

    Returns (cases {id: SourceCase} sorted by id, file ending, number of channels). A label whose
    image is missing is an error, as are label files of another ending than the images.
    """
    endings = supported_file_endings()
    found = list_image_files(images_dir, endings, "images")
    ending = choose_file_ending(found, file_ending, images_dir)
    labels: Dict[str, str] = {}
    if labels_dir is not None:
        lab_found = list_image_files(labels_dir, endings, "labels")
        other = {e: v for e, v in lab_found.items() if e != ending}
        if other:
            e, files = next(iter(other.items()))
            raise UserFacingError(f"{os.path.join(labels_dir, files[0])}: labels must use the images' file ending "
                                  f"'{ending}' (nnU-Net needs one ending per dataset); convert the labels")
        labels = {f[: -len(ending)]: os.path.join(labels_dir, f) for f in lab_found.get(ending, [])}
    images = group_channels(found[ending], ending, channel_suffix, list(labels), images_dir)
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise UserFacingError(
            f"label(s) without image: {', '.join(orphans[:5])}{' ...' if len(orphans) > 5 else ''} in {labels_dir}. "
            f"Labels are matched to images by case id (image CASE_0000{ending} or CASE{ending} <-> label "
            f"CASE{ending}); rename the files or remove the labels.")
    regex = compile_group_regex(group_regex)
    cases = {cid: SourceCase(cid, group_of(cid, regex), image_files=files, label_file=labels.get(cid))
             for cid, files in sorted(images.items())}
    n_channels = len(next(iter(images.values()))) if images else 0
    return cases, ending, n_channels


def order_and_restrict(cases: Dict[str, SourceCase], train_ids: Optional[Sequence[str]],
                       test_ids: Optional[Sequence[str]], list_name: str = "--train-list") -> List[SourceCase]:
    """Cases in the train list's order; cases in neither the train nor the test list are excluded."""
    if not train_ids:
        return list(cases.values())
    missing = [i for i in train_ids if i not in cases]
    if missing:
        raise UserFacingError(f"{list_name} names case(s) without an image: {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}")
    listed = set(train_ids) | set(test_ids or ())
    ordered = [cases[i] for i in train_ids] + [c for cid, c in cases.items() if cid not in set(train_ids)]
    for c in ordered:
        if c.case_id not in listed:
            c.preset = "excluded"
    return ordered


def convert_folder(source: str, out: OutputOptions, split: SplitOptions, *, images_dir: Optional[str] = None,
                   labels_dir: Optional[str] = None, train_ids: Optional[Sequence[str]] = None,
                   group_regex: Optional[str] = None, channel_names: Optional[Sequence[str]] = None,
                   label_names: Optional[Sequence[str]] = None, file_ending: Optional[str] = None,
                   channel_suffix: str = "auto", drop_unlabeled_images: bool = False) -> str:
    """Convert a folder of images (+ labels for some) into an nnU-Net raw dataset; returns its folder."""
    source = os.path.abspath(source)
    if not os.path.isdir(source):
        raise UserFacingError(f"source folder {source} does not exist")
    src_json = _source_dataset_json(source)
    img_dir = _find_dir(source, images_dir, IMAGE_DIR_CANDIDATES, "images")
    lab_dir = _find_dir(source, labels_dir, LABEL_DIR_CANDIDATES, "labels", required=False)
    cases, ending, n_ch = scan_folder(img_dir, lab_dir, file_ending or src_json.get("file_ending"),
                                      channel_suffix, group_regex)
    ordered = order_and_restrict(cases, train_ids, split.test_ids)
    if drop_unlabeled_images:
        for c in ordered:
            if not c.has_label and c.preset is None:
                c.preset = "excluded"
    if channel_names:
        if len(channel_names) != n_ch:
            raise UserFacingError(f"--channel-names gives {len(channel_names)} name(s) but the cases have {n_ch} "
                                  f"channel(s)")
        ch = {str(i): n for i, n in enumerate(channel_names)}
    elif src_json.get("channel_names") and len(src_json["channel_names"]) == n_ch:
        ch = {str(k): v for k, v in src_json["channel_names"].items()}
    else:
        ch = {str(i): ("image" if n_ch == 1 else f"channel_{i}") for i in range(n_ch)}
    labels = _labels_from_names(label_names) if label_names else src_json.get("labels")
    spec = DatasetSpec(channel_names=ch, labels=labels, file_ending=ending,
                       regions_class_order=src_json.get("regions_class_order") if not label_names else None,
                       label_hint="Declare all classes with --label-names (value 0 first) or fix the label.")
    if out.name is None:
        out.name = sanitize_name(os.path.basename(source))
    record = {"type": "folder", "path": source, "images_dir": img_dir, "labels_dir": lab_dir,
              "group_regex": group_regex, "train_list_used": bool(train_ids), "file_ending": ending,
              "channels": n_ch}
    return write_dataset(ordered, spec, split, out, record, grouped=bool(group_regex))


def _kits_case_root(source: str) -> str:
    for root in (source, os.path.join(source, "data")):
        if os.path.isdir(root) and any(d.startswith("case_") for d in os.listdir(root)):
            return root
    raise UserFacingError(f"no case_XXXXX folders in {source} (nor in {os.path.join(source, 'data')}): expected the "
                          f"KiTS19 layout case_00000/imaging.nii.gz, segmentation.nii.gz")


def kits19_cases(source: str, drop_unlabeled_images: bool = False) -> List[SourceCase]:
    """One case per ``case_XXXXX`` folder; a missing segmentation makes the case unlabeled."""
    root = _kits_case_root(source)
    cases = []
    for d in sorted(os.listdir(root)):
        folder = os.path.join(root, d)
        if not d.startswith("case_") or not os.path.isdir(folder):
            continue
        img = os.path.join(folder, "imaging.nii.gz")
        if not os.path.isfile(img):
            raise UserFacingError(f"{img} is missing: every KiTS19 case folder needs imaging.nii.gz "
                                  f"(remove the folder {folder} if it is not a case)")
        seg = os.path.join(folder, "segmentation.nii.gz")
        seg = seg if os.path.isfile(seg) else None
        preset = "excluded" if (seg is None and drop_unlabeled_images) else None
        cases.append(SourceCase(d, d, image_files=[img], label_file=seg, preset=preset))
    return cases


def convert_kits19(source: str, out: OutputOptions, split: SplitOptions, *, regions: bool = True,
                   drop_unlabeled_images: bool = False) -> str:
    """Convert the KiTS19 layout; dataset.json uses nnU-Net regions kidney={1,2}, tumor={2} by default."""
    source = os.path.abspath(source)
    if not os.path.isdir(source):
        raise UserFacingError(f"source folder {source} does not exist")
    cases = kits19_cases(source, drop_unlabeled_images)
    spec = DatasetSpec(channel_names={"0": "CT"},
                       labels=dict(KITS_LABELS_REGIONS if regions else KITS_LABELS_PLAIN),
                       file_ending=".nii.gz",
                       regions_class_order=list(KITS_REGIONS_CLASS_ORDER) if regions else None,
                       extra_json={"reference": "KiTS19, Heller et al., Medical Image Analysis 2021"},
                       label_hint="KiTS19 labels are 0 background, 1 kidney, 2 tumor.")
    if out.name is None:
        out.name = "KiTS19"
    record = {"type": "kits19", "path": source, "regions": regions}
    return write_dataset(cases, spec, split, out, record)
