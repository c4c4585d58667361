"""Experiments run the way a user types them: the shared machinery of ``nnunet-sud demo`` and the
real-data benchmark (``benchmarks/ssl_quality.py``).

* training budgets are trainer variants written by :func:`nnunet_sud.budget.variants_source` (a user's
  own variant module, found through ``nnUNet_extTrainer``), e.g. ``nnUNetTrainerSUD_demo``; every
  trainer of one experiment gets the same budget.
* :class:`Experiment`: one folder holding its own ``nnUNet_raw`` / ``_preprocessed`` /
  ``_results``, the variant module and a log per step; it runs the real commands
  (``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train``, ``nnUNetv2_predict``, ``nnunet-sud ...``)
  as subprocesses and evaluates predictions with :mod:`nnunet_sud.evaluation`.
"""
import os
import subprocess
import sys
import time
from typing import Dict, Iterable, Optional, Sequence

from nnunet_sud.errors import UserFacingError

def trainer_class(name: str):
    """The trainer class called ``name``: ours (``nnunet_sud.trainers``), else nnU-Net's own search
    (its trainers and the folders of ``nnUNet_extTrainer``); None when there is none."""
    import contextlib
    import io
    from nnunet_sud import trainers
    cls = getattr(trainers, name, None)
    if isinstance(cls, type):
        return cls
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return recursive_find_trainer_class_by_name(name)
    except (RuntimeError, AssertionError, ImportError):
        return None


def needs_denoiser(trainer: str) -> bool:
    """Whether training ``trainer`` loads the label denoiser (``nnUNet_denoiser``), so that it must be
    trained first: the trainer class answers (``LabelDenoiserMixin.needs_denoiser_by_default``: the
    SUD family, post-denoise, DAE uncertainty; not TE, SUD with beta = 0). Unknown names: False."""
    from nnunet_sud.trainers.denoiser_mixin import LabelDenoiserMixin
    cls = trainer_class(trainer)
    return isinstance(cls, type) and issubclass(cls, LabelDenoiserMixin) and cls.needs_denoiser_by_default()


def known_trainers() -> set:
    from nnunet_sud.trainers import __all__ as ours
    return set(ours) | {"nnUNetTrainer"}


def check_trainers(trainers: Iterable[str], option: str = "--trainers") -> None:
    known = known_trainers()
    for t in trainers:
        if t not in known:
            raise UserFacingError(f"{option}: unknown trainer {t}; available: {', '.join(sorted(known))}")


NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def require_nnunet_folders() -> Dict[str, str]:
    """The user's nnU-Net folders from the environment; UserFacingError naming those not set."""
    missing = [k for k in NNUNET_FOLDERS if not os.environ.get(k)]
    if missing:
        raise UserFacingError(f"{', '.join(missing)} not set: export the nnU-Net folders as for nnUNetv2_train")
    return {k: os.environ[k] for k in NNUNET_FOLDERS}


