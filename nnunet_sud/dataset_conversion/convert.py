"""``nnunet-sud convert``: benchmark layouts and labeled/unlabeled folders -> nnU-Net raw datasets.

Sources (one sub-command each): ``folder``, ``la-h5``, ``acdc-h5``, ``kits19``, ``msd``. Every
conversion writes imagesTr/labelsTr (labeled), imagesUnlabeled, imagesTs(/labelsTs), a complete
dataset.json and ``split.json`` (the chosen labeled/unlabeled/test ids, seed, source, counts).
See docs/conversion.md for each layout.

Examples::

    nnunet-sud convert folder /data/LA_lite -d 501 --labeled 8 --seed 0
    nnunet-sud convert folder /data/ACDC_lite -d 502 --labeled 3 --group-regex '^(patient\\d+)_' \\
        --test-list val.list
    nnunet-sud convert la-h5 /data/LA -d 503 --labeled 16            # first 16 of train.list (UA-MT)
    nnunet-sud convert acdc-h5 /data/ACDC -d 504 --labeled 7 --select random --seed 1
    nnunet-sud convert kits19 /data/kits19 -d 505 --labeled 0.1 --num-test 40
    nnunet-sud convert msd /data/Task02_Heart -d 506 --labeled 4
"""
import argparse
import os

from nnunet_sud.errors import UserFacingError

SOURCES = ("folder", "la-h5", "acdc-h5", "kits19", "msd")


def _labeled_type(value: str) -> str:
    from nnunet_sud.dataset_conversion.split import normalize_labeled_request
    try:
        return normalize_labeled_request(value)
    except UserFacingError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_common(p: argparse.ArgumentParser, default_select: str) -> None:
    p.add_argument("source", help="the source folder")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id of the result (1-999)")
    p.add_argument("--name", default=None, help="dataset name (DatasetXXX_NAME); default derived from the source")
    p.add_argument("-o", "--raw-folder", default=None, help="where to write (default $nnUNet_raw)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing raw dataset with this id (its folder is deleted once the new one is "
                        "complete)")
    g = p.add_argument_group("split")
    g.add_argument("--labeled", type=_labeled_type, default="all",
                   help="labeled cases (groups, with grouping) to keep: a count (8), a fraction (0.1), a percentage "
                        "(10%%) or 'all' (default). The other labeled cases become unlabeled (labels withheld).")
    g.add_argument("--seed", type=int, default=0, help="seed of the random labeled selection (default 0)")
    g.add_argument("--select", choices=("random", "first"), default=None,
                   help=f"'random': seeded draw; 'first': the first N in the source's order (list order or "
                        f"sorted ids). Default here: {default_select}")
    g.add_argument("--test-list", default=None,
                   help="text file of case ids (one per line) for imagesTs/labelsTs; relative paths are tried "
                        "in the current folder, then in the source folder")
    g.add_argument("--num-test", type=int, default=0,
                   help="draw this many (fully labeled) cases/groups at random for the test set")
    g.add_argument("--test-seed", type=int, default=0,
                   help="seed of --num-test, independent of --seed so all labeled subsets share one test set")
    g.add_argument("--split-file", default=None,
                   help="reuse the labeled and test ids of an earlier split.json instead of choosing")
    g.add_argument("--no-cv-splits", action="store_true",
                   help="with grouped cases, do not write the grouped splits_final.json into $nnUNet_preprocessed "
                        "(it is always written into the raw dataset folder)")
    p.add_argument("-np", "--num-processes", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--geometry-tolerance", type=float, default=1e-4,
                   help="allowed difference of spacing/origin (mm) and direction between image and label "
                        "(default 1e-4)")


