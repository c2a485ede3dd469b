"""Atomic checkpoints: runs/<name>/ckpt-<step>/ holds the model in the hub's format (from_pretrained loads
it) plus trainer_state.pt (optimizer, step, RNG). A file `latest` names the newest complete one.

Atomicity: a checkpoint is written into a hidden temporary folder and renamed into place, and only then
is `latest` rewritten (temp file + os.replace). A kill at any moment leaves `latest` pointing at a
complete checkpoint: the previous one until the rename of the new one has happened.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile

import numpy as np
import torch

from timerpo.policy import Policy, save_policy

LATEST = "latest"
STATE_FILE = "trainer_state.pt"


def write_atomic(path: str, text: str) -> None:
    """Write text to path so that readers see the old or the new content, never a mix."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(run_dir: str, step: int, policy: Policy, optimizer: torch.optim.Optimizer,
                    extra: dict | None = None, keep: int = 2) -> str:
    """Save everything needed to continue after `step` completed steps; return the checkpoint folder."""
    name = f"ckpt-{step:06d}"
    final = os.path.join(run_dir, name)
    tmp = tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=run_dir)
    try:
        save_policy(policy, os.path.join(tmp, "model"))
        state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(), "extra": extra or {}}
        torch.save(state, os.path.join(tmp, STATE_FILE))
        shutil.rmtree(final, ignore_errors=True)  # a leftover from a run that died after this rename
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_atomic(os.path.join(run_dir, LATEST), name + "\n")
    prune_checkpoints(run_dir, keep)
    return final


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
