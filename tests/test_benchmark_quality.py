"""The real-data quality benchmark's splits (benchmarks/ssl_quality.py), on small stand-ins for
LA_lite and ACDC_lite: the literature's labeled subsets, one shared held-out test set per source,
the upper bound labeling the whole pool, and nothing of the test set in training."""
import importlib.util
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(HERE), "benchmarks", "ssl_quality.py")


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("ssl_quality", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_case(folder, cid, rng, n_labels):
    shape = (4, 10, 12)  # z, y, x
    img = sitk.GetImageFromArray(rng.normal(size=shape).astype(np.float32))
    lab = sitk.GetImageFromArray(rng.integers(0, n_labels + 1, size=shape).astype(np.uint8))
    for im in (img, lab):
        im.SetSpacing((1.25, 1.25, 1.25))
    sitk.WriteImage(img, os.path.join(folder, "images", f"{cid}.nii.gz"))
    sitk.WriteImage(lab, os.path.join(folder, "labels", f"{cid}.nii.gz"))


def _make_source(folder, train, val=None, n_labels=1):
    rng = np.random.default_rng(0)
    for sub in ("images", "labels"):
        os.makedirs(os.path.join(folder, sub))
    for cid in train + (val or []):
        _write_case(folder, cid, rng, n_labels)
    with open(os.path.join(folder, "train.list"), "w") as f:
        f.write("\n".join(train) + "\n")
    if val is not None:
        with open(os.path.join(folder, "val.list"), "w") as f:
            f.write("\n".join(val) + "\n")


def _cases(raw, sub):
    folder = os.path.join(raw, sub)
    if not os.path.isdir(folder):
        return []
    return sorted(f[:-len(".nii.gz")].rsplit("_0000", 1)[0] for f in os.listdir(folder))


def test_la_settings_share_one_test_set_and_label_the_first_cases(tmp_path):
    bench = _load_benchmark()
    from nnunet_sud.experiment import Experiment
    ids = [f"LA{i:02d}" for i in range(10)][::-1]  # list order, not sorted order, decides
    _make_source(tmp_path / "LA_lite", ids)
    x = Experiment(str(tmp_path / "work"), "cpu")
    src = bench.Source("la", str(tmp_path / "LA_lite"), "3d_fullres", la_test=3)
    assert src.test == ids[-3:] and src.pool == ids[:-3]
    raws = {n: src.convert(x, str(tmp_path / "work"), did, f"t{n}", n)
            for did, n in ((901, 2), (902, 4))}
    raws["all"] = src.convert(x, str(tmp_path / "work"), 903, "tall", "all")
    for n, raw in raws.items():
        labeled = _cases(raw, "labelsTr")
        k = len(src.pool) if n == "all" else n
        assert labeled == sorted(ids[:k])  # the first k of train.list
        assert _cases(raw, "imagesTr") == labeled
        assert _cases(raw, "imagesUnlabeled") == sorted(ids[k:-3])  # the rest of the pool, labels withheld
        assert _cases(raw, "imagesTs") == _cases(raw, "labelsTs") == sorted(ids[-3:])
        names = json.load(open(os.path.join(raw, "dataset.json")))["labels"]
        assert names == {"background": 0, "LA": 1}


def test_acdc_settings_count_patients_and_test_on_val_list(tmp_path):
    bench = _load_benchmark()
    from nnunet_sud.experiment import Experiment
    train = [f"patient{p:03d}_frame{f:02d}" for p in (7, 2, 5, 1) for f in (1, 12)]
    val = [f"patient{p:03d}_frame{f:02d}" for p in (9, 10) for f in (1, 12)]
    _make_source(tmp_path / "ACDC_lite", train, val, n_labels=3)
    x = Experiment(str(tmp_path / "work"), "cpu")
    src = bench.Source("acdc", str(tmp_path / "ACDC_lite"), "2d", la_test=20)
    raw = src.convert(x, str(tmp_path / "work"), 911, "acdc2", 2)
    assert _cases(raw, "labelsTr") == sorted(train[:4])  # both frames of patients 007 and 002
    assert _cases(raw, "imagesUnlabeled") == sorted(train[4:])
    assert _cases(raw, "labelsTs") == sorted(val)
    split = json.load(open(os.path.join(raw, "split.json")))
    assert split["counts"]["labeled_groups"] == 2
    assert json.load(open(os.path.join(raw, "dataset.json")))["labels"] == {"background": 0, "RV": 1, "Myo": 2,
                                                                             "LV": 3}


def test_bad_source_folder_and_test_count_are_named(tmp_path):
    bench = _load_benchmark()
    from nnunet_sud.errors import UserFacingError
    with pytest.raises(UserFacingError, match="train.list"):
        bench.Source("la", str(tmp_path), "3d_fullres", la_test=3)
    _make_source(tmp_path / "LA_lite", ["a", "b", "c"])
    with pytest.raises(UserFacingError, match="--la-test 3"):
        bench.Source("la", str(tmp_path / "LA_lite"), "3d_fullres", la_test=3)
    with pytest.raises(UserFacingError, match="val.list"):
        bench.Source("acdc", str(tmp_path / "LA_lite"), "2d", la_test=3)
    with pytest.raises(SystemExit):
        bench.parse_args(["--work", str(tmp_path)])  # neither --la nor --acdc


def test_budget_variants_set_the_budget_and_checkpoint_often_enough_to_resume(tmp_path, monkeypatch):
    """The generated variants are nnU-Net trainer subclasses that set the budget after nnU-Net's
    __init__, and write checkpoint_latest every tenth of the budget (nnU-Net's every 50 epochs
    would make a stopped 20-epoch benchmark restart from scratch with --c)."""
    import sys
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_sud.budget import variants_source
    from nnunet_sud.trainers.sud import nnUNetTrainerSUD
    for suffix, epochs in (("_bx", 20), ("_by", 3), ("_bz", 1000)):
        src = variants_source({"nnUNetTrainer": (epochs, 7), "nnUNetTrainerSUD": (epochs, 7),
                               "nnUNetTrainerLabelDenoiser": (epochs, 7)}, 5, suffix, final_validation=False)
        (tmp_path / f"v{suffix}.py").write_text(src)
    sys.path.insert(0, str(tmp_path))
    try:
        mods = {s: importlib.import_module(f"v{s}") for s in ("_bx", "_by", "_bz")}
    finally:
        sys.path.remove(str(tmp_path))
    assert issubclass(mods["_bx"].nnUNetTrainerSUD_bx, nnUNetTrainerSUD)

    # nnU-Net's own __init__ (plans, folders) is not what is tested here; it sets save_every = 50
    def plain_init(self, *args, **kwargs):
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1000, 250, 50
        self.save_every = 50
    monkeypatch.setattr(nnUNetTrainer, "__init__", plain_init)
    budget = {s: getattr(m, "nnUNetTrainer" + s)(None, "2d", "all", None) for s, m in mods.items()}
    got = {s: (t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch, t.save_every)
           for s, t in budget.items()}
    assert got == {"_bx": (20, 7, 5, 2), "_by": (3, 7, 5, 1), "_bz": (1000, 7, 5, 50)}

    # the segmenters skip nnU-Net's final validation (it would predict fold all's training cases);
    # the denoiser keeps its own: the quality record that SUD checks when it loads the denoiser
    from nnunet_sud.denoiser.trainer import nnUNetTrainerLabelDenoiser
    validated, logged = [], []
    monkeypatch.setattr(nnUNetTrainer, "perform_actual_validation", lambda self, *a: validated.append(type(self)))
    monkeypatch.setattr(nnUNetTrainerLabelDenoiser, "perform_actual_validation",
                        lambda self, *a: validated.append(type(self)))
    monkeypatch.setattr(nnUNetTrainer, "print_to_log_file", lambda self, *a, **k: logged.append(" ".join(a)))
    m = mods["_bx"]
    for cls in (m.nnUNetTrainer_bx, m.nnUNetTrainerSUD_bx, m.nnUNetTrainerLabelDenoiser_bx):
        object.__new__(cls).perform_actual_validation()  # what it does depends on the class alone
    assert validated == [m.nnUNetTrainerLabelDenoiser_bx]
    assert len(logged) == 2 and all("final validation skipped" in line for line in logged)


def test_self_training_students_get_dataset_ids_of_their_own(tmp_path):
    """--self-training: the plain and the --denoise run of every setting get ids that collide neither
    with each other nor with the settings' datasets, for every allowed number of rounds."""
    bench = _load_benchmark()
    args = bench.parse_args(["--acdc", str(tmp_path), "--work", str(tmp_path), "--self-training"])
    assert args.self_training and args.self_training_rounds == 2
    used = set(bench.ID_OFFSETS.values())
    for setting, off in bench.SELFTRAIN_OFFSETS.items():
        assert setting in bench.SETTINGS
        for start in (off, off + bench.MAX_SELF_TRAINING_ROUNDS):
            ids = set(range(start, start + bench.MAX_SELF_TRAINING_ROUNDS))
            assert not ids & used, setting
            used |= ids
    with pytest.raises(SystemExit):
        bench.parse_args(["--acdc", str(tmp_path), "--work", str(tmp_path), "--self-training",
                          "--self-training-rounds", str(bench.MAX_SELF_TRAINING_ROUNDS + 1)])


def test_self_training_rows_run_the_command_from_the_baseline_and_evaluate_every_round(tmp_path, monkeypatch):
    """--self-training: the command line the benchmark gives ``nnunet-sud self-train`` (the baseline's
    _bench trainer as teacher and students, fold all, the setting's denoiser, no TTA unless --tta) and
    one evaluated row per round's student, with the pseudo-label quality table from the run's summary."""
    bench = _load_benchmark()
    train = [f"patient{p:03d}_frame{f:02d}" for p in (1, 2) for f in (1, 12)]
    _make_source(tmp_path / "ACDC_lite", train, [f"patient009_frame{f:02d}" for f in (1, 12)], n_labels=3)
    args = bench.parse_args(["--acdc", str(tmp_path / "ACDC_lite"), "--work", str(tmp_path / "work"), "--settings",
                             "acdc3", "--device", "cpu", "--trainers", "--self-training", "--epochs", "3"])
    b = bench.Benchmark(args, [])
    source = b.sources["acdc"]
    ran, evaluated = [], []
    q = {"cases": 4, "cases_kept": 3, "voxels_kept": 0.9, "cases_with_label": 4,
         "dice": {"pseudo_label": {"per_class": {"1": 0.5, "2": 0.25, "3": 0.75}, "mean": 0.5, "cases": 3}}}

    def run(name, cmd, env=None):
        ran.append([str(c) for c in cmd])
        work = cmd[cmd.index("--work") + 1]
        os.makedirs(work, exist_ok=True)
        with open(os.path.join(work, "summary.json"), "w") as f:
            json.dump({"student_datasets": {"1": "Dataset646_a_r1", "2": "Dataset647_a_r2"},
                       "rounds": {"1": q, "2": q}}, f)
    monkeypatch.setattr(b.x, "run", run)
    monkeypatch.setattr(b, "train_predict_evaluate", lambda setting, did, dname, raw, src, trainer, label, denoiser=None:
                        evaluated.append((did, dname, trainer, label)) or f"{label}.json")
    rows, quality = b.self_training("acdc3", 611, "/raw", source, denoise=True)
    cmd = ran[0][ran[0].index("self-train"):]
    opts = dict(zip(cmd[1::2], cmd[2::2]))
    assert opts["-d"] == "611" and opts["-c"] == "2d" and opts["-f"] == "all" and opts["--rounds"] == "2"
    assert opts["--teacher-trainer"] == opts["--student-trainer"] == "nnUNetTrainer_bench"
    assert opts["--student-id"] == str(600 + bench.SELFTRAIN_OFFSETS["acdc3"] + bench.MAX_SELF_TRAINING_ROUNDS)
    assert "--denoise" in cmd and cmd[cmd.index("--denoiser-trainer") + 1] == "nnUNetTrainerLabelDenoiser_bench"
    assert "--disable-tta" in cmd
    assert rows == [("SelfTrain_denoise_r1", "SelfTrain_denoise_r1.json"),
                    ("SelfTrain_denoise_r2", "SelfTrain_denoise_r2.json")]
    assert evaluated == [(646, "Dataset646_a_r1", "nnUNetTrainer", "SelfTrain_denoise_r1"),
                         (647, "Dataset647_a_r2", "nnUNetTrainer", "SelfTrain_denoise_r2")]
    assert "Dice pseudo-labels (RV/Myo/LV)" in quality and "| 2 | 3/4 | 90.0% | 0.500/0.250/0.750 (mean 0.500) |" in quality
    b.self_training("acdc3", 611, "/raw", source, denoise=False)
    assert "--denoise" not in ran[1] and ran[1][ran[1].index("--student-id") + 1] == "641"
