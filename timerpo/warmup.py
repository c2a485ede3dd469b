"""Supervised warm-up, for the tiny model only (on by default for `tiny`, off for Qwen Instruct).

A randomly initialised model never writes `<think>…</think><answer>…</answer><class>…</class>`, so every
outcome reward would be 0 and every GRPO group would have zero spread: RL would have nothing to learn
from. Cross-entropy steps on short completions written from the training samples (a one-line reasoning,
the true intervals, the true class) teach the format. The Qwen Instruct checkpoints follow the format from
the prompt alone, as in the paper, so they skip this.

The answer loss alone leaves the tiny model blind: its gradient reaches the vision tower only through
attention that starts out uniform over ~420 tokens, so the language model learns the answers' marginal
(`normal`, `[]`) and the visual tokens collapse to one vector. The warm-up therefore also has a
*plot-reading* target, on the training split only: two linear heads on the vision tower's output tokens
(discarded after the warm-up) predict, for every token column, whether its time steps overlap a true
interval, and, from the pooled tokens, the series' family. It runs alone for `vision_steps` (cheap: the
vision tower only), then beside the answer loss with weight `aux_weight`.
"""
from __future__ import annotations

import os

import torch
from PIL import Image
from tqdm import tqdm

import data_gen
from timerpo.algorithm import Prompt
from timerpo.policy import Policy, encode_prompt
from timerpo.prompt import build_prompt, format_completion
from timerpo.rollout import capture_output, collate, completion_forward

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
# Anomalous columns are ~6 % of all token columns; weighting them up keeps the column head from
# settling on "never".
COLUMN_POS_WEIGHT = 8.0


def warmup_completion(sample, snap: bool = False) -> str:
    """The supervised target for one sample: short reasoning, the true intervals (widened to whole token
    columns when `snap`), the true class."""
    intervals = snap_to_columns(sample.intervals, sample.length) if snap else sample.intervals
    return format_completion(SHORT_REASONING[sample.label], intervals, sample.label)


