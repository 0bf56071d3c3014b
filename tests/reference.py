"""An independent, deliberately plain reference of the FLT model family, for tests only.

Written from the paper notes, not from tinyloop.py: per-head Python loops, explicit per-position RoPE angles,
explicit causal loops, float64 throughout. Slow and obvious on purpose; tinyloop.py must agree with it.
"""
import numpy as np


def rms(x, eps):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)


def rope_vec(v, pos, theta, kind):
    """Rotate pairs of one head vector v [dh] at position pos."""
    dh = len(v)
    out = v.copy()
    for m in range(dh // 2):
        i, j = (m, m + dh // 2) if kind == "half" else (2 * m, 2 * m + 1)
        ang = pos * theta ** (-2 * m / dh)
        out[i] = v[i] * np.cos(ang) - v[j] * np.sin(ang)
        out[j] = v[i] * np.sin(ang) + v[j] * np.cos(ang)
    return out


def attn(p, qs, xs, cfg):
    """qs, xs: [T, d] normed query / key-value streams of ONE sequence."""
    T, d = xs.shape
    H, dh = cfg.n_heads, cfg.head_dim
    Hkv = cfg.kv_heads
    Q, Kx, Vx = qs @ p["wq"], xs @ p["wk"], xs @ p["wv"]
    out = np.zeros((T, H * dh))
    for hd in range(H):
        kvh = hd // (H // Hkv)
        for i in range(T):
            q = Q[i, hd * dh:(hd + 1) * dh]
            if cfg.rope != "none":
                q = rope_vec(q, i, cfg.rope_theta, cfg.rope)
            if cfg.qk_norm:
                q = rms(q, cfg.norm_eps)
            scores, vals = [], []
            for j in range(i + 1):                      # causal: keys 0..i
                k = Kx[j, kvh * dh:(kvh + 1) * dh]
                if cfg.rope != "none":
                    k = rope_vec(k, j, cfg.rope_theta, cfg.rope)
                if cfg.qk_norm:
                    k = rms(k, cfg.norm_eps)
                scores.append(q @ k / np.sqrt(dh))
                vals.append(Vx[j, kvh * dh:(kvh + 1) * dh])
            w = np.exp(np.array(scores) - max(scores))
            w /= w.sum()
            out[i, hd * dh:(hd + 1) * dh] = w @ np.array(vals)
    return out @ p["wo"]


def ffn(p, u, cfg):
    if cfg.n_experts:
        probs = np.exp(u @ p["router"])
        probs /= probs.sum(-1, keepdims=True)
        y = np.zeros_like(u)
        for t in range(len(u)):
            top = np.argsort(-probs[t], kind="stable")[:cfg.top_k]
            z = probs[t, top].sum()
            for e in top:
                y[t] += probs[t, e] / z * expert(u[t], p["w1"][e], p["w2"][e], p.get("w3", [None] * 99)[e], cfg)
        return y
    return expert(u, p["w1"], p["w2"], p.get("w3"), cfg)


def expert(u, w1, w2, w3, cfg):
    h = u @ w1
    if cfg.mlp == "relu2":
        h = np.maximum(h, 0) ** 2
    elif cfg.mlp == "gelu":
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    else:
        h = h / (1 + np.exp(-h)) * (u @ w3)
    return h @ w2


def layer(p, x, cfg, q=None):
    g1, g2 = p.get("g_attn", 1.0), p.get("g_mlp", 1.0)
    n = lambda z, g: rms(z, cfg.norm_eps) * g
    x = x + cfg.branch_scale * attn(p["attn"], n(x if q is None else q, g1), n(x, g1), cfg)
    f = p["moe"] if cfg.n_experts else p["mlp"]
    return x + cfg.branch_scale * ffn(f, n(x, g2), cfg)


def logits(params, h, cfg):
    W = params["embed"].T if cfg.tie_embeddings else params["head"]
    z = h @ W
    return z if cfg.softcap is None else cfg.softcap * np.tanh(z / cfg.softcap)


def model(params, seq, cfg, variant, K):
    """Logits [T, V] of one sequence (1-D ids), the variant's loop written out case by case."""
    P = {k: (np.asarray(v, dtype=np.float64) if not isinstance(v, list) else v) for k, v in params.items()}
    e = P["embed"][seq]
    n = lambda z: rms(z, cfg.norm_eps) * P.get("g_final", 1.0)
    L = params["layers"]
    x = rms(e, cfg.norm_eps)
    for p in L:                                            # loop 1: an ordinary transformer
        x = layer(p, x, cfg)
    h = n(x)
    for _ in range(K - 1):
        if variant == "LT":
            x = h
            for p in L:
                x = layer(p, x, cfg)
        elif variant == "LT_i":
            x = rms(e + h, cfg.norm_eps)
            for p in L:
                x = layer(p, x, cfg)
        elif variant == "LT_ia":
            x = rms(e, cfg.norm_eps)
            for i, p in enumerate(L):
                x = layer(p, x, cfg, q=h if i == 0 else None)
        elif variant == "FLT_res":
            x = rms(e, cfg.norm_eps)
            for p in L:
                x = layer(p, rms(x + h, cfg.norm_eps), cfg)
        elif variant == "FLT":
            x = rms(e, cfg.norm_eps)
            for p in L:
                x = layer(p, x, cfg, q=h)
        h = n(x)
    return logits(P, h, cfg)


def random_params(tl, cfg, seed, scale=0.5):
    """Every parameter random (init_params zeroes the output projections, which would hide bugs)."""
    rng = np.random.default_rng(seed)

    def walk(t, name=""):
        if isinstance(t, dict):
            return {k: walk(v, k) for k, v in t.items()}
        if isinstance(t, list):
            return [walk(v, name) for v in t]
        if name.startswith("g_"):
            return (1.0 + 0.2 * rng.standard_normal(t)).astype(cfg.dtype)
        s = 1.0 if name == "embed" else scale / np.sqrt(t[-2] if len(t) >= 2 else 1)
        return (s * rng.standard_normal(t)).astype(cfg.dtype)
    return walk(tl.param_shapes(cfg))
