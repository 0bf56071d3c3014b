"""train_toy.py: collapse vs stability of looped transformers at 12 loops, on a laptop, in one command.

Trains the [FLT] model family (LT, LT_i, LT_ia, FLT_res, FLT) at K = 4 and K = 12 loops on an embedded mixture of
small algorithmic tasks, with the paper's optimizer (Muon + AdamW) and, as an ablation under the same protocol,
with one Adam; sweeps the learning rate; then runs the saved models at other loop counts. Writes results.json and
figures.

    python train_toy.py                  # default run: L = 2, both optimizers (~16 min on 2 idle cores)
    python train_toy.py --layers 2 4     # adds the depth axis L = 4 (reuses the L = 2 runs; see docs/train_toy.md)
    python train_toy.py --quick          # smoke run (~15 s): checks the pipeline; its numbers are NOT results

Protocol (fixed before looking at any result; see docs/train_toy.md):
  * every variant at an (optimizer, L, K) gets identical hyperparameters and the same data stream for a seed:
    the [FLT] recipe, clip 1.0, no warm-up, constant LR, linear warm-down over the last 20%, with either
    Muon + AdamW (tl.train's default: lr is Muon's LR, the AdamW groups keep the authors' ratios to it) or one
    Adam (0.8, 0.95) for every parameter (lr is its step size);
  * LR sweep: one grid per optimizer, three values a factor ~3 apart (Muon: the authors' 0.02 and 0.02 x 3^+-1;
    Adam: 3e-3, 1e-2, 3e-2), the same for every variant, K and L, with seed 0;
  * headline LR, per (optimizer, L, K): the grid LR whose final loss AVERAGED OVER ALL VARIANTS is lowest, ties
    to the lower LR (the lowest LR within TIE_TOL = 10% of the best average); the headline runs add seeds 1.. there;
  * collapse: final loss > COLLAPSE_FRACTION x chance loss (uniform guessing of the answer tokens), or a
    divergence (non-finite / blow-up); "degraded": final loss > DEGRADED_FACTOR x the best variant's loss at
    the same (optimizer, L, K, LR, seed);
  * statistics: the MEAN over seeds, "± x" is the sample standard deviation over seeds (n - 1); the figures'
    bands span min to max over seeds.
Stages: 1 LR sweep (seed 0), 2 headline seeds 1.., 3 test-time loops (evaluates the SAVED headline models at
1..max_test_loops loops; no training), 4 test-time rules (the same saved models, the loops past the trained K run
naive / damped / rk by [TFL]'s rules, with the loop map's eigenvalues: tl.sweep_test_time_rules; no training).
Resumable: every finished run is saved as models/<run>.npz with its result in models/<run>.json (stages 3 and 4:
<run>.loops.json, <run>.rules.json); a rerun reuses each finished one whose settings match (--fresh redoes all).
Ctrl-C stops with one line and keeps every finished run.
"""
import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):   # one BLAS thread per process:
    os.environ.setdefault(_v, "1")                                         # runs go in parallel instead

import argparse
import json
import math
import multiprocessing as mp
import signal
import sys
import threading
import time

import numpy as np
from tqdm.auto import tqdm

import tinyloop as tl

VARIANTS = ("LT", "LT_i", "LT_ia", "FLT_res", "FLT")
OPTIMIZERS = ("muon", "adam")
OPT_LABEL = {"muon": "Muon + AdamW", "adam": "Adam (ablation)"}
TRAIN_TASKS = tl.DEFAULT_TASKS      # (add is left out: no variant learns it in this budget, see docs/train_toy.md)
COLLAPSE_FRACTION = 0.9
DEGRADED_FACTOR = 1.5
FINAL_WINDOW = 0.1            # final loss = mean training loss over the last 10% of steps
SMOKE_NOTE = ("--quick is a SMOKE RUN: a tiny model trained for a few steps to check that the pipeline works; "
              "its numbers are not results (run without --quick for those)")
STAT_NOTE = "mean over seeds ± sample standard deviation over seeds (n - 1)"
RULE_S, RULE_BETA = 0.5, 0.5  # stage 4: the damped step s and rk's anchor weight beta (tl.continue_loops' defaults)


# --- one training run -----------------------------------------------------------------------------------------
def model_config(args, L, K):
    return tl.Config(vocab=tl.VOCAB, d_model=args.d_model, n_heads=args.heads, n_layers=L, n_loops=K,
                     seq_len=args.seq_len)


def batch_fn(seed, args):
    """Training batches: a deterministic function of (seed, step), the same for every variant (make_batch's dict)."""
    return lambda step: tl.make_batch(TRAIN_TASKS, args.batch, args.seq_len, np.random.default_rng([seed, step]),
                                      n=args.n)


def eval_batch(args, seed=10_000):
    return tl.make_batch(TRAIN_TASKS, args.eval_examples, args.seq_len, np.random.default_rng(seed), n=args.n)


def evaluate(params, cfg, variant, K, batch):
    logits, diag = tl.forward(params, batch["tokens"], cfg, variant, K)
    loss = float(tl.cross_entropy(logits, batch["targets"], batch["mask"]))
    acc = tl.per_task_accuracy(logits, batch, TRAIN_TASKS)
    return loss, acc, diag


def chance_exact_match(args):
    """Downstream average of uniform guessing: each task's exact match is prod over answer tokens of 1/alphabet."""
    out = []
    for t in TRAIN_TASKS:
        _, ans, alpha = tl.make_example(t, np.random.default_rng(0), args.n)
        out.append(alpha ** -len(ans))
    return float(np.mean(out))


def run_name(job):
    return f"{job['optimizer']}_L{job['layers']}_K{job['K']}_{job['variant']}_lr{job['lr']:g}_seed{job['seed']}"


def run_path(args, job, ext):
    return os.path.join(args.out, "models", run_name(job) + ext)


def run_settings(args, job):
    """Everything that determines a run's result: a finished run is reused only if these match exactly."""
    return dict(job, steps=args.steps, batch=args.batch, d_model=args.d_model, heads=args.heads, n=args.n,
                seq_len=args.seq_len, tasks=list(TRAIN_TASKS), eval_examples=args.eval_examples,
                log_every=args.log_every, clip=1.0, warmdown=0.2, supervise="end")


