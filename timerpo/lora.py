"""LoRA, `train.py --lora-rank R`: train low-rank adapters beside frozen weights (a deviation, method.md §23).

Each targeted linear layer y = W x becomes y = W x + (α / R)·B A x, with A [R, in] and B [out, R]; B starts at
zero, so training starts from the base model itself. Only A and B are trained (gradients and AdamW state for
them alone); W and everything else, the vision tower included, stay frozen. The default targets are the
language model's seven linear layers per decoder layer (attention q, k, v, o and the MLP's gate, up, down).
peft builds the adapter layers and puts them inside the model, so every path of the project (rollout, kept
OT states, update forward, the bf16 sampling copy, DDP, FSDP) runs the same module tree with adapters in it.

* The KL reference is the same model with its adapters switched off (`adapters_disabled`): no second copy
  of the weights. Off, a forward is the base model's exactly (tests/test_lora.py).
* Checkpoints hold the adapters, not the model: ckpt-N/adapter/ with adapter_model.safetensors and
  adapter_config.json, in peft's format (`PeftModel.from_pretrained` reads it too). Its
  base_model_name_or_path names the base: a model name (qwen2.5-vl-3b, a hub id) or a folder, relative to the
  adapter folder when it is the run's own `reference` (where a tiny run keeps its base).
* `load_merged(folder)`: the base with the adapters merged into its weights, a plain model (eval.py --model
  RUN loads a LoRA run this way, through load_policy). `python -m timerpo.lora merge RUN OUT` saves it as a
  model folder.

peft imports accelerate internally; the project itself never uses accelerate.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import warnings
from contextlib import contextmanager

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from timerpo.files import make_temp_dir, set_usual_modes
from timerpo.policy import ADAPTER_CONFIG, ModelNotFound, Policy, load_policy, replace_dir, save_policy

ADAPTER_DIR = "adapter"  # inside a checkpoint, in place of model/
ADAPTER_FILE = "adapter_model.safetensors"
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
ADAPTER_NAME = "default"  # peft's name of a model's one adapter
PEFT_PREFIX = "base_model.model."  # peft's keys are the model's own names under this prefix


def target_pattern(targets: str) -> str:
    """The regular expression (peft matches it against whole module names) of the named linear layers of the
    language model's decoder layers. Example: "q_proj,v_proj" → model.language_model.layers.<n>.
    (self_attn|mlp).(q_proj|v_proj)."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    known = DEFAULT_TARGETS.split(",")
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise ValueError(f"LoRA targets must be some of {DEFAULT_TARGETS}; got {targets!r}")
    return rf"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(names)})"


def add_adapters(policy: Policy, rank: int, alpha: float, targets: str = DEFAULT_TARGETS, base: str = "",
                 seed: int = 0) -> None:
    """Put new adapters (A random, B zero, seeded by `seed`) into policy.model and freeze everything else.
    `base` is what the saved adapters will name as their base model (see the module docstring)."""
    from peft import LoraConfig

    # dropout 0: the update's forward must be the sampling policy's (one update per rollout, ρ = 1)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_pattern(targets))
    wrap(policy, config, base, seed)


def wrap(policy: Policy, config, base: str, seed: int = 0) -> None:
    """peft's wrapper around policy.model, with its adapter layers placed inside policy.model itself. The
    initialisation draws from its own seeded stream, so it leaves torch's global one as it was."""
    from peft import get_peft_model

    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        # peft reads a property transformers has renamed, and says so when it replaces the base's name
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*was renamed", category=UserWarning)
        torch.manual_seed(seed)
        policy.adapters = get_peft_model(policy.model, config)
    policy.adapters.peft_config[ADAPTER_NAME].base_model_name_or_path = base
    assert policy.adapters.base_model.model is policy.model  # what every other path of the project relies on


def adapter_layers(policy: Policy) -> list:
    """The LoRA layers of the policy's model and of its bf16 sampling copy (separate modules)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    models = {id(m): m for m in (policy.model, policy.rollout_model) if m is not None}.values()
    return [module for m in models for module in m.modules() if isinstance(module, BaseTunerLayer)]


@contextmanager
def adapters_disabled(policy: Policy):
    """Inside, the policy's forwards are the base model's (the KL reference of a LoRA run); no-op without
    adapters. peft's switch also changes requires_grad, which is put back as it was."""
    if policy.adapters is None:
        yield
        return
    layers = adapter_layers(policy)
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


