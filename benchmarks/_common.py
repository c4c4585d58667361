"""Helpers shared by the benchmark scripts (``sud_speed.py``, ``mean_teacher_speed.py``,
``trainer_cost.py``); not a benchmark itself.

* ``setup_synthetic``: a generated task, planned and preprocessed (labeled and unlabeled), with
  ``nnUNet_raw``/``_preprocessed``/``_results`` pointed at a new temporary folder;
* ``scratch_results``: point ``nnUNet_results`` at a temporary folder, so that building trainers
  (``on_train_start`` writes logs, plans, SUD's soft-target store) never touches real model folders;
* ``plans_and_dataset_json`` / ``make_trainer`` / ``start_trainer``: trainers built from a
  preprocessed dataset's plans, the way ``nnUNetv2_train`` does, up to the first epoch;
* ``replay_batches``: a few batches drawn through a trainer's loaders, replayed with the workers stopped;
* ``random_denoiser`` / ``write_random_denoiser_checkpoint``: a label denoiser of the planned
  architecture with random weights (timing and memory do not depend on the weights);
* ``proc_status_mb`` / ``release_free_memory`` / ``PeakRSS``: resident memory of this process, free
  heap handed back to the system, the peak over a region;
* ``round_orders`` / ``time_train_steps``: interleaved rounds and timed ``train_step`` calls.

Everything that imports nnunetv2 does so inside the function: the ``nnUNet_*`` variables must
be set before ``nnunetv2.paths`` is first imported.
"""
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator, List, Optional, Sequence


# ---------------------------------------------------------------------- data sets and folders
def setup_synthetic(dataset_id: int = 989, shape: Sequence[int] = (32, 48, 48), n_labeled: int = 6,
                    n_unlabeled: int = 12, prefix: str = "sud_bench_", num_processes: int = 2,
                    unlabeled_labels: bool = True) -> str:
    """Generate, plan (3d_fullres) and preprocess a synthetic task in a new temporary folder.

    Sets ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` (this process and its
    children) to sub-folders of it and returns the folder (the caller removes it or not).
    ``unlabeled_labels=False`` drops the generated labelsUnlabeled (unlabeled cases without labels).
    """
    root = tempfile.mkdtemp(prefix=prefix)
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[k] = os.path.join(root, k)
        os.makedirs(os.environ[k])
    from nnunet_sud.dataset_conversion.synthetic import generate_dataset
    folder = generate_dataset(os.environ["nnUNet_raw"], dataset_id, "3d", n_labeled, n_unlabeled, 0, seed=0,
                              shape=tuple(shape))
    if not unlabeled_labels:
        import shutil
        shutil.rmtree(os.path.join(folder, "labelsUnlabeled"))
    subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", "3d_fullres", "-np",
                    str(num_processes)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "nnunet_sud.cli", "preprocess-unlabeled", "-d", str(dataset_id), "-c",
                    "3d_fullres", "-np", str(num_processes)], check=True, stdout=subprocess.DEVNULL)
    return root


def scratch_results(prefix: str = "sud_bench_results_") -> str:
    """Point ``nnUNet_results`` at a new temporary folder (before nnunetv2 is imported); returns it."""
    if "nnunetv2.paths" in sys.modules:
        raise RuntimeError("scratch_results() must run before nnunetv2.paths is imported")
    folder = tempfile.mkdtemp(prefix=prefix)
    os.environ["nnUNet_results"] = folder
    return folder


# ---------------------------------------------------------------------- trainers
def plans_and_dataset_json(dataset, plans_identifier: str = "nnUNetPlans"):
    """(dataset name, plans file, dataset.json dict) of a preprocessed dataset (id or name)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunet_sud.denoiser.data import resolve_dataset_name
    name = resolve_dataset_name(dataset)
    base = os.path.join(nnUNet_preprocessed, name)
    return name, os.path.join(base, plans_identifier + ".json"), load_json(os.path.join(base, "dataset.json"))


def make_trainer(cls, plans_file: str, dataset_json: dict, configuration: str, device, fold: int = 0):
    """``cls(plans, configuration, fold, dataset_json, device)`` with fresh plans (no ``--c``)."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    plans = load_json(plans_file)
    plans["continue_training"] = False
    return cls(plans, configuration, fold, dataset_json, torch.device(device))


