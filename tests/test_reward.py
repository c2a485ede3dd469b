"""Outcome reward R = 0.1·R_fmt + 0.2·R_cls + 0.7·R_loc on hand-made completions (method.md §3)."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from timerpo.prompt import format_completion, parse_completion
from timerpo.reward import LOC_MODES, RewardParts, outcome_reward, score_completion

pytestmark = pytest.mark.math  # the fast math subset: python -m pytest -m math

# The first check of method.md §21 (values from the metric's authors): L = 10, pred [(4, 5), (8, 9)], gt [(3, 4), (7, 10)].
CHECK_L, CHECK_PRED, CHECK_GT = 10, [(4, 5), (8, 9)], [(3, 4), (7, 10)]
CHECK_AFF_P, CHECK_AFF_R = 0.818182, 0.844276


def approx_parts(fmt, cls, loc, total):
    """Tuple form of RewardParts for a tolerant comparison (0.1 + 0.2 + ... is not exact in floats)."""
    return pytest.approx((fmt, cls, loc, total), abs=1e-12)


def as_tuple(p):
    return (p.fmt, p.cls, p.loc, p.total)


def parts(text, gt, label, length=100, mode="six-mean"):
    return score_completion(text, gt, label, length, mode)[1]


def test_loc_modes():
    assert LOC_MODES == ("six-mean", "aff-f1")


def test_perfect_completion_scores_one():
    text = format_completion("a ramp", [(10, 30)], "trend")
    for mode in LOC_MODES:
        assert parts(text, [(10, 30)], "trend", mode=mode) == RewardParts(1.0, 1.0, 1.0, 1.0)


def test_normal_series_answered_empty_scores_one():
    text = format_completion("flat", [], "normal")
    assert parts(text, [], "normal") == RewardParts(1.0, 1.0, 1.0, 1.0)


def test_true_label_is_normal_when_gt_has_no_interval():
    text = format_completion("flat", [], "normal")
    # The caller's label is overridden: no interval means "normal" (also after clipping to L).
    assert parts(text, [], "trend").cls == 1.0
    assert parts(text, [(150, 160)], "trend").cls == 1.0


def test_missing_think_costs_the_format_term():
    text = "<answer>[[10, 30]]</answer><class>trend</class>"
    assert as_tuple(parts(text, [(10, 30)], "trend")) == approx_parts(0.0, 1.0, 1.0, 0.9)


def test_wrong_class():
    text = format_completion("r", [(10, 30)], "seasonal")
    assert as_tuple(parts(text, [(10, 30)], "trend")) == approx_parts(1.0, 0.0, 1.0, 0.8)


def test_missing_class_block():
    text = "<think>r</think><answer>[[10, 30]]</answer>"
    assert as_tuple(parts(text, [(10, 30)], "trend")) == approx_parts(0.0, 0.0, 1.0, 0.7)


def test_unknown_class_keeps_format_but_not_class():
    text = "<think>r</think><answer>[[10, 30]]</answer><class>spike</class>"
    assert as_tuple(parts(text, [(10, 30)], "trend")) == approx_parts(1.0, 0.0, 1.0, 0.8)


def test_unparsable_answer_scores_zero_localization_and_format():
    text = "<think>r</think><answer>somewhere in the middle</answer><class>trend</class>"
    assert as_tuple(parts(text, [(10, 30)], "trend")) == approx_parts(0.0, 1.0, 0.0, 0.2)
    # Nothing valid left from a non-empty list is "wrong", not "no anomaly", even on a normal series, and earns
    # no format point (the public release gives it one: method.md §23).
    text = "<think>r</think><answer>[[300, 400]]</answer><class>normal</class>"
    assert as_tuple(parts(text, [], "normal")) == approx_parts(0.0, 1.0, 0.0, 0.2)


def test_one_side_empty_scores_zero_localization():
    text = format_completion("flat", [], "normal")
    assert as_tuple(parts(text, [(10, 30)], "trend")) == approx_parts(1.0, 0.0, 0.0, 0.1)
    text = format_completion("spike", [(10, 30)], "global point")
    assert as_tuple(parts(text, [], "normal")) == approx_parts(1.0, 0.0, 0.0, 0.1)


def test_partial_localization_six_mean_and_aff_f1():
    # Point-wise by hand: pred ones {4, 8}, gt ones {3, 7, 8, 9} -> P 1/2, R 1/4, F1 1/3.
    aff_f1 = 2 * CHECK_AFF_P * CHECK_AFF_R / (CHECK_AFF_P + CHECK_AFF_R)
    six = (0.5 + 0.25 + 1 / 3 + CHECK_AFF_P + CHECK_AFF_R + aff_f1) / 6
    text = format_completion("two spikes", CHECK_PRED, "global point")
    got = parts(text, CHECK_GT, "global point", CHECK_L, "six-mean")
    assert got.loc == pytest.approx(six, abs=1e-6)
    assert got.total == pytest.approx(0.1 + 0.2 + 0.7 * six, abs=1e-6)
    got = parts(text, CHECK_GT, "global point", CHECK_L, "aff-f1")
    assert got.loc == pytest.approx(aff_f1, abs=1e-6)
    assert got.total == pytest.approx(0.1 + 0.2 + 0.7 * aff_f1, abs=1e-6)


def test_unknown_type_leaves_the_class_term_out_and_renormalises():
    # Same answer as above, truth of unlabelled type: (0.1 · 1 + 0.7 · six) / 0.8, whatever class is answered.
    aff_f1 = 2 * CHECK_AFF_P * CHECK_AFF_R / (CHECK_AFF_P + CHECK_AFF_R)
    six = (0.5 + 0.25 + 1 / 3 + CHECK_AFF_P + CHECK_AFF_R + aff_f1) / 6
    for answered in ("global point", "trend", "normal"):
        got = parts(format_completion("two spikes", CHECK_PRED, answered), CHECK_GT, "unknown", CHECK_L, "six-mean")
        assert math.isnan(got.cls) and got.loc == pytest.approx(six, abs=1e-6)
        assert got.total == pytest.approx((0.1 + 0.7 * six) / 0.8, abs=1e-6)
    perfect = parts(format_completion("r", CHECK_GT, "trend"), CHECK_GT, "unknown", CHECK_L, "six-mean")
    assert perfect.total == 1.0
    # No anomaly means the class is known, "normal", whatever label is given; an empty truth keeps its class term.
    empty = parts(format_completion("r", [], "normal"), [], "unknown", CHECK_L, "six-mean")
    assert empty.cls == 1.0 and empty.total == 1.0


def test_score_completion_is_parse_then_outcome_reward():
    text = "<think>r</think><answer>[[2, 6], [40, 45]]</answer><class>Contextual</class>"
    parsed, got = score_completion(text, [(3, 8)], "contextual point", 50, "aff-f1")
    assert parsed == parse_completion(text, 50)
    assert got == outcome_reward(parsed, [(3, 8)], "contextual point", 50, "aff-f1")


def test_bad_arguments_are_clear_errors():
    parsed = parse_completion(format_completion("r", [(1, 2)], "trend"), 10)
    with pytest.raises(ValueError, match="loc_mode"):
        outcome_reward(parsed, [(1, 2)], "trend", 10, loc_mode="f1")
    with pytest.raises(ValueError, match="gt_label 'normal'"):
        outcome_reward(parsed, [(1, 2)], "normal", 10)
    with pytest.raises(ValueError, match="gt_label 'spike'"):
        outcome_reward(parsed, [(1, 2)], "spike", 10)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(max_size=200),
    pred=st.lists(st.tuples(st.integers(0, 60), st.integers(1, 20)), max_size=4),
    gt=st.lists(st.tuples(st.integers(0, 60), st.integers(1, 20)), max_size=3),
    label=st.sampled_from(["global point", "contextual point", "seasonal", "trend", "shapelet"]),
    mode=st.sampled_from(LOC_MODES),
)
def test_reward_is_the_weighted_sum_and_bounded(text, pred, gt, label, mode):
    # Arbitrary text, and a well-formed completion built from random intervals.
    well_formed = format_completion("r", [(s, s + w) for s, w in pred], label)
    for completion in (text, well_formed):
        got = parts(completion, [(s, s + w) for s, w in gt], label, 64, mode)
        assert got.fmt in (0.0, 1.0) and got.cls in (0.0, 1.0) and 0.0 <= got.loc <= 1.0
        assert got.total == pytest.approx(0.1 * got.fmt + 0.2 * got.cls + 0.7 * got.loc)
        assert 0.0 <= got.total <= 1.0 + 1e-12
