"""Entropic optimal transport between hidden-state sequences: the distance W of the grounded reward.

The method, top to bottom in the order of its equations (method.md §8 to §11):
    cosine_cost            C_jk = max(0, 1 - cos(x_j, y_k))                                       §8
    norm_softmax_marginal  a = softmax of the hidden-state L2 norms over the valid tokens           §9
    sinkhorn               entropic plan T, the textbook log-domain Sinkhorn iteration              §10
    ot_distance            W = <T, C>                                                              §11
    mean_pooled_cosine     the "cosine instead of OT" ablation                                     §19
Below them: `sinkhorn_fast`, the same iterates computed by log-stabilised scaling, which `ot_distance` runs
because at the paper's sizes it is several times faster on CPU (bench/bench_sinkhorn.py measures both against
POT; tests compare it with `sinkhorn`); then the input checks that the public functions call.

Pure torch, batched over problems. Rows/columns of different lengths share one batch through zero-mass
entries (padding). Sinkhorn always runs in float64, whatever the dtype of the inputs (hidden states may be
bf16); the cosine cost matrix is one batched matmul in float32 (float64 if the inputs are float64).

Note: this module's import name is `ot`, the same as the POT package. Benchmarks that need both load this file
under another module name (see bench/bench_sinkhorn.py).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

# Norm guard for cosine: vectors shorter than this count as zero vectors (cos = 0, cost = 1).
_NORM_GUARD = 1e-12


def cosine_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """method.md §8, cost: C_jk = max(0, 1 - cos(x_j, y_k)), [B, n, D] x [B, m, D] -> [B, n, m].

    One batched matmul in float32 (float64 inputs stay float64). A zero vector has cos = 0 with anything,
    i.e. cost 1. Values are also clipped at 2, which only removes rounding beyond cos = -1.
    Example: x = [[1, 0]], y = [[1, 0], [0, 3], [-2, 0]] gives [[0, 1, 2]].
    """
    _check_pair("cosine_cost", x, None, y, None)
    cos = torch.bmm(_unit_rows(x), _unit_rows(y).transpose(1, 2))  # [B, n, m]
    return (1.0 - cos).clamp_(0.0, 2.0)


def _unit_rows(h: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm in float32 (float64 stays float64); near-zero rows become 0."""
    h = h.to(torch.promote_types(h.dtype, torch.float32))
    return h / torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp_min(_NORM_GUARD)


