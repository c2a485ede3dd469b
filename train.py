"""TimerPO training: `python train.py` (tiny model, CPU, minutes) or `python train.py --model qwen2.5-vl-3b`.

Reads top to bottom: configuration (Config: every setting, its default and where that comes from, its doc;
the presets) → data → policy → (tiny only) supervised format warm-up → RL loop.
Each RL step is the five functions of timerpo/algorithm.py:
    rollout → score_outcomes → ground_completions (TimerPO) + reference_logprobs (β > 0) → compute_advantages
    → update_policy
Outputs go to runs/<name>/: metrics.jsonl (one line per step), eval.jsonl (one line per held-out eval),
eval-<step>/ (gallery.png and a few completions of each held-out eval), curves.png (a panel per quantity),
run_config.json, and atomic checkpoints ckpt-<step>/ (hub format model + optimizer/RNG) named by `latest`.
A run folder holds one run: a new run into a used one needs --overwrite; --resume continues it with the
settings of its checkpoint (see INVOCATION_SETTINGS and RUN_SETTINGS for what may change).

Several processes: `torchrun --nproc_per_node=N train.py --dist ddp|fsdp ...` (timerpo/distributed.py).
--prompts-per-step stays the GLOBAL batch (split evenly over ranks, whole groups per rank); --micro-batch and
--rollout-batch are per rank. The update equals the 1-process one on the same global batch; rank 0 logs.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shutil
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
from timerpo.cli import add_flags, usage_error
from timerpo.checkpoint import (LATEST, STATE_FILE, CheckpointError, append_jsonl, checkpoint_names, is_checkpoint,
                                latest_checkpoint, load_trainer_state, model_fingerprint, restore_optimizer,
                                save_checkpoint, set_rng_state)
from timerpo.distributed import (DIST_MODES, SINGLE, Dist, DistError, fail_fast, full_params, init_distributed,
                                 prepare_policy, rank_slice)
from timerpo.evaluate import predict, prediction_record, read_suite, summarize
from timerpo.files import png_bytes, write_atomic
from timerpo.lora import DEFAULT_TARGETS, adapters_disabled
from timerpo.optim import BF16AdamW
from timerpo.plots import draw_gallery, gallery_picks, training_curves
from timerpo.policy import ModelNotFound, Policy, find_model, load_policy, save_policy
from timerpo.precision import DTYPES, default_dtype, enable_tf32
from timerpo.progress import is_terminal, progress_bar, quiet_library_bars
from timerpo.reward import LOC_MODES
from timerpo.rollout import decode_bytes_per_row, rollout_batch_for_memory
from timerpo.warmup import supervised_warmup

# ---------------------------------------------------------------------------------------------------
# Configuration: one dataclass; every field is the flag of the same name. Each field says where its default
# comes from: paper(...) the paper's value for the Qwen models (method.md §18), release(...) the public release's
# value where the paper's text leaves the setting open, project(...) a setting this implementation adds (off by
# default, or this project's choice), option(...) how the run is carried out or watched (paths, devices,
# batching, evaluation and checkpoints), which the trained weights do not depend on. The presets below change a
# few of them.
SOURCES = ("paper", "release", "project", "run")


def setting(value, doc: str, choices: tuple | None, source: str):
    return field(default=value, metadata={"doc": doc, "choices": choices, "source": source})


def paper(value, doc: str, choices: tuple | None = None):
    """A setting of the method: its default is the paper's value."""
    return setting(value, doc, choices, "paper")


def release(value, doc: str, choices: tuple | None = None):
    """A setting of the method that the paper's text leaves open: its default is the public release's value."""
    return setting(value, doc, choices, "release")


def project(value, doc: str, choices: tuple | None = None):
    """A setting the paper does not have: its default is this implementation's (off for an addition)."""
    return setting(value, doc, choices, "project")


def option(value, doc: str, choices: tuple | None = None):
    """A setting of the run (paths, devices, logging, batching, evaluation, checkpoints): not the method's."""
    return setting(value, doc, choices, "run")


