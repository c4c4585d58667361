"""``nnunet-sud preprocess-denoiser-labels``: label maps without images, for the denoiser.

Put extra label maps into ``nnUNet_raw/DatasetXXX/labelsDenoiser/`` (same naming and file
ending as ``labelsTr``: ``<case><file_ending>``, same label values), then run::

    nnunet-sud preprocess-denoiser-labels -d XXX -c 3d_fullres [-p nnUNetPlans]

Each map is preprocessed by the configuration's own preprocessor (``run_case_npy``: transpose,
resampling to the configuration's spacing with the plans' segmentation resampling, foreground
locations for oversampling) with a constant dummy image, and saved like nnU-Net's own cases into
``nnUNet_preprocessed/DatasetXXX/<data_identifier>_denoiser_labels/`` (the stored image is
all zeros). Differences to a labelled case: no crop to the image's non-zero region (there is no
image), so the map is used at its full extent. ``nnUNetTrainerLabelDenoiser`` then trains on
these maps in addition to the training split.
"""
import argparse
import os

from nnunet_sud.errors import UserFacingError


def _preprocess_one(label_file: str, output_truncated: str, plans_file: str, configuration: str,
                    dataset_json: dict, use_npz: bool) -> str:
    import numpy as np
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans_file)
    cm = pm.get_configuration(configuration)
    rw = pm.image_reader_writer_class()
    seg, props = rw.read_seg(label_file)
    allowed = {int(v) for v in dataset_json["labels"].values() if not isinstance(v, (list, tuple))}
    found = {int(v) for v in np.unique(seg)}
    if not found <= allowed:
        raise UserFacingError(f"{label_file}: label values {sorted(found - allowed)} are not in dataset.json "
                              f"labels {sorted(allowed)}; fix the file or remove it from labelsDenoiser/")
    dummy = np.ones((1, *seg.shape[1:]), dtype=np.float32)
    preprocessor = cm.preprocessor_class(verbose=False)
    data, seg, props = preprocessor.run_case_npy(dummy, seg, props, pm, cm, dataset_json)
    data = np.zeros(data.shape, dtype=np.float32)
    _save(data, seg, props, output_truncated, cm, use_npz)
    return os.path.basename(output_truncated)


def _save(data, seg, props, output_truncated: str, cm, use_npz: bool) -> None:
    import numpy as np
    from nnunetv2.training.dataloading.nnunet_dataset import (nnUNetDatasetBlosc2, nnUNetDatasetNumpy,
                                                              comp_blosc2_params)
    seg = seg.astype(np.int16, copy=False)
    if use_npz:  # the configuration's folder is in nnU-Net's older numpy format
        nnUNetDatasetNumpy.save_case(data, seg, props, output_truncated)
        return
    blocks, chunks = comp_blosc2_params(data.shape, tuple(cm.patch_size), data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, tuple(cm.patch_size), seg.itemsize)
    nnUNetDatasetBlosc2.save_case(data, seg, props, output_truncated, chunks=chunks, blocks=blocks,
                                  chunks_seg=chunks_seg, blocks_seg=blocks_seg)


