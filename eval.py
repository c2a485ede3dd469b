"""Evaluation of a checkpoint or a baseline: the paper's tables on a data folder, or one whole real series.

    python eval.py --model baseline:empty --data data/test
    python eval.py --model runs/<run>/ckpt-000060/model --data data/test --limit 400
    python eval.py --model qwen2.5-vl-3b --data data/test --temperature 0.4
    python eval.py --model baseline:expert --series nyc_taxi.csv --labels NAB/labels.json

Reads top to bottom: flags → data → completion texts (a baseline's or a model's) → scoring (the same parser
and metric code as the reward, timerpo/evaluate.py) → tables → files in OUT:
    results.json       summary, the tables as rows and as markdown, the flags
    predictions.jsonl  one line per sample: truth, completion text, parsed answer, reward parts, scores
    gallery.png        ~16 samples: the input plot with truth and prediction as two shaded bands (timerpo/plots.py)
    tables.md          the printed tables

Baselines write a completion TEXT (format_completion), so they pass through exactly the parser and the
scores that a model's output does:
    empty   `[]` and class normal, for every series;
    full    the whole series [[0, L]] with the most common anomaly class among the evaluated series'
            true labels (a majority-class prior; printed and stored in results.json);
    random  k ~ U{1, 2, 3} windows, each of width w ~ U{5, .., max(5, floor(0.1 L))} and start
            ~ U{0, .., L - w}, class uniform over the five anomaly classes; the generator of a series is
            seeded by (--seed, crc32(series id)), so a series gets the same windows whatever --limit is;
    expert  the classical blind detector baselines.detect (no ground truth), its trace as the reasoning;
and two oracles that read the truth but never a position, to show what Avg F1 pays for presence and class:
    presence-oracle  the whole series [[0, L]] with the true class when the series holds an anomaly, [] and
            normal otherwise;
    class-oracle     the true class with its fixed window (timerpo/evaluate.py CLASS_WINDOWS, fitted on the
            training split by baselines.fit_class_windows), [] and normal for a normal series.

Tables. anomllm suite: the paper's Table 1 layout (Cls Acc, Frequency, Trend, Range, Point, Avg F1; Avg is
the plain mean of the four groups, all in %) with two localization figures beside it (timerpo/evaluate.py):
Loc gain, Avg F1 minus that of the same answers with the class oracle's window for the class answered, and
PW-F1 over the anomalous series; then a per-family table. tods suite: its types are not the
paper's groups (the paper reports no such table), so the headline row has one column per type, shapelet
(never seen in training) included, and Avg over the five types; plus the per-type table. For tods the
summary's `groups` is left empty and `avg_group_f1` null, so no one reads the tods `trend` type as the
paper's Trend column.

Whole series (--series FILE, reading and windowing in series_io.py): the series is cut into windows (written
to OUT/windows like `data_gen.py --suite series` would), every window is answered as above, and the windows'
intervals are shifted back by their offsets and united on the series' own index. OUT also gets
    intervals.json     the merged intervals (and their timestamps when the file has any), the truth, the
                       whole-series scores and every window's own answer
    series.png         the whole series with the predicted spans, and the true spans when labelled (timerpo/plots.py)
With labels, the merged answer is scored on the full timeline (affiliation P/R/F1 and point-wise P/R/F1,
timerpo/metrics.py), printed beside the trivial baselines (empty, full, random) run through the same windows
and merge, and beside the per-window tables. Real anomalies have no known class, so Cls Acc there counts
only the windows without anomaly (true class normal).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import sys
import time
import zlib
from collections import Counter

# Before numpy loads (so only when run as a script): the detector's matrix products are ~1000 x 50, too
# small for threads to pay off, and two multi-threaded BLAS pools in forked workers on 2 cores spin against
# each other (measured: 400 series in 1.9 s serial at 1 BLAS thread, 3.0 s at the default, and the 2-process
# pool slower than serial). torch uses MKL/OpenMP, not OpenBLAS, so model evaluation is unaffected.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image
from tqdm import tqdm

import data_gen
import series_io
from timerpo.algorithm import make_prompt
from timerpo.checkpoint import checkpoint_weights, latest_checkpoint
from timerpo.evaluate import (ANY_ANOMALY, Prediction, class_window, mean, predict, score_prediction, summarize,
                               true_label)
from timerpo.files import png_bytes, write_atomic
from timerpo.metrics import PAPER_GROUPS, group_of, localization_scores, to_events
from timerpo.plots import draw_gallery, draw_series, intervals_text
from timerpo.policy import ModelNotFound
from timerpo.prompt import ANOMALY_LABELS, format_completion

BASELINES = ("empty", "full", "random", "expert", "presence-oracle", "class-oracle")
# Completion caps: the tiny model was warmed up on short answers (train.py TINY), Qwen writes ~1024 tokens.
DEFAULT_MAX_NEW_TOKENS = {"tiny": 72, "other": 1024}
RANDOM_MAX_WINDOWS = 3
RANDOM_MIN_WIDTH = 5
RANDOM_MAX_WIDTH_FRACTION = 0.1

HELP = {
    "model": "tiny | qwen2.5-vl-3b | qwen2.5-vl-7b | a hub id | a model folder | a train.py run folder "
             "(its latest checkpoint) | baseline:empty | baseline:full | baseline:random | baseline:expert | "
             "baseline:presence-oracle | baseline:class-oracle (these two read the truth)",
    "data": "generated data folder (python data_gen.py --out DIR ...)",
    "series": "one real series file (TimeEval/GutenTAG or NAB CSV, TSB-UAD .out, one-column CSV): detect on "
              "every window, merge the intervals onto the whole series, score it as a whole when labelled",
    "limit": "evaluate N samples, spread evenly over families (default: all)",
    "temperature": "sampling temperature: 0 = greedy; 0.4 = the paper's validation sampling",
    "out": "output folder (default: runs/eval/<model-tag>-<data-folder-name or series-file-name>)",
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
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help=HELP["data"])
    source.add_argument("--series", help=HELP["series"])
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
    series_io.add_window_flags(p, "--series")
    args = p.parse_args(argv)
    series_io.check_window_flags(p, args, args.series is not None, "--series")
    if args.series is not None and args.limit is not None:
        p.error("--limit does not apply to --series: every window is evaluated to cover the whole series")
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
    args.out = args.out or default_out(args.model, args.data or series_io.series_name(args.series),
                                       args.temperature)
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
    """'anomllm', 'tods' or 'series': the manifest's word, else guessed from the family names."""
    manifest = os.path.join(data_dir, "manifest.json")
    try:
        with open(manifest) as f:
            suite = json.load(f).get("suite")
        if suite in data_gen.SUITES + (data_gen.SERIES_SUITE,):
            return suite
    except (OSError, ValueError, AttributeError):
        pass  # no or unreadable manifest: fall back to the families
    if any(s.label == data_gen.UNKNOWN for s in samples):
        return data_gen.SERIES_SUITE
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


