"""The real-data quality benchmark (benchmarks/ssl_quality.py), on small stand-ins for LA_lite and
ACDC_lite: the literature's labeled subsets, a validation split that is neither labeled nor
unlabeled, one shared test set per source scored only by the explicit test step, the upper bound
labeling the whole pool, seeded repeated runs, and one result file per model and split."""
import importlib
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import load_benchmark


def _load_benchmark():
    return load_benchmark("ssl_quality")


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
    src = bench.Source("la", str(tmp_path / "LA_lite"), "3d_fullres", la_test=3, la_validation=2)
    assert src.test == ids[-3:] and src.validation == ids[-5:-3] and src.pool == ids[:-5]
    raws = {n: src.convert(x, str(tmp_path / "work"), did, f"t{n}", n)
            for did, n in ((901, 2), (902, 4))}
    raws["all"] = src.convert(x, str(tmp_path / "work"), 903, "tall", "all")
    for n, raw in raws.items():
        labeled = _cases(raw, "labelsTr")
        k = len(src.pool) if n == "all" else n
        assert labeled == sorted(ids[:k])  # the first k of train.list
        assert _cases(raw, "imagesTr") == labeled
        assert _cases(raw, "imagesUnlabeled") == sorted(ids[k:-5])  # the rest of the pool, labels withheld
        assert _cases(raw, "imagesTs") == _cases(raw, "labelsTs") == sorted(ids[-5:])  # validation + test
        names = json.load(open(os.path.join(raw, "dataset.json")))["labels"]
        assert names == {"background": 0, "LA": 1}
        for split, cases in (("validation", ids[-5:-3]), ("test", ids[-3:])):
            images, labels = src.split_folders(str(tmp_path / "work"), raw, split)
            assert sorted(f.rsplit("_0000", 1)[0] for f in os.listdir(images)) == sorted(cases)
            assert sorted(f[:-len(".nii.gz")] for f in os.listdir(labels)) == sorted(cases)


def test_acdc_settings_count_patients_and_hold_out_validation_patients(tmp_path):
    bench = _load_benchmark()
    from nnunet_sud.experiment import Experiment
    train = [f"patient{p:03d}_frame{f:02d}" for p in (7, 2, 5, 4, 1) for f in (1, 12)]
    val = [f"patient{p:03d}_frame{f:02d}" for p in (9, 10) for f in (1, 12)]
    _make_source(tmp_path / "ACDC_lite", train, val, n_labels=3)
    x = Experiment(str(tmp_path / "work"), "cpu")
    src = bench.Source("acdc", str(tmp_path / "ACDC_lite"), "2d", validation_patients=2)
    assert src.validation == train[6:] and src.test == val  # both frames of the last 2 patients
    raw = src.convert(x, str(tmp_path / "work"), 911, "acdc2", 2)
    assert _cases(raw, "labelsTr") == sorted(train[:4])  # both frames of patients 007 and 002
    assert _cases(raw, "imagesUnlabeled") == sorted(train[4:6])  # patient 005: not a validation patient
    assert _cases(raw, "labelsTs") == sorted(val + train[6:])
    split = json.load(open(os.path.join(raw, "split.json")))
    assert split["counts"]["labeled_groups"] == 2
    assert json.load(open(os.path.join(raw, "dataset.json")))["labels"] == {"background": 0, "RV": 1, "Myo": 2,
                                                                             "LV": 3}
    # a work folder converted with another split is refused, not silently reused
    other = bench.Source("acdc", str(tmp_path / "ACDC_lite"), "2d", validation_patients=1)
    from nnunet_sud.errors import UserFacingError
    with pytest.raises(UserFacingError, match="another split"):
        other.convert(x, str(tmp_path / "work"), 911, "acdc2", 2)


