"""The Triton masked-LM cross-entropy against ``F.cross_entropy`` on the full fp32 logits: the loss, the
argmax count and the gradients of hidden, weight and bias, over dtypes, vocabulary sizes, label patterns and
chunkings; the fp16 loss-scale path; input errors; and the model's loss with kernels="triton" vs "torch"."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from fastroberta import RobertaConfig, RobertaForMaskedLM
from fastroberta.kernels import cross_entropy as ce
from fastroberta.kernels.cross_entropy import mlm_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100
# Largest error allowed, relative to the largest reference value of the tensor compared. fp16 rounds the
# logits and their gradient to 11 bits (bf16: 8) before the GEMMs, as any 16-bit decoder does; fp32 sums over
# V = 50,265 products in a different order than the reference.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def make_inputs(n, e, v, dtype, n_labelled, logit_std=2.0, seed=0):
    """hidden [n, e], weight [v, e], bias [v] in ``dtype`` and labels with ``n_labelled`` random rows labelled."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, e, generator=g)
    weight = torch.randn(v, e, generator=g) * (logit_std / e ** 0.5)
    bias = torch.randn(v, generator=g) * 0.5
    labels = torch.full((n,), IGNORE, dtype=torch.long)
    rows = torch.randperm(n, generator=g)[:n_labelled]
    labels[rows] = torch.randint(0, v, (n_labelled,), generator=g)
    return [t.to(DEVICE, dtype) for t in (hidden, weight, bias)] + [labels.to(DEVICE)]


def reference(hidden, weight, bias, labels, grad_output=1.0):
    """F.cross_entropy on the fp32 logits of every row: (loss, num_correct, grad_h, grad_w, grad_b) in fp32."""
    h, w = (t.detach().float().requires_grad_() for t in (hidden, weight))
    b = bias.detach().float().requires_grad_() if bias is not None else None
    logits = F.linear(h, w, b)
    valid = labels != IGNORE
    if valid.any():
        loss = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE)
    else:
        loss = logits.sum() * 0.0
    loss.backward(torch.tensor(grad_output, device=loss.device))
    num_correct = ((logits.argmax(-1) == labels) & valid).sum()
    return loss.detach(), num_correct, h.grad, w.grad, (b.grad if b is not None else None)


def triton_run(hidden, weight, bias, labels, grad_output=1.0, **kw):
    h, w = (t.detach().clone().requires_grad_() for t in (hidden, weight))
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    loss, num_correct = mlm_cross_entropy(h, w, b, labels, ignore_index=IGNORE, return_num_correct=True, **kw)
    loss.backward(torch.tensor(grad_output, device=loss.device))
    return loss.detach(), num_correct, h.grad, w.grad, (b.grad if b is not None else None)


def assert_close_rel(actual, expected, tol, name):
    assert actual.dtype == expected.dtype or actual.dtype in (torch.float16, torch.bfloat16), name
    assert actual.shape == expected.shape, name
    actual = actual.float()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= tol * scale + 1e-30, f"{name}: max error {err:.3g} vs max |reference| {scale:.3g}"


def check_against_reference(inputs, dtype, grad_output=1.0, **kw):
    out = triton_run(*inputs, grad_output=grad_output, **kw)
    ref = reference(*inputs, grad_output=grad_output)
    loss, num_correct = out[:2]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert num_correct.dtype == torch.int64 and num_correct.dim() == 0
    torch.testing.assert_close(loss, ref[0], atol=TOL[dtype], rtol=TOL[dtype])
    for name, got, want, param in zip(("grad hidden", "grad weight", "grad bias"), out[2:], ref[2:], inputs):
        if param is None:
            assert got is None and want is None, name
            continue
        assert got.dtype == param.dtype, name
        if want.abs().max() == 0:
            assert (got == 0).all(), f"{name}: expected exact zeros"
        else:
            assert_close_rel(got, want, TOL[dtype], name)
    return out, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("vocab", [100, 1000])
