"""Rollout: batching prompts, on-policy sampling with a KV cache, and the forward over prompt + completion.

Sampling is written out by hand instead of calling `generate` for three reasons that matter for RL:
  * every completion has its own random stream, seeded from (seed, step, prompt, sample), so what a
    completion is never depends on which other completions share its batch (or its rank);
  * the sampling distribution is exactly the one the training forward scores: temperature 1, no top-k,
    no top-p, vision tokens removed (`masked_log_softmax` is shared by both);
  * the 3-D (mrope) positions of the prompt are computed once and then continued, with no hidden state
    kept on the model between calls.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from timerpo.policy import EncodedPrompt, Policy

# Forbidden tokens get a large negative logit rather than -inf, so that p·log p stays 0 (not NaN).
MASKED_LOGIT = -1e9


@dataclass
class Batch:
    """Left-padded prompts followed by right-padded completions, ready for one forward."""

    input_ids: torch.Tensor  # [B, P+C]
    attention_mask: torch.Tensor  # [B, P+C]: 0 on left padding
    mm_token_type_ids: torch.Tensor  # [B, P+C]: 1 on image tokens, 0 elsewhere (completion included)
    pixel_values: torch.Tensor  # [sum of patches, 1176]: each row's image block, in row order
    image_grid_thw: torch.Tensor  # [B, 3]
    prompt_len: int  # P
    completion_mask: torch.Tensor  # [B, C]: 1 up to and including the first end token


def completion_seed(seed: int, step: int, prompt_index: int, sample_index: int) -> int:
    """The sampling seed of one completion: a hash of where it sits in the run, not in the batch."""
    return int(np.random.SeedSequence([seed, step, prompt_index, sample_index]).generate_state(1)[0])


def collate(policy: Policy, prompts: list[EncodedPrompt], completions: list[list[int]] | None = None) -> Batch:
    """Stack B prompts (left-padded) and their completions (right-padded) into one Batch.

    Example: prompts of 3 and 2 tokens, completions [7, END] and [9]:
        input_ids      = [[p p p 7 END], [pad p p 9 pad]]
        attention_mask = [[1 1 1 1 1],   [0 1 1 1 1]]
        completion_mask= [[1 1],         [1 0]]
    Padding after a completion stays attended: causal attention means it never affects a real token.
    """
    completions = completions if completions is not None else [[] for _ in prompts]
    pad, image_id = policy.pad_id, policy.token_id("<|image_pad|>")
    P = max(len(p.input_ids) for p in prompts)
    C = max(len(c) for c in completions)
    B = len(prompts)
    input_ids = torch.full((B, P + C), pad, dtype=torch.long)  # [B, P+C]
    attention_mask = torch.ones((B, P + C), dtype=torch.long)  # [B, P+C]
    completion_mask = torch.zeros((B, C), dtype=torch.long)  # [B, C]
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        start = P - len(prompt.input_ids)
        input_ids[i, start:P] = torch.tensor(prompt.input_ids)
        attention_mask[i, :start] = 0
        input_ids[i, P:P + len(completion)] = torch.tensor(completion, dtype=torch.long)
        completion_mask[i, :len(completion)] = 1
    device = policy.device
    return Batch(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        mm_token_type_ids=(input_ids == image_id).long().to(device),
        pixel_values=torch.cat([p.pixel_values for p in prompts]).to(device, policy.model.dtype),
        image_grid_thw=torch.stack([p.image_grid_thw for p in prompts]).to(device),
        prompt_len=P,
        completion_mask=completion_mask.to(device),
    )


def rope_positions(policy: Policy, batch: Batch) -> torch.Tensor:
    """The 3-D mrope positions of every token (image tokens get (t, h, w) grid positions). [3, B, T]

    Without `mm_token_type_ids` transformers silently falls back to 1-D positions and the training
    forward's log-probs stop matching the rollout's (method.md §17); computing them here, once,
    for both paths rules that out.
    """
    positions, _ = policy.model.model.get_rope_index(
        batch.input_ids, mm_token_type_ids=batch.mm_token_type_ids,
        image_grid_thw=batch.image_grid_thw, attention_mask=batch.attention_mask,
    )
    return positions  # [3, B, T]


def masked_log_softmax(logits: torch.Tensor, forbidden_ids: list[int]) -> torch.Tensor:
    """log π(· | context) in fp32 with the forbidden (vision) tokens removed from the support. [..., V]"""
    # Out of place: `logits` may be the model's output, and an in-place write into it would drop the
    # backward hook FSDP attaches there (the one that re-gathers the LM head's weight for the backward).
    forbidden = torch.tensor(forbidden_ids, dtype=torch.long, device=logits.device)  # [k]
    logits = logits.float().index_fill(-1, forbidden, MASKED_LOGIT)  # [..., V]
    return torch.log_softmax(logits, dim=-1)


def completion_forward(policy: Policy, batch: Batch, with_hidden: bool = False, with_entropy: bool = False):
    """One forward over image + prompt + completion: per-token log-probs (and hidden states, entropy).

    Returns (logprobs [B, C], hidden [B, C, D] or None, entropy [B, C] or None). Hidden states are the
    last layer's, after the final norm, i.e. what the LM head sees; hidden[:, j] is the state AT
    completion token j (its own embedding in context), the one the OT aligns with ExpCoT token states.
    Only the C positions P-1 .. P+C-2 (each predicts a completion token) go through the LM head.
    The call goes through the model's top-level forward (`policy.forward_module`): that is the call DDP
    hooks to all-reduce gradients and FSDP hooks to gather the root's weights (embeddings, LM head).
    """
    P, C = batch.prompt_len, batch.completion_mask.shape[1]
    scored = torch.arange(P - 1, P + C - 1, device=batch.input_ids.device)  # [C]
    with capture_output(final_norm(policy)) if with_hidden else nullcontext() as captured:
        out = policy.forward_module(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask,
            position_ids=rope_positions(policy, batch), pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw, mm_token_type_ids=batch.mm_token_type_ids, use_cache=False,
            logits_to_keep=scored,
        )
    logp_all = masked_log_softmax(out.logits, policy.forbidden_ids)  # [B, C, V]
    targets = batch.input_ids[:, P:]  # [B, C]
    logprobs = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, C]
    hidden = captured.output[:, P:] if with_hidden else None  # [B, C, D]
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None  # [B, C]
    return logprobs, hidden, entropy


def final_norm(policy: Policy) -> torch.nn.Module:
    """The text model's last RMSNorm: its output is the last hidden state the LM head reads."""
    return policy.model.model.language_model.norm


