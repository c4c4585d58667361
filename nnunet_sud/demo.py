"""``nnunet-sud demo``: the whole semi-supervised flow on generated data, in one folder.

Steps (each through the real nnU-Net / nnunet-sud commands, as a user would type them):
 1. ``nnunet-sud synthetic``: a 3d task with few labeled, more unlabeled and held-out test cases
 2. ``nnUNetv2_plan_and_preprocess`` (labeled data only) + ``nnunet-sud preprocess-unlabeled``
 3. ``nnUNetv2_train -tr nnUNetTrainerLabelDenoiser``: the label-map denoiser
 4. ``nnUNetv2_train`` for nnUNetTrainer (supervised baseline), TE, SUD, and every other trainer
    asked for with ``--trainers``
 5. ``nnUNetv2_predict`` of the test images with each, ``nnunet-sud evaluate`` (Dice, HD95)
 6. ``nnunet-sud compare``: Markdown table, box plots, paired differences vs the baseline

Schedules are nnU-Net trainer variants written into ``OUT/trainers`` (a user's own variant
folder, listed in nnUNet_extTrainer beside ours), e.g. ``nnUNetTrainerSUD_demo``; all trainers get
the same number of epochs and iterations. ``--schedule smoke`` is the smallest run (tests/CI),
``short`` (default) fits in about 20 minutes on 2 CPU cores, ``long`` is meant for a GPU.
Everything (nnU-Net folders, logs, predictions, report) lives in OUT; its path is printed.
"""
import json
import os
import shutil
import subprocess
import sys
import time

from nnunet_sud.errors import UserFacingError

DEMO_ID = 990
DEMO_NAME = "Dataset990_SyntheticDemo"

# epochs, iterations per epoch, validation iterations, denoiser epochs; data: labeled, unlabeled, test, shape
SCHEDULES = {
    "smoke": dict(epochs=1, iters=2, val_iters=1, den_epochs=1, den_iters=2,
                  labeled=4, unlabeled=4, test=2, shape=(16, 24, 24)),
    "short": dict(epochs=6, iters=25, val_iters=2, den_epochs=4, den_iters=25,
                  labeled=6, unlabeled=24, test=8, shape=(24, 32, 32)),
    "long": dict(epochs=100, iters=250, val_iters=50, den_epochs=100, den_iters=250,
                 labeled=8, unlabeled=64, test=16, shape=(48, 64, 64)),
}
DEFAULT_TRAINERS = ("nnUNetTrainer", "nnUNetTrainerTE", "nnUNetTrainerSUD")
NEEDS_DENOISER = ("SUD", "PostDenoise", "DAEUncertainty")


def _variant_module(trainers, s) -> str:
    lines = ['"""Demo schedules (written by nnunet-sud demo): a user\'s own trainer variants."""',
             "import torch", "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer",
             "from nnunet_sud.trainers import *  # noqa", ""]
    for t in list(trainers) + ["nnUNetTrainerLabelDenoiser"]:
        den = t == "nnUNetTrainerLabelDenoiser"
        lines += [f"class {t}_demo({t}):",
                  "    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):",
                  "        super().__init__(plans, configuration, fold, dataset_json, device)",
                  f"        self.num_epochs = {s['den_epochs'] if den else s['epochs']}",
                  f"        self.num_iterations_per_epoch = {s['den_iters'] if den else s['iters']}",
                  f"        self.num_val_iterations_per_epoch = {s['val_iters']}", ""]
    return "\n".join(lines) + "\n"


