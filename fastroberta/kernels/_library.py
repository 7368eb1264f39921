"""The ``torch.library`` namespace of the kernels' custom ops.

Every Triton kernel is reached through a custom op (``torch.ops.fastroberta.<name>``) whose real
implementation is the plain host launch function in the kernel's module (``_<op>_forward`` /
``_<op>_backward``), with a fake (meta) implementation that gives the outputs' shapes, dtypes and strides
without running anything, and an autograd formula whose backward calls the backward op. ``torch.compile``
then traces the model through the ops without a graph break (Dynamo never looks inside an op), and eager
code runs the same launch functions. ARCHITECTURE.md ("Custom ops and torch.compile") has the rules an op follows.

``observe(mode)``: a ``TorchFunctionMode`` that handles a custom-op call is switched off while the op runs, so
it would not see the launch code inside; ``observe`` enters it again inside every op implementation for as long
as it lasts (``tests/test_syncs.py`` counts host syncs in the launch code this way).
"""
import contextlib
import functools

import torch

NAMESPACE = "fastroberta"
_OBSERVERS = []


@contextlib.contextmanager
def observe(mode):
    """Enter ``mode`` (a context manager, e.g. a TorchFunctionMode) inside every op implementation meanwhile."""
    _OBSERVERS.append(mode)
    try:
        yield mode
    finally:
        _OBSERVERS.remove(mode)


def custom_op(name):
    """``torch.library.custom_op`` in the fastroberta namespace; the ops mutate none of their inputs."""
    def register(fn):
        @functools.wraps(fn)  # the schema is inferred from fn's signature (inspect follows __wrapped__)
        def implementation(*args):
            if not _OBSERVERS:
                return fn(*args)
            with contextlib.ExitStack() as stack:
                for mode in list(_OBSERVERS):
                    stack.enter_context(mode)
                return fn(*args)
        return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())(implementation)
    return register
