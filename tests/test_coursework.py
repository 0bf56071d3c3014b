"""The coursework (coursework/, docs/coursework.md): the solutions pass the grader, the blanks are reported as not
done (never a crash), and known-wrong answers are caught with the message they should get."""
import ast
import inspect
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import tinyloop as tl
from coursework import exercises, grade, solutions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "03_integrators_exercises.ipynb")
NAMES = list(grade.EXERCISES)
S = solutions


# ------------------------------------------------------------------------------------------------------------
# The set, the blanks, the solutions
# ------------------------------------------------------------------------------------------------------------
def test_the_set_covers_both_papers():
    assert len(NAMES) >= 15
    sources = " ".join(ex.source for ex in grade.EXERCISES.values())
    assert sources.count("[FLT]") >= 5 and sources.count("[TFL]") >= 5
    for nb in ("notebook 01", "notebook 02", "notebook 03", "notebook 04"):
        assert nb in sources, nb


def test_exercises_and_solutions_define_the_same_functions():
    blank = {n: f for n, f in inspect.getmembers(exercises, inspect.isfunction) if f.__module__ == exercises.__name__}
    sol = {n: f for n, f in inspect.getmembers(solutions, inspect.isfunction) if f.__module__ == solutions.__name__}
    assert set(blank) == set(NAMES), "every exercise has a blank, every blank a check"
    assert set(NAMES) <= set(sol)
    for n in NAMES:
        assert inspect.signature(blank[n]) == inspect.signature(sol[n]), n
        assert blank[n].__doc__ and len(blank[n].__doc__) > 80, f"{n}: the statement is the docstring"
        assert sol[n].__doc__ == blank[n].__doc__, n


def _only_blanks(tree, where):
    """Every function in `tree` is a docstring and `raise NotImplementedError(...)`, nothing else."""
    funcs = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
    for f in funcs:
        body = f.body[1:] if isinstance(f.body[0], ast.Expr) and isinstance(f.body[0].value, ast.Constant) else f.body
        assert len(body) == 1 and isinstance(body[0], ast.Raise), f"{where}: {f.name} holds more than a blank"
        exc = body[0].exc
        assert (exc.func.id if isinstance(exc, ast.Call) else exc.id) == "NotImplementedError", f.name
    return [f.name for f in funcs]


def test_the_student_file_holds_only_blanks():
    with open(exercises.__file__) as f:
        names = _only_blanks(ast.parse(f.read()), "exercises.py")
    assert sorted(names) == sorted(NAMES)


def test_notebook_03_holds_only_blanks_that_call_the_grader():
    with open(NOTEBOOK) as f:
        nb = json.load(f)
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    text = "\n".join(code)
    assert "SOLUTIONS" not in text and "solutions" not in text.replace("coursework/solutions.py", "")
    defs = []
    for src in code:
        tree = ast.parse(src)
        if any(isinstance(n, ast.FunctionDef) and n.name in NAMES for n in tree.body):
            defs += _only_blanks(tree, "notebook 03")
    assert set(defs) == {"heun_step", "anchored_tableau", "predict_K1", "frozen_at_K1", "depth_fraction",
                         "best_window", "layer_evals_per_token", "generation_evals"}
    for name in defs:
        assert f'check("{name}", {name})' in text, name


def test_the_solutions_pass():
    results = grade.grade_namespace(solutions)
    assert [r.name for r in results if not r.ok] == [], "\n".join(r.message for r in results if not r.ok)
    for r in results:
        n = int(r.message.split("(")[1].split()[0])
        assert n >= 2 or r.name == "frozen_at_K1", f"{r.name}: checked on {n} input(s) only"


def test_the_blanks_are_not_done_and_do_not_crash():
    for r in grade.grade_namespace(exercises):
        assert r.status == "not done" and r.message == f"{r.name}: not done yet", r.message


def test_the_notebook_blanks_grade_as_not_done():
    ns = grade.load_file(NOTEBOOK)
    names = [n for n in NAMES if n in ns]
    assert len(names) == 8
    assert {r.status for r in grade.grade_namespace(ns, names)} == {"not done"}


