"""``nnunet-sud preprocess-unlabeled``: nnU-Net's own preprocessing for ``imagesUnlabeled``.

Input:  ``nnUNet_raw/DatasetXXX/imagesUnlabeled/CASE_XXXX<file_ending>`` (same channel naming
        and file ending as imagesTr, no labels).
Output: ``nnUNet_preprocessed/DatasetXXX/<data_identifier>_unlabeled/CASE.b2nd, CASE_seg.b2nd,
        CASE.pkl`` in nnU-Net's own on-disk format, written by the preprocessor class the plans
        name for that configuration (crop to non-zero, normalisation with the labeled
        fingerprint's intensity statistics, resampling to the configuration's spacing).
        ``CASE_seg.b2nd`` holds what nnU-Net's preprocessor makes of a missing label: the
        non-zero mask (0 inside, -1 outside), used by ``use_mask_for_norm`` augmentation.
        ``<data_identifier>_unlabeled.json`` beside the folder records which plans and
        configuration produced it and, per case, the raw image files it was made from (name,
        size, mtime, SHA-1; ``"cases"``, null while a run is in progress), so training can refuse
        stale data: other plans, or cases gone from, added to or changed in imagesUnlabeled.
        Each ``CASE.pkl`` records its image files too (``IMAGES_PROPERTY``): a re-run redoes a
        case whose image changed and removes a case whose image is gone.

Optional labels: ``nnUNet_raw/DatasetXXX/labelsUnlabeled/CASE<file_ending>`` (named like labelsTr)
for some of the unlabeled images. They only measure how good the targets a semi-supervised
method makes for itself are (docs/design.md, Target quality) and never enter a loss. For such a case the image and
``CASE_seg.b2nd`` are written exactly as for a case without a label (so nothing the training sees
depends on the label), and in addition ``CASE_label.b2nd`` holds the label preprocessed with its
image exactly as nnU-Net preprocesses a labeled case (the plans' preprocessor
``run_case(image_files, label_file, ...)``: the seg nnU-Net would store as ``CASE_seg.b2nd`` of a
training case). ``CASE.pkl`` records which label was used (``LABEL_PROPERTY``: file name and SHA-1 of
its bytes, or None); a re-run redoes every case whose record disagrees with labelsUnlabeled
(label added, changed or removed).

Before anything is written, every image is checked as nnU-Net's ``--verify_dataset_integrity``
checks imagesTr (:mod:`nnunet_sud.unlabeled.integrity`): truncated gzip streams, multi-component
images, NaN/Inf voxels and unreadable files stop the run with one error listing them all; images
smaller than the patch size are reported as warnings.

Planning and fingerprinting never see the unlabeled images (docs/design.md, Data flow).
"""
import hashlib
import json
import multiprocessing
import os
import re
import shutil
from typing import Dict, List, Optional, Tuple

from nnunet_sud.errors import UserFacingError
from nnunet_sud.unlabeled.integrity import check_unlabeled_images

INFO_SUFFIX = ".json"  # -> <data_identifier>_unlabeled.json beside the folder
#: raw folder of the optional labels of unlabeled images (named like labelsTr: CASE<file_ending>)
LABELS_FOLDER = "labelsUnlabeled"
#: preprocessed label of an unlabeled case: <case><LABEL_SUFFIX> beside <case>.b2nd
LABEL_SUFFIX = "_label.b2nd"
#: key in the case's properties (.pkl): None, or {"file": label file name, "sha1": hex digest of its bytes}
LABEL_PROPERTY = "nnunet_sud_label"
#: key in the case's properties (.pkl): the raw image files it was made from (:func:`image_records`)
IMAGES_PROPERTY = "nnunet_sud_images"


def unlabeled_folder_name(data_identifier: str) -> str:
    return data_identifier + "_unlabeled"


