"""Target-quality curves read back from a model folder's checkpoint, tabulated and plotted."""
import math
import os

import numpy as np
import pytest
import torch

from nnunet_sud.evaluation.target_quality import plot_target_quality, read_target_quality, target_quality_markdown


def fake_fold(folder, logging):
    os.makedirs(folder, exist_ok=True)
    torch.save({"logging": logging, "current_epoch": len(logging["train_losses"])},
               os.path.join(folder, "checkpoint_final.pth"))
    return str(folder)


def test_read_table_plot(tmp_path):
    n = 10
    logging = {"train_losses": [0.0] * n,
               # epochs 0-1 not recorded (NaN), then per-class Dice rising 0.1 per epoch
               "target_dice/prediction": [math.nan, math.nan] + [[0.1 * e, 0.1 * e + 0.05] for e in range(2, n)],
               "target_dice/target": [[0.5, math.nan]] * n,  # class 2 absent from labels and map: NaN
               "target_dice/pseudo_label": [[0.8, 0.6]] * n,
               "target_kept/pseudo_label": [0.1 * e for e in range(n)],
               "unlabeled_loss": [1.0] * n}
    fold = fake_fold(tmp_path / "SUD" / "fold_0", logging)
    curves = read_target_quality(fold)
    assert set(curves) == {"prediction", "target", "pseudo_label"}
    pred = curves["prediction"]["dice"]
    assert pred.shape == (n, 2) and np.isnan(pred[:2]).all() and pred[9].tolist() == pytest.approx([0.9, 0.95])
    assert curves["prediction"]["kept"] is None and curves["pseudo_label"]["kept"][3] == pytest.approx(0.3)
    table = target_quality_markdown({"SUD": curves}, ["RV", "LV"])
    rows = {line.split(" | ")[1]: line.split(" | ") for line in table.splitlines()[2:]}
    # windows of a tenth of training (1 epoch): mid = epoch round(0.5 * 9) = 4 (means 0.425), end = epoch 9
    assert rows["prediction"][2:6] == ["0.425", "0.925", "0.900", "0.950"]
    assert rows["target"][2:6] == ["0.500", "0.500", "0.500", "nan"]  # the mean skips the absent class
    assert rows["pseudo_label"][6].strip(" |") == "0.900"  # kept at the end
    assert "RV, end" in table.splitlines()[0]
    png = plot_target_quality({"SUD": curves, "nnUNetTrainer": {}}, str(tmp_path / "tq.png"))
    assert png and os.path.getsize(png) > 1000
    # a training without target quality: nothing to show
    plain = fake_fold(tmp_path / "base" / "fold_0", {"train_losses": [0.0] * n})
    assert read_target_quality(plain) == {}
    assert target_quality_markdown({"base": {}}) == "" and plot_target_quality({"base": {}}, str(tmp_path / "x.png")) is None
