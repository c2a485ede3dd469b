"""The pictures, drawn with PIL (no matplotlib in the product): a run folder's training curves (training_curves:
one line chart per logged quantity), eval.py's gallery of answers (draw_gallery: the input plot with truth and
prediction as two shaded bands, and the start of the reasoning; train.py draws it at every held-out evaluation)
and its whole-series figure (draw_series)."""
from __future__ import annotations

import math
import os
import textwrap

from PIL import Image, ImageDraw, ImageFont

import data_gen
from timerpo.evaluate import Prediction, true_label
from timerpo.files import png_bytes, write_atomic

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f"]


def line_chart(series: dict[str, tuple[list[float], list[float]]], path: str, title: str,
               width: int = 720, height: int = 360, y_label: str = "") -> None:
    """Draw one line per named (steps, values) series with axes, ticks and a legend; save a PNG at path."""
    img = Image.new("RGB", (width, height), "white")
    draw_panel(ImageDraw.Draw(img), (0, 0, width, height), series, title, y_label)
    save_png(img, path)


def round_ticks(lo: float, hi: float, most: int = 6, smallest: float = 0.0) -> list[float]:
    """Ticks in [lo, hi] at the multiples of a round spacing (1, 2 or 5 times a power of ten, at least
    `smallest`), at most `most` of them.

    Example: round_ticks(0, 250) == [0, 50, 100, 150, 200, 250]; round_ticks(-0.03, 1.04) == [0, 0.2, ..., 1].
    """
    span = max(hi - lo, 1e-12)
    first = math.floor(math.log10(max(span / most, smallest)))
    spacing = next(s for s in (m * 10.0 ** e for e in range(first, first + 3) for m in (1, 2, 5))
                   if s >= smallest and span / s < most)
    first_k, last_k = math.ceil(lo / spacing - 1e-9), math.floor(hi / spacing + 1e-9)  # tolerant of float error
    return [round(k * spacing, 12) for k in range(first_k, last_k + 1)]


def step_ticks(x0: float, x1: float, most: int = 6) -> list[int]:
    """Integer ticks for a step axis. Example: step_ticks(1, 3) == [1, 2, 3]."""
    return [int(x) for x in round_ticks(x0, x1, most, smallest=1)]


def draw_panel(draw: ImageDraw.ImageDraw, box: tuple, series: dict, title: str, y_label: str) -> None:
    """One chart in `box` (left, top, right, bottom): title, legend, frame, integer step ticks on x (labelled
    "step"), value ticks on y (labelled `y_label`), one line per series; non-finite values are skipped."""
    font = ImageFont.load_default()
    bx0, by0, bx1, by1 = box
    left, right, top, bottom = bx0 + 62, bx1 - 14, by0 + 50, by1 - 34
    draw.text((bx0 + 8, by0 + 4), title, fill="black", font=font)
    x = bx0 + 8
    for k, name in enumerate(series):  # legend under the title
        color = PALETTE[k % len(PALETTE)]
        draw.text((x, by0 + 20), f"-- {name}", fill=color, font=font)
        x += int(draw.textlength(f"-- {name}", font=font)) + 16
    draw.text((right - int(draw.textlength("step", font=font)), bottom + 18), "step", fill="black", font=font)
    if y_label:
        draw.text((bx0 + 8, by0 + 34), y_label, fill="dimgray", font=font)  # above the value ticks
    draw.rectangle([left, top, right, bottom], outline="black")
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if finite(y)]
    if not points:
        draw.text((left + 8, top + 8), "(nothing logged yet)", fill="gray", font=font)
        return
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    x1 = x1 if x1 > x0 else x0 + 1
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    pad = (y1 - y0) * 0.05 or max(abs(y0) * 0.05, 0.05)
    y0, y1 = y0 - pad, y1 + pad

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    for yv in round_ticks(y0, y1, most=5):
        _, yp = px(x0, yv)
        draw.line([(left - 4, yp), (left, yp)], fill="black")
        text = f"{yv:g}"
        draw.text((left - 6 - draw.textlength(text, font=font), yp - 6), text, fill="black", font=font)
    for xv in step_ticks(x0, x1):
        xp, _ = px(xv, y0)
        draw.line([(xp, bottom), (xp, bottom + 4)], fill="black")
        draw.text((xp - draw.textlength(str(xv), font=font) / 2, bottom + 6), str(xv), fill="black", font=font)
    for k, (xs, ys) in enumerate(series.values()):
        color = PALETTE[k % len(PALETTE)]
        pts = [px(x, y) for x, y in zip(xs, ys) if finite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for p in pts if len(pts) < 40 else []:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)


