"""The coursework grader: checks a student's answers and says, for each exercise, what is wrong.

    python -m coursework.grade my_answers.py            # every exercise
    python -m coursework.grade my_answers.py -k loop    # only the exercises whose name contains "loop"
    python -m coursework.grade notebooks/03_integrators_exercises.ipynb   # the exercise cells of a notebook
    python -m coursework.grade --solutions              # the solutions (a teacher's sanity check)

From Python or a notebook:  from coursework.grade import check;  check("heun_step", heun_step)

Every exercise is checked on several inputs (so that a special case such as h = 1, K = 1 or one layer cannot
pass by accident), against tinyloop's own implementation of the piece where it has one, or a closed form
(coursework/references.py holds every reference call). An answer gets one of:
    ok          every input gave the expected value
    not done    the function still raises NotImplementedError (the blank)
    wrong       the first input that gave a wrong value: which input, the expected and the actual value (or the
                first differing entry of an array), and a hint where a common mistake is recognised
    error       the function raised another exception: on which input, and the line of your code
    missing     the file has no function of that name
"""
from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import math
import os
import sys
import traceback
from dataclasses import dataclass

import numpy as onp

from coursework import references as ref


# ============================================================================================================
# Results and the checking machinery
# ============================================================================================================
@dataclass
class Result:
    name: str
    status: str          # "ok" | "not done" | "wrong" | "error" | "missing"
    message: str         # what a student reads: one line for ok / not done / missing, a short block otherwise

    @property
    def ok(self):
        return self.status == "ok"

    def __str__(self):
        return self.message


@dataclass(frozen=True)
class Exercise:
    name: str
    concept: str
    source: str
    check: object        # check(t): runs the student's function through t (a _Tester) on every input


EXERCISES: dict[str, Exercise] = {}


def exercise(name, concept, source):
    """Register the check function below it as the check of exercise `name`."""
    def register(check):
        EXERCISES[name] = Exercise(name, concept, source, check)
        return check
    return register


class _NotDone(Exception):
    pass


class _Failed(Exception):
    def __init__(self, status, lines):
        super().__init__(status)
        self.status, self.lines = status, lines


def _where(exc, fn):
    """(line description, name of the function) of the deepest frame of exc's traceback in fn's source file."""
    filename = getattr(getattr(fn, "__code__", None), "co_filename", None)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
    if not frames:
        return "", None
    f = frames[-1]
    where = f"line {f.lineno}" + (f": {f.line.strip()}" if f.line else "")
    return where, f.name


def _num(v):
    """A number as a student reads it: 6 significant digits; ints as ints."""
    if isinstance(v, (bool, onp.bool_)):
        return str(bool(v))
    if isinstance(v, (int, onp.integer)):
        return str(int(v))
    try:
        v = float(v)
    except (TypeError, ValueError):
        return repr(v)
    return "nan" if math.isnan(v) else f"{v:.6g}"


def _describe(v):
    """A short description of any value (never an array dump)."""
    if v is None:
        return "None"
    if isinstance(v, onp.ndarray) or hasattr(v, "shape") and hasattr(v, "dtype"):
        a = onp.asarray(v)
        return _num(a.reshape(())) if a.ndim == 0 else f"array of shape {tuple(a.shape)} ({a.dtype})"
    if isinstance(v, (float, onp.floating)) and math.isfinite(v) and float(v).is_integer():
        return f"{float(v):.1f}"                       # 0.0, not 0: a float where an int may be expected
    if isinstance(v, (bool, int, float, onp.number)):
        return _num(v)
    if isinstance(v, (set, frozenset)):
        return "{" + ", ".join(repr(x) for x in sorted(v, key=str)) + "}"
    if isinstance(v, (tuple, list)):
        inner = ", ".join(_describe(x) for x in v[:4]) + (", ..." if len(v) > 4 else "")
        return f"a {type(v).__name__} of {len(v)}: ({inner})"
    if isinstance(v, dict):
        return f"a dict with keys {sorted(v, key=str)}"
    if isinstance(v, str):
        return repr(v)
    return f"a {type(v).__name__}"


def _pair(w, g):
    """Two numbers printed with enough digits to see that they differ."""
    for digits in (6, 9, 12, 17):
        a, b = (f"{float(v):.1f}" if math.isfinite(v) and float(v).is_integer() else f"{float(v):.{digits}g}"
                for v in (w, g))
        if a != b:
            return a, b
    return a, b


def _is_number(v):
    return isinstance(v, (int, float, onp.number)) and not isinstance(v, (bool, onp.bool_)) or (
        isinstance(v, onp.ndarray) and v.ndim == 0 and onp.issubdtype(v.dtype, onp.number))


def _diff(want, got, rtol, atol, path=""):
    """None if got matches want; else (expected text, got text), naming the first differing entry."""
    at = f"at {path}: " if path else ""
    if want is None:
        return None if got is None else (f"{at}None", f"{at}{_describe(got)}")
    if got is None:
        return (f"{at}{_describe(want)}", f"{at}None (does your function `return` its result?)")
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return (f"{at}{_describe(want)}", f"{at}{_describe(got)}")
        if set(got) != set(want):
            missing, extra = sorted(set(want) - set(got), key=str), sorted(set(got) - set(want), key=str)
            return (f"{at}keys {sorted(want, key=str)}", f"{at}keys {sorted(got, key=str)}"
                    + (f" (missing {missing})" if missing else "") + (f" (extra {extra})" if extra else ""))
        for k in want:
            d = _diff(want[k], got[k], rtol, atol, f"{path}[{k!r}]")
            if d:
                return d
        return None
    if isinstance(want, (set, frozenset)):
        if not isinstance(got, (set, frozenset, list, tuple)):
            return (f"{at}the set {_describe(want)}", f"{at}{_describe(got)}")
        g = set(got)
        if g == set(want):
            return None
        missing, extra = set(want) - g, g - set(want)
        return (f"{at}the set {_describe(set(want))}", f"{at}{_describe(g)}" + (
            f"; missing {_describe(missing)}" if missing else "") + (f"; should not contain {_describe(extra)}"
                                                                     if extra else ""))
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)):
            return (f"{at}{_describe(want)}", f"{at}{_describe(got)}")
        if len(got) != len(want):
            return (f"{at}a {type(want).__name__} of {len(want)} entries", f"{at}{len(got)} entries")
        for i, (w, g) in enumerate(zip(want, got)):
            d = _diff(w, g, rtol, atol, f"{path}[{i}]")
            if d:
                return d
        return None
    if isinstance(want, (bool, onp.bool_, str)):
        return None if type(got) is type(want) and got == want or (
            isinstance(want, (bool, onp.bool_)) and isinstance(got, (bool, onp.bool_)) and bool(got) == bool(want)
        ) else (f"{at}{_describe(want)}", f"{at}{_describe(got)}")
    if isinstance(want, (int, onp.integer)):                       # counts: exact
        if not _is_number(got):
            return (f"{at}the integer {int(want)}", f"{at}{_describe(got)}")
        return None if float(got) == int(want) else (f"{at}{int(want)}", f"{at}{_num(got)}")
    if isinstance(want, (float, onp.floating)):
        if not _is_number(got):
            return (f"{at}the number {_num(want)}", f"{at}{_describe(got)}")
        w, g = float(want), float(got)
        if (math.isnan(w) and math.isnan(g)) or (not math.isnan(w) and not math.isnan(g) and
                                                 abs(g - w) <= atol + rtol * abs(w)):
            return None
        ws, gs = _pair(w, g)
        return (f"{at}{ws}", f"{at}{gs}" + ("" if math.isnan(w) or math.isnan(g) else f" (off by {_num(g - w)})"))
    want = onp.asarray(want)
    try:
        g = onp.asarray(got, dtype=onp.float64) if not isinstance(got, onp.ndarray) else got
    except (TypeError, ValueError):
        return (f"{at}an array of shape {want.shape}", f"{at}{_describe(got)}")
    if g.dtype == object or not onp.issubdtype(g.dtype, onp.number):
        return (f"{at}an array of shape {want.shape}", f"{at}{_describe(got)} (not numbers)")
    if g.shape != want.shape:
        return (f"{at}an array of shape {tuple(want.shape)}", f"{at}an array of shape {tuple(g.shape)}")
    if want.size == 0:
        return None
    w64, g64 = want.astype(onp.float64), g.astype(onp.float64)
    close = onp.isclose(g64, w64, rtol=rtol, atol=atol, equal_nan=True)
    if close.all():
        return None
    bad = onp.argwhere(~close)
    idx = tuple(int(i) for i in bad[0])
    finite = onp.isfinite(g64) & onp.isfinite(w64)
    err = onp.where(finite, onp.abs(g64 - w64), onp.inf)
    worst = tuple(int(i) for i in onp.unravel_index(onp.argmax(err), err.shape))
    ix = list(idx) if len(idx) != 1 else idx[0]
    extra = f"{len(bad)} of {want.size} entries differ"
    if onp.isfinite(g64).all():
        extra += f"; max |diff| {err.max():.2e} at {list(worst) if len(worst) != 1 else worst[0]}"
    else:
        extra += f"; {int((~onp.isfinite(g64)).sum())} entries are inf or nan"
    ws, gs = _pair(w64[idx], g64[idx])
    return (f"{at}array of shape {tuple(want.shape)}, entry {ix} = {ws}", f"{at}entry {ix} = {gs} ({extra})")


