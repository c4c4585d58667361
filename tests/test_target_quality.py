"""The target-quality view (docs/design.md, Target quality): ``record_target_quality`` counts by hand, its logging
(logger checkpoint, log file, progress.png, DDP sum), and the labels of unlabeled cases never
entering a loss (bit-identical training with and without them)."""
import copy
import math
import os

import numpy as np
import pytest
import torch

from helpers import make_trainer

NAN = float("nan")


def _same(a, b):
    return all((math.isnan(x) and math.isnan(y)) or x == pytest.approx(y) for x, y in zip(a, b)) and len(a) == len(b)


@pytest.fixture
def mt(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerMeanTeacher
    t = make_trainer(nnUNetTrainerMeanTeacher, synthetic_plans)
    t.unlabeled_cases_with_labels = ["some_case"]  # as get_unlabeled_dataloader finds them
    return t


def paper_batch():
    """Two samples of a (1, 2, 3) patch; only the first has a label. Voxel (0, 1, 2) is padding."""
    seg = torch.tensor([[[[0, 1, 1], [2, 2, 3]]], [[[-1, -1, -1], [-1, -1, -1]]]], dtype=torch.int16)
    valid = torch.ones((2, 1, 2, 3), dtype=torch.bool)
    valid[0, 0, 1, 2] = False  # a label value on an invalid voxel must not count (the loader also hides it)
    return {"seg": seg, "valid": valid, "has_label": torch.tensor([True, False])}


def test_counts_and_dice_by_hand(mt):
    b = paper_batch()
    pred = torch.tensor([[[[1, 1, 0], [2, 0, 3]]], [[[3, 3, 3], [1, 1, 1]]]])  # sample 1: unknown, ignored
    # the same map as (B, C, *P) probabilities, with gradient as a method has it
    probs = (torch.nn.functional.one_hot(pred, 4).permute(0, 4, 1, 2, 3).float() * 0.6 + 0.1).requires_grad_()
    kept = torch.tensor([[[[True, True, True], [False, False, False]]], [[[True] * 3, [True] * 3]]])
    mt.record_target_quality(b, {"gated": kept}, labels=pred, probabilities=probs, gated=pred, absent=None)
    assert list(mt._target_maps) == ["labels", "probabilities", "gated"]  # None maps are skipped
    # known voxels (prediction, truth): (1, 0) (1, 1) (0, 1) (2, 2) (0, 2); classes 1, 2, 3:
    #   class 1: TP 1, FP 1, FN 1;  class 2: TP 1, FP 0, FN 1;  class 3: nothing (its voxels are invalid)
    expected = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 0]])  # rows TP, FP, FN
    assert torch.equal(mt._target_counts["labels"], expected)
    assert torch.equal(mt._target_counts["probabilities"], expected)
    # kept voxels only: (1, 0) (1, 1) (0, 1) -> class 1 TP 1, FP 1, FN 1; 3 of 5 labelled voxels kept
    assert torch.equal(mt._target_counts["gated"], torch.tensor([[1, 0, 0], [1, 0, 0], [1, 0, 0]]))
    assert mt._target_kept["gated"].tolist() == [3, 5]
    # a batch without labelled samples changes nothing
    mt.record_target_quality({**b, "has_label": torch.tensor([False, False])}, labels=torch.ones_like(pred))
    assert torch.equal(mt._target_counts["labels"], expected)

    mt._log_target_quality()
    assert _same(mt.logger.get_value("target_dice/labels", 0), [0.5, 2 / 3, NAN])
    assert _same(mt.logger.get_value("target_dice/probabilities", 0), [0.5, 2 / 3, NAN])
    assert _same(mt.logger.get_value("target_dice/gated", 0), [0.5, NAN, NAN])
    assert mt.logger.get_value("target_kept/gated", 0) == pytest.approx(0.6)
    assert not mt._target_counts and not mt._target_kept  # reset for the next epoch
    with open(mt.log_file) as f:
        log = f.read()
    assert "Target dice labels [0.5, 0.6667, nan]" in log and "(kept 0.6 of labelled voxels)" in log
    # next epoch without any labelled batch: NaN per class, lists stay one entry per epoch
    mt.current_epoch = 1
    mt._log_target_quality()
    assert len(mt.logger.get_value("target_dice/labels", None)) == 2
    assert all(math.isnan(v) for v in mt.logger.get_value("target_dice/labels", 1))


