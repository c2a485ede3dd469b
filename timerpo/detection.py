"""Detection on a whole series: `timerpo.detect(values, model=...)`, also what `eval.py --series` runs.

    import numpy as np, timerpo
    x = np.sin(np.arange(3000) / 8.0); x[1200] += 4.0
    found = timerpo.detect(x, model="baseline:expert", window=1000, stride=500)
    found.intervals, found.classes, found.scores   # [[1200, 1201]], [['global point']], [3000] floats

Steps (series_io.py does the reading, windowing and merging):
  1. cut the series into windows of L points (stride S, one more ending at the last point), each min-max
     scaled to [-1, 1] and drawn as the training plots are;
  2. answer every window K times (`samples`): a model samples K completions at the sampling temperature
     (greedy for K = 1), a `baseline:` writes its completion text; each answer is parsed as in training;
  3. a window flags a point when more than half of its K answers cover it (K = 1: its answer); the merged
     intervals are the union over windows, shifted by their offsets;
  4. per-point score: the share of a window's K answers that cover the point, averaged over the windows that
     contain it. `baseline:expert` gives its detection statistic instead (baselines.detection_statistic),
     averaged the same way.
Each merged interval lists the classes the windows answered inside it; a real anomaly's true class is unknown.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

import series_io
from expert_cot import runs
from timerpo.evaluate import EVAL_STEP, Prediction, score_prediction
from timerpo.progress import progress_bar

SAMPLING_TEMPERATURE = 0.4  # K > 1 answers: the paper's validation sampling temperature
DEFAULT_MAX_NEW_TOKENS = {"tiny": 72, "other": 1024}  # the tiny model was warmed up on short answers
SCORE_KINDS = {"share": "share of the K answers covering the point, averaged over the windows containing it",
               "statistic": "the classical detector's detection statistic (baselines.detection_statistic), "
                            "averaged over the windows containing the point"}


@dataclass
class Detector:
    """What answers the windows: a loaded policy, or a baseline by name, and how it answers."""

    tag: str  # the method's name in tables
    policy: object = None  # timerpo.policy.Policy, None for a baseline
    baseline: str | None = None  # "empty", "full", "random" or "expert"
    samples: int = 1  # K answers per window
    temperature: float = 0.0
    seed: int = 0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS["other"]
    batch_size: int = 16
    workers: int = 1  # processes of the expert detector


@dataclass
class Detection:
    """The answer for one whole series, on its own index."""

    intervals: list  # merged half-open [s, e) intervals
    classes: list  # for each merged interval, the classes the windows answered inside it (window order)
    scores: np.ndarray = field(repr=False)  # [N] per-point scores (`score_kind`)
    score_kind: str  # "share" or "statistic" (SCORE_KINDS)
    offsets: list  # window starts
    answers: list = field(repr=False)  # [windows][K] scored Predictions


# --------------------------------------------------------------------------------------------- models


def resolve_model(model: str) -> str:
    """A train.py run folder means its latest checkpoint's model (a LoRA run's: its adapters, which
    load_policy merges into their base); anything else is passed on as given."""
    from timerpo.checkpoint import checkpoint_weights, latest_checkpoint

    ckpt = latest_checkpoint(model) if os.path.isdir(model) else None  # a run folder has a `latest` pointer
    return checkpoint_weights(ckpt) if ckpt is not None else model


def run_max_new_tokens(model: str) -> int | None:
    """The completion cap a train.py run folder was trained with (its run_config.json), else None: a tiny
    run is scored at its 72 tokens, not at the 1,024 meant for Qwen checkpoints."""
    import json

    try:
        with open(os.path.join(model, "run_config.json")) as f:
            return int(json.load(f)["max_new_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def default_max_new_tokens(model: str) -> int:
    """A run folder's own cap, else 72 for tiny and 1024 for every other model."""
    return run_max_new_tokens(model) or DEFAULT_MAX_NEW_TOKENS["tiny" if model == "tiny" else "other"]