def configuration_fingerprint(plans: dict, configuration: str) -> str:
    """Hash of everything in the plans that changes the preprocessed arrays of a configuration."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(plans).get_configuration(configuration)
    relevant = {
        "configuration": cm.configuration,  # resolved (inherits_from applied)
        "transpose_forward": plans["transpose_forward"],
        "foreground_intensity_properties_per_channel": plans["foreground_intensity_properties_per_channel"],
        "image_reader_writer": plans["image_reader_writer"],
    }
    return hashlib.sha1(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def planner_for_plans(plans_identifier: str) -> Optional[str]:
    """The nnU-Net experiment planner (``-pl`` class name) whose default plans name is ``plans_identifier``
    (e.g. nnUNetPlannerResEncM -> nnUNetResEncUNetMPlans), or None."""
    import importlib
    import inspect
    import pkgutil

    import nnunetv2.experiment_planning.experiment_planners as planners
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    for m in pkgutil.walk_packages(planners.__path__, planners.__name__ + "."):
        try:
            module = importlib.import_module(m.name)
        except Exception:  # a planner module with missing optional dependencies
            continue
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, ExperimentPlanner):
                default = inspect.signature(cls.__init__).parameters.get("plans_name")
                if default is not None and default.default == plans_identifier:
                    return name
    return None


def plan_command(dataset_name_or_id, configuration: str, plans_identifier: str = "nnUNetPlans") -> str:
    """An ``nnUNetv2_plan_and_preprocess`` command that writes plans named ``plans_identifier``: the
    planner whose default name it is (``-pl``), else the default planner under that name
    (``-overwrite_plans_name``); nothing extra for nnUNetPlans."""
    cmd = f"nnUNetv2_plan_and_preprocess -d {dataset_name_or_id} -c {configuration}"
    planner = planner_for_plans(plans_identifier)
    if planner == "ExperimentPlanner":
        return cmd
    if planner is not None:
        return f"{cmd} -pl {planner}"
    return f"{cmd} -overwrite_plans_name {plans_identifier}"


def find_unlabeled_cases(folder: str, file_ending: str, num_channels: int) -> Dict[str, List[str]]:
    """Group ``CASE_XXXX<file_ending>`` files by case; check channels and endings.

    Returns {case id: [channel 0 file, channel 1 file, ...]}. Raises UserFacingError naming the
    offending file for anything that is not a complete, correctly named case.
    """
    if not os.path.isdir(folder):
        raise UserFacingError(
            f"no unlabeled images: folder {folder} does not exist. Put the unlabeled images there, named like "
            f"imagesTr (CASE_0000{file_ending}, one file per channel).")
    files = sorted(f for f in os.listdir(folder) if not f.startswith("."))
    if not files:
        raise UserFacingError(f"no unlabeled images: folder {folder} is empty. Put the unlabeled images there, "
                              f"named like imagesTr (CASE_0000{file_ending}).")
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(file_ending))
    cases: Dict[str, Dict[int, str]] = {}
    for f in files:
        if not f.endswith(file_ending):
            raise UserFacingError(
                f"{os.path.join(folder, f)}: wrong file ending; this dataset uses '{file_ending}' (dataset.json "
                f"'file_ending'). Convert the image or remove it from imagesUnlabeled.")
        m = pattern.fullmatch(f)
        if m is None:
            raise UserFacingError(
                f"{os.path.join(folder, f)}: name does not follow nnU-Net's channel naming CASE_XXXX{file_ending} "
                f"(e.g. case_001_0000{file_ending}). Rename it.")
        cases.setdefault(m.group(1), {})[int(m.group(2))] = os.path.join(folder, f)
    out = {}
    for case, chans in sorted(cases.items()):
        expected = list(range(num_channels))
        if sorted(chans) != expected:
            raise UserFacingError(
                f"unlabeled case '{case}' in {folder} has channels {sorted(chans)}, but dataset.json declares "
                f"{num_channels} channel(s) ({', '.join(f'{case}_{c:04d}{file_ending}' for c in expected)} expected). "
                f"Add or remove channel files so that every case has exactly these.")
        out[case] = [chans[c] for c in expected]
    return out


def find_unlabeled_labels(folder: str, file_ending: str, cases: Dict[str, List[str]]) -> Dict[str, str]:
    """Labels in ``labelsUnlabeled`` (``CASE<file_ending>``) -> {case id: label file}.

    A missing folder means no labels. Raises UserFacingError naming the file for a label with a
    wrong file ending or without a matching image in imagesUnlabeled.
    """
    if not os.path.isdir(folder):
        return {}
    out = {}
    for f in sorted(f for f in os.listdir(folder) if not f.startswith(".")):
        path = os.path.join(folder, f)
        if not f.endswith(file_ending):
            raise UserFacingError(
                f"{path}: wrong file ending; labels in {LABELS_FOLDER} are named like labelsTr (CASE{file_ending}, "
                f"dataset.json 'file_ending'). Rename or convert it, or remove it.")
        case = f[:-len(file_ending)]
        if case not in cases:
            hint = f" (a label has no channel suffix: {case[:-5]}{file_ending})" \
                if re.fullmatch(r".+_\d{4}", case) and case[:-5] in cases else ""
            raise UserFacingError(
                f"{path}: no image '{case}_0000{file_ending}' in imagesUnlabeled for this label{hint}. A label in "
                f"{LABELS_FOLDER} must have the name of an unlabeled case (CASE{file_ending} for "
                f"imagesUnlabeled/CASE_0000{file_ending}); rename it, add the image, or remove the label.")
        out[case] = path
    return out


def file_sha1(path: str) -> str:
    """SHA-1 hex digest of a file's bytes."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def label_record(label_file: Optional[str]) -> Optional[dict]:
    """What ``LABEL_PROPERTY`` records for a label file (None: no label)."""
    if label_file is None:
        return None
    return {"file": os.path.basename(label_file), "sha1": file_sha1(label_file)}


