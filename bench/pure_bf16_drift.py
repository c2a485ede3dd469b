"""How far `--pure-bf16` (bf16 weights and AdamW moments, stochastic rounding) drifts from the paper's fp32 master
weights, on the tiny model after train.py's warm-up.

    python bench/pure_bf16_drift.py                   # 10 RL steps at the tiny preset's lr and the paper's
    python bench/pure_bf16_drift.py --steps 3 --lrs 1e-4

From the same warmed-up start, train.py's RL step (tiny preset: 4 prompts x 5 completions, 72 new tokens, β > 0)
runs three ways: `--dtype fp32` (fp32 throughout), `--dtype bf16` (the paper's precision: fp32 master weights,
bf16 compute, bf16 rollout copy) and `--pure-bf16`. Printed and saved (bench/results/pure_bf16_drift.json) per lr:
each step's loss, reward, KL and gradient norm, and after the last step the weights' max and RMS difference
between runs, beside the size of the update itself (the fp32-master run's weights minus the start). The
difference between `--dtype bf16` and `--dtype fp32` is the drift bf16 compute alone causes; between
`--pure-bf16` and `--dtype bf16` it is what dropping the master weights adds. Completions are sampled with
the same streams in every run, so they differ only where the weights have moved a token's draw.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import train  # noqa: E402
from common import tiny_args, warm_tiny  # noqa: E402
from timerpo.algorithm import make_prompt  # noqa: E402
from timerpo.distributed import SINGLE, prepare_policy  # noqa: E402
from timerpo.files import write_atomic  # noqa: E402
from timerpo.policy import load_policy  # noqa: E402
from timerpo.precision import DTYPES  # noqa: E402

MODES = {"fp32": ["--dtype", "fp32"], "bf16-master": ["--dtype", "bf16"], "pure-bf16": ["--pure-bf16"]}
LOGGED = ("loss", "kl", "grad_norm", "entropy")


def run(start: str, data: str, seed: int, steps: int, lr: float, flags: list[str]) -> dict:
    """`steps` RL steps of train.py from `start`; the per-step numbers and the final weights (fp32)."""
    config = tiny_args(start, data, seed, flags + ["--lr", str(lr)])
    samples = train.ensure_data(data, 3407, progress=False)
    policy = load_policy(start, seed=seed)
    prepare_policy(policy, SINGLE, dtype=DTYPES[config.dtype], pure=config.pure_bf16)
    ref = train.make_reference(policy, start, config) if config.beta > 0 else None
    optimizer = train.make_optimizer(policy, config)
    rows, t0 = [], time.time()
    for step in range(steps):
        indices = train.step_prompt_indices(len(samples), config.prompts_per_step, step, seed)
        prompts = [make_prompt(policy, data, samples, i, config.cot) for i in indices]
        episodes, _, update, _ = train.rl_step(policy, ref, optimizer, prompts, step, config)
        rows.append({"step": step + 1, "reward": sum(ep.reward.total for ep in episodes) / len(episodes),
                     **{k: update[k] for k in LOGGED}})
    weights = {n: p.detach().float().clone() for n, p in policy.model.named_parameters()}
    return {"rows": rows, "weights": weights, "seconds": time.time() - t0}


def differences(a: dict, b: dict) -> dict:
    """Max and RMS over all weights of a − b."""
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a])
    return {"max_abs": diff.abs().max().item(), "rms": diff.pow(2).mean().sqrt().item()}


def rounded(weights: dict) -> dict:
    """The weights rounded to nearest bf16 (what a bf16 export of them holds), as fp32."""
    return {k: v.to(torch.bfloat16).float() for k, v in weights.items()}


def update_agreement(new: dict, start: dict, ref_new: dict, ref_start: dict) -> dict:
    """How one run's update (new − start) compares with a reference run's: cosine of the two, and the norm
    of their difference over the reference update's norm."""
    mine = torch.cat([(new[k] - start[k]).flatten() for k in new]).double()
    ref = torch.cat([(ref_new[k] - ref_start[k]).flatten() for k in ref_new]).double()
    return {"cosine": torch.nn.functional.cosine_similarity(mine, ref, dim=0).item(),
            "relative_error": ((mine - ref).norm() / ref.norm()).item()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="RL steps per run (10)")
    p.add_argument("--lrs", type=float, nargs="+", default=[train.TINY["lr"], 1e-6],
                   help="learning rates: the tiny preset's and the paper's")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "train"), help="training data folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: leave the other core to others)")
    p.add_argument("--results", default=os.path.join(HERE, "results", "pure_bf16_drift.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = warm_tiny(args.data, args.seed, train.TINY["warmup_steps"])
    start_weights = {n: t.float() for n, t in load_policy(start, seed=args.seed).model.named_parameters()}
    results = {"command": "python bench/pure_bf16_drift.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, CPU",
               "start": os.path.relpath(start, ROOT), "steps": args.steps, "by_lr": {}}
    for lr in args.lrs:
        runs = {name: run(start, args.data, args.seed, args.steps, lr, flags) for name, flags in MODES.items()}
        w = {name: r["weights"] for name, r in runs.items()}
        update = differences(w["bf16-master"], start_weights)
        entry = {
            "update_size": update,
            "start_cast_to_bf16": differences(rounded(start_weights), start_weights),
            "pure_vs_master": differences(w["pure-bf16"], w["bf16-master"]),
            "pure_vs_master_rounded": differences(w["pure-bf16"], rounded(w["bf16-master"])),
            "master_vs_fp32": differences(w["bf16-master"], w["fp32"]),
            "pure_vs_fp32": differences(w["pure-bf16"], w["fp32"]),
            # the pure run starts from the start weights cast to bf16
            "pure_update_vs_master_update": update_agreement(w["pure-bf16"], rounded(start_weights),
                                                             w["bf16-master"], start_weights),
            "master_update_vs_fp32_update": update_agreement(w["bf16-master"], start_weights, w["fp32"],
                                                             start_weights),
            "steps": {name: r["rows"] for name, r in runs.items()},
            "seconds": {name: round(r["seconds"], 1) for name, r in runs.items()},
        }
        last = {name: r["rows"][-1] for name, r in runs.items()}
        entry["last_step"] = last
        results["by_lr"][f"{lr:g}"] = entry
        print(f"lr {lr:g}: update max {update['max_abs']:.3g} rms {update['rms']:.3g} | pure vs fp32-master "
              f"max {entry['pure_vs_master']['max_abs']:.3g} rms {entry['pure_vs_master']['rms']:.3g} | "
              f"bf16-master vs fp32 max {entry['master_vs_fp32']['max_abs']:.3g} "
              f"rms {entry['master_vs_fp32']['rms']:.3g} | start cast to bf16 max "
              f"{entry['start_cast_to_bf16']['max_abs']:.3g} rms {entry['start_cast_to_bf16']['rms']:.3g}")
        agree, base = entry["pure_update_vs_master_update"], entry["master_update_vs_fp32_update"]
        print(f"  update of pure-bf16 against fp32-master's: cosine {agree['cosine']:.3f}, relative error "
              f"{agree['relative_error']:.3f} (bf16-master against fp32: {base['cosine']:.3f}, "
              f"{base['relative_error']:.3f})")
        for name, row in last.items():
            print(f"  {name:12s} step {row['step']}: loss {row['loss']:+.5f} kl {row['kl']:.3g} reward "
                  f"{row['reward']:.3f} grad norm {row['grad_norm']:.4f}")
        write_atomic(args.results, json.dumps(results, indent=1))
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
