"""Localization and classification metrics (method.md §20 to §22).

One implementation feeds both the RL reward (timerpo/reward.py) and the evaluation (eval.py).

Conventions
- An interval is a half-open pair [s, e) of integers on the index axis 0..L. A 0/1 vector v of length L maps to
  events by runs of ones, index i covering [i, i + 1): [0,1,1,0,0,1,0] -> [(1, 3), (5, 6)].
- The time range of a series is Trange = [start, start + L), start = 0 everywhere except in the shift test.
- Affiliation metrics (Huet, Navarro & Rossi, KDD 2022) treat events as real intervals on the continuous line.
"""
import math
import numbers
from bisect import bisect_right
from dataclasses import dataclass

from timerpo.prompt import LABELS

# Paper Table 1 columns -> generator families. The paper does not state the grouping; this is the natural one
# (method.md §22).
PAPER_GROUPS = {
    "Frequency": ("freq", "noisy-freq"),
    "Trend": ("trend", "flat-trend", "noisy-trend"),
    "Range": ("range",),
    "Point": ("point", "noisy-point"),
}
_GROUP_OF_FAMILY = {fam: group for group, fams in PAPER_GROUPS.items() for fam in fams}


def group_of(family):
    """Paper column of a generator family, e.g. group_of("noisy-freq") == "Frequency"; None if unknown."""
    return _GROUP_OF_FAMILY.get(family)


# ----------------------------------------------------------------------------------------------------------
# Events


