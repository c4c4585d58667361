"""DenoiserEvaluator on a single-slice 2d map (nnU-Net's (1, 1, Y, X) case layout) with an identity
"denoiser" (logits = log of its input): the noisy and the denoised maps coincide, and at sigma = 0
both are the clean map."""
import numpy as np
import pytest
import torch
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_sud.denoiser.evaluation import DEFAULT_EVAL_SETTINGS, DenoiserEvaluator


class _Plans:
    def get_label_manager(self, dataset_json):
        return LabelManager(dataset_json["labels"], None)


class _Config:
    patch_size = [16, 16]


class _Identity(torch.nn.Module):
    def forward(self, x):  # (B, C, 16, 16) probabilities -> logits with the same argmax
        assert x.shape[1:] == (4, 16, 16)
        return torch.log(x)


def test_default_settings_start_with_clean_and_mild_noise():
    assert DEFAULT_EVAL_SETTINGS[:2] == ((0.0, 1.0), (0.5, 1.0))
    assert (8.0, 8.0) in DEFAULT_EVAL_SETTINGS


@pytest.mark.parametrize("shape", [(1, 1, 20, 24), (1, 3, 20, 24)])
def test_single_slice_and_multi_slice_maps_are_scored_in_their_own_layout(shape):
    seg = np.zeros(shape, dtype=np.int16)
    seg[..., 4:12, 5:15] = 1
    seg[..., 6:10, 7:12] = 2
    seg[..., 14:18, 2:8] = 3
    ev = DenoiserEvaluator(_Identity(), _Plans(), _Config(),
                           {"labels": {"background": 0, "a": 1, "b": 2, "c": 3}}, torch.device("cpu"),
                           settings=((0.0, 1.0), (0.5, 1.0), (2.0, 2.0)))
    res = ev.evaluate([("case", seg, [5.0, 1.0, 1.0])])
    assert res["num_cases"] == 1 and res["labels"] == [1, 2, 3]
    clean, mild, heavy = res["settings"]
    for kind in ("noisy", "denoised"):
        assert clean[kind]["dice"] == pytest.approx(1.0) and clean[kind]["hd95"] == pytest.approx(0.0)
    for row in res["settings"]:  # identity: denoised map == noisy map
        assert row["denoised"]["dice"] == pytest.approx(row["noisy"]["dice"])
        assert row["denoised"]["hd95"] == pytest.approx(row["noisy"]["hd95"])
    assert heavy["noisy"]["dice"] < 0.9  # sigma = s = 2 does flip voxels