def test_bad_source_folder_and_test_count_are_named(tmp_path):
    bench = _load_benchmark()
    from nnunet_sud.errors import UserFacingError
    with pytest.raises(UserFacingError, match="train.list"):
        bench.Source("la", str(tmp_path), "3d_fullres", la_test=3)
    _make_source(tmp_path / "LA_lite", ["a", "b", "c"])
    with pytest.raises(UserFacingError, match="--la-test 3"):
        bench.Source("la", str(tmp_path / "LA_lite"), "3d_fullres", la_test=3)
    with pytest.raises(UserFacingError, match="--la-validation 1"):
        bench.Source("la", str(tmp_path / "LA_lite"), "3d_fullres", la_test=2, la_validation=1)
    with pytest.raises(UserFacingError, match="val.list"):
        bench.Source("acdc", str(tmp_path / "LA_lite"), "2d", la_test=3)
    _make_source(tmp_path / "ACDC_lite", ["patient001_frame01", "patient002_frame01"], ["patient009_frame01"])
    with pytest.raises(UserFacingError, match="--validation-patients 2"):
        bench.Source("acdc", str(tmp_path / "ACDC_lite"), "2d", validation_patients=2)
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
    """--self-training: the plain and the --denoise run of every setting and repeat get ids that
    collide neither with each other nor with the settings' datasets, for every allowed number of
    rounds and repeats."""
    bench = _load_benchmark()
    args = bench.parse_args(["--acdc", str(tmp_path), "--work", str(tmp_path), "--self-training", "--repeats", "2"])
    assert args.self_training and args.self_training_rounds == 2 and args.self_training_repeats == 2
    used = set(bench.ID_OFFSETS.values())
    for setting, off in bench.SELFTRAIN_OFFSETS.items():
        assert setting in bench.SETTINGS
        for run in range(bench.MAX_SELF_TRAINING_REPEATS):
            for start in (off, off + bench.MAX_SELF_TRAINING_ROUNDS):
                start += run * bench.SELFTRAIN_RUN_STRIDE
                ids = set(range(start, start + bench.MAX_SELF_TRAINING_ROUNDS))
                assert not ids & used, setting
                used |= ids
    assert args.dataset_id_base + max(used) <= 999  # nnU-Net's dataset ids have three digits
    with pytest.raises(SystemExit):
        bench.parse_args(["--acdc", str(tmp_path), "--work", str(tmp_path), "--self-training",
                          "--self-training-rounds", str(bench.MAX_SELF_TRAINING_ROUNDS + 1)])
    with pytest.raises(SystemExit):
        bench.parse_args(["--acdc", str(tmp_path), "--work", str(tmp_path), "--self-training",
                          "--self-training-repeats", str(bench.MAX_SELF_TRAINING_REPEATS + 1)])


