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

With ``-d``, the trainers' output folders (logs, SUD's soft-target store) go to a scratch
``nnUNet_results`` (removed at exit), never into the real model folders. Helpers: ``_common.py``.
"""
import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


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
            base = _common.proc_status_mb("RssAnon")
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
                peak = max(peak, _common.proc_status_mb("RssAnon"))
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
    if args.synthetic:
        _common.setup_synthetic(prefix="sud_bench_")
        dataset = 989
    elif args.dataset is None:
        ap.error("give -d DATASET or --synthetic")
    else:
        # on_train_start writes logs and clears SUD's store: not in real model folders
        atexit.register(shutil.rmtree, _common.scratch_results(), True)
        dataset = args.dataset
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_sud.trainers import nnUNetTrainerSUD, nnUNetTrainerSUDMeanTeacher, nnUNetTrainerTE
    classes = [nnUNetTrainer, nnUNetTrainerTE, nnUNetTrainerSUD, nnUNetTrainerSUDMeanTeacher]
    _, plans_file, dataset_json = _common.plans_and_dataset_json(dataset)
    trainers = {}
    for c in classes:
        t = _common.make_trainer(c, plans_file, dataset_json, args.configuration, device)
        needs = getattr(t, "needs_denoiser", lambda: False)()
        trainers[c.__name__] = _common.start_trainer(t, _common.random_denoiser(t) if needs else None)
    for t in trainers.values():  # warm-up
        _common.time_train_steps(t, 1, device)
        getattr(t, "component_times", {}).clear()
    times = {n: [] for n in trainers}
    peak_mb = {}
    names = list(trainers)
    for order in _common.round_orders(names, args.rounds, "rotate"):
        for n in order:
            st = _common.time_train_steps(trainers[n], args.steps, device)
            times[n] += st.seconds
            if st.cuda_peak is not None:
                peak_mb[n] = max(peak_mb.get(n, 0), st.cuda_peak / 2 ** 20)
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
        peak = f"{peak_mb[n]:12.0f}" if n in peak_mb else f"{'(cpu)':>12s}"
        print(f"{n:32s} {med:8.3f} {med / base:6.2f} {store:8.1f} {den:10.1f} {peak}")
    for t in trainers.values():
        _common.finish_loaders(t)
    if not args.skip_memory:
        res = memory_check()
        print("soft-target store memory (anonymous RSS growth while reading/writing 200 random 32x64x64 "
              "patches, 4 classes, cases 48x96x96):")
        for n, (k, mb) in res.items():
            print(f"  {n:4d} cases ({k} files): +{mb:.1f} MiB")


if __name__ == "__main__":
    main()
