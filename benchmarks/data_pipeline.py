"""Cost of the data pipeline of every nnunet_sud trainer against nnUNetTrainer's, side by side.

Two questions ("the unlabeled stream must not starve a GPU"), with their goals:

1. **One augmentation worker.** Batches per second of ``loader.generate_train_batch()`` (loading,
   cropping, the trainer's real training transforms), measured in this process -- exactly what one
   augmentation worker does per batch -- for:
     * ``labeled``: nnU-Net's labeled stream (``nnUNetTrainer.get_dataloaders``);
     * ``unlabeled``: our unlabeled stream as every trainer gets it (case coordinates computed
       exactly from the SpatialTransform's sampling positions, ``nnunet_sud.unlabeled.coordinates``);
     * ``unlabeled, valid only``: the same with only the inside-the-case channel
       (``UnlabeledDataLoader.carry_coordinates = False``: no ``coords``, the same ``valid``);
     * ``unlabeled, interpolated coordinates`` and ``unlabeled, valid only, interpolated``: the
       same two with the channels interpolated through the augmentation instead
       (``UnlabeledDataLoader.exact_coordinates = False``: the path a pipeline the exact step
       does not know takes; the same batches);
     * ``unlabeled, no extra channels``: no ``regression_target`` at all (not a usable stream:
       ``valid`` is all True; the floor of what the unlabeled stream can cost);
     * ``unlabeled, <Trainer>``: one row per measured trainer whose unlabeled stream differs from
       the base's (its ``get_unlabeled_transforms`` or its loader's ``carry_coordinates``), so a
       strong view built in the workers (a transform returned by ``get_unlabeled_transforms``) is
       measured here once a trainer has one;
     * ``+ <Trainer>.views (main process)``: a trainer's ``views(batch_u)`` where it builds views of
       the unlabeled batch in the main process (SegMatch's strong view today), timed on a delivered
       unlabeled batch and added to the unlabeled batch's cost.
   The streams are timed in ``--rounds`` interleaved rounds (``--batches`` batches of each per round,
   order rotated per round) so that machine noise hits all alike, on the CPU clock of the thread
   (``time.thread_time``: a worker is one thread, so this is its time on an idle core, whatever
   else runs on the machine); printed: the median CPU seconds per batch, batches/s of one worker
   and the ratio to the labeled batch. Goal: an unlabeled batch costs at most
   ``1.15``x a labeled one.

2. **Main-process work per step outside the network**, for every trainer: ``train_step`` on
   replayed batches (the loaders' work is item 1), with timers around the pieces a trainer runs in
   the main process besides the networks' forward/backward: SUD's soft-target store
   (``store.read`` / ``store.update``), views of the unlabeled batch (``views``), everything after
   the optimizer step (``after_optimizer_step``: teacher EMA, discriminator step, ...), target-quality
   bookkeeping (``record_target_quality``) and moving the unlabeled batch to the device. ``outside``
   is their sum; printed with ``train_step`` itself, as a ratio to a labeled batch (item 1) and as a
   share of nnUNetTrainer's step. Goal: at most 5 % of an nnUNetTrainer step *on a GPU*. Where no GPU
   is used the share is estimated: the CPU seconds of ``outside`` scaled to the voxels of a reference
   GPU batch (``--gpu-batch-voxels``, default 2 x 128^3: nnU-Net's usual 3d_fullres batch) divided by
   that batch's nnUNetTrainer step time on a GPU (``--gpu-step-s``, default 0.1 s: an assumption for
   a recent data-centre GPU; pass your own). This over-estimates: the pieces' torch work (EMA,
   strong-view ops, the store's resampling) runs on the GPU there, and per-sample fixed costs do not
   grow with the patch; only the store's file I/O and Python loops stay on the CPU. With ``--device
   cuda`` the steps run on the GPU, the timers synchronise, and the share is measured directly.

3. **SUD's store at GPU scale**: its calls in SUD's order (``prefetch`` before the unlabeled
   forward pass, ``read`` after it, ``update``) on a batch of ``--store-batch`` patches of
   ``--store-patch`` voxels (default 2 x 128^3, 4 classes), plain crops and rotated patches,
   synchronous, with the store's write-behind (updates and prefetched reads in a background thread,
   ``SoftTargetStore(write_behind=True)``, what SUD uses) and, for crops, write-behind through the
   per-voxel path the store used for crops before (side by side: the whole-block path's gain).
   ``--gpu-step-s`` of sleep per step stands in for the GPU work the main process waits for, a third
   of it between prefetch and read (the forward pass). Tensors live on ``--device`` (cpu by
   default: the store's arithmetic then runs on the CPU, which a GPU training does not do).
   Printed: main-process seconds per step in the store calls and their share of the GPU step.

Trainers: by default one per method -- every class of ``nnunet_sud.trainers`` that is not a
variant of another concrete trainer (variants change settings, not the pipeline); ``--trainers``
takes names or fnmatch patterns (``'*'``: all). Abstract bases are skipped (their ``train_step``
raises ``NotImplementedError``). Trainers that need a label denoiser get the planned architecture
with random weights (``_common.write_random_denoiser_checkpoint``).

Data: a generated synthetic 3d task (``_common.setup_synthetic``; its unlabeled cases without
labels, the usual case: labels of unlabeled cases add a resampled segmentation channel), and with
``--acdc PATH`` also ACDC_lite in 2d (converted with 3 labeled patients as docs/conversion.md,
planned and preprocessed in the same scratch folder). ``-d DATASET -c CONFIGURATION`` measures an
already preprocessed dataset instead. Augmentation runs in this process (``nnUNet_n_proc_DA=0``),
torch on ``--threads`` threads (default 1).

Usage:

    python benchmarks/data_pipeline.py                              # synthetic 3d, a few minutes
    python benchmarks/data_pipeline.py --acdc ../shared/data/ACDC_lite
    python benchmarks/data_pipeline.py -d 991 -c 3d_fullres --trainers nnUNetTrainerSUD
    python benchmarks/data_pipeline.py --gpu-step-s 0.25 --gpu-batch-voxels 4194304
    python benchmarks/data_pipeline.py --only store          # item 3 alone (no data set needed)

Helpers: ``_common.py``, ``trainer_cost.py`` (trainer selection and building).
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import trainer_cost  # noqa: E402

REFERENCE = trainer_cost.REFERENCE
WORKER_GOAL = 1.15     # unlabeled batch / labeled batch, one worker
MAIN_GOAL = 0.05       # main-process work outside the network / nnUNetTrainer GPU step
ACDC_ID = 479


# ---------------------------------------------------------------------- data sets
def setup_acdc(folder: str, num_processes: int = 2) -> int:
    """ACDC_lite -> nnU-Net raw (3 labeled patients, the rest unlabeled, val.list as test), planned and
    preprocessed in 2d with its unlabeled images, under the current ``nnUNet_raw``/``_preprocessed``."""
    cli = [sys.executable, "-m", "nnunet_sud.cli"]
    quiet = {"check": True, "stdout": subprocess.DEVNULL}
    subprocess.run(cli + ["convert", "folder", folder, "-d", str(ACDC_ID), "--labeled", "3",
                          "--group-regex", r"^(patient\d+)_", "--test-list", "val.list",
                          "--channel-names", "cineMRI", "--label-names", "background", "RV", "MYO", "LV"], **quiet)
    subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", str(ACDC_ID), "-c", "2d", "-np", str(num_processes)],
                   **quiet)
    subprocess.run(cli + ["preprocess-unlabeled", "-d", str(ACDC_ID), "-c", "2d", "-np", str(num_processes)], **quiet)
    return ACDC_ID


def default_trainers():
    """One trainer per method: classes of nnunet_sud.trainers whose direct bases are no concrete trainer
    of nnunet_sud (the abstract bases nnUNetTrainerSemiSupervised / nnUNetTrainerMeanTeacherBase aside)."""
    import nnunet_sud.trainers as tr
    abstract = {"nnUNetTrainerSemiSupervised", "nnUNetTrainerMeanTeacherBase"}
    ours = set(tr.__all__)
    return [n for n in tr.__all__
            if not any(b.__name__ in ours and b.__name__ not in abstract for b in getattr(tr, n).__bases__)]


# ---------------------------------------------------------------------- item 1: one worker
def plain_loader(loader):
    """The batch generator behind an augmenter built with ``nnUNet_n_proc_DA=0``."""
    return getattr(loader, "data_loader", loader)


def single_threaded_loaders(trainer):
    """(labeled loader, unlabeled loader or None) of ``trainer``, built by its own ``get_dataloaders``
    with ``nnUNet_n_proc_DA=0`` (no workers), as nnUNetv2_train builds them."""
    trainer.initialize()  # sets the batch size
    tr, val = trainer.get_dataloaders()
    unl = getattr(trainer, "dataloader_unlabeled", None)
    return plain_loader(tr), (plain_loader(unl) if unl is not None else None)


def stream_signature(cls):
    """What decides a trainer's unlabeled stream: its transforms, its loader, its coordinate channels."""
    return (cls.get_unlabeled_transforms, cls.get_unlabeled_dataloader, getattr(cls, "unlabeled_coordinates", True))