def test_the_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    run = lambda *a: subprocess.run([sys.executable, "-m", "coursework.grade", *a], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=120)
    blank = run(os.path.join("coursework", "exercises.py"))
    assert blank.returncode == 1 and "Traceback" not in blank.stdout + blank.stderr
    assert blank.stdout.count(": not done yet") == len(NAMES)
    assert f"{len(NAMES)} exercises: 0 ok, 0 wrong, 0 errors, {len(NAMES)} not done yet" in blank.stdout
    assert run("--solutions").returncode == 0
    nb = run(NOTEBOOK)
    assert nb.stdout.count(": not done yet") == 8 and "missing" not in nb.stdout
    # a student's copy with one exercise done wrong, one done right, one raising
    src = open(exercises.__file__).read()
    src = src.replace('raise NotImplementedError("depth_fraction")', "return (a + b) / 2 / (n_layers - 1)")
    src = src.replace('raise NotImplementedError("layer_evals_per_token")',
                      "return n_layers if not looped else n_layers + (K - 1) * n_window + n_window * stash")
    src = src.replace('raise NotImplementedError("moe_route")', "return u[0, 0, router]")
    mine = tmp_path / "my_answers.py"
    mine.write_text(src)
    out = run(str(mine))
    assert out.returncode == 1 and "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr
    assert "ok      layer_evals_per_token: ok" in out.stdout
    assert "WRONG   depth_fraction" in out.stdout and "not N - 1" in out.stdout
    assert "ERROR   moe_route" in out.stdout and "IndexError" in out.stdout and "line " in out.stdout
    assert "1 ok, 1 wrong, 1 errors" in out.stdout
    only = run(str(mine), "-k", "depth")
    assert only.stdout.count("\n") < 12 and "depth_fraction" in only.stdout
    broken = tmp_path / "broken.py"
    broken.write_text("def heun_step(F, x, h):\n    return x +\n")
    out = run(str(broken))
    assert out.returncode == 2 and "SyntaxError" in out.stderr and "line 2" in out.stderr


def test_errors_and_not_done_inside_helpers():
    def boom(n_layers, n_window, K, looped=True, stash=True):
        if n_window < 2:
            return S.layer_evals_per_token(n_layers, n_window, K, looped, stash)
        return [1, 2][n_window]                       # IndexError for n_window >= 2

    r = grade.run_check("layer_evals_per_token", boom)
    assert r.status == "error" and "IndexError" in r.message
    assert "n_layers = 2, n_window = 2, K = 1, looped = True, stash = True" in r.message
    assert "return [1, 2][n_window]" in r.message and "Traceback" not in r.message

    def gen(n_layers, n_window, K, prompt_len, n_new, decode, first_n=0, cache="first"):
        return prompt_len * exercises.layer_evals_per_token(n_layers, n_window, K)

    r = grade.run_check("generation_evals", gen)
    assert r.status == "not done"          # the helper it calls is still a blank: not a crash, not "wrong"
    assert r.message == "generation_evals: not done yet (NotImplementedError raised in layer_evals_per_token)"
    assert grade.run_check("heun_step", None).status == "missing"


def test_a_value_that_breaks_the_comparison_is_reported():
    r = grade.run_check("attention", lambda *a: "not an array")
    assert r.status == "wrong" and "got:" in r.message and "'not an array'" in r.message
    r = grade.run_check("loop_count_sweep", lambda params, cfg, batch, variant, Ks: [0.0] * len(Ks))
    assert r.status == "wrong" and "a dict with keys" in r.message


def test_the_per_layer_reference_is_tinyloops_plain_layer_mode():
    """The grader's per_layer reference (block mode one layer at a time) is tl.loop_window's plain per-layer mode.
    If section 8 renames that mode, change references.PER_LAYER_MODE (the grader itself does not use it)."""
    from coursework import references as ref
    params, cfg = grade._toy(5, seed=7)
    layers = ref.frozen_layers(params, cfg)
    x = ref.stem(params, cfg, grade._tokens(7, 2, 5))
    for a, b, K, method in [(1, 3, 2, "rk"), (0, 4, 3, "euler"), (2, 3, 2, "naive")]:
        mine = ref.loop_window(layers, x, a, b, K, method, 0.25, "per_layer")
        theirs = tl.loop_window(layers, x, a, b, K=K, method=method, mode=ref.PER_LAYER_MODE, beta=0.25)
        np.testing.assert_allclose(mine, theirs, rtol=1e-12, atol=1e-12)
        assert not np.allclose(mine, ref.loop_window(layers, x, a, b, K, method, 0.25, "block"))


