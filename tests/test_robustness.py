"""Bad input never gives a silent wrong answer (issue 15): numerics, array arguments, GGUF files.

1. Every elementwise function of tinyloop and its gradient, over the WHOLE finite float32 / float64 range
   (hypothesis draws the extremes: +-max, subnormals, 0), against a reference written here in x87 extended
   precision (np.longdouble: 64-bit mantissa, exponent to +-4932, so exp(1000) and 1e308 ** 3 are ordinary
   numbers and the textbook formulas need no tricks). Tolerances are a few ulps of the size of the terms that
   are summed (so cancellation near a zero of the gradient is allowed for) plus a few subnormal ulps (values
   below the smallest normal number cannot carry more).
2. The cross-entropy's targets and mask: the issue's inputs with their right values.
3. Array arguments of the public functions of the data, checkpoint, GGUF and tokenizer sections: each bad
   input of the issue (and the kinds found beside them) fails early with a ValueError naming the argument.
4. GGUF files beyond the one wheel: hypothesis writes small Llama GGUF files with gguf's own GGUFWriter (random
   tensor types among all that load, random metadata omissions) and each one must load into exactly
   gguf.quants.dequantize's values with llama.cpp's defaults, or be refused naming the path and the key/tensor.
"""
import os
import sys
import warnings

import autograd.numpy as anp
import numpy as onp
import pytest
from autograd import elementwise_grad, grad
from hypothesis import HealthCheck, event, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

import tinyloop as tl

LD = onp.longdouble
EXTENDED = onp.finfo(LD).eps < 1e-18                      # x87 80-bit (x86-64 Linux) or IEEE quad (aarch64 Linux)
DTYPES = ["float32", "float64"] if EXTENDED else ["float32"]   # float64 needs a wider reference
C = LD("0.7978845608028654")                              # sqrt(2 / pi) of the tanh GELU, as GPT-2 writes it
A = LD("0.044715")
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def finite(dtype):
    return st.floats(allow_nan=False, allow_infinity=False, width=onp.dtype(dtype).itemsize * 8)


def vectors(dtype, n=st.integers(1, 6)):
    return arrays(dtype, st.tuples(n), elements=finite(dtype))


# ------------------------------------------------------------------------------------------------------------
# Reference formulas, textbook form, in extended precision
# ------------------------------------------------------------------------------------------------------------
def sig(v):
    """1 / (1 + e^-v): in extended precision exp(-v) overflows only beyond |v| = 11356, where the true value
    is below every float64 anyway."""
    with onp.errstate(over="ignore"):
        return 1 / (1 + onp.exp(-v))


def ref_silu(x):
    """SiLU x sig(x) and its derivative sig + x sig (1 - sig); then the gradient's error scale: the size of its
    summed terms plus |x f''| (rounding x by half an ulp moves f' by |x f''| half-ulps), f'' = 2 s t + x s t (t - s);
    and the size of x's effect (the subnormal allowance)."""
    s, t = sig(x), sig(-x)
    d2 = 2 * s * t + x * s * t * (t - s)
    return x * s, s + x * s * t, onp.abs(s) + onp.abs(x * s * t) + onp.abs(x * d2), onp.abs(x)


def ref_gelu(x):
    """GELU 0.5 x (1 + tanh(u)), u = C (x + A x^3), as x sig(2u) (the identity 0.5 (1 + tanh u) = sig(2u): the tanh
    form would round 1 + tanh(-40) to 0 even here), derivative sig(2u) + x sig(2u) sig(-2u) 2u'; the gradient's
    error scale as in ref_silu, with v = 2u: f'' = 2 s t v' + x s t (t - s) v'^2 + x s t v''. In the far tail
    |x f''| ~ |x v'| |f'|: at x = -21 the derivative's condition number is ~2000 (float64 gives 3 digits less)."""
    v = 2 * C * (x + A * x ** 3)
    dv = 2 * C * (1 + 3 * A * x ** 2)
    ddv = 2 * C * 6 * A * x
    s, t = sig(v), sig(-v)
    d2 = 2 * s * t * dv + x * s * t * (t - s) * dv ** 2 + x * s * t * ddv
    return (x * s, s + x * s * t * dv, onp.abs(s) + onp.abs(x * s * t * dv) + onp.abs(x * d2),
            onp.minimum(onp.abs(x * dv), 1e8))


def as_ld(x):
    return onp.asarray(x).astype(LD)


def assert_close(got, ref, scale, dtype, ulps=16, sub_ulps=8, sub_scale=1.0, what=""):
    """|got - ref| <= ulps * eps * scale + sub_ulps * (smallest subnormal) * (1 + sub_scale), elementwise; where
    the exact value is beyond the dtype's range, got must be the same infinity."""
    fi = onp.finfo(dtype)
    got = onp.asarray(got)
    assert got.dtype == onp.dtype(dtype), (what, got.dtype)
    with onp.errstate(over="ignore"):
        ref_d = ref.astype(dtype)
    inf = onp.isinf(ref_d)
    assert onp.array_equal(got[inf], ref_d[inf]), (what, got, ref)
    assert onp.all(onp.isfinite(got[~inf])), (what, got, ref)
    err = onp.abs(got[~inf].astype(LD) - ref[~inf])
    sub = onp.broadcast_to(onp.asarray(sub_scale, LD), ref.shape)[~inf]
    tol = (ulps * LD(fi.eps) * onp.broadcast_to(scale, ref.shape)[~inf]
           + sub_ulps * LD(fi.smallest_subnormal) * (1 + sub))
    bad = err > tol
    assert not bad.any(), f"{what}: got {got[~inf][bad]}, exact {ref[~inf][bad]}, tolerance {tol[bad]}"


# ------------------------------------------------------------------------------------------------------------
# 1. Elementwise functions over the whole float range
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["silu", "gelu"])
@SETTINGS
@given(data=st.data())
def test_silu_gelu_and_gradients_over_the_whole_range(name, dtype, data):
    x = data.draw(vectors(dtype, st.integers(1, 8)))
    f, ref = {"silu": (tl.silu, ref_silu), "gelu": (tl.gelu, ref_gelu)}[name]
    value, deriv, scale, k = ref(as_ld(x))
    # the scale is |f| + |x f'|: rounding x by half an ulp moves f by |x f'| half-ulps (f's condition number is
    # |x f' / f|, e.g. ~66 for gelu at x = -9, where f ~ e^-66), so no float implementation is closer than that
    assert_close(f(x), value, onp.abs(value) + onp.abs(as_ld(x) * deriv), dtype, sub_scale=onp.abs(as_ld(x)),
                 what=f"{name}({x})")
    assert_close(elementwise_grad(f)(x), deriv, scale, dtype, sub_scale=k, what=f"{name}'({x})")


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_gelu_at_the_issue_inputs_and_tails(dtype):
    """silu'(-100) in float32 was NaN (exp(100) overflows; autograd then divides inf by inf)."""
    x = onp.array([-100, -184, -1e4, -88.8, -1.2784645, 0, 1e-30, 30, 1e4], dtype)
    for f, ref in ((tl.silu, ref_silu), (tl.gelu, ref_gelu)):
        value, deriv, scale, k = ref(as_ld(x))
        assert_close(f(x), value, onp.abs(value) + onp.abs(as_ld(x) * deriv), dtype, sub_scale=onp.abs(as_ld(x)))
        assert_close(elementwise_grad(f)(x), deriv, scale, dtype, sub_scale=k)
    d = elementwise_grad(tl.silu)(onp.array([-100.0], dtype))[0]
    assert -3.9e-42 < d < -3.5e-42                               # s (1 + x (1 - s)) ~ (1 - 100) e^-100 = -3.68e-42
    mid = onp.linspace(-6, 6, 25).astype(LD)                      # the tanh form itself, where it is accurate
    assert_close(tl.gelu(mid.astype(dtype)), 0.5 * mid * (1 + onp.tanh(C * (mid + A * mid ** 3))),
                 onp.abs(mid), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data())
