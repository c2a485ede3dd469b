"""Step profile of our loop on the tiny model with train.py's defaults: where a step's wall time goes.

    python bench/bench_step.py                    # 3 repetitions x 10 steps per mode, alternating
    python bench/bench_step.py --reps 1 --steps 2 --warmup-steps 1   # smoke run

Runs TimerPO (the default) and `--advantage grpo` on the same warmed-up tiny model (bench/common.py),
alternating repetitions so that both see the same machine. Phases per step: rollout (sampling with the
KV cache), forward (the no-grad forward for old log-probs and hidden states, TimerPO only, plus the
reference forward for the KL), grounding (ExpCoT states of the current policy + Sinkhorn; TimerPO only), update
(forward + backward + AdamW), other (building prompts, parsing and scoring, advantages). The first step of
each repetition is left out. Prints one table and writes bench/results/step_profile.json.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OurLoop, peak_rss_mb, step_bench_parser, warm_tiny  # noqa: E402

from timerpo.files import write_atomic  # noqa: E402

MODES = {"timerpo": [], "grpo": ["--advantage", "grpo"]}
PHASES = ("rollout", "forward", "grounding", "update", "other")


def profile(records) -> dict:
    """Mean seconds per phase and per step, median step, and completion tokens per second."""
    walls = [r.wall for r in records]
    tokens = sum(r.tokens for r in records)
    out = {f"{ph}_s": statistics.fmean(r.phases.get(ph, 0.0) for r in records) for ph in PHASES}
    out.update({"step_s": statistics.fmean(walls), "median_step_s": statistics.median(walls),
                "tokens_per_s_rollout": tokens / sum(r.phases["rollout"] for r in records),
                "tokens_per_s_step": tokens / sum(walls),
                "completion_tokens": tokens / sum(r.completions for r in records),
                "reward": statistics.fmean(r.reward for r in records), "steps": len(records)})
    return out


def main() -> int:
    args = step_bench_parser(__doc__, "mode", "step_profile.json").parse_args()
    model_dir = warm_tiny(args.data, args.seed, args.warmup_steps, args.cache, args.warmup_vision_steps)
    kept = {mode: [] for mode in MODES}
    for rep in range(args.reps):
        for mode in (list(MODES) if rep % 2 == 0 else list(MODES)[::-1]):
            t0 = time.time()
            loop = OurLoop(model_dir, args.data, args.seed, MODES[mode])
            records = [loop.run_step() for _ in range(args.steps)]
            kept[mode] += records[1:] or records
            print(f"[rep {rep + 1}/{args.reps}] {mode:7s}: {args.steps} steps in {time.time() - t0:.1f} s", flush=True)
    prof = {mode: profile(recs) for mode, recs in kept.items()}
    cols = [("rollout", "rollout_s"), ("forward", "forward_s"), ("grounding", "grounding_s"), ("update", "update_s"),
            ("other", "other_s"), ("mean step", "step_s"), ("median step", "median_step_s")]
    print(f"\nseconds per step, tiny model, {torch.get_num_threads()} torch threads "
          f"({args.reps} reps x {args.steps} steps, first step of each rep left out)")
    print("| mode | " + " | ".join(c for c, _ in cols) + " | tokens/s (rollout) | tokens/s (step) | tokens/completion |")
    print("|---" * (len(cols) + 4) + "|")
    for mode, pr in prof.items():
        print(f"| {mode} | " + " | ".join(f"{pr[k]:.3f}" for _, k in cols)
              + f" | {pr['tokens_per_s_rollout']:.0f} | {pr['tokens_per_s_step']:.0f} | {pr['completion_tokens']:.1f} |")
    extra = prof["timerpo"]["grounding_s"] / prof["timerpo"]["step_s"]
    print(f"\nTimerPO grounding share of its step: {100 * extra:.1f} %   "
          f"step ratio timerpo/grpo: {prof['timerpo']['step_s'] / prof['grpo']['step_s']:.3f}   "
          f"peak RSS {peak_rss_mb():.0f} MiB")
    write_atomic(args.results, json.dumps({"args": vars(args), "torch_threads": torch.get_num_threads(),
                                           "profile": prof, "grounding_share": extra,
                                           "peak_rss_mib": peak_rss_mb()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
