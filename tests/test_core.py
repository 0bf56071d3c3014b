"""Core model tests: exactness against an independent reference, gradients, invariants, training, checkpoints."""
import os

import numpy as onp
import pytest
from autograd import grad
from autograd.test_util import check_grads
from hypothesis import given, settings, strategies as st

import tinyloop as tl
from reference import model as ref_model, random_params

LOOPED = ("LT", "LT_i", "LT_ia", "FLT_res", "FLT")

# Tiny float64 configs covering every architectural option.
CFGS = {
    "flt": tl.Config(vocab=11, d_model=8, n_heads=2, n_layers=2, seq_len=8, dtype="float64"),
    "llama": tl.Config(vocab=11, d_model=8, n_heads=2, n_kv_heads=1, n_layers=2, seq_len=8, mlp="swiglu",
                       norm="rms_gain", qk_norm=False, softcap=None, rope="pairs", rope_theta=100.0,
                       tie_embeddings=True, norm_eps=1e-5, dtype="float64"),
    "gelu_norope": tl.Config(vocab=11, d_model=8, n_heads=4, n_layers=1, seq_len=8, mlp="gelu", rope="none",
                             branch_scale=0.5, dtype="float64"),
    "moe": tl.Config(vocab=11, d_model=8, n_heads=2, n_layers=2, seq_len=8, n_experts=3, top_k=2,
                     dtype="float64"),
}


def seqs(cfg, B=2, T=6, seed=0):
    return onp.random.default_rng(seed).integers(0, cfg.vocab, (B, T))


