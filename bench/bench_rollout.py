"""Rollout throughput on the tiny model: completion tokens per second of step 1 (sampling), ours against an
earlier checkout of the project, in one process, alternating.

    python bench/bench_rollout.py --before /tmp/before     # /tmp/before: e.g. `git clone . /tmp/before` + checkout
    python bench/bench_rollout.py                          # this checkout alone (and with --compile)
    python bench/bench_rollout.py --reps 1 --steps 1 --warmup-steps 1 --warmup-vision-steps 0   # smoke run

Settings are train.py's tiny preset: 4 prompts x G = 5 completions per step, rollout batch 20, at most 72 new
tokens, temperature 1, states kept for TimerPO, on the warmed-up tiny model of bench/common.py that bench_step.py
and bench_trl.py start from (so completions end like answers do, not at the cap). Both sides sample the same steps with the same seeds; the earlier
checkout's `timerpo/rollout.py` is loaded under another module name and driven by the loop of its own
`algorithm.rollout` (a chunk of rollout-batch completions at a time). Repetitions alternate which side goes
first. Prints tokens/s per side, their ratio, and whether both sampled the same tokens; writes
bench/results/rollout.json.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import step_bench_parser, tiny_args, warm_tiny  # noqa: E402

import train  # noqa: E402
from timerpo.algorithm import chunks, rollout  # noqa: E402
from timerpo.files import write_atomic  # noqa: E402
from timerpo.policy import load_policy  # noqa: E402
from timerpo.rollout import completion_seed  # noqa: E402


def load_before(folder: str):
    """The earlier checkout's timerpo/rollout.py as module `before_rollout` (its own imports resolve to ours)."""
    spec = importlib.util.spec_from_file_location("before_rollout", os.path.join(folder, "timerpo", "rollout.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def before_rollout(module, policy, prompts, group_size, step, seed, max_new_tokens, batch_size, keep_states):
    """The earlier algorithm.rollout loop: completions in chunks of batch_size, seeded by their place in the run.
    Returns the completions' token lists."""
    jobs = [(p, k) for p in prompts for k in range(group_size)]
    policy.model.eval()
    out = []
    for chunk in chunks(jobs, batch_size):
        seeds = [completion_seed(seed, step, p.index, k) for p, k in chunk]
        rows = module.sample_completions(policy, [p.encoded for p, _ in chunk], seeds, max_new_tokens,
                                         with_states=keep_states)
        out += [row[0] for row in rows]
    return out


def main(argv=None) -> int:
    p = step_bench_parser(__doc__, "side", "rollout.json")
    p.add_argument("--before", default=None, help="folder of an earlier checkout to compare against")
    p.add_argument("--compile", action="store_true", help="also time ours with the compiled decode step")
    args = p.parse_args(argv)
    model_dir = warm_tiny(args.data, args.seed, args.warmup_steps, args.cache, args.warmup_vision_steps)
    targs = tiny_args(model_dir, args.data, args.seed)
    samples = train.ensure_data(args.data, 3407, progress=False)
    policy = load_policy(model_dir, seed=args.seed)
    steps = [[train.make_prompt(policy, args.data, samples, i, targs.cot)
              for i in train.step_prompt_indices(len(samples), targs.prompts_per_step, s, args.seed)]
             for s in range(args.steps)]
    common = dict(group_size=targs.group_size, seed=args.seed, max_new_tokens=targs.max_new_tokens,
                  batch_size=targs.rollout_batch, keep_states=True)

    def ours(compiled: bool):
        policy.compile_decode = compiled
        return lambda prompts, s: [ep.completion_ids for ep in rollout(policy, prompts, step=s, **common)]

    sides = {"ours": ours(False)}
    if args.compile:
        sides["ours-compiled"] = ours(True)
    if args.before:
        module = load_before(args.before)
        sides["before"] = lambda prompts, s: before_rollout(module, policy, prompts, step=s, **common)
    # one untimed pass per side: lazy initialisation, and torch.compile's compilation for the compiled side
    first = {}
    for name, run in sides.items():
        t0 = time.perf_counter()
        first[name] = [run(prompts, s) for s, prompts in enumerate(steps)]
        print(f"[untimed first pass] {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    rates = {name: [] for name in sides}
    for rep in range(args.reps):
        order = list(sides) if rep % 2 == 0 else list(sides)[::-1]
        for name in order:
            t0 = time.perf_counter()
            tokens = sum(len(ids) for s, prompts in enumerate(steps) for ids in sides[name](prompts, s))
            rates[name].append(tokens / (time.perf_counter() - t0))
        print(f"[rep {rep + 1}/{args.reps}] " + "  ".join(f"{n} {rates[n][-1]:.0f} tok/s" for n in order), flush=True)
    summary = {name: {"median_tokens_per_s": statistics.median(r), "tokens_per_s": r} for name, r in rates.items()}
    print(f"\ncompletion tokens/s of the rollout, tiny model, {torch.get_num_threads()} torch threads, "
          f"{args.reps} reps x {args.steps} steps ({targs.prompts_per_step} prompts x {targs.group_size}, "
          f"batch {targs.rollout_batch}, <= {targs.max_new_tokens} tokens)")
    for name, row in summary.items():
        print(f"  {name:14s} {row['median_tokens_per_s']:.0f} tok/s (median)")
    report = {"args": vars(args), "torch_threads": torch.get_num_threads(), "sides": summary}
    if args.before:
        ratio = summary["ours"]["median_tokens_per_s"] / summary["before"]["median_tokens_per_s"]
        same = first["ours"] == first["before"]
        print(f"  ratio ours/before: {ratio:.2f}   same completions: {'yes' if same else 'no'}")
        report.update(ratio_vs_before=ratio, same_completions=same)
    if args.compile:
        same = first["ours"] == first["ours-compiled"]
        print(f"  compiled/eager: {summary['ours-compiled']['median_tokens_per_s'] / summary['ours']['median_tokens_per_s']:.2f}"
              f"   same completions: {'yes' if same else 'no'}")
        report.update(compiled_same_completions=same)
    write_atomic(args.results, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
