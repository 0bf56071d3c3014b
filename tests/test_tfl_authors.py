"""tinyloop's training-free looping against a float64 transliteration of the authors' Hugging Face code.

The transliteration below follows L-z-Chen/Training-Free-Looped-Transformer, loop_qwen3.py, step by step:
`_looped_forward` (prefill vs incremental decode, the decode modes and their counter, the bypass path, the stash
pass and the three cache strategies), `_iterate_loop` (every rule), `block_anchored`, `per_layer_anchored`,
`uniform`, `_layer_anchored_frozen` (norm interpolation, routing capture / freeze, natural-pass K/V set aside and
restored) and transformers' DynamicCache (append on every cached call, `crop` to undo). It runs a tinyloop-shaped
model (the same pre-norm block: RMSNorm, RoPE, QK-norm, relu^2 MLP or top-k MoE) written here with per-head,
per-position loops in float64; nothing of tinyloop is used but the parameter tree. Positions are read off layer
0's cache as HF does (so windows start at layer >= 1 here).
"""
import numpy as np
import pytest

import tinyloop as tl
from reference import random_params, rms, rope_vec

DENSE = tl.Config(vocab=13, d_model=16, n_heads=2, n_layers=5, seq_len=24, dtype="float64")
MOE = tl.Config(vocab=13, d_model=16, n_heads=2, n_layers=5, seq_len=24, n_experts=4, top_k=2, dtype="float64")
A, B = 1, 3                          # the window [1..3]: loop_start = 1, loop_end = 4 in the authors' terms


# --- the model, with a DynamicCache ------------------------------------------------------------------------------
class CacheLayer:
    """transformers' DynamicLayer: keys / values [S, Hkv, dh]; every cached call appends, crop(n) truncates."""

    def __init__(self, cfg):
        self.k = np.zeros((0, cfg.kv_heads, cfg.head_dim))
        self.v = np.zeros((0, cfg.kv_heads, cfg.head_dim))

    def get_seq_length(self):
        return len(self.k)

    def update(self, k, v):
        self.k, self.v = np.concatenate([self.k, k]), np.concatenate([self.v, v])
        return self.k, self.v

    def crop(self, n):
        self.k, self.v = self.k[:n], self.v[:n]


def experts_out(p, u, sel, rw, cfg):
    """sum over the chosen experts of rw * expert(u), token by token.  u [T, d]."""
    y = np.zeros_like(u)
    for t in range(len(u)):
        for e, w in zip(sel[t], rw[t]):
            h = np.maximum(u[t] @ p["w1"][e], 0) ** 2
            y[t] += w * (h @ p["w2"][e])
    return y