def finite(y) -> bool:
    """A value that can be drawn (logs hold None for quantities a step did not have, e.g. W under GRPO)."""
    return y is not None and math.isfinite(y)


def panel_grid(panels: list[tuple[str, str, dict]], path: str, title: str, columns: int = 3,
               panel_size: tuple[int, int] = (440, 250)) -> None:
    """Charts side by side under a title, `columns` per row: each panel is (title, y-axis label, series)."""
    w, h = panel_size
    rows = max(1, math.ceil(len(panels) / columns))
    img = Image.new("RGB", (columns * w, 24 + rows * h), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 6), title, fill="black", font=ImageFont.load_default())
    for k, (name, y_label, series) in enumerate(panels):
        r, c = divmod(k, columns)
        draw_panel(draw, (c * w, 24 + r * h, (c + 1) * w, 24 + (r + 1) * h), series, name, y_label)
    save_png(img, path)


def trailing_mean(values: list, k: int = 10) -> list:
    """Mean of each value and the k - 1 before it (None values skipped)."""
    out = []
    for i in range(len(values)):
        window = [v for v in values[max(0, i - k + 1):i + 1] if finite(v)]
        out.append(sum(window) / len(window) if window else None)
    return out


def training_curves(train: list[dict], held: list[dict], path: str, title: str) -> None:
    """A run's curves.png from its metrics.jsonl rows (`train`, one per step) and eval.jsonl rows (`held`)."""
    panel_grid(curve_panels(train, held), path, title)


def curve_panels(train: list[dict], held: list[dict]) -> list[tuple[str, str, dict]]:
    """One panel per quantity a GRPO user watches first, as panel_grid takes them. Rollout rewards of a few
    prompts per step are noisy, so the training reward is drawn as its trailing 10-step mean beside the raw
    value."""
    def column(rows, key):
        return [r["step"] for r in rows], [r.get(key) for r in rows]

    steps = [r["step"] for r in train]
    held_unparsable = ([r["step"] for r in held], [r["unparsable"] / r["n"] if r.get("n") else None for r in held])
    grounding = column(train, "grounding_mean")
    panels = [
        ("outcome reward", "reward", {"train, per step": column(train, "reward"),
                                      "train, 10-step mean": (steps, trailing_mean([r["reward"] for r in train])),
                                      "held-out": column(held, "reward")}),
        ("held-out Avg F1 (paper groups)", "Avg F1", {"held-out": column(held, "avg_group_f1")}),
        ("held-out class accuracy", "Cls Acc", {"held-out": column(held, "cls_acc")}),
        ("held-out localization gain (Avg F1 over the class window's)", "gain", {"held-out": column(held, "loc_gain")}),
        ("loss", "loss", {"train": column(train, "loss")}),
        ("KL to the reference (k3)", "KL", {"train": column(train, "kl")}),
        ("entropy of the completions", "nats per token", {"train": column(train, "entropy")}),
        ("completion length", "tokens", {"mean": column(train, "completion_len")}),
        ("unparsable answers", "share", {"train": column(train, "unparsable_frac"), "held-out": held_unparsable}),
        ("groups with zero reward spread", "share", {"train": column(train, "zero_std_frac")}),
        ("gradient norm before clipping", "norm", {"train": column(train, "grad_norm")}),
        ("advantage terms (mean |.| over completions)", "|A|", advantage_terms(train)),
    ]
    if any(finite(v) for v in grounding[1]):  # TimerPO; GRPO computes no grounding
        panels.append(("grounding W (OT cost; cosine with --grounding cosine)", "W", {"mean": grounding}))
    return panels


def advantage_terms(train: list[dict]) -> dict:
    """The sizes of the two terms of A = Â_main + α·Â⊥_TsR (the second before α; absent under GRPO): how much
    the grounded term weighs beside the outcome's. A clip-fraction panel would be flat at 0: with one update
    per rollout the ratio is 1."""
    steps = [r["step"] for r in train]
    terms = {"A_main": (steps, [r.get("adv_main_absmean") for r in train])}
    perp = [r.get("adv_tsr_perp_absmean") for r in train]
    if any(finite(v) for v in perp):
        terms["A_TsR projected"] = (steps, perp)
    return terms


def save_png(img: Image.Image, path: str) -> None:
    """Write img as a PNG atomically (a viewer refreshing curves.png mid-run never reads half a file)."""
    write_atomic(path, png_bytes(img))


# ---------------------------------------------------------------------------------------------------
# eval.py's gallery and whole-series figure