def image_records(image_files: List[str], previous: Optional[List[dict]] = None) -> List[dict]:
    """What ``IMAGES_PROPERTY`` and the folder's manifest record for a case's raw image files:
    ``[{"file", "size", "mtime_ns", "sha1"}]`` per channel. The SHA-1 of ``previous`` (an earlier
    record) is reused for a file whose name, size and mtime are unchanged; otherwise the bytes are hashed."""
    prev = {r["file"]: r for r in previous or []}
    out = []
    for path in image_files:
        st, name = os.stat(path), os.path.basename(path)
        old = prev.get(name)
        same = old is not None and old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns
        out.append({"file": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "sha1": old["sha1"] if same else file_sha1(path)})
    return out


def same_images(a: List[dict], b: List[dict]) -> bool:
    """Two image records describe the same files with the same content."""
    return [(r["file"], r["sha1"]) for r in a] == [(r["file"], r["sha1"]) for r in b]


def _recorded_properties(output_folder: str, case: str) -> Optional[dict]:
    """The properties (.pkl) of a finished case, None when the case is not finished."""
    import pickle
    pkl = os.path.join(output_folder, case + ".pkl")
    if not os.path.isfile(pkl):
        return None
    with open(pkl, "rb") as f:
        return pickle.load(f)


def _names(cases: List[str], n: int = 5) -> str:
    return ", ".join(cases[:n]) + (", ..." if len(cases) > n else "")


def check_against_raw(folder: str, info: dict) -> Tuple[Optional[str], str]:
    """Compare a preprocessed unlabeled folder with the images it was made from.

    ``info``: the folder's ``INFO_SUFFIX`` json. Returns (problem, note): problem is None or says
    what disagrees (cases gone from imagesUnlabeled, new ones, changed files, an unfinished run);
    note says what was compared, for the training log. Files whose size and mtime match the
    manifest are not read again.
    """
    manifest = info.get("cases", False)
    if manifest is False:
        return None, ("not checked against imagesUnlabeled: the folder was made by an older nnunet_sud without a "
                      "record of its raw files (re-run preprocess-unlabeled to record them)")
    if manifest is None:
        return "the last run of preprocess-unlabeled on it did not finish", ""
    images = info.get("images_folder", "")
    if not os.path.isdir(images):
        return None, f"not checked against imagesUnlabeled: {images} not found"
    present = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".pkl") and not f.startswith("."))
    if present != sorted(manifest):
        return (f"it holds {len(present)} case(s) but its record lists {len(manifest)} (files were added or "
                f"removed by hand)"), ""
    try:
        raw = find_unlabeled_cases(images, info["file_ending"], info["num_channels"]) \
            if any(not f.startswith(".") for f in os.listdir(images)) else {}
    except UserFacingError as e:
        return str(e), ""
    gone = sorted(set(manifest) - set(raw))
    new = sorted(set(raw) - set(manifest))
    changed = sorted(c for c in set(raw) & set(manifest) if not same_images(manifest[c], image_records(raw[c],
                                                                                                      manifest[c])))
    parts = [f"{len(gone)} case(s) preprocessed but no longer in {images} ({_names(gone)})"] if gone else []
    parts += [f"{len(new)} case(s) in {images} not preprocessed ({_names(new)})"] if new else []
    parts += [f"{len(changed)} case(s) whose image changed since ({_names(changed)})"] if changed else []
    if parts:
        return "; ".join(parts), ""
    return None, f"matches {images} ({len(raw)} cases)"


