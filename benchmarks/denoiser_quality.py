"""Label-denoiser quality on real label maps: Dice / HD95 of noisy vs denoised maps per (sigma, s).

The SUD paper's Table 1 / Fig. 7 experiment on LA_lite (left atrium, binary, 3D MRI) and
ACDC_lite (RV / myocardium / LV, cine MRI) label maps (see /work/shared/data/README.md):

1. a small nnU-Net raw dataset per source: the denoiser's training maps (LA: the first
   ``--la-train`` cases of train.list, the 20 % protocol; ACDC: both frames of the first
   ``--acdc-train-patients`` patients of train.list, the 7-patient protocol) and held-out
   validation maps (LA: the next ``--la-val`` cases; ACDC: the first ``--acdc-val-frames``
   frames of val.list, other patients); images are copied too because nnU-Net plans from them;
2. ``nnUNetv2_plan_and_preprocess`` for the chosen configuration, and a splits_final.json with
   exactly that train / validation split;
3. ``nnUNetTrainerLabelDenoiser`` trained in this process for ``--epochs`` x ``--iterations``
   at ``--batch-size`` (the reduced CPU budget; the paper trains 50 x 1000 iterations) with the training corruption
   of the paper (sigma, s uniform in [0, 8]); ``--optimizer adam`` swaps nnU-Net's SGD for Adam,
   which gets much further on a few hundred iterations;
4. the trainer's own validation (``perform_actual_validation``): every held-out map corrupted at
   the fixed ``--settings`` (seeded noise) and denoised; Dice / HD95 (mm) of the noisy and of
   the denoised map against the clean one, mean over foreground labels and cases.

Examples (the budgets reported in docs/denoiser.md)::

    python benchmarks/denoiser_quality.py --la /work/shared/data/LA_lite --work /tmp/denoiser_quality \\
        --epochs 3 --iterations 100 --batch-size 8 --optimizer adam --out /tmp/denoiser_quality/la.json
    python benchmarks/denoiser_quality.py --acdc /work/shared/data/ACDC_lite --work /tmp/denoiser_quality \\
        --epochs 2 --iterations 100 --batch-size 8 --optimizer adam --eval-every 0 --acdc-val-frames 6 \\
        --out /tmp/denoiser_quality/acdc.json

Everything is written below ``--work`` (its own nnUNet_raw / _preprocessed / _results), so
nothing of an existing nnU-Net set-up is touched.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time


def _parse_settings(text):
    out = []
    for item in text.split():
        sigma, scale = item.split(",")
        out.append((float(sigma), float(scale)))
    return tuple(out)


def _read_list(path):
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip()]


def _write_raw(raw_root, dataset_id, name, source, train_ids, val_ids, labels, channel):
    """Copy the chosen cases into an nnU-Net raw dataset; return its folder."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    if os.path.isfile(os.path.join(folder, "dataset.json")):
        return folder
    os.makedirs(os.path.join(folder, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(folder, "labelsTr"), exist_ok=True)
    for cid in list(train_ids) + list(val_ids):
        shutil.copy(os.path.join(source, "images", cid + ".nii.gz"),
                    os.path.join(folder, "imagesTr", cid + "_0000.nii.gz"))
        shutil.copy(os.path.join(source, "labels", cid + ".nii.gz"), os.path.join(folder, "labelsTr", cid + ".nii.gz"))
    generate_dataset_json(folder, {0: channel}, labels=labels, num_training_cases=len(train_ids) + len(val_ids),
                          file_ending=".nii.gz", dataset_name=name,
                          description="nnunet_sud denoiser_quality benchmark subset")
    return folder


def _run_dataset(args, dataset_id, name, source, train_ids, val_ids, labels, channel, configuration, settings):
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_sud.denoiser.trainer import VALIDATION_JSON, nnUNetTrainerLabelDenoiser

    raw = os.environ["nnUNet_raw"]
    _write_raw(raw, dataset_id, name, source, train_ids, val_ids, labels, channel)
    full = f"Dataset{dataset_id:03d}_{name}"
    pre = os.path.join(os.environ["nnUNet_preprocessed"], full)
    t0 = time.time()
    if not os.path.isdir(os.path.join(pre, f"nnUNetPlans_{configuration}")):
        subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", configuration, "-np",
                        str(args.num_processes)], check=True, stdout=subprocess.DEVNULL)
    t_pre = time.time() - t0
    save_json([{"train": sorted(train_ids), "val": sorted(val_ids)}], os.path.join(pre, "splits_final.json"))

    plans = load_json(os.path.join(pre, "nnUNetPlans.json"))
    plans["continue_training"] = False
    done = os.path.join(os.environ["nnUNet_results"], full, f"nnUNetTrainerLabelDenoiser__nnUNetPlans__{configuration}",
                        "fold_0", VALIDATION_JSON)
    final_ckpt = os.path.join(os.path.dirname(done), "checkpoint_final.pth")
    if args.reuse and os.path.isfile(done):  # a finished run of the same command line
        res = load_json(done)
        cm = PlansManager(plans).get_configuration(configuration)
        return {"dataset": name, "configuration": configuration, "patch_size": list(cm.patch_size),
                "batch_size": args.batch_size or cm.batch_size, "train_maps": len(train_ids), "val_maps": len(val_ids),
                "epochs": args.epochs, "iterations_per_epoch": args.iterations, "optimizer": args.optimizer,
                "seconds": "reused", "validation": res["final"], "history": res["history"],
                "model_folder": os.path.dirname(done)}
    trained = args.reuse and os.path.isfile(final_ckpt)  # training finished, evaluation not (yet)
    tr = nnUNetTrainerLabelDenoiser(plans, configuration, 0, load_json(os.path.join(pre, "dataset.json")),
                                    torch.device(args.device))
    tr.num_epochs = args.epochs
    tr.num_iterations_per_epoch = args.iterations
    tr.num_val_iterations_per_epoch = 2
    tr.denoiser_eval_every = args.eval_every
    tr.denoiser_eval_max_cases = 2
    tr.denoiser_eval_settings = settings
    tr.initialize()
    if args.batch_size:
        tr.batch_size = args.batch_size  # the plans' 2d batch grows with the dataset (47 for 16 LA cases)
    if args.optimizer == "adam":
        tr.initial_lr = args.lr or 1e-3
        tr.optimizer = torch.optim.Adam(tr.network.parameters(), tr.initial_lr, weight_decay=tr.weight_decay)
        tr.lr_scheduler = PolyLRScheduler(tr.optimizer, tr.initial_lr, tr.num_epochs)
    elif args.lr:
        for g in tr.optimizer.param_groups:
            g["lr"] = args.lr
        tr.initial_lr = args.lr
        tr.lr_scheduler = PolyLRScheduler(tr.optimizer, tr.initial_lr, tr.num_epochs)
    t0 = time.time()
    if trained:
        tr.load_checkpoint(final_ckpt)
    else:
        tr.run_training()
    t_train = "reused" if trained else round(time.time() - t0, 1)
    t0 = time.time()
    tr.perform_actual_validation()
    t_val = time.time() - t0
    res = load_json(os.path.join(tr.output_folder, VALIDATION_JSON))
    return {"dataset": name, "configuration": configuration, "patch_size": list(tr.configuration_manager.patch_size),
            "batch_size": tr.batch_size, "train_maps": len(train_ids),
            "val_maps": len(val_ids), "epochs": args.epochs, "iterations_per_epoch": args.iterations,
            "optimizer": args.optimizer, "seconds": {"plan_preprocess": round(t_pre, 1), "train": t_train,
                                                      "final_validation": round(t_val, 1)},
            "validation": res["final"], "history": res["history"], "model_folder": tr.output_folder}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--la", help="LA_lite folder (images/, labels/, train.list)")
    p.add_argument("--acdc", help="ACDC_lite folder (images/, labels/, train.list, val.list)")
    p.add_argument("--work", required=True, help="working folder (own nnUNet_raw/_preprocessed/_results)")
    p.add_argument("--la-train", type=int, default=16, help="LA training maps (first N of train.list; default 16)")
    p.add_argument("--la-val", type=int, default=8, help="LA held-out maps (the next N; default 8)")
    p.add_argument("--acdc-train-patients", type=int, default=7, help="ACDC training patients (default 7)")
    p.add_argument("--acdc-val-frames", type=int, default=10, help="ACDC held-out frames from val.list (default 10)")
    p.add_argument("--la-config", default="2d", help="nnU-Net configuration for LA (default 2d; 3d_fullres is "
                                                     "far beyond a CPU budget)")
    p.add_argument("--acdc-config", default="2d", help="nnU-Net configuration for ACDC (default 2d)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--iterations", type=int, default=100, help="iterations per epoch")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="adam",
                   help="sgd: nnU-Net's (lr 1e-2); adam: lr 1e-3 (default; better on short budgets)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=8,
                   help="override the plans' batch size (default 8; 0 keeps the plans')")
    p.add_argument("--settings", default="1,1 2,2 4,4 8,8", help="fixed 'sigma,s' pairs (default '1,1 2,2 4,4 8,8')")
    p.add_argument("--eval-every", type=int, default=1,
                   help="noisy-vs-denoised evaluation of 2 held-out maps every N epochs (0: only the final one)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--reuse", action="store_true",
                   help="reuse what a run with the same options left under --work: a dataset with "
                        "denoiser_validation.json is only reported, one with checkpoint_final.pth only evaluated")
    p.add_argument("--out", default=None, help="results JSON (default WORK/denoiser_quality.json)")
    args = p.parse_args(argv)
    if not args.la and not args.acdc:
        p.error("give --la and/or --acdc")

    work = os.path.abspath(args.work)
    for k, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        os.environ[k] = os.path.join(work, sub)
        os.makedirs(os.environ[k], exist_ok=True)
    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    os.environ.setdefault("nnUNet_compile", "false")
    settings = _parse_settings(args.settings)
    from nnunet_sud.denoiser.evaluation import format_results

    results = []
    if args.la:
        ids = _read_list(os.path.join(args.la, "train.list"))
        results.append(_run_dataset(args, 881, "LAliteLabels", args.la, ids[:args.la_train],
                                    ids[args.la_train:args.la_train + args.la_val],
                                    {"background": 0, "left_atrium": 1}, "MRI", args.la_config, settings))
    if args.acdc:
        tr_frames = _read_list(os.path.join(args.acdc, "train.list"))
        patients = []
        for f in tr_frames:
            pid = f.split("_")[0]
            if pid not in patients:
                patients.append(pid)
        keep = set(patients[:args.acdc_train_patients])
        train = [f for f in tr_frames if f.split("_")[0] in keep]
        val = _read_list(os.path.join(args.acdc, "val.list"))[:args.acdc_val_frames]
        results.append(_run_dataset(args, 882, "ACDCliteLabels", args.acdc, train, val,
                                    {"background": 0, "RV": 1, "myocardium": 2, "LV": 3}, "cineMRI",
                                    args.acdc_config, settings))
    out = args.out or os.path.join(work, "denoiser_quality.json")
    cmd = " ".join([os.path.relpath(sys.argv[0]) if sys.argv[0] else "benchmarks/denoiser_quality.py", *sys.argv[1:]])
    with open(out, "w") as f:
        json.dump({"command": cmd, "results": results}, f, indent=2, default=lambda x: None)
    for r in results:
        print(f"\n### {r['dataset']} ({r['configuration']}, patch {r['patch_size']}, batch {r['batch_size']}): "
              f"{r['train_maps']} training maps, {r['val_maps']} held-out maps, {r['epochs']} x "
              f"{r['iterations_per_epoch']} iterations ({r['optimizer']}), times {r['seconds']}\n")
        print(format_results(r["validation"], markdown=True))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
