"""A killed training can always go on (issue 15, item 3).

* Checkpoints are written under temporary names and renamed together: a crash while saving keeps
  the previous checkpoint, its extra state and its soft-target snapshot, loadable as they were.
* A checkpoint that cannot be resumed from (truncated checkpoint, truncated extra state, missing or
  mismatched snapshot) stops ``load_checkpoint`` with a CheckpointError naming the file and the
  fallback; following the fallback, nnU-Net's own ``--c`` logic resumes from checkpoint_best.
"""
import glob
import os

import pytest
import torch

from nnunet_sud.robust_training import CheckpointError, temporary_path
from test_soft_target_store import whole_case_batch

CASE = (4, 5, 6)


def make_te(synthetic3d, folder, continue_training=False):
    """A temporal-ensembling trainer (SUD's soft-target store, no denoiser) whose fold folder is ``folder``."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunet_sud.trainers import nnUNetTrainerTE
    pre = synthetic3d["preprocessed"]
    plans = load_json(os.path.join(pre, "nnUNetPlans.json"))
    plans["continue_training"] = continue_training
    t = nnUNetTrainerTE(plans, "3d_fullres", 0, load_json(os.path.join(pre, "dataset.json")), torch.device("cpu"))
    t.output_folder = str(folder)
    t.store.folder = os.path.join(str(folder), "soft_targets")
    os.makedirs(t.store.folder, exist_ok=True)
    return t


def set_store(t, value):
    b = whole_case_batch("case_a", CASE)
    t.store.write(b["keys"], b["coords"], b["valid"], b["case_shapes"], torch.full((1, 4, *CASE), value))


def stored(t):
    field = t.store.load_case("case_a")
    assert (field == field.flat[0]).all()
    return float(field.flat[0])


def first_weight(t):
    return next(iter(t.network.state_dict().values())).detach().clone()


def truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


@pytest.fixture
def two_checkpoints(synthetic3d, tmp_path):
    """checkpoint_best after epoch 0 (store 0.25), checkpoint_latest after epoch 1 (store 0.5)."""
    t = make_te(synthetic3d, tmp_path)
    t.initialize()
    set_store(t, 0.25)
    t.current_epoch = 0
    t.save_checkpoint(str(tmp_path / "checkpoint_best.pth"))
    set_store(t, 0.5)
    with torch.no_grad():
        next(iter(t.network.parameters())).add_(1.0)
    t.current_epoch = 1
    t.save_checkpoint(str(tmp_path / "checkpoint_latest.pth"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_best.pth", "checkpoint_best_extra_state.pth",
                                            "checkpoint_latest.pth", "checkpoint_latest_extra_state.pth",
                                            "soft_targets", "soft_targets_checkpoint_best",
                                            "soft_targets_checkpoint_latest"], "no temporary file is left"
    return t, tmp_path


def resume_with_c(synthetic3d, folder):
    """What ``nnUNetv2_train ... --c`` does: nnU-Net's own choice among final/latest/best, then load."""
    from nnunetv2.run.run_training import maybe_load_checkpoint
    r = make_te(synthetic3d, folder, continue_training=True)
    maybe_load_checkpoint(r, True, False)
    return r


def test_resume_restores_the_checkpoints_state(synthetic3d, two_checkpoints):
    t, folder = two_checkpoints
    r = resume_with_c(synthetic3d, folder)
    assert r.current_epoch == 2 and stored(r) == 0.5 and torch.equal(first_weight(r), first_weight(t))


@pytest.mark.parametrize("damage", ["truncated checkpoint", "truncated extra state", "missing snapshot",
                                    "snapshot of another epoch"])
def test_an_unusable_latest_checkpoint_names_the_file_and_the_fallback_that_works(synthetic3d, two_checkpoints,
                                                                                  damage):
    t, folder = two_checkpoints
    latest = str(folder / "checkpoint_latest.pth")
    snapshot = str(folder / "soft_targets_checkpoint_latest")
    if damage == "truncated checkpoint":
        culprit = latest
        truncate(latest)
    elif damage == "truncated extra state":
        culprit = str(folder / "checkpoint_latest_extra_state.pth")
        truncate(culprit)
    elif damage == "missing snapshot":
        culprit = snapshot
        os.rename(snapshot, str(folder / "elsewhere"))
    else:
        culprit = snapshot
        with open(os.path.join(snapshot, ".snapshot_epoch"), "w") as f:
            f.write("7")

    r = make_te(synthetic3d, folder, continue_training=True)
    with pytest.raises(CheckpointError) as e:
        r.load_checkpoint(latest)
    msg = str(e.value)
    assert culprit in msg
    assert f"rm -r {folder}/checkpoint_latest*" in msg and "resume from checkpoint_best.pth" in msg
    assert f"nnUNetv2_train {synthetic3d['name']} 3d_fullres 0 -tr nnUNetTrainerTE -p nnUNetPlans --c" in msg
    if damage == "truncated checkpoint":
        assert not r.was_initialized, "raised before the network is built"
    if damage == "snapshot of another epoch":
        assert "epoch 7" in msg and "epoch 2" in msg

    # the fallback the message gives works: without checkpoint_latest*, --c resumes from checkpoint_best
    for f in glob.glob(str(folder / "checkpoint_latest*")):
        os.remove(f)
    r = resume_with_c(synthetic3d, folder)
    assert r.current_epoch == 1 and stored(r) == 0.25


