"""Small-scale ablation (the paper's Table 2 at tiny scale): timerpo, grpo, no-projection and gencot.

For each seed the `timerpo` arm runs the default pipeline (supervised warm-up, then RL) and keeps its
post-warm-up model in runs/<arm>/reference/; the other three arms start RL from that very model, so all
arms of a seed share one warm-up and differ only in the advantage / OT target. Every arm gets the same
number of RL steps. Each final checkpoint is then scored by eval.py on a held-out anomllm subset.

    python bench/ablation.py --seeds 0 1 2 --jobs 2
Prints one markdown table (mean ± std over seeds) and writes bench/results/ablation.json and
bench/results/ablation_curves.png (training reward per step, mean over seeds, smoothed).

Killed half-way? Run the same command again: finished arms (an eval results.json exists) are read back,
unfinished ones continue from their latest checkpoint (train.py --resume; an arm that died before its first
checkpoint starts again with --overwrite).
With --jobs 2 two runs share the machine, one torch thread each (OMP_NUM_THREADS=1).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
from bench.common import tiny_flags  # noqa: E402
from timerpo.checkpoint import latest_checkpoint  # noqa: E402
from timerpo.files import write_atomic  # noqa: E402
from timerpo.plots import line_chart  # noqa: E402

ARMS = {  # arm -> train.py flags
    "timerpo": ["--advantage", "timerpo", "--cot", "expcot"],
    "grpo": ["--advantage", "grpo", "--cot", "expcot"],
    "no-projection": ["--advantage", "no-projection", "--cot", "expcot"],
    "gencot": ["--advantage", "timerpo", "--cot", "gencot"],
}
# Reference rows, not RL arms: the post-warm-up policy itself, and the control that spends the RL phase's
# wall time on more supervised warm-up steps instead (bench/sft_control.py).
CONTROLS = ("warm-up", "sft-more")
GROUPS = ("Frequency", "Trend", "Range", "Point")


def run(cmd: list[str], log: str, threads: int | None) -> None:
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with open(log, "a") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def continue_flags(run_dir: str) -> list[str]:
    """--resume for an arm that has a checkpoint; --overwrite for one that died before its first (nothing of it
    is worth keeping); nothing for a new arm."""
    if os.path.isdir(run_dir) and latest_checkpoint(run_dir):
        return ["--resume"]
    return ["--overwrite"] if os.path.exists(run_dir) else []


def train_arm(arm: str, seed: int, args, out: str) -> str:
    name = f"{arm}-s{seed}"
    cmd = [sys.executable, "train.py", "--data", args.data, "--eval-data", args.eval_data, "--out", out,
           "--name", name, "--seed", str(seed), "--steps", str(args.steps), "--no-progress",
           *continue_flags(os.path.join(out, name)), *ARMS[arm]]
    if arm != "timerpo":  # start from this seed's post-warm-up model, with the tiny preset spelled out
        cmd += tiny_flags() + ["--model", os.path.join(out, f"timerpo-s{seed}", "reference"),
                               "--steps", str(args.steps)]
    cmd += args.train_args.split()
    if arm != "timerpo":
        cmd += ["--warmup-steps", "0"]  # the warm-up is the shared starting point, never redone
    run(cmd, os.path.join(out, name + ".log"), args.threads)
    return os.path.join(out, name)


def control_arm(arm: str, seed: int, args, out: str) -> str:
    """The model folder of a control row (see CONTROLS); sft-more is trained here on first use."""
    reference = os.path.join(out, f"timerpo-s{seed}", "reference")
    if arm == "warm-up":
        return reference
    folder = os.path.join(out, f"sft-more-s{seed}")
    rl_seconds = sum(r["time_step"] for r in training_log(os.path.join(out, f"timerpo-s{seed}")))
    run([sys.executable, "bench/sft_control.py", "--model", reference, "--data", args.data, "--seed", str(seed),
         "--seconds", str(rl_seconds), "--out", folder], folder + ".log", args.threads)
    return folder


def eval_arm(run_dir: str, args) -> dict:
    out = run_dir + "-eval"
    if os.path.exists(os.path.join(out, "results.json")):  # finished before: read it back
        with open(os.path.join(out, "results.json")) as f:
            return json.load(f)
    run([sys.executable, "eval.py", "--model", run_dir, "--data", args.eval_data, "--limit", str(args.eval_limit),
         "--temperature", "0", "--max-new-tokens", str(train.TINY["max_new_tokens"]), "--out", out, "--no-progress"],
        run_dir + "-eval.log", args.threads)
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def training_log(run_dir: str) -> list[dict]:
    """The run's metrics.jsonl rows, one per RL step ([] for a control row, which has no RL)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single seed)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def last50(log: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in log[-50:]])) if log else float("nan")


