"""tinyloop coursework: the exercises (blanks). Work in a COPY of this file:

    cp coursework/exercises.py my_answers.py          # from the repository root
    python -m coursework.grade my_answers.py          # grade everything
    python -m coursework.grade my_answers.py -k heun  # only the exercises whose name contains "heun"

Each function below is a blank: replace its `raise NotImplementedError` with your answer. The docstring gives the
shapes and the equation; `tinyloop.py` (imported as `tl`) is the readable reference for the concepts, and you may
use its helpers where a docstring says so (the point of each exercise is the piece it names: do not call the
tinyloop function that IS the exercise). The grader tells you, per exercise, "ok", "not done yet", or what is
wrong: the input that broke it, the expected and the actual value, and a hint where a common mistake is known.
The solutions are in coursework/solutions.py: try not to read them first. docs/coursework.md says more.

Papers: [FLT] "Simply Stabilizing the Loop via Fully Looped Transformer", arXiv 2605.18797;
        [TFL] "Training-Free Looped Transformers", arXiv 2605.23872.
Shapes: B batch, T positions, d width, H heads, dh = d / H head width, E experts, L (or N) layers, K loops.
"""
import numpy as np  # noqa: F401  (for your answers)

import tinyloop as tl  # noqa: F401


# ============================================================================================================
# Part A · [FLT] the looped model family (notebook 01)
# ============================================================================================================
def rms_norm_vjp(x, g, eps=1e-6):
    """The gradient of the parameter-free RMSNorm, by hand (tinyloop writes it as the VJP of `_rms`).

    Forward, over the last axis of x [..., d]:
        y = n(x) = x * r,    r = (mean(x^2) + eps)^(-1/2)        (r [..., 1]: ONE number per row)
    Given x [..., d] and the upstream gradient g = dL/dy [..., d], return dL/dx [..., d].

    r depends on every x_j of its row: work out dy_i/dx_j first, then contract it with g without building the
    d x d Jacobian (a few lines of NumPy). eps matters: keep it.
    """
    raise NotImplementedError("rms_norm_vjp")


def attention(q_in, x_in, wq, wk, wv, wo, n_heads):
    """Causal multi-head attention with a SEPARATE query stream ([FLT]'s Attention Injection).

        out = Attn(Q = q_in Wq, K = x_in Wk, V = x_in Wv) Wo          (q_in = x_in is ordinary self-attention)

    q_in, x_in: [B, T, d]; wq, wk, wv, wo: [d, d]; n_heads: H, dh = d / H. Head h uses columns
    h*dh .. (h+1)*dh - 1 of Q, K and V:
        S_h = Q_h K_h^T / sqrt(dh)                        [B, T, T]   (query position i, key position j)
        S_h[i, j] = -inf where j > i                      causal: position i sees positions j <= i
        P_h = softmax(S_h) over j,   Y_h = P_h V_h        [B, T, dh]
        out = concat(Y_0, ..., Y_{H-1}) Wo                [B, T, d]   (heads side by side in head order)
    No RoPE and no QK-norm here (tl.attention with cfg.rope = "none", cfg.qk_norm = False).
    """
    raise NotImplementedError("attention")


# --- The loop bodies. Five ways to feed loop t > 1 of a looped transformer ([FLT], tl.forward). --------------
# Every function below computes ONE loop t > 1 and gets:
#   block(l, x, q=None) -> [B, T, d]  layer l's pre-norm block:  x' = x + Attn(Q = n(q), K = n(x), V = n(x)),
#                                     x'' = x' + MLP(n(x')); q=None means q = x (self-attention). The block norms
#                                     q itself: pass the state, not its norm.
#   norm(x)                           the parameter-free RMSNorm n
#   e        [B, T, d]                the token embedding E[tokens] (raw, NOT normed)
#   h        [B, T, d]                h_{t-1} = n(x at the end of loop t-1), the previous loop's final state
#   n_layers                          L, the number of layers of the looped stack (layers 0 .. L-1)
# and returns x [B, T, d], the state at the end of loop t, BEFORE the final norm (the caller forms h_t = n(x)).
# Loop 1 is the same for every variant (x = n(e), then the L layers); the grader runs it for you.
def lt_loop(block, norm, e, h, n_layers):
    """LT, no input injection: loop t starts from the previous loop's final state and runs the L layers.
        x = h_{t-1};  x = block_l(x) for l = 0 .. L-1.                       (so h_t = n(F(h_{t-1})))"""
    raise NotImplementedError("lt_loop")


