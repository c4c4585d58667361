"""``nnunet-sud self-train``: nnU-Net self-training (teacher -> pseudo-labels -> student), N rounds.

    nnunet-sud self-train -d ID -c CFG [-f FOLD] [--rounds N] [--teacher-trainer NAME | --teacher-model DIR]
                          [--student-trainer NAME] [--filter both|case|voxel|none] [--denoise] ...

Steps (each one a real nnU-Net / nnunet-sud command or a file operation, each resumable):

 0. the teacher: ``nnUNetv2_train ID CFG FOLD -tr TEACHER`` (skipped when trained; a semi-supervised
    teacher gets ``nnunet-sud preprocess-unlabeled`` first, SUD-type teachers and ``--denoise`` the
    label-map denoiser ``nnUNetv2_train ... -tr nnUNetTrainerLabelDenoiser``, unless
    ``$nnUNet_denoiser`` names one), or an existing model folder (``--teacher-model``);
 then for round r = 1..N, the teacher of round r > 1 being the student of round r - 1:
 1. ``nnUNetv2_predict`` of ``imagesUnlabeled`` with ``--save_probabilities``;
 2. the filter (:mod:`.filtering`): per case (best ``--keep-fraction`` by ``--case-score``) and per
    voxel (teacher confidence < ``--voxel-threshold`` -> nnU-Net's ignore label), optionally on the
    denoised map (``--denoise``, :mod:`.denoise`); Dice of teacher / denoised / kept pseudo-labels
    against ``labelsUnlabeled/`` where those exist;
 3. the student dataset (:mod:`.student`): labeled + kept pseudo-labeled cases, ignore label;
 4. the teacher's plans moved onto it (``nnUNetv2_move_plans_between_datasets``; no fingerprint of
    pseudo-labels is ever extracted: the student gets the teacher's), ``nnUNetv2_preprocess`` with
    those plans, ``splits_final.json`` (the teacher's validation cases stay validation cases);
 5. ``nnUNetv2_train`` of the student (plain nnU-Net with its full augmentation: the noisy student
    of Xie et al., "Self-training with Noisy Student improves ImageNet classification", CVPR 2020;
    iterated like Huang et al., "Revisiting nnU-Net for Iterative Pseudo Labeling and Efficient
    Sliding Window Inference", FLARE 2022).

The run's state (``state.json``: its settings and the finished steps), logs, predictions, filtered
pseudo-labels, per-round quality (``round_R/filter.json``) and ``summary.md`` live in the work folder
(default ``$nnUNet_results/<teacher dataset>/self_training_student<ID>``). A re-run with the same
settings skips finished steps and says where it picks up (``--rounds`` may grow); a failed step
names itself and the command that resumes. The final model folder is an ordinary nnU-Net model
folder for ``nnUNetv2_predict``.
"""
import contextlib
import io
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from nnunet_sud.errors import UserFacingError

STATE = "state.json"
DEFAULT_ID_OFFSET = 100
_PARSER = None  # the subcommand's parser (to write the resume command)


@dataclass
class Step:
    key: str                       # unique within the run, e.g. "round2/filter"
    title: str
    done: Callable[[], bool]
    run: Callable[[], None]
    where: str = ""                # what a finished step left behind (said when it is skipped)


@dataclass
class Teacher:
    """Who predicts in a round: a trained trainer of a dataset or a model folder."""
    description: str
    dataset_id: int = 0
    dataset_name: str = ""
    trainer: str = ""
    model_folder: str = ""