# ------------------------------------------------------------------------------------------------------------
# Known-wrong answers: each is caught, with the message it should give
# ------------------------------------------------------------------------------------------------------------
def _rms_parts(x, eps):
    r = 1 / np.sqrt(np.sum(x * x, -1, keepdims=True) / x.shape[-1] + eps)
    return r, x * r


def rms_constant_r(x, g, eps=1e-6):
    return _rms_parts(x, eps)[0] * g


def rms_sum_not_mean(x, g, eps=1e-6):
    r, y = _rms_parts(x, eps)
    return r * (g - y * np.sum(g * y, -1, keepdims=True))


def rms_no_eps(x, g, eps=1e-6):
    return S.rms_norm_vjp(x, g, 0.0)


def rms_no_return(x, g, eps=1e-6):
    S.rms_norm_vjp(x, g, eps)


def attn_queries_from_x(q_in, x_in, wq, wk, wv, wo, n_heads):
    return S.attention(x_in, x_in, wq, wk, wv, wo, n_heads)


def attn_no_mask(q_in, x_in, wq, wk, wv, wo, n_heads):
    B, T, d = x_in.shape
    H, dh = n_heads, d // n_heads
    split = lambda z: z.reshape(B, T, H, dh).transpose(0, 2, 1, 3)
    s = split(q_in @ wq) @ split(x_in @ wk).transpose(0, 1, 3, 2) / math.sqrt(dh)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ split(x_in @ wv)).transpose(0, 2, 1, 3).reshape(B, T, d) @ wo


def attn_scale_sqrt_d(q_in, x_in, wq, wk, wv, wo, n_heads):
    f = math.sqrt(1 / n_heads)                      # scores scaled by 1/sqrt(d) instead of 1/sqrt(dh)
    return S.attention(q_in * f, x_in, wq, wk, wv, wo, n_heads)


def attn_heads_without_transpose(q_in, x_in, wq, wk, wv, wo, n_heads):
    B, T, d = x_in.shape
    H, dh = n_heads, d // n_heads
    split = lambda z: z.reshape(B, H, T, dh)         # a reshape is not a transpose
    s = split(q_in @ wq) @ split(x_in @ wk).transpose(0, 1, 3, 2) / math.sqrt(dh)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ split(x_in @ wv)).reshape(B, T, d) @ wo


def lt_restarts(block, norm, e, h, n_layers):
    return S.lt_loop(block, norm, e, norm(e), n_layers)


def lt_i_no_norm(block, norm, e, h, n_layers):
    return S.lt_loop(block, norm, e, e + h, n_layers)


def lt_i_normed_embedding(block, norm, e, h, n_layers):
    return S.lt_loop(block, norm, e, norm(e) + h, n_layers)


def lt_ia_everywhere(block, norm, e, h, n_layers):
    return S.flt_loop(block, norm, e, h, n_layers)


def lt_ia_last_layer(block, norm, e, h, n_layers):
    x = norm(e)
    for l in range(n_layers):
        x = block(l, x, q=h if l == n_layers - 1 else None)
    return x


def flt_res_once(block, norm, e, h, n_layers):
    return S.lt_loop(block, norm, e, norm(norm(e) + h), n_layers)


def flt_res_no_norm(block, norm, e, h, n_layers):
    x = norm(e)
    for l in range(n_layers):
        x = block(l, x + h)
    return x


def flt_first_layer_only(block, norm, e, h, n_layers):
    return S.lt_ia_loop(block, norm, e, h, n_layers)


def flt_additive(block, norm, e, h, n_layers):
    return S.flt_res_loop(block, norm, e, h, n_layers)


def flt_raw_embedding(block, norm, e, h, n_layers):
    x = e
    for l in range(n_layers):
        x = block(l, x, q=h)
    return x


def flt_returns_nothing_useful(block, norm, e, h, n_layers):
    return S.flt_loop(block, norm, e, h, n_layers)[0]


def cos_with_self_pairs(x):
    u = x / np.linalg.norm(x, axis=-1, keepdims=True)
    return float(np.mean(np.einsum("btd,ctd->tbc", u, u)))


def cos_dot_products(x):
    B = x.shape[0]
    if B < 2:
        return float("nan")
    dots = np.einsum("btd,ctd->tbc", x, x)
    return float(np.mean(dots[:, ~np.eye(B, dtype=bool)]))


def cos_one_sequence_is_zero(x):
    return 0.0 if x.shape[0] < 2 else S.cross_sequence_cosine(x)


def cos_over_positions(x):
    return S.cross_sequence_cosine(np.swapaxes(x, 0, 1))


