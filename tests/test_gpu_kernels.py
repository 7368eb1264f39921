"""The GPU half of the kernel coverage: the compiled Triton kernels (not the interpreter) at RoBERTa's real shapes,
in fp16 and bf16, forward and backward against the fp32 eager reference, plus the properties that only a GPU
can show (races in the gradient reductions, memory linear in L).

Skipped without CUDA: the CPU suite runs the same kernels through Triton's interpreter at small shapes in fp32
and fp16 (the interpreter has no bf16 and runs programs one at a time); this file is what
``benchmarks/gpu_check.sh`` runs on a GPU.
"""
import pytest
import torch

from fastroberta.kernels import attention, attention_varlen, layer_norm, mlm_cross_entropy, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU half of the kernel tests: compiled kernels, bf16, real shapes")

DTYPES = [torch.float16, torch.bfloat16]
# Relative norm error against the fp32 reference: rounding of 16-bit inputs, outputs and matmul operands.
TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
DEV = "cuda"


def rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    assert torch.isfinite(a).all(), "non-finite values"
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def assert_matches_reference(fn, ref_fn, leaves, dout, names):
    """Output and every input gradient of ``fn`` against ``ref_fn`` run in fp32 on the same inputs."""
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout)
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    ref = ref_fn(*leaves32)
    ref_grads = torch.autograd.grad(ref, leaves32, dout.float())
    tol = TOL[leaves[0].dtype]
    errors = {"out": rel_err(out, ref)}
    errors.update({f"grad {n}": rel_err(g, rg) for n, g, rg in zip(names, grads, ref_grads)})
    assert out.dtype == leaves[0].dtype
    assert all(e <= tol for e in errors.values()), f"relative errors above {tol}: {errors}"
    return out, grads


def randn(*shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=DEV) * scale + shift).to(dtype).requires_grad_()


# ------------------------------------------------------------------------------------------------ LayerNorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [768, 1024])
def test_layer_norm_real_shapes(dtype, hidden):
    x, r = randn(16384, hidden, dtype=dtype), randn(16384, hidden, dtype=dtype)
    w, b = randn(hidden, dtype=dtype, scale=0.1, shift=1.0), randn(hidden, dtype=dtype, scale=0.1)
    dout = torch.randn(16384, hidden, device=DEV).to(dtype)
    assert_matches_reference(lambda x, r, w, b: layer_norm(x, w, b, 1e-5, residual=r),
                             lambda x, r, w, b: reference.layer_norm(x, w, b, 1e-5, residual=r),
                             [x, r, w, b], dout, ("x", "residual", "weight", "bias"))


def test_layer_norm_3d_input_without_residual_bf16():
    x = randn(32, 512, 768, dtype=torch.bfloat16)
    w, b = randn(768, dtype=torch.bfloat16, scale=0.1, shift=1.0), randn(768, dtype=torch.bfloat16, scale=0.1)
    dout = torch.randn(32, 512, 768, device=DEV).to(torch.bfloat16)
    assert_matches_reference(lambda x, w, b: layer_norm(x, w, b), lambda x, w, b: reference.layer_norm(x, w, b),
                             [x, w, b], dout, ("x", "weight", "bias"))


