"""TimerPO advantages: GRPO's outcome advantage plus an OT-grounded term projected orthogonally to it, per group
of G completions of one prompt.

The method, top to bottom in the order of its equations:
    group_advantage         A_main = (R - mean_G R) / (std_G R + delta)                            method.md §7
    grounded_reward         s = exp(-W / tau), W from ot.ot_distance                                §12
    grounded_advantage      A_TsR = (s - mean_G s) / (std_G s + delta)                              §13
    orthogonal_projection   A_perp_TsR = A_TsR - (<A_TsR, A_main> / (||A_main||^2 + eps)) A_main    §14
    timerpo_advantage       A = A_main + alpha A_perp_TsR                                           §15
then the input checks that the public functions call.

Completions of one prompt are contiguous: a flat tensor [N] with N = (number of prompts) * G is viewed as
[K, G], K = N / G groups. Everything is computed in float64 and returned as float64 [N] (or [K] per group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MODES = ("timerpo", "grpo", "no-projection")
GROUNDINGS = ("ot", "cosine")
NORMS = ("std", "mean")
# Â_TsR has its own normalisation switch: s comes out of Sinkhorn, so a group's spread of s can be mostly
# numerical noise, which "std" would blow up to unit size. "std-floor" divides by max(std_G s, floor).
TSR_NORMS = ("std", "mean", "std-floor")


def group_advantage(rewards, group_size: int, norm: str = "std", delta: float = 1e-6) -> torch.Tensor:
    """method.md §7, main advantage: A_main,i = (R_i - mean_G R) / (std_G R + delta), [N] -> [N].

    norm="std" uses the sample std (ddof = 1); norm="mean" only subtracts the group mean (the public code).
    A group whose rewards are all equal gets A_main = 0 exactly.
    Example (G = 5, norm="std"): R = [1, 0, 0, 0, 0] has mean 0.2 and sample std sqrt(0.2) = 0.4472, so
    A_main = [1.7889, -0.4472, -0.4472, -0.4472, -0.4472] (up to delta).
    """
    _check_settings(group_size, norm=norm)
    r = _grouped(rewards, group_size, "rewards")  # [K, G]
    return _centre_and_scale(r, norm, delta).reshape(-1)  # [N]


def _centre_and_scale(groups: torch.Tensor, norm: str, delta: float, floor: float = 0.0) -> torch.Tensor:
    """Centre each group and optionally scale it (§7 and §13); groups [K, G] -> [K, G].

        std:        (x - mean_G x) / (std_G x + delta)
        mean:        x - mean_G x
        std-floor:  (x - mean_G x) / max(std_G x, floor)

    std_G is the sample standard deviation (Bessel-corrected, ddof = 1), as torch.std and common GRPO code use.
    A group whose values are all equal gets exactly 0 (not rounding noise divided by delta).
    Example (std-floor, floor 0.1): x = [0.50, 0.52] has std 0.0141 < 0.1, so the result is [-0.1, 0.1];
    with "std" it would be [-0.707, 0.707] whatever the size of the spread.
    """
    centred = groups - groups.mean(dim=1, keepdim=True)  # [K, G]
    std = groups.std(dim=1, correction=1, keepdim=True) if norm != "mean" else None  # [K, 1]
    if norm == "std":
        centred = centred / (std + delta)  # [K, G]
    elif norm == "std-floor":
        centred = centred / std.clamp(min=floor)  # [K, G]
    flat = groups.amax(dim=1) == groups.amin(dim=1)  # [K]
    return torch.where(flat[:, None], 0.0, centred)


def grounded_reward(W, tau: float = 0.5) -> torch.Tensor:
    """method.md §12, grounded reward: s_i = exp(-W_i / tau), [N] -> [N] float64.

    Example: tau = 0.5, W = [0, 0.5, 1] gives s = [1, e^-1, e^-2] = [1, 0.3679, 0.1353] (W = 1 is an empty side).
    """
    _check_settings(tau=tau)
    w = _grouped(W, 1, "W").reshape(-1)  # [N]
    return torch.exp(-w / tau)


def grounded_advantage(s, group_size: int, norm: str = "std", delta: float = 1e-6,
                       floor: float = 0.0) -> torch.Tensor:
    """method.md §13, grounded advantage: A_TsR,i = (s_i - mean_G s) / (std_G s + delta), [N] -> [N].

    norm is `--tsr-norm`: "std" (the paper's reading), "mean" (centring only) or "std-floor", which divides by
    max(std_G s, floor) so that a group whose s differ only by numerical noise is not blown up to unit size.
    A group whose s are all equal gets 0. Example (G = 2, norm="mean"): s = [1, e^-2] gives [0.432, -0.432].
    """
    _check_settings(group_size, tsr_norm=norm, tsr_floor=floor)
    groups = _grouped(s, group_size, "s")  # [K, G]
    return _centre_and_scale(groups, norm, delta, floor).reshape(-1)  # [N]


def projection_coefficient(aux, main, group_size: int, eps: float = 1e-8) -> torch.Tensor:
    """method.md §14, per-group coefficient of the orthogonal projection:
    c_g = <aux, main>_g / (||main||_g^2 + eps), [N], [N] -> [K].

    Example: aux = [1, -1], main = [2, -2] (one group) gives c = 4 / (8 + eps) ~= 0.5.
    """
    a, m = _grouped_pair(aux, main, group_size)  # [K, G], [K, G]
    return (a * m).sum(dim=1) / ((m * m).sum(dim=1) + eps)  # [K]


def orthogonal_projection(aux, main, group_size: int, eps: float = 1e-8, return_coef: bool = False):
    """method.md §14, orthogonal projection per group: aux_perp = aux - c_g * main, with c_g from
    `projection_coefficient`. [N], [N] -> [N] (and c [K] when return_coef).

    The residual overlap is <aux_perp, main>_g = <aux, main>_g * eps / (||main||_g^2 + eps): orthogonal up to
    eps / ||main||^2, which is negligible for std-normalised advantages (||main||^2 = G - 1) and exactly 0 when
    main is all zero (then aux passes through unchanged). Zero-mean aux and main give a zero-mean result.
    Example: aux = [1, 0, -1], main = [1, -1, 0] gives c = 1/2 and aux_perp = [0.5, 0.5, -1].
    """
    a, m = _grouped_pair(aux, main, group_size)  # [K, G], [K, G]
    coef = projection_coefficient(aux, main, group_size, eps)  # [K]
    projected = (a - coef[:, None] * m).reshape(-1)  # [N]
    return (projected, coef) if return_coef else projected


@dataclass(frozen=True)
class AdvantageResult:
    """Output of `timerpo_advantage`; all tensors float64.

    advantages: [N] final A_i, broadcast to every completion token by the caller.
    main: [N] A_main (outcome, GRPO).
    grounded_reward: [N] s_i (exp(-W/tau) for OT grounding, the similarity itself for cosine), or None.
    grounded: [N] A_TsR = s - mean_G s (scaled as `tsr_norm` says), or None.
    projected: [N] A_TsR made orthogonal to A_main per group, or None.
    coef: [K] projection coefficient per group, or None.
    zero_std_frac: fraction of groups whose outcome rewards are all equal (A_main = 0 there).
    The optional fields are None only in mode "grpo" called with W=None.
    """

    advantages: torch.Tensor
    main: torch.Tensor
    grounded_reward: torch.Tensor | None
    grounded: torch.Tensor | None
    projected: torch.Tensor | None
    coef: torch.Tensor | None
    zero_std_frac: float


def timerpo_advantage(rewards, W, group_size: int, mode: str = "timerpo", alpha: float = 0.3, norm: str = "std",
                      tau: float = 0.5, grounding: str = "ot", delta: float = 1e-6,
                      eps: float = 1e-8, tsr_norm: str | None = None, tsr_floor: float = 0.0) -> AdvantageResult:
    """method.md §15, fused advantage from §7 and §12 to §14, per group of G completions:

        timerpo:        A = A_main + alpha * A_perp_TsR
        no-projection:  A = A_main + alpha * A_TsR
        grpo:           A = A_main (alpha is ignored; W may be None)
    with A_main = group_advantage(rewards, G, norm, delta), A_TsR = grounded_advantage(s, G, tsr_norm, delta,
    tsr_floor) (tsr_norm None = the same as `norm`), A_perp_TsR = orthogonal_projection(A_TsR, A_main, G, eps),
    and the grounded reward
        grounding="ot":     W is the OT distance [N], s = exp(-W / tau);
        grounding="cosine": W is the mean-pooled cosine similarity [N] (ot.mean_pooled_cosine), s = W as is
                            (larger = closer, like exp(-W/tau); centring makes any offset irrelevant).
    No gradient flows: inputs are detached. alpha = 0 in mode "timerpo" returns exactly A_main (as "grpo").
    Example (G = 2, norm="mean", tau = 0.5): R = [1, 0], W = [0, 0] gives A_main = [0.5, -0.5], s = [1, 1],
    A_TsR = [0, 0], so A = A_main in every mode.
    """
    tsr_norm = norm if tsr_norm is None else tsr_norm
    _check_settings(group_size, mode=mode, grounding=grounding, alpha=alpha, norm=norm, tsr_norm=tsr_norm,
                    tsr_floor=tsr_floor)
    r = _grouped(rewards, group_size, "rewards")  # [K, G]
    main = _centre_and_scale(r, norm, delta).reshape(-1)  # [N], §7
    zero_std_frac = float((r.amax(dim=1) == r.amin(dim=1)).to(torch.float64).mean())
    if W is None:  # GRPO alone: no grounded term
        _check_settings(mode=mode, w_missing=True)
        return AdvantageResult(main, main, None, None, None, None, zero_std_frac)

    s = grounded_reward(W, tau) if grounding == "ot" else _grouped(W, 1, "W (similarity)").reshape(-1)  # [N], §12
    _check_settings(w_count=s.numel(), rewards_count=main.numel())
    grounded = grounded_advantage(s, group_size, tsr_norm, delta, tsr_floor)  # [N], §13
    projected, coef = orthogonal_projection(grounded, main, group_size, eps, return_coef=True)  # [N], [K], §14
    if mode == "grpo":
        advantages = main
    elif mode == "no-projection":
        advantages = main + alpha * grounded
    else:
        advantages = main + alpha * projected  # [N], §15
    return AdvantageResult(advantages, main, s, grounded, projected, coef, zero_std_frac)


# --------------------------------------------------------------------------------------------------------- input checks


def _grouped(values, group_size: int, name: str) -> torch.Tensor:
    """View a flat [N] tensor as [N / G, G] float64, with clear errors for bad shapes or values."""
    if not (isinstance(group_size, int) and group_size >= 1):
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    t = torch.as_tensor(values).detach().to(torch.float64)
    if t.dim() != 1:
        raise ValueError(f"{name} must be a flat [N] tensor, got shape {tuple(t.shape)}")
    if t.numel() == 0 or t.numel() % group_size:
        raise ValueError(f"{name} has {t.numel()} values, not a positive multiple of group_size={group_size}")
    bad = ~torch.isfinite(t)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] = {t[i].item()!r}; need finite values")
    return t.view(-1, group_size)  # [N / G, G]


def _grouped_pair(aux, main, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both [N] tensors of a projection viewed as [K, G] (see `_grouped`); they must have the same length."""
    a = _grouped(aux, group_size, "aux")  # [K, G]
    m = _grouped(main, group_size, "main")  # [K, G]
    if a.shape != m.shape:
        raise ValueError(f"aux and main must have the same length, got {a.numel()} and {m.numel()}")
    return a, m


def _check_settings(group_size: int | None = None, *, mode: str | None = None, grounding: str | None = None,
                    alpha: float | None = None, norm: str | None = None, tsr_norm: str | None = None,
                    tsr_floor: float | None = None, tau: float | None = None, w_missing: bool = False,
                    w_count: int | None = None, rewards_count: int | None = None) -> None:
    """Raise ValueError naming the offending value for each setting given (None: not checked).

    norm / tsr_norm "std" and "std-floor" need group_size >= 2; tsr_floor is checked for tsr_norm "std-floor";
    w_missing: W is None, allowed only in mode "grpo"; w_count / rewards_count: W must have one value per reward.
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if grounding is not None and grounding not in GROUNDINGS:
        raise ValueError(f"grounding must be one of {GROUNDINGS}, got {grounding!r}")
    if alpha is not None and not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    for value, allowed in ((norm, NORMS), (tsr_norm, TSR_NORMS)):
        if value is None:
            continue
        if value not in allowed:
            raise ValueError(f"norm must be one of {allowed}, got {value!r}")
        if value != "mean" and group_size < 2:
            raise ValueError("norm='std' needs group_size >= 2 (sample std of one value is undefined)")
    if tsr_norm == "std-floor" and not (math.isfinite(tsr_floor) and tsr_floor > 0):
        raise ValueError(f"tsr_norm 'std-floor' needs a finite tsr_floor > 0, got {tsr_floor!r}")
    if tau is not None and not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    if w_missing and mode != "grpo":
        raise ValueError(f"mode {mode!r} needs W (OT distances or cosine similarities), got None")
    if w_count != rewards_count:
        raise ValueError(f"W has {w_count} values but rewards has {rewards_count}")
