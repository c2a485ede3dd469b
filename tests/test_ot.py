"""Tests for ot.py against independent oracles: a textbook numpy log-domain Sinkhorn, exact OT from
scipy's linprog, the 1-D quantile closed form, scipy's cdist/softmax, and closed-form 2x2 problems.

`ot.sinkhorn` (the textbook iteration) is checked against the numpy oracle; `ot.sinkhorn_fast` (what
ot_distance runs) against `ot.sinkhorn` at equal iteration counts, and on converged problems against the
exact-OT oracles. POT is the oracle of bench/bench_sinkhorn.py (its smoke test checks the agreement)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog
from scipy.spatial.distance import cdist
from scipy.special import logsumexp
from scipy.special import softmax as sp_softmax
from scipy.stats import wasserstein_distance

import ot

pytestmark = pytest.mark.math  # the fast math subset: python -m pytest -m math


# ---------------------------------------------------------------- oracles (numpy / scipy only)

def ref_sinkhorn(C, a, b, eps, n_iter):
    """Textbook log-domain Sinkhorn on one unpadded problem: column update then row update, from f = g = 0."""
    f, g = np.zeros(len(a)), np.zeros(len(b))
    for _ in range(n_iter):
        g = eps * np.log(b) - eps * logsumexp((f[:, None] - C) / eps, axis=0)
        f = eps * np.log(a) - eps * logsumexp((g[None, :] - C) / eps, axis=1)
    return np.exp((f[:, None] + g[None, :] - C) / eps)


def exact_ot(C, a, b):
    """Unregularised OT cost min <T, C> over couplings of (a, b), by linear programming (HiGHS)."""
    n, m = C.shape
    rows = np.kron(np.eye(n), np.ones((1, m)))  # sum_j T_ij = a_i
    cols = np.kron(np.ones((1, n)), np.eye(m))  # sum_i T_ij = b_j
    res = linprog(C.ravel(), A_eq=np.vstack([rows, cols]), b_eq=np.concatenate([a, b]), bounds=(0, None),
                  method="highs")
    assert res.status == 0, res.message
    return res.fun


def w1_quantile(x, a, y, b):
    """1-D W1 = integral over t in [0, 1] of |F^-1(t) - G^-1(t)|, by merging the two sorted CDFs."""
    ix, iy = np.argsort(x), np.argsort(y)
    x, a, y, b = x[ix], a[ix] / a.sum(), y[iy], b[iy] / b.sum()
    cut = np.unique(np.concatenate([[0.0], np.cumsum(a), np.cumsum(b)]).clip(0, 1))
    mids = (cut[:-1] + cut[1:]) / 2  # quantile levels inside each piece
    qx = x[np.minimum(np.searchsorted(np.cumsum(a), mids), len(x) - 1)]
    qy = y[np.minimum(np.searchsorted(np.cumsum(b), mids), len(y) - 1)]
    return float(np.sum(np.diff(cut) * np.abs(qx - qy)))


def entropy(p):
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def random_problem(rng, n, m, scale=1.0):
    C = rng.uniform(0, scale, (n, m))
    a = rng.uniform(0.1, 1, n)
    b = rng.uniform(0.1, 1, m)
    return C, a / a.sum(), b / b.sum()


# A forced detour: 0.8 of the mass must take a cost-1 edge.
DETOUR = (np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([0.9, 0.1]), np.array([0.1, 0.9]))


def t64(x):
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def converge(C, a, b, eps, tol=1e-12, n_iter=20000):
    res = ot.sinkhorn_fast(t64(C)[None], t64(a)[None], t64(b)[None], eps, n_iter, tol=tol)
    return res.plan[0].numpy(), res


# ---------------------------------------------------------------- sinkhorn

def test_two_by_two_closed_form():
    # Symmetric problem: T = K / (2 (1 + e^-1/eps)), W = e^-1/eps / (1 + e^-1/eps).
    eps = 0.1
    C = np.array([[0.0, 1.0], [1.0, 0.0]])
    plan, res = converge(C, [0.5, 0.5], [0.5, 0.5], eps)
    r = math.exp(-1 / eps)
    np.testing.assert_allclose(plan, np.array([[1, r], [r, 1]]) / (2 * (1 + r)), rtol=1e-12)
    assert (plan * C).sum() == pytest.approx(r / (1 + r), rel=1e-10)


@pytest.mark.parametrize("eps,n_iter", [(0.5, 1), (0.08, 7), (0.05, 30), (1e-3, 40)])
def test_matches_textbook_log_domain_at_equal_iterations(eps, n_iter):
    rng = np.random.default_rng(1)
    C, a, b = random_problem(rng, 9, 6, scale=2.0)
    ref = ref_sinkhorn(C, a, b, eps, n_iter)
    plan = ot.sinkhorn(t64(C)[None], t64(a)[None], t64(b)[None], eps, n_iter)
    np.testing.assert_allclose(plan[0].numpy(), ref, rtol=1e-9, atol=1e-14)
    res = ot.sinkhorn_fast(t64(C)[None], t64(a)[None], t64(b)[None], eps, n_iter)
    torch.testing.assert_close(res.plan, plan, rtol=1e-9, atol=1e-14)
    assert res.n_iter == n_iter


@pytest.mark.parametrize("n_iter", [60, 200])
def test_fast_log_domain_redo_matches_reference(n_iter):
    # A forced detour: 0.8 of the mass must take a cost-1 edge, so at eps = 0.003 the scalings drift by
    # a factor ~9 per iteration and leave exp(+-100); sinkhorn_fast redoes those iterations in the log domain.
    C, a, b = DETOUR
    plan = ot.sinkhorn(t64(C)[None], t64(a)[None], t64(b)[None], 0.003, n_iter)
    np.testing.assert_allclose(plan[0].numpy(), ref_sinkhorn(C, a, b, 0.003, n_iter), rtol=1e-9, atol=1e-15)
    res = ot.sinkhorn_fast(t64(C)[None], t64(a)[None], t64(b)[None], 0.003, n_iter)
    assert res.log_steps > 1  # the route under test did run
    torch.testing.assert_close(res.plan, plan, rtol=1e-9, atol=1e-15)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 4), n=st.integers(1, 12), m=st.integers(1, 12), log10_eps=st.floats(-3, 0),
       n_iter=st.integers(1, 80), seed=st.integers(0, 2**31 - 1))
def test_property_fast_equals_reference(B, n, m, log10_eps, n_iter, seed):
    # Random batches with random padding, eps from 1e-3 (log-domain redos) to 1: the same iterates.
    g = torch.Generator().manual_seed(seed)
    C = 2 * torch.rand(B, n, m, generator=g, dtype=torch.float64)
    a = torch.rand(B, n, generator=g, dtype=torch.float64) * (torch.rand(B, n, generator=g) < 0.8)
    b = torch.rand(B, m, generator=g, dtype=torch.float64) * (torch.rand(B, m, generator=g) < 0.8)
    a = a / a.sum(1, keepdim=True).clamp_min(1e-300)
    b = b / b.sum(1, keepdim=True).clamp_min(1e-300)
    b[a.sum(1) == 0] = 0.0  # a problem with one empty side is empty on both (equal mass)
    a[b.sum(1) == 0] = 0.0
    eps = 10.0 ** log10_eps
    plan = ot.sinkhorn(C, a, b, eps, n_iter)
    res = ot.sinkhorn_fast(C, a, b, eps, n_iter)
    torch.testing.assert_close(res.plan, plan, rtol=1e-8, atol=1e-14)


def test_reference_catches_a_wrong_iteration():
    # The property above can fail: one iteration fewer is a different plan.
    rng = np.random.default_rng(2)
    C, a, b = random_problem(rng, 9, 6, scale=2.0)
    args = t64(C)[None], t64(a)[None], t64(b)[None], 0.05
    assert (ot.sinkhorn_fast(*args, 10).plan - ot.sinkhorn(*args, 9)).abs().max() > 1e-6


def test_marginals_within_1e6_after_convergence():
    rng = np.random.default_rng(3)
    C, a, b = random_problem(rng, 40, 30, scale=2.0)
    plan, res = converge(C, a, b, 0.08, tol=1e-10)
    assert res.n_iter < 20000  # stopped by tol, not by the iteration cap
    err = np.abs(plan.sum(1) - a).sum() + np.abs(plan.sum(0) - b).sum()
    assert err <= 1e-6
    assert res.marginal_err[0].item() == pytest.approx(err, abs=1e-14)


def test_converged_plan_has_gibbs_form():
    # The entropic optimum is the unique coupling with log T_ij = (f_i + g_j - C_ij) / eps: after adding
    # C/eps, log T must be a sum of a row term and a column term (double-centred residual = 0).
    rng = np.random.default_rng(4)
    C, a, b = random_problem(rng, 7, 5)
    eps = 0.05
    plan, _ = converge(C, a, b, eps)
    L = np.log(plan) + C / eps
    resid = L - L.mean(1, keepdims=True) - L.mean(0, keepdims=True) + L.mean()
    assert np.abs(resid).max() <= 1e-8


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cost_approaches_exact_ot_as_eps_to_zero(seed):
    # Entropic optimality gives 0 <= <T_eps, C> - OT <= eps (H(a) + H(b)) for an exact coupling; the reported
    # marginal error (misplaced mass) can move the cost by at most max(C) times that mass.
    rng = np.random.default_rng(10 + seed)
    C, a, b = random_problem(rng, 6, 8)
    exact = exact_ot(C, a, b)
    gaps = []
    for eps in (0.1, 0.02, 0.005):
        plan, res = converge(C, a, b, eps, tol=1e-11)
        assert res.marginal_err[0].item() <= 1e-9  # converged, so the slack below is tiny
        slack = C.max() * res.marginal_err[0].item() + 1e-12
        w = (plan * C).sum()
        assert -slack <= w - exact <= eps * (entropy(a) + entropy(b)) + slack
        gaps.append(w - exact)
    assert gaps[-1] <= 0.005 * (entropy(a) + entropy(b)) + 1e-9
    assert gaps[-1] < gaps[0]


def test_cost_matches_one_dimensional_closed_form():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=7), rng.normal(0.5, 1.0, size=5)
    a, b = rng.uniform(0.2, 1, 7), rng.uniform(0.2, 1, 5)
    a, b = a / a.sum(), b / b.sum()
    closed = w1_quantile(x, a, y, b)
    # The quantile oracle itself agrees with scipy's implementation.
    assert closed == pytest.approx(wasserstein_distance(x, y, a, b), abs=1e-12)
    assert closed == pytest.approx(exact_ot(np.abs(x[:, None] - y[None, :]), a, b), abs=1e-9)
    C = np.abs(x[:, None] - y[None, :])
    eps = 0.002
    plan, res = converge(C, a, b, eps, tol=1e-11)
    assert res.marginal_err[0].item() <= 1e-9
    slack = C.max() * res.marginal_err[0].item()
    assert -slack - 1e-12 <= (plan * C).sum() - closed <= eps * (entropy(a) + entropy(b)) + slack


def test_transposed_problem_gives_transposed_plan():
    rng = np.random.default_rng(6)
    C, a, b = random_problem(rng, 9, 4, scale=2.0)
    plan, _ = converge(C, a, b, 0.05)
    plan_t, _ = converge(C.T.copy(), b, a, 0.05)
    np.testing.assert_allclose(plan_t, plan.T, atol=1e-11)


def test_plan_invariant_to_constant_shift_of_cost():
    # Exactly invariant at every iteration, so compare an unconverged plan.
    rng = np.random.default_rng(7)
    C, a, b = random_problem(rng, 10, 7, scale=2.0)
    p0 = ot.sinkhorn(t64(C)[None], t64(a)[None], t64(b)[None], 0.08, 5)
    p1 = ot.sinkhorn(t64(C + 3.7)[None], t64(a)[None], t64(b)[None], 0.08, 5)
    np.testing.assert_allclose(p1.numpy(), p0.numpy(), rtol=1e-9, atol=1e-15)
    # At convergence the plan is also invariant to adding row and column terms.
    conv, _ = converge(C, a, b, 0.08)
    conv_shift, _ = converge(C + rng.normal(size=(10, 1)) + rng.normal(size=(1, 7)), a, b, 0.08)
    np.testing.assert_allclose(conv_shift, conv, atol=1e-10)


@pytest.mark.parametrize("eps", [0.08, 0.003])
def test_batch_equals_loop_and_padded_equals_unpadded(eps):
    # At eps = 0.003 the detour problem forces log-domain redos (see below) for the whole batch, while the
    # other problems alone would stay on the scaling route: results must not depend on the route.
    rng = np.random.default_rng(8)
    problems = [random_problem(rng, nk, mk, scale=2.0) for nk, mk in [(6, 4), (3, 7), (8, 8), (1, 5)]] + [DETOUR]
    n, m, K = 8, 8, len(problems)
    C = np.full((K, n, m), np.nan)  # padded costs are garbage on purpose
    A, B = np.zeros((K, n)), np.zeros((K, m))
    singles = []
    for k, (Ck, ak, bk) in enumerate(problems):
        C[k, :len(ak), :len(bk)], A[k, :len(ak)], B[k, :len(bk)] = Ck, ak, bk
        singles.append(ref_sinkhorn(Ck, ak, bk, eps, 60))
    res = ot.sinkhorn_fast(t64(C), t64(A), t64(B), eps, 60)
    assert (res.log_steps > 1) == (eps < 0.01)
    for plan in (ot.sinkhorn(t64(C), t64(A), t64(B), eps, 60).numpy(), res.plan.numpy()):
        for k, (Ck, ak, bk) in enumerate(problems):
            nk, mk = Ck.shape
            np.testing.assert_allclose(plan[k, :nk, :mk], singles[k], rtol=1e-9, atol=1e-15)
            assert (plan[k, nk:, :] == 0).all() and (plan[k, :, mk:] == 0).all()


def masked_scaling_iterates(cost, a, b, eps, n_iter):
    """sinkhorn_fast's iterates written the plain way: padded scalings 0 and masked out of a log-based range
    check, -C/eps and K built out of place. The oracle of the next test."""
    rows, cols = a > 0, b > 0
    neg_c = torch.where(rows[:, :, None] & cols[:, None, :], cost / -eps, -math.inf)
    lf, lg = ot._log_domain_step(neg_c, a.log(), b.log(), torch.zeros_like(a), rows, cols)
    kernel = torch.exp(neg_c + lf[:, :, None] + lg[:, None, :])
    u, v = rows.double(), cols.double()
    for _ in range(n_iter - 1):
        v_new = torch.where(cols, b / (u[:, None, :] @ kernel).squeeze(1), 0.0)
        u_new = torch.where(rows, a / (kernel @ v_new[:, :, None]).squeeze(2), 0.0)
        if all(bool(((s.log().abs() <= 100) | ~mask).all()) for s, mask in ((u_new, rows), (v_new, cols))):
            u, v = u_new, v_new
            continue
        lf = torch.where(rows, lf + u.log(), -math.inf)
        lg = torch.where(cols, lg + v.log(), -math.inf)
        lf, lg = ot._log_domain_step(neg_c, a.log(), b.log(), lf, rows, cols)
        kernel = torch.exp(neg_c + lf[:, :, None] + lg[:, None, :])
        u, v = rows.double(), cols.double()
    return kernel * u[:, :, None] * v[:, None, :]


@pytest.mark.parametrize("eps", [0.08, 0.003])
def test_fast_iterates_are_bit_for_bit_the_plain_loop(eps):
    """sinkhorn_fast keeps padded scalings at 1 (unmasked range check) and builds its [b, n, m] tensors in place:
    the plan must be the same bits as the plain formulation's, padding and log-domain redos included."""
    g = torch.Generator().manual_seed(3)
    B, n, m = 6, 40, 90
    cost = 2 * torch.rand(B, n, m, generator=g, dtype=torch.float64)
    a = torch.rand(B, n, generator=g, dtype=torch.float64) * (torch.arange(n) < torch.tensor([40, 31, 7, 1, 25, 40])[:, None])
    b = torch.rand(B, m, generator=g, dtype=torch.float64) * (torch.arange(m) < torch.tensor([90, 12, 60, 3, 90, 47])[:, None])
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    cost[0, :2, :2], a[0, :2], b[0, :2] = t64(DETOUR[0]), t64(DETOUR[1]), t64(DETOUR[2])  # forces log steps
    a[0, 2:], b[0, 2:] = 0.0, 0.0
    res = ot.sinkhorn_fast(cost, a, b, eps, 60)
    assert (res.log_steps > 1) == (eps < 0.01)
    assert torch.equal(res.plan, masked_scaling_iterates(cost, a, b, eps, 60))