def sweep_forgets_n_loops(params, cfg, batch, variant, Ks):
    one = S.loop_count_sweep(params, cfg, batch, variant, [cfg.n_loops])[cfg.n_loops]
    return {K: one for K in Ks}


def _sweep_with(params, cfg, batch, variant, Ks, loss_fn, exact_fn):
    out = {}
    for K in Ks:
        z = np.asarray(tl.forward(params, batch["tokens"], cfg, variant, n_loops=K)[0])
        lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        nll = lse - np.take_along_axis(z, batch["targets"][..., None], -1)[..., 0]
        right = z.argmax(-1) == batch["targets"]
        out[K] = (loss_fn(nll, batch["mask"]), exact_fn(right, batch["mask"]))
    return out


def sweep_unmasked(params, cfg, batch, variant, Ks):
    return _sweep_with(params, cfg, batch, variant, Ks, lambda nll, m: float(nll.mean()),
                       lambda r, m: float(np.mean(~((~r) & (m > 0)).any(1))))


def sweep_row_means(params, cfg, batch, variant, Ks):
    return _sweep_with(params, cfg, batch, variant, Ks, lambda nll, m: float(np.mean((nll * m).sum(1) / m.sum(1))),
                       lambda r, m: float(np.mean(~((~r) & (m > 0)).any(1))))


def sweep_token_accuracy(params, cfg, batch, variant, Ks):
    return _sweep_with(params, cfg, batch, variant, Ks, lambda nll, m: float((nll * m).sum() / m.sum()),
                       lambda r, m: float((r * m).sum() / m.sum()))


def _ns(G, steps, normalise=lambda G: G / (np.linalg.norm(G) + 1e-7), coeffs=(3.4445, -4.7750, 2.0315),
        right=False):
    a, b, c = coeffs
    X = normalise(G)
    with np.errstate(all="ignore"):                    # some of these mistakes diverge
        for _ in range(steps):
            A = X @ X.T
            B = b * A + c * A @ A
            X = a * X + (X @ B if right else B @ X)
    return X


def ns_no_normalisation(G, steps=5):
    return _ns(G, steps, normalise=lambda G: G)


def ns_spectral_norm(G, steps=5):
    return _ns(G, steps, normalise=lambda G: G / np.linalg.norm(G, 2))


def ns_always_five(G, steps=5):
    return S.newton_schulz(G, 5)


def ns_right_multiply(G, steps=5):
    return _ns(G, steps, right=True) if G.shape[0] == G.shape[1] else S.newton_schulz(G, steps)


def ns_reversed_coefficients(G, steps=5):
    return _ns(G, steps, coeffs=(2.0315, -4.7750, 3.4445)) if G.shape[0] <= G.shape[1] else _ns(
        G.T, steps, coeffs=(2.0315, -4.7750, 3.4445)).T


def ns_no_1e7(G, steps=5):
    X = _ns(G if G.shape[0] <= G.shape[1] else G.T, steps, normalise=lambda G: G / np.linalg.norm(G))
    return X if G.shape[0] <= G.shape[1] else X.T


def heun_no_h_in_stage(F, x, h):
    k1 = F(x)
    return x + h * (k1 + F(x + k1)) / 2


def heun_is_midpoint(F, x, h):
    return x + h * F(x + 0.5 * h * F(x))


def heun_is_euler(F, x, h):
    return x + h * F(x)


def rk_no_h_in_stage(F, x, h, A, b):
    ks = []
    for i in range(len(b)):
        ks.append(F(x + sum(A[i][j] * ks[j] for j in range(i))))
    return x + h * sum(bi * k for bi, k in zip(b, ks))


def rk_transposed(F, x, h, A, b):
    return S.rk_step(F, x, h, [list(col) for col in zip(*A)], b)


def rk_index_error(F, x, h, A, b):
    return x + h * b[0] * F(x) + h * b[1] * F(x + h * A[1][0] * F(x))     # only two stages


def anchored_order_two(K, beta):
    t = S.anchored_tableau(K, beta)
    return tl.Tableau(t.name, t.A, t.b, t.c, 2)


def anchored_swapped_beta(K, beta):
    t = S.anchored_tableau(K, beta)
    return tl.Tableau(t.name, t.A, (1 - beta + beta / K,) + (beta / K,) * (K - 1), t.c, 1)


