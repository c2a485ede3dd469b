"""AdamW for pure-bf16 training (`train.py --pure-bf16`): bf16 weights, bf16 moments, no fp32 master copy.

Memory per trained parameter: 2 bytes of weight, 2 of gradient and 2 + 2 of AdamW moments (8 in all),
against 16 with fp32 master weights (4 + 4 + 4 + 4). The arithmetic of a step is AdamW's, in fp32, on the
fp32 values of the stored bf16 numbers; only the write-back differs: each result is rounded to bf16
*stochastically*.

Why stochastic rounding: an AdamW step moves a weight by about lr (1e-6 in the paper), far less than the
spacing of the bf16 numbers around it (2^-7 of its size: 1.6e-4 at |w| = 0.02). Rounded to nearest, such
updates would vanish and training would stall; the second moment's 0.1 % steps (β2 = 0.999) would vanish
the same way. Rounded up with probability (x − lower neighbour) / spacing, the stored number equals the
fp32 result in expectation, E[SR(x)] = x, so small updates add up on average, at the cost of noise of up to
one spacing per write. This is a deviation from the paper's fp32 master weights (method.md §23), with its
measured drift in bench/results/pure_bf16_drift.json.

The random bits come from a generator seeded by (seed, step), so a run and its resumed continuation round
identically.
"""
from __future__ import annotations

import torch

# Elements updated per chunk: bounds the fp32 temporaries of a step (the 3B's embedding is 311 M elements).
CHUNK = 1 << 22
LOW_BITS = 1 << 16  # bf16 is the upper half of an fp32 number


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x (fp32) rounded to one of its two neighbouring bf16 numbers, unbiasedly: E[result] = x.

    bf16 keeps the upper 16 bits of an fp32 number. Adding a uniform integer in [0, 2^16) to the lower 16
    bits carries into the upper half with probability (lower bits) / 2^16, which is x's distance from the
    bf16 number below it in magnitude, over their spacing; then the lower half is dropped. Exact bf16 values
    come back unchanged; infinities and NaN stay what they are.
    """
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, LOW_BITS, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    return ((bits + noise) & -LOW_BITS).view(torch.float32).to(torch.bfloat16)


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments: torch.optim.AdamW's update) over bf16
    parameters, keeping `exp_avg` and `exp_avg_sq` in bf16 and writing weights and moments back with
    stochastic rounding. The state's field names are torch.optim.AdamW's, so checkpoints store it alike.

    Under FSDP the parameters are DTensors; every operation here is elementwise, so it runs on each rank's
    local shard.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.bfloat16:
                    raise ValueError(f"BF16AdamW updates bf16 parameters; got one of dtype {p.dtype}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        generators: dict[torch.device, torch.Generator] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = int(state["step"])
                weight, grad = local(p), local(p.grad)
                if weight.device not in generators:  # one stream per step, the same after a resume
                    generators[weight.device] = torch.Generator(weight.device).manual_seed(
                        (self.seed * 1_000_003 + t) % 2**63)
                adamw_update(weight, grad, local(state["exp_avg"]), local(state["exp_avg_sq"]), t, group,
                             generators[weight.device])
        return loss


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of an FSDP-sharded tensor (a view), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def adamw_update(weight, grad, exp_avg, exp_avg_sq, step: int, group: dict, generator) -> None:
    """One AdamW step of one bf16 tensor in place, chunk by chunk: fp32 math, stochastic write-back."""
    lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
    chunks = zip(*(t.view(-1).split(CHUNK) for t in (weight, grad, exp_avg, exp_avg_sq)))
    for w16, g16, m16, v16 in chunks:
        w, g, m, v = w16.float(), g16.float(), m16.float(), v16.float()
        w.mul_(1 - lr * decay)
        m.lerp_(g, 1 - beta1)  # m = β1 m + (1 − β1) g
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bias2 ** 0.5).add_(eps)
        w.addcdiv_(m, denom, value=-lr / bias1)
        for stored, value in ((w16, w), (m16, m), (v16, v)):
            stored.copy_(stochastic_round_bf16(value, generator))