def hf_layer(p, x, pos0, cfg, cache=None, mlp_mode=None, frozen=None):
    """One decoder layer on x [T, d] at positions pos0 .. pos0+T-1. cache: a CacheLayer (append, attend over all
    of it) or None (attend within x only). MoE mlp_mode (the authors' `_routing_moe_forward`): None / "capture"
    route normally ("capture" also returns the routing), "frozen" reuses `frozen` = (sel, rw).
    Returns (y [T, d], routing)."""
    T, H, Hkv, dh = len(x), cfg.n_heads, cfg.kv_heads, cfg.head_dim
    u = rms(x, cfg.norm_eps)
    q = (u @ p["attn"]["wq"]).reshape(T, H, dh)
    k = (u @ p["attn"]["wk"]).reshape(T, Hkv, dh)
    v = (u @ p["attn"]["wv"]).reshape(T, Hkv, dh)
    for i in range(T):
        for h in range(H):
            q[i, h] = rms(rope_vec(q[i, h], pos0 + i, cfg.rope_theta, cfg.rope), cfg.norm_eps)
        for h in range(Hkv):
            k[i, h] = rms(rope_vec(k[i, h], pos0 + i, cfg.rope_theta, cfg.rope), cfg.norm_eps)
    Ks, Vs = cache.update(k, v) if cache is not None else (k, v)
    P = len(Ks) - T                                       # entries before these T (the past)
    att = np.zeros((T, H * dh))
    for i in range(T):
        for h in range(H):
            keys = range(P + i + 1)                       # the whole past, and causal within the T new ones
            s = np.array([q[i, h] @ Ks[j, h // (H // Hkv)] for j in keys]) / np.sqrt(dh)
            w = np.exp(s - s.max())
            att[i, h * dh:(h + 1) * dh] = (w / w.sum()) @ np.array([Vs[j, h // (H // Hkv)] for j in keys])
    x = x + att @ p["attn"]["wo"]
    u = rms(x, cfg.norm_eps)
    if not cfg.n_experts:
        return x + np.maximum(u @ p["mlp"]["w1"], 0) ** 2 @ p["mlp"]["w2"], None
    if mlp_mode == "frozen":
        sel, rw = frozen
    else:
        z = u @ p["moe"]["router"]
        probs = np.exp(z - z.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        sel = np.argsort(-probs, axis=-1, kind="stable")[:, :cfg.top_k]          # torch.topk
        rw = np.take_along_axis(probs, sel, -1)
        rw = rw / rw.sum(-1, keepdims=True)                                       # norm_topk_prob
    return x + experts_out(p["moe"], u, sel, rw, cfg), (sel, rw)


def rescale(a, n):                                        # the authors' _rescale
    return a * (n / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-6))


# --- loop_qwen3.py `_iterate_loop` -----------------------------------------------------------------------------
def iterate_loop(x_init, run, s):
    K, strategy, eps = s["K"], s["strategy"], 1e-6
    a_ = s.get("ema_alpha", 0.5)
    tau = s.get("halt_tau")

    def halted(x_new, x_old):
        return tau is not None and np.linalg.norm(x_new - x_old) / max(np.linalg.norm(x_old), eps) < tau

    if strategy == "naive":
        x = x_init
        for _ in range(K):
            x = run(x)
        return x
    if strategy == "residual_scaled":
        y = x_init
        for _ in range(K):
            y = run(y)
        return x_init + (y - x_init) / K
    if strategy in ("ema", "ema_sched", "input_anchor", "norm_stab"):
        x = x_init
        target = np.maximum(np.linalg.norm(x_init, axis=-1, keepdims=True), eps)
        for k in range(K):
            y = run(x)
            a = s["per_step_alphas"][k] if strategy == "ema_sched" else a_
            x_new = a * y + (1.0 - a) * (x_init if strategy == "input_anchor" else x)
            if strategy == "norm_stab":
                x_new = x_new * (target / np.maximum(np.linalg.norm(x_new, axis=-1, keepdims=True), eps))
            if halted(x_new, x):
                return x_new
            x = x_new
        return x
    if strategy == "heavy_ball":
        x = x_prev = x_init
        for _ in range(K):
            G = run(x)
            x_new = x + a_ * (G - x) + s.get("momentum_beta", 0.3) * (x - x_prev)
            if halted(x_new, x):
                return x_new
            x_prev, x = x, x_new
        return x
    if strategy == "anderson":
        m_max, beta = s.get("anderson_m", 2), s.get("anderson_beta", 1.0)
        x, hx, hg = x_init, [], []
        for _ in range(K):
            G = run(x)
            hx, hg = (hx + [x])[-(m_max + 1):], (hg + [G])[-(m_max + 1):]
            m = len(hx) - 1
            if m == 0:
                x_new = (1.0 - beta) * x + beta * G
            else:
                dF = np.stack([(hg[i + 1] - hx[i + 1]) - (hg[i] - hx[i]) for i in range(m)], -1)
                dX = np.stack([hx[i + 1] - hx[i] for i in range(m)], -1)
                Af = dF.reshape(-1, m).T @ dF.reshape(-1, m)
                Af = Af + 1e-6 * max(np.abs(np.diag(Af)).max(), 1e-8) * np.eye(m)
                gamma = np.linalg.solve(Af, dF.reshape(-1, m).T @ (G - x).reshape(-1))
                x_new = (1.0 - beta) * (x - (dX * gamma).sum(-1)) + beta * (G - (dF * gamma).sum(-1))
            if halted(x_new, x):
                return x_new
            x = x_new
        return x
    if strategy == "aitken":
        x = x_init
        for _ in range(K // 2):
            g1 = run(x)
            g2 = run(g1)
            d1, d2 = g1 - x, g2 - 2.0 * g1 + x
            mask = np.abs(d2) > (1e-3 * np.abs(d1) + 1e-4)
            update = np.where(mask, d1 * d1 / np.where(mask, d2, 1.0), -d1)
            x_new = x - np.clip(update, -np.abs(d1), np.abs(d1))
            if halted(x_new, x):
                return x_new
            x = x_new
        return x
    if strategy == "poly_blend":
        w = s["per_step_alphas"]
        gi, out = x_init, w[0] * x_init
        for k in range(1, K + 1):
            gi = run(gi)
            out = out + w[k] * gi
        return out
    if strategy in ("euler", "midpoint", "heun", "rk4"):
        h = 1.0 / K
        f = lambda z: run(z) - z
        x = x_init
        for _ in range(K):
            if strategy == "euler":
                x_new = x + h * f(x)
                if halted(x_new, x):
                    return x_new
                x = x_new
            elif strategy == "midpoint":
                x = x + h * f(x + (h / 2.0) * f(x))
            elif strategy == "heun":
                k1 = f(x)
                x = x + (h / 2.0) * (k1 + f(x + h * k1))
            else:
                k1 = f(x)
                k2 = f(x + (h / 2.0) * k1)
                k3 = f(x + (h / 2.0) * k2)
                k4 = f(x + h * k3)
                x = x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        return x
    raise ValueError(strategy)


# --- loop_qwen3.py `_looped_forward` ---------------------------------------------------------------------------
def authors_forward(P, cfg, ids, cache, state, s):
    """One call of the patched model on token ids [T] with the DynamicCache `cache` (a CacheLayer per layer).
    s: the patch settings (strategy, K, anchor_beta, cache_strategy, decode_mode, decode_first_n, loop_mode,
    rule extras). Returns the logits [T, vocab]."""
    L, N = P["layers"], cfg.n_layers
    lo, hi = s["a"], s["b"] + 1
    K, beta = s["K"], s.get("anchor_beta", 0.0)
    T = len(ids)
    incremental = T == 1                                  # past_key_values is always given in generation
    state["count"] = 0 if not incremental else state.get("count", 0) + 1
    mode = s.get("decode_mode", "bypass")
    do_loop = (not incremental or mode == "full"
               or (mode == "first_n" and state["count"] <= s.get("decode_first_n", 0)))
    pos0 = cache[0].get_seq_length()                      # cache_position from layer 0
    e = P["embed"][ids]
    x = rms(e, cfg.norm_eps)                              # the tinyloop model starts at n(e)
    with_cache = lambda li, z, **kw: hf_layer(L[li], z, pos0, cfg, cache[li], **kw)[0]
    no_cache = lambda li, z, **kw: hf_layer(L[li], z, pos0, cfg, None, **kw)[0]

    def block_once(z):                                    # _run_block_once_{prefill,decode}
        saved = [cache[li].get_seq_length() for li in range(lo, hi)]
        for li in range(lo, hi):
            z = with_cache(li, z) if incremental else no_cache(li, z)
        if incremental:
            for off, li in enumerate(range(lo, hi)):
                cache[li].crop(saved[off])
        return z

    def one_layer(li):                                    # _run_one_layer_{prefill,decode}
        def f(z):
            if not incremental:
                return no_cache(li, z)
            saved = cache[li].get_seq_length()
            z = with_cache(li, z)
            cache[li].crop(saved)
            return z
        return f

    for li in range(lo):
        x = with_cache(li, x)
    if not do_loop:                                       # bypass: the window once, with its cache writes
        for li in range(lo, N):
            x = with_cache(li, x)
        return readout(P, x, cfg)
    x_in = x
    strategy = s["strategy"]
    if strategy == "uniform":
        sums = [None] * (hi - lo)
        for t in range(K):
            saved = [cache[li].get_seq_length() for li in range(lo, hi)]
            for j in range(hi - lo):
                x = with_cache(lo + j, x) if incremental else no_cache(lo + j, x)
                sums[j] = x if sums[j] is None else sums[j] + x
                x = sums[j] / (t + 1)
            if incremental:
                for off, li in enumerate(range(lo, hi)):
                    cache[li].crop(saved[off])
    elif strategy == "block_anchored":
        natural = block_once(x)
        h = x + (1.0 / K) * (natural - x)
        for _ in range(1, K):
            h = h + (1.0 / K) * (block_once(h) - h)
        x = beta * natural + (1.0 - beta) * h
    elif strategy == "per_layer_anchored":
        for li in range(lo, hi):
            f = one_layer(li)
            natural = f(x)
            h = (1.0 - 1.0 / K) * x + (1.0 / K) * natural
            for _ in range(1, K):
                h = (1.0 - 1.0 / K) * h + (1.0 / K) * f(h)
            x = beta * natural + (1.0 - beta) * h
    elif strategy == "layer_anchored_frozen":
        x = layer_anchored_frozen(L, cfg, x, lo, hi, K, beta, incremental, cache, pos0)
    elif s.get("loop_mode", "block") == "block":
        x = iterate_loop(x, block_once, s)
    else:
        for li in range(lo, hi):
            x = iterate_loop(x, one_layer(li), s)
    cs = s.get("cache_strategy", "last")
    if cs != "none" and strategy != "layer_anchored_frozen":          # the stash pass
        z = x if cs == "last" else x_in
        for li in range(lo, hi):
            z = with_cache(li, z)
    for li in range(hi, N):
        x = with_cache(li, x)
    return readout(P, x, cfg)


def layer_anchored_frozen(L, cfg, x, lo, hi, K, beta, incremental, cache, pos0):
    """loop_qwen3.py `_layer_anchored_frozen` (anchor_rescale off, its default)."""
    step = 1.0 / K
    for li in range(lo, hi):
        saved = cache[li].get_seq_length()
        natural, routing = hf_layer(L[li], x, pos0, cfg, cache[li], mlp_mode="capture")   # writes the K/V
        if incremental:                                   # set the natural entry aside ...
            nat_k, nat_v = cache[li].k[saved:], cache[li].v[saved:]
            cache[li].crop(saved)
        n_in = np.linalg.norm(x, axis=-1, keepdims=True)
        n_tgt = np.linalg.norm(natural, axis=-1, keepdims=True)
        target = lambda k: n_in + (n_tgt - n_in) * (k / K)
        h = rescale((1.0 - step) * x + step * natural, target(1))
        for k in range(1, K):
            if incremental:
                y = hf_layer(L[li], h, pos0, cfg, cache[li], mlp_mode="frozen", frozen=routing)[0]
                cache[li].crop(saved)
            else:
                y = hf_layer(L[li], h, pos0, cfg, None, mlp_mode="frozen", frozen=routing)[0]
            h = (1.0 - step) * h + step * y
            if k < K - 1:
                h = rescale(h, target(k + 1))
        if incremental:                                   # ... and restore it
            cache[li].update(nat_k, nat_v)
        x = beta * natural + (1.0 - beta) * h
    return x


def readout(P, x, cfg):
    z = rms(x, cfg.norm_eps) @ P["head"]
    return cfg.softcap * np.tanh(z / cfg.softcap)


def authors_generate(P, cfg, prompt, n_new, s):
    """Greedy generation with the patched model: prefill, then one incremental call per fed-back token."""
    cache, state = [CacheLayer(cfg) for _ in range(cfg.n_layers)], {}
    logits = [authors_forward(P, cfg, np.array(prompt), cache, state, s)[-1]]
    out = []
    for i in range(n_new):
        out.append(int(np.argmax(logits[-1])))
        if i < n_new - 1:
            logits.append(authors_forward(P, cfg, np.array([out[-1]]), cache, state, s)[-1])
    return out, np.array(logits), cache


# --- the tinyloop settings that name the same thing --------------------------------------------------------------
def settings(strategy, K=3, beta=0.5, **extra):
    """(the authors' patch settings, tinyloop's LoopSpec) for one rule."""
    s = {"a": A, "b": B, "K": K, "strategy": strategy, "anchor_beta": beta, **extra}
    kw = {}
    if strategy == "block_anchored":
        method, mode = "rk", "block"
    elif strategy == "per_layer_anchored":
        method, mode, kw["routing"] = "rk", "per_layer", "thrash"          # their per-layer rule never freezes
    elif strategy == "layer_anchored_frozen":
        method, mode = "rk", "layer"
    else:
        method = strategy
        mode = "per_layer" if extra.get("loop_mode") == "layer" else "block"
        kw["routing"] = "thrash"
    for theirs, ours in (("ema_alpha", "alpha"), ("momentum_beta", "momentum"), ("anderson_m", "history"),
                         ("anderson_beta", "damping"), ("per_step_alphas", "alphas"), ("halt_tau", "halt_tau")):
        if theirs in extra:
            kw[ours] = extra[theirs]
    return s, tl.LoopSpec(A, B, K, method, mode, beta, **kw)


@pytest.fixture(scope="module", params=["dense", "moe"])
def model(request):
    cfg = DENSE if request.param == "dense" else MOE
    params = random_params(tl, cfg, 3, scale=0.6)
    return params, cfg


def prompt_of(cfg, T=7, seed=4):
    return np.random.default_rng(seed).integers(0, cfg.vocab, T).tolist()


# --- tests ---------------------------------------------------------------------------------------------------------
RULES = [("block_anchored", {}), ("per_layer_anchored", {}), ("layer_anchored_frozen", {}),
         ("layer_anchored_frozen", {"beta": 0.0, "K": 6}), ("layer_anchored_frozen", {"K": 2}),
         ("naive", {}), ("euler", {}), ("residual_scaled", {}), ("midpoint", {"K": 2}), ("heun", {"K": 2}),
         ("rk4", {"K": 1}), ("ema", {"ema_alpha": 0.3}), ("ema_sched", {"per_step_alphas": [1.0, 0.5, 0.25]}),
         ("heavy_ball", {"ema_alpha": 0.4, "momentum_beta": 0.3}), ("anderson", {"K": 4}),
         ("anderson", {"K": 4, "anderson_m": 1, "anderson_beta": 0.6}), ("aitken", {"K": 4}),
         ("input_anchor", {}), ("poly_blend", {"per_step_alphas": [0.1, 0.2, 0.3, 0.4]}), ("norm_stab", {}),
         ("uniform", {}), ("ema", {"loop_mode": "layer"}), ("euler", {"loop_mode": "layer", "K": 4}),
         ("ema", {"K": 8, "halt_tau": 0.05})]


@pytest.mark.parametrize("strategy, extra", RULES, ids=[f"{r}{e}" for r, e in RULES])
def test_prefill_logits_match_the_authors_for_every_rule(model, strategy, extra):
    """The looped forward of the whole prompt (prefill: the loop's passes attend among the current iterates)."""
    params, cfg = model
    extra = dict(extra)
    s, spec = settings(strategy, K=extra.pop("K", 3), beta=extra.pop("beta", 0.5), **extra)
    ids = prompt_of(cfg, T=9)
    want = authors_forward(params, cfg, np.array(ids), [CacheLayer(cfg) for _ in range(cfg.n_layers)], {}, s)
    got = tl.forward(params, np.array([ids]), cfg, "standard", window=spec)[0][0]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-11)


GEN = [("layer_anchored_frozen", "full"), ("layer_anchored_frozen", "bypass"), ("layer_anchored_frozen", "first_n"),
       ("block_anchored", "full"), ("per_layer_anchored", "full"), ("ema", "first_n"), ("uniform", "full")]


@pytest.mark.parametrize("cache", tl.CACHE_MODES)
@pytest.mark.parametrize("strategy, decode", GEN, ids=[f"{r}-{d}" for r, d in GEN])
def test_generation_matches_the_authors(model, strategy, decode, cache):
    """Greedy decoding with the KV cache: the same tokens, the logits of every step to float64 rounding, and the
    same cache at the end (the stash pass, the natural-pass K/V of layer mode, what cache "none" leaves out)."""
    params, cfg = model
    s, spec = settings(strategy, K=3, beta=0.5, cache_strategy=cache, decode_mode=decode, decode_first_n=2)
    prompt = prompt_of(cfg)
    want_ids, want_logits, want_cache = authors_generate(params, cfg, prompt, 6, s)
    ids, info = tl.generate(params, cfg, prompt, 6, spec, cache, decode, first_n=2)
    assert ids == want_ids
    np.testing.assert_allclose(info["logits"], want_logits, rtol=1e-10, atol=1e-11)
    for j in range(cfg.n_layers):
        if want_cache[j].get_seq_length() == 0:
            assert info["kv"][j] is None, j
            continue
        np.testing.assert_allclose(info["kv"][j][0][0].transpose(1, 0, 2), want_cache[j].k, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(info["kv"][j][1][0].transpose(1, 0, 2), want_cache[j].v, rtol=1e-10, atol=1e-12)


def test_cache_none_keeps_the_bypassed_tokens_window_kv(model):
    """cache "none" skips the window's writes on LOOPED passes only: under bypass every decoded token still
    writes its window K/V (the window layers then hold the fed-back tokens, not the prompt)."""
    params, cfg = model
    prompt = prompt_of(cfg)
    for decode, window_len in (("bypass", 5), ("first_n", 3), ("full", None)):
        _, info = tl.generate(params, cfg, prompt, 6, tl.LoopSpec(A, B, 3), "none", decode, first_n=2)
        for j in range(cfg.n_layers):
            want = (len(prompt) + 5) if not A <= j <= B else window_len
            assert (None if info["kv"][j] is None else info["kv"][j][0].shape[2]) == want, (decode, j)


def test_layer_mode_costs_n_plus_K_minus_1_window_passes(model):
    """The authors' layer mode has no stash pass: a looped token costs N + (K - 1) n layer evaluations."""
    params, cfg = model
    N, n, K = cfg.n_layers, B - A + 1, 3
    prompt = prompt_of(cfg)
    _, info = tl.generate(params, cfg, prompt, 4, tl.LoopSpec(A, B, K, mode="layer"), "first", "full")
    assert info["layer_evals"] == (len(prompt) + 3) * (N + (K - 1) * n)