@dataclass
class Config:
    """Every training setting (`python train.py --help` lists them with their paper and tiny values)."""

    # -- the run
    model: str = option("tiny", "tiny (embedded, built locally, CPU) | qwen2.5-vl-3b | qwen2.5-vl-7b | a hub id | "
                                "a local folder")
    data: str = option("data/train", "training data folder, or folders joined by commas to mix them (A,B: one pool "
                                     "of all their samples); a missing folder is generated (anomllm suite, 400 per "
                                     "family, seed 3407). Labelled real series imported with data_gen.py --suite "
                                     "series train too: a window whose anomaly has an unknown class gets no class "
                                     "term, R = (0.1 R_fmt + 0.7 R_loc) / 0.8, and sits out the warm-up "
                                     "(docs/samples.md)")
    eval_data: str = option("data/test", "held-out data folder (generated on first use: anomllm suite, seed 42)")
    out: str = option("runs", "parent folder of run folders")
    name: str | None = option(None, "run name (default: <model>-<advantage>-<cot>-<grounding>-s<seed>)")
    preset: str | None = option(None, "the values below: paper (the defaults), tiny (CPU, ~10 min on 2 cores), "
                                      "tiny-long (tiny with a 6x longer answer warm-up, ~36 min) or "
                                      "release (the defaults with the public release's choices where a flag "
                                      "exists: --adv-norm mean --tsr-norm mean --loc-reward six-mean "
                                      "--eval-temperature 0.4; its activation checkpointing on 4 GPUs changes no "
                                      "number: add --grad-checkpointing and torchrun); default: tiny for --model "
                                      "tiny, paper otherwise", choices=("paper", "tiny", "tiny-long", "release"))
    seed: int = option(0, "seed of the run (prompt order, sampling streams, tiny weights)")
    resume: bool | str = option(False, "continue a run where its checkpoint left off, with the settings saved "
                                       "there: --resume alone continues <out>/<name> from its latest checkpoint, "
                                       "--resume PATH the run folder PATH, or its ckpt-N folder PATH")
    override_resumed: bool = option(False, "with --resume: accept flags that change the experiment (model, data, "
                                           "method, rates, sizes, seed, dtype); each change is printed")
    overwrite: bool = option(False, "start a new run in a run folder that holds one: the old folder is deleted "
                                    "first (with --resume PATH/ckpt-N: the run's later checkpoints are)")
    config: str | None = option(None, "start from the settings of this JSON file (a run's run_config.json); flags "
                                      "given on the command line override it")
    trust_checkpoint: bool = option(False, "with --resume: also load a checkpoint of the older format, whose "
                                           "trainer_state.pt and optimizer/.metadata are pickles that can run code "
                                           "(only for runs you made yourself)")
    device: str | None = option(None, "cpu | cuda (default: cuda when available)", choices=("cpu", "cuda"))
    no_progress: bool = option(False, "no progress bars (transformers' loading and saving bars included)")
    report_to: str = option("none", "also write the logged numbers for tensorboard (<run>/tensorboard/; needs "
                                    "`pip install tensorboard`)", choices=("none", "tensorboard"))
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
                                  "without FSDP, off on CPU, where compiling costs more than it saves on short runs; "
                                  "if compiling fails, sampling goes on in eager mode with a one-line note",
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
    adv_norm: str = paper("std", "group normalization of Â_main, and of Â_TsR unless --tsr-norm is given: std "
                                 "(paper text: (R − mean)/(std + δ)) | mean (public code: R − mean)",
                          choices=("std", "mean"))
    tsr_norm: str = paper("std", "normalization of the grounded advantage Â_TsR: std (paper reading, as Â_main) | "
                                 "mean | std-floor (divide by max(std_G s, --tsr-floor), so Sinkhorn-noise spreads "
                                 "stay small)", choices=TSR_NORMS)
    tsr_floor: float = project(0.05, "floor on std_G s for --tsr-norm std-floor")
    loc_reward: str = release("six-mean", "localization reward: six-mean (public release) | aff-f1 (affiliation "
                                          "F1 alone, one reading of the paper's text)", choices=LOC_MODES)

    # -- sizes and rates
    steps: int = paper(250, "RL steps (the paper's 250 are 10 epochs of 3,200 prompts at 128 per step)")
    prompts_per_step: int = paper(128, "distinct prompts per step, the global batch over all ranks")
    group_size: int = paper(5, "completions per prompt, G")
    max_new_tokens: int = paper(1024, "completion length cap")
    lr: float = paper(1e-6, "AdamW learning rate, constant")
    weight_decay: float = paper(0.01, "AdamW weight decay")
    max_grad_norm: float = paper(1.0, "gradient-norm clip")
    micro_batch: int = option(4, "completions per forward/backward; gradients accumulate exactly")
    rollout_batch: int = option(0, "completions sampled together per rank; 0 = auto: on CUDA as many as the "
                                   "free memory holds, up to all of the rank's completions of a step; 64 on CPU")

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
    warmup_steps: int = project(0, "supervised warm-up steps on the true answers before RL")
    warmup_vision_steps: int = project(0, "plot-reading warm-up steps before those, vision tower only")
    warmup_aux_weight: float = project(0.0, "weight of the plot-reading loss beside the answer loss in the warm-up")
    warmup_lr: float = project(0.0, "learning rate of the supervised warm-up")
    warmup_targets: str = project("exact", "warm-up answer intervals: exact (the true ones) | columns (widened to "
                                           "the whole token columns they touch, the finest place the tiny model "
                                           "sees)", choices=("exact", "columns"))
    warmup_pointer: float = project(0.0, "weight of the pointing loss: one attention head of the language model's "
                                         "layer 1 should look at the plot column each answer digit names (off at 0)")
    warmup_position: float = project(0.0, "weight of a plot-reading head that asks every visual token to name its "
                                          "own token column, a position the pointing head can copy (off at 0)")
    warmup_copy: float = project(0.0, "weight of the copy target: what the pointing head alone adds to the "
                                      "residual stream must name each boundary's number through the LM head "
                                      "(off at 0)")
    warmup_reasoning: str = project("class", "warm-up reasoning: class (one sentence per class) | positions (the "
                                             "sentence names each anomaly's middle step, a place on the plot the "
                                             "pointing head also targets)", choices=("class", "positions"))
    warmup_position_names: str = project("columns", "what the column-position head asks each visual token to "
                                                    "name: columns (a linear head over the token columns) | "
                                                    "numbers (its column's edge numbers, through the language "
                                                    "model's own LM head: needs --tiny-numbers whole)",
                                         choices=("columns", "numbers"))
    tiny_numbers: str = project("digits", "number tokens of the tiny model's tokenizer: digits (one per digit, as "
                                          "Qwen's) | whole (one token per integer 0..1000, so an interval end is "
                                          "one decision); other models keep their own tokenizer",
                                choices=("digits", "whole"))

    # -- held-out evaluation and checkpoints
    eval_every: int = option(25, "held-out evaluation every N steps, and once before RL")
    eval_samples: int = option(256, "held-out samples per evaluation, balanced over families")
    eval_temperature: float = paper(0.4, "sampling temperature of held-out evaluation (the paper's validation)")
    save_every: int = option(25, "checkpoint every N steps (and at the end)")
    keep_checkpoints: int = option(0, "keep the newest N checkpoints, delete older ones (0 keeps all)")


# The presets: the only places where values differ from the defaults. The tiny CPU preset, measured: 9.2 min
# of train.py on 2 cores (10-12 min with two runs side by side); test Avg F1 68.3 ± 7.9 over seeds 0-7
# (docs/results.md).
TINY = dict(steps=100, prompts_per_step=4, max_new_tokens=72, lr=1e-4, warmup_steps=400, warmup_vision_steps=200,
            warmup_aux_weight=1.0, warmup_lr=2e-3, warmup_targets="columns", warmup_pointer=1.0, warmup_position=1.0,
            tiny_numbers="whole", eval_every=50, eval_samples=128,
            save_every=50, micro_batch=20, rollout_batch=20)
# The public release's choices wherever a flag exists for one (method.md §23): its advantages only subtract the
# group mean; the last two equal the defaults, and are spelled out so that the preset keeps them.
RELEASE = dict(adv_norm="mean", tsr_norm="mean", loc_reward="six-mean", eval_temperature=0.4)
# The tiny preset with six times the answer warm-up, the one lever that made the tiny model localize (loc gain
# > 0); 36 min with two runs side by side on 2 cores (docs/results.md, "More levers, and a longer warm-up").
TINY_LONG = dict(TINY, warmup_steps=2400)
PRESETS = {"paper": {}, "tiny": TINY, "tiny-long": TINY_LONG, "release": RELEASE}
EXTENDS = {"tiny-long": "tiny"}  # --help shows only where a preset differs from the one it extends