GALLERY_SAMPLES = 16
GT_COLOR = (30, 150, 60)
PRED_COLOR = (230, 110, 0)
TEXT_COLOR = (20, 20, 20)
NOTE_COLOR = (110, 110, 110)
LINE_HEIGHT = 13
TILE_GAP = 14


def gallery_picks(predictions: list[Prediction], n: int = GALLERY_SAMPLES) -> list[Prediction]:
    """About n predictions, round-robin over families; within a family, series where truth or prediction
    is non-empty come first (empty-vs-empty tiles show nothing), then file order."""
    by_family: dict[str, list[Prediction]] = {}
    for p in predictions:
        by_family.setdefault(p.sample.family, []).append(p)
    queues = []
    for ps in by_family.values():
        shows_something = [p for p in ps if p.sample.intervals or p.parsed.intervals]
        queues.append(shows_something + [p for p in ps if p not in shows_something])
    return data_gen.round_robin(queues, n)


def clean_text(text: str, width: int) -> str:
    """One printable line of at most `width` characters (model output can hold anything)."""
    text = "".join(c if c.isprintable() else " " for c in " ".join(str(text).split()))
    return text if len(text) <= width else text[:width - 1] + "…"


def reasoning_lines(p: Prediction, n: int = 2, width: int = 160) -> list[str]:
    """The first n wrapped lines of the reasoning (the think block, else the raw completion)."""
    text = p.parsed.think if p.parsed.think is not None else p.text
    text = " ".join(str(text).split())
    if not text:
        return ["(no reasoning)"]
    wrapped = textwrap.wrap(text, width=width)[:n]
    if len(textwrap.wrap(text, width=width)) > n:
        wrapped[-1] = wrapped[-1][:width - 1] + "…"
    return [clean_text(line, width) for line in wrapped]


def intervals_text(intervals, limit: int = 8) -> str:
    """'[[3, 9], [20, 31]]', cut after `limit` intervals."""
    if intervals is None:
        return "unparsable"
    items = [f"[{s}, {e}]" for s, e in intervals[:limit]]
    more = f", … +{len(intervals) - limit}" if len(intervals) > limit else ""
    return "[" + ", ".join(items) + more + "]"


def load_plot(p: Prediction, data_dir: str, suite: str) -> Image.Image:
    """The model's input image from disk; re-rendered from the series when the file cannot be read."""
    try:
        with Image.open(os.path.join(data_dir, p.sample.image)) as img:
            return img.convert("RGB")
    except (OSError, ValueError):
        return data_gen.render_series(p.sample.series, ylim=data_gen.SUITE_YLIM.get(suite))


def score_text(x: float) -> str:
    """'0.57', or '–' for an unscored (NaN) value."""
    return "–" if math.isnan(x) else f"{x:.2f}"


def class_verdict(cls: float) -> str:
    """'right', 'wrong', or 'not scored' when the true class is unknown (NaN)."""
    return "not scored" if math.isnan(cls) else ("right" if cls else "wrong")


def gallery_tile(p: Prediction, data_dir: str, suite: str, font) -> Image.Image:
    """Header (id, scores, truth, prediction), the plot with truth shaded in the upper half and the
    prediction in the lower half, then the first two lines of the reasoning."""
    plot = load_plot(p, data_dir, suite)
    length = p.sample.length
    plot = data_gen.draw_intervals(plot, length, p.sample.intervals or [], color=GT_COLOR, row=0, rows=2)
    if p.parsed.intervals:
        plot = data_gen.draw_intervals(plot, length, p.parsed.intervals, color=PRED_COLOR, row=1, rows=2)
    width = plot.size[0]
    chars = max(40, int((width - 8) / average_char_width(font)))
    head = [
        (TEXT_COLOR, clean_text(f"{p.sample.id}   family {p.sample.family}   aff-F1 {score_text(p.loc.aff_f1)}   "
                                f"pw-F1 {score_text(p.loc.pw_f1)}   class {class_verdict(p.reward.cls)}", chars)),
        (GT_COLOR, clean_text(f"truth: {true_label(p.sample)}  " + (
            "unlabelled" if p.sample.intervals is None else intervals_text(p.sample.intervals)), chars)),
        (PRED_COLOR, clean_text(f"pred:  {p.parsed.label or '(no class)'}  {intervals_text(p.parsed.intervals)}",
                                chars)),
    ]
    notes = [(NOTE_COLOR, line) for line in reasoning_lines(p, width=chars)]
    tile = Image.new("RGB", (width, plot.size[1] + LINE_HEIGHT * (len(head) + 2) + 4), "white")
    draw = ImageDraw.Draw(tile)
    for k, (color, line) in enumerate(head):
        draw.text((4, k * LINE_HEIGHT), line, fill=color, font=font)
    tile.paste(plot, (0, len(head) * LINE_HEIGHT + 2))
    y = len(head) * LINE_HEIGHT + plot.size[1] + 4
    for k, (color, line) in enumerate(notes):
        draw.text((4, y + k * LINE_HEIGHT), line, fill=color, font=font)
    return tile


