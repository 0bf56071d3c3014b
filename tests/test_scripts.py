"""Smoke tests of the two experiment scripts: `--quick` end to end into a temporary folder (CI runs these).

They check what a user relies on: the run finishes, results.json parses and holds finite numbers for every
setting, every figure is written, and the documented invariants hold in the output (K = 1 rows are exactly
zero deltas; a second run with the same seed reuses the cached model and gives the same numbers)."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import tinyloop as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, out, *extra):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, os.path.join(ROOT, script), "--quick", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f), proc.stdout


def _sigint_default():
    """In the child: Ctrl-C raises KeyboardInterrupt even when pytest was started with SIGINT ignored (a background
    job of a non-interactive shell, nohup): Python installs its handler only if SIGINT is not ignored at startup."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def run_train_toy(out, *extra, quick=True):
    """train_toy.py in a subprocess with warnings ON (a leaked-semaphore warning must not appear)."""
    cmd = [sys.executable, os.path.join(ROOT, "train_toy.py"), *(["--quick"] if quick else []), "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "leaked" not in proc.stderr, proc.stderr[-3000:]
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f), proc.stdout


def test_train_toy_quick(tmp_path):
    res, out = run_train_toy(tmp_path)
    assert "headline lr" in out and "SMOKE RUN" in out and "not results" in out
    assert res["smoke_run"] is True and "not results" in res["note"]
    assert res["optimizers"] == ["muon", "adam"]
    for r in res["sweep"] + res["runs"]:
        assert r["status"] in ("ok", "diverged")
        assert isinstance(r["collapsed"], bool) and isinstance(r["degraded"], bool)
        assert finite(r["final_loss"]) or r["status"] == "diverged"
        assert r["block_out_grad_norm_curve"] and len(r["block_out_grad_norm_curve"][0]) == r["K"]
    for o in ("muon", "adam"):                        # the ablation has the same protocol: same cells, same seeds
        assert {(r["variant"], r["K"], r["seed"]) for r in res["runs"] if r["optimizer"] == o} == {
            (v, K, s) for v in res["variants"] for K in res["loops"] for s in range(res["config"]["seeds"])}
    assert all("test_loops" in r for r in res["runs"])
    assert len(res["summary"]) == 2 * len(res["loops"]) * len(res["variants"])
    for name in ("1_loss.png", "2_hidden_norm.png", "3_grad_norm.png", "4_downstream.png",
                 "5_test_time_loops.png", "6_lr_sweep.png", "8_test_time_rules.png"):
        assert os.path.getsize(tmp_path / name) > 10_000
    # stage 4: the test-time rules on the saved models; naive IS stage 3 (the same states), bitwise
    Kmax = res["config"]["max_test_loops"]
    for r in res["runs"]:
        tr = r["test_time_rules"]
        assert tr["K"] == list(range(1, Kmax + 1)) and set(tr["downstream"]) == set(tl.TEST_TIME_RULES)
        assert tr["downstream"]["naive"] == [r["test_loops"][str(k)] for k in tr["K"]]
        for rule, acc in tr["downstream"].items():
            assert all(0 <= a <= 1 for a in acc)
            assert acc[:r["K"]] == tr["downstream"]["naive"][:r["K"]]        # up to K_train every rule is the model
        for state in ("trained", "damped"):
            sp = tr["spectrum"][state]
            assert all(finite(x) for x in sp["dominant"] + sp["most_negative"] + [sp["residual"], sp["damped_radius"]])
    rows = res["test_time_rules_summary"]
    assert len(rows) == 2 * len(res["loops"]) * len(res["variants"])
    assert all(len(d["downstream_mean"]) == Kmax for s in rows for d in s["rules"].values())
    assert "Test-time rules (stage 4" in out
    # a rerun trains nothing and redoes no evaluation: every stage reuses its saved results, same numbers
    again, out = run_train_toy(tmp_path)
    n = len(res["runs"])
    assert f"reusing {n} of {n} finished test-time rule sweeps" in out and f"reusing {n} of {n} finished evaluations" in out
    assert again["trained_now"] == again["evaluated_now"] == again["rule_sweeps_now"] == 0
    assert again["runs"] == res["runs"] and again["test_time_rules_summary"] == rows
    # a reused stage-3 file that disagrees with stage 4 (edited, or written by other code) is evaluated again
    f = sorted((tmp_path / "models").glob("*.loops.json"))[0]
    rec = json.loads(f.read_text())
    rec["test_loops"]["1"] += 0.02
    f.write_text(json.dumps(rec))
    fixed, out = run_train_toy(tmp_path)
    assert "evaluating both again" in out and fixed["runs"] == res["runs"]


