"""Where nnU-Net finds our trainers.

``nnUNet_extTrainer`` (nnunetv2 >= 2.8) lists folders, separated by os.pathsep, that
``nnUNetv2_train`` and ``nnUNetv2_predict`` search for trainer classes after nnU-Net's own.
nnU-Net imports every module of those folders as a top-level module and removes it from
``sys.modules`` afterwards, so classes *defined* there cannot be pickled. Our folder therefore
holds only thin modules that re-export classes defined inside the installed ``nnunet_sud``
package: their ``__module__`` stays ``nnunet_sud.trainers....`` and they pickle normally.
"""
import os

TRAINER_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nnunet_trainers")


def trainer_path() -> str:
    """The folder to put into ``nnUNet_extTrainer``."""
    return TRAINER_FOLDER


def ext_trainer_value(existing: str = None) -> str:
    """``nnUNet_extTrainer`` with our folder appended (kept once, user folders first)."""
    existing = os.environ.get("nnUNet_extTrainer", "") if existing is None else existing
    parts = [p for p in existing.split(os.pathsep) if p]
    if TRAINER_FOLDER not in parts:
        parts.append(TRAINER_FOLDER)
    return os.pathsep.join(parts)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "trainer-path",
        help="print the folder to add to nnUNet_extTrainer",
        description="Prints the folder holding nnunet_sud's trainers for nnU-Net's trainer search. "
                    "Add to your shell set-up:  export nnUNet_extTrainer=\"$(nnunet-sud trainer-path --append)\"",
    )
    p.add_argument("--append", action="store_true",
                   help="print the current $nnUNet_extTrainer with our folder appended")
    p.set_defaults(func=lambda args: print(ext_trainer_value() if args.append else trainer_path()))
