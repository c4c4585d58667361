"""Time per training iteration: DAE uncertainty vs UA-MT (K passes) vs mean teacher vs nnUNetTrainer.

Adiga Vasudeva et al. 2022's claim (DAE-MT): its uncertainty needs one denoiser inference per step
where UA-MT needs K = 8 stochastic teacher passes. This script measures the full ``train_step`` of
each trainer (forward, losses, backward, optimizer step, EMA update) side by side in one process, on
the same batches, with interleaved repetitions, and prints medians and ratios to ``nnUNetTrainer``.

    python benchmarks/mean_teacher_speed.py -d 991 -c 3d_fullres [--rounds 5] [--iters 2] [--device cpu]

Needs a planned + preprocessed dataset with preprocessed unlabeled images (``nnunet-sud
preprocess-unlabeled``). The DAE trainer uses the trained label denoiser (``load_label_denoiser``: the
default location or ``$nnUNet_denoiser``); without one, a denoiser of the same architecture with
random weights is used (the timing does not depend on the weights) and the script says so.
Data loading is excluded: a few labeled and unlabeled batches are drawn once through nnU-Net's
augmentation and replayed to every trainer.
"""
import argparse
import itertools
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-d", "--dataset", required=True)
    ap.add_argument("-c", "--configuration", default="3d_fullres")
    ap.add_argument("-p", "--plans", default="nnUNetPlans")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--iters", type=int, default=2, help="timed iterations per trainer and round (default 2)")
    ap.add_argument("--batches", type=int, default=3, help="distinct batches replayed (default 3)")
    ap.add_argument("--mc-passes", type=int, default=8, help="UA-MT's K (default 8)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_sud.errors import UserFacingError
    from nnunet_sud.trainers import (nnUNetTrainerDAEUncertainty, nnUNetTrainerMeanTeacher, nnUNetTrainerUAMT)

    if args.threads:
        torch.set_num_threads(args.threads)
    name, plans_file, dataset_json = _common.plans_and_dataset_json(args.dataset, args.plans)
    device = torch.device(args.device)

    # ---- fixed batches through nnU-Net's augmentation (labeled and unlabeled streams)
    torch.manual_seed(0)
    np.random.seed(0)
    source = _common.make_trainer(nnUNetTrainerMeanTeacher, plans_file, dataset_json, args.configuration, args.device)
    source.check_unlabeled_data()
    source.initialize()
    dl_tr, dl_val = source.get_dataloaders()
    labeled = [next(dl_tr) for _ in range(args.batches)]
    unlabeled = [next(source.dataloader_unlabeled) for _ in range(args.batches)]
    for dl in (dl_tr, dl_val, source.dataloader_unlabeled):
        dl._finish()

    # ---- the trainers, identically initialised students
    trainers = {}
    for label, cls in (("nnUNetTrainer", nnUNetTrainer), ("MeanTeacher", nnUNetTrainerMeanTeacher),
                       (f"UAMT (K={args.mc_passes})", nnUNetTrainerUAMT), ("DAEUncertainty", nnUNetTrainerDAEUncertainty)):
        torch.manual_seed(0)
        tr = _common.make_trainer(cls, plans_file, dataset_json, args.configuration, args.device)
        tr.initialize()
        tr.set_deep_supervision_enabled(tr.enable_deep_supervision)
        tr.network.train()
        if hasattr(tr, "teacher"):
            tr.teacher.copy_from(tr.network)
            tr.dataloader_unlabeled = itertools.cycle(unlabeled)
        if isinstance(tr, nnUNetTrainerUAMT):
            tr.mc_passes = args.mc_passes
        trainers[label] = tr
    dae = trainers["DAEUncertainty"]
    denoiser_note = ""
    try:
        dae.load_label_denoiser()
        denoiser_note = f"trained denoiser {dae.denoiser.denoiser_info['checkpoint']}"
    except UserFacingError as e:
        dae.denoiser = _common.random_denoiser(dae)
        denoiser_note = f"no trained denoiser ({str(e).splitlines()[0][:80]}...): same architecture, random weights"

    batches = itertools.cycle(labeled)
    for tr in trainers.values():  # warm-up
        _common.time_train_steps(tr, 1, device, batches)
    times = {k: [] for k in trainers}
    cpu_times = {k: [] for k in trainers}
    order = list(trainers)
    for round_order in _common.round_orders(order, args.rounds, "alternate"):  # interleaved, alternating order
        for label in round_order:
            st = _common.time_train_steps(trainers[label], args.iters, device, batches)
            times[label] += st.seconds
            cpu_times[label] += st.cpu_seconds

    ref = statistics.median(times["nnUNetTrainer"])
    cpu_ref = statistics.median(cpu_times["nnUNetTrainer"])
    cm = source.configuration_manager
    print(f"dataset {name}, configuration {args.configuration}, patch {list(cm.patch_size)}, batch {source.batch_size} "
          f"labeled + {source.batch_size} unlabeled, device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{args.rounds} interleaved rounds x {args.iters} iterations per trainer; DAE: {denoiser_note}")
    print()
    print("| trainer | median s / iteration | ratio to nnUNetTrainer | median CPU s / iteration | CPU ratio "
          "| unlabeled forwards per step |")
    print("|---|---|---|---|---|---|")
    extra = {"nnUNetTrainer": "-", "MeanTeacher": "student + teacher",
             f"UAMT (K={args.mc_passes})": f"student + teacher + {args.mc_passes} teacher passes",
             "DAEUncertainty": "student + teacher + 1 denoiser"}
    for label in order:
        med, cpu = statistics.median(times[label]), statistics.median(cpu_times[label])
        print(f"| {label} | {med:.3f} | {med / ref:.2f} | {cpu:.3f} | {cpu / cpu_ref:.2f} | {extra[label]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
