"""Rollout mechanics on the tiny model: log-prob parity, padding, early ends, seeds, forbidden tokens."""
import copy

import pytest
import torch
from PIL import Image, ImageDraw

from timerpo import rollout
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


# -- prefill once per prompt ---------------------------------------------------------------------------

def group_rows(prompts, layout):
    """Rows holding the SAME prompt objects in a given order, e.g. [0, 0, 1, 1] (two groups of two)."""
    return [prompts[k] for k in layout]


@pytest.mark.parametrize("layout", [[0, 0, 0, 1, 1, 1], [0, 1, 0, 1, 2, 2], [3, 2, 2, 3, 3, 0, 1, 1], [1, 1]])
def test_shared_prefill_equals_one_prefill_per_completion(end_biased, prompts, layout):
    """Completions, log-probs and kept states with one prefill per distinct prompt (its cache copied to the
    group's rows) equal those of one prefill per row. Groups contiguous, interleaved, uneven, one group; the
    end-biased model ends rows at different steps, so the batch is compacted on the way (8 → 4 → 2 → 1)."""
    rows = group_rows(prompts, layout)
    seeds = [completion_seed(4, 0, k, j) for j, k in enumerate(layout)]
    shared = sample_completions(end_biased, rows, seeds, max_new_tokens=20, with_states=True)
    alone = sample_completions(end_biased, rows, seeds, max_new_tokens=20, with_states=True, share_prefill=False)
    assert len({len(ids) for ids, _, _ in shared}) > 1 or len(rows) == 2
    for (ids_a, lp_a, st_a), (ids_b, lp_b, st_b) in zip(shared, alone):
        assert ids_a == ids_b
        assert max(abs(a - b) for a, b in zip(lp_a, lp_b)) <= 1e-5
        assert (st_a - st_b).abs().max() <= 1e-5 * st_b.abs().max()


@pytest.mark.parametrize("batch_size", [1, 2, 4, 5, 7])
def test_rollout_chunks_split_groups_without_changing_completions(end_biased, prompts, batch_size):
    """algorithm.rollout cuts the step's G x prompts completions into chunks of --rollout-batch, which may split
    a group across chunks; every chunk prefills its distinct prompts once. Same completions for every size."""
    from timerpo.algorithm import Prompt, rollout

    step_prompts = [Prompt(index=i, sample=None, encoded=p, target_text="") for i, p in enumerate(prompts[:2])]
    outs = rollout(end_biased, step_prompts, group_size=3, step=1, seed=9, max_new_tokens=12, batch_size=batch_size,
                   keep_states=True)
    expected = [sample_completions(end_biased, [p.encoded], [completion_seed(9, 1, p.index, k)], 12,
                                   with_states=True, share_prefill=False)[0]
                for p in step_prompts for k in range(3)]
    for ep, (ids, lps, states) in zip(outs, expected):
        assert ep.completion_ids == ids
        assert max(abs(a - b) for a, b in zip(ep.sample_logprobs, lps)) <= 1e-5
        assert (ep.states - states).abs().max() <= 1e-5 * states.abs().max()


def test_shared_prompt_logprobs_equal_the_full_forward(end_biased, prompts):
    """The reference forward's batching (distinct prompts once, then the completions against their cache)
    scores exactly what one forward over prompt + completion per row scores."""
    from timerpo.rollout import shared_prompt_logprobs

    rows = group_rows(prompts, [0, 0, 2, 2, 2, 1])
    outs = sample_completions(end_biased, rows, [completion_seed(2, 2, k, 0) for k in range(6)], max_new_tokens=16)
    completions = [ids for ids, _ in outs]
    with torch.no_grad():
        batch = collate(end_biased, rows, completions)
        expected, _, _ = completion_forward(end_biased, batch)  # [B, C]
    got = shared_prompt_logprobs(end_biased, rows, completions)  # [B, C]
    mask = batch.completion_mask.bool()
    assert (got - expected)[mask].abs().max() <= 1e-5


