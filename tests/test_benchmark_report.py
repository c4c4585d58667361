"""benchmarks/report.py: the statistics of the committed results, computed by hand on small
constructed result files, and the marked blocks of the docs regenerated from them (and found out of
date when they are not)."""
import json
import math
import os

import pytest

from helpers import load_benchmark


def _load():
    return load_benchmark("report")


def _record(trainer, run, cases, split="validation", seconds=100.0):
    return {"trainer": trainer, "setting": "acdc3", "split": split, "run": run, "seed": run, "epochs": 2,
            "iterations": 3, "git_commit": "abc", "train_seconds": seconds, "cases": cases}


def _cases(values):
    """{patientN_frameF: {"A": {dice, hd95}, "B": {...}}} from {(patient, frame): (a, b)}."""
    return {f"patient{p:03d}_frame{f:02d}": {"A": {"dice": a, "hd95": None if a is None else 2.0},
                                             "B": {"dice": b, "hd95": None if b is None else 4.0}}
            for (p, f), (a, b) in values.items()}


def _write(root, rec):
    path = os.path.join(root, rec["setting"], rec["split"], rec["trainer"], f"run{rec['run']}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rec, f)


def _results(root):
    frames = [(p, f) for p in (1, 2, 3) for f in (1, 2)]
    _write(root, _record("nnUNetTrainer", 1, _cases({k: (0.5, 0.7) for k in frames})))
    _write(root, _record("nnUNetTrainer", 2, _cases({k: (0.6, 0.8) for k in frames})))
    t1 = {(1, 1): (0.8, 0.8), (1, 2): (0.8, 0.8), (2, 1): (0.9, 0.9), (2, 2): (0.9, 0.9), (3, 1): (0.7, None),
          (3, 2): (0.7, None)}  # patient 3: class B absent from reference and prediction
    _write(root, _record("X", 1, _cases(t1), seconds=250.0))
    _write(root, _record("X", 2, _cases({k: (a + 0.1, None if b is None else b + 0.1) for k, (a, b) in t1.items()}),
                         seconds=350.0))
    _write(root, _record("nnUNetTrainer_allLabels", 1, _cases({k: (1.0, 1.0) for k in frames})))


def test_statistics_by_hand(tmp_path):
    rep = _load()
    _results(str(tmp_path))
    results = rep.load_results(str(tmp_path))
    assert sorted(results) == [("acdc3", "validation")]
    st = rep.setting_statistics(results[("acdc3", "validation")], "acdc3")
    b, x = st["nnUNetTrainer"], st["X"]
    assert b["scores"] == pytest.approx([0.6, 0.7]) and b["sd"] == pytest.approx(math.sqrt(0.005))
    # run 1: cases 0.8, 0.8, 0.9, 0.9, 0.7, 0.7 (patient 3's mean is class A alone) -> 0.8; run 2: 0.9
    assert x["scores"] == pytest.approx([0.8, 0.9]) and x["mean"] == pytest.approx(0.85)
    assert x["classes"] == pytest.approx({"A": 0.85, "B": 0.9})  # B over the cases that have it
    assert x["hd95"] == pytest.approx(8 / 3)  # per case (2 + 4) / 2 = 3, patient 3's frames 2: (4 * 3 + 2 * 2) / 6
    assert x["diff"] == pytest.approx(0.2)
    assert x["clear"] is True  # 0.2 > 2 * 0.0707
    # gap per run: (0.8 - 0.65) / 0.35, (0.9 - 0.65) / 0.35
    gaps = [0.15 / 0.35, 0.25 / 0.35]
    assert x["gap"] == pytest.approx(sum(gaps) / 2) and x["gap_sd"] == pytest.approx(abs(gaps[1] - gaps[0]) / math.sqrt(2))
    # patients (mean over frames and runs): 0.85, 0.95, 0.75 against 0.65 each: 3 of 3 better; the
    # exact two-sided Wilcoxon signed-rank p of 3 positive differences is 2 / 2^3
    assert rep.patient_scores([results[("acdc3", "validation")]["X"][k] for k in (1, 2)], r"^(patient\d+)") == \
        pytest.approx({"patient001": 0.85, "patient002": 0.95, "patient003": 0.75})
    assert x["test"] == {"p": pytest.approx(0.25), "n": 3, "better": 3}
    assert x["cost"] == pytest.approx(3.0)  # 300 s against 100 s
    assert "gap" not in st["nnUNetTrainer_allLabels"]


def test_tables_and_blocks_regenerate_from_the_results(tmp_path):
    rep = _load()
    root, repo = str(tmp_path / "results"), tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "README.md").write_text("intro\n<!-- report:summary acdc3 validation -->\nold\n<!-- /report -->\nend\n")
    (repo / "docs" / "a.md").write_text("<!-- report:table acdc3 test -->\n<!-- /report -->\n")
    assert rep.stale_blocks(str(repo), root) == ["README.md: report:summary acdc3 validation",
                                                 "docs/a.md: report:table acdc3 test"]
    _results(root)
    rep.write(str(repo), root)
    assert rep.stale_blocks(str(repo), root) == []
    readme = (repo / "README.md").read_text()
    assert readme.startswith("intro\n<!-- report:summary acdc3 validation -->\n| trainer |") and readme.endswith(
        "<!-- /report -->\nend\n")
    rows = [ln for ln in readme.splitlines() if ln.startswith("| `")]
    assert rows[0].startswith("| `X` | 0.850 +- 0.071 (2) | 57 +- 20 % | 0.25 | 3.0x |")
    # the baseline's own runs in gap units: -0.05 / 0.35 and +0.05 / 0.35
    assert rows[1].startswith("| `nnUNetTrainer` | 0.650 +- 0.071 (2) | 0 +- 20 % |  | 1.0x |")
    assert rows[2].startswith("| `nnUNetTrainer_allLabels` | 1.000 (1) | 100 % |")
    assert (repo / "docs" / "a.md").read_text() == \
        "<!-- report:table acdc3 test -->\n(no results yet in benchmarks/results/acdc3/test/)\n<!-- /report -->\n"
    assert (repo / "docs" / "figures" / "results_acdc3_validation.png").stat().st_size > 1000
    # a number changed by hand is found
    (repo / "README.md").write_text(readme.replace("0.850 +- 0.071", "0.860 +- 0.071"))
    assert rep.stale_blocks(str(repo), root) == ["README.md: report:summary acdc3 validation"]


def test_a_file_in_the_wrong_place_is_refused(tmp_path):
    rep = _load()
    rec = _record("X", 1, _cases({(1, 1): (0.5, 0.5)}))
    path = tmp_path / "acdc3" / "test" / "X" / "run1.json"  # its record says split validation
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="disagree with its place"):
        rep.load_results(str(tmp_path))


def test_the_repositorys_blocks_are_up_to_date():
    """Every marked block in README.md and docs/*.md is what benchmarks/results gives."""
    rep = _load()
    assert rep.stale_blocks() == []
