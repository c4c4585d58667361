"""``nnunet-sud compare``: tables and plots of several evaluations (one per method / trainer).

Input: ``NAME=path.json`` pairs, each a file written by ``nnunet-sud evaluate`` on the same
reference cases and classes. Output folder (``-o``):

* ``comparison.md``: (1) median Dice and median HD95 per class and method, best value per
  column in bold (highest Dice, lowest HD95; ties all bold), in the style of Table 3 of the SUD
  paper (Tamer & Dalca, "Supervision by Denoising", TPAMI 2023); (2) per class and method the
  number of missed / false-positive structures; (3) with ``--baseline``: per method, class and
  metric the paired per-case improvement over the baseline (mean, median, number of pairs,
  Wilcoxon signed-rank p-value).
* ``boxplots.png``: box plots per class and method, one panel for Dice and one for HD95 (as
  Figs. 13 and 15 of the paper).
* ``paired_differences.png`` (with ``--baseline``): histograms of the per-case improvements
  over the baseline, per metric and class (as Fig. 16).
* ``paired_differences.csv``, ``comparison.json``: the numbers behind the above.

Paired improvement of method M over baseline B on case i (positive = M better, for both metrics)::

    dDice_i = Dice_i(M) - Dice_i(B)          dHD95_i = HD95_i(B) - HD95_i(M)

Only cases where both values are finite are paired (a structure absent from both reference and
prediction has NaN metrics, see :mod:`nnunet_sud.evaluation.evaluate`). The p-value is
``scipy.stats.wilcoxon(d).pvalue`` with scipy's defaults (two-sided; zero differences dropped,
``zero_method="wilcox"``); when every difference is zero the methods agree on every case and
p = 1 is reported (old scipy versions raise there); with no pair it is NaN.
"""
import csv
import json
import math
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

from nnunet_sud.errors import UserFacingError
from nnunet_sud.evaluation.evaluate import METRICS, load_evaluation

DECIMALS = {"Dice": 3, "HD95": 2}
UNITS = {"Dice": "", "HD95": " (mm)"}


# ------------------------------------------------------------------------------------- inputs
def parse_named(items: Sequence[str]) -> List[Tuple[str, str]]:
    """``["A=a.json", "B=b.json"]`` -> ``[("A", "a.json"), ("B", "b.json")]`` with checks."""
    out, seen = [], set()
    for it in items:
        name, sep, path = it.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise UserFacingError(f"'{it}': give evaluations as NAME=path.json, e.g. SUD=results/sud.json")
        if name in seen:
            raise UserFacingError(f"method name '{name}' is given twice; names must be unique")
        seen.add(name)
        out.append((name, path))
    if not out:
        raise UserFacingError("give at least one evaluation as NAME=path.json")
    return out


def check_consistent(evals: Dict[str, dict]) -> None:
    """All evaluations must cover the same cases and the same classes (raises UserFacingError)."""
    names = list(evals)
    first = names[0]
    cases0, classes0 = set(evals[first]["cases"]), [c["key"] for c in evals[first]["classes"]]
    for n in names[1:]:
        cases = set(evals[n]["cases"])
        if cases != cases0:
            lacking, extra = sorted(cases0 - cases), sorted(cases - cases0)
            msg = f"evaluations '{first}' and '{n}' cover different cases:"
            if lacking:
                msg += f" '{n}' lacks {len(lacking)} ({', '.join(lacking[:20])}{', ...' if len(lacking) > 20 else ''});"
            if extra:
                msg += f" '{n}' has {len(extra)} more ({', '.join(extra[:20])}{', ...' if len(extra) > 20 else ''});"
            raise UserFacingError(msg + " evaluate every method on the same reference cases "
                                        "(nnunet-sud evaluate without --only-predicted).")
        classes = [c["key"] for c in evals[n]["classes"]]
        if classes != classes0:
            raise UserFacingError(f"evaluations '{first}' and '{n}' evaluate different classes: {classes0} vs "
                                  f"{classes}; evaluate all methods with the same --labels / -djfile.")


def load_evaluations(named: Sequence[Tuple[str, str]]) -> Dict[str, dict]:
    """``{name: evaluation}`` (insertion order = given order), checked for consistency."""
    evals = {name: load_evaluation(path) for name, path in named}
    check_consistent(evals)
    return evals


def class_names(evals: Dict[str, dict]) -> Dict[str, str]:
    first = next(iter(evals.values()))
    return {c["key"]: c["name"] for c in first["classes"]}


