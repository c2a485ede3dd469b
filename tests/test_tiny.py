"""The embedded tiny policy: white-centred pixels, the normalisation kept through save/load, and a warm-up
that learns (a few supervised steps lower the loss on a fixed batch)."""
import os

import numpy as np
import torch
from PIL import Image

import data_gen
from timerpo.algorithm import Prompt
from timerpo.policy import encode_prompt, load_policy, save_policy
from timerpo.prompt import build_prompt
from timerpo.rollout import collate, completion_forward
from types import SimpleNamespace

from timerpo.prompt import format_completion
from timerpo.tiny import build_tiny_policy, build_tiny_tokenizer
from timerpo.warmup import (COLUMN_POS_WEIGHT, PlotHeads, attention_loss, boundary_columns, captured_attention,
                            column_edges, column_targets, copy_loss, snap_to_columns, supervised_warmup, warmup_completion)


def plot_prompt(policy, folder, sample, index=0):
    with Image.open(os.path.join(folder, sample.image)) as img:
        return Prompt(index=index, sample=sample, encoded=encode_prompt(policy, img, build_prompt(sample.length)),
                      target_text="")


def test_white_background_maps_to_zero(tiny_policy):
    white = Image.new("RGB", (1064, 140), (255, 255, 255))
    pix = encode_prompt(tiny_policy, white, "x").pixel_values  # [patches, 1176]
    assert pix.abs().max() == 0
    line = data_gen.render_series(np.sin(np.arange(1000) / 20.0), ylim=(-1.25, 1.25))
    drawn = encode_prompt(tiny_policy, line, "x").pixel_values
    # steelblue (70, 130, 180) / 255 centred on 1 and scaled by 1 / 0.5
    expected = sorted((np.array([70, 130, 180]) / 255.0 - 1.0) / 0.5)
    values = np.unique(np.round(drawn.numpy(), 4))
    assert all(np.isclose(values, v, atol=1e-3).any() for v in expected)


def test_saved_folder_keeps_the_normalisation(tiny_policy, tiny_data, tmp_path):
    save_policy(tiny_policy, str(tmp_path / "model"))
    loaded = load_policy(str(tmp_path / "model"))
    assert tuple(loaded.image_processor.image_mean) == tuple(tiny_policy.image_processor.image_mean)
    assert tuple(loaded.image_processor.image_std) == tuple(tiny_policy.image_processor.image_std)
    sample = data_gen.load_samples(tiny_data, limit=1)[0]
    a = plot_prompt(tiny_policy, tiny_data, sample).encoded
    b = plot_prompt(loaded, tiny_data, sample).encoded
    assert torch.equal(a.pixel_values, b.pixel_values) and a.input_ids == b.input_ids


