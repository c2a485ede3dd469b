"""TimerPO training: `python train.py` (tiny model, CPU, minutes) or `python train.py --model qwen2.5-vl-3b`.

Reads top to bottom: configuration (Config: every setting, its paper default and doc; the tiny presets) →
data → policy → (tiny only) supervised format warm-up → RL loop.
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
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field

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
                                 prepare_policy, rank_slice)
from timerpo.evaluate import predict, summarize
from timerpo.files import write_atomic
from timerpo.lora import DEFAULT_TARGETS, adapters_disabled
from timerpo.optim import BF16AdamW
from timerpo.plots import line_chart
from timerpo.policy import ModelNotFound, Policy, load_policy, save_policy
from timerpo.precision import DTYPES, default_dtype, enable_tf32
from timerpo.reward import LOC_MODES
from timerpo.rollout import decode_bytes_per_row, rollout_batch_for_memory
from timerpo.warmup import supervised_warmup

# ---------------------------------------------------------------------------------------------------
# Configuration: one dataclass. Every default is the paper's value for the Qwen models (method.md §18);
# the tiny CPU preset below changes a few of them. Every field is the flag of the same name.


def paper(value, doc: str, choices: tuple | None = None):
    """A setting of the method: its default is the paper's value."""
    return field(default=value, metadata={"doc": doc, "choices": choices, "paper": True})


def option(value, doc: str, choices: tuple | None = None):
    """A setting of the run (paths, devices, logging): not a paper value."""
    return field(default=value, metadata={"doc": doc, "choices": choices, "paper": False})