def column_edges(length: int, columns: int = data_gen.DEFAULT_WIDTH // data_gen.CELL) -> torch.Tensor:
    """Time step where each token column starts, and where the last one ends. [columns + 1], float

    Token column c covers pixels [28c, 28c + 28) of the plot, i.e. steps [x⁻¹(28c), x⁻¹(28c + 28)) with
    x the renderer's step-to-pixel map. Example (L = 1000, 1064 px wide): column 2 covers steps [20, 48).
    """
    left, _, plot_w, _ = data_gen.plot_box(data_gen.DEFAULT_WIDTH, data_gen.DEFAULT_HEIGHT)
    return (torch.arange(columns + 1, dtype=torch.float64) * data_gen.CELL - left) * length / plot_w


def snap_to_columns(intervals, length: int) -> list[list[int]]:
    """Each interval widened to the token columns it touches, clipped to [0, L); touching ones merged.

    Why (tiny warm-up only): a token column is the finest place the tiny model can see, so these are the
    answers it can learn to read off the plot. With true ends, a 5-step point anomaly asks for two nearly
    equal numbers and the tiny model learns to write `[[200, 200]]`, an empty (unparsable) interval.
    Example (L = 1000): [[728, 771]] → [[720, 776]]; [[10, 23], [30, 40]] → [[0, 48]].
    """
    edges = column_edges(length)  # [columns + 1]
    out: list[list[int]] = []
    for s, e in sorted(intervals):
        lo = max(0, int(edges[edges <= s].max().floor()))
        hi = min(length, int(edges[edges >= e].min().ceil()))
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


def column_targets(sample, columns: int) -> torch.Tensor:
    """1 for each token column whose time steps overlap one of the sample's intervals. [columns]"""
    edges = column_edges(sample.length, columns)  # [columns + 1]
    out = torch.zeros(columns)
    for s, e in sample.intervals:
        out[(edges[:-1] < e) & (edges[1:] > s)] = 1.0
    return out


class PlotHeads(torch.nn.Module):
    """The plot-reading target's two linear heads on the visual tokens; used in the warm-up only."""

    def __init__(self, dim: int, families: list[str]):
        super().__init__()
        self.families = list(families)
        self.column = torch.nn.Linear(dim, 1)
        self.family = torch.nn.Linear(2 * dim, len(families))

    def loss(self, tokens: torch.Tensor, grids: torch.Tensor, samples: list) -> torch.Tensor:
        """BCE of the column head (per token column, rows averaged) + CE of the family head (mean and std
        of the plot's tokens). tokens [sum of tokens, D] in image order, grids [B, 3] in 14 px patches."""
        total = tokens.new_zeros(())
        start = 0
        for grid, sample in zip(grids.tolist(), samples):
            rows, cols = grid[1] // 2, grid[2] // 2  # 2 x 2 patches merge into one token
            plot = tokens[start:start + rows * cols].view(rows, cols, -1)  # [rows, cols, D]
            start += rows * cols
            logits = self.column(plot.mean(0)).squeeze(-1)  # [cols]
            total = total + torch.nn.functional.binary_cross_entropy_with_logits(
                logits, column_targets(sample, cols), pos_weight=torch.tensor(COLUMN_POS_WEIGHT))
            pooled = torch.cat([plot.mean((0, 1)), plot.std((0, 1))])  # [2D]
            family = torch.tensor(self.families.index(sample.family))
            total = total + torch.nn.functional.cross_entropy(self.family(pooled)[None], family[None])
        return total / len(samples)


def warmup_prompt(policy: Policy, folder: str, samples: list, index: int) -> Prompt:
    """A training plot with the task prompt (no OT target: the warm-up has none)."""
    sample = samples[index]
    with Image.open(os.path.join(folder, sample.image)) as img:
        encoded = encode_prompt(policy, img, build_prompt(sample.length))
    return Prompt(index=index, sample=sample, encoded=encoded, target_text="")


def supervised_warmup(policy: Policy, folder: str, samples: list, steps: int, batch_size: int, lr: float,
                      seed: int, vision_steps: int = 0, aux_weight: float = 0.0, snap: bool = False,
                      progress: bool = True) -> list[float]:
    """`vision_steps` plot-reading steps (vision tower + heads), then `steps` steps of
    −mean log π(target token) over the completion tokens (end token included) + aux_weight · plot-reading
    loss. Batches are drawn with replacement from all of `samples`; `snap` widens the target intervals to
    whole token columns (snap_to_columns). Returns the answer losses."""
    end = policy.tokenizer.convert_ids_to_tokens(policy.end_ids[0])
    visual = policy.model.model.visual
    with torch.random.fork_rng(devices=[]):  # the heads' init comes from `seed`, not from whatever ran before
        torch.manual_seed(seed)
        heads = PlotHeads(policy.model.config.text_config.hidden_size, sorted({s.family for s in samples}))
    heads.to(policy.device)
    order = torch.Generator().manual_seed(seed)

    def draw() -> list[Prompt]:
        picks = torch.randint(len(samples), (batch_size,), generator=order).tolist()
        return [warmup_prompt(policy, folder, samples, i) for i in picks]

    policy.model.train()
    vision_opt = torch.optim.AdamW([*visual.parameters(), *heads.parameters()], lr=lr, weight_decay=0.0)
    for _ in tqdm(range(vision_steps), desc="warm-up (plot reading)", disable=not progress, dynamic_ncols=True):
        prompts = draw()
        batch = collate(policy, [p.encoded for p in prompts])
        tokens = merged_tokens(visual(batch.pixel_values, grid_thw=batch.image_grid_thw))  # [sum of tokens, D]
        loss = heads.loss(tokens, batch.image_grid_thw, [p.sample for p in prompts])
        step_optimizer(vision_opt, loss, policy)

    optimizer = torch.optim.AdamW([*policy.model.parameters(), *heads.parameters()], lr=lr, weight_decay=0.0)
    losses = []
    bar = tqdm(range(steps), desc="warm-up (answers)", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        prompts = draw()
        targets = [policy.tokenizer(warmup_completion(p.sample, snap) + end, add_special_tokens=False)["input_ids"]
                   for p in prompts]
        batch = collate(policy, [p.encoded for p in prompts], targets)
        with capture_output(visual) as seen:
            logprobs, _, _ = completion_forward(policy, batch)  # [b, C]
        mask = batch.completion_mask.float()  # [b, C]
        loss = -(logprobs * mask).sum() / mask.sum()
        losses.append(float(loss.detach()))
        if aux_weight > 0:
            tokens = merged_tokens(seen.output)  # [sum of tokens, D]
            loss = loss + aux_weight * heads.loss(tokens, batch.image_grid_thw, [p.sample for p in prompts])
        step_optimizer(optimizer, loss, policy)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    policy.model.eval()
    return losses


def merged_tokens(vision_output) -> torch.Tensor:
    """The vision tower's merged output tokens, all images concatenated. [sum of tokens, D]

    The model's forward splits `pooler_output` per image in place after the tower returns, so a hooked
    output may hold a tuple of per-image blocks by the time it is read.
    """
    tokens = getattr(vision_output, "pooler_output", vision_output)
    return torch.cat(tokens) if isinstance(tokens, (tuple, list)) else tokens


def step_optimizer(optimizer: torch.optim.Optimizer, loss: torch.Tensor, policy: Policy) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.model.parameters(), 1.0)
    optimizer.step()
