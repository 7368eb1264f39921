"""The GPU half of the kernel coverage: the compiled Triton kernels (not the interpreter) at RoBERTa's real shapes,
in fp16 and bf16, forward and backward against the fp32 eager reference, plus the properties that only a GPU
can show (races in the gradient reductions, memory linear in L).

On a GPU this is what ``benchmarks/gpu_check.sh`` runs. Without CUDA the same tests run as their CPU twin: the
same assertions at small shapes (``SHAPES``) through Triton's interpreter, in fp16 only (the interpreter has no
bf16), so a wrong assertion or a CPU-only fixture shows here and not in a GPU's few minutes. What only a GPU
has (CUDA memory statistics, CUDA graphs) is measured its own way on CPU or skipped, as each test says.
"""
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastroberta.kernels import attention, attention_varlen, layer_norm, mlm_cross_entropy, reference
from fastroberta.kernels.linear_gelu import dgrad_gelu_bias_grad, linear_gelu

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16]
# Relative norm error against the fp32 reference: rounding of 16-bit inputs, outputs and matmul operands.
TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
# RoBERTa's shapes on a GPU; the interpreter's twin keeps their structure at a size it runs in seconds.
SHAPES = dict(
    ln_rows=16384 if ON_GPU else 96,
    ln_hidden=(768, 1024) if ON_GPU else (64, 100),
    ln_3d=(32, 512, 768) if ON_GPU else (2, 24, 64),
    heads=12 if ON_GPU else 2,
    head_dim=64 if ON_GPU else 16,
    attn_batch=8 if ON_GPU else 4,
    attn_seqlens=(512, 128) if ON_GPU else (64, 32),
    varlen_lengths=[512, 300, 1, 77, 512, 256, 129, 400] if ON_GPU else [64, 30, 1, 7, 40],
    # N = 15% of 32 x 512 tokens (what the model passes after selecting labelled rows), E, V = 50265 (odd).
    ce=(2458, 768, 50265) if ON_GPU else (40, 32, 301),
    # Every row of a 32 x 512 batch labelled: the fp16 logit gradient softmax * grad_output / N is smallest here.
    ce_all_labelled=(16384, 768, 50265) if ON_GPU else (256, 16, 64),
    # The FFN's GEMMs (rows = tokens, hidden, intermediate): base at 32 x 512 tokens, one token fewer (ragged
    # row tiles), large's 1024 -> 4096. The twin's dimensions span several of the interpreter's tiles each way.
    ffn=[(16384, 768, 3072), (16383, 768, 3072), (8192, 1024, 4096)] if ON_GPU
    else [(64, 32, 96), (63, 32, 96), (48, 48, 64)],
)
# The GELU GEMMs against an fp32 reference on the same 16-bit inputs: what differs is the rounding of the
# 16-bit outputs (half an ulp: 2^-11 fp16, 2^-8 bf16, less in norm) and fp32 summation order over K.
GEMM_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
linear_gelu_module = importlib.import_module("fastroberta.kernels.linear_gelu")  # the package exports the function


def rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    assert torch.isfinite(a).all(), "non-finite values"
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def assert_matches_reference(fn, ref_fn, leaves, dout, names, out_dtype=None):
    """Output and every input gradient of ``fn`` against ``ref_fn`` run in fp32 on the same inputs. The output
    has ``out_dtype`` (default: the inputs' dtype); gradients have their input's dtype."""
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout)
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    ref = ref_fn(*leaves32)
    ref_grads = torch.autograd.grad(ref, leaves32, dout.float())
    tol = TOL[leaves[0].dtype]
    errors = {"out": rel_err(out, ref)}
    errors.update({f"grad {n}": rel_err(g, rg) for n, g, rg in zip(names, grads, ref_grads)})
    assert out.dtype == (out_dtype or leaves[0].dtype), f"output dtype {out.dtype}"
    assert all(g.dtype == t.dtype for g, t in zip(grads, leaves)), "a gradient's dtype differs from its input's"
    assert all(e <= tol for e in errors.values()), f"relative errors above {tol}: {errors}"
    return out, grads


