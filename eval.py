"""Evaluation of a checkpoint or a baseline: the paper's tables on a data folder, or whole real series.

    python eval.py --model baseline:empty --data data/test
    python eval.py --model runs/<run>/ckpt-000060/model --data data/test --limit 400
    python eval.py --model qwen2.5-vl-3b --data data/test --temperature 0.4
    python eval.py --model baseline:expert --series NAB/realKnownCause TSB-AD-U --labels NAB/labels.json

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

Whole series (--series FILE_OR_FOLDER ..., docs/series.md): each series is cut into windows, every window is
answered --samples K times (timerpo/detection.py, also `timerpo.detect`), a window flags the points most of
its answers cover, and the windows' intervals are shifted back by their offsets and united on the series'
own index. A point's score is the share of answers covering it, averaged over its windows (baseline:expert:
its detection statistic). A labelled series is scored as a whole: affiliation and point-wise P/R/F1 of the
merged intervals, AUC-PR/AUC-ROC/VUS-PR/VUS-ROC of the scores (timerpo/point_metrics.py), beside the trivial
baselines (empty, full, random) run through the same windows and merge. OUT gets tables.md and results.json
(one summary table: per method, the mean over files; then one row per file), series/<name>/ with
intervals.json, scores.csv and series.png, windows/ (the windows as a data folder) and the per-window
predictions.jsonl and gallery.png. Real anomalies have no known class, so Cls Acc there counts only the
windows without anomaly (true class normal).
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
from dataclasses import dataclass

# Before numpy loads (so only when run as a script): the detector's matrix products are ~1000 x 50, too
# small for threads to pay off, and two multi-threaded BLAS pools in forked workers on 2 cores spin against
# each other (measured: 400 series in 1.9 s serial at 1 BLAS thread, 3.0 s at the default, and the 2-process
# pool slower than serial). torch uses MKL/OpenMP, not OpenBLAS, so model evaluation is unaffected.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image

import data_gen
import series_io
from timerpo import point_metrics
from timerpo.algorithm import make_prompt
from timerpo.cli import add_flags, flag, usage_error
from timerpo.detection import (SAMPLING_TEMPERATURE, SCORE_KINDS, default_max_new_tokens, detect_windows, make_detector,
                               resolve_model)  # noqa: F401 (resolve_model: eval.resolve_model, as before)
from timerpo.detection import load_model as load_policy_model
from timerpo.evaluate import (ANY_ANOMALY, Prediction, class_window, jsonable, mean, predict, prediction_record,
                              read_suite, score_prediction, summarize, true_label)
from timerpo.files import png_bytes, write_atomic
from timerpo.metrics import PAPER_GROUPS, group_of, localization_scores, to_events
from timerpo.plots import draw_gallery, draw_series, intervals_text
from timerpo.policy import ModelNotFound, find_model
from timerpo.progress import progress_bar, quiet_library_bars
from timerpo.prompt import ANOMALY_LABELS, format_completion

BASELINES = ("empty", "full", "random", "expert", "presence-oracle", "class-oracle")
RANDOM_MAX_WINDOWS = 3
RANDOM_MIN_WIDTH = 5
RANDOM_MAX_WIDTH_FRACTION = 0.1

# ---------------------------------------------------------------------------------------------------
# Flags


@dataclass
class EvalConfig(data_gen.WindowFlags):
    """Every flag of `python eval.py` (--help lists them with their defaults)."""

    model: str = flag(None, "tiny | qwen2.5-vl-3b | qwen2.5-vl-7b | a hub id | a model folder | a train.py run "
                            "folder (its latest checkpoint) | baseline:empty | baseline:full | baseline:random | "
                            "baseline:expert | baseline:presence-oracle | baseline:class-oracle (these two read "
                            "the truth)", required=True)
    data: str | None = flag(None, "generated data folder (python data_gen.py --out DIR ...)", one_of="source")
    series: list[str] | None = flag(None, "real series files or folders (every readable file inside: "
                                          "TimeEval/GutenTAG, TSB-AD or NAB CSV, TSB-UAD .out, UCR archive .txt, "
                                          "one-column CSV; docs/series.md): detect on every window, merge the "
                                          "intervals onto each whole series, score each labelled one as a whole, "
                                          "and the mean over files", one_of="source", nargs="+", metavar="PATH")
    limit: int | None = flag(None, "evaluate N samples, spread evenly over families (default: all)")
    temperature: float | None = flag(None, "sampling temperature: 0 = greedy; 0.4 = the paper's validation "
                                           "sampling (default: 0, or 0.4 with --samples K > 1)")
    samples: int = flag(1, "--series: answers per window, K; a point's score is the share of answers covering "
                           "it, averaged over the windows containing it (K > 1 samples at --temperature, default "
                           "0.4)")
    vus_window: int = flag(point_metrics.VUS_WINDOW, "--series: VUS buffer length, the largest ℓ of "
                                                     "VUS-PR/VUS-ROC (TSB-AD's default)")
    out: str | None = flag(None, "output folder (default: runs/eval/<model-tag>-<data-folder-name or "
                                 "series-file-name>)")
    batch_size: int = flag(16, "prompts generated together (models only)")
    max_new_tokens: int | None = flag(None, "completion length cap (default: a run folder's own, 72 for tiny, "
                                            "1024 otherwise)")
    seed: int = flag(0, "seed of sampling streams (models) and of the random baseline")
    device: str | None = flag(None, "cpu | cuda (default: cuda when available)", choices=("cpu", "cuda"))
    dtype: str | None = flag(None, "weights and compute: bf16 | fp32 (default: bf16 on CUDA, fp32 on CPU)",
                             choices=("fp32", "bf16"))
    no_progress: bool = flag(False, "no progress bars (transformers' loading bars included)")
    workers: int | None = flag(None, "processes running the expert detector (baseline:expert only; default: "
                                     "min(2, CPUs))")


def parse_args(argv=None) -> EvalConfig:
    """The EvalConfig of `python eval.py <argv>`, defaults filled in; a bad flag ends the program with a usage
    error (exit 2)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_flags(p, EvalConfig, titles={data_gen.WindowFlags: "real series (only with --series)"})
    args = EvalConfig(**vars(p.parse_args(argv)))
    series_io.check_window_flags(p, args, args.series is not None, "--series")
    if args.series is None and (args.samples, args.vus_window) != (1, point_metrics.VUS_WINDOW):
        p.error("--samples, --vus-window: only with --series")
    if args.samples <= 0 or args.vus_window < 0:
        p.error(f"--samples must be positive and --vus-window >= 0, got {args.samples} and {args.vus_window}")
    if args.temperature is None:
        args.temperature = SAMPLING_TEMPERATURE if args.samples > 1 else 0.0
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
        args.max_new_tokens = default_max_new_tokens(args.model)
    args.out = args.out or default_out(args.model, args.data or series_out_name(args.series), args.temperature)
    return args


