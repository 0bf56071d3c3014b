"""train_toy.py: collapse vs stability of looped transformers at 12 loops, on a laptop, in one command.

Trains the [FLT] model family (LT, LT_i, LT_ia, FLT_res, FLT) at a milder loop count and at K = 12 on an
embedded mixture of small algorithmic tasks, sweeps the learning rate, and writes results.json + figures.

    python train_toy.py            # default run (~15 min on 2 cores)
    python train_toy.py --quick    # smoke run (~20 s on 2 cores)

Protocol (fixed before looking at any result; see README "What train_toy.py shows"):
  * every variant at a K gets identical hyperparameters: Adam (0.8, 0.95), clip 1.0, no warm-up, constant LR,
    linear warm-down over the last 20% (the FLT recipe); the same data stream for a given seed;
  * LR sweep: the same grid for every variant, one seed (seed 0) per LR;
  * headline LR, per K: the grid LR whose final loss, AVERAGED OVER ALL FIVE VARIANTS, is lowest;
    the headline runs add seeds 1.. at that LR;
  * collapse: final loss > COLLAPSE_FRACTION x chance loss (uniform guessing of the answer tokens), or a
    divergence (non-finite / blow-up); "degraded": final loss > DEGRADED_FACTOR x the best variant's loss at
    the same (K, LR, seed).
"""
import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):   # one BLAS thread per process:
    os.environ.setdefault(_v, "1")                                         # runs go in parallel instead

import argparse
import multiprocessing as mp
import threading
import time

import numpy as np
from tqdm.auto import tqdm

import tinyloop as tl

VARIANTS = ("LT", "LT_i", "LT_ia", "FLT_res", "FLT")
TRAIN_TASKS = tl.DEFAULT_TASKS      # (add is left out: no variant learns it in this budget, see README)
COLLAPSE_FRACTION = 0.9
DEGRADED_FACTOR = 1.5
FINAL_WINDOW = 0.1            # final loss = mean training loss over the last 10% of steps


def model_config(args, K):
    return tl.Config(vocab=tl.VOCAB, d_model=args.d_model, n_heads=args.heads, n_layers=args.layers,
                     n_loops=K, seq_len=args.seq_len)


def batch_fn(seed, args):
    """Training batches: a deterministic function of (seed, step), the same for every variant."""
    def get(step):
        b = tl.make_batch(TRAIN_TASKS, args.batch, args.seq_len, np.random.default_rng([seed, step]), n=args.n)
        return b["tokens"], b["targets"], b["mask"]
    return get


def eval_batch(args, seed=10_000):
    return tl.make_batch(TRAIN_TASKS, args.eval_examples, args.seq_len, np.random.default_rng(seed), n=args.n)


def evaluate(params, cfg, variant, K, batch):
    logits, diag = tl.forward(params, batch["tokens"], cfg, variant, K)
    loss = float(tl.cross_entropy(logits, batch["targets"], batch["mask"]))
    acc = tl.per_task_accuracy(logits, batch, TRAIN_TASKS)
    return loss, acc, diag


def checkpoint_path(args, variant, K, lr, seed):
    return os.path.join(args.out, "models", f"{variant}_K{K}_lr{lr:g}_seed{seed}.npz")


def test_time_loops(params, cfg, variant, ev, args):
    """Downstream average when the model trained at cfg.n_loops is run with 1..max_test_loops loops."""
    small = {k: v[: args.loop_eval_examples] for k, v in ev.items()}
    return {k: float(np.mean(list(evaluate(params, cfg, variant, k, small)[1].values())))
            for k in range(1, args.max_test_loops + 1)}


def loops_only(job):
    """Test-time loop evaluation of an already trained (saved) run."""
    args, variant, K, lr, seed = job
    tl.tune_malloc()
    params, cfg, _ = tl.load(checkpoint_path(args, variant, K, lr, seed), expect_cfg=model_config(args, K))
    return (variant, K, lr, seed), test_time_loops(params, cfg, variant, eval_batch(args), args)