def randn(*shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=DEV) * scale + shift).to(dtype).requires_grad_()


# ------------------------------------------------------------------------------------------------ LayerNorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", SHAPES["ln_hidden"])
def test_layer_norm_real_shapes(dtype, hidden):
    rows = SHAPES["ln_rows"]
    x, r = randn(rows, hidden, dtype=dtype), randn(rows, hidden, dtype=dtype)
    w, b = randn(hidden, dtype=dtype, scale=0.1, shift=1.0), randn(hidden, dtype=dtype, scale=0.1)
    dout = torch.randn(rows, hidden, device=DEV).to(dtype)
    assert_matches_reference(lambda x, r, w, b: layer_norm(x, w, b, 1e-5, residual=r),
                             lambda x, r, w, b: reference.layer_norm(x, w, b, 1e-5, residual=r),
                             [x, r, w, b], dout, ("x", "residual", "weight", "bias"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_with_input_bias_real_shapes(dtype):
    """The encoder layers' launch: the preceding linear's bias added by the kernel, its gradient summed over
    every row (16384 on a GPU: 31 rows per program, then the partial-row sum) with the other two."""
    rows, hidden = SHAPES["ln_rows"], SHAPES["ln_hidden"][0]
    x, r = randn(rows, hidden, dtype=dtype), randn(rows, hidden, dtype=dtype)
    w, b = randn(hidden, dtype=dtype, scale=0.1, shift=1.0), randn(hidden, dtype=dtype, scale=0.1)
    ib = randn(hidden, dtype=dtype, scale=0.5)
    dout = torch.randn(rows, hidden, device=DEV).to(dtype)
    assert_matches_reference(lambda x, r, w, b, ib: layer_norm(x, w, b, 1e-5, residual=r, input_bias=ib),
                             lambda x, r, w, b, ib: reference.layer_norm(x, w, b, 1e-5, residual=r, input_bias=ib),
                             [x, r, w, b, ib], dout, ("x", "residual", "weight", "bias", "input_bias"))


def test_layer_norm_3d_input_without_residual():
    dtype = DTYPES[-1]  # bf16 on a GPU
    shape, hidden = SHAPES["ln_3d"], SHAPES["ln_3d"][-1]
    x = randn(*shape, dtype=dtype)
    w, b = randn(hidden, dtype=dtype, scale=0.1, shift=1.0), randn(hidden, dtype=dtype, scale=0.1)
    dout = torch.randn(*shape, device=DEV).to(dtype)
    assert_matches_reference(lambda x, w, b: layer_norm(x, w, b), lambda x, w, b: reference.layer_norm(x, w, b),
                             [x, w, b], dout, ("x", "weight", "bias"))


def _ln_inputs(dtype=torch.float16, shift=1.0, scale=0.1):
    rows, hidden = SHAPES["ln_rows"], SHAPES["ln_hidden"][0]
    x, r = randn(rows, hidden, dtype=dtype), randn(rows, hidden, dtype=dtype)
    w, b = randn(hidden, dtype=dtype, scale=scale, shift=shift), randn(hidden, dtype=dtype, scale=scale)
    return x, r, w, b


def test_layer_norm_weight_grads_are_deterministic():
    """Per-block partial sums, no atomics: two backward passes give bitwise-equal weight/bias/input-bias
    gradients."""
    x, r, w, b = _ln_inputs()
    ib = randn(x.shape[-1], dtype=torch.float32)
    dout = torch.randn(x.shape, device=DEV).to(torch.float16)
    runs = [torch.autograd.grad(layer_norm(x, w, b, residual=r, input_bias=ib), (w, b, ib), dout) for _ in range(2)]
    assert all(torch.equal(a, c) for a, c in zip(*runs))


def test_layer_norm_dropout_is_reproducible_from_the_seed():
    x, r, w, b = _ln_inputs(scale=1.0)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(layer_norm(x, w, b, residual=r, dropout_p=0.1))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


# ------------------------------------------------------------------------------------------------ attention
def _qkv(batch, seqlen, dtype):
    """Strided [B, H, L, D] views of one [B, L, 3, H, D] tensor, as the model's fused QKV projection gives."""
    qkv = randn(batch, seqlen, 3, SHAPES["heads"], SHAPES["head_dim"], dtype=dtype)
    return qkv, lambda t: t.permute(2, 0, 3, 1, 4).unbind(0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqlen,padded", [(SHAPES["attn_seqlens"][0], True), (SHAPES["attn_seqlens"][1], False)])
def test_attention_real_shapes(dtype, seqlen, padded):
    batch = SHAPES["attn_batch"]
    qkv, split = _qkv(batch, seqlen, dtype)
    mask = None
    if padded:
        lengths = torch.randint(1, seqlen + 1, (batch,), device=DEV)
        lengths[0], lengths[-1] = seqlen, 0  # one full row, one with no real token at all
        mask = torch.arange(seqlen, device=DEV)[None, :] < lengths[:, None]
    dout = torch.randn(batch, SHAPES["heads"], seqlen, SHAPES["head_dim"], device=DEV).to(dtype)
    out, (dqkv,) = assert_matches_reference(lambda t: attention(*split(t), attention_mask=mask),
                                            lambda t: reference.attention(*split(t), mask),
                                            [qkv], dout, ("qkv",))
    if padded:
        assert torch.all(out[-1] == 0) and torch.all(dqkv[-1] == 0), "a fully padded row must give zeros"
        for row in range(1, batch - 1):
            assert torch.all(out[row, :, int(lengths[row]):] == 0), "padded query rows must give zeros"


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_varlen_real_shapes(dtype):
    lengths = torch.tensor(SHAPES["varlen_lengths"])
    heads, head_dim, longest = SHAPES["heads"], SHAPES["head_dim"], int(lengths.max())
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    cu = cu.to(DEV)
    total = int(lengths.sum())
    q, k, v = (randn(total, heads, head_dim, dtype=dtype) for _ in range(3))
    dout = torch.randn(total, heads, head_dim, device=DEV).to(dtype)
    assert_matches_reference(lambda q, k, v: attention_varlen(q, k, v, cu, longest),
                             lambda q, k, v: reference.attention_varlen(q, k, v, cu, longest),
                             [q, k, v], dout, ("q", "k", "v"))


def test_attention_varlen_equals_padded_on_real_tokens():
    batch, seqlen = SHAPES["attn_batch"], SHAPES["attn_seqlens"][0]
    heads, head_dim = SHAPES["heads"], SHAPES["head_dim"]
    qkv, split = _qkv(batch, seqlen, torch.float16)
    lengths = torch.randint(1, seqlen + 1, (batch,), device=DEV)
    mask = torch.arange(seqlen, device=DEV)[None, :] < lengths[:, None]
    padded = attention(*split(qkv), attention_mask=mask)                      # [B, H, L, D]
    idx = mask.flatten().nonzero().squeeze(-1)
    q, k, v = (t.reshape(batch * seqlen, heads, head_dim).index_select(0, idx) for t in qkv.unbind(2))
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=DEV)
    cu[1:] = lengths.cumsum(0)
    varlen = attention_varlen(q, k, v, cu, int(lengths.max()))                # [tokens, H, D]
    expected = padded.transpose(1, 2).reshape(batch * seqlen, heads, head_dim).index_select(0, idx)
    assert rel_err(varlen, expected) < 2e-3


class _AllocatedBytes(TorchDispatchMode):
    """Sums the bytes of every tensor an op returns in new storage: on CPU, an upper bound of what a call
    allocates (the kernel's own ops inside a custom op are not seen, its outputs are)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.total += t.untyped_storage().nbytes()
        return out


def test_attention_memory_is_linear_in_seqlen():
    """No [B, H, L, L] tensor: forward (saving for backward) needs far less than one score matrix. On a GPU the
    peak of CUDA memory; on CPU every byte torch allocates in the call (``_AllocatedBytes``)."""
    batch, seqlen = SHAPES["attn_batch"], SHAPES["attn_seqlens"][0]
    qkv, split = _qkv(batch, seqlen, torch.float16)
    mask = torch.ones(batch, seqlen, dtype=torch.bool, device=DEV)
    q, k, v = split(qkv)
    # Warm-up outside the measured window: a new autotune key benchmarks its configs there, and Triton's
    # benchmark helper allocates a 256 MiB L2-flush buffer through torch (Triton 3.6).
    attention(q, k, v, attention_mask=mask, dropout_p=0.1).float().sum().backward()
    scores = batch * SHAPES["heads"] * seqlen * seqlen * 2
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = attention(q, k, v, attention_mask=mask, dropout_p=0.1)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        with _AllocatedBytes() as counter:
            out = attention(q, k, v, attention_mask=mask, dropout_p=0.1)
        extra = counter.total
    assert extra < scores / 2, f"forward used {extra / 2**20:.2f} MiB; one fp16 score matrix is {scores / 2**20:.2f}"
    out.float().sum().backward()


def test_attention_dropout_is_reproducible_from_the_seed():
    batch, seqlen = SHAPES["attn_batch"] // 2, SHAPES["attn_seqlens"][0]
    qkv, split = _qkv(batch, seqlen, torch.float16)
    mask = torch.ones(batch, seqlen, dtype=torch.bool, device=DEV)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(attention(*split(qkv), attention_mask=mask, dropout_p=0.1))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


# ------------------------------------------------------------------------------------------ GELU GEMMs
def _ffn_inputs(rows, hidden, inter, dtype):
    """RoBERTa's init scale (0.02) on the weights: the pre-activations ~0.5 wide, where GELU bends."""
    x = torch.randn(rows, hidden, device=DEV).to(dtype)
    w1 = (torch.randn(inter, hidden, device=DEV) * 0.02).to(dtype)
    b1 = (torch.randn(inter, device=DEV) * 0.1).to(dtype)
    dout = torch.randn(rows, hidden, device=DEV).to(dtype)
    w2 = (torch.randn(hidden, inter, device=DEV) * 0.02).to(dtype)
    return x, w1, b1, dout, w2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden,inter", SHAPES["ffn"])
def test_linear_gelu_real_shapes(dtype, rows, hidden, inter):
    x, w1, b1, _, _ = _ffn_inputs(rows, hidden, inter, dtype)
    pre, act = linear_gelu(x, w1, b1)
    assert pre.dtype == act.dtype == dtype and pre.shape == act.shape == (rows, inter)
    want = reference.linear_gelu(x.float(), w1.float(), b1.float())
    errors = {"pre": rel_err(pre, want[0]), "act": rel_err(act, want[1])}
    assert all(e <= GEMM_TOL[dtype] for e in errors.values()), f"relative errors above {GEMM_TOL[dtype]}: {errors}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden,inter", SHAPES["ffn"])
def test_dgrad_gelu_bias_grad_real_shapes(dtype, rows, hidden, inter):
    """dpre = (dout W2) * GELU'(pre) over K = hidden, and the bias gradient summed over every row."""
    x, w1, b1, dout, w2 = _ffn_inputs(rows, hidden, inter, dtype)
    pre = reference.linear_gelu(x, w1, b1)[0]
    dpre, dbias = dgrad_gelu_bias_grad(dout, w2, pre)
    assert dpre.dtype == dtype and dbias.dtype == torch.float32
    assert dpre.shape == (rows, inter) and dbias.shape == (inter,)
    want = reference.dgrad_gelu_bias_grad(dout.float(), w2.float(), pre.float())
    errors = {"dpre": rel_err(dpre, want[0]), "dbias": rel_err(dbias, want[1])}
    assert all(e <= GEMM_TOL[dtype] for e in errors.values()), f"relative errors above {GEMM_TOL[dtype]}: {errors}"


@pytest.mark.skipif(not ON_GPU, reason="autotuning times configs on a GPU; the interpreter runs one config")
def test_gelu_gemms_autotuned_equal_default_config(monkeypatch):
    """Whichever config the autotuner picks computes what the default config does (the tile sizes change only
    the fp32 summation order), forward and dgrad, on the base shape with ragged rows. The GPU candidates are
    autotuned here whatever FASTROBERTA_AUTOTUNE says (gpu_check's tests stage sets it to 0)."""
    rows, hidden, inter = SHAPES["ffn"][1]
    dtype = DTYPES[-1]
    x, w1, b1, dout, w2 = _ffn_inputs(rows, hidden, inter, dtype)
    pre = x @ w1.T
    monkeypatch.setattr(linear_gelu_module, "AUTOTUNE", True)
    candidates = linear_gelu_module._configs(None, linear_gelu_module.GPU_DEFAULT, linear_gelu_module.GPU_CANDIDATES)
    kernels = (linear_gelu_module._linear_gelu_fwd_tuned, linear_gelu_module._dgrad_gelu_tuned)
    for kernel in kernels:
        monkeypatch.setattr(kernel, "configs", candidates)
        monkeypatch.setattr(kernel, "cache", {})
    tuned = (*linear_gelu(x, w1, b1), *dgrad_gelu_bias_grad(dout, w2, pre))
    assert all(len(kernel.cache) == 1 for kernel in kernels), "the autotuner did not run"
    for kernel in kernels:
        monkeypatch.setattr(kernel, "configs", candidates[:1])  # _launch runs the default directly
    default = (*linear_gelu(x, w1, b1), *dgrad_gelu_bias_grad(dout, w2, pre))
    errors = {name: rel_err(a, b) for name, a, b in zip(("pre", "act", "dpre", "dbias"), tuned, default)}
    picked = [str(kernel.cache.popitem()[1]) for kernel in kernels]
    assert all(e <= GEMM_TOL[dtype] / 2 for e in errors.values()), f"{errors}; autotuner picked {picked}"


# ------------------------------------------------------------------------------------------- cross-entropy
def _ce_inputs(dtype):
    n, e, vocab = SHAPES["ce"]
    hidden = randn(n, e, dtype=dtype)
    weight, bias = randn(vocab, e, dtype=dtype, scale=0.02), randn(vocab, dtype=dtype, scale=0.02)
    labels = torch.randint(0, vocab, (n,), device=DEV)
    return hidden, weight, bias, labels


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlm_cross_entropy_real_shapes(dtype):
    """The loss is fp32 whatever the inputs' dtype; the gradients have the inputs' dtypes."""
    hidden, weight, bias, labels = _ce_inputs(dtype)
    labels[::10] = -100
    assert_matches_reference(lambda h, w, b: mlm_cross_entropy(h, w, b, labels),
                             lambda h, w, b: reference.mlm_cross_entropy(h, w, b, labels),
                             [hidden, weight, bias], torch.ones((), device=DEV), ("hidden", "weight", "bias"),
                             out_dtype=torch.float32)


def test_mlm_cross_entropy_keeps_the_fp16_loss_scale():
    """grad_output = 65536 (DeepSpeed's loss scale) reaches fp16 gradients without flushing to zero."""
    hidden, weight, bias, labels = _ce_inputs(torch.float16)
    scale = torch.tensor(65536.0, device=DEV)
    grads = torch.autograd.grad(mlm_cross_entropy(hidden, weight, bias, labels), (hidden, weight, bias), scale)
    leaves32 = [t.detach().float().requires_grad_() for t in (hidden, weight, bias)]
    ref = torch.autograd.grad(reference.mlm_cross_entropy(*leaves32, labels), leaves32, scale)
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, ref):
        assert rel_err(g, rg) < TOL[torch.float16], name
        flushed = ((g == 0) & (rg.abs() > 1e-6)).sum().item()
        assert flushed == 0, f"{flushed} entries of grad {name} flushed to zero"