def random_denoiser(trainer):
    """The planned label denoiser of ``trainer``'s configuration, random weights, frozen, on its device."""
    from nnunet_sud.denoiser.network import build_label_denoiser
    den = build_label_denoiser(trainer.plans_manager, trainer.configuration_manager,
                               trainer.label_manager.num_segmentation_heads).to(trainer.device)
    return den.eval().requires_grad_(False)


def start_trainer(trainer, denoiser=None, num_epochs: int = 1000, iterations_per_epoch: int = 250):
    """Set the schedule length (a :class:`nnunet_sud.budget.Budget`, as the ``_bench`` variants get it),
    give SUD-style trainers ``denoiser`` (when they need one), run ``on_train_start`` and
    ``on_train_epoch_start``: the trainer is ready for ``train_step``."""
    from nnunet_sud.budget import Budget
    Budget(num_epochs, iterations_per_epoch).apply(trainer)
    if denoiser is not None and getattr(trainer, "needs_denoiser", lambda: False)():
        trainer.denoiser = denoiser
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    return trainer


def write_random_denoiser_checkpoint(plans_file: str, dataset_json: dict, configuration: str, path: str) -> str:
    """An ``nnUNetTrainerLabelDenoiser`` checkpoint holding randomly initialised weights of the planned
    denoiser, narrowed as the denoiser trainer narrows it by default (``narrow_architecture``; the
    checkpoint's plans say so); with ``nnUNet_denoiser`` pointing at it, every denoiser user loads it
    the ordinary way, post-denoise too (it rebuilds the denoiser from the segmenter's plans)."""
    import copy

    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_sud.denoiser.trainer import nnUNetTrainerLabelDenoiser, narrow_architecture
    plans = load_json(plans_file)
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)  # inheritance resolved, as the trainer sees it
    arch = narrow_architecture(cm.configuration["architecture"])
    plans["configurations"][configuration]["architecture"] = copy.deepcopy(arch)  # as the trainer writes it
    n = pm.get_label_manager(dataset_json).num_segmentation_heads
    net = nnUNetTrainerLabelDenoiser.build_network_architecture(pm, cm, n, n, False)
    torch.save({"network_weights": net.state_dict(), "trainer_name": nnUNetTrainerLabelDenoiser.__name__,
                "init_args": {"plans": plans, "configuration": configuration, "fold": 0,
                              "dataset_json": dataset_json}}, path)
    return path


def finish_loaders(trainer):
    """Stop the augmentation workers of a trainer's loaders (labeled, validation, unlabeled)."""
    for attr in ("dataloader_train", "dataloader_val", "dataloader_unlabeled"):
        dl = getattr(trainer, attr, None)
        if dl is not None and hasattr(dl, "_finish"):
            dl._finish()


def replay_batches(trainer, k: int):
    """Draw ``k`` labeled batches (and ``k`` unlabeled ones where the trainer has that stream) through
    the trainer's own loaders, stop the loaders' workers, and make ``train_step`` replay the unlabeled
    batches. Returns an endless iterator over the labeled batches (for ``time_train_steps``)."""
    import itertools
    labeled = [next(trainer.dataloader_train) for _ in range(k)]
    stream = getattr(trainer, "dataloader_unlabeled", None)
    unlabeled = [next(stream) for _ in range(k)] if stream is not None else None
    finish_loaders(trainer)
    if unlabeled is not None:
        trainer.dataloader_unlabeled = itertools.cycle(unlabeled)
    return itertools.cycle(labeled)


