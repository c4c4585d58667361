"""Semi-supervised quality on real scans: LA_lite and ACDC_lite, with the protocol a reviewer expects.

Settings (``--settings``, default all four):

    la8, la16      LA_lite (left atrium, 3D MRI): the first 8 / 16 cases of the pool labeled
    acdc3, acdc7   ACDC_lite (RV, myocardium, LV; cine MRI): both frames of the first 3 / 7 patients
                   of ``train.list`` labeled

Three disjoint splits per source, fixed by the source's lists (never by a draw):

* **test**: ACDC, the 20 frames (10 patients) of ``val.list``; LA_lite has no test list (its 20
  standard test cases are not in the set), so the last ``--la-test`` (20) cases of ``train.list``.
* **validation**: neither labeled nor unlabeled: ACDC, both frames of the last
  ``--validation-patients`` (10) patients of ``train.list``; LA, the ``--la-validation`` (10) cases
  before the test cases. Every choice (variant, weight, schedule) is made on it.
* **pool**: the rest of ``train.list``; its first N patients/cases are labeled (imagesTr), the
  others are the unlabeled images (imagesUnlabeled, labels withheld in labelsUnlabeled, where
  they only feed the target-quality view, never a loss).

Per setting the script runs, through the real commands, in its own nnU-Net folders below ``--work``:

1. ``nnunet-sud convert folder`` (validation and test cases go to imagesTs/labelsTs, and each split
   gets a folder of links, ``WORK/splits/<dataset>/<split>/{images,labels}``),
   ``nnUNetv2_plan_and_preprocess`` (planned from the labeled cases, as a user would) and
   ``nnunet-sud preprocess-unlabeled``; configuration ``--la-configuration`` (3d_fullres) /
   ``--acdc-configuration`` (2d: 10 mm slices, 6-18 per frame, as the ACDC literature).
2. For run k = 1 .. ``--repeats``: ``nnUNetv2_train ... all -tr T_bench_run<k>`` for
   ``nnUNetTrainer`` (labeled cases only, the baseline) and each trainer of ``--trainers``, each with
   its own seed (k; ``nnunet_sud.budget.SeededVariant`` says what the seed fixes and what stays
   non-deterministic), the same budget for all (``--epochs`` x ``--iterations``; nnU-Net's default is
   1000 x 250; nnU-Net's final validation is skipped: for fold ``all`` it would predict training
   cases). Trainers that need the label-map denoiser get ``nnUNetTrainerLabelDenoiser_bench_run<k>``,
   trained first on the labeled maps of that run. Fold ``all``, the final checkpoint: no model
   selection.
3. ``nnUNetv2_predict`` of the validation cases (no TTA unless ``--tta``) and ``nnunet-sud``'s
   evaluation (Dice, HD95 in mm): ``--results/<setting>/validation/<trainer>/run<k>.json``.
4. The upper bound ``nnUNetTrainer_allLabels`` (``nnUNetTrainer`` on a conversion with every pool
   case labeled, trained with the setting's plans so that only the labels differ), once.
5. With ``--self-training``: ``nnunet-sud self-train`` from run k's baseline (teacher and students
   ``nnUNetTrainer_bench_run<k>``, the same budget each), for k = 1 .. ``--self-training-repeats``;
   each round's student is scored like the others (``SelfTrain_r<R>``).

**The test step is separate**: ``--test`` trains nothing; it predicts and scores the test cases
once for every finished model of the selected trainers and runs
(``--results/<setting>/test/<trainer>/run<k>.json``), and refuses to score a model twice (the file
exists). Run it once the choices are made on validation.

Every result file holds ``trainer, setting, split, run, seed, epochs, iterations, configuration,
device, git_commit, train_seconds`` and ``cases: {case: {class: {dice, hd95}}}`` (null where a
class is absent from reference and prediction); ``benchmarks/report.py`` turns the committed files
into the tables and figures of the docs. Re-running continues where it stopped: finished
trainings are skipped, interrupted ones resume with ``--c``, scored models are not scored again.

Examples::

    # acdc3 at the CPU budget: 3 runs of the baseline and of one trainer, scored on validation
    python benchmarks/ssl_quality.py --acdc ../shared/data/ACDC_lite --settings acdc3 --work ../sslq \\
        --epochs 20 --iterations 100 --val-iterations 5 --device cpu --repeats 3 --trainers nnUNetTrainerSUD
    # ... once the choices are made: the test step for the same models
    python benchmarks/ssl_quality.py --acdc ../shared/data/ACDC_lite --settings acdc3 --work ../sslq \\
        --epochs 20 --iterations 100 --val-iterations 5 --device cpu --repeats 3 --trainers nnUNetTrainerSUD --test
    # the GPU protocol (budget of your choice)
    python benchmarks/ssl_quality.py --la /data/LA_lite --acdc /data/ACDC_lite --work /scratch/sslq \\
        --epochs 200 --iterations 250 --device cuda --repeats 3
"""
import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)  # run from a checkout without installing

