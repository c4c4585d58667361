"""nnUNet_n_proc_DA is shared between the labeled and the unlabeled stream by measured cost
(nnunet_sud.unlabeled.workers): hand numbers of the split, and the real trainer starting exactly
that many workers."""
import os

import pytest
import torch

from nnunet_sud.unlabeled.workers import (augmentation_processes, seconds_per_batch, split_augmentation_workers,
                                          worker_count)


@pytest.mark.parametrize("total, c_l, c_u, expected", [
    (0, 1.0, 5.0, (0, 0)),      # 0: both single-threaded, as nnU-Net's 0
    (1, 1.0, 5.0, (1, 0)),      # the one worker to the labeled stream, unlabeled in the main process
    (2, 1.0, 9.0, (1, 1)),      # one each, whatever the costs
    (12, 1.0, 1.0, (6, 6)),     # 12 * 1/2 = 6
    (12, 1.0, 1.15, (6, 6)),    # 12 * 1.15/2.15 = 6.42 -> 6
    (12, 1.0, 2.0, (4, 8)),     # 12 * 2/3 = 8
    (12, 3.0, 1.0, (9, 3)),     # 12 * 1/4 = 3
    (3, 1.0, 1.0, (2, 1)),      # 3 * 1/2 = 1.5: a tie goes to the labeled stream
    (5, 1.0, 1.0, (3, 2)),      # 2.5 -> 2
    (10, 1.0, 0.001, (9, 1)),   # 0.01 -> 0, but at least one each
    (10, 0.001, 1.0, (1, 9)),   # 9.99 -> 10, but at least one each
    (4, 0.0, 0.0, (2, 2)),      # no cost measured: half each
])
def test_split_by_hand(total, c_l, c_u, expected):
    n_l, n_u = split_augmentation_workers(total, c_l, c_u)
    assert (n_l, n_u) == expected
    assert n_l + n_u == max(total, 0)


def test_fixed_fraction_overrides_the_costs():
    assert split_augmentation_workers(4, 5.0, 1.0, unlabeled_fraction=0.75) == (1, 3)
    assert split_augmentation_workers(8, 1.0, 1.0, unlabeled_fraction=0.0) == (7, 1)


def test_seconds_per_batch_is_the_median_after_warmup():
    calls = []
    clock = iter([0.5, 0.01, 0.03, 0.02])  # the first (warm-up) call is slow and not counted

    def make():
        import time
        d = next(clock)
        calls.append(d)
        time.sleep(d)

    s = seconds_per_batch({"a": make}, batches=3)["a"]
    assert len(calls) == 4 and 0.015 < s < 0.2


def test_environment_is_restored(monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "7")
    with augmentation_processes(3):
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
        assert get_allowed_n_proc_DA() == min(3, os.cpu_count())
    assert os.environ["nnUNet_n_proc_DA"] == "7"
    monkeypatch.delenv("nnUNet_n_proc_DA")
    with augmentation_processes(0):
        pass
    assert "nnUNet_n_proc_DA" not in os.environ


def _trainer(synthetic3d, cls):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    pre = synthetic3d["preprocessed"]
    plans = load_json(os.path.join(pre, "nnUNetPlans.json"))
    plans["continue_training"] = False
    t = cls(plans, "3d_fullres", 0, load_json(os.path.join(pre, "dataset.json")), torch.device("cpu"))
    t.initialize()
    return t


@pytest.mark.parametrize("total, fraction", [(3, None), (4, 0.75)])
def test_real_trainer_starts_the_asked_number_of_workers(synthetic3d, monkeypatch, total, fraction):
    from nnunet_sud.trainers import nnUNetTrainerMeanTeacher

    class Trainer(nnUNetTrainerMeanTeacher):
        unlabeled_worker_fraction = fraction

        def augmentation_workers_total(self):
            # nnU-Net caps nnUNet_n_proc_DA at the CPU count (2 on the test machine): ask for more here
            return total

    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    t = _trainer(synthetic3d, Trainer)
    dl_tr, dl_val = t.get_dataloaders()
    try:
        n_l, n_u = worker_count(dl_tr), worker_count(t.dataloader_unlabeled)
        assert n_l + n_u == total and n_l >= 1 and n_u >= 1
        if fraction is not None:
            assert (n_l, n_u) == split_augmentation_workers(total, 1.0, 1.0, unlabeled_fraction=fraction) == (1, 3)
        # the processes exist and run: each augmenter started its own, nnU-Net's val loader keeps its rule
        alive = [p for p in dl_tr._processes + t.dataloader_unlabeled._processes if p.is_alive()]
        assert len(alive) == total
        assert worker_count(dl_val) == max(1, n_l // 2)
        assert os.environ["nnUNet_n_proc_DA"] == "1"  # the user's setting is left as it was
        assert next(t.dataloader_unlabeled)["data"].shape[0] == t.batch_size
        log = "\n".join(_log_lines(t))
        assert f"augmentation workers: nnUNet_n_proc_DA={total} split into {n_l} labeled + {n_u} unlabeled" in log
        assert ("measured s/batch: labeled" in log) if fraction is None else ("unlabeled_worker_fraction = 0.75" in log)
    finally:
        for dl in (dl_tr, dl_val, t.dataloader_unlabeled):
            dl._finish()


def test_one_worker_goes_to_the_labeled_stream(synthetic3d, monkeypatch):
    from nnunet_sud.trainers import nnUNetTrainerMeanTeacher
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    t = _trainer(synthetic3d, nnUNetTrainerMeanTeacher)
    dl_tr, dl_val = t.get_dataloaders()
    try:
        assert worker_count(dl_tr) == 1 and worker_count(t.dataloader_unlabeled) == 0
        assert next(t.dataloader_unlabeled)["data"].shape[0] == t.batch_size  # made in this process
    finally:
        for dl in (dl_tr, dl_val):
            dl._finish()


def _log_lines(trainer):
    with open(trainer.log_file) as f:
        return f.read().splitlines()
