"""Cross-check of our VUS-PR / VUS-ROC (timerpo/point_metrics.py) against TSB-AD's own implementation, and
their speed.

    pip install --no-deps tsb-ad==1.5        # only for this cross-check; the project never imports TSB-AD
    python bench/vus_crosscheck.py                     # 1,000 random cases, then the timing
    python bench/vus_crosscheck.py --cases 100 --timing-reps 1 --results /tmp/vus.json

TSB-AD's dependency list pins numpy < 2 and pulls in numba, statsmodels and more; its evaluation module
imports only numpy and scikit-learn, so `--no-deps` is enough here. Each case draws a length (2 to 3,000
points), 1 to 12 anomalies (single points, runs, at the series' ends, close enough for their buffers to
meet), scores of several kinds (continuous, rounded so that many tie, a few levels, constant, 0/1) and a
buffer length among 0, 1, 2, 3, 7, 8, 20 and 100; both implementations get the same arrays and 250
thresholds. Writes bench/results/vus_crosscheck.json: the largest absolute difference of each measure
(overall and per buffer length), the case where it occurred, the TSB-AD version, and the seconds per
series (wall and CPU) of each implementation at buffer 100 for series of 5,000 and 20,000 points.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from timerpo.files import write_atomic  # noqa: E402
from timerpo.point_metrics import VUS_THRESHOLDS, vus  # noqa: E402

WINDOWS = (0, 1, 2, 3, 7, 8, 20, 100)
SCORE_KINDS = ("continuous", "rounded", "levels", "constant", "binary")
LENGTHS = (2, 3, 5, 20, 100, 249, 250, 251, 1000, 3000)


def tsb_ad_vus(scores, labels, window: int) -> tuple[float, float]:
    """(VUS-PR, VUS-ROC) from TSB-AD's generate_curve, the leaderboard's own code."""
    from TSB_AD.evaluation.basic_metrics import generate_curve

    *_, vus_roc, vus_pr = generate_curve(labels, scores, window, "opt", VUS_THRESHOLDS)
    return float(vus_pr), float(vus_roc)


def random_labels(rng, n: int) -> np.ndarray:
    """1 to 12 anomalies of 1 to 40 points; some pinned to the first or last point, some packed close."""
    labels = np.zeros(n, dtype=int)
    for _ in range(int(rng.integers(1, 13))):
        width = int(rng.integers(1, 41)) if rng.random() < 0.7 else 1
        where = rng.random()
        start = 0 if where < 0.1 else max(n - width, 0) if where < 0.2 else int(rng.integers(0, n))
        labels[start:start + width] = 1
    return labels


def random_scores(rng, labels: np.ndarray, kind: str) -> np.ndarray:
    """Scores of one kind, mildly higher on the anomalies so that the curves are not all chance."""
    lift = rng.uniform(0.0, 1.0) * labels
    if kind == "continuous":
        return rng.random(labels.size) + lift
    if kind == "rounded":  # ties everywhere
        return np.round(rng.random(labels.size) + lift, int(rng.integers(0, 3)))
    if kind == "levels":
        return rng.integers(0, 4, labels.size) + np.round(lift)
    if kind == "constant":
        return np.full(labels.size, 0.5)
    return (rng.random(labels.size) < 0.1 + 0.5 * lift).astype(float)


def random_case(rng):
    """(scores, labels, window, description) of one case with both classes present, or None."""
    n = int(rng.choice(LENGTHS)) if rng.random() < 0.5 else int(rng.integers(2, 3001))
    labels = random_labels(rng, n)
    if labels.all() or not labels.any():
        return None
    kind = str(rng.choice(SCORE_KINDS))
    window = int(rng.choice(WINDOWS))
    case = {"length": n, "anomalous_points": int(labels.sum()), "scores": kind, "window": window}
    return random_scores(rng, labels, kind), labels, window, case


def crosscheck(cases: int, seed: int, progress: bool) -> dict:
    """Both implementations on `cases` random cases: the largest absolute differences and where."""
    rng = np.random.default_rng(seed)
    worst = {"vus_pr": 0.0, "vus_roc": 0.0}
    where = {}
    by_window = {w: 0.0 for w in WINDOWS}
    done = 0
    while done < cases:
        drawn = random_case(rng)
        if drawn is None:
            continue
        scores, labels, window, case = drawn
        ours = vus(scores, labels, window)
        theirs = tsb_ad_vus(scores, labels, window)
        for name, a, b in zip(("vus_pr", "vus_roc"), ours, theirs):
            diff = abs(a - b)
            by_window[window] = max(by_window[window], diff)
            if diff >= worst[name]:
                worst[name], where[name] = diff, {**case, "ours": a, "tsb_ad": b}
        done += 1
        if progress and done % 100 == 0:
            print(f"  {done}/{cases} cases, largest difference so far {max(worst.values()):.2e}", file=sys.stderr)
    return {"cases": cases, "seed": seed, "max_abs_diff": worst, "max_abs_diff_by_window": by_window,
            "worst_case": where}


def best_seconds(fn, reps: int) -> dict:
    """Smallest wall time and smallest CPU time of this process over `reps` calls (the CPU time says less
    about the other work on a shared machine)."""
    wall = cpu = float("inf")
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return {"wall_s": wall, "cpu_s": cpu}


def timing(reps: int, seed: int) -> list:
    """Seconds per series at buffer 100, wall and CPU: ours (best of `reps`) and TSB-AD's (one call), for a
    series with five anomalies and continuous scores."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in (5000, 20000):
        labels = np.zeros(n, dtype=int)
        for start in rng.choice(n - 100, 5, replace=False):
            labels[start:start + int(rng.integers(1, 60))] = 1
        scores = rng.random(n) + 0.5 * labels
        rows.append({"length": n, "window": 100, "anomalous_points": int(labels.sum()),
                     "ours": best_seconds(lambda: vus(scores, labels, 100), reps),
                     "tsb_ad": best_seconds(lambda: tsb_ad_vus(scores, labels, 100), 1)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cases", type=int, default=1000, help="random cases compared")
    p.add_argument("--seed", type=int, default=0, help="seed of the random cases")
    p.add_argument("--timing-reps", type=int, default=5, help="repetitions of our VUS per timed series (0: no timing)")
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results", "vus_crosscheck.json"))
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    try:
        version = importlib.metadata.version("tsb-ad")
    except importlib.metadata.PackageNotFoundError:
        print("error: the cross-check needs TSB-AD: pip install --no-deps tsb-ad==1.5", file=sys.stderr)
        return 2
    start = time.perf_counter()
    result = {"tsb_ad_version": version, "numpy": np.__version__, "thresholds": VUS_THRESHOLDS,
              **crosscheck(args.cases, args.seed, not args.no_progress)}
    result["crosscheck_seconds"] = round(time.perf_counter() - start, 1)
    if args.timing_reps > 0:
        result["seconds_per_series"] = timing(args.timing_reps, args.seed)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    write_atomic(args.results, (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    print(f"TSB-AD {version}, {args.cases} cases: largest |ours - TSB-AD| VUS-PR "
          f"{result['max_abs_diff']['vus_pr']:.2e}, VUS-ROC {result['max_abs_diff']['vus_roc']:.2e}")
    for row in result.get("seconds_per_series", []):
        ours, theirs = row["ours"], row["tsb_ad"]
        print(f"N = {row['length']}, buffer 100: ours {1000 * ours['wall_s']:.1f} ms wall, {1000 * ours['cpu_s']:.1f} ms "
              f"CPU; TSB-AD {theirs['wall_s']:.2f} s wall, {theirs['cpu_s']:.2f} s CPU")
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