def close(a, b, rtol=1e-9, atol=1e-12):
    """True when b matches a (any nesting of arrays, numbers, tuples, lists, dicts, sets)."""
    try:
        return _diff(a, b, rtol, atol) is None
    except Exception:
        return False


class _Tester:
    """Runs one student function on the inputs of one check and turns the first problem into a message."""

    def __init__(self, name, fn):
        self.name, self.fn, self.passed, self.input = name, fn, [], None

    def call(self, inp, *args, fn=None, **kwargs):
        """The student's function on one input (inp: a short description of it)."""
        self.input = inp
        fn = self.fn if fn is None else fn
        try:
            return fn(*args, **kwargs)
        except NotImplementedError as e:
            tb = traceback.extract_tb(e.__traceback__)
            raiser, own = (tb[-1].name if tb else None), getattr(fn, "__name__", None)
            raise _NotDone(f" (NotImplementedError raised in {raiser})" if raiser and raiser != own else "")
        except Exception as e:
            where, _ = _where(e, fn)
            raise _Failed("error", [("input", inp), ("error", f"{type(e).__name__}: {e}"),
                                    ("where", where or "outside your file (in a function it called)")])

    def same(self, inp, got, want, what, rtol=1e-9, atol=1e-12, hint=None):
        """Pass if got matches want; else fail with expected/got and the hint (a text, or a function -> text)."""
        d = _diff(want, got, rtol, atol)
        if d is None:
            self.passed.append(inp)
            return
        self.fail(inp, f"{what}: {d[0]}", d[1], hint)

    def fail(self, inp, expected, got, hint=None):
        if callable(hint):
            try:
                hint = hint()
            except Exception:          # a hint must never hide the failure itself
                hint = None
        lines = [("input", inp), ("expected", expected), ("got", got)]
        if hint:
            lines.append(("hint", hint))
        raise _Failed("wrong", lines)

    def passed_where(self, key):
        """The passed inputs whose description contains `key` (for hints such as 'right at h = 1 only')."""
        return [p for p in self.passed if key in p]


def run_check(name, fn):
    """Grade one function against exercise `name`. Returns a Result (never raises for a student's mistake)."""
    ex = EXERCISES[name]
    head = f"{name} ({ex.concept})"
    if fn is None:
        return Result(name, "missing", f"{name}: missing (no function of that name)")
    t = _Tester(name, fn)
    try:
        ex.check(t)
    except _NotDone as e:
        return Result(name, "not done", f"{name}: not done yet{e}")
    except _Failed as e:
        title = "wrong answer" if e.status == "wrong" else "raised an error"
        width = max(len(k) for k, _ in e.lines) + 1
        body = "\n".join(f"  {k + ':':<{width}} {v}" for k, v in e.lines)
        return Result(name, e.status, f"{head}: {title}\n{body}")
    except Exception as e:                 # the student's value broke the check itself (e.g. a wrong type)
        return Result(name, "error", f"{head}: the grader could not check your answer\n"
                                     f"  input: {t.input}\n  error: {type(e).__name__}: {e}")
    n = len(dict.fromkeys(t.passed))
    return Result(name, "ok", f"{name}: ok ({n} input{'s' * (n != 1)})")


def check(name, fn):
    """Grade one exercise and print the result (for notebooks). Returns None."""
    _check_name(name)
    print(run_check(name, fn).message)


def grade_namespace(ns, names=None):
    """Grade every exercise (or those in `names`) found in a dict or module. Returns a list of Results."""
    get = ns.get if isinstance(ns, dict) else (lambda k: getattr(ns, k, None))
    return [run_check(n, get(n)) for n in (names or EXERCISES)]


def _check_name(name):
    if name not in EXERCISES:
        raise ValueError(f"name: no exercise {name!r}; the exercises are {list(EXERCISES)}")


# ============================================================================================================
# Fixtures: tiny float64 models (built once)
# ============================================================================================================
def _rng(seed):
    return onp.random.default_rng(seed)


@functools.lru_cache(maxsize=None)
def _toy(n_layers, seed=0, n_experts=0, n_loops=1, eps=1e-6, d=8, vocab=11):
    """A tiny float64 tinyloop model whose blocks are NOT the identity (init makes them so: output projections are
    zero), with a readout that does not squash the logits, so that every mistake changes the numbers."""
    import tinyloop as tl
    cfg = tl.Config(vocab=vocab, d_model=d, n_heads=2, n_layers=n_layers, n_loops=n_loops, seq_len=16,
                    n_experts=n_experts, top_k=2, norm_eps=eps, dtype="float64")
    rng = _rng(100 + seed)
    params = tl.init_params(cfg, rng)
    for p in params["layers"]:
        p["attn"]["wo"] = 0.6 / math.sqrt(d) * rng.standard_normal(p["attn"]["wo"].shape)
        ffn = p["moe"] if n_experts else p["mlp"]
        ffn["w2"] = (2.0 if n_experts else 0.6) / math.sqrt(cfg.ff) * rng.standard_normal(ffn["w2"].shape)
    params["head"] = rng.standard_normal(params["head"].shape) / math.sqrt(d)
    return params, cfg


def _tokens(seed, B, T, vocab=11):
    return _rng(200 + seed).integers(0, vocab, (B, T))


def _shape(a):
    return "[" + ", ".join(str(s) for s in onp.shape(a)) + "]"


def _counted(f):
    """f wrapped to count its calls (wrapper.calls)."""
    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        return f(*args, **kwargs)
    wrapper.calls = 0
    return wrapper


def _maps():
    """Two maps on states for the integrator checks: a nonlinear one and a 2-layer tinyloop window."""
    W = _rng(1).standard_normal((4, 4)) / 2
    params, cfg = _toy(3, seed=5)
    layers = ref.frozen_layers(params, cfg)
    x_win = ref.stem(params, cfg, _tokens(5, 2, 5))
    return [("g(x) = x + tanh(x W^T), x [3, 4]", lambda x: x + onp.tanh(x @ W.T), _rng(2).standard_normal((3, 4))),
            ("g = a 2-layer tinyloop window, x [2, 5, 8]", lambda x: layers[1](layers[0](x)), x_win)]


