"""The soft-target store's write-behind (updates applied by a background thread): the
files, reads and snapshots are exactly those of the synchronous store, a failure in the background
reaches the caller, and the thread ends with close()."""
import os

import numpy as np
import pytest
import torch

from nnunet_sud.targets.store import SoftTargetStore
from test_soft_target_store import augmented_batches, whole_case_batch


def _visits(store, batches, seed):
    """TE-like visits: read z_prev, update with alpha (reads interleaved with queued updates)."""
    g = torch.Generator().manual_seed(seed)
    reads = []
    for n, b in enumerate(batches):
        where = (b["keys"], b["coords"], b["valid"], b["case_shapes"])
        reads.append(store.read(*where))
        values = torch.softmax(torch.randn((2, 2, *b["coords"].shape[2:]), generator=g) * 3, 1)
        store.update(*where, values, alpha=1.0 if n == 0 else 0.5)
    return reads


def test_write_behind_equals_the_synchronous_store(tmp_path):
    case, patch = (30, 30, 30), (16, 16, 16)
    batches = augmented_batches(case, patch, 12, seed=3)
    sync = SoftTargetStore(str(tmp_path / "sync"), 2)
    behind = SoftTargetStore(str(tmp_path / "behind"), 2, write_behind=True)
    r_sync, r_behind = _visits(sync, batches, 0), _visits(behind, batches, 0)
    for a, b in zip(r_sync, r_behind):  # every read saw every earlier update
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
    assert behind.keys() == sync.keys() == ["s"]
    np.testing.assert_array_equal(behind.load_case("s"), sync.load_case("s"))
    behind.snapshot(str(tmp_path / "snap"), epoch=3)
    np.testing.assert_array_equal(np.load(str(tmp_path / "snap" / "s.npy")), np.load(sync.case_file("s")))
    assert behind._writer is not None and behind._writer.is_alive()
    behind.close()
    assert behind._writer is None


def test_queued_updates_are_in_the_files_after_wait(tmp_path):
    store = SoftTargetStore(str(tmp_path / "s"), 2, dtype=np.float32, write_behind=True)
    case = (6, 7, 8)
    values = torch.rand((1, 2, *case))
    for _ in range(5):
        store.write(**whole_case_batch("c", case), values=values)
    store.wait()
    np.testing.assert_array_equal(np.load(store.case_file("c")), values[0].numpy())  # read behind the store's back
    store.close()


def test_the_callers_tensors_may_change_after_update(tmp_path):
    store = SoftTargetStore(str(tmp_path / "s"), 2, dtype=np.float32, write_behind=True)
    case = (4, 5, 6)
    batch = whole_case_batch("c", case)
    values = torch.full((1, 2, *case), 0.25)
    store.write(**batch, values=values)
    values.fill_(0.75)  # queued on a copy
    batch["coords"].zero_()
    np.testing.assert_array_equal(store.load_case("c"), np.full((2, *case), 0.25, np.float32))
    store.close()


def test_a_background_failure_reaches_the_caller(tmp_path):
    store = SoftTargetStore(str(tmp_path / "s"), 2, write_behind=True)
    case = (4, 5, 6)
    store.write(**whole_case_batch("c", case), values=torch.rand((1, 2, *case)))
    store.wait()
    b = whole_case_batch("c", (4, 5, 7))  # the case's file has another shape: the update fails
    store.write(**b, values=torch.rand((1, 2, 4, 5, 7)))
    with pytest.raises(RuntimeError, match="failed in the background.*shape"):
        store.read(**b)
    store.wait()  # raised once; the store goes on
    store.write(**whole_case_batch("c", case), values=torch.rand((1, 2, *case)))
    store.close()
    assert os.path.isfile(store.case_file("c"))


def _prefetched_visits(store, batches, seed):
    """SUD's order: prefetch (before the forward pass), read, update; every other batch is also
    prefetched twice or read with other tensors, which must drop the prefetch, not return it."""
    g = torch.Generator().manual_seed(seed)
    reads = []
    for n, b in enumerate(batches):
        where = (b["keys"], b["coords"], b["valid"], b["case_shapes"])
        store.prefetch(*where)
        if n % 3 == 1:
            store.prefetch(*where)  # a second prefetch replaces the first
        if n % 3 == 2:  # equal values, other tensors: not the prefetched read
            store.read(b["keys"], b["coords"].clone(), b["valid"], b["case_shapes"])
        reads.append(store.read(*where))
        values = torch.softmax(torch.randn((2, 2, *b["coords"].shape[2:]), generator=g) * 3, 1)
        store.update(*where, values, alpha=1.0 if n == 0 else 0.5)
    return reads


def test_prefetched_reads_see_every_earlier_update(tmp_path):
    """A prefetch queued behind updates reads what a synchronous read after them reads, visit
    after visit (the same case and overlapping patches every time)."""
    batches = augmented_batches((24, 24, 24), (16, 16, 16), 12, seed=4)
    sync = SoftTargetStore(str(tmp_path / "sync"), 2)
    behind = SoftTargetStore(str(tmp_path / "behind"), 2, write_behind=True)
    r_sync, r_behind = _visits(sync, batches, 1), _prefetched_visits(behind, batches, 1)
    assert sum(bool(torch.isfinite(r).any()) for r in r_sync) >= 10  # the reads find targets
    for a, b in zip(r_sync, r_behind):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
    np.testing.assert_array_equal(behind.load_case("s"), sync.load_case("s"))
    behind.close()


def test_a_prefetched_read_after_a_failed_update_raises(tmp_path):
    store = SoftTargetStore(str(tmp_path / "s"), 2, write_behind=True)
    case = (4, 5, 6)
    store.write(**whole_case_batch("c", case), values=torch.rand((1, 2, *case)))
    b = whole_case_batch("c", (4, 5, 7))  # the case's file has another shape: the update fails
    store.write(**b, values=torch.rand((1, 2, 4, 5, 7)))
    good = whole_case_batch("c", case)
    store.prefetch(**good)
    with pytest.raises(RuntimeError, match="earlier update failed"):
        store.read(**good)
    with pytest.raises(RuntimeError, match="failed in the background.*shape"):
        store.wait()
    store.close()
