"""A training that can be killed at any moment and resumed with ``--c``.

nnU-Net's ``save_checkpoint`` writes ``checkpoint_latest.pth`` in place, so a training killed while
writing it (``kill -9``, the OOM killer, a cluster's time limit, a full disk) leaves a truncated
file where the previous good checkpoint was.
``RobustTrainerMixin.save_checkpoint`` lets nnU-Net write through its own ``save_checkpoint``
to a temporary name (``<file>.tmp``), then moves it into place with ``os.replace``. Files that
belong to the checkpoint (our ``*_extra_state.pth``, SUD's soft-target snapshot) are written to
temporary names first too and handed over with ``stage_checkpoint_file``; all are renamed
together once everything is written, side files first, the checkpoint last. A kill at any point
before the renames leaves the previous checkpoint and its side files untouched (only the
renames themselves, microseconds apart, could be split; ``load_checkpoint`` then finds the files
out of step and says so). This protects against killed processes; it does not ``fsync``, so
after a power loss the file system's own guarantees apply.

When a checkpoint or a file beside it cannot be used, ``load_checkpoint`` raises a
``CheckpointError`` before anything is built or trained. Its message names the file, what is wrong
and the way forward: ``nnUNetv2_train --c`` takes ``checkpoint_final``, else ``checkpoint_latest``,
else ``checkpoint_best`` (nnunetv2's ``run_training.maybe_load_checkpoint``), so removing the
unusable checkpoint and its side files (``rm fold_X/checkpoint_latest*``) makes ``--c`` resume
from the next one.
"""
import os
import shutil
from typing import List, Optional, Tuple

import torch

from nnunet_sud.errors import UserFacingError

TMP_SUFFIX = ".tmp"
#: the order in which ``nnUNetv2_train --c`` looks for a checkpoint (nnunetv2 run_training.maybe_load_checkpoint)
RESUME_ORDER = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


class CheckpointError(UserFacingError):
    """A checkpoint, or a file that belongs to it, cannot be resumed from. The message names the file
    and says how to go on (``RobustTrainerMixin.unusable_checkpoint``)."""


# ---------------------------------------------------------------------------------------------- files
def temporary_path(path: str) -> str:
    """Where ``path`` is written before it is moved into place."""
    return path + TMP_SUFFIX


def commit(tmp: str, final: str) -> None:
    """Move the finished file or folder ``tmp`` onto ``final``. A file is replaced atomically; a folder
    is swapped by two renames (the old one goes to ``final + '.old'`` and is then removed)."""
    if os.path.isdir(tmp):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` to a temporary name, then rename: ``path`` is either the old file or the new one."""
    tmp = temporary_path(path)
    torch.save(obj, tmp)
    commit(tmp, path)


def describe_exception(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def unreadable(path: str) -> Optional[str]:
    """Why ``torch.load`` cannot read ``path`` (None: it can). Memory-maps the tensors where the file's
    format allows it, so checking a large checkpoint costs little more than reading its structure."""
    problem = None
    for kwargs in ({"mmap": True}, {}):  # mmap needs torch's zip format; older files are read in full
        try:
            torch.load(path, map_location="cpu", weights_only=False, **kwargs)
            return None
        except Exception as e:  # noqa: BLE001 - any failure to read is reported, with its type and message
            problem = describe_exception(e)
    return problem


def resume_advice(checkpoint_file: str, resume_command: str) -> str:
    """What to do when ``checkpoint_file`` cannot be resumed from: remove it with its side files, and
    ``--c`` takes the next checkpoint (``RESUME_ORDER``), or, when none is left, start anew."""
    folder, name = os.path.split(os.path.abspath(checkpoint_file))
    pattern = os.path.join(folder, os.path.splitext(name)[0]) + "*"
    remaining = [c for c in RESUME_ORDER if c != name and os.path.isfile(os.path.join(folder, c))]
    if remaining:
        return (f"To resume from {remaining[0]} instead, remove this checkpoint and its side files "
                f"(rm -r {pattern}) and run again: {resume_command}")
    return (f"No other checkpoint is left in {folder}: remove this one and its side files (rm -r {pattern}) and "
            f"start anew without --c.")


# ---------------------------------------------------------------------------------------------- trainers
class RobustTrainerMixin:
    """For nnU-Net trainers (put before ``nnUNetTrainer`` in the bases): atomic checkpoints and clear
    errors for checkpoints that cannot be resumed from (module docstring). Subclasses that write files belonging to a checkpoint write them to
    ``temporary_path(final)`` and call ``stage_checkpoint_file(tmp, final)`` before
    ``super().save_checkpoint``; code that finds a checkpoint unusable raises
    ``self.unusable_checkpoint(checkpoint_file, problem)``."""

    def resume_command(self) -> str:
        """The ``nnUNetv2_train ... --c`` command line that resumes this training."""
        return (f"nnUNetv2_train {self.plans_manager.dataset_name} {self.configuration_name} {self.fold} "
                f"-tr {type(self).__name__} -p {self.plans_manager.plans_name} --c")

    def unusable_checkpoint(self, checkpoint_file: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{problem.rstrip()} {resume_advice(checkpoint_file, self.resume_command())}")

    # ------------------------------------------------------------------ saving
    def stage_checkpoint_file(self, tmp: str, final: str) -> None:
        """Move ``tmp`` (file or folder) to ``final`` together with the checkpoint being saved."""
        staged: List[Tuple[str, str]] = self.__dict__.setdefault("_staged_checkpoint_files", [])
        staged.append((tmp, final))

    def save_checkpoint(self, filename: str) -> None:
        staged = self.__dict__.pop("_staged_checkpoint_files", [])
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)
            return
        tmp = temporary_path(filename)
        super().save_checkpoint(tmp)  # nnU-Net's own checkpoint, under a temporary name
        for t, final in staged + [(tmp, filename)]:
            commit(t, final)

    # ------------------------------------------------------------------ loading
    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if isinstance(filename_or_checkpoint, str):
            problem = unreadable(filename_or_checkpoint)
            if problem is not None:
                raise self.unusable_checkpoint(
                    filename_or_checkpoint, f"{filename_or_checkpoint} cannot be read ({problem}); it was probably "
                                            f"cut short by a killed process or a full disk.")
        super().load_checkpoint(filename_or_checkpoint)