def oracle_class(sample) -> str:
    """The class an oracle answers: the true one; for a real anomaly of unknown class any anomaly label
    (its class is not scored)."""
    label = true_label(sample)
    return ANOMALY_LABELS[0] if label == data_gen.UNKNOWN else label


def presence_oracle_completion(sample) -> str:
    """The whole series with the true class when the truth holds an anomaly, else [] and normal."""
    if true_label(sample) == "normal" or sample.intervals is None:
        return format_completion("Oracle: the truth's presence and class, no position.", [], "normal")
    return format_completion("Oracle: the truth's presence and class, no position.", [[0, sample.length]],
                             oracle_class(sample))


def class_oracle_completion(sample) -> str:
    """The true class with its fixed window (class_window); [] and normal for a normal series. A real anomaly
    of unknown class takes the window fitted on every anomalous training series."""
    label = true_label(sample)
    if label == "normal" or sample.intervals is None:
        return format_completion("Oracle: the true class and its fixed window.", [], "normal")
    window = class_window(ANY_ANOMALY if label == data_gen.UNKNOWN else label, sample.length)
    return format_completion("Oracle: the true class and its fixed window.", window, oracle_class(sample))


def expert_completion(sample) -> str:
    import baselines  # local: only this baseline needs the detector

    try:
        intervals, label, trace = baselines.detect(np.asarray(sample.series, dtype=float))
        return format_completion(trace, [list(iv) for iv in intervals], label)
    except Exception as err:  # a detector bug must name the series it failed on
        raise RuntimeError(f"baselines.detect failed on sample {sample.id}: {err}") from err


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
        elif name == "presence-oracle":
            texts.append(presence_oracle_completion(s))
        elif name == "class-oracle":
            texts.append(class_oracle_completion(s))
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
    """A train.py run folder means its latest checkpoint's model (a LoRA run's: its adapters, which
    load_policy merges into their base); anything else is passed on as given."""
    ckpt = latest_checkpoint(model) if os.path.isdir(model) else None  # a run folder has a `latest` pointer
    return checkpoint_weights(ckpt) if ckpt is not None else model


