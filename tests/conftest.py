"""Test set-up: without CUDA, Triton kernels run on CPU tensors through Triton's interpreter, which must be
switched on before any kernel module is imported; FASTROBERTA_TEST_BUDGET_S caps a session's wall time and
FASTROBERTA_TESTS_FIRST puts named tests first (tests/time_budget.py)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from time_budget import (pytest_collection_modifyitems, pytest_runtest_setup,  # noqa: E402,F401  (hooks)
                         pytest_sessionstart, pytest_terminal_summary)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_inherited_rendezvous():
    """An in-process DeepSpeed run sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT and keeps listening
    on that port for the rest of the session (its process group is reused); a training process a later test
    starts must not inherit them, or it fails to listen on the same port (EADDRINUSE). A later in-process run
    finds its group initialised and only sets them again."""
    before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