def add_parser(sub) -> None:
    """Register ``convert`` and its per-source sub-commands."""
    intro = "\n\n".join(__doc__.split("\n\n")[:2]).replace("``", "")
    p = sub.add_parser("convert", help="convert a benchmark layout or a labeled/unlabeled folder to nnU-Net raw",
                       description=intro, formatter_class=argparse.RawDescriptionHelpFormatter)
    ss = p.add_subparsers(dest="source_type", metavar="SOURCE_TYPE")
    ss.required = True

    f = ss.add_parser("folder", help="images/ + labels/ (labels for some cases), any nnU-Net image format")
    _add_common(f, "random")
    f.add_argument("--images-dir", default=None, help="image folder (default: images/ or imagesTr/ in the source)")
    f.add_argument("--labels-dir", default=None, help="label folder (default: labels/ or labelsTr/ in the source)")
    f.add_argument("--train-list", default=None,
                   help="only these case ids (one per line) form the training pool, in this order ('first' "
                        "selection takes the first N); images in neither this nor the test list are left out")
    f.add_argument("--group-regex", default=None,
                   help="group cases (e.g. by patient): the regex's first capture group is the group key, e.g. "
                        "'^(patient\\d+)_'. Groups stay on one side of every split; --labeled counts groups.")
    f.add_argument("--channel-names", nargs="+", default=None,
                   help="dataset.json channel names, e.g. MRI, or T2 ADC; 'CT' selects nnU-Net's CT normalisation")
    f.add_argument("--label-names", nargs="+", default=None,
                   help="class names for values 0, 1, ... starting with background (default: label_<value> for "
                        "every value found)")
    f.add_argument("--file-ending", default=None, help="use only files with this ending (e.g. .nii.gz)")
    f.add_argument("--channel-suffix", choices=("auto", "yes", "no"), default="auto",
                   help="images named CASE_0000<ending> (yes), CASE<ending> (no) or detect (auto)")
    f.add_argument("--drop-unlabeled-images", action="store_true",
                   help="leave out images that have no label instead of adding them to imagesUnlabeled")
    f.set_defaults(func=_run_folder)

    la = ss.add_parser("la-h5", help="UA-MT / SSL4MIS Left Atrium: <ID>/mri_norm2.h5, train.list, test.list")
    _add_common(la, "first")
    la.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                    help="spacing (mm) when the h5 files store none (default 0.625 0.625 0.625)")
    la.add_argument("--h5-name", default="mri_norm2.h5", help="h5 file name inside each case folder")
    la.add_argument("--cases-dir", default=None, help="folder holding the <ID> folders (default: auto-detected)")
    la.add_argument("--axes", choices=("xyz", "zyx"), default="xyz", help="axis order of the h5 arrays (xyz)")
    la.set_defaults(func=_run_la)

    ac = ss.add_parser("acdc-h5", help="SSL4MIS ACDC: data/patientXXX_frameYY.h5 (+ data/slices), *.list")
    _add_common(ac, "first")
    ac.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                    help="nominal spacing (mm), in-plane x y then slice distance (default 1.5625 1.5625 10)")
    ac.add_argument("--group-regex", default=None, help="patient grouping (default '^(patient\\d+)')")
    ac.add_argument("--val-to", choices=("exclude", "test", "unlabeled", "pool"), default="exclude",
                    help="what val.list becomes (default exclude)")
    ac.add_argument("--axes", choices=("xyz", "zyx"), default="zyx", help="axis order of the h5 arrays (zyx)")
    ac.set_defaults(func=_run_acdc)

    k = ss.add_parser("kits19", help="KiTS19: case_XXXXX/imaging.nii.gz, segmentation.nii.gz")
    _add_common(k, "random")
    k.add_argument("--no-regions", action="store_true",
                   help="plain labels kidney 1, tumor 2 instead of the regions kidney={1,2}, tumor={2}")
    k.add_argument("--drop-unlabeled-images", action="store_true",
                   help="leave out cases without segmentation instead of adding them to imagesUnlabeled")
    k.set_defaults(func=_run_kits)

    m = ss.add_parser("msd", help="Medical Segmentation Decathlon task folder (via nnU-Net's converter)")
    _add_common(m, "random")
    m.add_argument("--imagests-to", choices=("unlabeled", "test", "exclude"), default="unlabeled",
                   help="what the task's unlabeled imagesTs become (default unlabeled)")
    m.set_defaults(func=_run_msd)