def test_softmax_log_softmax_and_gradients_over_the_whole_range(dtype, data):
    z = data.draw(vectors(dtype))
    g = data.draw(arrays(dtype, z.shape, elements=st.floats(-1, 1, width=onp.dtype(dtype).itemsize * 8)))
    Z, G = as_ld(z), as_ld(g)
    d = Z - Z.max()
    e = onp.exp(d)
    s, lse = e / e.sum(), onp.log(e.sum())
    amp = 4 + onp.abs(d)                                          # z - max z is rounded: exp amplifies it
    assert_close(tl.softmax(z), s, s * amp, dtype, what=f"softmax({z})")
    assert_close(tl.log_softmax(z), d - lse, amp + onp.abs(lse), dtype, what=f"log_softmax({z})")
    gs = (G * s).sum()
    with onp.errstate(over="ignore"):                            # the scalar objective sum(f(z) g) may overflow
        ds, dls = grad(lambda v: anp.sum(tl.softmax(v) * g))(z), grad(lambda v: anp.sum(tl.log_softmax(v) * g))(z)
    assert_close(ds, s * (G - gs), s * amp * (onp.abs(G) + onp.abs(G * s).sum()), dtype, what="softmax VJP")
    assert_close(dls, G - s * G.sum(), onp.abs(G) + s * amp * onp.abs(G).sum(), dtype, what="log_softmax VJP")


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data())
def test_rms_norm_and_gradient_over_the_whole_range(dtype, data):
    """Zero rows, subnormal rows, rows of 3e38 (whose sum of squares overflows float32) and mixtures."""
    n = data.draw(st.integers(1, 6))
    x = data.draw(arrays(dtype, (2, n), elements=finite(dtype) | st.sampled_from([0.0, 1e-30, -1e20, 3e38])))
    g = data.draw(arrays(dtype, (2, n), elements=st.floats(-1, 1, width=onp.dtype(dtype).itemsize * 8)))
    eps = data.draw(st.sampled_from([1e-6, 1e-5]))
    X, G = as_ld(x), as_ld(g)
    r = 1 / onp.sqrt((X * X).mean(-1, keepdims=True) + LD(onp.asarray(eps, dtype)))
    y = X * r
    k = 8 + 2 * n                                                 # n squares summed, then a square root
    assert_close(tl.rms_norm(x, eps=eps), y, k * onp.abs(y), dtype, what=f"rms_norm({x})")
    vjp = r * (G - y * (G * y).mean(-1, keepdims=True))
    assert_close(grad(lambda v: anp.sum(tl.rms_norm(v, eps=eps) * g))(x), vjp,
                 k * r * (onp.abs(G) + onp.abs(y) * onp.abs(G * y).mean(-1, keepdims=True)), dtype,
                 sub_scale=r * onp.ones_like(X), what=f"rms_norm VJP at {x}")
    gain = onp.full(n, 2, dtype)
    assert_close(tl.rms_norm(x, gain, eps=eps), 2 * y, k * 2 * onp.abs(y), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data())
def test_softcap_readout_and_gradient_over_the_whole_range(dtype, data):
    """readout's logits c tanh(z / c) (z = h W; W the identity here, so z = h exactly)."""
    z = data.draw(arrays(dtype, (1, 1, 4), elements=finite(dtype)))
    c = data.draw(st.sampled_from([15.0, 30.0, 1.0]))
    cfg = tl.Config(vocab=4, d_model=4, n_heads=1, n_layers=1, softcap=c, dtype=dtype)
    params = {"head": onp.eye(4, dtype=dtype)}
    Z = as_ld(z)
    t = onp.tanh(Z / LD(c))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)          # autograd's tanh VJP g / cosh^2 overflows to g / inf
        got, dz = tl.readout(params, z, cfg), elementwise_grad(lambda v: tl.readout(params, v, cfg))(z)
    assert_close(got, LD(c) * t, LD(c) * onp.abs(t) + 1, dtype, what=f"softcap({z})")
    assert_close(dz, 1 - t * t, onp.ones_like(Z), dtype, ulps=64, what=f"softcap'({z})")


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data())
def test_cross_entropy_and_gradient_over_the_whole_range(dtype, data):
    P, V = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5))
    z = data.draw(arrays(dtype, (1, P, V), elements=finite(dtype)))
    t = data.draw(arrays(onp.int64, (1, P), elements=st.integers(0, V - 1)))
    m = data.draw(arrays(onp.float64, (1, P), elements=st.sampled_from([0.0, 1.0])))
    Z = as_ld(z)
    M = Z.max(-1, keepdims=True)
    e = onp.exp(Z - M)
    zt = onp.take_along_axis(Z, t[..., None], -1)[..., 0]
    nll = (M[..., 0] - zt) + onp.log(e.sum(-1))
    W = as_ld(m) / max(m.sum(), 1)
    loss = (W * nll).sum()
    with onp.errstate(over="ignore"):                            # a loss beyond the float range is inf, rightly
        got, dz = onp.asarray(tl.cross_entropy(z, t, m)), grad(tl.cross_entropy)(z, t, m)
    assert_close(got, loss,
                 (W * (4 + onp.abs(M[..., 0] - zt) + onp.abs(onp.log(e.sum(-1))))).sum(), dtype, what=f"xent({z})")
    p = e / e.sum(-1, keepdims=True)
    want = W[..., None] * (p - (onp.arange(V) == t[..., None]))
    assert_close(dz, want, W[..., None] * (1 + p * (4 + onp.abs(Z - M))), dtype,
                 what=f"xent'({z})")


def test_large_logits_keep_the_log_term():
    """Adding the max back before subtracting rounded the log term away: log_softmax([1e30, 1e30]) was [0, 0]."""
    onp.testing.assert_allclose(tl.log_softmax(onp.array([1e30, 1e30])), [-onp.log(2)] * 2, rtol=1e-15)
    onp.testing.assert_allclose(tl.log_softmax(onp.array([1e7, 1e7, 1e7], onp.float32)), [-onp.log(3)] * 3, rtol=1e-6)
    z = onp.array([[[1e7, 1e7]]], onp.float32)
    onp.testing.assert_allclose(tl.cross_entropy(z, onp.array([[0]])), onp.log(2), rtol=1e-6)


