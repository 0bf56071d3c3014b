"""tinyloop coursework: the SOLUTIONS (for teachers, and for students who are done).

Same functions, same signatures as coursework/exercises.py; each function's docstring is copied from there at
import time (one source of truth), so read the statement in exercises.py. `python -m coursework.grade
--solutions` grades this file; `pytest -q tests/test_coursework.py` does it on every test run.
"""
import math

import numpy as np

import tinyloop as tl
from coursework import exercises as _statements


# ============================================================================================================
# Part A · [FLT] the looped model family
# ============================================================================================================
def rms_norm_vjp(x, g, eps=1e-6):
    # y_i = x_i r,  dr/dx_j = -r^3 x_j / d  =>  dy_i/dx_j = r delta_ij - r y_i y_j / d
    # dL/dx_j = sum_i g_i dy_i/dx_j = r g_j - r y_j mean(g y)
    d = x.shape[-1]
    r = 1.0 / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) / d + eps)        # [..., 1]
    y = x * r
    return r * (g - y * (np.sum(g * y, axis=-1, keepdims=True) / d))


def attention(q_in, x_in, wq, wk, wv, wo, n_heads):
    B, T, d = x_in.shape
    H, dh = n_heads, d // n_heads
    split = lambda z: z.reshape(B, T, H, dh).transpose(0, 2, 1, 3)             # [B, T, d] -> [B, H, T, dh]
    q, k, v = split(q_in @ wq), split(x_in @ wk), split(x_in @ wv)
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh)                            # [B, H, T, T]
    s = np.where(np.tril(np.ones((T, T), dtype=bool)), s, -np.inf)             # j > i masked
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p = p / p.sum(axis=-1, keepdims=True)
    y = (p @ v).transpose(0, 2, 1, 3).reshape(B, T, d)                         # heads side by side
    return y @ wo


def lt_loop(block, norm, e, h, n_layers):
    x = h
    for l in range(n_layers):
        x = block(l, x)
    return x


def lt_i_loop(block, norm, e, h, n_layers):
    x = norm(e + h)
    for l in range(n_layers):
        x = block(l, x)
    return x


def lt_ia_loop(block, norm, e, h, n_layers):
    x = norm(e)
    for l in range(n_layers):
        x = block(l, x, q=h if l == 0 else None)
    return x


def flt_res_loop(block, norm, e, h, n_layers):
    x = norm(e)
    for l in range(n_layers):
        x = block(l, norm(x + h))
    return x


def flt_loop(block, norm, e, h, n_layers):
    x = norm(e)
    for l in range(n_layers):
        x = block(l, x, q=h)
    return x


def cross_sequence_cosine(x):
    B = x.shape[0]
    if B < 2:
        return float("nan")
    u = x / np.linalg.norm(x, axis=-1, keepdims=True)                          # unit vectors [B, T, d]
    s = u.sum(axis=0)                                                          # [T, d]
    pairs = np.sum(s * s, axis=-1) - B          # ||sum_b u_b||^2 = sum_{b, b'} cos = B + sum_{b != b'} cos
    return float(np.mean(pairs / (B * (B - 1))))


def loop_count_sweep(params, cfg, batch, variant, Ks):
    tokens, targets = batch["tokens"], batch["targets"]
    mask = np.asarray(batch["mask"], dtype=float)
    out = {}
    for K in Ks:
        z = np.asarray(tl.forward(params, tokens, cfg, variant, n_loops=K, diagnostics=False)[0], dtype=float)
        m = z.max(axis=-1, keepdims=True)
        logp = z - (m + np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True)))    # log-softmax [B, T, V]
        nll = -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]      # [B, T]
        loss = float(np.sum(mask * nll) / np.sum(mask))
        wrong = (z.argmax(axis=-1) != targets) & (mask > 0)
        out[K] = (loss, float(np.mean(~wrong.any(axis=1))))
    return out


