"""Threshold-free scores of a per-point anomaly score against point labels: AUC-PR, AUC-ROC, VUS-PR, VUS-ROC.

The leaderboards of the field (TSB-AD, TimeEval) rank detectors by these:
  AUC-PR   scikit-learn's average_precision_score (step-wise area: Σ_k (R_k − R_{k−1}) P_k over the thresholds)
  AUC-ROC  scikit-learn's roc_auc_score (trapezoidal area under TPR against FPR)
  VUS-PR, VUS-ROC  the volume under the range-PR / range-ROC surface (Paparrizos et al., VLDB 2022), computed
           here (`vus`) with the conventions of the TSB-AD leaderboard: range-AUC averaged over buffer lengths
           ℓ = 0..`window`, where each anomaly's ℓ // 2 neighbours on either side count as partly anomalous
           (weight sqrt(1 − d / ℓ) at distance d), recall is multiplied by the share of anomalies touched,
           and the thresholds are 250 ranks of the sorted scores.
Our VUS agrees with TSB-AD's own code (TSB_AD.evaluation.basic_metrics.generate_curve) to rounding error on
random cases, `python bench/vus_crosscheck.py` (bench/results/vus_crosscheck.json), and the tests check it
against a plain-loop transcription of the definition. It costs milliseconds per series at ℓ ≤ 100.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

VUS_WINDOW = 100  # TSB-AD's default buffer length for VUS (its get_metrics); the leaderboard uses each series' period
VUS_THRESHOLDS = 250  # TSB-AD's default
SKLEARN_INSTALL = "pip install scikit-learn"


@dataclass
class PointScores:
    """Threshold-free scores in [0, 1]; None where undefined (no anomaly, or only anomalies)."""

    auc_pr: float | None
    auc_roc: float | None
    vus_pr: float | None
    vus_roc: float | None


def point_metrics(scores, labels, vus_window: int = VUS_WINDOW) -> PointScores:
    """AUC-PR, AUC-ROC (scikit-learn) and VUS-PR, VUS-ROC (`vus`) of per-point `scores` [N] against 0/1
    `labels` [N]. All four are None when the labels hold no anomaly or nothing but anomalies."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=int)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be equally long 1-D arrays")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    if labels.min() == labels.max():  # one class only: precision-recall and ROC are undefined
        return PointScores(None, None, None, None)
    metrics = sklearn_metrics()
    auc_pr = float(metrics.average_precision_score(labels, scores))
    auc_roc = float(metrics.roc_auc_score(labels, scores))
    vus_pr, vus_roc = vus(scores, labels, vus_window)
    return PointScores(auc_pr, auc_roc, vus_pr, vus_roc)


def sklearn_metrics():
    """sklearn.metrics, or ImportError with the install line."""
    try:
        from sklearn import metrics
    except ImportError:
        raise ImportError(f"per-point metrics need scikit-learn: {SKLEARN_INSTALL}") from None
    return metrics


# --------------------------------------------------------------------------------------------- VUS
#
# For a buffer length ℓ and a threshold t (the prediction p = {j : score_j ≥ t}), with P anomalous points and
# w_j the buffer weight of a normal point j (the sum over anomalies of sqrt(1 − d / ℓ) at distance d ≤ ℓ // 2,
# at most 1):
#     B = Σ_{j in p} w_j,   TP = |p ∩ anomalies| + B,   P' = P + B / 2,
#     TPR = min(TP / P', 1) × (extended ranges holding a point of p) / (extended ranges),
#     FPR = (|p| − TP) / (N − P'),   precision = TP / |p|,
# where an extended range is an anomaly with ℓ // 2 points on either side, joined with the next where the two
# share a point. Range-ROC: trapezoids through (0, 0), the thresholds, (1, 1); range-PR: Σ ΔTPR × precision
# from TPR 0. VUS: the mean of each area over ℓ = 0..window.
#
# Every point reaches the thresholds from some rank on (`first_reached`), so each per-threshold sum is a
# cumulative sum over the points grouped by that rank: O(N log N) once, then O(buffer points + thresholds)
# per ℓ.


