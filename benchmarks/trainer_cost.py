"""Iteration time and peak memory of every nnunet_sud trainer relative to nnUNetTrainer, side by side.

Which trainers: every class in ``nnunet_sud.trainers.__all__`` (ablation variants and
``nnUNetTrainerLabelDenoiser`` included; ``--trainers`` narrows them down by names or fnmatch
patterns) plus nnU-Net's ``nnUNetTrainer`` as the reference. Rule for leaving one out: a class is
an abstract base, and skipped, when its first ``train_step`` raises ``NotImplementedError`` (it
leaves a hook such as ``unlabeled_loss`` to subclasses; today nnUNetTrainerSemiSupervised and
nnUNetTrainerMeanTeacherBase). Any other failure is reported as FAILED and the exit status is 1.

Time: all trainers are built in one process on the same preprocessed dataset, as
``nnUNetv2_train`` builds them (``on_train_start``, ``on_train_epoch_start``; schedules at the
start of a 1000 x 250 iteration training). Trainers that need a label denoiser get one of the
planned architecture with random weights (a checkpoint written to a scratch folder,
``nnUNet_denoiser`` pointing at it; timing and memory do not depend on the weights). After one
warm-up step each, ``--rounds`` interleaved rounds follow (round r: ``--steps`` steps of every
trainer, the order rotated by one trainer per round), so that noise of the machine hits all
trainers alike. Timed per step: ``train_step`` alone (on CUDA with synchronisation before and
after; ``nnUNet_compile`` defaults to false here, as in ``sud_speed.py``).

Data loading is excluded: right after building, ``--batches`` labeled batches (and as many
unlabeled ones) are drawn through each trainer's own loaders (nnU-Net's augmentation, the
trainer's own transforms), the loaders' workers are stopped, and the batches are replayed; the
unlabeled fetch inside ``train_step`` is then a replay too. This differs from ``sud_speed.py``,
where the labeled batch is fetched outside the timer but the unlabeled fetch from live workers
counts: with all trainers built, ~90 idle nnU-Net worker processes (each polls its queue every
2 ms) kept the load average above 60 on a 2-core machine and left the timed process under
half a core.
``--live-loaders`` restores sud_speed.py's way for small ``--trainers`` selections.
Printed: the median seconds per step and its ratio to nnUNetTrainer's.

Memory, per trainer:
* ``step +MiB``: peak during the measured steps minus what was in use just before them (the
  transient memory of an iteration: activations, temporaries, extra forwards);
* ``peak MiB``: the trainer's own peak: what building it and one warm-up step left in use
  (network, optimizer state, teachers, discriminators, loaders' buffers) plus ``step +MiB``.
On CUDA these are ``torch.cuda`` allocator figures (``memory_allocated`` / ``max_memory_allocated``,
peak stats reset around each trainer's steps) taken in the timing process. On CPU every trainer
runs alone in a fresh subprocess (this script again, with a hidden ``--memory-probe``): import,
build, one warm-up step, ``--steps`` measured steps. Readings are the RSS of its main process
(the augmentation workers are separate processes and not counted), each taken after
``gc.collect()`` + glibc ``malloc_trim(0)`` so that freed heap does not count; the peak is the
kernel's high-water mark VmHWM, reset through ``/proc/self/clear_refs`` just before the measured
steps (exact, however short the peak; where the reset is refused a thread samples VmRSS every
2 ms). The resident part is the growth of RssAnon (anonymous memory: code pages of libraries
touched for the first time do not count). ``process peak MiB`` is the subprocess's whole VmHWM
(Python, torch and nnU-Net included), what ``top`` would have shown at worst.

Run time: each trainer is built twice (timing process, memory probe) and makes
``2 + rounds x steps + steps`` steps. With the defaults (synthetic 32^3 patch, 3 rounds, 1 step)
all 45 classes took 30 min on a shared 2-core CPU with ``--threads 1``: data set-up 2, build +
warm-up 4, timing 6, memory probes 17 (about 24 s each, a third of it importing torch and
nnU-Net). ``--skip-memory`` leaves the probes out. ``--threads`` sets torch's CPU threads
(default: torch's own choice, which follows ``OMP_NUM_THREADS``); on a machine shared with other
jobs one thread avoids oversubscribing the cores.

Usage:

    python benchmarks/trainer_cost.py --synthetic                 # generated Dataset989 in a temp folder
    python benchmarks/trainer_cost.py --synthetic --synthetic-shape 32 48 48   # sud_speed.py's images
    python benchmarks/trainer_cost.py -d 991 -c 3d_fullres [--device cuda] [--rounds 3] [--steps 1]
    python benchmarks/trainer_cost.py --synthetic --trainers 'nnUNetTrainerSUD*' nnUNetTrainerTE

``-d`` needs a planned + preprocessed dataset with preprocessed unlabeled images (``nnunet-sud
preprocess-unlabeled``). ``nnUNet_results`` is pointed at a scratch folder for the run (nothing is
written into real model folders); scratch folders are removed at the end unless ``--keep``.
"""
import argparse
import contextlib
import fnmatch
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

