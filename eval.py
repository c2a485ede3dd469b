"""Evaluation: the paper's tables for a checkpoint or a baseline on a generated data folder.

    python eval.py --model baseline:empty --data data/test
    python eval.py --model runs/<run>/ckpt-000060/model --data data/test --limit 400
    python eval.py --model qwen2.5-vl-3b --data data/test --temperature 0.4

Reads top to bottom: flags → data → completion texts (a baseline's or a model's) → scoring (the same parser
and metric code as the reward, timerpo/evaluate.py) → tables → files in OUT:
    results.json       summary, the tables as rows and as markdown, the flags
    predictions.jsonl  one line per sample: truth, completion text, parsed answer, reward parts, scores
    gallery.png        ~16 samples: the input plot with truth and prediction as two shaded bands
    tables.md          the printed tables

Baselines write a completion TEXT (format_completion), so they pass through exactly the parser and the
scores that a model's output does:
    empty   `[]` and class normal, for every series;
    full    the whole series [[0, L]] with the most common anomaly class among the evaluated series'
            true labels (a majority-class prior; printed and stored in results.json);
    random  k ~ U{1, 2, 3} windows, each of width w ~ U{5, .., max(5, floor(0.1 L))} and start
            ~ U{0, .., L - w}, class uniform over the five anomaly classes; the generator of a series is
            seeded by (--seed, crc32(series id)), so a series gets the same windows whatever --limit is;
    expert  the classical blind detector expert_cot.detect (no ground truth), its trace as the reasoning.

Tables. anomllm suite: the paper's Table 1 layout (Cls Acc, Frequency, Trend, Range, Point, Avg F1; Avg is
the plain mean of the four groups, all in %) and a per-family table. tods suite: its types are not the
paper's groups (the paper reports no such table), so the headline row has one column per type, shapelet
(never seen in training) included, and Avg over the five types; plus the per-type table. For tods the
summary's `groups` is left empty and `avg_group_f1` null, so no one reads the tods `trend` type as the
paper's Trend column.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import re
import sys
import textwrap
import time
import zlib
from collections import Counter

# Before numpy loads (so only when run as a script): the detector's matrix products are ~1000 x 50, too
# small for threads to pay off, and two multi-threaded BLAS pools in forked workers on 2 cores spin against
# each other (measured: 400 series in 1.9 s serial at 1 BLAS thread, 3.0 s at the default, and the 2-process
# pool slower than serial). torch uses MKL/OpenMP, not OpenBLAS, so model evaluation is unaffected.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import data_gen
from timerpo.checkpoint import latest_checkpoint, write_atomic
from timerpo.evaluate import Prediction, mean, predict, score_prediction, summarize, true_label
from timerpo.metrics import PAPER_GROUPS, group_of, to_events
from timerpo.prompt import ANOMALY_LABELS, format_completion

BASELINES = ("empty", "full", "random", "expert")
# Completion caps: the tiny model was warmed up on short answers (train.py TINY), Qwen writes ~1024 tokens.
DEFAULT_MAX_NEW_TOKENS = {"tiny": 72, "other": 1024}
RANDOM_MAX_WINDOWS = 3
RANDOM_MIN_WIDTH = 5
RANDOM_MAX_WIDTH_FRACTION = 0.1
GALLERY_SAMPLES = 16

HELP = {
    "model": "tiny | qwen2.5-vl-3b | qwen2.5-vl-7b | a hub id | a model folder | a train.py run folder "
             "(its latest checkpoint) | baseline:empty | baseline:full | baseline:random | baseline:expert",
    "data": "generated data folder (python data_gen.py --out DIR ...)",
    "limit": "evaluate N samples, spread evenly over families (default: all)",
    "temperature": "sampling temperature: 0 = greedy; 0.4 = the paper's validation sampling",
    "out": "output folder (default: runs/eval/<model-tag>-<data-folder-name>)",
    "batch_size": "prompts generated together (models only)",
    "max_new_tokens": "completion length cap (default: a run folder's own, 72 for tiny, 1024 otherwise)",
    "seed": "seed of sampling streams (models) and of the random baseline",
    "device": "cpu | cuda (default: cuda when available)",
    "dtype": "weights and compute: bf16 | fp32 (default: bf16 on CUDA, fp32 on CPU)",
    "no_progress": "no progress bars",
    "workers": "processes running the expert detector (baseline:expert only; default: min(2, CPUs))",
}


# ---------------------------------------------------------------------------------------------------
# Flags


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help=HELP["model"])
    p.add_argument("--data", required=True, help=HELP["data"])
    p.add_argument("--limit", type=int, default=None, help=HELP["limit"])
    p.add_argument("--temperature", type=float, default=0.0, help=HELP["temperature"])
    p.add_argument("--out", default=None, help=HELP["out"])
    p.add_argument("--batch-size", type=int, default=16, help=HELP["batch_size"])
    p.add_argument("--max-new-tokens", type=int, default=None, help=HELP["max_new_tokens"])
    p.add_argument("--seed", type=int, default=0, help=HELP["seed"])
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help=HELP["device"])
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16"), help=HELP["dtype"])
    p.add_argument("--no-progress", action="store_true", help=HELP["no_progress"])
    p.add_argument("--workers", type=int, default=None, help=HELP["workers"])
    args = p.parse_args(argv)
    if args.model.startswith("baseline:") and args.model.split(":", 1)[1] not in BASELINES:
        p.error(f"--model {args.model!r}: unknown baseline; choose one of "
                + ", ".join("baseline:" + b for b in BASELINES))
    if args.limit is not None and args.limit <= 0:
        p.error(f"--limit must be positive, got {args.limit}")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        p.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.batch_size <= 0:
        p.error(f"--batch-size must be positive, got {args.batch_size}")
    if args.max_new_tokens is not None and args.max_new_tokens <= 0:
        p.error(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.workers is not None and args.workers <= 0:
        p.error(f"--workers must be positive, got {args.workers}")
    args.workers = args.workers or min(2, os.cpu_count() or 1)
    if args.max_new_tokens is None:
        args.max_new_tokens = run_max_new_tokens(args.model) or \
            DEFAULT_MAX_NEW_TOKENS["tiny" if args.model == "tiny" else "other"]
    args.out = args.out or default_out(args.model, args.data, args.temperature)
    return args


def baseline_name(model: str):
    """'baseline:full' -> 'full'; None for a model."""
    return model.split(":", 1)[1] if model.startswith("baseline:") else None


def model_tag(model: str, temperature: float = 0.0) -> str:
    """A file-name-safe name of what is evaluated.

    Examples: 'baseline:empty' -> 'baseline-empty'; 'runs/tiny-timerpo/ckpt-000060/model' ->
    'tiny-timerpo-ckpt-000060'; 'qwen2.5-vl-3b' at temperature 0.4 -> 'qwen2.5-vl-3b-t0.4'.
    """
    if baseline_name(model):
        tag = model.replace(":", "-")
    else:
        parts = [q for q in os.path.normpath(model).split(os.sep) if q not in ("", ".", "..")]
        if parts and parts[-1] == "model":  # a checkpoint's model folder: name it by run and checkpoint
            parts = parts[:-1]
        tag = "-".join(parts[-2:]) if parts and parts[-1].startswith("ckpt-") else (parts[-1] if parts else "model")
        if temperature > 0:
            tag += f"-t{temperature:g}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", tag)


def default_out(model: str, data: str, temperature: float) -> str:
    data_name = os.path.basename(os.path.normpath(data)) or "data"
    return os.path.join("runs", "eval", f"{model_tag(model, temperature)}-{data_name}")


# ---------------------------------------------------------------------------------------------------
# Data


def read_suite(data_dir: str, samples: list) -> str:
    """'anomllm' or 'tods': the manifest's word, else guessed from the family names."""
    manifest = os.path.join(data_dir, "manifest.json")
    try:
        with open(manifest) as f:
            suite = json.load(f).get("suite")
        if suite in data_gen.SUITES:
            return suite
    except (OSError, ValueError, AttributeError):
        pass  # no or unreadable manifest: fall back to the families
    families = {s.family for s in samples}
    only_tods = families - set(data_gen.ANOMLLM_FAMILIES)
    return "tods" if only_tods and families <= set(data_gen.TODS_TYPES) else "anomllm"


