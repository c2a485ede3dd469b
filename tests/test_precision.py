"""bf16 with fp32 master weights (timerpo/precision.py), checked on CPU with the tiny model.

The rollout samples with a bf16 copy of the weights; the update computes under bf16 autocast over the fp32
master weights. The two are different bf16 computations of the same model, so they agree only to bf16
precision; the tolerances below are stated against what fp32 gives on the same batch (≤ 1e-4) and were set
with a margin over the largest differences measured here (log-probs ≈ 0.05, states ≈ 2 % of their scale).
"""
import copy

import pytest
import torch
from PIL import Image, ImageDraw

from timerpo.algorithm import Episode, Prompt, update_policy
from timerpo.policy import encode_prompt
from timerpo.precision import setup_precision, sync_rollout_weights
from timerpo.rollout import collate, completion_forward, completion_seed, sample_completions

BF16_LOGPROB_TOL = 0.15  # absolute, per token (log-probs of the tiny model's ~1k-token vocabulary)
BF16_STATE_TOL = 0.05  # relative to the largest state entry of the row


def plot(k: int) -> Image.Image:
    img = Image.new("RGB", (1008, 140), "white")
    ImageDraw.Draw(img).line([(0, 70), (500, 30 + 11 * k), (1007, 90)], fill="steelblue", width=2)
    return img


@pytest.fixture(scope="module")
def bf16_policy(tiny_policy):
    pol = copy.copy(tiny_policy)
    pol.model = copy.deepcopy(tiny_policy.model)
    bias = torch.zeros(pol.model.lm_head.out_features)
    bias[pol.end_ids[0]] = 5.0  # completions of varied lengths
    pol.model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias.to(out.dtype))
    setup_precision(pol, torch.bfloat16)
    return pol


@pytest.fixture(scope="module")
def prompts(tiny_policy):
    return [encode_prompt(tiny_policy, plot(k), "Find the anomalies." + " Please." * k) for k in range(3)]


def test_bf16_means_fp32_masters_bf16_rollout_copy_and_autocast(bf16_policy):
    assert all(p.dtype == torch.float32 for p in bf16_policy.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in bf16_policy.rollout_model.parameters())
    assert all(b.dtype == torch.float32 for b in bf16_policy.rollout_model.buffers())  # rotary frequencies
    assert bf16_policy.autocast_dtype == torch.bfloat16 and bf16_policy.sampler is bf16_policy.rollout_model


def test_bf16_rollout_logprobs_and_states_match_the_update_forward(bf16_policy, prompts):
    rows = [prompts[k] for k in (0, 0, 1, 2, 2)]
    seeds = [completion_seed(5, 0, k, j) for j, k in enumerate((0, 0, 1, 2, 2))]
    outs = sample_completions(bf16_policy, rows, seeds, max_new_tokens=16, with_states=True)
    assert len({len(ids) for ids, _, _ in outs}) > 1
    batch = collate(bf16_policy, rows, [ids for ids, _, _ in outs])
    with torch.no_grad():
        logprobs, hidden, _ = completion_forward(bf16_policy, batch, with_hidden=True)  # autocast over fp32
    # autocast: matmuls in bf16; the residual stream and RMSNorm outputs stay fp32 (fp32 master weights)
    assert logprobs.dtype == torch.float32
    worst_lp = worst_state = 0.0
    for i, (ids, lps, states) in enumerate(outs):
        assert states.dtype == torch.bfloat16
        worst_lp = max(worst_lp, (logprobs[i, :len(ids)] - torch.tensor(lps)).abs().max().item())
        ref = hidden[i, :len(ids)].float()
        worst_state = max(worst_state, ((states.float() - ref).abs().max() / ref.abs().max()).item())
    assert worst_lp <= BF16_LOGPROB_TOL, worst_lp
    assert worst_state <= BF16_STATE_TOL, worst_state


def test_update_keeps_fp32_masters_and_refreshes_the_rollout_copy(bf16_policy, prompts, tiny_data):
    pol = copy.copy(bf16_policy)
    pol.model = copy.deepcopy(bf16_policy.model)
    setup_precision(pol, torch.bfloat16)
    prompt = Prompt(index=0, sample=None, encoded=prompts[0], target_text="")
    eps = [Episode(prompt=prompt, group=0, completion_ids=[40 + k, 2], sample_logprobs=[0.0, 0.0], text="",
                   finished=True, advantage=a) for k, a in enumerate((1.0, -1.0))]
    before = [p.detach().clone() for p in pol.model.parameters()]
    stats = update_policy(pol, torch.optim.SGD(pol.model.parameters(), lr=0.1), eps, micro_batch=2, clip_eps=0.2,
                          beta=0.0, entropy_coef=0.0, max_grad_norm=1e9)
    assert not stats["skipped"]
    assert all(p.dtype == torch.float32 for p in pol.model.parameters())
    moved = [(p - b).abs().max().item() for p, b in zip(pol.model.parameters(), before)]
    assert max(moved) > 1e-3
    for mine, master in zip(pol.rollout_model.parameters(), pol.model.parameters()):
        assert torch.equal(mine, master.to(torch.bfloat16))  # sync_rollout_weights ran after the step
    sync_rollout_weights(pol)  # idempotent
