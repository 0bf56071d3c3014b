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
# every rule whose K = 1 is the frozen model bitwise (loop_rule's docstring), with the parameters that make it so
BITWISE_K1 = [("naive", {}), ("euler", {}), ("rk", {"beta": 0.3}), ("residual_scaled", {}), ("uniform", {}),
              ("ema", {"alpha": 1.0}), ("anderson", {}), ("poly_blend", {"alphas": (0.0, 1.0)})]


def model(cfg, seed=0):
    return random_params(tl, cfg, seed, scale=0.3)


def toks(cfg, B=2, T=10, seed=1):
    return onp.random.default_rng(seed).integers(0, cfg.vocab, (B, T))


@pytest.mark.parametrize("cfg", [DENSE, MOE, GQA], ids=["dense", "moe", "gqa"])
@pytest.mark.parametrize("mode", tl.MODES)
@pytest.mark.parametrize("method, kw", BITWISE_K1, ids=[m for m, _ in BITWISE_K1])
def test_every_method_at_K1_is_the_frozen_model_bitwise(cfg, mode, method, kw):
    params, x = model(cfg), toks(cfg)
    frozen, _ = tl.forward(params, x, cfg, "standard")
    for routing in ("freeze", "thrash"):
        spec = tl.LoopSpec(2, 4, K=1, method=method, mode=mode, routing=routing, **kw)
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


