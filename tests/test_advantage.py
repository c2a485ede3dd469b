"""Tests for timerpo/advantage.py: every formula against a plain numpy re-derivation, plus the algebraic
properties of the orthogonal projection (orthogonality, zero mean, idempotence, pass-through)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from timerpo.advantage import (AdvantageResult, group_advantage, grounded_advantage, grounded_reward,
                               orthogonal_projection, projection_coefficient, timerpo_advantage)

pytestmark = pytest.mark.math  # the fast math subset: python -m pytest -m math

DELTA, EPS = 1e-6, 1e-8


# ---------------------------------------------------------------- numpy oracles

def np_centre(x, G, norm, floor=None):
    g = np.asarray(x, dtype=np.float64).reshape(-1, G)
    out = g - g.mean(1, keepdims=True)
    if norm == "std":
        out = out / (np.std(g, axis=1, ddof=1, keepdims=True) + DELTA)
    elif norm == "std-floor":
        out = out / np.maximum(np.std(g, axis=1, ddof=1, keepdims=True), floor)
    out[np.ptp(g, axis=1) == 0] = 0.0
    return out.reshape(-1)


def np_project(aux, main, G):
    a, m = np.reshape(aux, (-1, G)), np.reshape(main, (-1, G))
    coef = np.einsum("kg,kg->k", a, m) / (np.einsum("kg,kg->k", m, m) + EPS)
    return (a - coef[:, None] * m).reshape(-1), coef


def np_final(R, W, G, mode, alpha, norm, tau, grounding):
    main = np_centre(R, G, norm)
    s = np.exp(-np.asarray(W) / tau) if grounding == "ot" else np.asarray(W, dtype=np.float64)
    tsr = np_centre(s, G, norm)
    perp, _ = np_project(tsr, main, G)
    return {"grpo": main, "no-projection": main + alpha * tsr, "timerpo": main + alpha * perp}[mode]


def per_group_dot(x, y, G):
    return (np.reshape(x, (-1, G)) * np.reshape(y, (-1, G))).sum(1)


# ---------------------------------------------------------------- group_advantage / grounded_reward

@pytest.mark.parametrize("norm", ["std", "mean"])
def test_group_advantage_against_numpy(norm):
    rng = np.random.default_rng(0)
    R = rng.integers(0, 3, size=40).astype(float) / 2  # ties and equal groups occur
    R[:5] = 1.0  # one group with all rewards equal
    A = group_advantage(torch.tensor(R), 5, norm=norm)
    assert A.dtype == torch.float64
    np.testing.assert_allclose(A.numpy(), np_centre(R, 5, norm), rtol=1e-12, atol=1e-15)
    assert (A[:5] == 0).all()


def test_group_advantage_docstring_example_uses_sample_std():
    A = group_advantage(torch.tensor([1.0, 0, 0, 0, 0]), 5).numpy()
    s = math.sqrt(0.2)  # sample std of [1, 0, 0, 0, 0]; the population std would be 0.4
    np.testing.assert_allclose(A, np.array([0.8, -0.2, -0.2, -0.2, -0.2]) / (s + DELTA), rtol=1e-12)


def test_equal_rewards_give_exact_zero_even_when_mean_rounds():
    # mean([0.7] * 6) is not exactly 0.7 in float64; the advantage must still be exactly 0, not rounding / delta.
    R = torch.full((6,), 0.7, dtype=torch.float64)
    assert not torch.equal(R - R.mean(), torch.zeros(6, dtype=torch.float64))  # the premise holds
    assert (group_advantage(R, 6) == 0).all() and (group_advantage(R, 6, norm="mean") == 0).all()


def test_grounded_reward_values():
    W = torch.tensor([0.0, 0.5, 1.0, 1.7], dtype=torch.float64)
    np.testing.assert_allclose(grounded_reward(W, 0.5).numpy(), np.exp(-np.array([0.0, 0.5, 1.0, 1.7]) / 0.5),
                               rtol=1e-12)
    assert grounded_reward(torch.tensor([1.0]), 0.5).item() == pytest.approx(math.exp(-2), rel=1e-12)


@pytest.mark.parametrize("norm", ["std", "mean", "std-floor"])
def test_grounded_advantage_against_numpy(norm):
    rng = np.random.default_rng(3)
    s = np.exp(-rng.uniform(0.0, 2.0, size=40) / 0.5)  # grounded rewards of 8 groups of 5
    s[5:10] = s[5]  # one group with all s equal
    s[10:15] = s[10] + rng.normal(0.0, 1e-3, size=5)  # one spread below the floor
    A = grounded_advantage(torch.tensor(s), 5, norm=norm, floor=0.05)
    np.testing.assert_allclose(A.numpy(), np_centre(s, 5, norm, floor=0.05), rtol=1e-12, atol=1e-15)
    assert (A[5:10] == 0).all()
    with pytest.raises(ValueError, match="tsr_floor"):
        grounded_advantage(torch.tensor(s), 5, norm="std-floor")  # no floor given


@pytest.mark.parametrize("call,match", [
    (lambda: group_advantage(torch.zeros(7), 5), "multiple of group_size"),
    (lambda: group_advantage(torch.zeros(5), 1), "group_size >= 2"),
    (lambda: group_advantage(torch.zeros(5), 5, norm="z"), "norm must be"),
    (lambda: group_advantage(torch.tensor([0.0, float("nan")]), 2), r"rewards\[1\]"),
    (lambda: group_advantage(torch.zeros(2, 5), 5), "flat"),
    (lambda: grounded_reward(torch.zeros(3), tau=0.0), "tau"),
    (lambda: timerpo_advantage(torch.zeros(5), None, 5), "needs W"),
    (lambda: timerpo_advantage(torch.zeros(5), torch.zeros(5), 5, mode="pcgrad"), "mode must be"),
    (lambda: timerpo_advantage(torch.zeros(5), torch.zeros(5), 5, grounding="l2"), "grounding must be"),
    (lambda: timerpo_advantage(torch.zeros(5), torch.zeros(10), 5), "W has 10 values"),
])
def test_bad_input_raises_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- orthogonal projection

def test_projection_docstring_example():
    p, c = orthogonal_projection(torch.tensor([1.0, 0, -1]), torch.tensor([1.0, -1, 0]), 3, return_coef=True)
    np.testing.assert_allclose(p.numpy(), [0.5, 0.5, -1.0], atol=1e-8)
    assert c.item() == pytest.approx(0.5, rel=1e-7)


def test_projection_against_numpy_and_coefficient():
    rng = np.random.default_rng(1)
    aux, main = rng.normal(size=30), rng.normal(size=30)
    p, c = orthogonal_projection(torch.tensor(aux), torch.tensor(main), 5, return_coef=True)
    ref_p, ref_c = np_project(aux, main, 5)
    np.testing.assert_allclose(p.numpy(), ref_p, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(c.numpy(), ref_c, rtol=1e-12)
    torch.testing.assert_close(projection_coefficient(torch.tensor(aux), torch.tensor(main), 5), c, rtol=0, atol=0)


def test_projection_passes_through_when_main_is_zero():
    aux = torch.tensor([0.3, -0.1, -0.2, 0.7, -0.7, 0.0])
    main = torch.tensor([0.0, 0.0, 0.0, 1.0, -1.0, 0.0])
    p, c = orthogonal_projection(aux, main, 3, return_coef=True)
    assert torch.equal(p[:3], aux[:3].double()) and c[0] == 0


group_values = st.lists(st.floats(-3, 3, allow_nan=False, width=64), min_size=5, max_size=5)


@settings(max_examples=200, deadline=None)
@given(groups=st.lists(st.tuples(group_values, group_values), min_size=1, max_size=6))
def test_projection_properties(groups):
    G = 5
    aux = np.concatenate([np.array(a) - np.mean(a) for a, _ in groups])  # zero-mean, like A_TsR
    main = np.concatenate([np.array(m) - np.mean(m) for _, m in groups])  # zero-mean, like A_main
    p = orthogonal_projection(torch.tensor(aux), torch.tensor(main), G).numpy()
    p2 = orthogonal_projection(torch.tensor(p), torch.tensor(main), G).numpy()
    norm_a = np.linalg.norm(aux.reshape(-1, G), axis=1)
    norm_m = np.linalg.norm(main.reshape(-1, G), axis=1)
    norm_p = np.linalg.norm(p.reshape(-1, G), axis=1)
    scale = (norm_a + 1e-300) * (norm_m + 1e-300)
    # Orthogonal within each group where ||main||^2 >> eps (the eps in the denominator leaves a residual
    # overlap of <aux, main> eps / (||main||^2 + eps), i.e. <= eps / ||main|| relative).
    big = norm_m >= 0.1
    assert (np.abs(per_group_dot(p, main, G))[big] <= 1e-6 * scale[big] + 1e-12).all()
    # Still zero-mean per group.
    assert (np.abs(p.reshape(-1, G).sum(1)) <= 1e-9 * (norm_a + norm_m + 1)).all()
    # Idempotent up to the eps residual: ||P(P aux) - P aux|| = |<aux, main>| eps ||main|| / (||main||^2 + eps)^2,
    # at most ||aux|| eps / (||main||^2 + eps); exactly idempotent when main = 0.
    change = np.linalg.norm((p2 - p).reshape(-1, G), axis=1)
    assert (change <= norm_a * EPS / (norm_m**2 + EPS) + 1e-12 * (norm_a + 1)).all()
    assert (change[big] <= 1e-6 * norm_a[big] + 1e-12).all()
    # Never increases the norm: it removes a component (up to eps).
    assert (norm_p <= norm_a * (1 + 1e-9) + 1e-12).all()
    # Decomposition: aux = p + c * main exactly (up to rounding).
    _, c = orthogonal_projection(torch.tensor(aux), torch.tensor(main), G, return_coef=True)
    np.testing.assert_allclose(p + np.repeat(c.numpy(), G) * main, aux, atol=1e-12)


# ---------------------------------------------------------------- timerpo_advantage

def sample_inputs(rng, K=6, G=5):
    R = rng.integers(0, 2, size=K * G).astype(float)
    R[:G] = 0.0  # a zero-std group
    W = rng.uniform(0, 1.5, size=K * G)
    return R, W


@pytest.mark.parametrize("mode", ["timerpo", "grpo", "no-projection"])
@pytest.mark.parametrize("norm", ["std", "mean"])
@pytest.mark.parametrize("grounding", ["ot", "cosine"])
def test_modes_match_spec_formulas(mode, norm, grounding):
    rng = np.random.default_rng(2)
    R, W = sample_inputs(rng)
    if grounding == "cosine":
        W = rng.uniform(-1, 1, size=W.shape)  # a similarity, used as the grounded reward directly
    res = timerpo_advantage(torch.tensor(R), torch.tensor(W), 5, mode=mode, alpha=0.3, norm=norm, tau=0.5,
                            grounding=grounding)
    assert isinstance(res, AdvantageResult) and res.advantages.shape == (30,) and res.coef.shape == (6,)
    np.testing.assert_allclose(res.advantages.numpy(), np_final(R, W, 5, mode, 0.3, norm, 0.5, grounding),
                               rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(res.main.numpy(), np_centre(R, 5, norm), rtol=1e-12, atol=1e-15)
    expected_s = np.exp(-W / 0.5) if grounding == "ot" else W
    np.testing.assert_allclose(res.grounded_reward.numpy(), expected_s, rtol=1e-12)
    np.testing.assert_allclose(res.grounded.numpy(), np_centre(expected_s, 5, norm), rtol=1e-12, atol=1e-15)
    zero_std = np.mean(np.ptp(R.reshape(-1, 5), axis=1) == 0)
    assert res.zero_std_frac == pytest.approx(zero_std)


def test_alpha_zero_is_grpo_exactly():
    rng = np.random.default_rng(3)
    R, W = sample_inputs(rng)
    R, W = torch.tensor(R), torch.tensor(W)
    grpo = timerpo_advantage(R, W, 5, mode="grpo").advantages
    assert torch.equal(timerpo_advantage(R, W, 5, mode="timerpo", alpha=0.0).advantages, grpo)
    assert torch.equal(timerpo_advantage(R, W, 5, mode="no-projection", alpha=0.0).advantages, grpo)
    assert torch.equal(timerpo_advantage(R, None, 5, mode="grpo").advantages, grpo)
    assert torch.equal(grpo, group_advantage(R, 5))


def test_zero_std_group_gets_grounded_term_unchanged():
    # All outcome rewards equal: A_main = 0 and the grounded advantage passes through the projection.
    R = torch.ones(5)
    W = torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0])
    res = timerpo_advantage(R, W, 5, mode="timerpo", alpha=0.5, norm="mean")
    s = np.exp(-W.double().numpy() / 0.5)
    np.testing.assert_allclose(res.advantages.numpy(), 0.5 * (s - s.mean()), rtol=1e-12)
    assert res.zero_std_frac == 1.0 and res.coef.item() == 0.0


@settings(max_examples=100, deadline=None)
@given(data=st.data(), K=st.integers(1, 5), G=st.integers(2, 6), alpha=st.floats(0, 1),
       norm=st.sampled_from(["std", "mean"]))
def test_property_random_groups(data, K, G, alpha, norm):
    R = np.array(data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=K * G, max_size=K * G)))
    W = np.array(data.draw(st.lists(st.floats(0, 2), min_size=K * G, max_size=K * G)))
    res = timerpo_advantage(torch.tensor(R), torch.tensor(W), G, mode="timerpo", alpha=alpha, norm=norm)
    A, main, perp = res.advantages.numpy(), res.main.numpy(), res.projected.numpy()
    np.testing.assert_allclose(A, np_final(R, W, G, "timerpo", alpha, norm, 0.5, "ot"), rtol=1e-10, atol=1e-12)
    # Every part is zero-mean per group, hence so is the final advantage.
    assert np.abs(A.reshape(-1, G).sum(1)).max() <= 1e-9
    # The grounded part carries nothing along A_main in groups with a real outcome signal.
    big = np.linalg.norm(main.reshape(-1, G), axis=1) >= 0.1
    overlap = np.abs(per_group_dot(perp, main, G))
    assert (overlap[big] <= 1e-6 * np.linalg.norm(main.reshape(-1, G), axis=1)[big]).all()
    # Hence the outcome component of A is exactly A_main: <A, A_main> = ||A_main||^2 (up to that overlap).
    np.testing.assert_allclose(per_group_dot(A, main, G)[big], per_group_dot(main, main, G)[big], rtol=1e-6)


# ---------------------------------------------------------------- the separate normalisation of Â_TsR

@pytest.mark.parametrize("tsr_norm", ["std", "mean", "std-floor"])
@pytest.mark.parametrize("mode", ["timerpo", "no-projection"])
def test_tsr_norm_modes_against_numpy(tsr_norm, mode):
    rng = np.random.default_rng(7)
    R, W = sample_inputs(rng)
    # Half the groups have a spread of W far below the floor, the other half far above it.
    W = W.reshape(-1, 5)
    W[::2] = 0.4 + 1e-4 * rng.normal(size=W[::2].shape)
    W = W.reshape(-1)
    floor = 0.05
    res = timerpo_advantage(torch.tensor(R), torch.tensor(W), 5, mode=mode, alpha=0.3, norm="std",
                            tsr_norm=tsr_norm, tsr_floor=floor)
    s = np.exp(-W / 0.5)
    tsr = np_centre(s, 5, tsr_norm, floor)
    np.testing.assert_allclose(res.grounded.numpy(), tsr, rtol=1e-12, atol=1e-15)
    main = np_centre(R, 5, "std")
    perp, _ = np_project(tsr, main, 5)
    expected = main + 0.3 * (perp if mode == "timerpo" else tsr)
    np.testing.assert_allclose(res.advantages.numpy(), expected, rtol=1e-12, atol=1e-15)
    spread = np.abs(res.grounded.numpy().reshape(-1, 5)).max(1)
    if tsr_norm == "std-floor":
        # Noise-sized spreads stay noise-sized; real spreads are scaled to unit std as with "std".
        assert (spread[::2] < 1e-2).all() and (spread[1::2] > 0.5).all()
    if tsr_norm == "std":
        assert (spread > 0.5).all()  # the paper reading: any spread becomes unit-sized


def test_tsr_norm_defaults_to_main_norm_and_checks_floor():
    rng = np.random.default_rng(8)
    R, W = map(torch.tensor, sample_inputs(rng))
    for norm in ("std", "mean"):
        same = timerpo_advantage(R, W, 5, norm=norm).advantages
        assert torch.equal(same, timerpo_advantage(R, W, 5, norm=norm, tsr_norm=norm).advantages)
    with pytest.raises(ValueError, match="tsr_floor"):
        timerpo_advantage(R, W, 5, tsr_norm="std-floor", tsr_floor=0.0)
    with pytest.raises(ValueError, match="norm must be"):
        timerpo_advantage(R, W, 5, tsr_norm="floor")