# What a saved run's settings (a checkpoint's on --resume, a run_config.json given to --config) do, by field.
# Settings of this command and this machine are never taken from a saved run:
INVOCATION_SETTINGS = ("out", "name", "resume", "override_resumed", "overwrite", "config", "trust_checkpoint",
                       "device", "no_progress", "dist", "dist_timeout", "grad_checkpointing", "compile", "offload")
# Settings of the run's course, which --resume may change (each change is printed): the saved value comes back
# unless the flag is given. Micro-batches accumulate exactly; the rollout batch only groups the sampling.
RUN_SETTINGS = ("steps", "eval_every", "save_every", "keep_checkpoints", "report_to", "micro_batch",
                "rollout_batch")
# Every other setting defines the experiment (model, data, method, rates, sizes, seed, dtype, evaluation):
# --resume refuses a flag that changes one, unless --override-resumed.


def experiment_settings() -> list[str]:
    return [f.name for f in dataclasses.fields(Config) if f.name not in INVOCATION_SETTINGS + RUN_SETTINGS]


def make_config(given: dict, saved: dict | None = None) -> Config:
    """The run's Config: the defaults, then the preset's values, then the saved settings (--config FILE, or
    the checkpoint's on --resume), then the flags given on the command line. The preset is --preset, else the
    saved one, else tiny for --model tiny and paper for every other model; a --preset given on the command line
    counts as its flags. --adv-norm sets --tsr-norm too, unless a later (or the same) layer sets that."""
    saved = dict(saved or {})
    if saved.get("advantage") == "grpo":
        saved.pop("alpha", None)  # forced to 0 below, not chosen: a switch to timerpo gets its default back
    model = given.get("model", saved.get("model", Config.model))
    preset = given.get("preset") or saved.get("preset") or ("tiny" if model == "tiny" else "paper")
    flags_preset = PRESETS[preset] if "preset" in given else {}
    layers = [PRESETS[preset], saved, flags_preset, given]  # a later layer wins
    config = Config(**{key: value for layer in layers for key, value in layer.items()})
    config.preset = preset
    if last_layer_setting(layers, "adv_norm") > last_layer_setting(layers, "tsr_norm"):
        config.tsr_norm = config.adv_norm  # one flag for both: --adv-norm mean is the release's reading of both
    if config.advantage == "grpo":
        config.alpha = 0.0  # GRPO is TimerPO without the grounded term
    return config


def last_layer_setting(layers: list[dict], key: str) -> int:
    """Index of the last layer that sets `key` (-1 when none does)."""
    return max((i for i, layer in enumerate(layers) if key in layer), default=-1)


def fits(value, kind) -> bool:
    """Whether a JSON value can be a setting of annotation `kind` (an int is a float; a bool is not an int)."""
    kinds = typing.get_args(kind) or (kind,)
    if value is None or isinstance(value, bool):
        return type(value) in kinds
    return any(isinstance(value, (int, float) if k is float else k) for k in kinds if k is not bool)


def saved_settings(values: dict, where: str) -> dict:
    """A saved run's settings as make_config takes them: every one checked against its field's type and
    choices, this invocation's own (INVOCATION_SETTINGS) left out. Raises SettingsError."""
    if not isinstance(values, dict):
        raise SettingsError(f"{where} holds no settings (expected a JSON object of train.py settings)")
    fields, types = {f.name: f for f in dataclasses.fields(Config)}, typing.get_type_hints(Config)
    out = {}
    for key, value in values.items():
        if key not in fields:
            raise SettingsError(f"{where}: {key!r} is not a setting of train.py")
        choices = fields[key].metadata["choices"]
        if not fits(value, types[key]) or (choices and value is not None and value not in choices):
            raise SettingsError(f"{where}: {key} = {value!r} is not a valid value")
        if key not in INVOCATION_SETTINGS:
            out[key] = float(value) if types[key] is float else value
    return out


def read_settings_file(path: str) -> dict:
    """--config FILE: the settings of a run_config.json (or any JSON object of settings)."""
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, ValueError) as err:
        raise SettingsError(f"--config {path}: cannot read it ({err})") from None
    return saved_settings(values, path)


class SettingsError(Exception):
    """Settings that cannot be used as given (a bad --config file, a change --resume refuses); one line."""


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
    """A field's --help line: its doc, then its default named after its source (paper: the paper's value,
    release: the public release's, default: this implementation's) and each preset's value that differs."""
    doc, source = f.metadata["doc"], f.metadata["source"]
    label = source if source in ("paper", "release") else "default"
    base = {name: PRESETS.get(EXTENDS.get(name), {}) for name in PRESETS}
    values = [f"{name}: {preset[f.name]}" for name, preset in PRESETS.items()
              if f.name in preset and preset[f.name] != f.default and preset[f.name] != base[name].get(f.name)]
    if source == "paper" or source == "release" or not (f.default is None or f.default is False):
        values.insert(0, f"{label}: {f.default}")
    return f"{doc} [{'; '.join(values)}]" if values else doc