def loops_settings(args, job):
    return dict(run_settings(args, job), loop_eval_examples=args.loop_eval_examples,
                max_test_loops=args.max_test_loops)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def finished(args, job):
    """The saved record of a finished run with the same settings, or None (no file, other settings, no model)."""
    rec = None if args.fresh else _read_json(run_path(args, job, ".json"))
    if rec and rec.get("settings") == run_settings(args, job) and os.path.exists(run_path(args, job, ".npz")):
        return rec
    return None


def train_one(payload):
    """One training run (in a worker process): train, save the model, evaluate, save the record next to it."""
    args, job = payload
    tl.tune_malloc()
    cfg = model_config(args, job["layers"], job["K"])
    params = tl.init_params(cfg, np.random.default_rng([job["seed"], 1]))
    t0 = time.perf_counter()
    params, hist = tl.train(params, cfg, batch_fn(job["seed"], args), steps=args.steps, lr=job["lr"],
                            variant=job["variant"], n_loops=job["K"], optimizer=job["optimizer"], clip=1.0,
                            log_every=args.log_every, progress=False)
    seconds = time.perf_counter() - t0
    losses = [x for x in hist["loss"] if x is not None]
    n_final = max(1, int(FINAL_WINDOW * args.steps))
    final = float(np.mean(losses[-n_final:])) if losses else float("nan")
    ev = eval_batch(args)
    chance = tl.chance_loss(ev)
    eval_loss, acc, diag = evaluate(params, cfg, job["variant"], job["K"], ev)
    rec = dict(job, settings=run_settings(args, job), steps=args.steps, seconds=seconds, status=hist["status"],
               diverged_at=hist["diverged_at"], chance_loss=chance, final_loss=final, eval_loss=eval_loss,
               initial_loss=losses[0] if losses else None,
               collapsed=bool(hist["status"] == "diverged" or not final < COLLAPSE_FRACTION * chance),
               accuracy=acc, downstream_avg=float(np.mean(list(acc.values()))),
               final_hidden_norm=diag["hidden_norm"].tolist(), final_cos_sim=diag["cos_sim"].tolist(),
               loss_curve=hist["loss"], grad_norm_curve=hist["grad_norm"], log_step=hist["log_step"],
               hidden_norm_curve=hist["hidden_norm"], cos_sim_curve=hist["cos_sim"],
               block_out_grad_norm_curve=hist["block_out_grad_norm"])
    tl.save(run_path(args, job, ".npz"), params, cfg, meta={"variant": job["variant"], "lr": job["lr"],
                                                            "seed": job["seed"], "optimizer": job["optimizer"]})
    tl.write_json(run_path(args, job, ".json"), rec)              # written last: its presence means "finished"
    return rec


def loops_one(payload):
    """Stage 3 on one SAVED model: the downstream average when it runs with 1..max_test_loops loops."""
    args, job = payload
    tl.tune_malloc()
    cfg = model_config(args, job["layers"], job["K"])
    params, cfg, _ = tl.load(run_path(args, job, ".npz"), expect_cfg=cfg)
    ev = eval_batch(args)
    small = {k: v[: args.loop_eval_examples] for k, v in ev.items()}
    out = {str(k): float(np.mean(list(evaluate(params, cfg, job["variant"], k, small)[1].values())))
           for k in range(1, args.max_test_loops + 1)}
    rec = {"settings": loops_settings(args, job), "test_loops": out}
    tl.write_json(run_path(args, job, ".loops.json"), rec)
    return rec


def loops_finished(args, job):
    rec = None if args.fresh else _read_json(run_path(args, job, ".loops.json"))
    return rec if rec and rec.get("settings") == loops_settings(args, job) else None


def test_time_rules(K):
    """The rules stage 4 runs for a model trained at K loops: rk anchors on the last trained loop (needs K >= 2)."""
    return tl.TEST_TIME_RULES if K >= 2 else tuple(r for r in tl.TEST_TIME_RULES if r != "rk")


def rules_settings(args, job):
    return dict(loops_settings(args, job), spectrum_examples=args.spectrum_examples, s=RULE_S, beta=RULE_BETA,
                rules=list(test_time_rules(job["K"])))


def rules_one(payload):
    """Stage 4 on one SAVED model: tl.sweep_test_time_rules on stage 3's examples (downstream average at
    1..max_test_loops loops per rule, the period-2 signature, the loop map's eigenvalues on the first
    spectrum_examples sequences)."""
    args, job = payload
    tl.tune_malloc()
    cfg = model_config(args, job["layers"], job["K"])
    params, cfg, _ = tl.load(run_path(args, job, ".npz"), expect_cfg=cfg)
    ev = eval_batch(args)
    small = {k: v[: args.loop_eval_examples] for k, v in ev.items()}               # stage 3's examples
    t0 = time.perf_counter()
    sw = tl.sweep_test_time_rules(params, cfg, job["variant"], small, K_train=job["K"], K_max=args.max_test_loops,
                                  rules=test_time_rules(job["K"]), s=RULE_S, beta=RULE_BETA, tasks=TRAIN_TASKS,
                                  n_spectrum=args.spectrum_examples)
    rec = {"settings": rules_settings(args, job), "test_time_rules": sw, "seconds": time.perf_counter() - t0}
    tl.write_json(run_path(args, job, ".rules.json"), rec)
    return rec


def rules_finished(args, job):
    rec = None if args.fresh else _read_json(run_path(args, job, ".rules.json"))
    return rec if rec and rec.get("settings") == rules_settings(args, job) else None


# --- running a stage: reuse finished runs, run the rest in parallel, Ctrl-C safe ----------------------------------
def _worker_init():
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # Ctrl-C is the main process's business: no worker tracebacks
    tqdm.set_lock(threading.RLock())                  # tqdm's default lock is a semaphore that would outlive the pool


def _call(item):
    fn, i, payload = item
    return i, fn(payload)


