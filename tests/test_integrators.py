"""The integrator math of training-free looping, on fields with closed-form answers (property-based)."""
import numpy as onp
import pytest
from hypothesis import given, settings, strategies as st
from scipy.linalg import expm

import tinyloop as tl

ALL_TABLEAUS = list(tl.TABLEAUS.values())


def linear_layer(A):
    """A pre-norm-style layer with a linear residual branch: x -> x + A x, on [..., d] states."""
    return lambda x: x + x @ A.T


def rand_A(rng, d, scale=0.3):
    return scale * rng.standard_normal((d, d)) / onp.sqrt(d)


mats = st.integers(0, 10_000).map(lambda s: onp.random.default_rng(s))


@settings(max_examples=30, deadline=None)
@given(rng=mats, K=st.integers(1, 12), T=st.integers(1, 4), d=st.integers(1, 5))
def test_damped_euler_is_the_matrix_power(rng, K, T, d):
    """damped Euler over one layer x + A x gives (I + A/K)^K x0."""
    A, x0 = rand_A(rng, d), rng.standard_normal((T, d))
    out = tl.loop_window([linear_layer(A)], x0, 0, 0, K, "euler")
    want = x0 @ onp.linalg.matrix_power(onp.eye(d) + A / K, K).T
    onp.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(rng=mats, K=st.integers(1, 12), beta=st.floats(0, 1), n=st.integers(1, 3))
def test_anchored_blend_closed_form_block_mode(rng, K, beta, n):
    """Block mode on a window of linear layers: g(x) = M x with M = prod(I + A_l), so
    rk = beta M x0 + (1 - beta) (I + (M - I)/K)^K x0 and naive = M^K x0."""
    d = 4
    As = [rand_A(rng, d) for _ in range(n)]
    M = onp.eye(d)
    for A in As:
        M = (onp.eye(d) + A) @ M
    x0 = rng.standard_normal((2, 3, d))                       # [B, T, d] states work too
    layers = [linear_layer(A) for A in As]
    euler = onp.linalg.matrix_power(onp.eye(d) + (M - onp.eye(d)) / K, K)
    rk = tl.loop_window(layers, x0, 0, n - 1, K, "rk", "block", beta)
    onp.testing.assert_allclose(rk, x0 @ (beta * M + (1 - beta) * euler).T, rtol=1e-10, atol=1e-12)
    naive = tl.loop_window(layers, x0, 0, n - 1, K, "naive", "block")
    onp.testing.assert_allclose(naive, x0 @ onp.linalg.matrix_power(M, K).T, rtol=1e-10, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(rng=mats, K=st.integers(1, 8), beta=st.floats(0, 1))
def test_per_layer_mode_applies_the_rule_per_layer(rng, K, beta):
    """mode "per_layer" (the authors' per_layer_anchored): the anchored rule on each layer in turn."""
    d = 3
    As = [rand_A(rng, d) for _ in range(3)]
    x0 = rng.standard_normal((5, d))
    want = x0
    for A in As:
        P = beta * (onp.eye(d) + A) + (1 - beta) * onp.linalg.matrix_power(onp.eye(d) + A / K, K)
        want = want @ P.T
    out = tl.loop_window([linear_layer(A) for A in As], x0, 0, 2, K, "rk", "per_layer", beta)
    onp.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)


def test_layers_outside_the_window_run_once():
    rng = onp.random.default_rng(0)
    d = 3
    As = [rand_A(rng, d) for _ in range(5)]
    x0 = rng.standard_normal((2, d))
    I = onp.eye(d)
    want = x0 @ (I + As[0]).T
    want = want @ onp.linalg.matrix_power(I + As[1] / 4, 4).T
    for A in As[2:]:
        want = want @ (I + A).T
    out = tl.loop_window([linear_layer(A) for A in As], x0, 1, 1, 4, "euler")
    onp.testing.assert_allclose(out, want, rtol=1e-12)