def build_parser() -> argparse.ArgumentParser:
    """One flag per Config field, typed by the field's annotation. Flags not given stay out of the namespace
    (argparse.SUPPRESS), so make_config can tell them from the preset's values."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_flags(p, Config, help_of=flag_help, suppress=True,
              extra={"resume": dict(nargs="?", const=True, metavar="PATH")})  # a switch that may take a path
    return p


def parse_args(argv=None) -> Config:
    """The Config of `python train.py <argv>`, --config FILE included (--resume's checkpoint is read by
    resume_settings). A bad value ends the program with a usage error (exit 2)."""
    parser = build_parser()
    return configure(parser, vars(parser.parse_args(argv)))


def configure(parser: argparse.ArgumentParser, given: dict, saved: dict | None = None) -> Config:
    """make_config of the flags `given` over `saved` (else over the --config file's), checked and resolved."""
    if "config" in given:
        if "resume" in given:
            parser.error("--config starts a new run and --resume continues one with its own settings: give one")
        try:
            saved = read_settings_file(given["config"])
        except SettingsError as err:
            parser.error(str(err))
    config = make_config(given, saved)
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
    for key in ("rollout_batch", "keep_checkpoints", "warmup_steps", "warmup_vision_steps", "warmup_aux_weight",
                "warmup_pointer", "warmup_position", "warmup_copy",
                "beta", "entropy_coef", "alpha", "weight_decay", "eval_temperature", "warmup_lr"):
        if getattr(config, key) < 0:
            parser.error(f"--{key.replace('_', '-')} must be >= 0, got {getattr(config, key)}")
    if config.group_size < 2:
        parser.error("--group-size must be at least 2: group-relative advantages need a group")
    if config.warmup_position_names == "numbers" and (config.model != "tiny" or config.tiny_numbers != "whole"):
        parser.error("--warmup-position-names numbers names whole-number tokens: use it with --model tiny "
                     "--tiny-numbers whole")
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


def ensure_data(folders: str, seed: int, progress: bool, expcot: bool = True):
    """Load a data folder, or several joined by commas (their samples in one list, image paths made absolute);
    a folder that does not exist yet is generated first (anomllm suite). Windows of an unlabelled real series
    are refused (nothing to reward), and so are samples without ExpCoT (the grounding target). With `expcot`,
    a folder written by an older ExpCoT gets its traces recomputed (data_gen.with_current_expcot)."""
    samples = []
    for folder in [f for f in folders.split(",") if f]:
        if not os.path.exists(os.path.join(folder, "samples.jsonl")):
            print(f"[data] {folder} not found: generating the anomllm suite (400 per family, seed {seed})")
            data_gen.generate(folder, "anomllm", 400, seed, progress=progress)
        loaded = data_gen.load_samples(folder)
        bad = next((s for s in loaded if s.intervals is None or not s.expcot), None)
        if bad is not None:
            why = "has no labels" if bad.intervals is None else "has no ExpCoT (imported by an older data_gen.py)"
            raise data_gen.DataError(f"{folder}: sample {bad.id!r} {why}; training needs labelled windows with "
                                     f"ExpCoT (docs/samples.md); score such folders with eval.py --data")
        if expcot:
            loaded = data_gen.with_current_expcot(folder, loaded, progress)
        if "," in folders:  # mixed folders: make_prompt joins `folders` with an absolute path, which wins
            loaded = [dataclasses.replace(s, image=os.path.abspath(os.path.join(folder, s.image))) for s in loaded]
        samples += loaded
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
    """Accumulates wall seconds per named phase: `with timer("rollout"): ...`; also this process's CPU seconds
    (`cpu_seconds`), which a benchmark on a shared machine can trust more than wall time."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu


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
        "unparsable": np.array([ep.parsed.intervals is None for ep in episodes], dtype=float),
        "grounding": np.array([ep.grounding for ep in episodes if ep.grounding is not None]),
        "s": adv.grounded_reward.numpy() if adv.grounded_reward is not None else np.zeros(0),
        "advantage": adv.advantages.numpy(),
        "main": adv.main.numpy(),
        "grounded": adv.grounded.numpy() if adv.grounded is not None else np.zeros(0),
        "projected": adv.projected.numpy() if adv.projected is not None else np.zeros(0),
        "coef": adv.coef.numpy() if adv.coef is not None else np.zeros(0),  # one per group
        "zero_std_groups": np.array([round(adv.zero_std_frac * n_groups)]),  # a count, so ranks can add it
        "groups": np.array([n_groups]),
    }


def nan_mean(values: np.ndarray) -> float | None:
    """Mean of the values that are not NaN; None when none is."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else None


def abs_mean(values: np.ndarray) -> float | None:
    """Mean of |values|; None without values (GRPO computes no grounded term)."""
    return float(np.abs(values).mean()) if len(values) else None


def group_std(values: np.ndarray, group_size: int) -> float | None:
    """Mean over groups of the sample std (ddof = 1) within each group of G values; None without values."""
    return float(values.reshape(-1, group_size).std(axis=1, ddof=1).mean()) if len(values) else None


def concat_columns(tables: list[dict]) -> dict[str, np.ndarray]:
    """The ranks' step columns joined in rank order."""
    return {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}


def step_metrics(step, cols, update, timer, group_size) -> dict:
    """One metrics.jsonl row from the (gathered) step columns; the times are this process's (rank 0's).
    docs/metrics.md explains every key. The update's clip fraction is not logged: with one update per rollout
    ρ ≡ 1 (method.md §16), so it is always 0."""
    rewards, lengths, grounding = cols["reward"], cols["length"], cols["grounding"]
    sec = timer.seconds
    return {
        "step": step,
        "reward": float(rewards.mean()),
        "reward_fmt": float(cols["fmt"].mean()),
        "reward_cls": nan_mean(cols["cls"]),  # NaN for windows of unknown class: left out
        "reward_loc": float(cols["loc"].mean()),
        "reward_std_in_group": group_std(rewards, group_size),  # the std_G R that Â_main divides by
        "zero_std_frac": float(cols["zero_std_groups"].sum() / cols["groups"].sum()),
        "adv_mean": float(cols["advantage"].mean()),
        "adv_std": float(cols["advantage"].std()),
        "adv_main_absmean": abs_mean(cols["main"]),
        "adv_tsr_absmean": abs_mean(cols["grounded"]),  # Â_TsR, before the projection
        "adv_tsr_perp_absmean": abs_mean(cols["projected"]),  # Â⊥_TsR, the term α weighs
        "proj_coef": float(cols["coef"].mean()) if len(cols["coef"]) else None,
        "grounding_mean": float(grounding.mean()) if len(grounding) else None,
        # within-group spread of W and of s = exp(-W/tau): what A_TsR's normalisation divides by
        "W_std_in_group": group_std(grounding, group_size),
        "s_std_in_group": group_std(cols["s"], group_size),
        "kl": update["kl"], "entropy": update["entropy"],
        "loss": update["loss"], "grad_norm": update["grad_norm"], "skipped": update["skipped"],
        "completion_len": float(lengths.mean()),
        "truncated_frac": float(1.0 - cols["finished"].mean()),
        "unparsable_frac": float(cols["unparsable"].mean()),
        "time_rollout": sec.get("rollout", 0.0), "time_reference": sec.get("reference", 0.0),
        "time_grounding": sec.get("grounding", 0.0), "time_update": sec.get("update", 0.0),
        "time_step": sum(sec.values()),
        # the whole job's sampled tokens over rank 0's rollout time (ranks sample at the same time)
        "tokens_per_s": float(lengths.sum() / max(sec.get("rollout", 1e-9), 1e-9)),
    }


def format_warmup(policy: Policy, config: Config, train_samples: list, progress: bool) -> list[float]:
    """The supervised warm-up (tiny only) on the training samples of known class (its target names the class):
    plot reading, then answers."""
    known = [s for s in train_samples if s.label != data_gen.UNKNOWN]
    if not known:
        raise data_gen.DataError(f"{config.data}: no window of known class for the supervised warm-up; mix in "
                                 f"generated data (--data data/train,{config.data}) or pass --warmup-steps 0 "
                                 f"--warmup-vision-steps 0")
    return supervised_warmup(policy, config.data, known, config.warmup_steps, batch_size=8, seed=config.seed,
                             vision_steps=config.warmup_vision_steps, progress=progress, **warmup_targets(config))


def warmup_targets(config: Config) -> dict:
    """supervised_warmup's rate, targets and weights as `config` sets them (bench/sft_control.py reuses them)."""
    return dict(lr=config.warmup_lr, aux_weight=config.warmup_aux_weight, snap=config.warmup_targets == "columns",
                pointer_weight=config.warmup_pointer, position_weight=config.warmup_position,
                copy_weight=config.warmup_copy, positions=config.warmup_reasoning == "positions",
                position_numbers=config.warmup_position_names == "numbers")


def make_reference(policy: Policy, source: str, config: Config, dist: Dist = SINGLE) -> Policy:
    """The frozen KL reference π_ref, loaded from `source`; it shares the policy's tokenizer. With LoRA it is
    the policy itself, whose forwards rl_step runs with the adapters off (no second copy)."""
    if policy.adapters is not None:
        return dataclasses.replace(policy, wrapper=None)
    ref_model = load_policy(source, device=load_device(config), seed=config.seed,
                            tiny_numbers=config.tiny_numbers).model.eval()
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


def policy_source(config: Config, resume: Resume | None) -> str:
    """What the policy loads: a checkpoint's model when resuming, else --model. LoRA: always the base
    model (the run's own saved base when it has one), whose adapters add_lora puts in afterwards."""
    saved_rank = lora_rank_of(resume.ckpt) if resume else config.lora_rank
    if saved_rank != config.lora_rank:
        raise CheckpointError(f"{resume.ckpt} holds " + (f"LoRA adapters of rank {saved_rank}" if saved_rank else
                              "a fully fine-tuned model") + f": resume it with --lora-rank {saved_rank}")
    if config.lora_rank:
        return resume.reference.source if resume else config.model  # the base, checked by own_reference
    return os.path.join(resume.ckpt, "model") if resume else config.model


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


def add_lora(policy: Policy, config: Config, resume: Resume | None, reference: Reference) -> None:
    """LoRA runs: the checkpoint's adapters when resuming, else new ones, which name as their base the run's
    saved base model when it made one (tiny, or after a warm-up), else --model."""
    from timerpo.lora import ADAPTER_DIR, add_adapters, load_adapters

    if resume is not None:
        load_adapters(policy, os.path.join(resume.ckpt, ADAPTER_DIR))
        return
    add_adapters(policy, config.lora_rank, config.lora_alpha, config.lora_targets, base=reference.source,
                 seed=config.seed)


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
        with timer("reference"), full_params(ref_policy, dist), adapters_disabled(ref_policy):
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


def read_jsonl(path: str) -> list[dict]:
    """The rows of a .jsonl log ([] when it does not exist yet)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def draw_curves(run_dir: str) -> None:
    """runs/<name>/curves.png: one panel per logged quantity (timerpo/plots.py, training_curves)."""
    train_rows, eval_rows = (read_jsonl(os.path.join(run_dir, log)) for log in ("metrics.jsonl", "eval.jsonl"))
    training_curves(train_rows, eval_rows, os.path.join(run_dir, "curves.png"), title=os.path.basename(run_dir))


class RunLog:
    """Rank 0's record of the numbers: metrics.jsonl (a row per step) and eval.jsonl (a row per held-out
    evaluation); with --report-to tensorboard also their scalars as TensorBoard events in <run>/tensorboard/,
    tagged train/<key> and eval/<key>."""

    TAGS = {"metrics": "train", "eval": "eval"}

    def __init__(self, run_dir: str, report_to: str, start_step: int):
        self.run_dir, self.writer = run_dir, None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # the optional package (check_report_to)

            # purge_step: a resumed run hides the events of the steps after its checkpoint, which it redoes
            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                                        purge_step=start_step + 1 if start_step else None)

    def write(self, log: str, row: dict) -> None:
        append_jsonl(os.path.join(self.run_dir, f"{log}.jsonl"), row)
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{self.TAGS[log]}/{key}", value, row["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


CURVES_SECONDS = 30  # curves.png is redrawn after the step that ends this long a wait, and at every evaluation
EVAL_DIR = re.compile(r"eval-(\d+)")
EVAL_COMPLETIONS = 8  # completions.jsonl: the first few of the gallery's samples


def eval_folder(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"eval-{step:06d}")


def run_eval(policy, step, eval_prompts, config: Config, run_dir, log: RunLog | None, tag="rl",
             dist: Dist = SINGLE) -> dict | None:
    """Held-out evaluation. Under torchrun each rank samples a contiguous share and rank 0 scores them all;
    completion seeds depend on the sample, not the rank, so the result equals the 1-process one.
    Rank 0 writes the eval.jsonl row and eval-<step>/: gallery.png (as eval.py draws it) and completions.jsonl
    (a few of the gallery's samples: completion, parse, scores). Returns the row on rank 0, None elsewhere."""
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
    log.write("eval", row)
    folder = eval_folder(run_dir, step)
    title = (f"{os.path.basename(run_dir)}, step {step}: {summary['n']} held-out samples, reward "
             f"{summary['reward']:.3f}, Avg F1 {summary['avg_group_f1']:.3f}, {summary['unparsable']} unparsable")
    gallery = draw_gallery(preds, config.eval_data, read_suite(config.eval_data, [p.sample for p in preds]), title)
    write_atomic(os.path.join(folder, "gallery.png"), png_bytes(gallery))
    write_atomic(os.path.join(folder, "completions.jsonl"),
                 "".join(json.dumps(prediction_record(p), ensure_ascii=False) + "\n"
                         for p in gallery_picks(preds)[:EVAL_COMPLETIONS]))
    return row


def eval_line(row: dict) -> str:
    """The printed summary of one eval.jsonl row."""
    return (f"reward {row['reward']:.3f}  Avg F1 {row['avg_group_f1']:.3f}  loc gain {row['loc_gain']:+.3f}  "
            f"PW-F1 anomalous {row['pw_f1_anomalous']:.3f}  cls acc {row['cls_acc']:.3f}")


# ---------------------------------------------------------------------------------------------------
# The run folder: one run each, continued only as the same experiment

REFERENCE_DIR = "reference"
COMMAND_FLAGS = ("resume", "override_resumed", "overwrite", "config", "trust_checkpoint")  # not printed as changes


@dataclass
class Reference:
    """The KL reference π_ref: where it loads from (the run's reference/ folder, or its start model) and, when
    this run made it, the record its checkpoints carry: {"sha256": model_fingerprint, "made_by": settings}."""

    source: str
    record: dict | None


@dataclass
class Resume:
    """What --resume continues: the checkpoint, its trainer state, the run's checkpoints after it (deleted
    with --overwrite) and the run's own KL reference."""

    ckpt: str
    state: dict
    later: list[str]
    reference: Reference

    @property
    def step(self) -> int:
        return self.state["step"]


def main_process_say(*args, **kwargs) -> None:
    """print, on rank 0 only (under torchrun before the process group exists)."""
    if os.environ.get("RANK", "0") == "0":
        print(*args, **kwargs)


def same_setting(a, b) -> bool:
    """Equal values; two paths to the same existing file or folder are equal too."""
    if a == b:
        return True
    paths = isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b)
    return paths and os.path.samefile(a, b)