def run_stage(fn, done_fn, jobs, args, desc, what="runs"):
    """Results of fn((args, job)) for every job, in job order: finished ones read back (done_fn), the rest run."""
    out = [done_fn(args, j) for j in jobs]
    todo = sorted((i for i, r in enumerate(out) if r is None), key=lambda i: -jobs[i]["K"] * jobs[i]["layers"])
    reused = len(jobs) - len(todo)
    if reused:
        print(f"{desc}: reusing {reused} of {len(jobs)} finished {what} from {os.path.join(args.out, 'models')} "
              "(same config and settings)", flush=True)
    if todo:
        payloads = [(args, jobs[i]) for i in todo]
        bar = tqdm(total=len(todo), desc=desc)
        try:
            if args.workers <= 1:
                for i, p in zip(todo, payloads):
                    out[i] = fn(p)
                    bar.update()
            else:
                sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)   # workers start with Ctrl-C ignored ...
                pool = mp.get_context("spawn").Pool(min(args.workers, len(todo)), initializer=_worker_init)
                signal.signal(signal.SIGINT, sigint)                    # ... the main process handles it
                with pool:
                    for i, rec in pool.imap_unordered(_call, [(fn, i, p) for i, p in zip(todo, payloads)]):
                        out[i] = rec
                        bar.update()
                    pool.close()                      # let the workers exit normally (terminate only on Ctrl-C)
                    pool.join()
        finally:
            bar.close()
    return out, len(todo)


# --- the protocol ---------------------------------------------------------------------------------------------
TIE_TOL = 0.10     # headline LR tie rule, fixed before the second-kernel runs (see headline_lr, docs/train_toy.md)


def headline_lr(sweep):
    """The pre-stated rule: the grid LR with the lowest final loss averaged over all variants (seed 0), ties going
    to the LOWER LR: the lowest LR whose average is within TIE_TOL (10%, relative) of the best. A higher LR wins
    only when it is better by more than that; the seed-to-seed sd of a variant's final loss at the headline LRs is
    ~5-40% of its mean (docs/train_toy.md), so a smaller difference between two LRs' seed-0 averages is noise (the
    first rule, plain argmin, flipped between kernels on a 0.00014-nat difference, 0.1%)."""
    lrs = sorted({r["lr"] for r in sweep})
    mean_loss = {lr: float(np.mean([r["final_loss"] if np.isfinite(r["final_loss"]) else 1e9
                                    for r in sweep if r["lr"] == lr])) for lr in lrs}
    best = min(mean_loss.values())
    return next(lr for lr in lrs if mean_loss[lr] <= best * (1 + TIE_TOL)), mean_loss


def mark_degraded(runs):
    for r in runs:
        peers = [q["final_loss"] for q in runs if all(q[k] == r[k] for k in ("optimizer", "layers", "K", "lr", "seed"))]
        r["degraded"] = bool(r["final_loss"] > DEGRADED_FACTOR * min(peers)) if np.isfinite(r["final_loss"]) else True


def stat(xs):
    """(mean, sample standard deviation) over seeds; sd 0 for one seed."""
    xs = np.asarray(xs, dtype=float)
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def block_grad_total(rec):
    """Per logged step: sqrt(sum over loops and layers of ||dL/d block output||^2), the authors' diagnostic in one number."""
    return [float(np.sqrt(np.sum(np.square(m)))) for m in rec["block_out_grad_norm_curve"]]


def block_grad_per_loop(rec):
    """Per loop t: sqrt(sum over layers of ||dL/d block output||^2), averaged over the logged steps in the last
    FINAL_WINDOW of training (the window of the final loss)."""
    late = [m for s, m in zip(rec["log_step"], rec["block_out_grad_norm_curve"]) if s >= (1 - FINAL_WINDOW) * rec["steps"]]
    late = late or rec["block_out_grad_norm_curve"][-1:]
    return np.mean(np.sqrt(np.sum(np.square(late), axis=2)), axis=0).tolist()


def summarise(runs, groups, variants):
    rows = []
    for g in groups:
        for v in variants:
            rs = [r for r in runs if r["variant"] == v and all(r[k] == g[k] for k in ("optimizer", "layers", "K", "lr"))]
            if not rs:
                continue
            fl, da = stat([r["final_loss"] for r in rs]), stat([r["downstream_avg"] for r in rs])
            spikes = [max(b) / np.median(b) for b in map(block_grad_total, rs) if b]
            rows.append({**{k: g[k] for k in ("optimizer", "layers", "K", "lr")}, "variant": v, "n_seeds": len(rs),
                         "final_loss_mean": fl[0], "final_loss_sd": fl[1], "downstream_mean": da[0],
                         "downstream_sd": da[1], "collapsed": sum(r["collapsed"] for r in rs),
                         "degraded": sum(r["degraded"] for r in rs),
                         "last_loop_norm_mean": stat([r["final_hidden_norm"][-1] for r in rs])[0],
                         "cos_sim_last_mean": stat([r["final_cos_sim"][-1] for r in rs])[0],
                         "grad_norm_max": float(max(max(x for x in r["grad_norm_curve"] if x is not None) for r in rs)),
                         "block_grad_spike_mean": stat(spikes)[0] if spikes else None,
                         "block_grad_per_loop_mean": np.mean([block_grad_per_loop(r) for r in rs], 0).tolist()
                         if all(r["block_out_grad_norm_curve"] for r in rs) else None})
    return rows


TTR_NOTE = ("stage 4: the headline models run with K' = 1..max_test_loops loops; past the trained K the loops follow "
            "a rule (tl.continue_loops: naive = stage 3, damped h <- h + s (Phi(h) - h), rk = [TFL]'s anchored blend "
            "over the last trained loop); past = mean over K' = K+1..max of the downstream average; even_odd_gap = "
            "mean at even K' minus mean at odd K' (past K); eigenvalues of the loop map's Jacobian on the scored "
            "tokens of the first spectrum_examples sequences, at h_K (trained) and at the damped rule's state at "
            "K' = max(max_test_loops, K) (damped), with residual ||Phi(h) - h|| / ||h||; " + STAT_NOTE)


def _cplx(z):
    return complex(z[0], z[1])


