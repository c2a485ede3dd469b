"""Synthetic training / evaluation data for TimerPO (method.md §4 and §5).

Two suites:
  * ``anomllm``: the eight training families of the paper (L = 1000), parameters from the table of method.md §4;
  * ``tods``: five TODS-style types (L = 400), incl. ``shapelet``, the type never seen in training.
A third "suite", ``series``, imports real series instead (series_io.py): windows of a file or a folder, the
class of their anomalies unknown.

Every series is a pure function of (seed, suite, family, index): its numpy Generator comes from a
SeedSequence of those values, never from a global RNG or OS entropy, so any subset of a run regenerates
byte-identically. Intervals are half-open [s, e) integer index ranges, sorted and disjoint.

``tokenizer_corpus`` is the project's text the tiny model's tokenizer is trained on (timerpo/tiny.py).

The renderer draws the series only (axes, ticks, grid, one line). It has no parameter that could receive
ground truth; ``draw_intervals`` exists for evaluation galleries and must never feed a model input.

CLI:  python data_gen.py --out data/train --suite anomllm --per-family 400 --seed 3407
      python data_gen.py --out data/nab --suite series --input NAB/realKnownCause --labels NAB/labels.json
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import sys
import zlib
from dataclasses import dataclass

if __name__ == "__main__":  # before numpy loads: the ExpCoT's small matrix products run faster on one BLAS thread
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont

from timerpo.cli import add_flags, flag, usage_error
from timerpo.files import make_temp_dir, png_bytes, replace_dir, write_atomic
from timerpo.progress import progress_bar
from timerpo.prompt import (LABELS, UNKNOWN, build_prompt, check_intervals, check_truth, format_completion,
                            generic_cot)

DATA_VERSION = "1"

SERIES_SUITE = "series"
ANOMLLM_FAMILIES = ("range", "point", "freq", "trend", "flat-trend", "noisy-point", "noisy-freq", "noisy-trend")
TODS_TYPES = ("global", "contextual", "seasonal", "trend", "shapelet")
SUITES = ("anomllm", "tods")
SUITE_FAMILIES = {"anomllm": ANOMLLM_FAMILIES, "tods": TODS_TYPES}
SUITE_LENGTH = {"anomllm": 1000, "tods": 400}

# Family -> anomaly label. "trend" means the same thing in both suites, so one dict serves both.
# Every noisy family and flat-trend is mapped (the public release forgot them).
FAMILY_LABEL = {
    "range": "global point",
    "point": "contextual point",
    "freq": "seasonal",
    "trend": "trend",
    "flat-trend": "trend",
    "noisy-point": "contextual point",
    "noisy-freq": "seasonal",
    "noisy-trend": "trend",
    "global": "global point",
    "contextual": "contextual point",
    "seasonal": "seasonal",
    "shapelet": "shapelet",
}

SAMPLE_FIELDS = ("id", "family", "label", "length", "intervals", "series", "image", "expcot", "gencot")
SERIES_DECIMALS = 5  # stored precision; images and ExpCoT are computed from the rounded (stored) values


# --------------------------------------------------------------------------------------------- sample

@dataclass
class Sample:
    """One series with its ground truth, image path (relative to the data dir) and reasoning texts."""
    id: str
    family: str
    label: str
    length: int
    intervals: list[list[int]] | None  # None: a real series without labels (label UNKNOWN)
    series: list[float]
    image: str
    expcot: str
    gencot: str

    def to_json(self) -> str:
        """One jsonl line; key order fixed by the dataclass so output is byte-stable."""
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, separators=(",", ":"))


class DataError(Exception):
    """A data directory or samples.jsonl that cannot be used; the message names file and line."""


def sample_id(suite: str, family: str, index: int, seed: int) -> str:
    """Stable id telling suite, seed, family and index, e.g. ``anomllm-s3407-point-00017``."""
    return f"{suite}-s{seed}-{family}-{index:05d}"


# --------------------------------------------------------------------------------------------- intervals

@dataclass(frozen=True)
class IntervalSpec:
    """Renewal process of method.md §4: gap ~ max(Exp(gap_mean), gap_min), then an anomaly of length
    max(Exp(len_mean), len_min); both floored to integers; at most ``cap`` intervals (None: no cap);
    stop when an anomaly would start at or after L; the last one is cut at L."""
    gap_mean: float
    gap_min: int
    len_mean: float
    len_min: int
    cap: int | None = 8


ANOMLLM_INTERVALS = {
    "range": IntervalSpec(800.0, 10, 20.0, 5),
    "point": IntervalSpec(800.0, 200, 30.0, 5),
    "freq": IntervalSpec(450.0, 20, 15.0, 7, cap=None),
    "trend": IntervalSpec(1700.0, 800, 100.0, 50),
    "flat-trend": IntervalSpec(1700.0, 800, 100.0, 50),
}
for _name in ("point", "freq", "trend"):
    ANOMLLM_INTERVALS["noisy-" + _name] = ANOMLLM_INTERVALS[_name]


def sample_intervals(rng: np.random.Generator, length: int, spec: IntervalSpec) -> list:
    """Draw sorted, disjoint half-open intervals left to right.

    Example: gaps 300.7, 120.2 and lengths 25.9, 8.1 with L = 1000 give [[300, 325], [445, 453]].
    """
    intervals, pos = [], 0
    while spec.cap is None or len(intervals) < spec.cap:
        start = pos + int(max(rng.exponential(spec.gap_mean), spec.gap_min))
        if start >= length:
            break
        end = min(length, start + int(max(rng.exponential(spec.len_mean), spec.len_min)))
        intervals.append([start, end])
        pos = end
    return intervals


# --------------------------------------------------------------------------------------------- anomllm

NOISE_STD = 0.08  # noisy families: N(0, 0.08) added everywhere, after the clean series is complete


def synth_range(rng, length, intervals):
    """i.i.d. N(0, 0.1); inside an interval add ±U(0.5, 0.8) per point with one sign per interval."""
    x = rng.normal(0.0, 0.1, length)  # [L]
    for s, e in intervals:
        sign = 1.0 if rng.random() < 0.5 else -1.0
        x[s:e] += sign * rng.uniform(0.5, 0.8, e - s)
    return x


def synth_point(rng, length, intervals):
    """sin(2π·0.03·t); an interval is replaced by N(0, 0.5) noise."""
    x = np.sin(2 * np.pi * 0.03 * np.arange(length))  # [L]
    for s, e in intervals:
        x[s:e] = rng.normal(0.0, 0.5, e - s)
    return x


def synth_freq(rng, length, intervals, base=0.03, factor=3.0, amplitude=1.0):
    """sin(2π·cumsum(f_t)) with f = base; inside an interval f is ×factor or ÷factor (p = ½ each).

    Integrating f keeps the phase continuous at the interval edges, so only the frequency jumps.
    """
    f = np.full(length, base)  # [L] cycles per step
    for s, e in intervals:
        f[s:e] = base * factor if rng.random() < 0.5 else base / factor
    return amplitude * np.sin(2 * np.pi * np.cumsum(f))


def synth_trend(rng, length, intervals, slope_range):
    """sin(2π·0.02·t) + continuous piecewise-linear trend, then min-max scaled to [-1, 1].

    The trend rises slope·Δt/L: slope 3.0 normally, U(slope_range) inside each interval, so the value is
    continuous and only its rate changes (e.g. slope 3 for 1000 steps adds 3.0 before scaling).
    """
    rate = np.full(length, 3.0 / length)  # [L] rise per step
    for s, e in intervals:
        rate[s:e] = rng.uniform(*slope_range) / length
    trend = np.concatenate([[0.0], np.cumsum(rate[1:])])  # [L], trend[0] = 0
    x = np.sin(2 * np.pi * 0.02 * np.arange(length)) + trend
    return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0


def synth_anomllm(rng, family, length, intervals):
    """Clean base + anomaly for one anomllm family; noisy families add N(0, 0.08) at the end."""
    clean = family.removeprefix("noisy-")
    if clean == "range":
        x = synth_range(rng, length, intervals)
    elif clean == "point":
        x = synth_point(rng, length, intervals)
    elif clean == "freq":
        x = synth_freq(rng, length, intervals)
    elif clean == "trend":
        x = synth_trend(rng, length, intervals, (6.0, 20.0))
    else:  # flat-trend
        x = synth_trend(rng, length, intervals, (4.5, 6.0))
    if family.startswith("noisy-"):
        x = x + rng.normal(0.0, NOISE_STD, length)
    return x


# --------------------------------------------------------------------------------------------- tods
# TODS-style recipe (method.md §4): base 1.5·sin(2π·0.04·t) + N(0, 0.05), L = 400, every series has
# an anomaly. Choices (the recipe fixes no counts): point types get 3-6 single points, collective types
# 1-2 windows of 12-24 steps (≈5 % of the points), kept 20 steps from the ends and 30 steps apart.

TODS_BASE_FREQ = 0.04
TODS_AMPLITUDE = 1.5
TODS_NOISE = 0.05


def spread_starts(rng, length, count, width, margin, spacing):
    """``count`` sorted window starts in [margin, length - margin - width] with ≥ ``spacing`` steps between
    one window's end and the next start; drawn by placing the slack uniformly (no rejection loop)."""
    slack = length - 2 * margin - count * width - (count - 1) * spacing
    cuts = np.sort(rng.integers(0, slack + 1, count))  # [count]
    return [int(margin + c + k * (width + spacing)) for k, c in enumerate(cuts)]


