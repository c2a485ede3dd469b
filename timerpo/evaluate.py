"""Held-out evaluation of a policy: one completion per sample, parsed and scored with the same metric
code as the reward (timerpo/metrics.py). Used by train.py every --eval-every steps and by eval.py.

Windows of real series (data_gen suite "series") may lack parts of the truth: a real anomaly's class is
unknown (label data_gen.UNKNOWN), and a series without labels has no intervals either (None). What is
unknown is not scored: its scores are NaN and every mean here skips NaN, so class accuracy counts only
samples of known class and the localization means only labelled samples.

Avg F1 pays for presence and class as much as for positions, so every summary also carries two
localization figures (method.md §22):
    loc_gain         Avg F1 minus the Avg F1 of the same answers with each interval list replaced by the fixed
                     window of the class the answer names (CLASS_WINDOWS; [] for normal). Positive: the
                     answer's positions carry information beyond its class.
    pw_f1_anomalous  point-wise F1 over the series whose truth holds an anomaly (normal series score 1 for an
                     empty answer there, whatever the positions).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tqdm import tqdm

from data_gen import UNKNOWN
from timerpo.algorithm import Prompt, chunks
from timerpo.metrics import PAPER_GROUPS, LocScores, class_accuracy, group_of, localization_scores, to_events
from timerpo.policy import Policy
from timerpo.prompt import ANOMALY_LABELS, Parsed, parse_completion
from timerpo.reward import RewardParts, format_reward, outcome_reward
from timerpo.rollout import completion_seed, sample_completions

# Evaluation draws live in their own seed space, apart from every training step's. Not -1: SeedSequence
# accepts only non-negative entries; 2**32 - 1 is a step no run reaches.
EVAL_STEP = 2**32 - 1

# The class oracle's window per anomaly class: the [s, e) maximising the mean affiliation F1 over the training
# split's series of that class (data/train: anomllm, seed 3407, L = 1000), found by baselines.fit_class_windows;
# `python baselines.py --fit-class-windows data/train` refits them and says whether they are reproduced.
# ANY_ANOMALY: the best window over all anomalous training series, for a class without training series
# (shapelet, which the anomllm suite never generates) and a real anomaly of unknown class.
ANY_ANOMALY = "any anomaly"
CLASS_WINDOW_LENGTH = 1000
CLASS_WINDOWS = {  # mean affiliation F1 on the training series of the class, and their number
    "global point": (110, 891),  # 69.06 %, 282 series
    "contextual point": (189, 941),  # 71.51 %, 587
    "seasonal": (47, 965),  # 68.15 %, 716
    "trend": (800, 880),  # 97.20 %, 536: every trend anomaly of the generator starts at 800 or later
    ANY_ANOMALY: (173, 970),  # 69.77 %, 2121
}


@dataclass
class Prediction:
    """One evaluated sample: what the model wrote, what the parser read, how it scored."""

    sample: object  # data_gen.Sample
    text: str
    parsed: Parsed
    reward: RewardParts
    loc: LocScores


def answer_scores(sample, intervals) -> LocScores:
    """Localization scores of an answer's intervals: NaN for a series without labels, 0 everywhere for an
    unparsable answer (None), like an answer on the wrong side of the wrapper rules."""
    if sample.intervals is None:
        return LocScores(*[math.nan] * 6)
    if intervals is None:
        return LocScores(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    return localization_scores(intervals, sample.intervals, sample.length)


def score_prediction(sample, text: str, loc_mode: str = "six-mean") -> Prediction:
    """Parse and score one completion against its sample. Never raises on the text.

    Unknown parts of the truth score NaN: the class term and the total reward for a real anomaly of unknown
    class, everything but the format for a series without labels.
    """
    parsed = parse_completion(text, sample.length)
    if sample.intervals is None:
        nan = math.nan
        return Prediction(sample=sample, text=text, parsed=parsed, loc=answer_scores(sample, parsed.intervals),
                          reward=RewardParts(fmt=format_reward(parsed), cls=nan, loc=nan, total=nan))
    # Any anomaly label stands in for an unknown one: it only decides the class term, replaced by NaN below.
    known_label = ANOMALY_LABELS[0] if sample.label == UNKNOWN else sample.label
    reward = outcome_reward(parsed, sample.intervals, known_label, sample.length, loc_mode=loc_mode)
    if sample.label == UNKNOWN:
        reward = replace(reward, cls=math.nan, total=math.nan)
    return Prediction(sample=sample, text=text, parsed=parsed, reward=reward,
                      loc=answer_scores(sample, parsed.intervals))


def predict(policy: Policy, prompts: list[Prompt], max_new_tokens: int, temperature: float = 0.0,
            batch_size: int = 16, seed: int = 0, loc_mode: str = "six-mean", progress: bool = False) -> list[Prediction]:
    """Generate one completion per prompt (greedy at temperature 0) and score it."""
    policy.model.eval()
    out = []
    bar = tqdm(total=len(prompts), desc="eval", disable=not progress, dynamic_ncols=True, leave=False)
    for chunk in chunks(prompts, batch_size):
        seeds = [completion_seed(seed, EVAL_STEP, p.index, 0) for p in chunk]
        completions = sample_completions(policy, [p.encoded for p in chunk], seeds, max_new_tokens, temperature)
        for p, (ids, _) in zip(chunk, completions):
            out.append(score_prediction(p.sample, policy.tokenizer.decode(ids, skip_special_tokens=True), loc_mode))
        bar.update(len(chunk))
    bar.close()
    return out


def mean(values) -> float:
    """Plain mean of the values that are scored (NaN marks an unscored one); NaN when none is.

    Example: mean([1.0, nan, 0.0]) == 0.5. Synthetic data never holds NaN scores, so there it is the plain mean.
    """
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def known_class_accuracy(predictions: list[Prediction]) -> float:
    """class_accuracy over the samples whose true class is known; NaN when none is."""
    known = [p for p in predictions if true_label(p.sample) != UNKNOWN]
    if not known:
        return math.nan
    return class_accuracy([p.parsed.label for p in known], [true_label(p.sample) for p in known])


def paper_group_f1(predictions: list[Prediction]) -> dict:
    """Mean affiliation F1 of each paper group (Table 1's columns) that holds a prediction, in PAPER_GROUPS order."""
    groups = {}
    for group in PAPER_GROUPS:
        members = [p for p in predictions if group_of(p.sample.family) == group]
        if members:
            groups[group] = mean(p.loc.aff_f1 for p in members)
    return groups


def avg_f1(predictions: list[Prediction], suite: str = "anomllm") -> float:
    """The headline Avg F1. anomllm: the plain mean of the paper groups' means (method.md §22); tods: the plain
    mean over types; a folder of real series windows: the mean over the scored windows."""
    if suite == "anomllm":
        return mean(paper_group_f1(predictions).values())
    if suite == "tods":
        by_type: dict[str, list[Prediction]] = {}
        for p in predictions:
            by_type.setdefault(p.sample.family, []).append(p)
        return mean(mean(p.loc.aff_f1 for p in ps) for ps in by_type.values())
    return mean(p.loc.aff_f1 for p in predictions)


def class_window(label, length: int):
    """The class oracle's answer for a class at a series length: its CLASS_WINDOWS window (ANY_ANOMALY's for an
    anomaly class without one) scaled from CLASS_WINDOW_LENGTH, rounded, at least one point; [] for normal;
    None for no class.

    Example: with CLASS_WINDOWS["trend"] == (500, 1000), class_window("trend", 400) == [[200, 400]].
    """
    if label == "normal":
        return []
    if label not in ANOMALY_LABELS and label != ANY_ANOMALY:
        return None
    window = CLASS_WINDOWS.get(label, CLASS_WINDOWS[ANY_ANOMALY])
    s, e = (round(v * length / CLASS_WINDOW_LENGTH) for v in window)
    s = min(s, length - 1)
    return [[s, max(e, s + 1)]]


def with_class_windows(predictions: list[Prediction]) -> list[Prediction]:
    """The same answers with each interval list replaced by class_window of the class the answer names.

    An unparsable answer stays unparsable; an answer without a class keeps its own intervals (there is no
    class to take a window from, so it adds nothing to the gain either way). Only the localization scores are
    recomputed; reward and class are the answer's own.
    """
    out = []
    for p in predictions:
        window = class_window(p.parsed.label, p.sample.length)
        if p.parsed.intervals is None or window is None:
            out.append(p)
            continue
        out.append(replace(p, parsed=replace(p.parsed, intervals=window), loc=answer_scores(p.sample, window)))
    return out


def localization_figures(predictions: list[Prediction], suite: str = "anomllm") -> dict:
    """avg_f1, the class-window answers' Avg F1, loc_gain (their difference) and pw_f1_anomalous (module
    docstring), all fractions, NaN where nothing is scored; and distinct_intervals, how many different parsed
    interval lists the answers hold (a policy that answers a few fixed windows has few)."""
    avg = avg_f1(predictions, suite)
    fixed = avg_f1(with_class_windows(predictions), suite)
    anomalous = [p for p in predictions if p.sample.intervals and to_events(p.sample.intervals, p.sample.length)]
    distinct = {tuple(map(tuple, p.parsed.intervals)) for p in predictions if p.parsed.intervals is not None}
    return {"avg_f1": avg, "class_window_avg_f1": fixed, "loc_gain": avg - fixed,
            "pw_f1_anomalous": mean(p.loc.pw_f1 for p in anomalous), "n_anomalous": len(anomalous),
            "distinct_intervals": len(distinct)}


def summarize(predictions: list[Prediction], suite: str = "anomllm") -> dict:
    """Mean reward, class accuracy, affiliation F1 overall, per paper group (+ their plain mean), per family,
    and the localization figures (localization_figures) with the suite's Avg F1."""
    by_family: dict[str, list[Prediction]] = {}
    for p in predictions:
        by_family.setdefault(p.sample.family, []).append(p)
    groups = paper_group_f1(predictions)
    return {
        "n": len(predictions),
        "reward": mean(p.reward.total for p in predictions),
        "reward_fmt": mean(p.reward.fmt for p in predictions),
        "reward_cls": mean(p.reward.cls for p in predictions),
        "reward_loc": mean(p.reward.loc for p in predictions),
        "cls_acc": known_class_accuracy(predictions),
        "n_known_class": sum(true_label(p.sample) != UNKNOWN for p in predictions),
        "n_labelled": sum(p.sample.intervals is not None for p in predictions),
        "aff_f1": mean(p.loc.aff_f1 for p in predictions),
        "pw_f1": mean(p.loc.pw_f1 for p in predictions),
        "unparsable": sum(p.parsed.intervals is None for p in predictions),
        "groups": groups,
        "avg_group_f1": mean(groups.values()),
        **localization_figures(predictions, suite),
        "families": {f: {"n": len(ps), "aff_f1": mean(p.loc.aff_f1 for p in ps),
                         "cls_acc": mean(p.reward.cls for p in ps)} for f, ps in sorted(by_family.items())},
    }


def true_label(sample) -> str:
    """The class the answer is scored against: 'normal' without intervals, UNKNOWN for real anomalies."""
    if sample.label == UNKNOWN:
        return UNKNOWN
    return sample.label if sample.intervals else "normal"