def _as_int(value, what):
    """Integer value of an interval endpoint; bools, non-integral and non-numeric values are errors."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what}: expected an integer, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"{what}: expected an integer, got {value!r}")
    return int(value)


def _events(intervals, lo, hi):
    """Clip integer intervals to [lo, hi), drop empty ones, sort, and merge overlapping or touching ones."""
    if intervals is None:
        raise ValueError("intervals: expected a list of [s, e) pairs, got None")
    clipped = []
    for k, item in enumerate(intervals):
        try:
            s_raw, e_raw = item
        except (TypeError, ValueError):
            raise ValueError(f"interval #{k}: expected a pair [s, e), got {item!r}") from None
        s = max(_as_int(s_raw, f"interval #{k} start"), lo)
        e = min(_as_int(e_raw, f"interval #{k} end"), hi)
        if s < e:  # reversed or fully clipped intervals cover no index
            clipped.append((s, e))
    clipped.sort()
    merged = []
    for s, e in clipped:
        # Touching intervals merge too: [1,3) and [3,5) are the single run of ones 1..4 of the 0/1 vector.
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def _check_length(length, name="length"):
    if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length <= 0:
        raise ValueError(f"{name} must be a positive integer, got {length!r}")
    return int(length)


def to_events(intervals, length):
    """Canonical events of an interval list: clipped to [0, length), non-empty, sorted, merged.

    Same events as the runs of ones of the 0/1 vector that the intervals paint.
    Example: to_events([(5, 6), (1, 2), (2, 3), (8, 20)], 10) == [(1, 3), (5, 6), (8, 10)].
    """
    length = _check_length(length)
    return _events(intervals, 0, length)


# ----------------------------------------------------------------------------------------------------------
# Point-wise


def _overlap(a, b):
    """Total length of the intersection of two sorted, disjoint event lists (two-pointer sweep)."""
    total, i, j = 0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:  # advance whichever interval ends first
            i += 1
        else:
            j += 1
    return total


def _f1(p, r):
    """Harmonic mean, 0 when p + r == 0: _f1(0.5, 0.25) == 1/3."""
    return 2.0 * p * r / (p + r) if p + r > 0 else 0.0


def pointwise_prf(pred, gt, length):
    """Point-wise precision, recall, F1 of the two 0/1 vectors of length L (method.md §20); 0 on a 0 denominator.

    Example: L = 10, pred ones {4, 8}, gt ones {3, 7, 8, 9}: TP = 1, so (0.5, 0.25, 1/3).
    """
    p_ev, g_ev = to_events(pred, length), to_events(gt, length)
    tp = _overlap(p_ev, g_ev)
    n_pred = sum(e - s for s, e in p_ev)
    n_gt = sum(e - s for s, e in g_ev)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gt if n_gt else 0.0
    return precision, recall, _f1(precision, recall)


# ----------------------------------------------------------------------------------------------------------
# Affiliation (Huet et al. 2022), closed form


def _zones(gt, lo, hi):
    """Affiliation zones E_j: cut [lo, hi) at the midpoints of the gaps between consecutive gt events."""
    cuts = [lo] + [(gt[j - 1][1] + gt[j][0]) / 2.0 for j in range(1, len(gt))] + [hi]
    return [(cuts[j], cuts[j + 1]) for j in range(len(gt))]


def _integrate_linear_pieces(f, points):
    """Exact integral of f over [points[0], points[-1]] when f is linear between consecutive (sorted) points.

    On a piece where f is linear, width * f(midpoint) is the exact integral (trapezoid == midpoint), and the
    midpoint never sits on a breakpoint, so jumps of f at breakpoints do no harm.
    Example: f(x) = |x| on points [-1, 0, 2] -> 1 * 0.5 + 2 * 1 = 2.5.
    """
    total = 0.0
    for a, b in zip(points[:-1], points[1:]):
        if b > a:
            total += (b - a) * f(0.5 * (a + b))
    return total


def _breakpoints(a, b, candidates):
    """Sorted [a, ..., b] with the candidates that fall strictly inside (a, b)."""
    return [a] + sorted({c for c in candidates if a < c < b}) + [b]


def _zone_precision(pieces, event, zone):
    """P_j of method.md §21: mean over the predicted pieces I ∩ E_j of the survival F̄_j(d(x, J_j)).

    F̄_j(d) = 1 inside J_j, else 1 - (|J| + d + min(d, m)) / |E| with m the smaller margin between J_j and the
    zone edges. In x that is linear between the event edges and the points at distance m from them, so each
    piece is integrated exactly by _integrate_linear_pieces.
    Example (first check of method.md §21): J = [3, 4), E = [0, 5.5), piece [4, 5): m = 1.5,
    ∫_0^1 1 - (1 + 2d) / 5.5 dd = 1 - 2 / 5.5 = 0.636364.
    """
    js, je = event
    zs, ze = zone
    width_e, width_j = ze - zs, je - js
    m = min(js - zs, ze - je)

    def survival(x):
        if js <= x < je:
            return 1.0
        d = js - x if x < js else x - je
        return 1.0 - (width_j + d + min(d, m)) / width_e

    total, measure = 0.0, 0.0
    for a, b in pieces:
        total += _integrate_linear_pieces(survival, _breakpoints(a, b, (js - m, js, je, je + m)))
        measure += b - a
    return total / measure


def _distance_to_pieces(y, pieces, starts):
    """d(y, I ∩ E_j): distance from y to the nearest point of the union of sorted, disjoint pieces (0 inside).

    Only the last piece starting at or before y and the next one can be nearest: O(log K) by bisection.
    Example: pieces [(0, 2), (6, 8)], y = 3 -> 1.
    """
    k = bisect_right(starts, y)  # pieces[:k] start at or before y
    near = pieces[max(k - 1, 0):k + 1]
    return min(max(a - y, y - b, 0.0) for a, b in near)


def _zone_recall(pieces, event, zone):
    """R_j of method.md §21: mean over y in J_j of F̄_y(d(y, I ∩ E_j)), 0 when the zone holds no prediction.

    F̄_y(d) = 1 - (d + min(d, m_y)) / |E|, m_y = min(y - start(E), end(E) - y). Both d(y, .) and m_y are
    piecewise linear in y (kinks at piece edges, gap midpoints, the zone midpoint); between kinks their min
    switches only where they cross, so adding those crossings makes the integrand linear on every piece.
    Example (first check of method.md §21): J = [7, 10), E = [5.5, 10), piece [8, 9) -> 0.870370.
    """
    if not pieces:
        return 0.0
    js, je = event
    zs, ze = zone
    width_e = ze - zs

    def margin(y):
        return min(y - zs, ze - y)

    starts = [a for a, _ in pieces]

    def survival(y):
        d = _distance_to_pieces(y, pieces, starts)
        return 1.0 - (d + min(d, margin(y))) / width_e

    kinks = [0.5 * (zs + ze)]
    for k, (a, b) in enumerate(pieces):
        kinks += [a, b]
        if k + 1 < len(pieces):
            kinks.append(0.5 * (b + pieces[k + 1][0]))
    points = _breakpoints(js, je, kinks)
    refined = [points[0]]
    for a, b in zip(points[:-1], points[1:]):
        # d - m_y is linear on [a, b]; a sign change means the min() switches branch at its root.
        ga = _distance_to_pieces(a, pieces, starts) - margin(a)
        gb = _distance_to_pieces(b, pieces, starts) - margin(b)
        if ga * gb < 0:
            refined.append(a + (b - a) * ga / (ga - gb))
        refined.append(b)
    return _integrate_linear_pieces(survival, refined) / (je - js)


def affiliation_zones(pred, gt, length, start=0):
    """Per-zone affiliation (P_j, R_j) over Trange = [start, start + length); P_j is NaN for a zone without
    prediction. Events are clipped to the range and merged first (to_events semantics).

    Example (first check of method.md §21): L = 10, pred [(4, 5), (8, 9)], gt [(3, 4), (7, 10)]
    -> [(0.636364, 0.818182), (1.0, 0.870370)].
    """
    length = _check_length(length)
    if isinstance(start, bool) or not isinstance(start, numbers.Integral):
        raise ValueError(f"start must be an integer, got {start!r}")
    lo, hi = int(start), int(start) + length
    p_ev, g_ev = _events(pred, lo, hi), _events(gt, lo, hi)
    out = []
    for event, zone in zip(g_ev, _zones(g_ev, lo, hi)):
        pieces = [(max(a, zone[0]), min(b, zone[1])) for a, b in p_ev]
        pieces = [(a, b) for a, b in pieces if b > a]  # [K] pieces of I ∩ E_j, sorted and disjoint
        precision = _zone_precision(pieces, event, zone) if pieces else math.nan
        out.append((precision, _zone_recall(pieces, event, zone)))
    return out


def affiliation_pr(pred, gt, length, start=0):
    """Affiliation precision and recall (Huet et al. 2022; method.md §21), raw: no wrapper rules.

    P = mean of P_j over zones holding a prediction (NaN if none); R = mean of R_j over all zones.
    gt empty -> (nan, nan). Example (first check of method.md §21): pred [(4, 5), (8, 9)], gt [(3, 4), (7, 10)], L = 10
    -> (0.818182, 0.844276).
    """
    zones = affiliation_zones(pred, gt, length, start)
    if not zones:
        return math.nan, math.nan
    held = [p for p, _ in zones if not math.isnan(p)]
    precision = sum(held) / len(held) if held else math.nan
    recall = sum(r for _, r in zones) / len(zones)
    return precision, recall


# ----------------------------------------------------------------------------------------------------------
# Paper wrapper


@dataclass
class LocScores:
    """Affiliation and point-wise scores of one series after the paper's wrapper rules, each in [0, 1]."""

    aff_p: float
    aff_r: float
    aff_f1: float
    pw_p: float
    pw_r: float
    pw_f1: float

    def six_mean(self):
        """Mean of the six numbers: the public release's localization reward (method.md §3)."""
        return (self.aff_p + self.aff_r + self.aff_f1 + self.pw_p + self.pw_r + self.pw_f1) / 6.0