# ---------------------------------------------------------------------- memory
def proc_status_mb(field: str = "VmRSS") -> float:
    """A ``kB`` field of ``/proc/self/status`` (VmRSS, VmHWM, RssAnon, ...) in MiB; NaN if absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def release_free_memory() -> bool:
    """Collect garbage and hand free heap memory back to the system (glibc ``malloc_trim``), so that
    RSS reads as live memory; False where there is no glibc (RSS then includes cached free memory)."""
    import ctypes
    import ctypes.util
    import gc
    gc.collect()
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


def reset_rss_high_water_mark() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak resident memory of this process inside a ``with`` block.

    ``base_mb``: VmRSS on entry; ``peak_mb``: the highest RSS inside; ``increase_mb`` = peak - base.
    The peak is the kernel's high-water mark VmHWM, reset on entry through ``/proc/self/clear_refs``
    (exact, however short the peak); where that reset is refused, a thread samples VmRSS every
    ``interval_s`` (peaks shorter than that may be missed). ``method`` says which was used;
    ``sample=True`` forces sampling.
    """

    def __init__(self, interval_s: float = 0.002, sample: bool = False):
        self.interval_s = interval_s
        self.force_sampling = sample
        self.base_mb = self.peak_mb = float("nan")
        self.method = None
        self._stop = threading.Event()
        self._thread = None
        self._sampled = 0.0

    def _poll(self):
        while not self._stop.is_set():
            self._sampled = max(self._sampled, proc_status_mb("VmRSS"))
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self.base_mb = proc_status_mb("VmRSS")
        if not self.force_sampling and reset_rss_high_water_mark():
            self.method = "kernel high-water mark VmHWM, reset via /proc/self/clear_refs"
        else:
            self.method = f"VmRSS sampled every {self.interval_s * 1000:.0f} ms"
            self._sampled = self.base_mb
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._sampled, proc_status_mb("VmRSS"))
        else:
            self.peak_mb = proc_status_mb("VmHWM")
        return False

    @property
    def increase_mb(self) -> float:
        return self.peak_mb - self.base_mb


# ---------------------------------------------------------------------- timing
def round_orders(names: Sequence[str], rounds: int, mode: str = "rotate") -> Iterator[List[str]]:
    """The order of the trainers in each interleaved round: ``rotate`` starts round r at name r
    (mod n); ``alternate`` runs the names forwards in even rounds and backwards in odd ones."""
    names = list(names)
    for r in range(rounds):
        if mode == "rotate":
            k = r % len(names)
            yield names[k:] + names[:k]
        elif mode == "alternate":
            yield names if r % 2 == 0 else names[::-1]
        else:
            raise ValueError(f"mode must be 'rotate' or 'alternate', got {mode!r}")


def synchronize(device) -> None:
    if str(device).startswith("cuda"):
        import torch
        torch.cuda.synchronize()


class StepTimes:
    """What ``time_train_steps`` measured: wall and process CPU seconds per step, and on CUDA the
    allocated memory before the steps and its peak during them (bytes; None elsewhere)."""

    def __init__(self):
        self.seconds: List[float] = []
        self.cpu_seconds: List[float] = []
        self.cuda_before: Optional[int] = None
        self.cuda_peak: Optional[int] = None


def time_train_steps(trainer, k: int, device, batches: Optional[Iterator] = None) -> StepTimes:
    """Run ``k`` ``trainer.train_step`` calls; each is timed on its own.

    The labeled batch is fetched (from ``batches`` or ``trainer.dataloader_train``) before the timer
    starts; what ``train_step`` fetches itself (the unlabeled batch of the semi-supervised
    trainers) is inside. On CUDA the device is synchronised around each step and the peak
    memory of the steps recorded.
    """
    out = StepTimes()
    cuda = str(device).startswith("cuda")
    if cuda:
        import torch
        torch.cuda.synchronize()
        out.cuda_before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    source = batches if batches is not None else trainer.dataloader_train
    for _ in range(k):
        batch = next(source)
        synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step(batch)
        synchronize(device)
        out.seconds.append(time.perf_counter() - t0)
        out.cpu_seconds.append(time.process_time() - c0)
    if cuda:
        out.cuda_peak = torch.cuda.max_memory_allocated()
    return out
