"""Prompt text, canonical completion and the completion parser (method.md §1 and §2)."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from timerpo.prompt import (
    LABELS,
    MAX_PARSE_CHARS,
    Parsed,
    build_prompt,
    format_completion,
    normalize_label,
    parse_completion,
)

L = 100


def wrap(answer="[]", klass="normal", think="ok"):
    return f"<think>{think}</think>\n<answer>{answer}</answer>\n<class>{klass}</class>"


def check_invariants(parsed, length):
    """What every Parsed must satisfy, whatever the input."""
    assert isinstance(parsed, Parsed)
    assert parsed.answer_ok == (parsed.intervals is not None)
    assert parsed.has_answer or parsed.intervals is None
    assert parsed.has_think == (parsed.think is not None)
    assert parsed.label is None or parsed.label in LABELS
    if parsed.intervals is not None:
        for s, e in parsed.intervals:
            assert type(s) is int and type(e) is int and 0 <= s < e <= length


# ------------------------------------------------------------------------------------------------ labels, prompt


def test_labels_match_data_gen():
    import data_gen  # a top-level module written alongside; the two label lists must agree

    assert tuple(data_gen.LABELS) == LABELS


def test_labels_are_the_six_of_the_paper():
    assert LABELS == ("global point", "contextual point", "seasonal", "trend", "shapelet", "normal")


@pytest.mark.parametrize("length", [1, 400, 1000])
def test_prompt_states_length_types_format_and_empty_rule(length):
    text = build_prompt(length)
    assert f"length {length}" in text and f"<= {length}" in text
    for label in LABELS:
        assert label in text
    for tag in ("<think>", "</think>", "<answer>", "</answer>", "<class>", "</class>"):
        assert tag in text
    assert "[s, e)" in text  # the half-open convention
    assert "<answer>[]</answer>" in text and "<class>normal</class>" in text
    assert len(text) < 1200  # stays short for a tiny model


@pytest.mark.parametrize("length", [0, -1, 2.0, "100", None, True])
def test_prompt_rejects_bad_length(length):
    with pytest.raises(ValueError, match="length"):
        build_prompt(length)


# ------------------------------------------------------------------------------------------------ format_completion


def test_format_completion_exact_text():
    got = format_completion("slope jumps", [(3, 7), (10, 12)], "trend")
    assert got == "<think>slope jumps</think>\n<answer>[[3, 7], [10, 12]]</answer>\n<class>trend</class>"
    assert format_completion("", [], "normal") == "<think></think>\n<answer>[]</answer>\n<class>normal</class>"


@pytest.mark.parametrize(
    "reasoning, intervals, label, fragment",
    [
        ("r", [(1, 2)], "spike", "label"),
        ("r", [(2, 2)], "trend", "#0"),
        ("r", [(0, 1), (-1, 3)], "trend", "#1"),
        ("r", [(0, 1.5)], "trend", "#0"),
        ("r", ["12"], "trend", "#0"),
        ("a </THINK> b", [], "normal", "think"),
        ("see <answer>", [], "normal", "answer"),
        (None, [], "normal", "string"),
    ],
)
def test_format_completion_rejects_bad_input(reasoning, intervals, label, fragment):
    with pytest.raises(ValueError) as err:
        format_completion(reasoning, intervals, label)
    assert fragment in str(err.value)


_safe_text = st.text(max_size=80).filter(lambda s: "<" not in s)


@settings(max_examples=150, deadline=None)
@given(
    reasoning=_safe_text,
    intervals=st.lists(st.tuples(st.integers(0, 998), st.integers(1, 50)), max_size=6),
    label=st.sampled_from(LABELS),
)
def test_format_then_parse_round_trips(reasoning, intervals, label):
    pairs = [(s, s + w) for s, w in intervals if s + w <= 1000]
    parsed = parse_completion(format_completion(reasoning, pairs, label), 1000)
    assert parsed.think == reasoning
    assert parsed.intervals == pairs
    assert parsed.label == label
    assert parsed.has_think and parsed.has_answer and parsed.has_class and parsed.answer_ok


# ------------------------------------------------------------------------------------------------ parse: blocks


def test_last_block_wins():
    text = (
        "<think>first</think><answer>[[1, 2]]</answer><class>trend</class>"
        "<think>second</think><answer>[[5, 9]]</answer><class>seasonal</class>"
    )
    got = parse_completion(text, L)
    assert (got.think, got.intervals, got.label) == ("second", [(5, 9)], "seasonal")


def test_unclosed_trailing_block_does_not_hide_the_last_complete_one():
    got = parse_completion("<answer>[[3, 4]]</answer> then <answer>[[7, ", L)
    assert got.intervals == [(3, 4)]
    got = parse_completion("<answer>[[3, 4]]</answer> stray </answer>", L)
    assert got.intervals == [(3, 4)]


def test_tags_are_case_insensitive():
    got = parse_completion("<THINK>x</Think><Answer>[[1, 3]]</ANSWER><CLASS>Trend</class>", L)
    assert (got.think, got.intervals, got.label) == ("x", [(1, 3)], "trend")


def test_missing_blocks():
    got = parse_completion("<answer>[[1, 3]]</answer>", L)
    assert (got.has_think, got.has_answer, got.has_class) == (False, True, False)
    assert got.think is None and got.label is None and got.intervals == [(1, 3)]
    got = parse_completion("no tags at all", L)
    assert (got.has_think, got.has_answer, got.has_class, got.answer_ok) == (False, False, False, False)
    assert got.intervals is None


# ------------------------------------------------------------------------------------------------ parse: answer


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("[]", []),  # valid empty answer
        (" [ ] ", []),
        ("[[10, 20], [30, 40]]", [(10, 20), (30, 40)]),
        ('[{"start": 10, "end": 20}, [30, 40]]', [(10, 20), (30, 40)]),
        ('{"start": 4, "end": 8}', [(4, 8)]),
        ("[3, 10]", [(3, 10)]),  # a single pair without the outer list
        ("[[10.7, 20.2]]", [(10, 20)]),  # cast to int toward zero
        ('[["5", "9"]]', [(5, 9)]),
        ("[[90, 150]]", [(90, 100)]),  # e clipped to L
        ("[[120, 130], [1, 2]]", [(1, 2)]),  # starts at or past L are dropped
        ("[[5, 3], [2, 2], [-1, 4], [1, -4], [\"a\", 3], [1, 2, 3], [true, 4], [NaN, 4], [1, Infinity], [3, 8]]",
         [(3, 8)]),
        ('[{"start": 1}, {"begin": 1, "end": 4}, {"start": 2, "end": 6}]', [(2, 6)]),
        ("[[1, 99999999999999999999999999]]", [(1, L)]),
        ("[[10, 20], [30, 40]", [(10, 20), (30, 40)]),  # broken JSON: tolerant pair regex
        ("```json\n[[10, 20]]\n```", [(10, 20)]),
        ("intervals (4, 9) and (11,12)", [(4, 9), (11, 12)]),
        ("[[1, " + "9" * 5000 + "]]", [(1, L)]),  # past int()'s digit limit: regex path, clipped
    ],
)
def test_answer_parsing(answer, expected):
    got = parse_completion(wrap(answer), L)
    assert got.intervals == expected and got.answer_ok
    assert all(type(s) is int and type(e) is int for s, e in got.intervals)


@pytest.mark.parametrize(
    "answer",
    [
        "", "no anomaly", "none", "5", '"text"', "[[]]", "[[5, 3]]", "[[120, 130]]", "[[1, 1e999]]",
        "[[-5, -1]]", "[1, 2, 3]", "{}", "null", "[[" * 3000,
    ],
)
def test_garbage_answer_is_wrong_not_empty(answer):
    got = parse_completion(wrap(answer), L)
    assert got.has_answer and got.intervals is None and not got.answer_ok


# ------------------------------------------------------------------------------------------------ parse: class


@pytest.mark.parametrize(
    "text, expected",
    [
        ("trend", "trend"),
        ("  Seasonal \n", "seasonal"),
        ("GLOBAL   Point", "global point"),
        ("global\tpoint", "global point"),
        ("Contextual", "contextual point"),
        ("global", "global point"),
        ("shapelet", "shapelet"),
        ("NORMAL", "normal"),
        ("spike", None),
        ("trend.", None),
        ("point", None),
        ("", None),
    ],
)
def test_class_normalization(text, expected):
    assert normalize_label(text) == expected
    got = parse_completion(wrap(klass=text), L)
    assert got.label == expected and got.has_class


# ------------------------------------------------------------------------------------------------ never raises

_fragments = st.sampled_from([
    "<think>", "</think>", "<answer>", "</answer>", "<class>", "</class>", "<ANSWER>", "</Class>", "[", "]", "[[",
    "]]", ",", "{", "}", '"start":', '"end":', "NaN", "Infinity", "-Infinity", "1e999", "-3", "0", "17", "3.5",
    "9" * 400, "global", "contextual point", "normal", "(", ")", " ", "\n", "null", "true", "\u00e9\u4e2d\U0001F600",
    "\u0130", "\u212a",
])
_chaos = st.lists(st.one_of(_fragments, st.text(max_size=12), st.integers().map(str)), max_size=40).map("".join)


@settings(max_examples=400, deadline=None)
@given(text=st.one_of(st.text(max_size=300), _chaos), length=st.integers(1, 2000))
def test_parser_never_raises_on_arbitrary_text(text, length):
    check_invariants(parse_completion(text, length), length)


@pytest.mark.parametrize(
    "text",
    [
        "<answer>" + "[" * 100_000 + "</answer>",
        "<answer>[" + "1" * 100_000 + "</answer>",
        "<answer>" + "[1," * 50_000 + "</answer>",
        "<answer>" + "(1.1.1.1" * 20_000 + "</answer>",
        "<think>" * 50_000 + "</think>" * 10,
        "<answer>" + "{\"start\": " * 30_000 + "</answer>",
        "x" * (3 * MAX_PARSE_CHARS) + wrap("[[2, 5]]", "trend"),
        None,
        b"<answer>[[1, 2]]</answer>",
        12345,
    ],
    ids=["deep-brackets", "huge-number", "unclosed-pairs", "dotted-digits", "many-open-tags", "nested-dicts",
         "very-long", "none", "bytes", "int"],
)
def test_parser_survives_pathological_input(text):
    got = parse_completion(text, L)
    check_invariants(got, L)
    if isinstance(text, str) and text.endswith("</class>"):
        assert got.intervals == [(2, 5)] and got.label == "trend"


def test_parser_rejects_bad_length_clearly():
    with pytest.raises(ValueError, match="length"):
        parse_completion("<answer>[]</answer>", 0)