def test_update_forward_encodes_each_image_once_with_the_same_gradient(tiny_policy, prompts):
    """completion_forward runs the vision tower once per distinct image (encode_images_once); the log-probs and
    the gradient equal the forward where every row encodes its own copy of the image."""
    pol = copy.copy(tiny_policy)
    pol.model = copy.deepcopy(tiny_policy.model).train()
    shared = group_rows(prompts, [0, 0, 0, 1, 1])
    own = [copy.copy(p) for p in shared]  # distinct objects: no sharing
    completions = [[50, 61, 72], [83, 94], [55], [100, 111, 122], [40]]  # ordinary text tokens
    calls = []
    handle = pol.model.model.visual.register_forward_hook(lambda m, i, o: calls.append(o.last_hidden_state.shape[0]))
    grads = []
    for rows in (shared, own):
        pol.model.zero_grad(set_to_none=True)
        logprobs, _, _ = completion_forward(pol, collate(pol, rows, completions))
        (logprobs * collate(pol, rows, completions).completion_mask).sum().backward()
        grads.append((logprobs.detach(), torch.cat([p.grad.flatten() for p in pol.model.parameters()])))
    handle.remove()
    patches = prompts[0].pixel_values.shape[0]
    assert calls == [2 * patches, 5 * patches]  # two distinct images, then five
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5, rtol=0)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5, rtol=1e-4)


def test_text_states_without_padding_mask_are_the_padded_forwards_bits(tiny_policy):
    """text_hidden_states (the ExpCoT states) runs right-padded texts under the causal mask alone: on real tokens
    that is the same computation as with the padding mask, to the bit, and cheaper."""
    from timerpo.rollout import text_hidden_states

    g = torch.Generator().manual_seed(2)
    tokens = [torch.randint(10, 200, (n,), generator=g).tolist() for n in (5, 150, 37, 301, 64)]
    states, mask = text_hidden_states(tiny_policy, tokens)  # [B, T, D], [B, T]
    with torch.no_grad():
        ids = torch.full(mask.shape, tiny_policy.pad_id)
        for i, t in enumerate(tokens):
            ids[i, :len(t)] = torch.tensor(t)
        padded = tiny_policy.model.model.language_model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert mask.sum(1).tolist() == [len(t) for t in tokens]
    for i, t in enumerate(tokens):
        assert torch.equal(states[i, :len(t)], padded[i, :len(t)])


# -- compiled decode step --------------------------------------------------------------------------------

def test_compiled_decode_step_samples_what_the_eager_one_does(tiny_policy, prompts):
    """torch.compile'd decode step (Decoder with compile=True; CPU here, inductor): the same tokens for the same
    seeds, log-probs and states within 1e-4 of the eager step's (fp32). The random tiny model runs every row to
    the cap, so one batch size, one compilation."""
    pol = copy.copy(tiny_policy)
    pol.compile_decode, pol.decoder = True, None
    rows = [prompts[k] for k in (0, 1, 1, 2)]
    seeds = [completion_seed(8, 3, k, j) for j, k in enumerate((0, 1, 1, 2))]
    eager = sample_completions(tiny_policy, rows, seeds, max_new_tokens=10, with_states=True)
    compiled = sample_completions(pol, rows, seeds, max_new_tokens=10, with_states=True)
    assert pol.decoder is not None and pol.decoder.compiled  # kept on the policy for the next call
    for (ids_e, lp_e, st_e), (ids_c, lp_c, st_c) in zip(eager, compiled):
        assert ids_c == ids_e
        assert max(abs(a - b) for a, b in zip(lp_c, lp_e)) <= 1e-4
        assert (st_c - st_e).abs().max() <= 1e-4 * st_e.abs().max()
    again = sample_completions(pol, rows, seeds, max_new_tokens=10)  # reuses the kept decoder and its graph
    assert [ids for ids, _ in again] == [ids for ids, _, _ in eager]