# ---------------------------------------------------------------------------------------------------
# Baselines: each writes a completion text that the ordinary parser reads


def majority_anomaly_label(samples: list) -> str:
    """Most common true anomaly label among the samples (ties: the earlier label in LABELS order).

    Example: labels [seasonal, trend, seasonal, normal] -> 'seasonal'. No anomalous sample -> 'global point'.
    """
    counts = Counter(s.label for s in samples if s.label in ANOMALY_LABELS)
    if not counts:
        return ANOMALY_LABELS[0]
    return max(ANOMALY_LABELS, key=lambda lab: (counts[lab], -ANOMALY_LABELS.index(lab)))


def random_windows(length: int, rng: np.random.Generator) -> list[list[int]]:
    """Random-baseline intervals (module docstring): 1..3 windows of width U{5..max(5, 0.1 L)}, sorted.

    Overlapping windows are merged by the metrics (to_events), as any prediction is.
    """
    max_width = max(RANDOM_MIN_WIDTH, int(RANDOM_MAX_WIDTH_FRACTION * length))
    windows = []
    for _ in range(int(rng.integers(1, RANDOM_MAX_WINDOWS + 1))):
        width = min(length, int(rng.integers(RANDOM_MIN_WIDTH, max_width + 1)))
        start = int(rng.integers(0, length - width + 1))
        windows.append([start, start + width])
    return sorted(windows)