def series_out_name(paths: list[str]) -> str:
    """The --series inputs' name in the default output folder: 'NAB/nyc taxi.csv' -> 'nyc-taxi', and
    'a.csv b.csv c.csv' -> 'a-and-2-more'."""
    name = series_io.series_name(os.path.normpath(paths[0]))
    return name if len(paths) == 1 else f"{name}-and-{len(paths) - 1}-more"


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
    bar = progress_bar(total=len(samples), desc="baseline:expert", disable=not progress, leave=False)
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
    for s in progress_bar(samples, desc=f"baseline:{name}", disable=not progress, leave=False):
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


def model_predictions(policy, data_dir: str, all_samples: list, indices: list[int], args) -> list[Prediction]:
    """Generate and score one completion per selected sample, encoding images chunk by chunk.

    Why chunks: an encoded 1064 x 140 image is ~3.5 MB of float patches, so encoding thousands at once
    would hold gigabytes. A completion's sampling seed depends on its row in samples.jsonl (Prompt.index)
    and --seed only, so neither the chunking nor --limit changes what a given series gets.
    """
    preds = []
    bar = progress_bar(total=len(indices), desc=f"eval {model_tag(args.model)}", disable=args.no_progress)
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
# Whole series (--series): detection in timerpo/detection.py, reading and windowing in series_io.py