REFERENCE = "nnUNetTrainer"
MIB = 2 ** 20


# ---------------------------------------------------------------------- which trainers
def trainer_names(patterns=None):
    """nnUNetTrainer first, then the names of ``nnunet_sud.trainers.__all__`` matching any pattern."""
    from nnunet_sud.trainers import __all__ as ours
    names = list(ours)
    if patterns:
        unmatched = [p for p in patterns if p != REFERENCE and not fnmatch.filter(names, p)]
        if unmatched:
            raise SystemExit(f"--trainers: no trainer matches {', '.join(unmatched)} "
                             f"(known: {', '.join(names)})")
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    return [REFERENCE] + [n for n in names if n != REFERENCE]


def trainer_class(name):
    if name == REFERENCE:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        return nnUNetTrainer
    import nnunet_sud.trainers
    return getattr(nnunet_sud.trainers, name)


class Quiet:
    """Swallow what nnU-Net prints while a trainer is built; keep it for error messages."""

    def __init__(self, verbose=False):
        self.verbose = verbose
        self.buffer = io.StringIO()
        self._stack = None

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        if not self.verbose:
            self._stack.enter_context(contextlib.redirect_stdout(self.buffer))
            self._stack.enter_context(contextlib.redirect_stderr(self.buffer))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False


def build(name, plans_file, dataset_json, configuration, device):
    t = _common.make_trainer(trainer_class(name), plans_file, dataset_json, configuration, device)
    _common.start_trainer(t)
    if getattr(t, "dataloader_val", None) is not None:  # never used here: stop its workers
        if hasattr(t.dataloader_val, "_finish"):  # none with nnUNet_n_proc_DA=0
            t.dataloader_val._finish()
        t.dataloader_val = None
    return t


def first_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:200]


# ---------------------------------------------------------------------- CPU memory probe (subprocess)
def memory_probe(args) -> dict:
    """Build one trainer alone, warm up, measure its steps' memory (the child's side of the CPU probe)."""
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    trainer_class(args.memory_probe)  # its imports are not the trainer's memory
    _, plans_file, dataset_json = _common.plans_and_dataset_json(args.dataset, args.plans)
    trimmed = _common.release_free_memory()
    anon_before = _common.proc_status_mb("RssAnon")
    with Quiet(args.verbose):
        t = build(args.memory_probe, plans_file, dataset_json, args.configuration, args.device)
        _common.time_train_steps(t, 1, args.device)  # warm-up: optimizer state, lazy initialisation
    _common.release_free_memory()
    resident = _common.proc_status_mb("RssAnon") - anon_before
    hwm_so_far = _common.proc_status_mb("VmHWM")
    with Quiet(args.verbose), _common.PeakRSS() as peak:
        _common.time_train_steps(t, args.steps, args.device)
    _common.finish_loaders(t)
    return {"trainer": args.memory_probe, "resident_mb": resident, "step_increase_mb": peak.increase_mb,
            "own_peak_mb": resident + peak.increase_mb, "process_peak_mb": max(hwm_so_far, peak.peak_mb),
            "method": peak.method + ("" if trimmed else "; no malloc_trim (not glibc): RSS includes free heap")}