def newton_schulz(G, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G / (np.linalg.norm(G) + 1e-7)
    tall = G.shape[0] > G.shape[1]
    if tall:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


# ============================================================================================================
# Part B · [TFL] the ODE view: integrators
# ============================================================================================================
def heun_step(F, x, h):
    k1 = F(x)                                   # stage 1: c_1 = 0, at x itself
    k2 = F(x + h * k1)                          # stage 2: c_2 = 1, at x + h a_21 k1, a_21 = 1
    return x + h * (0.5 * k1 + 0.5 * k2)        # b = (1/2, 1/2)


def rk_step(F, x, h, A, b):
    ks = []
    for i in range(len(b)):
        xi = x
        for j in range(i):
            xi = xi + h * A[i][j] * ks[j]
        ks.append(F(xi))
    return x + h * sum(bi * k for bi, k in zip(b, ks))


def anchored_tableau(K, beta):
    # stage i at x_{i-1} = x0 + sum_{j<i} k_j / K  ->  A[i][j] = 1/K for j < i;  c_i = (i - 1) / K
    # y0 = x0 + k_1 and x_K = x0 + sum_j k_j / K   ->  b_1 = beta + (1 - beta)/K,  b_i = (1 - beta)/K
    # sum b = 1 (order 1); sum b c = (1 - beta)(K - 1)/(2K) < 1/2 for every K, beta: never order 2.
    A = tuple(tuple(1.0 / K if j < i else 0.0 for j in range(K)) for i in range(K))
    b = (beta + (1 - beta) / K,) + ((1 - beta) / K,) * (K - 1)
    c = tuple(i / K for i in range(K))
    return tl.Tableau(f"anchored(K={K}, beta={beta})", A, b, c, 1)


def damped_euler(g, x0, K):
    x = x0
    for _ in range(K):
        x = x + (g(x) - x) / K                  # x <- x + h F_g(x), h = 1/K
    return x


def anchored_rk(g, x0, K, beta):
    y0 = g(x0)
    x = x0 + (y0 - x0) / K                      # the first sub-step reuses the natural pass
    for _ in range(K - 1):
        x = x + (g(x) - x) / K
    return beta * y0 + (1 - beta) * x


def predict_K1(method, g, x0):
    if method in ("naive", "euler", "rk"):      # [TFL]'s rules: the natural pass, returned as is
        return g(x0)
    F = lambda x: g(x) - x                      # the ablation: ONE classical step of size 1 on F_g
    if method == "midpoint":
        return x0 + F(x0 + 0.5 * F(x0))
    if method == "heun":                        # x0 + (F(x0) + F(g(x0))) / 2 = (x0 + g(g(x0))) / 2
        return 0.5 * (x0 + g(g(x0)))
    if method == "rk4":
        k1 = F(x0)
        k2 = F(x0 + 0.5 * k1)
        k3 = F(x0 + 0.5 * k2)
        k4 = F(x0 + k3)
        return x0 + (k1 + 2 * k2 + 2 * k3 + k4) / 6
    raise ValueError(f"method: unknown {method!r}")


def frozen_at_K1():
    return {"naive", "euler", "rk"}


# ============================================================================================================
# Part C · [TFL] looping a window of a frozen model
# ============================================================================================================
def loop_window(layers, x, a, b, K, rule, mode):
    for layer in layers[:a]:
        x = layer(x)
    window = layers[a:b + 1]
    if mode == "block":
        def g(z):
            for layer in window:
                z = layer(z)
            return z
        x = rule(g, x, K)
    else:
        for layer in window:
            x = rule(layer, x, K)
    for layer in layers[b + 1:]:
        x = layer(x)
    return x


def moe_route(u, router, top_k):
    z = u @ router                                                             # [B, T, E]
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p = p / p.sum(axis=-1, keepdims=True)
    kth = -np.sort(-p, axis=-1)[..., top_k - 1:top_k]                          # the k-th largest p per token
    kept = np.where(p >= kth, p, 0.0)
    return kept / kept.sum(axis=-1, keepdims=True)


def frozen_routing_rule(run, x0, K, beta):
    y0, r = run(x0)                             # the natural pass picks the experts and gate weights
    x = x0 + (y0 - x0) / K
    for _ in range(K - 1):
        x = x + (run(x, r)[0] - x) / K          # sub-steps reuse them
    return beta * y0 + (1 - beta) * x


def stash_pass(run_layer, a, b, x0, x_looped, cache):
    if cache == "none":
        return [None] * (b - a + 1)
    s = x0 if cache == "first" else x_looped
    out = []
    for l in range(a, b + 1):
        s, kv = run_layer(l, s)
        out.append(kv)
    return out


def layer_evals_per_token(n_layers, n_window, K, looped=True, stash=True):
    if not looped:
        return n_layers
    return (n_layers - n_window) + K * n_window + (n_window if stash else 0)


def generation_evals(n_layers, n_window, K, prompt_len, n_new, decode, first_n=0, cache="first"):
    stash = cache != "none"
    fed = max(n_new - 1, 0)                     # the last generated token is never fed back
    looped_fed = {"bypass": 0, "full": fed, "first_n": min(first_n, fed)}[decode]
    return ((prompt_len + looped_fed) * layer_evals_per_token(n_layers, n_window, K, True, stash)
            + (fed - looped_fed) * n_layers)


def depth_fraction(a, b, n_layers):
    return (a + b) / 2 / n_layers


def best_window(n_layers, width, target):
    # centre = target * N, so a = centre - (width - 1) / 2, rounded, then kept inside the stack
    a = int(round(target * n_layers - (width - 1) / 2))
    a = min(max(a, 0), n_layers - width)
    return a, a + width - 1


# ============================================================================================================
# Part D · A real checkpoint
# ============================================================================================================
def dequantize_q4_1(blocks):
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)             # [n, 1]
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)             # [n, 1]
    codes = np.concatenate([blocks[:, 4:] & 15, blocks[:, 4:] >> 4], axis=1)  # [n, 32]: low nibbles first
    return (d * codes.astype(np.float32) + m).reshape(-1)


for _name, _f in list(globals().items()):
    if callable(_f) and getattr(_f, "__module__", None) == __name__ and hasattr(_statements, _name):
        _f.__doc__ = getattr(_statements, _name).__doc__