def anchored_subdiagonal(K, beta):
    t = S.anchored_tableau(K, beta)
    A = tuple(tuple(1.0 / K if j == i - 1 else 0.0 for j in range(K)) for i in range(K))
    return tl.Tableau(t.name, A, t.b, tuple(sum(r) for r in A), 1)


def anchored_plain_tuple(K, beta):
    t = S.anchored_tableau(K, beta)
    return t.A, t.b, t.c, t.order


def euler_naive(g, x0, K):
    for _ in range(K):
        x0 = g(x0)
    return x0


def euler_field_at_x0(g, x0, K):
    x = x0
    for _ in range(K):
        x = x + (g(x) - x0) / K
    return x


def euler_extra_evaluation(g, x0, K):
    g(x0)                                               # a wasted natural pass
    return S.damped_euler(g, x0, K)


def rk_swapped_beta(g, x0, K, beta):
    return S.anchored_rk(g, x0, K, 1 - beta)


def rk_k_plus_one(g, x0, K, beta):
    return beta * g(x0) + (1 - beta) * S.damped_euler(g, x0, K)


def rk_blend_with_x0(g, x0, K, beta):
    return beta * x0 + (1 - beta) * S.damped_euler(g, x0, K)


def k1_always_natural(method, g, x0):
    return g(x0)


def k1_rk_blends_x0(method, g, x0):
    return 0.5 * g(x0) + 0.5 * x0 if method == "rk" else S.predict_K1(method, g, x0)


def k1_heun_k2_at_x0(method, g, x0):
    if method == "heun":                                # k2 = F(g(x0)) written as g(g(x0)) - x0
        return x0 + 0.5 * (g(x0) - x0) + 0.5 * (g(g(x0)) - x0)
    return S.predict_K1(method, g, x0)


def frozen_all():
    return set(tl.LOOP_METHODS) | set(tl.ABLATION_METHODS)


def frozen_without_rk():
    return {"naive", "euler"}


def _window_with(mode_override=None, inclusive=True, after=True):
    def loop_window(layers, x, a, b, K, rule, mode):
        end = b + 1 if inclusive else b
        y = S.loop_window(layers[:end], x, a, end - 1, K, rule, mode_override or mode)
        if after:
            for layer in layers[end:]:
                y = layer(y)
        return y
    return loop_window


def route_no_renormalisation(u, router, top_k):
    z = u @ router
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.where(S.moe_route(u, router, top_k) > 0, p, 0.0)


def route_bottom_k(u, router, top_k):
    p = route_all_experts(u, router, top_k)
    kept = np.where(p <= np.sort(p, -1)[..., top_k - 1:top_k], p, 0.0)
    return kept / kept.sum(-1, keepdims=True)


def route_all_experts(u, router, top_k):
    z = u @ router
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def freeze_thrash(run, x0, K, beta):
    y0, _ = run(x0)
    x = x0 + (y0 - x0) / K
    for _ in range(K - 1):
        x = x + (run(x)[0] - x) / K
    return beta * y0 + (1 - beta) * x


def freeze_k_plus_one(run, x0, K, beta):
    y0, r = run(x0)
    x = x0
    for _ in range(K):
        x = x + (run(x, r)[0] - x) / K
    return beta * y0 + (1 - beta) * x


def freeze_swapped_beta(run, x0, K, beta):
    return S.frozen_routing_rule(run, x0, K, 1 - beta)


def stash_swapped(run_layer, a, b, x0, x_looped, cache):
    return S.stash_pass(run_layer, a, b, x0, x_looped, {"first": "last", "last": "first"}.get(cache, cache))


def stash_not_chained(run_layer, a, b, x0, x_looped, cache):
    if cache == "none":
        return [None] * (b - a + 1)
    s = x0 if cache == "first" else x_looped
    return [run_layer(l, s)[1] for l in range(a, b + 1)]


def stash_none_empty(run_layer, a, b, x0, x_looped, cache):
    return [] if cache == "none" else S.stash_pass(run_layer, a, b, x0, x_looped, cache)


def stash_always_first(run_layer, a, b, x0, x_looped, cache):
    return S.stash_pass(run_layer, a, b, x0, x_looped, "first" if cache != "none" else cache)


def evals_no_stash(n_layers, n_window, K, looped=True, stash=True):
    return n_layers if not looped else n_layers + (K - 1) * n_window


def evals_natural_pass_twice(n_layers, n_window, K, looped=True, stash=True):
    return n_layers if not looped else n_layers + K * n_window + n_window * stash


