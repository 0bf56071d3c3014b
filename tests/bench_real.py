"""Benchmark the real checkpoint (SmolLM2-135M from GGUF) in tinyloop, beside HF transformers on the same weights.
Not a test (pytest does not collect it): run it by hand, alone on the machine (it takes a few minutes).

    python tests/bench_real.py                     # 1 and 2 BLAS threads, each in its own subprocess
    python tests/bench_real.py --threads 1 --no-hf
    python tests/bench_real.py --profile           # also: cProfile of decode steps at a 1536-token context

Measures, on the first tokens of tests/data/heldout_en.txt:
  prefill   one forward pass over T = 128 / 512 / 1536 tokens, logits at every position (median of --repeats)
  decode    tokens per second of greedy generation with the KV cache (tl.generate) after a 32- and a 1536-token
            prompt: --new tokens are generated, the rate counts the --new - 1 fed-back tokens after the prefill.
HF transformers runs beside it when torch and transformers are importable: a LlamaForCausalLM in float32 built from
tinyloop's dequantised params (the SAME weights; q and k rows permuted from llama.cpp's adjacent RoPE pairs back to
HF's half-split pairs), default attention implementation (sdpa), torch.inference_mode, the same thread count.
Before timing, each thread count checks that both give the same logits on a 64-token prompt (max |diff| reported
and asserted below 1e-4 x max |logit|) and the same greedy tokens.

BLAS thread counts are set in the environment of a fresh subprocess before NumPy or torch is imported.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
HELDOUT = os.path.join(HERE, "data", "heldout_en.txt")
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--threads", default="1,2", help="comma-separated BLAS thread counts (default 1,2)")
p.add_argument("--prefill", default="128,512,1536", help="prefill lengths (default 128,512,1536)")
p.add_argument("--decode", default="32,1536", help="decode prompt lengths (default 32,1536)")
p.add_argument("--new", type=int, default=33, help="tokens generated per decode run (default 33: 32 timed steps)")
p.add_argument("--repeats", type=int, default=3, help="timed repeats per cell, median reported (default 3)")
p.add_argument("--no-hf", action="store_true", help="tinyloop only")
p.add_argument("--profile", action="store_true", help="cProfile decode steps at a 1536-token context (tinyloop)")
p.add_argument("--json", help="also write the results here")
p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
args = p.parse_args()


def ints(s):
    return [int(x) for x in s.split(",") if x]


# ----------------------------------------------------------------------------------------------------------------
# The parent: one subprocess per thread count, then the table
# ----------------------------------------------------------------------------------------------------------------
def parent():
    rows = {}
    for n in ints(args.threads):
        env = dict(os.environ, **{v: str(n) for v in THREAD_VARS})
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--threads", str(n), "--prefill", args.prefill,
               "--decode", args.decode, "--new", str(args.new), "--repeats", str(args.repeats)]
        cmd += ["--no-hf"] * args.no_hf + ["--profile"] * args.profile
        out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
        rows[n] = json.loads(out.strip().splitlines()[-1])
    table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def table(rows):
    hf = any(r.get("hf") for r in rows.values())
    print(f"\n| threads | measure | tinyloop |" + (" HF float32 | tinyloop / HF |" if hf else ""))
    print("|---|---|---|" + ("---|---|" if hf else ""))
    for n, r in rows.items():
        cells = [(f"prefill {T} tokens", "s", r["prefill"][str(T)], (r.get("hf") or {}).get("prefill", {}).get(str(T)))
                 for T in ints(args.prefill)]
        cells += [(f"decode after a {P}-token prompt", "tok/s", r["decode"][str(P)],
                   (r.get("hf") or {}).get("decode", {}).get(str(P))) for P in ints(args.decode)]
        for name, unit, ours, theirs in cells:
            line = f"| {n} | {name} | {ours:.3g} {unit} |"
            if hf:
                ratio = "" if theirs is None else (ours / theirs if unit == "s" else theirs / ours)
                line += " - | - |" if theirs is None else f" {theirs:.3g} {unit} | {ratio:.2f}x time |"
            print(line)
    for n, r in rows.items():
        d = r["decode"]
        lo, hi = ints(args.decode)[0], ints(args.decode)[-1]
        print(f"{n} thread(s): decode rate at {hi} / at {lo} tokens of prompt = {d[str(hi)] / d[str(lo)]:.2f}"
              f" (target >= 0.7); logits max |tinyloop - HF| = {r.get('hf', {}).get('max_abs_diff', 'n/a')}; "
              f"load average before/after: {r['load_before']} / {r['load_after']}")


# ----------------------------------------------------------------------------------------------------------------
# The child: one thread count
# ----------------------------------------------------------------------------------------------------------------
def median_seconds(f, repeats):
    f()                                                              # warm-up (allocations, caches)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def hf_model(params, cfg):
    """LlamaForCausalLM (float32, eval) holding tinyloop's params."""
    import numpy as onp
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.set_num_threads(int(args.threads))
    hc = LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.d_model, intermediate_size=cfg.ff,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                     num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, max_position_embeddings=cfg.seq_len,
                     rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=True,
                     hidden_act="silu", attention_bias=False, mlp_bias=False, torch_dtype="float32")
    model = LlamaForCausalLM(hc).float().eval()
    dh = cfg.head_dim
    # tinyloop (GGUF) rotates adjacent pairs (2m, 2m+1); HF rotates (m, m + dh/2): reorder each head's q/k outputs
    half = onp.concatenate([onp.arange(0, dh, 2), onp.arange(1, dh, 2)])

    def rows(w, heads):                               # tinyloop [d_in, heads*dh] -> HF weight [heads*dh, d_in]
        return w.T.reshape(heads, dh, -1)[:, half].reshape(heads * dh, -1)
    t = lambda a: torch.tensor(onp.ascontiguousarray(a), dtype=torch.float32)
    sd = {"model.embed_tokens.weight": t(params["embed"]), "model.norm.weight": t(params["g_final"]),
          "lm_head.weight": t(params["embed"])}
    for l, L in enumerate(params["layers"]):
        a, m, pre = L["attn"], L["mlp"], f"model.layers.{l}."
        sd.update({pre + "self_attn.q_proj.weight": t(rows(a["wq"], cfg.n_heads)),
                   pre + "self_attn.k_proj.weight": t(rows(a["wk"], cfg.kv_heads)),
                   pre + "self_attn.v_proj.weight": t(a["wv"].T), pre + "self_attn.o_proj.weight": t(a["wo"].T),
                   pre + "mlp.gate_proj.weight": t(m["w1"].T), pre + "mlp.up_proj.weight": t(m["w3"].T),
                   pre + "mlp.down_proj.weight": t(m["w2"].T), pre + "input_layernorm.weight": t(L["g_attn"]),
                   pre + "post_attention_layernorm.weight": t(L["g_mlp"])})
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


