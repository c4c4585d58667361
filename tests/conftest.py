"""Shared fixtures: an nnU-Net folder tree in a temporary directory and planned synthetic data.

nnunetv2 reads nnUNet_raw/_preprocessed/_results when ``nnunetv2.paths`` is first imported,
so they are set here, before any test module imports nnunetv2. Subprocesses (the real
``nnUNetv2_*`` commands) get them through ``os.environ``.

Set NNUNET_SUD_TEST_CACHE=/some/folder to keep the generated and preprocessed datasets between
runs (the fixtures then reuse what is there); without it everything lives in a fresh temp dir.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

_cache = os.environ.get("NNUNET_SUD_TEST_CACHE")
ROOT = os.path.abspath(_cache) if _cache else tempfile.mkdtemp(prefix="nnunet_sud_tests_")
for _k, _sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
    os.environ[_k] = os.path.join(ROOT, _sub)
    os.makedirs(os.environ[_k], exist_ok=True)
os.environ.setdefault("nnUNet_n_proc_DA", "1")
os.environ.setdefault("nnUNet_compile", "false")
os.environ.setdefault("nnUNet_def_n_proc", "1")  # export workers of validation/prediction: each is a spawned process
os.environ.setdefault("OMP_NUM_THREADS", "2")

from nnunet_sud.paths import ext_trainer_value  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# users' variants (tests/ext_trainers) beside the package's own folder, as a user would set it up
os.environ["nnUNet_extTrainer"] = ext_trainer_value(os.path.join(TESTS_DIR, "ext_trainers"))

SYN3D_ID = 991
SYN3D_NAME = "Dataset991_Synthetic3D"
PLANS_ONLY_ID = 992
PLANS_ONLY_NAME = "Dataset992_SyntheticPlansOnly"


def run_cmd(args, timeout=1200, env=None):
    """Run a command (list), raise with its output on failure, return its stdout+stderr."""
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                       env=env or os.environ.copy())
    if p.returncode != 0:
        raise AssertionError(f"command failed ({p.returncode}): {' '.join(map(str, args))}\n{p.stdout[-8000:]}")
    return p.stdout


def nnunet_sud_cmd(*args):
    return [sys.executable, "-m", "nnunet_sud.cli", *map(str, args)]


@pytest.fixture(scope="session")
def nnunet_dirs():
    return {k: os.environ[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}


@pytest.fixture(scope="session")
def synthetic3d(nnunet_dirs):
    """Dataset991: 3d synthetic task (6 labeled, 6 unlabeled, 2 test, 24x32x32 voxels), planned and
    preprocessed by nnU-Net for 2d and 3d_fullres, unlabeled images preprocessed for both."""
    from nnunet_sud.dataset_conversion.synthetic import generate_dataset

    pre = os.path.join(nnunet_dirs["nnUNet_preprocessed"], SYN3D_NAME)
    done_flag = os.path.join(pre, ".fixture_done")
    if not os.path.isfile(done_flag):
        shutil.rmtree(os.path.join(nnunet_dirs["nnUNet_raw"], SYN3D_NAME), ignore_errors=True)
        shutil.rmtree(pre, ignore_errors=True)
        generate_dataset(nnunet_dirs["nnUNet_raw"], SYN3D_ID, "3d", n_labeled=6, n_unlabeled=6, n_test=2,
                         seed=1, shape=(24, 32, 32))
        run_cmd(["nnUNetv2_plan_and_preprocess", "-d", str(SYN3D_ID), "-c", "2d", "3d_fullres", "-np", "2",
                 "--verify_dataset_integrity"])
        for cfg in ("2d", "3d_fullres"):
            run_cmd(nnunet_sud_cmd("preprocess-unlabeled", "-d", SYN3D_ID, "-c", cfg, "-np", 2))
        open(done_flag, "w").close()
    # fold 0 validates on a single case: nnU-Net's final validation costs ~20 s per case on CPU
    split = [{"train": [f"syn_lab_{i:03d}" for i in range(5)], "val": ["syn_lab_005"]}]
    split_file = os.path.join(pre, "splits_final.json")
    if not os.path.isfile(split_file) or json.load(open(split_file)) != split:
        with open(split_file, "w") as f:
            json.dump(split, f)
    return {"id": SYN3D_ID, "name": SYN3D_NAME, "raw": os.path.join(nnunet_dirs["nnUNet_raw"], SYN3D_NAME),
            "preprocessed": pre}


@pytest.fixture(scope="session")
def synthetic_plans(nnunet_dirs):
    """Dataset992: nnU-Net's plans (2d, 3d_fullres) and dataset.json of the synthetic task of
    ``synthetic3d`` (tests/data/synthetic3d_plans.json), written in milliseconds: no planning, no
    preprocessing, no images. Enough to build and initialise trainers (network, loss, optimizer,
    schedules, settings checks: ``helpers.make_trainer``), not to load data. Results of trainers
    built on it go to their own dataset folder, apart from the real runs on Dataset991."""
    from helpers import write_synthetic_plans
    pre = write_synthetic_plans(nnunet_dirs["nnUNet_preprocessed"], PLANS_ONLY_NAME)
    return {"id": PLANS_ONLY_ID, "name": PLANS_ONLY_NAME, "preprocessed": pre}


@pytest.fixture(scope="session")
def tiny_denoiser(synthetic3d, nnunet_dirs):
    """A label denoiser for Dataset991 3d_fullres fold 0, trained for a few iterations by the user
    variant nnUNetTrainerLabelDenoiser_tiny (tests/ext_trainers). Returns its fold folder, to be
    named by nnUNet_denoiser for the trainers that need a denoiser."""
    fold = os.path.join(nnunet_dirs["nnUNet_results"], SYN3D_NAME,
                        "nnUNetTrainerLabelDenoiser_tiny__nnUNetPlans__3d_fullres", "fold_0")
    if not os.path.isfile(os.path.join(fold, "checkpoint_final.pth")):
        run_cmd(["nnUNetv2_train", str(SYN3D_ID), "3d_fullres", "0", "-tr", "nnUNetTrainerLabelDenoiser_tiny",
                 "-device", "cpu"])
    return fold
