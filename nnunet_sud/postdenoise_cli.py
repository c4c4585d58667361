"""``nnunet-sud build-postdenoise``: a post-denoise model folder from a trained segmenter + denoiser.

    nnunet-sud build-postdenoise -d DATASET -c CFG -f FOLD [-tr nnUNetTrainer] [-p nnUNetPlans]
    nnUNetv2_predict ... -d DATASET -c CFG -f FOLD -tr nnUNetTrainerPostDenoise

Writes ``nnUNet_results/DatasetXXX/nnUNetTrainerPostDenoise__<plans>__<cfg>/fold_<F>`` whose
network is the trained segmenter followed by the trained label denoiser (SUD's "post-denoise"
baseline), without retraining. See ``nnunet_sud.trainers.post_denoise``.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("build-postdenoise",
                       help="compose a trained segmenter and the trained label denoiser into a "
                            "nnUNetTrainerPostDenoise model folder (no training)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("-d", "--dataset", required=True, help="dataset name or id")
    p.add_argument("-c", "--configuration", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-f", "--fold", required=True, help="fold (0-4 or 'all')")
    p.add_argument("-tr", "--trainer", default="nnUNetTrainer",
                   help="trainer of the segmenter to compose (default nnUNetTrainer)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth",
                   help="segmenter checkpoint file name (default checkpoint_final.pth)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing post-denoise checkpoint")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from nnunet_sud.trainers.post_denoise import build_postdenoise_model_folder
    fold = args.fold if args.fold == "all" else int(args.fold)
    out = build_postdenoise_model_folder(args.dataset, args.configuration, fold, args.trainer, args.plans,
                                         args.checkpoint, args.overwrite)
    print(f"written {out}; predict with: nnUNetv2_predict -i INPUT -o OUTPUT -d {args.dataset} "
          f"-c {args.configuration} -f {args.fold} -tr nnUNetTrainerPostDenoise -p {args.plans}")
    return 0