@pytest.mark.parametrize("grad_output", [1.0, 65536.0, 2.0 ** -10])
def test_mlm_cross_entropy_fp16_gradients_at_every_loss_scale(grad_output):
    """N = 16384 labelled rows, V = 50265, near-uniform softmax: softmax * grad_output / N is ~1e-9 per logit,
    below fp16's smallest subnormal, at loss scale 1. Each gradient must be as close to the fp32 reference as
    that reference rounded to fp16 is, and no entry fp16 holds as a normal number may flush to zero. (On CPU
    these shapes flush nothing; test_cross_entropy's test_fp16_gradients_as_good_as_fp16_can_hold puts the
    per-logit gradient as low with a smaller grad_output.)"""
    n, e, vocab = SHAPES["ce_all_labelled"]
    hidden = randn(n, e, dtype=torch.float16)
    weight, bias = randn(vocab, e, dtype=torch.float16, scale=0.02), randn(vocab, dtype=torch.float16, scale=0.02)
    labels = torch.randint(0, vocab, (n,), device=DEV)
    dout = torch.tensor(grad_output, device=DEV)
    grads = torch.autograd.grad(mlm_cross_entropy(hidden, weight, bias, labels), (hidden, weight, bias), dout)
    leaves32 = [t.detach().float().requires_grad_() for t in (hidden, weight, bias)]
    ref = torch.autograd.grad(reference.mlm_cross_entropy(*leaves32, labels), leaves32, dout)
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, ref):
        err, best = rel_err(g, rg), rel_err(rg.half(), rg)
        assert err <= 1.5 * best + 2e-3, f"grad {name}: relative error {err:.3g}, fp16 rounding alone {best:.3g}"
        flushed = ((g == 0) & (rg.abs() >= 2.0 ** -14)).sum().item()
        assert flushed == 0, f"{flushed} entries of grad {name} flushed to zero"


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs; the CPU twin is test_dropout_reads_its_seed_from_device_memory")
def test_dropout_in_a_captured_cuda_graph_draws_a_new_mask_each_replay():
    """The dropout seed is drawn on the device and read by the kernels from memory, so a CUDA graph captured
    around attention and LayerNorm with dropout replays with a fresh seed each time (a seed passed by value
    would be frozen into the graph and every replay would drop the same entries)."""
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(2, 4, 128, 64, device=DEV, generator=g, dtype=torch.float16) for _ in range(3))
    x = torch.randn(256, 768, device=DEV, generator=g, dtype=torch.float16)
    w, b = torch.ones(768, device=DEV, dtype=torch.float16), torch.zeros(768, device=DEV, dtype=torch.float16)

    def step():
        return attention(q, k, v, dropout_p=0.5), layer_norm(x, w, b, dropout_p=0.5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: autotuning and compilation
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    replays = []
    for _ in range(2):
        graph.replay()
        replays.append([o.clone() for o in outs])
    torch.cuda.synchronize()
    for first, second in zip(*replays):
        assert torch.isfinite(first).all() and torch.isfinite(second).all()
        assert not torch.equal(first, second)


def test_dropout_reads_its_seed_from_device_memory():
    """CPU twin of the CUDA-graph test: replaying a graph re-runs the kernels on the same seed tensor, which the
    generator refills in place. Here one seed tensor stands for that memory: refilled in place, the kernels
    drop other entries; restored, the same ones; and no op reads a value to the host (``aten::item``)."""
    seed = torch.tensor([1234], dtype=torch.int64, device=DEV)  # given as dropout_seed, as the encoder's pool is
    q, k, v = (torch.randn(2, 2, 32, SHAPES["head_dim"], device=DEV, dtype=torch.float16) for _ in range(3))
    x = torch.randn(64, 64, device=DEV, dtype=torch.float16)
    w, b = torch.ones(64, device=DEV, dtype=torch.float16), torch.zeros(64, device=DEV, dtype=torch.float16)

    class HostReads(TorchDispatchMode):
        reads = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
                self.reads.append(func)
            return func(*args, **(kwargs or {}))
    runs = []
    for value in (1234, 99, 1234):
        seed.fill_(value)
        with HostReads():
            runs.append((attention(q, k, v, dropout_p=0.5, dropout_seed=seed),
                         layer_norm(x, w, b, dropout_p=0.5, dropout_seed=seed)))
    assert HostReads.reads == []
    for first, other, again in zip(*runs):
        assert torch.equal(first, again)
        assert not torch.equal(first, other)
