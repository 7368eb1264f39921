"""The fused dropout + residual + LayerNorm kernel against the eager reference: forward, every gradient,
dropout replayed from the kernel's own mask, repeatability, input checks, the nn.LayerNorm drop-in, and the
model with kernels="triton" against kernels="torch". Tensors live on DEVICE: the GPU when there is one (the
compiled kernel), else the CPU under Triton's interpreter."""
import importlib

import pytest
import torch

from fastroberta import RobertaConfig, RobertaForMaskedLM
from fastroberta.kernels import FusedLayerNorm, layer_norm, reference
from fastroberta.kernels._checks import triton_usable

# The package re-exports the function under the module's name, so fetch the module itself.
ln_mod = importlib.import_module("fastroberta.kernels.layer_norm")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _on_test_device():
    """Tensors and modules made without a device land on DEVICE: on a GPU host the compiled kernel runs (CPU
    tensors there would take the eager fallback, or raise with kernels="triton")."""
    with torch.device(DEVICE):
        yield

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=6e-2, rtol=2e-2)}
# Parameter gradients sum over rows: allow for fp32 reassociation across up to a few hundred rows.
GRAD_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=1e-2),
            torch.bfloat16: dict(atol=1e-1, rtol=2e-2)}


def make_inputs(shape, dtype, residual=True, affine=True, param_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    param_dtype = param_dtype or dtype

    def randn(*size):  # drawn on the CPU (the generator's device), then moved: the same values on any host
        return torch.randn(*size, generator=g, device="cpu").to(DEVICE)
    x = (randn(shape) * 2 + 0.5).to(dtype).requires_grad_()
    r = randn(shape).to(dtype).requires_grad_() if residual else None
    w = (1 + 0.3 * randn(n)).to(param_dtype).requires_grad_() if affine else None
    b = (0.3 * randn(n)).to(param_dtype).requires_grad_() if affine else None
    dy = randn(shape).to(dtype)
    return x, r, w, b, dy


def test_inputs_reach_the_kernel_not_the_fallback():
    """What the tests build runs the Triton kernel: CUDA tensors on a GPU host (where the interpreter is off),
    CPU tensors under the interpreter elsewhere."""
    x, r, w, b, _ = make_inputs((3, 16), torch.float32)
    assert all(t.device.type == torch.device(DEVICE).type and triton_usable(t) for t in (x, r, w, b))
    assert FusedLayerNorm(16).weight.device.type == torch.device(DEVICE).type


def run(fn, x, r, w, b, dy, **kw):
    """Output and the gradients of every input that takes one, in the order x, residual, weight, bias."""
    y = fn(x, w, b, residual=r, **kw)
    inputs = [t for t in (x, r, w, b) if t is not None]
    return y, torch.autograd.grad(y, inputs, dy)


def assert_matches_reference(x, r, w, b, dy, **kw):
    y, grads = run(layer_norm, x, r, w, b, dy, **kw)
    y_ref, grads_ref = run(reference.layer_norm, x, r, w, b, dy, **kw)
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y, y_ref, **TOL[x.dtype])
    for got, want in zip(grads, grads_ref):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **GRAD_TOL[got.dtype])