@dataclass
class Config:
    """Every training setting (`python train.py --help` lists them with their paper and tiny values)."""

    # -- the run
    model: str = option("tiny", "tiny (embedded, built locally, CPU) | qwen2.5-vl-3b | qwen2.5-vl-7b | a hub id | "
                                "a local folder")
    data: str = option("data/train", "training data folder (generated on first use: anomllm suite, 400 per "
                                     "family, seed 3407)")
    eval_data: str = option("data/test", "held-out data folder (generated on first use: anomllm suite, seed 42)")
    out: str = option("runs", "parent folder of run folders")
    name: str | None = option(None, "run name (default: <model>-<advantage>-<cot>-<grounding>-s<seed>)")
    preset: str | None = option(None, "the values below: paper (the defaults) or tiny (CPU, ~10 min on 2 cores); "
                                      "default: tiny for --model tiny, paper otherwise", choices=("paper", "tiny"))
    seed: int = option(0, "seed of the run (prompt order, sampling streams, tiny weights)")
    resume: bool = option(False, "continue runs/<name> from its latest checkpoint")
    trust_checkpoint: bool = option(False, "with --resume: also load a checkpoint of the older format, whose "
                                           "trainer_state.pt and optimizer/.metadata are pickles that can run code "
                                           "(only for runs you made yourself)")
    device: str | None = option(None, "cpu | cuda (default: cuda when available)", choices=("cpu", "cuda"))
    no_progress: bool = option(False, "no progress bars")
    dist: str = option("none", "none (one process) | ddp (full model per rank) | fsdp (FSDP2-sharded); under "
                               "torchrun with WORLD_SIZE > 1, none means ddp", choices=DIST_MODES)
    dist_timeout: float = option(1800.0, "seconds any collective may wait for the other ranks before the job fails")
    grad_checkpointing: bool = option(False, "recompute activations in the backward (less memory, ~1/3 more "
                                             "update time)")
    freeze_vision: bool = option(False, "do not train the vision tower (requires_grad False on model.model.visual)")
    dtype: str | None = option(None, "compute precision: bf16 (fp32 master weights, bf16 forwards/backward, bf16 "
                                     "rollout and reference weights) | fp32 (default: bf16 on CUDA, fp32 on CPU)",
                               choices=tuple(DTYPES))
    compile: str = option("auto", "torch.compile the rollout's decode step (CUDA graphs on GPU): auto = on for CUDA "
                                  "without FSDP, off on CPU, where compiling costs more than it saves on short runs",
                          choices=("auto", "on", "off"))
    # -- fitting one GPU (docs/memory.md); the paper's run is full fine-tuning with fp32 master weights
    offload: bool = option(False, "the paper's exact run on one 80 GB GPU: FSDP2 keeps the fp32 weights, gradients "
                                  "and AdamW state in CPU memory (16 bytes per parameter: 60 GB of RAM for 3B) and "
                                  "brings each layer to the GPU in bf16 when it runs; the optimizer steps on the CPU. "
                                  "Implies --dist fsdp (a one-process group without torchrun) and "
                                  "--grad-checkpointing; the numbers are those of a run without it")
    pure_bf16: bool = option(False, "bf16 weights, gradients and AdamW moments, written back with stochastic "
                                    "rounding (timerpo/optim.py), no fp32 master copy: 8 bytes per parameter "
                                    "instead of 16 (3B on one 40 GB GPU); a deviation from the paper, method.md §23")
    lora_rank: int = option(0, "train LoRA adapters of rank R on the language model's linear layers instead of "
                               "every weight; the KL reference is the model with its adapters off; checkpoints hold "
                               "the adapters (0: full fine-tuning, the paper's; a deviation, method.md §23)")
    lora_alpha: float | None = option(None, "LoRA scale: the adapters add (alpha / R)·B·A to each layer "
                                            "(default: 2·R)")
    lora_targets: str = option(DEFAULT_TARGETS, "the linear layers of each decoder layer that get adapters")

    # -- the method's variants
    advantage: str = paper("timerpo", "timerpo (A = Â_main + α·Â⊥_TsR) | grpo (α = 0) | no-projection "
                                      "(A = Â_main + α·Â_TsR)", choices=("timerpo", "grpo", "no-projection"))
    cot: str = paper("expcot", "OT target text: expcot (expert chain of thought) | gencot (generic, the "
                               "'w/o ExpCoT' ablation)", choices=("expcot", "gencot"))
    grounding: str = paper("ot", "ot (entropic OT cost W, s = exp(−W/τ)) | cosine (mean-pooled cosine similarity)",
                           choices=("ot", "cosine"))
    adv_norm: str = paper("std", "group normalization: std (paper text: (R − mean)/(std + δ)) | mean (public "
                                 "code: R − mean)", choices=("std", "mean"))
    tsr_norm: str = paper("std", "normalization of the grounded advantage Â_TsR: std (paper reading, as Â_main) | "
                                 "mean | std-floor (divide by max(std_G s, --tsr-floor), so Sinkhorn-noise spreads "
                                 "stay small)", choices=TSR_NORMS)
    tsr_floor: float = paper(0.05, "floor on std_G s for --tsr-norm std-floor")
    loc_reward: str = paper("six-mean", "localization reward: six-mean (public release) | aff-f1 (affiliation F1 "
                                        "alone)", choices=LOC_MODES)

    # -- sizes and rates
    steps: int = paper(250, "RL steps (the paper's 250 are 10 epochs of 3,200 prompts at 128 per step)")
    prompts_per_step: int = paper(128, "distinct prompts per step, the global batch over all ranks")
    group_size: int = paper(5, "completions per prompt, G")
    max_new_tokens: int = paper(1024, "completion length cap")
    lr: float = paper(1e-6, "AdamW learning rate, constant")
    weight_decay: float = paper(0.01, "AdamW weight decay")
    max_grad_norm: float = paper(1.0, "gradient-norm clip")
    micro_batch: int = paper(4, "completions per forward/backward; gradients accumulate exactly")
    rollout_batch: int = paper(0, "completions sampled together per rank; 0 = auto: on CUDA as many as the free "
                                  "memory holds, up to all of the rank's completions of a step; 64 on CPU")

    # -- the objective and the grounded advantage
    alpha: float = paper(0.3, "weight α of the projected grounded advantage (set to 0 by --advantage grpo)")
    beta: float = paper(0.001, "KL coefficient β, k3 estimator (0 skips loading the reference)")
    entropy_coef: float = paper(0.001, "entropy bonus coefficient c_H")
    clip_eps: float = paper(0.2, "PPO clip ϵ")
    tau: float = paper(0.5, "temperature τ of the grounded reward s = exp(−W/τ)")
    ot_eps: float = paper(0.08, "Sinkhorn entropic regularization ε")
    ot_iters: int = paper(50, "Sinkhorn iterations")
    expcot_max_tokens: int = paper(512, "ExpCoT tokens kept for the OT")

    # -- supervised warm-up before RL (the tiny model only: Qwen Instruct already follows the format)
    warmup_steps: int = paper(0, "supervised warm-up steps on the true answers before RL")
    warmup_vision_steps: int = paper(0, "plot-reading warm-up steps before those, vision tower only")
    warmup_aux_weight: float = paper(0.0, "weight of the plot-reading loss beside the answer loss in the warm-up")
    warmup_lr: float = paper(0.0, "learning rate of the supervised warm-up")
    warmup_targets: str = paper("exact", "warm-up answer intervals: exact (the true ones) | columns (widened to the "
                                         "whole token columns they touch, the finest place the tiny model sees)",
                                choices=("exact", "columns"))
    warmup_pointer: float = paper(0.0, "weight of the pointing loss: one attention head of the language model's "
                                       "layer 1 should look at the plot column each answer digit names (off at 0)")

    # -- held-out evaluation and checkpoints
    eval_every: int = paper(25, "held-out evaluation every N steps, and once before RL")
    eval_samples: int = paper(256, "held-out samples per evaluation, balanced over families")
    eval_temperature: float = paper(0.4, "sampling temperature of held-out evaluation (the paper's validation)")
    save_every: int = paper(25, "checkpoint every N steps (and at the end)")


