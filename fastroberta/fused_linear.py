"""Linear layers whose input also feeds the next LayerNorm's residual: the input's two gradients are summed inside
the dgrad GEMM.

In a post-LN layer the input x of the QKV projection is also the residual of the attention LayerNorm, and the
input of the FFN's first linear is also the residual of the FFN LayerNorm. Autograd would compute dx = dy W in one
GEMM and then add the LayerNorm's dresidual in a separate pass that reads two [tokens, hidden] tensors and writes
a third. ``linear_and_input(x, w, b)`` returns ``(x W^T + b, x)``: the caller passes the second output on as the
residual, so both gradients reach one backward, which computes dx = dresidual + dy W as one ``addmm`` (the GEMM's
beta = 1 epilogue reads dresidual once). ``linear_gelu_and_input`` does the same for the FFN's first linear and
returns GELU(x W^T + b); its backward runs the GELU derivative and the bias gradient together
(``gelu_backward_bias_grad``).

``feed_forward_and_input(x, w1, b1, w2, b2)`` is the whole FFN, ``(GELU(x W1^T + b1) W2^T + b2, x)``, on the
Triton GEMMs of ``kernels/linear_gelu.py``: GELU runs in the first GEMM's epilogue (which writes pre-activation
and activation) and its derivative in the epilogue of the second linear's dgrad GEMM (which writes dpre and the
first bias's gradient), so the [tokens, intermediate] tensors make no elementwise pass of their own.

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


class _LinearGeluAndInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, backward_op):
        dtype = _compute_dtype(x)
        xc, wc, bc = _cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype)
        pre = F.linear(xc, wc, bc)
        ctx.save_for_backward(xc, wc, pre)
        ctx.has_bias, ctx.bias_dtype, ctx.backward_op = bias is not None, dtype, backward_op
        return F.gelu(pre), x.view_as(x)

    @staticmethod
    def backward(ctx, dact, dx_other):
        x, weight, pre = ctx.saved_tensors
        pre2 = pre.reshape(-1, pre.shape[-1])
        dpre, db = ctx.backward_op(dact.reshape(pre2.shape).to(pre.dtype), pre2)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _dgrad(dpre, weight, dx_other, x.shape)
        if ctx.needs_input_grad[1]:
            dw = dpre.t() @ x.reshape(-1, x.shape[-1])
        return dx, dw, db.to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None, None


class _FeedForwardAndInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        from fastroberta.kernels.linear_gelu import linear_gelu
        dtype = _compute_dtype(x)
        xc, w1c, b1c, w2c, b2c = (_cast(t, dtype) for t in (x, w1, b1, w2, b2))
        pre, act = linear_gelu(xc.reshape(-1, xc.shape[-1]), w1c, b1c)
        ctx.save_for_backward(xc, w1c, w2c, pre, act)
        return F.linear(act, w2c, b2c).view(*x.shape[:-1], w2.shape[0]), x.view_as(x)

    @staticmethod
    def backward(ctx, dout, dx_other):
        from fastroberta.kernels.linear_gelu import dgrad_gelu_bias_grad
        x, w1, w2, pre, act = ctx.saved_tensors
        dout2 = dout.reshape(-1, dout.shape[-1]).to(w2.dtype)
        dpre, db1 = dgrad_gelu_bias_grad(dout2, w2, pre)
        dx = _dgrad(dpre, w1, dx_other, x.shape) if ctx.needs_input_grad[0] else None
        dw1 = dpre.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        dw2 = dout2.t() @ act if ctx.needs_input_grad[3] else None
        db2 = dout2.sum(0) if ctx.needs_input_grad[4] else None
        return dx, dw1, db1.to(w1.dtype) if ctx.needs_input_grad[2] else None, dw2, db2


def linear_and_input(x, weight, bias=None):
    """``(F.linear(x, weight, bias), x)``; pass the second output on to the other consumer of x (see the module
    docstring) so that x's two gradients are summed in the dgrad GEMM."""
    return _LinearAndInput.apply(x, weight, bias)


def linear_gelu_and_input(x, weight, bias, gelu_backward_bias_grad):
    """``(F.gelu(F.linear(x, weight, bias)), x)``, like ``linear_and_input``. ``gelu_backward_bias_grad(dact,
    pre) -> (dpre, dbias)`` on [rows, n] tensors is the backward of GELU + bias: the kernel switch's op."""
    return _LinearGeluAndInput.apply(x, weight, bias, gelu_backward_bias_grad)


def feed_forward_and_input(x, w1, b1, w2, b2):
    """``(F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2), x)`` through the Triton GEMMs with GELU epilogues (see
    the module docstring); the second output as in ``linear_and_input``. Both biases are required."""
    return _FeedForwardAndInput.apply(x, w1, b1, w2, b2)


def feed_forward_and_input_eager(x, w1, b1, w2, b2):
    """``feed_forward_and_input`` on cuBLAS (through autocast like ``F.linear``) and the eager GELU backward:
    the FFN of the "torch" kernel choice."""
    from fastroberta.kernels import reference
    act, x = linear_gelu_and_input(x, w1, b1, reference.gelu_backward_bias_grad)
    return F.linear(act, w2, b2), x