def check_new_run_folder(config: Config) -> None:
    """A new run gets a folder of its own: one that holds anything is refused unless --overwrite."""
    run_dir = os.path.join(config.out, config.name)
    held = os.path.exists(run_dir) and not (os.path.isdir(run_dir) and not os.listdir(run_dir))
    if held and not config.overwrite:
        raise SettingsError(f"{run_dir} already holds a run: continue it with --resume, delete it and start "
                            f"anew with --overwrite, or choose another --name")


def resume_target(config: Config, given: dict) -> tuple[str, str]:
    """(run folder, checkpoint folder) that --resume continues: <out>/<name>'s latest checkpoint, or --resume
    PATH's (a run folder, or a ckpt-N folder). SettingsError when there is none."""
    if config.resume is True:
        run_dir = os.path.join(config.out, config.name)
        ckpt = latest_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    else:
        path = os.path.abspath(config.resume)
        if is_checkpoint(path):
            run_dir, ckpt = os.path.dirname(path), path
        else:
            run_dir, ckpt = path, latest_checkpoint(path) if os.path.isdir(path) else None
        named = os.path.abspath(os.path.join(given.get("out", os.path.dirname(run_dir)),
                                             given.get("name", os.path.basename(run_dir))))
        if named != run_dir:
            raise SettingsError(f"--resume {config.resume} continues the run in {run_dir}, but --out/--name name "
                                f"{named}: drop them")
    if ckpt is None:
        where = "does not exist" if not os.path.isdir(run_dir) else "holds no complete checkpoint"
        raise SettingsError(f"--resume: {run_dir} {where}, so there is nothing to continue; start the run "
                            f"without --resume")
    return run_dir, ckpt