def test_cpu_blocks_give_the_same_result(monkeypatch):
    # Large problems are solved in blocks of the batch on CPU; force one problem per block on small ones.
    g = torch.Generator().manual_seed(16)
    C = 2 * torch.rand(5, 9, 7, generator=g, dtype=torch.float64)
    a = torch.softmax(torch.randn(5, 9, generator=g, dtype=torch.float64), -1)
    b = torch.softmax(torch.randn(5, 7, generator=g, dtype=torch.float64), -1)
    b[3] = 0.0  # an empty problem inside a block of its own
    a[3] = 0.0
    whole = ot.sinkhorn_fast(C, a, b, 0.05, 40)
    monkeypatch.setattr(ot, "_CPU_BLOCK_BYTES", 1)
    blocks = ot.sinkhorn_fast(C, a, b, 0.05, 40)
    torch.testing.assert_close(blocks.plan, whole.plan, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(blocks.marginal_err, whole.marginal_err, rtol=1e-9, atol=1e-15)
    assert blocks.n_iter == whole.n_iter
    C[4, 2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"cost\[4, 2, 5\]"):  # the index is the batch's, not the block's
        ot.sinkhorn_fast(C, a, b, 0.05, 10)


@pytest.mark.parametrize("n_problems", [0, 1, 2, 3, 7, 20, 23])
@pytest.mark.parametrize("problem_bytes", [100, 290_000, 1_500_000, 3 << 20])
def test_cpu_blocks_cover_the_batch_evenly_and_never_leave_one_problem_alone(n_problems, problem_bytes):
    blocks = ot._cpu_blocks(n_problems, problem_bytes)
    assert [i for b in blocks for i in range(b.start, b.stop)] == list(range(n_problems))
    sizes = [b.stop - b.start for b in blocks]
    assert not sizes or max(sizes) - min(sizes) <= 1
    if problem_bytes <= ot._CPU_BLOCK_BYTES and n_problems >= 2:
        assert min(sizes) >= 2  # the batched kernel on every problem
    fit = max(1, ot._CPU_BLOCK_BYTES // problem_bytes)
    assert all(s <= max(fit, 3) for s in sizes)  # about the budget: over it only to pair problems up


def test_blocks_of_two_or_more_give_the_same_bits_as_one_block(monkeypatch):
    """At the tiny preset's sizes (20 completions x 66 tokens against ExpCoTs of up to 344 tokens) the batch is cut
    in two: every problem's plan is the same bits as when the whole batch is one block."""
    g = torch.Generator().manual_seed(4)
    B, n, m = 20, 66, 344
    cost = 2 * torch.rand(B, n, m, generator=g, dtype=torch.float64)
    a = torch.softmax(torch.randn(B, n, generator=g, dtype=torch.float64), -1)
    b = torch.softmax(torch.randn(B, m, generator=g, dtype=torch.float64), -1)
    assert len(ot._cpu_blocks(B, 8 * n * m)) == 2
    cut = ot.sinkhorn_fast(cost, a, b, 0.08, 50)
    monkeypatch.setattr(ot, "_CPU_BLOCK_BYTES", 1 << 40)
    whole = ot.sinkhorn_fast(cost, a, b, 0.08, 50)
    assert torch.equal(cut.plan, whole.plan) and torch.equal(cut.marginal_err, whole.marginal_err)


def test_empty_problem_gives_zero_plan():
    C = torch.rand(2, 3, 4, dtype=torch.float64)
    a = torch.tensor([[0.2, 0.3, 0.5], [0.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.25] * 4, [0.25] * 4], dtype=torch.float64)
    res = ot.sinkhorn_fast(C, a, b, 0.08, 10)
    assert torch.isfinite(res.plan).all() and (res.plan[1] == 0).all() and res.marginal_err[1] == 0
    assert res.plan[0].sum().item() == pytest.approx(1.0, abs=1e-12)
    plan = ot.sinkhorn(C, a, b, 0.08, 10)
    assert torch.isfinite(plan).all() and (plan[1] == 0).all()
    torch.testing.assert_close(plan, res.plan, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_no_nan_or_inf_at_tiny_eps(dtype):
    g = torch.Generator().manual_seed(9)
    C = (2 * torch.rand(3, 40, 30, generator=g, dtype=torch.float64)).to(dtype)
    C[0, 0, 0], C[0, 1, 1] = 0.0, 2.0  # both ends of the cosine range
    a = torch.softmax(3 * torch.randn(3, 40, generator=g, dtype=torch.float64), -1)
    b = torch.softmax(3 * torch.randn(3, 30, generator=g, dtype=torch.float64), -1)
    for plan in (ot.sinkhorn(C, a, b, 1e-3, 50), ot.sinkhorn_fast(C, a, b, 1e-3, 50).plan):
        assert plan.dtype == torch.float64
        assert torch.isfinite(plan).all() and (plan >= 0).all()
        torch.testing.assert_close(plan.sum(2), a, rtol=0, atol=1e-12)  # the last update fits the rows


def test_bf16_hidden_states_through_ot_distance():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(3, 20, 64, generator=g).to(torch.bfloat16)
    y = torch.randn(3, 12, 64, generator=g).to(torch.bfloat16)
    for eps in (0.08, 1e-3):
        W = ot.ot_distance(x, None, y, None, eps=eps)
        assert W.dtype == torch.float64 and torch.isfinite(W).all() and ((W >= 0) & (W <= 2)).all()


def test_tol_stops_early_and_reports_iterations():
    rng = np.random.default_rng(11)
    C, a, b = random_problem(rng, 5, 5, scale=0.2)
    res = ot.sinkhorn_fast(t64(C)[None], t64(a)[None], t64(b)[None], 0.5, 1000, tol=1e-9)
    assert 1 < res.n_iter < 1000 and res.marginal_err[0] <= 1e-9


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), m=st.integers(1, 6), eps=st.floats(0.01, 1.0), n_iter=st.integers(1, 30),
       seed=st.integers(0, 2**31 - 1))
def test_property_matches_textbook_and_keeps_row_marginals(n, m, eps, n_iter, seed):
    rng = np.random.default_rng(seed)
    C, a, b = random_problem(rng, n, m, scale=2.0)
    plan = ot.sinkhorn(t64(C)[None], t64(a)[None], t64(b)[None], eps, n_iter)[0].numpy()
    np.testing.assert_allclose(plan, ref_sinkhorn(C, a, b, eps, n_iter), rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(plan.sum(1), a, atol=1e-12)


# ---------------------------------------------------------------- input validation

@pytest.mark.parametrize("mutate,match", [
    (lambda C, a, b: (C, a, b * 2), "total mass"),
    (lambda C, a, b: (C, a.index_fill(1, torch.tensor([0]), -0.1), b), r"a\[0, 0\]"),
    (lambda C, a, b: (C.index_fill(2, torch.tensor([1]), float("nan")), a, b), r"cost\[0, 0, 1\]"),
    (lambda C, a, b: (C[:, :, :2], a, b), "marginals must be"),
    (lambda C, a, b: (C[0], a, b), r"\[B, n, m\]"),
])
def test_bad_input_raises_clear_error(mutate, match):
    C = torch.rand(1, 3, 4, dtype=torch.float64)
    a, b = torch.full((1, 3), 1 / 3, dtype=torch.float64), torch.full((1, 4), 0.25, dtype=torch.float64)
    for solve in (ot.sinkhorn, ot.sinkhorn_fast):
        with pytest.raises(ValueError, match=match):
            solve(*mutate(C, a, b), 0.08, 10)
        with pytest.raises(ValueError, match="eps"):
            solve(C, a, b, 0.0, 10)


# ---------------------------------------------------------------- cost, marginals, W, pooled cosine

def test_cosine_cost_against_scipy_cdist():
    g = torch.Generator().manual_seed(12)
    x, y = torch.randn(2, 5, 16, generator=g), torch.randn(2, 4, 16, generator=g)
    x[0, 0] = 0.0  # zero vector: cos = 0, cost 1
    y[1, 2] = -x[1, 3]  # opposite vectors: cost 2
    C = ot.cosine_cost(x, y)
    assert C.dtype == torch.float32
    for k in range(2):
        ref = np.clip(cdist(x[k].double().numpy(), y[k].double().numpy(), "cosine"), 0, 2)
        ref[np.isnan(ref)] = 1.0  # scipy leaves 0/0 undefined
        np.testing.assert_allclose(C[k].numpy(), ref, atol=1e-6)
    assert (C[0, 0] == 1).all() and C[1, 3, 2].item() == pytest.approx(2.0, abs=1e-6)
    assert ot.cosine_cost(x.to(torch.bfloat16), y.to(torch.bfloat16)).dtype == torch.float32
    assert ot.cosine_cost(x.double(), y.double()).dtype == torch.float64


def test_norm_softmax_marginal_against_scipy():
    g = torch.Generator().manual_seed(13)
    h = torch.randn(3, 6, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 1, 0], [0] * 6, [1] * 6], dtype=torch.bool)
    h[0, 3] = float("nan")  # padding may hold garbage
    p = ot.norm_softmax_marginal(h, mask)
    assert p.dtype == torch.float64
    norms = np.linalg.norm(h.double().numpy(), axis=-1)
    valid = mask[0].numpy()
    np.testing.assert_allclose(p[0].numpy()[valid], sp_softmax(norms[0][valid]), rtol=1e-6)
    assert (p[0][~mask[0]] == 0).all() and (p[1] == 0).all()
    np.testing.assert_allclose(p[2].numpy(), sp_softmax(norms[2]), rtol=1e-6)