def _nan_to_zero(x):
    return 0.0 if math.isnan(x) else float(x)


def localization_scores(pred, gt, length):
    """Scores of one series with the paper's wrapper rules (method.md §22):
    both sides empty -> all 1; exactly one side empty -> all 0; NaN -> 0; F1 = 2PR/(P+R), 0 if P + R = 0.
    Emptiness is judged after clipping to [0, length).

    Example: localization_scores([], [], 100) is all 1; localization_scores([(0, 5)], [], 100) is all 0.
    """
    p_ev, g_ev = to_events(pred, length), to_events(gt, length)
    if not p_ev and not g_ev:
        return LocScores(1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    if not p_ev or not g_ev:
        return LocScores(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    aff_p, aff_r = (_nan_to_zero(v) for v in affiliation_pr(p_ev, g_ev, length))
    pw_p, pw_r, pw_f1 = pointwise_prf(p_ev, g_ev, length)
    return LocScores(aff_p, aff_r, _f1(aff_p, aff_r), pw_p, pw_r, pw_f1)


# ----------------------------------------------------------------------------------------------------------
# Classification


def class_accuracy(pred_labels, gt_labels):
    """Share of series whose predicted label equals the true one; a missing (None) or unknown label is wrong.

    Example: class_accuracy(["trend", None, "bogus"], ["trend", "normal", "bogus"]) == 1/3.
    """
    pred_labels, gt_labels = list(pred_labels), list(gt_labels)
    if len(pred_labels) != len(gt_labels):
        raise ValueError(f"class_accuracy: {len(pred_labels)} predicted labels vs {len(gt_labels)} true labels")
    if not gt_labels:
        raise ValueError("class_accuracy: no labels given")
    hits = sum(1 for p, g in zip(pred_labels, gt_labels) if p in LABELS and p == g)
    return hits / len(gt_labels)