def stream_variant(loader, coordinates: str, exact: bool = True):
    """A copy of an unlabeled loader carrying ``coordinates``: 'all' (5 channels), 'valid' (the
    inside-the-case channel) or 'none' (no regression_target; valid all True); computed exactly
    or (``exact`` False) interpolated through the augmentation."""
    import copy
    import torch
    v = copy.copy(loader)
    v.exact_coordinates = exact and coordinates != "none"
    if coordinates == "valid":
        v.carry_coordinates = False
    elif coordinates == "none":
        v.coordinate_channels = lambda *a: None
        v.split_channels = lambda regr, data: (None, torch.ones((data.shape[0], *data.shape[2:]), dtype=torch.bool))
    return v


def time_streams(streams: dict, rounds: int, batches: int, clock=time.thread_time) -> dict:
    """{name: list of seconds per batch} of ``streams`` {name: callable making one batch}, interleaved.
    ``clock``: CPU seconds of this thread by default -- a worker makes its batch in one thread
    (nnU-Net limits its thread pools to 1), so this is its wall time on an idle core, and other jobs
    on a shared machine do not inflate it."""
    times = {n: [] for n in streams}
    for order in _common.round_orders(list(streams), rounds, "rotate"):
        for n in order:
            for _ in range(batches):
                t0 = clock()
                streams[n]()
                times[n].append(clock() - t0)
    return times