def per_case_values(ev: dict, key: str, metric: str, cases: Sequence[str]) -> np.ndarray:
    """Values of ``metric`` for class ``key`` in the order of ``cases``, shape ``(len(cases),)``."""
    by_case = {pc["case"]: pc["metrics"][key][metric] for pc in ev["per_case"]}
    return np.asarray([by_case[c] for c in cases], dtype=np.float64)


# -------------------------------------------------------------------------------- statistics
def wilcoxon_p(d: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences ``d`` (scipy defaults).

    NaN for no difference at all (empty input); 1.0 when every difference is 0.
    """
    from scipy.stats import wilcoxon

    d = np.asarray(d, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return float("nan")
    if np.all(d == 0):
        return 1.0
    return float(wilcoxon(d).pvalue)


def improvement(metric: str, method: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """Per-case improvement of ``method`` over ``baseline`` (positive = better)."""
    return method - baseline if metric == "Dice" else baseline - method


def paired_differences(evals: Dict[str, dict], baseline: str) -> List[dict]:
    """One row per (method != baseline, class, metric): improvements over the baseline.

    Row: ``{"method", "class", "name", "metric", "n_pairs", "mean", "median", "p_wilcoxon",
    "cases", "differences"}`` (``differences`` shape ``(n_pairs,)``, aligned with ``cases``).
    """
    if baseline not in evals:
        raise UserFacingError(f"--baseline {baseline}: not among the given names {list(evals)}")
    cases = list(evals[baseline]["cases"])
    names = class_names(evals)
    rows = []
    for method, ev in evals.items():
        if method == baseline:
            continue
        for key in names:
            for metric in METRICS:
                b = per_case_values(evals[baseline], key, metric, cases)
                m = per_case_values(ev, key, metric, cases)
                ok = np.isfinite(b) & np.isfinite(m)
                d = improvement(metric, m[ok], b[ok])
                rows.append({"method": method, "class": key, "name": names[key], "metric": metric,
                             "n_pairs": int(d.size),
                             "mean": float(d.mean()) if d.size else float("nan"),
                             "median": float(np.median(d)) if d.size else float("nan"),
                             "p_wilcoxon": wilcoxon_p(d),
                             "cases": [c for c, o in zip(cases, ok) if o], "differences": d})
    return rows


# -------------------------------------------------------------------------------------- tables
def _fmt(v: float, decimals: int) -> str:
    return "n/a" if (v is None or not np.isfinite(v)) else f"{v:.{decimals}f}"


def _fmt_p(p: float) -> str:
    if p is None or not np.isfinite(p):
        return "n/a"
    return f"{p:.3g}"


def summary_table_markdown(evals: Dict[str, dict]) -> str:
    """Markdown table: rows = methods, columns = median Dice and median HD95 per class.

    The best value of each column (highest Dice, lowest HD95, compared at the printed precision)
    is bold; ties are all bold.
    """
    names = class_names(evals)
    cols = [(key, metric) for key in names for metric in METRICS]
    header = "| Method | " + " | ".join(f"{names[k]} {m}{UNITS[m]}" for k, m in cols) + " |"
    sep = "|---|" + "---:|" * len(cols)
    cells = {}
    for key, metric in cols:
        vals = {meth: ev["summary"][key][metric]["median"] for meth, ev in evals.items()}
        shown = {meth: _fmt(v, DECIMALS[metric]) for meth, v in vals.items()}
        finite = [round(v, DECIMALS[metric]) for v in vals.values() if v is not None and np.isfinite(v)]
        best = (max(finite) if metric == "Dice" else min(finite)) if finite else None
        for meth, v in vals.items():
            s = shown[meth]
            if best is not None and v is not None and np.isfinite(v) and round(v, DECIMALS[metric]) == best:
                s = f"**{s}**"
            cells[(meth, key, metric)] = s
    lines = [header, sep]
    for meth in evals:
        lines.append(f"| {meth} | " + " | ".join(cells[(meth, k, m)] for k, m in cols) + " |")
    return "\n".join(lines)


def empty_counts_markdown(evals: Dict[str, dict]) -> str:
    """Markdown table: per method and class ``missed / false positive / both empty`` case counts."""
    names = class_names(evals)
    lines = ["| Method | " + " | ".join(names[k] for k in names) + " |", "|---|" + "---:|" * len(names)]
    for meth, ev in evals.items():
        cells = [f"{ev['summary'][k]['n_missed']} / {ev['summary'][k]['n_false_positive']} / "
                 f"{ev['summary'][k]['n_both_empty']}" for k in names]
        lines.append(f"| {meth} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table_markdown(rows: Sequence[dict]) -> str:
    """Markdown table of :func:`paired_differences` rows (without the per-case arrays)."""
    lines = ["| Method | Class | Metric | n pairs | mean improvement | median improvement | Wilcoxon p |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        dec = DECIMALS[r["metric"]] + 1
        lines.append(f"| {r['method']} | {r['name']} | {r['metric']}{UNITS[r['metric']]} | {r['n_pairs']} | "
                     f"{_fmt(r['mean'], dec)} | {_fmt(r['median'], dec)} | {_fmt_p(r['p_wilcoxon'])} |")
    return "\n".join(lines)


def gap_closed(evals: Dict[str, dict], baseline: str, upper: str) -> List[dict]:
    """Per method (other than baseline and upper), the fraction of the baseline -> upper-bound gap in
    mean Dice that it closes, per class and for the mean over classes:

        (Dice(method) - Dice(baseline)) / (Dice(upper) - Dice(baseline))

    with Dice the mean over cases (a semi-supervised method against nnU-Net on the same labeled
    cases, with nnU-Net on every label as the upper bound). 1 = as good as all labels, 0 = no
    gain, negative = worse than the baseline; NaN when the gap is not positive.
    """
    names = class_names(evals)

    def fraction(m, b, u):
        return (m - b) / (u - b) if np.isfinite(m) and np.isfinite(b) and np.isfinite(u) and u > b else math.nan

    def class_means(ev):
        return {k: ev["summary"][k]["Dice"]["mean"] for k in names}

    b, u = class_means(evals[baseline]), class_means(evals[upper])
    rows = []
    for meth, ev in evals.items():
        if meth in (baseline, upper):
            continue
        m = class_means(ev)
        row = {"method": meth, "per_class": {k: fraction(m[k], b[k], u[k]) for k in names}}
        mean = [np.nanmean([d[k] for k in names]) for d in (m, b, u)]
        row["mean_dice"] = float(mean[0])
        row["mean"] = fraction(*mean)
        rows.append(row)
    return rows


def gap_closed_markdown(rows: Sequence[dict], evals: Dict[str, dict], baseline: str, upper: str) -> str:
    names = class_names(evals)
    means = {n: float(np.nanmean([evals[n]["summary"][k]["Dice"]["mean"] for k in names])) for n in (baseline, upper)}
    lines = [f"Mean Dice (over cases, then classes): {baseline} {means[baseline]:.3f}, {upper} {means[upper]:.3f}.", "",
             "| Method | mean Dice | gap closed, mean | " + " | ".join(f"gap closed, {names[k]}" for k in names) + " |",
             "|---|---:|---:|" + "---:|" * len(names)]
    for r in rows:
        lines.append(f"| {r['method']} | {r['mean_dice']:.3f} | {_fmt(r['mean'], 2)} | "
                     + " | ".join(_fmt(r["per_class"][k], 2) for k in names) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- plots
def _method_colors(methods: Sequence[str]):
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def plot_boxplots(evals: Dict[str, dict]):
    """Box plots per class and method; returns ``(figure, {"Dice": axes, "HD95": axes})``.

    Each axes holds ``n_classes * n_methods`` boxes (``patch_artist``: one ``PathPatch`` each,
    gid ``"box:<class key>:<method>"``; its median line has gid ``"median:<class key>:<method>"``),
    grouped by class, one colour per method. NaN values (structure absent from reference and
    prediction) are left out; a missed structure enters with Dice 0 and HD95 = image diagonal.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = class_names(evals)
    methods = list(evals)
    colors = _method_colors(methods)
    n_m = len(methods)
    cases = list(next(iter(evals.values()))["cases"])
    fig = Figure(figsize=(max(6.0, 1.0 + 0.45 * len(names) * (n_m + 1)), 7.5), layout="constrained")
    axes = {}
    for row, metric in enumerate(METRICS):
        ax = fig.add_subplot(len(METRICS), 1, row + 1)
        for ci, key in enumerate(names):
            for mi, meth in enumerate(methods):
                v = per_case_values(evals[meth], key, metric, cases)
                v = v[np.isfinite(v)]
                pos = ci * (n_m + 1) + mi
                bp = ax.boxplot([v], positions=[pos], widths=0.75, patch_artist=True, showfliers=True,
                                flierprops={"markersize": 3})
                for b in bp["boxes"]:
                    b.set_facecolor(colors[meth])
                    b.set_alpha(0.85)
                for b in bp["boxes"]:
                    b.set_gid(f"box:{key}:{meth}")
                for med in bp["medians"]:
                    med.set_color("black")
                    med.set_gid(f"median:{key}:{meth}")
        ax.set_xticks([ci * (n_m + 1) + (n_m - 1) / 2 for ci in range(len(names))])
        ax.set_xticklabels([names[k] for k in names])
        ax.set_xlim(-1, len(names) * (n_m + 1) - 1)
        ax.set_ylabel(metric + UNITS[metric])
        ax.grid(axis="y", alpha=0.3)
        axes[metric] = ax
    axes["Dice"].legend(handles=[Patch(facecolor=colors[m], label=m) for m in methods], loc="best", fontsize=8)
    fig.suptitle(f"Dice and HD95 per class ({len(cases)} cases)")
    return fig, axes


def plot_paired(rows: Sequence[dict], evals: Dict[str, dict], baseline: str):
    """Histograms of per-case improvements over the baseline (as Fig. 16 of the SUD paper).

    Returns ``(figure, {(metric, class_key): axes})``: one axes per metric (rows) and class
    (columns), one histogram per non-baseline method, a vertical line at 0.
    """
    from matplotlib.figure import Figure

    names = class_names(evals)
    methods = [m for m in evals if m != baseline]
    colors = _method_colors(list(evals))
    fig = Figure(figsize=(3.2 * len(names) + 1, 5.5), layout="constrained")
    axes = {}
    for r, metric in enumerate(METRICS):
        for c, key in enumerate(names):
            ax = fig.add_subplot(len(METRICS), len(names), r * len(names) + c + 1)
            sel = [row for row in rows if row["metric"] == metric and row["class"] == key]
            all_d = np.concatenate([row["differences"] for row in sel]) if sel else np.zeros(0)
            if all_d.size:
                lo, hi = float(all_d.min()), float(all_d.max())
                if hi - lo < 1e-12:
                    lo, hi = lo - 0.5 * 10 ** -DECIMALS[metric], hi + 0.5 * 10 ** -DECIMALS[metric]
                bins = np.linspace(lo, hi, 21)
                for row in sel:
                    if row["differences"].size:
                        ax.hist(row["differences"], bins=bins, alpha=0.55, color=colors[row["method"]],
                                label=f"{row['method']} (p={_fmt_p(row['p_wilcoxon'])})")
            ax.axvline(0, color="black", lw=0.8)
            ax.set_title(f"{names[key]}: {metric} improvement", fontsize=9)
            ax.set_xlabel(("Dice(method) - Dice(baseline)" if metric == "Dice"
                           else "HD95(baseline) - HD95(method) (mm)"), fontsize=8)
            if c == 0:
                ax.set_ylabel("cases")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            axes[(metric, key)] = ax
    fig.suptitle(f"Per-case improvement over {baseline} ({', '.join(methods)})")
    return fig, axes


# ------------------------------------------------------------------------------------ driver
def compare(named: Sequence[Tuple[str, str]], out_folder: str, baseline: str = None, dpi: int = 120,
            upper: str = None) -> dict:
    """Write the comparison files into ``out_folder``; returns ``{"files": {...}, "paired": rows,
    "gap_closed": rows}`` (``upper``: the upper bound, e.g. nnU-Net on all labels; needs ``baseline``)."""
    evals = load_evaluations(named)
    if baseline is not None and baseline not in evals:
        raise UserFacingError(f"--baseline {baseline}: not among the given names {list(evals)}")
    if upper is not None and (upper not in evals or baseline is None or upper == baseline):
        raise UserFacingError(f"--upper {upper}: must be one of the given names {list(evals)}, other than the "
                              f"--baseline (which it needs)")
    if baseline is not None and len(evals) < 2:
        raise UserFacingError("--baseline needs at least one other evaluation to compare with")
    os.makedirs(out_folder, exist_ok=True)
    files = {}
    cases = next(iter(evals.values()))["cases"]

    fig, _ = plot_boxplots(evals)
    files["boxplots"] = os.path.join(out_folder, "boxplots.png")
    fig.savefig(files["boxplots"], dpi=dpi)

    md = [f"# Comparison of {len(evals)} method(s) on {len(cases)} case(s)", "",
          "## Median Dice and HD95 per class", "", summary_table_markdown(evals), "",
          "Medians over cases; best per column in bold (highest Dice, lowest HD95). A structure absent from "
          "reference and prediction is left out; one present in only one of them counts with Dice 0 and "
          "HD95 = image diagonal.", "",
          "## Empty-structure cases (missed / false positive / both empty)", "", empty_counts_markdown(evals), ""]
    rows = []
    if baseline is not None:
        rows = paired_differences(evals, baseline)
        fig, _ = plot_paired(rows, evals, baseline)
        files["paired_png"] = os.path.join(out_folder, "paired_differences.png")
        fig.savefig(files["paired_png"], dpi=dpi)
        files["paired_csv"] = os.path.join(out_folder, "paired_differences.csv")
        with open(files["paired_csv"], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["method", "baseline", "class", "name", "metric", "n_pairs", "mean_improvement",
                        "median_improvement", "p_wilcoxon"])
            for r in rows:
                w.writerow([r["method"], baseline, r["class"], r["name"], r["metric"], r["n_pairs"],
                            r["mean"], r["median"], r["p_wilcoxon"]])
        md += [f"## Paired per-case improvement over {baseline}", "", paired_table_markdown(rows), "",
               "Improvement per case: Dice(method) - Dice(baseline) and HD95(baseline) - HD95(method), positive = "
               "better. Cases with NaN in either method are not paired. p: two-sided Wilcoxon signed-rank test "
               "(scipy.stats.wilcoxon, zero differences dropped); 1 when all differences are 0.", ""]
    gaps = gap_closed(evals, baseline, upper) if upper is not None else []
    if upper is not None:
        md += [f"## Fraction of the {baseline} -> {upper} gap closed", "", gap_closed_markdown(gaps, evals, baseline, upper),
               "", f"(Dice(method) - Dice({baseline})) / (Dice({upper}) - Dice({baseline})) with mean Dice over cases: "
               "1 = as good as the upper bound, 0 = no gain, negative = worse than the baseline.", ""]
    files["markdown"] = os.path.join(out_folder, "comparison.md")
    with open(files["markdown"], "w") as f:
        f.write("\n".join(md))

    def clean(v):
        return None if isinstance(v, float) and math.isnan(v) else v

    summary = {"methods": {n: p for n, p in named}, "baseline": baseline, "cases": list(cases),
               "classes": next(iter(evals.values()))["classes"],
               "median": {m: {k: {met: clean(ev["summary"][k][met]["median"]) for met in METRICS}
                              for k in ev["summary"]} for m, ev in evals.items()},
               "paired": [{k: (clean(v) if k != "differences" else [float(x) for x in v]) for k, v in r.items()}
                          for r in rows],
               "upper": upper,
               "gap_closed": [{"method": g["method"], "mean_dice": clean(g["mean_dice"]), "mean": clean(g["mean"]),
                               "per_class": {k: clean(v) for k, v in g["per_class"].items()}} for g in gaps]}
    files["json"] = os.path.join(out_folder, "comparison.json")
    with open(files["json"], "w") as f:
        json.dump(summary, f, indent=1, allow_nan=False)
    return {"files": files, "paired": rows, "gap_closed": gaps, "markdown": "\n".join(md)}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="compare evaluations of several methods: Markdown table, box plots, paired tests",
        description="Takes 'nnunet-sud evaluate' JSON files as NAME=path.json pairs (same cases and classes) and "
                    "writes comparison.md (median Dice / HD95 per class and method, best in bold; with --baseline "
                    "paired per-case improvements and Wilcoxon signed-rank p-values), boxplots.png and "
                    "paired_differences.png/.csv into -o. See docs/evaluation.md.",
    )
    p.add_argument("evaluations", nargs="+", metavar="NAME=JSON", help="e.g. nnUNet=eval/base.json SUD=eval/sud.json")
    p.add_argument("-o", required=True, metavar="OUT_FOLDER", help="output folder")
    p.add_argument("--baseline", default=None, metavar="NAME", help="method to compare the others with, per case")
    p.add_argument("--upper", default=None, metavar="NAME",
                   help="upper bound (e.g. nnU-Net on all labels): adds the fraction of the baseline -> upper gap "
                        "each method closes (needs --baseline)")
    p.add_argument("--dpi", type=int, default=120, help="resolution of the PNG figures")
    p.set_defaults(func=_run)


def _run(args) -> int:
    res = compare(parse_named(args.evaluations), args.o, args.baseline, args.dpi, upper=args.upper)
    print(res["markdown"])
    print("written: " + ", ".join(res["files"].values()))
    return 0
