"""benchmarks/data_pipeline.py runs on tiny settings and prints its tables with every row (no timing
assertions: the machine is shared and noisy)."""
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import data_pipeline  # noqa: E402
from conftest import run_cmd  # noqa: E402

SCRIPT = data_pipeline.__file__


def _rows(text, title):
    """{first cell: cells} of the markdown table under the heading containing ``title``."""
    block = text.split(title, 1)[1].split("\n####", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    return {r[0]: r for r in rows[1:]}, rows[0]


def test_default_trainers_are_one_per_method():
    names = data_pipeline.default_trainers()
    for n in ("nnUNetTrainerSUD", "nnUNetTrainerSegMatch", "nnUNetTrainerMeanTeacher", "nnUNetTrainerDMNet",
              "nnUNetTrainerUAMT", "nnUNetTrainerDAEUncertainty", "nnUNetTrainerSUDMeanTeacher"):
        assert n in names
    for variant in ("nnUNetTrainerTE", "nnUNetTrainerSegMatch_identity", "nnUNetTrainerMeanTeacher_noDropout"):
        assert variant not in names


def test_tiny_run_prints_every_row(synthetic3d):
    # a subprocess, as users run it: the script points nnUNet_results at a scratch folder before importing nnunetv2
    out = run_cmd([sys.executable, SCRIPT, "-d", str(synthetic3d["id"]), "-c", "3d_fullres", "--rounds", "1",
                   "--batches", "1", "--steps", "1", "--trainers", "nnUNetTrainerTE", "nnUNetTrainerSegMatch",
                   "nnUNetTrainerMeanTeacher", "--store-patch", "8", "12", "12", "--store-steps", "1",
                   "--gpu-step-s", "0.01"], timeout=900)
    assert "soft-target store at GPU scale" in out
    workers, header = _rows(out, "One augmentation worker")
    assert header[:4] == ["stream", "s/batch", "batches/s", "ratio to labeled"]
    assert {"labeled (nnUNetTrainer)", "unlabeled", "unlabeled, valid only", "unlabeled, no extra channels",
            "unlabeled, interpolated coordinates", "unlabeled, valid only, interpolated",
            "unlabeled, nnUNetTrainerMeanTeacher",  # no coordinates: its own stream
            "unlabeled + nnUNetTrainerSegMatch.views (main process)"} <= set(workers)
    assert workers["labeled (nnUNetTrainer)"][3] == "1.00"
    for r in workers.values():
        assert float(r[1]) > 0 and float(r[2]) > 0
    main, header = _rows(out, "Main process per step outside the network")
    assert set(main) == {"nnUNetTrainer", "nnUNetTrainerTE", "nnUNetTrainerSegMatch", "nnUNetTrainerMeanTeacher"}
    assert "store s" in header and "views s" in header and "% of GPU step (est.)" in header
    col = {c: i for i, c in enumerate(header)}
    assert float(main["nnUNetTrainerTE"][col["store s"]]) > 0       # TE reads and writes its store
    assert float(main["nnUNetTrainerSegMatch"][col["views s"]]) >= 0
    assert main["nnUNetTrainer"][col["store s"]] == "0.0000"       # nnU-Net's trainer has none of the pieces
    assert re.search(r"GPU estimate: outside seconds x \d+ / \d+ voxels", out)


def test_store_at_gpu_scale_tiny():
    out = run_cmd([sys.executable, SCRIPT, "--only", "store", "--store-patch", "8", "12", "12", "--store-steps", "2",
                   "--gpu-step-s", "0.01"], timeout=300)
    block = out.split("soft-target store at GPU scale", 1)[1]
    rows = [line for line in block.splitlines() if line.startswith("| crops") or line.startswith("| rotated")]
    assert [r.split("|")[1:3] for r in rows] == [[" crops ", " synchronous "], [" crops ", " write-behind "],
                                                 [" crops ", " write-behind, per-voxel path "],
                                                 [" rotated 10 deg ", " synchronous "],
                                                 [" rotated 10 deg ", " write-behind "]]
    for r in rows:
        assert float(r.split("|")[3]) > 0  # main-process seconds
        assert float(r.split("|")[6]) > 0  # seconds copying blocks of the case files
