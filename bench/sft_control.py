"""The control of the RL phase: the supervised warm-up continued for the same wall time instead of RL.

    python bench/sft_control.py --model runs/ablation/timerpo-s0/reference --seconds 300 --out DIR

Loads a post-warm-up model, times a few answer-warm-up steps (train.py's recipe: answer loss plus the
plot-reading loss), runs as many more as fill `--seconds`, and saves the model to --out (hub format, so
eval.py scores it like any checkpoint). bench/ablation.py runs it as the `sft-more` arm with the RL
phase's measured wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data_gen  # noqa: E402
import train  # noqa: E402
from timerpo.files import write_atomic  # noqa: E402
from timerpo.policy import load_policy, save_policy  # noqa: E402
from timerpo.warmup import supervised_warmup  # noqa: E402

PROBE_STEPS = 10


def warmup_recipe(model: str) -> dict:
    """supervised_warmup's settings of the run that made `model` (its run_config.json, one folder up), else
    the tiny preset's."""
    config = os.path.join(os.path.dirname(os.path.abspath(model)), "run_config.json")
    saved = {}
    if os.path.exists(config):
        with open(config) as f:  # a run older than a warm-up target ran without it
            saved = {"warmup_position": 0.0, "warmup_copy": 0.0, **json.load(f)}
    return train.warmup_targets(train.make_config({"model": "tiny"} if not saved else {}, saved))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="post-warm-up model folder")
    p.add_argument("--data", default="data/train", help="training data folder")
    p.add_argument("--seconds", type=float, required=True, help="wall time to fill (the RL phase's)")
    p.add_argument("--out", required=True, help="where the continued model goes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if os.path.exists(os.path.join(args.out, "config.json")):
        print(f"{args.out} exists: nothing to do")
        return 0
    samples = data_gen.load_samples(args.data)
    policy = load_policy(args.model, seed=args.seed)
    recipe = warmup_recipe(args.model)  # the same targets and weights as the warm-up it continues
    t0 = time.time()
    losses = supervised_warmup(policy, args.data, samples, PROBE_STEPS, 8, seed=args.seed + 100, progress=False,
                               **recipe)
    per_step = (time.time() - t0) / PROBE_STEPS
    more = max(0, round(args.seconds / per_step) - PROBE_STEPS)
    losses += supervised_warmup(policy, args.data, samples, more, 8, seed=args.seed + 101, progress=False,
                                **recipe)
    save_policy(policy, args.out)
    info = {"steps": PROBE_STEPS + more, "seconds": time.time() - t0, "target_seconds": args.seconds,
            "final_loss": losses[-1] if losses else None}
    write_atomic(os.path.join(args.out, "control.json"), json.dumps(info, indent=1))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
