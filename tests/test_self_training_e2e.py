"""``nnunet-sud self-train`` end to end on the synthetic task (2d, fold 0, 2 rounds, --denoise) through
the real nnU-Net commands, with the tiny variants of tests/ext_trainers/tiny_variants.py. The
denoiser is one with random weights of the planned architecture, named by ``$nnUNet_denoiser`` (its
quality does not matter here; training one is the same ``nnUNetv2_train`` step as the teacher's).

The first run is killed in round 1's student training (SUD_TEST_CRASH_AT_EPOCH=0: a crash after
its first epoch's checkpoint); it must name the step and the command that resumes. The same
command then skips every finished step, resumes the student from its checkpoint and finishes both
rounds. The tests then check what the run left: the teacher's plans in every student, no test
case in any student dataset, the teacher's validation case kept out of training, the filtered
pseudo-labels with their ignore label, the pseudo-label Dice per round, and the students as
ordinary nnU-Net model folders."""
import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import nnunet_sud_cmd, run_cmd

CFG = "2d"
STUDENT_ID = 881
TEACHER = "nnUNetTrainer_selftrainTeacher"
STUDENT = "nnUNetTrainer_selftrainStudent"
NAMES = {1: "Dataset881_Synthetic3D_selftrain_r1", 2: "Dataset882_Synthetic3D_selftrain_r2"}


def _ids(folder, ending=".nii.gz", channel=False):
    out = set()
    for f in os.listdir(folder):
        if f.endswith(ending):
            c = f[:-len(ending)]
            out.add(c[:-5] if channel else c)
    return out


@pytest.fixture(scope="module")
def selftrain_run(synthetic3d, nnunet_dirs, tmp_path_factory):
    # a fresh run every time: earlier students and teacher of this test are removed
    for r, name in NAMES.items():
        for root in nnunet_dirs.values():
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    shutil.rmtree(os.path.join(nnunet_dirs["nnUNet_results"], synthetic3d["name"], f"{TEACHER}__nnUNetPlans__{CFG}"),
                  ignore_errors=True)
    tmp = tmp_path_factory.mktemp("selftrain")
    work = str(tmp / "work")
    denoiser = _random_denoiser(synthetic3d, str(tmp / "denoiser.pth"))
    cmd = nnunet_sud_cmd("self-train", "-d", synthetic3d["id"], "-c", CFG, "-f", 0, "--rounds", 2,
                         "--teacher-trainer", TEACHER, "--student-trainer", STUDENT, "--denoise",
                         "--student-id", STUDENT_ID, "--disable-tta", "--device", "cpu", "--work", work, "-np", 1)
    env = dict(os.environ, nnUNet_denoiser=denoiser)
    killed = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=3600,
                            env=dict(env, SUD_TEST_CRASH_AT_EPOCH="0"))
    resumed = run_cmd(cmd, timeout=3600, env=env)
    again = run_cmd(cmd, timeout=600, env=env)
    return {"killed": killed, "resumed": resumed, "again": again, "work": work, "dirs": nnunet_dirs,
            "syn": synthetic3d}


def _random_denoiser(synthetic3d, path):
    import importlib.util
    from batchgenerators.utilities.file_and_folder_operations import load_json
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("bench_common", os.path.join(os.path.dirname(here), "benchmarks",
                                                                               "_common.py"))
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    return common.write_random_denoiser_checkpoint(os.path.join(synthetic3d["preprocessed"], "nnUNetPlans.json"),
                                                   load_json(os.path.join(synthetic3d["raw"], "dataset.json")),
                                                   CFG, path)