def test_self_training_rows_run_the_command_from_the_runs_baseline_and_score_every_round(tmp_path, monkeypatch):
    """--self-training: the command line the benchmark gives ``nnunet-sud self-train`` (run k's
    baseline variant as teacher and students, fold all, the run's denoiser, no TTA unless --tta) and
    one scored model per round's student, with the student's own dataset."""
    bench = _load_benchmark()
    train = [f"patient{p:03d}_frame{f:02d}" for p in (1, 2, 3) for f in (1, 12)]
    _make_source(tmp_path / "ACDC_lite", train, [f"patient009_frame{f:02d}" for f in (1, 12)], n_labels=3)
    args = bench.parse_args(["--acdc", str(tmp_path / "ACDC_lite"), "--work", str(tmp_path / "work"), "--settings",
                             "acdc3", "--device", "cpu", "--trainers", "--self-training", "--epochs", "3",
                             "--validation-patients", "1", "--repeats", "2"])
    b = bench.Benchmark(args, [])
    source = b.sources["acdc"]
    ran, scored, trained = [], [], []
    q = {"dice": {"pseudo_label": {"mean": 0.5}}}

    def run(name, cmd, env=None):
        ran.append([str(c) for c in cmd])
        work = cmd[cmd.index("--work") + 1]
        os.makedirs(work, exist_ok=True)
        with open(os.path.join(work, "summary.json"), "w") as f:
            json.dump({"student_datasets": {"1": "Dataset746_a_r1", "2": "Dataset747_a_r2"},
                       "rounds": {"1": q, "2": q}}, f)
    monkeypatch.setattr(b.x, "run", run)
    monkeypatch.setattr(b, "trained", lambda did, dname, cfg, trainer, run, denoiser=None:
                        trained.append((trainer, run)) or {"train_seconds": 10.0, "seed": run})
    monkeypatch.setattr(b, "score", lambda setting, split, label, run, did, dname, src, raw, trainer, info, denoiser=None,
                        extra=None: scored.append((split, label, run, did, dname, trainer, info["train_seconds"] >= 10,
                                                   extra)))
    b.self_training("acdc3", 611, "Dataset611_x", "/raw", source, 2, denoise=True)
    cmd = ran[0][ran[0].index("self-train"):]
    opts = dict(zip(cmd[1::2], cmd[2::2]))
    assert opts["-d"] == "611" and opts["-c"] == "2d" and opts["-f"] == "all" and opts["--rounds"] == "2"
    assert opts["--teacher-trainer"] == opts["--student-trainer"] == "nnUNetTrainer_bench_run2"
    sid = 600 + bench.SELFTRAIN_OFFSETS["acdc3"] + bench.MAX_SELF_TRAINING_ROUNDS + bench.SELFTRAIN_RUN_STRIDE
    assert opts["--student-id"] == str(sid)
    assert "--denoise" in cmd and cmd[cmd.index("--denoiser-trainer") + 1] == "nnUNetTrainerLabelDenoiser_bench_run2"
    assert "--disable-tta" in cmd
    assert ("nnUNetTrainer", 2) in trained and ("nnUNetTrainerLabelDenoiser", 2) in trained
    assert scored == [("validation", "SelfTrain_denoise_r1", 2, sid, "Dataset746_a_r1", "nnUNetTrainer", True,
                       {"rounds": 1, "pseudo_label_dice": 0.5}),
                      ("validation", "SelfTrain_denoise_r2", 2, sid + 1, "Dataset747_a_r2", "nnUNetTrainer", True,
                       {"rounds": 2, "pseudo_label_dice": 0.5})]
    b.self_training("acdc3", 611, "Dataset611_x", "/raw", source, 1, denoise=False)
    assert "--denoise" not in ran[1] and ran[1][ran[1].index("--student-id") + 1] == "641"