import numpy as np  # noqa: E402

from nnunet_sud.errors import UserFacingError  # noqa: E402
from nnunet_sud.budget import variants_source  # noqa: E402
from nnunet_sud.experiment import Experiment, check_trainers, needs_denoiser  # noqa: E402

SUFFIX = "_bench"
DENOISER = "nnUNetTrainerLabelDenoiser"
BASELINE = "nnUNetTrainer"
UPPER = "nnUNetTrainer_allLabels"
SPLITS = ("validation", "test")
SETTINGS = {
    "la8": ("la", 8), "la16": ("la", 16),
    "acdc3": ("acdc", 3), "acdc7": ("acdc", 7),
}
# dataset ids: <base> + offset; "<setting>_all": the setting's upper bound (every pool case labeled)
ID_OFFSETS = {"la8": 1, "la16": 2, "la8_all": 3, "la16_all": 4,
              "acdc3": 11, "acdc7": 12, "acdc3_all": 13, "acdc7_all": 14}
# self-training students (--self-training): round r of the plain run <base> + offset + r - 1, of the
# --self-training-denoise run <base> + offset + MAX_SELF_TRAINING_ROUNDS + r - 1; run k adds
# (k - 1) * SELFTRAIN_RUN_STRIDE
SELFTRAIN_OFFSETS = {"la8": 21, "la16": 31, "acdc3": 41, "acdc7": 51}
MAX_SELF_TRAINING_ROUNDS = 5
SELFTRAIN_RUN_STRIDE = 100
MAX_SELF_TRAINING_REPEATS = 3
SELFTRAIN = "SelfTrain"
LABEL_NAMES = {"la": ["background", "LA"], "acdc": ["background", "RV", "Myo", "LV"]}
GROUP_REGEX = {"la": None, "acdc": r"^(patient\d+)"}
DEFAULT_TRAINERS = ("nnUNetTrainerTE", "nnUNetTrainerSUD", "nnUNetTrainerSUDMeanTeacher",
                    "nnUNetTrainerMeanTeacher", "nnUNetTrainerUAMT", "nnUNetTrainerDAEUncertainty",
                    "nnUNetTrainerPostDenoise", "nnUNetTrainerSUD2", "nnUNetTrainerSegMatch", "nnUNetTrainerDMNet")
DEFAULT_RESULTS = os.path.join(HERE, "results")


def read_list(path: str):
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip()]


def group_of(case: str, regex) -> str:
    """The patient a case belongs to (ACDC: ``patientNNN``), or the case itself."""
    m = re.match(regex, case) if regex else None
    return m.group(1) if m else case


def variant_name(trainer: str, run: int) -> str:
    return f"{trainer}{SUFFIX}_run{run}"