TRIVIAL_BASELINES = ("empty", "full", "random")
MERGE_RULE = ("a window flags a point when more than half of its answers cover it; the union over windows, "
              "shifted by their offsets (series_io.merge_windows)")
INTERVAL_KEYS = ("aff_p", "aff_r", "aff_f1", "pw_p", "pw_r", "pw_f1")
POINT_KEYS = ("auc_pr", "auc_roc", "vus_pr", "vus_roc")


def series_row(method: str, found, series, vus_window: int) -> dict:
    """One method on one whole series: merged intervals and, with labels, their interval scores on the full
    timeline and the threshold-free scores of its per-point scores."""
    row = {"method": method, "intervals": found.intervals, "classes": found.classes,
           "score_kind": found.score_kind, "scores": None, "point": None}
    if series.intervals is not None:
        row["scores"] = vars(localization_scores(found.intervals, series.intervals, series.length))
        labels = series_io.interval_mask(series.length, series.intervals)
        row["point"] = vars(point_metrics.point_metrics(found.scores, labels, vus_window))
    return row


def trivial_rows(series, windows: list, args, skip: str | None) -> list[dict]:
    """Rows of the trivial baselines, run through the same windows, answers per window and merge."""
    rows = []
    for name in TRIVIAL_BASELINES:
        if name != skip:
            detector = make_detector(f"baseline:{name}", samples=args.samples, seed=args.seed)
            rows.append(series_row(detector.tag, detect_windows(series, windows, detector), series, args.vus_window))
    return rows


def row_values(row: dict) -> dict:
    """The numbers of a row: interval scores then point scores (None where not scored)."""
    return {**dict.fromkeys(INTERVAL_KEYS), **(row["scores"] or {}),
            **dict.fromkeys(POINT_KEYS), **(row["point"] or {})}


def mean_over_files(files: list[dict]) -> dict:
    """{method: mean of every number over the labelled files that have it, and the file count}."""
    by_method: dict[str, list[dict]] = {}
    for f in files:
        for r in f["rows"]:
            if r["scores"] is not None:
                by_method.setdefault(r["method"], []).append(row_values(r))
    return {method: {**{k: mean(math.nan if v[k] is None else v[k] for v in values)
                        for k in INTERVAL_KEYS + POINT_KEYS}, "files": len(values)}
            for method, values in by_method.items()}


def summary_table(means: dict) -> str:
    """Mean over the labelled files, one row per method (in %), the evaluated method first."""
    body = [[m, v["files"]] + [pct(v[k]) for k in ("aff_p", "aff_r", "aff_f1", "pw_f1") + POINT_KEYS]
            for m, v in means.items()]
    return markdown_table(["Method", "Files", "Aff-P", "Aff-R", "Aff-F1", "PW-F1", "AUC-PR", "AUC-ROC", "VUS-PR",
                           "VUS-ROC"], body)


def files_table(files: list[dict]) -> str:
    """The evaluated method on each file (in %)."""
    body = []
    for f in files:
        row = f["rows"][0]
        v = row_values(row)
        truth = "unlabelled" if f["truth"] is None else intervals_text(f["truth"], limit=3)
        body.append([f["name"], f["format"], f["length"], f["windows"], truth, intervals_text(row["intervals"], limit=3)]
                    + [pct(v[k]) for k in ("aff_f1", "pw_f1") + POINT_KEYS])
    return markdown_table(["File", "Format", "Points", "Windows", "Truth", "Found", "Aff-F1", "PW-F1", "AUC-PR",
                           "AUC-ROC", "VUS-PR", "VUS-ROC"], body)


def series_heading(series, window: int, stride: int, n_windows: int) -> str:
    """One line naming the series, its windows and its truth."""
    truth = "unlabelled" if series.intervals is None else f"true anomalies {intervals_text(series.intervals)}"
    return (f"{series.name}: {series.length} points, {n_windows} windows of {window} (stride {stride}), "
            f"{truth}")


