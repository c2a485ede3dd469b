"""The pure-bf16 AdamW (timerpo/optim.py) against independent oracles: stochastic rounding by brute force over
many draws (unbiased, always one of the two neighbouring bf16 numbers), and a step against torch.optim.AdamW
run in fp32 on the fp32 values of the same bf16 weights, moments and gradients."""
import pytest
import torch

from timerpo.optim import BF16AdamW, stochastic_round_bf16

DRAWS = 20_000


def neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 numbers just below and just above each x (both equal to x when x is a bf16 number), from
    torch's round-to-nearest and nextafter."""
    near = x.to(torch.bfloat16)
    up = torch.nextafter(near, torch.full_like(near, torch.inf)).float()
    down = torch.nextafter(near, torch.full_like(near, -torch.inf)).float()
    near = near.float()
    return torch.where(near <= x, near, down), torch.where(near >= x, near, up)


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, generator=gen) * torch.logspace(-30, 4, 12)  # both signs, 34 decades
    x[:3] = torch.tensor([1 + 0.1 * 2 ** -7, -(3 + 0.9 * 2 ** -6), 0.5 + 0.5 * 2 ** -8])  # near the ends, a tie
    below, above = neighbours(x)
    assert (below < x).all() and (x < above).all()  # none of them is a bf16 number already
    draws = stochastic_round_bf16(x.expand(DRAWS, -1), gen).float()  # [DRAWS, 12]
    assert ((draws == below) | (draws == above)).all()
    # unbiased means P(above) = (x − below) / (above − below); brute force over the draws
    expected = ((x.double() - below.double()) / (above.double() - below.double()))
    p_above = (draws == above).double().mean(0)
    sigma = (expected * (1 - expected) / DRAWS).sqrt()
    assert ((p_above - expected).abs() <= 5 * sigma).all(), (p_above, expected)
    # round-to-nearest would be biased: 0.1 of a spacing above 1 always gives 1
    assert p_above[0] > 0.05


def test_exact_bf16_values_and_specials_are_kept():
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 0.0234375, torch.inf, -torch.inf]).to(torch.bfloat16).float()
    for seed in range(20):
        out = stochastic_round_bf16(exact, torch.Generator().manual_seed(seed)).float()
        assert torch.equal(out, exact)
        assert torch.equal(torch.signbit(out), torch.signbit(exact))
    assert stochastic_round_bf16(torch.tensor([torch.nan])).isnan().all()


def fp32_adamw_step(w, g, m, v, step, **hp):
    """torch.optim.AdamW, in fp32, from the given weights and state (step = the count before this step)."""
    p = torch.nn.Parameter(w.clone())
    opt = torch.optim.AdamW([p], foreach=False, **hp)
    if step:
        opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    p.grad = g.clone()
    opt.step()
    s = opt.state[p]
    return p.detach(), s["exp_avg"], s["exp_avg_sq"]


@pytest.mark.parametrize("step", [0, 6])
def test_a_step_is_fp32_adamw_rounded_stochastically(step):
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 3, generator=gen).to(torch.bfloat16)
    g = torch.randn(64, 3, generator=gen).to(torch.bfloat16)
    m = (0.1 * torch.randn(64, 3, generator=gen)).to(torch.bfloat16)
    v = (0.01 * torch.rand(64, 3, generator=gen)).to(torch.bfloat16)
    oracle = fp32_adamw_step(w.float(), g.float(), m.float(), v.float(), step, **hp)
    results = []
    for seed in range(400):
        p = torch.nn.Parameter(w.clone())
        opt = BF16AdamW([p], seed=seed, **hp)
        if step:
            opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
        p.grad = g.clone()
        opt.step()
        s = opt.state[p]
        assert p.dtype == s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16
        results.append([p.detach().float(), s["exp_avg"].float(), s["exp_avg_sq"].float()])
    for k, exact in enumerate(oracle):
        draws = torch.stack([r[k] for r in results])  # [400, 64, 3]
        below, above = neighbours(exact)
        assert ((draws == below) | (draws == above)).all(), k
        spread = (above - below).clamp(min=1e-30)
        # the mean of 400 draws is within 4 binomial sigmas (≤ 0.1 spacing) of the fp32 value
        assert ((draws.mean(0) - exact).abs() / spread).max() < 0.1, k