@pytest.mark.parametrize("name", CFGS)
@pytest.mark.parametrize("variant", LOOPED)
def test_forward_matches_independent_reference(name, variant):
    cfg = CFGS[name]
    params = random_params(tl, cfg, seed=1)
    toks = seqs(cfg)
    for K in (1, 3):
        logits, _ = tl.forward(params, toks, cfg, variant, K)
        for b in range(len(toks)):
            onp.testing.assert_allclose(logits[b], ref_model(params, toks[b], cfg, variant, K), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", CFGS)
def test_every_variant_at_one_loop_is_the_standard_transformer(name):
    cfg = CFGS[name]
    params = random_params(tl, cfg, seed=2)
    toks = seqs(cfg)
    std, _ = tl.forward(params, toks, cfg, "standard")
    for v in LOOPED:
        assert onp.array_equal(tl.forward(params, toks, cfg, v, 1)[0], std), v


def test_lt_equals_its_unrolled_stack():
    """LT with K loops = the same stack applied K times with shared weights, the inter-loop norm between,
    computed here by hand from the block function."""
    cfg = CFGS["flt"]
    params = random_params(tl, cfg, seed=3)
    toks = seqs(cfg)
    x = tl.rms_norm(params["embed"][toks], eps=cfg.norm_eps)
    for _ in range(4):
        for p in params["layers"]:
            x = tl.block(p, x, cfg)[0]
        x = tl.rms_norm(x, eps=cfg.norm_eps)
    want = cfg.softcap * onp.tanh(x @ params["head"] / cfg.softcap)
    onp.testing.assert_allclose(tl.forward(params, toks, cfg, "LT", 4)[0], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["flt", "llama", "moe"])
@pytest.mark.parametrize("variant", ("standard",) + LOOPED)
def test_gradients_of_the_whole_parameter_dict(name, variant):
    cfg = CFGS[name]
    params = random_params(tl, cfg, seed=4, scale=0.3)
    b = tl.make_batch(["copy"], 2, 8, onp.random.default_rng(0), n=3)
    toks = b["tokens"] % cfg.vocab
    batch = (toks, b["targets"] % cfg.vocab, b["mask"])
    K = None if variant == "standard" else 2
    f = lambda p: tl.loss_fn(p, batch, cfg, variant, K, aux_coef=0.1 if cfg.n_experts else 0.0)
    check_grads(f, modes=["rev"], order=1)(params)


def test_every_loop_supervision_gradient():
    cfg = CFGS["flt"]
    params = random_params(tl, cfg, seed=5, scale=0.3)
    toks = seqs(cfg)
    batch = (toks, toks, onp.ones(toks.shape))
    check_grads(lambda p: tl.loss_fn(p, batch, cfg, "FLT", 3, supervise="all"), modes=["rev"], order=1)(params)


def test_per_loop_gradients_sum_to_the_shared_gradient():
    cfg = CFGS["flt"]
    params = random_params(tl, cfg, seed=6)
    toks = seqs(cfg)
    batch = (toks, toks, onp.ones(toks.shape))
    g_shared = grad(lambda p: tl.loss_fn(p, batch, cfg, "FLT", 3))(params)["layers"]
    g_loops = grad(lambda ll: tl.loss_fn(params, batch, cfg, "FLT", 3, loop_layers=ll))([params["layers"]] * 3)
    total = onp.sum([tl.flatten(g)[0] for g in g_loops], axis=0)
    onp.testing.assert_allclose(total, tl.flatten(g_shared)[0], rtol=1e-10, atol=1e-12)
    assert all(onp.linalg.norm(tl.flatten(g)[0]) > 0 for g in g_loops)


@settings(max_examples=15, deadline=None)
@given(seq=st.lists(st.integers(0, 10), min_size=4, max_size=8), data=st.data())
def test_causality_every_variant(seq, data):
    """Changing token j leaves every logit at positions < j unchanged (Attention Injection must not leak)."""
    cfg = CFGS["moe"] if data.draw(st.booleans()) else CFGS["flt"]
    params = random_params(tl, cfg, seed=7)
    j = data.draw(st.integers(1, len(seq) - 1))
    new = data.draw(st.integers(0, 10).filter(lambda t: t != seq[j]))
    changed = list(seq)
    changed[j] = new
    for v in LOOPED:
        a = tl.forward(params, onp.array([seq]), cfg, v, 3)[0][0]
        b = tl.forward(params, onp.array([changed]), cfg, v, 3)[0][0]
        onp.testing.assert_allclose(a[:j], b[:j], rtol=1e-12, atol=1e-12)
        assert not onp.allclose(a[j:], b[j:]), v    # and the change does reach the later positions


def test_moe_reuses_its_routing_and_differs_with_another():
    cfg = CFGS["moe"]
    p = random_params(tl, cfg, seed=8)["layers"][0]["moe"]
    u = onp.random.default_rng(0).standard_normal((2, 5, cfg.d_model))
    y, routing, _ = tl.moe(p, u, cfg)
    assert routing["idx"].shape == (2, 5, cfg.top_k)
    assert onp.allclose(routing["gates"].sum(-1), 1.0)
    assert ((routing["gates"] > 0).sum(-1) == cfg.top_k).all()
    y2, r2, _ = tl.moe(p, u, cfg, routing)
    assert onp.array_equal(y, y2) and r2 is routing
    other = {"idx": routing["idx"][..., ::-1], "gates": onp.roll(routing["gates"], 1, axis=-1)}
    y3, _, _ = tl.moe(p, u, cfg, other)
    assert not onp.allclose(y, y3)


@pytest.mark.parametrize("mlp", ["relu2", "swiglu"])
def test_moe_matches_a_per_expert_loop(mlp):
    """The stacked-matmul MoE against the definition, token by token and expert by expert (float64)."""
    cfg = tl.Config(vocab=11, d_model=16, n_heads=2, n_layers=1, seq_len=8, n_experts=4, top_k=2, mlp=mlp,
                    dtype="float64")
    p = random_params(tl, cfg, seed=9)["layers"][0]["moe"]
    u = onp.random.default_rng(1).standard_normal((2, 5, cfg.d_model))
    y, routing, _ = tl.moe(p, u, cfg)
    want = onp.zeros_like(u)
    for b in range(2):
        for t in range(5):
            z = u[b, t] @ p["router"]
            pr = onp.exp(z - z.max()) / onp.exp(z - z.max()).sum()
            top = onp.argsort(-pr)[:cfg.top_k]
            for e in top:
                h = u[b, t] @ p["w1"][e]
                h = onp.maximum(h, 0) ** 2 if mlp == "relu2" else h / (1 + onp.exp(-h)) * (u[b, t] @ p["w3"][e])
                want[b, t] += pr[e] / pr[top].sum() * (h @ p["w2"][e])
    onp.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-12)


def test_hidden_norm_is_the_raw_end_of_loop_norm():
    cfg = CFGS["flt"]
    params = random_params(tl, cfg, seed=9)
    toks = seqs(cfg)
    _, diag = tl.forward(params, toks, cfg, "LT", 2)
    x = tl.rms_norm(params["embed"][toks], eps=cfg.norm_eps)
    for p in params["layers"]:
        x = tl.block(p, x, cfg)[0]
    assert diag["hidden_norm"].shape == (2,)
    onp.testing.assert_allclose(diag["hidden_norm"][0], onp.linalg.norm(x, axis=-1).mean(), rtol=1e-12)
    assert diag["cos_sim"].shape == (2,) and onp.all(onp.abs(diag["cos_sim"]) <= 1 + 1e-9)