def intervals_record(args, series, tag: str, rows: list[dict], found) -> dict:
    """intervals.json: the merged answer on the series' index (and timestamps), truth, scores, windows."""
    merged = rows[0]["intervals"]
    return {
        "source": series.path, "name": series.name, "format": series.fmt, "column": series.column,
        "length": series.length, "window": args.window, "stride": args.stride, "model": args.model, "tag": tag,
        "samples": args.samples, "temperature": args.temperature, "merge": MERGE_RULE, "intervals": merged,
        "timestamps": series_io.timestamp_spans(merged, series.timestamps), "classes": rows[0]["classes"],
        "truth": series.intervals,
        "truth_timestamps": (None if series.intervals is None
                             else series_io.timestamp_spans(series.intervals, series.timestamps)),
        "scores": rows[0]["scores"], "point_scores": rows[0]["point"],
        "score_kind": SCORE_KINDS[found.score_kind], "vus_window": args.vus_window,
        "baselines": {r["method"]: r["scores"] for r in rows[1:]},
        "baselines_point_scores": {r["method"]: r["point"] for r in rows[1:]},
        "windows": [{"id": answers[0].sample.id, "offset": o, "intervals": answers[0].parsed.intervals,
                     "class": answers[0].parsed.label, "unparsable": answers[0].parsed.intervals is None,
                     "samples": [{"intervals": a.parsed.intervals, "class": a.parsed.label} for a in answers]}
                    for o, answers in zip(found.offsets, found.answers)],
    }


def write_series_files(args, series, tag: str, rows: list[dict], found, n_windows: int) -> str:
    """OUT/series/<name>/: intervals.json, scores.csv and series.png of one file; returns the folder."""
    folder = os.path.join(args.out, "series", series.name)
    os.makedirs(folder, exist_ok=True)
    record = intervals_record(args, series, tag, rows, found)
    write_atomic(os.path.join(folder, "intervals.json"), json.dumps(jsonable(record), indent=1) + "\n")
    write_atomic(os.path.join(folder, "scores.csv"), series_io.scores_csv(series, found.scores))
    sc, pt = rows[0]["scores"], rows[0]["point"]
    score_line = ("" if sc is None else f"; whole series: Aff-F1 {pct(sc['aff_f1'])} PW-F1 {pct(sc['pw_f1'])} "
                  f"AUC-PR {pct(pt['auc_pr'])} VUS-PR {pct(pt['vus_pr'])}")
    picture = draw_series(series, series_io.normalise_window(series.values), series_io.SERIES_YLIM,
                          found.intervals, f"{tag} on {series_heading(series, args.window, args.stride, n_windows)}"
                          f"{score_line}")
    write_atomic(os.path.join(folder, "series.png"), png_bytes(picture))
    return folder


def file_record(series, rows: list[dict], n_windows: int, folder: str) -> dict:
    """One file's entry of results.json."""
    return {"file": series.path, "name": series.name, "format": series.fmt, "length": series.length,
            "windows": n_windows, "truth": series.intervals, "notes": series.notes, "folder": folder, "rows": rows}


def read_inputs(args):
    """The --series files, read and checked (their windows too), refusals reported; None when refused."""
    try:
        series, skipped = series_io.read_all(args.series, args.column, args.labels, args.window, args.stride,
                                             args.skip_bad)
    except series_io.SeriesError as err:
        series_io.report_refusals(err, [])
        return None, []
    series_io.report_refusals(None, skipped)
    for s in series:
        for note in s.notes:
            print(f"warning: {note}", file=sys.stderr)
    return series, skipped


