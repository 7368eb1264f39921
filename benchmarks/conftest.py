"""pytest set-up for ``pytest benchmarks/ --benchmark-only``: the benchmark files are named bench_*.py (they are
not part of the unit-test suite under tests/), so they are collected here; without CUDA, Triton's interpreter
is switched on before any kernel module is imported (the suite then runs its smoke profile)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
