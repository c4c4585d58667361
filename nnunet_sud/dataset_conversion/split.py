"""Choosing the labeled / unlabeled / test split of a converted dataset, reproducibly.

Every source (folder, la-h5, acdc-h5, kits19, msd) describes its cases as :class:`CaseInfo`
records (id, group, whether a label exists, a role the layout itself imposes such as "test").
:func:`assign_roles` turns them into one role per case:

``labeled``   image + label go to imagesTr / labelsTr
``unlabeled`` image goes to imagesUnlabeled (cases without a label, and labeled cases beyond the
              requested count: their labels are withheld)
``test``      image to imagesTs, label (if any) to labelsTs
``excluded``  not written at all (e.g. ACDC's validation list with ``--val-to exclude``)

Splitting is done by *group* (a patient, when ``--group-regex`` or the layout says so): all cases
of a group are on the same side of the train/test split, and ``--labeled N`` counts groups.
The same seed always gives the same split; the test set has its own seed so that runs with
different labeled subsets share one test set.
"""
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnunet_sud.errors import UserFacingError

ROLES = ("labeled", "unlabeled", "test", "excluded")
SELECTIONS = ("random", "first")
# suffixes stripped from entries of id lists (people list file names as often as ids)
_LIST_SUFFIXES = (".nii.gz", ".nii", ".h5", ".nrrd", ".mha", ".png", ".tif", ".tiff")


@dataclass
class CaseInfo:
    """What the split needs to know about one case."""
    case_id: str
    group: str
    has_label: bool
    preset: Optional[str] = None  # a role fixed by the source layout (None: part of the training pool)


@dataclass
class SplitOptions:
    """How to choose the split (the CLI options shared by all sources)."""
    labeled: str = "all"           # count ("8"), fraction ("0.1"), percentage ("10%") or "all"
    seed: int = 0                  # seed of the random labeled selection
    select: Optional[str] = None   # "random" (seeded) or "first" (first N groups in the source's order);
    #                                None: the source's default (first for la-h5/acdc-h5, random otherwise)
    test_ids: Optional[List[str]] = None  # explicit test cases (--test-list)
    num_test: int = 0              # number of test groups drawn at random (--num-test)
    test_seed: int = 0             # seed of that draw (independent of --seed)
    split_file: Optional[str] = None  # reuse labeled/test ids of an earlier split.json


@dataclass
class Split:
    """The outcome: one role per case plus what is needed to document it."""
    roles: Dict[str, str]
    groups: Dict[str, List[str]]         # group -> case ids (source order)
    labeled_groups: List[str]
    n_labeled_available: int             # groups with a label in the training pool
    selection: str
    notes: List[str] = field(default_factory=list)

    def cases(self, role: str) -> List[str]:
        return [c for c, r in self.roles.items() if r == role]


def normalize_labeled_request(value) -> str:
    """Validate a ``--labeled`` value early (argparse ``type``); returns it normalised."""
    r = str(value).strip().lower()
    if r == "all":
        return r
    try:
        if r.endswith("%"):
            ok = 0 < float(r[:-1]) <= 100
        elif any(ch in r for ch in ".e"):
            ok = 0 < float(r) <= 1
        else:
            ok = int(r) >= 1
    except ValueError:
        ok = False
    if not ok:
        raise UserFacingError(
            f"--labeled {value!r}: give a count (e.g. 8), a fraction in (0, 1] (e.g. 0.1), a percentage "
            f"(e.g. 10%) or 'all'")
    return r


def resolve_labeled_count(request: str, n_available: int, unit: str = "cases") -> int:
    """Number of labeled groups for ``--labeled`` given ``n_available`` labeled groups.

    Fractions round to the nearest integer (half up) and give at least 1.
    """
    r = normalize_labeled_request(request)
    if r == "all":
        n = n_available
    elif r.endswith("%") or any(ch in r for ch in ".e"):
        frac = float(r[:-1]) / 100 if r.endswith("%") else float(r)
        n = max(1, int(np.floor(frac * n_available + 0.5 - 1e-9)))
    else:
        n = int(r)
    if n_available == 0:
        raise UserFacingError(
            f"no labeled {unit} available for the training pool (all labeled {unit} are in the test set, or no "
            f"label files were found). Check the label folder/--test-list/--num-test.")
    if n > n_available:
        raise UserFacingError(
            f"--labeled {request}: asks for {n} labeled {unit}, but only {n_available} {unit} with labels are "
            f"available for training (after removing test cases). Lower --labeled or use 'all'.")
    return n


