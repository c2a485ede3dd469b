"""TimerPO training: `python train.py` (tiny model, CPU, minutes) or `python train.py --model qwen2.5-vl-3b`.

Reads top to bottom: configuration → data → policy → (tiny only) supervised format warm-up → RL loop.
Each RL step is the five functions of timerpo/algorithm.py:
    rollout → score_outcomes → ground_completions (TimerPO) + reference_logprobs (β > 0) → compute_advantages
    → update_policy
Outputs go to runs/<name>/: metrics.jsonl (one line per step), eval.jsonl (one line per held-out eval),
curves.png, and atomic checkpoints ckpt-<step>/ (hub format model + optimizer/RNG) named by `latest`.

Several processes: `torchrun --nproc_per_node=N train.py --dist ddp|fsdp ...` (timerpo/distributed.py).
--prompts-per-step stays the GLOBAL batch (split evenly over ranks, whole groups per rank); --micro-batch and
--rollout-batch are per rank. The update equals the 1-process one on the same global batch; rank 0 logs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch
from tqdm import tqdm

import data_gen
from timerpo.advantage import TSR_NORMS
from timerpo.algorithm import (Prompt, compute_advantages, ground_completions, make_prompt, reference_logprobs,
                               rollout, score_outcomes, target_states, update_policy)
from timerpo.checkpoint import (CheckpointError, append_jsonl, latest_checkpoint, load_trainer_state,
                                restore_optimizer, save_checkpoint, set_rng_state)
from timerpo.distributed import (DIST_MODES, SINGLE, Dist, DistError, fail_fast, full_params, init_distributed,
                                 maybe_inject_failure, prepare_policy, rank_slice)
from timerpo.evaluate import predict, summarize
from timerpo.files import write_atomic
from timerpo.plots import line_chart
from timerpo.policy import ModelNotFound, Policy, load_policy, save_policy
from timerpo.precision import DTYPES, default_dtype, enable_tf32
from timerpo.reward import LOC_MODES
from timerpo.rollout import decode_bytes_per_row, rollout_batch_for_memory
from timerpo.warmup import supervised_warmup

# ---------------------------------------------------------------------------------------------------
# Configuration: paper values for the Qwen models (method.md §18), small ones for the tiny model.
# Every value can be overridden by the flag of the same name.

PAPER = dict(steps=250, prompts_per_step=128, group_size=5, max_new_tokens=1024, lr=1e-6, warmup_steps=0,
             warmup_vision_steps=0, warmup_aux_weight=0.0, warmup_lr=0.0, eval_every=25, eval_samples=256,
             save_every=25, micro_batch=4, rollout_batch=0,
             eval_temperature=0.4)
TINY = dict(steps=100, prompts_per_step=4, group_size=5, max_new_tokens=72, lr=1e-4, warmup_steps=300,
            warmup_vision_steps=150, warmup_aux_weight=1.0, warmup_lr=2e-3, eval_every=50, eval_samples=128,
            save_every=50, micro_batch=20, rollout_batch=20, eval_temperature=0.4)
# `--preset tiny-long`: the same recipe with a longer warm-up (~16 min on 2 cores); it is the one that
# clears Avg F1 60 on the test split (README, Results).
TINY_LONG = dict(TINY, warmup_steps=400, warmup_vision_steps=200)
PRESETS = {"paper": PAPER, "tiny": TINY, "tiny-long": TINY_LONG}
SHARED = dict(alpha=0.3, beta=0.001, entropy_coef=0.001, clip_eps=0.2, tau=0.5, ot_eps=0.08, ot_iters=50,
              weight_decay=0.01, max_grad_norm=1.0, expcot_max_tokens=512, adv_norm="std",
              loc_reward="six-mean", tsr_norm="std", tsr_floor=0.05)

HELP = {
    "model": "tiny (embedded, built locally, CPU) | qwen2.5-vl-3b | qwen2.5-vl-7b | a hub id | a local folder",
    "data": "training data folder (generated on first use: anomllm suite, 400 per family, seed 3407)",
    "eval_data": "held-out data folder (generated on first use: anomllm suite, seed 42)",
    "out": "parent folder of run folders",
    "name": "run name (default: <model>-<advantage>-<cot>-<grounding>-s<seed>)",
    "steps": "RL steps (paper: 250 = 10 epochs of 3,200 prompts at 128 per step; tiny: 100)",
    "prompts_per_step": "distinct prompts per step (paper: 128; tiny: 4)",
    "group_size": "completions per prompt, G (paper: 5)",
    "max_new_tokens": "completion length cap (paper: 1024; tiny: 72)",
    "lr": "AdamW learning rate, constant (paper: 1e-6; tiny: 1e-4)",
    "alpha": "weight α of the projected grounded advantage (paper: 0.3)",
    "advantage": "timerpo (A = Â_main + α·Â⊥_TsR) | grpo (α = 0) | no-projection (A = Â_main + α·Â_TsR)",
    "cot": "OT target text: expcot (expert chain of thought) | gencot (generic, the 'w/o ExpCoT' ablation)",
    "grounding": "ot (entropic OT cost W, s = exp(−W/τ)) | cosine (mean-pooled cosine similarity)",
    "preset": "default values of the [default by model] flags: paper (Qwen models), tiny (the CPU default, "
              "~12 min on 2 cores), tiny-long (longer warm-up, ~16 min); default: tiny for "
              "--model tiny, paper otherwise",
    "seed": "seed of the run (prompt order, sampling streams, tiny weights)",
    "resume": "continue runs/<name> from its latest checkpoint",
    "trust_checkpoint": "with --resume: also load a checkpoint of the older format, whose trainer_state.pt and "
                        "optimizer/.metadata are pickles that can run code (only for runs you made yourself)",
    "eval_every": "held-out evaluation every N steps, and once before RL (paper: 25; tiny: 50)",
    "eval_samples": "held-out samples per evaluation, balanced over families (Qwen: 256; tiny: 128)",
    "eval_temperature": "sampling temperature of held-out evaluation (paper validation: 0.4)",
    "save_every": "checkpoint every N steps (and at the end)",
    "warmup_steps": "supervised warm-up steps on the true answers before RL (tiny: 300; tiny-long: 400; "
                    "Qwen Instruct: 0, they follow the format)",
    "warmup_vision_steps": "plot-reading warm-up steps before those, vision tower only (tiny: 150; tiny-long: "
                           "200; Qwen: 0)",
    "warmup_aux_weight": "weight of the plot-reading loss beside the answer loss in the warm-up (tiny: 1.0)",
    "warmup_lr": "learning rate of the supervised warm-up (tiny: 2e-3)",
    "beta": "KL coefficient β, k3 estimator (paper: 0.001; 0 skips loading the reference)",
    "entropy_coef": "entropy bonus coefficient (paper: 0.001)",
    "clip_eps": "PPO clip ϵ (paper: 0.2)",
    "tau": "temperature τ of the grounded reward s = exp(−W/τ) (paper: 0.5)",
    "ot_eps": "Sinkhorn entropic regularization ε (paper: 0.08)",
    "ot_iters": "Sinkhorn iterations (paper: 50)",
    "adv_norm": "group normalization: std (paper text: (R − mean)/(std + δ)) | mean (public code: R − mean)",
    "tsr_norm": "normalization of the grounded advantage Â_TsR: std (paper reading, as Â_main) | mean | "
                "std-floor (divide by max(std_G s, --tsr-floor), so Sinkhorn-noise spreads stay small)",
    "tsr_floor": "floor on std_G s for --tsr-norm std-floor",
    "loc_reward": "localization reward: six-mean (public release) | aff-f1 (affiliation F1 alone)",
    "weight_decay": "AdamW weight decay (paper: 0.01)",
    "max_grad_norm": "gradient-norm clip (paper: 1.0)",
    "expcot_max_tokens": "ExpCoT tokens kept for the OT (paper: 512)",
    "micro_batch": "completions per forward/backward; gradients accumulate exactly (Qwen: 4; tiny: 20)",
    "rollout_batch": "completions sampled together per rank (tiny: 20; Qwen: 0 = auto: on CUDA as many as the free "
                     "memory holds, up to all of the rank's completions of a step; 64 on CPU)",
    "device": "cpu | cuda (default: cuda when available)",
    "no_progress": "no progress bars",
    "dist": "none (one process) | ddp (full model per rank) | fsdp (FSDP2-sharded); under torchrun with "
            "WORLD_SIZE > 1, none means ddp",
    "dist_timeout": "seconds any collective may wait for the other ranks before the job fails",
    "grad_checkpointing": "recompute activations in the backward (less memory, ~1/3 more update time)",
    "dtype": "compute precision: bf16 (fp32 master weights, bf16 forwards/backward, bf16 rollout and reference "
             "weights) | fp32 (default: bf16 on CUDA, fp32 on CPU)",
    "compile": "torch.compile the rollout's decode step (CUDA graphs on GPU): auto = on for CUDA without FSDP, "
               "off on CPU, where compiling costs more than it saves on short runs",
    "freeze_vision": "do not train the vision tower (requires_grad False on model.model.visual)",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", help=HELP["model"])
    p.add_argument("--data", default="data/train", help=HELP["data"])
    p.add_argument("--eval-data", default="data/test", help=HELP["eval_data"])
    p.add_argument("--out", default="runs", help=HELP["out"])
    p.add_argument("--name", default=None, help=HELP["name"])
    p.add_argument("--advantage", default="timerpo", choices=("timerpo", "grpo", "no-projection"),
                   help=HELP["advantage"])
    p.add_argument("--cot", default="expcot", choices=("expcot", "gencot"), help=HELP["cot"])
    p.add_argument("--grounding", default="ot", choices=("ot", "cosine"), help=HELP["grounding"])
    p.add_argument("--adv-norm", default=SHARED["adv_norm"], choices=("std", "mean"), help=HELP["adv_norm"])
    p.add_argument("--tsr-norm", default=SHARED["tsr_norm"], choices=TSR_NORMS, help=HELP["tsr_norm"])
    p.add_argument("--loc-reward", default=SHARED["loc_reward"], choices=LOC_MODES, help=HELP["loc_reward"])
    p.add_argument("--preset", default=None, choices=tuple(PRESETS), help=HELP["preset"])
    p.add_argument("--seed", type=int, default=0, help=HELP["seed"])
    p.add_argument("--resume", action="store_true", help=HELP["resume"])
    p.add_argument("--trust-checkpoint", action="store_true", help=HELP["trust_checkpoint"])
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help=HELP["device"])
    p.add_argument("--no-progress", action="store_true", help=HELP["no_progress"])
    p.add_argument("--dist", default="none", choices=DIST_MODES, help=HELP["dist"])
    p.add_argument("--dist-timeout", type=float, default=1800.0, help=HELP["dist_timeout"])
    p.add_argument("--grad-checkpointing", action="store_true", help=HELP["grad_checkpointing"])
    p.add_argument("--freeze-vision", action="store_true", help=HELP["freeze_vision"])
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES), help=HELP["dtype"])
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help=HELP["compile"])
    for key in list(PAPER) + [k for k in SHARED if k not in ("adv_norm", "loc_reward", "tsr_norm")]:
        kind = int if isinstance(TINY.get(key, SHARED.get(key)), int) else float
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=None, help=HELP[key] + " [default by model]"
                       if key in PAPER else HELP[key] + f" [default {SHARED[key]}]")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset or ("tiny" if args.model == "tiny" else "paper")]
    for key, value in {**SHARED, **preset}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.advantage == "grpo":
        args.alpha = 0.0
    check_args(p, args)
    args.name = args.name or f"{os.path.basename(args.model.rstrip('/'))}-{args.advantage}-{args.cot}-" \
                             f"{args.grounding}-s{args.seed}"
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or default_dtype(args.device)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject values that would fail later with a less clear message."""
    positive = ("steps", "prompts_per_step", "group_size", "max_new_tokens", "eval_every", "eval_samples",
                "save_every", "micro_batch", "ot_iters", "expcot_max_tokens")
    for key in positive:
        if getattr(args, key) <= 0:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    for key in ("lr", "tau", "ot_eps"):
        if not getattr(args, key) > 0:
            parser.error(f"--{key.replace('_', '-')} must be > 0, got {getattr(args, key)}")
    for key in ("rollout_batch", "warmup_steps", "warmup_vision_steps", "warmup_aux_weight", "beta", "entropy_coef",
                "alpha", "weight_decay", "eval_temperature", "warmup_lr"):
        if getattr(args, key) < 0:
            parser.error(f"--{key.replace('_', '-')} must be >= 0, got {getattr(args, key)}")
    if args.group_size < 2:
        parser.error("--group-size must be at least 2: group-relative advantages need a group")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    if args.prompts_per_step % world:
        parser.error(f"--prompts-per-step ({args.prompts_per_step}) is the global batch and must be divisible by "
                     f"the number of ranks ({world}), so that every rank gets whole groups")