def _resolve_list(path: str, source: str) -> str:
    if path is None or os.path.isfile(path) or os.path.isabs(path):
        return path
    alt = os.path.join(source, path)
    return alt if os.path.isfile(alt) else path


def _options(args):
    from nnunet_sud.dataset_conversion.split import SplitOptions, read_id_list
    from nnunet_sud.dataset_conversion.writer import OutputOptions
    test_list = _resolve_list(args.test_list, args.source)
    split = SplitOptions(labeled=args.labeled, seed=args.seed, select=args.select,
                         test_ids=read_id_list(test_list, "--test-list") if test_list else None,
                         num_test=args.num_test, test_seed=args.test_seed, split_file=args.split_file)
    if args.num_test < 0:
        raise UserFacingError("--num-test must be >= 0")
    out = OutputOptions(dataset_id=args.dataset_id, name=args.name, raw_folder=args.raw_folder,
                        overwrite=args.overwrite, num_processes=args.num_processes,
                        geometry_tolerance=args.geometry_tolerance, install_cv_splits=not args.no_cv_splits,
                        command=_command_line())
    return split, out


def _command_line() -> str:
    """This invocation as a ``nnunet-sud convert ...`` line (for split.json)."""
    import shlex
    import sys
    argv = sys.argv[1:]
    if argv[:1] == ["convert"]:
        argv = argv[1:]
    return " ".join(["nnunet-sud", "convert", *map(shlex.quote, argv)])


def _run_folder(args) -> int:
    from nnunet_sud.dataset_conversion.folder import convert_folder
    from nnunet_sud.dataset_conversion.split import read_id_list
    split, out = _options(args)
    train_list = _resolve_list(args.train_list, args.source)
    print(convert_folder(args.source, out, split, images_dir=args.images_dir, labels_dir=args.labels_dir,
                         train_ids=read_id_list(train_list, "--train-list") if train_list else None,
                         group_regex=args.group_regex, channel_names=args.channel_names,
                         label_names=args.label_names, file_ending=args.file_ending,
                         channel_suffix=args.channel_suffix, drop_unlabeled_images=args.drop_unlabeled_images))
    return 0


def _run_la(args) -> int:
    from nnunet_sud.dataset_conversion.h5_layouts import LA_SPACING, convert_la_h5
    split, out = _options(args)
    print(convert_la_h5(args.source, out, split, h5_name=args.h5_name, spacing=args.spacing or LA_SPACING,
                        cases_dir=args.cases_dir, axes=args.axes))
    return 0


def _run_acdc(args) -> int:
    from nnunet_sud.dataset_conversion.h5_layouts import ACDC_GROUP_REGEX, ACDC_SPACING, convert_acdc_h5
    split, out = _options(args)
    print(convert_acdc_h5(args.source, out, split, spacing=args.spacing or ACDC_SPACING,
                          group_regex=args.group_regex or ACDC_GROUP_REGEX, val_to=args.val_to, axes=args.axes))
    return 0


def _run_kits(args) -> int:
    from nnunet_sud.dataset_conversion.folder import convert_kits19
    split, out = _options(args)
    print(convert_kits19(args.source, out, split, regions=not args.no_regions,
                         drop_unlabeled_images=args.drop_unlabeled_images))
    return 0


def _run_msd(args) -> int:
    from nnunet_sud.dataset_conversion.msd import convert_msd
    split, out = _options(args)
    print(convert_msd(args.source, out, split, imagests_to=args.imagests_to))
    return 0


def main(argv=None) -> int:
    """Stand-alone entry (``python -m nnunet_sud.dataset_conversion.convert folder ...``)."""
    import sys
    parser = argparse.ArgumentParser(prog="nnunet-sud")
    sub = parser.add_subparsers(dest="command")
    sub.required = True
    add_parser(sub)
    args = parser.parse_args(["convert", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except UserFacingError as e:
        print(f"nnunet-sud convert: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