def read_id_list(path: str, what: str = "list", allow_empty: bool = False) -> List[str]:
    """Case ids from a text file, one per line (blank lines and ``#`` comments ignored).

    File endings such as ``.nii.gz``/``.h5`` and folder parts (``ID/mri_norm2.h5``) are stripped,
    duplicates are dropped keeping the first occurrence.
    """
    if not os.path.isfile(path):
        raise UserFacingError(f"{what} {path} does not exist. Give a text file with one case id per line.")
    ids, seen = [], set()
    with open(path) as f:
        for line in f:
            s = line.split("#", 1)[0].strip()
            if not s:
                continue
            s = s.replace("\\", "/")
            if "/" in s:  # "ID/mri_norm2.h5" or "data/ID.h5"
                parts = [p for p in s.split("/") if p]
                s = parts[-2] if parts[-1] == "mri_norm2.h5" and len(parts) > 1 else parts[-1]
            for suf in _LIST_SUFFIXES:
                if s.endswith(suf):
                    s = s[: -len(suf)]
                    break
            if s not in seen:
                seen.add(s)
                ids.append(s)
    if not ids and not allow_empty:
        raise UserFacingError(f"{what} {path} is empty: expected one case id per line.")
    return ids


def compile_group_regex(pattern: Optional[str]):
    """Compile ``--group-regex`` (None: every case is its own group)."""
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UserFacingError(f"--group-regex {pattern!r} is not a valid regular expression: {e}") from None


def group_of(case_id: str, regex) -> str:
    """The group key of a case: the first capture group of the regex (or its whole match)."""
    if regex is None:
        return case_id
    m = regex.search(case_id)
    if m is None:
        raise UserFacingError(
            f"case '{case_id}' does not match --group-regex {regex.pattern!r}: every case needs a group "
            f"(e.g. '^(patient\\d+)_' groups patient001_frame01 and patient001_frame12). Fix the regex.")
    key = m.group(1) if regex.groups else m.group(0)
    if not key:
        raise UserFacingError(f"--group-regex {regex.pattern!r} gives an empty group for case '{case_id}'")
    return key


def _groups(cases: Sequence[CaseInfo]) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    for c in cases:
        out.setdefault(c.group, []).append(c.case_id)
    return out


def _check_unique(cases: Sequence[CaseInfo]) -> None:
    seen = set()
    for c in cases:
        if c.case_id in seen:
            raise UserFacingError(f"case id '{c.case_id}' occurs twice in the source; case ids must be unique")
        seen.add(c.case_id)


def _check_known(ids: Sequence[str], known, what: str) -> None:
    missing = [i for i in ids if i not in known]
    if missing:
        show = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise UserFacingError(f"{what} names case(s) not found in the source: {show}. "
                              f"Check the ids (case ids are file names without channel suffix and ending).")


def _check_test_labels(test_ids: Sequence[str], info: Dict[str, CaseInfo], groups: Dict[str, List[str]]) -> None:
    """A ``--test-list`` case without a label is an error, unless a labeled case of its group is in the
    list too (then it is that group's unlabeled part, kept out of training with it)."""
    listed = set(test_ids)
    unlabeled = [cid for cid in test_ids if not info[cid].has_label
                 and not any(info[c].has_label and c in listed for c in groups[info[cid].group])]
    if unlabeled:
        show = ", ".join(unlabeled[:5]) + (f" (+{len(unlabeled) - 5} more)" if len(unlabeled) > 5 else "")
        raise UserFacingError(
            f"--test-list names case(s) without a label: {show}. A test case needs its label (labelsTs) to be "
            f"evaluated; these would go to imagesTs without one, and the labeled case meant (a typo in the id, or "
            f"a label file named differently) would stay in training. Fix the id or the label file's name, or "
            f"remove the case from the test list (to predict images without labels, run nnUNetv2_predict on "
            f"them directly).")


def _check_group_sides(roles: Dict[str, str], groups: Dict[str, List[str]]) -> None:
    """No group may have cases both in the test set and in the training pool (leakage)."""
    for g, members in groups.items():
        test = [c for c in members if roles.get(c) == "test"]
        train = [c for c in members if roles.get(c) in ("labeled", "unlabeled", None)]
        if test and train:
            raise UserFacingError(
                f"group '{g}' is split between the test set ({', '.join(test)}) and training "
                f"({', '.join(train)}). Put all cases of a group on one side (list them all in the test list), "
                f"or change --group-regex.")


def _pick(items: List[str], n: int, rng: Optional[np.random.Generator]) -> List[str]:
    """First ``n`` items (rng None) or ``n`` items drawn by ``rng``; returned in the items' order."""
    if rng is None:
        chosen = set(items[:n])
    else:
        chosen = {items[i] for i in rng.permutation(len(items))[:n]}
    return [i for i in items if i in chosen]


