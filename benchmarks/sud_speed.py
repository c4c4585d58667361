"""Iteration time of SUD, TE and SUD-MT relative to nnUNetTrainer, measured side by side.

All trainers are built in one process on the same preprocessed dataset and stepped in
interleaved rounds (round r: k steps of each trainer, in rotating order), so machine noise hits
all of them alike. Printed: median seconds per iteration, the ratio to nnUNetTrainer, and for
SUD/TE/SUD-MT the share of the iteration spent in the soft-target store (read + write through
the coordinate map) and in the denoiser. Then the memory check: resident anonymous memory while
reading/writing stores of few vs many cases (memory must not grow with the number of cases).

Usage (an nnU-Net dataset with preprocessed unlabeled images; the denoiser's weights do not
matter for timing, so a randomly initialised one is used):

    python benchmarks/sud_speed.py -d 991 -c 3d_fullres [--rounds 5] [--steps 3] [--device cpu]
    python benchmarks/sud_speed.py --synthetic      # makes Dataset989 in a temp folder first
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _setup_synthetic():
    root = tempfile.mkdtemp(prefix="sud_bench_")
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[k] = os.path.join(root, k)
        os.makedirs(os.environ[k])
    from nnunet_sud.dataset_conversion.synthetic import generate_dataset
    generate_dataset(os.environ["nnUNet_raw"], 989, "3d", 6, 12, 0, seed=0, shape=(32, 48, 48))
    subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", "989", "-c", "3d_fullres", "-np", "2"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "nnunet_sud.cli", "preprocess-unlabeled", "-d", "989", "-c",
                    "3d_fullres", "-np", "2"], check=True, stdout=subprocess.DEVNULL)
    return 989


def rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(cls, dataset, cfg, device):
    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    name = maybe_convert_to_dataset_name(dataset)
    plans = load_json(join(nnUNet_preprocessed, name, "nnUNetPlans.json"))
    plans["continue_training"] = False
    t = cls(plans, cfg, 0, load_json(join(nnUNet_preprocessed, name, "dataset.json")), torch.device(device))
    t.num_epochs, t.num_iterations_per_epoch = 1000, 250
    if getattr(t, "needs_denoiser", lambda: False)():
        from nnunet_sud.denoiser.network import build_label_denoiser
        den = build_label_denoiser(t.plans_manager, t.configuration_manager,
                                   t.label_manager.num_segmentation_heads).to(t.device).eval()
        for p in den.parameters():
            p.requires_grad_(False)
        t.denoiser = den
    t.on_train_start()
    t.on_train_epoch_start()
    return t


PEAK_MB = {}


def time_steps(t, k, device):
    import torch
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(k):
        batch = next(t.dataloader_train)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        t.train_step(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        name = type(t).__name__
        PEAK_MB[name] = max(PEAK_MB.get(name, 0), torch.cuda.max_memory_allocated() / 2 ** 20)
    return times


def memory_check(n_small=10, n_large=100, shape=(48, 96, 96), ops=200):
    """Anonymous RSS while reading/writing random patches of stores with few vs many cases."""
    import numpy as np
    import torch
    from nnunet_sud.targets.store import SoftTargetStore
    out = {}
    patch = (32, 64, 64)
    grids = torch.stack(torch.meshgrid(*[torch.arange(p, dtype=torch.float32) for p in patch], indexing="ij"))
    for n in (n_small, n_large):
        with tempfile.TemporaryDirectory() as d:
            store = SoftTargetStore(d, 4)
            rng = np.random.default_rng(0)
            base = rss_anon_mb()
            peak = base
            for i in range(ops):
                key = f"case{rng.integers(n):04d}"
                off = torch.tensor([rng.integers(0, s - p + 1) for s, p in zip(shape, patch)], dtype=torch.float32)
                coords = (grids + off[:, None, None, None])[None]
                valid = torch.ones((1, *patch), dtype=torch.bool)
                cs = torch.tensor([shape])
                z = store.read([key], coords, valid, cs)
                z = torch.where(torch.isnan(z), torch.full_like(z, 0.25), z)
                store.write([key], coords, valid, cs, z)
                peak = max(peak, rss_anon_mb())
            out[n] = (len(store.keys()), peak - base)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-d", "--dataset", default=None)
    ap.add_argument("-c", "--configuration", default="3d_fullres")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("nnUNet_n_proc_DA", "2")
    os.environ.setdefault("nnUNet_compile", "false")
    dataset = _setup_synthetic() if args.synthetic else args.dataset
    if dataset is None:
        ap.error("give -d DATASET or --synthetic")
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_sud.trainers import nnUNetTrainerSUD, nnUNetTrainerSUDMeanTeacher, nnUNetTrainerTE
    classes = [nnUNetTrainer, nnUNetTrainerTE, nnUNetTrainerSUD, nnUNetTrainerSUDMeanTeacher]
    trainers = {c.__name__: build(c, dataset, args.configuration, device) for c in classes}
    for t in trainers.values():  # warm-up
        time_steps(t, 1, device)
        getattr(t, "component_times", {}).clear()
    times = {n: [] for n in trainers}
    names = list(trainers)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            times[n] += time_steps(trainers[n], args.steps, device)
    base = statistics.median(times["nnUNetTrainer"])
    print(f"device {device}, configuration {args.configuration}, patch "
          f"{trainers['nnUNetTrainer'].configuration_manager.patch_size}, batch "
          f"{trainers['nnUNetTrainer'].batch_size}, {args.rounds} rounds x {args.steps} steps each")
    print(f"{'trainer':32s} {'s/iter':>8s} {'ratio':>6s} {'store %':>8s} {'denoiser %':>10s} {'peak GPU MiB':>12s}")
    for n in names:
        med = statistics.median(times[n])
        total = sum(times[n])
        ct = getattr(trainers[n], "component_times", {})
        store = 100 * ct.get("store", 0) / total if ct else float("nan")
        den = 100 * ct.get("denoiser", 0) / total if ct else float("nan")
        peak = f"{PEAK_MB[n]:12.0f}" if n in PEAK_MB else f"{'(cpu)':>12s}"
        print(f"{n:32s} {med:8.3f} {med / base:6.2f} {store:8.1f} {den:10.1f} {peak}")
    for t in trainers.values():
        for dl in (t.dataloader_train, t.dataloader_val, getattr(t, "dataloader_unlabeled", None)):
            if dl is not None and hasattr(dl, "_finish"):
                dl._finish()
    if not args.skip_memory:
        res = memory_check()
        print("soft-target store memory (anonymous RSS growth while reading/writing 200 random 32x64x64 "
              "patches, 4 classes, cases 48x96x96):")
        for n, (k, mb) in res.items():
            print(f"  {n:4d} cases ({k} files): +{mb:.1f} MiB")


if __name__ == "__main__":
    main()
