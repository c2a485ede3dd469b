"""Task prompt and labels, the ground-truth check (check_truth), the generic reasoning text, canonical completion
text and the completion parser (method.md §1, §2 and §19).

The parser reads untrusted model output: it never evaluates it, never raises, and every pattern it uses runs
in linear time, so arbitrary text (huge numbers, NaN, deep brackets, any unicode) is safe to feed it.
"""
import json
import math
import numbers
import re
from bisect import bisect_left
from dataclasses import dataclass

# The six class labels, five anomaly types then "normal" (method.md §1); data_gen.py and expert_cot.py use these.
LABELS = ("global point", "contextual point", "seasonal", "trend", "shapelet", "normal")
ANOMALY_LABELS = LABELS[:-1]
# The truth-side class of a labelled anomaly in a real series, whose type nobody labelled: never an answer,
# and its class term is left out of the reward (reward.py).
UNKNOWN = "unknown"

# Short answers the model may give for a label (method.md §2).
_LABEL_ALIASES = {"contextual": "contextual point", "global": "global point"}

# Completions are ~1024 tokens; longer text is cut to its tail (the last blocks live there) so a pathological
# string cannot cost more than a bounded, linear amount of work.
MAX_PARSE_CHARS = 200_000

_BLOCKS = ("think", "answer", "class")


def _check_length(length):
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise ValueError(f"length must be a positive integer, got {length!r}")
    return length


def _int_bounds(item):
    """(s, e) when item is a pair of integers (Python or numpy; no floats), else None."""
    try:
        s, e = item
    except (TypeError, ValueError):
        return None
    if not (isinstance(s, numbers.Integral) and isinstance(e, numbers.Integral)):
        return None
    return int(s), int(e)


def check_intervals(intervals, length):
    """True intervals as [[s, e], ...], or ValueError: integer pairs, sorted, disjoint, half-open [s, e) with
    0 <= s < e <= length. Example: check_intervals([(3, 7), [9, 12]], 20) == [[3, 7], [9, 12]]."""
    out, prev = [], 0
    for item in intervals:
        pair = _int_bounds(item)
        if pair is None or not prev <= pair[0] < pair[1] <= length:
            raise ValueError(f"invalid interval {item!r} in {intervals!r} (need sorted, disjoint, half-open "
                             f"[s, e) with 0 <= s < e <= {length})")
        out.append(list(pair))
        prev = pair[1]
    return out


def check_truth(intervals, label, length):
    """A ground truth (intervals, label) checked: check_intervals, and a label of LABELS that fits them
    ("normal" exactly when there is no interval). Returns the intervals as [[s, e], ...]."""
    if label not in LABELS:
        raise ValueError(f"label {label!r} is not one of {LABELS}")
    out = check_intervals(intervals, length)
    if (label == "normal") != (not out):
        raise ValueError(f"label {label!r} does not fit intervals {out}")
    return out


def build_prompt(length):
    """Task prompt for a plot of a series of `length` points (method.md §1; wording our own).

    States L, the five anomaly types, the half-open [s, e) index convention, the output tags and the
    empty/normal rule. Example: build_prompt(1000) mentions "length 1000" and "0 <= s < e <= 1000".
    """
    length = _check_length(length)
    return (
        f"You are a time-series analyst. The image plots one univariate series of length {length}; "
        f"the x-axis is the time index 0..{length}.\n"
        "Find every anomalous interval along the x-axis and the most plausible anomaly type among five: "
        "global point (values far outside the usual range), contextual point (values in range but wrong for "
        "their neighbourhood), seasonal (the rhythm or frequency changes), trend (the slope or level drifts), "
        "shapelet (a stretch with a different shape).\n"
        f"Intervals are half-open index ranges [s, e) with 0 <= s < e <= {length}.\n"
        "First reason inside <think>...</think>. Then write <answer>[[s, e], ...]</answer> and "
        "<class>LABEL</class>, LABEL being one of: " + ", ".join(LABELS) + ".\n"
        "If nothing is anomalous, write <answer>[]</answer> and <class>normal</class>."
    )


