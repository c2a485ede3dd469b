"""Held-out evaluation of a policy: one completion per sample, parsed and scored with the same metric
code as the reward (timerpo/metrics.py). Used by train.py every --eval-every steps and by eval.py.

Windows of real series (data_gen suite "series") may lack parts of the truth: a real anomaly's class is
unknown (label data_gen.UNKNOWN), and a series without labels has no intervals either (None). What is
unknown is not scored: its scores are NaN and every mean here skips NaN, so class accuracy counts only
samples of known class and the localization means only labelled samples.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace

import data_gen
from data_gen import UNKNOWN
from timerpo.algorithm import Prompt, chunks
from timerpo.metrics import PAPER_GROUPS, LocScores, class_accuracy, group_of, localization_scores
from timerpo.policy import Policy
from timerpo.progress import progress_bar
from timerpo.prompt import ANOMALY_LABELS, Parsed, parse_completion
from timerpo.reward import RewardParts, format_reward, outcome_reward
from timerpo.rollout import completion_seed, sample_completions

# Evaluation draws live in their own seed space, apart from every training step's. Not -1: SeedSequence
# accepts only non-negative entries; 2**32 - 1 is a step no run reaches.
EVAL_STEP = 2**32 - 1


@dataclass
class Prediction:
    """One evaluated sample: what the model wrote, what the parser read, how it scored."""

    sample: object  # data_gen.Sample
    text: str
    parsed: Parsed
    reward: RewardParts
    loc: LocScores


def score_prediction(sample, text: str, loc_mode: str = "six-mean") -> Prediction:
    """Parse and score one completion against its sample. Never raises on the text.

    Unknown parts of the truth score NaN: the class term and the total reward for a real anomaly of unknown
    class, everything but the format for a series without labels.
    """
    parsed = parse_completion(text, sample.length)
    if sample.intervals is None:
        nan = math.nan
        return Prediction(sample=sample, text=text, parsed=parsed, loc=LocScores(*[nan] * 6),
                          reward=RewardParts(fmt=format_reward(parsed), cls=nan, loc=nan, total=nan))
    # Any anomaly label stands in for an unknown one: it only decides the class term, replaced by NaN below.
    known_label = ANOMALY_LABELS[0] if sample.label == UNKNOWN else sample.label
    reward = outcome_reward(parsed, sample.intervals, known_label, sample.length, loc_mode=loc_mode)
    if sample.label == UNKNOWN:
        reward = replace(reward, cls=math.nan, total=math.nan)
    pred = parsed.intervals if parsed.intervals is not None else None
    # An unparsable answer scores 0 everywhere, like an answer on the wrong side of the wrapper rules.
    loc = localization_scores(pred, sample.intervals, sample.length) if pred is not None else LocScores(0, 0, 0, 0, 0, 0)
    return Prediction(sample=sample, text=text, parsed=parsed, reward=reward, loc=loc)


def predict(policy: Policy, prompts: list[Prompt], max_new_tokens: int, temperature: float = 0.0,
            batch_size: int = 16, seed: int = 0, loc_mode: str = "six-mean", progress: bool = False) -> list[Prediction]:
    """Generate one completion per prompt (greedy at temperature 0) and score it."""
    policy.model.eval()
    out = []
    bar = progress_bar(total=len(prompts), desc="eval", disable=not progress, leave=False)
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


def summarize(predictions: list[Prediction]) -> dict:
    """Mean reward, class accuracy, affiliation F1 overall, per paper group (+ their plain mean), per family."""
    by_family: dict[str, list[Prediction]] = {}
    for p in predictions:
        by_family.setdefault(p.sample.family, []).append(p)
    groups = {}
    for group in PAPER_GROUPS:
        members = [p for p in predictions if group_of(p.sample.family) == group]
        if members:
            groups[group] = mean(p.loc.aff_f1 for p in members)
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
        "families": {f: {"n": len(ps), "aff_f1": mean(p.loc.aff_f1 for p in ps),
                         "cls_acc": mean(p.reward.cls for p in ps)} for f, ps in sorted(by_family.items())},
    }


def true_label(sample) -> str:
    """The class the answer is scored against: 'normal' without intervals, UNKNOWN for real anomalies."""
    if sample.label == UNKNOWN:
        return UNKNOWN
    return sample.label if sample.intervals else "normal"


def read_suite(data_dir: str, samples: list) -> str:
    """'anomllm', 'tods' or 'series': the manifest's word, else guessed from the family names."""
    manifest = os.path.join(data_dir, "manifest.json")
    try:
        with open(manifest) as f:
            suite = json.load(f).get("suite")
        if suite in data_gen.SUITES + (data_gen.SERIES_SUITE,):
            return suite
    except (OSError, ValueError, AttributeError):
        pass  # no or unreadable manifest: fall back to the families
    if any(s.label == data_gen.UNKNOWN for s in samples):
        return data_gen.SERIES_SUITE
    families = {s.family for s in samples}
    only_tods = families - set(data_gen.ANOMLLM_FAMILIES)
    return "tods" if only_tods and families <= set(data_gen.TODS_TYPES) else "anomllm"


# ---------------------------------------------------------------------------------------------------
# Records for output files (eval.py's predictions.jsonl, train.py's eval-<step>/completions.jsonl)


def jsonable(obj):
    """Plain JSON values: tuples -> lists, NaN/inf -> None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def prediction_record(p: Prediction) -> dict:
    """One predictions.jsonl line: the sample's truth, the completion, its parse and its scores."""
    s, parsed = p.sample, p.parsed
    return jsonable({
        "id": s.id, "family": s.family, "label": true_label(s), "length": s.length, "gt_intervals": s.intervals,
        "completion": p.text,
        "parsed": {"intervals": parsed.intervals, "label": parsed.label, "has_think": parsed.has_think,
                   "has_answer": parsed.has_answer, "has_class": parsed.has_class, "answer_ok": parsed.answer_ok},
        "unparsable": parsed.intervals is None,
        "reward": vars(p.reward), "loc": vars(p.loc),
    })
