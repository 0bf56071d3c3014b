"""Section 10: the training-free loop rules at test time on a trained looped model, and the loop map's spectrum.

Checked against independent computations: the trained forward itself (bitwise), the float64 reference model of
tests/reference.py, closed forms on a linear loop map, finite-difference Jacobians and their eigenvalues."""
import numpy as onp
import pytest
from hypothesis import given, settings, strategies as st

import tinyloop as tl
from reference import model as ref_model, random_params

LOOPED = ("LT", "LT_i", "LT_ia", "FLT_res", "FLT")
CFG = tl.Config(vocab=tl.VOCAB, d_model=8, n_heads=2, n_layers=2, seq_len=8, dtype="float64")
CFG32 = tl.Config(vocab=tl.VOCAB, d_model=8, n_heads=2, n_layers=2, seq_len=8)


def toks(B=2, T=5, seed=0):
    return onp.random.default_rng(seed).integers(0, tl.VOCAB, (B, T))


@pytest.mark.parametrize("variant", LOOPED)
def test_every_rule_at_K_train_and_naive_beyond_are_the_trained_forward_bitwise(variant):
    """float32, the dtype train_toy trains in: K = K_train under every rule, and naive at any K, are the trained
    model's own forward, bit for bit; damped with s = 1 is naive, bit for bit."""
    params, x = random_params(tl, CFG32, seed=3), toks()
    K_train = 3
    for rule in tl.TEST_TIME_RULES:
        logits, h = tl.continue_loops(params, x, CFG32, variant, K_train, K_train, rule)
        want, diag = tl.forward(params, x, CFG32, variant, K_train)
        assert onp.array_equal(logits, want) and onp.array_equal(h, diag["h"])
    for K in (1, 2, 5, 7):
        assert onp.array_equal(tl.continue_loops(params, x, CFG32, variant, K_train, K, "naive")[0],
                               tl.forward(params, x, CFG32, variant, K)[0])
        assert onp.array_equal(tl.continue_loops(params, x, CFG32, variant, K_train, K, "damped", s=1.0)[0],
                               tl.forward(params, x, CFG32, variant, K)[0])


@pytest.mark.parametrize("variant", LOOPED)
def test_rules_against_a_float64_reference(variant):
    """Every rule against the independent reference model (tests/reference.py) and the rules written out here:
    the loop state is h_K = n(x at the end of loop K), recovered from the reference's own loops."""
    params, x = random_params(tl, CFG, seed=4), toks(B=1)
    K_train, M, s, beta = 3, 3, 0.3, 0.4
    Phi = tl.loop_map(params, x, CFG, variant)
    # naive past K_train: the reference model at K_train + M loops
    want = ref_model(params, x[0], CFG, variant, K_train + M)
    onp.testing.assert_allclose(tl.continue_loops(params, x, CFG, variant, K_train, K_train + M)[0][0], want,
                                rtol=1e-10, atol=1e-10)
    hs = [tl.forward(params, x, CFG, variant, k)[1]["h"] for k in range(1, K_train + 1)]
    h = hs[-1]
    for _ in range(M):
        h = h + s * (Phi(h) - h)                                               # damped, as written in [TFL]
    got = tl.continue_loops(params, x, CFG, variant, K_train, K_train + M, "damped", s=s)[1]
    onp.testing.assert_allclose(got, h, rtol=1e-12, atol=1e-12)
    z = hs[-2]
    for _ in range(M + 1):
        z = z + (Phi(z) - z) / (M + 1)                                         # damped Euler over the last loop
    got = tl.continue_loops(params, x, CFG, variant, K_train, K_train + M, "rk", beta=beta)[1]
    onp.testing.assert_allclose(got, beta * hs[-1] + (1 - beta) * z, rtol=1e-12, atol=1e-12)


def test_loop_map_is_one_later_loop_and_depends_on_the_state():
    params, x = random_params(tl, CFG, seed=5), toks()
    for variant in LOOPED:
        h1 = tl.forward(params, x, CFG, variant, 1)[1]["h"]
        Phi = tl.loop_map(params, x, CFG, variant)
        onp.testing.assert_array_equal(Phi(Phi(h1)), tl.forward(params, x, CFG, variant, 3)[1]["h"])
        onp.testing.assert_array_equal(tl.forward(params, x, CFG, variant, 2, h0=h1)[1]["h"], Phi(Phi(h1)))
        assert not onp.allclose(Phi(h1), Phi(-h1))