# The tiny CPU preset: the only place where values differ from the paper's. Measured: 9.4 min of train.py on 2
# cores, test Avg F1 64.7 / 67.3 / 68.1 over seeds 0-2 (README, Results).
TINY = dict(steps=100, prompts_per_step=4, max_new_tokens=72, lr=1e-4, warmup_steps=400, warmup_vision_steps=200,
            warmup_aux_weight=1.0, warmup_lr=2e-3, warmup_targets="columns", eval_every=50, eval_samples=128,
            save_every=50, micro_batch=20, rollout_batch=20)
PRESETS = {"paper": {}, "tiny": TINY}


def make_config(given: dict) -> Config:
    """The run's Config: paper defaults, then the preset's values, then the flags given on the command line.
    The preset is --preset, else tiny for --model tiny and paper for every other model."""
    model = given.get("model", Config.model)
    preset = given.get("preset") or ("tiny" if model == "tiny" else "paper")
    config = Config(**{**PRESETS[preset], **given})
    if config.advantage == "grpo":
        config.alpha = 0.0  # GRPO is TimerPO without the grounded term
    return config


def resolve_defaults(config: Config) -> Config:
    """Fill the settings whose default depends on others: the run name, the device and the precision."""
    config.name = config.name or (f"{os.path.basename(config.model.rstrip('/'))}-{config.advantage}-{config.cot}-"
                                  f"{config.grounding}-s{config.seed}")
    config.device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config.dtype = config.dtype or default_dtype(config.device)
    if config.offload:  # the one-GPU paper run: FSDP (one process or torchrun's) with checkpointing
        config.dist, config.grad_checkpointing = "fsdp", True
    if config.pure_bf16:
        config.dtype = "bf16"
    if config.lora_rank and config.lora_alpha is None:
        config.lora_alpha = 2.0 * config.lora_rank
    return config


def flag_help(f) -> str:
    """A field's --help line: its doc, then its paper default and the presets' values (or its default)."""
    doc = f.metadata["doc"]
    if not f.metadata["paper"]:
        return doc if f.default in (None, False) else f"{doc} [default: {f.default}]"
    values, last = [], f.default
    for name, preset in PRESETS.items():  # paper, tiny: each value that differs from the one before
        value = preset.get(f.name, f.default)
        if name == "paper" or value != last:
            values.append(f"{name}: {value}")
        last = value
    return f"{doc} [{'; '.join(values)}]"


