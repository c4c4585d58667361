"""Label-denoiser quality on real label maps: Dice / HD95 of noisy vs denoised maps per (sigma, s).

The SUD paper's Table 1 / Fig. 7 experiment (Young et al., "SUD: Supervision by Denoising", §3.4)
on LA_lite (left atrium, binary, 3D MRI) and ACDC_lite (RV / myocardium / LV, cine MRI) label maps
(folders with ``images/``, ``labels/``, ``train.list``, ``val.list``), for the label maps a semi-supervised run actually has:

=========  ==================================================  ===============================
setting    denoiser training maps                              held-out maps (reported)
=========  ==================================================  ===============================
acdc3      both frames of the first 3 patients of train.list   the 20 frames of val.list
acdc7      both frames of the first 7 patients of train.list   the 20 frames of val.list
la8        the first 8 cases of train.list                     the last 20 cases of train.list
la16       the first 16 cases of train.list                    the last 20 cases of train.list
=========  ==================================================  ===============================

For each setting:

1. a small nnU-Net raw dataset (training + held-out maps; images are copied too because nnU-Net
   plans from them), ``nnUNetv2_plan_and_preprocess -c CONFIG``, and a splits_final.json whose
   fold 0 is exactly that train / held-out split;
2. ``nnUNetTrainerLabelDenoiser`` with its **defaults** (schedule, network width, corruption;
   ``--epochs`` etc. override them) trained in this process, on ``--device``;
3. its own final validation (``perform_actual_validation``): every held-out map corrupted at the
   trainer's ``denoiser_eval_settings`` (seeded noise) and denoised; Dice / HD95 (mm) of the noisy
   and of the denoised map against the clean one, mean over foreground labels, then cases.

``--tune`` reports on a split of the *training* maps instead (fold 1 of the acdc7 / la16 datasets:
train on the acdc3 / la8 maps, validate on the other acdc7 / la16 training maps): what the defaults
were chosen on. The held-out maps are never used for choosing anything.

Example (the run reported in docs/denoiser.md)::

    python benchmarks/denoiser_quality.py --acdc /data/ACDC_lite --la /data/LA_lite \\
        --work /scratch/denoiser_quality

Everything is written below ``--work`` (its own nnUNet_raw / _preprocessed / _results), so
nothing of an existing nnU-Net set-up is touched. ``--threads`` (default 1) sets torch's CPU
threads: on a CPU shared with other jobs, two OpenMP threads on two busy cores made a denoiser step
~10x slower than one thread (spin-waiting).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

SETTINGS = {  # name: (source, dataset id, number of training maps, configuration option)
    "acdc3": ("acdc", 871, 3), "acdc7": ("acdc", 872, 7), "la8": ("la", 873, 8), "la16": ("la", 874, 16)}
TUNE = {"acdc": ("acdc7", 3), "la": ("la16", 8)}  # tuning: fold 1 of this dataset, trained on the first N
ACDC_LABELS = {"background": 0, "RV": 1, "myocardium": 2, "LV": 3}
LA_LABELS = {"background": 0, "left_atrium": 1}
LA_HELD_OUT = 20


def _read_list(path):
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip()]


def _acdc_frames_of_first_patients(train_list, n):
    patients = []
    for f in train_list:
        pid = f.split("_")[0]
        if pid not in patients:
            patients.append(pid)
    keep = set(patients[:n])
    return [f for f in train_list if f.split("_")[0] in keep]


def split_for(name, source_folder, tune=False):
    """(training maps, validation maps) of a setting; ``tune``: the tuning split of its source."""
    src, _, n = SETTINGS[name]
    if src == "acdc":
        tr = _read_list(os.path.join(source_folder, "train.list"))
        if tune:
            seven = _acdc_frames_of_first_patients(tr, 7)
            three = _acdc_frames_of_first_patients(tr, 3)
            return three, [f for f in seven if f not in three]
        return _acdc_frames_of_first_patients(tr, n), _read_list(os.path.join(source_folder, "val.list"))
    ids = _read_list(os.path.join(source_folder, "train.list"))
    if tune:
        return ids[:8], ids[8:16]
    return ids[:n], ids[-LA_HELD_OUT:]


def _write_raw(raw_root, dataset_id, name, source, case_ids, labels, channel):
    """Copy the chosen cases into an nnU-Net raw dataset; return its folder."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    if os.path.isfile(os.path.join(folder, "dataset.json")):
        return folder
    os.makedirs(os.path.join(folder, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(folder, "labelsTr"), exist_ok=True)
    for cid in case_ids:
        shutil.copy(os.path.join(source, "images", cid + ".nii.gz"),
                    os.path.join(folder, "imagesTr", cid + "_0000.nii.gz"))
        shutil.copy(os.path.join(source, "labels", cid + ".nii.gz"), os.path.join(folder, "labelsTr", cid + ".nii.gz"))
    generate_dataset_json(folder, {0: channel}, labels=labels, num_training_cases=len(case_ids),
                          file_ending=".nii.gz", dataset_name=name,
                          description="nnunet_sud denoiser_quality benchmark subset")
    return folder


def run_setting(args, name, source_folder, configuration):
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

    from nnunet_sud.denoiser.trainer import VALIDATION_JSON, nnUNetTrainerLabelDenoiser

    src, dataset_id, _ = SETTINGS[name]
    train, held_out = split_for(name, source_folder)
    labels, channel = (ACDC_LABELS, "cineMRI") if src == "acdc" else (LA_LABELS, "MRI")
    _write_raw(os.environ["nnUNet_raw"], dataset_id, name, source_folder, train + held_out, labels, channel)
    full = f"Dataset{dataset_id:03d}_{name}"
    pre = os.path.join(os.environ["nnUNet_preprocessed"], full)
    t0 = time.time()
    if not os.path.isdir(os.path.join(pre, f"nnUNetPlans_{configuration}")):
        subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", configuration, "-np",
                        str(args.num_processes)], check=True, stdout=subprocess.DEVNULL)
    t_pre = time.time() - t0
    splits = [{"train": sorted(train), "val": sorted(held_out)}]
    fold = 0
    if name in (TUNE["acdc"][0], TUNE["la"][0]):
        tune_train, tune_val = split_for(name, source_folder, tune=True)
        splits.append({"train": sorted(tune_train), "val": sorted(tune_val)})
        fold = 1 if args.tune else 0
    save_json(splits, os.path.join(pre, "splits_final.json"))

    plans = load_json(os.path.join(pre, "nnUNetPlans.json"))
    plans["continue_training"] = False
    tr = nnUNetTrainerLabelDenoiser(plans, configuration, fold, load_json(os.path.join(pre, "dataset.json")),
                                    torch.device(args.device))
    for opt, attr in (("epochs", "num_epochs"), ("iterations", "num_iterations_per_epoch"),
                      ("batch_size", "denoiser_batch_size"), ("lr", "initial_lr"),
                      ("features_scale", "denoiser_features_scale"), ("optimizer", "denoiser_optimizer"),
                      ("eval_every", "denoiser_eval_every")):
        if getattr(args, opt) is not None:
            setattr(tr, attr, getattr(args, opt))
    done = os.path.join(tr.output_folder, VALIDATION_JSON)
    final_ckpt = os.path.join(tr.output_folder, "checkpoint_final.pth")
    if args.reuse and os.path.isfile(done):  # a finished run of the same command line
        res = load_json(done)
        seconds = "reused"
    else:
        t0 = time.time()
        if args.reuse and os.path.isfile(final_ckpt):  # trained, not yet validated
            tr.initialize()
            tr.load_checkpoint(final_ckpt)
            t_train = "reused"
        else:
            tr.run_training()
            t_train = round(time.time() - t0, 1)
        t0 = time.time()
        tr.perform_actual_validation()  # what nnUNetv2_train runs after training -> denoiser_validation.json
        seconds = {"plan_preprocess": round(t_pre, 1), "train": t_train,
                   "final_validation": round(time.time() - t0, 1)}
        res = load_json(done)
    return {"setting": name, "tune": bool(args.tune and fold == 1), "configuration": configuration,
            "train_maps": len(splits[fold]["train"]), "val_maps": len(splits[fold]["val"]),
            "schedule": res.get("schedule"), "network": res.get("network"),
            "corruption_train": res.get("corruption_train"), "seconds": seconds,
            "validation": res["final"], "history": res["history"], "model_folder": tr.output_folder}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--la", help="LA_lite folder (images/, labels/, train.list)")
    p.add_argument("--acdc", help="ACDC_lite folder (images/, labels/, train.list, val.list)")
    p.add_argument("--work", required=True, help="working folder (own nnUNet_raw/_preprocessed/_results)")
    p.add_argument("--settings", nargs="+", default=None, choices=sorted(SETTINGS),
                   help="default: all settings of the given sources (acdc3 acdc7 la8 la16)")
    p.add_argument("--tune", action="store_true",
                   help="report on the tuning split (a split of the training maps; runs acdc7 / la16 datasets "
                        "as fold 1: trained on the acdc3 / la8 maps)")
    p.add_argument("--la-config", default="2d", help="nnU-Net configuration for LA (default 2d; 3d_fullres is "
                                                     "far beyond a CPU budget)")
    p.add_argument("--acdc-config", default="2d", help="nnU-Net configuration for ACDC (default 2d)")
    p.add_argument("--epochs", type=int, default=None, help="override the trainer's num_epochs")
    p.add_argument("--iterations", type=int, default=None, help="override num_iterations_per_epoch")
    p.add_argument("--batch-size", type=int, default=None, help="override denoiser_batch_size")
    p.add_argument("--lr", type=float, default=None, help="override initial_lr")
    p.add_argument("--features-scale", type=float, default=None, help="override denoiser_features_scale")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default=None, help="override denoiser_optimizer")
    p.add_argument("--eval-every", type=int, default=None, help="override denoiser_eval_every (0: final only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see above)")
    p.add_argument("--num-processes", type=int, default=2, help="plan_and_preprocess processes")
    p.add_argument("--reuse", action="store_true",
                   help="report a setting whose denoiser_validation.json exists instead of training again; "
                        "one with only checkpoint_final.pth is validated without training")
    p.add_argument("--out", default=None, help="results JSON (default WORK/denoiser_quality[_tune].json)")
    args = p.parse_args(argv)
    if not args.la and not args.acdc:
        p.error("give --la and/or --acdc")

    work = os.path.abspath(args.work)
    for k, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        os.environ[k] = os.path.join(work, sub)
        os.makedirs(os.environ[k], exist_ok=True)
    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    os.environ.setdefault("nnUNet_compile", "false")
    import torch
    torch.set_num_threads(args.threads)
    from nnunet_sud.denoiser.evaluation import format_results

    sources = {"acdc": (args.acdc, args.acdc_config), "la": (args.la, args.la_config)}
    names = args.settings or [n for n in SETTINGS if sources[SETTINGS[n][0]][0]]
    if args.tune:
        names = [TUNE[s][0] for s in ("acdc", "la") if sources[s][0] and (args.settings is None or
                                                                          TUNE[s][0] in args.settings)]
    results = []
    for name in names:
        folder, cfg = sources[SETTINGS[name][0]]
        if not folder:
            p.error(f"setting {name} needs --{SETTINGS[name][0]}")
        results.append(run_setting(args, name, folder, cfg))
    out = args.out or os.path.join(work, "denoiser_quality_tune.json" if args.tune else "denoiser_quality.json")
    cmd = " ".join([os.path.relpath(sys.argv[0]) if sys.argv[0] else "benchmarks/denoiser_quality.py", *sys.argv[1:]])
    with open(out, "w") as f:
        json.dump({"command": cmd, "results": results}, f, indent=2, default=lambda x: None)
    for r in results:
        what = "tuning split (training maps)" if r["tune"] else "held-out maps"
        print(f"\n### {r['setting']} ({r['configuration']}): {r['train_maps']} training maps, {r['val_maps']} "
              f"{what}; schedule {r['schedule']}; network {r['network']}; corruption {r['corruption_train']}; "
              f"seconds {r['seconds']}\n")
        print(format_results(r["validation"], markdown=True))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