def assign_roles(cases: Sequence[CaseInfo], opts: SplitOptions) -> Split:
    """Give every case a role (see module docstring). Deterministic for fixed inputs and options."""
    _check_unique(cases)
    select = opts.select or "random"
    if select not in SELECTIONS:
        raise UserFacingError(f"--select must be one of {', '.join(SELECTIONS)}, got {opts.select!r}")
    info = {c.case_id: c for c in cases}
    groups = _groups(cases)
    roles: Dict[str, Optional[str]] = {c.case_id: c.preset for c in cases}
    notes: List[str] = []

    if opts.split_file:
        return _roles_from_split_file(cases, opts.split_file, roles, groups)

    # 1. test set: explicit list, then a seeded draw of whole groups
    if opts.test_ids:
        _check_known(opts.test_ids, info, "--test-list")
        _check_test_labels(opts.test_ids, info, groups)
        for cid in opts.test_ids:
            if roles[cid] not in (None, "test"):
                raise UserFacingError(f"--test-list names case '{cid}', which the source layout already puts into "
                                      f"'{roles[cid]}'. Remove it from the test list.")
            roles[cid] = "test"
    _check_group_sides(roles, groups)
    if opts.num_test:
        candidates = [g for g, m in groups.items()
                      if all(roles[c] is None and info[c].has_label for c in m)]
        if opts.num_test > len(candidates):
            raise UserFacingError(
                f"--num-test {opts.num_test}: only {len(candidates)} fully labeled group(s) are left for the test "
                f"set. Lower --num-test.")
        for g in _pick(candidates, opts.num_test, np.random.default_rng(opts.test_seed)):
            for c in groups[g]:
                roles[c] = "test"

    # 2. labeled subset of the training pool, by group
    eligible = [g for g, m in groups.items() if any(roles[c] is None and info[c].has_label for c in m)]
    unit = "groups" if any(len(m) > 1 for m in groups.values()) else "cases"
    n = resolve_labeled_count(opts.labeled, len(eligible), unit)
    rng = None if select == "first" else np.random.default_rng(opts.seed)
    labeled_groups = _pick(eligible, n, rng)
    chosen = set(labeled_groups)
    for c in cases:
        if roles[c.case_id] is None:
            roles[c.case_id] = "labeled" if (c.group in chosen and c.has_label) else "unlabeled"
    n_lab = sum(r == "labeled" for r in roles.values())
    if n_lab < 5:
        notes.append(f"only {n_lab} labeled case(s): nnU-Net's 5-fold cross-validation needs at least 5; train "
                     f"with fold 'all' or provide splits_final.json")
    return Split(roles=dict(roles), groups=groups, labeled_groups=labeled_groups, n_labeled_available=len(eligible),
                 selection=select, notes=notes)


def _roles_from_split_file(cases, path, roles, groups) -> Split:
    """Reuse the labeled and test ids of an earlier ``split.json``; everything else is unlabeled."""
    try:
        with open(path) as f:
            old = json.load(f)
        labeled, test = list(old["labeled"]), list(old.get("test", []))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserFacingError(f"--split-file {path}: cannot read labeled/test ids ({type(e).__name__}: {e}). "
                              f"Give a split.json written by 'nnunet-sud convert'.") from None
    info = {c.case_id: c for c in cases}
    _check_known(labeled, info, f"--split-file {path} (labeled)")
    _check_known(test, info, f"--split-file {path} (test)")
    for cid in labeled:
        if not info[cid].has_label:
            raise UserFacingError(f"--split-file {path}: labeled case '{cid}' has no label file in this source")
        roles[cid] = "labeled"
    for cid in test:
        roles[cid] = "test"
    for c in cases:
        if roles[c.case_id] is None:
            roles[c.case_id] = "unlabeled"
    _check_group_sides(roles, groups)
    labeled_groups = [g for g, m in groups.items() if any(roles[c] == "labeled" for c in m)]
    eligible = [g for g, m in groups.items() if any(roles[c] in ("labeled", "unlabeled") and info[c].has_label
                                                     for c in m)]
    return Split(roles=dict(roles), groups=groups, labeled_groups=labeled_groups,
                 n_labeled_available=len(eligible), selection="split-file")


def grouped_cv_splits(split: Split, n_folds: int = 5, seed: int = 12345) -> Optional[List[dict]]:
    """nnU-Net ``splits_final.json`` content whose folds keep the labeled cases of a group together.

    Returns None when fewer than two labeled groups exist (nothing to split).
    """
    lab_groups = [g for g in split.labeled_groups]
    if len(lab_groups) < 2:
        return None
    k = min(n_folds, len(lab_groups))
    order = [lab_groups[i] for i in np.random.default_rng(seed).permutation(len(lab_groups))]
    labeled = set(split.cases("labeled"))
    folds = []
    for f in range(k):
        val_groups = set(order[f::k])
        val = [c for g in lab_groups if g in val_groups for c in split.groups[g] if c in labeled]
        train = [c for g in lab_groups if g not in val_groups for c in split.groups[g] if c in labeled]
        folds.append({"train": train, "val": val})
    return folds
