"""Semi-supervised quality on real scans: LA_lite and ACDC_lite in the literature's settings.

For each setting (``--settings``, default all four)

    la8, la16      LA_lite (left atrium, 3D MRI): the first 8 / 16 cases of ``train.list`` labeled
    acdc3, acdc7   ACDC_lite (RV, myocardium, LV; cine MRI): both frames of the first 3 / 7 patients
                   of ``train.list`` labeled

the script runs, through the real commands and in its own nnU-Net folders below ``--work``:

1. ``nnunet-sud convert folder``: labeled cases to imagesTr/labelsTr, the rest of the training pool to
   imagesUnlabeled (labels withheld), held-out cases to imagesTs/labelsTs. Test sets: ACDC, the
   20 frames (10 patients) of ``val.list``; LA_lite has no test list (its 20 standard test cases
   are not in the set), so the last ``--la-test`` (default 20) cases of ``train.list`` are held
   out and the pool is the first 80 - 20 = 60. The test set is the same for every setting of a
   source and for its upper bound. Nothing is tuned on it.
2. ``nnUNetv2_plan_and_preprocess`` (planned from the labeled cases, as a user would) and
   ``nnunet-sud preprocess-unlabeled``; configuration ``--la-configuration`` (3d_fullres) /
   ``--acdc-configuration`` (2d: 10 mm slices, 6-18 per frame, as the ACDC literature).
3. ``nnUNetv2_train ... all -tr nnUNetTrainerLabelDenoiser_bench`` on the labeled label maps,
   when a trainer needs a denoiser.
4. ``nnUNetv2_train ... all -tr T_bench`` for ``nnUNetTrainer`` (labeled cases only, the
   baseline), each semi-supervised trainer of ``--trainers``, and ``nnUNetTrainer`` on a
   conversion of the same source with every pool case labeled (the upper bound, reported as
   ``nnUNetTrainer_allLabels``). The upper bound is trained with the setting's plans (moved with
   ``nnUNetv2_move_plans_between_datasets``, then ``nnUNetv2_preprocess``): same patch, batch size,
   network and normalisation, only the labels differ (nnU-Net's own planning would give the
   140-frame ACDC set a batch of 61 slices against 3 for 6 frames). Fold ``all``: every labeled case trains (there is no model
   selection; the final checkpoint is used). The budget is the same for every trainer:
   ``--epochs`` x ``--iterations`` (nnU-Net's default is 1000 x 250; the ``_bench`` variants
   only change these counts, and skip nnU-Net's final validation, which for fold ``all`` would
   predict training cases).
5. ``nnUNetv2_predict`` of imagesTs (no TTA unless ``--tta``), ``nnunet-sud evaluate`` (Dice,
   HD95 in mm) and ``nnunet-sud compare`` against the baseline: ``WORK/reports/<setting>/``.
6. ``WORK/reports/summary.md``: per setting, the Table-3-style comparison, training time per
   trainer, the budget and this command.

With ``--self-training``, ``nnunet-sud self-train`` also runs from the baseline (the
``nnUNetTrainer_bench`` model of step 4 is its first teacher; students: ``nnUNetTrainer_bench``, the
same budget each), ``--self-training-rounds`` rounds, once plain and once with ``--denoise`` (the
denoiser of step 3); every round's student is evaluated on the test cases (``SelfTrain_r<R>``,
``SelfTrain_denoise_r<R>``) and the summary gets the pseudo-label Dice per round against the
withheld labels of the unlabeled pool (docs/self_training.md).

Re-running continues where it stopped: finished trainings are skipped (and their evaluations
reused when newer than the checkpoint), interrupted ones resume with ``--c`` (from nnU-Net's
latest checkpoint). Examples::

    # the full protocol on a GPU (budget of your choice; nnU-Net's default is 1000 x 250)
    python benchmarks/ssl_quality.py --la /data/LA_lite --acdc /data/ACDC_lite --work /scratch/sslq \\
        --epochs 200 --iterations 250 --device cuda
    # self-training rows beside the others (1 and 2 rounds, with and without --denoise)
    python benchmarks/ssl_quality.py --acdc ../shared/data/ACDC_lite --settings acdc3 --work /work/sslq \\
        --epochs 20 --iterations 100 --val-iterations 5 --device cpu --n-proc-da 1 --trainers --self-training
    # the reduced CPU run reported in docs/benchmarks.md
    python benchmarks/ssl_quality.py --acdc ../shared/data/ACDC_lite --settings acdc3 --work /tmp/sslq \\
        --epochs 4 --iterations 50 --device cpu
"""
import argparse
import json
import os
import shlex
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