# Widths: tiny, odd, RoBERTa base, odd near 1K, RoBERTa large. Rows: a single row, a prime, more rows than
# the backward has programs (so each program walks a band of several rows, of unequal lengths).
@pytest.mark.parametrize("rows,hidden", [(130, 64), (7, 100), (7, 768), (1, 1000), (130, 1000), (7, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
def test_forward_and_grads_match_reference(rows, hidden, dtype, residual):
    assert_matches_reference(*make_inputs((rows, hidden), dtype, residual=residual))


def test_wide_row():
    assert_matches_reference(*make_inputs((3, 8192), torch.float32))


def test_bf16_dtype_plumbing():
    # The interpreter rounds bf16 by truncation (1 ulp off round-to-nearest); the GPU run checks bf16 tightly.
    assert_matches_reference(*make_inputs((5, 96), torch.bfloat16))


@pytest.mark.parametrize("shape", [(2, 5, 100), (100,)], ids=["3d", "1d"])
def test_any_leading_shape(shape):
    assert_matches_reference(*make_inputs(shape, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_no_affine(dtype):
    assert_matches_reference(*make_inputs((7, 100), dtype, affine=False))


def test_weight_without_bias():
    x, r, w, _, dy = make_inputs((7, 100), torch.float32)
    assert_matches_reference(x, r, w, None, dy)


def test_fp32_parameters_with_fp16_activations():
    x, r, w, b, dy = make_inputs((7, 100), torch.float16, param_dtype=torch.float32)
    y, (dx, dr, dw, db) = run(layer_norm, x, r, w, b, dy)
    assert y.dtype == dx.dtype == dr.dtype == torch.float16 and dw.dtype == db.dtype == torch.float32
    assert_matches_reference(x, r, w, b, dy)


def test_non_contiguous_inputs():
    x, r, w, b, dy = make_inputs((7, 100), torch.float32)
    # Rows evenly strided (a column slice): read in place. A transpose: copied once.
    wide = torch.randn(7, 130).requires_grad_()
    assert_matches_reference(wide[:, 10:110], r, w, b, dy)
    xt, rt = torch.randn(100, 7).t().requires_grad_(), torch.randn(100, 7).t().requires_grad_()
    assert_matches_reference(xt, rt, w, b, dy)
    # Strided parameters are read densely.
    w2, b2 = torch.randn(200)[::2].requires_grad_(), torch.randn(200)[::2].requires_grad_()
    assert_matches_reference(x, r, w2, b2, dy)
    # An expanded incoming gradient (stride-0 rows) is read without materializing it.
    assert_matches_reference(x, r, w, b, torch.randn(100).expand(7, 100))


def test_empty_batch():
    x, r, w, b, _ = make_inputs((0, 64), torch.float32)
    y = layer_norm(x, w, b, residual=r)
    assert y.shape == (0, 64)
    dx, dr, dw, db = torch.autograd.grad(y.sum(), (x, r, w, b))
    assert dx.shape == dr.shape == (0, 64)
    assert torch.equal(dw, torch.zeros(64)) and torch.equal(db, torch.zeros(64))


def test_grads_are_bitwise_repeatable():
    x, r, w, b, dy = make_inputs((13, 100), torch.float32)  # 13 rows: bands of 4, 4, 4, 1 rows
    torch.manual_seed(5)
    _, first = run(layer_norm, x, r, w, b, dy, dropout_p=0.2)
    torch.manual_seed(5)
    _, second = run(layer_norm, x, r, w, b, dy, dropout_p=0.2)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


# Dropout ------------------------------------------------------------------------------------------------

def kernel_mask(shape, p, seed):
    """The keep-mask the kernel draws for ``shape`` after ``torch.manual_seed(seed)``. The draw depends only
    on (Philox seed, row, column), not on the data, so LN(dropout(ones) + 0) shows it: kept entries come out
    positive, dropped ones negative (a row with both kinds; all-kept at p >= 0.25 and >= 64 columns has
    probability < 1e-8)."""
    torch.manual_seed(seed)
    y = layer_norm(torch.ones(shape), None, None, residual=torch.zeros(shape), dropout_p=p)
    return y > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_output_and_grads_replay_the_forward_mask(dtype):
    p, seed = 0.3, 11
    x, r, w, b, dy = make_inputs((7, 1000), dtype)
    mask = kernel_mask((7, 1000), p, seed)
    torch.manual_seed(seed)
    y, grads = run(layer_norm, x, r, w, b, dy, dropout_p=p)
    y_ref, grads_ref = run(reference.layer_norm, x, r, w, b, dy, dropout_p=p, dropout_mask=mask)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, **GRAD_TOL[dtype])
    assert torch.all(grads[0][~mask] == 0)  # no gradient reaches a dropped x


def test_dropout_without_residual_replays_the_mask():
    p, seed = 0.5, 3
    x, _, w, b, dy = make_inputs((7, 64), torch.float32, residual=False)
    mask = kernel_mask((7, 64), p, seed)
    torch.manual_seed(seed)
    y, grads = run(layer_norm, x, None, w, b, dy, dropout_p=p)
    y_ref, grads_ref = run(reference.layer_norm, x, None, w, b, dy, dropout_p=p, dropout_mask=mask)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, **GRAD_TOL[torch.float32])


def test_dropout_same_seed_same_result_other_seed_other_result():
    x, r, w, b, _ = make_inputs((7, 100), torch.float16)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(layer_norm(x, w, b, residual=r, dropout_p=0.1))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_dropout_kept_fraction_and_independence():
    p = 0.25
    keep = kernel_mask((64, 1024), p, seed=7)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01  # 6 sigma at 65536 draws
    # Each Philox call feeds four adjacent columns: every lane of it must be unbiased, and rows must differ.
    for lane in range(4):
        assert abs(keep[:, lane::4].float().mean().item() - (1 - p)) < 0.02
    assert not torch.equal(keep[0], keep[1])
    assert not torch.equal(keep, kernel_mask((64, 1024), p, seed=8))


def test_zero_dropout_is_the_plain_path():
    x, r, w, b, dy = make_inputs((7, 100), torch.float16)
    rng_state = torch.cuda.get_rng_state if DEVICE == "cuda" else torch.get_rng_state
    state = rng_state()
    y0, g0 = run(layer_norm, x, r, w, b, dy, dropout_p=0.0)
    assert torch.equal(rng_state(), state)  # p=0 draws no seed
    y, g = run(layer_norm, x, r, w, b, dy)
    assert torch.equal(y0, y) and all(torch.equal(a, c) for a, c in zip(g0, g))
    # The dropout path with a vanishing p keeps everything at scale 1.0f: it must agree bit for bit.
    y_tiny, g_tiny = run(layer_norm, x, r, w, b, dy, dropout_p=1e-12)
    assert torch.equal(y_tiny, y) and all(torch.equal(a, c) for a, c in zip(g_tiny, g))


# The preceding linear's bias (input_bias) ------------------------------------------------------------------

def run_with_input_bias(fn, x, r, w, b, ib, dy, **kw):
    """Output and the gradients of x, residual, weight, bias and input_bias (those given)."""
    y = fn(x, w, b, residual=r, input_bias=ib, **kw)
    inputs = [t for t in (x, r, w, b, ib) if t is not None]
    return y, torch.autograd.grad(y, inputs, dy)


def assert_input_bias_matches_reference(x, r, w, b, ib, dy, dropout_p=0.0, mask=None, seed=0):
    torch.manual_seed(seed)
    y, grads = run_with_input_bias(layer_norm, x, r, w, b, ib, dy, dropout_p=dropout_p)
    y_ref, grads_ref = run_with_input_bias(reference.layer_norm, x, r, w, b, ib, dy, dropout_p=dropout_p,
                                           dropout_mask=mask)
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y, y_ref, **TOL[x.dtype])
    for got, want in zip(grads, grads_ref):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **GRAD_TOL[got.dtype])
    return grads


def make_input_bias(n, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn(n, generator=g, device="cpu")).to(DEVICE, dtype).requires_grad_()


# 7 rows: fewer than the interpreter's four backward programs' worth of bands of 2; 130: bands of 33, 33, 33, 31.
@pytest.mark.parametrize("rows,hidden", [(7, 100), (130, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("affine", ["weight_bias", "weight", "none"])
def test_input_bias_forward_and_grads_match_reference(rows, hidden, dtype, residual, affine):
    x, r, w, b, dy = make_inputs((rows, hidden), dtype, residual=residual, affine=affine != "none")
    if affine == "weight":
        b = None
    # An fp32 input bias with fp16 activations (a mixed-precision linear's master bias) and one in x's dtype.
    ib = make_input_bias(hidden, torch.float32 if rows == 7 else dtype)
    grads = assert_input_bias_matches_reference(x, r, w, b, ib, dy)
    assert grads[-1].dtype == ib.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
def test_input_bias_with_dropout_replays_the_forward_mask(dtype, residual):
    # Dropout comes after the bias: dropped entries lose x + input_bias, and input_bias's gradient sums dx.
    p, seed = 0.3, 12
    x, r, w, b, dy = make_inputs((13, 100), dtype, residual=residual)
    ib = make_input_bias(100, dtype)
    mask = kernel_mask((13, 100), p, seed)
    grads = assert_input_bias_matches_reference(x, r, w, b, ib, dy, dropout_p=p, mask=mask, seed=seed)
    assert torch.all(grads[0][~mask] == 0)


def test_input_bias_is_the_linear_bias_added_before_the_norm():
    # LN(dropout(x W^T + c) + r) with the linear run without c and c given as input_bias: the same function.
    x, r, w, b, dy = make_inputs((9, 100), torch.float32)
    lin = torch.nn.Linear(48, 100)
    h = torch.randn(9, 48)
    y = layer_norm(torch.nn.functional.linear(h, lin.weight), w, b, residual=r, input_bias=lin.bias)
    want = reference.layer_norm(lin(h), w, b, residual=r)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    y.backward(dy)
    got = lin.bias.grad.clone()
    lin.bias.grad = None
    want.backward(dy)
    torch.testing.assert_close(got, lin.bias.grad, atol=1e-4, rtol=1e-4)


def test_input_bias_empty_batch_and_repeatable_grads():
    x, r, w, b, _ = make_inputs((0, 64), torch.float32)
    ib = make_input_bias(64, torch.float32)
    y = layer_norm(x, w, b, residual=r, input_bias=ib)
    assert torch.equal(torch.autograd.grad(y.sum(), ib)[0], torch.zeros(64))
    x, r, w, b, dy = make_inputs((13, 100), torch.float32)
    ib = make_input_bias(100, torch.float32)
    first = run_with_input_bias(layer_norm, x, r, w, b, ib, dy)[1]
    second = run_with_input_bias(layer_norm, x, r, w, b, ib, dy)[1]
    assert all(torch.equal(a, c) for a, c in zip(first, second))


# Input checks and fallback -----------------------------------------------------------------------------

def test_rejects_bad_inputs():
    x = torch.randn(4, 8)
    w, b = torch.ones(8), torch.zeros(8)
    with pytest.raises(TypeError, match="x has dtype int64"):
        layer_norm(torch.ones(4, 8, dtype=torch.long), w, b)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer_norm([1.0, 2.0], w, b)
    with pytest.raises(ValueError, match="weight has shape \\(7,\\).*hidden size is 8"):
        layer_norm(x, torch.ones(7), b)
    with pytest.raises(ValueError, match="bias has shape \\(8, 1\\)"):
        layer_norm(x, w, torch.zeros(8, 1))
    with pytest.raises(TypeError, match="weight has dtype float16"):
        layer_norm(x, w.half(), b)
    with pytest.raises(TypeError, match="weight has dtype int32"):
        layer_norm(x, torch.ones(8, dtype=torch.int32), b)
    with pytest.raises(ValueError, match="weight is on meta"):
        layer_norm(x, torch.ones(8, device="meta"), b)
    with pytest.raises(ValueError, match="residual has shape"):
        layer_norm(x, w, b, residual=torch.randn(4, 9))
    with pytest.raises(TypeError, match="residual has dtype float16"):
        layer_norm(x, w, b, residual=torch.randn(4, 8).half())
    with pytest.raises(ValueError, match="residual is on meta"):
        layer_norm(x, w, b, residual=torch.randn(4, 8, device="meta"))
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout_p must be in \\[0, 1\\)"):
            layer_norm(x, w, b, dropout_p=p)
    with pytest.raises(TypeError, match="dropout_p must be a float"):
        layer_norm(x, w, b, dropout_p="0.1")
    with pytest.raises(ValueError, match="eps must be a non-negative"):
        layer_norm(x, w, b, eps=-1.0)
    with pytest.raises(ValueError, match="non-empty last"):
        layer_norm(torch.randn(4, 0), None, None)
    with pytest.raises(ValueError, match="exceeds"):
        layer_norm(torch.randn(1, ln_mod.MAX_HIDDEN + 1), None, None)
    with pytest.raises(ValueError, match="input_bias has shape \\(7,\\) but x's hidden size is 8"):
        layer_norm(x, w, b, input_bias=torch.zeros(7))
    with pytest.raises(TypeError, match="input_bias has dtype int64"):
        layer_norm(x, w, b, input_bias=torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="input_bias is on meta"):
        layer_norm(x, w, b, input_bias=torch.zeros(8, device="meta"))
    with pytest.raises(TypeError, match="input_bias must be a torch.Tensor"):
        layer_norm(x, w, b, input_bias=[0.0] * 8)


def test_falls_back_to_reference_where_triton_cannot_run(monkeypatch):
    monkeypatch.setattr(ln_mod, "triton_usable", lambda t: False)
    calls = []
    monkeypatch.setattr(ln_mod, "_layer_norm_forward", lambda *a: calls.append(a))
    x, r, w, b, _ = make_inputs((3, 16), torch.float32)
    torch.testing.assert_close(layer_norm(x, w, b, residual=r), reference.layer_norm(x, w, b, residual=r),
                               atol=0, rtol=0)
    assert not calls


# FusedLayerNorm ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, dict(eps=1e-6), dict(elementwise_affine=False), dict(bias=False)])
def test_fused_layer_norm_is_a_drop_in(kwargs):
    ours, theirs = FusedLayerNorm(100, **kwargs), torch.nn.LayerNorm(100, **kwargs)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert ours.extra_repr() == theirs.extra_repr()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p))
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 100)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_fused_layer_norm_residual_dropout_forward():
    ln = FusedLayerNorm(64, kernels="triton")
    x, r, _, _, dy = make_inputs((5, 64), torch.float32)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(64))
    mask = kernel_mask((5, 64), 0.25, seed=4)
    torch.manual_seed(4)
    y = ln(x, residual=r, dropout_p=0.25)
    want = reference.layer_norm(x, ln.weight, ln.bias, 1e-5, residual=r, dropout_p=0.25, dropout_mask=mask)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    y.backward(dy)
    assert ln.weight.grad is not None and ln.bias.grad is not None


