"""A wall-clock budget for a pytest session: FASTROBERTA_TEST_BUDGET_S seconds (unset or 0: none).

Counted from the session's start (collection included); once the budget is spent every remaining test is skipped with a reason that says so, so the session ends on
its own and pytest prints its summary: counts of what passed and failed, and how many tests the budget left
out. ``benchmarks/gpu_check.sh`` sets it a little under its tests stage's limit, where a killed pytest would
print nothing. Loaded by tests/conftest.py; ``pytest -p time_budget`` (with tests/ on the path) elsewhere.

What a budget reaches depends on the order, so FASTROBERTA_TESTS_FIRST (space-separated node ids without their
parameters, e.g. ``tests/test_gpu_kernels.py::test_linear_gelu_real_shapes``) moves those tests to the front, in
that order; the rest keep pytest's order. (Naming a test before its file on the command line does not: pytest
collects a file once, in the file's order.)"""
import os
import time

import pytest

_START = [time.monotonic()]
_LEFT_OUT = []


def _budget():
    value = os.environ.get("FASTROBERTA_TEST_BUDGET_S", "").strip()
    try:
        return float(value) if value else 0.0
    except ValueError:
        raise pytest.UsageError(f"FASTROBERTA_TEST_BUDGET_S must be a number of seconds, got {value!r}") from None


def pytest_sessionstart(session):
    _START[0] = time.monotonic()


def pytest_collection_modifyitems(items):
    first = os.environ.get("FASTROBERTA_TESTS_FIRST", "").split()
    if first:
        rank = {nodeid: i for i, nodeid in enumerate(first)}
        items.sort(key=lambda item: rank.get(item.nodeid.split("[")[0], len(first)))


def pytest_runtest_setup(item):
    budget = _budget()
    if budget and time.monotonic() - _START[0] > budget:
        _LEFT_OUT.append(item.nodeid)
        pytest.skip(f"not run: FASTROBERTA_TEST_BUDGET_S={budget:g} s spent")


def pytest_terminal_summary(terminalreporter):
    if _LEFT_OUT:
        terminalreporter.write_line(f"time budget: {len(_LEFT_OUT)} tests not run "
                                    f"(FASTROBERTA_TEST_BUDGET_S={_budget():g}), first {_LEFT_OUT[0]}")