def preprocess_denoiser_labels(dataset_name_or_id, configuration: str, plans_identifier: str = "nnUNetPlans",
                               num_processes: int = 2, overwrite: bool = False, verbose: bool = True) -> str:
    """Preprocess ``labelsDenoiser/`` of a dataset for one configuration; returns the output folder.

    Args:
        dataset_name_or_id: e.g. 991 or 'Dataset991_Synthetic3D' (must be planned and preprocessed).
        configuration: e.g. '3d_fullres' or '2d'.
        plans_identifier: plans file name without .json (default nnUNetPlans).
        num_processes: worker processes (1: in this process).
        overwrite: re-do cases whose output exists already.
    Raises:
        UserFacingError: unknown dataset, missing plans/preprocessing, unknown configuration,
            missing/empty labelsDenoiser folder, label values not in dataset.json, name clash
            with a labelsTr case, region-based labels.
    """
    from batchgenerators.utilities.file_and_folder_operations import isfile, load_json
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class, nnUNetDatasetNumpy
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_sud.denoiser.data import (DENOISER_LABELS_RAW_FOLDER, denoiser_labels_folder, raw_denoiser_label_files,
                                          resolve_dataset_name)
    from nnunet_sud.network_helpers import require_exclusive_classes
    from nnunet_sud.unlabeled.preprocess import plan_command

    if not nnUNet_raw or not nnUNet_preprocessed:
        raise UserFacingError("nnUNet_raw and nnUNet_preprocessed must be set (export them as for nnUNetv2_* commands)")
    name = resolve_dataset_name(dataset_name_or_id)
    pre_base = os.path.join(nnUNet_preprocessed, name)
    plans_file = os.path.join(pre_base, plans_identifier + ".json")
    dataset_json_file = os.path.join(pre_base, "dataset.json")
    if not isfile(plans_file) or not isfile(dataset_json_file):
        raise UserFacingError(f"{plans_file} (or dataset.json beside it) not found: plan and preprocess the dataset "
                              f"first: {plan_command(dataset_name_or_id, configuration, plans_identifier)}")
    pm = PlansManager(plans_file)
    if configuration not in pm.available_configurations:
        raise UserFacingError(f"configuration {configuration!r} not in {plans_file}; available: "
                              f"{', '.join(pm.available_configurations)}")
    cm = pm.get_configuration(configuration)
    dataset_json = load_json(dataset_json_file)
    require_exclusive_classes(pm.get_label_manager(dataset_json), "The label-map denoiser",
                              "Train the denoiser on a dataset.json with plain integer labels.")
    raw_folder = os.path.join(nnUNet_raw, name)
    file_ending = dataset_json["file_ending"]
    files = raw_denoiser_label_files(raw_folder, file_ending)
    if not files:
        raise UserFacingError(f"no label maps ending in {file_ending} in {os.path.join(raw_folder, DENOISER_LABELS_RAW_FOLDER)}; "
                              f"put the extra label maps there (named like labelsTr: CASE{file_ending})")
    main_folder = os.path.join(pre_base, cm.data_identifier)
    if not os.path.isdir(main_folder):
        raise UserFacingError(f"{main_folder} not found: preprocess the configuration first: "
                              f"{plan_command(dataset_name_or_id, configuration, plans_identifier)}")
    dataset_class = infer_dataset_class(main_folder)
    labelled = set(dataset_class.get_identifiers(main_folder))
    ids = [os.path.basename(f)[:-len(file_ending)] for f in files]
    clash = sorted(set(ids) & labelled)
    if clash:
        raise UserFacingError(f"{DENOISER_LABELS_RAW_FOLDER}/ holds cases named like training cases: {clash[:5]}; "
                              f"rename them (the names must be unique across labelsTr and {DENOISER_LABELS_RAW_FOLDER})")
    out = denoiser_labels_folder(pre_base, cm.data_identifier)
    os.makedirs(out, exist_ok=True)
    use_npz = dataset_class is nnUNetDatasetNumpy
    todo = []
    for f, k in zip(files, ids):
        done = isfile(os.path.join(out, k + (".npz" if use_npz else "_seg.b2nd"))) and isfile(os.path.join(out, k + ".pkl"))
        if overwrite or not done:
            todo.append((f, os.path.join(out, k), plans_file, configuration, dataset_json, use_npz))
    if verbose:
        print(f"{name} {configuration}: {len(files)} label maps in {DENOISER_LABELS_RAW_FOLDER}/, "
              f"{len(todo)} to preprocess -> {out}")
    if num_processes <= 1 or len(todo) <= 1:
        for t in todo:
            _preprocess_one(*t)
    else:
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(todo))) as pool:
            pool.starmap(_preprocess_one, todo)
    return out


def add_parser(sub) -> None:
    p = sub.add_parser(
        "preprocess-denoiser-labels",
        help="preprocess extra label maps (labelsDenoiser/) for nnUNetTrainerLabelDenoiser",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name (planned and preprocessed)")
    p.add_argument("-c", "--configurations", nargs="+", required=True, help="configuration(s), e.g. 3d_fullres 2d")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    p.add_argument("-np", "--num-processes", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--overwrite", action="store_true", help="redo cases that are already preprocessed")
    p.set_defaults(func=_run)


def _run(args) -> int:
    for cfg in args.configurations:
        out = preprocess_denoiser_labels(args.dataset, cfg, args.plans, args.num_processes, args.overwrite)
        print(out)
    return 0

