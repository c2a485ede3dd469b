"""The README's picture: one test plot with the truth, a model's answer and, below it, another answerer's
(the classical detector's) answer on the same plot.

    python eval.py --model runs/tiny-timerpo-expcot-ot-s0 --data data/test --limit 400 --out runs/eval/tiny-s0
    python eval.py --model baseline:expert --data data/test --limit 400 --out runs/eval/expert-400
    python bench/answer_figure.py --eval-dir runs/eval/tiny-s0 --beside runs/eval/expert-400 \
        --label "tiny model, after 100 TimerPO steps" --beside-label "classical detector (baseline:expert)"

Reads eval.py output folders (predictions.jsonl), re-scores the chosen completions with the same parser and
metric code, and draws each as eval.py's gallery does (timerpo/plots.py): truth in the upper half of the plot,
the answer in the lower half, the first lines of the reasoning below, under a line naming who answered. The
pick is the first prediction of `--family` in the first folder's file order whose truth and answer both hold
an interval, so the figure is reproducible and not hand-chosen; `--beside` draws the same sample's answer
from a second folder. Without `--beside`, one tile.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data_gen  # noqa: E402
import eval as evaluation  # noqa: E402
from timerpo.evaluate import score_prediction  # noqa: E402
from timerpo.files import png_bytes, write_atomic  # noqa: E402
from timerpo.plots import LINE_HEIGHT, TEXT_COLOR, gallery_font, gallery_tile  # noqa: E402


def predictions(eval_dir: str, samples: dict, family: str | None = None) -> list:
    """The scored predictions of an eval.py folder, in file order (of one family when given)."""
    with open(os.path.join(eval_dir, "predictions.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [score_prediction(samples[r["id"]], r["completion"]) for r in rows
            if family is None or r["family"] == family]


def pick(preds: list, family: str, eval_dir: str):
    """The first prediction with non-empty truth and answer (else the first)."""
    if not preds:
        raise SystemExit(f"no prediction of family {family!r} in {eval_dir}")
    return next((p for p in preds if p.sample.intervals and p.parsed.intervals), preds[0])


def labelled(tile: Image.Image, label: str, font) -> Image.Image:
    """The tile under one line of text that names who answered."""
    out = Image.new("RGB", (tile.size[0], tile.size[1] + LINE_HEIGHT + 2), "white")
    ImageDraw.Draw(out).text((4, 1), label, fill=TEXT_COLOR, font=font)
    out.paste(tile, (0, LINE_HEIGHT + 2))
    return out


def stack(tiles: list[Image.Image], gap: int = 10) -> Image.Image:
    """Tiles one below the other, separated by `gap` white pixels."""
    width = max(t.size[0] for t in tiles)
    out = Image.new("RGB", (width, sum(t.size[1] for t in tiles) + gap * (len(tiles) - 1)), "white")
    y = 0
    for t in tiles:
        out.paste(t, (0, y))
        y += t.size[1] + gap
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--eval-dir", required=True, help="an eval.py --out folder: the answer drawn first")
    p.add_argument("--beside", default=None, help="a second eval.py --out folder on the same data: the same "
                                                  "sample's answer, drawn below")
    p.add_argument("--label", default=None, help="who answered in --eval-dir (default: no label line)")
    p.add_argument("--beside-label", default=None, help="who answered in --beside")
    p.add_argument("--data", default="data/test", help="the data folder that eval ran on")
    p.add_argument("--family", default="noisy-point", help="family of the sample to draw")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "answer_example.png"), help="PNG to write")
    args = p.parse_args()
    samples = {s.id: s for s in data_gen.load_samples(args.data)}
    first = pick(predictions(args.eval_dir, samples, args.family), args.family, args.eval_dir)
    chosen = [(first, args.label)]
    if args.beside:
        other = [q for q in predictions(args.beside, samples) if q.sample.id == first.sample.id]
        if not other:
            raise SystemExit(f"{args.beside} has no prediction for {first.sample.id}")
        chosen.append((other[0], args.beside_label))
    suite = evaluation.read_suite(args.data, [first.sample])
    font = gallery_font()
    tiles = [gallery_tile(q, args.data, suite, font) for q, _ in chosen]
    tiles = [labelled(t, label, font) if label else t for t, (_, label) in zip(tiles, chosen)]
    write_atomic(args.out, png_bytes(stack(tiles)))
    scores = ", ".join(f"aff-F1 {q.loc.aff_f1:.2f}" for q, _ in chosen)
    print(f"{args.out}: {first.sample.id}, {scores}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