def test_fused_layer_norm_rejects_multi_dim_shape():
    with pytest.raises(ValueError, match="normalized_shape"):
        FusedLayerNorm((4, 8))
    with pytest.raises(ValueError, match="x.s hidden size is 9"):
        FusedLayerNorm(8)(torch.randn(2, 9))


# The model ---------------------------------------------------------------------------------------------

def test_model_with_triton_kernels_matches_torch(monkeypatch):
    cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    eager = RobertaForMaskedLM(cfg, kernels="torch")
    with torch.no_grad():  # non-trivial LayerNorm parameters, so a swapped weight/bias would show
        for name, p in eager.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    fused = RobertaForMaskedLM(cfg, kernels="triton")
    fused.load_state_dict(eager.state_dict())

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (2, 16), generator=g, device="cpu")
    mask = torch.ones(2, 16, dtype=torch.long, device="cpu")
    ids[1, 11:], mask[1, 11:] = 1, 0
    labels = torch.where(torch.rand(2, 16, generator=g, device="cpu") < 0.4, ids, torch.full_like(ids, -100))
    labels[1, 11:] = -100
    labels[0, 0] = ids[0, 0]
    ids, mask, labels = ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)

    calls = []
    launch = ln_mod._layer_norm_forward  # what the custom op runs
    monkeypatch.setattr(ln_mod, "_layer_norm_forward", lambda *a: (calls.append(1), launch(*a))[1])
    loss = fused(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    assert len(calls) == 2 * cfg.num_hidden_layers + 2  # embeddings, two per layer, MLM head

    ref_loss = eager(ids, attention_mask=mask, labels=labels).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    ref_grads = dict(eager.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)
