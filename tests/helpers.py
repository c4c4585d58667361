"""Helpers shared by the test modules (the fixtures that use them are in conftest.py).

* :func:`make_trainer`: a trainer built in process the way ``nnUNetv2_train`` builds it, from the
  plans and dataset.json of a dataset fixture (``synthetic3d``: planned and preprocessed by
  nnU-Net; ``synthetic_plans``: the same plans without planning, preprocessing or images);
* :func:`predict_in_process`: one test image predicted from a model folder the way
  ``nnUNetv2_predict`` does it, without its ~15 s of process and worker start-up;
* :func:`write_synthetic_plans`: what the ``synthetic_plans`` fixture writes.
"""
import json
import os

import torch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# nnU-Net's plans and dataset.json of Dataset991 (conftest's synthetic3d: 24x32x32 voxels of 1 mm,
# 2d and 3d_fullres), as nnUNetv2_plan_and_preprocess wrote them with nnunetv2 2.8.1;
# test_helpers.py checks that planning still gives them
SYNTHETIC_PLANS_FILE = os.path.join(TESTS_DIR, "data", "synthetic3d_plans.json")


def load_plans(dataset: dict, plans_identifier: str = "nnUNetPlans"):
    """(plans, dataset.json) of a dataset fixture (a dict with its ``preprocessed`` folder)."""
    pre = dataset["preprocessed"]
    with open(os.path.join(pre, plans_identifier + ".json")) as f:
        plans = json.load(f)
    with open(os.path.join(pre, "dataset.json")) as f:
        dataset_json = json.load(f)
    return plans, dataset_json


def make_trainer(cls, dataset: dict, configuration: str = "3d_fullres", fold=0, plans_edit=None,
                 device: str = "cpu", initialize: bool = False, plans_identifier: str = "nnUNetPlans",
                 dataset_edit=None):
    """``cls(plans, configuration, fold, dataset_json, device)`` as nnunetv2's ``run_training`` builds
    it (2.8 adds ``continue_training`` to the plans; the trainer's ``__init__`` pops it).
    ``plans_edit(plans)`` and ``dataset_edit(dataset_json)`` change them first; ``initialize`` runs ``trainer.initialize()``
    (network, optimizer, loss: no data is read)."""
    plans, dataset_json = load_plans(dataset, plans_identifier)
    plans["continue_training"] = False
    if plans_edit is not None:
        plans_edit(plans)
    if dataset_edit is not None:
        dataset_edit(dataset_json)
    trainer = cls(plans, configuration, fold, dataset_json, torch.device(device))
    if initialize:
        trainer.initialize()
    return trainer


def predict_in_process(dataset: dict, model_base: str, image: str = "syn_ts_000_0000.nii.gz", fold=0):
    """nnU-Net's predictor as ``nnUNetv2_predict`` sets it up (trainer class looked up by the
    checkpoint's ``trainer_name`` through nnUNet_extTrainer, network from its
    ``build_network_architecture``, ``checkpoint_final.pth`` loaded), without test-time mirroring,
    on ``imagesTs/<image>`` of a dataset fixture. Checks that the prediction has the image's shape
    and only the dataset's labels; returns (predictor, segmentation)."""
    import numpy as np
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu"),
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_base, (fold,), "checkpoint_final.pth")
    img, props = SimpleITKIO().read_images([os.path.join(dataset["raw"], "imagesTs", image)])
    seg = predictor.predict_single_npy_array(img, props)
    labels = set(load_plans(dataset)[1]["labels"].values())
    assert seg.shape == img.shape[1:] and set(np.unique(seg).tolist()) <= labels
    return predictor, seg


def predict_without_denoiser(dataset: dict, trainer: str, monkeypatch, configuration: str = "3d_fullres"):
    """:func:`predict_in_process` from ``trainer``'s model folder (nnUNetPlans) with ``nnUNet_denoiser``
    unset: the model folder must be all that inference needs."""
    monkeypatch.delenv("nnUNet_denoiser", raising=False)
    base = os.path.join(os.environ["nnUNet_results"], dataset["name"], f"{trainer}__nnUNetPlans__{configuration}")
    return predict_in_process(dataset, base)


def write_synthetic_plans(preprocessed_root: str, dataset_name: str) -> str:
    """``preprocessed_root/dataset_name/{nnUNetPlans.json, dataset.json}`` from SYNTHETIC_PLANS_FILE,
    the plans renamed to ``dataset_name``; returns the folder. Each configuration's data folder
    holds one empty ``no_cases.b2nd``: nnU-Net's ``initialize`` picks the dataset class by the file
    endings there (blosc2, as 2.8.1 preprocesses); there are no cases to load."""
    with open(SYNTHETIC_PLANS_FILE) as f:
        stored = json.load(f)
    folder = os.path.join(preprocessed_root, dataset_name)
    os.makedirs(folder, exist_ok=True)
    plans = dict(stored["plans"], dataset_name=dataset_name)
    for name, content in (("nnUNetPlans.json", plans), ("dataset.json", stored["dataset_json"])):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=1)
    for cfg in plans["configurations"].values():
        data = os.path.join(folder, cfg["data_identifier"])
        os.makedirs(data, exist_ok=True)
        open(os.path.join(data, "no_cases.b2nd"), "w").close()
    return folder


def load_benchmark(name: str):
    """The module ``benchmarks/<name>.py`` of this checkout (the scripts are not a package)."""
    import importlib.util
    path = os.path.join(os.path.dirname(TESTS_DIR), "benchmarks", name + ".py")
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
