"""Every hand-written VJP (autograd.extend.primitive + defvjp) checked by finite differences in float64.

The whole-model gradient tests in test_core.py cover these indirectly; here each primitive is checked alone,
on random inputs, in forward and reverse mode where autograd supports it (check_grads compares the VJP with
numerical differences of the forward function)."""
import autograd.numpy as np
import numpy as onp
import pytest
from autograd.test_util import check_grads

import tinyloop as tl

R = onp.random.default_rng(0)


def rand(*shape):
    return R.standard_normal(shape)


def test_rms_norm():
    check_grads(lambda x: tl._rms(x, 1e-6), modes=["rev"], order=1)(rand(3, 4, 8))
    x, g = rand(2, 8), rand(8)                # check_grads checks only its first argument: one call per argument
    check_grads(lambda x: tl.rms_norm(x, g, 1e-5), modes=["rev"], order=1)(x)
    check_grads(lambda g: tl.rms_norm(x, g, 1e-5), modes=["rev"], order=1)(g)


def test_relu2():
    x = rand(4, 6)
    x[onp.abs(x) < 1e-3] = 0.5            # keep away from the kink, where finite differences are meaningless
    check_grads(tl.relu2, modes=["rev"], order=1)(x)


def test_apply_rope():
    cfg = tl.Config(vocab=5, d_model=16, n_heads=2, n_layers=1, seq_len=8, dtype="float64")
    cos, sin, Rm = tl.rope_tables(cfg, 3, 5)
    check_grads(lambda x: tl.apply_rope(x, cos, sin, Rm), modes=["rev"], order=1)(rand(2, 2, 5, 8))


def naive_attention(q, k, v):
    """Independent reference: every query head gets its kv head's k, v copied (np.repeat), full [T, S] mask."""
    G, T, S = q.shape[1] // k.shape[1], q.shape[2], k.shape[2]
    k, v = onp.repeat(k, G, axis=1), onp.repeat(v, G, axis=1)
    s = q @ onp.swapaxes(k, -1, -2) / onp.sqrt(q.shape[-1])
    s = onp.where(onp.arange(S)[None, :] <= onp.arange(S - T, S)[:, None], s, -onp.inf)
    p = onp.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True) @ v


@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("past", [0, 3])
@pytest.mark.parametrize("heads", [(3, 3), (6, 2)])            # (H, Hkv): multi-head and grouped-query (G = 3)
@pytest.mark.parametrize("block", [256, 3])                    # one query block, and blocks of 3 (T = 7: 3 + 3 + 1)
def test_causal_attention(bounded, past, heads, block, monkeypatch):
    monkeypatch.setattr(tl, "QUERY_BLOCK", block)
    (H, Hkv), T = heads, 7
    q, k, v = rand(2, H, T, 8), rand(2, Hkv, T + past, 8), rand(2, Hkv, T + past, 8)
    if bounded:                           # the bounded shortcut assumes |scores| small (QK-norm): keep them so
        q, k = 0.3 * q / onp.linalg.norm(q, axis=-1, keepdims=True), k / onp.linalg.norm(k, axis=-1, keepdims=True)
    onp.testing.assert_allclose(tl.causal_attention(q, k, v, bounded), naive_attention(q, k, v), rtol=1e-12, atol=1e-12)
    # one tuple argument: check_grads checks the gradient of its FIRST argument only
    check_grads(lambda qkv: tl.causal_attention(*qkv, bounded), modes=["rev"], order=1)((q, k, v))


def test_embed_lookup():
    tokens = R.integers(0, 7, (2, 5))
    check_grads(lambda E: tl.embed_lookup(E, tokens), modes=["rev"], order=1)(rand(7, 4))


def test_cross_entropy():
    targets, mask = R.integers(0, 6, (2, 5)), (R.random((2, 5)) > 0.3).astype(float)
    check_grads(lambda z: tl.cross_entropy(z, targets, mask), modes=["rev"], order=1)(rand(2, 5, 6))


def test_softmax_log_softmax_gelu_silu():
    z = rand(3, 7)
    for f in (tl.softmax, tl.log_softmax, tl.gelu, tl.silu):
        check_grads(f, modes=["rev"], order=1)(z)
