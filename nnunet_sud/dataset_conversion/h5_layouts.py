"""The h5 layouts of the semi-supervised literature (UA-MT / SSL4MIS).

``la-h5`` (UA-MT Left Atrium)::

    SOURCE/train.list, test.list                one case id per line
    SOURCE/<ID>/mri_norm2.h5                    (or SOURCE/2018LA_Seg_Training Set/<ID>/mri_norm2.h5)
        image (x, y, z) float, label (x, y, z) {0, 1}

Spacing: read from an h5 attribute/dataset ``spacing`` when present, else 0.625 mm isotropic
(``--spacing``). Default selection: ``first`` -- the labeled cases are the first N of train.list,
exactly as UA-MT and SSL4MIS do (``labeled_idxs = range(N)``); ``--select random`` draws them
with ``--seed`` instead. test.list cases go to imagesTs/labelsTs.

``acdc-h5`` (SSL4MIS ACDC)::

    SOURCE/train.list, val.list, test.list      frame ids patientXXX_frameYY (slice names are mapped
                                                to their frame; train_slices.list is used when
                                                train.list is missing)
    SOURCE/data/patientXXX_frameYY.h5           3D frame: image, label (z, y, x)
    SOURCE/data/slices/patientXXX_frameYY_slice_N.h5   2D slices, stacked along z (N = 0, 1, ...)
                                                when the 3D file is missing

Spacing is not stored: nominal 1.5625 x 1.5625 mm in-plane, 10 mm between slices (``--spacing X Y
Z``). Cases are grouped by patient (both frames on one side; ``--labeled`` counts patients, like
the literature's 3 / 7 labeled patients). Default selection ``first`` (SSL4MIS takes the slices of
the first N patients of its training list). val.list: ``--val-to exclude`` (default; SSL4MIS uses it
for model selection, which nnU-Net does not do), ``test``, ``unlabeled`` or ``pool``.
"""
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from nnunet_sud.errors import UserFacingError
from nnunet_sud.dataset_conversion.caseio import H5Case
from nnunet_sud.dataset_conversion.split import SplitOptions, compile_group_regex, group_of, read_id_list
from nnunet_sud.dataset_conversion.writer import DatasetSpec, OutputOptions, SourceCase, write_dataset

LA_SPACING = (0.625, 0.625, 0.625)
LA_LABELS = {"background": 0, "left_atrium": 1}
LA_CASE_DIRS = ("", "2018LA_Seg_Training Set", os.path.join("data", "2018LA_Seg_Training Set"))

ACDC_SPACING = (1.5625, 1.5625, 10.0)
ACDC_LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
ACDC_GROUP_REGEX = r"^(patient\d+)"
VAL_CHOICES = ("exclude", "test", "unlabeled", "pool")
_SLICE_RE = re.compile(r"^(.+)_slice_(\d+)$")


def _has_label(path: str) -> bool:
    import h5py
    try:
        with h5py.File(path, "r") as f:
            return "label" in f
    except OSError as e:
        raise UserFacingError(f"cannot open {path} as h5 ({e})") from None


def _lists_disjoint(named: Dict[str, List[str]]) -> None:
    seen: Dict[str, str] = {}
    for name, ids in named.items():
        for i in ids:
            if i in seen:
                raise UserFacingError(f"case '{i}' is in both {seen[i]} and {name}; the lists must be disjoint")
            seen[i] = name


# ------------------------------------------------------------------------------------ Left Atrium
def _la_case_root(source: str, first_id: str, h5_name: str, cases_dir: Optional[str]) -> str:
    if cases_dir:
        root = cases_dir if os.path.isabs(cases_dir) else os.path.join(source, cases_dir)
        if not os.path.isdir(root):
            raise UserFacingError(f"--cases-dir {root} does not exist")
        return root
    for sub in LA_CASE_DIRS:
        root = os.path.join(source, sub)
        if os.path.isfile(os.path.join(root, first_id, h5_name)):
            return root
    raise UserFacingError(
        f"cannot find {first_id}/{h5_name} (first case of train.list) in {source} or its subfolders "
        f"{', '.join(repr(s) for s in LA_CASE_DIRS[1:])}; point --cases-dir at the folder holding the case folders")


