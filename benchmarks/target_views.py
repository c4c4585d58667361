"""What SUD-type targets are made of, on whole preprocessed slices of unlabeled cases with labels.

For a trained segmenter and a trained label-map denoiser, on the preprocessed unlabeled cases that
have a label (``labelsUnlabeled``, preprocessed by ``nnunet-sud preprocess-unlabeled``), without
augmentation or test-time mirroring:

    f                 the segmenter's softmax (nnU-Net's sliding window)
    a(f)              the denoiser on f (SUD's spatial denoising, Young et al. eq. 8 with beta = 1)
    SUD mix           beta a(f) + (1 - beta) f, ``--beta`` (default 0.05: SUD's beta = 0.2 / lambda_max at
                      its default lambda_max 4; 0.2 for the ``_lambda1`` variants)
    a(a(a(f)))        three noise-free denoiser passes (SUD^2's multi-step change alone)
    a(F_1(f))         one pass after noise sigma = 1 (SUD^2's eq. 9, Chan, Young, Metzler)
    R(F(f))           three passes at sigma 1, 0.5, 0 (SUD^2's multi-step denoising)
    a(y)              the denoiser on the reference label map itself: does it keep clean maps it never
                      saw (the sigma = 0 check of the denoiser's validation, here on held-out maps)

and prints, per map, the mean per-case Dice per class, the pooled Dice and the pooled volume over the
reference volume (over-segmentation) against the labels, plus the mean total-variation distance of
each map to a(f) (how far a variant moves the target), and where f's false positives lie (on
slices without reference foreground, or farther than ``--far-mm`` from it). Without ``--denoiser``
only f is scored: segmenters compared on the same cases.
Use it on unlabeled cases of the training pool whose labels were withheld (``labelsUnlabeled``),
never on the test cases. Example (the acdc3 setting of ``benchmarks/ssl_quality.py``, run 1; every
7th unlabeled patient):

    nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=... nnUNet_extTrainer=... \\
    python benchmarks/target_views.py -d 611 -c 2d -f all -tr nnUNetTrainerSUD_bench_run1 \\
        --denoiser $nnUNet_results/Dataset611_SSLQ_acdc3/nnUNetTrainerLabelDenoiser_bench_run1__nnUNetPlans__2d/fold_all \\
        --group-regex '^(patient\\d+)_' --every 7
"""
import argparse
import json
import os
import re
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MAPS = ("f", "a(f)", "SUD mix", "a(a(a(f)))", "a(F_1(f))", "R(F(f)) 1,.5,0", "a(y)")


def select_cases(keys, group_regex, every):
    """Every ``every``-th group (patient) of the sorted keys, all of its cases."""
    groups = sorted({re.match(group_regex, k).group(1) if group_regex else k for k in keys})[::every]
    return [k for k in sorted(keys) if (re.match(group_regex, k).group(1) if group_regex else k) in groups]