# ============================================================================================================
# Part A · [FLT] the looped model family
# ============================================================================================================
@exercise("rms_norm_vjp", "the RMSNorm gradient by hand", "[FLT] backbone; tinyloop section 2 (_rms)")
def _check_rms_norm_vjp(t):
    for i, (shape, eps, scale) in enumerate([((6,), 1e-6, 1.0), ((3, 5), 1e-6, 1.0), ((2, 3, 8), 1e-6, 2.0),
                                             ((3, 5), 0.5, 0.5), ((2, 4), 2.0, 1.0)]):
        rng = _rng(10 + i)
        x, g = scale * rng.standard_normal(shape), rng.standard_normal(shape)
        inp = f"x {_shape(x)}, g {_shape(g)}, eps = {eps}"
        got = t.call(inp, x.copy(), g.copy(), eps)
        want = ref.rms_norm_vjp(x, g, eps)

        def hint():
            d = x.shape[-1]
            r = 1 / onp.sqrt(onp.sum(x * x, -1, keepdims=True) / d + eps)
            y = x * r
            if close(r * g, got):
                return ("that is r * g, as if r were a constant: r = (mean(x^2) + eps)^(-1/2) depends on every x_j "
                        "of the row, which adds a second term to dy_i/dx_j")
            if close(r * (g - y * onp.sum(g * y, -1, keepdims=True)), got):
                return "the correction term needs mean(g y) over the d entries (the sum divided by d), not the sum"
            if close(r * (g + y * onp.sum(g * y, -1, keepdims=True) / d), got):
                return "the correction term has the wrong sign: dy_i/dx_j = r delta_ij - r y_i y_j / d"
            r0 = 1 / onp.sqrt(onp.sum(x * x, -1, keepdims=True) / d)
            y0 = x * r0
            if close(r0 * (g - y0 * onp.sum(g * y0, -1, keepdims=True) / d), got):
                return "eps is missing from r = (mean(x^2) + eps)^(-1/2)"
            if t.passed_where("eps = 1e-06") and eps != 1e-6:
                return "right at eps = 1e-6 but wrong at a larger eps: check where eps enters"
        t.same(inp, got, want, "dL/dx", hint=hint)


def _attn_variant(q_in, x_in, wq, wk, wv, wo, H, scale="dh", causal=True, queries="q", kv="x"):
    """A plain attention with knobs, only for recognising mistakes."""
    B, T, d = x_in.shape
    dh = d // H
    qs, kvs = (q_in if queries == "q" else x_in), (x_in if kv == "x" else q_in)
    Q, Kk, V = qs @ wq, kvs @ wk, kvs @ wv
    out = onp.zeros((B, T, d))
    for h in range(H):
        sl = slice(h * dh, (h + 1) * dh)
        s = Q[..., sl] @ onp.swapaxes(Kk[..., sl], -1, -2)
        s = s / {"dh": math.sqrt(dh), "d": math.sqrt(d), "none": 1.0}[scale]
        if causal:
            s = onp.where(onp.tril(onp.ones((T, T), bool)), s, -onp.inf)
        p = onp.exp(s - s.max(-1, keepdims=True))
        out[..., sl] = (p / p.sum(-1, keepdims=True)) @ V[..., sl]
    return out @ wo


@exercise("attention", "attention with a separate query stream", "[FLT] Attention Injection; tl.attention")
def _check_attention(t):
    for i, (B, T, d, H) in enumerate([(1, 4, 6, 1), (2, 5, 8, 2), (2, 6, 12, 3), (1, 3, 8, 4)]):
        rng = _rng(20 + i)
        q_in, x_in = rng.standard_normal((B, T, d)), rng.standard_normal((B, T, d))
        ws = [rng.standard_normal((d, d)) / math.sqrt(d) for _ in range(4)]
        inp = f"q_in and x_in [{B}, {T}, {d}] (two different streams), n_heads = {H} (dh = {d // H})"
        got = t.call(inp, q_in.copy(), x_in.copy(), *[w.copy() for w in ws], H)
        want = ref.attention(q_in, x_in, *ws, H)

        def hint():
            v = functools.partial(_attn_variant, q_in, x_in, *ws, H)
            for kwargs, text in [
                    ({"queries": "x"}, "the queries must come from q_in (the injected stream); you used x_in"),
                    ({"kv": "q"}, "keys and values come from x_in, only the queries from q_in"),
                    ({"causal": False}, "no causal mask: position i must not attend to positions j > i"),
                    ({"scale": "d"}, "scale the scores by 1/sqrt(dh) with dh = d / H, not 1/sqrt(d) (the two "
                                     "agree only with one head)"),
                    ({"scale": "none"}, "the scores are q k^T / sqrt(dh): the scale is missing")]:
                if close(v(**kwargs), got):
                    return text
            if t.passed_where("n_heads = 1") and H > 1:
                return ("right with one head but not with several: head h uses columns h*dh .. (h+1)*dh - 1 of "
                        "Q, K, V; reshape [B, T, H, dh] and move H before T, and put the heads back side by side")
        t.same(inp, got, want, "the output [B, T, d]", hint=hint)


ref_variants = ("LT", "LT_i", "LT_ia", "FLT_res", "FLT")
VARIANT_TEXT = {
    "LT": "x = h_{t-1}, then the layers, no injection",
    "LT_i": "x = n(e + h_{t-1}), then the layers",
    "LT_ia": "x = n(e), and only layer 0 attends with the query h_{t-1}",
    "FLT_res": "x = n(e), and before EVERY layer x = n(x + h_{t-1})",
    "FLT": "x = n(e), and EVERY layer attends with the query h_{t-1}: block(l, x, q=h)",
}


def _run_body(t, inp, body, params, cfg, tokens, K, call=True):
    """Logits of a K-loop model: loop 1 as in tinyloop, loops 2..K from `body` (the student's, through t.call)."""
    parts = ref.model_parts(params, cfg)
    e = parts["embed"](tokens)
    x = parts["norm"](e)
    for l in range(cfg.n_layers):
        x = parts["block"](l, x)
    for _ in range(1, K):
        h = parts["final_norm"](x)
        args = (parts["block"], parts["norm"], e.copy(), h.copy(), cfg.n_layers)
        x = t.call(inp, *args, fn=body) if call else body(*args)
        if not (hasattr(x, "shape") and tuple(x.shape) == tuple(e.shape)):
            t.fail(inp, f"your loop body to return the state x [B, T, d] = {_shape(e)}",
                   _describe(x), "return the stream x at the end of the loop (before the final norm)")
    return parts["readout"](parts["final_norm"](x))


def _wrong_bodies():
    """Loop bodies that are NOT any tinyloop variant, with the mistake each one shows."""
    def layers(block, x, L, q=None, first_only=False, add=None, norm=None):
        for l in range(L):
            if add is not None:
                x = x + add if norm is None else norm(x + add)
            x = block(l, x, q=q if (q is not None and (not first_only or l == 0)) else None)
        return x
    return {
        "LT_i": [(lambda bl, n, e, h, L: layers(bl, e + h, L),
                  "the injected state needs its norm: LT_i starts the loop from n(e + h_{t-1})"),
                 (lambda bl, n, e, h, L: layers(bl, n(e) + h, L),
                  "LT_i adds the RAW embedding: x = n(e + h_{t-1}), not n(e) + h_{t-1}")],
        "FLT_res": [(lambda bl, n, e, h, L: layers(bl, n(n(e) + h), L),
                     "h_{t-1} is added once, before layer 0; FLT_res adds it before EVERY layer"),
                    (lambda bl, n, e, h, L: layers(bl, n(e), L, add=h),
                     "after adding h_{t-1}, norm the stream: x = n(x + h_{t-1}) before each layer")],
        "FLT": [(lambda bl, n, e, h, L: layers(bl, e, L, q=h),
                 "the loop restarts from n(e), the NORMED embedding, not e"),
                (lambda bl, n, e, h, L: layers(bl, h, L, q=h),
                 "FLT restarts every loop from n(e); h_{t-1} enters only as the query")],
        "LT_ia": [(lambda bl, n, e, h, L: layers(bl, h, L, q=h, first_only=True),
                   "LT_ia restarts every loop from n(e); h_{t-1} enters only as layer 0's query")],
        "LT": [(lambda bl, n, e, h, L: layers(bl, n(e), L),
                "LT does not restart from the embedding: the loop starts from h_{t-1} itself")],
    }


def _loop_body_check(variant):
    def check(t):
        for L, K, seed in ((1, 2, 0), (2, 2, 1), (3, 3, 2), (2, 4, 3)):
            params, cfg = _toy(L, seed=seed, eps=1e-12)      # tiny eps: an extra n(n(x)) is harmless here
            tokens = _tokens(seed, 2, 5)
            inp = (f"variant {variant}, L = {L} layer{'s' * (L > 1)}, K = {K} loops, tokens [2, 5] (d = 8); loop 1 "
                   f"as in tinyloop, {'loop 2' if K == 2 else f'loops 2..{K}'} from your function")
            got = _run_body(t, inp, t.fn, params, cfg, tokens, K)
            want = ref.looped_logits(params, tokens, cfg, variant, K)

            def hint():
                for other in ref_variants:
                    if other != variant and close(ref.looped_logits(params, tokens, cfg, other, K), got):
                        return (f"your loop computes {other}'s loop, not {variant}'s. {other}: {VARIANT_TEXT[other]}; "
                                f"{variant}: {VARIANT_TEXT[variant]}")
                for body, text in _wrong_bodies().get(variant, []):
                    if close(_run_body(t, inp, body, params, cfg, tokens, K, call=False), got):
                        return text
                if t.passed_where("L = 1 layer,") and L > 1:
                    return "right with one layer but not with several: which layers get h_{t-1}?"
            t.same(inp, got, want, f"the logits of tl.forward(variant={variant!r}, n_loops={K})", hint=hint)
    return check


