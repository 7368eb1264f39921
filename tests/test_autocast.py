"""Native models under torch.autocast, as transformers.Trainer(bf16=True / fp16=True), accelerate and Lightning
run them: the residual stream stays fp32 (LayerNorm computes and returns fp32 under autocast, as nn.LayerNorm
does) while the linear layers run in the autocast dtype. Both kernel paths (Triton through the interpreter
here), masked-LM and sequence classification, forward and backward, against the fp32 run. Outside autocast
nothing changes: mixed dtypes are still an error and matching ones reach the kernels untouched."""
import pytest
import torch

from fastroberta import RobertaConfig, RobertaForMaskedLM, RobertaForSequenceClassification
from fastroberta.kernels import FusedLayerNorm
from fastroberta.kernels._checks import interpreter_active

CUDA = torch.cuda.is_available()
KERNELS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not (CUDA or interpreter_active()), reason="the Triton kernels need CUDA or TRITON_INTERPRET=1"))]


def tiny_config():
    return RobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=40, num_labels=3, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)


def inputs(head, device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 120, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    if head == "mlm":
        labels = torch.full((2, 16), -100)
        labels[0, 2::3] = ids[0, 2::3]
        labels[1, 1:10:4] = ids[1, 1:10:4]
    else:
        labels = torch.tensor([2, 0])
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}


def loss_and_grads(model, batch, dtype=None):
    model.zero_grad()
    with torch.autocast(batch["input_ids"].device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# (kernels, device, autocast dtype). The interpreter cannot run bf16 (it computes on the raw bits): the Triton
# path runs fp16 on CPU and both on a GPU.
CASES = [("torch", "cpu", torch.bfloat16)]
if CUDA:
    CASES += [(k, "cuda", t) for k in ("triton", "torch") for t in (torch.float16, torch.bfloat16)]
elif interpreter_active():
    CASES += [("triton", "cpu", torch.float16)]


@pytest.mark.parametrize("kernels,device,dtype", CASES, ids=[f"{k}-{d}-{str(t)[6:]}" for k, d, t in CASES])
@pytest.mark.parametrize("head", ["mlm", "cls"])
def test_autocast_matches_fp32(head, kernels, device, dtype):
    torch.manual_seed(0)
    cls = RobertaForMaskedLM if head == "mlm" else RobertaForSequenceClassification
    model = cls(tiny_config(), kernels=kernels).to(device).train()
    batch = inputs(head, device)
    ref, ref_grads = loss_and_grads(model, batch)
    out, grads = loss_and_grads(model, batch, dtype)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=2e-2)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        cosine = torch.nn.functional.cosine_similarity(g.flatten(), ref_grads[name].flatten(), dim=0)
        assert cosine > 0.98, (name, float(cosine))
    if head == "mlm":
        model.eval()
        with torch.no_grad(), torch.autocast(device, dtype=dtype):
            logits = model(batch["input_ids"], batch["attention_mask"]).logits
            hidden = model.roberta(batch["input_ids"], batch["attention_mask"]).last_hidden_state
        assert logits.dtype == dtype and hidden.dtype == torch.float32  # as transformers' heads under autocast


@pytest.mark.parametrize("kernels", KERNELS)
def test_layer_norm_under_autocast_mixes_dtypes_and_returns_fp32(kernels):
    device = "cuda" if CUDA else "cpu"
    ln = FusedLayerNorm(32, kernels=kernels).to(device)
    x = torch.randn(4, 32, device=device, requires_grad=True)
    residual = torch.randn(4, 32, device=device, requires_grad=True)
    expected = torch.nn.functional.layer_norm(x.bfloat16().float() + residual, (32,), ln.weight, ln.bias, ln.eps)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = ln(x.bfloat16(), residual=residual)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad is not None and residual.grad.dtype == torch.float32


def test_outside_autocast_nothing_changes(monkeypatch):
    """Mixed dtypes stay an error without autocast, and matching dtypes reach the op as the very tensors given
    (no cast, no copy on the fast path)."""
    ln = FusedLayerNorm(32, kernels="torch")
    x, residual = torch.randn(4, 32), torch.randn(4, 32)
    with pytest.raises(TypeError, match="residual has dtype"):
        ln(x.bfloat16(), residual=residual)
    ops = ln.ops(x.device)
    seen = []

    def spy(*args, **kwargs):
        seen.append((args, kwargs))
        return args[0]

    monkeypatch.setattr(ops, "layer_norm", spy)
    ln(x, residual=residual)
    (args, kwargs), = seen
    assert args[0] is x and args[1] is ln.weight and args[2] is ln.bias and kwargs["residual"] is residual
