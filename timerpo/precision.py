"""Precision: bf16 compute with fp32 master weights, the same in one process, under DDP and under FSDP.

`--dtype bf16` (the default on CUDA) means:
  * the optimizer holds and updates fp32 weights (the "master" weights) in every mode;
  * the update's forward and backward compute in bf16: under `autocast` in one process and under DDP, and
    through FSDP's MixedPrecisionPolicy (bf16 parameters gathered, fp32 gradient reduction) under FSDP;
  * rollouts, evaluations and the other no-grad forwards run on bf16 weights: a bf16 copy of the model in one
    process and under DDP (`policy.rollout_model`, refreshed from the master weights after each optimizer step,
    2 bytes per parameter), FSDP's gathered bf16 parameters under FSDP;
  * the frozen KL reference is stored in bf16 (it is never updated, so it needs no master copy);
  * what still runs in fp32 (log-softmax, the objective, RMSNorm statistics, rotary angles) may use TF32
    matmuls on CUDA.
`--dtype fp32` (the default on CPU, where bf16 matmuls are slow) keeps everything in fp32, with no copy.
`--pure-bf16` drops the fp32 master weights: the weights themselves are bf16 (no autocast, no copy: the
model samples itself) and timerpo/optim.py's AdamW keeps bf16 moments with stochastic rounding (a deviation,
method.md §23).
With LoRA (timerpo/lora.py) the base weights are frozen, so like the reference they are stored in bf16 outright
(one process and DDP); the bf16 rollout copy then shares them and copies only the adapters.

Buffers stay fp32 in every bf16 copy: the rotary inverse frequencies lose position resolution in bf16, and
keeping them fp32 makes the copy compute exactly what FSDP's bf16 parameters compute.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def default_dtype(device: str) -> str:
    """bf16 on CUDA (tensor cores), fp32 on CPU."""
    return "bf16" if str(device).startswith("cuda") else "fp32"


def enable_tf32(device: str) -> None:
    """On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores (10-bit mantissa inputs, fp32 sums)."""
    if str(device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype, frozen_only: bool = False) -> torch.nn.Module:
    """Cast the parameters (not the buffers) of `model` to `dtype`, in place; with `frozen_only`, only those
    that take no gradient."""
    for p in model.parameters():
        if not (frozen_only and p.requires_grad):
            p.data = p.data.to(dtype)
    return model


def low_precision_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of `model` with `dtype` parameters and fp32 buffers, built without an fp32 copy in between.
    Parameters already in `dtype` are shared with `model`, not copied."""
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in model.parameters()}
    clone = copy.deepcopy(model, memo)
    return clone.eval()


def setup_precision(policy, dtype: torch.dtype, mode: str = "none", trainable: bool = True,
                    pure: bool = False) -> None:
    """Put `policy` in the precision described in the module docstring (in place).

    mode none/ddp, trainable: autocast for the update's forwards plus a bf16 rollout copy (LoRA: the frozen
    base stored in bf16, shared by the copy);
    mode fsdp: nothing here, FSDP's MixedPrecisionPolicy casts (distributed.prepare_policy);
    frozen (the reference) or `pure`: the parameters are cast to `dtype` outright.
    """
    if dtype == torch.float32:
        return
    if not trainable or pure:
        cast_parameters(policy.model, dtype)
        return
    if mode == "fsdp":
        return
    if policy.adapters is not None:
        cast_parameters(policy.model, dtype, frozen_only=True)
    policy.autocast_dtype = dtype
    policy.rollout_model = low_precision_copy(policy.model, dtype)


@torch.no_grad()
def sync_rollout_weights(policy) -> None:
    """Copy the trained master weights into the rollout copy (after an optimizer step); no-op without a copy.

    In place, so a compiled decode step (and its CUDA graphs) keeps reading the same addresses. Frozen
    weights never change, so they are not copied again.
    """
    if policy.rollout_model is None:
        return
    for mine, master in zip(policy.rollout_model.parameters(), policy.model.parameters()):
        if master.requires_grad:
            mine.copy_(master)


def autocast(policy):
    """The context the policy's gradient forwards run in: bf16 autocast over fp32 weights, or nothing."""
    if policy.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=policy.device.type, dtype=policy.autocast_dtype)