def random_completion(sample, seed: int) -> str:
    # Seeded by the series id, not by its position, so --limit and file order do not change its windows.
    rng = np.random.default_rng([seed, zlib.crc32(sample.id.encode("utf-8"))])
    windows = random_windows(sample.length, rng)
    label = ANOMALY_LABELS[int(rng.integers(0, len(ANOMALY_LABELS)))]
    return format_completion("Baseline: random windows and a random anomaly class.", windows, label)


def expert_completion(sample) -> str:
    import expert_cot  # local: only this baseline needs the detector

    try:
        intervals, label, trace = expert_cot.detect(np.asarray(sample.series, dtype=float))
        return format_completion(trace, [list(iv) for iv in intervals], label)
    except Exception as err:  # a detector bug must name the series it failed on
        raise RuntimeError(f"expert_cot.detect failed on sample {sample.id}: {err}") from err


def expert_texts(samples: list, workers: int, progress: bool = False) -> list[str]:
    """expert_completion for every sample, in sample order, over `workers` processes.

    Why processes: the detector costs ~5 ms per L = 1000 series on one core (mostly its matrix profile),
    and the series are independent, so two processes halve the ~20 s of a 3,200-series split.
    """
    bar = tqdm(total=len(samples), desc="baseline:expert", disable=not progress, dynamic_ncols=True, leave=False)
    texts = []
    if workers <= 1 or len(samples) <= 1:
        for s in samples:
            texts.append(expert_completion(s))
            bar.update()
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for text in pool.imap(expert_completion, samples, chunksize=16):
                texts.append(text)
                bar.update()
    bar.close()
    return texts


def baseline_texts(name: str, samples: list, seed: int, progress: bool = False,
                   workers: int = 1) -> tuple[list[str], dict]:
    """Completion texts of a baseline for the samples, and what it chose (e.g. the full baseline's class)."""
    info = {"baseline": name}
    if name == "full":
        info["full_label"] = majority_anomaly_label(samples)
    if name == "expert":
        return expert_texts(samples, workers, progress), info
    texts = []
    for s in tqdm(samples, desc=f"baseline:{name}", disable=not progress, dynamic_ncols=True, leave=False):
        if name == "empty":
            texts.append(format_completion("Baseline: predict no anomaly.", [], "normal"))
        elif name == "full":
            texts.append(format_completion("Baseline: the whole series is one anomaly.", [[0, s.length]],
                                           info["full_label"]))
        elif name == "random":
            texts.append(random_completion(s, seed))
        else:
            raise ValueError(f"unknown baseline {name!r}; choose one of {BASELINES}")
    return texts, info


