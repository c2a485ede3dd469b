"""Running train.py on several processes with PyTorch's own engine: `torchrun ... train.py --dist ddp|fsdp`.

What each rank does, and why the result equals a 1-process run on the same global batch:
  * the step's global prompt list is cut into contiguous, equal slices, one per rank, so every group of G
    completions lives on one rank and its group statistics (advantages, projection) stay local;
  * completion seeds depend only on (seed, step, prompt index, sample index), so the sampled text does not
    depend on which rank samples it;
  * the loss divides by the GLOBAL number of completion tokens (an all-reduce), and the ranks' gradients
    are SUMMED: DDP and FSDP average over ranks, so each rank scales its loss by the world size (`grad_scale`);
  * per-episode numbers are gathered in rank order before the step metrics are computed, so rank 0 logs
    exactly what one process would have logged.

DDP keeps a full model on every rank; only the update's forwards go through the DDP wrapper (that is where
gradients are all-reduced). FSDP2 (`fully_shard`) shards every decoder layer and every vision block, then
the root; rollouts and no-grad forwards run inside `full_params`, which all-gathers every unit once and keeps
it gathered until the phase ends (one all-gather per phase instead of one per generated token, at the cost
of a full parameter copy in the compute dtype on each rank while it lasts).

CPU offload (`train.py --offload`, the paper's exact run on one GPU): FSDP2's CPUOffloadPolicy keeps each
rank's shard of the fp32 weights, their gradients and AdamW's state in host memory; each unit's weights are
copied to the GPU and gathered in bf16 when it runs, its gradients go back to host memory after the
reduce-scatter, and AdamW steps on the CPU. The arithmetic is FSDP's, so the numbers are those of a run
without offload. Without torchrun, init_distributed makes a process group of one rank for it. On CUDA the
group has two backends: nccl for the gathers of GPU tensors and gloo for what stays on the CPU (the gradient
norm's reduction, the checkpoint's gathers of host shards). On a CPU device the policy works too (gloo,
no pinned memory): the tests compare it with a plain run there.

Checkpoints (timerpo/checkpoint.py): the model is written by rank 0 in the hub's format (FSDP first
gathers a full state dict); each rank writes its shard of the optimizer state as safetensors keyed by
parameter name, so a checkpoint written by N ranks loads on M ranks, one process included.
"""
from __future__ import annotations

import os
import sys
import traceback
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DIST_MODES = ("none", "ddp", "fsdp")
# Test hook: the rank named here raises at the start of its first RL step (tests/test_distributed.py).
FAIL_RANK_ENV = "TIMERPO_FAIL_RANK"


class DistError(Exception):
    """A distributed setting that cannot work; the message says what to change."""


@dataclass
class Dist:
    """Where this process sits in the job. The default is the plain single process (no process group)."""

    mode: str = "none"  # none | ddp | fsdp
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # this rank's device, e.g. "cuda:3"
    offload: bool = False  # FSDP keeps weights, gradients and optimizer state in host memory (--offload)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, evaluations, curves and checkpoints."""
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def comm_device(self) -> torch.device:
        """Where small reduction tensors must live: nccl only moves CUDA tensors, gloo only CPU ones."""
        return torch.device(self.device) if dist.get_backend() == "nccl" else torch.device("cpu")

    def sum(self, values: list[float]) -> list[float]:
        """All-reduce SUM of a few numbers (float64, so token counts stay exact). Example: [3, 1.5] on
        two ranks holding [1, 0.5] and [2, 1.0]."""
        if not self.initialized:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)  # [k]
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank (pickled: keep it small)."""
        if not self.initialized:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.initialized:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()

    def close(self) -> None:
        if self.initialized:
            dist.destroy_process_group()


SINGLE = Dist()


def init_distributed(mode: str, device: str, timeout_s: float = 1800.0, offload: bool = False) -> Dist:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, LOCAL_RANK), or stay single.

    Under torchrun with WORLD_SIZE > 1, `--dist none` means DDP (said once, on rank 0). Backend: nccl on
    CUDA (device cuda:LOCAL_RANK), gloo on CPU; with `offload` (FSDP's CPU offload) gloo for CPU tensors
    beside nccl. Without torchrun, `offload` makes a process group of this one process. `timeout_s` bounds
    every collective, so a rank that hangs (rather than raises) still ends the job.
    """
    if mode not in DIST_MODES:
        raise DistError(f"--dist must be one of {DIST_MODES}, got {mode!r}")
    if offload and mode != "fsdp":
        raise DistError(f"offloading to the CPU shards the model with FSDP; it cannot run with --dist {mode}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "none" and world == 1:
        return Dist(device=device)
    one_process = {}
    if "RANK" not in os.environ:
        if not offload:
            raise DistError(f"--dist {mode} needs the torchrun launcher, e.g. "
                            f"`torchrun --nproc_per_node=2 train.py --dist {mode} ...`")
        # FSDP needs a process group, even of one process: an in-memory store, no port, no launcher
        one_process, world = dict(store=dist.HashStore(), rank=0, world_size=1), 1
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if mode == "none":
        mode = "ddp"
        if rank == 0:
            print(f"[dist] WORLD_SIZE={world} and --dist none: using DDP (pass --dist fsdp to shard the model)")
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    backend = "gloo"
    if device.startswith("cuda"):
        backend = "cpu:gloo,cuda:nccl" if offload else "nccl"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **one_process)
    return Dist(mode=mode, rank=rank, world_size=world, local_rank=local, device=device, offload=offload)