def test_ot_distance_against_independent_pipeline():
    # Oracle: scipy cdist cost, scipy softmax marginals, textbook Sinkhorn on the unpadded problem.
    g = torch.Generator().manual_seed(14)
    x, y = torch.randn(3, 9, 12, generator=g), torch.randn(3, 7, 12, generator=g)
    y[:, :3] = x[:, :3] + 0.1 * torch.randn(3, 3, 12, generator=g)  # some close pairs, so the plan matters
    xm = torch.ones(3, 9, dtype=torch.bool)
    ym = torch.ones(3, 7, dtype=torch.bool)
    xm[1, 6:], ym[2, 4:] = False, False
    W = ot.ot_distance(x, xm, y, ym, eps=0.08, n_iter=50)
    for k in range(3):
        xs = x[k][xm[k]].double().numpy()
        ys = y[k][ym[k]].double().numpy()
        C = cdist(xs, ys, "cosine")
        a = sp_softmax(np.linalg.norm(xs, axis=1))
        b = sp_softmax(np.linalg.norm(ys, axis=1))
        ref = (ref_sinkhorn(C, a, b, 0.08, 50) * C).sum()
        assert W[k].item() == pytest.approx(ref, abs=1e-6)  # the cost matrix is float32


def test_ot_distance_edge_values():
    v = torch.tensor([[[3.0, 4.0]]])
    assert ot.ot_distance(v, None, v, None).item() == pytest.approx(0.0, abs=1e-7)
    assert ot.ot_distance(v, None, -v, None).item() == pytest.approx(2.0, abs=1e-7)
    empty = torch.zeros(1, 1, dtype=torch.bool)
    assert ot.ot_distance(v, empty, v, None).item() == 1.0
    assert ot.ot_distance(v, None, v, empty).item() == 1.0
    no_tokens = torch.zeros(1, 0, 2)  # a zero-length side also counts as empty
    assert ot.ot_distance(v, None, no_tokens, None).item() == 1.0
    assert ot.ot_distance(no_tokens, None, v, None).item() == 1.0
    with pytest.raises(ValueError, match="mask"):
        ot.ot_distance(v, torch.ones(1, 2, dtype=torch.bool), v, None)


def test_mean_pooled_cosine_against_numpy():
    g = torch.Generator().manual_seed(15)
    x, y = torch.randn(3, 6, 10, generator=g), torch.randn(3, 4, 10, generator=g)
    xm = torch.tensor([[1, 1, 0, 1, 0, 0], [1] * 6, [0] * 6], dtype=torch.bool)
    ym = torch.ones(3, 4, dtype=torch.bool)
    x[0, 2] = float("inf")  # padding garbage must not leak
    s = ot.mean_pooled_cosine(x, xm, y, ym)
    for k in range(2):
        px = x[k][xm[k]].double().numpy().mean(0)
        py = y[k].double().numpy().mean(0)
        assert s[k].item() == pytest.approx(px @ py / np.linalg.norm(px) / np.linalg.norm(py), abs=1e-6)
    assert s[2].item() == 0.0  # empty side
    # Docstring example.
    s_ex = ot.mean_pooled_cosine(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), None, torch.tensor([[[1.0, 0.0]]]), None)
    assert s_ex.item() == pytest.approx(1 / math.sqrt(2), abs=1e-7)
