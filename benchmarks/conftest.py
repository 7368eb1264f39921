"""pytest set-up for ``pytest benchmarks/ --benchmark-only``: the benchmark files are named bench_*.py (they are
not part of the unit-test suite under tests/), so they are collected here; without CUDA, Triton's interpreter
is switched on before any kernel module is imported (the suite then runs its smoke profile, and the session
header and every benchmark group name say that its timings are no performance result)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _smoke():
    from benchmarks import pytest_support
    return pytest_support.profile() == "smoke"


def pytest_report_header(config):
    if _smoke():
        from benchmarks import harness
        return harness.SMOKE_BANNER.splitlines()
    return None


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if _smoke():
        from benchmarks import harness
        terminalreporter.write_line(f"benchmarks above: {harness.SMOKE_LABEL} (Triton interpreter on CPU; "
                                    "run bash benchmarks/gpu_check.sh on a GPU for performance results)")


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
