"""The [FLT] training recipe: Muon (Newton-Schulz orthogonalisation, Nesterov momentum, aspect-ratio scale, warm-up),
AdamW groups, FEW supervision, the authors' block-output gradient diagnostic, and train()'s batch validation.

Each check is against an independent computation written here: the SVD (numpy.linalg) for what Newton-Schulz does
to singular values, a float64 Muon / AdamW step written from the formulas, the plain reference model
(tests/reference.py) for per-loop losses, and central finite differences for gradients."""
import math

import numpy as onp
import pytest

import tinyloop as tl
from reference import model as ref_model, random_params

A, B, C = 3.4445, -4.7750, 2.0315               # the quintic's coefficients (the authors' muon.py)


def ns_scalar(s, steps=5):
    """What 5 Newton-Schulz steps do to one singular value s of G / ||G||_F: iterate p(s) = a s + b s^3 + c s^5."""
    for _ in range(steps):
        s = A * s + B * s ** 3 + C * s ** 5
    return s


def ns_reference(G):
    """Float64 reference of newton_schulz from the SVD: U diag(p^5(s / (||G||_F + 1e-7))) V^T."""
    G = onp.asarray(G, dtype=onp.float64)
    U, s, Vt = onp.linalg.svd(G, full_matrices=False)
    return U @ onp.diag(ns_scalar(s / (onp.linalg.norm(G) + 1e-7))) @ Vt


@pytest.mark.parametrize("shape", [(16, 40), (40, 16), (24, 24)])
def test_newton_schulz_flattens_singular_values_and_keeps_singular_vectors(shape):
    G = onp.random.default_rng(0).standard_normal(shape)
    if shape[0] == shape[1]:                    # a square Gaussian matrix can have a tiny singular value: avoid it
        G = G + 3 * onp.eye(shape[0])
    O = tl.newton_schulz(G)
    U, s, Vt = onp.linalg.svd(G, full_matrices=False)
    core = U.T @ O @ Vt.T                       # diagonal iff O has G's singular vectors
    assert onp.allclose(core - onp.diag(onp.diag(core)), 0, atol=1e-10)
    assert onp.all((onp.diag(core) > 0.5) & (onp.diag(core) < 1.5))           # the band around 1
    onp.testing.assert_allclose(onp.diag(core), ns_scalar(s / (onp.linalg.norm(G) + 1e-7)), rtol=1e-10)
    assert onp.linalg.norm(O - U @ Vt, 2) < 0.5                               # U V^T up to that band
    sv = onp.linalg.svd(O, compute_uv=False)
    assert sv.min() > 0.5 and sv.max() < 1.5
    onp.testing.assert_allclose(tl.newton_schulz(G.T), O.T, atol=1e-12)      # orientation does not matter


def test_newton_schulz_keeps_float32_and_works_per_expert():
    G = onp.random.default_rng(1).standard_normal((3, 8, 20)).astype(onp.float32)
    O = tl.newton_schulz(G)
    assert O.dtype == onp.float32
    for e in range(3):                          # each expert on its own, not the stack as one matrix
        onp.testing.assert_allclose(O[e], ns_reference(G[e]), atol=2e-5)


def test_update_of_a_1_by_n_matrix():
    """One singular value s = ||g||: the update is p^5(~1) times the unit matrix g / ||g||, scaled by
    sqrt(max(1, d_out / d_in)) = sqrt(n) for a [1, n] weight (d_in = 1) and by 1 for [n, 1]."""
    g = onp.random.default_rng(2).standard_normal((1, 12))
    c = ns_scalar(onp.linalg.norm(g) / (onp.linalg.norm(g) + 1e-7))
    assert 0.5 < c < 1.5
    onp.testing.assert_allclose(tl.newton_schulz(g), c * g / onp.linalg.norm(g), rtol=1e-12)
    for W, scale in [(onp.zeros((1, 12)), math.sqrt(12)), (onp.zeros((12, 1)), 1.0)]:
        gg = g.reshape(W.shape)
        new, _ = tl.muon_update(W, gg, onp.zeros_like(W), lr=0.1, momentum=0.0)
        onp.testing.assert_allclose(new, -0.1 * scale * c * gg / onp.linalg.norm(gg), rtol=1e-12)


