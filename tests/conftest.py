"""Test set-up: without CUDA, Triton kernels run on CPU tensors through Triton's interpreter, which must be
switched on before any kernel module is imported; FASTROBERTA_TEST_BUDGET_S caps a session's wall time
(tests/time_budget.py)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from time_budget import pytest_runtest_setup, pytest_sessionstart, pytest_terminal_summary  # noqa: E402,F401  (hooks)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