def summarise_rules(runs, groups, args):
    """Stage 4 per (optimizer, L, K, lr) and variant: each rule's downstream average at every K' (mean, sd over
    seeds), its mean past K and its even/odd gap; the period-2 signature; the eigenvalue summaries per seed."""
    rows = []
    for g in groups:
        K = g["K"]
        for v in args.variants:
            rs = [r for r in runs if r["variant"] == v and all(r[k] == g[k] for k in ("optimizer", "layers", "K", "lr"))]
            if not rs:
                continue
            row = {**{k: g[k] for k in ("optimizer", "layers", "K", "lr")}, "variant": v, "n_seeds": len(rs),
                   "seeds": [r["seed"] for r in rs], "rules": {}}
            Ks = rs[0]["test_time_rules"]["K"]
            past = [i for i, k in enumerate(Ks) if k > K]
            for rule in rs[0]["test_time_rules"]["downstream"]:
                A = np.array([r["test_time_rules"]["downstream"][rule] for r in rs])      # [seed, K']
                per_k = [stat(A[:, i]) for i in range(len(Ks))]
                even, odd = [i for i in past if Ks[i] % 2 == 0], [i for i in past if Ks[i] % 2]
                pm = stat(A[:, past].mean(1)) if past else (None, None)
                gap = stat(A[:, even].mean(1) - A[:, odd].mean(1)) if even and odd else (None, None)
                row["rules"][rule] = {"downstream_mean": [m for m, _ in per_k], "downstream_sd": [s for _, s in per_k],
                                      "past_mean": pm[0], "past_sd": pm[1], "even_odd_gap_mean": gap[0],
                                      "even_odd_gap_sd": gap[1]}
            p2 = [r["test_time_rules"]["period2"] for r in rs]
            for key in ("step1", "step2"):
                vals = [p[key] for p in p2]
                row[f"period2_{key}_mean"] = stat(vals)[0] if None not in vals else None
            sp = [r["test_time_rules"].get("spectrum") for r in rs]
            if all(sp):
                row["spectrum"] = {}
                for state in ("trained", "damped"):
                    ss = [x[state] for x in sp]
                    d = {"K": ss[0]["K"], "dominant": [x["dominant"] for x in ss],
                         "most_negative": [x["most_negative"] for x in ss]}
                    for key, vals in (("dominant_abs", [abs(_cplx(x["dominant"])) for x in ss]),
                                      ("most_negative_re", [x["most_negative"][0] for x in ss]),
                                      ("frac_unstable", [x["frac_unstable"] for x in ss]),
                                      ("frac_flip", [x["frac_flip"] for x in ss]),
                                      ("damped_radius", [x["damped_radius"] for x in ss]),
                                      ("residual", [x["residual"] for x in ss])):
                        d[key + "_mean"], d[key + "_sd"] = stat(vals)
                    row["spectrum"][state] = d
            rows.append(row)
    return rows


def run_protocol(args):
    t0 = time.perf_counter()
    grid = {"muon": args.muon_lrs, "adam": args.adam_lrs}
    cells = [(o, L, K) for o in args.optimizers for L in args.layers for K in args.loops]
    job = lambda o, L, K, v, lr, s: {"optimizer": o, "layers": L, "K": K, "variant": v, "lr": lr, "seed": s}
    sweep_jobs = [job(o, L, K, v, lr, 0) for o, L, K in cells for lr in grid[o] for v in args.variants]
    sweep, n1 = run_stage(train_one, finished, sweep_jobs, args, "1/4 LR sweep (seed 0)")
    groups = []
    for o, L, K in cells:
        lr, mean_loss = headline_lr([r for r in sweep if (r["optimizer"], r["layers"], r["K"]) == (o, L, K)])
        groups.append({"optimizer": o, "layers": L, "K": K, "lr": lr,
                       "sweep_mean_loss": {f"{k:g}": v for k, v in mean_loss.items()}})
    seed_jobs = [job(g["optimizer"], g["layers"], g["K"], v, g["lr"], s) for g in groups for v in args.variants
                 for s in range(1, args.seeds)]
    more, n2 = run_stage(train_one, finished, seed_jobs, args, "2/4 headline runs (seeds 1..)")
    is_head = lambda r: any(all(r[k] == g[k] for k in ("optimizer", "layers", "K", "lr")) for g in groups)
    runs = [r for r in sweep if is_head(r)] + more
    keys = ("optimizer", "layers", "K", "variant", "lr", "seed")
    head_jobs = [{k: r[k] for k in keys} for r in runs]
    t3 = time.perf_counter()
    loops, n3 = run_stage(loops_one, loops_finished, head_jobs, args,
                          "3/4 test-time loops (saved models, no training)", what="evaluations")
    t4 = time.perf_counter()
    rules, n4 = run_stage(rules_one, rules_finished, head_jobs, args,
                          "4/4 test-time rules (saved models, no training)", what="test-time rule sweeps")
    t5 = time.perf_counter()
    # The naive states ARE stage 3's: same numbers, bitwise. A difference means a reused file came from other code
    # (or was edited): both stages are evaluated again for those runs, once; a difference after that is a bug.
    for attempt in (1, 2):
        bad = [i for i, (lp, ru) in enumerate(zip(loops, rules)) if ru["test_time_rules"]["downstream"]["naive"]
               != [lp["test_loops"][str(k)] for k in range(1, args.max_test_loops + 1)]]
        if not bad:
            break
        names = ", ".join(run_name(head_jobs[i]) for i in bad)
        if attempt == 2:
            raise AssertionError(f"stage 4's naive downstream differs from stage 3's after re-evaluating: {names}")
        print(f"stages 3 and 4 disagree on {names}: evaluating both again (a reused file from other code?)")
        for i in bad:
            for ext in (".loops.json", ".rules.json"):
                if os.path.exists(run_path(args, head_jobs[i], ext)):
                    os.remove(run_path(args, head_jobs[i], ext))
        redo = [head_jobs[i] for i in bad]
        lp2, _ = run_stage(loops_one, loops_finished, redo, args, "3/4 again", what="evaluations")
        ru2, _ = run_stage(rules_one, rules_finished, redo, args, "4/4 again", what="test-time rule sweeps")
        for i, a, b in zip(bad, lp2, ru2):
            loops[i], rules[i] = a, b
    runs = [dict(r, test_loops=lp["test_loops"], test_time_rules=ru["test_time_rules"])
            for r, lp, ru in zip(runs, loops, rules)]
    mark_degraded(sweep)
    mark_degraded(runs)
    order = lambda r: (OPTIMIZERS.index(r["optimizer"]), r["layers"], r["K"], r["lr"], VARIANTS.index(r["variant"]), r["seed"])
    strip = lambda r: {k: v for k, v in r.items() if k != "settings"}
    results = {"smoke_run": bool(args.quick), "note": SMOKE_NOTE if args.quick else "default protocol run",
               "config": {k: v for k, v in vars(args).items()},
               "optimizers": args.optimizers, "layers": args.layers, "loops": args.loops, "variants": args.variants,
               "tasks": list(TRAIN_TASKS), "lr_grid": grid, "statistic": STAT_NOTE,
               "collapse_rule": f"final loss > {COLLAPSE_FRACTION} x chance loss, or diverged",
               "degraded_rule": f"final loss > {DEGRADED_FACTOR} x best variant at the same (optimizer, L, K, lr, seed)",
               "headline_lr_rule": "per (optimizer, L, K): the lowest grid LR whose final loss averaged over all "
                                   f"variants (seed 0 sweep) is within {TIE_TOL:.0%} of the lowest such average",
               "provenance": tl.run_provenance(),
               "chance_exact_match": chance_exact_match(args),
               "headline": groups, "summary": summarise(runs, groups, args.variants),
               "test_time_rules_note": TTR_NOTE, "test_time_rules_summary": summarise_rules(runs, groups, args),
               "sweep": [strip(r) for r in sorted(sweep, key=order)], "runs": [strip(r) for r in sorted(runs, key=order)],
               "trained_now": n1 + n2, "evaluated_now": n3, "rule_sweeps_now": n4,
               "reused": len(sweep_jobs) + len(seed_jobs) - n1 - n2,
               "stage_seconds": {"train": t3 - t0, "test_loops": t4 - t3, "test_time_rules": t5 - t4},
               "train_seconds_sum": sum(r["seconds"] for r in sweep + more)}   # in the workers, whenever trained
    results["seconds"] = time.perf_counter() - t0
    return results


