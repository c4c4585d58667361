"""The README's main command, in its smallest setting: generated data through plan/preprocess,
denoiser, nnUNetTrainer/TE/SUD training, prediction, evaluation and the comparison report."""
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
    assert info["trainers"] == ["nnUNetTrainer", "nnUNetTrainerTE", "nnUNetTrainerSUD"]
    table = open(out / "report" / "comparison.md").read()
    for name in info["trainers"]:
        assert f"| {name} |" in table
    for f in ("boxplots.png", "paired_differences.png"):
        assert (out / "report" / f).stat().st_size > 1000
    for t in info["trainers"]:
        ev = json.load(open(out / "evaluation" / f"{t}_demo.json"))  # evaluations of the _demo variants
        assert len(ev["cases"]) == 2  # the smoke schedule's two test images
    # the demo's own nnU-Net folders: the denoiser and each trainer's model folder
    results = out / "nnUNet_results" / "Dataset990_SyntheticDemo"
    assert (results / "nnUNetTrainerLabelDenoiser_demo__nnUNetPlans__3d_fullres" / "fold_0" /
            "checkpoint_final.pth").is_file()