def load_model(model: str, device: str | None = None, dtype: str | None = None, seed: int = 0):
    """The policy of `model` (a name, folder or run folder) ready to answer; raises ModelNotFound."""
    import torch

    from timerpo.policy import load_policy
    from timerpo.precision import DTYPES, default_dtype, enable_tf32

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # Answering never updates the weights: bf16 means bf16 weights outright (buffers stay fp32), and on CUDA
    # the decode step is compiled, as in train.py's rollouts.
    policy = load_policy(resolve_model(model), dtype=DTYPES[dtype or default_dtype(device)], device=device,
                         seed=seed)
    enable_tf32(device)
    policy.compile_decode = device.startswith("cuda")
    return policy


def make_detector(model, samples: int = 1, temperature: float | None = None, seed: int = 0,
                  max_new_tokens: int | None = None, batch_size: int = 16, device: str | None = None,
                  dtype: str | None = None, workers: int = 1, tag: str | None = None) -> Detector:
    """A Detector for `model`: 'baseline:NAME', a model name / folder / run folder, or a loaded Policy.
    `temperature` None: greedy for one answer per window, SAMPLING_TEMPERATURE for several."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    temperature = (0.0 if samples == 1 else SAMPLING_TEMPERATURE) if temperature is None else temperature
    settings = dict(samples=samples, temperature=temperature, seed=seed, batch_size=batch_size, workers=workers)
    if isinstance(model, str) and model.startswith("baseline:"):
        import eval as evaluation  # the baselines' completion texts live beside the tables that print them

        name = model.split(":", 1)[1]
        if name not in evaluation.BASELINES:
            raise ValueError(f"unknown baseline {model!r}; choose one of "
                             + ", ".join("baseline:" + b for b in evaluation.BASELINES))
        return Detector(tag=tag or f"baseline-{name}", baseline=name, **settings)
    if isinstance(model, str):
        cap = max_new_tokens or default_max_new_tokens(model)
        return Detector(tag=tag or os.path.basename(os.path.normpath(model)),
                        policy=load_model(model, device, dtype, seed), max_new_tokens=cap, **settings)
    cap = max_new_tokens or DEFAULT_MAX_NEW_TOKENS["other"]
    return Detector(tag=tag or "model", policy=model, max_new_tokens=cap, **settings)


# --------------------------------------------------------------------------------------------- answers


def answer_windows(detector: Detector, windows: list, progress: bool = False) -> list[list[Prediction]]:
    """K scored answers for every window ((sample, png, record) of series_io.cut_windows). [windows][K]"""
    samples = [w[0] for w in windows]
    if detector.baseline is not None:
        return baseline_answers(detector, samples, progress)
    return policy_answers(detector, windows, progress)


def baseline_answers(detector: Detector, samples: list, progress: bool) -> list[list[Prediction]]:
    """The baseline's completion texts, parsed and scored; answer k of a random baseline uses seed + k."""
    import eval as evaluation

    per_k = []
    for k in range(detector.samples):
        texts, _ = evaluation.baseline_texts(detector.baseline, samples, detector.seed + k, progress,
                                             detector.workers)
        per_k.append([score_prediction(s, t) for s, t in zip(samples, texts)])
    return [list(answers) for answers in zip(*per_k)]


def policy_answers(detector: Detector, windows: list, progress: bool) -> list[list[Prediction]]:
    """K completions per window from the policy, generated `batch_size` at a time; answer k of window w is
    seeded by (seed, w, k) in the evaluation seed space, so batching does not change it. Plots are encoded
    chunk by chunk (an encoded plot is ~3.5 MB of patches) and the K rows of a window share one prefill."""
    import io

    from PIL import Image

    from timerpo.algorithm import chunks
    from timerpo.policy import encode_prompt
    from timerpo.prompt import build_prompt
    from timerpo.rollout import completion_seed, sample_completions

    policy, K = detector.policy, detector.samples
    policy.model.eval()
    jobs = [(w, k) for w in range(len(windows)) for k in range(K)]
    answers = [[None] * K for _ in windows]
    bar = progress_bar(total=len(jobs), desc=f"answers of {detector.tag}", unit="answer", disable=not progress,
                       leave=False)
    for chunk in chunks(jobs, detector.batch_size):
        encoded = {}
        for w, _ in chunk:
            if w not in encoded:
                sample, png, _ = windows[w]
                with Image.open(io.BytesIO(png)) as img:
                    encoded[w] = encode_prompt(policy, img, build_prompt(sample.length))
        seeds = [completion_seed(detector.seed, EVAL_STEP, w, k) for w, k in chunk]
        outs = sample_completions(policy, [encoded[w] for w, _ in chunk], seeds, detector.max_new_tokens,
                                  detector.temperature)
        for (w, k), (ids, _) in zip(chunk, outs):
            text = policy.tokenizer.decode(ids, skip_special_tokens=True)
            answers[w][k] = score_prediction(windows[w][0], text)
        bar.update(len(chunk))
    bar.close()
    return answers