def vus(scores, labels, window: int, n_thresholds: int = VUS_THRESHOLDS) -> tuple[float | None, float | None]:
    """(VUS-PR, VUS-ROC) of per-point `scores` [N] against 0/1 `labels` [N] for buffers ℓ = 0..`window`
    (conventions above); (None, None) when the labels hold one class only.

    Example: scores [0.9, 0.1, 0.8, 0.2], labels [1, 0, 0, 0], window 0: the anomaly ranks first, so TPR is 1
    from the first threshold on and both areas are 1.0.
    """
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels).astype(bool)
    if window < 0:
        raise ValueError(f"VUS window must be >= 0, got {window}")
    if labels.all() or not labels.any():
        return None, None
    levels = rank_thresholds(scores, n_thresholds)  # [T]
    first = first_reached(scores, levels)  # [N]
    predicted = reached_totals(first, len(levels))  # [T] |p|
    found = reached_totals(first[labels], len(levels))  # [T] |p ∩ anomalies|
    starts, stops = anomaly_runs(labels)
    buffer = BufferPoints.around(starts, stops, labels, window // 2)
    anomalies = int(labels.sum())
    pr, roc = [], []
    for ell in range(window + 1):
        weight_reached = reached_totals(first[buffer.points], len(levels), buffer.weights(ell))  # [T] B
        touched, ranges = ranges_touched(first, starts, stops, ell // 2, len(levels))  # [T], count
        curve = range_curve(found, weight_reached, predicted, touched / ranges, anomalies, labels.size)
        pr.append(curve.pr_area())
        roc.append(curve.roc_area())
    return finite(np.mean(pr)), finite(np.mean(roc))


def rank_thresholds(scores: np.ndarray, count: int) -> np.ndarray:
    """The scores at `count` evenly spaced ranks of the descending order, highest first (repeats when N < count).

    Example: rank_thresholds([3, 1, 2], 5) == [3, 3, 2, 2, 1] (ranks 0, 0, 1, 1, 2).
    """
    descending = -np.sort(-scores)
    return descending[np.linspace(0, scores.size - 1, count).astype(int)]


def first_reached(scores: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index of the first threshold (levels non-increasing) that each score reaches (score ≥ level); a point is
    predicted at every threshold from there on. [N]"""
    return np.searchsorted(-levels, -scores, side="left")


def reached_totals(first: np.ndarray, count: int, weights=None) -> np.ndarray:
    """Σ of `weights` (1 each by default) over the points predicted at each of the `count` thresholds. [count]"""
    return np.cumsum(np.bincount(first, weights=weights, minlength=count))


def anomaly_runs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Half-open runs [start, stop) of anomalous points: [0, 1, 1, 0, 1] → starts [1, 4], stops [3, 5]."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], labels.astype(np.int8), [0]])))
    return edges[::2], edges[1::2]


@dataclass
class BufferPoints:
    """The normal points within `half` of an anomaly, and every (point, distance) pair that weighs on them,
    listed anomaly by anomaly (the order the weights are summed in)."""

    points: np.ndarray  # [M] distinct buffer points, ascending
    pair_point: np.ndarray  # [pairs] index into `points`
    pair_distance: np.ndarray  # [pairs] distance 1..half to the anomaly

    @classmethod
    def around(cls, starts: np.ndarray, stops: np.ndarray, labels: np.ndarray, half: int) -> BufferPoints:
        d = np.arange(1, half + 1)  # [H]
        sides = np.stack([(stops - 1)[:, None] + d, starts[:, None] - d], axis=1)  # [R, 2, H]: after, before
        point = sides.ravel()
        distance = np.broadcast_to(d, sides.shape).ravel()
        keep = (point >= 0) & (point < labels.size)
        keep[keep] = ~labels[point[keep]]  # an anomalous point is weighed 1, whatever its neighbours
        points, pair_point = np.unique(point[keep], return_inverse=True)
        return cls(points, pair_point, distance[keep])

    def weights(self, ell: int) -> np.ndarray:
        """Weight of each buffer point for buffer length ℓ: Σ sqrt(1 − d / ℓ) over its pairs with d ≤ ℓ // 2,
        at most 1. [M]"""
        near = self.pair_distance <= ell // 2
        w = np.sqrt(1 - self.pair_distance[near] / ell) if near.any() else np.zeros(0)
        return np.minimum(1.0, np.bincount(self.pair_point[near], weights=w, minlength=self.points.size))


def ranges_touched(first: np.ndarray, starts: np.ndarray, stops: np.ndarray, half: int,
                   count: int) -> tuple[np.ndarray, int]:
    """Extended ranges (each anomaly widened by `half` on both sides, clipped to the series, joined where two
    share a point) that hold a predicted point, at each of the `count` thresholds [count], and their number."""
    separate = starts[1:] - stops[:-1] >= 2 * half  # the gap leaves the widened anomalies apart
    lo = np.maximum(starts[np.concatenate([[True], separate])] - half, 0)
    hi = np.minimum(stops[np.concatenate([separate, [True]])] + half, first.size)
    # Segment j is first[lo_j:hi_j]; reduceat over [lo_0, hi_0, lo_1, ...] takes every other block.
    bounds = np.stack([lo, hi], axis=1).ravel()
    bounds = bounds[:-1] if bounds[-1] == first.size else bounds
    earliest = np.minimum.reduceat(first, bounds)[::2]  # [ranges]: first threshold at which a point is predicted
    return reached_totals(earliest, count), lo.size


@dataclass
class RangeCurve:
    """Range-TPR, range-FPR and precision at each threshold, highest threshold first. [T] each"""

    tpr: np.ndarray
    fpr: np.ndarray
    precision: np.ndarray

    def roc_area(self) -> float:
        """Trapezoids from (0, 0) through every threshold to (1, 1)."""
        tpr = np.concatenate([[0.0], self.tpr, [1.0]])
        fpr = np.concatenate([[0.0], self.fpr, [1.0]])
        return float(np.dot(np.diff(fpr), (tpr[1:] + tpr[:-1]) / 2))

    def pr_area(self) -> float:
        """Σ (TPR_k − TPR_{k−1}) × precision_k, from TPR 0."""
        return float(np.dot(np.diff(self.tpr, prepend=0.0), self.precision))


def range_curve(found, weight_reached, predicted, share_touched, anomalies: int, length: int) -> RangeCurve:
    """The curve from the per-threshold totals (formulas above the `vus` function). Each argument but the last
    two is [T]."""
    tp = found + weight_reached
    p_new = anomalies + weight_reached / 2
    return RangeCurve(tpr=np.minimum(tp / p_new, 1.0) * share_touched, fpr=(predicted - tp) / (length - p_new),
                      precision=tp / predicted)


def finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None
