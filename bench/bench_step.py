"""Step profile of our loop on the tiny model with train.py's defaults: where a step's time goes.

    python bench/bench_step.py                    # 3 repetitions x 10 steps per mode, alternating
    python bench/bench_step.py --reps 1 --steps 2 --warmup-steps 1   # smoke run

Runs TimerPO (the default) and `--advantage grpo` on the same warmed-up tiny model (bench/common.py),
alternating repetitions so that both see the same machine. Phases per step: rollout (sampling with the
KV cache; TimerPO also keeps the states), reference (the reference forward for the KL), grounding (ExpCoT states
of the current policy + Sinkhorn; TimerPO only), update (forward + backward + AdamW), other (building prompts,
parsing and scoring, advantages). The first step of each repetition is left out.

Every figure is given twice: wall seconds, and CPU seconds of this process. On a shared machine other
processes inflate wall time far more than CPU time (one torch thread: CPU time is the work done), so under
load the CPU figures are the ones to compare; the JSON records the load averages before and after.
Prints one table and writes bench/results/step_profile.json.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OurLoop, machine_load, peak_rss_mb, step_bench_parser, warm_tiny  # noqa: E402

from timerpo.files import write_atomic  # noqa: E402

MODES = {"timerpo": [], "grpo": ["--advantage", "grpo"]}
PHASES = ("rollout", "reference", "grounding", "update", "other")


def profile(records) -> dict:
    """Mean seconds per phase and per step (wall and CPU), median step, and completion tokens per second."""
    walls = [r.wall for r in records]
    tokens = sum(r.tokens for r in records)
    out = {f"{ph}_s": statistics.fmean(r.phases.get(ph, 0.0) for r in records) for ph in PHASES}
    out.update({f"{ph}_cpu_s": statistics.fmean(r.cpu_phases.get(ph, 0.0) for r in records) for ph in PHASES})
    out.update({"step_s": statistics.fmean(walls), "median_step_s": statistics.median(walls),
                "step_cpu_s": statistics.fmean(r.cpu for r in records),
                "median_step_cpu_s": statistics.median(r.cpu for r in records),
                "tokens_per_s_rollout": tokens / sum(r.phases["rollout"] for r in records),
                "tokens_per_s_step": tokens / sum(walls),
                "completion_tokens": tokens / sum(r.completions for r in records),
                "reward": statistics.fmean(r.reward for r in records), "steps": len(records)})
    return out


def print_table(prof: dict, unit: str, key: str) -> None:
    """One markdown table of mean seconds per phase; `key` is "" (wall) or "_cpu" (CPU)."""
    cols = [(ph, f"{ph}{key}_s") for ph in PHASES] + [("mean step", f"step{key}_s"),
                                                       ("median step", f"median_step{key}_s")]
    print(f"\n{unit} seconds per step")
    print("| mode | " + " | ".join(c for c, _ in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for mode, pr in prof.items():
        print(f"| {mode} | " + " | ".join(f"{pr[k]:.3f}" for _, k in cols) + " |")


def extra_cost(prof: dict, key: str) -> dict:
    """TimerPO's step over GRPO's, and the grounding phase's share of TimerPO's step."""
    t, g = prof["timerpo"], prof["grpo"]
    return {"step_ratio": t[f"step{key}_s"] / g[f"step{key}_s"],
            "median_step_ratio": t[f"median_step{key}_s"] / g[f"median_step{key}_s"],
            "grounding_share": t[f"grounding{key}_s"] / t[f"step{key}_s"]}


def main() -> int:
    args = step_bench_parser(__doc__, "mode", "step_profile.json").parse_args()
    model_dir = warm_tiny(args.data, args.seed, args.warmup_steps, args.cache, args.warmup_vision_steps)
    load_before = machine_load()
    kept = {mode: [] for mode in MODES}
    for rep in range(args.reps):
        for mode in (list(MODES) if rep % 2 == 0 else list(MODES)[::-1]):
            t0 = time.time()
            loop = OurLoop(model_dir, args.data, args.seed, MODES[mode])
            records = [loop.run_step() for _ in range(args.steps)]
            kept[mode] += records[1:] or records
            print(f"[rep {rep + 1}/{args.reps}] {mode:7s}: {args.steps} steps in {time.time() - t0:.1f} s", flush=True)
    load_after = machine_load()
    prof = {mode: profile(recs) for mode, recs in kept.items()}
    print(f"\ntiny model, {torch.get_num_threads()} torch threads ({args.reps} reps x {args.steps} steps, first step "
          f"of each rep left out); load average {load_before['loadavg'][0]:.1f} -> {load_after['loadavg'][0]:.1f} on "
          f"{load_before['cpus']} CPUs")
    print_table(prof, "wall", "")
    print_table(prof, "CPU", "_cpu")
    wall, cpu = extra_cost(prof, ""), extra_cost(prof, "_cpu")
    for name, e in (("wall", wall), ("CPU", cpu)):
        print(f"{name:4s}: step ratio timerpo/grpo {e['step_ratio']:.3f} (medians {e['median_step_ratio']:.3f}), "
              f"grounding {100 * e['grounding_share']:.1f} % of the TimerPO step")
    print(f"tokens per completion: timerpo {prof['timerpo']['completion_tokens']:.1f}, grpo "
          f"{prof['grpo']['completion_tokens']:.1f}   peak RSS {peak_rss_mb():.0f} MiB")
    under_load = load_before["under_load"] or load_after["under_load"]
    write_atomic(args.results, json.dumps({
        "args": vars(args), "torch_threads": torch.get_num_threads(), "profile": prof,
        "extra_cost_wall": wall, "extra_cost_cpu": cpu, "grounding_share": wall["grounding_share"],
        "machine": {"before": load_before, "after": load_after, "under_load": under_load,
                    "note": "other processes shared the CPUs: compare the CPU figures" if under_load else
                            "the machine was not loaded: wall and CPU figures agree"},
        "peak_rss_mib": peak_rss_mb()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