def la_h5_cases(source: str, h5_name: str = "mri_norm2.h5", spacing: Sequence[float] = LA_SPACING,
                cases_dir: Optional[str] = None, axes: str = "xyz") -> List[SourceCase]:
    """train.list cases (in list order), then test.list cases (preset 'test')."""
    train = read_id_list(os.path.join(source, "train.list"), "train.list")
    test_file = os.path.join(source, "test.list")
    test = read_id_list(test_file, "test.list", allow_empty=True) if os.path.isfile(test_file) else []
    _lists_disjoint({"train.list": train, "test.list": test})
    root = _la_case_root(source, train[0], h5_name, cases_dir)
    cases = []
    for cid, preset in [(i, None) for i in train] + [(i, "test") for i in test]:
        path = os.path.join(root, cid, h5_name)
        if not os.path.isfile(path):
            raise UserFacingError(f"case '{cid}' ({'test' if preset else 'train'}.list): {path} is missing")
        h5 = H5Case([path], axes=axes, spacing=tuple(spacing), has_label=_has_label(path))
        cases.append(SourceCase(cid, cid, h5=h5, preset=preset))
    return cases


def convert_la_h5(source: str, out: OutputOptions, split: SplitOptions, *, h5_name: str = "mri_norm2.h5",
                  spacing: Sequence[float] = LA_SPACING, cases_dir: Optional[str] = None, axes: str = "xyz") -> str:
    """Convert the UA-MT Left Atrium h5 layout; default selection 'first' (UA-MT's labeled cases)."""
    source = os.path.abspath(source)
    if not os.path.isdir(source):
        raise UserFacingError(f"source folder {source} does not exist")
    cases = la_h5_cases(source, h5_name, spacing, cases_dir, axes)
    split.select = split.select or "first"
    spec = DatasetSpec(channel_names={"0": "MRI"}, labels=dict(LA_LABELS), file_ending=".nii.gz",
                       extra_json={"reference": "2018 Atrial Segmentation Challenge; UA-MT preprocessing"},
                       label_hint="Left Atrium labels are 0/1 (UA-MT stores label == 255 as 1).")
    if out.name is None:
        out.name = "LeftAtrium"
    record = {"type": "la-h5", "path": source, "h5_name": h5_name, "default_spacing": list(spacing),
              "axes": axes}
    return write_dataset(cases, spec, split, out, record)


# ------------------------------------------------------------------------------------------ ACDC
def _frame_ids(path: str, what: str, allow_empty: bool = False) -> List[str]:
    """Frame ids of a list file; slice entries (``..._slice_N``) map to their frame."""
    out, seen = [], set()
    for i in read_id_list(path, what, allow_empty):
        m = _SLICE_RE.match(i)
        fid = m.group(1) if m else i
        if fid not in seen:
            seen.add(fid)
            out.append(fid)
    return out


def _slice_index(slices_dir: str) -> Dict[str, Dict[int, str]]:
    """{frame id: {slice number: path}} of ``data/slices``."""
    index: Dict[str, Dict[int, str]] = {}
    if not os.path.isdir(slices_dir):
        return index
    for f in os.listdir(slices_dir):
        if not f.endswith(".h5"):
            continue
        m = _SLICE_RE.match(f[:-3])
        if m:
            index.setdefault(m.group(1), {})[int(m.group(2))] = os.path.join(slices_dir, f)
    return index