def find_trainer_class(name: str, ext_trainer: str, option: str):
    """The trainer class named ``name``: nnUNetTrainer and ours directly, others through nnU-Net's own
    search (its trainers, then the folders of ``ext_trainer``). Used for checks before anything
    runs; nnUNetv2_train looks the name up again itself."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    import nnunet_sud.trainers as ours
    if name == "nnUNetTrainer":
        return nnUNetTrainer
    if isinstance(getattr(ours, name, None), type):
        return getattr(ours, name)
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    old = os.environ.get("nnUNet_extTrainer")
    os.environ["nnUNet_extTrainer"] = ext_trainer
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return recursive_find_trainer_class_by_name(name)
    except (RuntimeError, AssertionError):
        raise UserFacingError(f"{option} {name}: nnU-Net finds no such trainer (searched nnunetv2 and "
                              f"nnUNet_extTrainer={ext_trainer})") from None
    finally:
        if old is None:
            os.environ.pop("nnUNet_extTrainer", None)
        else:
            os.environ["nnUNet_extTrainer"] = old


class SelfTraining:
    def __init__(self, args):
        from batchgenerators.utilities.file_and_folder_operations import load_json
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        from nnunet_sud.denoiser.data import dataset_id_of, resolve_dataset_name
        from nnunet_sud.experiment import Experiment, needs_denoiser, require_nnunet_folders
        from nnunet_sud.self_training.filtering import FilterSettings
        from nnunet_sud.self_training.student import held_out_cases, labels_with_ignore, student_dataset_name
        from nnunet_sud.unlabeled.preprocess import find_unlabeled_cases, plan_command

        self.args = args
        folders = require_nnunet_folders()
        self.filter = FilterSettings(args.filter, args.keep_fraction, args.case_score, args.min_case_score,
                                     args.voxel_threshold).check()
        if args.rounds < 1:
            raise UserFacingError(f"--rounds {args.rounds}: at least 1")
        self.fold = args.fold if args.fold == "all" else self._int_fold(args.fold)
        self.cfg, self.plans = args.configuration, args.plans
        if args.teacher_model and args.teacher_trainer:
            raise UserFacingError("give either --teacher-trainer (trained here, or already trained) or "
                                  "--teacher-model (an existing model folder), not both")
        self.teacher_trainer = None if args.teacher_model else (args.teacher_trainer or "nnUNetTrainer")

        # the teacher dataset
        self.teacher_name = resolve_dataset_name(args.dataset)
        self.teacher_id = int(dataset_id_of(self.teacher_name))
        self.raw = os.path.join(folders["nnUNet_raw"], self.teacher_name)
        self.pre = os.path.join(folders["nnUNet_preprocessed"], self.teacher_name)
        if not os.path.isfile(os.path.join(self.raw, "dataset.json")):
            raise UserFacingError(f"{self.raw}/dataset.json not found: self-training reads the teacher dataset's "
                                  f"imagesTr/labelsTr/imagesUnlabeled from nnUNet_raw")
        self.dataset_json = load_json(os.path.join(self.raw, "dataset.json"))
        self.plans_file = os.path.join(self.pre, self.plans + ".json")
        if not os.path.isfile(self.plans_file):
            raise UserFacingError(f"{self.plans_file} not found: plan and preprocess the teacher dataset first "
                                  f"({plan_command(self.teacher_id, self.cfg, self.plans)})")
        self.plans_manager = PlansManager(self.plans_file)
        if self.cfg not in self.plans_manager.available_configurations:
            raise UserFacingError(f"-c {self.cfg}: not in {self.plans_file} (available: "
                                  f"{', '.join(self.plans_manager.available_configurations)})")
        self.cm = self.plans_manager.get_configuration(self.cfg)
        if self.cm.previous_stage_name is not None:
            raise UserFacingError(f"-c {self.cfg} is a cascade stage: it needs the predictions of "
                                  f"{self.cm.previous_stage_name} as input, which pseudo-labeled cases do not have. "
                                  f"Self-train 3d_fullres, 3d_lowres or 2d.")
        self.labels, self.ignore_label = labels_with_ignore(self.dataset_json["labels"],
                                                            self.dataset_json.get("regions_class_order"))
        self.ending = self.dataset_json["file_ending"]
        n_channels = len(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {})))
        self.unlabeled = find_unlabeled_cases(os.path.join(self.raw, "imagesUnlabeled"), self.ending, n_channels)
        self.held_out = held_out_cases(self.raw, self.ending)
        bad = sorted(set(self.unlabeled) & self.held_out)
        if bad:
            raise UserFacingError(f"imagesUnlabeled of {self.raw} holds test cases ({', '.join(bad[:5])}: in imagesTs "
                                  f"or split.json 'test'); they must never be pseudo-labeled for training. Remove them "
                                  f"from imagesUnlabeled.")

        # students
        self.student_id = args.student_id if args.student_id is not None else self.teacher_id + DEFAULT_ID_OFFSET
        if self.student_id <= self.teacher_id < self.student_id + args.rounds:
            raise UserFacingError(f"--student-id {self.student_id}: the students of {args.rounds} round(s) would "
                                  f"include the teacher's id {self.teacher_id}")
        self.student_names = {r: student_dataset_name(self.student_id + r - 1, self.teacher_name, r)
                              for r in range(1, args.rounds + 1)}
        device = args.device
        if device is None:
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        work = args.work or os.path.join(folders["nnUNet_results"], self.teacher_name,
                                         f"self_training_student{self.student_id:03d}")
        self.x = Experiment(work, device, own_folders=False)
        self.work = self.x.root

        # denoiser: needed by --denoise and by teachers of the SUD family
        self.needs_denoiser = bool(args.denoise or (self.teacher_trainer and needs_denoiser(self.teacher_trainer)))
        self.user_denoiser = os.environ.get("nnUNet_denoiser") if self.needs_denoiser else None
        self.denoiser_folder = None
        if self.needs_denoiser:
            self.denoiser_folder = self.user_denoiser or self.x.fold_dir(
                self.teacher_name, args.denoiser_trainer, self.cfg, self.fold, self.plans)
        self._check_trainers()
        if args.teacher_model:
            self._check_model_folder(args.teacher_model)
        self.settings = {
            "teacher_dataset": self.teacher_name, "configuration": self.cfg, "fold": str(self.fold),
            "plans": self.plans, "teacher_trainer": self.teacher_trainer,
            "teacher_model": os.path.abspath(args.teacher_model) if args.teacher_model else None,
            "student_trainer": args.student_trainer, "filter": self.filter.as_dict(), "denoise": bool(args.denoise),
            "denoiser": self.denoiser_folder if args.denoise else None, "tta": not args.disable_tta,
            "student_id": self.student_id}
        from nnunet_sud.self_training.student import check_student_id
        for r, name in self.student_names.items():
            check_student_id(self.student_id + r - 1, name, self.settings, folders)
        self.state = self._load_state()

    # ------------------------------------------------------------------ checks and state
    @staticmethod
    def _int_fold(fold: str) -> int:
        try:
            return int(fold)
        except ValueError:
            raise UserFacingError(f"-f {fold}: a fold number or 'all'") from None

    def _check_trainers(self) -> None:
        from nnunet_sud.denoiser.trainer import nnUNetTrainerLabelDenoiser
        from nnunet_sud.trainers.semi_supervised import nnUNetTrainerSemiSupervised
        ext = self.x.env["nnUNet_extTrainer"]
        student = find_trainer_class(self.args.student_trainer, ext, "--student-trainer")
        if issubclass(student, (nnUNetTrainerSemiSupervised, nnUNetTrainerLabelDenoiser)):
            raise UserFacingError(f"--student-trainer {self.args.student_trainer}: the student learns from labeled and "
                                  f"pseudo-labeled cases with a supervised trainer (nnUNetTrainer or a variant of it); "
                                  f"{student.__name__} is a {'label-map denoiser' if issubclass(student, nnUNetTrainerLabelDenoiser) else 'semi-supervised trainer that needs unlabeled images'}")
        self.teacher_class = None
        if self.teacher_trainer:
            self.teacher_class = find_trainer_class(self.teacher_trainer, ext, "--teacher-trainer")
        if self.needs_denoiser and not self.user_denoiser:
            den = find_trainer_class(self.args.denoiser_trainer, ext, "--denoiser-trainer")
            if not issubclass(den, nnUNetTrainerLabelDenoiser):
                raise UserFacingError(f"--denoiser-trainer {self.args.denoiser_trainer}: not a label-map denoiser "
                                      f"(nnUNetTrainerLabelDenoiser or a subclass)")

    def _check_model_folder(self, folder: str) -> None:
        from batchgenerators.utilities.file_and_folder_operations import load_json
        folder = os.path.abspath(folder)
        for f in ("plans.json", "dataset.json", os.path.join(f"fold_{self.fold}", "checkpoint_final.pth")):
            if not os.path.isfile(os.path.join(folder, f)):
                raise UserFacingError(f"--teacher-model {folder}: {f} missing (a model folder "
                                      f"TRAINER__PLANS__CONFIGURATION with a finished fold {self.fold} is needed)")
        parts = os.path.basename(folder.rstrip(os.sep)).split("__")
        if len(parts) == 3 and parts[2] != self.cfg:
            raise UserFacingError(f"--teacher-model {folder} is a {parts[2]} model, -c is {self.cfg}")
        plans, mine = load_json(os.path.join(folder, "plans.json")), load_json(self.plans_file)
        plans.pop("dataset_name", None), mine.pop("dataset_name", None)
        if plans != mine:
            raise UserFacingError(
                f"--teacher-model {folder}: its plans.json differs from {self.plans_file}. The students reuse the "
                f"teacher's plans from the teacher dataset: copy {folder}/plans.json to {self.pre}/<NAME>.json, set "
                f"its plans_name to <NAME>, preprocess with nnUNetv2_preprocess -d {self.teacher_id} -plans_name "
                f"<NAME> -c {self.cfg}, and pass -p <NAME>")
        if load_json(os.path.join(folder, "dataset.json")).get("labels") != self.dataset_json["labels"]:
            raise UserFacingError(f"--teacher-model {folder}: its dataset.json labels differ from {self.raw}/dataset.json")

    def _load_state(self) -> dict:
        path = os.path.join(self.work, STATE)
        if os.path.isfile(path):
            with open(path) as f:
                state = json.load(f)
            if state.get("settings") != self.settings:
                diff = sorted(k for k in set(self.settings) | set(state.get("settings", {}))
                              if self.settings.get(k) != state.get("settings", {}).get(k))
                raise UserFacingError(
                    f"{self.work} holds a self-training run with other settings (differing: {', '.join(diff)}). "
                    f"Use another --student-id (and --work) for these settings, or repeat the earlier ones.")
            return state
        state = {"settings": self.settings, "finished": {}}
        os.makedirs(self.work, exist_ok=True)
        self._save_state(state)
        return state

    def _save_state(self, state: Optional[dict] = None) -> None:
        path = os.path.join(self.work, STATE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state or self.state, f, indent=1)
        os.replace(tmp, path)

    def finished(self, key: str) -> bool:
        return key in self.state["finished"]

    def resume_command(self) -> str:
        args = ["nnunet-sud", "self-train"]
        for a in _PARSER._actions:
            if not a.option_strings or a.dest == "help":
                continue
            v = getattr(self.args, a.dest, None)
            if v is None or v == a.default or v is False:
                continue
            args.append(a.option_strings[0])
            if a.nargs != 0:
                args.append(str(v))
        return " ".join(shlex.quote(a) for a in args)

    # ------------------------------------------------------------------ teachers and students
    def teacher_of(self, r: int) -> Teacher:
        if r > 1:
            name = self.student_names[r - 1]
            return Teacher(f"{self.args.student_trainer} on {name} (round {r - 1}'s student)",
                           self.student_id + r - 2, name, self.args.student_trainer)
        if self.args.teacher_model:
            return Teacher(f"model folder {self.args.teacher_model}", model_folder=os.path.abspath(self.args.teacher_model))
        return Teacher(f"{self.teacher_trainer} on {self.teacher_name}", self.teacher_id, self.teacher_name,
                       self.teacher_trainer)

    def round_dir(self, r: int) -> str:
        return os.path.join(self.work, f"round_{r}")

    def student_fold_dir(self, r: int) -> str:
        return self.x.fold_dir(self.student_names[r], self.args.student_trainer, self.cfg, self.fold, self.plans)

    def steps(self) -> List[Step]:
        a, steps = self.args, []
        if self.teacher_trainer:
            from nnunet_sud.trainers.semi_supervised import nnUNetTrainerSemiSupervised
            if issubclass(self.teacher_class, nnUNetTrainerSemiSupervised):
                steps.append(Step("teacher/preprocess_unlabeled", "teacher: nnunet-sud preprocess-unlabeled "
                                  "(the teacher is semi-supervised)", lambda: self.finished("teacher/preprocess_unlabeled"),
                                  self.preprocess_unlabeled))
        if self.needs_denoiser and not self.user_denoiser:
            ckpt = os.path.join(self.denoiser_folder, "checkpoint_final.pth")
            steps.append(Step("teacher/denoiser", f"label-map denoiser: nnUNetv2_train -tr {a.denoiser_trainer}",
                              lambda: os.path.isfile(ckpt), lambda: self.x.train(
                                  self.teacher_id, self.teacher_name, self.cfg, self.fold, a.denoiser_trainer,
                                  log_name="denoiser_train", plans=self.plans), self.denoiser_folder))
        if self.teacher_trainer:
            fold_dir = self.x.fold_dir(self.teacher_name, self.teacher_trainer, self.cfg, self.fold, self.plans)
            steps.append(Step("teacher/train", f"teacher: nnUNetv2_train -tr {self.teacher_trainer}",
                              lambda: os.path.isfile(os.path.join(fold_dir, "checkpoint_final.pth")),
                              lambda: self.x.train(self.teacher_id, self.teacher_name, self.cfg, self.fold,
                                                   self.teacher_trainer, log_name="teacher_train", plans=self.plans,
                                                   denoiser=self.denoiser_folder), fold_dir))
        for r in range(1, a.rounds + 1):
            n, name, rd = a.rounds, self.student_names[r], self.round_dir(r)
            steps += [
                Step(f"round{r}/predict", f"round {r}/{n}: nnUNetv2_predict imagesUnlabeled with the teacher "
                     f"({self.teacher_of(r).description}), probabilities kept",
                     lambda r=r: self.finished(f"round{r}/predict"), lambda r=r: self.predict(r),
                     os.path.join(rd, "predictions")),
                Step(f"round{r}/filter", f"round {r}/{n}: {'denoise and ' if a.denoise else ''}filter the "
                     f"pseudo-labels ({self.filter.filter})", lambda r=r: self.finished(f"round{r}/filter"),
                     lambda r=r: self.filter_round(r), os.path.join(rd, "filter.json")),
                Step(f"round{r}/dataset", f"round {r}/{n}: student dataset {name}",
                     lambda r=r: self.finished(f"round{r}/dataset"), lambda r=r: self.student_dataset(r),
                     os.path.join(self.x.env["nnUNet_raw"], name)),
                Step(f"round{r}/preprocess", f"round {r}/{n}: the teacher's plans -> {name} "
                     f"(nnUNetv2_move_plans_between_datasets), nnUNetv2_preprocess",
                     lambda r=r: self.finished(f"round{r}/preprocess"), lambda r=r: self.preprocess(r),
                     os.path.join(self.x.env["nnUNet_preprocessed"], name)),
                Step(f"round{r}/train", f"round {r}/{n}: student: nnUNetv2_train {self.student_id + r - 1} {self.cfg} "
                     f"{self.fold} -tr {a.student_trainer}",
                     lambda r=r: os.path.isfile(os.path.join(self.student_fold_dir(r), "checkpoint_final.pth")),
                     lambda r=r: self.x.train(self.student_id + r - 1, self.student_names[r], self.cfg, self.fold,
                                              a.student_trainer, log_name=f"round{r}_train", plans=self.plans),
                     self.student_fold_dir(r)),
            ]
        return steps

    # ------------------------------------------------------------------ the steps
    def preprocess_unlabeled(self) -> None:
        self.x.run("teacher_preprocess_unlabeled", self.x.sud("preprocess-unlabeled", "-d", self.teacher_id, "-c",
                                                              self.cfg, "-p", self.plans, "-np", self.args.num_processes))

    def predict(self, r: int) -> None:
        t, a = self.teacher_of(r), self.args
        out = os.path.join(self.round_dir(r), "predictions")
        images = os.path.join(self.raw, "imagesUnlabeled")
        extra = ["--save_probabilities"]
        if os.path.isdir(out) and os.listdir(out):
            extra.append("--continue_prediction")  # an interrupted prediction: nnU-Net skips the finished cases
            self.x.say(f"round {r}: continuing the interrupted prediction in {out}")
        if t.model_folder:
            self.x.run(f"round{r}_predict", ["nnUNetv2_predict_from_modelfolder", "-i", images, "-o", out, "-m",
                                             t.model_folder, "-f", self.fold, "-device", self.x.device, "-npp", 1,
                                             "-nps", 1, *([] if not a.disable_tta else ["--disable_tta"]), *extra])
        else:
            self.x.predict(t.dataset_id, t.dataset_name, self.cfg, self.fold, t.trainer, images, out,
                           tta=not a.disable_tta, log_name=f"round{r}_predict", plans=self.plans, extra=extra,
                           denoiser=self.denoiser_folder if r == 1 and self.needs_denoiser else None)
        missing = [c for c in self.unlabeled if not all(os.path.isfile(os.path.join(out, c + e))
                                                         for e in (".npz", ".pkl"))]
        if missing:
            raise UserFacingError(f"nnUNetv2_predict left no probabilities for {', '.join(missing[:5])} in {out} "
                                  f"(log: {self.x.logs}/round{r}_predict.log)")

    def _load_denoiser(self):
        import torch
        from nnunet_sud.denoiser.loading import load_denoiser
        old = os.environ.get("nnUNet_denoiser")
        os.environ["nnUNet_denoiser"] = self.denoiser_folder
        try:
            return load_denoiser(self.teacher_name, self.plans, self.cfg, self.fold, torch.device(self.x.device))
        finally:
            if old is None:
                os.environ.pop("nnUNet_denoiser")
            else:
                os.environ["nnUNet_denoiser"] = old

    def filter_round(self, r: int) -> None:
        import numpy as np
        import torch
        from batchgenerators.utilities.file_and_folder_operations import load_pickle
        from nnunet_sud.self_training.denoise import denoise_probabilities
        from nnunet_sud.self_training.filtering import (case_quality, case_score, pseudo_label, select_cases,
                                                        summarize_round)
        from nnunet_sud.unlabeled.preprocess import LABELS_FOLDER, find_unlabeled_labels

        f = self.filter
        rd = self.round_dir(r)
        pred, out = os.path.join(rd, "predictions"), os.path.join(rd, "pseudo_labels")
        os.makedirs(out, exist_ok=True)
        rw = self.plans_manager.image_reader_writer_class()
        lm = self.plans_manager.get_label_manager(self.dataset_json)
        classes = [int(c) for c in lm.foreground_labels]
        withheld = find_unlabeled_labels(os.path.join(self.raw, LABELS_FOLDER), self.ending, self.unlabeled)
        denoiser = self._load_denoiser() if self.args.denoise else None
        records = {}
        for case in sorted(self.unlabeled):
            npz = os.path.join(pred, case + ".npz")
            try:
                probs = np.load(npz)["probabilities"]
                props = load_pickle(os.path.join(pred, case + ".pkl"))
            except Exception as e:
                raise UserFacingError(f"cannot read the teacher's probabilities {npz} ({type(e).__name__}: {e}); "
                                      f"delete it (and {case}.pkl) and resume: the prediction step redoes it") from None
            den = None
            if denoiser is not None:
                den = denoise_probabilities(denoiser, probs, props, self.plans_manager, self.cm, self.dataset_json,
                                            torch.device(self.x.device))
            labels, ignored = pseudo_label(probs, den, f.voxel_threshold if f.per_voxel else 0.0, self.ignore_label)
            rec = {"score": case_score(probs, f.case_score), "voxels_kept": float(1.0 - ignored.mean())}
            if case in withheld:
                ref = rw.read_seg(withheld[case])[0][0]
                maps = {"teacher": (probs.argmax(0), None), "pseudo_label": (labels, ignored)}
                if den is not None:
                    maps["denoised"] = (den.argmax(0), None)
                rec["dice"] = case_quality(ref, classes, maps, lm.ignore_label)
            rw.write_seg(labels.astype(np.uint8 if self.ignore_label < 255 else np.int16),
                         os.path.join(out, case + self.ending), props)
            records[case] = rec
        scores = {c: rec["score"] for c, rec in records.items()}
        kept = select_cases(scores, f.keep_fraction, f.min_case_score) if f.per_case else sorted(records)
        for c, rec in records.items():
            rec["kept"] = c in kept
        if not kept:
            raise UserFacingError(f"round {r}: the case filter kept no case (scores {scores}); the teacher labels no "
                                  f"foreground or --min-case-score is too high")
        summary = summarize_round(records, classes)
        with open(os.path.join(rd, "filter.json"), "w") as fh:
            json.dump({"round": r, "teacher": self.teacher_of(r).description, "filter": f.as_dict(),
                       "denoise": bool(self.args.denoise), "ignore_label": self.ignore_label, "kept": kept,
                       "summary": summary, "cases": records}, fh, indent=1, default=float)
        self.x.say(f"round {r}: {self.quality_line(summary)}")
        if not self.args.keep_probabilities:
            for c in self.unlabeled:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(pred, c + ".npz"))

    def class_names(self) -> Dict[str, str]:
        return {str(v): k for k, v in self.dataset_json["labels"].items() if k not in ("background", "ignore")}

    def quality_line(self, s: dict) -> str:
        line = f"kept {s['cases_kept']}/{s['cases']} cases, {100 * s['voxels_kept']:.2f}% of their voxels labeled"
        names = self.class_names()
        for key, what in (("teacher", "teacher (all cases)"), ("denoised", "denoised"),
                          ("pseudo_label", "kept pseudo-labels")):
            d = s["dice"].get(key)
            if d:
                line += f"; Dice {what} " + "/".join(f"{names.get(k, k)} {v:.3f}" for k, v in d["per_class"].items())
        if s["cases_with_label"] == 0:
            line += " (no labelsUnlabeled: pseudo-label Dice not measured)"
        return line

    def student_dataset(self, r: int) -> None:
        from nnunet_sud.self_training.student import write_student_raw
        rd = self.round_dir(r)
        with open(os.path.join(rd, "filter.json")) as fh:
            kept = json.load(fh)["kept"]
        pseudo = {c: (self.unlabeled[c], os.path.join(rd, "pseudo_labels", c + self.ending)) for c in kept}
        marker = {"settings": self.settings, "round": r, "teacher": self.teacher_of(r).description,
                  "filter_file": os.path.join(rd, "filter.json")}
        write_student_raw(self.x.env["nnUNet_raw"], self.student_names[r], self.raw, self.dataset_json, pseudo,
                          self.labels, self.held_out, marker)

    def preprocess(self, r: int) -> None:
        from nnunet_sud.self_training.student import case_groups, student_splits
        name, sid = self.student_names[r], self.student_id + r - 1
        pre = os.path.join(self.x.env["nnUNet_preprocessed"], name)
        os.makedirs(pre, exist_ok=True)
        self.x.run(f"round{r}_move_plans", ["nnUNetv2_move_plans_between_datasets", "-s", self.teacher_id, "-t", sid,
                                            "-sp", self.plans, "-tp", self.plans])
        shutil.copyfile(os.path.join(self.x.env["nnUNet_raw"], name, "dataset.json"), os.path.join(pre, "dataset.json"))
        fingerprint = os.path.join(self.pre, "dataset_fingerprint.json")
        if os.path.isfile(fingerprint):  # nnU-Net's trainer copies it into the model folder: the teacher's
            shutil.copyfile(fingerprint, os.path.join(pre, "dataset_fingerprint.json"))
        self.x.run(f"round{r}_preprocess", ["nnUNetv2_preprocess", "-d", sid, "-plans_name", self.plans, "-c", self.cfg,
                                            "-np", self.args.num_processes])
        if self.fold != "all":
            teacher_splits = os.path.join(self.pre, "splits_final.json")
            if not os.path.isfile(teacher_splits):
                raise UserFacingError(f"{teacher_splits} not found: the teacher's fold {self.fold} is defined there "
                                      f"(nnUNetv2_train writes it when it trains the teacher)")
            with open(teacher_splits) as fh:
                splits = json.load(fh)
            with open(os.path.join(self.round_dir(r), "filter.json")) as fh:
                kept = json.load(fh)["kept"]
            splits, left_out = student_splits(splits, self.fold, kept, case_groups(self.raw))
            with open(os.path.join(pre, "splits_final.json"), "w") as fh:
                json.dump(splits, fh, indent=1)
            if left_out:
                self.x.say(f"round {r}: {len(left_out)} pseudo-labeled case(s) share a group with a validation case "
                           f"of fold {self.fold} and stay out of its training: {', '.join(left_out[:10])}")

    # ------------------------------------------------------------------ running
    def mark(self, key: str) -> None:
        self.state["finished"][key] = time.strftime("%Y-%m-%d %H:%M:%S")
        self._save_state()

    def main(self) -> str:
        steps = self.steps()
        cmd = self.resume_command()
        self.x.say(f"nnunet-sud self-train: {self.args.rounds} round(s) from {self.teacher_name} ({self.cfg}, fold "
                   f"{self.fold}); work folder {self.work}")
        first = next((i for i, s in enumerate(steps) if not s.done()), None)
        if first is None:
            self.x.say(f"all {len(steps)} steps were done before: nothing to do")
        elif first > 0:
            self.x.say(f"resuming: {first} of {len(steps)} steps were done before; picking up at '{steps[first].title}'")
        for s in steps:
            if s.done():
                self.x.say(f"{s.title}: done before{(' (' + s.where + ')') if s.where else ''}, skipped")
                continue
            self.x.say(s.title)
            try:
                s.run()
            except UserFacingError as e:
                raise UserFacingError(f"step '{s.title}' failed: {e}\nFix the cause, then resume with:\n  {cmd}") from None
            except BaseException:
                print(f"nnunet-sud self-train: step '{s.title}' failed (traceback below); resume with:\n  {cmd}",
                      file=sys.stderr)
                raise
            self.mark(s.key)
        return self.report()

    def report(self) -> str:
        rows = []
        for r in range(1, self.args.rounds + 1):
            with open(os.path.join(self.round_dir(r), "filter.json")) as fh:
                rows.append((r, json.load(fh)["summary"]))
        from nnunet_sud.self_training.filtering import quality_markdown
        final = os.path.dirname(self.student_fold_dir(self.args.rounds))
        sid = self.student_id + self.args.rounds - 1
        predict = (f"nnUNetv2_predict -i INPUT -o OUTPUT -d {sid} -c {self.cfg} -f {self.fold} "
                   f"-tr {self.args.student_trainer} -p {self.plans}")
        text = (f"# Self-training of {self.teacher_name} ({self.cfg}, fold {self.fold})\n\n"
                f"Command: `{self.resume_command()}`\n\n"
                f"Final model folder (round {self.args.rounds}): `{final}`\n\nPredict with: `{predict}`\n\n"
                "## Pseudo-labels per round\n\n"
                + quality_markdown(rows, self.class_names()))
        with open(os.path.join(self.work, "summary.md"), "w") as fh:
            fh.write(text)
        with open(os.path.join(self.work, "summary.json"), "w") as fh:
            json.dump({"final_model_folder": final, "student_datasets": self.student_names,
                       "rounds": {r: s for r, s in rows}}, fh, indent=1, default=float)
        self.x.say(f"done. Final model folder: {final}")
        self.x.say(f"predict with: {predict}")
        self.x.say(f"summary: {os.path.join(self.work, 'summary.md')}")
        return final


def add_parser(sub) -> None:
    global _PARSER
    p = sub.add_parser("self-train", help="self-training: teacher -> filtered pseudo-labels of imagesUnlabeled -> "
                                          "student (plain nnU-Net), for N rounds; resumable",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("-d", "--dataset", required=True, help="the teacher dataset (name or id): imagesTr/labelsTr, "
                                                          "imagesUnlabeled, planned and preprocessed")
    p.add_argument("-c", "--configuration", required=True, help="configuration, e.g. 2d or 3d_fullres")
    p.add_argument("-f", "--fold", default="0", help="fold (0-4 or 'all'; default 0)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--rounds", type=int, default=1, help="rounds; each student teaches the next (default 1)")
    p.add_argument("--teacher-trainer", default=None,
                   help="trainer of the first teacher, trained unless already trained (default nnUNetTrainer; any "
                        "trainer, e.g. nnUNetTrainerSUD or a variant of yours)")
    p.add_argument("--teacher-model", default=None,
                   help="instead: an existing model folder (TRAINER__PLANS__CONFIGURATION) as the first teacher")
    p.add_argument("--student-trainer", default="nnUNetTrainer",
                   help="trainer of the students: a supervised trainer (default nnUNetTrainer)")
    p.add_argument("--filter", default="both", choices=("both", "case", "voxel", "none"),
                   help="which pseudo-label filters run (default both)")
    p.add_argument("--keep-fraction", type=float, default=0.8,
                   help="case filter: keep the best ceil(f n) of the n unlabeled cases (default 0.8)")
    p.add_argument("--case-score", default="confidence", choices=("confidence", "entropy"),
                   help="case filter: mean over the teacher's foreground voxels of max-probability (confidence) or "
                        "of 1 - normalised entropy (default confidence)")
    p.add_argument("--min-case-score", type=float, default=0.0,
                   help="case filter: also drop cases scored below this (default 0)")
    p.add_argument("--voxel-threshold", type=float, default=0.5,
                   help="voxel filter: teacher max-probability below this -> ignore label (default 0.5)")
    p.add_argument("--denoise", action="store_true",
                   help="pseudo-labels from the label-map denoiser applied to the teacher's probabilities (offline SUD)")
    p.add_argument("--denoiser-trainer", default="nnUNetTrainerLabelDenoiser",
                   help="trainer of the denoiser trained on the teacher dataset when one is needed and "
                        "$nnUNet_denoiser is not set (default nnUNetTrainerLabelDenoiser)")
    p.add_argument("--student-id", type=int, default=None,
                   help="dataset id of round 1's student; round r uses this + r - 1 (default: teacher id + 100)")
    p.add_argument("--work", default=None, help="work folder (default $nnUNet_results/<teacher dataset>/"
                                                "self_training_student<ID>)")
    p.add_argument("--disable-tta", action="store_true", help="predict pseudo-labels without test-time mirroring")
    p.add_argument("--keep-probabilities", action="store_true",
                   help="keep the teacher's .npz probabilities after filtering (they are deleted by default)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("-np", "--num-processes", type=int, default=2, help="processes of nnUNetv2_preprocess (default 2)")
    p.set_defaults(func=_run)
    _PARSER = p


def _run(args) -> int:
    SelfTraining(args).main()
    return 0
