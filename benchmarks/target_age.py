"""How old is a temporal-ensembling target? SUD's and TE's soft target after the visits of a run.

Young et al., "SUD: Supervision by Denoising for Medical Image Segmentation", eq. 8 and §3.3.2:
at each visit of an unlabeled image (training progress t in [0, 1]) the stored target becomes

    z <- alpha(t) c + (1 - alpha(t)) z,   alpha(t) = 1 - t,   z := c at the first visit,

so the target is a weighted average of the predictions c made at the visits, with weights
w_k = alpha(t_k) prod_{j > k} (1 - alpha(t_j)) (w_1 uses alpha = 1). Its *age* at progress T is
T - sum_k w_k t_k, in units of the whole training: how far the target lags the segmenter.

The paper trains for about 10^5 iterations, so every image is visited very often; a CPU budget
visits each unlabeled slice a few times (acdc3 at 2000 iterations of unlabeled batch 3: 1244 slices,
about 4.8 visits each). Visits are drawn at random, so their count per image is Poisson. This script
prints the mean age of the target, and of its newest prediction, at a few points of the training,
for several visit counts and for alpha(t) = max(1 - t, floor):

    python benchmarks/target_age.py --visits 5 20 100 1000 --floors 0 0.5

No training: the schedule alone (Monte Carlo over visit times, seeded).
"""
import argparse

import numpy as np


def target_weights(visit_times, floor: float = 0.0) -> np.ndarray:
    """Weights of the predictions made at ``visit_times`` (sorted, progress in [0, 1]) in the target
    after the last visit, for alpha(t) = max(1 - t, floor) and z := c at the first visit."""
    w = np.zeros(len(visit_times))
    for i, t in enumerate(visit_times):
        a = 1.0 if i == 0 else max(1.0 - t, floor)
        w *= 1.0 - a
        w[i] = a
    return w


def target_age(visit_times, at: float, floor: float = 0.0) -> float:
    """Age of the target at progress ``at`` (>= the last visit): ``at`` - weighted mean visit time."""
    visit_times = np.asarray(visit_times, dtype=float)
    return float(at - (target_weights(visit_times, floor) * visit_times).sum())


def mean_ages(visits: float, at: float, floor: float = 0.0, samples: int = 4000, seed: int = 0):
    """(mean target age, mean age of the newest prediction) at progress ``at`` over images visited
    a Poisson(visits x at) number of times, uniformly in [0, at]; images not visited yet left out."""
    rng = np.random.default_rng(seed)
    ages, newest = [], []
    for _ in range(samples):
        times = np.sort(rng.uniform(0.0, at, rng.poisson(visits * at)))
        if len(times):
            ages.append(target_age(times, at, floor))
            newest.append(at - times[-1])
    return float(np.mean(ages)), float(np.mean(newest))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--visits", type=float, nargs="+", default=[5, 20, 100, 1000],
                   help="mean visits per image over the whole training")
    p.add_argument("--floors", type=float, nargs="+", default=[0.0, 0.5], help="alpha(t) = max(1 - t, floor)")
    p.add_argument("--at", type=float, nargs="+", default=[0.5, 0.75, 1.0], help="training progress to report at")
    p.add_argument("--samples", type=int, default=4000)
    a = p.parse_args(argv)
    print("mean age of the target (of its newest prediction), in units of the whole training")
    print("| visits per image | alpha floor | " + " | ".join(f"t = {t:g}" for t in a.at) + " |")
    print("|---:|---:|" + "---:|" * len(a.at))
    for v in a.visits:
        for fl in a.floors:
            cells = [mean_ages(v, t, fl, a.samples) for t in a.at]
            print(f"| {v:g} | {fl:g} | " + " | ".join(f"{age:.3f} ({new:.3f})" for age, new in cells) + " |")


if __name__ == "__main__":
    main()