def lt_i_loop(block, norm, e, h, n_layers):
    """LT_i, additive input injection: the embedding is added back once, at the start of the loop.
        x = n(e + h_{t-1});  x = block_l(x) for l = 0 .. L-1.                (so h_t = n(F(n(e + h_{t-1}))))"""
    raise NotImplementedError("lt_i_loop")


def lt_ia_loop(block, norm, e, h, n_layers):
    """LT_ia, attention injection at the FIRST layer only: the loop restarts from n(e); layer 0 attends with the
    query stream h_{t-1} (keys and values from the current stream); layers 1 .. L-1 are plain self-attention.
        x = n(e);  x = block_0(x, q = h_{t-1});  x = block_l(x) for l = 1 .. L-1."""
    raise NotImplementedError("lt_ia_loop")


def flt_res_loop(block, norm, e, h, n_layers):
    """FLT_res, the Fully Looped Architecture with ADDITIVE injection ([FLT]'s ablation): the loop restarts from
    n(e) and EVERY layer first adds h_{t-1} to the stream (and norms), then runs a plain self-attention block.
        x = n(e);  for l = 0 .. L-1:  x = n(x + h_{t-1});  x = block_l(x)."""
    raise NotImplementedError("flt_res_loop")


def flt_loop(block, norm, e, h, n_layers):
    """FLT, the Fully Looped Architecture + Attention Injection: the loop restarts from n(e) and EVERY layer
    attends with the query stream h_{t-1} (keys and values from the current stream).
        x = n(e);  x = block_l(x, q = h_{t-1}) for l = 0 .. L-1."""
    raise NotImplementedError("flt_loop")


def cross_sequence_cosine(x):
    """The collapse diagnostic (tl.forward's diag["cos_sim"]): do different inputs still map to different states?

    x: [B, T, d], the states of B sequences at the end of a loop. At each position t, the mean cosine similarity
    over the B (B - 1) ordered pairs of DIFFERENT sequences b != b'; then the mean over the T positions:
        c = (1/T) sum_t  1/(B (B-1)) sum_{b != b'} <x[b,t], x[b',t]> / (||x[b,t]|| ||x[b',t]||)
    Returns a Python float; 1.0 when every sequence has the same state (collapse); float("nan") when B < 2
    (no pair to compare). O(B^2) loops are fine, but it fits in a few array lines (sum the unit vectors).
    """
    raise NotImplementedError("cross_sequence_cosine")


def loop_count_sweep(params, cfg, batch, variant, Ks):
    """Test-time compute ([FLT]): run ONE trained looped model at several loop counts K, without retraining.

    params, cfg: a tinyloop model (cfg.n_loops is the K it was trained at). batch: dict with "tokens" [B, T]
    ints, "targets" [B, T] ints (the next token at each position) and "mask" [B, T] (1.0 at answer tokens,
    0.0 elsewhere). variant: one of tl.VARIANTS other than "standard". Ks: a list of loop counts.
    For each K, with z = the logits [B, T, V] of tl.forward(params, tokens, cfg, variant, n_loops=K):
        loss(K)  = sum_{b,t} mask[b,t] * (-log softmax(z[b,t])[targets[b,t]]) / sum_{b,t} mask[b,t]
        exact(K) = the fraction of sequences b whose answer tokens (mask 1) are ALL predicted right
                   (argmax_v z[b,t,v] == targets[b,t] at every t with mask[b,t] = 1)
    Returns {K: (loss, exact)} with Python floats. Write the masked cross-entropy yourself (log-softmax with the
    max subtracted); tl.forward gives the logits.
    """
    raise NotImplementedError("loop_count_sweep")


