"""A killed training can always go on.

* Checkpoints are written under temporary names and renamed together: a crash while saving keeps
  the previous checkpoint, its extra state and its soft-target snapshot, loadable as they were.
* A checkpoint that cannot be resumed from (truncated checkpoint, truncated extra state, missing or
  mismatched snapshot) stops ``load_checkpoint`` with a CheckpointError naming the file and the
  fallback; following the fallback, nnU-Net's own ``--c`` logic resumes from checkpoint_best.
* Augmentation workers die with their training, however it dies (SIGKILL included).
"""
import glob
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

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


# ---------------------------------------------------------------------------------------------- workers
def _alive(pid):
    """True while the process exists and is not a zombie (a dead child its new parent has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return out


def _gone_within(pids, seconds):
    end = time.time() + seconds
    while time.time() < end:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


PARENT = textwrap.dedent("""
    import multiprocessing, sys, time
    import nnunet_sud.robust_training as rt
    rt.USE_PRCTL = sys.argv[1] == "prctl"
    with rt.workers_die_with_parent():
        watched = multiprocessing.Process(target=time.sleep, args=(600,))
        watched.start()
    unwatched = multiprocessing.Process(target=time.sleep, args=(600,))  # forked outside the scope
    unwatched.start()
    print(watched.pid, unwatched.pid, flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("mechanism", ["prctl", "parent-pid watch"])
def test_workers_forked_in_the_scope_die_with_a_killed_parent(mechanism):
    p = subprocess.Popen([sys.executable, "-c", PARENT, "prctl" if mechanism == "prctl" else "poll"],
                         stdout=subprocess.PIPE, text=True)
    watched, unwatched = map(int, p.stdout.readline().split())
    try:
        assert _alive(watched) and _alive(unwatched)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        assert _gone_within([watched], 3.0), f"the worker outlived its parent ({mechanism})"
        time.sleep(0.5)
        assert _alive(unwatched), "a process forked outside the scope is left alone"
    finally:
        for pid in (watched, unwatched):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.e2e
def test_no_augmentation_worker_outlives_a_killed_training(synthetic3d, nnunet_dirs):
    """nnUNetv2_train of a TE variant (nnUNet_n_proc_DA=2: one labeled, one unlabeled and one validation
    worker) hangs after its first step; SIGKILL; every worker is gone at once."""
    trainer = "nnUNetTrainerTE_tiny"
    folder = os.path.join(nnunet_dirs["nnUNet_results"], synthetic3d["name"], f"{trainer}__nnUNetPlans__3d_fullres")
    log = os.path.join(nnunet_dirs["nnUNet_results"], f"{trainer}_kill_test.log")
    shutil.rmtree(folder, ignore_errors=True)
    env = dict(os.environ, SUD_TEST_HANG_AT_STEP="1", nnUNet_n_proc_DA="2", PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        p = subprocess.Popen(["nnUNetv2_train", str(synthetic3d["id"]), "3d_fullres", "0", "-tr", trainer,
                              "-device", "cpu"], stdout=out, stderr=subprocess.STDOUT, env=env)
    workers = []
    try:
        end = time.time() + 1200  # as run_cmd: seconds normally, much longer on a loaded machine
        while time.time() < end and p.poll() is None and "hanging after step 1" not in open(log).read():
            time.sleep(0.2)
        assert p.poll() is None, open(log).read()[-3000:]
        workers = _children(p.pid)
        # nnUNet_n_proc_DA=2 is split 1 labeled + 1 unlabeled (unlabeled/workers.py), plus 1 validation worker
        assert "split into 1 labeled + 1 unlabeled" in open(log).read(), open(log).read()[-3000:]
        assert len(workers) >= 3, (workers, open(log).read()[-3000:])
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        assert _gone_within(workers, 3.0), [w for w in workers if _alive(w)]
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)
        os.remove(log)
