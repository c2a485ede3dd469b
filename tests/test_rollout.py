"""Rollout mechanics on the tiny model: log-prob parity, padding, early ends, seeds, forbidden tokens."""
import copy

import pytest
import torch
from PIL import Image, ImageDraw

from timerpo.policy import encode_prompt
from timerpo.rollout import collate, completion_forward, completion_seed, cut_at_end, sample_completions


def plot(k: int) -> Image.Image:
    img = Image.new("RGB", (1008, 140), "white")
    ImageDraw.Draw(img).line([(0, 70), (500, 20 + 9 * k), (1007, 100)], fill="steelblue", width=2)
    return img


@pytest.fixture(scope="module")
def prompts(tiny_policy):
    # Different prompt lengths force left padding; two image contents.
    return [encode_prompt(tiny_policy, plot(k % 2), "Find the anomalies." + " Please." * k) for k in range(4)]


@pytest.fixture()
def end_biased(tiny_policy):
    """A copy whose LM head favours the end token, so completions end early at varied lengths."""
    pol = copy.copy(tiny_policy)
    pol.model = copy.deepcopy(tiny_policy.model).eval()
    bias = torch.zeros(pol.model.lm_head.out_features)
    bias[pol.end_ids[0]] = 5.0
    pol.model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    return pol


def test_rollout_logprobs_equal_training_forward(end_biased, prompts):
    seeds = [completion_seed(1, 2, i, 0) for i in range(len(prompts))]
    outs = sample_completions(end_biased, prompts, seeds, max_new_tokens=24)
    lengths = [len(ids) for ids, _ in outs]
    assert len(set(lengths)) > 1, "want completions of different lengths (early ends)"
    assert any(ids[-1] in end_biased.end_ids and len(ids) < 24 for ids, _ in outs)
    assert len({len(p.input_ids) for p in prompts}) > 1, "want left padding"
    with torch.no_grad():
        batch = collate(end_biased, prompts, [ids for ids, _ in outs])
        logprobs, _, _ = completion_forward(end_biased, batch)
    for i, (ids, sampled) in enumerate(outs):
        assert batch.completion_mask[i].sum() == len(ids)
        diff = (logprobs[i, :len(ids)] - torch.tensor(sampled)).abs().max().item()
        assert diff <= 1e-4, f"row {i}: rollout vs forward log-prob differ by {diff}"


@pytest.mark.parametrize("ends", ["early ends", "all truncated"])
def test_rollout_states_equal_training_forward_states(end_biased, tiny_policy, prompts, ends):
    """The states TimerPO grounds with come from the KV-cache steps; they must be the forward's hidden[:, j],
    whether a row stopped at its end token or at max_new_tokens (the last state needs one extra step)."""
    policy, max_new = (end_biased, 20) if ends == "early ends" else (tiny_policy, 5)
    seeds = [completion_seed(3, 1, i, 2) for i in range(len(prompts))]
    outs = sample_completions(policy, prompts, seeds, max_new_tokens=max_new, with_states=True)
    lengths = [len(ids) for ids, _, _ in outs]
    assert len(set(lengths)) > 1 if ends == "early ends" else set(lengths) == {max_new}
    plain = sample_completions(policy, prompts, seeds, max_new_tokens=max_new)
    assert [ids for ids, _, _ in outs] == [ids for ids, _ in plain]  # asking for states changes no sample
    with torch.no_grad():
        batch = collate(policy, prompts, [ids for ids, _, _ in outs])
        _, hidden, _ = completion_forward(policy, batch, with_hidden=True)  # [B, C, D]
    for i, (ids, _, states) in enumerate(outs):
        assert states.shape == (len(ids), hidden.shape[-1])
        diff = (hidden[i, :len(ids)] - states).abs().max().item()
        scale = hidden[i, :len(ids)].abs().max().item()
        assert diff <= 1e-4 * scale, f"row {i}: rollout vs forward states differ by {diff} (scale {scale})"


def test_completion_depends_on_its_seed_not_its_batch(tiny_policy, prompts):
    seeds = [completion_seed(0, 5, i, 3) for i in range(len(prompts))]
    together = sample_completions(tiny_policy, prompts, seeds, max_new_tokens=12)
    alone = [sample_completions(tiny_policy, [p], [s], max_new_tokens=12)[0] for p, s in zip(prompts, seeds)]
    assert [a[0] for a in alone] == [t[0] for t in together]
    other = sample_completions(tiny_policy, prompts[:1], [completion_seed(0, 6, 0, 3)], max_new_tokens=12)
    assert other[0][0] != together[0][0]


def test_vision_tokens_are_never_sampled(tiny_policy, prompts):
    pol = copy.copy(tiny_policy)
    pol.model = copy.deepcopy(tiny_policy.model).eval()
    bias = torch.zeros(pol.model.lm_head.out_features)
    bias[pol.forbidden_ids] = 30.0  # unmasked, these would be sampled almost surely
    pol.model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    outs = sample_completions(pol, prompts, [7, 8, 9, 10], max_new_tokens=16)
    sampled = {t for ids, _ in outs for t in ids}
    assert not sampled & set(pol.forbidden_ids)
    assert all(len(ids) == 16 or ids[-1] in pol.end_ids for ids, _ in outs)


def test_mask_runs_to_first_end_token_inclusive():
    ids, lps = cut_at_end([5, 9, 2, 7, 2], [0.1, 0.2, 0.3, 0.4, 0.5], end_ids=[2])
    assert ids == [5, 9, 2] and lps == [0.1, 0.2, 0.3]
    assert cut_at_end([5, 9], [0.1, 0.2], end_ids=[2]) == ([5, 9], [0.1, 0.2])


def test_prompt_has_one_image_token_per_28px_cell(tiny_policy):
    enc = encode_prompt(tiny_policy, plot(0), "x")
    n = enc.input_ids.count(tiny_policy.token_id("<|image_pad|>"))
    assert n == (1008 // 28) * (140 // 28) == 180
    assert enc.pixel_values.shape[0] == 4 * n  # 2 x 2 patches merge into one token