class Source:
    """One benchmark source: where it is, how it is split (pool / validation / test), which
    configuration trains on it."""

    def __init__(self, key: str, folder: str, configuration: str, la_test: int = 20, la_validation: int = 10,
                 validation_patients: int = 10):
        self.key, self.folder, self.configuration = key, os.path.abspath(folder), configuration
        self.group_regex = GROUP_REGEX[key]
        train_list = os.path.join(self.folder, "train.list")
        if not os.path.isfile(train_list):
            raise UserFacingError(f"{train_list} not found: --{key} must be the {key.upper()}_lite folder "
                                  "(images/, labels/, train.list; see ../shared/data/README.md)")
        train = read_list(train_list)
        if key == "la":
            if not 0 < la_test < len(train):
                raise UserFacingError(f"--la-test {la_test}: must be between 1 and {len(train) - 1}")
            if not 0 < la_validation < len(train) - la_test:
                raise UserFacingError(f"--la-validation {la_validation}: must be between 1 and "
                                      f"{len(train) - la_test - 1} (train.list has {len(train)} cases, "
                                      f"--la-test {la_test} of them are held out for testing)")
            rest, self.test = train[:-la_test], train[-la_test:]
            self.pool, self.validation = rest[:-la_validation], rest[-la_validation:]
        else:
            val_list = os.path.join(self.folder, "val.list")
            if not os.path.isfile(val_list):
                raise UserFacingError(f"{val_list} not found: ACDC_lite's validation frames are its test set")
            self.test = read_list(val_list)
            patients = list(dict.fromkeys(group_of(c, self.group_regex) for c in train))
            if not 0 < validation_patients < len(patients):
                raise UserFacingError(f"--validation-patients {validation_patients}: must be between 1 and "
                                      f"{len(patients) - 1} ({train_list} has {len(patients)} patients)")
            held = set(patients[-validation_patients:])
            self.validation = [c for c in train if group_of(c, self.group_regex) in held]
            self.pool = [c for c in train if group_of(c, self.group_regex) not in held]

    def split(self, name: str) -> list:
        return {"validation": self.validation, "test": self.test}[name]

    def convert(self, x: Experiment, work: str, dataset_id: int, name: str, labeled) -> str:
        """``nnunet-sud convert folder`` with this source's split (validation and test cases in
        imagesTs/labelsTs); returns the raw dataset folder."""
        lists = os.path.join(work, "lists")
        os.makedirs(lists, exist_ok=True)
        held_out = self.validation + self.test
        pool_file, held_file = os.path.join(lists, f"{self.key}_pool.list"), os.path.join(lists, f"{self.key}_held_out.list")
        for path, ids in ((pool_file, self.pool), (held_file, held_out)):
            with open(path, "w") as f:
                f.write("\n".join(ids) + "\n")
        raw = x.raw_dir(f"Dataset{dataset_id:03d}_{name}")
        split_json = os.path.join(raw, "split.json")
        if os.path.isfile(os.path.join(raw, "dataset.json")) and os.path.isfile(split_json):
            with open(split_json) as f:
                old = sorted(json.load(f).get("test", []))
            if old != sorted(held_out):
                raise UserFacingError(f"{raw} holds another split (its imagesTs is not this benchmark's validation + "
                                      f"test cases, e.g. from an older version of this script): use a new --work "
                                      f"folder or remove {raw} and its preprocessed and results folders")
        if not os.path.isfile(os.path.join(raw, "dataset.json")):
            args = ["convert", "folder", self.folder, "-d", dataset_id, "--name", name, "--labeled", labeled,
                    "--select", "first", "--train-list", pool_file, "--test-list", held_file, "-np", 2]
            if self.group_regex:
                args += ["--group-regex", self.group_regex]
            args += ["--label-names", *LABEL_NAMES[self.key]]
            x.run(f"convert_{name}", x.sud(*args))
        return raw

    def split_folders(self, work: str, raw: str, split: str) -> tuple:
        """(images, labels): folders of links to the split's cases in ``raw``'s imagesTs/labelsTs."""
        base = os.path.join(work, "splits", os.path.basename(raw), split)
        images, labels = os.path.join(base, "images"), os.path.join(base, "labels")
        cases = set(self.split(split))
        for sub, folder in (("imagesTs", images), ("labelsTs", labels)):
            os.makedirs(folder, exist_ok=True)
            for f in sorted(os.listdir(os.path.join(raw, sub))):
                case = f.split(".")[0]
                case = case.rsplit("_", 1)[0] if sub == "imagesTs" else case
                link = os.path.join(folder, f)
                if case in cases and not os.path.lexists(link):
                    os.symlink(os.path.join(raw, sub, f), link)
            found = {f.split(".")[0].rsplit("_", 1)[0] if sub == "imagesTs" else f.split(".")[0]
                     for f in os.listdir(folder)}
            if found != cases:
                raise UserFacingError(f"{folder}: the {split} cases {sorted(cases - found)} are missing from "
                                      f"{os.path.join(raw, sub)}")
        return images, labels