@contextmanager
def fail_fast(d: Dist):
    """Turn an exception on one rank into the end of the whole job, quickly and with one clear line.

    The other ranks are usually blocked in a collective that would only time out much later; exiting
    non-zero at once lets torchrun stop them (it watches its workers and kills the rest of the group).
    `os._exit` skips Python's shutdown, which could itself block on the process group.
    Test hook: the rank named by $TIMERPO_FAIL_RANK raises as soon as it enters (tests/test_distributed.py).
    """
    try:
        inject_failure_from_env(d)
        yield
    except BaseException as err:  # noqa: BLE001  (KeyboardInterrupt too: the job must end either way)
        if isinstance(err, SystemExit) and err.code in (0, None):
            raise
        traceback.print_exc(file=sys.stderr)
        print(f"rank {d.rank} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


def inject_failure_from_env(d: Dist) -> None:
    """Raise on the rank named by $TIMERPO_FAIL_RANK (nothing happens when it is unset)."""
    target = os.environ.get(FAIL_RANK_ENV)
    if target is not None and target.strip() == str(d.rank):
        raise RuntimeError(f"failure injected by {FAIL_RANK_ENV}={target} on rank {d.rank}")


# ---------------------------------------------------------------------------------------------------
# Splitting work


def rank_slice(items: list, d: Dist, what: str = "prompts per step", even: bool = True) -> list:
    """This rank's contiguous share of `items`: rank r gets items[r·n/W : (r+1)·n/W].

    Example: 4 prompts on 2 ranks → rank 0 gets [p0, p1], rank 1 gets [p2, p3]; concatenating the ranks'
    shares in rank order gives back the list. With even=True the count must divide by the world size
    (so every rank runs the same number of micro-batches); otherwise the first ranks get one more.
    """
    n, W = len(items), d.world_size
    if even and n % W:
        raise DistError(f"{what} ({n}) must be divisible by the number of ranks ({W})")
    base, extra = divmod(n, W)
    start = d.rank * base + min(d.rank, extra)
    return items[start:start + base + (d.rank < extra)]


def grad_scale(d: Dist) -> float:
    """Factor on each rank's loss so that the ranks' gradients ADD UP instead of being averaged.

    Each rank's loss is already its share of the global token-mean (it divides by the global token
    count); DDP's all-reduce and FSDP's reduce-scatter divide the sum by the world size, which this undoes.
    """
    return float(d.world_size) if d.mode in ("ddp", "fsdp") else 1.0


# ---------------------------------------------------------------------------------------------------
# Wrapping the policy


def fsdp_units(model) -> list:
    """The modules that become FSDP units of their own: every decoder layer and vision block (the root,
    sharded after them, holds the rest: embeddings, LM head, norms, patch embedding, merger)."""
    return list(model.model.language_model.layers) + list(model.model.visual.blocks)


def prepare_policy(policy, d: Dist, grad_checkpointing: bool = False, freeze_vision: bool = False,
                   trainable: bool = True, dtype: torch.dtype = torch.float32, pure: bool = False) -> None:
    """Apply the memory levers and the precision, then wrap the model for `d.mode` (in place; `policy.model`
    stays the model).

    dtype bf16 (precision.py): fp32 master weights with bf16 compute in every mode; one process and ddp get
    autocast and a bf16 rollout copy, fsdp gets a MixedPrecisionPolicy (bf16 parameters, fp32 gradient
    reduction); the frozen reference is stored in bf16. dtype fp32: fp32 throughout. `pure`: the weights
    themselves in `dtype` (no master copy), and FSDP gathers and reduces them in that dtype.
    ddp: `policy.wrapper` = DDP(model); the update's forwards go through it so gradients get all-reduced.
    fsdp: fully_shard on every decoder layer and vision block, then the root; with `d.offload` the shards,
    gradients and optimizer state stay in host memory (CPUOffloadPolicy) and forwards run on `d.device`.
    `trainable=False` (the frozen KL reference) shards it the same way and never wraps it in DDP (it has no
    gradients to synchronise).
    """
    from timerpo.precision import setup_precision

    model = policy.model
    setup_precision(policy, dtype, d.mode, trainable, pure)
    if freeze_vision:
        model.model.visual.requires_grad_(False)
    if grad_checkpointing and trainable:
        # Non-reentrant checkpointing: the one that works with DDP hooks and FSDP's re-gather in backward.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if d.mode == "ddp" and trainable:
        from torch.nn.parallel import DistributedDataParallel as DDP

        cuda = d.device.startswith("cuda")
        # No buffer sync per forward: the only buffers are rotary frequencies, equal everywhere, and a
        # broadcast would add a collective to every forward.
        policy.wrapper = DDP(model, device_ids=[d.local_rank] if cuda else None, forward_sync_buffers=False)
    elif d.mode == "fsdp":
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        broadcast_from_rank0(model)
        # FSDP warns that the model returns a view (the LM head's 3-D output); the warning is about in-place
        # writes into that output, and none happen (masked_log_softmax is out of place).
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        # bf16: FSDP gathers bf16 copies of the fp32 shards for every forward and reduces gradients in fp32
        mixed = dtype != torch.float32 and not pure
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if mixed else MixedPrecisionPolicy()
        # pinned host memory makes the copies to and from the GPU asynchronous; there is nothing to pin on a CPU
        offload = CPUOffloadPolicy(pin_memory=d.device.startswith("cuda")) if d.offload else OffloadPolicy()
        for unit in fsdp_units(model):
            fully_shard(unit, mp_policy=mp, offload_policy=offload)
        fully_shard(model, mp_policy=mp, offload_policy=offload)
        if d.offload:
            policy.compute_device = torch.device(d.device)


def broadcast_from_rank0(model) -> None:
    """Make every rank start from rank 0's weights before sharding (DDP does this itself)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def full_params(policy, d: Dist):
    """FSDP: hold every unit's full parameters for the duration (rollouts, no-grad forwards, evaluation).

    All-gathers each unit once on entry (every rank, same order), turns off resharding after forward, and
    reshards on exit. Inside, forwards need no collective, so ranks may run different numbers of them
    (completions that end early, uneven evaluation shares). No-op for ddp/none.
    """
    if d.mode != "fsdp":
        yield
        return
    model = policy.model
    model.set_reshard_after_forward(False)  # recursive
    units = fsdp_modules(model)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        # Training forwards free each unit after use (the root too), so peak memory stays one unit's worth
        # of gathered parameters plus activations.
        model.set_reshard_after_forward(True)


def grad_sync(policy, d: Dist, last: bool):
    """Context for one micro-batch's backward. DDP: skip the all-reduce (`no_sync`) on all but the last
    micro-batch; the last one all-reduces the accumulated sum. FSDP reduce-scatters every micro-batch so
    gradients stay sharded (skipping would hold a full fp32 gradient on every rank)."""
    if d.mode == "ddp" and not last and policy.wrapper is not None:
        return policy.wrapper.no_sync()
    return nullcontext()


def as_float(x) -> float:
    """A scalar that may be a DTensor (FSDP's gradient norm) as a Python float."""
    full = getattr(x, "full_tensor", None)
    return float(full() if full is not None else x)


# ---------------------------------------------------------------------------------------------------
# Checkpoint pieces


def full_model_state_dict(policy, d: Dist) -> dict | None:
    """FSDP: the full (unsharded) state dict, on CPU, on rank 0 (empty elsewhere); collective.
    Other modes: None (the model itself holds full parameters)."""
    if d.mode != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
