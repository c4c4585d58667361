"""Tables and figures of the committed benchmark results (``benchmarks/results/``).

Every number the README and the docs quote about quality on real scans comes from here:
``benchmarks/ssl_quality.py`` writes one file per trained model and scored split,
``results/<setting>/<split>/<trainer>/run<k>.json`` (per case and class: Dice, HD95), and this
script turns them into Markdown tables (and box plots of per-patient Dice).

Statistics, per setting and split:

* a run's score: the mean over cases of the case's mean Dice over the foreground classes
  (classes absent from reference and prediction are left out of that case's mean); per class
  the mean over cases; HD95 the mean over cases and classes (mm);
* mean +- sd over a trainer's runs (sample sd; "-" with one run);
* the difference to the baseline (``nnUNetTrainer``) and a paired test over *patients*: a
  patient's value is the mean over its frames (ACDC: two per patient; LA: one case each) and over
  the trainer's runs; two-sided Wilcoxon signed-rank test of the patients' values of the trainer
  against the baseline's (exact for small samples, scipy.stats.wilcoxon);
* "clear": the difference exceeds twice the baseline's run-to-run sd;
* the fraction of the baseline -> all-labels gap, gap(r) = (score(r) - mean baseline) / (mean
  upper bound - mean baseline) for each run r of the trainer, as mean +- sd over its runs
  (upper bound: ``nnUNetTrainer_allLabels``);
* training time relative to the baseline: the mean ``train_seconds`` of the runs' files (wall
  time of ``nnUNetv2_train`` where it ran; machine load adds noise; ``benchmarks/trainer_cost.py``
  measures the time per iteration side by side).

Usage::

    python benchmarks/report.py              # print every table
    python benchmarks/report.py --write      # regenerate the marked blocks of README.md and docs/*.md,
                                             # and the figures docs/figures/results_<setting>_<split>.png
    python benchmarks/report.py --check      # exit 1 when a marked block differs from the results

A marked block is the text between ``<!-- report:KIND SETTING SPLIT -->`` and ``<!-- /report -->``
(KIND: ``table``, all trainers with every statistic; ``summary``, the short "Which trainer?"
table). ``--check`` is part of the test suite: a block edited by hand, or results added without
``--write``, fail it.
"""
import argparse
import glob
import json
import math
import os
import re
import sys
from typing import Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
BASELINE = "nnUNetTrainer"
UPPER = "nnUNetTrainer_allLabels"
GROUP_REGEX = {"la": None, "acdc": r"^(patient\d+)"}
BLOCK = re.compile(r"(<!-- report:(\w+) (\S+) (\S+) -->\n)(.*?)(<!-- /report -->)", re.S)
DOCUMENTS = ("README.md", "docs/*.md")


# ---------------------------------------------------------------------- loading
def load_results(root: str = RESULTS) -> Dict[tuple, Dict[str, Dict[int, dict]]]:
    """``{(setting, split): {trainer: {run: record}}}`` of every ``run<k>.json`` below ``root``."""
    out: Dict[tuple, Dict[str, Dict[int, dict]]] = {}
    for path in sorted(glob.glob(os.path.join(root, "*", "*", "*", "run*.json"))):
        with open(path) as f:
            rec = json.load(f)
        setting, split, trainer = path.split(os.sep)[-4:-1]
        if (rec["setting"], rec["split"], rec["trainer"]) != (setting, split, trainer):
            raise ValueError(f"{path}: its setting/split/trainer ({rec['setting']}/{rec['split']}/{rec['trainer']}) "
                             f"disagree with its place")
        out.setdefault((setting, split), {}).setdefault(trainer, {})[int(rec["run"])] = rec
    return out


def group_regex(setting: str) -> Optional[str]:
    return GROUP_REGEX[re.match(r"[a-z]+", setting).group(0)]