def dataset_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


#: options whose values are folders of the machine that ran the benchmark; result files name them by role
PATH_OPTIONS = {"--la": "LA_lite", "--acdc": "ACDC_lite", "--work": "WORK", "--results": "RESULTS"}


def portable_command(argv) -> str:
    """The command line as result files record it: the folders replaced by their role (``--acdc
    ACDC_lite``, ``--work WORK``), so that no machine path goes into a committed file."""
    out, argv = ["benchmarks/ssl_quality.py"], list(argv)
    for i, a in enumerate(argv):
        name = a.split("=", 1)[0]
        if name in PATH_OPTIONS and "=" in a:
            a = f"{name}={PATH_OPTIONS[name]}"
        elif i and argv[i - 1] in PATH_OPTIONS:
            a = PATH_OPTIONS[argv[i - 1]]
        out.append(a)
    return " ".join(shlex.quote(a) for a in out)


def git_commit() -> str:
    """HEAD of this checkout, with "+dirty" when tracked files differ from it ("unknown" outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def shown(path: str) -> str:
    """``path`` relative to the checkout when inside it."""
    rel = os.path.relpath(path, REPO)
    return path if rel.startswith("..") else rel


def result_path(results: str, setting: str, split: str, trainer: str, run: int) -> str:
    return os.path.join(results, setting, split, trainer, f"run{run}.json")


def cases_from_evaluation(evaluation: dict) -> dict:
    """``{case: {class name: {"dice", "hd95"}}}`` of a ``nnunet_sud.evaluation`` result (None where
    reference and prediction are both empty)."""
    names = {c["key"]: c["name"] for c in evaluation["classes"]}

    def num(v):
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else round(float(v), 6)
    return {pc["case"]: {names[k]: {"dice": num(m["Dice"]), "hd95": num(m["HD95"])}
                         for k, m in pc["metrics"].items()} for pc in evaluation["per_case"]}


class Benchmark:
    def __init__(self, args, argv):
        self.args = args
        self.command = portable_command(argv)
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
                self.sources[key] = Source(key, folder, cfg, args.la_test, args.la_validation,
                                           args.validation_patients)
        budgets = {t: (args.epochs, args.iterations) for t in [BASELINE] + self.trainers}
        budgets[DENOISER] = (args.denoiser_epochs, args.denoiser_iterations)
        runs = {f"_run{k}": k for k in range(1, max(args.repeats, args.self_training_repeats) + 1)}
        self.x.write_variants("bench_variants.py", variants_source(
            budgets, args.val_iterations, SUFFIX, final_validation=False, purpose="benchmarks/ssl_quality.py",
            runs=runs))
        self.scored = []  # result files written by this invocation

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

    # ------------------------------------------------------------------ one model: train, score
    def trained(self, did: int, dname: str, cfg: str, trainer: str, run: int, denoiser=None) -> dict:
        """Train ``trainer``'s run ``run`` (or resume it, or find it finished); its training record
        (``bench_run.json`` in the model folder: seconds over all starts, seed, commits)."""
        v = variant_name(trainer, run)
        folder = self.x.fold_dir(dname, v, cfg, "all")
        info_file = os.path.join(folder, "bench_run.json")
        info = json.load(open(info_file)) if os.path.isfile(info_file) else {"train_seconds": 0.0, "git_commits": []}
        if not os.path.isfile(os.path.join(folder, "checkpoint_final.pth")):
            if self.args.test:
                raise UserFacingError(f"--test: {v} of {dname} is not trained ({folder} has no checkpoint_final.pth); "
                                      f"train it first (the same command without --test)")
            commit = git_commit()
            seconds = self.x.train(did, dname, cfg, "all", v, denoiser=denoiser)
            info["train_seconds"] += seconds
            info["git_commits"] = list(dict.fromkeys(info["git_commits"] + [commit]))
            info.update(seed=run, starts=info.get("starts", 0) + 1)
            with open(info_file, "w") as f:
                json.dump(info, f, indent=1)
        info["folder"] = folder
        return info

    def score(self, setting: str, split: str, label: str, run: int, did: int, dname: str, source: Source,
              raw: str, trainer: str, info: dict, denoiser=None, extra=None) -> str:
        """Predict the split's cases with the trained model and write its result file (once)."""
        a = self.args
        out = result_path(a.results, setting, split, label, run)
        if os.path.isfile(out):
            self.x.say(f"{setting}: {label} run {run} already scored on {split} ({shown(out)})")
            return out
        from batchgenerators.utilities.file_and_folder_operations import load_json
        from nnunet_sud.evaluation.evaluate import classes_from_dataset_json, evaluate_folders
        images, labels = source.split_folders(a.work, raw, split)
        pred = os.path.join(a.work, "predictions", setting, split, f"{label}_run{run}")
        if os.path.isdir(pred):
            shutil.rmtree(pred)
        self.x.predict(did, dname, source.configuration, "all", variant_name(trainer, run), images, pred,
                       tta=a.tta, denoiser=denoiser, log_name=f"predict_{setting}_{split}_{label}_run{run}")
        dataset_json = load_json(os.path.join(raw, "dataset.json"))
        classes, ignore = classes_from_dataset_json(dataset_json)
        evaluation = evaluate_folders(pred, labels, classes, dataset_json["file_ending"], ignore_label=ignore)
        record = {"trainer": label, "setting": setting, "split": split, "run": run, "seed": info.get("seed", run),
                  "epochs": a.epochs, "iterations": a.iterations, "configuration": source.configuration,
                  "device": self.x.device, "tta": bool(a.tta), "git_commit": (info.get("git_commits") or ["unknown"])[-1],
                  "git_commits": info.get("git_commits", []), "train_seconds": round(info.get("train_seconds", 0.0), 1),
                  "command": self.command, "cases": cases_from_evaluation(evaluation)}
        record.update(extra or {})
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(record, f, indent=1, sort_keys=False)
            f.write("\n")
        self.scored.append(out)
        mean = np.nanmean([np.nanmean([m["dice"] if m["dice"] is not None else np.nan for m in c.values()])
                           for c in record["cases"].values()])
        self.x.say(f"{setting}: {label} run {run} on {split}: mean Dice {mean:.3f} -> {shown(out)}")
        return out

    def model(self, setting, did, dname, raw, source, trainer, label, run, denoiser=None, extra=None):
        """Train (unless --test) and score one model on the split this invocation scores."""
        split = "test" if self.args.test else "validation"
        self.x.say(f"{setting}: {label} run {run} ({self.args.epochs} x {self.args.iterations})")
        info = self.trained(did, dname, source.configuration, trainer, run, denoiser)
        return self.score(setting, split, label, run, did, dname, source, raw, trainer, info, denoiser, extra)

    def denoiser_for(self, setting, did, dname, source, run, needed: bool = False):
        """Run ``run``'s label-map denoiser (trained when a trainer of ``--trainers`` needs it, or ``needed``)."""
        if not (needed or any(needs_denoiser(t) for t in self.trainers)):
            return None
        self.x.say(f"{setting}: the label-map denoiser of run {run} ({self.args.denoiser_epochs} x "
                   f"{self.args.denoiser_iterations})")
        self.trained(did, dname, source.configuration, DENOISER, run)
        return self.x.fold_dir(dname, variant_name(DENOISER, run), source.configuration, "all")

    def run_setting(self, setting: str):
        key, n_labeled = SETTINGS[setting]
        source = self.sources[key]
        a = self.args
        self.x.say(f"=== {setting}: {n_labeled} labeled {'cases' if key == 'la' else 'patients'}, "
                   f"configuration {source.configuration}, {len(source.validation)} validation and "
                   f"{len(source.test)} test cases; scoring {'test' if a.test else 'validation'}")
        did, dname, raw = self.prepared(source, setting, n_labeled)
        for run in range(1, a.repeats + 1):
            denoiser = self.denoiser_for(setting, did, dname, source, run)
            for t in [BASELINE] + self.trainers:
                self.model(setting, did, dname, raw, source, t, t, run, denoiser if needs_denoiser(t) else None)
        for run in range(1, a.self_training_repeats + 1) if a.self_training else ():
            for denoise in (False, True) if a.self_training_denoise else (False,):
                self.self_training(setting, did, dname, raw, source, run, denoise)
        if not a.no_upper_bound:
            udid, udname, uraw = self.prepared_upper_bound(source, setting, plans_from=did)
            self.model(setting, udid, udname, uraw, source, BASELINE, UPPER, 1)
        if not a.test and self.trainers:
            from nnunet_sud.evaluation.target_quality import target_quality_report
            report = os.path.join(a.work, "reports", setting)
            folders = {t: self.x.fold_dir(dname, variant_name(t, 1), source.configuration, "all") for t in self.trainers}
            tq = target_quality_report(folders, report, LABEL_NAMES[key][1:])
            if tq["markdown"]:
                self.x.say(f"{setting}: what the methods of run 1 learn from: {tq['png']}\n{tq['markdown']}")

    def self_training(self, setting: str, did: int, dname: str, raw: str, source: Source, run: int,
                      denoise: bool) -> None:
        """``nnunet-sud self-train`` from run ``run``'s baseline; each round's student scored as
        ``SelfTrain[_denoise]_r<R>``."""
        a, cfg = self.args, source.configuration
        label = SELFTRAIN + ("_denoise" if denoise else "")
        sid = (a.dataset_id_base + SELFTRAIN_OFFSETS[setting] + (MAX_SELF_TRAINING_ROUNDS if denoise else 0)
               + (run - 1) * SELFTRAIN_RUN_STRIDE)
        work = os.path.join(a.work, "self_training", f"{setting}_{label}_run{run}")
        summary_file = os.path.join(work, "summary.json")
        if not os.path.isfile(summary_file) or not a.test:
            if a.test and not os.path.isfile(summary_file):
                raise UserFacingError(f"--test: self-training run {run} of {setting} has not run ({summary_file})")
            self.trained(did, dname, cfg, BASELINE, run)  # the teacher
            commit = git_commit()
            cmd = ["self-train", "-d", did, "-c", cfg, "-f", "all", "--rounds", a.self_training_rounds,
                   "--teacher-trainer", variant_name(BASELINE, run), "--student-trainer", variant_name(BASELINE, run),
                   "--student-id", sid, "--work", work, "--device", self.x.device, "-np", 2]
            cmd += [] if a.tta else ["--disable-tta"]
            if denoise:
                self.denoiser_for(setting, did, dname, source, run, needed=True)
                cmd += ["--denoise", "--denoiser-trainer", variant_name(DENOISER, run)]
            self.x.say(f"{setting}: self-training run {run} ({label}, {a.self_training_rounds} rounds of "
                       f"{a.epochs} x {a.iterations})")
            t0 = time.time()
            self.x.run(f"selftrain_{setting}_{label}_run{run}", self.x.sud(*cmd))
            spent = time.time() - t0
            with open(summary_file) as f:
                summary = json.load(f)
            summary.setdefault("bench_git_commit", commit)
            summary["bench_seconds"] = summary.get("bench_seconds", 0.0) + spent
            with open(summary_file, "w") as f:
                json.dump(summary, f, indent=1)
        with open(summary_file) as f:
            summary = json.load(f)
        teacher = self.trained(did, dname, cfg, BASELINE, run)
        for r in range(1, a.self_training_rounds + 1):
            student = summary["student_datasets"][str(r)]
            q = summary["rounds"].get(str(r), {})
            extra = {"rounds": r, "pseudo_label_dice": q.get("dice", {}).get("pseudo_label", {}).get("mean")}
            folder = self.x.fold_dir(student, variant_name(BASELINE, run), cfg, "all")
            info = {"seed": run, "git_commits": [summary.get("bench_git_commit", "unknown")],
                    # the teacher's training plus the rounds (their predictions of the unlabeled images included)
                    "train_seconds": teacher["train_seconds"] + summary.get("bench_seconds", 0.0), "folder": folder}
            split = "test" if a.test else "validation"
            self.score(setting, split, f"{label}_r{r}", run, sid + r - 1, student, source, raw, BASELINE, info,
                       extra=extra)

    def main(self) -> list:
        t0 = time.time()
        for s in self.args.settings:
            self.run_setting(s)
        self.x.say(f"done in {time.time() - t0:.0f} s; {len(self.scored)} result files written"
                   + "".join(f"\n  {shown(p)}" for p in self.scored)
                   + "\nTables and figures: python benchmarks/report.py")
        return self.scored


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--la", default=None, help="the LA_lite folder (images/, labels/, train.list)")
    ap.add_argument("--acdc", default=None, help="the ACDC_lite folder (images/, labels/, train.list, val.list)")
    ap.add_argument("--work", required=True, help="working folder (its own nnUNet_raw/_preprocessed/_results)")
    ap.add_argument("--results", default=DEFAULT_RESULTS,
                    help="where the result files go (default: benchmarks/results of this checkout)")
    ap.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=None,
                    help="default: la8 la16 with --la, acdc3 acdc7 with --acdc")
    ap.add_argument("--trainers", nargs="*", default=list(DEFAULT_TRAINERS),
                    help="semi-supervised trainers besides the nnUNetTrainer baseline and upper bound "
                         "(default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=1, help="independent trainings per trainer (runs 1..N, seed k)")
    ap.add_argument("--test", action="store_true",
                    help="the test step: train nothing, score the test cases once per finished model")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--iterations", type=int, default=250, help="iterations per epoch")
    ap.add_argument("--val-iterations", type=int, default=10, help="validation iterations per epoch (logging only)")
    ap.add_argument("--denoiser-epochs", type=int, default=None, help="default: --epochs")
    ap.add_argument("--denoiser-iterations", type=int, default=None, help="default: --iterations")
    ap.add_argument("--la-test", type=int, default=20, help="last cases of LA_lite's train.list held out for testing")
    ap.add_argument("--la-validation", type=int, default=10, help="LA_lite cases before the test cases held out "
                                                                   "for validation (10)")
    ap.add_argument("--validation-patients", type=int, default=10,
                    help="ACDC: last patients of train.list held out for validation, both frames (10)")
    ap.add_argument("--la-configuration", default="3d_fullres")
    ap.add_argument("--acdc-configuration", default="2d")
    ap.add_argument("--dataset-id-base", type=int, default=600,
                    help="dataset ids used: base+1..14, with --self-training base+21..60 (+100 per run) (600)")
    ap.add_argument("--no-upper-bound", action="store_true", help="skip nnUNetTrainer on all labels")
    ap.add_argument("--self-training", action="store_true",
                    help="also nnunet-sud self-train from the baseline of runs 1..--self-training-repeats; every "
                         "round's student is scored (SelfTrain_r<R>)")
    ap.add_argument("--self-training-rounds", type=int, default=2,
                    help=f"rounds of --self-training (default 2, at most {MAX_SELF_TRAINING_ROUNDS})")
    ap.add_argument("--self-training-repeats", type=int, default=None,
                    help=f"runs of --self-training (default: --repeats, at most {MAX_SELF_TRAINING_REPEATS})")
    ap.add_argument("--self-training-denoise", action="store_true",
                    help="with --self-training, also the --denoise run (SelfTrain_denoise_r<R>)")
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
    if args.repeats < 1:
        ap.error("--repeats: at least 1")
    if args.self_training_repeats is None:
        args.self_training_repeats = min(args.repeats, MAX_SELF_TRAINING_REPEATS) if args.self_training else 0
    if not 0 <= args.self_training_repeats <= MAX_SELF_TRAINING_REPEATS:
        ap.error(f"--self-training-repeats: 0 to {MAX_SELF_TRAINING_REPEATS}")
    if not args.self_training:
        args.self_training_repeats = 0
    args.denoiser_epochs = args.denoiser_epochs or args.epochs
    args.denoiser_iterations = args.denoiser_iterations or args.iterations
    args.results = os.path.abspath(args.results)
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