def norm_softmax_marginal(h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """method.md §9, marginal: softmax over valid tokens of the hidden-state L2 norms, [B, n, D] -> [B, n].

    float64; exactly 0 on padding; a row without valid tokens is all 0 (an empty side).
    Example: norms [1, 2, 5] with mask [1, 1, 0] give [e^1, e^2, 0] / (e^1 + e^2) = [0.269, 0.731, 0].
    """
    mask = _check_states("norm_softmax_marginal", h, mask)
    norms = torch.linalg.vector_norm(h, dim=-1, dtype=torch.promote_types(h.dtype, torch.float32))  # [B, n]
    logits = torch.where(mask, norms.to(torch.float64), -math.inf)  # [B, n]
    probs = torch.softmax(logits, dim=-1)  # [B, n]; NaN on rows that are all -inf
    return torch.where(mask.any(dim=1, keepdim=True), probs, 0.0)


@torch.no_grad()
def sinkhorn(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, n_iter: int = 50) -> torch.Tensor:
    """Entropic OT plan by the textbook log-domain Sinkhorn iteration (method.md §10), batched and masked.

    cost [B, n, m], marginals a [B, n] and b [B, m] of equal total mass, eps > 0 -> plan T [B, n, m] float64.
    From f = g = 0, n_iter times (columns first, then rows; the order of POT's `sinkhorn_log`):
        g_k = eps log b_k - eps log sum_j exp((f_j - C_jk) / eps)
        f_j = eps log a_j - eps log sum_k exp((g_k - C_jk) / eps)
    then T_jk = exp((f_j + g_k - C_jk) / eps). The code keeps f / eps and g / eps. After the last iteration
    the rows of T match a exactly; the columns match b up to the error that more iterations would remove.

    Padding: a_j = 0 or b_k = 0 marks a padded row/column. Its plan entries are exactly 0 and the rest equals
    the unpadded problem; cost values on padded pairs are ignored (may even be NaN). A problem whose a or b
    has zero total mass gets an all-zero plan. No gradient flows (none through W, method.md §11).

    This is the reference. `ot_distance` runs `sinkhorn_fast`, which computes the same iterates faster.
    Example: C = [[0, 1], [1, 0]], a = b = [0.5, 0.5], eps = 0.1 gives T = [[s, r], [r, s]] / (2 (1 + e^-10))
    with s = 1, r = e^-10, so W = <T, C> = e^-10 / (1 + e^-10) ~= 4.54e-5.
    """
    _check_problem(cost, a, b, eps, n_iter)
    a, b = a.to(torch.float64), b.to(torch.float64)  # [B, n], [B, m]
    live = (a.sum(1) > 0) & (b.sum(1) > 0)  # [B] problems with mass on both sides
    rows, cols = (a > 0) & live[:, None], (b > 0) & live[:, None]  # [B, n], [B, m]
    # log of the Gibbs kernel K = exp(-C / eps); -inf on padded pairs, so padding never enters a sum
    log_k = torch.where(rows[:, :, None] & cols[:, None, :], cost.to(torch.float64) / -eps, -math.inf)
    f, g = torch.zeros_like(a), torch.zeros_like(b)  # f / eps [B, n], g / eps [B, m]
    for _ in range(n_iter):
        g = torch.where(cols, b.log() - torch.logsumexp(log_k + f[:, :, None], dim=1), -math.inf)
        f = torch.where(rows, a.log() - torch.logsumexp(log_k + g[:, None, :], dim=2), -math.inf)
    return torch.exp(log_k + f[:, :, None] + g[:, None, :])


def ot_distance(x: torch.Tensor, x_mask: torch.Tensor | None, y: torch.Tensor, y_mask: torch.Tensor | None,
                eps: float = 0.08, n_iter: int = 50) -> torch.Tensor:
    """method.md §11: W = <T, C> between hidden-state sequences, [B, n, D] vs [B, m, D] -> W [B] float64.

    C = cosine_cost(x, y), marginals = norm_softmax_marginal on each side, T = sinkhorn(C, a, b, eps, n_iter)
    (computed by `sinkhorn_fast`).
    W is the transport cost only (no entropy term), in [0, 2]. A problem with no valid token on either side
    gets W = 1 (the cost of two orthogonal sequences). No gradient flows (computed under no_grad).
    Example: identical one-token sequences give W = 0; a token and its negation give W = 2.
    """
    x_mask, y_mask = _check_pair("ot_distance", x, x_mask, y, y_mask)  # bool [B, n], [B, m]
    with torch.no_grad():
        cost = cosine_cost(x, y)  # [B, n, m] float32; Sinkhorn converts it to float64 block by block
        a = norm_softmax_marginal(x, x_mask)  # [B, n]
        b = norm_softmax_marginal(y, y_mask)  # [B, m]
        plan = sinkhorn_fast(cost, a, b, eps, n_iter).plan  # [B, n, m]; the iterates of `sinkhorn`
        w = plan.mul_(torch.nan_to_num(cost)).sum(dim=(1, 2))  # [B]; padded cost may be NaN, its plan is 0
        empty = ~(x_mask.any(1) & y_mask.any(1))  # [B]
        return torch.where(empty, 1.0, w)


def mean_pooled_cosine(x: torch.Tensor, x_mask: torch.Tensor | None, y: torch.Tensor,
                       y_mask: torch.Tensor | None) -> torch.Tensor:
    """Cosine similarity of the mean-pooled valid tokens, [B, n, D] vs [B, m, D] -> [B] float64 in [-1, 1].

    The "cosine instead of OT" ablation (method.md §19). Pooling is a plain mean over valid tokens, in
    float32 (float64 inputs stay float64). An empty side, or a pooled vector of norm < 1e-12, gives 0, the
    similarity of orthogonal vectors (matching W = 1 for OT).
    Example: x tokens [1, 0], [0, 1] pool to [0.5, 0.5]; against y = [[1, 0]] the cosine is 1/sqrt(2).
    """
    x_mask, y_mask = _check_pair("mean_pooled_cosine", x, x_mask, y, y_mask)  # bool [B, n], [B, m]

    def pooled(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = h.to(torch.promote_types(h.dtype, torch.float32))
        h = torch.where(mask[:, :, None], h, 0.0)  # [B, n, D]; padding may hold garbage
        return h.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)  # [B, D]

    with torch.no_grad():
        px = _unit_rows(pooled(x, x_mask)).to(torch.float64)  # [B, D]
        py = _unit_rows(pooled(y, y_mask)).to(torch.float64)  # [B, D]
        return (px * py).sum(-1).clamp(-1.0, 1.0)  # [B]


# ----------------------------------------------------------------- fast Sinkhorn: the iterates of `sinkhorn` by scaling

# sinkhorn_fast: |log u|, |log v| above this trigger a log-domain step. Kernel entries are <= max(a) right after
# a log-domain step, so scalings within exp(+-100) keep every product far from float64 overflow (~e^709), and
# mass lost to kernel entries that underflowed (< e^-745) can grow back to at most e^(-745 + 200): negligible.
_LOG_SCALING_LIMIT = 100.0
_MIN_SCALING, _MAX_SCALING = math.exp(-_LOG_SCALING_LIMIT), math.exp(_LOG_SCALING_LIMIT)
# sinkhorn_fast on CPU works through the batch in blocks of about this many bytes of float64 [n, m] matrices, so
# the ~100 passes per block (cost, kernel, 2 matrix-vector products per iteration) hit a core's L2 cache, not L3
# or memory (measured at the tiny preset's sizes, 20 x 66 x 344: 2 MiB blocks 25 % faster than 4 MiB ones).
_CPU_BLOCK_BYTES = 2 << 20


class SinkhornResult(NamedTuple):
    """Output of `sinkhorn_fast`.

    plan: [B, n, m] float64 transport plan, exactly 0 on padded rows/columns.
    marginal_err: [B] float64, ||T 1 - a||_1 + ||T^T 1 - b||_1 (misplaced mass, same units as a and b).
    n_iter: Sinkhorn iterations actually run (< requested only when `tol` stopped early).
    log_steps: how many of them ran in the log domain (iteration 1 always does; see `sinkhorn_fast`).
    """

    plan: torch.Tensor
    marginal_err: torch.Tensor
    n_iter: int
    log_steps: int


@torch.no_grad()
def sinkhorn_fast(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, n_iter: int = 50,
                  tol: float | None = None) -> SinkhornResult:
    """The iterates of `sinkhorn` (method.md §10), computed by log-stabilised scaling; also the marginal error.

    Why it exists: a logsumexp over [n, m] per half-iteration costs one exp per matrix entry, 100 times per
    call. Here iteration 1 runs in the log domain (safe for any eps), then the kernel K = exp((f + g - C)/eps)
    is formed once and later iterations run as v = b / (K^T u), u = a / (K v): two matrix-vector products.
    Whenever a scaling leaves exp(+-100) or is not finite (tiny eps), that iteration is redone in the log
    domain from the last good state (u, v absorbed into f, g) and K is rebuilt. Both routes compute the same
    iterates as `sinkhorn` (tested against it at equal iteration counts). On CPU the batch is solved in blocks
    of ~2 MiB of float64 [n, m] matrices (_cpu_blocks), so every pass over the matrices stays in cache;
    other devices take the whole batch at once. bench/bench_sinkhorn.py measures it against `sinkhorn` and POT.

    Inputs, padding and output plan as for `sinkhorn`; an empty problem also gets marginal_err = 0.
    tol: if given, stop once every problem's column error ||T^T 1 - b||_1 <= tol (rows are exact then).
    n_iter and log_steps of the result are the largest over the blocks.
    """
    _check_problem(cost, a, b, eps, n_iter)
    a64, b64 = a.to(torch.float64), b.to(torch.float64)  # [B, n], [B, m]
    live = (a64.sum(1) > 0) & (b64.sum(1) > 0)  # [B] problems with mass on both sides
    B, n, m = cost.shape
    blocks = _cpu_blocks(B, 8 * n * m) if cost.device.type == "cpu" else [slice(0, B)]
    plan = torch.empty(B, n, m, dtype=torch.float64, device=cost.device)  # [B, n, m]
    err = torch.zeros(B, dtype=torch.float64, device=cost.device)  # [B]
    done = log_steps = 1
    for k in blocks:
        d, l = _sinkhorn_fast_block(cost[k], a64[k], b64[k], live[k], eps, n_iter, tol, plan[k], err[k])
        done, log_steps = max(done, d), max(log_steps, l)
    return SinkhornResult(plan, err, done, log_steps)


def _cpu_blocks(n_problems: int, problem_bytes: int) -> list[slice]:
    """The batch cut into blocks of nearly equal size, each about _CPU_BLOCK_BYTES.

    A block holds at least two problems whenever one fits in the budget: on a single problem the batched
    matrix-vector product takes another kernel whose rounding differs, and a problem's plan should not depend on
    how the batch happens to be cut. Example: 20 problems of 290 KB in 2 MiB: 7 fit, blocks of 6, 7 and 7.
    """
    if n_problems == 0:
        return []
    fit = max(1, _CPU_BLOCK_BYTES // max(1, problem_bytes))
    smallest = 2 if problem_bytes <= _CPU_BLOCK_BYTES else 1
    count = min(-(-n_problems // fit), max(1, n_problems // smallest))
    bounds = [n_problems * i // count for i in range(count + 1)]
    return [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


def _sinkhorn_fast_block(cost: torch.Tensor, a64: torch.Tensor, b64: torch.Tensor, live: torch.Tensor, eps: float,
                         n_iter: int, tol: float | None, plan_out: torch.Tensor,
                         err_out: torch.Tensor) -> tuple[int, int]:
    """Solve the problems of one block (see `sinkhorn_fast`), writing plan_out [b, n, m] and err_out [b].

    Returns (iterations run, of which in the log domain).
    """
    rows = (a64 > 0) & live[:, None]  # [b, n]
    cols = (b64 > 0) & live[:, None]  # [b, m]
    # -C/eps, -inf on padding; in place on a private float64 copy (the [b, n, m] passes are the costly ones)
    neg_c = cost.to(torch.float64, copy=True).div_(-eps)  # [b, n, m]
    neg_c.masked_fill_(~rows[:, :, None], -math.inf).masked_fill_(~cols[:, None, :], -math.inf)
    log_a = torch.log(a64)  # [b, n]; -inf on padding, masked again wherever used
    log_b = torch.log(b64)  # [b, m]

    # Iteration 1 in the log domain from f = g = 0 (potentials kept dimensionless: lf = f/eps, lg = g/eps).
    lf, lg = _log_domain_step(neg_c, log_a, log_b, None, rows, cols)
    kernel = _gibbs_kernel(neg_c, lf, lg, out=torch.empty_like(neg_c))  # [b, n, m]; the current plan
    # Scalings start at 1. Padded ones stay 1 rather than 0: their kernel rows/columns are exactly 0, so the
    # products below are the same bits either way, and every scaling can be range-checked without a mask.
    u, v = torch.ones_like(a64), torch.ones_like(b64)  # [b, n], [b, m]
    done, log_steps = 1, 1
    while done < n_iter:
        kt_u = (u[:, None, :] @ kernel).squeeze(1)  # [b, m]; column sums of the plan are v * kt_u
        if tol is not None:
            col_err = (v * kt_u - b64).abs().mul(cols).sum(1)  # [b]
            if bool((col_err <= tol).all()):
                break
        v_new = torch.where(cols, b64 / kt_u, 1.0)  # [b, m]
        u_new = torch.where(rows, a64 / (kernel @ v_new[:, :, None]).squeeze(2), 1.0)  # [b, n]
        if _scalings_ok(u_new) and _scalings_ok(v_new):
            u, v = u_new, v_new
        else:  # absorb the last good scalings, redo this iteration in the log domain, rebuild K
            lf = torch.where(rows, lf + torch.log(u), -math.inf)
            lg = torch.where(cols, lg + torch.log(v), -math.inf)
            lf, lg = _log_domain_step(neg_c, log_a, log_b, lf, rows, cols)
            kernel = _gibbs_kernel(neg_c, lf, lg, out=kernel)
            u, v = torch.ones_like(a64), torch.ones_like(b64)
            log_steps += 1
        done += 1
    plan = torch.mul(kernel, u[:, :, None], out=plan_out).mul_(v[:, None, :])  # [b, n, m]
    err_out.copy_((plan.sum(2) - a64).abs().mul(rows).sum(1) + (plan.sum(1) - b64).abs().mul(cols).sum(1))
    return done, log_steps


def _log_domain_step(neg_c: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, lf: torch.Tensor | None,
                     rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One iteration of `sinkhorn` on the dimensionless potentials lf = f/eps, lg = g/eps; `neg_c` is -C/eps
    with -inf on padded pairs, padded potentials are -inf. lf None: the first iteration, from lf = 0."""
    lse_cols = torch.logsumexp(neg_c if lf is None else neg_c + lf[:, :, None], dim=1)  # [B, m]
    lg = torch.where(cols, log_b - lse_cols, -math.inf)  # [B, m]
    lse_rows = torch.logsumexp(neg_c + lg[:, None, :], dim=2)  # [B, n]
    lf = torch.where(rows, log_a - lse_rows, -math.inf)  # [B, n]
    return lf, lg


def _scalings_ok(u: torch.Tensor) -> bool:
    """True when every scaling is within [exp(-_LOG_SCALING_LIMIT), exp(+_LOG_SCALING_LIMIT)]: positive, finite
    and small enough. Padded scalings are 1 (see _sinkhorn_fast_block), so they always pass; NaN never does."""
    if u.numel() == 0:
        return True
    low, high = torch.aminmax(u)
    return bool(low >= _MIN_SCALING) and bool(high <= _MAX_SCALING)


def _gibbs_kernel(neg_c: torch.Tensor, lf: torch.Tensor, lg: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """K = exp(-C/eps + lf + lg) [b, n, m], written into `out` (the plan of the potentials lf, lg)."""
    return torch.add(neg_c, lf[:, :, None], out=out).add_(lg[:, None, :]).exp_()


# --------------------------------------------------------------------------------------------------------- input checks

# Relative tolerance for "a and b carry the same total mass".
_MASS_RTOL = 1e-6


def _check_problem(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, n_iter: int) -> None:
    """Raise ValueError with the offending value for malformed Sinkhorn inputs (shapes, eps, n_iter, marginals
    finite and >= 0 with equal total mass, cost finite wherever both marginals are > 0)."""
    if cost.dim() != 3:
        raise ValueError(f"sinkhorn: cost must be [B, n, m], got shape {tuple(cost.shape)}")
    B, n, m = cost.shape
    if tuple(a.shape) != (B, n) or tuple(b.shape) != (B, m):
        raise ValueError(
            f"sinkhorn: marginals must be a [{B}, {n}] and b [{B}, {m}] for cost {tuple(cost.shape)}, "
            f"got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"sinkhorn: eps must be a finite number > 0, got {eps!r}")
    if not (isinstance(n_iter, int) and n_iter >= 1):
        raise ValueError(f"sinkhorn: n_iter must be an int >= 1, got {n_iter!r}")
    for name, marg in (("a", a), ("b", b)):
        bad = ~torch.isfinite(marg) | (marg < 0)
        if bad.any():
            k, i = (int(t) for t in bad.nonzero()[0])
            raise ValueError(f"sinkhorn: marginal {name}[{k}, {i}] = {marg[k, i].item()!r}; need finite and >= 0")
    mass_a, mass_b = a.to(torch.float64).sum(1), b.to(torch.float64).sum(1)  # [B]
    live = (mass_a > 0) & (mass_b > 0)
    mismatch = live & ((mass_a - mass_b).abs() > _MASS_RTOL * torch.maximum(mass_a, mass_b))
    if mismatch.any():
        k = int(mismatch.nonzero()[0, 0])
        raise ValueError(
            f"sinkhorn: problem {k} has total mass sum(a) = {mass_a[k].item():.9g} but sum(b) = "
            f"{mass_b[k].item():.9g}; balanced OT needs them equal"
        )
    if bool(torch.isfinite(cost).all()):  # the usual case, one pass; else find a non-finite entry at a valid pair
        return
    bad_cost = (a > 0)[:, :, None] & (b > 0)[:, None, :] & ~torch.isfinite(cost)  # [B, n, m]
    if bad_cost.any():
        k, i, j = (int(t) for t in bad_cost.nonzero()[0])
        raise ValueError(f"sinkhorn: cost[{k}, {i}, {j}] = {cost[k, i, j].item()!r} at a valid pair; need finite")


def _check_states(name: str, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Validate hidden states [B, n, D] and return the mask as bool [B, n] (all True when None)."""
    if h.dim() != 3:
        raise ValueError(f"{name}: hidden states must be [B, n, D], got shape {tuple(h.shape)}")
    if mask is None:
        return torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
    if tuple(mask.shape) != tuple(h.shape[:2]):
        raise ValueError(f"{name}: mask must be {list(h.shape[:2])}, got {list(mask.shape)}")
    return mask.to(torch.bool)


def _check_pair(name: str, x: torch.Tensor, x_mask: torch.Tensor | None, y: torch.Tensor,
                y_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate x [B, n, D] and y [B, m, D] (same B and D) with their masks; return the masks as bool."""
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"{name}: need x [B, n, D] and y [B, m, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    return _check_states(f"{name} (x)", x, x_mask), _check_states(f"{name} (y)", y, y_mask)