# ---------------------------------------------------------------------------------------------------
# Data and prompts


def ensure_data(folder: str, seed: int, progress: bool):
    """Load a data folder; generate the anomllm suite there first when it does not exist yet. Imported real
    series (data_gen.py --suite series) are refused: their classes are unknown and they have no ExpCoT."""
    if not os.path.exists(os.path.join(folder, "samples.jsonl")):
        print(f"[data] {folder} not found: generating the anomllm suite (400 per family, seed {seed})")
        data_gen.generate(folder, "anomllm", 400, seed, progress=progress)
    samples = data_gen.load_samples(folder)
    real = next((s for s in samples if s.label == data_gen.UNKNOWN or not s.expcot), None)
    if real is not None:  # imported real series: no known class, no ExpCoT to ground on
        raise data_gen.DataError(f"{folder}: sample {real.id!r} is a window of a real series (unknown class, no "
                                 f"ExpCoT); training needs generated data; score such folders with eval.py --data")
    return samples


def step_prompt_indices(n_samples: int, per_step: int, step: int, seed: int) -> list[int]:
    """Prompts of a step: consecutive slices of per-epoch permutations seeded by (seed, epoch).

    A pure function of (step, seed), so a resumed run sees exactly the prompts it would have seen.
    """
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(k, n_samples)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n_samples)[pos]))
    return out