def bootstrap_interval(values: list[float], level: float = 0.95, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (the seeds resampled with replacement)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(values), size=(resamples, len(values)))  # [resamples, n]
    means = np.asarray(values, dtype=float)[picks].mean(axis=1)  # [resamples]
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


PAIRED = (("Avg F1", "avg_group_f1"), ("Loc gain", "loc_gain"), ("Cls Acc", "cls_acc"))


def paired_differences(rows: dict) -> dict:
    """TimerPO − each other row, per seed, in points, for Avg F1, the localization gain and Cls Acc:
    {other: {metric: {"per_seed", "mean", "ci95"}}}, ci95 the 95 % percentile bootstrap interval of the mean."""
    out = {}
    for other in rows:
        if other == "timerpo" or "timerpo" not in rows:
            continue
        out[other] = {}
        for label, key in PAIRED:
            diff = [100 * (a[key] - b[key]) for a, b in zip(rows["timerpo"], rows[other])]
            out[other][label] = {"per_seed": diff, "mean": float(np.mean(diff)), "ci95": bootstrap_interval(diff)}
    return out


def paired_rows(paired: dict) -> list[str]:
    out = ["", "| paired difference (points) | metric | per seed | mean | 95 % bootstrap interval |",
           "|---|---|---|---|---|"]
    for other, metrics in paired.items():
        for label, d in metrics.items():
            lo, hi = d["ci95"]
            out.append(f"| timerpo − {other} | {label} | " + ", ".join(f"{x:+.1f}" for x in d["per_seed"])
                       + f" | {d['mean']:+.1f} | [{lo:+.1f}, {hi:+.1f}] |")
    return out


