"""The objective of method.md §16 against a hand computation in plain Python floats."""
import math

import pytest
import torch

from timerpo.objective import clipped_surrogate, k3_kl, timerpo_objective

pytestmark = pytest.mark.math  # the fast math subset: python -m pytest -m math


def hand_loss(logp, old, ref, ent, adv, mask, n_total, eps, beta, c_h):
    """L = −(1/N) Σ m [min(ρA, clip(ρ)A) − β(e^r − r − 1) + c_H H], written out token by token."""
    total = 0.0
    for i in range(len(logp)):
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            surr = min(rho * adv[i], min(max(rho, 1 - eps), 1 + eps) * adv[i])
            r = ref[i][t] - logp[i][t]
            kl = math.exp(r) - r - 1
            total += surr - beta * kl + c_h * ent[i][t]
    return -total / n_total


def test_loss_equals_hand_computation():
    logp = [[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.1]]
    old = [[-1.1, -0.2, -2.0], [-0.9, -1.0, -0.1]]  # ratios above and below the clip range
    ref = [[-0.9, -0.7, -1.5], [-0.3, -2.0, -3.0]]
    ent = [[0.5, 0.25, 1.0], [0.1, 0.2, 0.3]]
    adv = [0.8, -1.3]
    mask = [[1, 1, 0], [1, 1, 1]]
    n_total = 9  # as if another micro-batch held 4 more tokens
    eps, beta, c_h = 0.2, 0.05, 0.01
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    terms = timerpo_objective(t(logp), t(old), t(ref), t(ent), t(adv), t(mask), n_total,
                              clip_eps=eps, beta=beta, entropy_coef=c_h)
    expected = hand_loss(logp, old, ref, ent, adv, mask, n_total, eps, beta, c_h)
    assert abs(float(terms.loss) - expected) < 1e-12
    assert terms.tokens == 5


def test_clip_fraction_and_gradient_direction():
    logp = torch.tensor([[0.0, 0.5]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0]])
    surr, clipped = clipped_surrogate(logp, old, torch.tensor([1.0]), 0.2)
    assert clipped.tolist() == [[False, True]]  # exp(0.5) = 1.65 > 1.2
    surr.sum().backward()
    # A clipped token with positive advantage gets no gradient; the unclipped one gets ρ·A = 1.
    assert logp.grad.tolist() == [[1.0, 0.0]]


def test_k3_is_nonnegative_zero_at_equality_and_clamped():
    a = torch.tensor([-1.0, -2.0, -0.5, 0.0])
    b = torch.tensor([-1.0, -0.5, -2.0, -1000.0])
    kl = k3_kl(a, b)
    assert kl[0] == 0 and (kl >= 0).all() and torch.isfinite(kl).all()
    r = -2.0 - (-0.5)  # ref - logp for element 2
    assert abs(float(kl[2]) - (math.exp(r) - r - 1)) < 1e-6
    assert float(kl[3]) <= 10.0  # the extreme ratio is clamped


def test_clip_binds_on_both_sides_in_the_loss_and_its_gradient():
    """Ratios outside [1 − ϵ, 1 + ϵ] = [0.8, 1.2] where the pessimistic min picks the clipped term: ρ = 1.3 with
    A > 0 (counts 1.2·A, no gradient) and ρ = 0.7 with A < 0 (counts 0.8·A, no gradient). Beside them, ratios
    outside the range where the min picks the unclipped term (ρ = 1.3, A < 0; ρ = 0.7, A > 0) and one inside
    (ρ = 1.1): those count ρ·A, with gradient ρ·A in log π. Hand-computed with ϵ = 0.2, A = ±2, N = 10."""
    rho = [[1.3, 0.7, 1.1], [1.3, 0.7, 1.1]]
    adv = [2.0, -2.0]
    logp = torch.tensor([[math.log(r) for r in row] for row in rho], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.float64)
    terms = timerpo_objective(logp, old, None, None, torch.tensor(adv, dtype=torch.float64), mask, 10,
                              clip_eps=0.2, beta=0.0, entropy_coef=0.0)
    # row 0 (A = 2):  min(2.6, 2.4) = 2.4 (clipped), min(1.4, 1.6) = 1.4, 2.2
    # row 1 (A = −2): min(−2.6, −2.4) = −2.6, min(−1.4, −1.6) = −1.6 (clipped), −2.2
    assert float(terms.loss.detach()) == pytest.approx(-(2.4 + 1.4 + 2.2 - 2.6 - 1.6 - 2.2) / 10, abs=1e-12)
    terms.loss.backward()
    # d(−ρA/N)/d log π = −ρA/N where the unclipped term counts; 0 where the clipped one does
    expected = [[0.0, -1.4 / 10, -2.2 / 10], [2.6 / 10, 0.0, 2.2 / 10]]
    assert torch.allclose(logp.grad, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0), logp.grad
    assert terms.clipped == 4  # all four ratios outside the range, whichever term the min picked