# ---------------------------------------------------------------------------------------------------
# Logging helpers


class Timer:
    """Accumulates wall seconds per named phase: `with timer("rollout"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def step_columns(episodes, adv) -> dict[str, np.ndarray]:
    """The per-episode (and per-group) numbers behind the step metrics. Under torchrun the ranks' columns
    are concatenated in rank order, which is the 1-process episode order, before step_metrics runs."""
    n_groups = len({ep.group for ep in episodes})
    return {
        "reward": np.array([ep.reward.total for ep in episodes]),
        "fmt": np.array([ep.reward.fmt for ep in episodes]),
        "cls": np.array([ep.reward.cls for ep in episodes]),
        "loc": np.array([ep.reward.loc for ep in episodes]),
        "length": np.array([len(ep.completion_ids) for ep in episodes]),
        "finished": np.array([ep.finished for ep in episodes], dtype=float),
        "grounding": np.array([ep.grounding for ep in episodes if ep.grounding is not None]),
        "s": adv.grounded_reward.numpy() if adv.grounded_reward is not None else np.zeros(0),
        "advantage": adv.advantages.numpy(),
        "main": adv.main.numpy(),
        "projected": adv.projected.numpy() if adv.projected is not None else np.zeros(0),
        "coef": adv.coef.numpy() if adv.coef is not None else np.zeros(0),  # one per group
        "zero_std_groups": np.array([round(adv.zero_std_frac * n_groups)]),  # a count, so ranks can add it
        "groups": np.array([n_groups]),
    }


def group_std(values: np.ndarray, group_size: int) -> float | None:
    """Mean over groups of the sample std (ddof = 1) within each group of G values; None without values."""
    return float(values.reshape(-1, group_size).std(axis=1, ddof=1).mean()) if len(values) else None


def concat_columns(tables: list[dict]) -> dict[str, np.ndarray]:
    """The ranks' step columns joined in rank order."""
    return {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}


