"""The ``nnunet-sud`` command.

Each subcommand lives in the module that implements it; that module defines
``add_parser(subparsers)`` which registers its arguments and sets ``func`` (called with the
parsed namespace). Heavy imports (torch, nnunetv2) stay inside those ``func``s so that
``nnunet-sud --help`` and ``nnunet-sud trainer-path`` answer quickly.
"""
import argparse
import importlib
import sys

# order = order in --help
COMMAND_MODULES = [
    "nnunet_sud.demo",                           # demo
    "nnunet_sud.paths",                          # trainer-path
    "nnunet_sud.dataset_conversion.synthetic",   # synthetic
    "nnunet_sud.dataset_conversion.convert",     # convert
    "nnunet_sud.unlabeled.preprocess",           # preprocess-unlabeled
    "nnunet_sud.denoiser.preprocess",            # preprocess-denoiser-labels
    "nnunet_sud.evaluation.evaluate",            # evaluate
    "nnunet_sud.evaluation.compare",             # compare
    "nnunet_sud.postdenoise_cli",                # build-postdenoise
    "nnunet_sud.self_training.pipeline",         # self-train
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-sud",
        description="Semi-supervised nnU-Net v2: supervision by denoising and relatives.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        ret = args.func(args)
    except UserFacingError as e:
        print(f"nnunet-sud {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(ret or 0)


from nnunet_sud.errors import UserFacingError  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