def test_swiglu_gate_at_minus_184_trains():
    """The issue's SwiGLU model: a gate reaching -184 made six gradient tensors NaN and train() report a divergence
    at step 0. The gradients are finite now, equal to float64's, and training runs."""
    cfg = tl.Config(vocab=11, d_model=16, n_heads=2, n_layers=1, seq_len=8, mlp="swiglu", softcap=None)
    params = tl.init_params(cfg, 0)
    params["layers"][0]["mlp"]["w1"] *= 300                       # gate pre-activations of order -+200
    params["layers"][0]["mlp"]["w2"] += 0.01
    rng = onp.random.default_rng(0)
    batch = (rng.integers(0, 11, (4, 8)), rng.integers(0, 11, (4, 8)), onp.ones((4, 8)))
    gate = tl.rms_norm(tl.embed_lookup(params["embed"], batch[0])) @ params["layers"][0]["mlp"]["w1"]
    assert gate.min() < -184
    g32 = grad(tl.loss_fn)(params, batch, cfg, "standard")
    vec, unflatten = tl.flatten(params)
    cfg64 = tl.Config(**{**cfg.__dict__, "dtype": "float64"})
    g64 = grad(tl.loss_fn)(unflatten(vec.astype("float64")), batch, cfg64, "standard")
    for (name, a), (_, b) in zip(tl._named_leaves(g32), tl._named_leaves(g64)):
        assert onp.all(onp.isfinite(a)), name
        onp.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5 * onp.abs(b).max(), err_msg=name)
    _, hist = tl.train(params, cfg, lambda step: batch, 3, 1e-3, variant="standard", optimizer="adam", progress=False)
    assert hist["status"] == "ok" and hist["diverged_at"] is None


# ------------------------------------------------------------------------------------------------------------
# 2. Cross-entropy targets and mask
# ------------------------------------------------------------------------------------------------------------
Z = onp.random.default_rng(0).standard_normal((1, 3, 5))


def nll(z, t):
    """-log softmax(z)[t] in float64, one position."""
    return float(onp.log(onp.exp(z - z.max()).sum()) + z.max() - z[t])


@pytest.mark.parametrize("bad", [-1, -100, 5, 7])
def test_counted_targets_outside_the_vocab_are_refused(bad):
    """-1 used to pick class V-1 in the loss while its gradient treated the target as all-zero (a finite difference
    gave -0.3222, the gradient 0.0111); -100 and V ended in a bare IndexError."""
    msg = rf"targets: 1 counted target\(s\) outside \[0, vocab=5\), e.g. {bad} at \(0, 1\)"
    with pytest.raises(ValueError, match=msg):
        tl.cross_entropy(Z, onp.array([[1, bad, 2]]))
    with pytest.raises(ValueError, match="targets"):
        tl.cross_entropy(Z, onp.array([[1, bad, 2]]), onp.array([[0, 1, 1]]))


@pytest.mark.parametrize("ignored", [-1, -100, 5, 123456])
def test_masked_positions_may_hold_any_id(ignored):
    """A masked-out position is never read (PyTorch's ignore_index=-100 style): its loss and gradient are zero."""
    t, m = onp.array([[1, ignored, 2]]), onp.array([[1, 0, 1]])
    want = (nll(Z[0, 0], 1) + nll(Z[0, 2], 2)) / 2
    assert abs(float(tl.cross_entropy(Z, t, m)) - want) < 1e-12
    g = grad(tl.cross_entropy)(Z, t, m)
    assert onp.all(g[0, 1] == 0)
    dz = onp.zeros_like(Z)                                       # the gradient is the loss's: central differences
    for i, j in [(0, 4), (2, 2), (1, 3)]:
        dz[:] = 0
        dz[0, i, j] = 1e-6
        fd = (tl.cross_entropy(Z + dz, t, m) - tl.cross_entropy(Z - dz, t, m)) / 2e-6
        assert abs(fd - g[0, i, j]) < 1e-8, (i, j)


def test_cross_entropy_weights_and_empty_mask():
    t = onp.array([[1, 3, 2]])
    w = onp.array([[2.0, 0.5, 0.0]])
    want = (2 * nll(Z[0, 0], 1) + 0.5 * nll(Z[0, 1], 3)) / 2.5
    assert abs(float(tl.cross_entropy(Z, t, w)) - want) < 1e-12
    assert float(tl.cross_entropy(Z, t, onp.zeros((1, 3)))) == 0.0      # nothing counted: 0, not NaN
    assert abs(float(tl.cross_entropy(Z[0], t[0])) - onp.mean([nll(Z[0, i], t[0, i]) for i in range(3)])) < 1e-12


@pytest.mark.parametrize("logits, targets, mask, name", [
    (Z, onp.array([1, 2, 3]), None, "targets: shape"),                      # [T] for [B, T]
    (Z, onp.array([[1, 2]]), None, "targets: shape"),
    (Z, onp.array([[1.0, 2.0, 3.0]]), None, "targets: must be integer"),    # floats are not ids
    (Z, "abc", None, "targets: must be an array, got a str"),
    (Z, onp.array([[1, 2, 3]]), onp.array([1, 0, 1]), "mask: shape"),       # [T] broadcast silently before
    (Z, onp.array([[1, 2, 3]]), onp.array([[1, onp.nan, 1]]), "mask: must be finite"),
    (Z, onp.array([[1, 2, 3]]), onp.array([[1, -1, 1]]), "mask: must be finite and >= 0"),
    (Z, onp.array([[1, 2, 3]]), onp.array([["a", "b", "c"]]), "mask: must be 0/1"),
    (Z.astype(int), onp.array([[1, 2, 3]]), None, "logits: must be a float array"),
    (onp.zeros((1, 3, 0)), onp.array([[0, 0, 0]]), None, "logits: has an empty vocab"),
])
def test_cross_entropy_refuses_bad_arrays(logits, targets, mask, name):
    with pytest.raises(ValueError, match=name):
        tl.cross_entropy(logits, targets, mask)


# ------------------------------------------------------------------------------------------------------------
# 3. Array arguments of forward, the data, checkpoint and tokenizer functions
# ------------------------------------------------------------------------------------------------------------
CFG = tl.Config(vocab=18, d_model=16, n_heads=2, n_layers=1, seq_len=16)
PARAMS = tl.init_params(CFG, 0)
TOKS = onp.random.default_rng(1).integers(0, 18, (2, 5))


def other(**kw):
    return tl.Config(**{**CFG.__dict__, **kw})