def fails_when_called(*args, **kwargs):
    raise RuntimeError("injected: no working compiler here")


def runs_then_fails(*args, **kwargs):
    """A compiled step that gets part-way (the cache written and advanced) before it fails."""
    rollout.decode_forward(*args, **kwargs)
    raise RuntimeError("injected: CUDA graph capture failed")


@pytest.mark.parametrize("failure", ["torch.compile raises", "first call raises", "call fails part-way"])
def test_a_failing_compile_falls_back_to_eager_with_one_line(failure, end_biased, prompts, monkeypatch, capsys):
    """An optimization never ends a run: whatever way compiling fails, sampling goes on eagerly, gives the eager
    step's tokens, log-probs and states, says so once in one line, and does not try again."""
    if failure == "torch.compile raises":
        monkeypatch.setattr(torch, "compile", fails_when_called)
    else:
        broken = fails_when_called if failure == "first call raises" else runs_then_fails
        monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: broken)
    pol = copy.copy(end_biased)
    pol.compile_decode, pol.decoder = True, None
    rows = [prompts[k] for k in (0, 1, 1, 2)]
    seeds = [completion_seed(8, 3, k, j) for j, k in enumerate((0, 1, 1, 2))]
    eager = sample_completions(end_biased, rows, seeds, max_new_tokens=10, with_states=True)
    capsys.readouterr()
    fell_back = sample_completions(pol, rows, seeds, max_new_tokens=10, with_states=True)
    for (ids_e, lp_e, st_e), (ids_f, lp_f, st_f) in zip(eager, fell_back):
        assert ids_f == ids_e  # float rounding only: the kept decoder's cache is longer (rounded up to 256)
        assert max(abs(a - b) for a, b in zip(lp_f, lp_e)) <= 1e-5 and torch.allclose(st_f, st_e, atol=1e-5)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[compile]") and "eager mode" in err[0] and "injected" in err[0]
    again = sample_completions(pol, rows, seeds, max_new_tokens=10)
    assert [ids for ids, _ in again] == [ids for ids, _, _ in eager]
    assert not pol.compile_decode and capsys.readouterr().err == ""  # no second attempt, no second line


def test_rollout_batch_for_memory_counts_kv_bytes():
    """Qwen2.5-VL-3B's text config: 36 layers x (K, V) x 2 KV heads x 128 dims x 2 bytes = 36 KiB per token."""
    from types import SimpleNamespace

    from timerpo.rollout import decode_bytes_per_row, kv_bytes_per_token, rollout_batch_for_memory

    text = SimpleNamespace(num_hidden_layers=36, num_key_value_heads=2, num_attention_heads=16, hidden_size=2048,
                           vocab_size=151936)
    assert kv_bytes_per_token(text, 2) == 36 * 2 * 2 * 128 * 2 == 36864
    per_row = decode_bytes_per_row(text, 1436, 2)
    assert per_row == 1436 * 36864 + 151936 * 22
    assert rollout_batch_for_memory(640, per_row, 640 * per_row) == 640  # all of them fit
    assert rollout_batch_for_memory(640, per_row, 100.5 * per_row) == 100  # as many as fit
    assert rollout_batch_for_memory(640, per_row, 0.0) == 1  # never zero


# -- what the sampler draws ------------------------------------------------------------------------------

FAVOURED = [200, 300, 400, 500, 600, 700]  # ordinary text tokens of the tiny vocabulary