for _name, _variant, _concept in [
        ("lt_loop", "LT", "the LT loop body: no injection"),
        ("lt_i_loop", "LT_i", "the LT_i loop body: additive input injection"),
        ("lt_ia_loop", "LT_ia", "the LT_ia loop body: attention injection at layer 0"),
        ("flt_res_loop", "FLT_res", "the FLT_res loop body: every layer, additive"),
        ("flt_loop", "FLT", "the FLT loop body: every layer, attention injection")]:
    exercise(_name, _concept, "[FLT] the 2x2 ablation; tl.forward; notebook 01")(_loop_body_check(_variant))


@exercise("cross_sequence_cosine", "the collapse diagnostic: cross-sequence cosine",
          "[FLT] diagnostics; tl.forward diag['cos_sim']; notebook 01")
def _check_cross_sequence_cosine(t):
    rng = _rng(30)
    base = rng.standard_normal((1, 3, 5))
    cases = [("random states, different norms per sequence", rng.standard_normal((3, 4, 5)) *
              onp.array([0.5, 1.0, 3.0])[:, None, None]),
             ("random states", rng.standard_normal((2, 3, 4))),
             ("states sharing a common part (cosines near 1)", base + 0.3 * rng.standard_normal((5, 3, 5))),
             ("every sequence the same state (collapse)", onp.repeat(base, 4, axis=0)),
             ("ONE sequence", rng.standard_normal((1, 3, 5)))]
    for what, x in cases:
        inp = f"x {_shape(x)}: {what}"
        got = t.call(inp, x.copy())
        want = ref.cross_sequence_cosine(x)

        def hint():
            B = x.shape[0]
            if B < 2:
                return "with one sequence there is no pair b != b': return float('nan')"
            u = x / onp.linalg.norm(x, axis=-1, keepdims=True)
            s = u.sum(0)
            if close(float(onp.mean(onp.sum(s * s, -1) / B ** 2)), got):
                return "you included each sequence with itself (b = b'): average over the B (B - 1) pairs b != b'"
            dots = onp.einsum("btd,ctd->tbc", x, x)
            off = ~onp.eye(B, dtype=bool)
            if close(float(onp.mean(dots[:, off])), got):
                return "normalise each state to unit length: a cosine, not a dot product"
            v = onp.einsum("btd,bsd->bts", u, u)
            T = x.shape[1]
            if T > 1 and close(float(onp.mean(v[:, ~onp.eye(T, dtype=bool)])), got):
                return "the pairs are different SEQUENCES (axis 0) at the same position, not different positions"
        t.same(inp, got, want, "the mean cosine", hint=hint)


def _sweep_batch(params, cfg, variant):
    """A batch where some sequences are exactly right at K = 1 and others partly, with 2-5 answer tokens per row."""
    tokens = _tokens(40, 4, 6)
    z1 = onp.asarray(ref.looped_logits(params, tokens, cfg, variant, 1))
    targets = z1.argmax(-1)
    mask = onp.zeros((4, 6))
    for b, (s, e) in enumerate([(3, 6), (1, 6), (4, 6), (2, 5)]):
        mask[b, s:e] = 1.0
    targets[2, 5] = (targets[2, 5] + 1) % cfg.vocab          # row 2: one answer token of two wrong
    targets[3, 2] = (targets[3, 2] + 3) % cfg.vocab          # row 3: one of three wrong
    return {"tokens": tokens, "targets": targets, "mask": mask}