@pytest.mark.parametrize("call, match", [
    (lambda: tl.forward(PARAMS, "a prompt", CFG), "tokens: must be an array, got a str"),
    (lambda: tl.forward(PARAMS, [["a", "b"]], CFG), "tokens: must be integer token ids, got <U1 values"),
    (lambda: tl.forward(PARAMS, [[1, 2], [3]], CFG), "tokens: cannot be read as an array"),
    (lambda: tl.forward(PARAMS, [1, 2, 3], CFG), r"tokens: must be \[batch, positions\], got shape \(3,\); for one"),
    (lambda: tl.forward(PARAMS, TOKS.astype(float), CFG), "tokens: must be integer token ids, got dtype float64"),
    (lambda: tl.forward(PARAMS, TOKS > 3, CFG), "tokens: must be integer token ids, got dtype bool"),
    (lambda: tl.forward(PARAMS, onp.zeros((1, 0), int), CFG), "tokens: needs at least one position"),
    (lambda: tl.forward(PARAMS, onp.zeros((0, 3), int), CFG), "tokens: needs at least one position"),
    (lambda: tl.forward(PARAMS, TOKS - 1, CFG), r"tokens: ids must be in \[0, vocab=18\), got -1"),
    (lambda: tl.forward(PARAMS, onp.zeros((1, 17), int), CFG), "tokens: 17 positions > seq_len=16"),
    (lambda: tl.forward(PARAMS, TOKS, CFG, "FLT", n_loops=True), "n_loops: must be an integer >= 1, got True"),
    (lambda: tl.forward(PARAMS, TOKS, CFG, "FLT", n_loops=2.0), "n_loops"),
    (lambda: tl.forward(PARAMS, TOKS, other(d_model=32)),
     r"params: embed has shape \(18, 16\), but the Config needs \(18, 32\)"),
    (lambda: tl.forward(PARAMS, TOKS, other(vocab=20)), r"params: embed has shape \(18, 16\)"),
    (lambda: tl.forward(PARAMS, TOKS, other(n_layers=2)), "params: needs a list of n_layers=2 layers, got list of 1"),
    (lambda: tl.forward(PARAMS, TOKS, other(n_kv_heads=1)),
     r"params: layers.0.attn.wk has shape \(16, 16\), but the Config needs \(16, 8\)"),
    (lambda: tl.forward(PARAMS, TOKS, other(mlp="swiglu")), r"params: layers.0.mlp.w3 has shape \(missing\)"),
    (lambda: tl.forward(tl.init_params(other(norm="rms_gain"), 0), TOKS, CFG),   # gains a "rms" cfg would ignore
     "params: g_final has shape .* no such parameter"),
    (lambda: tl.forward(PARAMS, TOKS, other(tie_embeddings=True)), "params: head has shape .* no such parameter"),
    (lambda: tl.forward([PARAMS], TOKS, CFG), "params: must be a params dict"),
])
def test_forward_refuses_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_make_batch_reads_one_task_name_as_a_one_task_mixture():
    """make_batch('copy', ...) said "unknown task 'c'" (the str was iterated). One name means [name]; an int rng
    means default_rng(int), like init_params."""
    a = tl.make_batch("copy", 4, 13, onp.random.default_rng(5))
    b = tl.make_batch(["copy"], 4, 13, onp.random.default_rng(5))
    c = tl.make_batch(("copy",), 4, 13, 5)
    for k in b:
        assert onp.array_equal(a[k], b[k]) and onp.array_equal(b[k], c[k]), k
    assert tl.per_task_accuracy(onp.zeros((4, 13, 18)), a, "copy") == {"copy": 0.0}
    assert tl.make_example("sort", 3, n=4) == tl.make_example("sort", onp.random.default_rng(3), n=4)


@pytest.mark.parametrize("call, match", [
    (lambda: tl.make_batch([], 2, 13, 0), "tasks: must be a task name or a non-empty list"),
    (lambda: tl.make_batch("cpy", 2, 13, 0), "tasks: unknown task 'cpy'"),
    (lambda: tl.make_batch(["copy", 3], 2, 13, 0), "tasks: unknown task 3"),
    (lambda: tl.make_batch({"copy"}, 2, 13, 0), "tasks: must be a task name or a non-empty list"),
    (lambda: tl.make_batch("copy", 0, 13, 0), "batch_size: must be an integer >= 1, got 0"),
    (lambda: tl.make_batch("copy", True, 13, 0), "batch_size: must be an integer >= 1, got True"),
    (lambda: tl.make_batch("copy", 2.0, 13, 0), "batch_size"),
    (lambda: tl.make_batch("copy", 2, 12, 0), "length: task copy needs 13 positions"),
    (lambda: tl.make_batch("copy", 2, "13", 0), "length"),
    (lambda: tl.make_batch("copy", 2, 13, onp.random.RandomState(0)), "rng: must be a numpy Generator"),
    (lambda: tl.make_batch("copy", 2, 13, -1), "rng"),
    (lambda: tl.make_batch("copy", 2, 13, 0, n=0), "n: must be an integer >= 1"),
    (lambda: tl.make_example("nope", 0), "task: unknown task 'nope'"),
    (lambda: tl.make_example(["copy"], 0), "task: unknown task"),
    (lambda: tl.example_length("copy", n=-2), "n: must be an integer >= 1"),
])
def test_data_functions_refuse_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_scoring_refuses_logits_that_do_not_fit_the_batch():
    """exact_match broadcast a [1, T, V] logit block against a batch of 4 and returned 4 answers."""
    b = tl.make_batch("copy", 4, 13, 0)
    with pytest.raises(ValueError, match=r"logits: shape \(1, 13, 18\) does not fit the batch's targets \(4, 13\)"):
        tl.exact_match(onp.zeros((1, 13, 18)), b)
    with pytest.raises(ValueError, match="logits"):
        tl.exact_match(onp.zeros((4, 13)), b)
    with pytest.raises(ValueError, match="batch: must be make_batch's dict"):
        tl.exact_match(onp.zeros((4, 13, 18)), (b["tokens"], b["targets"], b["mask"]))
    with pytest.raises(ValueError, match="tasks: the batch has task index 1, but only 1 tasks are named"):
        tl.per_task_accuracy(onp.zeros((8, 13, 18)), tl.make_batch(["copy", "sort"], 8, 13, 0), ["copy"])
    with pytest.raises(ValueError, match="batch: has no answer token"):
        tl.chance_loss({**b, "mask": onp.zeros_like(b["mask"])})
    onp.testing.assert_array_equal(tl.exact_match(onp.eye(18)[b["targets"]], b), [True] * 4)