# --- figures --------------------------------------------------------------------------------------------------
COLORS = {"LT": "tab:red", "LT_i": "tab:orange", "LT_ia": "tab:purple", "FLT_res": "tab:brown", "FLT": "tab:blue"}


def _band(ax, xs, curves, color, label):
    """Mean line and min-max band over seeds."""
    n = min(len(c) for c in curves)
    Y = np.array([[np.nan if v is None else v for v in c[:n]] for c in curves], dtype=float)
    ax.plot(xs[:n], np.nanmean(Y, 0), color=color, label=f"{label} (n={len(curves)})")
    if len(curves) > 1:
        ax.fill_between(xs[:n], np.nanmin(Y, 0), np.nanmax(Y, 0), color=color, alpha=0.2)


def make_figures(results, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, NullFormatter
    opts, Ks, L0 = results["optimizers"], results["loops"], results["layers"][0]
    Kmax = max(Ks)
    head = {(g["optimizer"], g["layers"], g["K"]): g["lr"] for g in results["headline"]}
    runs_at = lambda o, L, K, v: [r for r in results["runs"] if (r["optimizer"], r["layers"], r["K"], r["variant"]) ==
                                  (o, L, K, v) and r["lr"] == head[(o, L, K)]]
    chance = results["runs"][0]["chance_loss"]
    smoke = " [SMOKE RUN: not results]" if results["smoke_run"] else ""
    files = []

    def grid(nrows, ncols, w=5.2, h=3.8, **kw):
        return plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False, **kw)

    def save(fig, name, title):
        fig.suptitle(title + smoke, fontsize=11)
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=100)
        plt.close(fig)
        files.append(name)

    def loss_lines(ax):
        ax.axhline(chance, ls="-", color="black", lw=0.8, label=f"chance ({chance:.2f}, uniform guessing)")
        ax.axhline(COLLAPSE_FRACTION * chance, ls="--", color="gray", label=f"collapse threshold ({COLLAPSE_FRACTION} x chance)")

    # 1: training loss vs step, rows: optimizer, columns: K
    fig, axes = grid(len(opts), len(Ks), sharey=True)
    for i, o in enumerate(opts):
        for j, K in enumerate(Ks):
            ax = axes[i][j]
            for v in results["variants"]:
                rs = runs_at(o, L0, K, v)
                if rs:
                    _band(ax, np.arange(len(rs[0]["loss_curve"])), [r["loss_curve"] for r in rs], COLORS[v], v)
            loss_lines(ax)
            ax.set(xlabel="step", ylabel="training loss (answer tokens)",
                   title=f"{OPT_LABEL[o]}, K = {K}, lr = {head[(o, L0, K)]:.3g}", ylim=(0, 1.3 * chance + 1.2))
            ax.legend(fontsize=6.5, loc="upper right", ncol=2)
    save(fig, "1_loss.png", f"Training loss, L = {L0} (line: mean over seeds; band: min-max over seeds)")

    # 2: hidden norm: over training (last loop) and per loop after training, at the largest K
    fig, axes = grid(len(opts), 2)
    for i, o in enumerate(opts):
        for v in results["variants"]:
            rs = runs_at(o, L0, Kmax, v)
            if rs:
                _band(axes[i][0], np.array(rs[0]["log_step"]), [[h[-1] for h in r["hidden_norm_curve"]] for r in rs],
                      COLORS[v], v)
                per_loop = np.array([r["final_hidden_norm"] for r in rs])
                axes[i][1].plot(np.arange(1, Kmax + 1), per_loop.mean(0), "o-", color=COLORS[v], label=v, ms=3)
        axes[i][0].set(xlabel="step", ylabel="hidden norm, end of last loop", yscale="log",
                       title=f"{OPT_LABEL[o]}: over training (K = {Kmax})")
        axes[i][1].set(xlabel="loop t", ylabel="hidden norm, end of loop t", yscale="log",
                       title=f"{OPT_LABEL[o]}: per loop after training (mean)")
        axes[i][1].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[i][0].legend(fontsize=7)
        axes[i][1].legend(fontsize=7)
    save(fig, "2_hidden_norm.png", f"Residual norm before the inter-loop norm, L = {L0}")

    # 3: gradients: total pre-clip norm over training; the authors' per-loop block-output gradient after training
    fig, axes = grid(len(opts), 2)
    for i, o in enumerate(opts):
        for v in results["variants"]:
            rs = runs_at(o, L0, Kmax, v)
            if rs:
                _band(axes[i][0], np.arange(len(rs[0]["grad_norm_curve"])), [r["grad_norm_curve"] for r in rs],
                      COLORS[v], v)
                if rs[0]["block_out_grad_norm_curve"]:
                    per_loop = np.array([block_grad_per_loop(r) for r in rs])
                    axes[i][1].plot(np.arange(1, Kmax + 1), per_loop.mean(0), "o-", color=COLORS[v], label=v, ms=3)
        axes[i][0].axhline(1.0, color="gray", ls=":", label="clip (1.0)")
        axes[i][0].set(xlabel="step", ylabel="gradient norm before clipping", yscale="log",
                       title=f"{OPT_LABEL[o]}: global gradient norm (K = {Kmax})")
        axes[i][1].set(xlabel="loop t", ylabel="||dL/d(block output)||, layers combined", yscale="log",
                       title=f"{OPT_LABEL[o]}: per loop, last 10% of steps (mean)")
        axes[i][1].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[i][0].legend(fontsize=7)
        axes[i][1].legend(fontsize=7)
    save(fig, "3_grad_norm.png", f"Gradients, L = {L0} (right: the authors' base_check.py diagnostic)")

    # 4: downstream average per variant at each K, one panel per optimizer
    fig, axes = grid(1, len(opts), w=6)
    w = 0.8 / len(Ks)
    shade = lambda i: 0.45 + 0.55 * i / max(1, len(Ks) - 1)
    for ax, o in zip(axes[0], opts):
        for i, K in enumerate(Ks):
            for j, v in enumerate(results["variants"]):
                accs = [r["downstream_avg"] for r in runs_at(o, L0, K, v)]
                if accs:
                    ax.bar(j + i * w, np.mean(accs), w, color=COLORS[v], alpha=shade(i), edgecolor="k")
                    ax.plot([j + i * w] * len(accs), accs, "k.", ms=4)
        for i, K in enumerate(Ks):                                         # legend proxies: shade = K
            ax.bar(0, 0, 0, color="gray", alpha=shade(i), edgecolor="k", label=f"trained at K = {K}")
        ax.plot([], [], "k.", ms=4, label="one seed")
        ax.axhline(results["chance_exact_match"], color="black", lw=0.8,
                   label=f"chance ({results['chance_exact_match']:.3f})")
        ax.set_xticks(np.arange(len(results["variants"])) + w * (len(Ks) - 1) / 2, results["variants"])
        ax.set(ylabel="downstream average (exact match)", ylim=(0, 1.15), title=f"{OPT_LABEL[o]} (bars: mean over seeds)")
        ax.legend(fontsize=7, loc="upper center", ncol=len(Ks) + 2)
    save(fig, "4_downstream.png", f"Downstream average at the headline LR, L = {L0}")

    # 5: test-time loops (stage 3), rows: optimizer, columns: K
    fig, axes = grid(len(opts), len(Ks))
    for i, o in enumerate(opts):
        for j, K in enumerate(Ks):
            ax = axes[i][j]
            for v in results["variants"]:
                rs = [r for r in runs_at(o, L0, K, v) if "test_loops" in r]
                if rs:
                    ks = sorted(int(k) for k in rs[0]["test_loops"])
                    _band(ax, np.array(ks), [[r["test_loops"][str(k)] for k in ks] for r in rs], COLORS[v], v)
            ax.axvline(K, color="gray", ls=":", label=f"trained at K = {K}")
            ax.axhline(results["chance_exact_match"], color="black", lw=0.8, label="chance")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set(xlabel="loops at test time", ylabel="downstream average", ylim=(0, 1),
                   title=f"{OPT_LABEL[o]}, trained at K = {K}")
            ax.legend(fontsize=7)
    save(fig, "5_test_time_loops.png", f"Saved models run at other loop counts, L = {L0} (mean; band min-max)")

    # 6: LR sweep, rows: optimizer, columns: K
    fig, axes = grid(len(opts), len(Ks))
    for i, o in enumerate(opts):
        for j, K in enumerate(Ks):
            ax = axes[i][j]
            sw = [r for r in results["sweep"] if (r["optimizer"], r["layers"], r["K"]) == (o, L0, K)]
            for v in results["variants"]:
                rs = sorted([r for r in sw if r["variant"] == v], key=lambda r: r["lr"])
                ax.plot([r["lr"] for r in rs], [r["final_loss"] for r in rs], "o-", color=COLORS[v], label=v)
            bad = [r for r in sw if r["collapsed"]]
            ax.plot([r["lr"] for r in bad], [r["final_loss"] for r in bad], "x", color="k", ms=10, label="collapsed")
            loss_lines(ax)
            ax.axvline(head[(o, L0, K)], color="green", ls=":", label="headline LR (rule)")
            ax.set_xscale("log")
            lrs = sorted({r["lr"] for r in sw})
            ax.set_xticks(lrs, [f"{x:.3g}" for x in lrs])
            ax.set_xlim(min(lrs) / 1.5, max(lrs) * 1.5)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set(xlabel="learning rate" + (" (Muon's; AdamW groups scale with it)" if o == "muon" else ""),
                   ylabel="final training loss", title=f"{OPT_LABEL[o]}, K = {K} (seed 0)", ylim=(0, None))
            ax.legend(fontsize=6, loc="best", framealpha=0.8)
    save(fig, "6_lr_sweep.png", f"LR sweep, L = {L0}")

    # 7: depth, if more than one L: downstream average at the headline LR per variant, L on the x axis
    if len(results["layers"]) > 1:
        fig, axes = grid(len(opts), len(Ks))
        Ls = results["layers"]
        for i, o in enumerate(opts):
            for j, K in enumerate(Ks):
                ax = axes[i][j]
                for v in results["variants"]:
                    ys = [[r["downstream_avg"] for r in runs_at(o, L, K, v)] for L in Ls]
                    if all(ys):
                        ax.plot(Ls, [np.mean(y) for y in ys], "o-", color=COLORS[v], label=v)
                        for L, y in zip(Ls, ys):
                            ax.plot([L] * len(y), y, ".", color=COLORS[v], ms=3)
                ax.axhline(results["chance_exact_match"], color="black", lw=0.8, label="chance")
                ax.set_xticks(Ls)
                ax.set(xlabel="layers L in the looped stack", ylabel="downstream average", ylim=(0, 1),
                       title=f"{OPT_LABEL[o]}, K = {K} (each L at its headline LR)")
                ax.legend(fontsize=7, loc="lower left")
        save(fig, "7_depth.png", "Depth (line: mean over seeds; dots: seeds)")

    # 8: test-time rules (stage 4), rows: (optimizer, K), columns: variants + the loop map's eigenvalues
    rows = [(o, K) for o in opts for K in Ks]
    variants = results["variants"]
    ttr = {(s["optimizer"], s["K"], s["variant"]): s for s in results["test_time_rules_summary"] if s["layers"] == L0}
    fig, axes = grid(len(rows), len(variants) + 1, w=3.4, h=2.7)
    styles = {"naive": ("tab:red", "o-"), "damped": ("tab:green", "s-"), "rk": ("tab:blue", "^-")}
    for i, (o, K) in enumerate(rows):
        for j, v in enumerate(variants):
            ax, s = axes[i][j], ttr.get((o, K, v))
            if s is None:
                ax.axis("off")
                continue
            for rule, d in s["rules"].items():
                col, st = styles[rule]
                ks, m, sd = np.arange(1, len(d["downstream_mean"]) + 1), np.array(d["downstream_mean"]), np.array(d["downstream_sd"])
                ax.plot(ks, m, st, color=col, ms=3, lw=1, label=rule)
                ax.fill_between(ks, m - sd, m + sd, color=col, alpha=0.15)
            ax.axvline(K, color="gray", ls=":", lw=1)
            ax.axhline(results["chance_exact_match"], color="black", lw=0.6)
            k_max = len(s["rules"]["naive"]["downstream_mean"])
            ax.set_xlim(min(max(1, K - 2), k_max) - 0.5, k_max + 0.5)
            ax.set_ylim(0, 1)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{v}: {OPT_LABEL[o]}, K = {K} (n={s['n_seeds']})", fontsize=8)
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.set_ylabel("downstream average", fontsize=8)
                ax.legend(fontsize=6.5, loc="lower left")
            if i == len(rows) - 1:
                ax.set_xlabel("loops at test time K'", fontsize=8)
        ax = axes[i][-1]                                                # eigenvalues, one dot per seed
        for j, v in enumerate(variants):
            sp = (ttr.get((o, K, v)) or {}).get("spectrum")
            if not sp:
                continue
            for key, state, mk, col, lab in (("dominant", "trained", "o", "k", "dominant lambda (Re), at h_K"),
                                             ("most_negative", "trained", "v", "tab:purple", "most negative Re lambda, at h_K"),
                                             ("dominant", "damped", "s", "tab:green", "dominant lambda (Re), damped state")):
                ys = [z[0] for z in sp[state][key]]
                ax.plot(j + {"o": -0.15, "v": 0.0, "s": 0.15}[mk] + np.zeros(len(ys)), ys, mk, color=col, ms=4,
                        mfc="none" if state == "damped" else col, label=lab if j == 0 else None)
        for y in (-1, 1):
            ax.axhline(y, color="gray", ls="--", lw=0.8)
        ax.set_xticks(range(len(variants)), variants, fontsize=7, rotation=30)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylabel("Re lambda (loop map's Jacobian)", fontsize=8)
        ax.set_title(f"loop map eigenvalues, {OPT_LABEL[o]}, K = {K}", fontsize=8)
        if i == 0:
            ax.legend(fontsize=6, loc="best")
    save(fig, "8_test_time_rules.png", f"Saved models looped past their trained K by [TFL]'s rules, L = {L0} "
         f"(s = {RULE_S}, beta = {RULE_BETA}; line: mean over seeds, band: ± sd; dotted: trained K; black: chance; "
         "right: one dot per seed)")
    return files


