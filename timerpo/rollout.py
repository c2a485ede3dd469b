"""Rollout: batching prompts, on-policy sampling with a KV cache, and the forward over prompt + completion.

Sampling is written out by hand instead of calling `generate` for three reasons that matter for RL:
  * every completion has its own random stream, seeded from (seed, step, prompt, sample), so what a
    completion is never depends on which other completions share its batch (or its rank);
  * the sampling distribution is exactly the one the training forward scores: temperature 1, no top-k,
    no top-p, vision tokens removed (`masked_log_softmax` is shared by both);
  * the 3-D (mrope) positions of the prompt are computed once and then continued, with no hidden state
    kept on the model between calls.

How a batch of completions is sampled (sample_completions), in order:
  1. prefill      the vision tower and the prompt run once per DISTINCT prompt (the G completions of a group
                  share theirs), with a growing cache;
  2. replicate    the prompt's keys and values are copied to each of its rows of a preallocated (static) KV
                  cache sized to the batch and prompt + max_new_tokens, and its text position to each row;
  3. decode       one token per row per step: sample (our own sampler) → feed (one forward of the text model
                  on [b, 1] tokens, which also gives the last-layer state TimerPO keeps);
  4. compact      when enough rows have finished, the unfinished ones are copied to the front of the cache and
                  the step runs on fewer rows (b, b/2, b/4, b/8: few shapes, so a compiled step stays few graphs).
The decode step can be compiled (`policy.compile_decode`; CUDA graphs on a GPU). If compiling or capturing
fails on the user's machine, sampling goes on with the eager step and says so in one line (Decoder.fall_back).
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm
from transformers import StaticCache

from timerpo.policy import EncodedPrompt, Policy
from timerpo.precision import autocast

# Forbidden tokens get a large negative logit rather than -inf, so that p·log p stays 0 (not NaN).
MASKED_LOGIT = -1e9
# The batch sizes the decode loop compacts to, as fractions of the starting batch (see Decoder.sizes).
COMPACT_FRACTIONS = (2, 4, 8)


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
    groups: list[int]  # [B]: which distinct prompt each row holds (rows of one group share one)


def completion_seed(seed: int, step: int, prompt_index: int, sample_index: int) -> int:
    """The sampling seed of one completion: a hash of where it sits in the run, not in the batch."""
    return int(np.random.SeedSequence([seed, step, prompt_index, sample_index]).generate_state(1)[0])


def distinct_prompts(prompts: list[EncodedPrompt]) -> tuple[list[int], list[int]]:
    """(first row of each distinct prompt, distinct index of every row); the same object is the same prompt.

    Example: [a, a, b, a] → ([0, 2], [0, 0, 1, 0]).
    """
    first: dict[int, int] = {}
    groups = [first.setdefault(id(p), len(first)) for p in prompts]
    firsts = [0] * len(first)
    for row in reversed(range(len(prompts))):
        firsts[groups[row]] = row
    return firsts, groups


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
        groups=distinct_prompts(prompts)[1],
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


class encode_images_once:
    """`with encode_images_once(model, batch):` the vision tower encodes each distinct image of the batch once.

    Rows of one group show the same image; inside the model's forward the tower gets only the first row of
    each group (a forward pre-hook) and its image embeddings are copied to the group's other rows (a forward
    hook). The backward adds the copies' gradients, which is what encoding the image once per row gives, at
    1/G of the cost. Hooks rather than a separate call: the tower must run inside the top-level forward,
    where DDP and FSDP expect it. No-op when every row holds its own prompt.
    """

    def __init__(self, model: torch.nn.Module, batch: Batch):
        self.visual, self.groups, self.handles = model.model.visual, batch.groups, []
        self.firsts = distinct_first_rows(batch.groups)
        patches = batch.image_grid_thw.prod(-1).tolist()  # [B] patch rows per image
        starts = np.concatenate([[0], np.cumsum(patches)])
        self.patch_rows = torch.cat([torch.arange(starts[r], starts[r + 1]) for r in self.firsts]).to(
            batch.pixel_values.device)  # [sum of the distinct images' patches]
        merge = self.visual.spatial_merge_size ** 2
        self.tokens = [patches[r] // merge for r in self.firsts]  # visual tokens per distinct image

    def __enter__(self):
        if len(self.firsts) < len(self.groups):
            self.handles = [self.visual.register_forward_pre_hook(self._distinct_inputs, with_kwargs=True),
                            self.visual.register_forward_hook(self._copy_to_rows)]
        return self

    def _distinct_inputs(self, module, args, kwargs):
        pixel_values, grid = (args[0], kwargs["grid_thw"]) if args else (kwargs["hidden_states"], kwargs["grid_thw"])
        kwargs = dict(kwargs, grid_thw=grid[self.firsts], hidden_states=pixel_values[self.patch_rows])
        return (), kwargs

    def _copy_to_rows(self, module, inputs, output):
        per_image = torch.split(output.pooler_output, self.tokens)  # distinct images' [n_i, D] embeddings
        output.pooler_output = torch.cat([per_image[g] for g in self.groups])  # [sum over rows, D]
        return output

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return False


def distinct_first_rows(groups: list[int]) -> list[int]:
    """The first row of each group, in group order: [0, 0, 1, 0] → [0, 2]."""
    firsts: dict[int, int] = {}
    for row, g in enumerate(groups):
        firsts.setdefault(g, row)
    return [firsts[g] for g in range(len(firsts))]


def completion_forward(policy: Policy, batch: Batch, with_hidden: bool = False, with_entropy: bool = False):
    """One forward over image + prompt + completion: per-token log-probs (and hidden states, entropy).

    Returns (logprobs [B, C], hidden [B, C, D] or None, entropy [B, C] or None). Hidden states are the
    last layer's, after the final norm, i.e. what the LM head sees; hidden[:, j] is the state AT
    completion token j (its own embedding in context), the one the OT aligns with ExpCoT token states.
    Only the C positions P-1 .. P+C-2 (each predicts a completion token) go through the LM head.
    The call goes through the model's top-level forward (`policy.forward_module`): that is the call DDP
    hooks to all-reduce gradients and FSDP hooks to gather the root's weights (embeddings, LM head).
    It runs in the policy's training precision (bf16 autocast over fp32 weights with --dtype bf16), and
    encodes each distinct image once (encode_images_once).
    """
    P, C = batch.prompt_len, batch.completion_mask.shape[1]
    scored = torch.arange(P - 1, P + C - 1, device=batch.input_ids.device)  # [C]
    with capture_output(final_norm(policy)) if with_hidden else nullcontext() as captured, autocast(policy), \
            encode_images_once(policy.model, batch):
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


@torch.no_grad()
def shared_prompt_logprobs(policy: Policy, prompts: list[EncodedPrompt], completions: list[list[int]]) -> torch.Tensor:
    """log π of every completion token, with each distinct prompt (image + prefix) run once. [B, C]

    The no-grad twin of completion_forward's log-probs (used for the KL reference): a prefill over the
    distinct prompts, their cache copied to each row, then one forward over the completions against it.
    Token 0 is scored by the prefill's last logits, tokens 1..C-1 by the completion forward's.
    """
    model = policy.sampler
    firsts, groups = distinct_prompts(prompts)
    full = collate(policy, prompts, completions)
    P, C = full.prompt_len, full.completion_mask.shape[1]
    out = prefill(policy, model, [prompts[i] for i in firsts])
    rows = torch.tensor(groups, device=full.input_ids.device)  # [B]
    logits = [out.logits[rows]]  # [B, 1, V]: predicts completion token 0
    if C > 1:
        out.cache.batch_select_indices(rows)  # [U, ...] → [B, ...] per layer
        positions = rope_positions(policy, full)[:, :, P:P + C - 1]  # [3, B, C-1]
        rest = model(input_ids=full.input_ids[:, P:P + C - 1], attention_mask=full.attention_mask[:, :P + C - 1],
                     position_ids=positions, cache=out.cache, use_cache=True)
        logits.append(rest.logits)  # [B, C-1, V]
    logp_all = masked_log_softmax(torch.cat(logits, dim=1), policy.forbidden_ids)  # [B, C, V]
    return logp_all.gather(-1, full.input_ids[:, P:].unsqueeze(-1)).squeeze(-1)  # [B, C]


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
    # Text only: 1-D positions are the right ones (no image, so mrope's three axes coincide). The text model
    # alone: no LM head at all (its output is the final norm's, the state the OT needs). No padding mask: the
    # padding is on the right, so under the causal mask alone a real token never sees it, and attention skips
    # the blocks above the diagonal (the same bits on real tokens as with the padding mask, tested; the states
    # of pad tokens differ and are masked out by the caller).
    out = policy.sampler.model.language_model(input_ids=ids, use_cache=False)
    return out.last_hidden_state, mask  # [B, T, D], [B, T]


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


# ----------------------------------------------------------------------------------------------------
# Sampling: prefill once per prompt, then a decode loop over a preallocated cache


@dataclass
class Prefill:
    """What the prompt forward leaves for decoding, one row per distinct prompt."""

    cache: object  # transformers DynamicCache: keys/values [U, kv_heads, P, head_dim] per layer
    logits: torch.Tensor  # [U, 1, V]: at the last prompt position (predicts completion token 0)
    attention_mask: torch.Tensor  # [U, P]
    next_position: torch.Tensor  # [U]: text position of completion token 0 (mrope continues after the prompt)


def prefill(policy: Policy, model: torch.nn.Module, prompts: list[EncodedPrompt]) -> Prefill:
    """Vision tower + prompt forward over distinct prompts, keeping the cache (step 1 of the module docstring)."""
    batch = collate(policy, prompts)
    positions = rope_positions(policy, batch)  # [3, U, P]
    out = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions,
        pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
        mm_token_type_ids=batch.mm_token_type_ids, use_cache=True, logits_to_keep=1,
    )
    return Prefill(cache=out.cache, logits=out.logits, attention_mask=batch.attention_mask.bool(),
                   next_position=positions.amax(dim=(0, 2)) + 1)


def decode_forward(model: torch.nn.Module, cache, tokens: torch.Tensor, positions: torch.Tensor,
                   mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of the text model: logits for the next token and the last-layer state AT the fed one.

    tokens [b, 1], positions [3, b, 1] (mrope: text tokens have equal t/h/w positions), mask [b, 1, 1, L]
    (True where a row may attend; left padding and not-yet-written slots are False). Returns ([b, V], [b, D]).
    The text model alone (no vision branch, no 3-D position logic): that is what makes it compilable.
    """
    out = model.model.language_model(input_ids=tokens, position_ids=positions, attention_mask=mask, cache=cache,
                                     use_cache=True)
    hidden = out.last_hidden_state[:, -1]  # [b, D]
    return model.lm_head(hidden), hidden


