"""Eager calls reach the kernels' launch code directly (``_library.call``), not through torch.library's
dispatch: the same launch code, so outputs and gradients are bit-identical to the custom-op path for one seed."""
import pytest
import torch

from fastroberta import fused_linear
from fastroberta.kernels import _library, attention_packed, layer_norm, mlm_cross_entropy
from fastroberta.kernels.linear_gelu import dgrad_gelu_bias_grad, linear_gelu


def _run(direct, fn, inputs):
    torch.manual_seed(0)
    leaves = [t.detach().clone().requires_grad_(t.dtype.is_floating_point) for t in inputs]
    before = _library.EAGER_DIRECT
    _library.EAGER_DIRECT = direct
    try:
        out = fn(*leaves)
        out.float().sum().backward()
    finally:
        _library.EAGER_DIRECT = before
    return [out] + [t.grad for t in leaves if t.requires_grad]


g = torch.Generator().manual_seed(1)
CASES = {
    "layer_norm": (lambda x, r, w, b: layer_norm(x, w, b, residual=r, dropout_p=0.2),
                   [torch.randn(4, 32, generator=g) for _ in range(2)]
                   + [torch.randn(32, generator=g) for _ in range(2)]),
    "attention_packed": (lambda qkv: attention_packed(qkv, None, dropout_p=0.2),
                         [torch.randn(1, 16, 3, 2, 16, generator=g)]),
    "mlm_cross_entropy": (lambda h, w, b, y: mlm_cross_entropy(h, w, b, y),
                          [torch.randn(8, 16, generator=g), torch.randn(64, 16, generator=g),
                           torch.randn(64, generator=g), torch.tensor([1, -100, 5, 7, -100, 63, 0, 2])]),
    "feed_forward": (lambda x, w1, b1, w2, b2: fused_linear.feed_forward_and_input(
        x, w1, b1, w2, b2, linear_gelu, dgrad_gelu_bias_grad)[0],
        [torch.randn(16, 16, generator=g), torch.randn(32, 16, generator=g), torch.randn(32, generator=g),
         torch.randn(16, 32, generator=g), torch.randn(16, generator=g)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_direct_path_matches_custom_op_bitwise(name):
    fn, inputs = CASES[name]
    direct, custom = _run(True, fn, inputs), _run(False, fn, inputs)
    assert len(direct) == len(custom)
    for a, b in zip(direct, custom):
        assert torch.equal(a, b)


def test_no_grad_path_matches_custom_op_bitwise():
    x, r, w, b = CASES["layer_norm"][1]
    outs = []
    for direct in (True, False):
        torch.manual_seed(0)
        before, _library.EAGER_DIRECT = _library.EAGER_DIRECT, direct
        try:
            with torch.no_grad():
                outs.append(layer_norm(x, w, b, residual=r, dropout_p=0.2))
        finally:
            _library.EAGER_DIRECT = before
    assert torch.equal(*outs)


def test_custom_op_path_under_a_dispatch_mode():
    # A dispatch mode (fake tensors, the step cost model's counter) must see the op, not its inside.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.namespace)
            return func(*args, **(kwargs or {}))
    x = torch.randn(4, 32)
    with Seen():
        layer_norm(x, None, None)
    assert "fastroberta" in Seen.names
