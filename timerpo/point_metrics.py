"""Threshold-free scores of a per-point anomaly score against point labels: AUC-PR, AUC-ROC, VUS-PR, VUS-ROC.

The leaderboards of the field (TSB-AD, TimeEval) rank detectors by these, so they come from the packages
those leaderboards use rather than from code of our own:
  AUC-PR   scikit-learn's average_precision_score (step-wise area: Σ_k (R_k − R_{k−1}) P_k over the thresholds)
  AUC-ROC  scikit-learn's roc_auc_score (trapezoidal area under TPR against FPR)
  VUS-PR, VUS-ROC  TSB-AD's evaluation code (TSB_AD.evaluation.basic_metrics.generate_curve, the leaderboard's
           own; Paparrizos et al., VLDB 2022): range-AUC averaged over buffer lengths ℓ = 0..`window`, where
           each anomaly's ℓ // 2 neighbours on either side count as partly anomalous (weight sqrt(1 − d / ℓ)
           at distance d), recall is multiplied by the share of anomalies touched, and the thresholds are 250
           ranks of the sorted scores.
TSB-AD is installed without its dependency list (`pip install --no-deps tsb-ad==1.5`): the list pins
numpy < 2 and pulls in numba, statsmodels, tslearn and more, none of which its evaluation module imports
(numpy and scikit-learn only). Without it, VUS is None and one line says how to install it.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

VUS_WINDOW = 100  # TSB-AD's default buffer length for VUS (its get_metrics); the leaderboard uses each series' period
VUS_THRESHOLDS = 250  # TSB-AD's default
VUS_INSTALL = "pip install --no-deps tsb-ad==1.5"
SKLEARN_INSTALL = "pip install scikit-learn"


@dataclass
class PointScores:
    """Threshold-free scores in [0, 1]; None where undefined (no anomaly, or only anomalies) or not installed."""

    auc_pr: float | None
    auc_roc: float | None
    vus_pr: float | None
    vus_roc: float | None


def point_metrics(scores, labels, vus_window: int = VUS_WINDOW) -> PointScores:
    """AUC-PR, AUC-ROC (scikit-learn) and VUS-PR, VUS-ROC (TSB-AD) of per-point `scores` [N] against 0/1
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


_warned = False


def vus(scores: np.ndarray, labels: np.ndarray, window: int) -> tuple[float | None, float | None]:
    """(VUS-PR, VUS-ROC) from TSB-AD's generate_curve; (None, None) and one warning line without TSB-AD."""
    global _warned
    try:
        from TSB_AD.evaluation.basic_metrics import generate_curve
    except ImportError:
        if not _warned:
            print(f"warning: VUS-PR and VUS-ROC need TSB-AD's metrics: {VUS_INSTALL}", file=sys.stderr)
            _warned = True
        return None, None
    *_, vus_roc, vus_pr = generate_curve(labels, scores, window, "opt", VUS_THRESHOLDS)
    return finite(vus_pr), finite(vus_roc)


def finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None
