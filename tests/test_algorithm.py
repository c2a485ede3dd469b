"""The five TimerPO steps on the tiny model: reward alignment, exact accumulation, a full step."""
import copy

import pytest
import torch

import data_gen
from timerpo.algorithm import (Episode, Prompt, compute_advantages, ground_completions, grounding_values,
                               reference_logprobs, rollout, score_outcomes, target_states, update_policy)
from timerpo.objective import timerpo_objective
from timerpo.rollout import collate, completion_forward
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
    score_outcomes(eps, loc_mode="six-mean")
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
    reference_logprobs(tiny_policy, eps, micro_batch=6)
    for k, ep in enumerate(eps):
        ep.advantage = [0.7, -0.4, 1.1, -1.2, 0.3, -0.5][k]
        ep.ref_logprobs = ep.ref_logprobs - 0.05 * (k + 1)  # a non-trivial KL term
    params = []
    for micro in (1, 4, 6):
        pol = fresh(tiny_policy)
        opt = torch.optim.SGD(pol.model.parameters(), lr=1.0)
        stats = update_policy(pol, opt, eps, micro_batch=micro, clip_eps=0.2, beta=0.1, entropy_coef=0.01,
                              max_grad_norm=1e9)
        assert not stats["skipped"]
        params.append(torch.cat([p.detach().flatten() for p in pol.model.parameters()]))
    before = torch.cat([p.detach().flatten() for p in tiny_policy.model.parameters()])
    assert (params[0] - before).abs().max() > 1e-4  # the step did move the weights
    assert torch.allclose(params[0], params[2], atol=1e-6, rtol=0)
    assert torch.allclose(params[1], params[2], atol=1e-6, rtol=0)


def test_update_equals_the_objective_with_a_separate_old_forward(tiny_policy, prompts):
    """update_policy takes π_old from its own forward, detached (one update per rollout). The oracle is the
    textbook step: a separate no-grad forward for π_old, the objective on one batch, backward, SGD."""
    eps = rollout(tiny_policy, prompts, group_size=2, step=4, seed=5, max_new_tokens=10, batch_size=6)
    reference_logprobs(tiny_policy, eps, micro_batch=6)
    advantages = [0.9, -0.9, 0.4, -0.4, 1.3, -1.3]
    for k, ep in enumerate(eps):
        ep.advantage = advantages[k]
        ep.ref_logprobs = ep.ref_logprobs + 0.03 * k  # a non-trivial KL term
    pol = fresh(tiny_policy)
    stats = update_policy(pol, torch.optim.SGD(pol.model.parameters(), lr=1.0), eps, micro_batch=4, clip_eps=0.2,
                          beta=0.1, entropy_coef=0.01, max_grad_norm=1e9)
    ours = torch.cat([p.detach().flatten() for p in pol.model.parameters()])

    oracle = fresh(tiny_policy)
    batch = collate(oracle, [ep.prompt.encoded for ep in eps], [ep.completion_ids for ep in eps])
    C = batch.completion_mask.shape[1]
    with torch.no_grad():
        old, _, _ = completion_forward(oracle, batch)  # [B, C]
    ref = torch.zeros(len(eps), C)
    for i, ep in enumerate(eps):
        ref[i, :len(ep.ref_logprobs)] = ep.ref_logprobs
    oracle.model.train()
    logprobs, _, entropy = completion_forward(oracle, batch, with_entropy=True)  # [B, C]
    terms = timerpo_objective(logprobs, old, ref, entropy, torch.tensor(advantages), batch.completion_mask,
                              int(batch.completion_mask.sum()), clip_eps=0.2, beta=0.1, entropy_coef=0.01)
    terms.loss.backward()
    torch.optim.SGD(oracle.model.parameters(), lr=1.0).step()
    expected = torch.cat([p.detach().flatten() for p in oracle.model.parameters()])
    before = torch.cat([p.detach().flatten() for p in tiny_policy.model.parameters()])
    assert (expected - before).abs().max() > 1e-4  # the step did move the weights
    assert torch.allclose(ours, expected, atol=1e-6, rtol=0)
    assert abs(stats["loss"] - float(terms.loss.detach())) < 1e-6 and stats["clip_frac"] == 0.0


def test_grounding_from_rollout_states_equals_grounding_from_a_forward(tiny_policy, prompts):
    """Step 3 reads the states the rollout kept; W must be what a full forward's states give."""
    eps = rollout(tiny_policy, prompts, group_size=3, step=6, seed=2, max_new_tokens=12, batch_size=5,
                  keep_states=True)
    targets = target_states(tiny_policy, prompts, max_tokens=64)
    ground_completions(eps, targets, micro_batch=4, grounding="ot")
    assert all(ep.states is None for ep in eps)  # dropped once used
    batch = collate(tiny_policy, [ep.prompt.encoded for ep in eps], [ep.completion_ids for ep in eps])
    with torch.no_grad():
        _, hidden, _ = completion_forward(tiny_policy, batch, with_hidden=True)  # [N, C, D]
        rows = torch.tensor([ep.group for ep in eps])
        expected = grounding_values(hidden, batch.completion_mask, targets[0][rows], targets[1][rows], "ot",
                                    0.08, 50)  # [N]
    got = torch.tensor([ep.grounding for ep in eps], dtype=expected.dtype)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got, expected)


def test_non_finite_step_is_skipped(tiny_policy, prompts):
    eps = rollout(tiny_policy, prompts[:1], group_size=2, step=1, seed=3, max_new_tokens=6, batch_size=2)
    for ep in eps:
        ep.advantage = float("nan")
    pol = fresh(tiny_policy)
    before = [p.detach().clone() for p in pol.model.parameters()]
    stats = update_policy(pol, torch.optim.AdamW(pol.model.parameters(), lr=1e-3), eps, micro_batch=2, clip_eps=0.2,
                          beta=0.0, entropy_coef=0.0, max_grad_norm=1.0)
    assert stats["skipped"]
    assert all(torch.equal(a, b) for a, b in zip(before, pol.model.parameters()))


def test_one_timerpo_step_end_to_end(tiny_policy, prompts):
    eps = rollout(tiny_policy, prompts, group_size=3, step=2, seed=0, max_new_tokens=8, batch_size=9,
                  keep_states=True)
    assert [ep.group for ep in eps] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    score_outcomes(eps, loc_mode="six-mean")
    targets = target_states(tiny_policy, prompts, max_tokens=64)
    ground_completions(eps, targets, micro_batch=4, grounding="ot")
    assert all(0.0 <= ep.grounding <= 2.0 for ep in eps)
    result = compute_advantages(eps, group_size=3, mode="timerpo", alpha=0.3, norm="std", tau=0.5, grounding="ot")
    assert torch.isfinite(result.advantages).all()
    # Equal outcome rewards in a group (random model: all 0) → Â_main = 0, grounded term passes unchanged.
    pol = fresh(tiny_policy)
    stats = update_policy(pol, torch.optim.AdamW(pol.model.parameters(), lr=1e-4), eps, micro_batch=4, clip_eps=0.2,
                          beta=0.0, entropy_coef=0.001, max_grad_norm=1.0)
    assert not stats["skipped"] and stats["clip_frac"] == 0.0  # ρ ≡ 1 at the single update