GENERIC_COT = "\n".join([
    "Observation: I look over the whole plot, first for values far outside the usual range, then for changes "
    "in the slope or in the rhythm of the cycle, then for stretches whose shape does not match the rest.",
    "Reasoning & Validation: I compare each stretch that stands out with the pattern around it and keep only "
    "those that clearly break it; the kind of break decides the type.",
    "Conclusion: I report the stretches that break the pattern, or none, and the type that fits them best.",
])


def generic_cot() -> str:
    """The generic reasoning of the "w/o ExpCoT" ablation: the same text for every sample, so it carries
    no number from the series, no ground-truth interval and no label (only the three-part layout)."""
    return GENERIC_COT


def _int_pair(item):
    """(s, e) when item is a pair of integer values (ints, or floats equal to ints), else None."""
    if isinstance(item, (str, bytes, dict)):
        return None
    try:
        values = list(item)
    except TypeError:
        return None
    if len(values) != 2:
        return None
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            return None
        if isinstance(v, numbers.Integral):
            out.append(int(v))
        elif math.isfinite(v) and v == int(v):
            out.append(int(v))
        else:
            return None
    return tuple(out)


def format_completion(reasoning, intervals, label):
    """Canonical completion: '<think>R</think>\\n<answer>[[s, e], ...]</answer>\\n<class>label</class>'.

    Example: format_completion("flat", [(3, 7)], "trend")
    == "<think>flat</think>\\n<answer>[[3, 7]]</answer>\\n<class>trend</class>".
    Raises ValueError on an unknown label, a bad interval, or tags inside the reasoning (they would break
    the last-block parse).
    """
    if label not in LABELS:
        raise ValueError(f"format_completion: label {label!r} is not one of {LABELS}")
    if not isinstance(reasoning, str):
        raise ValueError(f"format_completion: reasoning must be a string, got {type(reasoning).__name__}")
    for name in _BLOCKS:
        if re.search(f"</?{name}>", reasoning, re.IGNORECASE):
            raise ValueError(f"format_completion: reasoning contains a <{name}> tag")
    pairs = []
    for k, item in enumerate(intervals):
        pair = _int_pair(item)
        if pair is None or not 0 <= pair[0] < pair[1]:
            raise ValueError(f"format_completion: interval #{k} {item!r} is not integers 0 <= s < e")
        pairs.append(list(pair))
    return f"<think>{reasoning}</think>\n<answer>{json.dumps(pairs)}</answer>\n<class>{label}</class>"


@dataclass
class Parsed:
    """What parse_completion read. intervals: None = no block or nothing usable ("wrong"), [] = valid empty."""

    think: object  # str | None
    intervals: object  # list[tuple[int, int]] | None
    label: object  # str | None, one of LABELS
    has_think: bool
    has_answer: bool
    has_class: bool
    answer_ok: bool


_TAG_RE = {
    name: (re.compile(f"<{name}>", re.IGNORECASE), re.compile(f"</{name}>", re.IGNORECASE)) for name in _BLOCKS
}
# A pair "[s, e]" or "(s, e)" of plain decimal numbers. Digits, dots and separators are disjoint character
# classes, so a failed match backtracks at most once over each digit run: linear time.
_PAIR_RE = re.compile(r"[\[(]\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*[\])]")
_INT_TEXT_RE = re.compile(r"\s*([+-]?)(\d+)\s*")
_MISSING = object()


def _last_block(text, name):
    """Content of the last complete <name>...</name> block (case-insensitive), or None.

    "Last" = the last opening tag that a closing tag follows; the block ends at the first such closing tag.
    """
    open_re, close_re = _TAG_RE[name]
    opens = [m.end() for m in open_re.finditer(text)]
    closes = [m.start() for m in close_re.finditer(text)]
    for start in reversed(opens):
        k = bisect_left(closes, start)
        if k < len(closes):
            return text[start:closes[k]]
    return None