def run_one(job):
    """One training run (a separate process): train, save the model, evaluate. Returns a JSON-able record."""
    args, variant, K, lr, seed, test_loops = job
    tl.tune_malloc()
    cfg = model_config(args, K)
    params = tl.init_params(cfg, np.random.default_rng([seed, 1]))
    t0 = time.perf_counter()
    params, hist = tl.train(params, cfg, batch_fn(seed, args), steps=args.steps, lr=lr, variant=variant,
                            n_loops=K, clip=1.0, log_every=args.log_every, progress=False)
    seconds = time.perf_counter() - t0
    tl.save(checkpoint_path(args, variant, K, lr, seed), params, cfg, meta={"variant": variant, "lr": lr, "seed": seed})
    losses = [x for x in hist["loss"] if x is not None]
    n_final = max(1, int(FINAL_WINDOW * args.steps))
    final = float(np.mean(losses[-n_final:])) if losses else float("nan")
    ev = eval_batch(args)
    chance = tl.chance_loss(ev)
    eval_loss, acc, diag = evaluate(params, cfg, variant, K, ev)
    rec = {"variant": variant, "K": K, "lr": lr, "seed": seed, "steps": args.steps, "seconds": seconds,
           "status": hist["status"], "diverged_at": hist["diverged_at"], "chance_loss": chance,
           "final_loss": final, "eval_loss": eval_loss, "initial_loss": losses[0] if losses else None,
           "collapsed": bool(hist["status"] == "diverged" or not final < COLLAPSE_FRACTION * chance),
           "accuracy": acc, "downstream_avg": float(np.mean(list(acc.values()))),
           "final_hidden_norm": diag["hidden_norm"].tolist(), "final_cos_sim": diag["cos_sim"].tolist(),
           "loss_curve": hist["loss"], "grad_norm_curve": hist["grad_norm"], "log_step": hist["log_step"],
           "hidden_norm_curve": hist["hidden_norm"], "cos_sim_curve": hist["cos_sim"]}
    if test_loops:
        rec["test_loops"] = test_time_loops(params, cfg, variant, ev, args)
    return rec


def run_all(fn, jobs, workers, desc):
    tqdm.set_lock(threading.RLock())       # a thread lock: tqdm's default multiprocessing lock leaks a semaphore
    if workers <= 1:
        return [fn(j) for j in tqdm(jobs, desc=desc)]
    with mp.get_context("spawn").Pool(workers) as pool:
        return list(tqdm(pool.imap_unordered(fn, jobs), total=len(jobs), desc=desc))


def headline_lr(sweep, K):
    """The pre-stated rule: the grid LR with the lowest final loss averaged over all variants (seed 0)."""
    lrs = sorted({r["lr"] for r in sweep if r["K"] == K})
    mean_loss = {lr: np.mean([r["final_loss"] if np.isfinite(r["final_loss"]) else 1e9
                              for r in sweep if r["K"] == K and r["lr"] == lr]) for lr in lrs}
    return min(lrs, key=lambda lr: mean_loss[lr]), mean_loss


def mark_degraded(runs):
    for r in runs:
        peers = [q["final_loss"] for q in runs if (q["K"], q["lr"], q["seed"]) == (r["K"], r["lr"], r["seed"])]
        r["degraded"] = bool(r["final_loss"] > DEGRADED_FACTOR * min(peers)) if np.isfinite(r["final_loss"]) else True


# --- figures --------------------------------------------------------------------------------------------------
COLORS = {"LT": "tab:red", "LT_i": "tab:orange", "LT_ia": "tab:purple", "FLT_res": "tab:brown", "FLT": "tab:blue"}