@pytest.mark.parametrize("d_in, d_out", [(8, 32), (32, 8), (16, 16)])
def test_aspect_ratio_scale(d_in, d_out):
    """tinyloop stores W [d_in, d_out]; the authors [d_out, d_in] with scale max(1, rows / cols)^(1/2)."""
    rng = onp.random.default_rng(3)
    W, g = rng.standard_normal((d_in, d_out)), rng.standard_normal((d_in, d_out))
    new, _ = tl.muon_update(W, g, onp.zeros_like(W), lr=0.01, momentum=0.0)
    scale = math.sqrt(max(1.0, d_out / d_in))
    onp.testing.assert_allclose(new, W - 0.01 * scale * ns_reference(g), atol=1e-12)


def test_momentum_warmup():
    assert tl.muon_momentum(0) == pytest.approx(0.85)
    assert tl.muon_momentum(150) == pytest.approx(0.90)
    assert tl.muon_momentum(300) == pytest.approx(0.95)
    assert tl.muon_momentum(301) == pytest.approx(0.95) and tl.muon_momentum(10_000) == pytest.approx(0.95)


LLAMA = tl.Config(vocab=13, d_model=16, n_heads=2, n_kv_heads=1, n_layers=2, seq_len=8, mlp="swiglu",
                  norm="rms_gain", qk_norm=False, softcap=None, rope="pairs", dtype="float64")
MOE = tl.Config(vocab=13, d_model=16, n_heads=2, n_layers=1, seq_len=8, n_experts=3, top_k=2, dtype="float64")


def test_optimizer_groups_and_learning_rates():
    groups = tl.optimizer_groups(random_params(tl, LLAMA, 0))
    assert groups["embed"] == "embed" and groups["head"] == "head" and groups["g_final"] == "gain"
    for layer in groups["layers"]:
        assert layer["g_attn"] == layer["g_mlp"] == "gain"
        assert set(layer["attn"].values()) == {"matrix"} and set(layer["mlp"].values()) == {"matrix"}
    moe = tl.optimizer_groups(random_params(tl, MOE, 0))["layers"][0]["moe"]
    assert moe == {"router": "matrix", "w1": "matrix", "w2": "matrix"}
    # the authors' setup_optimizers at d_model = 48: (48 / 768)^-0.5 = 4
    cfg = tl.Config(d_model=48, n_heads=4)
    lrs = tl.group_lrs(cfg, 0.02, "muon")
    assert lrs["matrix"] == 0.02
    assert lrs["embed"] == pytest.approx(0.2 * 4) and lrs["head"] == pytest.approx(0.004 * 4)
    assert lrs["gain"] == lrs["head"]
    half = tl.group_lrs(cfg, 0.01, "muon")     # one multiplier scales every group
    assert all(half[k] == pytest.approx(lrs[k] / 2) for k in lrs)
    assert set(tl.group_lrs(cfg, 3e-3, "adam").values()) == {3e-3}
    with pytest.raises(ValueError, match="optimizer"):
        tl.group_lrs(cfg, 0.02, "sgd")


def _adamw_ref(w, g, m, v, t, lr, b1=0.8, b2=0.95, eps=1e-10, wd=0.0):
    """torch.optim.AdamW, written from its documentation (t counts from 1)."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g ** 2
    w = w * (1 - lr * wd) - (lr / (1 - b1 ** t)) * m / (onp.sqrt(v) / math.sqrt(1 - b2 ** t) + eps)
    return w, m, v


def _muon_ref(w, g, buf, mu, lr):
    """The authors' Muon step (torch lerp form) on a float64 weight stored [d_in, d_out]; NS from the SVD."""
    buf = buf + (1 - mu) * (g - buf)                      # buf.lerp_(g, 1 - mu)
    u = g + mu * (buf - g)                                # g.lerp_(buf, mu)
    if w.ndim == 3:                                       # MoE: each expert is its own matrix
        O = onp.stack([ns_reference(x) for x in u])
    else:
        O = ns_reference(u)
    return w - lr * max(1.0, w.shape[-1] / w.shape[-2]) ** 0.5 * O, buf