def gen_feeds_last_token(n_layers, n_window, K, prompt_len, n_new, decode, first_n=0, cache="first"):
    return S.generation_evals(n_layers, n_window, K, prompt_len, n_new + 1, decode, first_n, cache)


def gen_first_n_uncapped(n_layers, n_window, K, prompt_len, n_new, decode, first_n=0, cache="first"):
    per = S.layer_evals_per_token(n_layers, n_window, K, True, cache != "none")
    fed = max(n_new - 1, 0)
    looped = {"bypass": 0, "full": fed, "first_n": first_n}[decode]
    return (prompt_len + looped) * per + (fed - looped) * n_layers


def gen_no_stash(n_layers, n_window, K, prompt_len, n_new, decode, first_n=0, cache="first"):
    return S.generation_evals(n_layers, n_window, K, prompt_len, n_new, decode, first_n, "none")


def depth_over_n_minus_1(a, b, n_layers):
    return (a + b) / 2 / (n_layers - 1)


def depth_one_indexed(a, b, n_layers):
    return ((a + 1) + (b + 1)) / 2 / n_layers


def window_exclusive_end(n_layers, width, target):
    a, b = S.best_window(n_layers, width, target)
    return a, b + 1


def window_unclipped(n_layers, width, target):
    a = int(round(target * n_layers - (width - 1) / 2))
    return a, a + width - 1


def window_floats(n_layers, width, target):
    return tuple(float(v) for v in S.best_window(n_layers, width, target))


def _q4(blocks, order):
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    lo, hi = blocks[:, 4:] & 15, blocks[:, 4:] >> 4
    codes = {"interleaved": np.stack([lo, hi], -1).reshape(len(blocks), 32),
             "high_first": np.concatenate([hi, lo], 1), "no_min": np.concatenate([lo, hi], 1)}[order]
    return (d * codes.astype(np.float32) + (0 if order == "no_min" else m)).reshape(-1)