# ---------------------------------------------------------------------------------------------------
# Models


def run_max_new_tokens(model: str) -> int | None:
    """The completion cap a train.py run folder was trained with (its run_config.json), else None: a tiny
    run is scored at its 72 tokens, not at the 1,024 meant for Qwen checkpoints."""
    try:
        with open(os.path.join(model, "run_config.json")) as f:
            return int(json.load(f)["max_new_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_model(model: str) -> str:
    """A train.py run folder means its latest checkpoint's model; anything else is passed on as given."""
    ckpt = latest_checkpoint(model) if os.path.isdir(model) else None  # a run folder has a `latest` pointer
    return os.path.join(ckpt, "model") if ckpt is not None else model


def model_predictions(policy, data_dir: str, all_samples: list, indices: list[int], args) -> list[Prediction]:
    """Generate and score one completion per selected sample, encoding images chunk by chunk.

    Why chunks: an encoded 1064 x 140 image is ~3.5 MB of float patches, so encoding thousands at once
    would hold gigabytes. A completion's sampling seed depends on its row in samples.jsonl (Prompt.index)
    and --seed only, so neither the chunking nor --limit changes what a given series gets.
    """
    from train import make_prompt

    preds = []
    bar = tqdm(total=len(indices), desc=f"eval {model_tag(args.model)}", disable=args.no_progress,
               dynamic_ncols=True)
    for start in range(0, len(indices), args.batch_size):
        prompts = [make_prompt(policy, data_dir, all_samples, i, "expcot")
                   for i in indices[start:start + args.batch_size]]
        preds += predict(policy, prompts, args.max_new_tokens, args.temperature, batch_size=args.batch_size,
                         seed=args.seed, progress=False)
        bar.update(len(prompts))
    bar.close()
    return preds


# ---------------------------------------------------------------------------------------------------
# Tables


def pct(x) -> str:
    """A fraction as a percentage with one decimal; '–' when missing. Example: pct(0.5754) == '57.5'."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100.0 * x:.1f}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def family_rows(predictions: list[Prediction], suite: str = "anomllm") -> list[dict]:
    """One row per family (or tods type), in order of first appearance: counts and mean scores."""
    by_family: dict[str, list[Prediction]] = {}
    for p in predictions:
        by_family.setdefault(p.sample.family, []).append(p)
    rows = []
    for family, ps in by_family.items():
        rows.append({
            "family": family, "group": None if suite == "tods" else group_of(family), "n": len(ps),
            "normal_share": mean(not to_events(p.sample.intervals, p.sample.length) for p in ps),
            "cls_acc": mean(p.reward.cls for p in ps),
            "aff_p": mean(p.loc.aff_p for p in ps), "aff_r": mean(p.loc.aff_r for p in ps),
            "aff_f1": mean(p.loc.aff_f1 for p in ps),
            "pw_p": mean(p.loc.pw_p for p in ps), "pw_r": mean(p.loc.pw_r for p in ps),
            "pw_f1": mean(p.loc.pw_f1 for p in ps),
            "reward": mean(p.reward.total for p in ps),
            "unparsable": sum(p.parsed.intervals is None for p in ps),
        })
    return rows


def headline_table(tag: str, suite: str, summary: dict, rows: list[dict]) -> str:
    """anomllm: the paper's Table 1 row; tods: one column per type and Avg over the types (all in %)."""
    if suite == "tods":
        types = [r["family"] for r in rows]
        return markdown_table(["Method", "Cls Acc"] + types + ["Avg F1"],
                              [[tag, pct(summary["cls_acc"])] + [pct(r["aff_f1"]) for r in rows]
                               + [pct(summary["avg_type_f1"])]])
    groups = summary["groups"]
    return markdown_table(["Method", "Cls Acc"] + list(PAPER_GROUPS) + ["Avg F1"],
                          [[tag, pct(summary["cls_acc"])] + [pct(groups.get(g)) for g in PAPER_GROUPS]
                           + [pct(summary["avg_group_f1"])]])


def family_table(rows: list[dict], suite: str) -> str:
    first = "Type" if suite == "tods" else "Family"
    headers = [first] + ([] if suite == "tods" else ["Group"]) + [
        "n", "Normal %", "Cls Acc", "Aff-P", "Aff-R", "Aff-F1", "PW-P", "PW-R", "PW-F1", "Reward", "Unparsable"]
    body = []
    for r in rows:
        body.append([r["family"]] + ([] if suite == "tods" else [r["group"] or "–"]) + [
            r["n"], pct(r["normal_share"]), pct(r["cls_acc"]), pct(r["aff_p"]), pct(r["aff_r"]),
            pct(r["aff_f1"]), pct(r["pw_p"]), pct(r["pw_r"]), pct(r["pw_f1"]), f"{r['reward']:.3f}",
            r["unparsable"]])
    return markdown_table(headers, body)


def build_summary(predictions: list[Prediction], suite: str) -> tuple[dict, list[dict]]:
    """summarize() plus the per-family rows.

    anomllm: summarize's `groups` are the paper's Table 1 columns (PAPER.md section 8), mean affiliation F1
    over the series of each group of families, and `avg_group_f1` their plain, unweighted mean: Frequency
    series scoring 1 and 0 with one Trend series scoring 1 give Frequency 0.5, Trend 1.0, Avg 0.75 (a
    series-weighted mean would say 2/3). tods: no paper groups; `avg_type_f1` is the plain mean over types.
    """
    summary = summarize(predictions)
    rows = family_rows(predictions, suite)
    if suite == "tods":
        summary["groups"], summary["avg_group_f1"] = {}, None
        summary["avg_type_f1"] = mean(r["aff_f1"] for r in rows)
    summary["suite"] = suite
    return summary, rows


# ---------------------------------------------------------------------------------------------------
# Files


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
    """One predictions.jsonl line."""
    s, parsed = p.sample, p.parsed
    return jsonable({
        "id": s.id, "family": s.family, "label": true_label(s), "length": s.length, "gt_intervals": s.intervals,
        "completion": p.text,
        "parsed": {"intervals": parsed.intervals, "label": parsed.label, "has_think": parsed.has_think,
                   "has_answer": parsed.has_answer, "has_class": parsed.has_class, "answer_ok": parsed.answer_ok},
        "unparsable": parsed.intervals is None,
        "reward": vars(p.reward), "loc": vars(p.loc),
    })


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_outputs(out_dir: str, results: dict, predictions: list[Prediction], tables_md: str,
                  gallery: Image.Image) -> None:
    """results.json, predictions.jsonl, tables.md, gallery.png; each written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(os.path.join(out_dir, "results.json"), json.dumps(jsonable(results), indent=1) + "\n")
    write_atomic(os.path.join(out_dir, "predictions.jsonl"),
                 "".join(json.dumps(prediction_record(p), ensure_ascii=False) + "\n" for p in predictions))
    write_atomic(os.path.join(out_dir, "tables.md"), tables_md)
    data_gen.atomic_write(os.path.join(out_dir, "gallery.png"), png_bytes(gallery))


# ---------------------------------------------------------------------------------------------------
# Gallery

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
        queues.append((shows_something + [p for p in ps if p not in shows_something])[::-1])
    picks = []
    while len(picks) < n and any(queues):
        for q in queues:
            if q and len(picks) < n:
                picks.append(q.pop())
    return picks


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


def gallery_tile(p: Prediction, data_dir: str, suite: str, font) -> Image.Image:
    """Header (id, scores, truth, prediction), the plot with truth shaded in the upper half and the
    prediction in the lower half, then the first two lines of the reasoning."""
    plot = load_plot(p, data_dir, suite)
    length = p.sample.length
    plot = data_gen.draw_intervals(plot, length, p.sample.intervals, color=GT_COLOR, row=0, rows=2)
    if p.parsed.intervals:
        plot = data_gen.draw_intervals(plot, length, p.parsed.intervals, color=PRED_COLOR, row=1, rows=2)
    width = plot.size[0]
    chars = max(40, int((width - 8) / average_char_width(font)))
    head = [
        (TEXT_COLOR, clean_text(f"{p.sample.id}   family {p.sample.family}   aff-F1 {p.loc.aff_f1:.2f}   "
                                f"pw-F1 {p.loc.pw_f1:.2f}   class {'right' if p.reward.cls else 'wrong'}", chars)),
        (GT_COLOR, clean_text(f"truth: {true_label(p.sample)}  {intervals_text(p.sample.intervals)}", chars)),
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
    legend = [(GT_COLOR, "ground truth (upper half of the plot)"), (PRED_COLOR, "prediction (lower half)")]
    x = TILE_GAP
    for color, name in legend:
        draw.rectangle([x, 24, x + 22, 34], fill=color)
        draw.text((x + 28, 22), name, fill=TEXT_COLOR, font=font)
        x += 40 + int(draw.textlength(name, font=font))
    if not tiles:
        draw.text((TILE_GAP, header), "(no samples)", fill=TEXT_COLOR, font=font)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        img.paste(tile, (TILE_GAP + c * (tile_w + TILE_GAP), header + r * (tile_h + TILE_GAP)))
    return img


# ---------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    progress = not args.no_progress
    tag = model_tag(args.model, args.temperature)

    # -- data ---------------------------------------------------------------------------------------
    try:
        all_samples = data_gen.load_samples(args.data)
    except data_gen.DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not all_samples:
        print(f"error: {os.path.join(args.data, 'samples.jsonl')} holds no samples", file=sys.stderr)
        return 2
    indices = data_gen.balanced_indices(all_samples, args.limit)
    samples = [all_samples[i] for i in indices]
    suite = read_suite(args.data, samples)

    # -- completions and scores ---------------------------------------------------------------------
    info = {}
    baseline = baseline_name(args.model)
    if baseline:
        texts, info = baseline_texts(baseline, samples, args.seed, progress, args.workers)
        predictions = [score_prediction(s, t) for s, t in zip(samples, texts)]
    else:
        import torch

        from timerpo.policy import ModelNotFound, load_policy
        from timerpo.precision import DTYPES, cast_parameters, default_dtype, enable_tf32

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            policy = load_policy(resolve_model(args.model), device=device, seed=args.seed)
        except ModelNotFound as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        # Evaluation never updates the weights: bf16 means bf16 weights outright (buffers stay fp32), and on CUDA
        # the decode step is compiled, as in train.py's rollouts.
        cast_parameters(policy.model, DTYPES[args.dtype or default_dtype(device)])
        enable_tf32(device)
        policy.compile_decode = device.startswith("cuda")
        predictions = model_predictions(policy, args.data, all_samples, indices, args)

    # -- tables -------------------------------------------------------------------------------------
    summary, rows = build_summary(predictions, suite)
    headline = headline_table(tag, suite, summary, rows)
    per_family = family_table(rows, suite)
    kind = "per-type (tods: shapelet is the type unseen in training)" if suite == "tods" else "per-family"
    notes = [f"{summary['n']} samples from {args.data} ({suite} suite); unparsable completions: "
             f"{summary['unparsable']} (scored 0)."]
    if "full_label" in info:
        notes.append(f"baseline:full predicts [[0, L]] with class '{info['full_label']}' (most common true "
                     f"anomaly class of these samples).")
    tables_md = (f"## {tag} on {os.path.basename(os.path.normpath(args.data))}\n\n{headline}\n\n"
                 f"### {kind}\n\n{per_family}\n\n" + "\n".join(notes) + "\n")
    print(tables_md)

    # -- files --------------------------------------------------------------------------------------
    gallery = draw_gallery(predictions, args.data, suite, f"{tag} on {args.data}: {summary['n']} samples, "
                           f"{summary['unparsable']} unparsable")
    results = {"model": args.model, "tag": tag, "suite": suite, "summary": summary, "families": rows,
               "baseline": info or None, "tables": {"headline": headline, "families": per_family},
               "args": vars(args), "seconds": time.perf_counter() - started}
    write_outputs(args.out, results, predictions, tables_md, gallery)
    print(f"[eval] wrote {args.out}/results.json, predictions.jsonl, tables.md, gallery.png "
          f"({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