@pytest.mark.parametrize("labelled", ["none", "one", "some", "all"])
def test_matches_reference(dtype, vocab, labelled):
    n = 13
    n_labelled = {"none": 0, "one": 1, "some": 7, "all": n}[labelled]
    inputs = make_inputs(n, 32, vocab, dtype, n_labelled)
    # 5 rows per chunk divides neither 13 nor 7: the last chunk is short.
    (loss, num_correct, *_), ref = check_against_reference(inputs, dtype, chunk_rows=5)
    if dtype == torch.float32:
        assert num_correct == ref[1]
    if labelled == "none":
        assert loss.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_roberta_vocab_few_rows(dtype, chunk_rows):
    # V = 50,265 spans several BLOCK_V steps with a short last one; E is small to keep the GEMMs cheap.
    inputs = make_inputs(6, 16, 50265, dtype, n_labelled=5)
    check_against_reference(inputs, dtype, chunk_rows=chunk_rows)


@pytest.mark.parametrize("vocab", [1000, 50265])
def test_bfloat16(vocab):
    inputs = make_inputs(7, 16, vocab, torch.bfloat16, n_labelled=6)
    check_against_reference(inputs, torch.bfloat16, chunk_rows=4)


def test_online_softmax_over_many_blocks(monkeypatch):
    # 1000 = 7 * 128 + 104 columns: the running max/sum rescale across blocks, and a masked last block.
    monkeypatch.setattr(ce, "BLOCK_V", 128)
    inputs = make_inputs(9, 24, 1000, torch.float32, n_labelled=8, logit_std=6.0)
    check_against_reference(inputs, torch.float32, chunk_rows=4)


def test_without_bias_and_int32_labels():
    hidden, weight, _, labels = make_inputs(11, 32, 300, torch.float32, n_labelled=6)
    check_against_reference([hidden, weight, None, labels.int()], torch.float32, chunk_rows=4)


def test_every_kernel_launch_is_on_the_inputs_device(monkeypatch):
    """Triton launches on the current device: each row kernel (forward, and backward over two chunks) runs
    inside ``on_device(hidden)``, which makes the inputs' GPU current (a no-op context on CPU)."""
    inside = []
    entered = []

    @contextlib.contextmanager
    def on_device(t):
        assert t.device == hidden.device
        entered.append(t.device)
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    def spy(kernel):
        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    assert inside, "a row kernel launched outside on_device"
                    return kernel[grid](*args, **kwargs)
                return launch
        return Launcher()
    monkeypatch.setattr(ce, "on_device", on_device)
    monkeypatch.setattr(ce, "_lse_forward_kernel", spy(ce._lse_forward_kernel))
    monkeypatch.setattr(ce, "_logits_grad_kernel", spy(ce._logits_grad_kernel))
    hidden, weight, bias, labels = make_inputs(8, 16, 100, torch.float32, n_labelled=6)
    check_against_reference([hidden, weight, bias, labels], torch.float32, chunk_rows=3)
    assert len(entered) == 4  # two forward chunks, two backward ones


@pytest.mark.parametrize("n_labelled", [5, 10])
def test_strided_inputs(n_labelled):
    # Every row labelled skips the row selection, so the inputs reach the GEMMs and kernels as given.
    hidden, weight, bias, labels = make_inputs(10, 32, 200, torch.float32, n_labelled=n_labelled)
    hidden = hidden.t().contiguous().t()
    weight = torch.cat([weight, weight], dim=1)[:, ::2]
    labels = torch.stack([labels, labels], dim=1)[:, 0]
    assert not (hidden.is_contiguous() or weight.is_contiguous() or labels.is_contiguous())
    check_against_reference([hidden, weight, bias, labels], torch.float32, chunk_rows=3)