def build_parser() -> argparse.ArgumentParser:
    """One flag per Config field, typed by the field's annotation. Flags not given stay out of the namespace
    (argparse.SUPPRESS), so make_config can tell them from the preset's values."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    types = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        flag, kind = "--" + f.name.replace("_", "-"), types[f.name]
        if kind is bool:
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=flag_help(f))
            continue
        kind = next(t for t in typing.get_args(kind) if t is not type(None)) if typing.get_args(kind) else kind
        choices = f.metadata["choices"]
        p.add_argument(flag, type=kind, choices=choices, default=argparse.SUPPRESS, help=flag_help(f),
                       metavar=None if choices else kind.__name__.upper())
    return p


def parse_args(argv=None) -> Config:
    """The Config of `python train.py <argv>`; a bad value ends the program with a usage error (exit 2)."""
    parser = build_parser()
    config = make_config(vars(parser.parse_args(argv)))
    check_config(parser, config)
    return resolve_defaults(config)


def check_config(parser: argparse.ArgumentParser, config: Config) -> None:
    """Reject values that would fail later with a less clear message."""
    positive = ("steps", "prompts_per_step", "group_size", "max_new_tokens", "eval_every", "eval_samples",
                "save_every", "micro_batch", "ot_iters", "expcot_max_tokens")
    for key in positive:
        if getattr(config, key) <= 0:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(config, key)}")
    for key in ("lr", "tau", "ot_eps"):
        if not getattr(config, key) > 0:
            parser.error(f"--{key.replace('_', '-')} must be > 0, got {getattr(config, key)}")
    for key in ("rollout_batch", "warmup_steps", "warmup_vision_steps", "warmup_aux_weight", "warmup_pointer",
                "beta", "entropy_coef", "alpha", "weight_decay", "eval_temperature", "warmup_lr"):
        if getattr(config, key) < 0:
            parser.error(f"--{key.replace('_', '-')} must be >= 0, got {getattr(config, key)}")
    if config.group_size < 2:
        parser.error("--group-size must be at least 2: group-relative advantages need a group")
    check_memory_modes(parser, config)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    if config.prompts_per_step % world:
        parser.error(f"--prompts-per-step ({config.prompts_per_step}) is the global batch and must be divisible by "
                     f"the number of ranks ({world}), so that every rank gets whole groups")


def check_memory_modes(parser: argparse.ArgumentParser, config: Config) -> None:
    """--offload, --pure-bf16 and LoRA: the combinations that cannot work."""
    if config.offload and config.dist == "ddp":
        parser.error("--offload shards the model with FSDP; use it with --dist fsdp (or alone), not --dist ddp")
    if config.offload and config.lora_rank:
        parser.error("--offload and --lora-rank: LoRA's trained state is already small; drop --offload")
    if config.pure_bf16 and config.dtype == "fp32":
        parser.error("--pure-bf16 keeps bf16 weights; it cannot run with --dtype fp32")
    if config.lora_rank < 0:
        parser.error(f"--lora-rank must be >= 0, got {config.lora_rank}")
    if config.lora_alpha is not None and not config.lora_alpha > 0:
        parser.error(f"--lora-alpha must be > 0, got {config.lora_alpha}")
    if config.lora_rank:
        from timerpo.lora import target_pattern

        try:
            target_pattern(config.lora_targets)
        except ValueError as err:
            parser.error(f"--lora-targets: {err}")


# ---------------------------------------------------------------------------------------------------
# Data and prompts


def ensure_data(folder: str, seed: int, progress: bool, expcot: bool = True):
    """Load a data folder; generate the anomllm suite there first when it does not exist yet. Imported real
    series (data_gen.py --suite series) are refused: their classes are unknown and they have no ExpCoT. With
    `expcot`, a folder written by an older ExpCoT gets its traces recomputed (data_gen.with_current_expcot)."""
    if not os.path.exists(os.path.join(folder, "samples.jsonl")):
        print(f"[data] {folder} not found: generating the anomllm suite (400 per family, seed {seed})")
        data_gen.generate(folder, "anomllm", 400, seed, progress=progress)
    samples = data_gen.load_samples(folder)
    real = next((s for s in samples if s.label == data_gen.UNKNOWN or not s.expcot), None)
    if real is not None:  # imported real series: no known class, no ExpCoT to ground on
        raise data_gen.DataError(f"{folder}: sample {real.id!r} is a window of a real series (unknown class, no "
                                 f"ExpCoT); training needs generated data; score such folders with eval.py --data")
    return data_gen.with_current_expcot(folder, samples, progress) if expcot else samples


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


def format_warmup(policy: Policy, config: Config, train_samples: list, progress: bool) -> list[float]:
    """The supervised warm-up (tiny only) on the whole training split: plot reading, then answers."""
    return supervised_warmup(policy, config.data, train_samples, config.warmup_steps, batch_size=8,
                             lr=config.warmup_lr, seed=config.seed, vision_steps=config.warmup_vision_steps,
                             aux_weight=config.warmup_aux_weight, snap=config.warmup_targets == "columns",
                             pointer_weight=config.warmup_pointer, progress=progress)


def make_reference(policy: Policy, source: str, config: Config, dist: Dist = SINGLE) -> Policy:
    """The frozen KL reference π_ref, loaded from `source`; it shares the policy's tokenizer. With LoRA it is
    the policy itself, whose forwards rl_step runs with the adapters off (no second copy)."""
    if policy.adapters is not None:
        return dataclasses.replace(policy, wrapper=None)
    ref_model = load_policy(source, device=load_device(config), seed=config.seed).model.eval()
    ref_policy = dataclasses.replace(policy, model=ref_model, wrapper=None, autocast_dtype=None, rollout_model=None,
                                     decoder=None)
    ref_policy.model.requires_grad_(False)
    prepare_policy(ref_policy, dist, trainable=False, dtype=DTYPES[config.dtype])  # bf16 weights with --dtype bf16
    return ref_policy


def make_optimizer(policy: Policy, config: Config) -> torch.optim.Optimizer:
    """AdamW with a constant learning rate (the paper uses no schedule); --pure-bf16: its bf16 twin with
    stochastic rounding."""
    if config.pure_bf16:
        return BF16AdamW(policy.model.parameters(), lr=config.lr, betas=(0.9, 0.999),
                         weight_decay=config.weight_decay, seed=config.seed)
    return torch.optim.AdamW(policy.model.parameters(), lr=config.lr, betas=(0.9, 0.999),
                             weight_decay=config.weight_decay)


def load_device(config: Config) -> str:
    """Where models load: the CPU with --offload (FSDP then moves one unit at a time through the GPU while
    sharding it into host memory), else the run's device."""
    return "cpu" if config.offload else config.device