def _band(ax, xs, curves, color, label):
    """Median line and min-max band over seeds."""
    L = min(len(c) for c in curves)
    Y = np.array([[np.nan if v is None else v for v in c[:L]] for c in curves], dtype=float)
    ax.plot(xs[:L], np.nanmedian(Y, 0), color=color, label=f"{label} (n={len(curves)})")
    if len(curves) > 1:
        ax.fill_between(xs[:L], np.nanmin(Y, 0), np.nanmax(Y, 0), color=color, alpha=0.2)


def make_figures(results, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs, Ks = results["runs"], results["loops"]
    head = {K: [r for r in runs if r["K"] == K and r["lr"] == results["headline_lr"][str(K)]] for K in Ks}
    Kmax = max(Ks)
    files = []

    def save(fig, name):
        fig.tight_layout()
        path = os.path.join(out, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(name)

    # 1-3: loss, hidden norm of the last loop, gradient norm, vs step, at the largest K
    lr = results["headline_lr"][str(Kmax)]
    for name, key, ylabel, log in [("1_loss.png", "loss_curve", "training loss (answer tokens)", False),
                                   ("3_grad_norm.png", "grad_norm_curve", "gradient norm before clipping", True)]:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for v in VARIANTS:
            rs = [r for r in head[Kmax] if r["variant"] == v]
            if rs:
                _band(ax, np.arange(len(rs[0][key])), [r[key] for r in rs], COLORS[v], v)
        if key == "loss_curve":
            ax.axhline(COLLAPSE_FRACTION * head[Kmax][0]["chance_loss"], ls="--", color="gray",
                       label=f"collapse threshold ({COLLAPSE_FRACTION} x chance)")
        ax.set(xlabel="step", ylabel=ylabel, title=f"K = {Kmax} loops, lr = {lr:g} (median, min-max over seeds)")
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        save(fig, name)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for v in VARIANTS:
        rs = [r for r in head[Kmax] if r["variant"] == v]
        if rs:
            _band(axes[0], np.array(rs[0]["log_step"]), [[h[-1] for h in r["hidden_norm_curve"]] for r in rs],
                  COLORS[v], v)
            per_loop = np.array([r["final_hidden_norm"] for r in rs])
            axes[1].plot(np.arange(1, Kmax + 1), np.median(per_loop, 0), "o-", color=COLORS[v], label=v, ms=3)
    axes[0].set(xlabel="step", ylabel="hidden norm at the end of the last loop", yscale="log",
                title=f"Residual norm over training (K = {Kmax})")
    axes[1].set(xlabel="loop t", ylabel="hidden norm at the end of loop t", yscale="log",
                title="Per-loop hidden norm after training (median over seeds)")
    axes[0].legend(fontsize=8)
    save(fig, "2_hidden_norm.png")

    # 4: downstream average per variant at each K
    fig, ax = plt.subplots(figsize=(7, 4.2))
    w = 0.8 / len(Ks)
    for i, K in enumerate(Ks):
        for j, v in enumerate(VARIANTS):
            accs = [r["downstream_avg"] for r in head[K] if r["variant"] == v]
            if accs:
                ax.bar(j + i * w, np.median(accs), w, color=COLORS[v], alpha=0.45 + 0.55 * i / max(1, len(Ks) - 1),
                       label=f"K = {K}" if j == 0 else None, edgecolor="k")
                ax.plot([j + i * w] * len(accs), accs, "k.", ms=4)
    ax.set_xticks(np.arange(len(VARIANTS)) + w * (len(Ks) - 1) / 2, VARIANTS)
    ax.set(ylabel="mean exact-match accuracy over tasks", title="Downstream average (bars: median; dots: seeds)",
           ylim=(0, 1))
    ax.legend(title="trained at", fontsize=8)
    save(fig, "4_downstream.png")

    # 5: test-time loops
    fig, axes = plt.subplots(1, len(Ks), figsize=(5.5 * len(Ks), 4.2), squeeze=False)
    for ax, K in zip(axes[0], Ks):
        for v in VARIANTS:
            rs = [r for r in head[K] if r["variant"] == v and "test_loops" in r]
            if rs:
                ks = sorted(int(k) for k in rs[0]["test_loops"])
                _band(ax, np.array(ks), [[r["test_loops"][str(k)] if str(k) in r["test_loops"] else r["test_loops"][k]
                                          for k in ks] for r in rs], COLORS[v], v)
        ax.axvline(K, color="gray", ls=":")
        ax.set(xlabel="loops at test time", ylabel="downstream average", ylim=(0, 1),
               title=f"Trained at K = {K}: run at other loop counts")
        ax.legend(fontsize=8)
    save(fig, "5_test_time_loops.png")

    # 6: LR sweep
    fig, axes = plt.subplots(1, len(Ks), figsize=(5.5 * len(Ks), 4.2), squeeze=False)
    for ax, K in zip(axes[0], Ks):
        sw = [r for r in results["sweep"] if r["K"] == K]
        for v in VARIANTS:
            rs = sorted([r for r in sw if r["variant"] == v], key=lambda r: r["lr"])
            ax.plot([r["lr"] for r in rs], [r["final_loss"] for r in rs], "o-", color=COLORS[v], label=v)
            bad = [r for r in rs if r["collapsed"]]
            ax.plot([r["lr"] for r in bad], [r["final_loss"] for r in bad], "x", color="k", ms=10)
        if sw:
            ax.axhline(COLLAPSE_FRACTION * sw[0]["chance_loss"], ls="--", color="gray", label="collapse threshold")
        ax.axvline(results["headline_lr"][str(K)], color="green", ls=":", label="headline LR (rule)")
        ax.set(xscale="log", xlabel="learning rate", ylabel="final training loss",
               title=f"LR sweep at K = {K} (x = collapsed; seed 0)")
        ax.legend(fontsize=8)
    save(fig, "6_lr_sweep.png")
    return files


def summary(results):
    lines = []
    for K in results["loops"]:
        lr = results["headline_lr"][str(K)]
        lines.append(f"K = {K}, headline lr = {lr:g}")
        lines.append(f"  {'variant':8s} {'final loss':>14s} {'collapsed':>9s} {'downstream avg':>16s} {'last-loop norm':>15s}")
        for v in VARIANTS:
            rs = [r for r in results["runs"] if r["K"] == K and r["lr"] == lr and r["variant"] == v]
            if not rs:
                continue
            fl = [r["final_loss"] for r in rs]
            da = [r["downstream_avg"] for r in rs]
            hn = [r["final_hidden_norm"][-1] for r in rs]
            lines.append(f"  {v:8s} {np.median(fl):8.3f} ±{np.ptp(fl) / 2:4.2f} {sum(r['collapsed'] for r in rs):4d}/{len(rs)}"
                         f"   {np.median(da):10.3f} ±{np.ptp(da) / 2:4.2f} {np.median(hn):13.1f}")
        sw = [r for r in results["sweep"] if r["K"] == K]
        lines.append("  LR sweep (seed 0), collapsed at: " + ", ".join(
            f"{v} {[r['lr'] for r in sorted(sw, key=lambda r: r['lr']) if r['variant'] == v and r['collapsed']]}"
            for v in VARIANTS))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (~20 s on 2 cores)")
    p.add_argument("--loops", type=int, nargs="+", default=[4, 12], help="training loop counts K")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help="subset of " + " ".join(VARIANTS))
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant at the headline LR")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2], help="LR sweep grid")
    p.add_argument("--steps", type=int, default=300, help="training steps per run")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--d-model", type=int, default=48)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2, help="L, layers in the looped stack")
    p.add_argument("--n", type=int, default=6, help="task input length")
    p.add_argument("--seq-len", type=int, default=20)
    p.add_argument("--eval-examples", type=int, default=1000)
    p.add_argument("--loop-eval-examples", type=int, default=300)
    p.add_argument("--max-test-loops", type=int, default=16)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--workers", type=int, default=2, help="parallel processes (one BLAS thread each)")
    p.add_argument("--out", default=None, help="output folder (default out/train_toy, or out/train_toy_quick)")
    if p.parse_args(argv).quick:          # --quick changes the defaults; flags given explicitly still win
        p.set_defaults(loops=[2, 4], seeds=2, lrs=[3e-3, 3e-2], steps=40, d_model=32, eval_examples=200,
                       loop_eval_examples=100, max_test_loops=6)
    args = p.parse_args(argv)
    args.out = args.out or ("out/train_toy_quick" if args.quick else "out/train_toy")
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {VARIANTS}")
    for name in ("seeds", "steps", "batch", "d_model", "heads", "layers", "n", "seq_len", "eval_examples",
                 "loop_eval_examples", "max_test_loops", "workers", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(k < 1 for k in args.loops):
        p.error("--loops: every K must be >= 1")
    if any(lr <= 0 for lr in args.lrs):
        p.error("--lrs: learning rates must be positive")
    if args.d_model % args.heads:
        p.error(f"--d-model {args.d_model} is not divisible by --heads {args.heads}")
    need = max(tl.example_length(t, args.n) for t in TRAIN_TASKS) - 1
    if args.seq_len < need:
        p.error(f"--seq-len must be >= {need} for --n {args.n}")
    args.variants = [v for v in VARIANTS if v in args.variants]
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    config = {k: v for k, v in vars(args).items()}
    sweep_jobs = [(args, v, K, lr, 0, False) for K in args.loops for lr in args.lrs for v in args.variants]
    sweep = run_all(run_one, sweep_jobs, args.workers, "LR sweep (seed 0)")
    head_lr, mean_loss = {}, {}
    for K in args.loops:
        head_lr[str(K)], mean_loss[str(K)] = headline_lr(sweep, K)
    # headline runs: seed 0 is the sweep's run at the headline LR (its saved model gets the test-time loop
    # evaluation); seeds 1.. are trained now
    jobs = [(args, v, K, head_lr[str(K)], s, True) for K in args.loops for v in args.variants for s in range(1, args.seeds)]
    runs = run_all(run_one, jobs, args.workers, "headline runs (seeds 1..)")
    seed0 = [(args, v, K, head_lr[str(K)], 0) for K in args.loops for v in args.variants]
    loops0 = dict(run_all(loops_only, seed0, args.workers, "test-time loops (seed 0)"))
    for r in sweep:
        if (r["variant"], r["K"], r["lr"], r["seed"]) in loops0:
            runs.append(dict(r, test_loops=loops0[(r["variant"], r["K"], r["lr"], r["seed"])]))
    mark_degraded(sweep)
    mark_degraded(runs)
    key = lambda r: (r["K"], r["lr"], r["variant"], r["seed"])
    results = {"config": config, "loops": args.loops, "variants": args.variants, "tasks": list(TRAIN_TASKS),
               "collapse_rule": f"final loss > {COLLAPSE_FRACTION} x chance loss, or diverged",
               "degraded_rule": f"final loss > {DEGRADED_FACTOR} x best variant at the same (K, lr, seed)",
               "headline_lr_rule": "grid LR with the lowest final loss averaged over all variants (seed 0 sweep)",
               "headline_lr": head_lr, "sweep_mean_loss": {K: {str(k): v for k, v in m.items()} for K, m in mean_loss.items()},
               "sweep": sorted(sweep, key=key), "runs": sorted(runs, key=key)}
    results["seconds"] = time.perf_counter() - t0
    tl.write_json(os.path.join(args.out, "results.json"), results)
    files = make_figures(results, args.out)
    print(summary(results))
    print(f"wrote {os.path.join(args.out, 'results.json')} and {', '.join(files)} in {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