def step_metrics(step, cols, update, timer, group_size) -> dict:
    """One metrics.jsonl row from the (gathered) step columns; the times are this process's (rank 0's)."""
    rewards, lengths, grounding = cols["reward"], cols["length"], cols["grounding"]
    sec = timer.seconds
    return {
        "step": step,
        "reward": float(rewards.mean()),
        "reward_fmt": float(cols["fmt"].mean()),
        "reward_cls": float(cols["cls"].mean()),
        "reward_loc": float(cols["loc"].mean()),
        "reward_std_in_group": float(rewards.reshape(-1, group_size).std(axis=1).mean()),
        "zero_std_frac": float(cols["zero_std_groups"].sum() / cols["groups"].sum()),
        "adv_mean": float(cols["advantage"].mean()),
        "adv_std": float(cols["advantage"].std()),
        "adv_main_absmean": float(np.abs(cols["main"]).mean()),
        "adv_grounded_absmean": float(np.abs(cols["projected"]).mean()) if len(cols["projected"]) else None,
        "proj_coef": float(cols["coef"].mean()) if len(cols["coef"]) else None,
        "grounding_mean": float(grounding.mean()) if len(grounding) else None,
        # within-group spread of W and of s = exp(-W/tau): what A_TsR's normalisation divides by
        "W_std_in_group": group_std(grounding, group_size),
        "s_std_in_group": group_std(cols["s"], group_size),
        "kl": update["kl"], "entropy": update["entropy"], "clip_frac": update["clip_frac"],
        "loss": update["loss"], "grad_norm": update["grad_norm"], "skipped": update["skipped"],
        "completion_len": float(lengths.mean()),
        "truncated_frac": float(1.0 - cols["finished"].mean()),
        "time_rollout": sec.get("rollout", 0.0), "time_forward": sec.get("forward", 0.0),
        "time_grounding": sec.get("grounding", 0.0), "time_update": sec.get("update", 0.0),
        "time_step": sum(sec.values()),
        # the whole job's sampled tokens over rank 0's rollout time (ranks sample at the same time)
        "tokens_per_s": float(lengths.sum() / max(sec.get("rollout", 1e-9), 1e-9)),
    }