def check_same_experiment(saved: dict, given: dict, config: Config, run_dir: str) -> None:
    """Refuse flags that would make the continued run another experiment, unless --override-resumed."""
    changed = [k for k in experiment_settings()
               if k in given and k in saved and not same_setting(given[k], saved[k])]
    if changed and not config.override_resumed:
        flags = ", ".join(f"--{k.replace('_', '-')} {given[k]} (the run has {saved[k]})" for k in changed)
        raise SettingsError(f"--resume: {flags} would change the experiment {run_dir} was trained as; drop "
                            f"{'them' if len(changed) > 1 else 'it'}, start a new run under another --name, or "
                            f"pass --override-resumed")


def setting_changes(saved: dict, config: Config) -> list[str]:
    """One line per setting whose value now differs from the saved run's."""
    now = dataclasses.asdict(config)
    return [f"[resume] --{k.replace('_', '-')}: {saved[k]} -> {now[k]}" for k in now
            if k in saved and k not in COMMAND_FLAGS and not same_setting(saved[k], now[k])]


def own_reference(run_dir: str, state: dict, config: Config, say) -> Reference:
    """The KL reference a resumed run continues with: its reference/ folder when the checkpoint records that
    this run made it and the fingerprint still matches, else its start model (a reference/ that the run did not
    make is never used). SettingsError when the run's own reference is missing or has changed."""
    folder, extra = os.path.join(run_dir, REFERENCE_DIR), state.get("extra", {})
    if "reference" not in extra:  # checkpoints from before fingerprints: the run's own reference, if any
        if (config.beta > 0 or config.lora_rank) and os.path.isdir(folder):
            say(f"[resume] {folder}: this older checkpoint records no fingerprint; used as the run's reference "
                f"and recorded from now on")
            return Reference(source=folder, record={"sha256": model_fingerprint(folder), "made_by": None})
        return Reference(source=config.model, record=None)
    record = extra["reference"]
    if record is None:
        if config.beta > 0 and os.path.isdir(folder):
            say(f"[resume] {folder} ignored: this run's KL reference is its start model {config.model}")
        return Reference(source=config.model, record=None)
    if not os.path.isdir(folder) or model_fingerprint(folder) != record["sha256"]:
        state_word = "is missing" if not os.path.isdir(folder) else "is not the one this run made (its fingerprint " \
                                                                    "differs from the checkpoint's)"
        raise SettingsError(f"--resume: the KL reference {folder} {state_word}; put the run's own back, or start "
                            f"a new run")
    return Reference(source=folder, record=record)


