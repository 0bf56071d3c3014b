"""Benchmark one training step (forward + backward + Adam update) of tinyloop, and of the identical model in
PyTorch when torch is importable. Not a test (pytest does not collect it): run it by hand.

    python tests/bench_step.py                 # both configurations, 1 BLAS thread
    python tests/bench_step.py --threads 2

Reports the median step time, autograd graph nodes (primitives) per step, achieved matmul GFLOP/s against the
machine's NumPy float32 matmul peak, and the tinyloop / PyTorch ratio. The PyTorch twin loads tinyloop's
weights, and the script checks that both compute the same loss before timing anything.
"""
import argparse
import os
import sys
import time

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--threads", type=int, default=1)
p.add_argument("--repeats", type=int, default=15)
p.add_argument("--variant", default="FLT")
args = p.parse_args()
for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[v] = str(args.threads)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as onp                                     # noqa: E402
from autograd import core, value_and_grad               # noqa: E402

import tinyloop as tl                                   # noqa: E402

tl.tune_malloc()
CONFIGS = {
    "default (d 64, seq 32)": dict(d_model=64, seq_len=32),
    "larger (d 128, seq 64)": dict(d_model=128, seq_len=64),
}


def median_ms(f, n):
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return 1000 * float(onp.median(ts))


def matmul_peak():
    a = onp.random.rand(1024, 1024).astype("float32")
    return 2 * 1024 ** 3 / median_ms(lambda: a @ a, 10) / 1e6


def matmul_flops(cfg, B, K):
    """FLOPs of the matmuls in one step: forward 2 * (weights touched per token) per token per layer-pass,
    plus attention (q k^T and P v over the causal half); backward twice the forward."""
    T, d, f = cfg.seq_len, cfg.d_model, cfg.ff
    per_token = 2 * (4 * d * d + 2 * d * f) + 2 * 2 * (T / 2) * d
    fwd = B * T * K * cfg.n_layers * per_token + 2 * B * T * d * cfg.vocab
    return 3 * fwd


def tinyloop_step(cfg, params, batch, K):
    vg = value_and_grad(lambda p: tl.loss_fn(p, batch, cfg, args.variant, K))
    state = {"vec": tl.flatten(params)[0], "step": 0}
    state["m"], state["v"] = onp.zeros_like(state["vec"]), onp.zeros_like(state["vec"])
    unflatten = tl.flatten(params)[1]

    def step():
        loss, g = vg(unflatten(state["vec"]))
        gvec, _ = tl.clip_by_norm(tl.flatten(g)[0], 1.0)
        state["vec"], state["m"], state["v"] = tl.adam_update(state["vec"], gvec, state["m"], state["v"],
                                                              state["step"], 1e-3)
        state["step"] += 1
        return float(loss)
    return step


def count_nodes(f):
    n = [0]
    orig = core.VJPNode.__init__

    def counting(self, *a, **k):
        n[0] += 1
        orig(self, *a, **k)
    core.VJPNode.__init__ = counting
    try:
        f()
    finally:
        core.VJPNode.__init__ = orig
    return n[0]


def torch_twin(cfg, params, batch, K):
    """The same FLT-family model in PyTorch (only what this benchmark config uses), with tinyloop's weights."""
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(args.threads)
    P = {k: torch.tensor(onp.asarray(v), requires_grad=True) for k, v in tl._named_leaves(params)}
    H, dh = cfg.n_heads, cfg.head_dim
    cos, sin, R = (torch.tensor(t) for t in tl.rope_tables(cfg, 0, cfg.seq_len))
    tok, tgt, mask = (torch.tensor(onp.asarray(a)) for a in batch)
    norm = lambda x: F.rms_norm(x, (x.shape[-1],), eps=cfg.norm_eps)

    def attn(l, q_in, x_in):
        B, T, d = x_in.shape
        q = (q_in @ P[f"layers.{l}.attn.wq"]).view(B, T, H, dh).transpose(1, 2)
        k = (x_in @ P[f"layers.{l}.attn.wk"]).view(B, T, H, dh).transpose(1, 2)
        v = (x_in @ P[f"layers.{l}.attn.wv"]).view(B, T, H, dh).transpose(1, 2)
        q, k = q * cos[:T] + (q @ R) * sin[:T], k * cos[:T] + (k @ R) * sin[:T]
        q, k = norm(q), norm(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(B, T, d) @ P[f"layers.{l}.attn.wo"]

    def loss():
        e = P["embed"][tok]
        h = None
        for t in range(K):
            x = norm(e) if (t == 0 or args.variant == "FLT") else h
            for l in range(cfg.n_layers):
                u = norm(x)
                x = x + attn(l, u if h is None or args.variant != "FLT" else norm(h), u)
                x = x + F.relu(norm(x) @ P[f"layers.{l}.mlp.w1"]).square() @ P[f"layers.{l}.mlp.w2"]
            h = norm(x)
        z = cfg.softcap * torch.tanh(h @ P["head"] / cfg.softcap)
        nll = F.cross_entropy(z.reshape(-1, z.shape[-1]), tgt.reshape(-1), reduction="none")
        return (nll * mask.reshape(-1)).sum() / mask.sum()

    opt = torch.optim.Adam(P.values(), lr=1e-3, betas=(0.8, 0.95), eps=1e-10)

    def step():
        opt.zero_grad()
        lv = loss()
        lv.backward()
        torch.nn.utils.clip_grad_norm_(P.values(), 1.0)
        opt.step()
        return float(lv.detach())
    return step


def main():
    assert args.variant in ("LT", "FLT"), "the PyTorch twin implements LT and FLT"
    peak = matmul_peak()
    print(f"{args.threads} thread(s); NumPy float32 matmul peak {peak:.0f} GFLOP/s; variant {args.variant}, "
          f"2 layers x 12 loops, batch 32, Adam, float32")
    print(f"{'config':24s} {'tinyloop ms':>11s} {'nodes':>6s} {'GFLOP/s':>8s} {'% peak':>6s} {'torch ms':>9s} {'ratio':>6s}")
    for name, kw in CONFIGS.items():
        cfg = tl.Config(vocab=tl.VOCAB, n_heads=4, n_layers=2, n_loops=12, **kw)
        params = tl.init_params(cfg, 0)
        b = tl.make_batch(["sort", "reverse"], 32, cfg.seq_len, onp.random.default_rng(0))
        batch = (b["tokens"], b["targets"], b["mask"])
        ours = tinyloop_step(cfg, params, batch, 12)
        nodes = count_nodes(ours)
        ms = median_ms(ours, args.repeats)
        gflops = matmul_flops(cfg, 32, 12) / ms / 1e6
        row = f"{name:24s} {ms:11.0f} {nodes:6d} {gflops:8.1f} {100 * gflops / peak:5.0f}%"
        try:
            import torch  # noqa: F401
        except ImportError:
            print(row + "   (torch not importable)")
            continue
        # same weights, same batch, same loss before any update
        l_ours = float(tl.loss_fn(params, batch, cfg, args.variant, 12))
        theirs = torch_twin(cfg, params, batch, 12)
        l_theirs = theirs()
        assert abs(l_ours - l_theirs) < 1e-4 * max(1.0, abs(l_ours)), (l_ours, l_theirs)
        tms = median_ms(theirs, args.repeats)
        print(row + f" {tms:9.0f} {ms / tms:6.2f}")


if __name__ == "__main__":
    main()