class capture_output:
    """`with capture_output(module) as c:` keeps the module's last forward output in c.output.

    Lets a caller read an inner activation while calling the top-level forward (which DDP/FSDP need),
    without asking the model for every layer's hidden states.
    """

    def __init__(self, module: torch.nn.Module):
        self.module, self.output, self._handle = module, None, None

    def __enter__(self):
        self._handle = self.module.register_forward_hook(self._keep)
        return self

    def _keep(self, module, inputs, output):
        self.output = output

    def __exit__(self, *exc):
        self._handle.remove()
        return False


def text_hidden_states(policy: Policy, token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-layer hidden states of plain text sequences (the ExpCoTs), right-padded. ([B, T, D], [B, T])"""
    T = max(1, max(len(t) for t in token_lists))
    ids = torch.full((len(token_lists), T), policy.pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(token_lists), T), dtype=torch.long)  # [B, T]
    for i, tokens in enumerate(token_lists):
        ids[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[i, :len(tokens)] = 1
    ids, mask = ids.to(policy.device), mask.to(policy.device)
    # Text only: 1-D positions are the right ones (no image, so mrope's three axes coincide).
    # Top-level forward (see completion_forward); one logit row is the cheapest the LM head allows.
    with capture_output(final_norm(policy)) as captured:
        policy.forward_module(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    return captured.output, mask  # [B, T, D], [B, T]


def sample_next(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float,
                forbidden_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row by inverse-CDF with the row's own uniform; also return its log π (T = 1).

    logits [B, V], uniforms [B] in [0, 1). temperature 0 → greedy. The returned log-prob is the policy's
    (temperature 1, forbidden tokens masked), which is what the objective's ratio and KL use.
    """
    logp = masked_log_softmax(logits, forbidden_ids)  # [B, V]
    if temperature == 0:
        tokens = logp.argmax(-1)  # [B]
    else:
        probs = torch.softmax(logp.double() / temperature, dim=-1)  # [B, V]
        cdf = probs.cumsum(-1)  # [B, V]
        # strictly below the total mass, so the draw never falls past the last token with mass
        target = (uniforms.double() * cdf[:, -1]).clamp(max=cdf[:, -1] * (1 - 1e-12))  # [B]
        tokens = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)  # [B]
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def sample_completions(policy: Policy, prompts: list[EncodedPrompt], seeds: list[int], max_new_tokens: int,
                       temperature: float = 1.0, with_states: bool = False) -> list[tuple]:
    """Sample one completion per prompt; each row stops after its first end token.

    Returns, per row, (token ids up to and including the first end token, their log π at sampling), plus,
    with `with_states`, the last-layer states AT those tokens ([C_i, D], what completion_forward's
    `hidden` holds, read off the KV-cache steps instead of a second forward: token j's state comes from
    the step that feeds token j, and one extra step feeds the last tokens).
    A row that reaches max_new_tokens without an end token is returned as is (truncated).
    """
    batch = collate(policy, prompts)
    B, model = len(prompts), policy.model
    end_ids = torch.tensor(policy.end_ids, device=policy.device)
    uniforms = torch.stack([  # [B, max_new_tokens]: one private stream per completion
        torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        for s in seeds
    ]).to(policy.device)
    positions = rope_positions(policy, batch)  # [3, B, P]
    next_position = positions.amax(dim=(0, 2)) + 1  # [B]: text continues after the prompt's last position
    out = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions,
        pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
        mm_token_type_ids=batch.mm_token_type_ids, use_cache=True, logits_to_keep=1,
    )
    attention_mask = batch.attention_mask  # [B, P]
    tokens_out, logps_out, states_out = [], [], []
    done = torch.zeros(B, dtype=torch.bool, device=policy.device)  # [B]

    def feed(tokens: torch.Tensor, t: int):
        """One KV-cache step: feed this step's tokens (position P + t) and keep their states if asked."""
        nonlocal attention_mask
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)  # [B, P+t+1]
        step_positions = (next_position + t).view(1, B, 1).expand(3, B, 1)  # [3, B, 1]
        with capture_output(final_norm(policy)) if with_states else nullcontext() as captured:
            step_out = model(input_ids=tokens.unsqueeze(1), attention_mask=attention_mask,
                             position_ids=step_positions, cache=out.cache, use_cache=True)
        if with_states:
            states_out.append(captured.output[:, -1])  # [B, D]: the state AT the token just fed
        return step_out

    for t in range(max_new_tokens):
        tokens, logps = sample_next(out.logits[:, -1], uniforms[:, t], temperature, policy.forbidden_ids)  # [B]
        tokens_out.append(tokens)
        logps_out.append(logps)
        done |= torch.isin(tokens, end_ids)
        if bool(done.all()) or t == max_new_tokens - 1:
            if with_states:
                feed(tokens, t)  # the last tokens' states (their logits are not needed)
            break
        out = feed(tokens, t)
    tokens = torch.stack(tokens_out, dim=1).tolist()  # [B, C]
    logps = torch.stack(logps_out, dim=1).tolist()  # [B, C]
    rows = [cut_at_end(tok, lp, policy.end_ids) for tok, lp in zip(tokens, logps)]
    if not with_states:
        return rows
    states = torch.stack(states_out, dim=1)  # [B, C, D]
    return [(tok, lp, states[i, :len(tok)].clone()) for i, (tok, lp) in enumerate(rows)]


def cut_at_end(tokens: list[int], logps: list[float], end_ids: list[int]) -> tuple[list[int], list[float]]:
    """Keep tokens up to and including the first end token (never judged by `id != pad`)."""
    for j, tok in enumerate(tokens):
        if tok in end_ids:
            return tokens[:j + 1], logps[:j + 1]
    return tokens, logps