def series_main(args) -> int:
    """eval.py --series: read and check every file, load the model; per file: cut the windows, answer them,
    merge, score, write its folder; then the windows, the tables over files and the per-window tables."""
    started = time.perf_counter()
    tag = model_tag(args.model, args.temperature)
    series_list, skipped = read_inputs(args)
    if series_list is None:
        return 2
    try:
        detector = make_detector(load_model(args) or args.model, samples=args.samples, temperature=args.temperature,
                                 seed=args.seed, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                 workers=args.workers, tag=tag)
    except ModelNotFound as err:
        return usage_error(err)

    # -- per file: windows, answers, merge, scores ---------------------------------------------------
    files, cut, predictions = [], {}, []
    bar = progress_bar(series_list, desc="files", unit="file", disable=args.no_progress)
    for series in bar:
        bar.set_postfix(file=series.name)
        windows = cut[series.name] = series_io.cut_windows(series, args.window, args.stride)
        found = detect_windows(series, windows, detector, progress=not args.no_progress)
        rows = [series_row(tag, found, series, args.vus_window)]
        if series.intervals is not None:
            rows += trivial_rows(series, windows, args, baseline_name(args.model))
        folder = write_series_files(args, series, tag, rows, found, len(windows))
        files.append(file_record(series, rows, len(windows), folder))
        predictions += [answers[0] for answers in found.answers]  # the first answer of each window
    bar.close()

    # -- the windows as a data folder, tables --------------------------------------------------------
    windows_dir = os.path.join(args.out, "windows")
    series_io.write_windows(windows_dir, series_list, args.window, args.stride, args.labels, skipped=skipped,
                            cut=cut)
    means = mean_over_files(files)
    whole, per_file = summary_table(means), files_table(files)
    summary, fam_rows, headline, per_family, window_md = window_tables(
        tag, data_gen.SERIES_SUITE, predictions, {}, windows_dir)
    labelled = sum(f["truth"] is not None for f in files)
    note = (f"Mean over the {labelled} labelled files of {len(files)}; the trivial baselines went through the same "
            f"windows and merge. Per-point scores: {SCORE_KINDS[detector_kind(files)]}; VUS buffer up to "
            f"{args.vus_window} points." if labelled else "No labels: nothing is scored.")
    skipped_md = "".join(f"\nSkipped {r['file']}: {r['reason']}" for r in skipped)
    tables_md = (f"## {tag} on {len(files)} series (window {args.window}, stride {args.stride}, {args.samples} "
                 f"answers per window)\n\n{whole}\n\n{note}{skipped_md}\n\n### per file\n\n{per_file}\n\n"
                 f"{window_md}")
    print(tables_md)

    # -- files ---------------------------------------------------------------------------------------
    gallery = draw_gallery(predictions, windows_dir, data_gen.SERIES_SUITE,
                           f"{tag} on the windows of {len(files)} series: {summary['n']} windows, "
                           f"{summary['unparsable']} unparsable")
    results = {"model": args.model, "tag": tag, "suite": data_gen.SERIES_SUITE, "summary": summary,
               "families": fam_rows, "files": files, "mean": means, "skipped": skipped,
               "tables": {"summary": whole, "files": per_file, "headline": headline, "families": per_family},
               "args": vars(args), "seconds": time.perf_counter() - started}
    write_outputs(args.out, results, predictions, tables_md, gallery)
    print(f"[eval] wrote {args.out}/results.json, tables.md, predictions.jsonl, gallery.png, windows/, series/<name>/"
          f"{{intervals.json, scores.csv, series.png}} ({time.perf_counter() - started:.1f} s)")
    return 0


def detector_kind(files: list[dict]) -> str:
    """The kind of per-point score of the evaluated method ("share" when no file was evaluated)."""
    return files[0]["rows"][0]["score_kind"] if files else "share"


# ---------------------------------------------------------------------------------------------------


def check_model(args) -> None:
    """Raise ModelNotFound at once when --model names no weights on this machine (before any data is read)."""
    if not baseline_name(args.model):
        find_model(resolve_model(args.model))


def load_model(args):
    """The policy of --model on --device, None for a baseline; raises ModelNotFound."""
    if baseline_name(args.model):
        return None
    return load_policy_model(args.model, args.device, args.dtype, args.seed)


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
    try:
        check_model(args)
    except ModelNotFound as err:
        return usage_error(err)
    if args.no_progress:
        quiet_library_bars()
    if args.series is not None:
        return series_main(args)
    started = time.perf_counter()
    tag = model_tag(args.model, args.temperature)

    # -- data ---------------------------------------------------------------------------------------
    try:
        all_samples = data_gen.load_samples(args.data)
    except data_gen.DataError as err:
        return usage_error(err)
    if not all_samples:
        return usage_error(f"{os.path.join(args.data, 'samples.jsonl')} holds no samples")
    indices = data_gen.balanced_indices(all_samples, args.limit)
    suite = read_suite(args.data, [all_samples[i] for i in indices])

    # -- completions and scores ---------------------------------------------------------------------
    try:
        policy = load_model(args)
    except ModelNotFound as err:
        return usage_error(err)
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
