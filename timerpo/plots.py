"""Small PIL line charts (no matplotlib in the product): training curves for the run folder."""
from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw, ImageFont

from timerpo.files import write_atomic

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
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())
