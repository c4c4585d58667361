"""Post-denoise (SUD's baseline [63]): the composed segmenter + denoiser network, its training set-up
and the build-postdenoise errors (in process; the end-to-end run is in test_mean_teacher_e2e.py)."""
import copy
import os

import numpy as np
import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnunet_sud.denoiser.corruption import apply_denoiser
from nnunet_sud.denoiser.network import build_label_denoiser
from nnunet_sud.denoiser.trainer import narrow_architecture
from nnunet_sud.errors import UserFacingError
from nnunet_sud.trainers.post_denoise import (SegmenterWithPostDenoiser, build_postdenoise_model_folder,
                                              insert_denoiser, nnUNetTrainerPostDenoise)


def _plans(synthetic3d):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pre = synthetic3d["preprocessed"]
    return PlansManager(os.path.join(pre, "nnUNetPlans.json")), load_json(os.path.join(pre, "dataset.json"))


def _composed_with_trained_like_denoiser(synthetic3d, cfg="3d_fullres"):
    pm, _ = _plans(synthetic3d)
    cm = pm.get_configuration(cfg)
    torch.manual_seed(0)
    composed = nnUNetTrainerPostDenoise.build_network_architecture(pm, cm, 1, 4, True)
    # He-initialised, with nnUNetTrainerLabelDenoiser's default (narrowed) architecture: stands for a trained one
    conf = copy.deepcopy(cm.configuration)
    narrow_architecture(conf["architecture"])
    denoiser = build_label_denoiser(pm, ConfigurationManager(conf), 4)
    insert_denoiser(composed, denoiser)
    return composed, denoiser, cm


def test_inference_output_is_the_denoised_segmenter_softmax(synthetic3d):
    composed, denoiser, cm = _composed_with_trained_like_denoiser(synthetic3d)
    assert isinstance(composed, SegmenterWithPostDenoiser)
    x = torch.randn(1, 1, *cm.patch_size)
    composed.eval()
    denoiser.eval()
    composed.decoder.deep_supervision = False             # what nnU-Net's predictor does
    assert composed.denoises
    out = composed(x)
    expected = apply_denoiser(denoiser, torch.softmax(composed.segmenter(x), 1))   # DAE(softmax f(x))
    assert out.shape == expected.shape == (1, 4, *cm.patch_size)
    assert torch.allclose(torch.softmax(out, 1), expected, atol=1e-6)
    assert torch.isfinite(out).all()
    # the denoiser changes the map (it is not the segmenter's softmax)
    assert not torch.allclose(expected, torch.softmax(composed.segmenter(x), 1), atol=1e-3)

    # eval with deep supervision on (nnU-Net's per-epoch validation): the segmenter's list
    composed.decoder.deep_supervision = True
    out_ds = composed(x)
    assert isinstance(out_ds, list) and torch.allclose(out_ds[0], composed.segmenter(x)[0])
    # training: segmenter logits with gradient, the denoiser stays frozen in eval mode
    composed.train()
    assert composed.segmenter.training and not composed.denoiser.training
    out_tr = composed(x)
    assert isinstance(out_tr, list) and out_tr[0].requires_grad
    assert all(not p.requires_grad for p in composed.denoiser.parameters())


def test_trainer_trains_the_segmenter_only_and_saves_the_denoiser_in_network_weights(synthetic3d):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    pre = synthetic3d["preprocessed"]
    plans = load_json(os.path.join(pre, "nnUNetPlans.json"))
    plans["continue_training"] = False
    tr = nnUNetTrainerPostDenoise(plans, "3d_fullres", 0, load_json(os.path.join(pre, "dataset.json")),
                                  torch.device("cpu"))
    tr.initialize()
    net = tr.network
    assert isinstance(net, SegmenterWithPostDenoiser)
    tr.set_deep_supervision_enabled(False)                  # needs network.decoder
    assert net.segmenter.decoder.deep_supervision is False
    tr.set_deep_supervision_enabled(True)
    opt_params = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in net.segmenter.parameters()}
    assert not opt_params & {id(p) for p in net.denoiser.parameters()}
    keys = set(net.state_dict())
    assert any(k.startswith("denoiser.") for k in keys) and any(k.startswith("segmenter.") for k in keys)

    # one real training step on a labeled batch: the segmenter moves, the denoiser does not
    patch = tr.configuration_manager.patch_size
    scales = tr._get_deep_supervision_scales()
    torch.manual_seed(0)
    target = [torch.randint(0, 4, (2, 1, *[int(round(p * s)) for p, s in zip(patch, sc)])).float() for sc in scales]
    den_before = {k: v.clone() for k, v in net.denoiser.state_dict().items()}
    seg_before = {k: v.clone() for k, v in net.segmenter.state_dict().items()}
    tr.network.train()
    out = tr.train_step({"data": torch.randn(2, 1, *patch), "target": target})
    assert np.isfinite(out["loss"])
    assert all(torch.equal(v, den_before[k]) for k, v in net.denoiser.state_dict().items())
    assert any(not torch.equal(v, seg_before[k]) for k, v in net.segmenter.state_dict().items())


def test_a_denoiser_of_another_architecture_is_refused(synthetic3d):
    pm, _ = _plans(synthetic3d)
    composed = nnUNetTrainerPostDenoise.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 4, False)
    other = build_label_denoiser(pm, pm.get_configuration("2d"), 4)
    with pytest.raises(UserFacingError, match="same plans and configuration.*nnUNetv2_train 991 3d_fullres"):
        insert_denoiser(composed, other, "the 2d denoiser", "nnUNetv2_train 991 3d_fullres 0 -tr nnUNetTrainerLabelDenoiser")


def test_build_postdenoise_errors(synthetic3d, tmp_path):
    with pytest.raises(UserFacingError, match=r"no trained segmenter at .*nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/"
                                              r"checkpoint_final.pth. Train it first \(nnUNetv2_train"):
        build_postdenoise_model_folder(991, "3d_fullres", 0, results_folder=str(tmp_path))
    with pytest.raises(UserFacingError, match="names the segmenter"):
        build_postdenoise_model_folder(991, "3d_fullres", 0, "nnUNetTrainerPostDenoise", results_folder=str(tmp_path))


def test_build_postdenoise_is_a_registered_command():
    from nnunet_sud.cli import build_parser
    args = build_parser().parse_args(["build-postdenoise", "-d", "991", "-c", "3d_fullres", "-f", "0",
                                      "-tr", "nnUNetTrainerMeanTeacher"])
    assert (args.dataset, args.configuration, args.fold, args.trainer, args.plans) == \
        ("991", "3d_fullres", "0", "nnUNetTrainerMeanTeacher", "nnUNetPlans")
    assert callable(args.func)