@pytest.fixture(scope="module")
def peaked(tiny_policy):
    """A copy of the tiny model whose LM head adds 8, 7.5, 7, 6.5, 6, 5 to six tokens, so that the first token
    of a completion falls on a handful of them (about 85 % of the mass) and the rest: few, well-filled bins."""
    pol = copy.copy(tiny_policy)
    pol.model = copy.deepcopy(tiny_policy.model).eval()
    bias = torch.zeros(pol.model.lm_head.out_features)
    bias[FAVOURED] = torch.tensor([8.0, 7.5, 7.0, 6.5, 6.0, 5.0])
    pol.model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    img = Image.new("RGB", (56, 56), "white")  # the smallest plot: 4 image tokens, a short prompt
    ImageDraw.Draw(img).line([(0, 40), (55, 10)], fill="steelblue", width=2)
    return pol, encode_prompt(pol, img, "Which token comes first?")


def first_token_logprobs(policy, enc) -> torch.Tensor:
    """log π of the first completion token, from transformers' own forward (it computes the 3-D positions
    itself from mm_token_type_ids): the oracle, independent of the rollout's prefill. [V] float64"""
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        out = policy.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=enc.pixel_values,
                           image_grid_thw=enc.image_grid_thw[None],
                           mm_token_type_ids=(ids == policy.token_id("<|image_pad|>")).long())
    logits = out.logits[0, -1].double()
    logits[policy.forbidden_ids] = -float("inf")
    return torch.log_softmax(logits, dim=-1)


def chi_square(tokens: list[int], probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's χ² of the drawn tokens against `probs`: one bin per token expected at least 5 times, one
    bin for all the others (merged into the smallest bin when it expects fewer than 5). (χ², degrees of freedom)"""
    n = len(tokens)
    counts = torch.bincount(torch.tensor(tokens), minlength=len(probs)).double()
    expected = n * probs
    big = (expected >= 5).nonzero().squeeze(1).tolist()
    observed, wanted = [counts[t].item() for t in big], [expected[t].item() for t in big]
    rest_observed, rest_wanted = n - sum(observed), n - sum(wanted)
    if rest_wanted >= 5:
        observed.append(rest_observed), wanted.append(rest_wanted)
    else:
        k = wanted.index(min(wanted))
        observed[k] += rest_observed
        wanted[k] += rest_wanted
    return sum((o - e) ** 2 / e for o, e in zip(observed, wanted)), len(observed) - 1


@pytest.mark.parametrize("temperature", [1.0, 0.4])
def test_tokens_are_drawn_from_the_distribution_the_sampler_reports(peaked, temperature):
    """2,000 first tokens, one per completion seed. Each reported log-prob is log π of its token under the
    independent forward (temperature 1, whatever the sampling temperature), and the token frequencies match
    π^(1/T) / Z: Pearson's χ² below its 0.999 quantile (p > 0.001; the seeds are fixed, so is the outcome:
    χ² = 3.2 on 6 degrees of freedom at T = 1, 9.4 on 4 at T = 0.4, against bounds 22.5 and 18.5).
    Temperature 1 goes through algorithm.rollout's default, the one train.rl_step samples with; 0.4 (the
    held-out evaluation's) through sample_completions."""
    from scipy import stats

    from timerpo.algorithm import Prompt, rollout

    policy, enc = peaked
    n = 2000
    if temperature == 1.0:
        episodes = rollout(policy, [Prompt(index=0, sample=None, encoded=enc, target_text="")], group_size=n,
                           step=0, seed=1, max_new_tokens=1, batch_size=n)
        draws = [(ep.completion_ids[0], ep.sample_logprobs[0]) for ep in episodes]
    else:
        seeds = [completion_seed(1, 0, 0, k) for k in range(n)]
        draws = [(ids[0], lps[0]) for ids, lps in sample_completions(policy, [enc] * n, seeds, 1, temperature)]
    logp = first_token_logprobs(policy, enc)  # [V]
    tokens = [t for t, _ in draws]
    reported = torch.tensor([lp for _, lp in draws], dtype=torch.float64)
    assert (reported - logp[tokens]).abs().max() <= 1e-4
    statistic, dof = chi_square(tokens, torch.softmax(logp / temperature, dim=-1))
    assert dof >= 4
    assert statistic < stats.chi2.ppf(0.999, dof), (statistic, dof)
