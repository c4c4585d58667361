"""benchmarks/target_age.py: the weights of SUD's temporal average (eq. 8, alpha(t) = 1 - t) over a
few visits, computed by hand, and the age of the target that follows from them."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import target_age  # noqa: E402

VISITS = [0.1, 0.3, 0.5, 0.7, 0.9]


def test_weights_of_five_visits_by_hand():
    # alpha = 1 (first visit), 0.7, 0.5, 0.3, 0.1; w_k = alpha_k prod_{j>k} (1 - alpha_j)
    # w_5 = 0.1; w_4 = 0.3 * 0.9; w_3 = 0.5 * 0.7 * 0.9; w_2 = 0.7 * 0.5 * 0.7 * 0.9; w_1 = 0.3 * 0.5 * 0.7 * 0.9
    np.testing.assert_allclose(target_age.target_weights(VISITS), [0.0945, 0.2205, 0.315, 0.27, 0.1], atol=1e-12)
    # age at the end: 1 - (0.00945 + 0.06615 + 0.1575 + 0.189 + 0.09)
    assert target_age.target_age(VISITS, 1.0) == pytest.approx(0.4879)


def test_weights_with_an_alpha_floor_by_hand():
    # alpha = 1, 0.7, then the floor 0.5 for t >= 0.5
    np.testing.assert_allclose(target_age.target_weights(VISITS, floor=0.5), [0.0375, 0.0875, 0.125, 0.25, 0.5],
                               atol=1e-12)
    assert target_age.target_age(VISITS, 1.0, floor=0.5) == pytest.approx(0.2825)


def test_weights_are_an_average_and_the_same_as_running_the_update():
    rng = np.random.default_rng(3)
    times = np.sort(rng.uniform(0, 1, 17))
    preds = rng.normal(size=17)
    z = None
    for t, c in zip(times, preds):  # the store's update itself, eq. 8 with beta = 0
        z = c if z is None else (1 - t) * c + t * z
    w = target_age.target_weights(times)
    assert w.sum() == pytest.approx(1.0)
    assert (w >= 0).all()
    assert (w * preds).sum() == pytest.approx(z)


def test_more_visits_give_younger_targets():
    ages = [target_age.mean_ages(v, 1.0, samples=400)[0] for v in (5, 20, 100)]
    assert ages[0] > ages[1] > ages[2] > 0
    assert ages[0] > 0.4  # a few visits: the final target is about half a training old


def test_script_prints_a_row_per_visit_count_and_floor(capsys):
    target_age.main(["--visits", "5", "50", "--floors", "0", "0.5", "--at", "1", "--samples", "50"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1:3] for r in rows] == [[" 5 ", " 0 "], [" 5 ", " 0.5 "], [" 50 ", " 0 "], [" 50 ", " 0.5 "]]