def adapter_tensors(policy: Policy) -> dict[str, torch.Tensor]:
    """The adapters' weights, whole and on the CPU, under peft's file names. Under FSDP every rank must call
    this (each adapter is gathered from the ranks' shards)."""
    from peft import get_peft_model_state_dict

    ours = {}
    for name, p in policy.model.named_parameters():
        if ".lora_" in name:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            ours[PEFT_PREFIX + name] = full.detach().cpu()
    return get_peft_model_state_dict(policy.adapters, state_dict=ours, adapter_name=ADAPTER_NAME)


def save_adapters(policy: Policy, out_dir: str, dist=None) -> None:
    """Write adapter_model.safetensors and adapter_config.json into `out_dir` (atomically: beside, then
    renamed). Collective under FSDP; the main rank (all of them when `dist` is None) writes."""
    tensors = adapter_tensors(policy)
    if dist is not None and not dist.is_main:
        return
    config = policy.adapters.peft_config[ADAPTER_NAME]
    base = config.base_model_name_or_path
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_dir(parent)
    try:
        if os.path.isdir(base):  # a folder: named relative to the adapters, so a run folder can be moved
            config.base_model_name_or_path = os.path.relpath(os.path.abspath(base), os.path.abspath(out_dir))
        config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(tmp, ADAPTER_FILE),
                  metadata={"format": "pt"})
        set_usual_modes(tmp)
        replace_dir(tmp, out_dir)
    finally:
        config.base_model_name_or_path = base
        shutil.rmtree(tmp, ignore_errors=True)


def adapter_base(folder: str) -> str:
    """The base model a folder of adapters names: a folder path (resolved against `folder` when relative),
    or a model name for load_policy."""
    from peft import LoraConfig

    base = LoraConfig.from_pretrained(folder).base_model_name_or_path
    if not base:
        raise ModelNotFound(f"{folder}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    beside = os.path.normpath(os.path.join(folder, base))
    return beside if os.path.isdir(beside) else base


def load_adapters(policy: Policy, folder: str) -> None:
    """Put the adapters saved in `folder` into policy.model, trainable, with exactly the saved weights."""
    from peft import LoraConfig, set_peft_model_state_dict

    try:
        config = LoraConfig.from_pretrained(folder)
        tensors = load_file(os.path.join(folder, ADAPTER_FILE))
    except (OSError, ValueError, TypeError, SafetensorError) as err:
        raise ModelNotFound(f"{folder} holds no readable LoRA adapters: {err}") from None
    config.inference_mode = False
    wrap(policy, config, adapter_base(folder))
    result = set_peft_model_state_dict(policy.adapters, tensors, adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise ModelNotFound(f"{folder}: the adapters do not fit this base model (missing {missing[:3]}, "
                            f"unexpected {list(result.unexpected_keys)[:3]})")


def load_merged(folder: str, device: str = "cpu", seed: int = 0) -> Policy:
    """The base model named by the adapters in `folder`, with the adapters merged into its weights (fp32):
    a plain model that evaluates like the adapted one."""
    policy = load_policy(adapter_base(folder), device=device, seed=seed)
    load_adapters(policy, folder)
    with torch.no_grad():
        policy.model = policy.adapters.merge_and_unload()
    policy.adapters = None
    policy.name = folder
    return policy


# ---------------------------------------------------------------------------------------------------
# python -m timerpo.lora merge SRC OUT


def adapter_folder(source: str) -> str:
    """The adapter folder that a train.py run folder (its latest checkpoint's), a checkpoint or an adapter
    folder stands for."""
    from timerpo.checkpoint import checkpoint_weights, latest_checkpoint

    ckpt = latest_checkpoint(source) if os.path.isdir(source) else None
    for folder in (source, os.path.join(source, ADAPTER_DIR), ckpt and checkpoint_weights(ckpt)):
        if folder and os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)):
            return folder
    raise ModelNotFound(f"no LoRA adapters in {source} (expected a LoRA run folder, one of its checkpoints, or "
                        f"a folder holding {ADAPTER_CONFIG})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m timerpo.lora", description="LoRA adapters of train.py runs.")
    sub = p.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="merge a run's adapters into its base model and save a plain model folder")
    merge.add_argument("source", help="a LoRA run folder (its latest checkpoint), a checkpoint, or an adapter folder")
    merge.add_argument("out", help="the model folder to write (from_pretrained, eval.py --model and train.py "
                                   "--model load it)")
    args = p.parse_args(argv)
    try:
        folder = adapter_folder(args.source)
        policy = load_merged(folder)
    except ModelNotFound as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_policy(policy, args.out)
    print(f"[lora] merged {folder} into its base {adapter_base(folder)}: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