def _number(value):
    """A JSON value as an int or a float; None when it is no number (bools and other types included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and len(value) <= 64:
        m = _INT_TEXT_RE.fullmatch(value)
        if m:
            return int(m.group(1) + m.group(2))
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _interval(item, length):
    """One answer item ([s, e] or {"start": s, "end": e}) as a clean (s, e), or None to drop it.

    Drops non-numbers, non-finite and negative values, and s >= e; casts to int (toward zero); clips e to L.
    Example with L = 100: [10.7, 250] -> (10, 100); [5, 5] -> None; [-1, 4] -> None; [120, 130] -> None.
    """
    if isinstance(item, dict):
        item = (item.get("start"), item.get("end"))
    if not isinstance(item, (list, tuple)) or len(item) != 2:
        return None
    s, e = _number(item[0]), _number(item[1])
    if s is None or e is None:
        return None
    if isinstance(s, float) and not math.isfinite(s) or isinstance(e, float) and not math.isfinite(e):
        return None
    if s < 0 or e < 0:
        return None
    s, e = int(s), min(int(e), length)
    return (s, e) if s < e else None


def _digits_to_number(token):
    """A regex-matched decimal token as a number; an integer part over 30 digits (int() refuses more than
    4300) becomes ±10**30, which only matters through the sign check and the clip to L."""
    if len(token.lstrip("-").split(".")[0]) > 30:
        return -(10**30) if token.startswith("-") else 10**30
    return float(token) if "." in token else int(token)


def _answer_items(content):
    """Raw items of an answer: JSON first (a list of items, a single flat pair, or a single dict), then
    the tolerant pair regex. None when neither finds a list."""
    try:
        data = json.loads(content)
    except Exception:  # any malformed, huge or deeply nested text: fall back to the regex
        data = _MISSING
    if isinstance(data, list):
        if len(data) == 2 and all(_number(v) is not None for v in data):
            return [data]  # "[3, 10]": a single interval written without the outer list
        return data
    if isinstance(data, dict):
        return [data]
    pairs = [(_digits_to_number(a), _digits_to_number(b)) for a, b in _PAIR_RE.findall(content)]
    return pairs or None


def _parse_answer(content, length):
    """Clean interval list of an answer block; [] for a valid empty list, None when nothing usable is left."""
    items = _answer_items(content)
    if items is None:
        return None
    clean = [iv for iv in (_interval(item, length) for item in items) if iv is not None]
    if items and not clean:
        return None  # a non-empty answer of which nothing survives is wrong, not "no anomaly"
    return clean


def normalize_label(text):
    """Class text to one of LABELS or None: lowercase, collapse whitespace, aliases (method.md §2).

    Example: normalize_label("  Contextual\\n ") == "contextual point"; normalize_label("spike") is None.
    """
    if text is None:
        return None
    key = " ".join(text.split()).lower()
    key = _LABEL_ALIASES.get(key, key)
    return key if key in LABELS else None


def parse_completion(text, length):
    """Read a completion (method.md §2): the LAST think/answer/class blocks, case-insensitive.

    Never raises on any `text` (non-strings read as empty); `length` must be a positive int.
    Example with L = 100: "<think>x</think><answer>[[5, 150]]</answer><class>Global</class>"
    -> intervals [(5, 100)], label "global point", answer_ok True.
    """
    length = _check_length(length)
    if not isinstance(text, str):
        text = ""
    text = text[-MAX_PARSE_CHARS:]
    think = _last_block(text, "think")
    answer = _last_block(text, "answer")
    klass = _last_block(text, "class")
    intervals = _parse_answer(answer, length) if answer is not None else None
    return Parsed(
        think=think,
        intervals=intervals,
        label=normalize_label(klass),
        has_think=think is not None,
        has_answer=answer is not None,
        has_class=klass is not None,
        answer_ok=intervals is not None,
    )