def test_float32_model_has_float32_gradients():
    """np.mean on traced float32 silently makes float64 gradients (autograd 1.9, NumPy 2)."""
    cfg = tl.Config(vocab=11, d_model=8, n_heads=2, n_layers=1, seq_len=8, n_experts=2, top_k=1)
    params = random_params(tl, cfg, seed=10)
    toks = seqs(cfg)
    g = grad(lambda p: tl.loss_fn(p, (toks, toks, onp.ones(toks.shape)), cfg, "FLT", 2, aux_coef=0.01))(params)
    assert {str(a.dtype) for a in tl._leaves(g)} == {"float32"}
    assert tl.forward(params, toks, cfg, "FLT", 2)[0].dtype == onp.float32


@pytest.mark.parametrize("variant", ["standard", "FLT"])
def test_a_tiny_model_memorises_a_sequence(variant):
    cfg = tl.Config(vocab=11, d_model=16, n_heads=2, n_layers=1, n_loops=2, seq_len=16)
    seq = onp.random.default_rng(0).integers(0, 11, (1, 13))
    batch = (seq[:, :-1], seq[:, 1:], onp.ones((1, 12)))
    params = tl.init_params(cfg, 0)
    K = None if variant == "standard" else 2
    params, hist = tl.train(params, cfg, lambda s: batch, steps=150, lr=1e-2, variant=variant, n_loops=K,
                            progress=False)
    assert hist["status"] == "ok"
    assert hist["loss"][-1] < 0.05 * hist["loss"][0]
    logits, _ = tl.forward(params, batch[0], cfg, variant, K)
    assert onp.array_equal(logits.argmax(-1), batch[1])


@pytest.mark.parametrize("optimizer", ["muon", "adam"])
def test_training_records_history_and_schedule(optimizer):
    cfg = tl.Config(vocab=11, d_model=8, n_heads=2, n_layers=2, seq_len=8)
    toks = seqs(cfg)
    _, hist = tl.train(tl.init_params(cfg, 0), cfg, lambda s: (toks, toks, onp.ones(toks.shape)), steps=10,
                       lr=1e-3, variant="FLT", n_loops=3, optimizer=optimizer, log_every=5, loop_grad_every=5,
                       progress=False)
    assert hist["status"] == "ok" and hist["optimizer"] == optimizer
    assert len(hist["loss"]) == len(hist["grad_norm"]) == 10
    assert hist["lr"][:8] == [1e-3] * 8 and hist["lr"][8] == pytest.approx(1e-3) and hist["lr"][9] < 1e-3
    assert hist["log_step"] == [0, 5] and len(hist["hidden_norm"][0]) == 3
    assert onp.array(hist["block_out_grad_norm"]).shape == (2, 3, 2)         # [log steps, K, L]
    assert len(hist["loop_param_grad_norm"]) == 2 and len(hist["loop_param_grad_norm"][0]) == 3
    assert hist["loop_grad_step"] == [0, 5]


@pytest.mark.parametrize("supervise", ["end", "few", "all"])
@pytest.mark.parametrize("optimizer", ["muon", "adam"])
def test_same_seed_same_numbers(supervise, optimizer):
    cfg = tl.Config(vocab=11, d_model=8, n_heads=2, n_layers=1, seq_len=8)
    get = lambda s: (seqs(cfg, seed=s), seqs(cfg, seed=s + 100), onp.ones((2, 6)))
    runs = [tl.train(tl.init_params(cfg, 0), cfg, get, steps=4, lr=0.02, n_loops=4, optimizer=optimizer,
                     supervise=supervise, progress=False) for _ in range(2)]
    assert runs[0][1]["loss"] == runs[1][1]["loss"]
    assert all(onp.array_equal(a, b) for a, b in zip(tl._leaves(runs[0][0]), tl._leaves(runs[1][0])))


def test_lr_schedule_warmdown():
    assert [tl.lr_schedule(s, 10, 1.0) for s in range(10)] == [1.0] * 8 + [1.0, 0.5]
    assert tl.lr_schedule(5, 10, 1.0, warmdown=0.0) == 1.0