def test_load_refuses_what_is_not_a_checkpoint(tmp_path):
    """load('README.md') advised allow_pickle=; a .npy file ended in a TypeError."""
    readme = tmp_path / "README.md"
    readme.write_text("# tinyloop\n")
    with pytest.raises(ValueError, match=r"path: .*README.md' is not a tinyloop checkpoint: save\(\) writes a .npz "
                                         r"\(zip\) file, this one starts with b'# ti'") as e:
        tl.load(readme)
    assert "pickle" not in str(e.value)
    onp.save(tmp_path / "a.npy", onp.zeros(3))
    with pytest.raises(ValueError, match=r"path: .*a.npy' is not a tinyloop checkpoint"):
        tl.load(tmp_path / "a.npy")
    onp.savez(tmp_path / "other.npz", x=onp.zeros(3))
    with pytest.raises(ValueError, match="format tag missing"):
        tl.load(tmp_path / "other.npz")
    for p in (tmp_path, tmp_path / "missing.npz"):
        with pytest.raises(ValueError, match="path: no checkpoint at"):
            tl.load(p)
    tl.save(tmp_path / "ok.npz", PARAMS, CFG)
    with pytest.raises(ValueError, match="expect_cfg: must be a Config"):
        tl.load(tmp_path / "ok.npz", expect_cfg={"vocab": 18})


def test_save_refuses_what_load_would_refuse(tmp_path):
    with pytest.raises(ValueError, match=r"params: embed has shape \(18, 16\), but the Config needs \(20, 16\)"):
        tl.save(tmp_path / "x.npz", PARAMS, other(vocab=20))
    bad = {**PARAMS, "embed": PARAMS["embed"].copy()}
    bad["embed"][3, 1] = onp.nan
    with pytest.raises(ValueError, match=r"params: non-finite values in \['embed'\]"):
        tl.save(tmp_path / "x.npz", bad, CFG)
    with pytest.raises(ValueError, match="meta: must be JSON-able"):
        tl.save(tmp_path / "x.npz", PARAMS, CFG, meta={"f": print})
    with pytest.raises(ValueError, match="cfg: must be a Config"):
        tl.save(tmp_path / "x.npz", PARAMS, CFG.__dict__)
    assert not os.path.exists(tmp_path / "x.npz")
    meta = {"loss": onp.float32(0.5), "step": onp.int64(3), "curve": onp.arange(3)}   # NumPy values are numbers
    tl.save(tmp_path / "x.npz", PARAMS, CFG, meta)
    assert tl.load(tmp_path / "x.npz")[2] == {"loss": 0.5, "step": 3, "curve": [0, 1, 2]}
    tl.write_json(tmp_path / "r.json", meta)
    import json
    assert json.load(open(tmp_path / "r.json")) == {"loss": 0.5, "step": 3, "curve": [0, 1, 2]}


def test_missing_real_extra_names_the_install_command(monkeypatch):
    """Without the `real` extra, load_gguf() ended in a bare ModuleNotFoundError; so did the Tokenizer (regex)."""
    for module, call in (("gguf", lambda: tl.load_gguf()), ("regex", lambda: tl.Tokenizer(["a"], [])),
                         ("gguf", lambda: tl.dequantize(onp.zeros(144, onp.uint8), "Q4_K"))):
        monkeypatch.setitem(sys.modules, module, None)              # what an absent package looks like to import
        monkeypatch.setattr(tl, "_GGUF_TYPES", [])
        with pytest.raises(ModuleNotFoundError,
                           match=rf'needs the `{module}` package.*\n.*pip install -e "\.\[real\]"'):
            call()
        monkeypatch.undo()
    onp.testing.assert_array_equal(tl.dequantize(onp.zeros(34, onp.uint8), "Q8_0"), onp.zeros(32))  # by hand: no gguf


@pytest.fixture(scope="module")
def tok():
    pytest.importorskip("regex")
    return tl.Tokenizer(["a", "b", "ab", "<s>"], ["a b"], special=["<s>"])


@pytest.mark.parametrize("ids, match", [
    ([-1], r"ids: must be in \[0, vocab=4\), got -1"),            # decoded as the last token before
    ([4], r"ids: must be in \[0, vocab=4\)"),
    ([1.7], "ids: must be one sequence of integer ids"),           # decoded as id 1 before
    ("ab", "ids: must be an array, got a str"),
    ([[0, 1]], r"ids: must be one sequence of integer ids, got shape \(1, 2\)"),
    ([True], "ids: must be one sequence of integer ids"),
])
def test_decode_refuses_bad_ids(tok, ids, match):
    with pytest.raises(ValueError, match=match):
        tok.decode(ids)


def test_tokenizer_arguments(tok):
    assert tok.decode(onp.array([2, 3, 0])) == "ab<s>a" and tok.decode([]) == ""
    with pytest.raises(ValueError, match=r"tokens: 'a' appears twice \(ids 0 and 2\)"):   # llama.cpp refuses it too
        tl.Tokenizer(["a", "b", "a"], [])
    with pytest.raises(ValueError, match=r"special: \['<t>'\] are not in the vocab"):
        tl.Tokenizer(["a", "b"], [], special=["<t>"])
    with pytest.raises(ValueError, match="merges: must be a list of strings"):
        tl.Tokenizer(["a", "b"], "a b")
    with pytest.raises(ValueError, match="text: must be a str"):
        tok.encode(b"ab")
    t = tl.Tokenizer([*tl.byte_chars().values(), "xy"], ["x y", "xy z"])   # "xyz" is no token: falls back to bytes
    assert t.decode(t.encode("xyzxy")) == "xyzxy" and len(t.encode("xyz")) == 3


# ------------------------------------------------------------------------------------------------------------
# 4. GGUF files beyond the one wheel
# ------------------------------------------------------------------------------------------------------------
# Tensor names of a GGUF Llama -> (tinyloop name, transposed?): written here from llama.cpp's tensor names, not
# read from tinyloop. ggml lists dims fastest first, so a stored matrix is [d_out, d_in]; tinyloop uses x @ W.
LAYER_TENSORS = {"attn_norm": ("g_attn", False), "attn_q": ("attn.wq", True), "attn_k": ("attn.wk", True),
                 "attn_v": ("attn.wv", True), "attn_output": ("attn.wo", True), "ffn_norm": ("g_mlp", False),
                 "ffn_gate": ("mlp.w1", True), "ffn_up": ("mlp.w3", True), "ffn_down": ("mlp.w2", True)}
REQUIRED = ("context_length", "embedding_length", "block_count", "attention.layer_norm_rms_epsilon",
            "feed_forward_length", "attention.head_count")
V = 40                                                           # vocab of the synthetic files