def format_warmup(policy: Policy, args, train_samples: list, progress: bool) -> list[float]:
    """The supervised warm-up (tiny only) on the whole training split: plot reading, then answers."""
    return supervised_warmup(policy, args.data, train_samples, args.warmup_steps, batch_size=8, lr=args.warmup_lr,
                             seed=args.seed, vision_steps=args.warmup_vision_steps,
                             aux_weight=args.warmup_aux_weight, progress=progress)


def make_reference(policy: Policy, source: str, args, dist: Dist = SINGLE) -> Policy:
    """The frozen KL reference π_ref, loaded from `source`; it shares the policy's tokenizer."""
    ref_model = load_policy(source, device=args.device, seed=args.seed).model.eval()
    ref_policy = dataclasses.replace(policy, model=ref_model, wrapper=None, autocast_dtype=None, rollout_model=None,
                                     decoder=None)
    ref_policy.model.requires_grad_(False)
    prepare_policy(ref_policy, dist, trainable=False, dtype=DTYPES[args.dtype])  # bf16 weights with --dtype bf16
    return ref_policy


def make_optimizer(policy: Policy, args) -> torch.optim.Optimizer:
    """AdamW with a constant learning rate (the paper uses no schedule)."""
    return torch.optim.AdamW(policy.model.parameters(), lr=args.lr, betas=(0.9, 0.999),
                             weight_decay=args.weight_decay)