def test_damped_euler_converges_to_the_flow_at_rate_one_over_K():
    """(I + A/K)^K x0 -> expm(A) x0 with error ~ C/K: doubling K halves the error."""
    rng = onp.random.default_rng(1)
    A, x0 = rand_A(rng, 6, scale=1.0), rng.standard_normal(6)
    exact = expm(A) @ x0
    errs = [onp.linalg.norm(tl.loop_window([linear_layer(A)], x0, 0, 0, K, "euler") - exact)
            for K in (8, 16, 32, 64, 128)]
    ratios = onp.array(errs[:-1]) / onp.array(errs[1:])
    assert onp.all(onp.abs(ratios - 2.0) < 0.15), ratios


def empirical_order(tab, hs, seed=2):
    rng = onp.random.default_rng(seed)
    A, x0 = rand_A(rng, 5, scale=1.5), rng.standard_normal(5)
    exact = expm(A) @ x0
    errs = [onp.linalg.norm(tl.integrate(lambda x: A @ x, x0, tab, t1=1.0, h=h) - exact) for h in hs]
    return onp.polyfit(onp.log(hs), onp.log(errs), 1)[0]


@pytest.mark.parametrize("tab", ALL_TABLEAUS, ids=lambda t: t.name)
def test_measured_order_matches_declared_order(tab):
    """Step sizes that do NOT divide [0, 1]: the last step is shortened (torchdiffeq once shipped an RK4
    grid bug that only such step counts reveal)."""
    hs = 0.37 / 2.0 ** onp.arange(5)                     # 1/h = 2.70, 5.41, 10.8, 21.6, 43.2 steps
    assert abs(empirical_order(tab, hs) - tab.order) < 0.25


@settings(max_examples=25, deadline=None)
@given(h=st.floats(0.05, 1.0), t1=st.floats(0.1, 2.0))
def test_integrate_lands_exactly_on_the_end_point(h, t1):
    """On dx/dt = 1 every consistent tableau is exact, whatever the step grid: x(t1) = x0 + t1."""
    for tab in ALL_TABLEAUS:
        assert tl.integrate(lambda x: onp.ones_like(x), onp.zeros(2), tab, t1=t1, h=h) == pytest.approx([t1, t1])


@settings(max_examples=40, deadline=None)
@given(K=st.integers(1, 16), beta=st.floats(0, 1))
def test_tableau_consistency_conditions(K, beta):
    for tab in ALL_TABLEAUS + [tl.anchored_tableau(K, beta)]:
        s = len(tab.b)
        assert abs(sum(tab.b) - 1.0) < 1e-12                                  # consistency: sum b = 1
        for i in range(s):
            assert abs(sum(tab.A[i]) - tab.c[i]) < 1e-12                      # row-sum condition c_i = sum_j a_ij
            assert all(tab.A[i][j] == 0 for j in range(i, s))                # explicit: strictly lower
    if K == 3 and beta == 0.5:
        assert tl.anchored_tableau(3, 0.5).b == pytest.approx((2 / 3, 1 / 6, 1 / 6))


@settings(max_examples=30, deadline=None)
@given(rng=mats, K=st.integers(1, 10), beta=st.floats(0, 1))
def test_generic_rk_stepper_reproduces_the_anchored_rule(rng, K, beta):
    """One explicit-RK step of size 1 with the anchored tableau, on F_g = g - id, equals loop_rule 'rk' for a
    NONLINEAR g too (the tableau is the method, not a property of linear fields)."""
    W = rand_A(rng, 4)
    g = lambda x: x + onp.tanh(x @ W.T)
    x0 = rng.standard_normal((3, 4))
    by_tableau = tl.rk_step(lambda x: g(x) - x, x0, 1.0, tl.anchored_tableau(K, beta))
    onp.testing.assert_allclose(by_tableau, tl.loop_rule(g, x0, K, "rk", beta), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["midpoint", "heun", "rk4"])
