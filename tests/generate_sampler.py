"""A second sampler, written apart from timerpo/rollout.py: transformers' own `generate` (its KV cache, its 3-D
positions, its batching and stopping), steered to draw every token by inverse CDF with the completion's own
uniforms, the sampling rule timerpo/rollout.py documents. Given the same seeds it must write the same
completions. tests/test_bench.py hands it to bench/bench_rollout.py as the earlier checkout's rollout.py."""
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList


class InverseCdfDraw(LogitsProcessor):
    """Replaces the scores of decode step t by a one-hot on the token that row's uniform t draws from
    π(· | context) at temperature 1, vision tokens excluded; greedy decoding then picks that token."""

    def __init__(self, uniforms: torch.Tensor, prompt_len: int, forbidden_ids: list[int]):
        self.uniforms, self.prompt_len, self.forbidden = uniforms, prompt_len, forbidden_ids  # [B, T] float64

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1] - self.prompt_len
        logits = scores.double().clone()  # [B, V]
        logits[:, self.forbidden] = -float("inf")
        cdf = torch.softmax(logits, dim=-1).cumsum(-1)  # [B, V]
        target = (self.uniforms[:, t] * cdf[:, -1]).clamp(max=cdf[:, -1] * (1 - 1e-12))  # [B]
        tokens = torch.searchsorted(cdf, target.unsqueeze(-1), right=True)  # [B, 1]
        return torch.full_like(scores, -float("inf")).scatter(1, tokens, 0.0)


@torch.no_grad()
def sample_completions(policy, prompts, seeds, max_new_tokens, temperature=1.0, with_states=False):
    """timerpo.rollout.sample_completions' signature; rows are (token ids up to the first end token, None)
    (and None for the states): only the tokens are compared."""
    assert temperature == 1.0
    B, P = len(prompts), max(len(p.input_ids) for p in prompts)
    ids = torch.full((B, P), policy.pad_id, dtype=torch.long)  # [B, P], left-padded
    mask = torch.zeros((B, P), dtype=torch.long)  # [B, P]
    for i, p in enumerate(prompts):
        ids[i, P - len(p.input_ids):] = torch.tensor(p.input_ids)
        mask[i, P - len(p.input_ids):] = 1
    uniforms = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s),
                                       dtype=torch.float64) for s in seeds])  # [B, T]
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=policy.end_ids,
                              pad_token_id=policy.pad_id)
    draw = LogitsProcessorList([InverseCdfDraw(uniforms, P, policy.forbidden_ids)])
    out = policy.model.generate(input_ids=ids, attention_mask=mask,
                                pixel_values=torch.cat([p.pixel_values for p in prompts]),
                                image_grid_thw=torch.stack([p.image_grid_thw for p in prompts]),
                                mm_token_type_ids=(ids == policy.token_id("<|image_pad|>")).long(),
                                generation_config=config, logits_processor=draw)
    rows = []
    for row in out[:, P:].tolist():
        end = next((j for j, tok in enumerate(row) if tok in policy.end_ids), len(row) - 1)
        rows.append((row[:end + 1], None) + ((None,) if with_states else ()))
    return rows