import numpy as np  # noqa: E402

from nnunet_sud.errors import UserFacingError  # noqa: E402
from nnunet_sud.evaluation.target_quality import target_quality_report  # noqa: E402
from nnunet_sud.budget import variants_source  # noqa: E402
from nnunet_sud.experiment import Experiment, check_trainers, needs_denoiser  # noqa: E402

SUFFIX = "_bench"
DENOISER = "nnUNetTrainerLabelDenoiser"
UPPER = "nnUNetTrainer_allLabels"
SETTINGS = {
    "la8": ("la", 8), "la16": ("la", 16),
    "acdc3": ("acdc", 3), "acdc7": ("acdc", 7),
}
# dataset ids: <base> + offset; "<setting>_all": the setting's upper bound (every pool case labeled)
ID_OFFSETS = {"la8": 1, "la16": 2, "la8_all": 3, "la16_all": 4,
              "acdc3": 11, "acdc7": 12, "acdc3_all": 13, "acdc7_all": 14}
# self-training students (--self-training): round r of the plain run <base> + offset + r - 1, of the
# --denoise run <base> + offset + MAX_SELF_TRAINING_ROUNDS + r - 1
SELFTRAIN_OFFSETS = {"la8": 21, "la16": 31, "acdc3": 41, "acdc7": 51}
MAX_SELF_TRAINING_ROUNDS = 5
SELFTRAIN = "SelfTrain"
LABEL_NAMES = {"la": ["background", "LA"], "acdc": ["background", "RV", "Myo", "LV"]}
DEFAULT_TRAINERS = ("nnUNetTrainerTE", "nnUNetTrainerSUD", "nnUNetTrainerSUDMeanTeacher",
                    "nnUNetTrainerMeanTeacher", "nnUNetTrainerUAMT", "nnUNetTrainerDAEUncertainty",
                    "nnUNetTrainerPostDenoise", "nnUNetTrainerSUD2", "nnUNetTrainerSegMatch", "nnUNetTrainerDMNet")


def read_list(path: str):
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip()]


class Source:
    """One benchmark source: where it is, how it is split, which configuration trains on it."""

    def __init__(self, key: str, folder: str, configuration: str, la_test: int):
        self.key, self.folder, self.configuration = key, os.path.abspath(folder), configuration
        train_list = os.path.join(self.folder, "train.list")
        if not os.path.isfile(train_list):
            raise UserFacingError(f"{train_list} not found: --{key} must be the {key.upper()}_lite folder "
                                  "(images/, labels/, train.list; see ../shared/data/README.md)")
        train = read_list(train_list)
        if key == "la":
            if not 0 < la_test < len(train):
                raise UserFacingError(f"--la-test {la_test}: must be between 1 and {len(train) - 1}")
            self.pool, self.test = train[:-la_test], train[-la_test:]
            self.group_regex = None
        else:
            val_list = os.path.join(self.folder, "val.list")
            if not os.path.isfile(val_list):
                raise UserFacingError(f"{val_list} not found: ACDC_lite's validation frames are its test set")
            self.pool, self.test = train, read_list(val_list)
            self.group_regex = r"^(patient\d+)"

    def convert(self, x: Experiment, work: str, dataset_id: int, name: str, labeled) -> str:
        """``nnunet-sud convert folder`` with this source's split; returns the raw dataset folder."""
        lists = os.path.join(work, "lists")
        os.makedirs(lists, exist_ok=True)
        pool_file, test_file = os.path.join(lists, f"{self.key}_pool.list"), os.path.join(lists, f"{self.key}_test.list")
        for path, ids in ((pool_file, self.pool), (test_file, self.test)):
            with open(path, "w") as f:
                f.write("\n".join(ids) + "\n")
        raw = x.raw_dir(f"Dataset{dataset_id:03d}_{name}")
        if not os.path.isfile(os.path.join(raw, "dataset.json")):
            args = ["convert", "folder", self.folder, "-d", dataset_id, "--name", name, "--labeled", labeled,
                    "--select", "first", "--train-list", pool_file, "--test-list", test_file, "-np", 2]
            if self.group_regex:
                args += ["--group-regex", self.group_regex]
            args += ["--label-names", *LABEL_NAMES[self.key]]
            x.run(f"convert_{name}", x.sud(*args))
        return raw