@pytest.mark.parametrize("cfg", [LLAMA, MOE], ids=["llama_gains", "moe"])
def test_two_optimizer_steps_match_a_float64_reference(cfg):
    """Steps 0 and 1 of optimizer_step (momentum and Adam state carried over) against the formulas, every leaf."""
    rng = onp.random.default_rng(4)
    params = random_params(tl, cfg, 5)
    groups = tl.optimizer_groups(params)
    state = tl.init_optimizer(params, groups, "muon")
    lrs = tl.group_lrs(cfg, 0.02, "muon")
    ref_p = dict(tl._named_leaves(params))
    ref_s = {k: (onp.zeros_like(v), onp.zeros_like(v)) for k, v in ref_p.items()}
    kinds = dict(tl._named_leaves(groups))
    for step in range(2):
        grads = tl.tree_map(lambda w: rng.standard_normal(w.shape), params)
        params, state = tl.optimizer_step(params, grads, state, groups, lrs, step, "muon", weight_decay=0.1)
        for name, g in tl._named_leaves(grads):
            if kinds[name] == "matrix":
                ref_p[name], buf = _muon_ref(ref_p[name], g, ref_s[name][0], 0.85 + 0.1 * step / 300, 0.02)
                ref_s[name] = (buf, None)
            else:
                ref_p[name], m, v = _adamw_ref(ref_p[name], g, *ref_s[name], step + 1, lrs[kinds[name]], wd=0.1)
                ref_s[name] = (m, v)
        for name, w in tl._named_leaves(params):
            onp.testing.assert_allclose(w, ref_p[name], rtol=1e-9, atol=1e-12, err_msg=f"{name} at step {step}")
    assert {"matrix", "embed"} <= set(kinds.values())


def _xent_ref(z, targets, mask):
    z = onp.asarray(z, dtype=onp.float64)
    lse = onp.log(onp.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    nll = lse - onp.take_along_axis(z, targets[..., None], -1)[..., 0]
    return float((nll * mask).sum() / mask.sum())


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5, 6, 7, 12])
def test_few_is_the_mean_of_the_last_third_of_the_loops(K):
    """FEW = mean CE of the last ceil(K/3) loops (the authors' range(2K//3, K): K - floor(2K/3) = ceil(K/3)).
    Loop t's logits in a K-loop model are those of the (t+1)-loop model, so the reference model gives them."""
    loops = tl.supervised_loops(K, "few")
    assert loops == list(range(K - math.ceil(K / 3), K))
    if K > 7:
        return
    cfg = tl.Config(vocab=11, d_model=8, n_heads=2, n_layers=2, seq_len=8, dtype="float64")
    params = random_params(tl, cfg, 6)
    rng = onp.random.default_rng(7)
    toks, tgts = rng.integers(0, 11, (2, 6)), rng.integers(0, 11, (2, 6))
    mask = (rng.random((2, 6)) < 0.7).astype(float)
    per_loop = [_xent_ref(onp.stack([ref_model(params, s, cfg, "FLT", t + 1) for s in toks]), tgts, mask)
                for t in range(K)]
    got = tl.loss_fn(params, (toks, tgts, mask), cfg, "FLT", K, supervise="few")
    assert got == pytest.approx(onp.mean(per_loop[-math.ceil(K / 3):]), rel=1e-10)
    assert tl.loss_fn(params, (toks, tgts, mask), cfg, "FLT", K, supervise="all") == pytest.approx(onp.mean(per_loop), rel=1e-10)
    assert tl.loss_fn(params, (toks, tgts, mask), cfg, "FLT", K, supervise="end") == pytest.approx(per_loop[-1], rel=1e-10)