def resume_settings(parser: argparse.ArgumentParser, config: Config, given: dict, say) -> tuple[Config, Resume]:
    """--resume: the checkpoint's settings re-applied under the flags given now (a change of the experiment
    refused unless --override-resumed; every change printed), and what the run continues from. Reads only."""
    run_dir, ckpt = resume_target(config, given)
    later = [os.path.join(run_dir, n) for n in checkpoint_names(run_dir) if n > os.path.basename(ckpt)]
    names = ", ".join(map(os.path.basename, later))
    from_latest = ckpt == latest_checkpoint(run_dir)
    if later and not from_latest and not config.overwrite:
        raise SettingsError(f"--resume {ckpt}: the run has later checkpoints ({names}) that going on from here "
                            f"would replace; pass --overwrite to delete them")
    if later and from_latest:  # renamed into place, then cut before `latest` moved
        say(f"[resume] {names}: written after the latest checkpoint but never named by `latest` (a write cut "
            f"short); the redone steps replace it")
    state = load_trainer_state(ckpt, trust_pickle=config.trust_checkpoint)
    raw = state.get("extra", {}).get("args")
    location = {"out": os.path.dirname(run_dir), "name": os.path.basename(run_dir)}
    if raw is None:
        say(f"[resume] {ckpt} records no settings (an older checkpoint): the flags given now are used")
        config = configure(parser, {**given, **location})
    else:
        saved = saved_settings(raw, os.path.join(ckpt, STATE_FILE))
        check_same_experiment(saved, given, config, run_dir)
        config = configure(parser, {**given, **location}, saved)
    reference = own_reference(run_dir, state, config, say)  # may refuse: before any change is announced
    for line in setting_changes(raw or {}, config):
        say(line)
    return config, Resume(ckpt, state, later, reference)


def check_report_to(config: Config) -> None:
    """--report-to tensorboard needs the optional tensorboard package; say how to get it before anything runs."""
    if config.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise SettingsError("--report-to tensorboard needs the tensorboard package: pip install tensorboard")


def open_run_folder(run_dir: str, config: Config, settings: dict, resume: Resume | None, dist: Dist, say) -> None:
    """Make the run folder ready, once data and model have loaded (a run that fails before leaves no folder).
    A new run: --overwrite deletes an old folder first, wholly. A resumed run: checkpoints after the one it
    continues from (--overwrite) are deleted, and log lines and evaluations of later steps, which it redoes."""
    if dist.is_main:
        if resume is None:
            if config.overwrite and os.path.exists(run_dir):
                shutil.rmtree(run_dir)
                say(f"[overwrite] deleted the old {run_dir}")
            os.makedirs(run_dir, exist_ok=True)
        else:
            for ckpt in resume.later:
                shutil.rmtree(ckpt)
                say(f"[overwrite] deleted {ckpt}")
            write_atomic(os.path.join(run_dir, LATEST), os.path.basename(resume.ckpt) + "\n")
            for log in ("metrics.jsonl", "eval.jsonl"):
                trim_log(os.path.join(run_dir, log), resume.step)
            for name in os.listdir(run_dir):
                if EVAL_DIR.fullmatch(name) and int(name.split("-")[1]) > resume.step:
                    shutil.rmtree(os.path.join(run_dir, name))
        # not config.json: that name marks a model folder
        write_atomic(os.path.join(run_dir, "run_config.json"), json.dumps(settings, indent=1) + "\n")
    dist.barrier()


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


def start_fresh(policy: Policy, config: Config, dist: Dist, train_samples: list, run_dir: str, say) -> Reference:
    """A run without a checkpoint: the supervised warm-up (tiny only), whose result is saved as the KL reference
    (β > 0) with its fingerprint. Returns the run's reference."""
    warming = config.warmup_steps + config.warmup_vision_steps > 0
    if warming:
        # Every rank runs the same (deterministic) warm-up; DDP/FSDP then start all ranks from rank 0's.
        t0 = time.time()
        losses = format_warmup(policy, config, train_samples, progress=not config.no_progress and dist.is_main)
        say(f"[warm-up] {config.warmup_vision_steps} plot-reading + {config.warmup_steps} answer steps in "
            f"{time.time() - t0:.0f} s" + (f", final answer loss {losses[-1]:.3f}" if losses else ""))
    # the KL reference; and a LoRA run's base model, unless --model can load it again
    keep_base = config.lora_rank and (warming or config.model == "tiny")
    if not (config.beta > 0 and warming or keep_base):
        return Reference(source=config.model, record=None)
    folder = os.path.join(run_dir, REFERENCE_DIR)
    record = None
    if dist.is_main:
        save_policy(policy, folder)
        record = {"sha256": model_fingerprint(folder), "made_by": {
            k: getattr(config, k) for k in ("model", "data", "seed", "warmup_steps", "warmup_vision_steps",
                                            "warmup_aux_weight", "warmup_lr", "warmup_targets", "warmup_pointer",
                                            "warmup_position", "warmup_copy", "warmup_reasoning",
                                            "warmup_position_names",
                                            "tiny_numbers")}}
    dist.barrier()  # the reference folder is complete before any rank reads it
    return Reference(source=folder, record=record)


def resume_from(resume: Resume, dist: Dist, say) -> int:
    """A run continued from its checkpoint: its RNG streams back. Returns its step."""
    set_rng_state(resume.state["rng"])
    say(f"[resume] {resume.ckpt}: continuing after step {resume.step}")
    return resume.step