def model_predictions(policy, data_dir: str, all_samples: list, indices: list[int], args) -> list[Prediction]:
    """Generate and score one completion per selected sample, encoding images chunk by chunk.

    Why chunks: an encoded 1064 x 140 image is ~3.5 MB of float patches, so encoding thousands at once
    would hold gigabytes. A completion's sampling seed depends on its row in samples.jsonl (Prompt.index)
    and --seed only, so neither the chunking nor --limit changes what a given series gets.
    """
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


def normal_share(p: Prediction) -> float:
    """1 when the truth has no anomaly, 0 when it has, NaN without labels."""
    if p.sample.intervals is None:
        return math.nan
    return float(not to_events(p.sample.intervals, p.sample.length))


def family_rows(predictions: list[Prediction], suite: str = "anomllm") -> list[dict]:
    """One row per family (tods type, or source file of a series folder), in order of first appearance:
    counts and mean scores (unscored NaN entries skipped, timerpo/evaluate.py)."""
    by_family: dict[str, list[Prediction]] = {}
    for p in predictions:
        by_family.setdefault(p.sample.family, []).append(p)
    rows = []
    for family, ps in by_family.items():
        rows.append({
            "family": family, "group": group_of(family) if suite == "anomllm" else None, "n": len(ps),
            "normal_share": mean(normal_share(p) for p in ps),
            "cls_acc": mean(p.reward.cls for p in ps),
            "aff_p": mean(p.loc.aff_p for p in ps), "aff_r": mean(p.loc.aff_r for p in ps),
            "aff_f1": mean(p.loc.aff_f1 for p in ps),
            "pw_p": mean(p.loc.pw_p for p in ps), "pw_r": mean(p.loc.pw_r for p in ps),
            "pw_f1": mean(p.loc.pw_f1 for p in ps),
            "reward": mean(p.reward.total for p in ps),
            "unparsable": sum(p.parsed.intervals is None for p in ps),
        })
    return rows