# --- printed summary --------------------------------------------------------------------------------------------
def summary(results):
    lines = [f"statistic: {STAT_NOTE}; collapse: {results['collapse_rule']}"]
    for g in results["headline"]:
        o, L, K, lr = g["optimizer"], g["layers"], g["K"], g["lr"]
        lines.append(f"{OPT_LABEL[o]}, L = {L}, K = {K}: headline lr = {lr:.3g}")
        lines.append(f"  {'variant':8s} {'final loss':>15s} {'collapsed':>9s} {'downstream avg':>16s} "
                     f"{'last-loop norm':>14s}")
        for s in results["summary"]:
            if (s["optimizer"], s["layers"], s["K"]) == (o, L, K):
                lines.append(f"  {s['variant']:8s} {s['final_loss_mean']:8.3f} ±{s['final_loss_sd']:5.3f} "
                             f"{s['collapsed']:5d}/{s['n_seeds']:<3d} {s['downstream_mean']:9.3f} ±{s['downstream_sd']:5.3f} "
                             f"{s['last_loop_norm_mean']:14.1f}")
        sw = sorted([r for r in results["sweep"] if (r["optimizer"], r["layers"], r["K"]) == (o, L, K)],
                    key=lambda r: r["lr"])
        parts = [f"{v} {[r['lr'] for r in sw if r['variant'] == v and r['collapsed']] or 'none'}"
                 for v in results["variants"]]
        lines.append("  LR sweep (seed 0), collapsed at: " + ", ".join(parts))
    rows = results.get("test_time_rules_summary", [])
    if rows:
        lines.append(f"Test-time rules (stage 4, saved models; s = {RULE_S}, beta = {RULE_BETA}): past = mean over "
                     "K' > K, gap = even K' minus odd K' (past K); mean over seeds, ± sd")
    for g in results["headline"]:
        o, L, K = g["optimizer"], g["layers"], g["K"]
        grp = [s for s in rows if (s["optimizer"], s["layers"], s["K"]) == (o, L, K)]
        if not grp:
            continue
        Ks = list(range(1, len(grp[0]["rules"]["naive"]["downstream_mean"]) + 1))
        show = [i for i, k in enumerate(Ks) if k >= min(K, Ks[-1])]
        fmt = lambda m, s: "    -" if m is None else f"{m:5.2f} ±{s:4.2f}"
        lines.append(f"{OPT_LABEL[o]}, L = {L}, trained at K = {K}: downstream average at K' = {Ks[show[0]]}..{Ks[-1]}")
        lines.append(f"  {'variant':8s} {'rule':6s} " + " ".join(f"{Ks[i]:>4d}" for i in show) +
                     f"  {'past':>10s}  {'gap':>10s}")
        for s in grp:
            for rule, d in s["rules"].items():
                lines.append(f"  {s['variant']:8s} {rule:6s} " + " ".join(f"{d['downstream_mean'][i]:4.2f}" for i in show)
                             + f"  {fmt(d['past_mean'], d['past_sd']):>10s}  {fmt(d['even_odd_gap_mean'], d['even_odd_gap_sd']):>10s}")
        if all("spectrum" in s for s in grp):
            tr, dm = grp[0]["spectrum"]["trained"], grp[0]["spectrum"]["damped"]
            lines.append(f"  loop map's eigenvalues lambda (scored tokens), at h_{tr['K']} and at the damped state "
                         f"K' = {dm['K']}; naive |h_K - h_K-1| / |h_K - h_K-2| at K' = {Ks[-1]} (RMS per token)")
            lines.append(f"  {'variant':8s} {'naive step 1/2':>14s}  {'dominant lambda at h_K, per seed':34s} "
                         f"{'max|lam|':>11s} {'min Re lam':>11s} {'Re<-1':>5s}  {'damped: residual':>16s} "
                         f"{'max|lam|':>11s} {'radius':>11s}")
            c = lambda z: f"{z[0]:+.2f}" + (f"{z[1]:+.2f}i" if abs(z[1]) > 5e-4 else "")
            for s in grp:
                tr, dm = s["spectrum"]["trained"], s["spectrum"]["damped"]
                p2 = ("-" if s["period2_step2_mean"] is None else
                      f"{s['period2_step1_mean']:.3f}/{s['period2_step2_mean']:.3f}")
                res = f"{dm['residual_mean']:.3f} ±{dm['residual_sd']:.3f}"
                lines.append(f"  {s['variant']:8s} {p2:>14s}  {', '.join(c(z) for z in tr['dominant']):34s} "
                             f"{fmt(tr['dominant_abs_mean'], tr['dominant_abs_sd']):>11s} "
                             f"{fmt(tr['most_negative_re_mean'], tr['most_negative_re_sd']):>11s} "
                             f"{tr['frac_flip_mean']:5.1%}  {res:>16s} "
                             f"{fmt(dm['dominant_abs_mean'], dm['dominant_abs_sd']):>11s} "
                             f"{fmt(dm['damped_radius_mean'], dm['damped_radius_sd']):>11s}")
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run (~15 s on 2 cores): its numbers are not results")
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), help="muon (Muon + AdamW, the paper's) and/or adam")
    p.add_argument("--layers", type=int, nargs="+", default=[2], help="L, layers in the looped stack (a sweep axis)")
    p.add_argument("--loops", type=int, nargs="+", default=[4, 12], help="training loop counts K")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help="subset of " + " ".join(VARIANTS))
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant at the headline LR")
    p.add_argument("--muon-lrs", type=float, nargs="+", default=[0.02 / 3, 0.02, 0.06],
                   help="LR grid for Muon + AdamW (Muon's lr; 0.02 is the authors')")
    p.add_argument("--adam-lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2], help="LR grid for one Adam")
    p.add_argument("--steps", type=int, default=300, help="training steps per run")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--d-model", type=int, default=48)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--n", type=int, default=6, help="task input length")
    p.add_argument("--seq-len", type=int, default=20)
    p.add_argument("--eval-examples", type=int, default=1000)
    p.add_argument("--loop-eval-examples", type=int, default=300)
    p.add_argument("--max-test-loops", type=int, default=16)
    p.add_argument("--spectrum-examples", type=int, default=16,
                   help="stage 4: sequences whose loop-map eigenvalues are computed (0: none)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--workers", type=int, default=2, help="parallel processes (one BLAS thread each)")
    p.add_argument("--fresh", action="store_true", help="retrain every run instead of reusing finished ones")
    p.add_argument("--out", default=None, help="output folder (default out/train_toy, or out/train_toy_quick)")
    if p.parse_args(argv).quick:          # --quick changes the defaults; flags given explicitly still win
        p.set_defaults(loops=[2, 3], seeds=2, muon_lrs=[0.02, 0.06], adam_lrs=[3e-3, 3e-2], steps=20, d_model=32,
                       eval_examples=100, loop_eval_examples=50, max_test_loops=5,
                       spectrum_examples=2)
    args = p.parse_args(argv)
    args.out = args.out or ("out/train_toy_quick" if args.quick else "out/train_toy")
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {VARIANTS}")
    bad = [o for o in args.optimizers if o not in OPTIMIZERS]
    if bad:
        p.error(f"--optimizers: unknown {bad}; choose from {OPTIMIZERS}")
    for name in ("seeds", "steps", "batch", "d_model", "heads", "n", "seq_len", "eval_examples",
                 "loop_eval_examples", "max_test_loops", "workers", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.spectrum_examples < 0:
        p.error("--spectrum-examples must be >= 0")
    if any(k < 1 for k in args.loops):
        p.error("--loops: every K must be >= 1")
    if any(L < 1 for L in args.layers):
        p.error("--layers: every L must be >= 1")
    if any(lr <= 0 for lr in args.muon_lrs + args.adam_lrs):
        p.error("--muon-lrs / --adam-lrs: learning rates must be positive")
    if args.d_model % args.heads:
        p.error(f"--d-model {args.d_model} is not divisible by --heads {args.heads}")
    need = max(tl.example_length(t, args.n) for t in TRAIN_TASKS) - 1
    if args.seq_len < need:
        p.error(f"--seq-len must be >= {need} for --n {args.n}")
    args.variants = [v for v in VARIANTS if v in args.variants]
    args.optimizers = [o for o in OPTIMIZERS if o in args.optimizers]
    args.layers, args.loops = sorted(set(args.layers)), sorted(set(args.loops))
    return args


def main(argv=None):
    args = parse_args(argv)
    tqdm.set_lock(threading.RLock())       # a thread lock: tqdm's default multiprocessing lock leaks a semaphore
    if args.quick:
        print(SMOKE_NOTE, flush=True)
    os.makedirs(os.path.join(args.out, "models"), exist_ok=True)
    try:
        results = run_protocol(args)
    except KeyboardInterrupt:
        n = len([f for f in os.listdir(os.path.join(args.out, "models")) if f.endswith(".json")
                 and not f.endswith((".loops.json", ".rules.json"))])
        print(f"interrupted: {n} finished runs are saved in {os.path.join(args.out, 'models')}; run the same "
              "command again to resume", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    tl.write_json(os.path.join(args.out, "results.json"), results)
    files = make_figures(results, args.out)
    print(summary(results))
    print(f"wrote {os.path.join(args.out, 'results.json')} and {', '.join(files)} in {results['seconds']:.0f} s "
          f"(trained {results['trained_now']} runs now, reused {results['reused']})")
    if args.quick:
        print(SMOKE_NOTE)
    return results


if __name__ == "__main__":
    main()