def pad_to_patch(p: torch.Tensor, patch):
    """p (C, Z, *S): pad S to at least the patch with background; returns (padded, crop)."""
    pads, crop = [], [slice(None), slice(None)]
    for n, q in zip(p.shape[2:], patch):
        d = max(0, q - n)
        pads.append((d // 2, d - d // 2))
        crop.append(slice(d // 2, d // 2 + n))
    flat = [v for pr in reversed(pads) for v in pr]
    out = torch.nn.functional.pad(p, flat, value=0.0)
    out[0][out.sum(0) == 0] = 1.0
    return out, tuple(crop)


def denoise_case(ev, p: torch.Tensor, sigma: float = 0.0, generator=None) -> torch.Tensor:
    """The denoiser's softmax for a whole case ``p`` (C, Z, *S) of a 2d configuration (``ev``: a
    ``DenoiserEvaluator``). Its input is what it was trained on, slice by slice: the clipped-log
    encoding (``denoiser_input``; sigma = 0) or the training corruption with 2d noise per slice
    (``corrupt_probabilities``, sigma > 0, s = 1); both normalise over the class axis, which is axis 1
    of the (Z, C, *S) slice batch."""
    from nnunet_sud.denoiser.corruption import corrupt_probabilities, denoiser_input
    slices = p.transpose(0, 1)
    x = corrupt_probabilities(slices, sigma, 1.0, generator=generator) if sigma > 0 else denoiser_input(slices)
    return torch.softmax(ev.denoise(x.transpose(0, 1)), 0)


def count_false_positives(acc: dict, pred_fg: np.ndarray, ref_fg: np.ndarray, in_plane, far_mm: float) -> None:
    """Add one case's false-positive locations to ``acc``: per slice (axis 0) of the (Z, Y, X)
    foreground masks, false positives on slices without reference foreground, and those farther
    than ``far_mm`` (in-plane distance, ``in_plane`` spacing) from it on the other slices."""
    from scipy.ndimage import distance_transform_edt
    wrong = pred_fg & ~ref_fg
    acc["predicted"] += int(pred_fg.sum())
    acc["false_positive"] += int(wrong.sum())
    for z in range(ref_fg.shape[0]):
        acc["slices"] += 1
        if not ref_fg[z].any():
            acc["slices_without_reference"] += 1
            acc["of_them_predicted"] += int(pred_fg[z].any())
            acc["on_slices_without_reference"] += int(wrong[z].sum())
        else:
            acc["far"] += int((wrong[z] & (distance_transform_edt(~ref_fg[z], sampling=in_plane) > far_mm)).sum())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-d", required=True, help="dataset name or id")
    ap.add_argument("-c", required=True, help="configuration (2d: the denoiser runs per slice)")
    ap.add_argument("-f", default="all", help="fold of the segmenter")
    ap.add_argument("-tr", required=True, help="segmenter trainer")
    ap.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    ap.add_argument("--denoiser", default=None,
                    help="denoiser checkpoint or fold folder (without it: the segmenter's f only, e.g. to "
                         "compare segmenters on the pool validation split)")
    ap.add_argument("--group-regex", default=None, help="regex whose group 1 names a case's group (patient)")
    ap.add_argument("--every", type=int, default=1, help="use every N-th group of the labelled unlabeled cases")
    ap.add_argument("--beta", type=float, default=0.05,
                    help="share of a(f) in the SUD mix row (the segmenter's trainer's beta; default 0.05)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the noise of the noisy variants")
    ap.add_argument("--far-mm", type=float, default=15.0,
                    help="false positives of f farther than this (mm, in-plane) from the reference count as far")
    ap.add_argument("-o", default=None, help="write per-case results to this JSON file")
    a = ap.parse_args(argv)
    if not 0.0 <= a.beta <= 1.0:
        ap.error(f"--beta must be in [0, 1] (the share of a(f) in SUD's target), got {a.beta}")

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results
    from nnunet_sud.denoiser.evaluation import DenoiserEvaluator
    from nnunet_sud.denoiser.loading import load_denoiser_checkpoint
    from nnunet_sud.unlabeled.loader import cases_with_labels, open_case_label, unlabeled_identifiers
    from nnunet_sud.unlabeled.preprocess import unlabeled_folder_name

    dname = maybe_convert_to_dataset_name(a.d)
    model = os.path.join(nnUNet_results, dname, f"{a.tr}__{a.p}__{a.c}")
    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                           perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                           allow_tqdm=False)
    pred.initialize_from_trained_model_folder(model, (a.f if a.f == "all" else int(a.f),), "checkpoint_final.pth")
    ev, patch, names_of_maps = None, pred.configuration_manager.patch_size, MAPS[:1]
    if a.denoiser:
        ckpt = a.denoiser if a.denoiser.endswith(".pth") else os.path.join(a.denoiser, "checkpoint_final.pth")
        den, info = load_denoiser_checkpoint(ckpt)
        ev = DenoiserEvaluator(den, info["plans_manager"], info["configuration_manager"], info["dataset_json"],
                               torch.device("cpu"))
        patch, names_of_maps = info["configuration_manager"].patch_size, MAPS
    folder = os.path.join(nnUNet_preprocessed, dname,
                          unlabeled_folder_name(pred.configuration_manager.data_identifier))
    ds = infer_dataset_class(folder)(folder, unlabeled_identifiers(folder))
    keys = select_cases(cases_with_labels(folder, ds.identifiers), a.group_regex, a.every)
    if not keys:
        raise SystemExit(f"no unlabeled case with a label in {folder} (labelsUnlabeled)")
    labels = [int(x) for x in pred.label_manager.foreground_labels]
    gen = torch.Generator().manual_seed(a.seed)

    def denoise(p, sigma=0.0):
        return denoise_case(ev, p, sigma, gen)

    per_case = {m: [] for m in names_of_maps}
    move = {m: [] for m in names_of_maps}
    inter = {m: np.zeros(len(labels)) for m in names_of_maps}
    total = {m: np.zeros(len(labels)) for m in names_of_maps}
    ref_total = np.zeros(len(labels))
    false_pos = dict(predicted=0, false_positive=0, on_slices_without_reference=0, far=0, slices=0,
                     slices_without_reference=0, of_them_predicted=0)
    in_plane = [float(v) for v in pred.configuration_manager.spacing[-2:]]
    for k in keys:
        data, _, _, _ = ds.load_case(k)
        seg = np.asarray(open_case_label(folder, k))[0]
        seg = np.where(seg < 0, 0, seg)
        with torch.no_grad():
            f = torch.softmax(pred.predict_logits_from_preprocessed_data(torch.from_numpy(np.asarray(data))).float(), 0)
            fp, crop = pad_to_patch(f, patch)
            maps = {"f": fp}
            if ev is not None:
                af = denoise(fp)
                maps.update({"a(f)": af, "SUD mix": a.beta * af + (1 - a.beta) * fp, "a(a(a(f)))": denoise(denoise(af)),
                             "a(F_1(f))": denoise(fp, 1.0), "R(F(f)) 1,.5,0": denoise(denoise(denoise(fp, 1.0), 0.5))})
                y = torch.nn.functional.one_hot(torch.from_numpy(seg).long(), f.shape[0]).movedim(-1, 0).float()
                maps["a(y)"] = denoise(pad_to_patch(y, patch)[0])
        for m, v in maps.items():
            v = v[crop]
            move[m].append(float((v - af[crop]).abs().sum(0).mean() / 2) if ev is not None else float("nan"))
            s = v.argmax(0).numpy()
            dices = []
            for i, c in enumerate(labels):
                tp, n_p, n_r = np.sum((s == c) & (seg == c)), np.sum(s == c), np.sum(seg == c)
                inter[m][i] += tp
                total[m][i] += n_p
                dices.append(2 * tp / (n_p + n_r) if n_p + n_r else np.nan)
            per_case[m].append(dices)
        ref_total += [np.sum(seg == c) for c in labels]
        count_false_positives(false_pos, maps["f"][crop].argmax(0).numpy() > 0, seg > 0, in_plane, a.far_mm)
        print(k, " ".join(f"{m}: {np.nanmean(per_case[m][-1]):.3f}" for m in names_of_maps), flush=True)

    names = "/".join(str(v) for v in labels)
    print(f"\n{a.tr} on {len(keys)} labelled unlabeled cases (whole slices, no mirroring)\n")
    print(f"| map | mean case Dice {names} | mean | pooled Dice {names} | volume / reference {names} "
          "| mean TV distance to a(f) |")
    print("|---|---|---:|---|---|---:|")
    for m in names_of_maps:
        row = f"SUD mix, beta {a.beta:g}" if m == "SUD mix" else m
        pc = np.nanmean(np.array(per_case[m], float), 0)
        pooled = 2 * inter[m] / (total[m] + ref_total)
        print(f"| {row} | {'/'.join(f'{v:.3f}' for v in pc)} | {np.nanmean(pc):.3f} | "
              f"{'/'.join(f'{v:.3f}' for v in pooled)} | {'/'.join(f'{v:.2f}' for v in total[m] / ref_total)} "
              f"| {np.mean(move[m]):.4f} |")
    print(f"\nWhere f's false positives are (any foreground class predicted where the reference is background): "
          f"{false_pos['false_positive']} of {false_pos['predicted']} predicted foreground voxels "
          f"({false_pos['false_positive'] / max(false_pos['predicted'], 1):.1%}); of them "
          f"{false_pos['on_slices_without_reference'] / max(false_pos['false_positive'], 1):.1%} on the "
          f"{false_pos['slices_without_reference']} of {false_pos['slices']} slices without reference foreground "
          f"({false_pos['of_them_predicted']} of which get a prediction), "
          f"{false_pos['far'] / max(false_pos['false_positive'], 1):.1%} more than {a.far_mm:g} mm (in-plane) from the reference "
          "on slices with reference foreground")
    if a.o:
        with open(a.o, "w") as fh:
            json.dump({"trainer": a.tr, "beta": a.beta, "cases": keys, "labels": labels, "per_case": per_case, "move": move}, fh)


if __name__ == "__main__":
    main()