def signed_pct(x) -> str:
    """A signed difference of fractions in points: signed_pct(0.0123) == '+1.2'; '–' when missing."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100.0 * x:+.1f}"


LOCALIZATION_HEADERS = ["Loc gain", "PW-F1 anom."]


def localization_cells(summary: dict) -> list[str]:
    """The headline's localization figures (timerpo/evaluate.py): gain over the class windows, PW-F1 on the
    anomalous series."""
    return [signed_pct(summary["loc_gain"]), pct(summary["pw_f1_anomalous"])]


def headline_table(tag: str, suite: str, summary: dict, rows: list[dict]) -> str:
    """anomllm: the paper's Table 1 row; tods: one column per type and Avg over the types; series: mean
    per-window scores with the number of windows that could be scored (all in %). Each ends with the
    localization figures."""
    if suite == data_gen.SERIES_SUITE:
        return markdown_table(
            ["Method", "Windows", "Labelled", "Known class", "Cls Acc", "Aff-F1", "PW-F1"] + LOCALIZATION_HEADERS
            + ["Unparsable"],
            [[tag, summary["n"], summary["n_labelled"], summary["n_known_class"], pct(summary["cls_acc"]),
              pct(summary["aff_f1"]), pct(summary["pw_f1"])] + localization_cells(summary) + [summary["unparsable"]]])
    if suite == "tods":
        types = [r["family"] for r in rows]
        return markdown_table(["Method", "Cls Acc"] + types + ["Avg F1"] + LOCALIZATION_HEADERS,
                              [[tag, pct(summary["cls_acc"])] + [pct(r["aff_f1"]) for r in rows]
                               + [pct(summary["avg_type_f1"])] + localization_cells(summary)])
    groups = summary["groups"]
    return markdown_table(["Method", "Cls Acc"] + list(PAPER_GROUPS) + ["Avg F1"] + LOCALIZATION_HEADERS,
                          [[tag, pct(summary["cls_acc"])] + [pct(groups.get(g)) for g in PAPER_GROUPS]
                           + [pct(summary["avg_group_f1"])] + localization_cells(summary)])


def family_table(rows: list[dict], suite: str) -> str:
    """Per-family table (anomllm, with the paper group), per-type (tods) or per-source file (series)."""
    first = {"tods": "Type", data_gen.SERIES_SUITE: "Source"}.get(suite, "Family")
    grouped = suite == "anomllm"
    headers = [first] + (["Group"] if grouped else []) + [
        "n", "Normal %", "Cls Acc", "Aff-P", "Aff-R", "Aff-F1", "PW-P", "PW-R", "PW-F1", "Reward", "Unparsable"]
    body = []
    for r in rows:
        body.append([r["family"]] + ([r["group"] or "–"] if grouped else []) + [
            r["n"], pct(r["normal_share"]), pct(r["cls_acc"]), pct(r["aff_p"]), pct(r["aff_r"]),
            pct(r["aff_f1"]), pct(r["pw_p"]), pct(r["pw_r"]), pct(r["pw_f1"]),
            "–" if math.isnan(r["reward"]) else f"{r['reward']:.3f}", r["unparsable"]])
    return markdown_table(headers, body)


def build_summary(predictions: list[Prediction], suite: str) -> tuple[dict, list[dict]]:
    """summarize() plus the per-family rows.

    anomllm: summarize's `groups` are the paper's Table 1 columns (method.md §22), mean affiliation F1
    over the series of each group of families, and `avg_group_f1` their plain, unweighted mean: Frequency
    series scoring 1 and 0 with one Trend series scoring 1 give Frequency 0.5, Trend 1.0, Avg 0.75 (a
    series-weighted mean would say 2/3). tods: no paper groups; `avg_type_f1` is the plain mean over types.
    """
    summary = summarize(predictions, suite)
    rows = family_rows(predictions, suite)
    if suite == data_gen.SERIES_SUITE:  # real series: no paper groups, and a file is not an anomaly type
        summary["groups"], summary["avg_group_f1"] = {}, None
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


def write_outputs(out_dir: str, results: dict, predictions: list[Prediction], tables_md: str,
                  gallery: Image.Image) -> None:
    """results.json, predictions.jsonl, tables.md, gallery.png; each written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(os.path.join(out_dir, "results.json"), json.dumps(jsonable(results), indent=1) + "\n")
    write_atomic(os.path.join(out_dir, "predictions.jsonl"),
                 "".join(json.dumps(prediction_record(p), ensure_ascii=False) + "\n" for p in predictions))
    write_atomic(os.path.join(out_dir, "tables.md"), tables_md)
    write_atomic(os.path.join(out_dir, "gallery.png"), png_bytes(gallery))


