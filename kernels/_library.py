"""The ``torch.library`` namespace of the kernels' custom ops.

Every Triton kernel is reached through a custom op (``torch.ops.fastroberta.<name>``) whose real
implementation is the plain host launch function in the kernel's module (``_<op>_forward`` /
``_<op>_backward``), with a fake (meta) implementation that gives the outputs' shapes, dtypes and strides
without running anything, and an autograd formula whose backward calls the backward op. ``torch.compile``
then traces the model through the ops without a graph break (Dynamo never looks inside an op), and eager
code runs the same launch functions. ARCHITECTURE.md ("Custom ops") has the rules an op follows.
"""
import torch

NAMESPACE = "fastroberta"


def custom_op(name):
    """``torch.library.custom_op`` in the fastroberta namespace; the ops mutate none of their inputs."""
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())