def rl_step(policy, ref_policy, optimizer, prompts: list[Prompt], step: int, args, dist: Dist = SINGLE):
    """One RL step on this rank's prompts, README algorithm steps 1-5 in order: rollout, score_outcomes,
    ground_completions (TimerPO: target_states + W), reference_logprobs (beta > 0), compute_advantages,
    update_policy. Returns (episodes, advantages, update stats, per-phase timer)."""
    timer = Timer()
    use_grounding = args.advantage != "grpo"
    with timer("rollout"), full_params(policy, dist):
        episodes = rollout(policy, prompts, args.group_size, step, args.seed, args.max_new_tokens,
                           args.rollout_batch, keep_states=use_grounding)
    score_outcomes(episodes, args.loc_reward)
    if use_grounding:
        with timer("grounding"), full_params(policy, dist):
            targets = target_states(policy, prompts, args.expcot_max_tokens)
            ground_completions(episodes, targets, args.micro_batch, args.grounding, args.ot_eps, args.ot_iters)
    if ref_policy is not None:
        with timer("forward"), full_params(ref_policy, dist):
            reference_logprobs(ref_policy, episodes, args.micro_batch)
    adv = compute_advantages(episodes, args.group_size, args.advantage, args.alpha, args.adv_norm, args.tau,
                             args.grounding, args.tsr_norm, args.tsr_floor)
    with timer("update"):
        # with `dist`, the token-mean divides by the token count of ALL ranks' completions
        update = update_policy(policy, optimizer, episodes, args.micro_batch, args.clip_eps, args.beta,
                               args.entropy_coef, args.max_grad_norm, dist=dist)
    return episodes, adv, update, timer


