"""Outcome reward of one completion (method.md §3): R = 0.1·R_fmt + 0.2·R_cls + 0.7·R_loc.

A labelled anomaly of a real series has no known type (true label UNKNOWN): its class term is left out and
the other two weights renormalised, R = (0.1·R_fmt + 0.7·R_loc) / 0.8, so a perfect answer still scores 1
and R_cls is NaN (not scored).
"""
import math
from dataclasses import dataclass

from timerpo.metrics import localization_scores, to_events
from timerpo.prompt import ANOMALY_LABELS, UNKNOWN, parse_completion

W_FMT, W_CLS, W_LOC = 0.1, 0.2, 0.7

# Localization reward choices (method.md §3): "six-mean" = the public release's mean of point-wise
# P, R, F1 and affiliation P, R, F1 (default); "aff-f1" = affiliation F1 alone, as the paper text may read.
LOC_MODES = ("six-mean", "aff-f1")


@dataclass
class RewardParts:
    """The three outcome terms, each in [0, 1] (cls NaN for an anomaly of unknown type), and their weighted
    sum `total` in [0, 1]."""

    fmt: float
    cls: float
    loc: float
    total: float


def _true_label(gt_events, gt_label):
    """Ground-truth class: "normal" whenever no interval survives clipping, else the given anomaly label
    (UNKNOWN included: an anomaly whose type nobody labelled)."""
    if not gt_events:
        return "normal"
    if gt_label not in ANOMALY_LABELS + (UNKNOWN,):
        raise ValueError(f"gt_label {gt_label!r} must be one of the anomaly labels {ANOMALY_LABELS} or "
                         f"{UNKNOWN!r} when the ground truth has intervals {gt_events}")
    return gt_label


def format_reward(parsed):
    """R_fmt ∈ {0, 1} (method.md §3): 1 iff think, answer and class blocks are present and the answer
    parses to a usable list: [] or at least one valid item. A non-empty answer none of whose items is valid
    gets 0, where the public release gives the point (method.md §23: the prompt asks for 0 <= s < e <= L).
    Example: a completion without <think> gets 0 even when its answer is right."""
    return float(parsed.has_think and parsed.has_answer and parsed.has_class and parsed.answer_ok)


def localization_reward(parsed, gt_intervals, length, loc_mode="six-mean"):
    """R_loc ∈ [0, 1] (method.md §3) under the wrapper rules of metrics.localization_scores;
    an unparsable answer scores 0. Example: pred [] and gt [] -> 1; pred [] and gt [(3, 9)] -> 0."""
    if loc_mode not in LOC_MODES:
        raise ValueError(f"loc_mode must be one of {LOC_MODES}, got {loc_mode!r}")
    if parsed.intervals is None:
        return 0.0
    scores = localization_scores(parsed.intervals, gt_intervals, length)
    return scores.six_mean() if loc_mode == "six-mean" else scores.aff_f1


def outcome_reward(parsed, gt_intervals, gt_label, length, loc_mode="six-mean"):
    """Outcome reward, method.md §3: R = 0.1·R_fmt + 0.2·R_cls + 0.7·R_loc.

    R_cls ∈ {0, 1}: parsed label == true label, the true label being "normal" when gt has no interval.
    Example: well-formed, right class, localization 0.5 -> 0.1 + 0.2 + 0.35 = 0.65.
    An anomaly of unknown type (gt_label UNKNOWN) has no class term: R_cls = NaN and
    R = (0.1·R_fmt + 0.7·R_loc) / 0.8; the same answer gives (0.1 + 0.35) / 0.8 = 0.5625.
    """
    gt_events = to_events(gt_intervals, length)
    label = _true_label(gt_events, gt_label)
    fmt = format_reward(parsed)
    loc = float(localization_reward(parsed, gt_events, length, loc_mode))
    if label == UNKNOWN:
        return RewardParts(fmt=fmt, cls=math.nan, loc=loc, total=(W_FMT * fmt + W_LOC * loc) / (W_FMT + W_LOC))
    cls = float(parsed.label is not None and parsed.label == label)
    return RewardParts(fmt=fmt, cls=cls, loc=loc, total=W_FMT * fmt + W_CLS * cls + W_LOC * loc)


def score_completion(text, gt_intervals, gt_label, length, loc_mode="six-mean"):
    """Parse a completion and compute its outcome reward: returns (Parsed, RewardParts)."""
    parsed = parse_completion(text, length)
    return parsed, outcome_reward(parsed, gt_intervals, gt_label, length, loc_mode)
