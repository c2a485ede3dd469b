"""Checkpoints that load without running code. runs/<name>/ckpt-<step>/ holds

    model/                  the model in the hub's format (safetensors + JSON; from_pretrained loads it)
      or adapter/           with LoRA: the adapters alone, in peft's format (timerpo/lora.py)
    optimizer/index.json    AdamW's param groups, and which rows of each state tensor each file holds
    optimizer/rank-00000.safetensors ...  the state tensors, keyed "<parameter name>/<field>", one file per
                            rank that wrote some (FSDP: every rank's shard; otherwise rank 0 alone)
    trainer_state.json      step, RNG states of torch, numpy and Python as plain numbers, the run's args

and a file `latest` names the newest complete one. JSON and safetensors hold data only, so loading a
checkpoint copied from elsewhere cannot run code. The older format (trainer_state.pt, and an optimizer/
written by torch.distributed.checkpoint, whose .metadata is a pickle) is refused unless the caller trusts it
(train.py --trust-checkpoint).

Any number of ranks loads any checkpoint: FSDP shards every tensor along dim 0 in rank order, index.json
records the rows each file holds, and each rank reads the rows of its own shard as slices (safetensors
reads a slice without loading the rest of the file). Host memory: at save, each rank's piece of the state
copied off the device (AdamW: 8 bytes per parameter / ranks); at load, one tensor's slice at a time.

Atomicity: a checkpoint is written into a hidden temporary folder and renamed into place, and only then
is `latest` rewritten (temp file + os.replace). A kill at any moment leaves `latest` pointing at a
complete checkpoint: the previous one until the rename of the new one has happened.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from timerpo.distributed import SINGLE, Dist, full_model_state_dict
from timerpo.files import make_temp_dir, usual_file_mode, write_atomic
from timerpo.lora import ADAPTER_DIR, save_adapters
from timerpo.policy import Policy, save_policy

LATEST = "latest"
STATE_FILE = "trainer_state.json"
OPTIMIZER_DIR = "optimizer"
OPTIMIZER_INDEX = "index.json"
FORMAT = 1  # of trainer_state.json and optimizer/index.json
PIECE_FILE = re.compile(r"rank-\d{5}\.safetensors")
PICKLED_STATE_FILE = "trainer_state.pt"  # the older format


class CheckpointError(Exception):
    """A checkpoint that cannot, or must not, be loaded; the message says why."""


def save_checkpoint(run_dir: str, step: int, policy: Policy, optimizer: torch.optim.Optimizer,
                    extra: dict | None = None, keep: int = 2, dist: Dist | None = None) -> str:
    """Save everything needed to continue after `step` completed steps; return the checkpoint folder.

    Under torchrun every rank calls this (the optimizer save and FSDP's state-dict gather are collective);
    rank 0 writes the model, the trainer state and `latest`. The run folder must be on a file system all
    ranks see (each rank writes its own optimizer shard). `extra` must be JSON (train.py: the run's args).
    """
    dist = dist or SINGLE
    name = f"ckpt-{step:06d}"
    final = os.path.join(run_dir, name)
    tmp = dist.broadcast(make_temp_dir(run_dir, ".tmp-ckpt-") if dist.is_main else None)
    try:
        if policy.adapters is not None:
            save_adapters(policy, os.path.join(tmp, ADAPTER_DIR), dist)  # FSDP: gathered, rank 0 writes
        else:
            full_state = full_model_state_dict(policy, dist)  # FSDP: gathered on rank 0; else None
            if dist.is_main:
                save_policy(policy, os.path.join(tmp, "model"), state_dict=full_state)
            full_state = None  # FSDP: free the full copy (4 bytes per parameter) before the optimizer's pieces
        save_optimizer(policy, optimizer, os.path.join(tmp, OPTIMIZER_DIR), dist)
        dist.barrier()  # every rank's optimizer shard is on disk before the rename makes it visible
        if dist.is_main:
            save_trainer_state(tmp, step, extra or {})
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
    complete = any(os.path.isfile(os.path.join(path, n)) for n in (STATE_FILE, PICKLED_STATE_FILE))
    return path if complete else None


def checkpoint_weights(ckpt_dir: str) -> str:
    """The folder of a checkpoint that load_policy loads: its model/, or its adapter/ for a LoRA run."""
    adapter = os.path.join(ckpt_dir, ADAPTER_DIR)
    return adapter if os.path.isdir(adapter) else os.path.join(ckpt_dir, "model")


def append_jsonl(path: str, row: dict) -> None:
    """Append one JSON line (a metrics log is append-only, so a partial last line is the worst case)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------------------
# Trainer state: step, RNG, extra


def rng_state() -> dict:
    """The torch, numpy and Python generators' states, as their own get-functions return them."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def rng_to_json(state: dict) -> dict:
    """rng_state() as plain numbers: torch's 5,056 state bytes, numpy's and Python's Mersenne Twister words."""
    name, key, pos, has_gauss, cached_gaussian = state["numpy"]
    version, internal, gauss_next = state["python"]
    return {"torch": state["torch"].tolist(),
            "numpy": {"bit_generator": name, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached_gaussian)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def rng_from_json(numbers: dict) -> dict:
    """rng_to_json's numbers back as state objects, checked by loading them into private generators (so
    a damaged file fails here, with the global generators untouched)."""
    n, p = numbers["numpy"], numbers["python"]
    state = {"torch": torch.tensor(numbers["torch"], dtype=torch.uint8),
             "numpy": (n["bit_generator"], np.array(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"],
                       n["cached_gaussian"]),
             "python": (p["version"], tuple(p["internal"]), p["gauss_next"])}
    torch.Generator().set_state(state["torch"])
    np.random.RandomState().set_state(state["numpy"])
    random.Random().setstate(state["python"])
    return state


def save_trainer_state(ckpt_dir: str, step: int, extra: dict) -> None:
    state = {"format": FORMAT, "step": step, "rng": rng_to_json(rng_state()), "extra": extra}
    with open(os.path.join(ckpt_dir, STATE_FILE), "w") as f:
        json.dump(state, f)


def load_trainer_state(ckpt_dir: str, trust_pickle: bool = False) -> dict:
    """{"step", "rng" (for set_rng_state), "extra", "pickled"} of a checkpoint, from its trainer_state.json.

    A checkpoint of the older format raises CheckpointError, unless `trust_pickle` (then its pickles load
    as they used to, and "pickled" is True). A damaged trainer_state.json raises CheckpointError too.
    """
    path = os.path.join(ckpt_dir, STATE_FILE)
    if not os.path.isfile(path):
        return load_pickled_trainer_state(ckpt_dir, trust_pickle)
    try:
        with open(path) as f:
            raw = json.load(f)
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT}")
        if not isinstance(raw["step"], int) or raw["step"] < 0:
            raise ValueError(f"step {raw['step']!r} is not a count of steps")
        return {"step": raw["step"], "rng": rng_from_json(raw["rng"]), "extra": dict(raw["extra"]),
                "pickled": False}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError,
            RuntimeError) as err:
        raise CheckpointError(f"{path} is not a readable trainer state ({type(err).__name__}: {err})") from None


def load_pickled_trainer_state(ckpt_dir: str, trust_pickle: bool) -> dict:
    """The older format's trainer_state.pt: loaded only when the caller trusts it, since unpickling runs code."""
    path = os.path.join(ckpt_dir, PICKLED_STATE_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt_dir} holds no {STATE_FILE}, so it is not a checkpoint")
    if not trust_pickle:
        raise CheckpointError(
            f"{ckpt_dir} is a checkpoint of the older format, whose {PICKLED_STATE_FILE} and optimizer/.metadata "
            f"are pickles that can run any code when loaded, so it is refused; if you made it yourself, resume "
            f"it with --trust-checkpoint (the next checkpoint is written in the safe format).")
    state = torch.load(path, weights_only=False)  # trusted by the caller: RNG states are numpy/Python objects
    return {**state, "pickled": True}


# ---------------------------------------------------------------------------------------------------
# Optimizer state: safetensors keyed by parameter name, one file per rank, index.json


def restore_optimizer(ckpt_dir: str, state: dict, policy: Policy, optimizer: torch.optim.Optimizer,
                      dist: Dist | None = None) -> None:
    """Load a checkpoint's optimizer state into `optimizer`, whatever the number of ranks that wrote it.
    `state` is load_trainer_state's: it says whether the checkpoint is of the (trusted) older format."""
    dist = dist or SINGLE
    folder = os.path.join(ckpt_dir, OPTIMIZER_DIR)
    if not state["pickled"]:
        load_optimizer(policy, optimizer, folder, dist)
    elif "optimizer" in state:  # older still: torch.save'd inside trainer_state.pt, index-keyed
        load_legacy_optimizer(policy, optimizer, state["optimizer"])
    else:
        load_dcp_optimizer(policy, optimizer, folder, dist)


def is_shard(t) -> bool:
    """Whether t is one rank's part of a tensor sharded over the ranks (an FSDP DTensor)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a shard (a view: writing into it fills the shard), or the tensor itself."""
    return t.to_local() if is_shard(t) else t


def flat_state(state: dict) -> tuple[dict, dict]:
    """An optimizer state ({parameter name: {field: value}}) as tensors and other values, both keyed
    "<parameter name>/<field>", e.g. "model.language_model.norm.weight/exp_avg"."""
    tensors, values = {}, {}
    for name, fields in state.items():
        for field, value in fields.items():
            (tensors if torch.is_tensor(value) else values)[f"{name}/{field}"] = value
    return tensors, values


def shard_rows(tensors: dict, d: Dist) -> list[dict]:
    """For each rank in rank order: {key: (start, stop)}, the rows of each full tensor its shard holds.

    FSDP2 over one mesh dimension (what prepare_policy builds) cuts dim 0 into consecutive blocks in rank
    order, so rank r's rows start where rank r-1's end; the row counts are gathered from every rank (one
    small collective). Plain tensors are not listed: every rank holds them whole.
    """
    from torch.distributed.tensor import Shard

    keys = [k for k, t in tensors.items() if is_shard(t)]
    for k in keys:
        if tensors[k].placements != (Shard(0),) or tensors[k].device_mesh.ndim != 1:
            raise CheckpointError(f"{k} is sharded as {tensors[k].placements}; checkpoints handle FSDP's "
                                  f"dim-0 shards over one mesh dimension only")
    counts = d.gather([tensors[k].to_local().shape[0] for k in keys])
    start = dict.fromkeys(keys, 0)
    layout = []
    for rank_counts in counts:
        layout.append({k: (start[k], start[k] + n) for k, n in zip(keys, rank_counts)})
        start.update({k: stop for k, (_, stop) in layout[-1].items()})
    return layout


def rank_pieces(tensors: dict, layout: list[dict], rank: int) -> dict:
    """What `rank` writes: {key: rows} for its non-empty shards and, on rank 0, every plain tensor whole
    (rows None). Plain tensors are equal on every rank (DDP replicas, AdamW's step counts under FSDP)."""
    pieces = {k: rows for k, rows in layout[rank].items() if rows[1] > rows[0]}
    if rank == 0:
        pieces.update({k: None for k, t in tensors.items() if not is_shard(t)})
    return pieces


def piece_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def save_optimizer(policy, optimizer, folder: str, d: Dist) -> None:
    """Write the optimizer state as safetensors keyed by parameter name plus index.json (collective under
    torchrun: each rank writes its own file, rank 0 the index)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(policy.model, optimizer)
    tensors, values = flat_state(state["state"])
    layout = shard_rows(tensors, d)
    os.makedirs(folder, exist_ok=True)
    mine = {k: local_part(tensors[k]).detach().cpu().contiguous() for k in rank_pieces(tensors, layout, d.rank)}
    if mine:
        path = os.path.join(folder, piece_file(d.rank))
        save_file(mine, path)
        os.chmod(path, usual_file_mode(folder))  # safetensors writes 0600 whatever the umask
    if d.is_main:
        everyone = [rank_pieces(tensors, layout, r) for r in range(len(layout))]
        index = {"format": FORMAT, "param_groups": state["param_groups"], "values": values,
                 "tensors": {k: {"shape": list(t.shape),
                                 "pieces": [{"file": piece_file(r), "rows": pieces[k]}
                                            for r, pieces in enumerate(everyone) if k in pieces]}
                             for k, t in tensors.items()}}
        with open(os.path.join(folder, OPTIMIZER_INDEX), "w") as f:
            json.dump(index, f)


@contextmanager
def open_pieces(folder: str, index: dict):
    """{file name: open safetensors file} for every file index.json names (only rank-NNNNN.safetensors
    inside `folder`: the index comes from the checkpoint and must not point elsewhere)."""
    names = {p["file"] for entry in index["tensors"].values() for p in entry["pieces"]}
    for name in names:
        if not isinstance(name, str) or not PIECE_FILE.fullmatch(name):
            raise ValueError(f"index.json names {name!r}, which is not a rank-NNNNN.safetensors file")
    with ExitStack() as stack:
        yield {n: stack.enter_context(safe_open(os.path.join(folder, n), framework="pt")) for n in names}


def read_rows(files: dict, key: str, entry: dict, rows: tuple | None) -> torch.Tensor:
    """Rows [start, stop) of the full tensor `key` (rows None: all of it), put together from the pieces
    index.json lists for it; a piece with rows None holds the whole tensor."""
    shape = entry["shape"]
    if not shape:  # 0-dim (AdamW's step count): stored whole
        return files[entry["pieces"][0]["file"]].get_tensor(key)
    start, stop = rows if rows is not None else (0, shape[0])
    parts, pos = [], start
    for piece in sorted(entry["pieces"], key=lambda p: (p["rows"] or [0])[0]):
        first, end = piece["rows"] if piece["rows"] is not None else (0, shape[0])
        lo, hi = max(pos, first), min(stop, end)
        if lo < hi and lo == pos:
            parts.append(files[piece["file"]].get_slice(key)[lo - first:hi - first])
            pos = hi
    if pos != stop:
        raise ValueError(f"the pieces of {key} do not hold its rows {pos} to {stop}")
    return torch.cat(parts) if parts else torch.empty(0, *shape[1:])


def restore_groups(saved: list, template: list) -> list:
    """The checkpoint's param groups, with lists turned back into tuples where the optimizer has tuples
    (JSON has no tuples: AdamW's betas)."""
    if len(saved) != len(template):
        raise ValueError(f"{len(saved)} parameter groups in the checkpoint, {len(template)} here")
    return [{k: tuple(v) if isinstance(t.get(k), tuple) else v for k, v in s.items()}
            for s, t in zip(saved, template)]


def load_optimizer(policy, optimizer, folder: str, d: Dist) -> None:
    """Load the state save_optimizer wrote, by any number of ranks, into this job's optimizer (resharded)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    # The template: AdamW state tensors of the right (sharded) shapes, filled in place below. A fresh
    # optimizer gets them from a zero-lr step, which torch only takes when no gradient is set.
    optimizer.zero_grad(set_to_none=True)
    state = get_optimizer_state_dict(policy.model, optimizer)
    tensors, _ = flat_state(state["state"])
    mine = shard_rows(tensors, d)[d.rank]  # collective: before anything that could fail on one rank only
    try:
        with open(os.path.join(folder, OPTIMIZER_INDEX)) as f:
            index = json.load(f)
        if index.get("format") != FORMAT:
            raise ValueError(f"format {index.get('format')!r}, expected {FORMAT}")
        check_same_tensors(index, tensors)
        with open_pieces(folder, index) as files:
            for key, t in tensors.items():
                part = read_rows(files, key, index["tensors"][key], mine.get(key))
                if part.shape != local_part(t).shape:
                    raise ValueError(f"{key}: the checkpoint's rows have shape {list(part.shape)}, "
                                     f"this rank's {list(local_part(t).shape)}")
                local_part(t).copy_(part)
        for key, value in index["values"].items():
            name, field = key.rsplit("/", 1)
            state["state"][name][field] = value
        state["param_groups"] = restore_groups(index["param_groups"], state["param_groups"])
        set_optimizer_state_dict(policy.model, optimizer, state)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError,
            SafetensorError) as err:
        raise CheckpointError(f"cannot load the optimizer state in {folder}: {err}") from None


def check_same_tensors(index: dict, tensors: dict) -> None:
    """The checkpoint has a state tensor of the same shape for every one this optimizer has, and no other."""
    saved = index["tensors"]
    for key in sorted(set(tensors) ^ set(saved)):
        where = "this optimizer has no" if key in saved else "the checkpoint has no"
        raise ValueError(f"{where} state {key} (was that run started with the same --freeze-vision setting?)")
    for key, t in tensors.items():
        if saved[key]["shape"] != list(t.shape):
            raise ValueError(f"{key} has shape {saved[key]['shape']} in the checkpoint, {list(t.shape)} here")


# ---------------------------------------------------------------------------------------------------
# The older format, loaded only when trusted (its files are pickles)


@contextmanager
def quiet_single_process():
    """DCP warns on every call without a process group; in one process that is the intended use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def load_dcp_optimizer(policy, optimizer, folder: str, d: Dist) -> None:
    """Load an optimizer state written by torch.distributed.checkpoint (DCP), by any number of ranks.
    DCP's reader unpickles optimizer/.metadata: call this for checkpoints you trust only."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    optimizer.zero_grad(set_to_none=True)  # the template, as in load_optimizer
    state = get_optimizer_state_dict(policy.model, optimizer)
    try:
        with quiet_single_process():
            dcp.load(state, checkpoint_id=folder, no_dist=not d.initialized)
    except (RuntimeError, CheckpointException) as err:  # CheckpointException wraps each rank's traceback
        reason = str(err).strip().splitlines()[-1]
        raise CheckpointError(f"cannot load the optimizer state in {folder}: {reason} (was that run started with "
                              f"the same --freeze-vision setting?)") from None
    set_optimizer_state_dict(policy.model, optimizer, state)


def load_legacy_optimizer(policy, optimizer, state: dict) -> None:
    """Load an optimizer state_dict saved by torch.save (checkpoints from before DCP; index-keyed).

    Indices follow `model.parameters()` order (how train.py builds AdamW), so they map to parameter names;
    set_optimizer_state_dict then shards the full tensors for FSDP.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [n for n, _ in policy.model.named_parameters()]
    named = {"state": {names[i]: v for i, v in state["state"].items()},
             "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]}
    set_optimizer_state_dict(policy.model, optimizer, named, options=StateDictOptions(full_state_dict=True))
