"""Atomic checkpoints: runs/<name>/ckpt-<step>/ holds the model in the hub's format (from_pretrained loads
it), optimizer/ (the optimizer state in torch.distributed.checkpoint's format, keyed by parameter name, so
any number of ranks can load it) and trainer_state.pt (step, RNG). A file `latest` names the newest
complete one. Older checkpoints that keep the optimizer inside trainer_state.pt still load.

Atomicity: a checkpoint is written into a hidden temporary folder and renamed into place, and only then
is `latest` rewritten (temp file + os.replace). A kill at any moment leaves `latest` pointing at a
complete checkpoint: the previous one until the rename of the new one has happened.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch

from timerpo.distributed import (SINGLE, Dist, full_model_state_dict, load_legacy_optimizer, load_optimizer,
                                 save_optimizer)
from timerpo.files import make_temp_dir, write_atomic
from timerpo.policy import Policy, save_policy

LATEST = "latest"
STATE_FILE = "trainer_state.pt"
OPTIMIZER_DIR = "optimizer"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(run_dir: str, step: int, policy: Policy, optimizer: torch.optim.Optimizer,
                    extra: dict | None = None, keep: int = 2, dist: Dist | None = None) -> str:
    """Save everything needed to continue after `step` completed steps; return the checkpoint folder.

    Under torchrun every rank calls this (the optimizer save and FSDP's state-dict gather are collective);
    rank 0 writes the model, the trainer state and `latest`. The run folder must be on a file system all
    ranks see (DCP writes each rank's optimizer shard from that rank).
    """
    dist = dist or SINGLE
    name = f"ckpt-{step:06d}"
    final = os.path.join(run_dir, name)
    tmp = dist.broadcast(make_temp_dir(run_dir, ".tmp-ckpt-") if dist.is_main else None)
    try:
        full_state = full_model_state_dict(policy, dist)  # FSDP: gathered on rank 0; else None
        if dist.is_main:
            save_policy(policy, os.path.join(tmp, "model"), state_dict=full_state)
        save_optimizer(policy, optimizer, os.path.join(tmp, OPTIMIZER_DIR), dist)
        dist.barrier()  # every rank's optimizer shard is on disk before the rename makes it visible
        if dist.is_main:
            state = {"step": step, "rng": rng_state(), "extra": extra or {}}
            torch.save(state, os.path.join(tmp, STATE_FILE))
            shutil.rmtree(final, ignore_errors=True)  # a leftover from a run that died after this rename
            os.replace(tmp, final)
    finally:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_main:
        write_atomic(os.path.join(run_dir, LATEST), name + "\n")
        prune_checkpoints(run_dir, keep)
    dist.barrier()
    return final


def restore_optimizer(ckpt_dir: str, state: dict, policy: Policy, optimizer: torch.optim.Optimizer,
                      dist: Dist | None = None) -> None:
    """Load a checkpoint's optimizer state into `optimizer`, whatever the number of ranks that wrote it."""
    dist = dist or SINGLE
    if "optimizer" in state:  # written by torch.save before the optimizer moved to DCP
        load_legacy_optimizer(policy, optimizer, state["optimizer"])
    else:
        load_optimizer(policy, optimizer, os.path.join(ckpt_dir, OPTIMIZER_DIR), dist)


def prune_checkpoints(run_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (never the one `latest` names)."""
    latest = latest_checkpoint(run_dir)
    names = sorted(n for n in os.listdir(run_dir) if n.startswith("ckpt-"))
    for n in names[:-keep] if keep > 0 else []:
        path = os.path.join(run_dir, n)
        if path != latest:
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(run_dir: str) -> str | None:
    """The folder `latest` points at, or None when the run has no complete checkpoint yet."""
    pointer = os.path.join(run_dir, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(run_dir, f.read().strip())
    return path if os.path.isfile(os.path.join(path, STATE_FILE)) else None


def load_trainer_state(ckpt_dir: str) -> dict:
    return torch.load(os.path.join(ckpt_dir, STATE_FILE), weights_only=False)


def append_jsonl(path: str, row: dict) -> None:
    """Append one JSON line (a metrics log is append-only, so a partial last line is the worst case)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