def test_whole_numbers_are_one_token_each_and_decode_back():
    """Every integer 0..L is one token and decodes to itself, alone and inside an answer; any other text
    (bigger numbers, decimals, leading zeros) still decodes to itself."""
    tok = build_tiny_tokenizer(data_gen.tokenizer_corpus(), whole_numbers=1000)
    for i in range(1001):
        ids = tok(str(i), add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.decode(ids) == str(i), i
    rng = np.random.default_rng(5)
    for _ in range(50):
        ends = sorted(rng.choice(1001, size=4, replace=False).tolist())
        answer = format_completion("", [ends[:2], ends[2:]], "seasonal")
        tokens = tok.convert_ids_to_tokens(tok(answer, add_special_tokens=False)["input_ids"])
        assert [t for t in tokens if t.isdigit()] == [str(e) for e in ends]
        text = format_completion("a dip at 0.52 of 12345 near 007", [ends[:2], ends[2:]], "seasonal")
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_digit_tokens_stay_the_default():
    tok = build_tiny_tokenizer(data_gen.tokenizer_corpus())
    assert tok.convert_ids_to_tokens(tok("1000", add_special_tokens=False)["input_ids"]) == ["1", "0", "0", "0"]


def test_saved_whole_number_policy_keeps_its_tokens(tmp_path):
    policy = build_tiny_policy(seed=0, numbers="whole")
    assert policy.model.config.text_config.vocab_size == len(policy.tokenizer)
    save_policy(policy, str(tmp_path / "model"))
    loaded = load_policy(str(tmp_path / "model"))
    text = "<answer>[[188, 356], [776, 1000]]</answer>"
    assert loaded.tokenizer(text)["input_ids"] == policy.tokenizer(text)["input_ids"]
    assert loaded.tokenizer.convert_ids_to_tokens(loaded.tokenizer(" 776")["input_ids"])[-1] == "776"


def batch_loss(policy, prompts):
    end = policy.tokenizer.convert_ids_to_tokens(policy.end_ids[0])
    targets = [policy.tokenizer(warmup_completion(p.sample) + end, add_special_tokens=False)["input_ids"]
               for p in prompts]
    with torch.no_grad():
        batch = collate(policy, [p.encoded for p in prompts], targets)
        logprobs, _, _ = completion_forward(policy, batch)
    mask = batch.completion_mask.float()
    return float(-(logprobs * mask).sum() / mask.sum())


def test_a_few_warmup_steps_lower_the_loss_on_a_fixed_batch(tiny_data):
    policy = load_policy("tiny", seed=3)  # its own copy: the warm-up changes the weights
    samples = data_gen.load_samples(tiny_data, limit=4)
    prompts = [plot_prompt(policy, tiny_data, s, i) for i, s in enumerate(samples)]
    before = batch_loss(policy, prompts)
    # Six Adam steps are not monotone on every seed: with lr 1e-3 and 1 or 2 threads, warm-up seeds 0, 1, 3 end
    # at 5.4-5.5 and seed 2's last step overshoots (7.4). The run is deterministic (the heads' init comes from
    # `seed`, not from the tests that ran before), so the seed is pinned.
    losses = supervised_warmup(policy, tiny_data, samples, steps=6, batch_size=4, lr=1e-3, seed=0,
                               vision_steps=2, aux_weight=1.0, progress=False)
    after = batch_loss(policy, prompts)
    assert len(losses) == 6 and after < 0.85 * before, (before, after)


def steps_of_touched_columns(intervals, length):
    """Brute force: every step whose pixel column (x(t) // 28) holds a step of some interval."""
    column = [int(data_gen.x_to_pixel(t, length) // data_gen.CELL) for t in range(length)]
    touched = {column[t] for s, e in intervals for t in range(s, e)}
    return {t for t in range(length) if column[t] in touched}


def steps_of(intervals):
    return {t for s, e in intervals for t in range(s, e)}


def test_snap_to_columns_covers_exactly_the_touched_columns():
    rng = np.random.default_rng(0)
    for length in (1000, 500):
        for _ in range(200):
            ends = sorted(rng.choice(length + 1, size=2 * rng.integers(1, 4), replace=False).tolist())
            intervals = [ends[i:i + 2] for i in range(0, len(ends), 2)]
            snapped = snap_to_columns(intervals, length)
            assert steps_of(snapped) == steps_of_touched_columns(intervals, length)
            assert all(a < b for a, b in snapped)
            assert all(snapped[i][1] < snapped[i + 1][0] for i in range(len(snapped) - 1))  # merged if touching


def test_snap_to_columns_keeps_odd_lengths_inside_the_series():
    rng = np.random.default_rng(1)
    for _ in range(200):
        length = int(rng.integers(64, 2000))
        s = int(rng.integers(0, length - 1))
        e = int(rng.integers(s + 1, length + 1))
        [[a, b]] = snap_to_columns([[s, e]], length)
        width = data_gen.CELL * length / data_gen.plot_box(data_gen.DEFAULT_WIDTH, data_gen.DEFAULT_HEIGHT)[2]
        assert 0 <= a <= s < e <= b <= length
        assert s - a <= width + 1 and b - e <= width + 1


def test_snapped_warmup_target_has_no_empty_interval():
    sample = data_gen.Sample(id="x", family="point", label="global point", length=1000, intervals=[[200, 201]],
                             series=[0.0] * 1000, image="", expcot="", gencot="")
    assert "[[188, 216]]" in warmup_completion(sample, snap=True)
    assert "[[200, 201]]" in warmup_completion(sample)


def pixel_column(step, length):
    return int(data_gen.x_to_pixel(step, length) // data_gen.CELL)


def test_boundary_columns_point_each_digit_at_its_ends_pixel_column(tiny_policy):
    """Oracle: the renderer's step-to-pixel map; a start s lies in column x(s) // 28, an end e (exclusive)
    in the column of its last step e − 1; every digit token of the number points there."""
    rng = np.random.default_rng(2)
    tok = tiny_policy.tokenizer
    for _ in range(100):
        ends = sorted(rng.choice(1001, size=2 * rng.integers(1, 4), replace=False).tolist())
        intervals = snap_to_columns([ends[i:i + 2] for i in range(0, len(ends), 2)], 1000)
        text = warmup_completion(SimpleNamespace(label="seasonal", intervals=intervals, length=1000))
        pointers = boundary_columns(text, tok, 1000)
        expected = [pixel_column(b if k == 0 else b - 1, 1000) for iv in intervals for k, b in enumerate(iv)
                    for _ in str(b)]
        assert [c for _, c in pointers] == expected
        ids = tok(text, add_special_tokens=False)["input_ids"]
        digits = "".join(tok.decode([ids[j]]) for j, _ in pointers)
        assert digits == "".join(str(b) for iv in intervals for b in iv)
    assert boundary_columns(warmup_completion(SimpleNamespace(label="normal", intervals=[], length=1000)),
                            tok, 1000) == []


def test_boundary_columns_point_each_whole_number_end_once():
    """With whole-number tokens every end is one token, pointed at its pixel column (same oracle as above)."""
    tok = build_tiny_tokenizer(data_gen.tokenizer_corpus(), whole_numbers=1000)
    rng = np.random.default_rng(4)
    for _ in range(100):
        ends = sorted(rng.choice(1001, size=2 * rng.integers(1, 4), replace=False).tolist())
        intervals = snap_to_columns([ends[i:i + 2] for i in range(0, len(ends), 2)], 1000)
        text = warmup_completion(SimpleNamespace(label="seasonal", intervals=intervals, length=1000))
        pointers = boundary_columns(text, tok, 1000)
        expected = [pixel_column(b if k == 0 else b - 1, 1000) for iv in intervals for k, b in enumerate(iv)]
        assert [c for _, c in pointers] == expected
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert [tok.decode([ids[j]]) for j, _ in pointers] == [str(b) for iv in intervals for b in iv]


def test_reasoning_with_positions_names_each_middle_and_points_it_at_its_pixel_column():
    """Oracle: the renderer's step-to-pixel map; a middle step t lies in column x(t) // 28. The answer's
    pointers are those of the reasoning without positions."""
    tok = build_tiny_tokenizer(data_gen.tokenizer_corpus(), whole_numbers=1000)
    rng = np.random.default_rng(5)
    for _ in range(100):
        ends = sorted(rng.choice(1001, size=2 * rng.integers(1, 4), replace=False).tolist())
        sample = SimpleNamespace(label="seasonal", intervals=[ends[i:i + 2] for i in range(0, len(ends), 2)],
                                 length=1000)
        intervals = snap_to_columns(sample.intervals, 1000)
        middles = [(s + e) // 2 for s, e in intervals]
        text = warmup_completion(sample, snap=True, positions=True)
        assert text.startswith("<think>") and " and ".join(map(str, middles)) + ".</think>" in text
        pointers = boundary_columns(text, tok, 1000)
        plain = boundary_columns(warmup_completion(sample, snap=True), tok, 1000)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        answer, reasoning = pointers[:len(plain)], pointers[len(plain):]
        assert [c for _, c in answer] == [c for _, c in plain]
        assert [c for _, c in reasoning] == [pixel_column(t, 1000) for t in middles]
        assert [tok.decode([ids[j]]) for j, _ in reasoning] == [str(t) for t in middles]
    normal = SimpleNamespace(label="normal", intervals=[], length=1000)
    assert warmup_completion(normal, positions=True) == warmup_completion(normal)


def test_plot_heads_number_target_by_hand():
    """Oracle: numpy. With `numbers`, the position term is w · CE of each visual token against its column's
    two edge numbers, ½ each, over the LM head's rows of the plot's edge numbers; a column's numbers are those
    snap_to_columns writes for a step inside it (column 0 lies left of the plot: 0 and 0)."""
    tok = build_tiny_tokenizer(data_gen.tokenizer_corpus(), whole_numbers=1000)
    lm_head = torch.nn.Linear(5, len(tok), bias=False).double()
    samples = [SimpleNamespace(family="point", intervals=[[300, 420]], length=1000),
               SimpleNamespace(family="trend", intervals=[], length=1000)]
    grids = torch.tensor([[1, 4, 6], [1, 6, 8]])  # 2 x 3 and 3 x 4 merged tokens
    tokens = torch.randn(6 + 12, 5, dtype=torch.float64)
    torch.manual_seed(1)
    with_numbers = PlotHeads(5, ["point", "trend"], 0.7, numbers=(lm_head, tok)).double()
    torch.manual_seed(1)
    without = PlotHeads(5, ["point", "trend"]).double()
    edges = column_edges(1000, 4)
    pairs = [(0, 0)] + [tuple(snap_to_columns([[int(edges[c].ceil()) + 1, int(edges[c].ceil()) + 2]], 1000)[0])
                        for c in range(1, 4)]
    total, start = 0.0, 0
    for _, r2, c2 in grids.tolist():
        rows, cols = r2 // 2, c2 // 2
        values = sorted({v for pair in pairs[:cols] for v in pair})  # the plot's own columns' numbers
        rows_W = lm_head.weight.detach().numpy()[tok.convert_tokens_to_ids([str(v) for v in values])]
        plot = tokens[start:start + rows * cols].numpy().reshape(rows, cols, 5)
        start += rows * cols
        named = log_softmax(plot @ rows_W.T)  # [rows, cols, len(values)]
        total += 0.7 * -np.mean([0.5 * named[r, c, values.index(pairs[c][0])]
                                 + 0.5 * named[r, c, values.index(pairs[c][1])]
                                 for r in range(rows) for c in range(cols)])
    got = (with_numbers.loss(tokens, grids, samples) - without.loss(tokens, grids, samples)).item()
    assert np.isclose(got, total / 2, rtol=1e-9)
    assert with_numbers.position is None and not any(p is lm_head.weight for p in with_numbers.parameters())


def test_attention_loss_is_minus_mean_log_mass_on_the_pointed_column():
    """Oracle: numpy over a hand-built batch (2 rows of 3 image columns, prompt of 10, image at 2..7)."""
    rng = np.random.default_rng(3)
    image_id, P, C, H = 99, 10, 4, 2
    ids = torch.zeros(2, P + C, dtype=torch.long)
    ids[:, 2:8] = image_id  # visual tokens, row-major: row 0 at 2, 3, 4; row 1 at 5, 6, 7
    batch = SimpleNamespace(input_ids=ids, prompt_len=P, image_grid_thw=torch.tensor([[1, 4, 6], [1, 4, 6]]))
    weights = torch.softmax(torch.tensor(rng.normal(size=(2, H, P + C, P + C))), -1)  # [B, H, T, T]
    pointers = [[(0, 1), (2, 2)], [(1, 0)]]  # (completion token, column)
    w = weights.numpy()
    terms = [np.log(w[0, 1, P - 1, [3, 6]].sum()), np.log(w[0, 1, P + 1, [4, 7]].sum()),
             np.log(w[1, 1, P, [2, 5]].sum())]
    got = attention_loss(weights, batch, pointers, image_id, head=1)
    assert np.isclose(float(got), -np.mean(terms))
    assert float(attention_loss(weights, batch, [[], []], image_id, head=1)) == 0.0


def test_captured_attention_leaves_the_forward_unchanged(tiny_policy, tiny_data):
    samples = data_gen.load_samples(tiny_data, limit=2)
    prompts = [plot_prompt(tiny_policy, tiny_data, s, i) for i, s in enumerate(samples)]
    completions = [tiny_policy.tokenizer(warmup_completion(p.sample, snap=True))["input_ids"] for p in prompts]
    batch = collate(tiny_policy, [p.encoded for p in prompts], completions)
    with torch.no_grad():
        plain, _, _ = completion_forward(tiny_policy, batch)
        with captured_attention(tiny_policy, layer=1) as seen:
            eager, _, _ = completion_forward(tiny_policy, batch)
    assert torch.allclose(plain, eager, atol=1e-4)
    T = batch.input_ids.shape[1]
    assert seen.output[1].shape == (2, 4, T, T)
    assert torch.allclose(seen.output[1].sum(-1), torch.ones(2, 4, T), atol=1e-5)
    assert tiny_policy.model.config._attn_implementation == "sdpa"


def test_pointing_loss_reaches_the_pointing_layer_and_restores_sdpa(tiny_data):
    policy = load_policy("tiny", seed=4)
    samples = [s for s in data_gen.load_samples(tiny_data) if s.intervals][:2]
    prompts = [plot_prompt(policy, tiny_data, s, i) for i, s in enumerate(samples)]
    texts = [warmup_completion(p.sample, snap=True) for p in prompts]
    batch = collate(policy, [p.encoded for p in prompts], [policy.tokenizer(t)["input_ids"] for t in texts])
    columns = [boundary_columns(t, policy.tokenizer, p.sample.length) for t, p in zip(texts, prompts)]
    with captured_attention(policy, layer=1) as seen:
        completion_forward(policy, batch)
    attention_loss(seen.output[1], batch, columns, policy.token_id("<|image_pad|>"), head=0).backward()
    layers = policy.model.model.language_model.layers
    assert layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0  # the pointed layer's queries learn
    assert layers[2].self_attn.q_proj.weight.grad is None  # layers after it play no part
    losses = supervised_warmup(policy, tiny_data, samples, steps=2, batch_size=2, lr=1e-3, seed=0, snap=True,
                               pointer_weight=1.0, progress=False)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert policy.model.config._attn_implementation == "sdpa"


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_plot_heads_loss_by_hand():
    """Oracle: numpy over two plots of 2 x 3 and 3 x 4 tokens; the position head adds w · CE of each token
    naming its own column (columns of a row-major grid), and without it the loss is the other two terms."""
    torch.manual_seed(0)
    samples = [SimpleNamespace(family="point", intervals=[[300, 420]], length=1000),
               SimpleNamespace(family="trend", intervals=[], length=1000)]
    grids = torch.tensor([[1, 4, 6], [1, 6, 8]])  # 14 px patches: 2 x 3 and 3 x 4 merged tokens
    tokens = torch.randn(6 + 12, 5, dtype=torch.float64)
    heads = PlotHeads(5, ["point", "trend"], position_weight=0.7).double()
    W = {k: v.detach().numpy() for k, v in heads.state_dict().items()}
    total, start = 0.0, 0
    for (_, r2, c2), sample in zip(grids.tolist(), samples):
        rows, cols = r2 // 2, c2 // 2
        plot = tokens[start:start + rows * cols].numpy().reshape(rows, cols, 5)
        start += rows * cols
        z = plot.mean(0) @ W["column.weight"][0] + W["column.bias"][0]  # [cols]
        y = column_targets(sample, cols).numpy()
        sig = 1 / (1 + np.exp(-z))
        total += -np.mean(COLUMN_POS_WEIGHT * y * np.log(sig) + (1 - y) * np.log(1 - sig))
        pooled = np.concatenate([plot.mean((0, 1)), plot.reshape(-1, 5).std(0, ddof=1)])
        fam = log_softmax(pooled @ W["family.weight"].T + W["family.bias"])
        total += -fam[heads.families.index(sample.family)]
        named = log_softmax(plot @ W["position.weight"].T + W["position.bias"])  # [rows, cols, 38]
        total += 0.7 * -np.mean([named[r, c, c] for r in range(rows) for c in range(cols)])
    got = heads.loss(tokens, grids, samples).item()
    assert np.isclose(got, total / 2, rtol=1e-10)
    without = PlotHeads(5, ["point", "trend"]).double()
    without.load_state_dict({k: v for k, v in heads.state_dict().items() if not k.startswith("position")})
    position = 0.7 * np.mean([-np.mean([log_softmax(tokens[a:b].numpy().reshape(r, c, 5) @ W["position.weight"].T
                                                    + W["position.bias"])[i, j, j] for i in range(r) for j in range(c)])
                              for a, b, r, c in ((0, 6, 2, 3), (6, 18, 3, 4))])
    assert np.isclose(without.loss(tokens, grids, samples).item(), total / 2 - position, rtol=1e-10)


def test_copy_loss_by_hand():
    """Oracle: numpy. 2 rows, T = 7, prompt of 4, 4 query heads over 2 key/value heads of 3 dims, D = 5,
    V = 6; head 3 reads key/value head 1; the RMSNorm is the identity-weighted x / rms(x)."""
    rng = np.random.default_rng(0)
    weights = torch.tensor(rng.dirichlet(np.ones(7), size=(2, 4, 7)))  # [B, H, T, T]
    values = torch.tensor(rng.normal(size=(2, 7, 6)))  # [B, T, KV·hd]
    o_proj = torch.nn.Linear(12, 5, bias=False).double()
    lm_head = torch.nn.Linear(5, 6, bias=False).double()
    norm = lambda x: x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()  # noqa: E731
    batch = SimpleNamespace(prompt_len=4, input_ids=torch.tensor([[9, 9, 9, 9, 2, 5, 1], [9, 9, 9, 9, 3, 0, 4]]))
    targets = [[(0, 7), (2, 9)], [(1, 3)]]  # (completion token index, column): tokens 2, 1 and 0
    got = copy_loss(weights, values, batch, targets, 3, o_proj, norm, lm_head).item()
    W, V, O, L = weights.numpy(), values.numpy(), o_proj.weight.detach().numpy(), lm_head.weight.detach().numpy()
    terms = []
    for i, j in ((0, 0), (0, 2), (1, 1)):
        q = 4 + j - 1
        read = W[i, 3, q] @ V[i, :, 3:6]  # head 3 -> kv head 1: dims 3..5
        added = O[:, 9:12] @ read  # head 3's slice of o_proj
        x = added / np.sqrt((added ** 2).mean() + 1e-6)
        terms.append(-log_softmax(L @ x)[batch.input_ids[i, 4 + j]])
    assert np.isclose(got, np.mean(terms), rtol=1e-10)
    assert copy_loss(weights, values, batch, [[], []], 3, o_proj, norm, lm_head).item() == 0