def hf_decode_rate(model, prompt, n_new):
    """Greedy decode with HF's KV cache: prefill, then n_new - 1 fed-back tokens timed. Returns (ids, tok/s)."""
    import inspect
    import torch
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.x renamed it
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), use_cache=True)
        ids = [int(out.logits[0, -1].argmax())]
        t = time.perf_counter()
        for _ in range(n_new - 1):
            out = model(torch.tensor([[ids[-1]]]), use_cache=True, **{name: getattr(out, name)})
            ids.append(int(out.logits[0, -1].argmax()))
        return ids, (n_new - 1) / (time.perf_counter() - t)


def child():
    import numpy as onp
    sys.path.insert(0, os.path.join(HERE, ".."))
    import tinyloop as tl
    tl.tune_malloc()
    load_before = os.getloadavg()[0]
    params, cfg, meta = tl.load_gguf()
    ids = tl.Tokenizer.from_gguf(meta).encode(open(HELDOUT, encoding="utf-8").read())
    res = {"threads": int(args.threads), "prefill": {}, "decode": {}, "load_before": round(load_before, 2)}
    log = lambda *a: print(f"[{args.threads} thread(s)]", *a, file=sys.stderr, flush=True)

    model = None
    if not args.no_hf:
        try:
            import torch
            import transformers  # noqa: F401
        except ImportError:
            log("torch / transformers not importable: tinyloop only")
        else:
            model = hf_model(params, cfg)
            x = onp.array(ids[:64])
            ours = tl.forward(params, x[None], cfg, "standard", diagnostics=False)[0][0]
            with torch.inference_mode():
                theirs = model(torch.tensor(x[None])).logits[0].numpy()
            diff = float(onp.abs(ours - theirs).max())
            assert diff < 1e-4 * onp.abs(theirs).max(), f"tinyloop and HF disagree: max |diff| {diff}"
            res["hf"] = {"max_abs_diff": float(f"{diff:.2g}"), "prefill": {}, "decode": {},
                         "torch": torch.__version__, "transformers": transformers.__version__}
            log(f"logits agree: max |diff| {diff:.2g} (max |logit| {onp.abs(theirs).max():.1f})")

    for T in ints(args.prefill):
        x = onp.array([ids[:T]])
        res["prefill"][str(T)] = median_seconds(lambda: tl.forward(params, x, cfg, "standard", diagnostics=False),
                                                args.repeats)
        if model is not None:
            import torch
            with torch.inference_mode():
                res["hf"]["prefill"][str(T)] = median_seconds(lambda: model(torch.tensor(x)), args.repeats)
        log(f"prefill {T}: tinyloop {res['prefill'][str(T)]:.3f} s"
            + (f", HF {res['hf']['prefill'][str(T)]:.3f} s" if model is not None else ""))

    for P in ints(args.decode):
        prompt = ids[:P]
        rates, out = [], None
        for _ in range(max(1, args.repeats - 1)):
            out, info = tl.generate(params, cfg, prompt, args.new)
            rates.append((args.new - 1) / info["decode_seconds"])
        res["decode"][str(P)] = sorted(rates)[len(rates) // 2]
        if model is not None:
            hf_rates = []
            for _ in range(max(1, args.repeats - 1)):
                hf_ids, r = hf_decode_rate(model, prompt, args.new)
                hf_rates.append(r)
            res["hf"]["decode"][str(P)] = sorted(hf_rates)[len(hf_rates) // 2]
            res["hf"].setdefault("same_greedy_tokens", {})[str(P)] = hf_ids == out
        log(f"decode after {P}: tinyloop {res['decode'][str(P)]:.1f} tok/s"
            + (f", HF {res['hf']['decode'][str(P)]:.1f} tok/s, same tokens {hf_ids == out}" if model is not None else ""))

    if args.profile:
        profile_decode(tl, params, cfg, ids[:1536], log)
    res["load_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(res))


def profile_decode(tl, params, cfg, prompt, log):
    """cProfile of 8 cached decode steps after a 1536-token prompt (prefill excluded), top functions by own time."""
    import cProfile
    import io
    import pstats
    import numpy as onp
    _, info = tl.generate(params, cfg, prompt, 1)                    # the prefill, run once outside the profile
    kv = info["kv"]

    def steps():
        tok = int(onp.argmax(info["logits"][-1]))
        for _ in range(8):
            z = tl._cached_pass(params, cfg, onp.array([[tok]]), kv, None, False, "first", {"evals": 0})
            tok = int(onp.argmax(z))
    prof = cProfile.Profile()
    prof.runcall(steps)
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(20)
    log("cProfile, 8 decode steps at ~1536 tokens of context:\n" + s.getvalue())


if __name__ == "__main__":
    child() if args.child else parent()