def tods_windows(rng, length, family):
    """Anomalous windows for one TODS-style series (sorted, disjoint, half-open)."""
    if family in ("global", "contextual"):
        count = int(rng.integers(3, 7))
        starts = spread_starts(rng, length, count, 1, 20, 30)
        return [[s, s + 1] for s in starts]
    count = int(rng.integers(1, 3))
    widths = rng.integers(12, 25, count)  # [count]
    starts = spread_starts(rng, length, count, int(widths.max()), 20, 30)
    return [[s, s + int(w)] for s, w in zip(starts, widths)]


def synth_tods(rng, family, length, intervals):
    """Base sine + noise with one TODS-style anomaly type injected into each window."""
    f = np.full(length, TODS_BASE_FREQ)  # [L] cycles per step
    if family == "seasonal":
        for s, e in intervals:
            f[s:e] = 3.0 * TODS_BASE_FREQ  # windows at 3x frequency, phase-continuous
    phase = np.cumsum(f)  # [L] cycles
    x = TODS_AMPLITUDE * np.sin(2 * np.pi * phase)  # [L]
    base_lo, base_hi = x.min(), x.max()
    for s, e in intervals:
        if family == "global":
            # A spike beyond the normal range by 3.5-5 local standard deviations (window: one cycle, ±12).
            local_std = x[max(0, s - 12):s + 13].std()
            sign = 1.0 if rng.random() < 0.5 else -1.0
            peak = base_hi if sign > 0 else -base_lo
            x[s] = sign * (peak + rng.uniform(3.5, 5.0) * local_std)
        elif family == "contextual":
            # Jump towards the other side but stay inside the global range: wrong only for its neighbours.
            direction = -1.0 if x[s] > 0 else 1.0
            x[s] = np.clip(x[s] + direction * rng.uniform(1.5, 2.5), 0.95 * base_lo, 0.95 * base_hi)
        elif family == "trend":
            # A ramp inside the window; the level it reaches persists afterwards (TODS "trend").
            rise = (1.0 if rng.random() < 0.5 else -1.0) * rng.uniform(1.0, 2.0)
            ramp = rise * np.arange(1, e - s + 1) / (e - s)  # [e-s]
            x[s:e] += ramp
            x[e:] += rise
        elif family == "shapelet":
            # Same period, different waveform: a square wave in phase with the sine it replaces.
            x[s:e] = TODS_AMPLITUDE * np.where(np.sin(2 * np.pi * phase[s:e]) >= 0, 1.0, -1.0)
    return x + rng.normal(0.0, TODS_NOISE, length)


