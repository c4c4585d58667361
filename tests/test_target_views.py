"""benchmarks/target_views.py feeds a whole case (C, Z, Y, X) to a 2d denoiser slice by slice. With an
identity "denoiser" (logits = log of its input) the noise-free path must give the map back: the
clipped-log encoding is a no-op for probabilities >= e^-3 and softmax(log p) = p when p sums to 1
over the classes. A softmax taken over the slice axis instead (the bug this guards) gives p / sum_z p."""
import importlib.util
import os

import torch

from nnunet_sud.denoiser.evaluation import DenoiserEvaluator
from test_denoiser_evaluation import _Config, _Identity, _Plans

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "target_views.py")


def _module():
    spec = importlib.util.spec_from_file_location("target_views", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _evaluator():
    return DenoiserEvaluator(_Identity(), _Plans(), _Config(), {"labels": {"background": 0, "a": 1, "b": 2, "c": 3}},
                             torch.device("cpu"))


def test_noise_free_denoising_of_a_whole_case_keeps_the_class_axis():
    g = torch.Generator().manual_seed(0)
    # 4 classes, 3 slices, one 16 x 16 patch per slice; logits in [-0.5, 0.5]: every probability
    # >= e^-0.5 / (e^-0.5 + 3 e^0.5) = 0.109 > e^-3, so the clipped-log encoding leaves p as it is
    p = torch.softmax(torch.rand((4, 3, 16, 16), generator=g) - 0.5, 0)
    assert p.min() > 0.109
    out = _module().denoise_case(_evaluator(), p)
    assert out.shape == p.shape
    torch.testing.assert_close(out, p, atol=1e-5, rtol=0)


def test_noise_free_denoising_keeps_a_one_hot_case_that_differs_between_slices():
    seg = torch.zeros((3, 16, 16), dtype=torch.long)
    seg[0, 2:8, 2:8] = 1
    seg[1, 4:12, 3:9] = 2
    seg[2, 9:15, 6:14] = 3  # slice 2 has class 3 only: a softmax over slices would move it to other slices
    y = torch.nn.functional.one_hot(seg, 4).movedim(-1, 0).float()
    out = _module().denoise_case(_evaluator(), y)
    assert torch.equal(out.argmax(0), seg)
    torch.testing.assert_close(out.sum(0), torch.ones((3, 16, 16)), atol=1e-5, rtol=0)
