"""The real-model fast paths change no number: the in-place KV cache (tl.LayerCache) and retrofit_toy's shared
evaluation of a window's settings (window_eval) against the plain computations they replace; and Config's
NumPy-scalar arguments, which used to promote a float32 model to float64 silently."""
import numpy as onp
import pytest

import retrofit_toy as rt
import tinyloop as tl
from reference import random_params

GQA = tl.Config(vocab=13, d_model=16, n_heads=4, n_kv_heads=2, n_layers=6, seq_len=24, mlp="swiglu",
                norm="rms_gain", qk_norm=False, softcap=None, rope="pairs", tie_embeddings=True, embed_norm=False)


def test_layer_cache_writes_in_place_and_commits_only_when_told():
    rng = onp.random.default_rng(0)
    c = tl.LayerCache(1, 2, 5, 3)
    assert c.committed() is None
    k1, v1 = rng.normal(size=(2, 1, 2, 2, 3)).astype("float32")
    ka, va = c.write(k1, v1)                                     # scratch: nothing committed yet
    assert ka.shape == (1, 2, 2, 3) and onp.shares_memory(ka, c.k) and c.committed() is None
    c.commit(2)
    k2, v2 = rng.normal(size=(2, 1, 2, 1, 3)).astype("float32")
    kb, vb = c.write(k2, v2)                                     # the cache, then this call's position
    onp.testing.assert_array_equal(kb, onp.concatenate([k1, k2], axis=2))
    onp.testing.assert_array_equal(vb, onp.concatenate([v1, v2], axis=2))
    k3 = rng.normal(size=(1, 2, 1, 3)).astype("float32")
    c.write(k3, k3)                                              # a sub-step overwrites the same scratch slot
    onp.testing.assert_array_equal(c.committed()[0], k1)        # the committed slots never change
    with pytest.raises(ValueError, match="past"):
        c.write(onp.zeros((1, 2, 4, 3), "float32"), onp.zeros((1, 2, 4, 3), "float32"))   # 2 + 4 > 5 slots
    with pytest.raises(ValueError, match="past"):
        c.write(onp.zeros((1, 2, 1, 3), "float64"), onp.zeros((1, 2, 1, 3), "float64"))   # another dtype
    with pytest.raises(ValueError, match="T"):
        c.commit(2)                                              # one scratch slot was written, not two
    with pytest.raises(ValueError, match="past"):
        c.write(onp.zeros((2, 3), "float32"), onp.zeros((2, 3), "float32"))            # not [B, Hkv, T, dh]
    with pytest.raises(ValueError, match="past"):
        c.write(onp.zeros((1, 2, 1, 3), "float32"), onp.zeros((1, 2, 1, 3), "float64"))   # k and v differ


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_generate_cache_holds_the_frozen_models_keys_and_values(dtype):
    """No window: after generating, layer l's committed cache is the k, v that attention_qkv gives on the frozen
    forward pass's state entering layer l, for every position the model ran (prompt + generated - 1)."""
    cfg = tl.Config(**{**GQA.__dict__, "dtype": dtype})
    params = random_params(tl, cfg, 3, scale=0.3)
    prompt = [1, 5, 2, 7, 3]
    ids, info = tl.generate(params, cfg, prompt, 4)
    seq = onp.array([prompt + ids[:-1]])                         # every position the model ran
    x = tl.embed_lookup(params["embed"], seq)                   # the uncached forward pass, layer by layer
    tol = 1e-5 if dtype == "float32" else 1e-12
    for l, p in enumerate(params["layers"]):
        assert info["cache_shapes"][l] == (1, cfg.kv_heads, seq.shape[1], cfg.head_dim)
        k, v = info["kv"][l]
        assert k.dtype == v.dtype == onp.dtype(dtype)
        h = tl.rms_norm(x, p["g_attn"], cfg.norm_eps)
        _, k_want, v_want = tl.attention_qkv(p["attn"], h, h, cfg, 0)
        onp.testing.assert_allclose(k, k_want, rtol=tol, atol=tol)
        onp.testing.assert_allclose(v, v_want, rtol=tol, atol=tol)
        x = tl.block(p, x, cfg)[0]


