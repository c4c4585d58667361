"""The README's main command, in its smallest setting: generated data through plan/preprocess,
denoiser, nnUNetTrainer/WeakToStrong/SUD training, prediction, evaluation and the comparison report."""
import json
import os

import pytest

from conftest import nnunet_sud_cmd, run_cmd


@pytest.mark.e2e
def test_demo_smoke_schedule_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_denoiser",)}
    log = run_cmd(nnunet_sud_cmd("demo", "-o", out, "--schedule", "smoke", "--device", "cpu"), env=env)
    assert log.strip().splitlines()[-1] == str(out)  # the folder is printed last
    for step in ("1/6", "2/6", "3/6", "4/6", "5/6", "6/6"):
        assert step in log
    info = json.load(open(out / "demo.json"))
    assert info["trainers"] == ["nnUNetTrainer", "nnUNetTrainerWeakToStrong", "nnUNetTrainerSUD"]
    table = open(out / "report" / "comparison.md").read()
    for name in info["trainers"]:
        assert f"| {name} |" in table
    for f in ("boxplots.png", "paired_differences.png", "target_quality.png"):
        assert (out / "report" / f).stat().st_size > 1000
    # the honest verdict and what the two semi-supervised trainers learned from (generated data label
    # every unlabeled case)
    assert "## Verdict against nnUNetTrainer" in table
    assert "## What the semi-supervised trainers learn from" in table
    for row in ("| nnUNetTrainerWeakToStrong | prediction |", "| nnUNetTrainerWeakToStrong | pseudo_label |",
                "| nnUNetTrainerSUD | denoised |", "| nnUNetTrainerSUD | target |"):
        assert row in table
    for t in info["trainers"]:
        ev = json.load(open(out / "evaluation" / f"{t}_demo.json"))  # evaluations of the _demo variants
        assert len(ev["cases"]) == 2  # the smoke schedule's two test images
    # the demo's own nnU-Net folders: the denoiser and each trainer's model folder
    results = out / "nnUNet_results" / "Dataset990_SyntheticDemo"
    assert (results / "nnUNetTrainerLabelDenoiser_demo__nnUNetPlans__3d_fullres" / "fold_0" /
            "checkpoint_final.pth").is_file()


def test_verdict_words():
    from nnunet_sud.demo import verdict
    rows = [{"metric": "Dice", "method": "SUD", "name": "wall", "mean": -0.05, "p_wilcoxon": 0.01, "n_pairs": 8},
            {"metric": "Dice", "method": "SUD", "name": "cavity", "mean": 0.02, "p_wilcoxon": 0.3, "n_pairs": 8},
            {"metric": "Dice", "method": "TE", "name": "wall", "mean": 0.04, "p_wilcoxon": 0.02, "n_pairs": 8},
            {"metric": "HD95", "method": "TE", "name": "wall", "mean": 9.0, "p_wilcoxon": 0.001, "n_pairs": 8}]
    text = verdict(rows, "nnUNetTrainer")
    assert "- SUD, wall: worse than nnUNetTrainer (mean change -0.050, p = 0.01, 8 cases)" in text
    assert "- SUD, cavity: not clearly different from nnUNetTrainer" in text
    assert "- TE, wall: better than nnUNetTrainer" in text and "HD95" not in text
    assert verdict(rows, None) == ""