def worker_streams(plans_file, dataset_json, configuration, trainer_names) -> dict:
    """{row name: callable making one batch} for item 1 (see the module doc)."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_sud.trainers.semi_supervised import nnUNetTrainerSemiSupervised

    def make(cls):
        return _common.make_trainer(cls, plans_file, dataset_json, configuration, "cpu")

    with trainer_cost.Quiet():
        labeled, _ = single_threaded_loaders(make(nnUNetTrainer))
        _, unlabeled = single_threaded_loaders(make(nnUNetTrainerSemiSupervised))
    streams = {"labeled (nnUNetTrainer)": labeled.generate_train_batch,
               "unlabeled": unlabeled.generate_train_batch,
               "unlabeled, valid only": stream_variant(unlabeled, "valid").generate_train_batch,
               "unlabeled, interpolated coordinates": stream_variant(unlabeled, "all", False).generate_train_batch,
               "unlabeled, valid only, interpolated": stream_variant(unlabeled, "valid", False).generate_train_batch,
               "unlabeled, no extra channels": stream_variant(unlabeled, "none").generate_train_batch}
    loaders = {stream_signature(nnUNetTrainerSemiSupervised): unlabeled}
    for name in trainer_names:
        cls = trainer_cost.trainer_class(name)
        if not issubclass(cls, nnUNetTrainerSemiSupervised) or cls is nnUNetTrainerSemiSupervised:
            continue
        try:
            with trainer_cost.Quiet():
                t = make(cls)
                sig = stream_signature(cls)
                if sig not in loaders:
                    loaders[sig] = single_threaded_loaders(t)[1]
                    streams[f"unlabeled, {name}"] = loaders[sig].generate_train_batch
                    t = make(cls)
        except Exception as e:  # a trainer that cannot be built here is reported by item 2
            print(f"  item 1: {name} not measured ({trainer_cost.first_line(e)})", flush=True)
            continue
        if callable(getattr(t, "views", None)):
            def views(t=t, b=loaders[sig].generate_train_batch()):
                with torch.no_grad():
                    t.views(b)
            streams[f"+ {name}.views (main process)"] = views
    return streams


# ---------------------------------------------------------------------- item 2: main process
#: attribute paths timed inside train_step: (column, object attribute, method)
COMPONENTS = (("store", "store", "read"), ("store", "store", "update"), ("views", None, "views"),
              ("after step", None, "after_optimizer_step"), ("target quality", None, "record_target_quality"),
              ("to device", None, "_unlabeled_batch_to_device"))
COLUMNS = ("store", "views", "after step", "target quality", "to device")


class ComponentTimer:
    """Wraps the pieces of ``COMPONENTS`` a trainer has (instance attributes; the class is untouched)
    with timers; nested pieces count once, in the outermost."""

    def __init__(self, trainer, device):
        self.seconds = {c: 0.0 for c in COLUMNS}
        self.device = device
        self._depth = 0
        for column, owner_attr, method in COMPONENTS:
            owner = trainer if owner_attr is None else getattr(trainer, owner_attr, None)
            fn = getattr(owner, method, None) if owner is not None else None
            if callable(fn):
                setattr(owner, method, self._wrap(column, fn))

    def _wrap(self, column, fn):
        def timed(*a, **k):
            if self._depth:
                return fn(*a, **k)
            self._depth += 1
            _common.synchronize(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                _common.synchronize(self.device)
                self.seconds[column] += time.perf_counter() - t0
                self._depth -= 1
        return timed

    def take(self) -> dict:
        out, self.seconds = self.seconds, {c: 0.0 for c in COLUMNS}
        return out


def main_process_costs(plans_file, dataset_json, configuration, names, device, rounds, steps, batches,
                       verbose=False):
    """{trainer: {'step': [s], column: [s per step]}}, skipped {name: why}, failed {name: why}."""
    trainers, timers, replay, skipped, failed = {}, {}, {}, {}, {}
    for n in names:
        t = None
        try:
            with trainer_cost.Quiet(verbose):
                t = trainer_cost.build(n, plans_file, dataset_json, configuration, device)
                replay[n] = _common.replay_batches(t, batches)
                _common.time_train_steps(t, 1, device, replay[n])  # warm-up
        except NotImplementedError as e:
            skipped[n] = f"abstract base ({trainer_cost.first_line(e)})"
        except Exception as e:
            failed[n] = trainer_cost.first_line(e)
            if verbose:
                traceback.print_exc()
        if n in skipped or n in failed:
            if t is not None:
                _common.finish_loaders(t)
            continue
        trainers[n], timers[n] = t, ComponentTimer(t, device)
        print(f"  built {len(trainers)}/{len(names)} {n}", flush=True)
    out = {n: {"step": [], **{c: [] for c in COLUMNS}} for n in trainers}
    for order in _common.round_orders(list(trainers), rounds if trainers else 0, "rotate"):
        for n in order:
            for _ in range(steps):
                st = _common.time_train_steps(trainers[n], 1, device, replay[n])
                parts = timers[n].take()
                out[n]["step"] += st.seconds
                for c in COLUMNS:
                    out[n][c].append(parts[c])
    return out, skipped, failed


# ---------------------------------------------------------------------- item 2 at GPU scale: the store
#: share of the GPU step spent in the unlabeled batch's forward pass, between SUD's prefetch and read
FORWARD_SHARE = 1 / 3


def store_at_gpu_scale(patch, batch: int, classes: int, steps: int, gpu_step_s: float, warped: bool,
                       device: str = "cpu") -> dict:
    """Main-process seconds per step of SUD's store calls in SUD's order (``nnUNetTrainerSUD``):
    ``prefetch`` before the unlabeled forward pass, ``read`` after it, ``update``; the GPU work the
    main process waits for is emulated by sleeping ``FORWARD_SHARE`` of ``gpu_step_s`` between prefetch
    and read and the rest after the update (queued updates and prefetched reads run then). A batch of
    ``batch`` patches of ``patch`` voxels from cases 1.25x the patch per axis; coords, valid and values
    on ``device`` (the trainer moves the unlabeled batch there). ``warped``: patches rotated by 10
    degrees about z (the inverse-affine path), else plain crops. Modes: synchronous (no background
    thread: prefetch does nothing), write-behind (what SUD uses) and, for crops, write-behind with the
    per-voxel path instead of the whole-block one (``SoftTargetStore.fast_crops = False``, the store's
    former crop path). Returns {mode: (median seconds per step in the calls, seconds per step
    copying blocks out of and into the case files, in any thread: ``SoftTargetStore.file_seconds``,
    the part that stays on the CPU when the arithmetic runs on a GPU)}; the first ``batch`` steps
    (new case files) are left out."""
    import math
    import tempfile
    import numpy as np
    import torch
    from nnunet_sud.targets.store import SoftTargetStore
    case = [int(p * 1.25) for p in patch]
    grids = torch.stack(torch.meshgrid(*[torch.arange(p, dtype=torch.float32) for p in patch], indexing="ij"))
    if warped:
        a = math.radians(10)
        c = torch.tensor([(p - 1) / 2 for p in patch]).view(3, 1, 1, 1)
        g = grids - c
        grids = torch.stack([g[0], math.cos(a) * g[1] - math.sin(a) * g[2], math.sin(a) * g[1] + math.cos(a) * g[2]]) + c
    rng = np.random.default_rng(0)
    modes = [("synchronous", False, True), ("write-behind", True, True)]
    if not warped:
        modes.append(("write-behind, per-voxel path", True, False))
    out = {}
    for mode, behind, fast in modes:
        with tempfile.TemporaryDirectory(prefix="data_pipeline_store_") as d:
            store = SoftTargetStore(d, classes, write_behind=behind)
            store.fast_crops = fast
            times = []
            for step in range(steps + batch):
                if step == batch:
                    store.wait()
                    store.file_seconds = 0.0
                keys = [f"case{(step + i) % batch}" for i in range(batch)]
                off = [torch.tensor([rng.integers(0, cs - p + 1) for cs, p in zip(case, patch)],
                                    dtype=torch.float32).view(3, 1, 1, 1) for _ in keys]
                coords = torch.stack([grids + o for o in off])
                valid = ((coords >= 0) & (coords <= torch.tensor(case).view(1, 3, 1, 1, 1) - 1)).all(1)
                shapes = torch.tensor([case] * batch)
                values = torch.softmax(torch.randn((batch, classes, *patch)), 1)
                coords, valid, values = coords.to(device), valid.to(device), values.to(device)
                _common.synchronize(device)
                t0 = time.perf_counter()
                store.prefetch(keys, coords, valid, shapes)
                spent = time.perf_counter() - t0
                time.sleep(gpu_step_s * FORWARD_SHARE)
                t0 = time.perf_counter()
                z = store.read(keys, coords, valid, shapes)
                store.update(keys, coords, valid, shapes, values, 0.5)
                _common.synchronize(device)
                times.append(spent + time.perf_counter() - t0)
                del z
                time.sleep(gpu_step_s * (1 - FORWARD_SHARE))
            store.close()
            out[mode] = (median(times[batch:]), store.file_seconds / steps)
    return out


def report_store(args):
    patch, batch = tuple(args.store_patch), args.store_batch
    voxels = batch * patch[0] * patch[1] * patch[2]
    device = args.device or "cpu"
    print(f"\n#### SUD's soft-target store at GPU scale: batch {batch} x {list(patch)}, {args.store_classes} classes, "
          f"cases 1.25x the patch, {args.store_steps} steps after {batch} that create the case files; "
          f"{args.gpu_step_s} s of GPU work emulated per step (--gpu-step-s), {FORWARD_SHARE:.2f} of it between "
          f"prefetch and read; tensors on {device}\n")
    print("| patches | mode | main-process s/step (prefetch + read + update) | % of GPU step | goal <= 5 % "
          "| file copies s/step (any thread) | % of GPU step |")
    print("|---|---|---|---|---|---|---|")
    for warped in (False, True):
        res = store_at_gpu_scale(patch, batch, args.store_classes, args.store_steps, args.gpu_step_s, warped, device)
        for mode, (sec, files) in res.items():
            scale = (args.gpu_batch_voxels / voxels) / args.gpu_step_s
            print(f"| {'rotated 10 deg' if warped else 'crops'} | {mode} | {sec:.4f} | {100 * sec * scale:.1f} | "
                  f"{'yes' if sec * scale <= MAIN_GOAL else 'NO'} | {files:.4f} | {100 * files * scale:.1f} |")
    if not device.startswith("cuda"):
        print("\nTensors on the CPU: the store's arithmetic (crop detection, blending, the inverse warp) runs on "
              "the CPU here and on the GPU in a GPU training, so the main-process seconds over-state a GPU's; "
              "`--device cuda` measures them. The file copies stay on the CPU either way: with write-behind "
              "they run in the background thread, off the main process, while they fit in a step.")


# ---------------------------------------------------------------------- report
def median(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt(x, digits=4):
    return f"{x:.{digits}f}" if x == x else "-"


def report_workers(times: dict, header: str) -> dict:
    med = {n: median(v) for n, v in times.items()}
    ref = med["labeled (nnUNetTrainer)"]
    base = med["unlabeled"]
    print(f"\n#### One augmentation worker: {header}\n")
    print("| stream | s/batch | batches/s | ratio to labeled | goal <= 1.15 |")
    print("|---|---|---|---|---|")
    for n, s in med.items():
        total = s + base if n.startswith("+ ") else s
        name = f"unlabeled {n}" if n.startswith("+ ") else n
        ratio = total / ref
        goal = "-" if n.startswith("labeled") or "no extra" in n else ("yes" if ratio <= WORKER_GOAL else "NO")
        print(f"| {name} | {fmt(total)} | {fmt(1 / total, 1)} | {ratio:.2f} | {goal} |")
    return med


def report_main(costs: dict, labeled_batch_s: float, batch_voxels: int, args, cuda: bool, header: str):
    ref_step = median(costs[REFERENCE]["step"]) if REFERENCE in costs else float("nan")
    scale = args.gpu_batch_voxels / batch_voxels
    print(f"\n#### Main process per step outside the network: {header}\n")
    cols = ["trainer", "train_step s", *[f"{c} s" for c in COLUMNS], "outside s", "ratio to labeled batch",
            "% of nnUNetTrainer step", "% of GPU step" + ("" if cuda else " (est.)"), "goal <= 5 %"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for n, c in costs.items():
        parts = {k: median(c[k]) for k in COLUMNS}
        outside = median([sum(c[k][i] for k in COLUMNS) for i in range(len(c["step"]))])
        gpu = outside / ref_step if cuda else outside * scale / args.gpu_step_s
        row = [n, fmt(median(c["step"]), 3), *[fmt(parts[k]) for k in COLUMNS], fmt(outside),
               f"{outside / labeled_batch_s:.2f}", f"{100 * outside / ref_step:.1f}", f"{100 * gpu:.1f}",
               "yes" if gpu <= MAIN_GOAL else "NO"]
        print("| " + " | ".join(row) + " |")


def run_dataset(args, dataset, configuration, label: str) -> int:
    import numpy as np
    import torch
    device = args.device or "cpu"
    cuda = device.startswith("cuda")
    name, plans_file, dataset_json = _common.plans_and_dataset_json(dataset, args.plans)
    names = trainer_cost.trainer_names(args.trainers) if args.trainers else [REFERENCE] + default_trainers()
    t0 = time.perf_counter()
    times, costs, skipped, failed = None, {}, {}, {}
    if args.only != "main":
        print(f"{label}: {name} {configuration}: item 1 (one worker) ...", flush=True)
        streams = worker_streams(plans_file, dataset_json, configuration, names[1:])
        times = time_streams(streams, args.rounds, args.batches)
    t1 = time.perf_counter()
    if args.only != "workers":
        print(f"{label}: item 2 (main process), {len(names)} trainers ...", flush=True)
        costs, skipped, failed = main_process_costs(plans_file, dataset_json, configuration, names, device,
                                                    args.rounds, args.steps, args.batches, args.verbose)
    t2 = time.perf_counter()
    from batchgenerators.utilities.file_and_folder_operations import load_json
    cm = load_json(plans_file)["configurations"][configuration]
    batch_voxels = int(cm["batch_size"]) * int(np.prod(cm["patch_size"]))
    header = (f"{label}, {name} {configuration}, patch {cm['patch_size']}, batch {cm['batch_size']}, torch "
              f"threads {torch.get_num_threads()}, device {device}")
    print(f"\n{header}; {args.rounds} interleaved rounds: item 1 {args.batches} batch(es) per stream and round "
          f"({t1 - t0:.0f} s), item 2 {args.steps} step(s) per trainer and round on {args.batches} replayed "
          f"batches ({t2 - t1:.0f} s); medians")
    if times is not None:
        labeled_batch_s = report_workers(times, header)["labeled (nnUNetTrainer)"]
    else:  # item 2 alone: a labeled batch timed here for the ratio
        with trainer_cost.Quiet():
            from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
            labeled = single_threaded_loaders(
                _common.make_trainer(nnUNetTrainer, plans_file, dataset_json, configuration, "cpu"))[0]
        labeled_batch_s = median(time_streams({"l": labeled.generate_train_batch}, args.rounds, args.batches)["l"])
    if args.only == "workers":
        return 0
    if REFERENCE not in costs:
        print(f"{REFERENCE} could not be measured: {failed.get(REFERENCE)}")
        return 1
    if not cuda:
        print(f"\nGPU estimate: outside seconds x {args.gpu_batch_voxels} / {batch_voxels} voxels per batch / "
              f"{args.gpu_step_s} s nnUNetTrainer GPU step (--gpu-batch-voxels, --gpu-step-s)")
    report_main(costs, labeled_batch_s, batch_voxels, args, cuda, header)
    for n, why in skipped.items():
        print(f"skipped {n}: {why}")
    for n, why in failed.items():
        print(f"FAILED {n}: {why}")
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("-d", "--dataset", default=None, help="an already preprocessed dataset (id or name) instead")
    ap.add_argument("-c", "--configuration", default="3d_fullres", help="with -d (default 3d_fullres)")
    ap.add_argument("-p", "--plans", default="nnUNetPlans")
    ap.add_argument("--acdc", default=None, metavar="PATH", help="also ACDC_lite (images/, labels/, *.list) in 2d")
    ap.add_argument("--synthetic-shape", type=int, nargs=3, default=(32, 48, 48), metavar=("Z", "Y", "X"),
                    help="image shape of the synthetic cases (default 32 48 48)")
    ap.add_argument("--trainers", nargs="+", default=None, metavar="NAME",
                    help="names or fnmatch patterns (default: one trainer per method); nnUNetTrainer is always in")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--batches", type=int, default=4, help="item 1: batches per stream and round; item 2: "
                                                           "batches replayed (default 4)")
    ap.add_argument("--steps", type=int, default=1, help="item 2: steps per trainer and round (default 1)")
    ap.add_argument("--gpu-step-s", type=float, default=0.1,
                    help="seconds of an nnUNetTrainer step on the GPU for --gpu-batch-voxels (default 0.1)")
    ap.add_argument("--gpu-batch-voxels", type=int, default=2 * 128 ** 3,
                    help="voxels of that GPU step's batch (default 2 x 128^3)")
    ap.add_argument("--only", choices=("workers", "main", "store"), default=None,
                    help="measure only item 1 (workers), item 2 (main process) or the store at GPU scale")
    ap.add_argument("--store-patch", type=int, nargs=3, default=(128, 128, 128), metavar=("Z", "Y", "X"),
                    help="patch of the store measurement at GPU scale (default 128 128 128)")
    ap.add_argument("--store-batch", type=int, default=2, help="its batch (default 2)")
    ap.add_argument("--store-classes", type=int, default=4, help="its classes (default 4)")
    ap.add_argument("--store-steps", type=int, default=4, help="its timed steps per mode (default 4)")
    ap.add_argument("--device", default=None, help="item 2's device: cpu (default) or cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    os.environ.setdefault("nnUNet_compile", "false")
    t0 = time.perf_counter()
    if args.only == "store":
        import torch
        torch.set_num_threads(args.threads)
        report_store(args)
        return 0
    if args.dataset is None:
        print("generating, planning and preprocessing the synthetic dataset ...", flush=True)
        # 6 labeled cases: the trainers are built for fold 0, and nnU-Net's 5-fold split needs at least 5
        scratch = _common.setup_synthetic(shape=args.synthetic_shape, prefix="data_pipeline_", n_labeled=6,
                                          n_unlabeled=8, unlabeled_labels=False)
        runs = [(989, "3d_fullres", "synthetic 3d")]
        if args.acdc:
            print("converting, planning and preprocessing ACDC_lite (2d) ...", flush=True)
            runs.append((setup_acdc(os.path.abspath(args.acdc)), "2d", "ACDC_lite 2d"))
    else:
        scratch = _common.scratch_results(prefix="data_pipeline_results_")
        runs = [(args.dataset, args.configuration, f"dataset {args.dataset}")]
    # every loader in this process: item 1 times the loaders themselves (set after the data sets are
    # planned: nnU-Net's planner sets torch's threads to get_allowed_n_proc_DA(), which must not be 0)
    os.environ["nnUNet_n_proc_DA"] = "0"
    import torch
    torch.set_num_threads(args.threads)
    try:
        den = os.path.join(scratch, "random_label_denoiser.pth")
        status = 0
        for dataset, configuration, label in runs:
            _, plans_file, dataset_json = _common.plans_and_dataset_json(dataset, args.plans)
            _common.write_random_denoiser_checkpoint(plans_file, dataset_json, configuration, den)
            os.environ["nnUNet_denoiser"] = den
            status |= run_dataset(args, dataset, configuration, label)
        if args.only is None:
            report_store(args)
        print(f"\nwall time {time.perf_counter() - t0:.0f} s")
        return status
    finally:
        if args.keep:
            print(f"kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