def test_default_chunking_bounds_the_logits(monkeypatch):
    v, itemsize = 1000, 4
    # A chunk row takes the padded row stride: V rounded up to 64 elements, for aligned vector loads.
    row_bytes = ce._row_stride(v) * itemsize
    assert ce._row_stride(v) == 1024 and ce._row_stride(50265) == 50304 and ce._row_stride(64) == 64
    monkeypatch.setattr(ce, "CHUNK_BYTES", 7 * row_bytes)  # 7 rows of logits at most
    for n in (1, 7, 8, 20, 50):
        rows = ce._default_chunk_rows(n, v, itemsize)
        n_chunks = -(-n // rows)
        assert rows * row_bytes <= ce.CHUNK_BYTES
        assert n_chunks == -(-n // 7)  # no more chunks than the budget needs ...
        assert n - (n_chunks - 1) * rows >= rows - n_chunks  # ... and a last chunk that is not a sliver
    inputs = make_inputs(20, 32, v, torch.float32, n_labelled=17)
    check_against_reference(inputs, torch.float32)


def test_fp16_loss_scale_survives():
    """DeepSpeed's fp16 loss scale arrives as grad_output = 2**16. The gradient must equal the fp32 reference
    times 2**16, with no entry flushed to zero that fp16 can hold."""
    scale = 65536.0
    # Wide logits over RoBERTa's vocabulary: most softmax entries are far below fp16's smallest subnormal.
    hidden, weight, bias, labels = make_inputs(4, 16, 50265, torch.float16, n_labelled=4, logit_std=4.0)
    inputs = [hidden, weight, bias, labels]
    ref_unscaled = reference(*inputs)
    # The trap is real: the unscaled gradient, rounded to fp16, loses entries that the scaled one keeps.
    fp16_normal = 2.0 ** -14
    for want in ref_unscaled[3:]:
        assert ((want.half() == 0) & ((want * scale).abs() >= fp16_normal)).any()

    out = triton_run(*inputs, grad_output=scale)
    torch.testing.assert_close(out[0], ref_unscaled[0], atol=1e-2, rtol=1e-2)
    for name, got, want in zip(("grad hidden", "grad weight", "grad bias"), out[2:], ref_unscaled[2:]):
        want = want * scale
        assert got.dtype == torch.float16
        assert_close_rel(got, want, TOL[torch.float16], name)
        flushed = (got == 0) & (want.abs() >= fp16_normal)
        assert not flushed.any(), f"{name}: {int(flushed.sum())} entries flushed to zero"


def _rel_norm_err(actual, expected):
    return ((actual.float() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("grad_output, logit_std", [(2.0 ** -12, 0.5), (1.0, 0.5), (65536.0, 0.5),
                                                    (65536.0, 32.0)])
def test_fp16_gradients_as_good_as_fp16_can_hold(grad_output, logit_std):
    """What fp16 training meets at V = 50,265 and N = 16,384 labelled rows with no loss scale: near-uniform
    softmax entries ~1/V times grad_output/N fall below fp16's smallest subnormal (2**-24) per element, while
    the summed gradients are large enough to hold. Here N V is small, so a grad_output of 2**-12 puts the
    per-element logit gradient (2**-26) at the same place. Every gradient must then be as close to the fp32
    reference as that reference rounded to fp16 is (the best any fp16 gradient can be), and no entry fp16 holds
    as a normal number may flush. The other cases are the loss scales DeepSpeed uses (1 and 2**16), the last
    with weights large enough (|W| ~ 8) that a 2**15-scaled gradient would overflow an fp16 GEMM output."""
    inputs = make_inputs(256, 16, 64, torch.float16, n_labelled=256, logit_std=logit_std)
    out = triton_run(*inputs, grad_output=grad_output, chunk_rows=100)  # three chunks: dW accumulates
    ref = reference(*inputs, grad_output=grad_output)
    for name, got, want in zip(("grad hidden", "grad weight", "grad bias"), out[2:], ref[2:]):
        assert got.dtype == torch.float16 and torch.isfinite(got).all(), name
        best = _rel_norm_err(want.half(), want)
        err = _rel_norm_err(got, want)
        assert err <= 1.5 * best + 2e-3, f"{name}: relative error {err:.3g}, fp16 rounding alone {best:.3g}"
        flushed = (got == 0) & (want.abs() >= 2.0 ** -14)
        assert not flushed.any(), f"{name}: {int(flushed.sum())} entries flushed to zero"


def test_num_correct_counts_argmax_hits():
    hidden, weight, bias, labels = make_inputs(20, 32, 1000, torch.float32, n_labelled=16)
    logits = F.linear(hidden, weight, bias)
    hit = (torch.arange(20, device=DEVICE) % 3 == 0) & (labels != IGNORE)
    labels = torch.where(hit, logits.argmax(-1), labels)
    _, num_correct = mlm_cross_entropy(hidden, weight, bias, labels, return_num_correct=True, chunk_rows=6)
    _, want, *_ = reference(hidden, weight, bias, labels)
    assert 0 < int(want) < 16
    assert int(num_correct) == int(want)


def test_argmax_ties_pick_the_first_maximum(monkeypatch):
    # Zero hidden and weight make the logits exactly the bias, whose maximum sits at 40 and at 700 (another
    # block): torch.argmax says 40, so two rows are right and the one labelled 700 is wrong.
    monkeypatch.setattr(ce, "BLOCK_V", 256)
    v = 1000
    bias = torch.zeros(v, device=DEVICE)
    bias[40] = bias[700] = 3.0
    hidden, weight = torch.zeros(3, 8, device=DEVICE), torch.zeros(v, 8, device=DEVICE)
    labels = torch.tensor([40, 700, 40], device=DEVICE)
    _, num_correct = mlm_cross_entropy(hidden, weight, bias, labels, return_num_correct=True)
    assert int(num_correct) == 2 == int(reference(hidden, weight, bias, labels)[1])


def test_zero_labelled_rows_give_zero_loss_and_gradients():
    for n in (0, 5):
        hidden, weight, bias, labels = make_inputs(n, 16, 50, torch.float16, n_labelled=0)
        loss, num_correct, gh, gw, gb = triton_run(hidden, weight, bias, labels)
        assert loss.item() == 0.0 and int(num_correct) == 0
        for g, p in ((gh, hidden), (gw, weight), (gb, bias)):
            assert g.shape == p.shape and g.dtype == p.dtype and (g == 0).all()


def test_only_requested_gradients_and_no_grad():
    hidden, weight, bias, labels = make_inputs(9, 16, 200, torch.float32, n_labelled=5)
    w = weight.clone().requires_grad_()
    mlm_cross_entropy(hidden, w, bias, labels, chunk_rows=2).backward()
    assert_close_rel(w.grad, reference(hidden, weight, bias, labels)[3], TOL[torch.float32], "grad weight")
    with torch.no_grad():
        loss = mlm_cross_entropy(hidden, weight, bias, labels)
    torch.testing.assert_close(loss, reference(hidden, weight, bias, labels)[0])


def test_falls_back_to_reference_without_triton(monkeypatch):
    monkeypatch.setattr(ce, "triton_usable", lambda t: False)
    monkeypatch.setattr(ce, "_mlm_cross_entropy_forward", None)  # any use of the kernel path would fail
    hidden, weight, bias, labels = make_inputs(7, 16, 100, torch.float32, n_labelled=4)
    loss = mlm_cross_entropy(hidden, weight, bias, labels)
    torch.testing.assert_close(loss, reference(hidden, weight, bias, labels)[0])
    # int32 labels work on the fallback path too (F.cross_entropy itself takes only int64 targets).
    loss = mlm_cross_entropy(hidden, weight, bias, labels.int())
    torch.testing.assert_close(loss, reference(hidden, weight, bias, labels)[0])
    with pytest.raises(ValueError, match="label 100 "):
        mlm_cross_entropy(hidden, weight, bias, torch.full_like(labels, 100))


def test_bad_inputs_raise():
    hidden, weight, bias, labels = make_inputs(6, 16, 100, torch.float32, n_labelled=3)
    for bad_label in (100, -1, 12345):
        bad = labels.clone()
        bad[2] = bad_label
        with pytest.raises(ValueError, match=f"label {bad_label} .*outside the vocabulary"):
            mlm_cross_entropy(hidden, weight, bias, bad)
    # A label equal to a non-default ignore_index is simply ignored.
    mlm_cross_entropy(hidden, weight, bias, torch.where(labels == IGNORE, -1, labels), ignore_index=-1)
    cases = [
        (TypeError, "hidden must be a torch.Tensor", (hidden.tolist(), weight, bias, labels)),
        (ValueError, "hidden must have 2 dimensions", (hidden[None], weight, bias, labels)),
        (ValueError, "must be \\[vocab_size, 16\\]", (hidden, weight[:, :8], bias, labels)),
        (TypeError, "weight has dtype", (hidden, weight.half(), bias, labels)),
        (TypeError, "hidden has dtype int64", (hidden.long(), weight, bias, labels)),
        (ValueError, "bias has shape", (hidden, weight, bias[:50], labels)),
        (TypeError, "bias has dtype", (hidden, weight, bias.double(), labels)),
        (TypeError, "labels must hold integer class ids", (hidden, weight, bias, labels.float())),
        (ValueError, "labels has 5 entries", (hidden, weight, bias, labels[:5])),
        (ValueError, "labels must have 1 dimensions", (hidden, weight, bias, labels[None])),
        (ValueError, "weight is on meta", (hidden, weight.to("meta"), bias, labels)),
    ]
    for exc, msg, args in cases:
        with pytest.raises(exc, match=msg):
            mlm_cross_entropy(*args)
    with pytest.raises(ValueError, match="chunk_rows"):
        mlm_cross_entropy(hidden, weight, bias, labels, chunk_rows=0)


def test_model_loss_and_gradients_match_torch_kernels(monkeypatch):
    calls = []

    launch = ce._mlm_cross_entropy_forward  # what the custom op runs

    def spy(*args):  # proves the model's Triton path reaches this kernel
        calls.append(args[0].shape)
        return launch(*args)

    monkeypatch.setattr(ce, "_mlm_cross_entropy_forward", spy)
    cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=24,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(3)
    fast = RobertaForMaskedLM(cfg, kernels="triton").to(DEVICE)
    eager = RobertaForMaskedLM(cfg, kernels="torch").to(DEVICE)
    eager.load_state_dict(fast.state_dict())
    with torch.no_grad():  # a non-zero decoder bias, so its gradient path is exercised with real values
        for model in (fast, eager):
            model.lm_head.bias.copy_(torch.linspace(-1, 1, cfg.vocab_size))

    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, cfg.vocab_size, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    ids[1, 11:] = cfg.pad_token_id
    labels = torch.where((torch.rand(2, 16, generator=g) < 0.3) & mask.bool(), ids, torch.full_like(ids, IGNORE))
    labels[0, 1] = ids[0, 1]  # at least one labelled token
    ids, mask, labels = ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)

    outs = []
    for model in (fast, eager):
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        outs.append(out)
    assert calls == [(int((labels != IGNORE).sum()), cfg.hidden_size)]
    torch.testing.assert_close(outs[0].loss, outs[1].loss, atol=1e-5, rtol=1e-5)
    assert int(outs[0].num_correct) == int(outs[1].num_correct)
    grads = dict(eager.named_parameters())
    for name, p in fast.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_fp32_output_gemm_on_each_path():
    """The backward's 16-bit x 16-bit -> fp32 GEMM: the CPU path (upcast) against an fp32 product, and the call
    CUDA makes (``out_dtype``, one cuBLAS GEMM) on meta tensors, whose shape/dtype rules are CUDA's: its CPU twin."""
    a, b = torch.randn(24, 40).half(), torch.randn(40, 16).half()
    out = torch.empty(24, 16)
    torch.testing.assert_close(ce._mm_fp32(a, b, out), a.float() @ b.float())
    if not ce._MM_OUT_DTYPE:
        pytest.skip("this torch has no mm(out_dtype=); the upcast path above is the one it runs everywhere")
    am, bm = a.to("meta"), b.to("meta")
    got = ce._mm_fp32(am, bm, torch.empty(24, 16, device="meta"))
    assert got.dtype == torch.float32 and got.shape == (24, 16)
    assert ce._mm_fp32(am.t(), bm[:24], torch.empty(40, 16, device="meta")).shape == (40, 16)