def llama_tensors(d, H, Hkv, f, L, tied):
    """{GGUF name: stored numpy shape} of a Llama."""
    dkv = Hkv * (d // H)
    shapes = {"token_embd.weight": (V, d), "output_norm.weight": (d,)}
    if not tied:
        shapes["output.weight"] = (V, d)
    for i in range(L):
        shapes.update({f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.attn_q.weight": (d, d),
                       f"blk.{i}.attn_k.weight": (dkv, d), f"blk.{i}.attn_v.weight": (dkv, d),
                       f"blk.{i}.attn_output.weight": (d, d), f"blk.{i}.ffn_norm.weight": (d,),
                       f"blk.{i}.ffn_gate.weight": (f, d), f"blk.{i}.ffn_up.weight": (f, d),
                       f"blk.{i}.ffn_down.weight": (d, f)})
    return shapes


def tensor_data(kind, shape, rng):
    """Data of one tensor of GGUF type `kind`: float arrays for F16/F32/F64; a quantisation by gguf.quants of
    random weights where the library can quantise; else random blocks whose f16 scales are made finite (the high
    byte of each 16-bit word loses its top exponent bit, so |scale| < 2) -> (array, raw_dtype or None)."""
    import gguf
    x = (rng.standard_normal(shape) * (1.0 if len(shape) == 1 else 0.5 / onp.sqrt(shape[-1]))).astype(onp.float32)
    if len(shape) == 1:
        x += 1.0                                                  # norm gains near 1
    if kind in ("F32", "F16", "F64"):
        return x.astype({"F32": onp.float32, "F16": onp.float16, "F64": onp.float64}[kind]), None
    qt = gguf.GGMLQuantizationType[kind]
    try:
        return gguf.quants.quantize(x, qt), qt
    except NotImplementedError:
        block, size = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, tuple(shape[:-1]) + (shape[-1] // block * size,), dtype=onp.uint8)
        raw[..., 1::2] &= 0xBF
        return raw, qt


def write_llama_gguf(path, d=32, H=2, Hkv=1, f=32, L=1, tied=True, types=None, omit=(), theta=10000.0, eps=1e-5,
                     per_layer_heads=False, scaling=None, tokenizer=True, vocab_size=False, big_endian=False,
                     extra_tensors=None, pad_norms=False, seed=0):
    """A Llama GGUF written key by key with gguf.GGUFWriter; omit: llama.* keys (without "llama.") left out.
    types: {GGUF tensor name: type}, default F32; pad_norms: 1-D tensors stored with ne = [d, 1] (ggml pads
    shapes with 1s; llama.cpp accepts them). Returns {GGUF name: the data written}."""
    import gguf
    rng = onp.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama", endianess=gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE)
    T = gguf.GGUFValueType
    keys = {"block_count": (L, T.UINT32), "context_length": (64, T.UINT32), "embedding_length": (d, T.UINT32),
            "feed_forward_length": (f, T.UINT32), "attention.head_count": ([H] * L if per_layer_heads else H, T.UINT32),
            "attention.head_count_kv": ([Hkv] * L if per_layer_heads else Hkv, T.UINT32),
            "rope.dimension_count": (d // H, T.UINT32), "rope.freq_base": (theta, T.FLOAT32),
            "attention.layer_norm_rms_epsilon": (eps, T.FLOAT32)}
    if vocab_size:
        keys["vocab_size"] = (V, T.UINT32)
    if scaling is not None:                                     # (type or None, factor or None)
        if scaling[0] is not None:
            keys["rope.scaling.type"] = (scaling[0], T.STRING)
        if scaling[1] is not None:
            keys["rope.scaling.factor"] = (scaling[1], T.FLOAT32)
    for k, (v, t) in keys.items():
        if k not in omit:
            if isinstance(v, list):
                w.add_key_value(f"llama.{k}", v, T.ARRAY, sub_type=t)
            else:
                w.add_key_value(f"llama.{k}", v, t)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list([f"t{i}" for i in range(V)])
        w.add_token_types([1] * V)
        w.add_token_merges(["t 0"])
    written = {}
    for name, shape in {**llama_tensors(d, H, Hkv, f, L, tied), **(extra_tensors or {})}.items():
        data, qt = tensor_data((types or {}).get(name, "F32"), shape, rng)
        w.add_tensor(name, data[None] if pad_norms and len(shape) == 1 else data, raw_dtype=qt)
        written[name] = data
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def dequantized_by_gguf(path):
    """{tinyloop name: float32 array} from the file, dequantised by gguf.quants, in tinyloop's layout."""
    import gguf
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        shape = tuple(reversed([int(n) for n in t.shape]))
        x = (t.data.astype(onp.float32) if t.tensor_type.name == "F64"
             else gguf.quants.dequantize(t.data, t.tensor_type)).reshape(shape)
        if t.name.startswith("blk."):
            _, i, kind, _ = t.name.split(".")
            name, transpose = LAYER_TENSORS[kind]
            out[f"layers.{i}.{name}"] = x.T if transpose else x
        else:
            out[{"token_embd.weight": "embed", "output.weight": "head", "output_norm.weight": "g_final"}[t.name]] = \
                x.T if t.name == "output.weight" else x
    return out


def fitting_types(n):
    """The loadable types whose block divides a row of n weights (K-quants need 256)."""
    import gguf
    return [k for k in tl.gguf_tensor_types() if n % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[k]][0] == 0]


def test_every_type_gguf_can_dequantize_is_supported():
    gguf = pytest.importorskip("gguf")
    kinds = tl.gguf_tensor_types()
    assert {"F32", "F16", "F64", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
            "Q6_K", "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ3_S", "TQ1_0", "TQ2_0", "MXFP4"} <= set(kinds)
    assert not {"I8", "I16", "I32", "I64", "Q8_1", "Q8_K"} & set(kinds)
    rng = onp.random.default_rng(0)
    for k in kinds:                                              # dequantize() = gguf.quants.dequantize, bit for bit
        data, qt = tensor_data(k, (3, 256), rng)
        want = data.astype(onp.float32) if qt is None else gguf.quants.dequantize(data, qt)
        onp.testing.assert_array_equal(tl.dequantize(data, k), want.reshape(-1), err_msg=k)


@st.composite
def llama_files(draw):
    d, f = draw(st.sampled_from([32, 256])), draw(st.sampled_from([32, 256]))
    H = draw(st.sampled_from([1, 2, 4]))
    omit = set(draw(st.sets(st.sampled_from(["attention.head_count_kv", "rope.freq_base", "rope.dimension_count"]))))
    if draw(st.integers(0, 5)) == 0:
        omit.add(draw(st.sampled_from(REQUIRED)))
    Hkv = H if "attention.head_count_kv" in omit else draw(st.sampled_from([h for h in (1, 2, 4) if H % h == 0]))
    L, tied = draw(st.sampled_from([1, 2])), draw(st.booleans())
    shapes = llama_tensors(d, H, Hkv, f, L, tied)
    types = {name: draw(st.sampled_from(fitting_types(shape[-1]))) for name, shape in shapes.items()}
    return dict(d=d, H=H, Hkv=Hkv, f=f, L=L, tied=tied, types=types, omit=omit,
                theta=draw(st.sampled_from([10000.0, 100000.0])), per_layer_heads=draw(st.booleans()),
                scaling=draw(st.sampled_from([None, ("none", None), ("linear", None), ("linear", 1.0), ("linear", 4.0),
                                              ("yarn", 2.0), (None, 4.0), (None, 1.0)])),
                tokenizer=draw(st.booleans()), vocab_size=draw(st.booleans()), seed=draw(st.integers(0, 99)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(spec=llama_files())
def test_random_gguf_files_load_exactly_or_are_refused_by_name(spec, tmp_path_factory):
    """Each file loads into exactly gguf.quants.dequantize's values with the Config llama.cpp would read (its
    defaults for omitted optional keys), or is refused with a ValueError naming the path and the key or tensor."""
    pytest.importorskip("gguf")
    path = str(tmp_path_factory.mktemp("g") / "m.gguf")
    write_llama_gguf(path, **spec)
    missing = [k for k in REQUIRED if k in spec["omit"]]
    scaled = spec["scaling"] is not None and (spec["scaling"][0] not in (None, "none", "linear")
                                               or spec["scaling"][1] not in (None, 1.0))   # llama.cpp: "linear"
    want = dequantized_by_gguf(path)
    bad = sorted(k for k, v in want.items() if not onp.all(onp.isfinite(v)))
    expect = (f"metadata key llama.{missing[0]} is missing" if missing else "RoPE scaling" if scaled
              else r"non-finite values in \[" if bad else None)
    event(f"refused: {expect}" if expect else "loaded")
    blocks = any(k.endswith("_K") or k.startswith("IQ") for k in spec["types"].values())
    event(f"block types: {'some' if blocks else 'no'} K-quant / IQ tensors")
    if expect:
        with pytest.raises(ValueError, match=expect) as e:
            tl.load_gguf(path)
        assert path in str(e.value) and str(e.value).startswith("path: ")
        return
    params, cfg, meta = tl.load_gguf(path)
    d, H = spec["d"], spec["H"]
    assert (cfg.vocab, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.n_layers, cfg.ff, cfg.seq_len, cfg.tie_embeddings) \
        == (V, d, H, spec["Hkv"], spec["L"], spec["f"], 64, spec["tied"])
    assert cfg.rope_theta == (10000.0 if "rope.freq_base" in spec["omit"] else spec["theta"])
    assert cfg.norm_eps == float(onp.float32(1e-5))
    got = dict(tl._named_leaves(params))
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == onp.float32
        onp.testing.assert_array_equal(got[k], want[k], err_msg=f"{k} ({spec['types']})")
    if spec["tokenizer"]:
        assert tl.Tokenizer.from_gguf(meta).decode([3, 12]) == "t3t12"
    else:
        with pytest.raises(ValueError, match="tokenizer metadata key tokenizer.ggml.model is missing in"):
            tl.Tokenizer.from_gguf(meta)


def forward_matches_llama(path, theta=None):
    """tinyloop's forward on the loaded file = the independent float64 Llama of test_real_checkpoint on gguf's
    dequantisation of the same file."""
    from test_real_checkpoint import gguf_weights, llama_reference
    params, cfg, _ = tl.load_gguf(path)
    ids = onp.random.default_rng(1).integers(0, cfg.vocab, 12)
    with onp.errstate(over="ignore"):                            # its x / (1 + exp(-x)) at gates < -709
        ref = llama_reference(gguf_weights(path), ids, cfg.n_heads, cfg.kv_heads, theta or cfg.rope_theta, cfg.norm_eps)
    got = tl.forward(params, ids[None], cfg, "standard")[0][0]
    onp.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * onp.abs(ref).max())
    return cfg


def test_q4_k_m_style_file_loads_and_runs(tmp_path):
    """The issue: a Llama GGUF with Q4_K / Q6_K tensors (the Q4_K_M files most people download) failed with
    "kind: unsupported tensor type 'Q6_K'". Here: Q4_K / Q6_K / Q5_K matrices, Q8_0 embedding, IQ4_NL, BF16."""
    pytest.importorskip("gguf")
    types = {"token_embd.weight": "Q6_K", "output.weight": "Q8_0", "blk.0.attn_q.weight": "Q4_K",
             "blk.0.attn_k.weight": "Q4_K", "blk.0.attn_v.weight": "Q6_K", "blk.0.attn_output.weight": "Q5_K",
             "blk.0.ffn_gate.weight": "Q4_K", "blk.0.ffn_up.weight": "IQ4_NL", "blk.0.ffn_down.weight": "Q6_K",
             "blk.1.ffn_down.weight": "BF16", "blk.1.attn_v.weight": "Q3_K", "blk.0.attn_norm.weight": "F16"}
    path = str(tmp_path / "q4km.gguf")
    write_llama_gguf(path, d=256, H=4, Hkv=2, f=256, L=2, tied=False, types=types)
    cfg = forward_matches_llama(path)
    assert (cfg.d_model, cfg.kv_heads, cfg.tie_embeddings) == (256, 2, False)


def test_optional_keys_take_llama_cpp_defaults(tmp_path):
    """Files without rope.freq_base / attention.head_count_kv / rope.dimension_count were refused; llama.cpp reads
    them with rope.freq_base 10000, head_count_kv = head_count, rope.dimension_count = the head width."""
    pytest.importorskip("gguf")
    path = str(tmp_path / "defaults.gguf")
    write_llama_gguf(path, H=2, Hkv=2, theta=500.0, omit=("rope.freq_base", "attention.head_count_kv",
                                                            "rope.dimension_count"))
    cfg = forward_matches_llama(path, theta=10000.0)
    assert (cfg.rope_theta, cfg.kv_heads, cfg.head_dim) == (10000.0, 2, 16)
    path = str(tmp_path / "per_layer.gguf")                     # head counts as per-layer arrays, all equal
    write_llama_gguf(path, H=2, Hkv=1, L=2, per_layer_heads=True, scaling=("linear", 1.0))
    assert forward_matches_llama(path).kv_heads == 1


def test_a_gguf_without_tokenizer_loads_and_refuses_a_tokenizer_by_key(tmp_path):
    """A GGUF without tokenizer metadata ended in a raw KeyError 'tokenizer.ggml.tokens'."""
    pytest.importorskip("gguf")
    pytest.importorskip("regex")
    path = str(tmp_path / "notok.gguf")
    write_llama_gguf(path, tokenizer=False)
    params, cfg, meta = tl.load_gguf(path)
    assert cfg.vocab == V                                        # from the embedding's rows
    with pytest.raises(ValueError, match=r"meta: tokenizer metadata key tokenizer.ggml.model is missing in '.*notok"):
        tl.Tokenizer.from_gguf(meta)
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [1, 1, 1]}
    for change, match in [({"tokenizer.ggml.tokens": None}, "key tokenizer.ggml.tokens is missing"),
                          ({"tokenizer.ggml.merges": None}, "key tokenizer.ggml.merges is missing"),
                          ({"tokenizer.ggml.pre": None}, "tokenizer.ggml.pre = None .* 'default' pre-tokenizer"),
                          ({"tokenizer.ggml.pre": "llama-bpe"}, "tokenizer.ggml.pre = 'llama-bpe'"),
                          ({"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.model = 'llama'"),
                          ({"tokenizer.ggml.token_type": [1]}, "token_type has 1 entries for 3 tokens"),
                          ({"tokenizer.ggml.tokens": "ab"}, "tokenizer.ggml.tokens is a str, not a list"),
                          ({"tokenizer.ggml.add_bos_token": True}, "add_bos_token is true")]:
        meta = {k: v for k, v in {**base, **change}.items() if v is not None}
        with pytest.raises(ValueError, match=match):
            tl.Tokenizer.from_gguf(meta)
    no_types = {k: v for k, v in base.items() if k != "tokenizer.ggml.token_type"}   # optional, as in llama.cpp
    assert tl.Tokenizer.from_gguf(no_types).encode("ab") == [2]
    assert tl.Tokenizer.from_gguf({**base, "tokenizer.ggml.pre": "gpt-2"}).encode("ab") == [2]   # llama.cpp's name


def test_unsupported_types_and_other_faults_name_path_and_tensor(tmp_path):
    """An unsupported tensor type said only "kind: unsupported tensor type 'Q6_K'": no path, tensor or list."""
    pytest.importorskip("gguf")
    path = str(tmp_path / "int.gguf")
    write_llama_gguf(path, types={"blk.0.ffn_up.weight": "F32"}, extra_tensors={})
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "i32.gguf"), "llama")           # the same Llama with one I32 tensor
    r = gguf.GGUFReader(path)
    for k, fld in r.fields.items():
        if k.startswith("llama.") or k.startswith("tokenizer."):
            vt = fld.types[0]
            w.add_key_value(k, fld.contents(), vt, sub_type=fld.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        data = onp.array(t.data)
        w.add_tensor(t.name, data.astype(onp.int32) if t.name == "blk.0.ffn_up.weight" else data)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match=r"path: '.*i32.gguf': tensor 'blk.0.ffn_up.weight' has type I32, which "
                                         r"tinyloop cannot dequantize; supported: F32, F16, F64, Q8_0, Q4_1, Q4_0"):
        tl.load_gguf(str(tmp_path / "i32.gguf"))
    cases = [(dict(big_endian=True), "is a big-endian GGUF file"),
             (dict(scaling=("yarn", 4.0)), r"RoPE scaling 'yarn' with factor 4.0 \(llama.rope.scaling.type"),
             (dict(scaling=(None, 4.0)), r"RoPE scaling 'linear' with factor 4.0"),   # was loaded unscaled, silently
             (dict(extra_tensors={"rope_freqs.weight": (8,)}), "unexpected tensor 'rope_freqs.weight'"),
             (dict(extra_tensors={"blk.0.attn_q.bias": (32,)}), "unexpected tensor 'blk.0.attn_q.bias'"),
             (dict(H=2, Hkv=2, omit=("attention.head_count_kv",)), None),
             (dict(pad_norms=True, types={"output_norm.weight": "Q8_0"}), None),
             (dict(H=2, Hkv=1, omit=("attention.head_count_kv",)), r"'blk.0.attn_k.weight' gives layers.0.attn.wk"),
             (dict(omit=("embedding_length",)), "metadata key llama.embedding_length is missing")]
    for i, (kw, match) in enumerate(cases):
        p = str(tmp_path / f"c{i}.gguf")
        write_llama_gguf(p, **kw)
        if match is None:
            tl.load_gguf(p)
            continue
        with pytest.raises(ValueError, match=match) as e:
            tl.load_gguf(p)
        assert str(e.value).startswith(f"path: {p!r}"), kw


def test_mistyped_metadata_is_refused_by_key(tmp_path):
    pytest.importorskip("gguf")
    import gguf
    T = gguf.GGUFValueType
    for key, value, vtype, match in [("llama.embedding_length", "32", T.STRING, "llama.embedding_length = '32' is not"),
                                     ("llama.attention.head_count", 0, T.UINT32, "head_count = 0 is not a positive"),
                                     ("llama.attention.head_count", 3, T.UINT32, "not a multiple of attention.head_"),
                                     ("llama.rope.freq_base", -1.0, T.FLOAT32, "freq_base = -1.0 is not a positive"),
                                     ("llama.block_count", True, T.BOOL, "block_count = True is not a positive int"),
                                     ("llama.rope.dimension_count", 8, T.UINT32, "only heads of width"),
                                     ("llama.expert_count", 8, T.UINT32, "mixture-of-experts"),
                                     ("general.architecture", "qwen2", T.STRING, "architecture 'qwen2'")]:
        p = tmp_path / "k.gguf"
        write_llama_gguf(p, omit=(key[6:],) if key.startswith("llama.") else ())
        r = gguf.GGUFReader(str(p))
        w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), value if key == "general.architecture" else "llama")
        for k, fld in r.fields.items():
            if not k.startswith("GGUF.") and k != "general.architecture":
                vt = fld.types[0]
                w.add_key_value(k, fld.contents(), vt, sub_type=fld.types[-1] if vt == T.ARRAY else None)
        if key != "general.architecture":
            w.add_key_value(key, value, vtype)
        for t in r.tensors:
            w.add_tensor(t.name, onp.array(t.data))
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
        with pytest.raises(ValueError, match=match) as e:
            tl.load_gguf(str(tmp_path / "m.gguf"))
        assert "m.gguf" in str(e.value), key


