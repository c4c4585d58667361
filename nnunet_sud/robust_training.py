"""A training that can be killed at any moment and resumed with ``--c``.

Two things go wrong when a training process dies abruptly (``kill -9``, the OOM killer, a
cluster's time limit, a crash mid-write):

* **Checkpoints.** nnU-Net's ``save_checkpoint`` writes ``checkpoint_latest.pth`` in place, so a
  process killed while writing leaves a truncated file where the previous good checkpoint was.
  ``RobustTrainerMixin.save_checkpoint`` lets nnU-Net write through its own ``save_checkpoint``
  to a temporary name (``<file>.tmp``), then moves it into place with ``os.replace``. Files that
  belong to the checkpoint (our ``*_extra_state.pth``, SUD's soft-target snapshot) are written to
  temporary names first too and handed over with ``stage_checkpoint_file``; all are renamed
  together once everything is written, side files first, the checkpoint last. A kill at any point
  before the renames leaves the previous checkpoint and its side files untouched (only the
  renames themselves, microseconds apart, could be split; ``load_checkpoint`` then finds the files
  out of step and says so). This protects against killed processes; it does not ``fsync``, so
  after a power loss the file system's own guarantees apply.
* **Workers.** batchgenerators' augmenters (``NonDetMultiThreadedAugmenter``,
  ``MultiThreadedAugmenter``) fork worker processes that loop until their parent sets an abort
  event. A parent killed by SIGKILL never sets it, and the workers go on, each holding its share of
  memory and a CPU, for as long as nobody kills them. ``workers_die_with_parent`` makes every
  process forked inside it die with the process that forked it; ``RobustTrainerMixin`` wraps
  nnU-Net's ``get_dataloaders`` (labeled training and validation streams) in it, and the
  semi-supervised base class wraps the start of its unlabeled stream.

When a checkpoint or a file beside it cannot be used, ``load_checkpoint`` raises a
``CheckpointError`` before anything is built or trained. Its message names the file, what is wrong
and the way forward: ``nnUNetv2_train --c`` takes ``checkpoint_final``, else ``checkpoint_latest``,
else ``checkpoint_best`` (nnunetv2's ``run_training.maybe_load_checkpoint``), so removing the
unusable checkpoint and its side files (``rm fold_X/checkpoint_latest*``) makes ``--c`` resume
from the next one.
"""
import contextlib
import ctypes
import os
import shutil
import signal
import sys
import threading
import time
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


# ---------------------------------------------------------------------------------------------- workers
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: seconds between two looks at the parent in the fallback watch (no prctl)
PARENT_POLL_SECONDS = 0.5
#: use prctl(PR_SET_PDEATHSIG) where available (tests switch it off to exercise the fallback)
USE_PRCTL = True
_scope = {"depth": 0, "parent": None, "hook": False}


def _kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def _arm_parent_death_signal() -> bool:
    """prctl(PR_SET_PDEATHSIG, SIGKILL) through libc (Linux; no extra package). True when armed."""
    if not (USE_PRCTL and sys.platform.startswith("linux")):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    """Fallback: a daemon thread that kills this process once its parent is gone (it is re-parented)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        _kill_self()
    threading.Thread(target=watch, name="nnunet_sud-parent-watch", daemon=True).start()


def _after_fork_in_child() -> None:
    if _scope["depth"] == 0:
        return
    parent = _scope["parent"]
    _scope["depth"] = 0  # this child's own children are not covered unless it opens a scope itself
    if not _arm_parent_death_signal():
        _watch_parent(parent)
    if os.getppid() != parent:  # the parent died before the signal was armed
        _kill_self()


@contextlib.contextmanager
def workers_die_with_parent():
    """Every process forked (``os.fork``, multiprocessing's 'fork' start method, Linux's default up to
    Python 3.13) while this context is open dies when the process that opened it dies, however it dies.

    Linux: the child arms ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` right after the fork (through ctypes);
    the kernel delivers it when the forking thread ends, so open the context in the thread that lives
    as long as the workers should (the training's). Elsewhere, or when prctl fails, a daemon thread in
    the child polls ``os.getppid()`` every ``PARENT_POLL_SECONDS``. Re-entrant; forks outside any open
    context are left alone, and so are processes started by 'spawn' or 'forkserver' (not forked from
    this process; Windows has no fork: there the context does nothing).
    """
    if not _scope["hook"] and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _scope["hook"] = True
    if _scope["depth"] == 0:
        _scope["parent"] = os.getpid()
    _scope["depth"] += 1
    try:
        yield
    finally:
        _scope["depth"] -= 1


# ---------------------------------------------------------------------------------------------- trainers
class RobustTrainerMixin:
    """For nnU-Net trainers (put before ``nnUNetTrainer`` in the bases): atomic checkpoints, clear
    errors for checkpoints that cannot be resumed from, augmentation workers that die with the
    training (module docstring). Subclasses that write files belonging to a checkpoint write them to
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
        self.complete_checkpoint_file(tmp)
        for t, final in staged + [(tmp, filename)]:
            commit(t, final)

    def complete_checkpoint_file(self, path: str) -> None:
        """Hook: add to nnU-Net's checkpoint at ``path`` (still under its temporary name, before it is
        renamed into place). Default: nothing."""

    # ------------------------------------------------------------------ loading
    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if isinstance(filename_or_checkpoint, str):
            problem = unreadable(filename_or_checkpoint)
            if problem is not None:
                raise self.unusable_checkpoint(
                    filename_or_checkpoint, f"{filename_or_checkpoint} cannot be read ({problem}); it was probably "
                                            f"cut short by a killed process or a full disk.")
        super().load_checkpoint(filename_or_checkpoint)

    # ------------------------------------------------------------------ workers
    def get_dataloaders(self):
        with workers_die_with_parent():
            return super().get_dataloaders()