def dataset_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


class Benchmark:
    def __init__(self, args, argv):
        self.args = args
        self.command = " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + list(argv))
        device = args.device
        if device is None:
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.x = Experiment(args.work, device, n_proc_da=args.n_proc_da)
        self.trainers = list(dict.fromkeys(args.trainers))
        check_trainers(self.trainers)
        self.sources = {}
        for setting in args.settings:
            key = SETTINGS[setting][0]
            if key not in self.sources:
                folder = args.la if key == "la" else args.acdc
                if folder is None:
                    raise UserFacingError(f"setting {setting} needs --{key} (the {key.upper()}_lite folder)")
                cfg = args.la_configuration if key == "la" else args.acdc_configuration
                self.sources[key] = Source(key, folder, cfg, args.la_test)
        budgets = {t: (args.epochs, args.iterations) for t in ["nnUNetTrainer"] + self.trainers}
        budgets[DENOISER] = (args.denoiser_epochs, args.denoiser_iterations)
        self.x.write_variants("bench_variants.py", variants_source(
            budgets, args.val_iterations, SUFFIX, final_validation=False, purpose="benchmarks/ssl_quality.py"))
        self.times = {}

    def ident(self, key: str) -> int:
        return self.args.dataset_id_base + ID_OFFSETS[key]

    def prepared(self, source: Source, setting: str, labeled) -> tuple:
        """The setting's dataset: converted, planned, preprocessed (labeled and unlabeled)."""
        did = self.ident(setting)
        name = f"SSLQ_{setting}"
        raw = source.convert(self.x, self.args.work, did, name, labeled)
        dname = dataset_name(did, name)
        self.x.plan_and_preprocess(did, dname, [source.configuration], log_name=f"plan_{dname}")
        self.x.preprocess_unlabeled(did, source.configuration, log_name=f"preprocess_unlabeled_{dname}")
        return did, dname, raw

    def prepared_upper_bound(self, source: Source, setting: str, plans_from: int) -> tuple:
        """Every pool case labeled, preprocessed with the plans of dataset ``plans_from``."""
        did = self.ident(setting + "_all")
        name = f"SSLQ_{setting}_allLabels"
        raw = source.convert(self.x, self.args.work, did, name, "all")
        dname = dataset_name(did, name)
        pre = self.x.preprocessed_dir(dname)
        if not os.path.isdir(os.path.join(pre, f"nnUNetPlans_{source.configuration}")):
            self.x.run(f"fingerprint_{dname}", ["nnUNetv2_extract_fingerprint", "-d", did, "-np", 2])
            self.x.run(f"move_plans_{dname}", ["nnUNetv2_move_plans_between_datasets", "-s", plans_from, "-t", did,
                                               "-sp", "nnUNetPlans", "-tp", "nnUNetPlans"])
            shutil.copy(os.path.join(raw, "dataset.json"), os.path.join(pre, "dataset.json"))  # as the planner does
            self.x.run(f"preprocess_{dname}", ["nnUNetv2_preprocess", "-d", did, "-plans_name", "nnUNetPlans",
                                               "-c", source.configuration, "-np", 2])
        return did, dname, raw

    def train_predict_evaluate(self, setting, did, dname, raw, source, trainer, label, denoiser=None) -> str:
        cfg, v = source.configuration, trainer + SUFFIX
        self.x.say(f"{setting}: training {label} ({self.args.epochs} x {self.args.iterations})")
        seconds = self.x.train(did, dname, cfg, "all", v, denoiser=denoiser)
        info_file = os.path.join(self.x.fold_dir(dname, v, cfg, "all"), "bench_time.json")
        if seconds:
            with open(info_file, "w") as f:
                json.dump({"train_seconds": seconds}, f)
        self.times.setdefault(setting, {})[label] = (json.load(open(info_file))["train_seconds"]
                                                     if os.path.isfile(info_file) else float("nan"))
        pred = os.path.join(self.args.work, "predictions", setting, label)
        evaluation = os.path.join(self.args.work, "evaluation", setting, label)
        checkpoint = os.path.join(self.x.fold_dir(dname, v, cfg, "all"), "checkpoint_final.pth")
        if os.path.isfile(evaluation + ".json") and os.path.getmtime(evaluation + ".json") > os.path.getmtime(checkpoint):
            self.x.say(f"{setting}: {label} already predicted and evaluated ({evaluation}.json)")
            return evaluation + ".json"
        self.x.predict(did, dname, cfg, "all", v, os.path.join(raw, "imagesTs"), pred, tta=self.args.tta,
                       denoiser=denoiser, log_name=f"predict_{setting}_{label}")
        return self.x.evaluate(raw, pred, evaluation)

    def run_setting(self, setting: str):
        from nnunet_sud.evaluation.compare import compare
        key, n_labeled = SETTINGS[setting]
        source = self.sources[key]
        self.x.say(f"=== {setting}: {n_labeled} labeled {'cases' if key == 'la' else 'patients'}, "
                   f"configuration {source.configuration}")
        did, dname, raw = self.prepared(source, setting, n_labeled)
        denoiser = None
        if any(needs_denoiser(t) for t in self.trainers):
            self.x.say(f"{setting}: training the label-map denoiser ({self.args.denoiser_epochs} x "
                       f"{self.args.denoiser_iterations})")
            self.x.train(did, dname, source.configuration, "all", DENOISER + SUFFIX)
            denoiser = self.x.fold_dir(dname, DENOISER + SUFFIX, source.configuration, "all")
        evaluations = [("nnUNetTrainer", self.train_predict_evaluate(setting, did, dname, raw, source,
                                                                     "nnUNetTrainer", "nnUNetTrainer"))]
        for t in self.trainers:
            evaluations.append((t, self.train_predict_evaluate(setting, did, dname, raw, source, t, t, denoiser)))
        pseudo = []
        if self.args.self_training:
            for denoise in (False, True):
                rows, quality = self.self_training(setting, did, raw, source, denoise)
                evaluations += rows
                pseudo.append((SELFTRAIN + ("_denoise" if denoise else ""), quality))
        if not self.args.no_upper_bound:
            udid, udname, uraw = self.prepared_upper_bound(source, setting, plans_from=did)
            evaluations.append((UPPER, self.train_predict_evaluate(setting, udid, udname, uraw, source,
                                                                   "nnUNetTrainer", UPPER)))
        report = os.path.join(self.args.work, "reports", setting)
        res = compare(evaluations, report, baseline="nnUNetTrainer",
                      upper=None if self.args.no_upper_bound else UPPER)
        with open(os.path.join(raw, "split.json")) as f:
            counts = json.load(f)["counts"]
        tq = target_quality_report({t: self.x.fold_dir(dname, t + SUFFIX, source.configuration, "all")
                                    for t in self.trainers}, report, LABEL_NAMES[key][1:])
        return {"setting": setting, "configuration": source.configuration, "counts": counts,
                "markdown": res["markdown"], "report": report, "times": self.times.get(setting, {}),
                "target_quality": tq["markdown"], "target_quality_png": tq["png"],
                "visits": self.visits_per_voxel(dname, source.configuration), "pseudo_labels": pseudo}

    def self_training(self, setting: str, did: int, raw: str, source: Source, denoise: bool) -> tuple:
        """``nnunet-sud self-train`` from the setting's baseline; each round's student predicted and
        evaluated on the test cases. Returns ([(label, evaluation json)], pseudo-label quality markdown)."""
        from nnunet_sud.self_training.filtering import quality_markdown
        a, cfg = self.args, source.configuration
        label = SELFTRAIN + ("_denoise" if denoise else "")
        sid = a.dataset_id_base + SELFTRAIN_OFFSETS[setting] + (MAX_SELF_TRAINING_ROUNDS if denoise else 0)
        work = os.path.join(a.work, "self_training", f"{setting}_{label}")
        cmd = ["self-train", "-d", did, "-c", cfg, "-f", "all", "--rounds", a.self_training_rounds,
               "--teacher-trainer", "nnUNetTrainer" + SUFFIX, "--student-trainer", "nnUNetTrainer" + SUFFIX,
               "--student-id", sid, "--work", work, "--device", self.x.device, "-np", 2]
        cmd += [] if a.tta else ["--disable-tta"]
        cmd += ["--denoise", "--denoiser-trainer", DENOISER + SUFFIX] if denoise else []
        self.x.say(f"{setting}: self-training ({label}, {a.self_training_rounds} rounds of {a.epochs} x "
                   f"{a.iterations})")
        t0 = time.time()
        self.x.run(f"selftrain_{setting}_{label}", self.x.sud(*cmd))
        with open(os.path.join(work, "summary.json")) as f:
            summary = json.load(f)
        rows = []
        for r in range(1, a.self_training_rounds + 1):
            name = f"{label}_r{r}"
            rows.append((name, self.train_predict_evaluate(setting, sid + r - 1, summary["student_datasets"][str(r)],
                                                           raw, source, "nnUNetTrainer", name)))
        self.times.setdefault(setting, {})[f"{label} (all rounds, with predictions)"] = time.time() - t0
        names = {str(i): n for i, n in enumerate(LABEL_NAMES[source.key]) if i}
        quality = quality_markdown([(int(r), q) for r, q in sorted(summary["rounds"].items(), key=lambda t: int(t[0]))],
                                   names)
        return rows, quality

    def visits_per_voxel(self, dname: str, configuration: str) -> float:
        """How often training visits an unlabeled voxel on average: iterations x unlabeled batch x patch
        voxels / voxels of all preprocessed unlabeled cases (an estimate: patches also show padding)."""
        from batchgenerators.utilities.file_and_folder_operations import load_json
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        from nnunet_sud.unlabeled.loader import unlabeled_identifiers
        pre = self.x.preprocessed_dir(dname)
        cm = load_json(os.path.join(pre, "nnUNetPlans.json"))["configurations"][configuration]
        folder = os.path.join(pre, cm["data_identifier"] + "_unlabeled")
        ids = unlabeled_identifiers(folder)
        ds = infer_dataset_class(folder)(folder, ids)
        total = sum(int(np.prod(ds.load_case(i)[0].shape[1:])) for i in ids)
        seen = self.args.epochs * self.args.iterations * cm["batch_size"] * int(np.prod(cm["patch_size"]))
        return seen / total if total else float("nan")

    def summary(self, results) -> str:
        a = self.args
        lines = ["# Semi-supervised quality benchmark (benchmarks/ssl_quality.py)", "",
                 f"Command: `python {self.command}`", "",
                 f"Device: {self.x.device}. Budget per trainer: {a.epochs} epochs x {a.iterations} iterations "
                 f"(nnU-Net's default: 1000 x 250), nnU-Net's planned batch size and patch; denoiser "
                 f"{a.denoiser_epochs} x {a.denoiser_iterations}; fold all (final checkpoint); "
                 f"{'with' if a.tta else 'no'} test-time mirroring.", ""]
        for r in results:
            c = r["counts"]
            lines += [f"## {r['setting']} ({r['configuration']}): {c['labeled']} labeled, {c['unlabeled']} "
                      f"unlabeled, {c['test']} test cases", "",
                      "Training time per trainer (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["times"].items()),
                      "", ("\n" + r["markdown"]).replace("\n# ", "\n### ").replace("\n## ", "\n### ").strip(), "",
                      f"Plots: `{r['report']}/boxplots.png`, `{r['report']}/paired_differences.png`", ""]
            if r["target_quality"]:
                lines += ["### What the methods learn from (Dice against the withheld labels of the unlabeled pool)",
                          "", r["target_quality"], f"Curves: `{r['target_quality_png']}`", ""]
            for label, quality in r.get("pseudo_labels", []):
                lines += [f"### {label}: pseudo-labels per round (Dice against the withheld labels of the "
                          f"unlabeled pool)", "", quality, ""]
            lines += [f"Unlabeled visits per voxel (estimate, per trainer): {r['visits']:.1f}", ""]
        return "\n".join(lines) + "\n"

    def main(self) -> str:
        t0 = time.time()
        results = [self.run_setting(s) for s in self.args.settings]
        text = self.summary(results) + f"\nTotal wall time: {time.time() - t0:.0f} s\n"
        path = os.path.join(self.args.work, "reports", "summary.md")
        with open(path, "w") as f:
            f.write(text)
        print(text)
        self.x.say(f"done. Summary: {path}")
        return path


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--la", default=None, help="the LA_lite folder (images/, labels/, train.list)")
    ap.add_argument("--acdc", default=None, help="the ACDC_lite folder (images/, labels/, train.list, val.list)")
    ap.add_argument("--work", required=True, help="working folder (its own nnUNet_raw/_preprocessed/_results)")
    ap.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=None,
                    help="default: la8 la16 with --la, acdc3 acdc7 with --acdc")
    ap.add_argument("--trainers", nargs="*", default=list(DEFAULT_TRAINERS),
                    help="semi-supervised trainers besides the nnUNetTrainer baseline and upper bound "
                         "(default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--iterations", type=int, default=250, help="iterations per epoch")
    ap.add_argument("--val-iterations", type=int, default=10, help="validation iterations per epoch (logging only)")
    ap.add_argument("--denoiser-epochs", type=int, default=None, help="default: --epochs")
    ap.add_argument("--denoiser-iterations", type=int, default=None, help="default: --iterations")
    ap.add_argument("--la-test", type=int, default=20, help="last cases of LA_lite's train.list held out (20)")
    ap.add_argument("--la-configuration", default="3d_fullres")
    ap.add_argument("--acdc-configuration", default="2d")
    ap.add_argument("--dataset-id-base", type=int, default=600,
                    help="dataset ids used: base+1..14, with --self-training base+21..60 (600)")
    ap.add_argument("--no-upper-bound", action="store_true", help="skip nnUNetTrainer on all labels")
    ap.add_argument("--self-training", action="store_true",
                    help="also nnunet-sud self-train from the baseline, with and without --denoise; every round's "
                         "student is evaluated (SelfTrain_r<R>, SelfTrain_denoise_r<R>)")
    ap.add_argument("--self-training-rounds", type=int, default=2,
                    help=f"rounds of --self-training (default 2, at most {MAX_SELF_TRAINING_ROUNDS})")
    ap.add_argument("--tta", action="store_true", help="test-time mirroring when predicting")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--n-proc-da", type=int, default=None, help="nnUNet_n_proc_DA (default: env or 2)")
    args = ap.parse_args(argv)
    if args.settings is None:
        args.settings = ([s for s in SETTINGS if s.startswith("la")] if args.la else []) + \
                        ([s for s in SETTINGS if s.startswith("acdc")] if args.acdc else [])
        if not args.settings:
            ap.error("give --la and/or --acdc")
    if not 1 <= args.self_training_rounds <= MAX_SELF_TRAINING_ROUNDS:
        ap.error(f"--self-training-rounds: 1 to {MAX_SELF_TRAINING_ROUNDS}")
    args.denoiser_epochs = args.denoiser_epochs or args.epochs
    args.denoiser_iterations = args.denoiser_iterations or args.iterations
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        Benchmark(parse_args(argv), argv).main()
    except UserFacingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
