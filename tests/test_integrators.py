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
def test_layer_mode_applies_the_rule_per_layer(rng, K, beta):
    d = 3
    As = [rand_A(rng, d) for _ in range(3)]
    x0 = rng.standard_normal((5, d))
    want = x0
    for A in As:
        P = beta * (onp.eye(d) + A) + (1 - beta) * onp.linalg.matrix_power(onp.eye(d) + A / K, K)
        want = want @ P.T
    out = tl.loop_window([linear_layer(A) for A in As], x0, 0, 2, K, "rk", "layer", beta)
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
