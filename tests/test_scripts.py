"""Smoke tests of the two experiment scripts: `--quick` end to end into a temporary folder (CI runs these).

They check what a user relies on: the run finishes, results.json parses and holds finite numbers for every
setting, every figure is written, and the documented invariants hold in the output (K = 1 rows are exactly
zero deltas; a second run with the same seed reuses the cached model and gives the same numbers)."""
import json
import math
import os
import subprocess
import sys

import tinyloop as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, out, *extra):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, os.path.join(ROOT, script), "--quick", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f), proc.stdout


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_train_toy_quick(tmp_path):
    res, out = run("train_toy.py", tmp_path)
    assert "headline lr" in out
    for r in res["sweep"] + res["runs"]:
        assert r["status"] in ("ok", "diverged")
        assert isinstance(r["collapsed"], bool) and isinstance(r["degraded"], bool)
        assert finite(r["final_loss"]) or r["status"] == "diverged"
    assert {r["variant"] for r in res["runs"]} == set(res["variants"])
    assert all("test_loops" in r for r in res["runs"])
    for name in ("1_loss.png", "2_hidden_norm.png", "3_grad_norm.png", "4_downstream.png",
                 "5_test_time_loops.png", "6_lr_sweep.png"):
        assert os.path.getsize(tmp_path / name) > 10_000


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
                            start_new_session=True)
    time.sleep(6)                                     # spawning the pool and training: well inside the run
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err and "semaphore" not in err, err[-2000:]