class Experiment:
    """A self-contained nnU-Net workspace below ``root`` and the commands run in it."""

    def __init__(self, root: str, device: str, n_proc_da: Optional[int] = None, own_folders: bool = True):
        """``own_folders=False``: run in the user's nnU-Net folders (``nnUNet_raw``/``_preprocessed``/
        ``_results`` of the environment, which must be set; ``nnUNet_extTrainer`` gets our folder
        appended); ``root`` then only holds the logs."""
        from nnunet_sud.paths import ext_trainer_value
        self.root = os.path.abspath(root)
        self.device = device
        self.logs = os.path.join(self.root, "logs")
        self.variants_dir = os.path.join(self.root, "trainers")
        self.t0 = time.time()
        folders = NNUNET_FOLDERS
        if own_folders:
            self.env = dict(os.environ, **{k: os.path.join(self.root, k) for k in folders},
                            nnUNet_extTrainer=ext_trainer_value(self.variants_dir))
            self.env.pop("nnUNet_denoiser", None)
        else:
            require_nnunet_folders()
            self.env = dict(os.environ, nnUNet_extTrainer=ext_trainer_value())
        if n_proc_da is not None:
            self.env["nnUNet_n_proc_DA"] = str(n_proc_da)
        self.env.setdefault("nnUNet_n_proc_DA", "2")
        self.env.setdefault("nnUNet_def_n_proc", "1")
        for k in folders:
            os.makedirs(self.env[k], exist_ok=True)
        if own_folders:
            os.makedirs(self.variants_dir, exist_ok=True)

    # ------------------------------------------------------------------ helpers
    def say(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:6.0f} s] {msg}", flush=True)

    def write_variants(self, filename: str, source: str) -> str:
        path = os.path.join(self.variants_dir, filename)
        with open(path, "w") as f:
            f.write(source)
        return path

    def run(self, name: str, args: Sequence, env: Optional[dict] = None) -> str:
        """Run a command with its output in ``logs/<name>.log``; fail with the log's tail."""
        os.makedirs(self.logs, exist_ok=True)
        log = os.path.join(self.logs, f"{name}.log")
        self.say(f"{name}: {' '.join(map(str, args))}")
        with open(log, "w") as f:
            p = subprocess.run([str(a) for a in args], stdout=f, stderr=subprocess.STDOUT,
                               env=self.env if env is None else env)
        if p.returncode != 0:
            with open(log) as f:
                tail = f.read()[-3000:]
            raise UserFacingError(f"step '{name}' failed (exit {p.returncode}); log: {log}\n{tail}")
        return log

    @staticmethod
    def sud(*args) -> list:
        """``nnunet-sud ARGS`` with this interpreter."""
        return [sys.executable, "-m", "nnunet_sud.cli", *map(str, args)]

    def raw_dir(self, dataset_name: str) -> str:
        return os.path.join(self.env["nnUNet_raw"], dataset_name)

    def preprocessed_dir(self, dataset_name: str) -> str:
        return os.path.join(self.env["nnUNet_preprocessed"], dataset_name)

    def fold_dir(self, dataset_name: str, trainer: str, configuration: str, fold, plans: str = "nnUNetPlans") -> str:
        return os.path.join(self.env["nnUNet_results"], dataset_name, f"{trainer}__{plans}__{configuration}",
                            f"fold_{fold}")

    # ------------------------------------------------------------------ steps
    def plan_and_preprocess(self, dataset_id: int, dataset_name: str, configurations: Sequence[str],
                            num_processes: int = 2, log_name: str = "plan_and_preprocess") -> None:
        if os.path.isfile(os.path.join(self.preprocessed_dir(dataset_name), "nnUNetPlans.json")) and all(
                os.path.isdir(os.path.join(self.preprocessed_dir(dataset_name), f"nnUNetPlans_{c}"))
                for c in configurations):
            return
        self.run(log_name, ["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", *configurations,
                            "-np", num_processes])

    def preprocess_unlabeled(self, dataset_id: int, configuration: str, num_processes: int = 2,
                             log_name: str = "preprocess_unlabeled") -> None:
        self.run(log_name, self.sud("preprocess-unlabeled", "-d", dataset_id, "-c", configuration,
                                    "-np", num_processes))

    def train(self, dataset_id: int, dataset_name: str, configuration: str, fold, trainer: str,
              log_name: Optional[str] = None, denoiser: Optional[str] = None, plans: str = "nnUNetPlans") -> float:
        """``nnUNetv2_train``; skipped when ``checkpoint_final.pth`` exists, resumed (``--c``) when a
        checkpoint of an interrupted run exists. Returns the seconds spent (0 when skipped)."""
        out = self.fold_dir(dataset_name, trainer, configuration, fold, plans)
        if os.path.isfile(os.path.join(out, "checkpoint_final.pth")):
            self.say(f"{trainer}: already trained ({out})")
            return 0.0
        env = dict(self.env)
        if denoiser is not None:
            env["nnUNet_denoiser"] = denoiser
        resume = ["--c"] if os.path.isfile(os.path.join(out, "checkpoint_latest.pth")) else []
        if resume:
            self.say(f"{trainer}: resuming the interrupted training from {out}/checkpoint_latest.pth")
        t0 = time.time()
        self.run(log_name or f"train_{dataset_name}_{trainer}",
                 ["nnUNetv2_train", dataset_id, configuration, fold, "-tr", trainer, "-device", self.device,
                  *(["-p", plans] if plans != "nnUNetPlans" else []), *resume], env=env)
        return time.time() - t0

    def predict(self, dataset_id: int, dataset_name: str, configuration: str, fold, trainer: str,
                images: str, out: str, tta: bool = False, log_name: Optional[str] = None,
                denoiser: Optional[str] = None, plans: str = "nnUNetPlans", extra: Sequence = ()) -> str:
        """``nnUNetv2_predict`` of the images in ``images`` (``extra``: further options, e.g.
        ``--save_probabilities``)."""
        env = dict(self.env)
        if denoiser is not None:
            env["nnUNet_denoiser"] = denoiser
        self.run(log_name or f"predict_{dataset_name}_{trainer}",
                 ["nnUNetv2_predict", "-i", images, "-o", out, "-d", dataset_id, "-c", configuration, "-f", fold,
                  "-tr", trainer, "-p", plans, "-device", self.device, "-npp", "1", "-nps", "1"]
                 + ([] if tta else ["--disable_tta"]) + list(extra), env=env)
        return out

    @staticmethod
    def evaluate(raw_dir: str, predictions: str, out_prefix: str) -> str:
        """Dice / HD95 of ``predictions`` against ``raw_dir/labelsTs``; returns the JSON path."""
        from batchgenerators.utilities.file_and_folder_operations import load_json
        from nnunet_sud.evaluation.evaluate import classes_from_dataset_json, evaluate_folders, write_evaluation
        dataset_json = load_json(os.path.join(raw_dir, "dataset.json"))
        classes, ignore = classes_from_dataset_json(dataset_json)
        result = evaluate_folders(predictions, os.path.join(raw_dir, "labelsTs"), classes,
                                  dataset_json["file_ending"], ignore_label=ignore)
        os.makedirs(os.path.dirname(out_prefix), exist_ok=True)
        return write_evaluation(result, out_prefix)["json"]