def policy_source(config: Config, ckpt: str | None, run_dir: str) -> str:
    """What the policy loads: a checkpoint's model when resuming, else --model. LoRA: always the base
    model (the run's own saved base when it has one), whose adapters add_lora puts in afterwards."""
    saved_rank = lora_rank_of(ckpt) if ckpt else config.lora_rank
    if saved_rank != config.lora_rank:
        raise CheckpointError(f"{ckpt} holds " + (f"LoRA adapters of rank {saved_rank}" if saved_rank else
                              "a fully fine-tuned model") + f": resume it with --lora-rank {saved_rank}")
    if config.lora_rank:
        base = os.path.join(run_dir, "reference")
        return base if ckpt is not None and os.path.isdir(base) else config.model
    return os.path.join(ckpt, "model") if ckpt else config.model


def lora_rank_of(ckpt: str) -> int:
    """The rank of a checkpoint's LoRA adapters (its adapter/adapter_config.json), 0 for a full model."""
    from timerpo.lora import ADAPTER_DIR

    path = os.path.join(ckpt, ADAPTER_DIR, "adapter_config.json")
    if not os.path.isfile(path):
        return 0
    try:
        with open(path) as f:
            return int(json.load(f)["r"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is not a readable adapter config ({err})") from None


def add_lora(policy: Policy, config: Config, ckpt: str | None, run_dir: str) -> None:
    """LoRA runs: the checkpoint's adapters when resuming, else new ones, which name as their base the run's
    saved base model when there is one (tiny, or after a warm-up), else --model."""
    from timerpo.lora import ADAPTER_DIR, add_adapters, load_adapters

    if ckpt is not None:
        load_adapters(policy, os.path.join(ckpt, ADAPTER_DIR))
        return
    saved = os.path.join(run_dir, "reference")
    base = saved if os.path.isdir(saved) else config.model
    add_adapters(policy, config.lora_rank, config.lora_alpha, config.lora_targets, base=base, seed=config.seed)


def rl_step(policy, ref_policy, optimizer, prompts: list[Prompt], step: int, config: Config, dist: Dist = SINGLE):
    """One RL step on this rank's prompts, README algorithm steps 1-5 in order: rollout, score_outcomes,
    ground_completions (TimerPO: target_states + W), reference_logprobs (beta > 0), compute_advantages,
    update_policy. Returns (episodes, advantages, update stats, per-phase timer)."""
    c, timer = config, Timer()
    use_grounding = c.advantage != "grpo"
    with timer("rollout"), full_params(policy, dist):
        episodes = rollout(policy, prompts, group_size=c.group_size, step=step, seed=c.seed,
                           max_new_tokens=c.max_new_tokens, batch_size=c.rollout_batch, keep_states=use_grounding)
    score_outcomes(episodes, loc_mode=c.loc_reward)
    if use_grounding:
        with timer("grounding"), full_params(policy, dist):
            targets = target_states(policy, prompts, max_tokens=c.expcot_max_tokens)
            ground_completions(episodes, targets, micro_batch=c.micro_batch, grounding=c.grounding,
                               ot_eps=c.ot_eps, ot_iters=c.ot_iters)
    if ref_policy is not None:  # LoRA: the policy with its adapters off
        with timer("forward"), full_params(ref_policy, dist), adapters_disabled(ref_policy):
            reference_logprobs(ref_policy, episodes, micro_batch=c.micro_batch)
    adv = compute_advantages(episodes, group_size=c.group_size, mode=c.advantage, alpha=c.alpha, norm=c.adv_norm,
                             tau=c.tau, grounding=c.grounding, tsr_norm=c.tsr_norm, tsr_floor=c.tsr_floor)
    with timer("update"):
        # with `dist`, the token-mean divides by the token count of ALL ranks' completions
        update = update_policy(policy, optimizer, episodes, micro_batch=c.micro_batch, clip_eps=c.clip_eps,
                               beta=c.beta, entropy_coef=c.entropy_coef, max_grad_norm=c.max_grad_norm, dist=dist)
    return episodes, adv, update, timer


def trim_log(path: str, last_step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (they will be redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    write_atomic(path, "".join(rows))


def draw_curves(run_dir: str) -> None:
    """runs/<name>/curves.png: training reward per step; held-out reward, aff-F1 and localization gain per
    evaluation."""
    def read(name):
        path = os.path.join(run_dir, name)
        return [json.loads(l) for l in open(path) if l.strip()] if os.path.exists(path) else []
    train, held = read("metrics.jsonl"), read("eval.jsonl")
    # Rollout rewards of a few prompts per step are noisy: draw their trailing 10-step mean.
    rewards = [r["reward"] for r in train]
    smoothed = [float(np.mean(rewards[max(0, k - 9):k + 1])) for k in range(len(rewards))]
    gained = [r for r in held if r.get("loc_gain") is not None]  # runs logged before the gain existed lack it
    line_chart({"train reward (10-step mean)": ([r["step"] for r in train], smoothed),
                "held-out reward": ([r["step"] for r in held], [r["reward"] for r in held]),
                "held-out aff-F1": ([r["step"] for r in held], [r["aff_f1"] for r in held]),
                "held-out loc gain": ([r["step"] for r in gained], [r["loc_gain"] for r in gained])},
               os.path.join(run_dir, "curves.png"), title=os.path.basename(run_dir))


def run_eval(policy, step, eval_prompts, config: Config, run_dir, tag="rl", dist: Dist = SINGLE) -> dict | None:
    """Held-out evaluation. Under torchrun each rank samples a contiguous share and rank 0 scores them all;
    completion seeds depend on the sample, not the rank, so the result equals the 1-process one.
    Returns the eval.jsonl row on rank 0, None on the other ranks."""
    mine = rank_slice(eval_prompts, dist, even=False)
    with full_params(policy, dist):
        preds = predict(policy, mine, config.max_new_tokens, config.eval_temperature,
                        batch_size=config.rollout_batch, seed=config.seed, loc_mode=config.loc_reward,
                        progress=not config.no_progress and dist.is_main)
    preds = [p for share in dist.gather(preds) for p in share]
    if not dist.is_main:
        return None
    summary = summarize(preds)
    # loc_gain: Avg F1 less that of the same answers with the class oracle's window (timerpo/evaluate.py)
    row = {"step": step, "phase": tag, "reward": summary["reward"], "aff_f1": summary["aff_f1"],
           "cls_acc": summary["cls_acc"], "avg_group_f1": summary["avg_group_f1"], "groups": summary["groups"],
           "loc_gain": summary["loc_gain"], "class_window_avg_f1": summary["class_window_avg_f1"],
           "pw_f1_anomalous": summary["pw_f1_anomalous"], "distinct_intervals": summary["distinct_intervals"],
           "unparsable": summary["unparsable"], "n": summary["n"]}
    append_jsonl(os.path.join(run_dir, "eval.jsonl"), row)
    return row


def eval_line(row: dict) -> str:
    """The printed summary of one eval.jsonl row."""
    return (f"reward {row['reward']:.3f}  Avg F1 {row['avg_group_f1']:.3f}  loc gain {row['loc_gain']:+.3f}  "
            f"PW-F1 anomalous {row['pw_f1_anomalous']:.3f}  cls acc {row['cls_acc']:.3f}")


# ---------------------------------------------------------------------------------------------------
# The run: set-up, then the RL loop


def choose_rollout_batch(policy: Policy, config: Config, dist: Dist, prompt_len: int) -> int:
    """--rollout-batch 0 (the Qwen default): on CUDA, all of this rank's completions of a step at once when the
    free memory holds their decode state, else as many as it holds; 64 on CPU. Prints the choice.

    Budget: the free memory now, less what is not allocated yet: what the first optimizer step adds on the GPU
    (gradients and AdamW's two moments: 12 bytes per trainable parameter with fp32 master weights, 6 with
    --pure-bf16, sharded under FSDP, none with --offload, which keeps them in host memory) and, under FSDP, the
    rollout's gathered copy of every weight in the compute dtype; then half of that when the decode buffers
    stay allocated through the update (compiled decode step) and 90 % otherwise.
    """
    if config.rollout_batch > 0:
        return config.rollout_batch
    completions = config.prompts_per_step // dist.world_size * config.group_size
    if not config.device.startswith("cuda"):
        return min(64, completions)
    free, _ = torch.cuda.mem_get_info(torch.device(config.device))
    element = DTYPES[config.dtype].itemsize  # the rollout weights' dtype, hence the KV cache's
    trainable = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    shards = dist.world_size if dist.mode == "fsdp" else 1
    step_bytes = 0 if dist.offload else (6 if config.pure_bf16 else 12) * trainable / shards
    gathered = element * sum(p.numel() for p in policy.model.parameters()) if dist.mode == "fsdp" else 0
    budget = (free - step_bytes - gathered) * (0.5 if policy.compile_decode else 0.9)
    per_row = decode_bytes_per_row(policy.model.config.get_text_config(), prompt_len + config.max_new_tokens, element)
    batch = rollout_batch_for_memory(completions, per_row, budget)
    if dist.is_main:
        print(f"[rollout] batch {batch} of {completions} completions per rank: {per_row / 2**20:.0f} MiB of decode "
              f"state per row, budget {budget / 2**30:.1f} GiB of {free / 2**30:.1f} GiB free")
    return batch


def use_compile(config: Config, dist: Dist) -> bool:
    """--compile auto: compile the decode step on CUDA in one process or under DDP. Not under FSDP, whose
    gathered parameters and hooks a compiled step would have to trace, and not on CPU (see --compile)."""
    if config.compile != "auto":
        return config.compile == "on"
    return config.device.startswith("cuda") and dist.mode != "fsdp"


def load_splits(config: Config, dist: Dist, progress: bool) -> tuple[list, list]:
    """The training and held-out samples. A missing data folder is generated once, by rank 0, before the other
    ranks read it."""
    def load():
        # Held-out prompts are never grounded: their ExpCoT is not used, so it is not brought up to date.
        return (ensure_data(config.data, 3407, progress, expcot=config.cot == "expcot"),
                ensure_data(config.eval_data, 42, progress, expcot=False))

    splits = load() if dist.is_main else None
    dist.barrier()
    return splits or load()


def start_fresh(policy: Policy, config: Config, dist: Dist, train_samples: list, run_dir: str, say) -> None:
    """A run without a checkpoint: empty logs, then the supervised warm-up (tiny only), whose result is saved
    as the KL reference (β > 0)."""
    if dist.is_main:
        for log in ("metrics.jsonl", "eval.jsonl"):
            trim_log(os.path.join(run_dir, log), -1)
    warming = config.warmup_steps + config.warmup_vision_steps > 0
    if warming:
        # Every rank runs the same (deterministic) warm-up; DDP/FSDP then start all ranks from rank 0's.
        t0 = time.time()
        losses = format_warmup(policy, config, train_samples, progress=not config.no_progress and dist.is_main)
        say(f"[warm-up] {config.warmup_vision_steps} plot-reading + {config.warmup_steps} answer steps in "
            f"{time.time() - t0:.0f} s" + (f", final answer loss {losses[-1]:.3f}" if losses else ""))
    # the KL reference; and a LoRA run's base model, unless --model can load it again
    keep_base = config.lora_rank and (warming or config.model == "tiny")
    if (config.beta > 0 and warming or keep_base) and dist.is_main:
        save_policy(policy, os.path.join(run_dir, "reference"))
    dist.barrier()  # the reference folder is complete before any rank reads it


def resume_from(ckpt: str, state: dict, dist: Dist, run_dir: str, say) -> int:
    """A run continued from `ckpt`: its RNG streams back, log lines of later steps dropped. Returns its step."""
    step = state["step"]
    set_rng_state(state["rng"])
    if dist.is_main:
        for log in ("metrics.jsonl", "eval.jsonl"):
            trim_log(os.path.join(run_dir, log), step)
    say(f"[resume] {ckpt}: continuing after step {step}")
    return step


def log_step(step: int, columns: dict, update: dict, timer: Timer, config: Config, run_dir: str, bar) -> None:
    """Rank 0: one metrics.jsonl row, a line when the update was skipped, the progress bar's numbers."""
    metrics = step_metrics(step, columns, update, timer, config.group_size)
    append_jsonl(os.path.join(run_dir, "metrics.jsonl"), metrics)
    if update["skipped"]:
        tqdm.write(f"[step {step}] non-finite loss or gradient: update skipped")
    bar.set_postfix(reward=f"{metrics['reward']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                    s_step=f"{metrics['time_step']:.1f}")


def say_memory_mode(policy: Policy, config: Config, dist: Dist, say) -> None:
    """One line each for --offload, --pure-bf16 and LoRA, saying what they do to this run."""
    if dist.offload:
        say(f"[offload] FSDP2 over {dist.world_size} rank(s): fp32 weights, gradients and AdamW state in host "
            f"memory, forwards on {dist.device}, gradient checkpointing on")
    if config.pure_bf16:
        say("[pure-bf16] bf16 weights and AdamW moments with stochastic rounding, no fp32 master copy")
    if policy.adapters is not None:
        trained = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in policy.model.parameters())
        say(f"[lora] rank {config.lora_rank}, alpha {config.lora_alpha:g}: {trained:,} of {total:,} parameters "
            f"trained ({100 * trained / total:.2f} %); the KL reference is the model with its adapters off")


def usage_error(err: Exception) -> int:
    """A data folder, model or checkpoint that cannot be used: one line, exit code 2."""
    print(f"error: {err}", file=sys.stderr)
    return 2


def train(config: Config, dist: Dist) -> int:
    """The run: one process, or one rank of a torchrun job (then rank 0 alone writes and prints)."""
    torch.manual_seed(config.seed)
    enable_tf32(config.device)
    run_dir = os.path.join(config.out, config.name)
    os.makedirs(run_dir, exist_ok=True)
    progress = not config.no_progress and dist.is_main
    say = print if dist.is_main else (lambda *a, **k: None)

    # -- data, checkpoint, policy ------------------------------------------------------------------
    try:
        train_samples, eval_samples = load_splits(config, dist, progress)
    except data_gen.DataError as err:
        return usage_error(err)
    ckpt = latest_checkpoint(run_dir) if config.resume else None
    if config.resume and ckpt is None:
        say(f"[resume] no checkpoint in {run_dir}: starting from scratch")
    try:
        # the trainer state first, so that a checkpoint that is refused stops the run before anything else loads
        state = load_trainer_state(ckpt, trust_pickle=config.trust_checkpoint) if ckpt else None
        policy = load_policy(policy_source(config, ckpt, run_dir), device=load_device(config), seed=config.seed)
    except (CheckpointError, ModelNotFound) as err:
        return usage_error(err)
    eval_prompts = [make_prompt(policy, config.eval_data, eval_samples, i, config.cot)
                    for i in data_gen.balanced_indices(eval_samples, config.eval_samples)]
    if dist.is_main:  # not config.json: that name marks a model folder
        write_atomic(os.path.join(run_dir, "run_config.json"), json.dumps(dataclasses.asdict(config), indent=1))

    # -- warm-up (tiny only; its result is also the KL reference) or resume ------------------------
    if ckpt is None:
        start_fresh(policy, config, dist, train_samples, run_dir, say)
        start_step = 0
    else:
        start_step = resume_from(ckpt, state, dist, run_dir, say)
    if config.lora_rank:
        try:
            add_lora(policy, config, ckpt, run_dir)
        except ModelNotFound as err:
            return usage_error(err)
    prepare_policy(policy, dist, config.grad_checkpointing, config.freeze_vision, dtype=DTYPES[config.dtype],
                   pure=config.pure_bf16)
    say_memory_mode(policy, config, dist, say)
    reference_dir = os.path.join(run_dir, "reference")
    ref_source = reference_dir if os.path.isdir(reference_dir) else config.model
    ref_policy = make_reference(policy, ref_source, config, dist) if config.beta > 0 else None
    policy.compile_decode = use_compile(config, dist)
    config.rollout_batch = choose_rollout_batch(policy, config, dist,
                                                max(len(p.encoded.input_ids) for p in eval_prompts))
    optimizer = make_optimizer(policy, config)
    if ckpt is not None:
        try:
            restore_optimizer(ckpt, state, policy, optimizer, dist)
        except CheckpointError as err:
            return usage_error(err)
    else:
        t0 = time.time()
        row = run_eval(policy, 0, eval_prompts, config, run_dir, tag="start", dist=dist)
        if dist.is_main:
            say(f"[eval] step 0 (start of RL): {eval_line(row)}  ({time.time() - t0:.0f} s)")

    # -- RL loop ----------------------------------------------------------------------------------
    bar = tqdm(range(start_step, config.steps), desc="TimerPO", disable=not progress, dynamic_ncols=True,
               initial=start_step, total=config.steps)
    for step in bar:
        # This rank's contiguous share of the step's global prompt list (whole groups).
        indices = rank_slice(step_prompt_indices(len(train_samples), config.prompts_per_step, step, config.seed),
                             dist)
        prompts = [make_prompt(policy, config.data, train_samples, i, config.cot) for i in indices]
        episodes, adv, update, timer = rl_step(policy, ref_policy, optimizer, prompts, step, config, dist)
        columns = concat_columns(dist.gather(step_columns(episodes, adv)))
        if dist.is_main:
            log_step(step + 1, columns, update, timer, config, run_dir, bar)
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            row = run_eval(policy, done, eval_prompts, config, run_dir, dist=dist)
            if dist.is_main:
                tqdm.write(f"[eval] step {done}: {eval_line(row)}")
                draw_curves(run_dir)
        if done % config.save_every == 0 or done == config.steps:
            save_checkpoint(run_dir, done, policy, optimizer, extra={"args": dataclasses.asdict(config)}, dist=dist)
    bar.close()
    if dist.is_main:
        draw_curves(run_dir)
        print(f"[done] {run_dir}: metrics.jsonl, eval.jsonl, curves.png, "
              f"{os.path.basename(latest_checkpoint(run_dir) or '')}")
    return 0


def main(argv=None) -> int:
    config = parse_args(argv)
    try:
        dist = init_distributed(config.dist, config.device, config.dist_timeout, offload=config.offload)
    except DistError as err:
        return usage_error(err)
    config.device = dist.device
    if not dist.initialized:
        return train(config, dist)
    with fail_fast(dist):  # under torchrun: a rank that raises ends the job at once, with one clear line
        code = train(config, dist)
        dist.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