def gallery_font(size: int = 11):
    """DejaVu Sans when the system has it (it has σ, Greek and box glyphs that traces use), else Pillow's own."""
    for name in ("DejaVuSans.ttf", "DejaVuSansCondensed.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def average_char_width(font) -> float:
    """Mean advance of ordinary text characters in pixels: how many characters fit a tile line."""
    sample = "abcdefghijklmnopqrstuvwxyz ABCDEFG 0123456789 [], =.:"
    return max(1.0, font.getlength(sample) / len(sample))


def draw_legend(draw, y: int, items: list, font) -> None:
    """Colour swatches with their names in one row at height y."""
    x = TILE_GAP
    for color, name in items:
        draw.rectangle([x, y + 2, x + 22, y + 12], fill=color)
        draw.text((x + 28, y), name, fill=TEXT_COLOR, font=font)
        x += 40 + int(draw.textlength(name, font=font))


def draw_gallery(predictions: list[Prediction], data_dir: str, suite: str, title: str,
                 columns: int = 2) -> Image.Image:
    """A grid of gallery tiles under a title and a colour legend."""
    font = gallery_font()
    tiles = [gallery_tile(p, data_dir, suite, font) for p in gallery_picks(predictions)]
    tile_w = max((t.size[0] for t in tiles), default=400)
    tile_h = max((t.size[1] for t in tiles), default=100)
    rows = max(1, math.ceil(len(tiles) / columns))
    header = 40
    img = Image.new("RGB", (columns * tile_w + (columns + 1) * TILE_GAP, header + rows * (tile_h + TILE_GAP)),
                    "white")
    draw = ImageDraw.Draw(img)
    draw.text((TILE_GAP, 6), clean_text(title, 300), fill=TEXT_COLOR, font=font)
    draw_legend(draw, 22, [(GT_COLOR, "ground truth (upper half of the plot)"),
                           (PRED_COLOR, "prediction (lower half)")], font)
    if not tiles:
        draw.text((TILE_GAP, header), "(no samples)", fill=TEXT_COLOR, font=font)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        img.paste(tile, (TILE_GAP + c * (tile_w + TILE_GAP), header + r * (tile_h + TILE_GAP)))
    return img


SERIES_FIG_WIDTH, SERIES_FIG_HEIGHT = 2016, 196  # the renderer wants multiples of 28 px


def draw_series(series, scaled, ylim, merged, title: str) -> Image.Image:
    """A whole real series (a RealSeries of series_io.py; `scaled`: its values scaled to [-1, 1] like its
    windows, drawn within `ylim`) with the true spans in the upper half of the plot and the predicted spans
    `merged` in the lower half (the full height without labels), under a title (which carries the
    whole-series scores) and a legend."""
    font = gallery_font()
    length = series.length
    plot = data_gen.render_series(scaled, SERIES_FIG_WIDTH, SERIES_FIG_HEIGHT, ylim=ylim)
    bands = 1 if series.intervals is None else 2
    if series.intervals is not None:
        plot = data_gen.draw_intervals(plot, length, series.intervals, color=GT_COLOR, row=0, rows=2)
    plot = data_gen.draw_intervals(plot, length, merged, color=PRED_COLOR, row=bands - 1, rows=bands)
    legend = [(PRED_COLOR, "prediction" + (" (lower half)" if bands == 2 else ""))]
    if bands == 2:
        legend.insert(0, (GT_COLOR, "ground truth (upper half)"))
    lines = [title, f"values {series.values.min():.6g} .. {series.values.max():.6g}, drawn min-max scaled to "
                    f"[-1, 1]; x: index on the whole series"]
    header = LINE_HEIGHT * len(lines) + 24
    img = Image.new("RGB", (plot.size[0], header + plot.size[1]), "white")
    draw = ImageDraw.Draw(img)
    for k, line in enumerate(lines):
        draw.text((TILE_GAP, 4 + k * LINE_HEIGHT), clean_text(line, 300), fill=TEXT_COLOR, font=font)
    draw_legend(draw, 6 + len(lines) * LINE_HEIGHT, legend, font)
    img.paste(plot, (0, header))
    return img