def test_ablation_methods_integrate_the_window_field(method):
    """The paper's ablation: classical RK with h = 1/K on F_g; on a linear window field they converge to
    expm(M - I) x0 at their own order."""
    rng = onp.random.default_rng(3)
    A, x0 = rand_A(rng, 4, scale=1.0), rng.standard_normal(4)
    exact = expm(A) @ x0
    errs = [onp.linalg.norm(tl.loop_window([linear_layer(A)], x0, 0, 0, K, method) - exact) for K in (4, 8, 16)]
    order = onp.log2(errs[0] / errs[1]), onp.log2(errs[1] / errs[2])
    assert min(order) > tl.TABLEAUS[method].order - 0.3


# --- the authors' other rules (loop_qwen3.py `_iterate_loop`) on fields with closed forms ----------------------
# A linear window g(x) = M x (M = I + A: a layer x + A x), a state of T tokens [T, d]; P^K x0 means x0 @ (P^K)^T.
def apply(P, x):
    return x @ P.T


def power(P, K):
    return onp.linalg.matrix_power(P, K)


def linear_setup(rng, d=4, T=3):
    A = rand_A(rng, d)
    M = onp.eye(d) + A
    return M, (lambda x: x @ M.T), rng.standard_normal((T, d))


@settings(max_examples=25, deadline=None)
@given(rng=mats, K=st.integers(1, 10), alpha=st.floats(0.05, 1.0))
def test_ema_is_the_matrix_power_of_the_damped_map(rng, K, alpha):
    """ema: x_{k+1} = (1 - alpha) x_k + alpha M x_k, so x_K = ((1 - alpha) I + alpha M)^K x0."""
    M, g, x0 = linear_setup(rng)
    P = (1 - alpha) * onp.eye(len(M)) + alpha * M
    onp.testing.assert_allclose(tl.loop_rule(g, x0, K, "ema", alpha=alpha), apply(power(P, K), x0), rtol=1e-10, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(rng=mats, K=st.integers(1, 8), data=st.data())
def test_ema_sched_is_the_product_of_its_damped_maps(rng, K, data):
    alphas = data.draw(st.lists(st.floats(0.05, 1.0), min_size=K, max_size=K))
    M, g, x0 = linear_setup(rng)
    want = x0
    for a in alphas:
        want = apply((1 - a) * onp.eye(len(M)) + a * M, want)
    onp.testing.assert_allclose(tl.loop_rule(g, x0, K, "ema_sched", alphas=alphas), want, rtol=1e-10, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(rng=mats, K=st.integers(1, 10), alpha=st.floats(0.05, 1.0), mu=st.floats(0.0, 0.9))
def test_heavy_ball_is_a_linear_recurrence_of_order_two(rng, K, alpha, mu):
    """x_{k+1} = B x_k - mu x_{k-1}, B = (1 - alpha + mu) I + alpha M, x_{-1} = x_0: the companion matrix
    [[B, -mu I], [I, 0]] to the power K applied to (x_0, x_0)."""
    M, g, x0 = linear_setup(rng)
    d = len(M)
    B = (1 - alpha + mu) * onp.eye(d) + alpha * M
    C = onp.block([[B, -mu * onp.eye(d)], [onp.eye(d), onp.zeros((d, d))]])
    want = apply(power(C, K), onp.concatenate([x0, x0], axis=-1))[..., :d]
    got = tl.loop_rule(g, x0, K, "heavy_ball", alpha=alpha, momentum=mu)
    onp.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)


@settings(max_examples=25, deadline=None)
@given(rng=mats, m=st.floats(-0.9, 0.9).filter(lambda v: abs(v) > 0.05), shift=st.floats(-2, 2))
def test_anderson_history_one_is_not_the_secant_step_in_the_authors_form(rng, m, shift):
    """Textbook Anderson(1) (Walker-Ni type II, damping 1) is the secant method on f = g - id:
        x_2 = x_1 + f_1 - gamma (dX + dF),  gamma = <dF, f_1> / <dF, dF>,
    exact in one step when f is affine along the iterates (g(x) = m x + c coordinate-wise: f_1 is parallel to dF).
    The authors' code mixes x_2 = G_1 - gamma dF instead (no gamma dX term), which with damping 1 is
    x_1 + (f_1 - gamma dF): x_1 plus the least-squares residual, here ~0, so x_2 = x_1 (to the 1e-6 Tikhonov
    term) and later steps creep. tinyloop follows the authors; both facts are checked."""
    c = shift + 0.1 * rng.standard_normal((3, 4))
    g = lambda x: m * x + c
    x0 = rng.standard_normal((3, 4))
    x1 = g(x0)
    f0, f1 = g(x0) - x0, g(x1) - x1
    dF, dX = f1 - f0, x1 - x0
    gamma = onp.sum(dF * f1) / onp.sum(dF * dF)
    secant = x1 + f1 - gamma * (dX + dF)
    onp.testing.assert_allclose(secant, c / (1 - m), rtol=1e-9, atol=1e-9)           # textbook: the fixed point
    info = {}
    out = tl.loop_rule(g, x0, 2, "anderson", history=1, info=info)
    onp.testing.assert_allclose(out, x1, rtol=1e-5, atol=1e-5 * onp.abs(x1).max())       # authors: x_2 = x_1
    assert info == {"steps": 2, "evals": 2}


@settings(max_examples=25, deadline=None)
@given(rng=mats, neg=st.booleans())
def test_aitken_is_exact_on_a_geometric_sequence_unless_the_clip_binds(rng, neg):
    """g(x) = x* + r (x - x*) per coordinate makes x, g(x), g(g(x)) geometric: Aitken's delta^2 returns x*
    exactly. The authors clip each coordinate's change to |d1| = |1 - r| |x - x*|, which binds when
    |1 - r| < 1, i.e. r in (0, 1): then the step is exactly one plain pass, g(x)."""
    d = 6
    r = -rng.uniform(0.1, 0.9, d) if neg else rng.uniform(0.1, 0.9, d)
    xs = rng.standard_normal(d)
    g = lambda x: xs + r * (x - xs)
    x0 = xs + rng.choice([-1, 1], d) * rng.uniform(0.5, 2.0, d)
    info = {}
    out = tl.loop_rule(g, x0, 2, "aitken", info=info)
    onp.testing.assert_allclose(out, xs if neg else g(x0), rtol=1e-12, atol=1e-12)
    assert info == {"steps": 1, "evals": 2}


@settings(max_examples=25, deadline=None)
@given(rng=mats, K=st.integers(1, 10))
def test_residual_scaled_closed_form(rng, K):
    M, g, x0 = linear_setup(rng)
    want = x0 + apply(power(M, K) - onp.eye(len(M)), x0) / K                # x0 + (M^K - I) x0 / K
    onp.testing.assert_allclose(tl.loop_rule(g, x0, K, "residual_scaled"), want, rtol=1e-10, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(rng=mats, K=st.integers(1, 10), alpha=st.floats(0.05, 1.0))
def test_input_anchor_closed_form(rng, K, alpha):
    """x_{k+1} = alpha M x_k + (1 - alpha) x_0: x_K = (alpha M)^K x_0 + (1 - alpha) sum_{j<K} (alpha M)^j x_0."""
    M, g, x0 = linear_setup(rng)
    S = sum(power(alpha * M, j) for j in range(K))
    want = apply(power(alpha * M, K) + (1 - alpha) * S, x0)
    onp.testing.assert_allclose(tl.loop_rule(g, x0, K, "input_anchor", alpha=alpha), want, rtol=1e-10, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(rng=mats, K=st.integers(1, 8), data=st.data())
def test_poly_blend_closed_form(rng, K, data):
    w = onp.array(data.draw(st.lists(st.floats(0.0, 1.0), min_size=K + 1, max_size=K + 1)))
    w = w / w.sum() if w.sum() > 0 else onp.full(K + 1, 1 / (K + 1))
    M, g, x0 = linear_setup(rng)
    want = apply(sum(wk * power(M, k) for k, wk in enumerate(w)), x0)       # sum_k w_k M^k x0
    onp.testing.assert_allclose(tl.loop_rule(g, x0, K, "poly_blend", alphas=list(w)), want, rtol=1e-10, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(rng=mats, K=st.integers(1, 10), alpha=st.floats(0.05, 1.0))
def test_norm_stab_is_the_damped_power_at_the_entry_norm(rng, K, alpha):
    """Rescaling a token commutes with a linear map, so x_K = P^K x_0 rescaled, token by token, to |x_0|."""
    M, g, x0 = linear_setup(rng)
    y = apply(power((1 - alpha) * onp.eye(len(M)) + alpha * M, K), x0)
    want = y * (onp.linalg.norm(x0, axis=-1, keepdims=True) / onp.linalg.norm(y, axis=-1, keepdims=True))
    onp.testing.assert_allclose(tl.loop_rule(g, x0, K, "norm_stab", alpha=alpha), want, rtol=1e-10, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(rng=mats, K=st.integers(1, 6), n=st.integers(1, 3))
def test_uniform_keeps_the_running_mean_of_each_layers_outputs(rng, K, n):
    """uniform on a window of linear layers M_1..M_n: in pass t, layer j outputs M_j s, and the state passed
    on is the mean of layer j's outputs over passes 1..t."""
    d = 3
    Ms = [onp.eye(d) + rand_A(rng, d) for _ in range(n)]
    x0 = rng.standard_normal((2, d))
    outs = [[] for _ in range(n)]
    s = x0
    for _ in range(K):
        for j, M in enumerate(Ms):
            outs[j].append(apply(M, s))
            s = sum(outs[j]) / len(outs[j])
    got = tl.loop_window([lambda x, M=M: apply(M, x) for M in Ms], x0, 0, n - 1, K, "uniform")
    onp.testing.assert_allclose(got, s, rtol=1e-10, atol=1e-12)


def test_halting_stops_at_the_first_small_update_and_reports_the_steps():
    """ema on a contraction: ||x_{k+1} - x_k|| / ||x_k|| over the whole state falls every step; halting stops
    after the first step below halt_tau (that step's result is returned)."""
    rng = onp.random.default_rng(7)
    d = 4
    M = 0.5 * onp.eye(d) + 0.1 * rand_A(rng, d)
    g = lambda x: x @ M.T
    x0 = rng.standard_normal((3, d))
    P = 0.5 * onp.eye(d) + 0.5 * M
    seq = [apply(power(P, k), x0) for k in range(13)]
    ratios = [onp.linalg.norm(seq[k + 1] - seq[k]) / onp.linalg.norm(seq[k]) for k in range(12)]
    tau = 0.5 * (ratios[3] + ratios[4])                      # between the 4th and 5th update's ratio
    info = {}
    out = tl.loop_rule(g, x0, 12, "ema", halt_tau=tau, info=info)
    assert info == {"steps": 5, "evals": 5}
    onp.testing.assert_allclose(out, seq[5], rtol=1e-12)
    info = {}
    tl.loop_rule(g, x0, 12, "ema", halt_tau=1e-9, info=info)
    assert info == {"steps": 12, "evals": 12}                # never small enough: all K steps


@settings(max_examples=25, deadline=None)
@given(rng=mats, K=st.integers(1, 8), beta=st.floats(0, 1))
def test_layer_anchored_frozen_closed_form_on_a_linear_layer(rng, K, beta):
    """The authors' layer mode on a layer y = M x. Rescaling a token commutes with M, so with P = (1 - 1/K) I
    + M / K the iterate before the last sub-step is N_{K-1} P^{K-1} x / |P^{K-1} x| and the last sub-step
    applies P once more, unrescaled:  out = beta M x + (1 - beta) N_{K-1} P^K x / |P^{K-1} x|,
    N_k = |x| + (|M x| - |x|) k / K per token. At K = 1 the output is M x itself."""
    M, g, x0 = linear_setup(rng)
    P = (1 - 1 / K) * onp.eye(len(M)) + M / K
    nx, ny = (onp.linalg.norm(v, axis=-1, keepdims=True) for v in (x0, g(x0)))
    if K == 1:
        want = g(x0)
    else:
        N = nx + (ny - nx) * (K - 1) / K
        want = beta * g(x0) + (1 - beta) * N * apply(power(P, K), x0) / onp.linalg.norm(
            apply(power(P, K - 1), x0), axis=-1, keepdims=True)
    onp.testing.assert_allclose(tl.layer_anchored_frozen(g, x0, K, beta), want, rtol=1e-10, atol=1e-12)
    onp.testing.assert_allclose(tl.loop_window([g], x0, 0, 0, K, "rk", "layer", beta), want, rtol=1e-10, atol=1e-12)


# --- K = 1, as each docstring states it ---------------------------------------------------------------------------
def test_every_rule_at_K1_as_documented():
    """Bitwise g(x0) where the docstring says so; otherwise the stated one-step formula; aitken refuses K = 1."""
    rng = onp.random.default_rng(11)
    W = rand_A(rng, 4)
    g = lambda x: x + onp.tanh(x @ W.T)                      # nonlinear, so no rule is exact by accident
    x0 = rng.standard_normal((3, 4))
    y = g(x0)
    bitwise = {"naive": {}, "euler": {}, "rk": {"beta": 0.3}, "residual_scaled": {}, "uniform": {},
               "ema": {"alpha": 1.0}, "anderson": {}, "poly_blend": {"alphas": [0.0, 1.0]}}
    for m, kw in bitwise.items():
        assert onp.array_equal(tl.loop_rule(g, x0, 1, m, **kw), y), m
    a = 0.3
    formula = {"ema": ({"alpha": a}, (1 - a) * x0 + a * y),
               "ema_sched": ({"alphas": [a]}, (1 - a) * x0 + a * y),
               "input_anchor": ({"alpha": a}, (1 - a) * x0 + a * y),
               "heavy_ball": ({"alpha": a}, x0 + a * (y - x0)),
               "anderson": ({"damping": a}, (1 - a) * x0 + a * y),
               "poly_blend": ({"alphas": [0.25, 0.75]}, 0.25 * x0 + 0.75 * y),
               "norm_stab": ({"alpha": a}, None),
               "heun": ({}, 0.5 * (x0 + g(y)))}                # Heun, h = 1: (x0 + g(g(x0))) / 2
    for m, (kw, want) in formula.items():
        got = tl.loop_rule(g, x0, 1, m, **kw)
        if m == "norm_stab":
            e = (1 - a) * x0 + a * y
            want = e * onp.linalg.norm(x0, axis=-1, keepdims=True) / onp.linalg.norm(e, axis=-1, keepdims=True)
        onp.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14, err_msg=m)
    for m in ("midpoint", "rk4"):
        assert not onp.allclose(tl.loop_rule(g, x0, 1, m), y)
    with pytest.raises(ValueError, match="K"):
        tl.loop_rule(g, x0, 1, "aitken")


@pytest.mark.parametrize("method", tl.ALL_METHODS)
def test_evaluations_of_g_per_rule(method):
    """Each rule evaluates g K times (midpoint, heun 2K; rk4 4K), the natural pass included and never repeated."""
    calls = []
    g = lambda x: (calls.append(1), 0.9 * x + 0.1)[1]
    K = 4
    kw = {"ema_sched": {"alphas": [0.5] * K}, "poly_blend": {"alphas": [0.2] * (K + 1)}}.get(method, {})
    info = {}
    tl.loop_rule(g, onp.ones((2, 3)), K, method, info=info, **kw)
    want = K * {"midpoint": 2, "heun": 2, "rk4": 4}.get(method, 1)
    assert len(calls) == info["evals"] == want
    calls.clear()
    tl.loop_rule(g, onp.ones((2, 3)), K, method, y0=g(onp.ones((2, 3))), **kw)     # natural pass given
    assert len(calls) == want
