"""One answer drawn on its plot, for the README: the input image, the ground truth and the answer's intervals.

    python eval.py --model baseline:expert --data data/test --limit 64 --out runs/eval/expert-64
    python bench/answer_figure.py --eval-dir runs/eval/expert-64 --data data/test --family noisy-point

Reads an eval.py output folder (predictions.jsonl), re-scores the chosen completion with the same parser
and metric code, and draws it as eval.py's gallery does (truth in the upper half of the plot, answer in the
lower half, the first lines of the reasoning below). The pick is the first prediction of `--family` in file
order whose truth and answer both hold an interval, so the figure is reproducible and not hand-chosen.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data_gen  # noqa: E402
import eval as evaluation  # noqa: E402
from timerpo.evaluate import score_prediction  # noqa: E402
from timerpo.files import write_atomic  # noqa: E402


def pick(eval_dir: str, data: str, family: str):
    """The first prediction of `family` with non-empty truth and answer (else the family's first)."""
    samples = {s.id: s for s in data_gen.load_samples(data)}
    with open(os.path.join(eval_dir, "predictions.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    preds = [score_prediction(samples[r["id"]], r["completion"]) for r in rows if r["family"] == family]
    if not preds:
        raise SystemExit(f"no prediction of family {family!r} in {eval_dir}")
    return next((p for p in preds if p.sample.intervals and p.parsed.intervals), preds[0])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--eval-dir", required=True, help="an eval.py --out folder")
    p.add_argument("--data", default="data/test", help="the data folder that eval ran on")
    p.add_argument("--family", default="noisy-point", help="family of the sample to draw")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "answer_example.png"), help="PNG to write")
    args = p.parse_args()
    prediction = pick(args.eval_dir, args.data, args.family)
    suite = evaluation.read_suite(args.data, [prediction.sample])
    tile = evaluation.gallery_tile(prediction, args.data, suite, evaluation.gallery_font())
    write_atomic(args.out, evaluation.png_bytes(tile))
    print(f"{args.out}: {prediction.sample.id}, aff-F1 {prediction.loc.aff_f1:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