@pytest.mark.parametrize("variant", ["FLT", "LT", "FLT_res"])
def test_block_output_gradient_norms_match_finite_differences(variant, monkeypatch):
    """train()'s block_out_grad_norm[t][l] at step 0 = ||dL/d(output of layer l in loop t)||, the gradient taken
    here entry by entry with central differences of a perturbation added to that block's output (by wrapping
    tl.block, not through the taps)."""
    cfg = tl.Config(vocab=11, d_model=8, n_heads=2, n_layers=2, seq_len=8, dtype="float64")
    K = 3
    params = random_params(tl, cfg, 8, scale=0.3)
    rng = onp.random.default_rng(9)
    batch = (rng.integers(0, 11, (2, 4)), rng.integers(0, 11, (2, 4)), onp.ones((2, 4)))
    _, hist = tl.train(params, cfg, lambda s: batch, steps=1, lr=0.02, variant=variant, n_loops=K,
                       log_every=1, progress=False)
    got = onp.array(hist["block_out_grad_norm"][0])                        # [K, L]
    assert got.shape == (K, 2)

    real_block = tl.block
    where, delta, calls = [None], [None], [0]

    def block(*args, **kw):
        x, ex = real_block(*args, **kw)
        i = calls[0]
        calls[0] += 1
        return (x + delta[0] if i == where[0] else x), ex
    monkeypatch.setattr(tl, "block", block)
    want = onp.zeros((K, 2))
    eps = 1e-5
    for t in range(K):
        for l in range(2):
            where[0] = t * 2 + l                                            # forward calls blocks loop by loop
            g = onp.zeros((2, 4, 8))
            for idx in onp.ndindex(g.shape):
                f = []
                for sign in (1, -1):
                    delta[0] = onp.zeros(g.shape)
                    delta[0][idx] = sign * eps
                    calls[0] = 0
                    f.append(float(tl.loss_fn(params, batch, cfg, variant, K)))
                g[idx] = (f[0] - f[1]) / (2 * eps)
            want[t, l] = onp.linalg.norm(g)
    onp.testing.assert_allclose(got, want, rtol=1e-6)
    assert onp.all(want > 0)


def test_train_accepts_make_batch_dicts_and_validates_get_batch():
    cfg = tl.Config(vocab=tl.VOCAB, d_model=8, n_heads=2, n_layers=1, seq_len=12)
    params = tl.init_params(cfg, 0)
    make = lambda s: tl.make_batch(["copy"], 4, 12, onp.random.default_rng(s), n=4)
    as_tuple = lambda s: (lambda b: (b["tokens"], b["targets"], b["mask"]))(make(s))
    p1, h1 = tl.train(params, cfg, make, steps=3, lr=0.02, n_loops=2, progress=False)
    p2, h2 = tl.train(params, cfg, as_tuple, steps=3, lr=0.02, n_loops=2, progress=False)
    assert h1["loss"] == h2["loss"]
    toks = make(0)["tokens"]
    bad = [lambda s: (toks, toks), lambda s: toks, lambda s: {"tokens": toks},
           lambda s: (toks.astype(float), toks, None), lambda s: (toks, toks[:, :-1], None),
           lambda s: (toks, toks, onp.ones((1, 3)))]
    for get in bad:
        with pytest.raises(ValueError, match="get_batch"):
            tl.train(params, cfg, get, steps=1, lr=0.02, n_loops=2, progress=False)
    with pytest.raises(ValueError, match="get_batch"):
        tl.train(params, cfg, make(0), steps=1, lr=0.02, n_loops=2, progress=False)     # a batch, not a function
    with pytest.raises(ValueError, match="optimizer"):
        tl.train(params, cfg, make, steps=1, lr=0.02, optimizer="sgd", progress=False)