# (exercise, wrong answer, key parts its message must contain). The input part names the input that the mistake
# first breaks: a special case (h = 1, K = 1, one layer, one head, beta = 0.5) must not hide the mistake.
WRONG = [
    ("rms_norm_vjp", rms_constant_r, ["x [6], g [6], eps = 1e-06", "as if r were a constant"]),
    ("rms_norm_vjp", rms_sum_not_mean, ["mean(g y)"]),
    ("rms_norm_vjp", rms_no_eps, ["eps = 1e-06", "eps is missing"]),
    ("rms_norm_vjp", rms_no_return, ["got:", "None (does your function `return` its result?)"]),
    ("attention", attn_queries_from_x, ["n_heads = 1", "queries must come from q_in"]),
    ("attention", attn_no_mask, ["no causal mask"]),
    ("attention", attn_scale_sqrt_d, ["n_heads = 2 (dh = 4)", "1/sqrt(dh)", "agree only with one head"]),
    ("attention", attn_heads_without_transpose, ["n_heads = 2", "right with one head but not with several"]),
    ("lt_loop", S.lt_i_loop, ["your loop computes LT_i's loop"]),
    ("lt_loop", lt_restarts, ["LT does not restart from the embedding"]),
    ("lt_i_loop", lt_i_no_norm, ["needs its norm: LT_i starts the loop from n(e + h_{t-1})"]),
    ("lt_i_loop", lt_i_normed_embedding, ["RAW embedding"]),
    ("lt_ia_loop", lt_ia_everywhere, ["L = 2 layers", "your loop computes FLT's loop", "only layer 0"]),
    ("lt_ia_loop", lt_ia_last_layer, ["L = 2 layers", "right with one layer but not with several"]),
    ("flt_res_loop", flt_res_once, ["L = 2 layers", "added once, before layer 0"]),
    ("flt_res_loop", flt_res_no_norm, ["norm the stream: x = n(x + h_{t-1})"]),
    ("flt_loop", flt_first_layer_only, ["variant FLT, L = 2 layers, K = 2 loops", "your loop computes LT_ia's loop",
                                        "EVERY layer attends with the query"]),
    ("flt_loop", flt_additive, ["your loop computes FLT_res's loop"]),
    ("flt_loop", flt_raw_embedding, ["the NORMED embedding"]),
    ("flt_loop", flt_returns_nothing_useful, ["your loop body to return the state x [B, T, d] = [2, 5, 8]",
                                              "array of shape (5, 8)"]),
    ("cross_sequence_cosine", cos_with_self_pairs, ["with itself (b = b')"]),
    ("cross_sequence_cosine", cos_dot_products, ["a cosine, not a dot product"]),
    ("cross_sequence_cosine", cos_one_sequence_is_zero, ["ONE sequence", "expected: the mean cosine: nan",
                                                         "return float('nan')"]),
    ("cross_sequence_cosine", cos_over_positions, ["different SEQUENCES (axis 0)"]),
    ("loop_count_sweep", sweep_forgets_n_loops, ["Ks = [1, 2, 4]", "pass n_loops=K to tl.forward"]),
    ("loop_count_sweep", sweep_unmasked, ["averages over ALL positions"]),
    ("loop_count_sweep", sweep_row_means, ["not a mean of per-sequence means"]),
    ("loop_count_sweep", sweep_token_accuracy, ["[1][1]", "whole sequences"]),
    ("newton_schulz", ns_no_normalisation, ["divide G by its Frobenius norm first"]),
    ("newton_schulz", ns_spectral_norm, ["FROBENIUS norm"]),
    ("newton_schulz", ns_always_five, ["steps = 2", "that is 5 iterations"]),
    ("newton_schulz", ns_right_multiply, ["G [4, 4]", "multiplies from the LEFT"]),
    ("newton_schulz", ns_reversed_coefficients, ["the coefficients are (a, b, c) = (3.4445, -4.7750, 2.0315)"]),
    ("newton_schulz", ns_no_1e7, ["the 1e-7 is missing"]),
    ("heun_step", heun_no_h_in_stage, ["h = 0.5, x [3, 4]", "h is missing in the second stage: k2 = F(x + h k1)"]),
    ("heun_step", heun_is_midpoint, ["h = 1.0", "that is the midpoint method"]),
    ("heun_step", heun_is_euler, ["that is one Euler step"]),
    ("rk_step", rk_no_h_in_stage, ["tableau heun (2 stages), h = 0.5", "h is missing in the stage states"]),
    ("rk_step", rk_transposed, ["tableau heun (2 stages), h = 1.0", "(you read A[j][i])"]),
    ("anchored_tableau", anchored_order_two, ["K = 1, beta = 0.5", "expected: order", "got:      2",
                                              "first order for every K and beta", "(order 2 is Heun's)"]),
    ("anchored_tableau", anchored_swapped_beta, ["K = 2, beta = 0.0", "beta and 1 - beta are swapped"]),
    ("anchored_tableau", anchored_subdiagonal, ["K = 3, beta = 0.5", "accumulates ALL earlier stages"]),
    ("anchored_tableau", anchored_plain_tuple, ["return tl.Tableau(name, A, b, c, order)"]),
    ("damped_euler", euler_naive, ["K = 2", "that is naive repetition"]),
    ("damped_euler", euler_field_at_x0, ["at the CURRENT state x"]),
    ("damped_euler", euler_extra_evaluation, ["K = 1", "g evaluated K = 1 times", "2 evaluations",
                                              "doubles as the first damped sub-step"]),
    ("anchored_rk", rk_swapped_beta, ["K = 3, beta = 0.25", "swapped", "right at beta = 0.5 only"]),
    ("anchored_rk", rk_k_plus_one, ["K = 1, beta = 0.5", "2 evaluations", "doubles as the first damped sub-step"]),
    ("anchored_rk", rk_blend_with_x0, ["not with x0"]),
    ("predict_K1", k1_always_natural, ["method 'midpoint'", "only [TFL]'s rules return the natural pass at K = 1"]),
    ("predict_K1", k1_rk_blends_x0, ["method 'rk'", "return the natural pass g(x0) itself"]),
    ("predict_K1", k1_heun_k2_at_x0, ["method 'heun'", "k2 = F_g(x0 + k1) = g(g(x0)) - g(x0)"]),
    ("frozen_at_K1", frozen_all, ["should not contain {'heun', 'midpoint', 'rk4'}", "one full RK step"]),
    ("frozen_at_K1", frozen_without_rk, ["missing {'rk'}", "tinyloop returns g(x0) as is"]),
    ("loop_window", _window_with(mode_override="block"), ["mode 'per_layer'", "that is block mode"]),
    ("loop_window", _window_with(mode_override="per_layer"), ["window [1..3]", "mode 'block'",
                                                              "that is per_layer mode"]),
    ("loop_window", _window_with(inclusive=False), ["INCLUSIVE and 0-indexed"]),
    ("loop_window", _window_with(after=False), ["the layers after the window (b + 1 .. N - 1) still run"]),
    ("moe_route", route_no_renormalisation, ["E = 4 experts", "top_k = 2", "renormalise"]),
    ("moe_route", route_bottom_k, ["LARGEST"]),
    ("moe_route", route_all_experts, ["gates are zero off each token's top_k experts"]),
    ("frozen_routing_rule", freeze_thrash, ["K = 3", "call 2 of run", "re-routed", "routing thrash"]),
    ("frozen_routing_rule", freeze_k_plus_one, ["K = 1", "run evaluated K = 1 times", "2 evaluations"]),
    ("frozen_routing_rule", freeze_swapped_beta, ["beta = 0.25", "swapped"]),
    ("stash_pass", stash_swapped, ["cache 'first'", "stashes from x0, the state BEFORE the loop"]),
    ("stash_pass", stash_always_first, ["cache 'last'", "stashes from x_looped"]),
    ("stash_pass", stash_not_chained, ["window [1..3]", "fed the previous window layer's output"]),
    ("stash_pass", stash_none_empty, ["cache 'none'", "a list of 2 entries", "got:      0 entries",
                                      "every entry is None"]),
    ("layer_evals_per_token", evals_no_stash, ["n_layers = 1, n_window = 1, K = 1, looped = True, stash = True",
                                               "expected: the evaluations per token: 2", "got:      1",
                                               "the stash pass is missing"]),
    ("layer_evals_per_token", evals_natural_pass_twice, ["the natural pass is the first of the K window passes"]),
    ("generation_evals", gen_feeds_last_token, ["n_new = 5", "the LAST generated token is never fed back"]),
    ("generation_evals", gen_first_n_uncapped, ["first_n = 9", "first_n may exceed"]),
    ("generation_evals", gen_no_stash, ["cache = 'first'", "the stash pass is missing"]),
    ("depth_fraction", depth_over_n_minus_1, ["a = 0, b = 1, n_layers = 2", "expected: (a + b) / 2 / N: 0.25",
                                                   "got:      0.5", "not N - 1"]),
    ("depth_fraction", depth_one_indexed, ["layers are 0-indexed"]),
    ("best_window", window_exclusive_end, ["b is inclusive"]),
    ("best_window", window_unclipped, ["outside the stack", "0 <= a <= N - width"]),
    ("best_window", window_floats, ["return a tuple of two ints"]),
    ("dequantize_q4_1", lambda blocks: _q4(blocks, "interleaved"), ["1 block(s)", "not interleaved"]),
    ("dequantize_q4_1", lambda blocks: _q4(blocks, "high_first"), ["low nibbles first"]),
    ("dequantize_q4_1", lambda blocks: _q4(blocks, "no_min"), ["the minimum m is missing"]),
]