# --- closed forms on a linear loop map --------------------------------------------------------------------------
def linear_map(d, lams, rng):
    """g(x) = c + A (x - c), A = Q diag(lams) Q^T symmetric with the given eigenvalues; returns (g, A, Q, c)."""
    Q = onp.linalg.qr(rng.standard_normal((d, d)))[0]
    A = Q @ onp.diag(lams) @ Q.T
    c = rng.standard_normal(d)
    return (lambda x: c + (x - c) @ A.T), A, Q, c


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), M=st.integers(1, 9), d=st.integers(2, 6))
def test_damped_half_step_removes_the_period_2_mode_exactly(seed, M, d):
    """A mode with eigenvalue -1 flips sign every naive loop forever (period 2); the damped rule at s = 1/2 maps
    it to 1 - 2s = 0 and removes it in one step: x_M - c = ((I + A) / 2)^M (x_0 - c), the -1 mode's component 0."""
    rng = onp.random.default_rng(seed)
    lams = onp.concatenate([[-1.0], rng.uniform(-0.9, 0.9, d - 1)])
    g, A, Q, c = linear_map(d, lams, rng)
    coords = rng.standard_normal((3, d))
    coords[:, 0] = rng.choice([-1, 1], 3) * rng.uniform(0.5, 2.0, 3)         # a sizeable -1 mode in every row
    x0 = c + coords @ Q.T
    naive = [tl.loop_rule(g, x0, k, "naive") for k in (M, M + 1, M + 2)]
    v0 = (x0 - c) @ Q[:, 0]                                                    # the -1 mode's coordinate
    onp.testing.assert_allclose((naive[0] - c) @ Q[:, 0], (-1) ** M * v0, rtol=1e-9, atol=1e-9)
    onp.testing.assert_allclose((naive[1] - c) @ Q[:, 0], -(naive[0] - c) @ Q[:, 0], rtol=1e-9, atol=1e-9)
    onp.testing.assert_allclose((naive[2] - c) @ Q[:, 0], (naive[0] - c) @ Q[:, 0], rtol=1e-9, atol=1e-9)
    damped = tl.loop_rule(g, x0, M, "ema", alpha=0.5)
    want = c + (x0 - c) @ onp.linalg.matrix_power((onp.eye(d) + A) / 2, M).T
    onp.testing.assert_allclose(damped, want, rtol=1e-10, atol=1e-10)
    onp.testing.assert_allclose((damped - c) @ Q[:, 0], 0.0, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), M=st.integers(1, 9), s=st.floats(0.05, 1.0))
def test_damped_step_maps_each_eigenvalue_to_one_minus_s_plus_s_lambda(seed, M, s):
    rng = onp.random.default_rng(seed)
    d = 4
    lams = rng.uniform(-2.0, 1.0, d)
    g, A, Q, c = linear_map(d, lams, rng)
    x0 = rng.standard_normal((2, d))
    got = tl.loop_rule(g, x0, M, "ema", alpha=s)
    onp.testing.assert_allclose((got - c) @ Q, ((x0 - c) @ Q) * (1 - s + s * lams) ** M, rtol=1e-9, atol=1e-9)


# --- the Jacobian and its spectrum ------------------------------------------------------------------------------
def fd_jacobian(Phi, h, eps=1e-6):
    """Central finite differences, column by column: [B, T, d, B, T, d]."""
    cols = []
    for k in range(h.size):
        e = onp.zeros(h.size)
        e[k] = eps
        e = e.reshape(h.shape)
        cols.append((Phi(h + e) - Phi(h - e)) / (2 * eps))
    return onp.moveaxis(onp.array(cols).reshape(h.shape + h.shape), [0, 1, 2], [3, 4, 5])