def test_divergence_is_detected_not_a_crash():
    cfg = tl.Config(vocab=11, d_model=8, n_heads=2, n_layers=1, seq_len=8, softcap=None)
    toks = seqs(cfg)
    batch = (toks, toks, onp.ones(toks.shape))
    params, hist = tl.train(tl.init_params(cfg, 0), cfg, lambda s: batch, steps=50, lr=1e6, clip=None,
                            variant="LT", n_loops=4, blowup=1.5, progress=False)
    assert hist["status"] == "diverged" and isinstance(hist["diverged_at"], int)
    assert all(onp.all(onp.isfinite(a)) for a in tl._leaves(params))


def test_nan_batch_is_recorded_as_divergence():
    cfg = tl.Config(vocab=11, d_model=8, n_heads=2, n_layers=1, seq_len=8)
    params = tl.init_params(cfg, 0)
    params["embed"][3] = onp.nan                      # a poisoned parameter: loss is NaN at step 0
    toks = onp.full((2, 6), 3)
    p2, hist = tl.train(params, cfg, lambda s: (toks, toks, onp.ones(toks.shape)), steps=5, lr=1e-3,
                        progress=False)
    assert hist["status"] == "diverged" and hist["diverged_at"] == 0 and hist["loss"] == [None]


def test_save_load_roundtrip(tmp_path):
    for cfg in CFGS.values():
        params = random_params(tl, cfg, seed=11)
        path = tmp_path / "m.npz"
        tl.save(path, params, cfg, meta={"note": "x"})
        p2, cfg2, meta = tl.load(path)
        assert cfg2 == cfg and meta == {"note": "x"}
        assert all(onp.array_equal(a, b) for a, b in zip(tl._leaves(params), tl._leaves(p2)))
        assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_load_rejects_bad_files(tmp_path):
    cfg = CFGS["flt"]
    params = random_params(tl, cfg, seed=12)
    good = tmp_path / "good.npz"
    tl.save(good, params, cfg)
    with pytest.raises(ValueError, match="path"):
        tl.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="path"):
        tl.load(tmp_path / "junk.npz")
    data = good.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="path"):
        tl.load(tmp_path / "trunc.npz")
    onp.savez(tmp_path / "foreign.npz", a=onp.zeros(3))
    with pytest.raises(ValueError, match="not a tinyloop checkpoint"):
        tl.load(tmp_path / "foreign.npz")
    with pytest.raises(ValueError, match="different config"):
        tl.load(good, expect_cfg=CFGS["moe"])
    # a file whose arrays do not match its own config
    bad = dict(onp.load(good))
    bad["p.embed"] = onp.zeros((3, 3))
    onp.savez(tmp_path / "mismatch.npz", **bad)
    with pytest.raises(ValueError, match="shape"):
        tl.load(tmp_path / "mismatch.npz")


@pytest.mark.parametrize("kwargs, name", [
    (dict(d_model=10, n_heads=4), "d_model"), (dict(n_layers=0), "n_layers"), (dict(n_loops=0), "n_loops"),
    (dict(mlp="tanh"), "mlp"), (dict(norm="layer"), "norm"), (dict(rope="xpos"), "rope"),
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"), (dict(n_experts=2, top_k=3), "top_k"),
    (dict(dtype="float16"), "dtype"), (dict(softcap=-1.0), "softcap"), (dict(vocab=0), "vocab"),
])
def test_config_rejects_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        tl.Config(**kwargs)


def test_forward_and_train_reject_bad_arguments():
    cfg = CFGS["flt"]
    params = random_params(tl, cfg, seed=13)
    toks = seqs(cfg)
    with pytest.raises(ValueError, match="n_loops"):
        tl.forward(params, toks, cfg, "FLT", 0)
    with pytest.raises(ValueError, match="variant"):
        tl.forward(params, toks, cfg, "UT", 2)
    with pytest.raises(ValueError, match="tokens"):
        tl.forward(params, toks + 100, cfg, "FLT", 2)
    with pytest.raises(ValueError, match="tokens"):
        tl.forward(params, onp.zeros((1, 99), int), cfg, "FLT", 2)
    with pytest.raises(ValueError, match="tokens"):
        tl.forward(params, toks[0], cfg, "FLT", 2)
    batch = lambda s: (toks, toks, onp.ones(toks.shape))
    for kw, name in [(dict(steps=0), "steps"), (dict(lr=-1.0), "lr"), (dict(supervise="mid"), "supervise"),
                     (dict(variant="X"), "variant")]:
        args = dict(steps=2, lr=1e-3, progress=False) | kw
        with pytest.raises(ValueError, match=name):
            tl.train(params, cfg, batch, **args)
    with pytest.raises(ValueError, match="path"):
        tl.save("model.pkl", params, cfg)
