"""One TimerPO step, as the functions the README's numbered algorithm names, in order:

    1. rollout            sample G completions per prompt, keeping the last-layer state at every completion
                          token for TimerPO                                      (rollout.py does the sampling)
    2. score_outcomes     outcome reward R = 0.1 R_fmt + 0.2 R_cls + 0.7 R_loc   (reward.py)
    3. ground_completions W_i between each completion's states and its ExpCoT's states by OT (ot.py)
                          (TimerPO only; target_states gives the ExpCoT states),
       reference_logprobs log π_ref of the completion tokens for the KL when β > 0
    4. compute_advantages Â_main, Â_TsR, projection, fused A                      (advantage.py)
    5. update_policy      clipped surrogate − β KL + c_H H, token-mean, micro-batched, one AdamW step

A Prompt (make_prompt: one data row, encoded) goes in; Episodes (one completion each) are the only thing
passed between steps; each step fills its fields. Settings are keyword-only arguments, named as train.py's
Config fields they come from (train.rl_step passes them).
There is no separate "old log-prob" forward: with one update per rollout π_old is the current policy
(see update_policy), and the states the OT needs come from the rollout's own KV-cache steps.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence

import ot
from timerpo.advantage import timerpo_advantage
from timerpo.distributed import SINGLE, Dist, as_float, grad_scale, grad_sync
from timerpo.objective import timerpo_objective
from timerpo.policy import EncodedPrompt, Policy, encode_prompt, encode_text
from timerpo.prompt import Parsed, build_prompt, generic_cot, parse_completion
from timerpo.reward import RewardParts, outcome_reward
from timerpo.precision import sync_rollout_weights
from timerpo.rollout import (collate, completion_forward, completion_seed, sample_completions, shared_prompt_logprobs,
                            text_hidden_states)


@dataclass
class Prompt:
    """A training prompt: one data row, its encoded (image, text) input and its OT target text."""

    index: int  # row index in the data file: with the step, it seeds the row's completions
    sample: object  # data_gen.Sample
    encoded: EncodedPrompt
    target_text: str  # ExpCoT (or GenCoT for the ablation): what the completion states are aligned to


@dataclass
class Episode:
    """One completion of one prompt. Episodes of a group are adjacent in every list."""

    prompt: Prompt
    group: int  # which prompt of the step, 0..P-1
    completion_ids: list[int]  # up to and including the first end token
    sample_logprobs: list[float]  # log π at sampling time (equal to the update forward's up to float noise)
    text: str
    finished: bool  # ended with an end token (False: cut at max_new_tokens)
    parsed: Parsed | None = None
    reward: RewardParts | None = None
    states: torch.Tensor | None = None  # [C_i, D] last-layer states at the completion tokens (TimerPO);
    #                                     dropped once W is computed
    ref_logprobs: torch.Tensor | None = None  # [C_i]
    grounding: float | None = None  # W_i (OT cost) or the cosine similarity, by --grounding
    advantage: float | None = None


def make_prompt(policy: Policy, folder: str, samples: list, index: int, cot: str) -> Prompt:
    """The Prompt of data row `index` of `folder`: its plot and task text encoded, and its OT target text
    (the sample's ExpCoT, or the generic reasoning for --cot gencot)."""
    sample = samples[index]
    with Image.open(os.path.join(folder, sample.image)) as img:
        encoded = encode_prompt(policy, img, build_prompt(sample.length))
    # generic_cot() rather than the stored field: data folders written before the GenCoT became one generic
    # text still hold per-sample texts with the answer in them.
    target = sample.expcot if cot == "expcot" else generic_cot()
    return Prompt(index=index, sample=sample, encoded=encoded, target_text=target)


def chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


# -- 1 ---------------------------------------------------------------------------------------------

def rollout(policy: Policy, prompts: list[Prompt], *, group_size: int, step: int, seed: int, max_new_tokens: int,
            batch_size: int, temperature: float = 1.0, keep_states: bool = False) -> list[Episode]:
    """Step 1: G completions per prompt, sampled in batches; completion k of a prompt is seeded by
    (seed, step, prompt.index, k), so its text does not depend on the batch it was sampled in. With
    `keep_states` each episode also keeps its completion's last-layer states for step 3."""
    jobs = [(g, p, k) for g, p in enumerate(prompts) for k in range(group_size)]
    episodes = []
    policy.model.eval()
    for chunk in chunks(jobs, batch_size):
        seeds = [completion_seed(seed, step, p.index, k) for _, p, k in chunk]
        outs = sample_completions(policy, [p.encoded for _, p, _ in chunk], seeds, max_new_tokens, temperature,
                                  with_states=keep_states)
        for (g, p, _), (ids, logps, *states) in zip(chunk, outs):
            text = policy.tokenizer.decode(ids, skip_special_tokens=True)
            episodes.append(Episode(prompt=p, group=g, completion_ids=ids, sample_logprobs=logps, text=text,
                                    finished=ids[-1] in policy.end_ids, states=states[0] if states else None))
    return episodes


# -- 2 ---------------------------------------------------------------------------------------------

def score_outcomes(episodes: list[Episode], *, loc_mode: str) -> None:
    """Step 2: parse each completion and score it against ITS OWN sample (method.md §3)."""
    for ep in episodes:
        s = ep.prompt.sample
        ep.parsed = parse_completion(ep.text, s.length)
        ep.reward = outcome_reward(ep.parsed, s.intervals, s.label, s.length, loc_mode=loc_mode)


# -- 3 ---------------------------------------------------------------------------------------------

@torch.no_grad()
def target_states(policy: Policy, prompts: list[Prompt], *, max_tokens: int):
    """Hidden states of each prompt's OT target text under the CURRENT policy (text-only forward).

    Once per prompt, not per completion: the G completions of a group share their target.
    Returns ([P, T, D], [P, T]).
    """
    tokens = [encode_text(policy, p.target_text, max_tokens) for p in prompts]
    return text_hidden_states(policy, tokens)


def grounding_values(hidden, mask, targets, target_mask, mode: str, eps: float, n_iter: int) -> torch.Tensor:
    """W_i = <T*, C> by entropic OT (mode "ot"), or mean-pooled cosine similarity (mode "cosine"). [b]"""
    if mode == "ot":
        return ot.ot_distance(hidden, mask, targets, target_mask, eps=eps, n_iter=n_iter)
    if mode == "cosine":
        return ot.mean_pooled_cosine(hidden, mask, targets, target_mask)
    raise ValueError(f"unknown grounding mode {mode!r} (expected 'ot' or 'cosine')")


@torch.no_grad()
def ground_completions(episodes: list[Episode], targets, *, micro_batch: int, grounding: str = "ot",
                       ot_eps: float = 0.08, ot_iters: int = 50) -> None:
    """Step 3, method.md §8 to §11: W_i = ⟨T*, C⟩ (or the cosine similarity) between each completion's states,
    kept by the rollout, and its group's target states; then the states are dropped. No gradient flows
    through W.

    targets = target_states(...) = ([P, T, D], [P, T]); row g belongs to the episodes of group g.
    """
    states, state_mask = targets
    for chunk in chunks(episodes, micro_batch):
        # zero-padded rows have zero mass in the OT marginals, so padding changes nothing; the OT runs in fp32
        # whatever precision the states were kept in
        hidden = pad_sequence([ep.states for ep in chunk], batch_first=True).to(states.device).float()  # [b, C, D]
        lengths = torch.tensor([len(ep.completion_ids) for ep in chunk], device=states.device)  # [b]
        mask = (torch.arange(hidden.shape[1], device=states.device) < lengths[:, None]).long()  # [b, C]
        rows = torch.tensor([ep.group for ep in chunk], device=states.device)  # [b]
        values = grounding_values(hidden, mask, states[rows].float(), state_mask[rows], grounding, ot_eps,
                                  ot_iters)  # [b]
        for ep, v in zip(chunk, values.tolist()):
            ep.grounding, ep.states = v, None


@torch.no_grad()
def reference_logprobs(ref_policy: Policy, episodes: list[Episode], *, micro_batch: int) -> None:
    """Step 3, with β > 0: log π_ref of every completion token, for the k3 KL term of method.md §16.

    Each group's prompt (image + prefix) runs once per micro-batch (shared_prompt_logprobs), not once per
    completion."""
    ref_policy.model.eval()
    for chunk in chunks(episodes, micro_batch):
        logprobs = shared_prompt_logprobs(ref_policy, [ep.prompt.encoded for ep in chunk],
                                          [ep.completion_ids for ep in chunk])  # [b, C]
        for ep, row in zip(chunk, logprobs):
            ep.ref_logprobs = row[:len(ep.completion_ids)].cpu()


# -- 4 ---------------------------------------------------------------------------------------------

def compute_advantages(episodes: list[Episode], *, group_size: int, mode: str, alpha: float, norm: str,
                       tau: float, grounding: str, tsr_norm: str | None = None, tsr_floor: float = 0.0):
    """Step 4: Â_main from the outcome rewards, Â_TsR from W, projected and fused (advantage.py)."""
    rewards = torch.tensor([ep.reward.total for ep in episodes], dtype=torch.float64)  # [N]
    have_grounding = all(ep.grounding is not None for ep in episodes)  # False in grpo mode (never computed)
    ground = torch.tensor([ep.grounding for ep in episodes], dtype=torch.float64) if have_grounding else None  # [N]
    result = timerpo_advantage(rewards, ground, group_size, mode=mode, alpha=alpha, norm=norm, tau=tau,
                               grounding=grounding, tsr_norm=tsr_norm, tsr_floor=tsr_floor)
    for ep, a in zip(episodes, result.advantages.tolist()):
        ep.advantage = a
    return result


# -- 5 ---------------------------------------------------------------------------------------------

def pad_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Right-pad 1-D tensors with zeros to [len(rows), width]."""
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def update_policy(policy: Policy, optimizer: torch.optim.Optimizer, episodes: list[Episode], *, micro_batch: int,
                  clip_eps: float, beta: float, entropy_coef: float, max_grad_norm: float,
                  n_tokens_total: int | None = None, dist: Dist | None = None) -> dict:
    """Step 5: the objective of method.md §16 over all episodes, accumulated over micro-batches, then one
    AdamW step. A non-finite loss or gradient skips the step (and says so in the returned stats).

    π_old in the ratio is the update forward's own log-probs, detached. That is exact here, not an
    approximation: there is one update per rollout, so π_old IS the current policy;
    ρ = exp(log π − sg(log π)) = 1 with ∇ρ = ∇log π: the loss and gradient a separate no-grad "old"
    forward would give, one forward cheaper (a test compares both).

    Under torchrun (`dist` given) each rank passes its own episodes; the token-mean divides by the GLOBAL
    completion token count (`n_tokens_total`, all-reduced here when not given), the ranks' gradients add
    up (see distributed.grad_scale) and the returned stats are those of the whole global batch.
    """
    dist = dist or SINGLE
    policy.model.train()
    optimizer.zero_grad(set_to_none=True)
    n_tokens = sum(len(ep.completion_ids) for ep in episodes)
    if n_tokens_total is None:
        n_tokens_total = round(dist.sum([n_tokens])[0])
    scale = grad_scale(dist)
    sums = dict(loss=0.0, surrogate=0.0, kl=0.0, entropy=0.0, clipped=0.0)
    micro_batches = list(chunks(episodes, micro_batch))
    for k, chunk in enumerate(micro_batches):
        batch = collate(policy, [ep.prompt.encoded for ep in chunk], [ep.completion_ids for ep in chunk])
        C = batch.completion_mask.shape[1]
        with grad_sync(policy, dist, last=k == len(micro_batches) - 1):
            logprobs, _, entropy = completion_forward(policy, batch, with_entropy=entropy_coef != 0)  # [b, C]
            old = logprobs.detach()  # [b, C]  π_old = π_θ at the single update (see the docstring)
            ref = pad_rows([ep.ref_logprobs for ep in chunk], C).to(logprobs.device) if beta else None  # [b, C]
            adv = torch.tensor([ep.advantage for ep in chunk], dtype=torch.float32, device=logprobs.device)  # [b]
            terms = timerpo_objective(logprobs, old, ref, entropy, adv, batch.completion_mask, n_tokens_total,
                                      clip_eps=clip_eps, beta=beta, entropy_coef=entropy_coef)
            (terms.loss * scale).backward()  # scale 1 in one process (exact)
        sums["loss"] += float(terms.loss.detach())
        for key in ("surrogate", "kl", "entropy", "clipped"):
            sums[key] += getattr(terms, key)
    sums = dict(zip(sums, dist.sum(list(sums.values()))))  # whole-batch sums: every rank decides alike below
    params = [p for p in policy.model.parameters() if p.requires_grad]
    grad_norm = as_float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    skipped = not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm))
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
        sync_rollout_weights(policy)  # the bf16 copy rollouts sample with (--dtype bf16; no-op otherwise)
    stats = {k: v / max(n_tokens_total, 1) for k, v in sums.items() if k != "loss"}
    stats.update(loss=sums["loss"], grad_norm=grad_norm, skipped=skipped, clip_frac=stats.pop("clipped"))
    return stats