def test_no_labels_means_no_op(synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerMeanTeacher
    t = make_trainer(nnUNetTrainerMeanTeacher, synthetic_plans)
    t.record_target_quality(paper_batch(), student=torch.zeros((2, 1, 2, 3), dtype=torch.long))
    t._log_target_quality()
    assert not t._target_maps and not t.logger.local_logger.target_keys()


def test_region_based_labels(mt):
    """Regions: channel r predicted where its sigmoid > 0.5, truth = label in the region."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    mt.label_manager = LabelManager({"background": 0, "outer": [1, 2], "inner": 2}, regions_class_order=[1, 2])
    b = {"seg": torch.tensor([[[[0, 1, 2]]]], dtype=torch.int16), "valid": torch.ones((1, 1, 1, 3), dtype=torch.bool),
         "has_label": torch.tensor([True])}
    p = torch.tensor([[[[[0.9, 0.9, 0.1]]], [[[0.0, 0.0, 0.8]]]]])  # (1, 2 regions, 1, 1, 3)
    mt.record_target_quality(b, sigmoid=p)
    # outer: predicted at voxels 0, 1; true at 1, 2 -> TP 1, FP 1, FN 1. inner: predicted and true at 2
    assert torch.equal(mt._target_counts["sigmoid"], torch.tensor([[1, 1], [1, 0], [1, 0]]))


def test_ddp_sums_counts_over_ranks(mt, tmp_path):
    """The epoch-end reduction runs through torch.distributed (a one-process gloo group here)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        mt.is_ddp = True
        mt.record_target_quality(paper_batch(), labels=torch.tensor([[[[1, 1, 0], [2, 0, 3]]]] * 2))
        mt._log_target_quality()
        assert _same(mt.logger.get_value("target_dice/labels", 0), [0.5, 2 / 3, NAN])
    finally:
        mt.is_ddp = False
        dist.destroy_process_group()


def test_progress_panel_plots_mean_dice_and_fraction_kept():
    """The target panel (stacked under nnU-Net's progress.png by plot_progress_png): mean Dice over
    classes per map, NaN before the map was first recorded, and the fraction kept."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    from nnunet_sud.trainers.epoch_logger import SemiSupervisedLocalLogger

    lg = SemiSupervisedLocalLogger(())
    lg.register("target_dice/student", 0)
    lg.register("target_dice/teacher", 1)  # first recorded in epoch 1
    lg.register("target_kept/teacher", 1)
    for epoch in range(3):
        lg.log("target_dice/student", [0.2, NAN, 0.4], epoch)
        if epoch:
            lg.log("target_dice/teacher", [0.4, NAN, 0.7], epoch)
            lg.log("target_kept/teacher", 0.8, epoch)
    assert lg.target_keys() == ["target_dice/student", "target_dice/teacher", "target_kept/teacher"]
    fig, ax = plt.subplots()
    lg._plot_target_panel(ax, lg.target_keys(), [0, 1, 2], 2, ["r", "g"])
    lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    plt.close(fig)
    assert _same(lines["student (mean Dice)"], [0.3, 0.3, 0.3])
    assert _same(lines["teacher (mean Dice)"], [NAN, 0.55, 0.55])
    assert _same(lines["teacher (fraction kept)"], [NAN, 0.8, 0.8])


def test_labels_never_enter_a_loss(synthetic3d):
    """Mean teacher trained twice from the same seeds, the unlabeled stream once with the labels of
    the unlabeled cases (synthetic data labels all of them) and once without: bit-identical student
    and teacher weights, while the run with labels did score its targets."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunet_sud.trainers import nnUNetTrainerMeanTeacher
    from nnunet_sud.unlabeled.loader import UnlabeledDataLoader, cases_with_labels, unlabeled_identifiers
    from nnunet_sud.unlabeled.preprocess import LABEL_PROPERTY

    class WithoutLabels(nnUNetDatasetBlosc2):
        """The same preprocessed folder as if labelsUnlabeled had been empty (images and masks do not
        depend on the labels: tests/test_preprocess_unlabeled.py)."""

        def load_case(self, identifier):
            data, seg, prev, props = super().load_case(identifier)
            return data, seg, prev, {**props, LABEL_PROPERTY: None}

    folder = os.path.join(synthetic3d["preprocessed"], "nnUNetPlans_3d_fullres_unlabeled")
    ids = unlabeled_identifiers(folder)
    assert cases_with_labels(folder, ids) == ids
    trainers = []
    for dataset_class in (nnUNetDatasetBlosc2, WithoutLabels):
        torch.manual_seed(0)
        np.random.seed(0)
        t = make_trainer(nnUNetTrainerMeanTeacher, synthetic3d)
        t.initialize()
        t.teacher.copy_from(t.network)
        dataset = dataset_class(folder, ids)
        t.unlabeled_cases_with_labels = cases_with_labels(folder, ids) if dataset_class is nnUNetDatasetBlosc2 else []
        patch = tuple(t.configuration_manager.patch_size)
        t.dataloader_unlabeled = UnlabeledDataLoader(
            dataset, 1, t.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[2], patch, t.label_manager,
            transforms=t.get_unlabeled_transforms())
        g = torch.Generator().manual_seed(1)
        data = torch.randn((1, 1, *patch), generator=g)  # one sample per stream: a fast step
        seg = torch.randint(0, 4, (1, 1, *patch), generator=g).float()
        target = [torch.nn.functional.interpolate(seg, scale_factor=tuple(s), mode="nearest") if i else seg
                  for i, s in enumerate(t._get_deep_supervision_scales())]
        for _ in range(2):  # two steps: momentum buffers and the EMA teacher are in play
            t.train_step({"data": data.clone(), "target": [x.clone() for x in target]})
        trainers.append(t)
    with_labels, without = trainers
    assert int(with_labels._target_counts["teacher"][[0, 2]].sum()) > 0  # labelled voxels were scored
    assert not without._target_counts
    for (n, p), (_, q) in zip(with_labels.network.named_parameters(), without.network.named_parameters()):
        assert torch.equal(p, q), n
    for (n, p), (_, q) in zip(with_labels.teacher.module.named_parameters(),
                              without.teacher.module.named_parameters()):
        assert torch.equal(p, q), n
    assert any(not torch.equal(p, q) for p, q in zip(with_labels.network.parameters(),
                                                     copy.deepcopy(with_labels.teacher.module).parameters()))