@pytest.mark.e2e
def test_a_killed_step_names_itself_and_the_rerun_picks_up_there(selftrain_run):
    killed, resumed = selftrain_run["killed"], selftrain_run["resumed"]
    assert killed.returncode == 2, killed.stdout[-3000:]
    assert "step 'round 1/2: student: nnUNetv2_train 881 2d 0 -tr nnUNetTrainer_selftrainStudent' failed" in killed.stdout
    assert "resume with:\n  nnunet-sud self-train -d 991 -c 2d --rounds 2" in killed.stdout
    assert "simulated crash after epoch 0" in killed.stdout  # the log's tail
    # the re-run: everything before the student is skipped, the student resumes from its checkpoint
    assert "resuming: 5 of 11 steps were done before; picking up at 'round 1/2: student" in resumed
    for title in ("teacher: nnUNetv2_train -tr nnUNetTrainer_selftrainTeacher: done before",
                  "round 1/2: nnUNetv2_predict imagesUnlabeled with the teacher", "round 1/2: student dataset"):
        assert any(title in ln and "skipped" in ln for ln in resumed.splitlines()), title
    assert "resuming the interrupted training from" in resumed
    assert "round 2/2: denoise and filter the pseudo-labels (both)" in resumed
    state = json.load(open(os.path.join(selftrain_run["work"], "state.json")))
    assert len(state["finished"]) == 11
    assert "all 11 steps were done before: nothing to do" in selftrain_run["again"]  # a third run


@pytest.mark.e2e
def test_students_reuse_the_teachers_plans_and_fingerprint(selftrain_run):
    pre = selftrain_run["dirs"]["nnUNet_preprocessed"]
    teacher = json.load(open(os.path.join(pre, selftrain_run["syn"]["name"], "nnUNetPlans.json")))
    fingerprint = json.load(open(os.path.join(pre, selftrain_run["syn"]["name"], "dataset_fingerprint.json")))
    for r, name in NAMES.items():
        plans = json.load(open(os.path.join(pre, name, "nnUNetPlans.json")))
        assert plans.pop("dataset_name") == name
        assert plans == {k: v for k, v in teacher.items() if k != "dataset_name"}
        assert json.load(open(os.path.join(pre, name, "dataset_fingerprint.json"))) == fingerprint
        model = os.path.join(selftrain_run["dirs"]["nnUNet_results"], name, f"{STUDENT}__nnUNetPlans__{CFG}")
        assert json.load(open(os.path.join(model, "plans.json")))["configurations"] == teacher["configurations"]


@pytest.mark.e2e
def test_no_held_out_case_enters_a_student_and_validation_stays_validation(selftrain_run):
    raw, pre = selftrain_run["dirs"]["nnUNet_raw"], selftrain_run["dirs"]["nnUNet_preprocessed"]
    syn = selftrain_run["syn"]
    test_cases = _ids(os.path.join(syn["raw"], "imagesTs"), channel=True) | _ids(os.path.join(syn["raw"], "labelsTs"))
    assert test_cases == {"syn_ts_000", "syn_ts_001"}
    teacher_split = json.load(open(os.path.join(syn["preprocessed"], "splits_final.json")))[0]
    for r, name in NAMES.items():
        images = _ids(os.path.join(raw, name, "imagesTr"), channel=True)
        labels = _ids(os.path.join(raw, name, "labelsTr"))
        preprocessed = {f[:-len(".pkl")] for f in os.listdir(os.path.join(pre, name, "nnUNetPlans_2d"))
                        if f.endswith(".pkl")}
        assert images == labels == preprocessed
        assert not images & test_cases
        assert not os.path.exists(os.path.join(raw, name, "imagesTs"))
        marker = json.load(open(os.path.join(raw, name, "self_training.json")))
        assert set(marker["labeled"]) == {f"syn_lab_{i:03d}" for i in range(6)}
        assert set(marker["pseudo_labeled"]) <= {f"syn_unl_{i:03d}" for i in range(6)}
        assert images == set(marker["labeled"]) | set(marker["pseudo_labeled"])
        split = json.load(open(os.path.join(pre, name, "splits_final.json")))[0]
        assert split["val"] == teacher_split["val"] == ["syn_lab_005"]
        assert split["train"] == teacher_split["train"] + marker["pseudo_labeled"]
        assert not set(split["train"]) & set(split["val"])