# ---------------------------------------------------------------------------------------------------
# Whole series (--series)

TRIVIAL_BASELINES = ("empty", "full", "random")
MERGE_RULE = "union of the windows' intervals shifted by their offsets (series_io.merge_windows)"


def merge_predictions(predictions: list[Prediction], offsets: list[int], length: int) -> list[list[int]]:
    """The windows' answered intervals united on the series' index; an unparsable answer adds none."""
    return series_io.merge_windows([(o, p.parsed.intervals or []) for o, p in zip(offsets, predictions)], length)


def interval_classes(merged, predictions: list[Prediction], offsets: list[int]) -> list[list[str]]:
    """For each merged interval, the classes answered by the windows that contributed to it (window order)."""
    out = []
    for s, e in merged:
        classes = []
        for o, p in zip(offsets, predictions):
            inside = any(s <= o + a < e for a, _ in p.parsed.intervals or [])
            if inside and p.parsed.label and p.parsed.label not in classes:
                classes.append(p.parsed.label)
        out.append(classes)
    return out


def series_row(method: str, merged, truth, length: int) -> dict:
    """One whole-series result: the merged intervals and, with labels, their scores on the full timeline."""
    scores = None if truth is None else vars(localization_scores(merged, truth, length))
    return {"method": method, "intervals": merged, "scores": scores}


def trivial_rows(samples: list, offsets: list[int], series, seed: int, skip: str | None) -> list[dict]:
    """Whole-series rows of the trivial baselines, run through the same windows and merge as the model."""
    rows = []
    for name in TRIVIAL_BASELINES:
        if name == skip:
            continue
        texts, _ = baseline_texts(name, samples, seed)
        merged = merge_predictions([score_prediction(s, t) for s, t in zip(samples, texts)], offsets, series.length)
        rows.append(series_row(f"baseline-{name}", merged, series.intervals, series.length))
    return rows


def series_table(rows: list[dict]) -> str:
    """Whole-series scores of each method (in %), the first row being the evaluated one."""
    body = []
    for r in rows:
        sc = r["scores"] or {}
        body.append([r["method"]] + [pct(sc.get(k)) for k in ("aff_p", "aff_r", "aff_f1", "pw_p", "pw_r", "pw_f1")]
                    + [len(r["intervals"]), intervals_text(r["intervals"], limit=4)])
    return markdown_table(["Method", "Aff-P", "Aff-R", "Aff-F1", "PW-P", "PW-R", "PW-F1", "n", "Intervals"], body)


def series_heading(series, window: int, stride: int, n_windows: int) -> str:
    """One line naming the series, its windows and its truth."""
    truth = "unlabelled" if series.intervals is None else f"true anomalies {intervals_text(series.intervals)}"
    return (f"{series.name}: {series.length} points, {n_windows} windows of {window} (stride {stride}), "
            f"{truth}")


def intervals_record(args, series, tag: str, rows: list[dict], predictions: list[Prediction],
                     offsets: list[int]) -> dict:
    """intervals.json: the merged answer on the series' index (and timestamps), truth, scores, windows."""
    merged = rows[0]["intervals"]
    return {
        "source": series.path, "name": series.name, "format": series.fmt, "column": series.column,
        "length": series.length, "window": args.window, "stride": args.stride, "model": args.model, "tag": tag,
        "merge": MERGE_RULE, "intervals": merged,
        "timestamps": series_io.timestamp_spans(merged, series.timestamps),
        "classes": interval_classes(merged, predictions, offsets),
        "truth": series.intervals,
        "truth_timestamps": (None if series.intervals is None
                             else series_io.timestamp_spans(series.intervals, series.timestamps)),
        "scores": rows[0]["scores"], "baselines": {r["method"]: r["scores"] for r in rows[1:]},
        "windows": [{"id": p.sample.id, "offset": o, "intervals": p.parsed.intervals, "class": p.parsed.label,
                     "unparsable": p.parsed.intervals is None} for o, p in zip(offsets, predictions)],
    }


