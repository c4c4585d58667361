"""``nnunet-sud demo``: the whole semi-supervised flow on generated data, in one folder.

Steps (each through the real nnU-Net / nnunet-sud commands, as a user would type them):
 1. ``nnunet-sud synthetic``: a 3d task with few labeled, more unlabeled and held-out test cases
 2. ``nnUNetv2_plan_and_preprocess`` (labeled data only) + ``nnunet-sud preprocess-unlabeled``
 3. ``nnUNetv2_train -tr nnUNetTrainerLabelDenoiser``: the label-map denoiser
 4. ``nnUNetv2_train`` for nnUNetTrainer (supervised baseline), nnUNetTrainerWeakToStrong (the
    recommended trainer), SUD (the method the package is named after), or the trainers asked for
    with ``--trainers``
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
import time

from nnunet_sud.budget import variants_source
from nnunet_sud.dataset_conversion.synthetic import LABELS as SYNTHETIC_LABELS
from nnunet_sud.errors import UserFacingError
from nnunet_sud.experiment import Experiment, check_trainers, needs_denoiser

DEMO_ID = 990
DEMO_NAME = "Dataset990_SyntheticDemo"

# epochs, iterations per epoch, validation iterations, denoiser epochs; data: labeled, unlabeled, test, shape;
# final_validation: nnU-Net's prediction of the validation case after training (the smoke run skips it:
# the test images are predicted and evaluated anyway; the denoiser keeps its own, its quality record)
SCHEDULES = {
    "smoke": dict(epochs=1, iters=2, val_iters=1, den_epochs=1, den_iters=2, final_validation=False,
                  labeled=4, unlabeled=4, test=2, shape=(16, 24, 24)),
    "short": dict(epochs=6, iters=25, val_iters=2, den_epochs=4, den_iters=25,
                  labeled=6, unlabeled=24, test=8, shape=(24, 32, 32)),
    "long": dict(epochs=100, iters=250, val_iters=50, den_epochs=100, den_iters=250,
                 labeled=8, unlabeled=64, test=16, shape=(48, 64, 64)),
}
DEFAULT_TRAINERS = ("nnUNetTrainer", "nnUNetTrainerWeakToStrong", "nnUNetTrainerSUD")
CONFIGURATION = "3d_fullres"


class Demo:
    def __init__(self, out: str, schedule: str, trainers, device: str, fold: int = 0):
        if schedule not in SCHEDULES:
            raise UserFacingError(f"--schedule must be one of {', '.join(SCHEDULES)}")
        check_trainers(trainers)
        self.s = SCHEDULES[schedule]
        self.schedule = schedule
        self.trainers = list(dict.fromkeys(trainers))
        self.fold = fold
        self.x = Experiment(out, device)
        self.out = self.x.root
        self.raw = self.x.raw_dir(DEMO_NAME)

    def say(self, msg: str):
        self.x.say(msg)

    def prepare(self):
        from nnunet_sud.dataset_conversion.synthetic import generate_dataset
        s = self.s
        budgets = {t: (s["epochs"], s["iters"]) for t in self.trainers}
        budgets["nnUNetTrainerLabelDenoiser"] = (s["den_epochs"], s["den_iters"])
        self.x.write_variants("demo_variants.py", variants_source(
            budgets, s["val_iters"], "_demo", final_validation=s.get("final_validation", True),
            purpose="nnunet-sud demo"))
        if not os.path.isfile(os.path.join(self.raw, "dataset.json")):
            self.say(f"1/6 generating {s['labeled']} labeled, {s['unlabeled']} unlabeled, {s['test']} test cases")
            generate_dataset(self.x.env["nnUNet_raw"], DEMO_ID, "3d", s["labeled"], s["unlabeled"], s["test"],
                             seed=0, shape=s["shape"], name="SyntheticDemo")
        pre = self.x.preprocessed_dir(DEMO_NAME)
        if not os.path.isfile(os.path.join(pre, "nnUNetPlans.json")):
            self.say("2/6 planning and preprocessing (labeled data only), then the unlabeled images")
        self.x.plan_and_preprocess(DEMO_ID, DEMO_NAME, [CONFIGURATION])
        # fold 0: all labeled cases but the last train, the last validates (nnU-Net's 5-fold split needs
        # 5+ cases and would hold out more of the few labels)
        labeled = sorted(f[:-len(".nii.gz")] for f in os.listdir(os.path.join(self.raw, "labelsTr")))
        with open(os.path.join(pre, "splits_final.json"), "w") as f:
            json.dump([{"train": labeled[:-1], "val": labeled[-1:]}], f)
        self.x.preprocess_unlabeled(DEMO_ID, CONFIGURATION)

    def fold_dir(self, trainer: str) -> str:
        return self.x.fold_dir(DEMO_NAME, trainer, CONFIGURATION, self.fold)

    def train(self, trainer: str, denoiser=None):
        self.x.train(DEMO_ID, DEMO_NAME, CONFIGURATION, self.fold, trainer, log_name=f"train_{trainer}",
                     denoiser=denoiser)

    def predict_and_evaluate(self, trainer: str, denoiser=None) -> str:
        pred = os.path.join(self.out, "predictions", trainer)
        self.x.predict(DEMO_ID, DEMO_NAME, CONFIGURATION, self.fold, trainer, os.path.join(self.raw, "imagesTs"),
                       pred, tta=self.schedule == "long", log_name=f"predict_{trainer}", denoiser=denoiser)
        return self.x.evaluate(self.raw, pred, os.path.join(self.out, "evaluation", trainer))

    def main(self) -> str:
        self.say(f"nnunet_sud demo ({self.schedule} schedule) in {self.out}")
        self.prepare()
        variants = [f"{t}_demo" for t in self.trainers]
        denoiser = None
        if any(needs_denoiser(t) for t in self.trainers):
            self.say("3/6 training the label-map denoiser")
            self.train("nnUNetTrainerLabelDenoiser_demo")
            denoiser = self.fold_dir("nnUNetTrainerLabelDenoiser_demo")
        for i, v in enumerate(variants):
            self.say(f"4/6 training {v} ({i + 1}/{len(variants)}): {self.s['epochs']} epochs x {self.s['iters']} "
                     f"iterations")
            self.train(v, denoiser)
        evaluations = []
        for v in variants:
            self.say(f"5/6 predicting the test images with {v} and evaluating")
            evaluations.append((v[:-len("_demo")], self.predict_and_evaluate(v, denoiser)))
        self.say("6/6 comparing")
        from nnunet_sud.evaluation.compare import compare
        from nnunet_sud.evaluation.target_quality import target_quality_report
        report = os.path.join(self.out, "report")
        baseline = evaluations[0][0] if len(evaluations) > 1 else None
        res = compare(evaluations, report, baseline=baseline)
        tq = target_quality_report({v[:-len("_demo")]: self.fold_dir(v) for v in variants[1:]}, report,
                                   [n for n in SYNTHETIC_LABELS if n != "background"])
        text = res["markdown"] + "\n" + verdict(res["paired"], baseline)
        if tq["markdown"]:
            text += ("\n## What the semi-supervised trainers learn from\n\nDice against the labels of the unlabeled "
                     "cases (generated data have them; they never enter a loss): the raw prediction, the denoised "
                     "prediction and the stored target (SUD/TE), a teacher's prediction, kept pseudo-labels. Mid = "
                     "at half of training, end = the last epochs.\n\n" + tq["markdown"] +
                     f"\nCurves: {tq['png']}\n")
            res["files"]["target_quality"] = tq["png"]
        with open(res["files"]["markdown"], "w") as f:
            f.write(text)
        with open(os.path.join(self.out, "demo.json"), "w") as f:
            json.dump({"schedule": self.schedule, "trainers": self.trainers, "device": self.x.device,
                       "seconds": round(time.time() - self.x.t0), "report": res["files"]}, f, indent=1)
        print(text)
        self.say(f"done. Report: {os.path.join(report, 'comparison.md')}")
        print(self.out)
        return self.out


def verdict(paired_rows, baseline) -> str:
    """One honest sentence per method and class: better, worse or no clear difference than the
    baseline in Dice (mean paired improvement, two-sided Wilcoxon p < 0.05 on the test cases)."""
    if not baseline:
        return ""
    lines = [f"## Verdict against {baseline} (Dice, paired over the test cases)", ""]
    for r in paired_rows:
        if r["metric"] != "Dice":
            continue
        p, d = r["p_wilcoxon"], r["mean"]
        if p == p and p < 0.05:
            word = "better than" if d > 0 else "worse than"
        else:
            word = "not clearly different from"
        lines.append(f"- {r['method']}, {r['name']}: {word} {baseline} (mean change {d:+.3f}, p = {p:.2g}, "
                     f"{r['n_pairs']} cases)")
    return "\n".join(lines) + "\n"


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