def smooth(values: np.ndarray, k: int = 10) -> np.ndarray:
    return np.convolve(values, np.ones(k) / k, mode="valid") if len(values) >= k else values


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)), help="seeds (8 in the report)")
    p.add_argument("--arms", nargs="+", default=list(ARMS) + list(CONTROLS), choices=list(ARMS) + list(CONTROLS),
                   help="arms to run; warm-up and sft-more are the no-RL reference and the more-SFT control")
    p.add_argument("--steps", type=int, default=train.TINY["steps"], help="RL steps per arm (equal budget)")
    p.add_argument("--data", default="data/train", help="training data folder")
    p.add_argument("--eval-data", default="data/test", help="held-out data folder (anomllm, seed 42)")
    p.add_argument("--eval-limit", type=int, default=400, help="held-out samples scored per final model")
    p.add_argument("--out", default="runs/ablation", help="folder for the runs")
    p.add_argument("--train-args", default="", help="extra train.py flags for every arm, e.g. '--eval-samples 16'")
    p.add_argument("--jobs", type=int, default=1, help="runs at the same time (2 on a 2-core machine)")
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results"), help="where the json/png go")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.results, exist_ok=True)
    arms = ["timerpo"] + [a for a in args.arms if a != "timerpo"]  # timerpo first: it makes the warm-up
    args.threads = 1 if args.jobs > 1 else None
    started, lock = time.time(), threading.Lock()
    tasks = [(arm, seed) for arm in arms for seed in args.seeds]  # arm-major: warm-ups come first
    futures = {}

    def one_arm(arm: str, seed: int) -> tuple[dict, list[float]]:
        if arm != "timerpo" and ("timerpo", seed) in futures:
            futures[("timerpo", seed)].result()  # this seed's warm-up must exist first
        t0 = time.time()
        run_dir = os.path.join(args.out, f"{arm}-s{seed}")
        if arm in CONTROLS:
            run_dir = control_arm(arm, seed, args, args.out)
        elif not os.path.exists(os.path.join(run_dir + "-eval", "results.json")):  # else: finished before
            train_arm(arm, seed, args, args.out)
        res = eval_arm(run_dir, args)
        with lock:
            print(f"[{arm} seed {seed}] {time.time() - t0:.0f} s  Avg F1 {res['summary']['avg_group_f1']:.3f}",
                  flush=True)
        return res["summary"], training_log(run_dir)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for task in tasks:
            futures[task] = pool.submit(one_arm, *task)
        done = {task: fut.result() for task, fut in futures.items()}
    rows = {arm: [done[(arm, s)][0] for s in args.seeds] for arm in arms}
    logs = {arm: [done[(arm, s)][1] for s in args.seeds] for arm in arms}

    # held-out: Cls Acc, the four groups, Avg F1 (%), outcome reward; training: the last 50 steps' mean
    # reward and share of groups whose G rewards were all equal (no learning signal from Â_main)
    table = ["| arm | Cls Acc | " + " | ".join(GROUPS) + " | Avg F1 | Loc gain | PW-F1 anom. | distinct answers "
             "| held-out reward | train reward, last 50 | zero-std groups, last 50 |", "|---" * (len(GROUPS) + 9) + "|"]
    report = {}
    for arm in arms:
        summ = rows[arm]
        cells = {"Cls Acc": [s["cls_acc"] for s in summ], "Avg F1": [s["avg_group_f1"] for s in summ],
                 "Loc gain": [s["loc_gain"] for s in summ], "PW-F1 anom.": [s["pw_f1_anomalous"] for s in summ],
                 "distinct": [s["distinct_intervals"] for s in summ],
                 "reward": [s["reward"] for s in summ],
                 "train reward last 50": [last50(log, "reward") for log in logs[arm]],
                 "zero-std last 50": [last50(log, "zero_std_frac") for log in logs[arm]]}
        cells.update({g: [s["groups"].get(g, float("nan")) for s in summ] for g in GROUPS})
        report[arm] = {k: dict(zip(("mean", "std"), spread(v)), values=v) for k, v in cells.items()}
        pct = lambda k: "{:.1f} ± {:.1f}".format(*(100 * x for x in spread(cells[k])))  # noqa: E731
        raw = lambda k: "" if np.isnan(cells[k]).all() else "{:.3f} ± {:.3f}".format(*spread(cells[k]))  # noqa: E731
        distinct = "{:.0f} ± {:.0f}".format(*spread(cells["distinct"]))
        table.append(f"| {arm} | {pct('Cls Acc')} | " + " | ".join(pct(g) for g in GROUPS)
                     + f" | {pct('Avg F1')} | {pct('Loc gain')} | {pct('PW-F1 anom.')} | {distinct} "
                       f"| {raw('reward')} | {raw('train reward last 50')} | {raw('zero-std last 50')} |")
    paired = paired_differences(rows)
    table += paired_rows(paired)
    print("\n".join(table))
    series = {}
    for arm, arm_logs in logs.items():
        if not all(arm_logs):
            continue
        mean = smooth(np.mean(np.array([[r["reward"] for r in log] for log in arm_logs]), axis=0))
        series[arm] = (list(range(1, len(mean) + 1)), mean.tolist())
    line_chart(series, os.path.join(args.results, "ablation_curves.png"),
               title=f"training reward (mean of {len(args.seeds)} seeds, 10-step moving average)")
    write_atomic(os.path.join(args.results, "ablation.json"),
                 json.dumps({"args": vars(args), "table": table, "arms": report, "paired": paired,
                             "wall_s_this_invocation": time.time() - started}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
