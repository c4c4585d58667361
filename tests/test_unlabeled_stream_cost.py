"""The cheaper unlabeled stream: the coordinate channels built by broadcasting equal the
meshgrid definition, and a stream without coordinates (``carry_coordinates = False``, trainers that
read only ``valid``) delivers the same data, valid and seg under the same seeds."""
import numpy as np
import pytest
import torch

from nnunet_sud.unlabeled.coordinates import case_coordinate_channels
from nnunet_sud.unlabeled.loader import UnlabeledBatch, UnlabeledDataLoader
from test_unlabeled_stream import LABELS, InMemoryDataset, initial_patch, nnunet_transforms, smooth_field


def meshgrid_channels(lbs, ubs, case_shape):
    """The definition (coordinates.py): z, y, x of every box voxel, ones, inside-the-case."""
    grids = torch.meshgrid(*[torch.arange(lo, hi, dtype=torch.float32) for lo, hi in zip(lbs, ubs)], indexing="ij")
    inside = torch.ones_like(grids[0])
    for g, n in zip(grids, case_shape):
        inside = inside * ((g >= 0) & (g <= n - 1)).float()
    return torch.stack([*grids, torch.ones_like(inside), inside])


@pytest.mark.parametrize("lbs, ubs, case_shape", [
    ((-5, 3, 10), (38, 54, 56), (30, 40, 50)),   # padding before z, after y and x
    ((0, 0, 0), (7, 9, 11), (7, 9, 11)),         # the whole case
    ((2, -10, -3), (3, 20, 19), (10, 18, 18)),   # one slice (2d configurations), padding in y and x
])
def test_channels_equal_the_meshgrid_definition(lbs, ubs, case_shape):
    ref = meshgrid_channels(lbs, ubs, case_shape)
    got = case_coordinate_channels(lbs, ubs, case_shape)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    assert torch.equal(case_coordinate_channels(lbs, ubs, case_shape, coordinates=False), ref[-1:])
    # by hand: the first box voxel of the first case is z = lbs[0]; outside the case it is flagged
    assert got[0, 0, 0, 0] == lbs[0] and got[3].min() == 1
    assert bool(got[4, 0, 0, 0]) == all(lo >= 0 for lo in lbs)


def _batches(carry: bool, seed: int, n: int = 6):
    field = smooth_field((20, 26, 24), 0)
    patch = (12, 16, 16)
    np.random.seed(seed)
    torch.manual_seed(seed)
    dl = UnlabeledDataLoader(InMemoryDataset({"a": field[None], "b": field[None] * 2}), 2, initial_patch(patch, 3),
                             patch, LABELS, transforms=nnunet_transforms(patch, 3, geometric_only=False))
    dl.carry_coordinates = carry
    return [dl.generate_train_batch() for _ in range(n)]


def test_stream_without_coordinates_is_the_same_stream():
    with_c, without = _batches(True, 5), _batches(False, 5)
    assert any((~b["valid"]).any() for b in with_c)  # padding occurs: valid is not trivially all True
    for a, b in zip(with_c, without):
        assert "coords" in a and "coords" not in b
        for k in ("data", "valid", "seg", "has_label", "case_shapes"):
            assert torch.equal(a[k], b[k]), k
        assert a["keys"] == b["keys"]


def test_missing_coordinates_say_what_to_set():
    batch = UnlabeledBatch({"data": torch.zeros(1)}, owner="nnUNetTrainerX")
    assert batch["data"] is not None and "coords" not in batch and batch.get("coords") is None
    with pytest.raises(KeyError, match="nnUNetTrainerX has unlabeled_coordinates = False.*Set unlabeled_coordinates"):
        batch["coords"]
    with pytest.raises(KeyError):
        batch["nothing"]