# ---------------------------------------------------------------------- statistics
def _mean(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else float("nan")


def case_score(case: dict, metric: str = "dice") -> float:
    """Mean over a case's classes (``{class: {"dice", "hd95"}}``), classes with no value left out."""
    return _mean(m[metric] for m in case.values())


def run_score(record: dict, metric: str = "dice") -> float:
    """Mean over the run's cases of :func:`case_score`."""
    return _mean(case_score(c, metric) for c in record["cases"].values())


def class_scores(record: dict) -> Dict[str, float]:
    names = list(next(iter(record["cases"].values())))
    return {n: _mean(c[n]["dice"] for c in record["cases"].values()) for n in names}


def patient_scores(records: List[dict], regex: Optional[str]) -> Dict[str, float]:
    """A patient's mean Dice: the mean over its cases (frames) and over the runs in ``records``."""
    per: Dict[str, list] = {}
    for rec in records:
        for case, metrics in rec["cases"].items():
            m = re.match(regex, case) if regex else None
            per.setdefault(m.group(1) if m else case, []).append(case_score(metrics))
    return {p: _mean(v) for p, v in sorted(per.items())}


def paired_patient_test(trainer_records: List[dict], baseline_records: List[dict], regex: Optional[str]) -> dict:
    """Two-sided Wilcoxon signed-rank test over the patients both have: ``{"p", "n", "better"}``
    (``better``: patients whose value is above the baseline's)."""
    from scipy.stats import wilcoxon
    a, b = patient_scores(trainer_records, regex), patient_scores(baseline_records, regex)
    common = [p for p in a if p in b and not (math.isnan(a[p]) or math.isnan(b[p]))]
    x, y = np.array([a[p] for p in common]), np.array([b[p] for p in common])
    if len(common) < 2 or np.all(x == y):
        return {"p": float("nan"), "n": len(common), "better": int(np.sum(x > y))}
    return {"p": float(wilcoxon(x, y).pvalue), "n": len(common), "better": int(np.sum(x > y))}


def sd(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def trainer_statistics(runs: Dict[int, dict], baseline: Optional[Dict[int, dict]], upper: Optional[Dict[int, dict]],
                       regex: Optional[str]) -> dict:
    """Every statistic of one trainer's runs against the baseline's (module doc)."""
    records = [runs[k] for k in sorted(runs)]
    scores = [run_score(r) for r in records]
    per_class = [class_scores(r) for r in records]
    st = {"runs": len(records), "mean": float(np.mean(scores)), "sd": sd(scores), "scores": scores,
          "classes": {n: float(np.mean([c[n] for c in per_class])) for n in per_class[0]},
          "hd95": float(np.mean([run_score(r, "hd95") for r in records])),
          "seconds": float(np.mean([r.get("train_seconds", float("nan")) for r in records]))}
    if baseline:
        b_records = [baseline[k] for k in sorted(baseline)]
        b_scores = [run_score(r) for r in b_records]
        b_mean, b_sd = float(np.mean(b_scores)), sd(b_scores)
        st["diff"] = st["mean"] - b_mean
        st["clear"] = bool(len(b_scores) > 1 and st["diff"] > 2 * b_sd)
        st["test"] = paired_patient_test(records, b_records, regex)
        b_seconds = float(np.mean([r.get("train_seconds", float("nan")) for r in b_records]))
        st["cost"] = st["seconds"] / b_seconds if b_seconds > 0 else float("nan")
        if upper:
            u_mean = float(np.mean([run_score(upper[k]) for k in sorted(upper)]))
            gaps = [(s - b_mean) / (u_mean - b_mean) for s in scores] if u_mean != b_mean else [float("nan")]
            st["gap"], st["gap_sd"] = float(np.mean(gaps)), sd(gaps)
    return st


def setting_statistics(trainers: Dict[str, Dict[int, dict]], setting: str) -> Dict[str, dict]:
    regex = group_regex(setting)
    base, upper = trainers.get(BASELINE), trainers.get(UPPER)
    return {t: trainer_statistics(runs, base, upper if t != UPPER else None, regex) for t, runs in trainers.items()}


# ---------------------------------------------------------------------- formatting
def _f(v: float, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _pm(mean: float, sdev: float, digits: int = 3) -> str:
    return _f(mean, digits) + ("" if math.isnan(sdev) else f" +- {_f(sdev, digits)}")


def _p(p: float) -> str:
    return "-" if math.isnan(p) else (f"{p:.2g}" if p < 0.01 else f"{p:.2f}")


def ordered(stats: Dict[str, dict]) -> List[str]:
    """Baseline first, upper bound last, the others by mean Dice (best first)."""
    middle = sorted((t for t in stats if t not in (BASELINE, UPPER)), key=lambda t: -stats[t]["mean"])
    return [t for t in [BASELINE] if t in stats] + middle + [t for t in [UPPER] if t in stats]


def full_table(stats: Dict[str, dict]) -> str:
    names = list(next(iter(stats.values()))["classes"])
    head = (["trainer", "runs", "mean Dice"] + names +
            ["HD95 mm", "vs baseline", "p (patients)", "gap closed", "train time"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for t in ordered(stats):
        s = stats[t]
        row = [f"`{t}`", str(s["runs"]), _pm(s["mean"], s["sd"])] + [_f(s["classes"][n]) for n in names]
        row.append(_f(s["hd95"], 1))
        gap = _pm(100 * s["gap"], 100 * s["gap_sd"], 0) + " %" if "gap" in s else ""
        if t == BASELINE or "diff" not in s:
            row += ["", "", gap, "1.00x" if t == BASELINE else ""]
        else:
            test = s["test"]
            row += [f"{s['diff']:+.3f}" + (" (clear)" if s["clear"] else ""),
                    f"{_p(test['p'])} ({test['better']}/{test['n']} better)", gap,
                    f"{s['cost']:.2f}x" if not math.isnan(s["cost"]) else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def summary_table(stats: Dict[str, dict]) -> str:
    """The short table: mean +- sd, gap closed, training time, best first."""
    head = ["trainer", "mean Dice (runs)", "gap closed", "p vs baseline", "train time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    rest = sorted((t for t in stats if t not in (BASELINE, UPPER)), key=lambda t: -stats[t]["mean"])
    for t in rest + [t for t in (BASELINE, UPPER) if t in stats]:
        s = stats[t]
        gap = (_pm(100 * s["gap"], 100 * s["gap_sd"], 0) + " %") if "gap" in s else (
            "0 %" if t == BASELINE else ("100 %" if t == UPPER else ""))
        p = _p(s["test"]["p"]) if "test" in s and t != BASELINE else ""
        cost = f"{s['cost']:.1f}x" if "cost" in s and not math.isnan(s["cost"]) else ""
        lines.append(f"| `{t}` | {_pm(s['mean'], s['sd'])} ({s['runs']}) | {gap} | {p} | {cost} |")
    return "\n".join(lines) + "\n"


KINDS = {"table": full_table, "summary": summary_table}


def block_text(kind: str, setting: str, split: str, results) -> str:
    trainers = results.get((setting, split))
    if not trainers:
        return f"(no results yet in benchmarks/results/{setting}/{split}/)\n"
    return KINDS[kind](setting_statistics(trainers, setting))


# ---------------------------------------------------------------------- figures
def plot(setting: str, split: str, trainers: Dict[str, Dict[int, dict]], path: str) -> str:
    """Box plots of the per-patient mean Dice (mean over frames and runs), one box per trainer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    stats = setting_statistics(trainers, setting)
    order = ordered(stats)
    regex = group_regex(setting)
    data = [list(patient_scores(list(trainers[t].values()), regex).values()) for t in order]
    fig, ax = plt.subplots(figsize=(1.3 * len(order) + 2, 4.2))
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(order) + 1))
    ax.set_xticklabels([f"{t.replace('nnUNetTrainer', '') or 'nnUNetTrainer'}\n({stats[t]['runs']} runs)"
                        for t in order], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mean Dice per patient (frames, runs)")
    ax.set_title(f"{setting}, {split} split: benchmarks/results/{setting}/{split}")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- documents
def documents(repo: str = REPO) -> List[str]:
    out = []
    for pattern in DOCUMENTS:
        out += sorted(glob.glob(os.path.join(repo, pattern)))
    return out


def regenerate(text: str, results) -> str:
    return BLOCK.sub(lambda m: m.group(1) + block_text(m.group(2), m.group(3), m.group(4), results) + m.group(6),
                     text)


def stale_blocks(repo: str = REPO, root: str = RESULTS) -> List[str]:
    """``path: block`` of every marked block whose text differs from what the results give."""
    results = load_results(root)
    out = []
    for path in documents(repo):
        with open(path) as f:
            text = f.read()
        for m in BLOCK.finditer(text):
            if m.group(2) not in KINDS:
                out.append(f"{os.path.relpath(path, repo)}: unknown block kind '{m.group(2)}'")
            elif m.group(5) != block_text(m.group(2), m.group(3), m.group(4), results):
                out.append(f"{os.path.relpath(path, repo)}: report:{m.group(2)} {m.group(3)} {m.group(4)}")
    return out


def write(repo: str = REPO, root: str = RESULTS, figures: bool = True) -> List[str]:
    results = load_results(root)
    changed = []
    for path in documents(repo):
        with open(path) as f:
            text = f.read()
        new = regenerate(text, results)
        if new != text:
            with open(path, "w") as f:
                f.write(new)
            changed.append(path)
    if figures:
        for (setting, split), trainers in sorted(results.items()):
            changed.append(plot(setting, split, trainers,
                                os.path.join(repo, "docs", "figures", f"results_{setting}_{split}.png")))
    return changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--results", default=RESULTS, help="results folder (default: benchmarks/results)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="regenerate the marked blocks and the figures")
    g.add_argument("--check", action="store_true", help="exit 1 when a marked block is out of date")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_blocks(REPO, args.results)
        for s in stale:
            print(f"out of date: {s}")
        if stale:
            print("regenerate them: python benchmarks/report.py --write")
        return 1 if stale else 0
    if args.write:
        for path in write(REPO, args.results):
            print(f"wrote {os.path.relpath(path, REPO)}")
        return 0
    results = load_results(args.results)
    if not results:
        print(f"no results in {args.results}")
    for (setting, split), trainers in sorted(results.items()):
        print(f"## {setting}, {split} split\n")
        print(full_table(setting_statistics(trainers, setting)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
