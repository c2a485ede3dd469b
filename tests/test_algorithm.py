"""The five TimerPO steps on the tiny model: reward alignment, exact accumulation, a full step."""
import copy

import pytest
import torch

import data_gen
from timerpo.algorithm import (Episode, Prompt, compute_advantages, forward_old, reference_logprobs, rollout,
                               score_outcomes, target_states, update_policy)
from timerpo.policy import encode_prompt
from timerpo.prompt import build_prompt, format_completion
from timerpo.reward import score_completion


@pytest.fixture(scope="module")
def prompts(tiny_policy, tiny_data):
    samples = data_gen.load_samples(tiny_data)
    picks = [0, 5, 9]
    out = []
    for i in picks:
        from PIL import Image
        with Image.open(f"{tiny_data}/{samples[i].image}") as img:
            enc = encode_prompt(tiny_policy, img, build_prompt(samples[i].length))
        out.append(Prompt(index=i, sample=samples[i], encoded=enc, target_text=samples[i].expcot))
    return out


def test_reward_row_i_belongs_to_completion_i(prompts):
    # Each completion is the exact answer for its own sample and (for the others) usually wrong.
    eps = [Episode(prompt=p, group=g, completion_ids=[1], sample_logprobs=[0.0], finished=True,
                   text=format_completion("r", p.sample.intervals, p.sample.label if p.sample.intervals else "normal"))
           for g, p in enumerate(prompts)]
    eps = eps + eps[::-1]  # the same texts in another order must keep their own scores
    score_outcomes(eps, "six-mean")
    for ep in eps:
        _, expected = score_completion(ep.text, ep.prompt.sample.intervals, ep.prompt.sample.label,
                                       ep.prompt.sample.length)
        assert ep.reward == expected
        assert ep.reward.total == pytest.approx(1.0)


def fresh(policy):
    pol = copy.copy(policy)
    pol.model = copy.deepcopy(policy.model)
    return pol


def test_accumulation_equals_one_big_batch(tiny_policy, prompts):
    eps = rollout(tiny_policy, prompts, group_size=2, step=0, seed=3, max_new_tokens=10, batch_size=6)
    forward_old(tiny_policy, eps, micro_batch=6)
    reference_logprobs(tiny_policy, eps, micro_batch=6)
    for k, ep in enumerate(eps):
        ep.advantage = [0.7, -0.4, 1.1, -1.2, 0.3, -0.5][k]
        ep.ref_logprobs = ep.ref_logprobs - 0.05 * (k + 1)  # a non-trivial KL term
    params = []
    for micro in (1, 4, 6):
        pol = fresh(tiny_policy)
        opt = torch.optim.SGD(pol.model.parameters(), lr=1.0)
        stats = update_policy(pol, opt, eps, micro, clip_eps=0.2, beta=0.1, entropy_coef=0.01, max_grad_norm=1e9)
        assert not stats["skipped"]
        params.append(torch.cat([p.detach().flatten() for p in pol.model.parameters()]))
    before = torch.cat([p.detach().flatten() for p in tiny_policy.model.parameters()])
    assert (params[0] - before).abs().max() > 1e-4  # the step did move the weights
    assert torch.allclose(params[0], params[2], atol=1e-6, rtol=0)
    assert torch.allclose(params[1], params[2], atol=1e-6, rtol=0)


def test_update_without_old_forward_equals_update_with_it(tiny_policy, prompts):
    """GRPO mode skips forward_old: the update's detached log-probs stand in for π_old. Same step either way."""
    eps = rollout(tiny_policy, prompts, group_size=2, step=4, seed=5, max_new_tokens=10, batch_size=6)
    reference_logprobs(tiny_policy, eps, micro_batch=6)
    for k, ep in enumerate(eps):
        ep.advantage = [0.9, -0.9, 0.4, -0.4, 1.3, -1.3][k]
        ep.ref_logprobs = ep.ref_logprobs + 0.03 * k  # a non-trivial KL term
    results = []
    for with_old in (False, True):
        for ep in eps:
            ep.old_logprobs = None
        if with_old:
            forward_old(tiny_policy, eps, micro_batch=6)
        pol = fresh(tiny_policy)
        stats = update_policy(pol, torch.optim.SGD(pol.model.parameters(), lr=1.0), eps, 4, clip_eps=0.2,
                              beta=0.1, entropy_coef=0.01, max_grad_norm=1e9)
        results.append((stats, torch.cat([p.detach().flatten() for p in pol.model.parameters()])))
    (s_none, p_none), (s_old, p_old) = results
    before = torch.cat([p.detach().flatten() for p in tiny_policy.model.parameters()])
    assert (p_old - before).abs().max() > 1e-4  # the step did move the weights
    assert torch.allclose(p_none, p_old, atol=1e-6, rtol=0)
    assert abs(s_none["loss"] - s_old["loss"]) < 1e-6 and s_none["clip_frac"] == s_old["clip_frac"] == 0.0


def test_non_finite_step_is_skipped(tiny_policy, prompts):
    eps = rollout(tiny_policy, prompts[:1], group_size=2, step=1, seed=3, max_new_tokens=6, batch_size=2)
    forward_old(tiny_policy, eps, micro_batch=2)
    for ep in eps:
        ep.advantage = float("nan")
    pol = fresh(tiny_policy)
    before = [p.detach().clone() for p in pol.model.parameters()]
    stats = update_policy(pol, torch.optim.AdamW(pol.model.parameters(), lr=1e-3), eps, 2, 0.2, 0.0, 0.0, 1.0)
    assert stats["skipped"]
    assert all(torch.equal(a, b) for a, b in zip(before, pol.model.parameters()))


def test_one_timerpo_step_end_to_end(tiny_policy, prompts):
    eps = rollout(tiny_policy, prompts, group_size=3, step=2, seed=0, max_new_tokens=8, batch_size=9)
    assert [ep.group for ep in eps] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    score_outcomes(eps, "six-mean")
    targets = target_states(tiny_policy, prompts, max_tokens=64)
    forward_old(tiny_policy, eps, micro_batch=4, targets=targets, grounding="ot")
    assert all(0.0 <= ep.grounding <= 2.0 for ep in eps)
    result = compute_advantages(eps, 3, mode="timerpo", alpha=0.3, norm="std", tau=0.5, grounding="ot")
    assert torch.isfinite(result.advantages).all()
    # Equal outcome rewards in a group (random model: all 0) → Â_main = 0, grounded term passes unchanged.
    pol = fresh(tiny_policy)
    stats = update_policy(pol, torch.optim.AdamW(pol.model.parameters(), lr=1e-4), eps, 4, 0.2, 0.0, 0.001, 1.0)
    assert not stats["skipped"] and stats["clip_frac"] == 0.0  # ρ ≡ 1 at the single update