@pytest.mark.parametrize("mode", ["layer", "per_layer"])
def test_routing_freeze_really_freezes_and_thrash_really_reroutes(mode):
    frozen_out, frozen_logs = _moe_window_logs("freeze", mode=mode)
    thrash_out, thrash_logs = _moe_window_logs("thrash", mode=mode)
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
      * K = 1, every rule whose K = 1 is bitwise, every mode, cache="first", every decode mode: the looped
        window IS the frozen window, and the stash pass from the pre-loop state (block, per_layer) or each
        layer's natural pass (layer) writes exactly the frozen window's K/V;
      * anchored RK with beta = 1, any K, cache="first": the looped output is the natural pass itself (the
        authors' gloop_check: beta = 1 reproduces the frozen model token for token).
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
    specs = [tl.LoopSpec(2, 4, 1, m, mode, **kw) for m, kw in BITWISE_K1 for mode in tl.MODES]
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


def test_cache_none_skips_the_window_writes_of_looped_passes_only():
    """cache "none" (the authors' semantics): a looped pass writes no window K/V, a bypassed decode token does.
    decode "full" loops every pass, so the window layers stay empty; under "bypass" they hold the fed-back
    tokens only. Prefill logits are those of every other strategy; decoding differs."""
    params = model(DENSE, seed=9)
    prompt = toks(DENSE, B=1, T=8, seed=10)[0].tolist()
    spec = tl.LoopSpec(2, 4, 1, "rk")                          # K = 1: only the cache strategy differs
    _, info_none = tl.generate(params, DENSE, prompt, 4, spec, "none", "full")
    _, info_first = tl.generate(params, DENSE, prompt, 4, spec, "first", "full")
    assert [s is None for s in info_none["cache_shapes"]] == [False, False, True, True, True, False]
    onp.testing.assert_allclose(info_none["logits"][0], info_first["logits"][0], rtol=1e-6)   # prefill same
    assert not onp.allclose(info_none["logits"][1:], info_first["logits"][1:], atol=1e-3)
    _, info_by = tl.generate(params, DENSE, prompt, 4, spec, "none", "bypass")
    assert [s[2] for s in info_by["cache_shapes"]] == [11, 11, 3, 3, 3, 11]       # 8 + 3 positions; 3 in the window


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
@pytest.mark.parametrize("mode", tl.MODES)
def test_cost_counter_matches_the_layer_arithmetic(mode, decode, looped_steps, cache):
    """Counted token-layer evaluations = the formula, for every mode x decode x cache (and a rule of each cost:
    K evaluations of the window, 2K for midpoint, K for uniform's per-layer passes)."""
    N, n, T, new = DENSE.n_layers, 3, 7, 6
    params = model(DENSE, seed=13)
    for method, K in (("rk", 3), ("midpoint", 2), ("uniform", 2)):
        _, info = tl.generate(params, DENSE, list(range(T)), new, tl.LoopSpec(2, 4, K, method, mode), cache, decode, 2)
        looped = tl.layer_evals_per_token(N, n, K, True, cache != "none", mode, method)
        want = (T + looped_steps) * looped + (new - 1 - looped_steps) * tl.layer_evals_per_token(N, n, K, False)
        assert info["layer_evals"] == want, method
        E = K * (2 if method == "midpoint" else 1)                       # the formula itself, written out
        stash = n if mode != "layer" and cache != "none" else 0
        assert looped == N + (E - 1) * n + stash


def test_layer_evals_per_token_formula():
    assert tl.layer_evals_per_token(12, 4, 3) == 12 + 2 * 4 + 4             # block, stash: the window costs (K + 1) n
    assert tl.layer_evals_per_token(12, 4, 3, mode="layer") == 12 + 2 * 4     # the authors' layer mode: N + (K - 1) n
    assert tl.layer_evals_per_token(12, 4, 3, stash=False) == 12 + 2 * 4
    assert tl.layer_evals_per_token(12, 4, 3, method="rk4") == 12 + 11 * 4 + 4
    assert tl.layer_evals_per_token(36, 4, 6, looped=False) == 36


def test_halting_reports_its_steps_through_loop_window():
    params, x = model(DENSE), toks(DENSE)
    x0 = tl.rms_norm(params["embed"][x], eps=DENSE.norm_eps)
    counter = {"evals": 0}
    layers = [tl.Layer(p, DENSE, counter=counter) for p in params["layers"]]
    info = {}
    tl.loop_window(layers, x0, 2, 4, 12, "ema", halt_tau=0.05, info=info)
    assert len(info["steps"]) == 1 and 1 <= info["steps"][0] < 12 and info["evals"] == info["steps"]
    assert counter["evals"] == x.shape[1] * (3 + 3 * info["evals"][0])      # positions x (layers outside + window evals)
    info = {}
    tl.loop_window(layers, x0, 2, 4, 4, "ema", "per_layer", halt_tau=1e-9, info=info)
    assert info == {"steps": [4, 4, 4], "evals": [4, 4, 4]}


# --- arguments of the wrong kind (issue 15): a ValueError naming the argument, or the obvious reading ----------
def test_a_window_given_as_a_pair_is_the_obvious_loopspec():
    params, x = model(DENSE), toks(DENSE)
    want = tl.forward(params, x, DENSE, "standard", window=tl.LoopSpec(2, 3))[0]
    for w in ((2, 3), [2, 3], {"a": 2, "b": 3}):
        assert onp.array_equal(tl.forward(params, x, DENSE, "standard", window=w)[0], want)
    assert tl.generate(params, DENSE, [1, 2, 3], 3, window=(2, 3))[0] == tl.generate(
        params, DENSE, [1, 2, 3], 3, window=tl.LoopSpec(2, 3))[0]


def test_recipe_defaults():
    spec = tl.LoopSpec(13, 16)
    assert (spec.K, spec.method, spec.mode, spec.beta) == (6, "rk", "block", 0.5)
    assert (spec.alpha, spec.momentum, spec.history, spec.damping, spec.alphas, spec.halt_tau) == (0.5, 0.3, 2, 1.0,
                                                                                                  None, None)
    df = tl.depth_fraction(15, 18, 36)                      # the authors' README: [15..18] of 36 is "0.42 - 0.50"
    assert (round(df.start, 2), round(df.end, 2), round(df.centre, 3)) == (0.42, 0.5, 0.458)
    assert tuple(df) == (15 / 36, 18 / 36) and str(df) == "0.42-0.50"


@pytest.mark.parametrize("kw, name, text", [
    (dict(a=-2, b=-1), "a", "window start"), (dict(a=1, b=-1), "b", "window end"), (dict(a=3, b=1), "a", "after"),
    (dict(a=1.0, b=2), "a", "integer"), (dict(a=1, b=2, K=0), "K", ">= 1"), (dict(a=1, b=2, K=True), "K", "integer"),
    (dict(a=1, b=2, method="ema_schedule"), "method", "ema_sched"), (dict(a=1, b=2, mode="stack"), "mode", "per_layer"),
    (dict(a=1, b=2, method="ema_sched"), "alphas", "K step sizes"),
    (dict(a=1, b=2, K=2, method="ema_sched", alphas=(0.5,)), "alphas", "2 finite"),
    (dict(a=1, b=2, K=1, method="poly_blend", alphas=(0.5, 0.6)), "alphas", "sum to 1"),
    (dict(a=1, b=2, method="rk", alphas=(1.0,)), "alphas", "takes no alphas"),
    (dict(a=1, b=2, method="naive", halt_tau=0.1), "halt_tau", "no early halting"),
    (dict(a=1, b=2, method="euler", mode="layer", halt_tau=0.1), "halt_tau", "layer_anchored_frozen"),
    (dict(a=1, b=2, method="aitken", K=3), "K", "even"), (dict(a=1, b=2, alpha=0), "alpha", "> 0"),
    (dict(a=1, b=2, history=0), "history", ">= 1"), (dict(a=1, b=2, damping=-1), "damping", "> 0"),
    (dict(a=1, b=2, momentum=float("nan")), "momentum", "finite"), (dict(a=1, b=2, halt_tau=-1), "halt_tau", "> 0"),
    (dict(a=1, b=2, beta=1.5), "beta", "[0, 1]"), (dict(a=1, b=2, routing="sometimes"), "routing", "freeze")])
def test_loopspec_names_the_bad_argument(kw, name, text):
    with pytest.raises(ValueError, match=name) as e:
        tl.LoopSpec(**kw)
    assert text in str(e.value)


def test_loop_arguments_are_validated_everywhere():
    params, x = model(DENSE), toks(DENSE)
    layers = [tl.Layer(p, DENSE) for p in params["layers"]]
    x0 = onp.zeros((1, 3, DENSE.d_model), "float32")
    with pytest.raises(ValueError, match="b"):
        tl.forward(params, x, DENSE, "standard", window=tl.LoopSpec(3, 9))
    for bad, text in (((2,), "(a, b)"), ((1, 2, 3), "(a, b)"), ("2..3", "(a, b)"), ({"a": 1}, "'a' and 'b'"),
                      ({"a": 1, "b": 2, "k": 3}, "unknown"), (5, "(a, b)")):
        with pytest.raises(ValueError, match="window") as e:
            tl.forward(params, x, DENSE, "standard", window=bad)
        assert text in str(e.value)
    with pytest.raises(ValueError, match="window"):
        tl.forward(params, x, DENSE, "FLT", 2, window=tl.LoopSpec(1, 2))
    with pytest.raises(ValueError, match="layers"):
        tl.loop_window([], x0, 0, 0)
    with pytest.raises(ValueError, match="layers"):
        tl.loop_window([1, 2], x0, 0, 0)
    with pytest.raises(ValueError, match="x"):
        tl.loop_window(layers, 3.0, 0, 0)
    with pytest.raises(ValueError, match="b"):
        tl.loop_window(layers, x0, 0, 6)
    with pytest.raises(ValueError, match="info"):
        tl.loop_window(layers, x0, 0, 1, info=[])
    g = lambda z: z + 0.1 * z                                            # loop_rule alone validates too
    for kw, name in [(dict(K=0), "K"), (dict(method="eular"), "method"), (dict(beta=1.7), "beta"),
                     (dict(g="layer"), "g"), (dict(g=[]), "g"), (dict(x0=2.0), "x0"), (dict(alpha=-1), "alpha"),
                     (dict(method="uniform", g=[g, g], y0=onp.ones(3)), "y0")]:
        with pytest.raises(ValueError, match=name):
            tl.loop_rule(**(dict(g=g, x0=onp.ones(3), K=2) | kw))
    for kw, name in [(dict(K=0), "K"), (dict(g=None), "g"), (dict(beta=2.0), "beta")]:
        with pytest.raises(ValueError, match=name):
            tl.layer_anchored_frozen(**(dict(g=g, x0=onp.ones(3), K=2) | kw))
    for (a, b, n), name in [((5, 2, 8), "a"), ((0, 9, 4), "b"), ((-1, 2, 8), "a"), ((0, 1, 0), "n_layers"),
                            ((0, 1, 2.0), "n_layers")]:
        with pytest.raises(ValueError, match=name):
            tl.depth_fraction(a, b, n)
    for args, name in [((0, 4, 3), "n_layers"), ((4, 5, 3), "n_window"), ((4, 2, 0), "K"), ((4, 2, 3, 1), "looped"),
                       ((4, 2, 3, True, True, "stack"), "mode"), ((4, 2, 3, True, True, "block", "x"), "method")]:
        with pytest.raises(ValueError, match=name):
            tl.layer_evals_per_token(*args)
    for kw, name in [(dict(p=[]), "p"), (dict(cfg={}), "cfg"), (dict(pos0=-1), "pos0"), (dict(past=[1]), "past"),
                     (dict(counter={}), "counter"), (dict(log={}), "log")]:
        with pytest.raises(ValueError, match=name):
            tl.Layer(**(dict(p=params["layers"][0], cfg=DENSE) | kw))
    for log in ([], "ids", [onp.zeros((2, 2)), onp.zeros((3, 2))]):
        with pytest.raises(ValueError, match="log"):
            tl.routing_change_fraction(log)
    with pytest.raises(ValueError, match="h"):
        tl.integrate(lambda z: z, onp.zeros(2), tl.EULER, h=0.0)
    with pytest.raises(ValueError, match="t1"):
        tl.integrate(lambda z: z, onp.zeros(2), tl.EULER, t1=-1.0)
    with pytest.raises(ValueError, match="tab"):
        tl.rk_step(lambda z: z, onp.zeros(2), 0.1, "rk4")
    with pytest.raises(ValueError, match="F"):
        tl.rk_step(None, onp.zeros(2), 0.1, tl.RK4)
    with pytest.raises(ValueError, match="K"):
        tl.anchored_tableau(0)


@pytest.mark.parametrize("kw, name, text", [
    (dict(prompt="a prompt"), "prompt", "got a str"), (dict(prompt=b"ids"), "prompt", "got a bytes"),
    (dict(prompt=[1.5, 2.0]), "prompt", "integers"), (dict(prompt=[[1, 2]]), "prompt", "1-D"),
    (dict(prompt=[]), "prompt", "non-empty"), (dict(prompt=[99]), "tokens", "vocab"),
    (dict(n_new=-1), "n_new", ">= 0"), (dict(n_new=99), "n_new", "seq_len"), (dict(n_new=2.0), "n_new", "integer"),
    (dict(cache="sometimes"), "cache", "first"), (dict(decode="lazy"), "decode", "bypass"),
    (dict(first_n=-2), "first_n", ">= 0"), (dict(window=(1, 9)), "b", "outside"), (dict(params={}), "params", "tree"),
    (dict(cfg="cfg"), "cfg", "Config")])
def test_generate_names_the_bad_argument(kw, name, text):
    params = model(DENSE)
    args = dict(params=params, cfg=DENSE, prompt=[1, 2], n_new=2, window=tl.LoopSpec(1, 2)) | kw
    with pytest.raises(ValueError, match=name) as e:
        tl.generate(**args)
    assert text in str(e.value)