def trim_log(path: str, last_step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (they will be redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    write_atomic(path, "".join(rows))


def draw_curves(run_dir: str) -> None:
    """runs/<name>/curves.png: training reward per step and held-out reward per evaluation."""
    def read(name):
        path = os.path.join(run_dir, name)
        return [json.loads(l) for l in open(path) if l.strip()] if os.path.exists(path) else []
    train, held = read("metrics.jsonl"), read("eval.jsonl")
    # Rollout rewards of a few prompts per step are noisy: draw their trailing 10-step mean.
    rewards = [r["reward"] for r in train]
    smoothed = [float(np.mean(rewards[max(0, k - 9):k + 1])) for k in range(len(rewards))]
    line_chart({"train reward (10-step mean)": ([r["step"] for r in train], smoothed),
                "held-out reward": ([r["step"] for r in held], [r["reward"] for r in held]),
                "held-out aff-F1": ([r["step"] for r in held], [r["aff_f1"] for r in held])},
               os.path.join(run_dir, "curves.png"), title=os.path.basename(run_dir))


def run_eval(policy, step, eval_prompts, args, run_dir, tag="rl", dist: Dist = SINGLE) -> dict | None:
    """Held-out evaluation. Under torchrun each rank samples a contiguous share and rank 0 scores them all;
    completion seeds depend on the sample, not the rank, so the result equals the 1-process one.
    Returns the eval.jsonl row on rank 0, None on the other ranks."""
    mine = rank_slice(eval_prompts, dist, even=False)
    with full_params(policy, dist):
        preds = predict(policy, mine, args.max_new_tokens, args.eval_temperature, batch_size=args.rollout_batch,
                        seed=args.seed, loc_mode=args.loc_reward, progress=not args.no_progress and dist.is_main)
    preds = [p for share in dist.gather(preds) for p in share]
    if not dist.is_main:
        return None
    summary = summarize(preds)
    row = {"step": step, "phase": tag, "reward": summary["reward"], "aff_f1": summary["aff_f1"],
           "cls_acc": summary["cls_acc"], "avg_group_f1": summary["avg_group_f1"], "groups": summary["groups"],
           "unparsable": summary["unparsable"], "n": summary["n"]}
    append_jsonl(os.path.join(run_dir, "eval.jsonl"), row)
    return row


# ---------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        dist = init_distributed(args.dist, args.device, args.dist_timeout)
    except DistError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.device = dist.device
    if not dist.initialized:
        return train(args, dist)
    with fail_fast(dist):  # under torchrun: a rank that raises ends the job at once, with one clear line
        code = train(args, dist)
        dist.close()
    return code


def choose_rollout_batch(policy: Policy, args, dist: Dist, prompt_len: int) -> int:
    """--rollout-batch 0 (the Qwen default): on CUDA, all of this rank's completions of a step at once when the
    free memory holds their decode state, else as many as it holds; 64 on CPU. Prints the choice.

    Budget: the free memory now, less what the first optimizer step still allocates (fp32 gradients and AdamW's
    two moments, 12 bytes per trainable parameter, sharded under FSDP), then half of that when the decode
    buffers stay allocated through the update (compiled decode step) and 90 % otherwise.
    """
    if args.rollout_batch > 0:
        return args.rollout_batch
    completions = args.prompts_per_step // dist.world_size * args.group_size
    if not args.device.startswith("cuda"):
        return min(64, completions)
    free, _ = torch.cuda.mem_get_info(torch.device(args.device))
    trainable = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    shards = dist.world_size if dist.mode == "fsdp" else 1
    budget = (free - 12 * trainable / shards) * (0.5 if policy.compile_decode else 0.9)
    element = DTYPES[args.dtype].itemsize  # the rollout weights' dtype, hence the KV cache's
    per_row = decode_bytes_per_row(policy.model.config.get_text_config(), prompt_len + args.max_new_tokens, element)
    batch = rollout_batch_for_memory(completions, per_row, budget)
    if dist.is_main:
        print(f"[rollout] batch {batch} of {completions} completions per rank: {per_row / 2**20:.0f} MiB of decode "
              f"state per row, budget {budget / 2**30:.1f} GiB of {free / 2**30:.1f} GiB free")
    return batch


def use_compile(args, dist: Dist) -> bool:
    """--compile auto: compile the decode step on CUDA in one process or under DDP. Not under FSDP, whose
    gathered parameters and hooks a compiled step would have to trace, and not on CPU (see HELP)."""
    if args.compile != "auto":
        return args.compile == "on"
    return args.device.startswith("cuda") and dist.mode != "fsdp"


def train(args: argparse.Namespace, dist: Dist) -> int:
    """The run: one process, or one rank of a torchrun job (then rank 0 alone writes and prints)."""
    torch.manual_seed(args.seed)
    enable_tf32(args.device)
    run_dir = os.path.join(args.out, args.name)
    os.makedirs(run_dir, exist_ok=True)
    progress = not args.no_progress and dist.is_main
    say = print if dist.is_main else (lambda *a, **k: None)

    # -- data -------------------------------------------------------------------------------------
    def load_data():
        return ensure_data(args.data, 3407, progress), ensure_data(args.eval_data, 42, progress)

    try:
        if dist.is_main:
            train_samples, eval_samples = load_data()
        dist.barrier()  # a missing data folder is generated once, by rank 0, before the others read it
        if not dist.is_main:
            train_samples, eval_samples = load_data()
    except data_gen.DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    # -- policy -----------------------------------------------------------------------------------
    ckpt = latest_checkpoint(run_dir) if args.resume else None
    if args.resume and ckpt is None:
        say(f"[resume] no checkpoint in {run_dir}: starting from scratch")
    if ckpt is not None:
        try:  # first, so that a checkpoint that is refused stops the run before anything else is loaded
            state = load_trainer_state(ckpt, trust_pickle=args.trust_checkpoint)
        except CheckpointError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    try:
        policy = load_policy(os.path.join(ckpt, "model") if ckpt else args.model, device=args.device, seed=args.seed)
    except ModelNotFound as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    eval_prompts = [make_prompt(policy, args.eval_data, eval_samples, i, args.cot)
                    for i in data_gen.balanced_indices(eval_samples, args.eval_samples)]
    if dist.is_main:
        # not config.json: that name marks a model folder
        write_atomic(os.path.join(run_dir, "run_config.json"), json.dumps(vars(args), indent=1))

    # -- supervised format warm-up (tiny only; its result is also the KL reference) ----------------
    start_step = 0
    reference_dir = os.path.join(run_dir, "reference")
    if ckpt is None:
        if dist.is_main:
            for log in ("metrics.jsonl", "eval.jsonl"):
                trim_log(os.path.join(run_dir, log), -1)
        warming = args.warmup_steps + args.warmup_vision_steps > 0
        if warming:
            # Every rank runs the same (deterministic) warm-up; DDP/FSDP then start all ranks from rank 0's.
            t0 = time.time()
            losses = format_warmup(policy, args, train_samples, progress)
            say(f"[warm-up] {args.warmup_vision_steps} plot-reading + {args.warmup_steps} answer steps in "
                f"{time.time() - t0:.0f} s" + (f", final answer loss {losses[-1]:.3f}" if losses else ""))
        if args.beta > 0 and warming and dist.is_main:
            save_policy(policy, reference_dir)
        dist.barrier()  # the reference folder is complete before any rank reads it
    else:
        start_step = state["step"]
        set_rng_state(state["rng"])
        if dist.is_main:
            for log in ("metrics.jsonl", "eval.jsonl"):
                trim_log(os.path.join(run_dir, log), start_step)
        say(f"[resume] {ckpt}: continuing after step {start_step}")

    ref_source = reference_dir if os.path.isdir(reference_dir) else args.model
    ref_policy = make_reference(policy, ref_source, args, dist) if args.beta > 0 else None
    prepare_policy(policy, dist, args.grad_checkpointing, args.freeze_vision, dtype=DTYPES[args.dtype])
    policy.compile_decode = use_compile(args, dist)
    args.rollout_batch = choose_rollout_batch(policy, args, dist, max(len(p.encoded.input_ids) for p in eval_prompts))
    optimizer = make_optimizer(policy, args)
    if ckpt is not None:
        try:
            restore_optimizer(ckpt, state, policy, optimizer, dist)
        except CheckpointError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    else:
        t0 = time.time()
        row = run_eval(policy, 0, eval_prompts, args, run_dir, tag="start", dist=dist)
        if dist.is_main:
            say(f"[eval] step 0 (start of RL): reward {row['reward']:.3f}  aff-F1 {row['aff_f1']:.3f}  "
                f"cls acc {row['cls_acc']:.3f}  ({time.time() - t0:.0f} s)")

    # -- RL loop ----------------------------------------------------------------------------------
    bar = tqdm(range(start_step, args.steps), desc="TimerPO", disable=not progress, dynamic_ncols=True,
               initial=start_step, total=args.steps)
    for step in bar:
        maybe_inject_failure(dist)
        # This rank's contiguous share of the step's global prompt list (whole groups).
        indices = rank_slice(step_prompt_indices(len(train_samples), args.prompts_per_step, step, args.seed), dist)
        prompts = [make_prompt(policy, args.data, train_samples, i, args.cot) for i in indices]
        episodes, adv, update, timer = rl_step(policy, ref_policy, optimizer, prompts, step, args, dist)
        columns = concat_columns(dist.gather(step_columns(episodes, adv)))
        if dist.is_main:
            metrics = step_metrics(step + 1, columns, update, timer, args.group_size)
            append_jsonl(os.path.join(run_dir, "metrics.jsonl"), metrics)
            if update["skipped"]:
                tqdm.write(f"[step {step + 1}] non-finite loss or gradient: update skipped")
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                            s_step=f"{metrics['time_step']:.1f}")

        done = step + 1
        if done % args.eval_every == 0 or done == args.steps:
            row = run_eval(policy, done, eval_prompts, args, run_dir, dist=dist)
            if dist.is_main:
                tqdm.write(f"[eval] step {done}: reward {row['reward']:.3f}  aff-F1 {row['aff_f1']:.3f}  "
                           f"cls acc {row['cls_acc']:.3f}")
                draw_curves(run_dir)
        if done % args.save_every == 0 or done == args.steps:
            save_checkpoint(run_dir, done, policy, optimizer, extra={"args": vars(args)}, dist=dist)
    bar.close()
    if dist.is_main:
        draw_curves(run_dir)
        print(f"[done] {run_dir}: metrics.jsonl, eval.jsonl, curves.png, "
              f"{os.path.basename(latest_checkpoint(run_dir) or '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
