"""Training-free looping on tinyloop models: exact reductions, MoE routing freeze, KV-cache generation."""
import numpy as onp
import pytest

import tinyloop as tl
from reference import random_params

DENSE = tl.Config(vocab=11, d_model=16, n_heads=2, n_layers=6, seq_len=24, dtype="float32")
MOE = tl.Config(vocab=11, d_model=16, n_heads=2, n_layers=6, seq_len=24, n_experts=4, top_k=2)
GQA = tl.Config(vocab=11, d_model=16, n_heads=4, n_kv_heads=2, n_layers=6, seq_len=24, mlp="swiglu",
                norm="rms_gain", qk_norm=False, softcap=None, rope="pairs", tie_embeddings=True)
METHODS = tl.LOOP_METHODS


def model(cfg, seed=0):
    return random_params(tl, cfg, seed, scale=0.3)


def toks(cfg, B=2, T=10, seed=1):
    return onp.random.default_rng(seed).integers(0, cfg.vocab, (B, T))


@pytest.mark.parametrize("cfg", [DENSE, MOE, GQA], ids=["dense", "moe", "gqa"])
@pytest.mark.parametrize("mode", tl.MODES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_at_K1_is_the_frozen_model_bitwise(cfg, mode, method):
    params, x = model(cfg), toks(cfg)
    frozen, _ = tl.forward(params, x, cfg, "standard")
    for routing in ("freeze", "thrash"):
        spec = tl.LoopSpec(2, 4, K=1, method=method, mode=mode, beta=0.3, routing=routing)
        assert onp.array_equal(tl.forward(params, x, cfg, "standard", window=spec)[0], frozen)


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
@pytest.mark.parametrize("mode", tl.MODES)
def test_anchored_beta_one_is_frozen_and_beta_zero_is_damped_euler(cfg, mode):
    params, x = model(cfg), toks(cfg)
    frozen, _ = tl.forward(params, x, cfg, "standard")
    for K in (2, 3, 5):
        rk1 = tl.forward(params, x, cfg, "standard", window=tl.LoopSpec(1, 4, K, "rk", mode, beta=1.0))[0]
        assert onp.array_equal(rk1, frozen)
        rk0 = tl.forward(params, x, cfg, "standard", window=tl.LoopSpec(1, 4, K, "rk", mode, beta=0.0))[0]
        eu = tl.forward(params, x, cfg, "standard", window=tl.LoopSpec(1, 4, K, "euler", mode))[0]
        assert onp.array_equal(rk0, eu)
        assert not onp.allclose(eu, frozen)               # looping does change the output


def test_window_looping_leaves_earlier_positions_causal():
    params = model(DENSE)
    x = toks(DENSE, B=1)
    y = x.copy()
    y[0, 6] = (y[0, 6] + 1) % DENSE.vocab
    spec = tl.LoopSpec(1, 4, K=4, method="naive")
    a = tl.forward(params, x, DENSE, "standard", window=spec)[0]
    b = tl.forward(params, y, DENSE, "standard", window=spec)[0]
    onp.testing.assert_allclose(a[0, :6], b[0, :6], rtol=1e-6, atol=1e-6)


def _moe_window_logs(routing, K=4, mode="layer"):
    params, x = random_params(tl, MOE, 0, scale=1.0), toks(MOE)     # steps large enough to move the router
    logs = {j: [] for j in range(2, 5)}
    x0 = tl.rms_norm(params["embed"][x], eps=MOE.norm_eps)
    layers = [tl.Layer(p, MOE, log=logs.get(j)) for j, p in enumerate(params["layers"])]
    out = tl.loop_window(layers, x0, 2, 4, K, "euler", mode, routing=routing)
    return out, logs


def test_routing_freeze_really_freezes_and_thrash_really_reroutes():
    frozen_out, frozen_logs = _moe_window_logs("freeze")
    thrash_out, thrash_logs = _moe_window_logs("thrash")
    for j in (2, 3, 4):
        assert len(frozen_logs[j]) == 4 and len(thrash_logs[j]) == 4       # natural pass + K-1 sub-steps
        assert tl.routing_change_fraction(frozen_logs[j]) == [0.0, 0.0, 0.0]
        # the natural passes agree (same input to the first window layer; later layers see other states)
    assert onp.array_equal(frozen_logs[2][0], thrash_logs[2][0])
    changes = [f for j in (2, 3, 4) for f in tl.routing_change_fraction(thrash_logs[j])]
    assert max(changes) > 0.0                                                 # thrash changes some tokens' experts
    assert not onp.allclose(frozen_out, thrash_out)


def test_frozen_substeps_reuse_the_natural_gate_weights():
    params, x = model(MOE), toks(MOE)
    p = params["layers"][1]
    x0 = onp.random.default_rng(0).standard_normal((2, 10, MOE.d_model)).astype("float32")
    layer = tl.Layer(p, MOE)
    y0, frozen = layer.freeze(x0)
    _, ex = tl.block(p, x0, MOE)
    x1 = x0 + 0.5 * (y0 - x0)
    manual = tl.block(p, x1, MOE, routing=ex["routing"])[0]
    assert onp.array_equal(frozen(x1), manual)
    assert onp.array_equal(y0, tl.block(p, x0, MOE)[0])


# --- KV-cache generation ---------------------------------------------------------------------------------------
def full_recompute(params, cfg, prompt, n_new):
    """Greedy decoding by re-running the whole frozen model on the growing sequence (no cache)."""
    seq, logits = list(prompt), []
    for _ in range(n_new):
        z = tl.forward(params, onp.array([seq]), cfg, "standard")[0][0, -1]
        logits.append(z)
        seq.append(int(onp.argmax(z)))
    return seq[len(prompt):], onp.array(logits)


CACHE_DECODE = [(c, d) for c in tl.CACHE_MODES for d in tl.DECODE_MODES]


@pytest.mark.parametrize("cfg", [DENSE, GQA, MOE], ids=["dense", "gqa", "moe"])
def test_cached_generation_equals_full_recomputation_where_the_definitions_imply_it(cfg):
    """Where cached decoding must equal recomputing the whole sequence with the frozen model (token by token,
    logits to float32 rounding):
      * no window: plain KV-cache decoding;
      * K = 1, every method and mode, cache="first", every decode mode: the looped window IS the frozen window,
        and the stash pass from the pre-loop state writes exactly the frozen window's K/V;
      * anchored RK with beta = 1, any K, cache="first": the looped output is the natural pass itself.
    Where it must NOT:
      * cache="last" even at K = 1: following the authors' code (loop_qwen3.py), the stash pass runs the window
        on the looped OUTPUT, so at K = 1 the window's K/V come from g(x0), not x0 (checked below, and the
        stored K/V are checked exactly in the next test);
      * K > 1: the iterates attend over one canonical cache entry per past position, while recomputation
        would loop every past position again;
      * cache="none": the window layers hold no K/V for earlier positions (the paper's catastrophic case)."""
    params = model(cfg, seed=3)
    prompt = toks(cfg, B=1, T=7, seed=4)[0].tolist()
    want_ids, want_logits = full_recompute(params, cfg, prompt, 6)
    ids, info = tl.generate(params, cfg, prompt, 6)
    assert ids == want_ids
    onp.testing.assert_allclose(info["logits"], want_logits, rtol=2e-4, atol=2e-4)
    specs = [tl.LoopSpec(2, 4, 1, m, mode) for m in METHODS for mode in tl.MODES]
    specs += [tl.LoopSpec(2, 4, K, "rk", mode, beta=1.0) for K in (2, 3) for mode in tl.MODES]
    for spec in specs:
        for decode in tl.DECODE_MODES:
            ids, info = tl.generate(params, cfg, prompt, 6, spec, "first", decode, first_n=2)
            assert ids == want_ids, (spec, decode)
            onp.testing.assert_allclose(info["logits"], want_logits, rtol=2e-4, atol=2e-4)
    last = tl.generate(params, cfg, prompt, 6, tl.LoopSpec(2, 4, 1, "rk"), "last", "bypass")[1]["logits"]
    onp.testing.assert_allclose(last[0], want_logits[0], rtol=2e-4, atol=2e-4)     # prefill: same output
    assert not onp.allclose(last[1:], want_logits[1:], atol=1e-3)                  # decode reads other K/V


@pytest.mark.parametrize("cache", ["first", "last"])
def test_stash_pass_writes_the_window_kv_of_the_pre_loop_or_the_looped_state(cache):
    """At K = 1 the looped output is the frozen model's state after layer b, h_{b+1}. So the stash pass writes
    the window layers' K/V from h_a (cache="first") or from h_{b+1} run through the window again ("last")."""
    params = model(DENSE, seed=21)
    prompt = toks(DENSE, B=1, T=8, seed=22)
    a, b = 2, 4
    _, info = tl.generate(params, DENSE, prompt[0].tolist(), 1, tl.LoopSpec(a, b, 1, "rk"), cache)
    h = [tl.rms_norm(tl.embed_lookup(params["embed"], prompt), eps=DENSE.norm_eps)]
    kv = []
    for p in params["layers"]:
        y, ex = tl.block(p, h[-1], DENSE)
        h.append(y)
        kv.append(ex["kv"])
    s = h[a] if cache == "first" else h[b + 1]
    for j in range(a, b + 1):
        s, ex = tl.block(params["layers"][j], s, DENSE)
        onp.testing.assert_allclose(info["kv"][j][0], ex["kv"][0], rtol=1e-5, atol=1e-6)
        onp.testing.assert_allclose(info["kv"][j][1], ex["kv"][1], rtol=1e-5, atol=1e-6)
    for j in list(range(a)) + list(range(b + 1, DENSE.n_layers)):          # outside the window: the frozen K/V
        onp.testing.assert_allclose(info["kv"][j][0], kv[j][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cache", tl.CACHE_MODES)
def test_prefill_equals_the_looped_forward_for_every_cache_strategy(cache):
    """The stash pass's hidden output is discarded, so the first generated token's logits are those of the
    looped model run on the whole prompt, whatever is cached."""
    params = model(DENSE, seed=5)
    prompt = toks(DENSE, B=1, T=9, seed=6)
    for spec in (tl.LoopSpec(1, 3, 4, "naive"), tl.LoopSpec(2, 4, 3, "rk", "layer"), tl.LoopSpec(0, 5, 2, "euler")):
        _, info = tl.generate(params, DENSE, prompt[0].tolist(), 1, spec, cache)
        want = tl.forward(params, prompt, DENSE, "standard", window=spec)[0][0, -1]
        onp.testing.assert_allclose(info["logits"][0], want, rtol=2e-5, atol=2e-5)


def test_stash_first_restores_the_frozen_window_cache_and_shapes_never_depend_on_K():
    params = model(DENSE, seed=7)
    prompt = toks(DENSE, B=1, T=8, seed=8)[0].tolist()
    shapes = set()
    for K in (1, 2, 5):
        for cache in ("first", "last"):
            for decode in tl.DECODE_MODES:
                _, info = tl.generate(params, DENSE, prompt, 5, tl.LoopSpec(2, 4, K, "euler"), cache, decode, 2)
                shapes.add(tuple(info["cache_shapes"]))
    assert len(shapes) == 1
    (only,) = shapes
    assert only == tuple((1, DENSE.kv_heads, 8 + 4, DENSE.head_dim) for _ in range(DENSE.n_layers))


def test_cache_none_leaves_the_window_layers_empty_and_changes_decoding():
    params = model(DENSE, seed=9)
    prompt = toks(DENSE, B=1, T=8, seed=10)[0].tolist()
    spec = tl.LoopSpec(2, 4, 1, "rk")                          # K = 1: only the cache strategy differs
    _, info_none = tl.generate(params, DENSE, prompt, 4, spec, "none", "full")
    _, info_first = tl.generate(params, DENSE, prompt, 4, spec, "first", "full")
    assert [s is None for s in info_none["cache_shapes"]] == [False, False, True, True, True, False]
    onp.testing.assert_allclose(info_none["logits"][0], info_first["logits"][0], rtol=1e-6)   # prefill same
    assert not onp.allclose(info_none["logits"][1:], info_first["logits"][1:], atol=1e-3)


def test_first_n_interpolates_between_bypass_and_full():
    params = model(DENSE, seed=11)
    prompt = toks(DENSE, B=1, T=6, seed=12)[0].tolist()
    spec = tl.LoopSpec(1, 4, 3, "naive")
    by = tl.generate(params, DENSE, prompt, 6, spec, "first", "bypass")[1]["logits"]
    full = tl.generate(params, DENSE, prompt, 6, spec, "first", "full")[1]["logits"]
    assert not onp.allclose(by[1:], full[1:])
    onp.testing.assert_array_equal(tl.generate(params, DENSE, prompt, 6, spec, "first", "first_n", 0)[1]["logits"], by)
    onp.testing.assert_array_equal(tl.generate(params, DENSE, prompt, 6, spec, "first", "first_n", 5)[1]["logits"], full)
    mid = tl.generate(params, DENSE, prompt, 6, spec, "first", "first_n", 2)[1]["logits"]
    onp.testing.assert_array_equal(mid[:3], full[:3])


@pytest.mark.parametrize("decode, looped_steps", [("bypass", 0), ("full", 5), ("first_n", 2)])
@pytest.mark.parametrize("cache", tl.CACHE_MODES)
def test_cost_counter_matches_the_layer_arithmetic(decode, looped_steps, cache):
    N, n, K, T, new = DENSE.n_layers, 3, 3, 7, 6
    params = model(DENSE, seed=13)
    _, info = tl.generate(params, DENSE, list(range(T)), new, tl.LoopSpec(2, 4, K, "rk"), cache, decode, 2)
    stash = cache != "none"
    want = T * tl.layer_evals_per_token(N, n, K, True, stash)
    want += looped_steps * tl.layer_evals_per_token(N, n, K, True, stash)
    want += (new - 1 - looped_steps) * tl.layer_evals_per_token(N, n, K, False)
    assert info["layer_evals"] == want
    assert tl.layer_evals_per_token(12, 4, 3) == 12 + 2 * 4 + 4           # the window costs (K + 1) n


def test_loop_arguments_are_validated():
    params, x = model(DENSE), toks(DENSE)
    layers = [tl.Layer(p, DENSE) for p in params["layers"]]
    x0 = onp.zeros((1, 3, DENSE.d_model), "float32")
    cases = [(dict(K=0), "K"), (dict(K=2.5), "K"), (dict(a=-1), "a"), (dict(b=6), "b"), (dict(a=4, b=2), "a"),
             (dict(beta=1.5), "beta"), (dict(beta=-0.1), "beta"), (dict(method="heavyball"), "method"),
             (dict(mode="stack"), "mode"), (dict(routing="sometimes"), "routing")]
    for kw, name in cases:
        args = dict(a=1, b=3, K=2, method="rk", mode="block", beta=0.5, routing="freeze") | kw
        with pytest.raises(ValueError, match=name):
            tl.loop_window(layers, x0, **args)
    with pytest.raises(ValueError, match="b"):
        tl.forward(params, x, DENSE, "standard", window=tl.LoopSpec(3, 9))
    with pytest.raises(ValueError, match="window"):
        tl.forward(params, x, DENSE, "FLT", 2, window=tl.LoopSpec(1, 2))
    with pytest.raises(ValueError, match="K"):
        tl.LoopSpec(1, 2, K=0)
    for kw, name in [(dict(cache="sometimes"), "cache"), (dict(decode="lazy"), "decode"),
                     (dict(n_new=-1), "n_new"), (dict(n_new=99), "n_new"), (dict(first_n=-2), "first_n"),
                     (dict(prompt=[]), "prompt"), (dict(prompt=[99]), "tokens")]:
        args = dict(prompt=[1, 2], n_new=2, window=tl.LoopSpec(1, 2)) | kw
        with pytest.raises(ValueError, match=name):
            tl.generate(params, DENSE, **args)
    with pytest.raises(ValueError, match="h"):
        tl.integrate(lambda z: z, onp.zeros(2), tl.EULER, h=0.0)
    g = lambda z: z + 0.1 * z                                            # loop_rule alone validates too
    for kw, name in [(dict(K=0), "K"), (dict(method="eular"), "method"), (dict(beta=1.7), "beta")]:
        with pytest.raises(ValueError, match=name):
            tl.loop_rule(g, onp.ones(3), **(dict(K=2) | kw))
    for (a, b, n), name in [((5, 2, 8), "a"), ((0, 9, 4), "b"), ((-1, 2, 8), "a"), ((0, 1, 0), "n_layers")]:
        with pytest.raises(ValueError, match=name):
            tl.depth_fraction(a, b, n)