@exercise("loop_count_sweep", "a test-time loop-count sweep", "[FLT] test-time compute; notebook 01")
def _check_loop_count_sweep(t):
    for variant, Ks, seed in (("FLT", [1, 2, 4], 4), ("LT_i", [5, 3, 1], 5)):
        params, cfg = _toy(2, seed=seed, n_loops=3)
        batch = _sweep_batch(params, cfg, variant)
        inp = (f"variant {variant} (trained at cfg.n_loops = 3), Ks = {Ks}, batch: tokens [4, 6], 2-5 answer tokens "
               f"per sequence")
        got = t.call(inp, copy.deepcopy(params), cfg, {k: v.copy() for k, v in batch.items()}, variant, list(Ks))
        want = ref.loop_count_sweep(params, cfg, batch, variant, Ks)

        def hint():
            at3 = ref.loop_count_sweep(params, cfg, batch, variant, [3])[3]
            if all(close(at3, got[K], rtol=1e-6) for K in Ks):
                return "every K gives the numbers of K = cfg.n_loops = 3: pass n_loops=K to tl.forward"
            m, tg = batch["mask"], batch["targets"]
            for K in Ks:
                z = onp.asarray(ref.looped_logits(params, batch["tokens"], cfg, variant, K))
                lse = onp.log(onp.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
                nll = lse - onp.take_along_axis(z, tg[..., None], -1)[..., 0]
                right = z.argmax(-1) == tg
                loss, exact = got[K]
                if close(float(nll.mean()), loss):
                    return "the loss averages over ALL positions; count only answer tokens (weight by the mask)"
                if close(float(onp.mean((nll * m).sum(1) / m.sum(1))), loss):
                    return ("the loss is ONE mean over all answer tokens (sum of mask * NLL / sum of mask), not a "
                            "mean of per-sequence means")
                if close(float((right * m).sum() / m.sum()), exact):
                    return "exact counts whole sequences (all answer tokens right), not the fraction of right tokens"
                if close(float(onp.mean(right.all(1))), exact):
                    return "only the answer tokens (mask 1) must be right, not every position"
        t.same(inp, got, want, "{K: (loss, exact)}", rtol=1e-7, atol=1e-10, hint=hint)


def _ns_variant(G, steps, normalise, coeffs=ref.MUON_NS_COEFFS, right=False):
    """Newton-Schulz with knobs, only for recognising mistakes (overflow is expected for some)."""
    a, b, c = coeffs
    with onp.errstate(all="ignore"):
        X = normalise(onp.asarray(G, dtype=float))
        tall = X.shape[0] > X.shape[1]
        X = X.T if tall else X
        for _ in range(steps):
            A = X @ X.T
            B = b * A + c * A @ A
            X = a * X + (X @ B if right else B @ X)
    return X.T if tall else X


@exercise("newton_schulz", "Muon's Newton-Schulz orthogonalisation", "[FLT] optimizer: authors' nanochat/muon.py")
def _check_newton_schulz(t):
    for i, (shape, steps, scale) in enumerate([((4, 4), 5, 1.0), ((3, 6), 5, 1.0), ((6, 3), 5, 1.0),
                                               ((5, 5), 2, 1.0), ((2, 7), 5, 100.0)]):
        G = scale * _rng(50 + i).standard_normal(shape)
        inp = f"G {_shape(G)} (||G||_F = {onp.linalg.norm(G):.3g}), steps = {steps}"
        got = t.call(inp, G.copy(), steps)
        want = ref.newton_schulz(G, steps)

        def hint():
            frob = lambda M: M / (onp.linalg.norm(M) + 1e-7)
            for kwargs, text in [
                    ({"normalise": lambda M: M / onp.linalg.norm(M, 2)},
                     "divide by the FROBENIUS norm ||G||_F (sqrt of the sum of squares), not the spectral norm"),
                    ({"normalise": lambda M: M / onp.linalg.norm(M)},
                     "divide by (||G||_F + 1e-7), as the authors do (the 1e-7 is missing)"),
                    ({"coeffs": ref.MUON_NS_COEFFS[::-1]},
                     "the coefficients are (a, b, c) = (3.4445, -4.7750, 2.0315) in X = a X + (b A + c A A) X"),
                    ({"right": True}, "X = a X + B X: B multiplies from the LEFT (B = b A + c A A, A = X X^T)"),
                    ({"normalise": lambda M: M}, "divide G by its Frobenius norm first: the iteration only "
                                                 "converges for singular values <= 1")]:
                if close(_ns_variant(G, steps, **{"normalise": frob, **kwargs}), got):
                    return text
            for s in range(8):
                if s != steps and close(_ns_variant(G, s, frob), got):
                    return f"that is {s} iterations: run exactly `steps` = {steps}"
            g = onp.asarray(got, dtype=float)
            if not onp.all(onp.isfinite(g)) or onp.abs(g).max() > 10:
                return "the iteration diverged: is G divided by its Frobenius norm first, and B X multiplied in order?"
        t.same(inp, got, want, "X", hint=hint)


# ============================================================================================================
# Part B · [TFL] the ODE view: integrators
# ============================================================================================================
def _field():
    W = _rng(1).standard_normal((4, 4)) / 2
    return lambda x: onp.tanh(x @ W.T)


@exercise("heun_step", "Heun's method from its Butcher tableau", "[TFL] ablation; tl.HEUN; notebook 03 (a)")
def _check_heun_step(t):
    F = _field()
    for i, (h, shape) in enumerate([(1.0, (3, 4)), (0.5, (3, 4)), (0.1, (2, 3, 4)), (0.25, (4,))]):
        x = _rng(60 + i).standard_normal(shape)
        inp = f"h = {h}, x {_shape(x)}, F(x) = tanh(x W^T)"
        got = t.call(inp, F, x.copy(), h)
        want = ref.heun_step(F, x, h)

        def hint():
            k1 = F(x)
            for v, text in [(x + h * 0.5 * (k1 + F(x + k1)), "h is missing in the second stage: k2 = F(x + h k1)"),
                            (x + 0.5 * (k1 + F(x + h * k1)), "the step is x + h (k1 + k2) / 2: the h is missing"),
                            (x + h * F(x + 0.5 * h * k1), "that is the midpoint method (A[2][1] = 1/2, b = (0, 1)); "
                                                          "Heun has A[2][1] = 1 and b = (1/2, 1/2)"),
                            (x + h * k1, "that is one Euler step: Heun adds a second stage k2 = F(x + h k1)")]:
                if close(v, got):
                    return text
            if t.passed_where("h = 1.0,") and h != 1.0:
                return "right at h = 1 but not here: h is missing somewhere"
        t.same(inp, got, want, "the new state", hint=hint)


@exercise("rk_step", "an explicit Runge-Kutta step from a Butcher tableau", "[TFL]; tl.rk_step; notebook 03 §2")
def _check_rk_step(t):
    F = _field()
    anch = ref.anchored_tableau(4, 0.25)
    cases = [("euler", *ref.TABLEAUS["euler"], 1.0), ("heun", *ref.TABLEAUS["heun"], 1.0),
             ("heun", *ref.TABLEAUS["heun"], 0.5), ("midpoint", *ref.TABLEAUS["midpoint"], 0.3),
             ("rk4", *ref.TABLEAUS["rk4"], 0.5), ("anchored(K=4, beta=0.25)", anch.A, anch.b, 0.7)]
    for i, (name, A, b, h) in enumerate(cases):
        x = _rng(70 + i).standard_normal((3, 4) if i % 2 else (2, 4))
        A_in = [list(r) for r in A] if i % 2 else A                 # tuples or lists: both are sequences
        inp = f"tableau {name} ({len(b)} stage{'s' * (len(b) > 1)}), h = {h}, x {_shape(x)}, F(x) = tanh(x W^T)"
        got = t.call(inp, F, x.copy(), h, A_in, tuple(b))
        want = ref.rk_step(F, x, h, A, b)

        def variant(stage_h=True, step_h=True, transpose=False):
            ks = []
            for r in range(len(b)):
                xi = x
                for j in range(r):
                    a = A[j][r] if transpose else A[r][j]
                    xi = xi + (h if stage_h else 1.0) * a * ks[j]
                ks.append(F(xi))
            return x + (h if step_h else 1.0) * sum(bi * k for bi, k in zip(b, ks))

        def hint():
            for kw, text in [({"stage_h": False}, "h is missing in the stage states: x + h sum_j A[i][j] k_j"),
                             ({"step_h": False}, "the step is x + h sum_i b_i k_i: the h is missing"),
                             ({"transpose": True}, "stage i reads row i of A: A[i][j] for j < i (you read A[j][i])")]:
                if close(variant(**kw), got):
                    return text
            if t.passed_where("h = 1.0,") and h != 1.0:
                return "right at h = 1 but not here: h is missing somewhere"
        t.same(inp, got, want, "the new state", hint=hint)


@exercise("anchored_tableau", "the anchored rule as a Butcher tableau, and its order", "[TFL]; notebook 03 (b)")
def _check_anchored_tableau(t):
    for K, beta in [(1, 0.5), (2, 0.0), (3, 0.5), (5, 0.25), (8, 1.0), (12, 0.9)]:
        inp = f"K = {K}, beta = {beta}"
        got = t.call(inp, K, beta)
        want = ref.anchored_tableau(K, beta)
        if not all(hasattr(got, f) for f in ("A", "b", "c", "order")):
            t.fail(inp, "a tl.Tableau(name, A, b, c, order)", _describe(got),
                   "return tl.Tableau(name, A, b, c, order)")
        for field in ("A", "b", "c"):
            def hint(field=field):
                g = onp.asarray(getattr(got, field), dtype=float)
                if field == "A" and g.shape == (K, K) and close(onp.diag(onp.full(K - 1, 1 / K), -1), g):
                    return ("x_{i-1} = x0 + sum_{j<i} k_j / K accumulates ALL earlier stages: A[i][j] = 1/K for "
                            "every j < i")
                if field == "b" and close(onp.array((1 - beta + beta / K,) + (beta / K,) * (K - 1)), g):
                    return "beta and 1 - beta are swapped: y0 = x0 + k_1 carries beta, x_K carries 1 - beta"
                if field == "b" and close(onp.full(K, 1 / K), g):
                    return "that is damped Euler's b (beta = 0); the anchored blend adds beta * y0 = beta (x0 + k_1)"
                if field == "c" and close(onp.arange(1, K + 1) / K, g):
                    return "stage i sits at t = (i - 1)/K: c_1 = 0 (c_i = sum_j A[i][j])"
            t.same(inp, onp.asarray(getattr(got, field), dtype=float), onp.asarray(getattr(want, field)),
                   field, rtol=1e-12, atol=1e-14, hint=hint)
        sbc = (1 - beta) * (K - 1) / (2 * K)
        t.same(inp, got.order, want.order, "order (the order conditions that hold)",
               hint=lambda: (f"the anchored method is first order for every K and beta: sum b = 1, but sum b c = "
                             f"(1 - beta)(K - 1)/(2K) = {sbc:.4g}, never 1/2 (order 2 is Heun's)")
               if got.order == 2 else "sum b = 1, so the method is consistent: at least order 1")


def _count_check(t, inp, calls, K, who="g"):
    if calls != K:
        t.fail(inp, f"{who} evaluated K = {K} times", f"{calls} evaluations",
               f"the natural pass y0 = {who}(x0) doubles as the first damped sub-step (x_1 = x0 + (y0 - x0)/K): "
               "K evaluations in all" if calls == K + 1 else None)


@exercise("damped_euler", "the damped Euler rule: K sub-steps over [0, 1]", "[TFL]; tl.loop_rule 'euler'")
def _check_damped_euler(t):
    maps = _maps()
    for K, (mname, g, x0) in [(1, maps[0]), (2, maps[0]), (3, maps[1]), (7, maps[0]), (4, maps[1])]:
        inp = f"K = {K}, {mname}"
        gc = _counted(g)
        got = t.call(inp, gc, x0.copy(), K)
        want = ref.loop_rule(g, x0, K, "euler")

        def hint():
            if close(ref.loop_rule(g, x0, K, "naive"), got):
                return ("that is naive repetition (K steps of size 1: integrating to t = K); damped Euler takes K "
                        "sub-steps of size 1/K over [0, 1]")
            x = x0
            for _ in range(K):
                x = x + (g(x) - x0) / K
            if close(x, got):
                return "the field is F_g(x) = g(x) - x at the CURRENT state x, not g(x) - x0"
            x = x0
            for _ in range(K - 1):
                x = x + (g(x) - x) / K
            if K > 1 and close(x, got):
                return "that is K - 1 sub-steps of size 1/K: take K of them to reach t = 1"
        t.same(inp, got, want, "the damped Euler end point", hint=hint)
        _count_check(t, inp, gc.calls, K)


@exercise("anchored_rk", "the anchored Runge-Kutta rule", "[TFL]'s fixed recipe; tl.loop_rule 'rk'")
def _check_anchored_rk(t):
    maps = _maps()
    for i, (K, beta) in enumerate([(1, 0.5), (3, 0.5), (3, 0.25), (6, 0.8), (4, 0.0), (2, 1.0)]):
        mname, g, x0 = maps[i % 2]
        inp = f"K = {K}, beta = {beta}, {mname}"
        gc = _counted(g)
        got = t.call(inp, gc, x0.copy(), K, beta)
        want = ref.loop_rule(g, x0, K, "rk", beta)

        def hint():
            y0, xK = g(x0), ref.loop_rule(g, x0, K, "euler")
            if close((1 - beta) * y0 + beta * xK, got):
                return "beta and 1 - beta are swapped: out = beta * y0 + (1 - beta) * x_K (right at beta = 0.5 only)"
            if close(beta * x0 + (1 - beta) * xK, got):
                return "the blend is with the natural pass y0 = g(x0), not with x0"
            if close(beta * y0 + (1 - beta) * ref.loop_rule(g, x0, K, "naive"), got):
                return "x_K is the DAMPED Euler end point (sub-steps of size 1/K), not naive repetition g^K(x0)"
            if t.passed_where("beta = 0.5,") and beta != 0.5:
                return "right at beta = 0.5 but not here: check which term gets beta"
        t.same(inp, got, want, "the anchored output", hint=hint)
        _count_check(t, inp, gc.calls, K)


@exercise("predict_K1", "the K = 1 reduction of each rule", "[TFL]; notebook 03 (c)")
def _check_predict_K1(t):
    for mname, g, x0 in _maps():
        for method in ref.LOOP_METHODS + ref.ABLATION_METHODS:
            inp = f"method {method!r}, {mname}"
            got = t.call(inp, method, g, x0.copy())
            want = ref.loop_rule(g, x0, 1, method)

            def hint():
                if method in ref.ABLATION_METHODS and close(g(x0), got):
                    return (f"only [TFL]'s rules return the natural pass at K = 1; {method} takes ONE classical step "
                            f"of size 1 on F_g(x) = g(x) - x")
                if method in ref.LOOP_METHODS:
                    return "at K = 1, [TFL]'s rules return the natural pass g(x0) itself"
                if method == "heun" and close(x0 + 0.5 * (g(x0) - x0) + 0.5 * (g(g(x0)) - x0), got):
                    return "k2 = F_g(x0 + k1) = g(g(x0)) - g(x0), evaluated at the Euler predictor g(x0)"
            t.same(inp, got, want, f"tl.loop_rule(g, x0, 1, {method!r})", rtol=1e-10, atol=1e-12, hint=hint)


@exercise("frozen_at_K1", "which rules are the frozen model at K = 1", "[TFL]; notebook 03 (c)")
def _check_frozen_at_K1(t):
    sets = []
    for mname, g, x0 in _maps():
        y = g(x0)
        sets.append({m for m in ref.LOOP_METHODS + ref.ABLATION_METHODS
                     if onp.array_equal(ref.loop_rule(g, x0, 1, m), y)})
    want = set.intersection(*sets)
    inp = "every method at K = 1, compared bit for bit with g(x0) on " + " and on ".join(m for m, _, _ in _maps())
    got = t.call(inp)

    def hint():
        g = set(got)
        if g & set(ref.ABLATION_METHODS):
            return "a classical method takes one full RK step of size 1 on F_g at K = 1: not g(x0)"
        if "rk" not in g:
            return "the anchored blend at K = 1 is beta g(x0) + (1 - beta) g(x0): tinyloop returns g(x0) as is"
    t.same(inp, got, want, "the methods", hint=hint)


# ============================================================================================================
# Part C · [TFL] looping a window of a frozen model
# ============================================================================================================
@exercise("loop_window", "block mode vs per-layer mode", "[TFL]; tl.loop_window; notebook 02 §3")
def _check_loop_window(t):
    params, cfg = _toy(5, seed=7)
    layers = ref.frozen_layers(params, cfg)
    x = ref.stem(params, cfg, _tokens(7, 2, 5))
    cases = [(1, 3, 2, "rk", 0.5, "block"), (1, 3, 2, "rk", 0.5, "per_layer"), (0, 1, 3, "euler", 0.5, "block"),
             (2, 4, 3, "euler", 0.5, "per_layer"), (2, 2, 3, "naive", 0.5, "block"), (0, 4, 2, "rk", 0.25, "per_layer")]
    for a, b, K, method, beta, mode in cases:
        rule_name = {"rk": f"anchored RK (beta {beta})", "euler": "damped Euler", "naive": "naive"}[method]
        inp = (f"a 5-layer tinyloop stack, state [2, 5, 8], window [{a}..{b}], K = {K}, rule {rule_name}, "
               f"mode {mode!r}")
        rule = _counted(lambda g, x0, K, method=method, beta=beta: ref.loop_rule(g, x0, K, method, beta))
        got = t.call(inp, list(layers), x.copy(), a, b, K, rule, mode)
        want = ref.loop_window(layers, x, a, b, K, method, beta, mode)

        def hint():
            other = "per_layer" if mode == "block" else "block"
            if b > a and close(ref.loop_window(layers, x, a, b, K, method, beta, other), got):
                return ("you applied the rule to each window layer in turn: that is per_layer mode; block mode applies "
                        "it ONCE, to g = L_b o ... o L_a" if mode == "block" else
                        "you applied the rule once to the whole window: that is block mode; per_layer applies it "
                        "to each window layer in turn")
            for a2, b2 in ((a, b - 1), (a + 1, b), (a - 1, b - 1)):
                if 0 <= a2 <= b2 and close(ref.loop_window(layers, x, a2, b2, K, method, beta, mode), got):
                    return "the window [a..b] is INCLUSIVE and 0-indexed: layers a, a + 1, ..., b"
            if close(ref.loop_window(layers[:b + 1], x, a, b, K, method, beta, mode), got):
                return "the layers after the window (b + 1 .. N - 1) still run, once each"
            if a > 0 and close(ref.loop_window(layers[a:], x, 0, b - a, K, method, beta, mode), got):
                return "the layers before the window (0 .. a - 1) run first, once each"
            n_calls = 1 if mode == "block" else b - a + 1
            if rule.calls != n_calls:
                return f"mode {mode!r} calls the rule {n_calls} time(s) here; yours called it {rule.calls} time(s)"
        t.same(inp, got, want, f"tl.loop_window(..., mode={mode!r})", hint=hint)


@exercise("moe_route", "top-k mixture-of-experts routing", "[TFL] MoE models; tl.moe")
def _check_moe_route(t):
    for i, (E, k) in enumerate([(4, 2), (6, 1), (5, 3), (3, 3)]):
        rng = _rng(80 + i)
        d, f = 8, 4
        u, router = rng.standard_normal((2, 5, d)), rng.standard_normal((d, E))
        p_moe = {"router": router, "w1": onp.zeros((E, d, f)), "w2": onp.zeros((E, f, d))}
        inp = f"u [2, 5, {d}], router [{d}, {E}] (E = {E} experts), top_k = {k}"
        got = t.call(inp, u.copy(), router.copy(), k)
        want = ref.moe_gates(p_moe, u, E, k)

        def hint():
            z = u @ router
            p = onp.exp(z - z.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            kept = onp.where(want > 0, p, 0.0)
            if close(kept, got):
                return "renormalise the kept probabilities so that each token's gates sum to 1"
            srt = onp.sort(p, -1)
            low = onp.where(p <= srt[..., k - 1:k], p, 0.0)
            if k < E and close(low / low.sum(-1, keepdims=True), got):
                return "keep the top_k LARGEST probabilities, not the smallest"
            if close(p, got):
                return "gates are zero off each token's top_k experts"
            q = onp.exp(z - z.max((0, 1), keepdims=True))
            if close(q / q.sum((0, 1), keepdims=True), got) or onp.ndim(got) == 3 and not close(
                    onp.sum(got, -1), onp.ones(z.shape[:2]), rtol=1e-6):
                return "the softmax is over the E experts of each token (the last axis), and the gates sum to 1"
        t.same(inp, got, want, "the gates [B, T, E]", hint=hint)


@exercise("frozen_routing_rule", "the MoE routing freeze", "[TFL] MoE layer mode")
def _check_frozen_routing_rule(t):
    params, cfg = _toy(1, seed=9, n_experts=4)
    p = params["layers"][0]
    x0 = ref.stem(params, cfg, _tokens(9, 2, 5))
    base = ref.moe_run(p, cfg)
    for K, beta in [(1, 0.5), (3, 0.5), (4, 0.25), (2, 0.9)]:
        inp = f"one MoE layer (E = 4 experts, top-2), state [2, 5, 8], K = {K}, beta = {beta}"
        log = []

        def run(x, routing=None):
            y, r = base(x, routing)
            log.append(routing)
            return y, r
        got = t.call(inp, run, x0.copy(), K, beta)
        if not log or log[0] is not None:
            t.fail(inp, "the first call of run to be the natural pass run(x0), which routes",
                   "no call" if not log else "a first call with a routing given",
                   "y0, routing = run(x0) picks the experts; the sub-steps reuse that routing")
        natural = base(x0)[1]
        for i, r in enumerate(log[1:], start=2):
            if r is None:
                t.fail(inp, f"call {i} of run (a sub-step) to reuse the natural pass's routing",
                       "run(x) with routing=None: it re-routed",
                       "that is routing thrash: every sub-step must call run(x, routing) with the routing of the "
                       "natural pass (the freeze)")
            if not (onp.array_equal(onp.asarray(r["idx"]), natural["idx"]) and close(
                    onp.asarray(r["gates"]), onp.asarray(natural["gates"]))):
                t.fail(inp, f"call {i} of run to reuse the natural pass's routing",
                       "a different routing (a later call's)", "freeze the routing of the FIRST call, run(x0)")
        _count_check(t, inp, len(log), K, who="run")
        want = ref.frozen_routing_rule(p, cfg, x0, K, beta)

        def hint():
            y0, xK = base(x0)[0], ref.frozen_routing_rule(p, cfg, x0, K, 0.0)      # beta = 0: x_K itself
            if close((1 - beta) * y0 + beta * xK, got):
                return "beta and 1 - beta are swapped: out = beta * y0 + (1 - beta) * x_K"
            if close(beta * x0 + (1 - beta) * xK, got):
                return "the blend is with the natural pass y0, not with x0"
        t.same(inp, got, want, "the anchored output with frozen routing", hint=hint)


@exercise("stash_pass", "the stash pass: what goes into the KV cache", "[TFL]; tl.generate; notebook 02 §5")
def _check_stash_pass(t):
    params, cfg = _toy(5, seed=11)
    layers = ref.frozen_layers(params, cfg)
    prompt = [3, 1, 4, 1]
    run_layer = ref.block_with_kv(params, cfg)
    for a, b, K, cache in [(1, 3, 3, "first"), (1, 3, 3, "last"), (0, 1, 2, "last"), (2, 2, 4, "first"),
                           (1, 2, 3, "none")]:
        x0 = ref.stem(params, cfg, onp.array([prompt]))
        for layer in layers[:a]:
            x0 = layer(x0)
        x_looped = ref.loop_window(layers[a:b + 1], x0, 0, b - a, K, "rk", 0.5, "block")
        inp = (f"5-layer model, prompt of 4 tokens, window [{a}..{b}] looped K = {K} times (anchored RK), "
               f"cache {cache!r}; entry [i][0] is k, [i][1] is v of window layer a + i")
        got = t.call(inp, run_layer, a, b, x0.copy(), x_looped.copy(), cache)
        want = ref.window_cache(params, cfg, prompt, a, b, K, "rk", 0.5, cache)

        def hint():
            if cache == "none":
                return "with cache 'none' nothing is written: every entry is None"
            other = ref.window_cache(params, cfg, prompt, a, b, K, "rk", 0.5, "last" if cache == "first" else "first")
            if close(other, got):
                return ("cache 'first' stashes from x0, the state BEFORE the loop (the frozen model's own K/V)"
                        if cache == "first" else "cache 'last' stashes from x_looped, the loop's output")
            start = x0 if cache == "first" else x_looped
            if b > a and close([run_layer(l, start)[1] for l in range(a, b + 1)], got):
                return ("in the stash pass each window layer is fed the previous window layer's output, not the "
                        "same start state")
        t.same(inp, got, want, "the cache entries of layers a..b", hint=hint)


@exercise("layer_evals_per_token", "the cost formula: a looped window costs (K + 1) n",
          "[TFL]; tl.layer_evals_per_token; notebook 02 §5, 03 (e)")
def _check_layer_evals_per_token(t):
    for N in range(1, 9):
        for n in range(1, N + 1):
            for K in range(1, 6):
                for looped in (True, False):
                    for stash in (True, False):
                        inp = f"n_layers = {N}, n_window = {n}, K = {K}, looped = {looped}, stash = {stash}"
                        got = t.call(inp, N, n, K, looped, stash)
                        want = ref.layer_evals_per_token(N, n, K, looped, stash)

                        def hint():
                            if not looped:
                                return "a token that is not looped runs the N layers once"
                            if stash and close(N + (K - 1) * n, got):
                                return ("the stash pass is missing: a looped token also runs the window once more "
                                        "to write the cache (+ n)")
                            if close(N + K * n + (n if stash else 0), got):
                                return ("the natural pass is the first of the K window passes: the layers outside "
                                        "the window cost N - n, the window K n (+ n for the stash pass)")
                            if not stash and close(N + (K - 1) * n + n, got):
                                return "stash=False: no stash pass"
                        t.same(inp, got, want, "the evaluations per token", hint=hint)


@exercise("generation_evals", "decode modes and their cost", "[TFL]; tl.generate; notebook 03 (e)")
def _check_generation_evals(t):
    params, cfg = _toy(5, seed=13)
    cases = [(1, 3, 3, "bypass", 0, "first", 4, 5), (1, 3, 3, "full", 0, "first", 4, 5),
             (1, 3, 3, "first_n", 2, "last", 4, 5), (1, 3, 2, "first_n", 9, "first", 3, 4),
             (1, 3, 4, "full", 0, "none", 4, 4), (2, 2, 1, "full", 0, "first", 3, 3),
             (1, 3, 3, "full", 0, "first", 4, 1), (2, 2, 2, "first_n", 1, "first", 3, 3)]
    N = cfg.n_layers
    for a, b, K, decode, first_n, cache, plen, n_new in cases:
        n = b - a + 1
        inp = (f"n_layers = {N}, window [{a}..{b}] (n_window = {n}), K = {K}, prompt_len = {plen}, n_new = {n_new}, "
               f"decode = {decode!r}, first_n = {first_n}, cache = {cache!r}")
        got = t.call(inp, N, n, K, plen, n_new, decode, first_n, cache)
        want = ref.generation_evals(params, cfg, list(range(1, plen + 1)), n_new, a, b, K, decode, first_n, cache)

        def hint():
            per = ref.layer_evals_per_token(N, n, K, True, cache != "none")
            looped_fed = lambda fed: {"bypass": 0, "full": fed, "first_n": min(first_n, fed)}[decode]
            for fed, text in [(n_new, "the LAST generated token is never fed back: n_new - 1 tokens go through the "
                                      "model after the prefill")]:
                if close((plen + looped_fed(fed)) * per + (fed - looped_fed(fed)) * N, got):
                    return text
            fed = max(n_new - 1, 0)
            if decode == "first_n" and close((plen + first_n) * per + (fed - first_n) * N, got):
                return "first_n may exceed the number of fed-back tokens: at most n_new - 1 of them loop"
            if cache != "none" and close((plen + looped_fed(fed)) * (per - n) + (fed - looped_fed(fed)) * N, got):
                return "the stash pass is missing: each looped token runs the window once more (+ n)"
            if close(plen * N + looped_fed(fed) * per + (fed - looped_fed(fed)) * N, got):
                return "the prefill always loops when a window is given (whatever the decode mode)"
        t.same(inp, got, want, "info['layer_evals'] of tl.generate", hint=hint)


@exercise("depth_fraction", "the depth fraction of a window", "[TFL]; notebook 02 §4, 03 (d)")
def _check_depth_fraction(t):
    for N in range(2, 13):
        for a in range(N):
            for b in range(a, N):
                inp = f"a = {a}, b = {b}, n_layers = {N}"
                got = t.call(inp, a, b, N)
                want = ref.depth_fraction(a, b, N)

                def hint():
                    for v, text in [((a + b) / 2 / (N - 1), "divide by N, the number of layers, not N - 1"),
                                    ((a + b + 2) / 2 / N, "layers are 0-indexed: the centre is (a + b) / 2"),
                                    ((a + b + 1) / 2 / N, "the window [a..b] is inclusive: its centre is (a + b) / 2"),
                                    ((b - a) / 2 / N, "the centre is (a + b) / 2, not (b - a) / 2")]:
                        if close(v, got):
                            return text
                t.same(inp, got, want, "(a + b) / 2 / N", rtol=1e-12, atol=1e-14, hint=hint)


@exercise("best_window", "placing a window by its depth fraction", "[TFL]; notebook 03 (d)")
def _check_best_window(t):
    for N in (8, 30, 36, 5, 12, 2):
        for width in range(1, min(N, 5) + 1):
            for target in (0.0, 0.3, 0.48, 0.5, 0.71, 1.0):
                inp = f"n_layers = {N}, width = {width}, target = {target}"
                got = t.call(inp, N, width, target)
                best = ref.best_window_distance(N, width, target)
                example = min(range(N - width + 1), key=lambda s: abs(ref.depth_fraction(s, s + width - 1, N) - target))
                expected = (f"a window of {width} layer(s) inside 0..{N - 1} whose depth fraction is closest to "
                            f"{target}: [{example}..{example + width - 1}] "
                            f"({ref.depth_fraction(example, example + width - 1, N):.4g})")
                ok_type = (isinstance(got, (tuple, list)) and len(got) == 2
                           and all(isinstance(v, (int, onp.integer)) for v in got))
                if not ok_type:
                    t.fail(inp, expected, _describe(got), "return a tuple of two ints (a, b)")
                a, b = int(got[0]), int(got[1])
                if b - a + 1 != width:
                    t.fail(inp, expected, f"[{a}..{b}]: {b - a + 1} layers",
                           "b is inclusive: b = a + width - 1" if b - a == width else None)
                if a < 0 or b > N - 1:
                    t.fail(inp, expected, f"[{a}..{b}]: outside the stack 0..{N - 1}",
                           "keep the window inside the stack: 0 <= a <= N - width")
                dist = abs(ref.depth_fraction(a, b, N) - target)
                if dist > best + 1e-12:
                    t.fail(inp, expected, f"[{a}..{b}] ({ref.depth_fraction(a, b, N):.4g}), off the target by "
                           f"{dist:.4g} instead of {best:.4g}", "the centre (a + b) / 2 should sit near target * N")
                t.passed.append(inp)


# ============================================================================================================
# Part D · A real checkpoint
# ============================================================================================================
def _q4_1_blocks(n, seed):
    rng = _rng(90 + seed)
    d = (rng.uniform(0.01, 0.2, (n, 1)) * rng.choice([-1, 1], (n, 1))).astype(onp.float16)
    m = rng.uniform(-1, 1, (n, 1)).astype(onp.float16)
    codes = rng.integers(0, 256, (n, 16), dtype=onp.uint8)
    return onp.concatenate([d.view(onp.uint8), m.view(onp.uint8), codes], axis=1)


@exercise("dequantize_q4_1", "the Q4_1 weight format of the real checkpoint", "notebook 04; tinyloop section 9")
def _check_dequantize_q4_1(t):
    for i, n in enumerate((1, 3, 8)):
        blocks = _q4_1_blocks(n, i)
        inp = f"{n} block(s): uint8 [{n}, 20] (random scales of both signs, random codes)"
        got = t.call(inp, blocks.copy())
        want = ref.dequantize_q4_1(blocks)

        def hint():
            d = blocks[:, 0:2].copy().view(onp.float16).astype(onp.float32)
            m = blocks[:, 2:4].copy().view(onp.float16).astype(onp.float32)
            lo, hi = blocks[:, 4:] & 15, blocks[:, 4:] >> 4
            for codes, text in [(onp.stack([lo, hi], -1).reshape(n, 32),
                                 "the nibbles are not interleaved: the 16 LOW nibbles are weights 0..15, the 16 high "
                                 "nibbles weights 16..31"),
                                (onp.concatenate([hi, lo], 1), "low nibbles first: byte j holds weight j in its low "
                                                               "nibble, weight j + 16 in its high nibble")]:
                if close((d * codes + m).reshape(-1), got, rtol=1e-6, atol=1e-6):
                    return text
            if close((d * onp.concatenate([lo, hi], 1)).reshape(-1), got, rtol=1e-6, atol=1e-6):
                return "the minimum m is missing: w = d * code + m"
        t.same(inp, got, want, "the weights [n * 32]", rtol=1e-6, atol=1e-6, hint=hint)


# ============================================================================================================
# Loading a student's work, and the command line
# ============================================================================================================
def load_file(path):
    """The namespace of a student's .py file, or of the code cells of a .ipynb that define an exercise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no file {path!r}; start one with  cp coursework/exercises.py {path}")
    if path.endswith(".ipynb"):
        with open(path) as f:
            nb = json.load(f)
        import numpy
        import tinyloop
        ns = {"np": numpy, "tl": tinyloop, "math": math, "__name__": "student_notebook"}
        for i, cell in enumerate(nb["cells"]):
            src = "".join(cell["source"])
            if cell["cell_type"] == "code" and any(f"def {n}(" in src for n in EXERCISES):
                exec(compile(src, f"{path} (cell {i})", "exec"), ns)
        return ns
    spec = importlib.util.spec_from_file_location("student_answers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STATUS_TAG = {"ok": "ok      ", "not done": "todo    ", "wrong": "WRONG   ", "error": "ERROR   ", "missing": "MISSING "}


def report(results, out=sys.stdout):
    """Print one line per exercise (a block for the wrong ones) and a summary line."""
    for r in results:
        lines = r.message.split("\n")
        print(f"{STATUS_TAG[r.status]}{lines[0]}", file=out)
        for line in lines[1:]:
            print(f"{'':8}{line}", file=out)
    counts = {s: sum(r.status == s for r in results) for s in STATUS_TAG}
    print(f"\n{len(results)} exercise{'s' * (len(results) != 1)}: {counts['ok']} ok, {counts['wrong']} wrong, "
          f"{counts['error']} errors, "
          f"{counts['not done']} not done yet" + (f", {counts['missing']} missing" if counts["missing"] else ""),
          file=out)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m coursework.grade", description=__doc__.split("\n\n")[0])
    p.add_argument("file", nargs="?", help="your answers: a .py file (a copy of coursework/exercises.py) or a .ipynb")
    p.add_argument("-k", dest="keyword", default=None, help="only the exercises whose name contains this")
    p.add_argument("--solutions", action="store_true", help="grade coursework/solutions.py")
    p.add_argument("--list", action="store_true", help="list the exercises and exit")
    args = p.parse_args(argv)
    if args.list:
        for ex in EXERCISES.values():
            print(f"{ex.name:24s} {ex.concept}  ({ex.source})")
        return 0
    if args.solutions:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "solutions.py")
    elif args.file:
        path = args.file
    else:
        p.error("give the file to grade, e.g.  python -m coursework.grade my_answers.py  "
                "(start it with  cp coursework/exercises.py my_answers.py)")
    names = [n for n in EXERCISES if args.keyword is None or args.keyword in n]
    if not names:
        p.error(f"-k {args.keyword!r} matches no exercise; see --list")
    try:
        ns = load_file(path)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    except Exception as e:                        # a syntax error, or an error at import time
        tb = traceback.extract_tb(e.__traceback__)
        line = getattr(e, "lineno", None) or (tb[-1].lineno if tb else "?")
        print(f"could not load {path}: {type(e).__name__}: {e} (line {line})", file=sys.stderr)
        return 2
    if path.endswith(".ipynb"):                   # a notebook holds some of the exercises: grade those
        names = [n for n in names if n in ns]
    print(f"grading {path}\n")
    results = grade_namespace(ns, names)
    report(results)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
