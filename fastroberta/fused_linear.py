"""Linear layers whose input also feeds the next LayerNorm's residual: the input's two gradients are summed inside
the dgrad GEMM; and the FFN with GELU inside its GEMMs.

In a post-LN layer the input x of the QKV projection is also the residual of the attention LayerNorm, and the
input of the FFN's first linear is also the residual of the FFN LayerNorm. Autograd would compute dx = dy W in one
GEMM and then add the LayerNorm's dresidual in a separate pass that reads two [tokens, hidden] tensors and writes
a third. ``linear_and_input(x, w, b)`` returns ``(x W^T + b, x)``: the caller passes the second output on as the
residual, so both gradients reach one backward, which computes dx = dresidual + dy W as one ``addmm`` (the GEMM's
beta = 1 epilogue reads dresidual once).

``feed_forward_and_input(x, w1, b1, w2, b2, linear_gelu, dgrad_gelu_bias_grad)`` is the whole FFN,
``(GELU(x W1^T + b1) W2^T + b2, x)``, the same way (the model passes b2 = None and gives the second bias to the
LayerNorm after it, whose backward kernel sums its gradient: no pass over the [tokens, hidden] gradient here),
with the [tokens, intermediate] work in two ops of the kernel switch: ``linear_gelu`` (the first linear, writing
pre-activation and activation) and ``dgrad_gelu_bias_grad`` (the second linear's dgrad times GELU'(pre), and the
first bias's gradient). The Triton ops (``kernels/linear_gelu.py``) run GELU and its derivative in the GEMMs'
epilogues, so those tensors make no elementwise pass of their own; the torch ops are cuBLAS and aten's GELU and
GELU backward.

Under autocast the inputs are cast once to the autocast dtype, as ``F.linear`` would; the gradients come back
in the parameters' own dtypes.
"""
import torch
import torch.nn.functional as F


def _compute_dtype(x):
    kind = x.device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _dgrad(dy2, weight, dx_other, shape):
    """dx = dx_other + dy W as one GEMM (dx_other may be None: the residual needs no gradient)."""
    if dx_other is None:
        return (dy2 @ weight).view(shape)
    return torch.addmm(dx_other.reshape(dy2.shape[0], -1).to(dy2.dtype), dy2, weight).view(shape)


class _LinearAndInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        dtype = _compute_dtype(x)
        xc, wc, bc = _cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype)
        ctx.save_for_backward(xc, wc)
        ctx.has_bias = bias is not None
        return F.linear(xc, wc, bc), x.view_as(x)

    @staticmethod
    def backward(ctx, dy, dx_other):
        x, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).to(weight.dtype)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _dgrad(dy2, weight, dx_other, x.shape)
        if ctx.needs_input_grad[1]:
            dw = dy2.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


class _FeedForwardAndInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, linear_gelu, dgrad_gelu_bias_grad):
        dtype = _compute_dtype(x)
        xc, w1c, b1c, w2c, b2c = (_cast(t, dtype) for t in (x, w1, b1, w2, b2))
        pre, act = linear_gelu(xc.reshape(-1, xc.shape[-1]), w1c, b1c)
        ctx.save_for_backward(xc, w1c, w2c, pre, act)
        ctx.dgrad_gelu_bias_grad = dgrad_gelu_bias_grad
        return F.linear(act, w2c, b2c).view(*x.shape[:-1], w2.shape[0]), x.view_as(x)

    @staticmethod
    def backward(ctx, dout, dx_other):
        x, w1, w2, pre, act = ctx.saved_tensors
        dout2 = dout.reshape(-1, dout.shape[-1]).to(w2.dtype)
        dpre, db1 = ctx.dgrad_gelu_bias_grad(dout2, w2, pre)
        dx = _dgrad(dpre, w1, dx_other, x.shape) if ctx.needs_input_grad[0] else None
        dw1 = dpre.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        dw2 = dout2.t() @ act if ctx.needs_input_grad[3] else None
        db2 = dout2.sum(0) if ctx.needs_input_grad[4] else None  # False without b2
        return dx, dw1, db1.to(w1.dtype) if ctx.needs_input_grad[2] else None, dw2, db2, None, None


def linear_and_input(x, weight, bias=None):
    """``(F.linear(x, weight, bias), x)``; pass the second output on to the other consumer of x (see the module
    docstring) so that x's two gradients are summed in the dgrad GEMM."""
    return _LinearAndInput.apply(x, weight, bias)


def feed_forward_and_input(x, w1, b1, w2, b2, linear_gelu, dgrad_gelu_bias_grad):
    """``(F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2), x)``; the second output as in ``linear_and_input``.
    ``linear_gelu(x, w1, b1) -> (pre, act)`` and ``dgrad_gelu_bias_grad(dout, w2, pre) -> (dpre, db1)`` on
    [rows, n] tensors are the kernel switch's ops (see the module docstring). b1 is required; b2 may be None (the
    caller adds it later, e.g. as the next LayerNorm's ``input_bias``)."""
    return _FeedForwardAndInput.apply(x, w1, b1, w2, b2, linear_gelu, dgrad_gelu_bias_grad)