def test_without_another_checkpoint_the_message_says_to_start_anew(synthetic3d, two_checkpoints):
    _, folder = two_checkpoints
    for f in glob.glob(str(folder / "checkpoint_best*")):
        os.remove(f)
    os.remove(str(folder / "checkpoint_latest_extra_state.pth"))
    with pytest.raises(CheckpointError) as e:
        make_te(synthetic3d, folder, continue_training=True).load_checkpoint(str(folder / "checkpoint_latest.pth"))
    msg = str(e.value)
    assert "has no checkpoint_latest_extra_state.pth beside it" in msg
    assert f"No other checkpoint is left in {folder}" in msg and "start anew without --c" in msg


class SimulatedKill(BaseException):
    """Stands for SIGKILL: nothing after it runs (not even except-Exception handlers)."""


@pytest.mark.parametrize("renames_before_kill", [None, 0, 1, 2])
def test_a_save_killed_before_its_renames_keeps_the_previous_checkpoint(synthetic3d, two_checkpoints, monkeypatch,
                                                                          renames_before_kill):
    """None: killed while nnU-Net writes checkpoint_latest (half a file on disk); 0: killed with every
    file written under its temporary name; 1, 2: killed between the renames (snapshot, extra state,
    checkpoint; microseconds apart): the files are out of step, and --c says so and how to go on."""
    import nnunet_sud.robust_training as rt
    t, folder = two_checkpoints
    latest = str(folder / "checkpoint_latest.pth")
    saved_weight = first_weight(t)
    set_store(t, 0.75)
    with torch.no_grad():
        next(iter(t.network.parameters())).add_(1.0)
    t.current_epoch = 2

    if renames_before_kill is None:
        real_save = torch.save

        def save_and_die(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            if str(f) == temporary_path(latest):
                truncate(f)
                raise SimulatedKill
        monkeypatch.setattr(torch, "save", save_and_die)
    else:
        real_commit = rt.commit
        done = []

        def commit_or_die(tmp, final):
            if len(done) == renames_before_kill:
                raise SimulatedKill
            done.append(final)
            real_commit(tmp, final)
        monkeypatch.setattr(rt, "commit", commit_or_die)
    with pytest.raises(SimulatedKill):
        t.save_checkpoint(latest)
    monkeypatch.undo()
    assert os.path.isfile(temporary_path(latest)), "the interrupted write went to the temporary name"

    r = make_te(synthetic3d, folder, continue_training=True)
    if renames_before_kill in (None, 0):
        r.load_checkpoint(latest)
        assert r.current_epoch == 2 and stored(r) == 0.5 and torch.equal(first_weight(r), saved_weight)
    else:
        with pytest.raises(CheckpointError) as e:
            r.load_checkpoint(latest)
        culprit = "soft_targets_checkpoint_latest" if renames_before_kill == 1 else "checkpoint_latest_extra_state.pth"
        assert culprit in str(e.value) and "out of step" in str(e.value)
        assert "resume from checkpoint_best.pth" in str(e.value)
    # the next save cleans up: a fresh checkpoint_latest and no temporary files left
    set_store(t, 0.75)  # r restored the snapshot into the live store folder the two trainers share
    t.save_checkpoint(latest)
    assert not glob.glob(str(folder / "*.tmp")) and not glob.glob(str(folder / "*.old"))
    r = make_te(synthetic3d, folder, continue_training=True)
    r.load_checkpoint(latest)
    assert r.current_epoch == 3 and stored(r) == 0.75


def test_the_label_denoiser_saves_atomically_and_names_an_unreadable_checkpoint(synthetic3d, tmp_path):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunet_sud.denoiser.trainer import nnUNetTrainerLabelDenoiser
    pre = synthetic3d["preprocessed"]
    plans = load_json(os.path.join(pre, "nnUNetPlans.json"))
    plans["continue_training"] = False
    t = nnUNetTrainerLabelDenoiser(plans, "3d_fullres", 0, load_json(os.path.join(pre, "dataset.json")),
                                   torch.device("cpu"))
    t.output_folder = str(tmp_path)
    t.initialize()
    latest = str(tmp_path / "checkpoint_latest.pth")
    t.save_checkpoint(latest)
    assert os.listdir(tmp_path) == ["checkpoint_latest.pth"]
    truncate(latest)
    with pytest.raises(CheckpointError) as e:
        t.load_checkpoint(latest)
    assert latest in str(e.value) and "cannot be read" in str(e.value) and "start anew without --c" in str(e.value)
