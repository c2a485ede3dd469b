"""Supervised format warm-up, for the tiny model only (on by default for `tiny`, off for Qwen Instruct).

A randomly initialised model never writes `<think>…</think><answer>…</answer><class>…</class>`, so every
outcome reward would be 0 and every GRPO group would have zero spread: RL would have nothing to learn
from. A few hundred cross-entropy steps on short completions written from the training samples (a one
line reasoning, the true intervals, the true class) teach the format. The Qwen Instruct checkpoints
follow the format from the prompt alone, as in the paper, so they skip this.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from timerpo.algorithm import Prompt
from timerpo.policy import Policy
from timerpo.prompt import format_completion
from timerpo.rollout import collate, completion_forward

# A short reasoning per class keeps warm-up completions at ~40-70 tokens, which the tiny model's
# rollouts can afford; it names what the plot shows, not the answer's numbers.
SHORT_REASONING = {
    "global point": "Some values jump far outside the usual range of the series.",
    "contextual point": "A stretch breaks the regular wave with irregular values.",
    "seasonal": "The oscillation speeds up or slows down for a while.",
    "trend": "The level drifts with a much steeper slope for a while.",
    "shapelet": "A window shows a waveform unlike the rest of the series.",
    "normal": "The pattern stays regular from start to end.",
}


def warmup_completion(sample) -> str:
    """The supervised target for one sample: short reasoning, the true intervals, the true class."""
    return format_completion(SHORT_REASONING[sample.label], sample.intervals, sample.label)


def supervised_warmup(policy: Policy, prompts: list[Prompt], steps: int, batch_size: int, lr: float,
                      seed: int, progress: bool = True) -> list[float]:
    """Minimise −mean log π(target token) over the completion tokens (end token included). Returns losses."""
    end = policy.tokenizer.convert_ids_to_tokens(policy.end_ids[0])
    targets = {p.index: policy.tokenizer(warmup_completion(p.sample) + end, add_special_tokens=False)["input_ids"]
               for p in prompts}
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(seed)
    losses = []
    policy.model.train()
    bar = tqdm(range(steps), desc="warm-up", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        picks = torch.randint(len(prompts), (batch_size,), generator=order).tolist()
        batch_prompts = [prompts[i] for i in picks]
        batch = collate(policy, [p.encoded for p in batch_prompts], [targets[p.index] for p in batch_prompts])
        logprobs, _, _ = completion_forward(policy, batch)  # [b, C]
        mask = batch.completion_mask.float()  # [b, C]
        loss = -(logprobs * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    policy.model.eval()
    return losses