def log_step(step: int, columns: dict, update: dict, timer: Timer, config: Config, log: RunLog, bar) -> None:
    """Rank 0: one metrics.jsonl row, a line when the update was skipped, the progress bar's numbers."""
    metrics = step_metrics(step, columns, update, timer, config.group_size)
    log.write("metrics", metrics)
    if update["skipped"]:
        tqdm.write(f"[step {step}] non-finite loss or gradient: update skipped")
    bar.set_postfix(reward=f"{metrics['reward']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                    s_step=f"{metrics['time_step']:.1f}", refresh=False)  # shown with the next step's update


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


def train(config: Config, dist: Dist, resume: Resume | None = None) -> int:
    """The run: one process, or one rank of a torchrun job (then rank 0 alone writes and prints). `resume`:
    the checkpoint it continues from (resume_settings), None for a new run (check_new_run_folder)."""
    try:
        find_model(config.model)  # a missing or misspelt --model ends the run before anything is generated
    except ModelNotFound as err:
        return usage_error(err)
    torch.manual_seed(config.seed)
    enable_tf32(config.device)
    run_dir = os.path.join(config.out, config.name)
    progress = not config.no_progress and dist.is_main
    say = print if dist.is_main else (lambda *a, **k: None)
    settings = dataclasses.asdict(config)  # as chosen: run_config.json and every checkpoint's "args"

    # -- data, policy, then the run folder ---------------------------------------------------------
    try:
        train_samples, eval_samples = load_splits(config, dist, progress)
        policy = load_policy(policy_source(config, resume), device=load_device(config), seed=config.seed,
                             tiny_numbers=config.tiny_numbers)
    except (data_gen.DataError, ModelNotFound, CheckpointError) as err:
        return usage_error(err)
    eval_prompts = [make_prompt(policy, config.eval_data, eval_samples, i, config.cot)
                    for i in data_gen.balanced_indices(eval_samples, config.eval_samples)]
    open_run_folder(run_dir, config, settings, resume, dist, say)

    # -- warm-up (tiny only; its result is also the KL reference) or resume ------------------------
    if resume is None:
        try:
            reference = start_fresh(policy, config, dist, train_samples, run_dir, say)
        except data_gen.DataError as err:  # a warm-up without a window of known class
            return usage_error(err)
        start_step = 0
    else:
        reference = resume.reference
        start_step = resume_from(resume, dist, say)
    if config.lora_rank:
        try:
            add_lora(policy, config, resume, reference)
        except ModelNotFound as err:
            return usage_error(err)
    prepare_policy(policy, dist, config.grad_checkpointing, config.freeze_vision, dtype=DTYPES[config.dtype],
                   pure=config.pure_bf16)
    say_memory_mode(policy, config, dist, say)
    ref_policy = make_reference(policy, reference.source, config, dist) if config.beta > 0 else None
    policy.compile_decode = use_compile(config, dist)
    config.rollout_batch = choose_rollout_batch(policy, config, dist,
                                                max(len(p.encoded.input_ids) for p in eval_prompts))
    optimizer = make_optimizer(policy, config)
    log = RunLog(run_dir, config.report_to, start_step) if dist.is_main else None
    if resume is not None:
        try:
            restore_optimizer(resume.ckpt, resume.state, policy, optimizer, dist)
        except CheckpointError as err:
            return usage_error(err)
    else:
        t0 = time.time()
        row = run_eval(policy, 0, eval_prompts, config, run_dir, log, tag="start", dist=dist)
        if dist.is_main:
            say(f"[eval] step 0 (start of RL): {eval_line(row)}  ({time.time() - t0:.0f} s)")

    # -- RL loop ----------------------------------------------------------------------------------
    extra = {"args": settings, "reference": reference.record}
    drawn = time.time()
    bar = progress_bar(range(start_step, config.steps), desc="TimerPO", disable=not progress, initial=start_step,
                       total=config.steps, log_seconds=0)  # in a log file: one line per step
    for step in bar:
        # This rank's contiguous share of the step's global prompt list (whole groups).
        indices = rank_slice(step_prompt_indices(len(train_samples), config.prompts_per_step, step, config.seed),
                             dist)
        prompts = [make_prompt(policy, config.data, train_samples, i, config.cot) for i in indices]
        episodes, adv, update, timer = rl_step(policy, ref_policy, optimizer, prompts, step, config, dist)
        columns = concat_columns(dist.gather(step_columns(episodes, adv)))
        done = step + 1
        if dist.is_main:
            log_step(done, columns, update, timer, config, log, bar)
        if done % config.eval_every == 0 or done == config.steps:
            row = run_eval(policy, done, eval_prompts, config, run_dir, log, dist=dist)
            if dist.is_main:
                tqdm.write(f"[eval] step {done}: {eval_line(row)}  -> {eval_folder(run_dir, done)}/gallery.png")
        if dist.is_main and (time.time() - drawn > CURVES_SECONDS or done % config.eval_every == 0):
            draw_curves(run_dir)
            drawn = time.time()
        if done % config.save_every == 0 or done == config.steps:
            save_checkpoint(run_dir, done, policy, optimizer, extra=extra, keep=config.keep_checkpoints, dist=dist)
    bar.close()
    if dist.is_main:
        log.close()
        draw_curves(run_dir)
        print(f"[done] {run_dir}: metrics.jsonl, eval.jsonl, curves.png, "
              f"{os.path.basename(latest_checkpoint(run_dir) or '')}")
    return 0


def prepare(parser: argparse.ArgumentParser, given: dict) -> tuple[Config, Resume | None]:
    """The run's settings, and the checkpoint it continues from (--resume) or None (a new run, whose folder
    must be free). Reads only: a refusal (SettingsError, CheckpointError) leaves every file as it was."""
    config = configure(parser, given)
    say = main_process_say
    resume = None
    if config.resume:
        config, resume = resume_settings(parser, config, given, say)
    else:
        check_new_run_folder(config)
    check_report_to(config)
    if config.no_progress or not is_terminal(sys.stderr) or os.environ.get("RANK", "0") != "0":
        quiet_library_bars()  # transformers' bars would redraw with carriage returns into a log
    return config, resume


def train_or_clean_up(config: Config, dist: Dist, resume: Resume | None) -> int:
    """train(); when it fails before its first step is logged, the run folder it created is removed, so that a
    failed start leaves nothing behind. A folder that existed before (a resumed run) is never removed."""
    run_dir = os.path.join(config.out, config.name)
    existed, code = os.path.exists(run_dir), 1
    try:
        code = train(config, dist, resume)
    finally:
        stepped = os.path.exists(os.path.join(run_dir, "metrics.jsonl"))
        if code != 0 and dist.is_main and not existed and not stepped:
            shutil.rmtree(run_dir, ignore_errors=True)
    return code


def main(argv=None) -> int:
    parser = build_parser()
    try:
        config, resume = prepare(parser, vars(parser.parse_args(argv)))
        dist = init_distributed(config.dist, config.device, config.dist_timeout, offload=config.offload)
    except (SettingsError, CheckpointError, DistError) as err:
        return usage_error(err)
    config.device = dist.device
    if not dist.initialized:
        return train_or_clean_up(config, dist, resume)
    with fail_fast(dist):  # under torchrun: a rank that raises ends the job at once, with one clear line
        code = train_or_clean_up(config, dist, resume)
        dist.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