# --------------------------------------------------------------------------------------------- merge, scores


def coverage(answers: list[Prediction], length: int) -> np.ndarray:
    """Share of the answers whose intervals cover each point of a window; an unparsable answer covers none. [L]"""
    count = np.zeros(length)
    for p in answers:
        for s, e in p.parsed.intervals or []:
            count[s:e] += 1
    return count / len(answers)


def window_votes(answers: list[Prediction], length: int) -> list[list[int]]:
    """The window's answer: the points that more than half of its K answers cover, as intervals."""
    return runs(coverage(answers, length) > 0.5)


def interval_classes(merged, answers: list[list[Prediction]], offsets: list[int]) -> list[list[str]]:
    """For each merged interval, the classes answered by windows with an answered interval starting inside it."""
    out = []
    for s, e in merged:
        classes = []
        for o, window_answers in zip(offsets, answers):
            for p in window_answers:
                inside = any(s <= o + a < e for a, _ in p.parsed.intervals or [])
                if inside and p.parsed.label and p.parsed.label not in classes:
                    classes.append(p.parsed.label)
        out.append(classes)
    return out


def window_scores(detector: Detector, windows: list, answers: list[list[Prediction]]) -> tuple[list, str]:
    """Per-point scores of every window and their kind: the expert's detection statistic, else coverage."""
    if detector.baseline == "expert":
        import baselines

        return [baselines.detection_statistic(np.asarray(w[0].series)) for w in windows], "statistic"
    return [coverage(a, w[0].length) for w, a in zip(windows, answers)], "share"


def detect_windows(series, windows: list, detector: Detector, progress: bool = False) -> Detection:
    """Steps 2-4 of the module docstring on the cut windows of one series (series_io.RealSeries)."""
    offsets = [w[2]["offset"] for w in windows]
    answers = answer_windows(detector, windows, progress)
    merged = series_io.merge_windows([(o, window_votes(a, w[0].length))
                                      for o, a, w in zip(offsets, answers, windows)], series.length)
    per_window, kind = window_scores(detector, windows, answers)
    scores = series_io.spread_scores(list(zip(offsets, per_window)), series.length)
    return Detection(intervals=merged, classes=interval_classes(merged, answers, offsets), scores=scores,
                     score_kind=kind, offsets=offsets, answers=answers)


def detect(values, model="baseline:expert", window: int = series_io.DEFAULT_WINDOW, stride: int | None = None,
           samples: int = 1, progress: bool = False, **settings) -> Detection:
    """Anomalies of one univariate series `values` ([N] numbers; gaps as NaN are filled by interpolation).

    model: 'baseline:expert' (default; also empty, full, random), a model name ('tiny', 'qwen2.5-vl-3b'),
    a model folder, a train.py run folder, or a loaded timerpo Policy. window: points per plot (at least 64,
    at most N); stride: offset between windows (default window // 2); samples: K answers per window.
    settings: temperature (default: greedy for K = 1, 0.4 for K > 1), seed, max_new_tokens, batch_size,
    device, dtype, workers. Raises series_io.SeriesError for a series or windowing that cannot be used.
    """
    series = series_io.from_values(values)
    stride = max(1, window // 2) if stride is None else stride
    series_io.check_windowing(series, window, stride)
    detector = make_detector(model, samples=samples, **settings)
    return detect_windows(series, series_io.cut_windows(series, window, stride), detector, progress)
