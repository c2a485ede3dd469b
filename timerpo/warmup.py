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

An optional *pointing* target (`pointer_weight`; on in the tiny preset) asks one attention head of the language
model to look, at every position that writes a token of an answer boundary, at the plot column that
boundary lies in: a column is where the tiny model has to read a position off the plot, and the answer
loss alone never routes it there. An optional *column-position* head (`position_weight`) asks every visual
token to name its own column, so that what the pointing head copies says where it looked (method.md §18).
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from PIL import Image

import data_gen
from timerpo.algorithm import Prompt
from timerpo.policy import Policy, encode_prompt
from timerpo.progress import progress_bar
from timerpo.prompt import build_prompt, format_completion
from timerpo.rollout import capture_output, collate, completion_forward, final_norm

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


def warmup_completion(sample, snap: bool = False, positions: bool = False) -> str:
    """The supervised target for one sample: short reasoning, the true intervals (widened to whole token
    columns when `snap`), the true class. With `positions` the reasoning also names where the evidence is:
    the middle step of each target interval, a place on the plot written before the answer's ends."""
    intervals = snap_to_columns(sample.intervals, sample.length) if snap else sample.intervals
    reasoning = SHORT_REASONING[sample.label]
    if positions and intervals:
        middles = " and ".join(str((s + e) // 2) for s, e in intervals)
        reasoning = f"{reasoning[:-1]}, around step{'s' if len(intervals) > 1 else ''} {middles}."
    return format_completion(reasoning, intervals, sample.label)


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


def boundary_columns(completion: str, tokenizer, length: int) -> list[tuple[int, int]]:
    """(token index, token column) for each number token that names a place on the plot: in the <answer>
    block a start s points at the column whose left edge is nearest s, an end e at the column whose right
    edge is nearest e; in the <think> block a step t points at the column that holds t.

    These are the plot columns the model has to look at to write that token (the pointer target of
    `attention_loss`). Example (L = 1000, left edges 28c − 36): "<answer>[[20, 48]]</answer>" → the
    digit tokens of 20 point at column 2, those of 48 at column 2 too (its right edge is 48).
    """
    enc = tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)
    edges = column_edges(length)  # [columns + 1]
    columns = len(edges) - 1
    spans = []  # (character span of a number, its column)
    lo, hi = completion.find("<answer>"), completion.find("</answer>")
    if lo < 0 or hi < 0:
        return []
    for k, number in enumerate(re.finditer(r"\d+", completion[lo:hi])):
        value = float(number.group())
        nearest = int((edges - value).abs().argmin())
        column = min(max(nearest if k % 2 == 0 else nearest - 1, 0), columns - 1)
        spans.append(((lo + number.start(), lo + number.end()), column))
    think_lo, think_hi = completion.find("<think>"), completion.find("</think>")
    for number in re.finditer(r"\d+", completion[think_lo:think_hi] if 0 <= think_lo < think_hi else ""):
        column = min(max(int((edges <= float(number.group())).sum()) - 1, 0), columns - 1)
        spans.append(((think_lo + number.start(), think_lo + number.end()), column))
    return [(j, column) for span, column in spans
            for j, (a, b) in enumerate(enc["offset_mapping"]) if a >= span[0] and b <= span[1]]


@contextmanager
def captured_attention(policy: Policy, layer: int):
    """`with captured_attention(policy, k) as seen:` seen.output[1] is layer k's attention [B, H, T, T] after
    each forward. Switches the model to eager attention for the duration (sdpa never forms the weights)."""
    before = policy.model.config._attn_implementation
    policy.model.set_attn_implementation("eager")
    try:
        with capture_output(policy.model.model.language_model.layers[layer].self_attn) as seen:
            yield seen  # the attention module returns (output, weights)
    finally:
        policy.model.set_attn_implementation(before)


def attention_loss(weights: torch.Tensor, batch, targets: list[list[tuple[int, int]]], image_id: int,
                   head: int) -> torch.Tensor:
    """−mean log(attention mass of `head` on the pointed column's visual tokens), over every position that
    predicts a token of an answer boundary. weights [B, H, T, T]; targets from boundary_columns.

    One gather for all targets: indexing `weights` once per target would give its backward one full-size
    [B, H, T, T] gradient per target."""
    rows, queries, masks = [], [], []
    for i, pointers in enumerate(targets):
        if not pointers:
            continue
        image = (batch.input_ids[i] == image_id).nonzero().squeeze(-1)  # [rows * cols] in row-major order
        grid = image.view(batch.image_grid_thw[i, 1].item() // 2, -1)  # [rows, cols] sequence positions
        for j, column in pointers:
            rows.append(i)
            queries.append(batch.prompt_len - 1 + j)  # the position that predicts completion token j
            mask = torch.zeros(weights.shape[-1], dtype=weights.dtype, device=weights.device)
            masks.append(mask.index_fill_(0, grid[:, column], 1.0))
    if not rows:
        return weights.new_zeros(())
    attention = weights[rows, head, queries]  # [N, T]
    mass = (attention * torch.stack(masks)).sum(-1)  # [N]
    return -mass.clamp_min(1e-9).log().mean()


def copy_loss(weights: torch.Tensor, values: torch.Tensor, batch, targets: list[list[tuple[int, int]]], head: int,
              o_proj: torch.nn.Linear, norm: torch.nn.Module, lm_head: torch.nn.Linear) -> torch.Tensor:
    """−mean log π(boundary token | what `head` alone adds to the residual stream), over the positions that
    predict a token of an answer boundary: the pointing head's own output, through its slice of o_proj, the
    final norm and the LM head, must name the number written there.

    weights [B, H, T, T] (the layer's attention), values [B, T, KV·hd] (its v_proj output, KV heads shared
    by H / KV query heads each); targets from boundary_columns (only their token indices are used here)."""
    n_heads, hd = weights.shape[1], o_proj.in_features // weights.shape[1]
    kv = head // (n_heads // (values.shape[-1] // hd))  # the key/value head `head` reads
    rows = [i for i, pointers in enumerate(targets) for _ in pointers]
    cols = [batch.prompt_len + j for pointers in targets for j, _ in pointers]  # the boundary tokens' positions
    if not rows:
        return weights.new_zeros(())
    queries = torch.tensor(cols) - 1  # the positions that predict them
    attention = weights[rows, head, queries]  # [N, T]
    read = torch.bmm(attention[:, None], values[rows][..., kv * hd:(kv + 1) * hd]).squeeze(1)  # [N, hd]
    added = read @ o_proj.weight[:, head * hd:(head + 1) * hd].T  # [N, D]
    logits = lm_head(norm(added))  # [N, V]
    return torch.nn.functional.cross_entropy(logits, batch.input_ids[rows, cols])


class PlotHeads(torch.nn.Module):
    """The plot-reading target's linear heads on the visual tokens (column, family, and with `position_weight`
    the column-position head); used in the warm-up only."""

    def __init__(self, dim: int, families: list[str], position_weight: float = 0.0, numbers=None):
        super().__init__()
        self.families = list(families)
        self.column = torch.nn.Linear(dim, 1)
        self.family = torch.nn.Linear(2 * dim, len(families))
        # Optional third head: every visual token names its own token column (a value the language model's
        # pointing head can carry to the answer). Made last, so the other heads' init does not depend on it.
        # With `numbers` = (lm_head, tokenizer) it names the column's two edge numbers through the language
        # model's own output rows instead: what the pointing head copies is then already the number token.
        self.position_weight = position_weight
        self.numbers = numbers  # a tuple, so the LM head is not registered as one of these heads' parameters
        self._number_targets = {}  # (length, columns) → number_targets' result
        self.position = (torch.nn.Linear(dim, data_gen.DEFAULT_WIDTH // data_gen.CELL)
                         if position_weight > 0 and numbers is None else None)

    def loss(self, tokens: torch.Tensor, grids: torch.Tensor, samples: list) -> torch.Tensor:
        """BCE of the column head (per token column, rows averaged) + CE of the family head (mean and std
        of the plot's tokens) [+ position_weight · CE of each token naming its own column], averaged over the
        plots. tokens [sum of tokens, D] in image order, grids [B, 3] in 14 px patches."""
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
            if self.position is not None:
                named = self.position(plot).flatten(0, 1)  # [rows * cols, columns]
                own = torch.arange(cols).repeat(rows)  # [rows * cols], row-major like `plot`
                total = total + self.position_weight * torch.nn.functional.cross_entropy(named, own)
            elif self.numbers is not None and self.position_weight > 0:
                total = total + self.position_weight * self.number_loss(plot, sample.length)
        return total / len(samples)

    def number_loss(self, plot: torch.Tensor, length: int) -> torch.Tensor:
        """CE of every visual token against its column's two edge numbers (½ each), scored by the LM head's
        rows of all the edge numbers. plot [rows, cols, D]"""
        lm_head, _ = self.numbers
        ids, target = self.number_targets(length, plot.shape[1])  # [n], [cols, n]
        named = plot.flatten(0, 1) @ lm_head.weight.detach()[ids].T  # [rows * cols, n]
        return torch.nn.functional.cross_entropy(named, target.repeat(plot.shape[0], 1))

    def number_targets(self, length: int, columns: int) -> tuple[list[int], torch.Tensor]:
        """The token ids of the plot's edge numbers, and each column's target over them (½ on its start, ½ on
        its end). [n], [columns, n]; made once per (length, columns), not at every step."""
        cache = self._number_targets
        if (length, columns) not in cache:
            starts, ends = column_numbers(length, columns)  # [columns] each
            values = sorted(set(starts) | set(ends))
            target = torch.zeros(columns, len(values))  # [columns, n]
            for c, (a, b) in enumerate(zip(starts, ends)):
                target[c, values.index(a)] += 0.5
                target[c, values.index(b)] += 0.5
            cache[length, columns] = (self.numbers[1].convert_tokens_to_ids([str(v) for v in values]), target)
        return cache[length, columns]


def column_numbers(length: int, columns: int) -> tuple[list[int], list[int]]:
    """The start and the end a snapped interval writes for each token column (snap_to_columns' rule, clipped
    to [0, L]: the columns left and right of the plot area name its first and last step)."""
    edges = column_edges(length, columns)  # [columns + 1]
    starts = [min(max(0, int(e.floor())), length) for e in edges[:-1]]
    ends = [min(max(0, int(e.ceil())), length) for e in edges[1:]]
    return starts, ends


def warmup_prompt(policy: Policy, folder: str, samples: list, index: int) -> Prompt:
    """A training plot with the task prompt (no OT target: the warm-up has none)."""
    sample = samples[index]
    with Image.open(os.path.join(folder, sample.image)) as img:
        encoded = encode_prompt(policy, img, build_prompt(sample.length))
    return Prompt(index=index, sample=sample, encoded=encoded, target_text="")


def supervised_warmup(policy: Policy, folder: str, samples: list, steps: int, batch_size: int, lr: float,
                      seed: int, vision_steps: int = 0, aux_weight: float = 0.0, snap: bool = False,
                      progress: bool = True, pointer_weight: float = 0.0, pointer_layer: int = 1,
                      pointer_head: int = 0, position_weight: float = 0.0, copy_weight: float = 0.0,
                      positions: bool = False, position_numbers: bool = False) -> list[float]:
    """`vision_steps` plot-reading steps (vision tower + heads), then `steps` steps of
    −mean log π(target token) over the completion tokens (end token included) + aux_weight · plot-reading
    loss (+ pointer_weight · attention_loss of head `pointer_head` in layer `pointer_layer`). Batches are
    drawn with replacement from all of `samples`; `snap` widens the target intervals to whole token columns
    (snap_to_columns); `positions` names each interval's middle step in the reasoning (warmup_completion);
    `position_numbers` makes the column-position head name numbers (PlotHeads.number_loss). Returns the answer
    losses."""
    end = policy.tokenizer.convert_ids_to_tokens(policy.end_ids[0])
    visual = policy.model.model.visual
    with torch.random.fork_rng(devices=[]):  # the heads' init comes from `seed`, not from whatever ran before
        torch.manual_seed(seed)
        heads = PlotHeads(policy.model.config.text_config.hidden_size, sorted({s.family for s in samples}),
                          position_weight, (policy.model.lm_head, policy.tokenizer) if position_numbers else None)
    heads.to(policy.device)
    order = torch.Generator().manual_seed(seed)

    def draw() -> list[Prompt]:
        picks = torch.randint(len(samples), (batch_size,), generator=order).tolist()
        return [warmup_prompt(policy, folder, samples, i) for i in picks]

    policy.model.train()
    vision_opt = torch.optim.AdamW([*visual.parameters(), *heads.parameters()], lr=lr, weight_decay=0.0)
    for _ in progress_bar(range(vision_steps), desc="warm-up (plot reading)", disable=not progress):
        prompts = draw()
        batch = collate(policy, [p.encoded for p in prompts])
        tokens = merged_tokens(visual(batch.pixel_values, grid_thw=batch.image_grid_thw))  # [sum of tokens, D]
        loss = heads.loss(tokens, batch.image_grid_thw, [p.sample for p in prompts])
        step_optimizer(vision_opt, loss, policy)

    optimizer = torch.optim.AdamW([*policy.model.parameters(), *heads.parameters()], lr=lr, weight_decay=0.0)
    losses = []
    bar = progress_bar(range(steps), desc="warm-up (answers)", disable=not progress)
    pointer = Pointer(pointer_weight, pointer_head, policy.token_id("<|image_pad|>"), pointer_layer, copy_weight)
    layer = policy.model.model.language_model.layers[pointer_layer].self_attn
    with captured_attention(policy, pointer_layer) if pointer_weight or copy_weight else nullcontext() as \
            pointer.attention, capture_output(layer.v_proj) if copy_weight else nullcontext() as pointer.values:
        for _ in bar:
            losses.append(answer_step(policy, optimizer, heads, draw(), end, snap, aux_weight, pointer,
                                      positions))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)  # shown with the next update
    policy.model.eval()
    return losses


@dataclass
class Pointer:
    """The optional pointing targets of the answer warm-up (each off at weight 0): `head` of layer `layer`
    should look at the plot column each boundary token names (attention_loss), and its own output should name
    that token (copy_loss)."""
    weight: float
    head: int
    image_id: int
    layer: int = 1
    copy_weight: float = 0.0  # weight of copy_loss: the head's own output must name the boundary's number
    attention: object = None  # captured_attention's record, set while the warm-up runs
    values: object = None  # the layer's v_proj output, captured while the warm-up runs with copy_weight


def answer_step(policy, optimizer, heads, prompts, end, snap, aux_weight, pointer: Pointer,
                positions: bool = False) -> float:
    """One answer warm-up step: answer loss + aux_weight · plot-reading loss (+ the pointing loss); returns
    the answer loss."""
    visual = policy.model.model.visual
    texts = [warmup_completion(p.sample, snap, positions) + end for p in prompts]
    targets = [policy.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    batch = collate(policy, [p.encoded for p in prompts], targets)
    with capture_output(visual) as seen:
        logprobs, _, _ = completion_forward(policy, batch)  # [b, C]
    mask = batch.completion_mask.float()  # [b, C]
    answer = -(logprobs * mask).sum() / mask.sum()
    loss = answer
    if aux_weight > 0:
        tokens = merged_tokens(seen.output)  # [sum of tokens, D]
        loss = loss + aux_weight * heads.loss(tokens, batch.image_grid_thw, [p.sample for p in prompts])
    if pointer.weight > 0 or pointer.copy_weight > 0:
        columns = [boundary_columns(t, policy.tokenizer, p.sample.length) for t, p in zip(texts, prompts)]
    if pointer.weight > 0:
        loss = loss + pointer.weight * attention_loss(pointer.attention.output[1], batch, columns, pointer.image_id,
                                                      pointer.head)
    if pointer.copy_weight > 0:
        o_proj = policy.model.model.language_model.layers[pointer.layer].self_attn.o_proj
        loss = loss + pointer.copy_weight * copy_loss(pointer.attention.output[1], pointer.values.output, batch,
                                                      columns, pointer.head, o_proj, final_norm(policy),
                                                      policy.model.lm_head)
    step_optimizer(optimizer, loss, policy)
    return float(answer.detach())


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