def test_train_toy_one_variant_prints_only_what_ran_and_the_depth_axis(tmp_path):
    res, out = run_train_toy(tmp_path, "--variants", "FLT", "--optimizers", "muon", "--layers", "1", "2",
                             "--loops", "2", "--muon-lrs", "0.02", "--steps", "5", "--workers", "1")
    lines = [line.split("collapsed at:")[1] for line in out.splitlines() if "collapsed at:" in line]
    assert len(lines) == 2 and all(re.findall(r"\b[A-Za-z_]+(?= \[|\b none)", x) == ["FLT"] for x in lines), lines
    assert {(r["layers"], r["variant"]) for r in res["runs"]} == {(1, "FLT"), (2, "FLT")}
    assert os.path.getsize(tmp_path / "7_depth.png") > 10_000


def _comparable(res):
    """results.json without what depends on when and how the run happened (timings, what was reused, folder)."""
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    return {"sweep": [drop(r) for r in res["sweep"]], "runs": [drop(r) for r in res["runs"]],
            "summary": res["summary"], "headline": res["headline"]}


def test_train_toy_resumes_after_ctrl_c_without_retraining(tmp_path):
    """SIGINT (Ctrl-C: to the whole process group) after the first finished run: one line, exit 130, no traceback;
    the rerun reuses that run (its files untouched) and ends with the same results as an uninterrupted run."""
    args = ["--optimizers", "muon", "--variants", "LT", "FLT", "--loops", "2", "--muon-lrs", "0.02", "--steps", "10",
            "--workers", "1"]
    cmd = [sys.executable, os.path.join(ROOT, "train_toy.py"), "--quick", "--out", str(tmp_path / "a"), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_sigint_default)
    models = tmp_path / "a" / "models"
    deadline = time.time() + 300
    while not (models.exists() and any(f.suffix == ".json" for f in models.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "no run finished"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    said = [line for line in (out + err).replace("\r", "\n").splitlines() if "interrupted" in line]
    assert len(said) == 1 and "run the same command again" in said[0]
    first = {f.name: f.stat().st_mtime_ns for f in models.iterdir()}
    assert len([n for n in first if n.endswith(".json")]) == 1
    res, out = run_train_toy(tmp_path / "a", *args)
    assert "reusing 1 of 2 finished runs" in out
    assert all((models / n).stat().st_mtime_ns == t for n, t in first.items())      # not retrained
    again, _ = run_train_toy(tmp_path / "b", *args)                                    # uninterrupted
    assert _comparable(res) == _comparable(again)
    assert res["trained_now"] == 3 and again["trained_now"] == 4


def test_retrofit_toy_quick_and_cached_rerun(tmp_path):
    res, out = run("retrofit_toy.py", tmp_path)
    assert res["trained_now"]
    assert res["smoke_run"] is True and "NOT results" in res["note"]                  # said in the json ...
    assert out.startswith("SMOKE RUN") and out.rstrip().endswith(res["note"])        # ... and on screen, twice
    labels = [r["label"] for r in res["ablation"]]
    assert len(labels) == len(tl.ALL_METHODS) + 3 and labels[-1].startswith("rk, per_layer mode")
    assert all(finite(r["d_loss"]) and finite(r["d_acc_sd"]) for r in res["ablation"])
    halt = [r for r in res["ablation"] if r["halt_tau"] is not None]
    assert len(halt) == 1 and 1 <= halt[0]["steps_min"] <= halt[0]["steps_max"] <= halt[0]["K"]
    for r in res["method_K"]:
        assert all(finite(r[k]) for k in ("d_acc", "d_acc_sd", "d_loss", "d_loss_sd"))
        if r["K"] == 1 and r["method"] in ("naive", "euler", "rk"):
            assert r["d_acc"] == 0.0 and r["d_loss"] == 0.0           # K = 1 is the frozen model, bitwise
    moe = [r for r in res["moe"] if r["mode"] == "layer" and r["routing"] == "freeze"]
    assert moe and all(r["routing_change_last"] == 0.0 for r in moe)
    assert any(r.get("routing_change_last", 0) > 0 for r in res["moe"] if r["routing"] == "thrash")
    assert len(res["generation"]) == 1 + 9
    rows = res["cost"]["rows"]
    assert rows[0]["predicted_overhead"] == 0 and rows[-1]["predicted_overhead"] > rows[1]["predicted_overhead"]
    for name in ("1_step_size.png", "2_delta_vs_K.png", "3_window_heatmap.png", "4_width.png",
                 "5_block_vs_layer.png", "6_moe.png", "7_cache_decode.png", "8_overhead.png", "9_rules.png"):
        assert os.path.getsize(tmp_path / name) > 10_000
    # the second run reuses the saved models and reproduces every number (timings aside)
    again, _ = run("retrofit_toy.py", tmp_path, "--workers", "1")
    assert not again["trained_now"]
    for key in ("baseline", "method_K", "heatmap", "width", "mode", "moe", "ablation"):
        assert again[key] == res[key], key
    assert [g["exact_match"] for g in again["generation"]] == [g["exact_match"] for g in res["generation"]]


def test_bad_arguments_fail_early_naming_the_argument(tmp_path):
    for script, args, name in [("train_toy.py", ["--loops", "0"], "--loops"),
                               ("train_toy.py", ["--d-model", "30", "--heads", "4"], "--d-model"),
                               ("train_toy.py", ["--variants", "XL"], "--variants"),
                               ("retrofit_toy.py", ["--layers", "3"], "--layers"),
                               ("retrofit_toy.py", ["--Ks", "0"], "--Ks"),
                               ("retrofit_toy.py", ["--top-k", "5"], "--top-k"),
                               ("retrofit_toy.py", ["--window", "3", "4"], "--window"),
                               ("retrofit_toy.py", ["--K", "2", "--method", "ema"], "--K, --method")]:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args, "--out", str(tmp_path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and name in proc.stderr, (script, args, proc.stderr[-500:])


def test_retrofit_rejects_a_corrupt_cached_model_and_retrains(tmp_path):
    os.makedirs(tmp_path / "models")
    (tmp_path / "models" / "dense.npz").write_bytes(b"not a checkpoint")
    res, out = run("retrofit_toy.py", tmp_path, "--layers", "4", "--d-model", "16", "--heads", "2", "--steps", "5",
                   "--Ks", "1", "--heat-Ks", "1", "--widths", "4", "--mode-Ks", "1", "--moe-Ks", "1", "--K-main", "2",
                   "--gen-examples", "2", "--cost-tokens", "2", "--workers", "1")
    assert "ignoring cached model" in out and res["trained_now"]


def test_retrofit_ctrl_c_exits_with_one_line(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) during the worker pool: exit status 130,
    one line on stderr, no traceback from the main process or the workers, no leaked-semaphore warning."""
    import signal
    import time
    cmd = [sys.executable, os.path.join(ROOT, "retrofit_toy.py"), "--quick", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_sigint_default)
    time.sleep(6)                                     # spawning the pool and training: well inside the run
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err and "semaphore" not in err, err[-2000:]