class Demo:
    def __init__(self, out: str, schedule: str, trainers, device: str, fold: int = 0):
        if schedule not in SCHEDULES:
            raise UserFacingError(f"--schedule must be one of {', '.join(SCHEDULES)}")
        from nnunet_sud.trainers import __all__ as ours
        known = set(ours) | {"nnUNetTrainer"}
        for t in trainers:
            if t not in known:
                raise UserFacingError(f"--trainers: unknown trainer {t}; available: {', '.join(sorted(known))}")
        self.out = os.path.abspath(out)
        self.s = SCHEDULES[schedule]
        self.schedule = schedule
        self.trainers = list(dict.fromkeys(trainers))
        self.device = device
        self.fold = fold
        self.logs = os.path.join(self.out, "logs")
        self.t0 = time.time()
        from nnunet_sud.paths import ext_trainer_value
        self.env = dict(os.environ,
                        nnUNet_raw=os.path.join(self.out, "nnUNet_raw"),
                        nnUNet_preprocessed=os.path.join(self.out, "nnUNet_preprocessed"),
                        nnUNet_results=os.path.join(self.out, "nnUNet_results"),
                        nnUNet_extTrainer=ext_trainer_value(os.path.join(self.out, "trainers")))
        self.env.setdefault("nnUNet_n_proc_DA", "2")
        self.env.setdefault("nnUNet_def_n_proc", "1")
        self.env.pop("nnUNet_denoiser", None)

    # ------------------------------------------------------------------ helpers
    def say(self, msg: str):
        print(f"[{time.time() - self.t0:6.0f} s] {msg}", flush=True)

    def run(self, name: str, args):
        """Run a command with its output in OUT/logs/<name>.log; fail with the log's tail."""
        os.makedirs(self.logs, exist_ok=True)
        log = os.path.join(self.logs, f"{name}.log")
        self.say(f"{name}: {' '.join(map(str, args))}")
        with open(log, "w") as f:
            p = subprocess.run([str(a) for a in args], stdout=f, stderr=subprocess.STDOUT, env=self.env)
        if p.returncode != 0:
            tail = open(log).read()[-3000:]
            raise UserFacingError(f"step '{name}' failed (exit {p.returncode}); log: {log}\n{tail}")
        return log

    def sud(self, *args):
        return [sys.executable, "-m", "nnunet_sud.cli", *map(str, args)]

    # ------------------------------------------------------------------ steps
    def prepare(self):
        from nnunet_sud.dataset_conversion.synthetic import generate_dataset
        for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            os.makedirs(self.env[k], exist_ok=True)
        os.makedirs(os.path.join(self.out, "trainers"), exist_ok=True)
        with open(os.path.join(self.out, "trainers", "demo_variants.py"), "w") as f:
            f.write(_variant_module(self.trainers, self.s))
        raw = os.path.join(self.env["nnUNet_raw"], DEMO_NAME)
        if not os.path.isfile(os.path.join(raw, "dataset.json")):
            self.say(f"1/6 generating {self.s['labeled']} labeled, {self.s['unlabeled']} unlabeled, "
                     f"{self.s['test']} test cases")
            generate_dataset(self.env["nnUNet_raw"], DEMO_ID, "3d", self.s["labeled"], self.s["unlabeled"],
                             self.s["test"], seed=0, shape=self.s["shape"], name="SyntheticDemo")
        pre = os.path.join(self.env["nnUNet_preprocessed"], DEMO_NAME)
        if not os.path.isfile(os.path.join(pre, "nnUNetPlans.json")):
            self.say("2/6 planning and preprocessing (labeled data only), then the unlabeled images")
            self.run("plan_and_preprocess", ["nnUNetv2_plan_and_preprocess", "-d", DEMO_ID, "-c", "3d_fullres",
                                             "-np", "2"])
        # fold 0: all labeled cases but the last train, the last validates (nnU-Net's 5-fold split needs
        # 5+ cases and would hold out more of the few labels)
        labeled = sorted(f[:-len(".nii.gz")] for f in os.listdir(os.path.join(raw, "labelsTr")))
        with open(os.path.join(pre, "splits_final.json"), "w") as f:
            json.dump([{"train": labeled[:-1], "val": labeled[-1:]}], f)
        self.run("preprocess_unlabeled", self.sud("preprocess-unlabeled", "-d", DEMO_ID, "-c", "3d_fullres",
                                                  "-np", "2"))

    def fold_dir(self, trainer: str) -> str:
        return os.path.join(self.env["nnUNet_results"], DEMO_NAME, f"{trainer}__nnUNetPlans__3d_fullres",
                            f"fold_{self.fold}")

    def train(self, trainer: str):
        if os.path.isfile(os.path.join(self.fold_dir(trainer), "checkpoint_final.pth")):
            self.say(f"{trainer}: already trained")
            return
        self.run(f"train_{trainer}", ["nnUNetv2_train", DEMO_ID, "3d_fullres", self.fold, "-tr", trainer,
                                      "-device", self.device])

    def predict_and_evaluate(self, trainer: str) -> str:
        from batchgenerators.utilities.file_and_folder_operations import load_json
        from nnunet_sud.evaluation.evaluate import classes_from_dataset_json, evaluate_folders, write_evaluation
        pred = os.path.join(self.out, "predictions", trainer)
        raw = os.path.join(self.env["nnUNet_raw"], DEMO_NAME)
        self.run(f"predict_{trainer}", ["nnUNetv2_predict", "-i", os.path.join(raw, "imagesTs"), "-o", pred,
                                        "-d", DEMO_ID, "-c", "3d_fullres", "-f", self.fold, "-tr", trainer,
                                        "-device", self.device, "-npp", "1", "-nps", "1"]
                 + (["--disable_tta"] if self.schedule != "long" else []))
        dataset_json = load_json(os.path.join(raw, "dataset.json"))
        classes, ignore = classes_from_dataset_json(dataset_json)
        result = evaluate_folders(pred, os.path.join(raw, "labelsTs"), classes, dataset_json["file_ending"],
                                  ignore_label=ignore)
        prefix = os.path.join(self.out, "evaluation", trainer)
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        return write_evaluation(result, prefix)["json"]

    def main(self) -> str:
        self.say(f"nnunet_sud demo ({self.schedule} schedule) in {self.out}")
        self.prepare()
        variants = [f"{t}_demo" for t in self.trainers]
        if any(any(k in t for k in NEEDS_DENOISER) for t in self.trainers):
            self.say("3/6 training the label-map denoiser")
            self.train("nnUNetTrainerLabelDenoiser_demo")
            self.env["nnUNet_denoiser"] = self.fold_dir("nnUNetTrainerLabelDenoiser_demo")
        for i, v in enumerate(variants):
            self.say(f"4/6 training {v} ({i + 1}/{len(variants)}): {self.s['epochs']} epochs x {self.s['iters']} "
                     f"iterations")
            self.train(v)
        evaluations = []
        for v in variants:
            self.say(f"5/6 predicting the test images with {v} and evaluating")
            evaluations.append((v[:-len("_demo")], self.predict_and_evaluate(v)))
        self.say("6/6 comparing")
        from nnunet_sud.evaluation.compare import compare
        report = os.path.join(self.out, "report")
        res = compare(evaluations, report, baseline=evaluations[0][0] if len(evaluations) > 1 else None)
        with open(os.path.join(self.out, "demo.json"), "w") as f:
            json.dump({"schedule": self.schedule, "trainers": self.trainers, "device": self.device,
                       "seconds": round(time.time() - self.t0), "report": res["files"]}, f, indent=1)
        print(res["markdown"])
        self.say(f"done. Report: {os.path.join(report, 'comparison.md')}")
        print(self.out)
        return self.out


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the whole flow on generated data (see README)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", default="sud_demo", help="output folder (default ./sud_demo)")
    p.add_argument("--schedule", choices=tuple(SCHEDULES), default="short",
                   help="smoke: minutes (tests); short: ~20 min on 2 CPU cores (default); long: for a GPU")
    p.add_argument("--trainers", nargs="+", default=list(DEFAULT_TRAINERS),
                   help="trainers to compare; the first is the baseline (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--fresh", action="store_true", help="delete the output folder first")
    p.set_defaults(func=_run)


def _run(args) -> int:
    if args.fresh and os.path.isdir(args.output):
        shutil.rmtree(args.output)
    device = args.device
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    Demo(args.output, args.schedule, args.trainers, device).main()
    return 0