def run_memory_probes(names, args, dataset) -> dict:
    """One subprocess per trainer (sequentially); {name: probe result or {'error': ...}}."""
    env = dict(os.environ)
    out = {}
    for i, name in enumerate(names):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            result_file = f.name
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", name, "-d", str(dataset),
               "-c", args.configuration, "-p", args.plans, "--steps", str(args.steps), "--device", "cpu",
               "--probe-out", result_file] + (["--threads", str(args.threads)] if args.threads else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            with open(result_file) as f:
                out[name] = json.load(f)
        except (OSError, ValueError):
            tail = (proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
            out[name] = {"error": f"memory probe exited with {proc.returncode}: {tail[0][:200]}"}
        finally:
            if os.path.exists(result_file):
                os.remove(result_file)
        print(f"  memory {i + 1}/{len(names)} {name}: "
              + (f"peak {out[name]['own_peak_mb']:.0f} MiB ({time.perf_counter() - t0:.0f} s)"
                 if "error" not in out[name] else out[name]["error"]), flush=True)
    return out


# ---------------------------------------------------------------------- the benchmark
def fmt_ratio(x, ref):
    return f"{x / ref:.2f}" if ref and ref > 0 and x == x else "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("-d", "--dataset", default=None, help="preprocessed dataset (id or name)")
    ap.add_argument("-c", "--configuration", default="3d_fullres")
    ap.add_argument("-p", "--plans", default="nnUNetPlans")
    ap.add_argument("--synthetic", action="store_true", help="generate, plan and preprocess Dataset989 in a temp folder")
    ap.add_argument("--trainers", nargs="+", default=None, metavar="NAME",
                    help="names or fnmatch patterns of nnunet_sud trainers (default: all); nnUNetTrainer is always in")
    ap.add_argument("--synthetic-shape", type=int, nargs=3, default=(32, 32, 32), metavar=("Z", "Y", "X"),
                    help="image shape of the synthetic cases (default 32 32 32: nnU-Net plans a 32^3 patch)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per trainer and round, and measured steps of "
                                                         "the CPU memory probes (default 1)")
    ap.add_argument("--batches", type=int, default=2, help="batches per stream drawn per trainer and replayed "
                                                           "(default 2)")
    ap.add_argument("--live-loaders", action="store_true",
                    help="keep every trainer's augmentation workers and fetch from them as sud_speed.py does (the "
                         "unlabeled fetch inside train_step counts); for a few trainers only")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's / OMP_NUM_THREADS)")
    ap.add_argument("--skip-memory", action="store_true", help="time only")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folders (synthetic data, results)")
    ap.add_argument("--verbose", action="store_true", help="show what nnU-Net prints while building trainers")
    ap.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    os.environ.setdefault("nnUNet_compile", "false")
    if args.memory_probe:  # child: the parent set up data, results folder and nnUNet_denoiser
        res = memory_probe(args)
        with open(args.probe_out, "w") as f:
            json.dump(res, f)
        return 0

    if args.dataset is None and not args.synthetic:
        ap.error("give -d DATASET or --synthetic")
    if args.synthetic and args.configuration != "3d_fullres":
        ap.error("--synthetic plans 3d_fullres only")
    scratch = []
    t0 = time.perf_counter()
    if args.synthetic:
        print("generating, planning and preprocessing the synthetic dataset ...", flush=True)
        scratch.append(_common.setup_synthetic(shape=args.synthetic_shape, prefix="trainer_cost_"))
        dataset = 989
    else:
        scratch.append(_common.scratch_results(prefix="trainer_cost_results_"))
        dataset = args.dataset
    try:
        return benchmark(args, dataset, scratch, setup_s=time.perf_counter() - t0)
    finally:
        if args.keep:
            print(f"kept: {', '.join(scratch)}")
        else:
            for folder in scratch:
                shutil.rmtree(folder, ignore_errors=True)


def benchmark(args, dataset, scratch, setup_s: float) -> int:
    t_start = time.perf_counter()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    name, plans_file, dataset_json = _common.plans_and_dataset_json(dataset, args.plans)
    den_ckpt = os.path.join(scratch[-1], "random_label_denoiser.pth")
    _common.write_random_denoiser_checkpoint(plans_file, dataset_json, args.configuration, den_ckpt)
    os.environ["nnUNet_denoiser"] = den_ckpt
    names = trainer_names(args.trainers)

    # ---- build (one process), warm up; abstract bases drop out here
    trainers, skipped, failed, resident, batches = {}, {}, {}, {}, {}
    for n in names:
        a0 = torch.cuda.memory_allocated() if cuda else 0
        t = None
        try:
            with Quiet(args.verbose):
                t = build(n, plans_file, dataset_json, args.configuration, device)
                batches[n] = None if args.live_loaders else _common.replay_batches(t, args.batches)
        except Exception as e:
            failed[n] = f"build: {first_line(e)}"
            if args.verbose:
                traceback.print_exc()
            if t is not None:
                _common.finish_loaders(t)
            continue
        trainers[n] = t
        if cuda:
            _common.synchronize(device)
            resident[n] = torch.cuda.memory_allocated() - a0
        print(f"  built {len(trainers)}/{len(names)} {n}", flush=True)
    for n in list(trainers):
        b0 = torch.cuda.memory_allocated() if cuda else 0
        try:
            with Quiet(args.verbose):
                _common.time_train_steps(trainers[n], 1, device, batches[n])
        except NotImplementedError as e:
            skipped[n] = f"abstract base ({first_line(e)})"
        except Exception as e:
            failed[n] = f"train_step: {first_line(e)}"
            if args.verbose:
                traceback.print_exc()
        if n in skipped or n in failed:
            _common.finish_loaders(trainers.pop(n))
            continue
        if cuda:
            resident[n] += torch.cuda.memory_allocated() - b0
    if REFERENCE not in trainers:
        print(f"{REFERENCE} could not be measured: {failed.get(REFERENCE)}")
        return 1
    t_built = time.perf_counter()
    print(f"built and warmed up {len(trainers)} trainers in {t_built - t_start:.0f} s "
          f"(resident memory of this process {_common.proc_status_mb('VmRSS'):.0f} MiB)", flush=True)

    # ---- interleaved rounds
    times = {n: [] for n in trainers}
    step_peak = {n: 0 for n in trainers}
    for r, order in enumerate(_common.round_orders(list(trainers), args.rounds, "rotate")):
        for n in order:
            st = _common.time_train_steps(trainers[n], args.steps, device, batches[n])
            times[n] += st.seconds
            if cuda:
                step_peak[n] = max(step_peak[n], st.cuda_peak - st.cuda_before)
        print(f"  round {r + 1}/{args.rounds} done ({time.perf_counter() - t_built:.0f} s)", flush=True)
    t_timed = time.perf_counter()
    ref = trainers[REFERENCE]
    header = (f"dataset {name}, configuration {args.configuration}, patch {list(ref.configuration_manager.patch_size)}, "
              f"batch {ref.batch_size} (+ as many unlabeled patches), device {device}, torch threads "
              f"{torch.get_num_threads()}, nnUNet_n_proc_DA {os.environ['nnUNet_n_proc_DA']}, torch {torch.__version__}")
    for t in trainers.values():
        _common.finish_loaders(t)
    measured = list(trainers)
    trainers.clear()  # free the timing process before the memory probes

    # ---- memory
    mem = {}
    if cuda:
        mem = {n: {"step_increase_mb": step_peak[n] / MIB, "own_peak_mb": (resident[n] + step_peak[n]) / MIB}
               for n in measured}
        mem_note = ("memory: torch.cuda allocator, in the timing process: step +MiB = max_memory_allocated during "
                    "the trainer's steps - memory_allocated before them (max over rounds); peak MiB = what building "
                    "and the warm-up step left allocated + step +MiB")
    elif not args.skip_memory:
        print(f"memory probes: one subprocess per trainer, 1 warm-up + {args.steps} measured step(s) each", flush=True)
        mem = run_memory_probes(measured, args, dataset)
        methods = sorted({m["method"] for m in mem.values() if "method" in m})
        mem_note = ("memory: CPU, each trainer alone in a fresh subprocess, RSS of its main process (augmentation "
                    f"workers not counted), free heap returned by malloc_trim before each reading; peak: "
                    f"{'; '.join(methods) or '-'}. step +MiB = peak RSS during {args.steps} measured step(s) - RSS "
                    "before them (after build + 1 warm-up step); peak MiB = anonymous memory (RssAnon) the build and "
                    "warm-up added + step +MiB; process peak = the subprocess's VmHWM (Python, torch, nnU-Net incl.)")
        for n, m in mem.items():
            if "error" in m:
                failed[n] = m["error"]
    else:
        mem_note = "memory: not measured (--skip-memory)"
    t_end = time.perf_counter()

    # ---- report
    med = {n: statistics.median(times[n]) for n in measured}
    ref_mem = mem.get(REFERENCE, {})
    print()
    print(header)
    data = ("live loaders: the labeled batch is fetched before the timer starts, the unlabeled fetch inside "
            "train_step counts" if args.live_loaders else
            f"data loading excluded: {args.batches} labeled (+ {args.batches} unlabeled) batches per trainer drawn "
            f"through its own loaders, workers stopped, batches replayed")
    print(f"{args.rounds} interleaved rounds (rotating order) x {args.steps} step(s) per trainer after 1 warm-up "
          f"step; s/iter = median wall time of train_step; {data}; denoisers: random weights of the planned "
          f"architecture")
    print(mem_note)
    print(f"wall time: data set-up {setup_s:.0f} s, build + warm-up {t_built - t_start:.0f} s, timing {t_timed - t_built:.0f} s, memory "
          f"{t_end - t_timed:.0f} s")
    print()
    cols = ["trainer", "s/iter", "ratio", "step +MiB", "ratio", "peak MiB", "ratio"]
    if not cuda:
        cols.append("process peak MiB")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for n in sorted(measured, key=lambda k: med[k] / med[REFERENCE]):
        m = mem.get(n, {})
        step, own = m.get("step_increase_mb", float("nan")), m.get("own_peak_mb", float("nan"))
        row = [n, f"{med[n]:.3f}", fmt_ratio(med[n], med[REFERENCE]),
               f"{step:.0f}" if step == step else "-", fmt_ratio(step, ref_mem.get("step_increase_mb")),
               f"{own:.0f}" if own == own else "-", fmt_ratio(own, ref_mem.get("own_peak_mb"))]
        if not cuda:
            row.append(f"{m['process_peak_mb']:.0f}" if "process_peak_mb" in m else "-")
        print("| " + " | ".join(row) + " |")
    for n, why in skipped.items():
        print(f"skipped {n}: {why}")
    for n, why in failed.items():
        print(f"FAILED {n}: {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