@pytest.mark.parametrize("variant", LOOPED)
def test_jacobian_and_spectrum_against_finite_differences(variant):
    params, x = random_params(tl, CFG, seed=6), toks(B=2, T=4)
    B, T, d = 2, 4, CFG.d_model
    h = tl.forward(params, x, CFG, variant, 2)[1]["h"]
    fd = fd_jacobian(tl.loop_map(params, x, CFG, variant), h)                  # [b,t,i,b',s,j]
    onp.testing.assert_allclose(fd[0, :, :, 1], 0.0, atol=1e-9)               # sequences do not interact
    want = onp.stack([fd[b, :, :, b] for b in range(B)])                       # [b,t,i,s,j]
    J = tl.loop_jacobian(params, x, CFG, variant, h)
    onp.testing.assert_allclose(J, want, rtol=1e-6, atol=1e-7)
    for t in range(T):                                                         # causal: block lower-triangular
        onp.testing.assert_allclose(want[:, t, :, t + 1:], 0.0, atol=1e-9)
    lam = tl.loop_spectrum(params, x, CFG, variant, h)                         # [B, T, d]
    for b in range(B):                                                         # = eigenvalues of the whole J
        full = onp.linalg.eigvals(want[b].reshape(T * d, T * d))
        ours = lam[b].reshape(-1)
        dist = onp.abs(full[:, None] - ours[None, :])
        assert dist.min(1).max() < 1e-5 and dist.min(0).max() < 1e-5


def test_spectrum_summary_reads_the_eigenvalues():
    lam = onp.zeros((1, 3, 2), complex)
    lam[0, 0] = [-3.0, 0.1]                                                    # not scored
    lam[0, 1] = [-1.5, 0.2 + 0.9j]
    lam[0, 2] = [0.5, 1j * 1.2]
    out = tl.spectrum_summary(lam, onp.array([[False, True, True]]))
    assert out["dominant"] == [-1.5, 0.0] and out["most_negative"] == [-1.5, 0.0]
    assert out["frac_unstable"] == 1.0 and out["frac_flip"] == 0.5 and out["tokens"] == 2
    assert out["damped_radius"] == pytest.approx(abs(0.5 + 0.5 * 1.2j))       # 1 - s + s lambda at s = 1/2


def test_sweep_gives_the_states_of_continue_loops():
    params = random_params(tl, CFG32, seed=7)
    batch = tl.make_batch(("copy", "parity"), 6, 8, onp.random.default_rng(0), n=3)
    out = tl.sweep_test_time_rules(params, CFG32, "FLT", batch, K_train=2, K_max=5, tasks=("copy", "parity"),
                                   n_spectrum=2)
    for rule in tl.TEST_TIME_RULES:
        for K in range(1, 6):
            logits, _ = tl.continue_loops(params, batch["tokens"], CFG32, "FLT", 2, K, rule)
            acc = tl.per_task_accuracy(logits, batch, ("copy", "parity"))
            assert out["downstream"][rule][K - 1] == onp.mean(list(acc.values()))
    assert set(out["spectrum"]) == {"trained", "damped"} and out["period2"]["step2"] is not None
    tl.write_json("/dev/null", out)                                            # JSON-able


def test_bad_arguments_name_the_argument():
    params, x = random_params(tl, CFG, seed=8), toks()
    h = tl.forward(params, x, CFG, "FLT", 1)[1]["h"]
    with pytest.raises(ValueError, match="h0"):
        tl.forward(params, x, CFG, "FLT", 2, h0=h[:, :3])
    with pytest.raises(ValueError, match="h0"):
        tl.forward(params, x, CFG, "standard", h0=h)
    for kw, name in [(dict(rule="ode"), "rule"), (dict(s=0.0), "s"), (dict(s=1.5), "s"), (dict(beta=2.0), "beta"),
                     (dict(K=0), "K"), (dict(K_train=0), "K_train"), (dict(K_train=1, rule="rk"), "K_train")]:
        args = dict(K_train=2, K=4) | kw
        with pytest.raises(ValueError, match=name):
            tl.continue_loops(params, x, CFG, "FLT", **args)
    with pytest.raises(ValueError, match="variant"):
        tl.loop_map(params, x, CFG, "standard")
    with pytest.raises(ValueError, match="h"):
        tl.loop_jacobian(params, x, CFG, "FLT", h[:1])
    with pytest.raises(ValueError, match="alpha"):
        tl.loop_rule(lambda z: z, h, 2, "ema", alpha=0.0)
    batch = tl.make_batch(("copy",), 2, 8, onp.random.default_rng(0), n=3)
    with pytest.raises(ValueError, match="rules"):
        tl.sweep_test_time_rules(params, CFG, "FLT", batch, 2, rules=("naive", "heun"))
    with pytest.raises(ValueError, match="K_max"):
        tl.sweep_test_time_rules(params, CFG, "FLT", batch, 2, K_max=0)
    with pytest.raises(ValueError, match="n_spectrum"):
        tl.sweep_test_time_rules(params, CFG, "FLT", batch, 2, n_spectrum=-1)