def test_layer_norm_weight_grads_are_deterministic():
    """Per-block partial sums, no atomics: two backward passes give bitwise-equal weight/bias gradients."""
    x, r = randn(16384, 768, dtype=torch.float16), randn(16384, 768, dtype=torch.float16)
    w, b = randn(768, dtype=torch.float16, scale=0.1, shift=1.0), randn(768, dtype=torch.float16, scale=0.1)
    dout = torch.randn(16384, 768, device=DEV).to(torch.float16)
    runs = [torch.autograd.grad(layer_norm(x, w, b, residual=r), (w, b), dout) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_layer_norm_dropout_is_reproducible_from_the_seed():
    x, r = randn(16384, 768, dtype=torch.float16), randn(16384, 768, dtype=torch.float16)
    w, b = randn(768, dtype=torch.float16, shift=1.0), randn(768, dtype=torch.float16)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(layer_norm(x, w, b, residual=r, dropout_p=0.1))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


# ------------------------------------------------------------------------------------------------ attention
def _qkv(batch, seqlen, dtype, heads=12, head_dim=64):
    """Strided [B, H, L, D] views of one [B, L, 3, H, D] tensor, as the model's fused QKV projection gives."""
    qkv = randn(batch, seqlen, 3, heads, head_dim, dtype=dtype)
    return qkv, lambda t: t.permute(2, 0, 3, 1, 4).unbind(0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqlen,padded", [(512, True), (128, False)])
def test_attention_real_shapes(dtype, seqlen, padded):
    batch = 8
    qkv, split = _qkv(batch, seqlen, dtype)
    mask = None
    if padded:
        lengths = torch.randint(1, seqlen + 1, (batch,), device=DEV)
        lengths[0], lengths[-1] = seqlen, 0  # one full row, one with no real token at all
        mask = torch.arange(seqlen, device=DEV)[None, :] < lengths[:, None]
    dout = torch.randn(batch, 12, seqlen, 64, device=DEV).to(dtype)
    out, (dqkv,) = assert_matches_reference(lambda t: attention(*split(t), attention_mask=mask),
                                            lambda t: reference.attention(*split(t), mask),
                                            [qkv], dout, ("qkv",))
    if padded:
        assert torch.all(out[-1] == 0) and torch.all(dqkv[-1] == 0), "a fully padded row must give zeros"
        for row in range(1, batch - 1):
            assert torch.all(out[row, :, int(lengths[row]):] == 0), "padded query rows must give zeros"


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_varlen_real_shapes(dtype):
    lengths = torch.tensor([512, 300, 1, 77, 512, 256, 129, 400])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    cu = cu.to(DEV)
    total = int(lengths.sum())
    q, k, v = (randn(total, 12, 64, dtype=dtype) for _ in range(3))
    dout = torch.randn(total, 12, 64, device=DEV).to(dtype)
    assert_matches_reference(lambda q, k, v: attention_varlen(q, k, v, cu, 512),
                             lambda q, k, v: reference.attention_varlen(q, k, v, cu, 512),
                             [q, k, v], dout, ("q", "k", "v"))


def test_attention_varlen_equals_padded_on_real_tokens():
    batch, seqlen = 8, 512
    qkv, split = _qkv(batch, seqlen, torch.float16)
    lengths = torch.randint(1, seqlen + 1, (batch,), device=DEV)
    mask = torch.arange(seqlen, device=DEV)[None, :] < lengths[:, None]
    padded = attention(*split(qkv), attention_mask=mask)                      # [B, H, L, D]
    idx = mask.flatten().nonzero().squeeze(-1)
    q, k, v = (t.reshape(batch * seqlen, 12, 64).index_select(0, idx) for t in qkv.unbind(2))
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=DEV)
    cu[1:] = lengths.cumsum(0)
    varlen = attention_varlen(q, k, v, cu, int(lengths.max()))                # [tokens, H, D]
    expected = padded.transpose(1, 2).reshape(batch * seqlen, 12, 64).index_select(0, idx)
    assert rel_err(varlen, expected) < 2e-3


def test_attention_memory_is_linear_in_seqlen():
    """No [B, H, L, L] tensor: forward (saving for backward) needs far less than one score matrix."""
    batch, seqlen = 8, 512
    qkv, split = _qkv(batch, seqlen, torch.float16)
    mask = torch.ones(batch, seqlen, dtype=torch.bool, device=DEV)
    q, k, v = split(qkv)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = attention(q, k, v, attention_mask=mask, dropout_p=0.1)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    scores = batch * 12 * seqlen * seqlen * 2
    assert extra < scores / 2, f"forward used {extra / 2**20:.0f} MiB; one fp16 score matrix is {scores / 2**20:.0f}"
    out.float().sum().backward()


def test_attention_dropout_is_reproducible_from_the_seed():
    qkv, split = _qkv(4, 512, torch.float16)
    mask = torch.ones(4, 512, dtype=torch.bool, device=DEV)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(attention(*split(qkv), attention_mask=mask, dropout_p=0.1))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


# ------------------------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("dtype", DTYPES)
def test_mlm_cross_entropy_real_shapes(dtype):
    """N = 2458 rows (15% of 32 x 512 tokens, what the model passes after selecting labelled rows), V = 50265."""
    n, e, vocab = 2458, 768, 50265
    hidden = randn(n, e, dtype=dtype)
    weight, bias = randn(vocab, e, dtype=dtype, scale=0.02), randn(vocab, dtype=dtype, scale=0.02)
    labels = torch.randint(0, vocab, (n,), device=DEV)
    labels[::10] = -100
    assert_matches_reference(lambda h, w, b: mlm_cross_entropy(h, w, b, labels),
                             lambda h, w, b: reference.mlm_cross_entropy(h, w, b, labels),
                             [hidden, weight, bias], torch.ones((), device=DEV), ("hidden", "weight", "bias"))


def test_mlm_cross_entropy_keeps_the_fp16_loss_scale():
    """grad_output = 65536 (DeepSpeed's loss scale) reaches fp16 gradients without flushing to zero."""
    n, e, vocab = 2458, 768, 50265
    hidden = randn(n, e, dtype=torch.float16)
    weight, bias = randn(vocab, e, dtype=torch.float16, scale=0.02), randn(vocab, dtype=torch.float16, scale=0.02)
    labels = torch.randint(0, vocab, (n,), device=DEV)
    scale = torch.tensor(65536.0, device=DEV)
    grads = torch.autograd.grad(mlm_cross_entropy(hidden, weight, bias, labels), (hidden, weight, bias), scale)
    leaves32 = [t.detach().float().requires_grad_() for t in (hidden, weight, bias)]
    ref = torch.autograd.grad(reference.mlm_cross_entropy(*leaves32, labels), leaves32, scale)
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, ref):
        assert rel_err(g, rg) < TOL[torch.float16], name
        flushed = ((g == 0) & (rg.abs() > 1e-6)).sum().item()
        assert flushed == 0, f"{flushed} entries of grad {name} flushed to zero"


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
