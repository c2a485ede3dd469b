"""Small-scale ablation (the paper's Table 2 at tiny scale): timerpo, grpo, no-projection and gencot.

For each seed the `timerpo` arm runs the default pipeline (supervised warm-up, then RL) and keeps its
post-warm-up model in runs/<arm>/reference/; the other three arms start RL from that very model, so all
arms of a seed share one warm-up and differ only in the advantage / OT target. Every arm gets the same
number of RL steps. Each final checkpoint is then scored by eval.py on a held-out anomllm subset.

    python bench/ablation.py --seeds 0 1 2 --steps 150
Prints one markdown table (mean ± std over seeds) and writes bench/results/ablation.json and
bench/results/ablation_curves.png (training reward per step, mean over seeds, smoothed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
from timerpo.plots import line_chart  # noqa: E402

ARMS = {  # arm -> train.py flags
    "timerpo": ["--advantage", "timerpo", "--cot", "expcot"],
    "grpo": ["--advantage", "grpo", "--cot", "expcot"],
    "no-projection": ["--advantage", "no-projection", "--cot", "expcot"],
    "gencot": ["--advantage", "timerpo", "--cot", "gencot"],
}
GROUPS = ("Frequency", "Trend", "Range", "Point")


def tiny_flags() -> list[str]:
    """The tiny preset spelled out, for arms that start from a folder (which would get the paper preset)."""
    out = []
    for key, value in train.TINY.items():
        if key in ("warmup_steps",):
            continue
        out += ["--" + key.replace("_", "-"), str(value)]
    return out


def run(cmd: list[str], log: str) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def train_arm(arm: str, seed: int, args, out: str) -> str:
    name = f"{arm}-s{seed}"
    base = [sys.executable, "train.py", "--data", args.data, "--eval-data", args.eval_data, "--out", out,
            "--name", name, "--seed", str(seed), "--steps", str(args.steps), "--no-progress", *ARMS[arm]]
    if arm != "timerpo":
        warm = os.path.join(out, f"timerpo-s{seed}", "reference")
        base += tiny_flags() + ["--model", warm, "--warmup-steps", "0", "--steps", str(args.steps)]
    run(base, os.path.join(out, name + ".log"))
    return os.path.join(out, name)


def eval_arm(run_dir: str, args) -> dict:
    out = run_dir + "-eval"
    run([sys.executable, "eval.py", "--model", run_dir, "--data", args.eval_data, "--limit", str(args.eval_limit),
         "--temperature", "0", "--max-new-tokens", str(train.TINY["max_new_tokens"]), "--out", out, "--no-progress"],
        run_dir + "-eval.log")
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def curve(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["reward"] for line in f if line.strip()]


def smooth(values: np.ndarray, k: int = 10) -> np.ndarray:
    return np.convolve(values, np.ones(k) / k, mode="valid") if len(values) >= k else values


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (3 in the report)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="arms to run")
    p.add_argument("--steps", type=int, default=train.TINY["steps"], help="RL steps per arm (equal budget)")
    p.add_argument("--data", default="data/train", help="training data folder")
    p.add_argument("--eval-data", default="data/test", help="held-out data folder (anomllm, seed 42)")
    p.add_argument("--eval-limit", type=int, default=400, help="held-out samples scored per final model")
    p.add_argument("--out", default="runs/ablation", help="folder for the runs")
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results"), help="where the json/png go")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.results, exist_ok=True)
    arms = ["timerpo"] + [a for a in args.arms if a != "timerpo"]  # timerpo first: it makes the warm-up
    rows, curves, started = {}, {}, time.time()
    for arm in arms:  # arm-major: every seed's timerpo run (and its warm-up) comes first
        for seed in args.seeds:
            t0 = time.time()
            run_dir = train_arm(arm, seed, args, args.out)
            res = eval_arm(run_dir, args)
            rows.setdefault(arm, []).append(res["summary"])
            curves.setdefault(arm, []).append(curve(run_dir))
            print(f"[{arm} seed {seed}] {time.time() - t0:.0f} s  aff-F1 {res['summary']['aff_f1']:.3f}", flush=True)

    table = ["| arm | Cls Acc | " + " | ".join(GROUPS) + " | Avg F1 | reward |", "|---" * (len(GROUPS) + 4) + "|"]
    report = {}
    for arm in arms:
        summ = rows[arm]
        cells = {"Cls Acc": [s["cls_acc"] for s in summ], "Avg F1": [s["avg_group_f1"] for s in summ],
                 "reward": [s["reward"] for s in summ]}
        cells.update({g: [s["groups"].get(g, float("nan")) for s in summ] for g in GROUPS})
        report[arm] = {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": v} for k, v in cells.items()}
        fmt = lambda k: f"{100 * np.mean(cells[k]):.1f} ± {100 * np.std(cells[k]):.1f}"  # noqa: E731
        table.append(f"| {arm} | {fmt('Cls Acc')} | " + " | ".join(fmt(g) for g in GROUPS)
                     + f" | {fmt('Avg F1')} | {np.mean(cells['reward']):.3f} ± {np.std(cells['reward']):.3f} |")
    print("\n".join(table))
    series = {}
    for arm, cs in curves.items():
        mean = smooth(np.mean(np.array(cs), axis=0))
        series[arm] = (list(range(1, len(mean) + 1)), mean.tolist())
    line_chart(series, os.path.join(args.results, "ablation_curves.png"),
               title=f"training reward (mean of {len(args.seeds)} seeds, 10-step moving average)")
    with open(os.path.join(args.results, "ablation.json"), "w") as f:
        json.dump({"args": vars(args), "table": table, "arms": report,
                   "wall_s": time.time() - started}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
