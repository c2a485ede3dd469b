"""The TimerPO objective (method.md §16): clipped surrogate, k3 KL to the reference, entropy bonus.

All three are per completion token and aggregated by ONE token-mean over the whole batch:

    L(θ) = −(1/N) Σ_i Σ_t m_it [ min(ρ_it A_i, clip(ρ_it, 1−ϵ, 1+ϵ) A_i) − β k3_it + c_H H_it ]

with ρ_it = π_θ(y_it | ·) / π_old(y_it | ·), k3_it = exp(r) − r − 1, r = log π_ref − log π_θ, H_it the
token entropy of π_θ, m_it the completion mask and N = Σ m over the whole batch (not per micro-batch),
so that summing micro-batch gradients gives exactly the gradient of the big batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# log-ratio clamp for the k3 estimator: exp(20) is finite in fp32 and the estimator is already
# meaningless that far from the reference; the value clamp keeps one bad token from dominating.
K3_LOG_RATIO_CLAMP = 20.0
K3_VALUE_CLAMP = 10.0


@dataclass
class ObjectiveTerms:
    """Sums over the masked tokens of a micro-batch (divide by the batch's N for means)."""

    loss: torch.Tensor  # scalar with grad: this micro-batch's share of L(θ)
    surrogate: float
    kl: float
    entropy: float
    clipped: float  # tokens whose ratio left [1−ϵ, 1+ϵ]
    tokens: float


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """method.md §16, KL term: k3 estimator of KL(π_θ ‖ π_ref) per token:
    exp(r) − r − 1, r = log π_ref − log π_θ (clamped). ≥ 0.

    Example: logprobs = log 0.5, ref = log 0.25 → r = −log 2 → k3 = 0.5 + 0.693 − 1 = 0.193.
    """
    r = (ref_logprobs - logprobs).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)  # [B, C]
    return (torch.exp(r) - r - 1).clamp(max=K3_VALUE_CLAMP)  # [B, C]


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """method.md §16, clipped surrogate (PPO's) per token: min(ρ A, clip(ρ, 1−ϵ, 1+ϵ) A);
    also which tokens were clipped.

    logprobs, old_logprobs [B, C]; advantages [B] (one value per completion, broadcast to its tokens).
    """
    ratio = torch.exp(logprobs - old_logprobs)  # [B, C]
    adv = advantages.unsqueeze(-1)  # [B, 1]
    unclipped = ratio * adv  # [B, C]
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv  # [B, C]
    was_clipped = (ratio < 1 - clip_eps) | (ratio > 1 + clip_eps)  # [B, C]
    return torch.minimum(unclipped, clipped), was_clipped


def timerpo_objective(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
                      entropy: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
                      n_tokens_total: int, clip_eps: float = 0.2, beta: float = 0.001,
                      entropy_coef: float = 0.001) -> ObjectiveTerms:
    """This micro-batch's share of L(θ) above (method.md §16), token-mean over the WHOLE batch.

    logprobs, old_logprobs, ref_logprobs, entropy, mask: [B, C]; advantages: [B].
    ref_logprobs may be None only when beta == 0; entropy may be None when entropy_coef == 0.
    """
    m = mask.to(logprobs.dtype)  # [B, C]
    surrogate, was_clipped = clipped_surrogate(logprobs, old_logprobs, advantages, clip_eps)  # [B, C]
    per_token = surrogate  # [B, C]: the quantity we maximize
    kl = k3_kl(logprobs, ref_logprobs) if ref_logprobs is not None else torch.zeros_like(logprobs)  # [B, C]
    if beta:
        per_token = per_token - beta * kl
    ent = entropy if entropy is not None else torch.zeros_like(logprobs)  # [B, C]
    if entropy_coef:
        per_token = per_token + entropy_coef * ent
    loss = -(per_token * m).sum() / n_tokens_total
    with torch.no_grad():  # logged sums only
        return ObjectiveTerms(
            loss=loss,
            surrogate=float((surrogate * m).sum()),
            kl=float((kl * m).sum()),
            entropy=float((ent * m).sum()),
            clipped=float((was_clipped.to(m.dtype) * m).sum()),
            tokens=float(m.sum()),
        )