def read_one_series(args):
    """The --series file, read and checked (its windows too); SeriesError for anything unusable."""
    if os.path.isdir(args.series):
        raise series_io.SeriesError(f"{args.series}: --series takes one file; import a folder with "
                                    f"`python data_gen.py --suite series --input {args.series} --out DIR`")
    series = series_io.read_all(args.series, args.column, args.labels)[0]
    series_io.check_windowing(series, args.window, args.stride)
    return series


def series_main(args) -> int:
    """eval.py --series: read and check, load the model, write the windows, answer them, merge, score, write."""
    started = time.perf_counter()
    tag = model_tag(args.model, args.temperature)
    try:
        series = read_one_series(args)
    except series_io.SeriesError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in series.notes:
        print(f"warning: {note}", file=sys.stderr)
    try:
        policy = load_model(args)
    except ModelNotFound as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    # -- windows, answers, merge --------------------------------------------------------------------
    windows_dir = os.path.join(args.out, "windows")
    samples, manifest = series_io.write_windows(windows_dir, [series], args.window, args.stride, args.labels)
    offsets = [w["offset"] for w in manifest["sources"][0]["windows"]]
    predictions, info = window_predictions(args, windows_dir, samples, list(range(len(samples))), policy)
    merged = merge_predictions(predictions, offsets, series.length)
    rows = [series_row(tag, merged, series.intervals, series.length)]
    if series.intervals is not None:
        rows += trivial_rows(samples, offsets, series, args.seed, baseline_name(args.model))

    # -- tables -------------------------------------------------------------------------------------
    heading = series_heading(series, args.window, args.stride, len(samples))
    whole = series_table(rows)
    summary, fam_rows, headline, per_family, window_md = window_tables(
        tag, data_gen.SERIES_SUITE, predictions, info, windows_dir)
    note = ("Whole-series scores: the merged intervals against the labels on the full timeline; the trivial "
            "baselines went through the same windows and merge." if series.intervals is not None
            else "No labels: nothing is scored.")
    tables_md = f"## {tag} on the whole series {heading}\n\n{whole}\n\n{note}\n\n{window_md}"
    print(tables_md)

    # -- files --------------------------------------------------------------------------------------
    scores = rows[0]["scores"]
    score_line = ("" if scores is None else f"; whole series: Aff-P {pct(scores['aff_p'])} Aff-R "
                  f"{pct(scores['aff_r'])} Aff-F1 {pct(scores['aff_f1'])} PW-F1 {pct(scores['pw_f1'])}")
    picture = draw_series(series, series_io.normalise_window(series.values), series_io.SERIES_YLIM, merged,
                          f"{tag} on {heading}{score_line}")
    gallery = draw_gallery(predictions, windows_dir, data_gen.SERIES_SUITE,
                           f"{tag} on the windows of {series.name}: {summary['n']} windows, "
                           f"{summary['unparsable']} unparsable")
    results = {"model": args.model, "tag": tag, "suite": data_gen.SERIES_SUITE, "summary": summary,
               "families": fam_rows, "baseline": info or None, "whole_series": rows,
               "tables": {"whole_series": whole, "headline": headline, "families": per_family},
               "args": vars(args), "seconds": time.perf_counter() - started}
    write_outputs(args.out, results, predictions, tables_md, gallery)
    record = intervals_record(args, series, tag, rows, predictions, offsets)
    write_atomic(os.path.join(args.out, "intervals.json"), json.dumps(jsonable(record), indent=1) + "\n")
    write_atomic(os.path.join(args.out, "series.png"), png_bytes(picture))
    print(f"[eval] wrote {args.out}/intervals.json, series.png, results.json, predictions.jsonl, tables.md, "
          f"gallery.png, windows/ ({time.perf_counter() - started:.1f} s)")
    return 0


