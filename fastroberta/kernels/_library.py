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

Eager calls skip ``torch.library``'s dispatch (``call``): its Python-side handling costs a custom op tens of
microseconds per call on the host (``python -m benchmarks host``), more than a small kernel runs. Where nothing
needs to see the op itself (not while torch.compile traces, under a dispatch mode such as fake tensors or the
step cost model's counter, on meta tensors, or while ``observe`` is on), ``call`` runs the op's implementation
directly, through a plain ``torch.autograd.Function`` holding the op's own autograd formula when it has one
(``register_autograd``; with grad mode off, the implementation alone): the same launch code, so the same
results. ``EAGER_DIRECT = False`` turns that off.

``COSTS``: for each op, a function of the op's arguments that says what its launch code runs on a GPU: a list
of ``KernelCost`` (one per kernel launch: FLOPs, bytes read, bytes written). ``benchmarks/bench_model.py``
counts a whole training step with them on meta tensors, where the ops' fake implementations run instead.
"""
import contextlib
import functools
from typing import NamedTuple

import torch

NAMESPACE = "fastroberta"
_OBSERVERS = []
COSTS = {}
EAGER_DIRECT = True


class KernelCost(NamedTuple):
    """One kernel launch of an op: ``kind`` is the class it counts in (GEMM, attention, norm, loss, ...);
    ``flops`` are tensor-core FLOPs (matmuls; the vector work beside them is not counted)."""
    name: str
    kind: str
    flops: float
    read: float
    written: float


def register_cost(name):
    """Register ``fn(*op_args) -> [KernelCost, ...]`` as what op ``name`` launches."""
    def register(fn):
        COSTS[f"{NAMESPACE}::{name}"] = fn
        return fn
    return register


def nbytes(t):
    """Bytes a kernel touches reading or writing all of ``t`` once (None: 0; stride-0 dims counted once)."""
    if t is None:
        return 0
    n = t.element_size()
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n if t.numel() else 0


def cdiv(a, b):
    """``triton.cdiv`` for the host's grid arithmetic: Triton 3.9 makes ``triton.cdiv`` and
    ``triton.next_power_of_2`` constexpr functions whose every host call unwraps its arguments (microseconds each,
    tens of them per training step)."""
    return -(-a // b)


def next_power_of_2(n):
    """``triton.next_power_of_2`` for the host (see ``cdiv``): the least power of 2 >= n, 0 for n = 0."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


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
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())(implementation)
        op._direct = op._implementation = fn
        return op
    return register


def register_autograd(op, grad, setup_context):
    """``op.register_autograd(grad, setup_context=setup_context)``, and the same formula as a plain
    ``torch.autograd.Function`` that ``call`` runs in eager mode."""
    op.register_autograd(grad, setup_context=setup_context)
    implementation = op._implementation

    class Direct(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out = implementation(*args)
            setup_context(ctx, args, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return grad(ctx, *grads)
    Direct.__name__ = Direct.__qualname__ = f"{op._qualname.split('::')[-1]}_direct"
    op._direct = Direct.apply


def call(op, *args):
    """``op(*args)``, or the op's implementation (with its autograd formula while grad mode is on) called
    directly where nothing needs to see the op (see the module docstring); ``args[0]`` is a tensor."""
    if (not torch.compiler.is_compiling() and EAGER_DIRECT and not _OBSERVERS
            and not torch._C._len_torch_dispatch_stack() and not args[0].is_meta):
        return op._direct(*args) if torch.is_grad_enabled() else op._implementation(*args)
    return op(*args)