def test_same_seed_same_step_and_state_dict_round_trip():
    torch.manual_seed(0)
    w = torch.randn(50).to(torch.bfloat16)
    grads = [torch.randn(50).to(torch.bfloat16) for _ in range(4)]

    def run(n, opt=None, p=None):
        p = p if p is not None else torch.nn.Parameter(w.clone())
        opt = opt or BF16AdamW([p], lr=1e-2, seed=3)
        for g in grads[:n]:
            p.grad = g.clone()
            opt.step()
        return p, opt

    full, _ = run(4)
    half, opt = run(2)
    resumed_p = torch.nn.Parameter(half.detach().clone())
    resumed = BF16AdamW([resumed_p], lr=1e-2, seed=3)
    resumed.load_state_dict(opt.state_dict())
    for g in grads[2:]:
        resumed_p.grad = g.clone()
        resumed.step()
    assert torch.equal(resumed_p, full)
    other = BF16AdamW([p2 := torch.nn.Parameter(w.clone())], lr=1e-2, seed=4)
    for g in grads:
        p2.grad = g.clone()
        other.step()
    assert not torch.equal(p2, full)  # the seed does reach the rounding


def test_fp32_parameters_are_refused():
    with pytest.raises(ValueError, match="bf16 parameters"):
        BF16AdamW([torch.nn.Parameter(torch.zeros(2))])


# ---------------------------------------------------------------------------------------------------
# train.py --pure-bf16


def test_pure_bf16_policy_has_bf16_weights_fp32_buffers_and_no_copy(tiny_policy):
    import copy

    from timerpo.distributed import SINGLE, prepare_policy

    pol = copy.copy(tiny_policy)
    pol.model = copy.deepcopy(tiny_policy.model)
    prepare_policy(pol, SINGLE, dtype=torch.bfloat16, pure=True)
    assert all(p.dtype == torch.bfloat16 for p in pol.model.parameters())
    assert all(b.dtype == torch.float32 for b in pol.model.buffers())  # rotary frequencies
    assert pol.rollout_model is None and pol.autocast_dtype is None and pol.sampler is pol.model


@pytest.fixture(scope="module")
def pure_run(tiny_data, tmp_path_factory):
    import train
    from tests.test_distributed import run_args

    out = tmp_path_factory.mktemp("pure")
    assert train.main(run_args(tiny_data, out, "pure", 2, ["--pure-bf16"])) == 0
    return out


def test_pure_bf16_run_keeps_bf16_state_and_resumes_exactly(pure_run, tiny_data, preset_tiny_policy):
    import shutil

    from safetensors.torch import load_file

    import train
    from tests.test_distributed import read_metrics, run_args

    def saved(run, step):
        ckpt = run / f"ckpt-{step:06d}"
        return load_file(ckpt / "model" / "model.safetensors"), load_file(ckpt / "optimizer" / "rank-00000.safetensors")

    model, state = saved(pure_run / "pure", 2)
    assert {t.dtype for t in model.values()} == {torch.bfloat16}
    assert {t.dtype for k, t in state.items() if not k.endswith("/step")} == {torch.bfloat16}
    start = preset_tiny_policy.model.state_dict()
    assert any(not torch.equal(model[k].float(), start[k].to(torch.bfloat16).float()) for k in model)  # trained
    shutil.copytree(pure_run / "pure", pure_run / "resumed")
    shutil.rmtree(pure_run / "resumed" / "ckpt-000002")
    (pure_run / "resumed" / "latest").write_text("ckpt-000001\n")
    assert train.main(run_args(tiny_data, pure_run, "resumed", 2, ["--pure-bf16", "--resume"])) == 0
    again, again_state = saved(pure_run / "resumed", 2)
    assert all(torch.equal(again[k], model[k]) for k in model)
    assert all(torch.equal(again_state[k], state[k]) for k in state)
    assert read_metrics(pure_run / "resumed")[1]["loss"] == read_metrics(pure_run / "pure")[1]["loss"]