# --------------------------------------------------------------------------------------------- series

def family_code(suite: str, family: str) -> int:
    """Stable 32-bit code of (suite, family) for the SeedSequence (independent of tuple order)."""
    return zlib.crc32(f"{suite}/{family}".encode())


def check_family(suite: str, family: str) -> None:
    """Clear error for an unknown suite or family."""
    if suite not in SUITE_FAMILIES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    if family not in SUITE_FAMILIES[suite]:
        raise ValueError(f"unknown family {family!r} for suite {suite!r}; "
                         f"choose from {', '.join(SUITE_FAMILIES[suite])}")


def make_series(suite: str, family: str, index: int, seed: int):
    """Series and half-open intervals as a pure function of (suite, family, index, seed).

    Returns (np.ndarray [L] float64, list of [s, e]). Example: make_series("anomllm", "point", 17, 3407)
    returns the same numbers in any process, in any order, with any worker count.
    """
    check_family(suite, family)
    if int(index) < 0 or int(seed) < 0:
        raise ValueError(f"index and seed must be non-negative integers, got index={index}, seed={seed}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), family_code(suite, family), int(index)]))
    length = SUITE_LENGTH[suite]
    if suite == "anomllm":
        intervals = sample_intervals(rng, length, ANOMLLM_INTERVALS[family])
        return synth_anomllm(rng, family, length, intervals), intervals
    intervals = tods_windows(rng, length, family)
    return synth_tods(rng, family, length, intervals), intervals


# --------------------------------------------------------------------------------------------- render
# Default canvas 1064 × 140 px = 38 × 5 Qwen2.5-VL cells of 28 px → 190 visual tokens. The plot area is
# exactly 1000 px wide, so an L = 1000 series gets one pixel column per step and one token column spans
# 28 steps, the resolution of the paper's 1008 × 140 (180 tokens); the 10 extra tokens buy the margins for
# the labels: 36 px on the left for y labels, 28 px on the right for the last x label, 18 px below for
# x labels. A taller canvas (168 px, 228 tokens) would only add vertical detail the types do not need.

DEFAULT_WIDTH = 1064
DEFAULT_HEIGHT = 140
CELL = 28  # Qwen2.5-VL: patch 14, 2 × 2 merge
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 36, 28, 6, 18
# y-limits: anomllm series live in [-1, 1]; range (≤ ±1.1) and noisy families fit into ±1.25 without
# clipping, only rare N(0, 0.5) point-anomaly values beyond ±1.25 are clipped to the plot border. A fixed
# scale keeps amplitude comparable across samples (autoscaling would blow a pure-noise normal range series
# up to look like an anomaly). TODS-style series (amplitude 1.5, spikes) use the series' own min/max.
SUITE_YLIM = {"anomllm": (-1.25, 1.25), "tods": None}
SUITE_YLIM[SERIES_SUITE] = SUITE_YLIM["anomllm"]  # real windows are scaled to [-1, 1] (series_io.py)

BACKGROUND = (255, 255, 255)
GRID = (226, 226, 226)
INK = (0, 0, 0)
LINE = (70, 130, 180)  # steelblue, as in the public plots
PALETTE = (BACKGROUND, GRID, INK, LINE)  # every pixel of a model input is one of these


def visual_tokens(width: int, height: int) -> int:
    """Qwen2.5-VL visual tokens for an image already sized in multiples of 28: (W/28)·(H/28).

    Example: 1064 × 140 → 38 · 5 = 190.
    """
    return (width // CELL) * (height // CELL)


def plot_box(width: int, height: int):
    """(left, top, plot_width, plot_height) of the data area in pixels."""
    return MARGIN_LEFT, MARGIN_TOP, width - MARGIN_LEFT - MARGIN_RIGHT, height - MARGIN_TOP - MARGIN_BOTTOM


def x_to_pixel(i, length: int, width: int = DEFAULT_WIDTH):
    """Pixel column of x-position ``i`` (float ok): [0, L] maps linearly onto the plot area.

    Step t occupies [x(t), x(t+1)) and is drawn at x(t + 0.5); an interval [s, e) spans [x(s), x(e)).
    Example: L = 1000, width 1064 → x(0) = 36, x(500) = 536, x(1000) = 1036.
    """
    left, _, plot_w, _ = plot_box(width, DEFAULT_HEIGHT)
    return left + np.asarray(i, dtype=float) * plot_w / length


def nice_step(span: float, max_ticks: int) -> float:
    """Smallest step in {1, 2, 5}·10^k giving at most ``max_ticks`` intervals over ``span``."""
    raw = span / max_ticks
    power = 10.0 ** math.floor(math.log10(raw))
    for mult in (1, 2, 5, 10):
        if mult * power >= raw - 1e-12:
            return mult * power
    return 10 * power


def auto_ylim(series: np.ndarray):
    """Series min/max padded by 8 % on each side (flat series get ±1 around their value)."""
    lo, hi = float(np.min(series)), float(np.max(series))
    pad = 0.08 * (hi - lo) if hi > lo else 1.0
    return lo - pad, hi + pad


def tick_label(value: float) -> str:
    """Short tick text: 100 → '100', 0.5 → '0.5', -1.0 → '-1'."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def render_series(series, width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT, ylim=None) -> Image.Image:
    """Clean RGB line plot of one series: grid, axes, labelled integer x ticks, y ticks, one line.

    ``ylim`` None → the series' own padded min/max; values beyond ``ylim`` are clipped to the plot border.
    There is deliberately no argument for intervals or labels: model inputs cannot show ground truth.
    The bitmap default font and the non-antialiased line make the PNG bytes identical across runs.
    """
    return render_indexed(series, width, height, ylim).convert("RGB")


def render_indexed(series, width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT, ylim=None) -> Image.Image:
    """render_series as a 4-colour palette image ("P" mode, colours PALETTE); PNGs are stored this way
    (half the encoding time and size of RGB, same pixels after .convert("RGB"))."""
    x = np.asarray(series, dtype=float)  # [L]
    if x.ndim != 1 or x.size < 2 or not np.all(np.isfinite(x)):
        raise ValueError(f"render_series needs a finite 1-D series of length >= 2, got shape {x.shape}")
    if width % CELL or height % CELL:
        raise ValueError(f"canvas sides must be multiples of {CELL}, got {width} x {height}")
    length = x.size
    lo, hi = ylim if ylim is not None else auto_ylim(x)
    left, top, plot_w, plot_h = plot_box(width, height)
    bottom, right = top + plot_h - 1, left + plot_w
    img = Image.new("P", (width, height), 0)
    img.putpalette([c for colour in PALETTE for c in colour])
    draw = ImageDraw.Draw(img)
    grid_ink, ink, line_ink = 1, 2, 3  # palette indices of GRID, INK, LINE
    font = ImageFont.load_default_imagefont()

    def y_pix(v):
        return top + (hi - np.clip(v, lo, hi)) / (hi - lo) * (plot_h - 1)

    # x ticks on integer positions: labelled majors with grid lines, short unlabelled minors.
    major = max(1, int(nice_step(length, 10)))
    minor = max(1, major // 5)
    for t in range(0, length + 1, minor):
        px = int(round(float(x_to_pixel(t, length, width))))
        if t % major == 0:
            draw.line([(px, top), (px, bottom)], fill=grid_ink)
            draw.line([(px, bottom), (px, bottom + 4)], fill=ink)
            text = str(t)
            tw = draw.textlength(text, font=font)
            tx = min(max(px - tw / 2, 0), width - tw)
            draw.text((int(tx), bottom + 5), text, fill=ink, font=font)
        else:
            draw.line([(px, bottom), (px, bottom + 2)], fill=ink)
    ystep = nice_step(hi - lo, 4)
    for k in range(math.ceil(lo / ystep), math.floor(hi / ystep) + 1):
        value = k * ystep
        py = int(round(float(y_pix(value))))
        draw.line([(left, py), (right - 1, py)], fill=grid_ink)
        draw.line([(left - 4, py), (left - 1, py)], fill=ink)
        text = tick_label(value)
        tw = draw.textlength(text, font=font)
        draw.text((int(left - 6 - tw), max(0, py - 5)), text, fill=ink, font=font)
    draw.line([(left - 1, top), (left - 1, bottom + 1), (right, bottom + 1)], fill=ink)  # axes

    xs = np.floor(x_to_pixel(np.arange(length) + 0.5, length, width)).astype(int)  # [L]
    ys = np.round(y_pix(x)).astype(int)  # [L]
    draw.line(list(zip(xs.tolist(), ys.tolist())), fill=line_ink, width=1)
    return img


def draw_intervals(img: Image.Image, length: int, intervals, color=(220, 60, 60), row: int = 0,
                   rows: int = 1, alpha: float = 0.35) -> Image.Image:
    """EVAL GALLERIES ONLY, never a model input: a copy of ``img`` with ``intervals`` shaded.

    Uses the same x-mapping as render_series. ``row``/``rows`` split the plot height into bands so
    several interval sets (e.g. truth and prediction) can be shown on one picture.
    """
    out = img.convert("RGB").copy()
    overlay = Image.new("RGB", out.size, color)
    mask = Image.new("L", out.size, 0)
    draw = ImageDraw.Draw(mask)
    _, top, _, plot_h = plot_box(out.size[0], out.size[1])
    band = plot_h / max(1, rows)
    y0, y1 = int(top + row * band), int(top + (row + 1) * band) - 1
    for s, e in intervals:
        x0 = int(np.floor(float(x_to_pixel(s, length, out.size[0]))))
        x1 = max(x0, int(np.ceil(float(x_to_pixel(e, length, out.size[0])))) - 1)
        draw.rectangle([x0, y0, x1, y1], fill=int(255 * alpha))
    return Image.composite(overlay, out, mask)


# --------------------------------------------------------------------------------------------- text

def tokenizer_corpus() -> list[str]:
    """Text the tiny model's tokenizer is trained on (timerpo/tiny.py): prompts, answers in every class, one
    ExpCoT of every family (index 0 of seed 0, unrounded) and the GenCoT."""
    from expert_cot import expert_cot  # local import: keeps ``import data_gen`` light

    lines = [build_prompt(length) for length in (400, 1000)]
    lines += [f"{i}" for i in range(0, 1001)]
    for suite, families in (("anomllm", ANOMLLM_FAMILIES), ("tods", TODS_TYPES)):
        for family in families:
            for index in range(1):
                series, intervals = make_series(suite, family, index, seed=0)
                label = FAMILY_LABEL[family] if intervals else "normal"
                lines.append(expert_cot(series, intervals, label))
                lines.append(format_completion("", intervals, label))
    lines += [format_completion("", [], label) for label in LABELS] + [generic_cot()]
    return lines


# --------------------------------------------------------------------------------------------- io

def render_settings(suite: str, length: int | None = None) -> dict:
    """Render settings recorded in manifest.json; ``length`` defaults to the suite's series length."""
    ylim = SUITE_YLIM[suite]
    length = SUITE_LENGTH[suite] if length is None else length
    return {
        "width": DEFAULT_WIDTH, "height": DEFAULT_HEIGHT,
        "visual_tokens": visual_tokens(DEFAULT_WIDTH, DEFAULT_HEIGHT),
        "plot_area": list(plot_box(DEFAULT_WIDTH, DEFAULT_HEIGHT)),
        "steps_per_token_column": round(length * CELL / plot_box(DEFAULT_WIDTH, DEFAULT_HEIGHT)[2], 3),
        "ylim": list(ylim) if ylim is not None else "auto (series min/max ± 8 %)",
        "line_color": list(LINE), "font": "PIL bitmap default", "ground_truth_drawn": False,
    }


def build_sample(suite: str, family: str, index: int, seed: int) -> tuple:
    """(Sample, png bytes) for one index; the expensive per-sample work, run in worker processes."""
    import expert_cot  # local import: keeps ``import data_gen`` light for modules that only load data

    series, intervals = make_series(suite, family, index, seed)
    series = np.round(series, SERIES_DECIMALS) + 0.0  # the stored values; + 0.0 turns -0.0 into 0.0
    label = FAMILY_LABEL[family] if intervals else "normal"
    sid = sample_id(suite, family, index, seed)
    sample = Sample(
        id=sid, family=family, label=label, length=int(series.size), intervals=intervals,
        series=series.tolist(), image=f"images/{sid}.png",
        expcot=expert_cot.expert_cot(series, intervals, label),
        gencot=generic_cot(),
    )
    return sample, png_bytes(render_sample(sample, suite))


def render_sample(sample: Sample, suite: str) -> Image.Image:
    """The stored model-input image of a sample ("P" mode): only its series reaches the renderer."""
    return render_indexed(sample.series, ylim=SUITE_YLIM[suite])


def _work(args):
    """Pool task: build one sample and write its PNG atomically; return its jsonl line."""
    suite, family, index, seed, out_dir = args
    sample, png = build_sample(suite, family, index, seed)
    write_atomic(os.path.join(out_dir, sample.image), png)
    return sample.to_json()


def pool_map(fn, tasks: list, workers: int | None, desc: str, progress: bool) -> list:
    """[fn(t) for t in tasks] in order, with a progress bar, in `workers` spawned processes (None: 2 from 64
    tasks on, where processes start to pay off: spawn start-up ≈ 1 s)."""
    if workers is None:
        workers = 1 if len(tasks) < 64 else min(os.cpu_count() or 1, 2)
    bar = progress_bar(total=len(tasks), desc=desc, unit="series", disable=not progress)
    out = []
    if workers <= 1:
        for task in tasks:
            out.append(fn(task))
            bar.update()
    else:
        with single_thread_blas(), multiprocessing.get_context("spawn").Pool(workers) as pool:
            for result in pool.imap(fn, tasks, chunksize=16):
                out.append(result)
                bar.update()
    bar.close()
    return out


BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def single_thread_blas():
    """Spawned workers inherit the environment at start-up: with one BLAS thread each, two workers use the
    two cores instead of fighting over them (the matrix profile is a BLAS product). Restored afterwards."""
    saved = {k: os.environ.get(k) for k in BLAS_THREAD_VARS}
    os.environ.update({k: "1" for k in BLAS_THREAD_VARS})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def generate(out_dir: str, suite: str, per_family: int, seed: int, families=None, progress: bool = True,
             workers: int | None = None) -> list:
    """Write DIR/samples.jsonl, DIR/images/<id>.png and DIR/manifest.json; return the samples.

    Order: families in the given order, indices 0..per_family-1. Each file is written atomically; the
    output bytes do not depend on ``workers`` (every sample is a pure function of its own arguments).
    """
    if suite not in SUITE_FAMILIES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    families = list(SUITE_FAMILIES[suite] if families is None else families)
    for family in families:
        check_family(suite, family)
    if per_family < 1:
        raise ValueError(f"per_family must be >= 1, got {per_family}")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    tasks = [(suite, f, i, seed, out_dir) for f in families for i in range(per_family)]
    lines = pool_map(_work, tasks, workers, f"{suite} s{seed}", progress)
    write_atomic(os.path.join(out_dir, "samples.jsonl"), ("\n".join(lines) + "\n").encode("utf-8"))
    samples = [Sample(**json.loads(line)) for line in lines]
    write_atomic(os.path.join(out_dir, "manifest.json"), manifest_bytes(suite, seed, per_family, families, samples))
    return samples


def manifest_bytes(suite, seed, per_family, families, samples) -> bytes:
    """Deterministic manifest (no timestamps, sorted keys)."""
    by_label = {label: 0 for label in LABELS}
    by_family = {family: 0 for family in families}
    for s in samples:
        by_label[s.label] += 1
        by_family[s.family] += 1
    import expert_cot  # local import: keeps ``import data_gen`` light

    manifest = {
        "version": DATA_VERSION, "expcot_version": expert_cot.EXPCOT_VERSION, "suite": suite, "seed": seed, "per_family": per_family,
        "families": families, "length": SUITE_LENGTH[suite],
        "counts": {"total": len(samples), "by_family": by_family, "by_label": by_label},
        "render": render_settings(suite), "fields": list(SAMPLE_FIELDS),
        "intervals": "half-open [s, e) integer indices",
    }
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


def check_sample_fields(obj, where: str) -> None:
    """Raise DataError when a decoded jsonl object misses a field or has an invalid value."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [f for f in SAMPLE_FIELDS if f not in obj]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
    if obj["label"] not in LABELS and obj["label"] != UNKNOWN:
        raise DataError(f"{where}: label {obj['label']!r} is not one of {LABELS + (UNKNOWN,)}")
    length = obj["length"]
    if not isinstance(obj["series"], list) or len(obj["series"]) != length:
        raise DataError(f"{where}: series has {len(obj['series'])} values but length is {length}")
    if obj["label"] == UNKNOWN:
        check_unknown_truth(obj, where)
        if obj["intervals"] is None:
            return
    elif obj["intervals"] is None:
        raise DataError(f"{where}: intervals null (no labels) needs label {UNKNOWN!r}, got {obj['label']!r}")
    try:
        if obj["label"] == UNKNOWN:
            check_intervals(obj["intervals"], length)
        else:
            check_truth(obj["intervals"], obj["label"], length)
    except ValueError as err:
        raise DataError(f"{where}: {err}") from None


def check_unknown_truth(obj, where: str) -> None:
    """An unknown class belongs to real anomalies (non-empty intervals) or to a series without labels
    (intervals null); with no anomaly the class is known: 'normal'."""
    if obj["intervals"] is not None and not obj["intervals"]:
        raise DataError(f"{where}: label {UNKNOWN!r} with intervals [] (a window without anomaly is 'normal')")


def load_samples(data_dir: str, limit: int | None = None, families=None) -> list:
    """Samples of a generated data directory, in file order, optionally filtered by family and cut to
    ``limit``. Raises DataError naming file and line for a corrupt line, a missing field or image."""
    path = os.path.join(data_dir, "samples.jsonl")
    if not os.path.isdir(data_dir) or not os.path.isfile(path):
        raise DataError(f"no samples.jsonl in {data_dir!r}; create the data with e.g. "
                        f"`python data_gen.py --out {data_dir} --suite anomllm --per-family 400 --seed 3407`")
    wanted = None if families is None else set(families)
    samples = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: corrupt line, not valid JSON ({exc.msg} at column {exc.colno})") from None
            check_sample_fields(obj, where)
            if wanted is not None and obj["family"] not in wanted:
                continue
            sample = Sample(**{f: obj[f] for f in SAMPLE_FIELDS})
            if not os.path.isfile(os.path.join(data_dir, sample.image)):
                raise DataError(f"{where}: image file {os.path.join(data_dir, sample.image)!r} of sample "
                                f"{sample.id!r} is missing")
            samples.append(sample)
            if limit is not None and len(samples) >= limit:
                break
    return samples


def folder_expcot_version(data_dir: str) -> str:
    """The ExpCoT version a data folder's manifest records; "1" for a folder written before the manifest
    recorded one (or without a readable manifest)."""
    try:
        with open(os.path.join(data_dir, "manifest.json")) as f:
            return str(json.load(f).get("expcot_version", "1"))
    except (OSError, ValueError, AttributeError):
        return "1"


def _expcot_task(args) -> str:
    """Pool task: the ExpCoT of one stored series."""
    import expert_cot  # local import: keeps ``import data_gen`` light

    series, intervals, label = args
    return expert_cot.expert_cot(np.asarray(series, dtype=float), intervals, label)


def with_current_expcot(data_dir: str, samples: list, progress: bool = True, workers: int | None = None) -> list:
    """The samples with the ExpCoT this code writes. A folder whose manifest records an older ExpCoT version
    (expert_cot.EXPCOT_VERSION) would feed the old text to the OT, so its traces are recomputed from the stored
    series, in memory (the folder is not rewritten; regenerating it saves the time), with a warning."""
    import expert_cot  # local import: keeps ``import data_gen`` light

    stored = folder_expcot_version(data_dir)
    if stored == expert_cot.EXPCOT_VERSION:
        return samples
    print(f"[data] {data_dir} holds ExpCoT version {stored}, this code writes version {expert_cot.EXPCOT_VERSION}: "
          f"recomputing the {len(samples)} traces in memory; regenerate the folder (python data_gen.py --out "
          f"{data_dir} ...) to skip this", file=sys.stderr)
    tasks = [(s.series, s.intervals, s.label) for s in samples]
    traces = pool_map(_expcot_task, tasks, workers, "ExpCoT", progress)
    return [dataclasses.replace(s, expcot=t) for s, t in zip(samples, traces)]


# --------------------------------------------------------------------------------------------- cli

# Real series (series_io.py): each file is cut into windows of this many points unless --window says otherwise.
SERIES_WINDOW = SUITE_LENGTH["anomllm"]  # the training length: one pixel column per step
SERIES_MIN_WINDOW = 64  # expert_cot.StagedScan.MIN_LENGTH: the classical detector needs this many points


@dataclass
class WindowFlags:
    """How real series are read and cut into windows (data_gen.py --suite series, eval.py --series)."""

    window: int | None = flag(None, f"points per plot (default {SERIES_WINDOW}, the training length; at least "
                                    f"{SERIES_MIN_WINDOW}); each window is min-max scaled to [-1, 1]")
    stride: int | None = flag(None, "offset between window starts, 1..window (default: window // 2); a last window "
                                    "is added at the end, so every point lies in a window")
    column: str | None = flag(None, "the value column to read when a CSV header names several")
    labels: str | None = flag(None, "NAB-style JSON mapping file names to [[start_timestamp, end_timestamp], ...] "
                                    "windows (both ends inclusive); CSV files with an is_anomaly or label column "
                                    "and .out files carry their own labels")
    skip_bad: bool | None = flag(None, "of several files, use the readable ones and list the refused ones with "
                                       "their reasons (default: one refused file stops everything, before "
                                       "anything is written)")


@dataclass
class DataGenConfig(WindowFlags):
    """Every flag of `python data_gen.py` (--help lists them with their defaults)."""

    out: str = flag(None, "output directory (a new or empty one; see --overwrite)", required=True)
    overwrite: bool = flag(False, "replace an --out that holds other files: the new data is written beside it and "
                                  "renamed into its place once complete")
    suite: str = flag("anomllm", "anomllm: 8 training families (L=1000); tods: 5 TODS-style types incl. shapelet "
                                 "(L=400); series: windows of the real series in --input",
                      choices=SUITES + (SERIES_SUITE,))
    per_family: int = flag(400, "series per family (synthetic suites)")
    seed: int = flag(3407, "data seed (public: train 3407, test 42; synthetic suites)")
    families: str | None = flag(None, "comma-separated subset, e.g. point,freq (default: all of the suite)")
    workers: int | None = flag(None, "worker processes (default: min(2, CPUs); 1 for < 64 samples)")
    no_progress: bool = flag(False, "hide the progress bar")
    input: str | None = flag(None, "--suite series: a file or a folder of files: TimeEval/GutenTAG CSV "
                                   "(timestamp,value[s],is_anomaly), TSB-AD CSV (Data,Label), TSB-UAD .out "
                                   "(value,label, no header), NAB CSV (timestamp,value; labels from --labels), UCR "
                                   "archive .txt (the anomaly in the name) or a one-column CSV (no labels); labelled "
                                   "windows get their ExpCoT, so train.py --data can use the folder (docs/series.md)")


def parse_args(argv=None) -> DataGenConfig:
    """The DataGenConfig of `python data_gen.py <argv>`; a bad flag ends the program with a usage error (exit 2)."""
    import series_io  # local: the synthetic suites do not need the real-series reader

    parser = argparse.ArgumentParser(
        description="Generate synthetic anomaly series, plots and expert reasoning, or import real series "
                    "as plots (samples.jsonl, images/<id>.png, manifest.json).")
    add_flags(parser, DataGenConfig, titles={WindowFlags: "real series (only with --suite series)"})
    args = DataGenConfig(**vars(parser.parse_args(argv)))
    series_io.check_window_flags(parser, args, args.suite == SERIES_SUITE, "--suite series", extra=("input",))
    if args.suite == SERIES_SUITE and args.input is None:
        parser.error("--suite series needs --input FILE_OR_FOLDER")
    return args


def balanced_indices(samples: list, n) -> list[int]:
    """Indices of n samples spread evenly over families (round-robin in file order), in file order.

    Example: families [a, a, a, b] and n = 3 -> [0, 1, 3]. n None -> all.
    """
    if n is None or n >= len(samples):
        return list(range(len(samples)))
    queues: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        queues.setdefault(s.family, []).append(i)
    return sorted(round_robin(list(queues.values()), n))


def round_robin(queues: list[list], n: int) -> list:
    """Up to n items taken from the queues in turn, each queue front first.

    Example: [[a1, a2, a3], [b1]] and n = 3 -> [a1, b1, a2].
    """
    lists = [q[::-1] for q in queues]  # reversed: pop() takes the front
    picked = []
    while len(picked) < n and any(lists):
        for q in lists:
            if q and len(picked) < n:
                picked.append(q.pop())
    return picked


def check_out(out: str, overwrite: bool) -> None:
    """--out must be new or empty, unless --overwrite: other data there would be mixed with the new."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--out {out} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise DataError(f"--out {out} already holds files ({len(os.listdir(out))} entries); pass --overwrite to "
                        f"replace them, or choose a new folder")


@contextlib.contextmanager
def fresh_folder(out: str):
    """A temporary folder beside `out` to write into; renamed to `out` (replacing what was there) when the
    block ends without error, deleted otherwise. Readers of `out` see the old data or the new, never a mix."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_dir(parent, ".tmp-data-")
    try:
        yield tmp
        replace_dir(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def import_series(args) -> int:
    """--suite series: read and check every file first, then write the windows (series_io.py), with the
    ExpCoT of every labelled window so that train.py can use them."""
    import series_io

    try:
        series, skipped = series_io.read_all(args.input, args.column, args.labels, args.window, args.stride,
                                             args.skip_bad)
    except series_io.SeriesError as exc:
        series_io.report_refusals(exc, [], "data_gen")
        return 2
    series_io.report_refusals(None, skipped, "data_gen")
    for s in series:
        for note in s.notes:
            print(f"data_gen: warning: {note}", file=sys.stderr)
    with fresh_folder(args.out) as tmp:
        samples, _ = series_io.write_windows(tmp, series, args.window, args.stride, args.labels,
                                             progress=not args.no_progress, with_expcot=True, skipped=skipped)
    print(f"wrote {len(samples)} windows of {len(series)} series to {args.out}"
          + (f" ({len(skipped)} files skipped, listed in manifest.json)" if skipped else ""))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    families = None if args.families is None else [f.strip() for f in args.families.split(",") if f.strip()]
    try:
        if args.suite != SERIES_SUITE:
            for family in families or []:
                check_family(args.suite, family)  # a bad flag is named before the folder
        check_out(args.out, args.overwrite)
        if args.suite == SERIES_SUITE:
            return import_series(args)
        with fresh_folder(args.out) as tmp:
            samples = generate(tmp, args.suite, args.per_family, args.seed, families=families,
                               progress=not args.no_progress, workers=args.workers)
    except (ValueError, DataError) as exc:
        return usage_error(exc, "data_gen")
    print(f"wrote {len(samples)} samples to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