def specs_for(a, b):
    out = [tl.LoopSpec(a, b, K, m) for m in ("naive", "euler", "rk") for K in (1, 2, 3, 6)]
    out += [tl.LoopSpec(a, b, 4, m, **rt.rule_params(m, 4)) for m in ("ema", "residual_scaled", "poly_blend",
                                                                        "anderson", "uniform")]
    out += [tl.LoopSpec(a, b, 8, "ema", halt_tau=tau) for tau in (0.1, 0.045, 0.04, 0.02)]
    out += [tl.LoopSpec(a, b, 3, "rk", mode) for mode in ("layer", "per_layer")]
    return out


MOE = tl.Config(vocab=13, d_model=16, n_heads=2, n_layers=6, seq_len=24, n_experts=4, top_k=2)


@pytest.mark.parametrize("cfg", [GQA, MOE], ids=["gqa", "moe"])
def test_window_eval_gives_token_nll_bitwise_for_every_setting(monkeypatch, cfg):
    """retrofit_toy's shared evaluation (frozen pass once, memoised window layers, one head per distinct window
    output) against tl.token_nll setting by setting, and the halting rule's sub-steps against halting_steps.
    MoE: the layer modes freeze the natural pass's routing, which the shared path must not lose."""
    params = random_params(tl, cfg, 5, scale=0.3)
    monkeypatch.setitem(rt._REAL, "model", (params, cfg, None))
    tokens = onp.random.default_rng(2).integers(0, cfg.vocab, (2, 12))
    frozen = [rt.frozen_pass(params, cfg, row) for row in tokens]
    for row, (states, nll) in zip(tokens, frozen):
        onp.testing.assert_array_equal(nll, tl.token_nll(params, row[None], cfg)[0])
    halting = set()
    for a, b in ((1, 3), (2, 4)):
        specs = specs_for(a, b)
        for row, (states, nll) in zip(tokens, frozen):
            got = rt.window_eval((None, row, a, b, states[a:b + 2], nll, specs))
            for spec, (mean_nll, steps) in zip(specs, got):
                want = tl.token_nll(params, row[None], cfg, window=spec)[0].mean()
                assert mean_nll == want, spec
                if spec.halt_tau is not None:
                    assert steps == rt.halting_steps(params, cfg, row[None], spec)[0]
                    halting.add(steps)
                else:
                    assert steps is None
    assert len(halting) >= 2, halting              # the thresholds really halt at different sub-steps


def test_config_takes_numpy_scalars_as_python_numbers():
    """round(1 / np.sqrt(2 * N), 4) is a np.float64; kept as one it made every activation float64 (NumPy 2
    promotes float32 * np.float64 to float64). Config converts it, so a float32 model computes in float32."""
    N = onp.int64(4)
    cfg = tl.Config(vocab=11, d_model=16, n_heads=2, n_layers=N, seq_len=12, branch_scale=round(1 / onp.sqrt(2 * N), 4))
    assert type(cfg.n_layers) is int and type(cfg.branch_scale) is float
    assert cfg == tl.Config(vocab=11, d_model=16, n_heads=2, n_layers=4, seq_len=12, branch_scale=0.3536)
    params = tl.init_params(cfg, onp.random.default_rng(0))
    z, _ = tl.forward(params, onp.zeros((1, 5), int), cfg, "standard", diagnostics=False)
    assert z.dtype == onp.float32
    ids, info = tl.generate(params, cfg, [1, 2, 3], 3, tl.LoopSpec(1, 2, 3, "rk"))
    assert all(k.dtype == onp.float32 for k, _ in info["kv"])
    for kw, name in ((dict(branch_scale="0.5"), "branch_scale"), (dict(norm_eps=True), "norm_eps"),
                     (dict(d_ff=2.5), "d_ff"), (dict(n_kv_heads=0), "n_kv_heads"), (dict(top_k=1.0), "top_k")):
        with pytest.raises(ValueError, match=name):
            tl.Config(**kw)