def _acdc_files(fid: str, data_dir: str, slices: Dict[str, Dict[int, str]]) -> Tuple[List[str], bool]:
    """(files, stacked) of a frame: the 3D file, else its slices in order."""
    vol = os.path.join(data_dir, fid + ".h5")
    if os.path.isfile(vol):
        return [vol], False
    if fid not in slices:
        raise UserFacingError(f"frame '{fid}': neither {vol} nor slices {os.path.join(data_dir, 'slices', fid)}"
                              f"_slice_N.h5 exist")
    nums = sorted(slices[fid])
    missing = sorted(set(range(nums[-1] + 1)) - set(nums))
    if nums[0] != 0 or missing:
        raise UserFacingError(f"frame '{fid}': slice files {', '.join(f'{fid}_slice_{n}.h5' for n in missing[:5])} "
                              f"are missing in {os.path.join(data_dir, 'slices')}; slices must be numbered 0..N-1")
    return [slices[fid][n] for n in nums], True


def acdc_h5_cases(source: str, spacing: Sequence[float] = ACDC_SPACING, group_regex: str = ACDC_GROUP_REGEX,
                  val_to: str = "exclude", axes: str = "zyx") -> List[SourceCase]:
    """train.list frames (list order), then val.list (per ``val_to``) and test.list (preset 'test')."""
    if val_to not in VAL_CHOICES:
        raise UserFacingError(f"--val-to must be one of {', '.join(VAL_CHOICES)}, got {val_to!r}")
    data_dir = os.path.join(source, "data") if os.path.isdir(os.path.join(source, "data")) else source
    lists = {}
    for name in ("train", "val", "test"):
        path = os.path.join(source, f"{name}.list")
        if name == "train" and not os.path.isfile(path) and os.path.isfile(os.path.join(source, "train_slices.list")):
            path = os.path.join(source, "train_slices.list")
        if name == "train" or os.path.isfile(path):
            lists[name] = _frame_ids(path, os.path.basename(path), allow_empty=name != "train")
        else:
            lists[name] = []
    _lists_disjoint({f"{k}.list": v for k, v in lists.items()})
    slices = _slice_index(os.path.join(data_dir, "slices"))
    regex = compile_group_regex(group_regex)
    val_preset = {"exclude": "excluded", "test": "test", "unlabeled": "unlabeled", "pool": None}[val_to]
    cases = []
    for name, preset in (("train", None), ("val", val_preset), ("test", "test")):
        for fid in lists[name]:
            files, stacked = _acdc_files(fid, data_dir, slices)
            h5 = H5Case(files, axes=axes, spacing=tuple(spacing), stacked=stacked, has_label=_has_label(files[0]))
            cases.append(SourceCase(fid, group_of(fid, regex), h5=h5, preset=preset))
    return cases


def convert_acdc_h5(source: str, out: OutputOptions, split: SplitOptions, *,
                    spacing: Sequence[float] = ACDC_SPACING, group_regex: str = ACDC_GROUP_REGEX,
                    val_to: str = "exclude", axes: str = "zyx") -> str:
    """Convert the SSL4MIS ACDC h5 layout, split by patient; default selection 'first'."""
    source = os.path.abspath(source)
    if not os.path.isdir(source):
        raise UserFacingError(f"source folder {source} does not exist")
    cases = acdc_h5_cases(source, spacing, group_regex, val_to, axes)
    split.select = split.select or "first"
    spec = DatasetSpec(channel_names={"0": "cineMRI"}, labels=dict(ACDC_LABELS), file_ending=".nii.gz",
                       extra_json={"reference": "ACDC, Bernard et al., IEEE TMI 2018; SSL4MIS preprocessing"},
                       label_hint="ACDC labels are 0 background, 1 RV, 2 myocardium, 3 LV.")
    if out.name is None:
        out.name = "ACDC"
    record = {"type": "acdc-h5", "path": source, "nominal_spacing": list(spacing), "group_regex": group_regex,
              "val_to": val_to, "axes": axes}
    return write_dataset(cases, spec, split, out, record, grouped=True)