# ---------------------------------------------------------------------------------------------------


def load_model(args):
    """The policy of --model on --device, None for a baseline; raises ModelNotFound."""
    if baseline_name(args.model):
        return None
    import torch

    from timerpo.policy import load_policy
    from timerpo.precision import DTYPES, cast_parameters, default_dtype, enable_tf32

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    policy = load_policy(resolve_model(args.model), device=device, seed=args.seed)
    # Evaluation never updates the weights: bf16 means bf16 weights outright (buffers stay fp32), and on CUDA
    # the decode step is compiled, as in train.py's rollouts.
    cast_parameters(policy.model, DTYPES[args.dtype or default_dtype(device)])
    enable_tf32(device)
    policy.compile_decode = device.startswith("cuda")
    return policy


def window_predictions(args, data_dir: str, all_samples: list, indices: list[int], policy) -> tuple[list, dict]:
    """Scored predictions for the selected samples, from the baseline or the policy, and the baseline's info."""
    baseline = baseline_name(args.model)
    if baseline:
        samples = [all_samples[i] for i in indices]
        texts, info = baseline_texts(baseline, samples, args.seed, not args.no_progress, args.workers)
        return [score_prediction(s, t) for s, t in zip(samples, texts)], info
    return model_predictions(policy, data_dir, all_samples, indices, args), {}


def window_tables(tag: str, suite: str, predictions: list[Prediction], info: dict, data_dir: str) -> tuple:
    """(summary, rows, headline, per-family table, markdown with notes) of per-sample predictions."""
    summary, rows = build_summary(predictions, suite)
    headline = headline_table(tag, suite, summary, rows)
    per_family = family_table(rows, suite)
    kind = {"tods": "per-type (tods: shapelet is the type unseen in training)",
            data_gen.SERIES_SUITE: "per-source file"}.get(suite, "per-family")
    notes = [f"{summary['n']} samples from {data_dir} ({suite} suite); unparsable completions: "
             f"{summary['unparsable']} (scored 0); distinct interval answers: {summary['distinct_intervals']}."]
    if suite == data_gen.SERIES_SUITE:
        notes.append(f"Real anomalies have no known class: Cls Acc counts only the {summary['n_known_class']} "
                     f"windows without anomaly (true class normal).")
        if summary["n_labelled"] < summary["n"]:
            notes.append(f"{summary['n'] - summary['n_labelled']} windows of unlabelled series are not scored.")
    notes.append("Loc gain: Avg F1 minus the Avg F1 of the same answers with each interval list replaced by the "
                 "class oracle's fixed window for the class answered (positive: the positions carry information "
                 "beyond the class); PW-F1 anom.: point-wise F1 over the series that hold an anomaly.")
    if "full_label" in info:
        notes.append(f"baseline:full predicts [[0, L]] with class '{info['full_label']}' (most common true "
                     f"anomaly class of these samples).")
    tables_md = (f"## {tag} on {os.path.basename(os.path.normpath(data_dir))}\n\n{headline}\n\n"
                 f"### {kind}\n\n{per_family}\n\n" + "\n".join(notes) + "\n")
    return summary, rows, headline, per_family, tables_md


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.series is not None:
        return series_main(args)
    started = time.perf_counter()
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
    suite = read_suite(args.data, [all_samples[i] for i in indices])

    # -- completions and scores ---------------------------------------------------------------------
    try:
        policy = load_model(args)
    except ModelNotFound as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    predictions, info = window_predictions(args, args.data, all_samples, indices, policy)

    # -- tables -------------------------------------------------------------------------------------
    summary, rows, headline, per_family, tables_md = window_tables(tag, suite, predictions, info, args.data)
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
