"""Metrics against independent oracles: the check values of method.md §21, 0/1 vectors, scipy quadrature."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import quad

from timerpo import metrics
from timerpo.metrics import (
    PAPER_GROUPS,
    LocScores,
    affiliation_pr,
    affiliation_zones,
    class_accuracy,
    group_of,
    localization_scores,
    pointwise_prf,
    to_events,
)

pytestmark = pytest.mark.math  # the fast math subset: python -m pytest -m math


# ------------------------------------------------------------------------------------------------ helpers


def runs_of_ones(v):
    """Events of a 0/1 vector, index i covering [i, i + 1): a plain scan, independent of metrics.py."""
    events, start = [], None
    for i, bit in enumerate(list(v) + [0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            events.append((start, i))
            start = None
    return events


def paint(intervals, length):
    """0/1 vector of length L with ones on every index an interval covers (clipped to the vector)."""
    v = np.zeros(length, dtype=int)  # [L]
    for s, e in intervals:
        v[max(s, 0):max(min(e, length), 0)] = 1
    return v


def random_vector(rng, length, p_on):
    """0/1 vector made of runs: each index flips state with a small probability, so events have some width."""
    v = np.zeros(length, dtype=int)  # [L]
    state = int(rng.random() < p_on)
    for i in range(length):
        if rng.random() < 0.15:
            state = int(rng.random() < p_on)
        v[i] = state
    return v


def oracle_affiliation(pred, gt, lo, hi):
    """Affiliation P, R and per-zone values straight from the definitions, integrated by scipy.quad.

    The survival functions are written as set measures ("the share of E_j closer than d"), not with the
    min(d, m) formula that metrics.py uses; quad is only told the event and piece edges.
    """
    cuts = [lo] + [(gt[j - 1][1] + gt[j][0]) / 2 for j in range(1, len(gt))] + [hi]
    zones = []
    for j, (js, je) in enumerate(gt):
        zs, ze = cuts[j], cuts[j + 1]
        pieces = [(max(a, zs), min(b, ze)) for a, b in pred if min(b, ze) > max(a, zs)]

        def prec_integrand(x):
            if js <= x < je:
                return 1.0
            d = js - x if x < js else x - je
            closer = min(je + d, ze) - max(js - d, zs)  # |{z in E : dist(z, J) < d}|
            return 1.0 - closer / (ze - zs)

        def rec_integrand(y):
            d = min(max(a - y, 0.0, y - b) for a, b in pieces)
            closer = min(y + d, ze) - max(y - d, zs)  # |{z in E : |z - y| < d}|
            return 1.0 - closer / (ze - zs)

        if pieces:
            num = 0.0
            for a, b in pieces:
                inner = [p for p in (js, je) if a < p < b]
                num += quad(prec_integrand, a, b, points=inner or None, epsabs=1e-12, epsrel=1e-12, limit=400)[0]
            p_j = num / sum(b - a for a, b in pieces)
            inner = sorted({p for a, b in pieces for p in (a, b) if js < p < je})
            r_j = quad(rec_integrand, js, je, points=inner or None, epsabs=1e-12, epsrel=1e-12, limit=400)[0]
            r_j /= je - js
        else:
            p_j, r_j = math.nan, 0.0
        zones.append((p_j, r_j))
    held = [p for p, _ in zones if not math.isnan(p)]
    precision = sum(held) / len(held) if held else math.nan
    return precision, sum(r for _, r in zones) / len(zones), zones


def same(a, b, tol):
    """Equal within tol, NaN equal to NaN."""
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


# ------------------------------------------------------------------------------------------------ events


def test_to_events_metrics_md_example():
    v = [0, 1, 1, 0, 0, 1, 0]
    assert to_events([(i, i + 1) for i, b in enumerate(v) if b], len(v)) == [(1, 3), (5, 6)]


@settings(max_examples=200, deadline=None)
@given(
    length=st.integers(1, 40),
    intervals=st.lists(st.tuples(st.integers(-10, 50), st.integers(-10, 50)), max_size=8),
)
def test_to_events_equals_runs_of_painted_vector(length, intervals):
    assert to_events(intervals, length) == runs_of_ones(paint(intervals, length))


def test_to_events_accepts_numpy_and_integral_floats():
    assert to_events(np.array([[2, 4], [4, 6]]), 10) == [(2, 6)]
    assert to_events([(2.0, 5.0)], 10) == [(2, 5)]


@pytest.mark.parametrize(
    "intervals, fragment",
    [([(1, 2, 3)], "#0"), ([(0, 2), (1.5, 3)], "#1 start"), ([("a", 3)], "'a'"), (None, "None"),
     ([(0, math.nan)], "nan"), ([(True, 3)], "True")],
)
def test_to_events_rejects_bad_items_with_clear_message(intervals, fragment):
    with pytest.raises(ValueError, match=None) as err:
        to_events(intervals, 10)
    assert fragment in str(err.value)


@pytest.mark.parametrize("length", [0, -3, 2.5, None, True])
def test_bad_length_is_a_clear_error(length):
    with pytest.raises(ValueError, match="length"):
        to_events([(0, 1)], length)


# ------------------------------------------------------------------------------------------------ point-wise


def test_pointwise_against_vectors():
    rng = np.random.default_rng(0)
    for _ in range(300):
        length = int(rng.integers(1, 60))
        vp, vg = random_vector(rng, length, 0.3), random_vector(rng, length, 0.3)
        tp, n_pred, n_gt = int((vp & vg).sum()), int(vp.sum()), int(vg.sum())
        p = tp / n_pred if n_pred else 0.0
        r = tp / n_gt if n_gt else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        got = pointwise_prf(runs_of_ones(vp), runs_of_ones(vg), length)
        assert got == pytest.approx((p, r, f1), abs=1e-12)


def test_pointwise_hand_example():
    # L = 10: pred ones {4, 8}, gt ones {3, 7, 8, 9}: TP = 1.
    assert pointwise_prf([(4, 5), (8, 9)], [(3, 4), (7, 10)], 10) == pytest.approx((0.5, 0.25, 1 / 3))


# ------------------------------------------------------------------------------------------------ affiliation


def test_metrics_md_check_values_small():
    pred = runs_of_ones([0, 0, 0, 0, 1, 0, 0, 0, 1, 0])
    gt = runs_of_ones([0, 0, 0, 1, 0, 0, 0, 1, 1, 1])
    p, r = affiliation_pr(pred, gt, 10)
    assert p == pytest.approx(0.818182, abs=1e-6)
    assert r == pytest.approx(0.844276, abs=1e-6)
    zones = affiliation_zones(pred, gt, 10)
    assert [z[0] for z in zones] == pytest.approx([0.636364, 1.0], abs=1e-6)
    assert [z[1] for z in zones] == pytest.approx([0.818182, 0.870370], abs=1e-6)


def test_metrics_md_check_values_long_range():
    gt = [(0, 600), (3000, 4200), (10200, 10500)]
    pred = [(300, 360), (420, 600), (660, 720), (2400, 3600), (6900, 7800), (8100, 8400), (9900, 10200)]
    p2, r2 = affiliation_zones(pred, gt, 10800)[1]
    assert p2 == pytest.approx(0.672222222, abs=1e-8)
    assert r2 == pytest.approx(0.944444444, abs=1e-8)


def test_closed_form_matches_quadrature_on_random_event_sets():
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(150):
        length = int(rng.integers(2, 80))
        gt = runs_of_ones(random_vector(rng, length, 0.25))
        pred = runs_of_ones(random_vector(rng, length, 0.3))
        if not gt:
            assert affiliation_pr(pred, gt, length) == pytest.approx((math.nan, math.nan), nan_ok=True)
            continue
        want_p, want_r, want_zones = oracle_affiliation(pred, gt, 0, length)
        got_p, got_r = affiliation_pr(pred, gt, length)
        assert same(got_p, want_p, 1e-6) and same(got_r, want_r, 1e-6), (length, pred, gt)
        for (gp, gr), (wp, wr) in zip(affiliation_zones(pred, gt, length), want_zones):
            assert same(gp, wp, 1e-6) and same(gr, wr, 1e-6), (length, pred, gt)
        checked += 1
    assert checked > 100


def test_closed_form_matches_quadrature_on_edge_layouts():
    cases = [
        ([(0, 3)], [(0, 10)], 10),  # gt is the whole range
        ([(9, 10)], [(0, 1)], 10),  # prediction at the far end of the only zone
        ([(0, 1), (9, 10)], [(4, 6)], 10),  # pieces on both sides
        ([(0, 2), (3, 5), (8, 20)], [(1, 4), (6, 7), (15, 17)], 20),
        ([(0, 1)], [(0, 1)], 1),
    ]
    for pred, gt, length in cases:
        want_p, want_r, _ = oracle_affiliation(pred, gt, 0, length)
        got_p, got_r = affiliation_pr(pred, gt, length)
        assert same(got_p, want_p, 1e-6) and same(got_r, want_r, 1e-6), (pred, gt, length)


def test_perfect_prediction_scores_one():
    gt = [(3, 9), (20, 21), (40, 50)]
    assert affiliation_pr(gt, gt, 50) == pytest.approx((1.0, 1.0))


def test_empty_prediction_and_empty_truth_raw():
    p, r = affiliation_pr([], [(2, 5)], 10)
    assert math.isnan(p) and r == 0.0
    p, r = affiliation_pr([(2, 5)], [], 10)
    assert math.isnan(p) and math.isnan(r)


def test_invariant_to_shifting_events_and_range_together():
    rng = np.random.default_rng(2)
    for _ in range(60):
        length = int(rng.integers(2, 60))
        gt = runs_of_ones(random_vector(rng, length, 0.25))
        pred = runs_of_ones(random_vector(rng, length, 0.3))
        if not gt:
            continue
        shift = int(rng.integers(-5000, 5000))
        moved = lambda evs: [(s + shift, e + shift) for s, e in evs]  # noqa: E731
        base = affiliation_pr(pred, gt, length)
        got = affiliation_pr(moved(pred), moved(gt), length, start=shift)
        assert same(got[0], base[0], 1e-9) and same(got[1], base[1], 1e-9)


def test_events_outside_a_shifted_range_are_clipped():
    # Range [100, 110): the part of each event below 100 does not count.
    assert affiliation_pr([(95, 105)], [(90, 103)], 10, start=100) == affiliation_pr([(0, 5)], [(0, 3)], 10)


# ------------------------------------------------------------------------------------------------ wrapper


def test_wrapper_both_empty_is_all_one():
    ones = LocScores(1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    assert localization_scores([], [], 10) == ones
    # Emptiness is judged after clipping to [0, L).
    assert localization_scores([(12, 15)], [(20, 30)], 10) == ones


@pytest.mark.parametrize("pred, gt", [([], [(2, 5)]), ([(2, 5)], []), ([(0, 3)], [(50, 60)])])
def test_wrapper_one_side_empty_is_all_zero(pred, gt):
    assert localization_scores(pred, gt, 10) == LocScores(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def test_wrapper_nan_becomes_zero(monkeypatch):
    monkeypatch.setattr(metrics, "affiliation_pr", lambda *a, **k: (math.nan, 0.4))
    got = localization_scores([(1, 2)], [(1, 2)], 10)
    assert (got.aff_p, got.aff_r, got.aff_f1) == (0.0, 0.4, 0.0)
    monkeypatch.setattr(metrics, "affiliation_pr", lambda *a, **k: (math.nan, math.nan))
    got = localization_scores([(1, 2)], [(1, 2)], 10)
    assert (got.aff_p, got.aff_r, got.aff_f1) == (0.0, 0.0, 0.0)


def test_wrapper_composes_raw_metrics_when_both_sides_have_events():
    rng = np.random.default_rng(3)
    for _ in range(50):
        length = int(rng.integers(5, 60))
        gt = runs_of_ones(random_vector(rng, length, 0.3))
        pred = runs_of_ones(random_vector(rng, length, 0.3))
        if not gt or not pred:
            continue
        got = localization_scores(pred, gt, length)
        p, r = affiliation_pr(pred, gt, length)
        assert (got.aff_p, got.aff_r) == pytest.approx((p, r))
        assert got.aff_f1 == pytest.approx(2 * p * r / (p + r))
        assert (got.pw_p, got.pw_r, got.pw_f1) == pytest.approx(pointwise_prf(pred, gt, length))
        assert got.six_mean() == pytest.approx(
            (got.aff_p + got.aff_r + got.aff_f1 + got.pw_p + got.pw_r + got.pw_f1) / 6)


def test_wrapper_disjoint_prediction_has_zero_pointwise_f1():
    got = localization_scores([(0, 2)], [(6, 8)], 10)
    assert (got.pw_p, got.pw_r, got.pw_f1) == (0.0, 0.0, 0.0)
    assert 0.0 < got.aff_p < 1.0 and 0.0 < got.aff_r < 1.0


# ------------------------------------------------------------------------------------------------ classes, groups


def test_class_accuracy():
    assert class_accuracy(["trend", "seasonal", None, "bogus"], ["trend", "trend", "normal", "bogus"]) == 0.25
    assert class_accuracy(["normal"], ["normal"]) == 1.0
    with pytest.raises(ValueError, match="2 predicted labels vs 1"):
        class_accuracy(["trend", "trend"], ["trend"])
    with pytest.raises(ValueError, match="no labels"):
        class_accuracy([], [])


def test_paper_groups_follow_method_section_22():
    expected = {
        "freq": "Frequency", "noisy-freq": "Frequency",
        "trend": "Trend", "flat-trend": "Trend", "noisy-trend": "Trend",
        "range": "Range",
        "point": "Point", "noisy-point": "Point",
    }
    assert {fam: group_of(fam) for fam in expected} == expected
    assert list(PAPER_GROUPS) == ["Frequency", "Trend", "Range", "Point"]  # Table 1 column order
    members = [fam for fams in PAPER_GROUPS.values() for fam in fams]
    assert sorted(members) == sorted(expected)  # every family in exactly one group
    assert group_of("shapelet") is None and group_of("unknown") is None