def newton_schulz(G, steps=5):
    """Muon's orthogonalisation ([FLT] trains its block matrices with Muon; authors' nanochat/muon.py):
    G [m, n] -> X [m, n], approximately U V^T for G = U S V^T (singular values pushed towards 1).

        X = G / (||G||_F + 1e-7)               Frobenius norm: then every singular value is <= 1
        if m > n: work on X^T (so that X X^T is the smaller Gram matrix), transpose back at the end
        repeat `steps` times (quintic Newton-Schulz, (a, b, c) = (3.4445, -4.7750, 2.0315)):
            A = X X^T;   B = b A + c A A;   X = a X + B X
    In float64 (the authors run it in bfloat16). Returns an array of G's shape.
    """
    raise NotImplementedError("newton_schulz")


# ============================================================================================================
# Part B · [TFL] the ODE view: integrators (notebook 03)
# A frozen pre-norm layer x -> x + F(x) is ONE forward-Euler step of size 1 of dx/dt = F(x); a window of layers
# is a map g with field F_g(x) = g(x) - x, and one pass through it is one Euler step over t in [0, 1].
# An explicit Runge-Kutta method (Butcher tableau A, b, c) takes one step of size h of dx/dt = F(x) as
#     k_i = F(x + h sum_{j<i} A[i][j] k_j)   (i = 1 .. s),      x_new = x + h sum_i b_i k_i.
# ============================================================================================================
def heun_step(F, x, h):
    """One step of Heun's method (the explicit trapezoidal rule, tl.HEUN) for dx/dt = F(x), written out from its
    tableau: c = (0, 1), A[2][1] = 1, b = (1/2, 1/2). Two evaluations of F; no tl.rk_step.
    x: any array shape (F maps it to the same shape); h: the step size. Returns the new state, x's shape."""
    raise NotImplementedError("heun_step")


def rk_step(F, x, h, A, b):
    """One explicit Runge-Kutta step of size h for dx/dt = F(x), driven by a Butcher tableau.
    A: s x s nested sequence, strictly lower triangular (A[i][j] = 0 for j >= i); b: s weights.
        k_i = F(x + h sum_{j<i} A[i][j] k_j)   for i = 0 .. s-1,      return x + h sum_i b_i k_i
    x: any array shape. (tl.rk_step does this; write your own.)"""
    raise NotImplementedError("rk_step")


def anchored_tableau(K, beta):
    """[TFL]'s anchored rule (tl.loop_rule(g, x0, K, "rk", beta)) as ONE explicit RK step of size h = 1 on the
    window field F_g(x) = g(x) - x, with K stages. The rule, from x0:
        y0  = g(x0)                                   the natural pass
        x_1 = x0 + (y0 - x0) / K                      first damped sub-step, reusing y0
        x_k = x_{k-1} + (g(x_{k-1}) - x_{k-1}) / K    for k = 2 .. K
        out = beta * y0 + (1 - beta) * x_K
    Return tl.Tableau(name, A, b, c, order): A a K x K tuple of tuples (strictly lower triangular), b and c
    tuples of length K, c_i = sum_j A[i][j], and `order` the method's order of accuracy as a general step-h
    integrator (check the order conditions: sum b = 1 for order 1, also sum b c = 1/2 for order 2, ...), so that
    tl.rk_step(F_g, x0, 1.0, tab) == tl.loop_rule(g, x0, K, "rk", beta) for EVERY map g; K >= 1, 0 <= beta <= 1.
    Hint: let stage i be evaluated at x_{i-1} (x_0 = x0); write y0 and x_K as x0 + (a combination of the k_j)."""
    raise NotImplementedError("anchored_tableau")