class Decoder:
    """A preallocated KV cache for up to `rows` completions of `length` tokens, and the decode step over it.

    Buffers per layer: keys and values [rows, kv_heads, length, head_dim], plus the attention mask
    [rows, length]. A batch of b rows uses the first b rows of the buffers (views, no copy), so compacting
    the batch is a copy of the unfinished rows to the front. With `compile`, the step is `torch.compile`d
    (CUDA graphs on a GPU: mode "reduce-overhead"); the buffers then stay allocated between calls
    (policy.decoder) so that the compiled graphs keep their addresses.
    """

    def __init__(self, model: torch.nn.Module, like: Prefill, rows: int, length: int, compile: bool):
        self.model, self.rows, self.length, self.compiled = model, rows, length, compile
        layer = like.cache.layers[0]
        _, heads, _, head_dim = layer.keys.shape
        device, dtype = layer.keys.device, layer.keys.dtype
        n_layers = len(like.cache.layers)
        self.keys = [torch.zeros(rows, heads, length, head_dim, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.mask = torch.zeros(rows, length, dtype=torch.bool, device=device)  # [rows, L]
        self.caches: dict[int, StaticCache] = {}
        self.step_fn = decode_forward
        if compile:
            mode = "reduce-overhead" if device.type == "cuda" else None
            try:
                self.step_fn = torch.compile(decode_forward, mode=mode, dynamic=False)
            except Exception as err:  # noqa: BLE001  (an optimization never ends a run)
                self.fall_back(err)

    def fall_back(self, err: Exception) -> None:
        """Run the decode step eagerly from now on, and say so in one line."""
        self.compiled, self.step_fn = False, decode_forward
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        tqdm.write(f"[compile] the compiled decode step failed ({type(err).__name__}: {reason}); sampling goes on "
                   f"in eager mode (the same numbers, slower; --compile off skips the attempt)", file=sys.stderr)

    def fits(self, model: torch.nn.Module, rows: int, length: int) -> bool:
        return model is self.model and rows <= self.rows and length <= self.length

    def cache(self, b: int) -> StaticCache:
        """A transformers StaticCache whose layers are views of the first b rows of the buffers (made once per b)."""
        if b not in self.caches:
            cache = StaticCache(config=self.model.config, max_cache_len=self.length)
            for layer, k, v in zip(cache.layers, self.keys, self.values):
                # what StaticLayer.lazy_initialization sets, on views of the shared buffers instead of new tensors
                layer.keys, layer.values = k[:b], v[:b]
                layer.device, layer.batch_size, layer.num_heads = k.device, b, k.shape[1]
                layer.k_head_dim = layer.v_head_dim = k.shape[-1]
                layer.cumulative_length = torch.zeros((), dtype=torch.long, device=k.device)
                layer.is_initialized = True
                if self.compiled:  # fixed addresses: what CUDA graphs replay against
                    for t in (layer.keys, layer.values, layer.cumulative_length):
                        torch._dynamo.mark_static_address(t)
            self.caches[b] = cache
        return self.caches[b]

    def start(self, pre: Prefill, groups: torch.Tensor) -> StaticCache:
        """Copy each row's prompt keys/values (row i holds distinct prompt groups[i]) into rows 0..b-1."""
        b, P = len(groups), pre.attention_mask.shape[1]
        for k, v, layer in zip(self.keys, self.values, pre.cache.layers):
            k[:b, :, :P] = layer.keys.index_select(0, groups)  # [b, H, P, d]
            v[:b, :, :P] = layer.values.index_select(0, groups)
        self.mask[:b] = False
        self.mask[:b, :P] = pre.attention_mask.index_select(0, groups)  # [b, P]
        return self.set_length(self.cache(b), P)

    @staticmethod
    def set_length(cache: StaticCache, filled: int) -> StaticCache:
        """Tell the cache that slots 0..filled-1 hold keys/values: the next step writes slot `filled`."""
        for layer in cache.layers:
            layer.cumulative_length.fill_(filled)
        return cache

    def compact(self, keep: torch.Tensor, filled: int) -> StaticCache:
        """Move rows `keep` (indices into the current rows) to the front; return the cache of len(keep) rows."""
        for buf in self.keys + self.values:
            buf[:len(keep)] = buf.index_select(0, keep)  # index_select copies first: overlapping rows are safe
        self.mask[:len(keep)] = self.mask.index_select(0, keep)
        return self.set_length(self.cache(len(keep)), filled)

    def step(self, cache: StaticCache, tokens: torch.Tensor, positions: torch.Tensor, slot: int):
        """Feed tokens [b] at text positions [b] into cache slot `slot`. Returns (logits [b, V], state [b, D])."""
        b = len(tokens)
        self.mask[:b, slot] = True
        mask = self.mask[:b, None, None, :]  # [b, 1, 1, L]
        positions = positions.view(1, b, 1).expand(3, b, 1)  # [3, b, 1]
        args = (self.model, cache, tokens.view(b, 1), positions, mask)
        if not self.compiled:
            return decode_forward(*args)
        try:
            return self.step_fn(*args)
        except Exception as err:  # noqa: BLE001  compilation or CUDA-graph capture failed on this machine
            self.fall_back(err)
            self.set_length(cache, slot)  # undo the cache advance of a call that failed part-way
            return decode_forward(*args)  # a real bug fails here again, and is raised

    @staticmethod
    def sizes(b: int) -> list[int]:
        """The batch sizes a run that starts with b rows may compact to, largest first: 64 → [32, 16, 8]."""
        return sorted({b // f for f in COMPACT_FRACTIONS if b // f >= 1}, reverse=True)


def decoder_for(policy: Policy, model: torch.nn.Module, pre: Prefill, rows: int, length: int) -> Decoder:
    """The decoder to sample with: the policy's kept one when it fits, else a new one (kept when compiled).

    A compiled decoder is kept on the policy so its CUDA graphs replay across calls; its length is rounded up
    to a multiple of 256 tokens so that calls with slightly different prompt lengths share it.
    """
    kept = policy.decoder
    if kept is not None and not kept.compiled:  # its compiled step failed (Decoder.fall_back): eager from now on
        policy.compile_decode, policy.decoder, kept = False, None, None
    if kept is not None and kept.fits(model, rows, length):
        return kept
    if not policy.compile_decode:
        return Decoder(model, pre, rows, length, compile=False)
    if kept is not None and kept.model is model:  # grow, never shrink: a larger request reallocates once
        rows = max(rows, kept.rows)
    policy.decoder = Decoder(model, pre, rows, -(-length // 256) * 256, compile=True)
    return policy.decoder


def kv_bytes_per_token(text_config, element_size: int) -> int:
    """KV-cache bytes per token of one completion: layers x (K, V) x kv_heads x head_dim x element size.

    Qwen2.5-VL-3B in bf16: 36 x 2 x 2 x 128 x 2 = 36,864 bytes (36 KiB).
    """
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return text_config.num_hidden_layers * 2 * text_config.num_key_value_heads * head_dim * element_size


def decode_bytes_per_row(text_config, length: int, element_size: int) -> int:
    """What one more row of the decode batch costs: its KV cache over `length` tokens, plus the sampler's
    per-row vocabulary-wide temporaries (logits, fp32 log-probs, fp64 probabilities and their running sum)."""
    return length * kv_bytes_per_token(text_config, element_size) + text_config.vocab_size * (2 + 4 + 8 + 8)


def rollout_batch_for_memory(completions: int, bytes_per_row: int, budget_bytes: float) -> int:
    """All `completions` at once when they fit in `budget_bytes`, else as many rows as fit (at least 1)."""
    return max(1, min(completions, int(budget_bytes // bytes_per_row)))


@torch.no_grad()
def sample_completions(policy: Policy, prompts: list[EncodedPrompt], seeds: list[int], max_new_tokens: int,
                       temperature: float = 1.0, with_states: bool = False, share_prefill: bool = True) -> list[tuple]:
    """Sample one completion per prompt; each row stops after its first end token.

    Returns, per row, (token ids up to and including the first end token, their log π at sampling), plus,
    with `with_states`, the last-layer states AT those tokens ([C_i, D], what completion_forward's
    `hidden` holds, read off the decode steps instead of a second forward: token j's state comes from
    the step that feeds token j, and one extra step feeds a row's last token).
    A row that reaches max_new_tokens without an end token is returned as is (truncated).
    Rows that pass the same prompt object share one prefill (`share_prefill=False`: one per row, the
    reference the tests compare against). Runs on `policy.sampler` (the bf16 rollout copy with --dtype bf16).
    """
    B, model, device = len(prompts), policy.sampler, policy.device
    end_ids = torch.tensor(policy.end_ids, device=device)
    uniforms = torch.stack([  # [B, max_new_tokens]: one private stream per completion
        torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        for s in seeds
    ]).to(device)
    firsts, groups = distinct_prompts(prompts) if share_prefill else (list(range(B)), list(range(B)))
    pre = prefill(policy, model, [prompts[i] for i in firsts])
    groups = torch.tensor(groups, device=device)  # [B]
    P = pre.attention_mask.shape[1]
    decoder = decoder_for(policy, model, pre, B, P + max_new_tokens)
    cache = decoder.start(pre, groups)
    next_position = pre.next_position.index_select(0, groups)  # [B]
    logits = pre.logits[:, -1].index_select(0, groups)  # [B, V]
    pre = None  # the distinct prompts' cache is in the decoder now

    tokens_out = torch.full((B, max_new_tokens), policy.pad_id, dtype=torch.long, device=device)  # [B, T]
    logps_out = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)  # [B, T]
    states_out = None  # [B, T, D], allocated at the first state
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)  # [B]: set when a row ends
    rows = torch.arange(B, device=device)  # [b]: the completion each decoder row holds
    live = torch.ones(B, dtype=torch.bool, device=device)  # [b]: decoder row still writing its completion
    sizes = Decoder.sizes(B)
    for t in range(max_new_tokens):
        tokens, logps = sample_next(logits, uniforms[rows, t], temperature, policy.forbidden_ids)  # [b]
        # rows that ended earlier (kept only to fill a compacted size) sample too; nothing of theirs is kept
        mine = rows[live]  # [n] completions that get this token
        tokens_out[mine, t] = tokens[live]
        logps_out[mine, t] = logps[live]
        ended = live & torch.isin(tokens, end_ids)  # [b]
        lengths[rows[ended]] = t + 1
        last = t == max_new_tokens - 1
        if not with_states and (last or bool((live & ~ended).sum() == 0)):
            break
        logits, hidden = decoder.step(cache, tokens, next_position[rows] + t, P + t)  # [b, V], [b, D]
        if with_states:
            if states_out is None:
                states_out = hidden.new_zeros(B, max_new_tokens, hidden.shape[-1])
            states_out[mine, t] = hidden[live]  # the state AT the token just fed
        live &= ~ended
        n_live = int(live.sum())
        if last or n_live == 0:
            break
        if sizes and n_live <= sizes[0]:  # compact: the live rows first, then ended rows up to the size
            size = min(s for s in sizes if s >= n_live)
            keep = torch.cat([live.nonzero().squeeze(1), (~live).nonzero().squeeze(1)])[:size]  # [size]
            cache = decoder.compact(keep, P + t + 1)
            rows, live, logits = rows[keep], live[keep], logits[keep]
            sizes = [s for s in sizes if s < size]
    lengths, tokens_out, logps_out = lengths.tolist(), tokens_out.tolist(), logps_out.tolist()
    out = [(tokens_out[i][:n], logps_out[i][:n]) for i, n in enumerate(lengths)]
    if with_states:
        return [(ids, lp, states_out[i, :len(ids)].clone()) for i, (ids, lp) in enumerate(out)]
    return out


def cut_at_end(tokens: list[int], logps: list[float], end_ids: list[int]) -> tuple[list[int], list[float]]:
    """Keep tokens up to and including the first end token (never judged by `id != pad`)."""
    for j, tok in enumerate(tokens):
        if tok in end_ids:
            return tokens[:j + 1], logps[:j + 1]
    return tokens, logps