# ------------------------------------------------------------------------------------------------------------
# 5. More kinds of the same bugs, found by trying inputs as a new user would
# ------------------------------------------------------------------------------------------------------------
def test_more_kinds():
    b = {"targets": onp.zeros((2, 3), int), "mask": onp.ones((2, 3))}
    z = onp.eye(18)[b["targets"]]
    z[0, 1, :] = onp.nan                                         # a diverged model: argmax of a NaN row is 0,
    assert list(tl.exact_match(z, b)) == [False, True]           # which was counted right for a target 0
    x = onp.ones((2, 3))
    with pytest.raises(ValueError, match=r"gain: must have shape \(3,\)"):
        tl.rms_norm(x, onp.ones(1))                               # broadcast silently before
    with pytest.raises(ValueError, match="eps: must be positive"):
        tl.rms_norm(onp.zeros((1, 3)), eps=0)                      # 0 / 0 before
    with pytest.raises(ValueError, match="meta: must be the metadata dict of load_gguf"):
        tl.Tokenizer.from_gguf((None, None, {}))                  # the whole tuple of load_gguf
    gguf = pytest.importorskip("gguf")
    raw = gguf.quants.quantize(onp.linspace(-1, 1, 64, dtype=onp.float32), gguf.GGMLQuantizationType.Q4_1)
    onp.testing.assert_array_equal(tl.dequantize(raw, gguf.GGMLQuantizationType.Q4_1), tl.dequantize(raw, "Q4_1"))
    pytest.importorskip("regex")
    tok = tl.Tokenizer([*tl.byte_chars().values()], [])
    with pytest.raises(ValueError, match="text: '\\\\ud800' holds a lone surrogate"):
        tok.encode("a\ud800b")                                    # UnicodeEncodeError from deep inside before
    assert tok.decode(tok.encode("a\ud800b", errors="ignore")) == "ab"
