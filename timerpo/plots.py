"""The pictures, drawn with PIL (no matplotlib in the product): training curves for the run folder
(line_chart), eval.py's gallery of answers (draw_gallery: the input plot with truth and prediction as two
shaded bands, and the start of the reasoning) and its whole-series figure (draw_series)."""
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
    """Draw one line per named (xs, ys) series with axes, ticks and a legend; save a PNG at path."""
    font = ImageFont.load_default()
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 16, 36, height - 36
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if math.isfinite(y)]
    draw.text((left, 4), title, fill="black", font=font)
    if not points:
        save_png(img, path)
        return
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1 = x1 if x1 > x0 else x0 + 1
    pad = (y1 - y0) * 0.05 or 0.05
    y0, y1 = y0 - pad, y1 + pad

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    draw.rectangle([left, top, right, bottom], outline="black")
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        _, yp = px(x0, yv)
        draw.line([(left - 4, yp), (left, yp)], fill="black")
        draw.text((4, yp - 6), f"{yv:.3f}", fill="black", font=font)
        xv = x0 + (x1 - x0) * k / 4
        xp, _ = px(xv, y0)
        draw.line([(xp, bottom), (xp, bottom + 4)], fill="black")
        draw.text((xp - 10, bottom + 6), f"{xv:g}", fill="black", font=font)
    draw.text((right - 40, bottom + 20), "step", fill="black", font=font)
    if y_label:
        draw.text((left + 4, top + 2), y_label, fill="gray", font=font)
    for k, (name, (xs, ys)) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        pts = [px(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for p in pts if len(pts) < 40 else []:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
        draw.text((left + 200 * k, 18), f"-- {name}", fill=color, font=font)  # legend above the frame
    save_png(img, path)


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
