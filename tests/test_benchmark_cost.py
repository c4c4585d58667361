"""The CPU memory probe of benchmarks/trainer_cost.py measures what it should, and its trainer
selection covers what it claims to (no timing assertions: the machine is shared and noisy)."""
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import _common  # noqa: E402
import trainer_cost  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")

KNOWN_MIB = 50_000_000 * 4 / 2 ** 20  # a float32 tensor of 50e6 elements: 190.7 MiB


def _allocate_and_free(hold_s: float):
    import torch
    x = torch.ones(50_000_000, dtype=torch.float32)  # ones, not empty: every page is touched
    time.sleep(hold_s)
    del x


@pytest.mark.parametrize("sample", [False, True], ids=["high-water-mark", "sampling-thread"])
def test_peak_rss_measures_a_known_allocation(sample):
    import torch  # noqa: F401  (imported before the region: its import is not the allocation)
    _common.release_free_memory()
    with _common.PeakRSS(sample=sample) as peak:
        _allocate_and_free(hold_s=0.2 if sample else 0.0)
    if not sample and "high-water" not in peak.method:
        pytest.skip(f"kernel refused the VmHWM reset ({peak.method})")
    assert abs(peak.increase_mb - KNOWN_MIB) < 0.1 * KNOWN_MIB, (peak.increase_mb, peak.method)
    # freed again: the peak is a peak, not the level after the region
    assert _common.proc_status_mb("VmRSS") < peak.base_mb + 0.1 * KNOWN_MIB


def test_peak_rss_does_not_report_an_earlier_peak():
    _allocate_and_free(hold_s=0.0)  # raises the process high-water mark before the region
    _common.release_free_memory()
    with _common.PeakRSS() as peak:
        pass
    if "high-water" not in peak.method:
        pytest.skip(f"kernel refused the VmHWM reset ({peak.method})")
    assert peak.increase_mb < 0.1 * KNOWN_MIB


def test_trainer_selection_covers_every_trainer_and_patterns():
    from nnunet_sud.trainers import __all__ as ours
    everything = trainer_cost.trainer_names()
    assert everything[0] == "nnUNetTrainer" and sorted(everything[1:]) == sorted(ours)
    assert "nnUNetTrainerLabelDenoiser" in everything
    beta = trainer_cost.trainer_names(["nnUNetTrainerSUD_beta*", "nnUNetTrainerTE"])
    assert beta[0] == "nnUNetTrainer" and "nnUNetTrainerTE" in beta
    assert sorted(n for n in beta if "_beta" in n) == sorted(n for n in ours if n.startswith("nnUNetTrainerSUD_beta"))
    assert len(beta) == 2 + sum(n.startswith("nnUNetTrainerSUD_beta") for n in ours)
    with pytest.raises(SystemExit):
        trainer_cost.trainer_names(["nnUNetTrainerNoSuchThing*"])


def test_round_orders_put_every_trainer_in_every_round():
    names = ["a", "b", "c"]
    rotate = list(_common.round_orders(names, 4, "rotate"))
    assert rotate == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert list(_common.round_orders(names, 2, "alternate")) == [names, names[::-1]]