def damped_euler(g, x0, K):
    """[TFL]'s damped Euler rule (tl.loop_rule(g, x0, K, "euler")). One pass x0 -> g(x0) of the window is one
    Euler step of size 1 over t in [0, 1] of dx/dt = F_g(x) = g(x) - x. Return instead the end point of K Euler
    sub-steps of size 1/K over the SAME interval [0, 1] (not K steps of size 1: that is naive repetition, which
    integrates on to t = K). g: a map on states of any shape (x0's shape); K >= 1; g is evaluated K times."""
    raise NotImplementedError("damped_euler")


def anchored_rk(g, x0, K, beta):
    """[TFL]'s anchored Runge-Kutta rule (tl.loop_rule(g, x0, K, "rk", beta)):
        y0  = g(x0)                                  the natural pass (what the frozen model computes)
        x_K = the damped-Euler end point (K sub-steps of size 1/K), whose FIRST sub-step reuses y0
        out = beta * y0 + (1 - beta) * x_K           beta = 1: the frozen model; beta = 0: damped Euler
    g must be evaluated exactly K times in all (the grader counts). Returns out, x0's shape."""
    raise NotImplementedError("anchored_rk")


def predict_K1(method, g, x0):
    """What tl.loop_rule(g, x0, 1, method) returns at K = 1, computed from g and x0 alone (no tl calls).
    method: one of [TFL]'s rules "naive", "euler", "rk" (tl.LOOP_METHODS) or the classical ablation methods
    "midpoint", "heun", "rk4" (tl.ABLATION_METHODS: K classical RK steps of size 1/K on F_g = g - id).
    Simplify the Heun answer to a short expression in x0 and g(g(x0))."""
    raise NotImplementedError("predict_K1")


def frozen_at_K1():
    """The set of method names (among tl.LOOP_METHODS + tl.ABLATION_METHODS) whose K = 1 output is, bit for bit,
    g(x0): the frozen model itself. Return a Python set of strings."""
    raise NotImplementedError("frozen_at_K1")


# ============================================================================================================
# Part C · [TFL] looping a window of a frozen model (notebook 02)
# ============================================================================================================
def loop_window(layers, x, a, b, K, rule, mode):
    """Run a frozen stack `layers` (a list of callables layer(x) -> x) on the state x, looping the window
    [a..b] (0-indexed, INCLUSIVE) with a loop rule; the layers outside the window run once, unchanged.
        rule(g, x0, K) -> x      a loop rule (e.g. anchored RK) applied to a map g from the state x0
        mode "block":      the rule is applied ONCE, to the whole window map g = L_b o ... o L_a
        mode "per_layer":  the rule is applied to each window layer in turn (g = L_a, then g = L_{a+1}, ...)
    (tl.loop_window does this for tinyloop's rules; write your own for any `rule`.) Returns the final state."""
    raise NotImplementedError("loop_window")


def moe_route(u, router, top_k):
    """Top-k mixture-of-experts routing (tl.moe): which experts each token uses, and with what weight.
    u: [B, T, d] (the normed stream entering the MoE), router: [d, E]. Per token:
        p = softmax(u Wr) over the E experts
        keep the top_k largest p (the others get gate 0) and renormalise the kept ones to sum to 1
    Returns gates [B, T, E] (zero off each token's chosen experts)."""
    raise NotImplementedError("moe_route")


def frozen_routing_rule(run, x0, K, beta):
    """[TFL]'s MoE routing freeze: the anchored RK rule on ONE MoE layer, with the routing frozen at the natural pass.
        run(x, routing=None) -> (y, routing)    the frozen MoE layer. routing=None: it routes x itself (picks each
                                               token's experts and gate weights) and returns that routing; given a
                                               routing, it reuses exactly those experts and weights on the new x.
    The natural pass y0, r = run(x0) picks the routing; every damped sub-step reuses r (re-routing at each
    sub-step is "routing thrash"). With g(x) = run(x, r)[0], return anchored_rk's output
        beta * y0 + (1 - beta) * x_K          (x_K: K damped-Euler sub-steps of size 1/K, the first reusing y0)
    run must be called exactly K times in all (the grader watches each call). Returns out, x0's shape."""
    raise NotImplementedError("frozen_routing_rule")