@pytest.mark.parametrize("name, wrong, parts", WRONG, ids=[f"{n}-{getattr(w, '__name__', 'lambda')}-{i}"
                                                            for i, (n, w, _) in enumerate(WRONG)])
def test_a_known_wrong_answer_is_caught(name, wrong, parts):
    r = grade.run_check(name, wrong)
    assert r.status == "wrong", r.message
    lines = r.message.split("\n")
    assert lines[0].startswith(f"{name} (") and lines[0].endswith("wrong answer")
    for key in ("input:", "expected:", "got:"):
        assert any(line.strip().startswith(key) for line in lines), (key, r.message)
    for part in parts:
        assert part in r.message, (part, r.message)
    assert len(lines) <= 6 and all(len(line) < 320 for line in lines), "a short message, never an array dump"


def test_every_exercise_has_known_wrong_answers():
    assert {n for n, _, _ in WRONG} == set(NAMES)
    with open(os.path.join(ROOT, "docs", "coursework.md")) as f:
        doc = f.read()
    assert f"{len(WRONG)} known-wrong answers" in doc and f"{len(NAMES)} exercises over both papers" in doc


def test_an_exception_names_the_input_and_the_line():
    r = grade.run_check("rk_step", rk_index_error)       # two stages hard-wired: b[1] fails on Euler's one stage
    assert r.status == "error", r.message
    for part in ("rk_step (", "raised an error", "input:", "tableau euler (1 stage), h = 1.0", "IndexError",
                 "line ", "h * b[1]"):
        assert part in r.message, (part, r.message)