@pytest.mark.e2e
def test_filtered_pseudo_labels_carry_the_ignore_label_and_their_dice_per_round(selftrain_run):
    raw, work = selftrain_run["dirs"]["nnUNet_raw"], selftrain_run["work"]
    for r, name in NAMES.items():
        ds = json.load(open(os.path.join(raw, name, "dataset.json")))
        assert ds["labels"] == {"background": 0, "cavity": 1, "wall": 2, "vessel": 3, "ignore": 4}
        filt = json.load(open(os.path.join(work, f"round_{r}", "filter.json")))
        assert filt["denoise"] is True and filt["ignore_label"] == 4
        kept = sorted(c for c, rec in filt["cases"].items() if rec["kept"])
        scored = sorted((c for c, rec in filt["cases"].items() if rec["score"] == rec["score"]),
                        key=lambda c: -filt["cases"][c]["score"])
        assert kept == filt["kept"] == sorted(scored[:math.ceil(0.8 * 6)])  # the best 5 of 6 (NaN never)
        marker = json.load(open(os.path.join(raw, name, "self_training.json")))
        assert marker["pseudo_labeled"] == kept
        for c in kept:
            lab = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(raw, name, "labelsTr", c + ".nii.gz")))
            assert set(np.unique(lab)) <= {0, 1, 2, 3, 4}
            assert np.mean(lab != 4) == pytest.approx(filt["cases"][c]["voxels_kept"], abs=1e-6)
            ref = sitk.ReadImage(os.path.join(selftrain_run["syn"]["raw"], "labelsUnlabeled", c + ".nii.gz"))
            assert lab.shape == sitk.GetArrayFromImage(ref).shape
        s = filt["summary"]
        assert s["cases"] == 6 and s["cases_kept"] == len(kept) and s["cases_with_label"] == 6
        for m in ("teacher", "denoised", "teacher_kept", "pseudo_label"):
            assert set(s["dice"][m]["per_class"]) == {"1", "2", "3"}
            assert all(0 <= v <= 1 for v in s["dice"][m]["per_class"].values() if v == v)
        assert f"| {r} | {len(kept)}/6 |" in open(os.path.join(work, "summary.md")).read()
    assert "Dice pseudo-labels (cavity/wall/vessel)" in open(os.path.join(work, "summary.md")).read()
    # the teacher's probabilities are deleted once filtered
    assert not [f for f in os.listdir(os.path.join(work, "round_1", "predictions")) if f.endswith(".npz")]


@pytest.mark.e2e
def test_the_students_are_ordinary_nnunet_model_folders(selftrain_run):
    """Round 1's student was the teacher of round 2: plain nnUNetv2_predict (-d 881 -tr STUDENT) made the
    pseudo-labels of round 2 from its model folder. The final student (round 2) is loaded by nnU-Net's
    predictor the way nnUNetv2_predict loads it and segments a test case (in process: no second
    ~20 s process start-up for the same code path)."""
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    syn, results = selftrain_run["syn"], selftrain_run["dirs"]["nnUNet_results"]
    assert (f"round2_predict: nnUNetv2_predict -i {os.path.join(syn['raw'], 'imagesUnlabeled')} -o "
            f"{os.path.join(selftrain_run['work'], 'round_2', 'predictions')} -d 881 -c 2d -f 0 -tr {STUDENT}"
            in selftrain_run["resumed"])
    preds = os.path.join(selftrain_run["work"], "round_2", "predictions")
    assert _ids(preds) == {f"syn_unl_{i:03d}" for i in range(6)}
    final = os.path.join(results, NAMES[2], f"{STUDENT}__nnUNetPlans__{CFG}")
    assert f"Final model folder: {final}" in selftrain_run["resumed"]
    assert f"nnUNetv2_predict -i INPUT -o OUTPUT -d 882 -c 2d -f 0 -tr {STUDENT} -p nnUNetPlans" in \
        selftrain_run["resumed"]
    for f in ("plans.json", "dataset.json", "dataset_fingerprint.json", "fold_0/checkpoint_final.pth"):
        assert os.path.isfile(os.path.join(final, f)), f
    predictor = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu"),
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(final, (0,), "checkpoint_final.pth")
    img, props = SimpleITKIO().read_images([os.path.join(syn["raw"], "imagesTs", "syn_ts_000_0000.nii.gz")])
    seg = predictor.predict_single_npy_array(img, props)
    assert seg.shape == img.shape[1:]
    assert set(np.unique(seg)) <= {0, 1, 2, 3}  # the ignore label is never predicted