def _load_plans_and_dataset(dataset_name_or_id, configuration: str, plans_identifier: str):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    for var, val in (("nnUNet_raw", nnUNet_raw), ("nnUNet_preprocessed", nnUNet_preprocessed)):
        if not val:
            raise UserFacingError(f"environment variable {var} is not set (see nnU-Net's setting_up_paths.md)")
    try:
        dataset_name = maybe_convert_to_dataset_name(dataset_name_or_id)
    except RuntimeError as e:
        raise UserFacingError(f"dataset {dataset_name_or_id}: {e}") from None
    plans_file = os.path.join(nnUNet_preprocessed, dataset_name, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise UserFacingError(
            f"{plans_file} not found: dataset {dataset_name} is not planned/preprocessed yet with plans "
            f"'{plans_identifier}'. Run: {plan_command(dataset_name_or_id, configuration, plans_identifier)}")
    plans = load_json(plans_file)
    if configuration not in plans["configurations"]:
        raise UserFacingError(
            f"configuration '{configuration}' is not in {plans_file}; available: "
            f"{', '.join(plans['configurations'])}")
    if plans["configurations"][configuration].get("previous_stage") is not None:
        raise UserFacingError(
            f"configuration '{configuration}' is a cascade stage: its input needs predictions of the previous "
            f"stage for every case, which unlabeled images lack. Use 3d_lowres or 3d_fullres.")
    dataset_json_file = os.path.join(nnUNet_preprocessed, dataset_name, "dataset.json")
    dataset_json = load_json(dataset_json_file)
    return dataset_name, plans, dataset_json, os.path.join(nnUNet_raw, dataset_name), \
        os.path.join(nnUNet_preprocessed, dataset_name)


def _preprocess_one(case: str, image_files: List[str], output_folder: str, plans: dict, configuration: str,
                    dataset_json: dict, label_file: Optional[str] = None, images_record: Optional[list] = None) -> str:
    """Preprocess one unlabeled case (and its label, if any) with the plans' preprocessor; save it atomically."""
    import blosc2
    import numpy as np
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    label_manager = pm.get_label_manager(dataset_json)
    preprocessor = cm.preprocessor_class(verbose=False)
    try:
        data, seg, properties = preprocessor.run_case(image_files, None, pm, cm, dataset_json)
    except Exception as e:  # reader errors, geometry mismatches between channels
        raise UserFacingError(
            f"could not preprocess unlabeled case '{case}' ({', '.join(image_files)}): {type(e).__name__}: {e}. "
            f"Check that the file is a readable image of the dataset's format and that all channels share "
            f"one geometry.") from None
    label = None
    if label_file is not None:
        try:  # exactly nnU-Net's preprocessing of a labeled case; only its seg is kept
            _, label, _ = preprocessor.run_case(image_files, label_file, pm, cm, dataset_json)
        except Exception as e:
            what = "does not have the shape of its image" if "Shape mismatch" in str(e) else "could not be read"
            raise UserFacingError(
                f"label {label_file} {what} ({', '.join(image_files)}): {type(e).__name__}: {e}. A label in "
                f"{LABELS_FOLDER} must be a readable label map on its image's voxel grid (as labelsTr); fix it or "
                f"remove it.") from None
        label = label.astype(np.int16, copy=False)
    properties[LABEL_PROPERTY] = label_record(label_file)
    properties[IMAGES_PROPERTY] = images_record if images_record is not None else image_records(image_files)
    # the data loader reads class_locations unconditionally; unlabeled cases have none
    keys = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    properties["class_locations"] = {(tuple(k) if isinstance(k, list) else k): np.zeros((0, 4), dtype=np.int64)
                                     for k in keys}
    # write under a temporary name, then rename: a case is complete iff its .pkl exists
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params
    data = data.astype(np.float32, copy=False)
    seg = seg.astype(np.int16, copy=False)
    blocks, chunks = comp_blosc2_params(data.shape, tuple(cm.patch_size), data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, tuple(cm.patch_size), seg.itemsize)
    tmp = os.path.join(output_folder, f".tmp_{case}")
    nnUNetDatasetBlosc2.save_case(data, seg, properties, tmp, chunks=chunks, blocks=blocks,
                                  chunks_seg=chunks_seg, blocks_seg=blocks_seg)
    if label is not None:  # same chunking as the seg, as nnU-Net stores a training case's seg
        blosc2.asarray(np.ascontiguousarray(label), urlpath=tmp + LABEL_SUFFIX, chunks=chunks_seg, blocks=blocks_seg,
                       cparams={"codec": blosc2.Codec.LZ4HC, "clevel": 5, "nthreads": 1})
    final = os.path.join(output_folder, case)
    if os.path.isfile(final + ".pkl"):  # a redone case is incomplete until its new .pkl is in place
        os.remove(final + ".pkl")
    if label is None and os.path.isfile(final + LABEL_SUFFIX):
        os.remove(final + LABEL_SUFFIX)
    for suffix in (".b2nd", "_seg.b2nd") + ((LABEL_SUFFIX,) if label is not None else ()) + (".pkl",):
        os.replace(tmp + suffix, final + suffix)
    return case


def preprocess_unlabeled(dataset_name_or_id, configuration: str, plans_identifier: str = "nnUNetPlans",
                         num_processes: int = 4, overwrite: bool = False, progress: bool = True) -> Tuple[str, int]:
    """Preprocess every image of imagesUnlabeled; returns (output folder, number of cases written now).

    The folder is kept in step with imagesUnlabeled: cases already present (complete: their .pkl
    exists) are skipped unless ``overwrite``, their image files changed (content, compared by
    SHA-1; ``IMAGES_PROPERTY``) or their label in labelsUnlabeled was added, changed or removed;
    cases whose image is gone are removed; when the plans changed since the folder was written, it
    is rebuilt. The new and changed images are checked (:func:`check_unlabeled_images`) before
    anything is written. At the end the ``INFO_SUFFIX`` json records every case's image files
    (the manifest training compares with imagesUnlabeled).
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from tqdm import tqdm

    dataset_name, plans, dataset_json, raw_folder, pre_folder = _load_plans_and_dataset(
        dataset_name_or_id, configuration, plans_identifier)
    num_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    images_folder = os.path.join(raw_folder, "imagesUnlabeled")
    cases = find_unlabeled_cases(images_folder, dataset_json["file_ending"], num_channels)
    labels = find_unlabeled_labels(os.path.join(raw_folder, LABELS_FOLDER), dataset_json["file_ending"], cases)
    cm = PlansManager(plans).get_configuration(configuration)
    out = os.path.join(pre_folder, unlabeled_folder_name(cm.data_identifier))
    info_file = out + INFO_SUFFIX
    info = {"dataset": dataset_name, "plans_identifier": plans_identifier, "configuration": configuration,
            "data_identifier": cm.data_identifier,
            "configuration_fingerprint": configuration_fingerprint(plans, configuration),
            "images_folder": os.path.abspath(images_folder), "file_ending": dataset_json["file_ending"],
            "num_channels": num_channels}
    rebuild = False
    if os.path.isdir(out):
        old = json.load(open(info_file)) if os.path.isfile(info_file) else None
        rebuild = overwrite or old is None or old.get("configuration_fingerprint") != info["configuration_fingerprint"]
        if rebuild and not overwrite:
            print(f"{out} was made with other plans; rebuilding it")
    finished = {} if rebuild or not os.path.isdir(out) else \
        {f[:-4]: _recorded_properties(out, f[:-4]) for f in sorted(os.listdir(out))
         if f.endswith(".pkl") and not f.startswith(".")}
    removed = sorted(set(finished) - set(cases))
    records, todo, why = {}, {}, {"new": [], "changed": [], "relabelled": [], "unrecorded": []}
    for c, files in cases.items():
        props = finished.get(c)
        records[c] = image_records(files, props.get(IMAGES_PROPERTY) if props else None)
        if props is None:
            reason = "new"
        elif props.get(IMAGES_PROPERTY) is None:
            reason = "unrecorded"
        elif not same_images(props[IMAGES_PROPERTY], records[c]):
            reason = "changed"
        elif props.get(LABEL_PROPERTY) != label_record(labels.get(c)):
            reason = "relabelled"
        else:
            continue
        todo[c] = files
        why[reason].append(c)
    check_unlabeled_images(todo, plans, configuration, progress)  # before anything is written
    if rebuild:
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(out):  # leftovers of an interrupted run
        if f.startswith(".tmp_"):
            os.remove(os.path.join(out, f))
    with open(info_file, "w") as f:  # "cases": None until the folder matches imagesUnlabeled again
        json.dump({**info, "cases": None}, f, indent=1)
    for c in removed:
        for suffix in (".pkl", ".b2nd", "_seg.b2nd", LABEL_SUFFIX):
            if os.path.isfile(os.path.join(out, c + suffix)):
                os.remove(os.path.join(out, c + suffix))
    if removed:
        print(f"{len(removed)} case(s) removed from {out}: their image is no longer in {images_folder}: "
              f"{_names(removed)}")
    if len(todo) < len(cases):
        print(f"{len(cases) - len(todo)} of {len(cases)} unlabeled cases already preprocessed in {out}; skipping them")
    for key, text in (("changed", f"their image in {images_folder} changed"),
                      ("unrecorded", "the folder has no record of the image they were made from (written by an "
                                     "older nnunet_sud)"),
                      ("relabelled", f"their label in {LABELS_FOLDER} was added, changed or removed")):
        if why[key]:
            print(f"{len(why[key])} case(s) redone because {text}: {_names(why[key])}")
    if why["new"] and finished:
        print(f"{len(why['new'])} new case(s): {_names(why['new'])}")
    if labels:
        print(f"{len(labels)} of {len(cases)} unlabeled cases have a label in {LABELS_FOLDER} (used only to measure "
              f"the quality of training targets, never in a loss)")
    args = [(c, files, out, plans, configuration, dataset_json, labels.get(c), records[c]) for c, files in todo.items()]
    bar = tqdm(total=len(args), desc=f"Preprocessing unlabeled ({configuration})", disable=not progress)
    if num_processes <= 1 or len(args) <= 1:
        for a in args:
            _preprocess_one(*a)
            bar.update()
    else:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(args))) as pool:
            for _ in pool.imap_unordered(_star_preprocess_one, args):
                bar.update()
    bar.close()
    with open(info_file, "w") as f:
        json.dump({**info, "cases": records}, f, indent=1)
    return out, len(args)


def _star_preprocess_one(a):
    return _preprocess_one(*a)


def add_parser(sub) -> None:
    p = sub.add_parser("preprocess-unlabeled",
                       help="preprocess nnUNet_raw/DatasetXXX/imagesUnlabeled (and the optional labelsUnlabeled, "
                            "only to measure target quality) with the dataset's plans",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("-d", "--dataset", required=True, help="dataset name or id")
    p.add_argument("-c", "--configuration", required=True, nargs="+",
                   help="configuration(s) of the plans, e.g. 3d_fullres 2d")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-np", "--num-processes", type=int, default=4)
    p.add_argument("--overwrite", action="store_true", help="redo cases that are already preprocessed")
    p.set_defaults(func=_run)


def _run(args) -> int:
    for cfg in args.configuration:
        out, n = preprocess_unlabeled(args.dataset, cfg, args.plans, args.num_processes, args.overwrite)
        print(f"{cfg}: {n} case(s) written to {out}")
    return 0