def test_runs_are_seeded_variants_scored_once_per_split_into_result_files(tmp_path, monkeypatch):
    """Each run is its own seeded variant (``T_bench_run<k>``, seed k); a model is scored on the
    validation split by default and on the test split only with --test, each once; the result file
    holds the schema of ssl_quality.py's docstring, with every case and class of the split; --test
    refuses a model that is not trained instead of training it."""
    import importlib
    import sys
    import SimpleITK as sitk
    bench = _load_benchmark()
    from nnunet_sud.errors import UserFacingError
    frames = [f"patient{p:03d}_frame{f:02d}" for p in (1, 2, 3, 4, 5) for f in (1, 12)]
    val = [f"patient{p:03d}_frame{f:02d}" for p in (9, 10) for f in (1, 12)]
    _make_source(tmp_path / "ACDC_lite", frames, val, n_labels=3)
    argv = ["--acdc", str(tmp_path / "ACDC_lite"), "--work", str(tmp_path / "work"), "--settings", "acdc3",
            "--device", "cpu", "--trainers", "--epochs", "3", "--iterations", "4", "--repeats", "2",
            "--validation-patients", "1", "--no-upper-bound", "--results", str(tmp_path / "results")]
    b = bench.Benchmark(bench.parse_args(argv), argv)
    # the variants module: one seeded class per run
    sys.path.insert(0, b.x.variants_dir)
    try:
        mod = importlib.import_module("bench_variants")
    finally:
        sys.path.remove(b.x.variants_dir)
    assert (mod.nnUNetTrainer_bench_run1.seed, mod.nnUNetTrainer_bench_run2.seed) == (1, 2)
    assert mod.nnUNetTrainer_bench_run2.budget.epochs == 3 and mod.nnUNetTrainer_bench_run2.budget.iterations == 4
    source = b.sources["acdc"]
    monkeypatch.setattr(b, "prepared", lambda src, setting, labeled: (611, "Dataset611_SSLQ_acdc3", raw))
    raw = source.convert(b.x, str(tmp_path / "work"), 611, "SSLQ_acdc3", 3)
    trained, predicted = [], []

    def train(did, dname, cfg, fold, trainer, denoiser=None):
        folder = b.x.fold_dir(dname, trainer, cfg, fold)
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, "checkpoint_final.pth"), "w").close()
        trained.append(trainer)
        return 12.5

    def predict(did, dname, cfg, fold, trainer, images, out, tta=False, denoiser=None, log_name=None):
        predicted.append((trainer, sorted(os.listdir(images))))
        os.makedirs(out)
        for f in os.listdir(images):  # the reference itself: Dice 1 wherever a class is present
            case = f.rsplit("_0000", 1)[0]
            sitk.WriteImage(sitk.ReadImage(os.path.join(raw, "labelsTs", case + ".nii.gz")),
                            os.path.join(out, case + ".nii.gz"))
        return out
    monkeypatch.setattr(b.x, "train", train)
    monkeypatch.setattr(b.x, "predict", predict)
    b.main()
    assert trained == ["nnUNetTrainer_bench_run1", "nnUNetTrainer_bench_run2"]
    validation = [c for c in frames if c.startswith("patient005")]
    assert [p[1] for p in predicted] == [[c + "_0000.nii.gz" for c in sorted(validation)]] * 2
    rec = json.load(open(tmp_path / "results" / "acdc3" / "validation" / "nnUNetTrainer" / "run2.json"))
    assert {k: rec[k] for k in ("trainer", "setting", "split", "run", "seed", "epochs", "iterations")} == {
        "trainer": "nnUNetTrainer", "setting": "acdc3", "split": "validation", "run": 2, "seed": 2, "epochs": 3,
        "iterations": 4}
    assert rec["train_seconds"] == 12.5 and rec["git_commit"]
    assert sorted(rec["cases"]) == sorted(validation)
    for case in rec["cases"].values():
        assert sorted(case) == ["LV", "Myo", "RV"]
        assert all(m["dice"] in (1.0, None) and m["hd95"] in (0.0, None) for m in case.values())
    # no machine paths in a committed file: the folders are named by their role
    assert str(tmp_path) not in json.dumps(rec)
    assert rec["command"].startswith("benchmarks/ssl_quality.py --acdc ACDC_lite --work WORK --settings acdc3")
    assert "--results RESULTS" in rec["command"]

    # again: nothing is trained or scored twice; the test split is untouched without --test
    b.main()
    assert len(trained) == 2 and len(predicted) == 2
    assert not (tmp_path / "results" / "acdc3" / "test").exists()
    # the test step: every finished run once, on the test cases
    bt = bench.Benchmark(bench.parse_args(argv + ["--test"]), argv + ["--test"])
    monkeypatch.setattr(bt, "prepared", lambda src, setting, labeled: (611, "Dataset611_SSLQ_acdc3", raw))
    monkeypatch.setattr(bt.x, "train", train)
    monkeypatch.setattr(bt.x, "predict", predict)
    bt.main()
    bt.main()
    assert len(trained) == 2 and len(predicted) == 4
    assert predicted[-1][1] == [c + "_0000.nii.gz" for c in sorted(val)]
    assert sorted(os.listdir(tmp_path / "results" / "acdc3" / "test" / "nnUNetTrainer")) == ["run1.json", "run2.json"]
    # a run that was never trained: --test stops instead of training it
    b3 = bench.Benchmark(bench.parse_args(argv + ["--test", "--repeats", "3"]), argv)
    monkeypatch.setattr(b3, "prepared", lambda src, setting, labeled: (611, "Dataset611_SSLQ_acdc3", raw))
    monkeypatch.setattr(b3.x, "train", train)
    monkeypatch.setattr(b3.x, "predict", predict)
    with pytest.raises(UserFacingError, match="nnUNetTrainer_bench_run3 .* is not trained"):
        b3.main()
    assert len(trained) == 2