def stash_pass(run_layer, a, b, x0, x_looped, cache):
    """[TFL]'s stash pass: what a looped window writes into the KV cache (tl.generate). The loop's sub-steps
    neither read nor write the cache; afterwards the window runs ONCE more with cache writes, and its hidden
    output is discarded, so the cache holds exactly one entry per layer and position, whatever K is.
        run_layer(l, x) -> (y, kv)   layer l on the state x [1, T, d]; kv = (k, v), each [1, Hkv, T, dh], is
                                     what layer l would write into the cache for these positions
        a, b                         the window [a..b], inclusive
        x0        [1, T, d]          the state entering the window (before the loop)
        x_looped  [1, T, d]          the looped window's output
        cache                        "first": the stash pass starts from x0 (the frozen model's own window K/V);
                                     "last": it starts from x_looped (the authors' code); "none": nothing is written
    Returns a list of b - a + 1 entries, one per window layer a..b in order: the (k, v) that layer writes, each
    layer fed the previous window layer's output; with cache "none" every entry is None."""
    raise NotImplementedError("stash_pass")


def layer_evals_per_token(n_layers, n_window, K, looped=True, stash=True):
    """Token-layer evaluations for one token (one layer applied to one token's state = 1), BLOCK mode.
    A token that is not looped runs the N = n_layers layers once. A looped token runs the layers outside the
    n = n_window-layer window once, the window K times in all (the natural pass is the first of them), and,
    when stash=True, the stash pass: the window once more, with cache writes. Returns an int."""
    raise NotImplementedError("layer_evals_per_token")


def generation_evals(n_layers, n_window, K, prompt_len, n_new, decode, first_n=0, cache="first"):
    """The total token-layer evaluations tl.generate reports (info["layer_evals"]) for a block-mode window.
    The prefill (all prompt_len prompt tokens) always loops. Then each generated token except the LAST one is
    fed back through the model (n_new tokens are generated). A fed-back token loops if decode == "full", or if
    decode == "first_n" and it is among the first `first_n` fed back; otherwise (and always with "bypass") it
    runs the window once. The stash pass runs for looped tokens unless cache == "none". Returns an int."""
    raise NotImplementedError("generation_evals")


def depth_fraction(a, b, n_layers):
    """[TFL]'s window position: the centre of the window [a..b] (0-indexed layers, inclusive) over the number of
    layers N = n_layers. The paper's recipe is a 4-layer window near 0.48 (e.g. layers 13..16 of 30).
    Returns a float."""
    raise NotImplementedError("depth_fraction")


def best_window(n_layers, width, target):
    """The window (a, b) of `width` consecutive layers inside a stack of n_layers (0 <= a, b <= n_layers - 1,
    b - a + 1 == width) whose depth fraction is closest to `target` (either one on an exact tie).
    Returns a tuple of two ints."""
    raise NotImplementedError("best_window")


# ============================================================================================================
# Part D · A real checkpoint (notebook 04)
# ============================================================================================================
def dequantize_q4_1(blocks):
    """The GGML Q4_1 weight format of the SmolLM2 GGUF file (tl.dequantize(raw, "Q4_1")), by hand.
    blocks: uint8 [n, 20], one 32-weight block per row, little-endian:
        bytes 0-1   d, a float16 scale              bytes 2-3   m, a float16 minimum
        bytes 4-19  16 bytes of 4-bit codes: byte j holds weight j in its LOW nibble and weight j + 16 in its
                    HIGH nibble:   w[j] = d * (byte_j & 15) + m,    w[j + 16] = d * (byte_j >> 4) + m
    Compute in float32 (d and m converted from float16). Returns float32 [n * 32], blocks in order."""
    raise NotImplementedError("dequantize_q4_1")
