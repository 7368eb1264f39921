"""torch.compile over the models: the fused ops are torch.library custom ops, so a whole training step traces as
one graph (no graph break) with the Triton kernels (the interpreter here) and with the eager twins, and the
compiled model gives eager's outputs and gradients. The trainer's --compile gives eager's losses.

Compiles are slow on 2 CPU cores (~20-60 s each), so the compiled-vs-eager cases are few and marked slow; the
graph-break checks (Dynamo tracing only, no Inductor) and the op checks are quick.

Dropout: the ops' Philox seeds are drawn in the graph (``torch.randint`` on the inputs' device). Inductor's own
RNG differs from eager's, so the comparisons with dropout on set ``torch._inductor.config.fallback_random``,
which makes the compiled graph draw from torch's generator in eager's order: then even the dropout masks match.
"""
import numpy as np
import pytest
import torch
import torch._dynamo
import torch._inductor.config

from fastroberta import RobertaConfig, RobertaForMaskedLM
from fastroberta import train as tr
from fastroberta.compile import compile_model, enable_dynamo_options
from fastroberta.kernels import attention, attention_packed, attention_varlen, layer_norm, mlm_cross_entropy
from fastroberta.kernels._checks import interpreter_active
from fastroberta.model import (RobertaForMultipleChoice, RobertaForQuestionAnswering,
                               RobertaForSequenceClassification, RobertaModel)
from test_syncs import training_batch
from test_train import losses, run, small  # noqa: F401  (shared session fixture)

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or interpreter_active()),
                                reason="the Triton kernels need CUDA or TRITON_INTERPRET=1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_config(**kw):
    base = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=40, num_labels=3)
    return RobertaConfig(**{**base, **kw})


def batch(seed=1):
    """Two rows of 16, the second right-padded after 10 tokens, ~30% of the real tokens labelled (test_syncs')."""
    b = training_batch(varlen=False, seed=seed)
    return b["input_ids"].to(DEVICE), b["attention_mask"].to(DEVICE), b["labels"].to(DEVICE)


def model_and_call(kind, kernels, train):
    torch.manual_seed(0)
    ids, mask, labels = batch()
    if kind == "base":
        model = RobertaModel(tiny_config(), kernels=kernels)
        call = dict(input_ids=ids, attention_mask=mask)
    elif kind == "mlm":
        model = RobertaForMaskedLM(tiny_config(), kernels=kernels)
        call = dict(input_ids=ids, attention_mask=mask, labels=labels)
    elif kind == "cls":
        model = RobertaForSequenceClassification(tiny_config(), kernels=kernels)
        call = dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([2, 0], device=DEVICE))
    elif kind == "qa":  # the second row's end is past the sequence (ignored)
        model = RobertaForQuestionAnswering(tiny_config(num_labels=2), kernels=kernels)
        call = dict(input_ids=ids, attention_mask=mask, start_positions=torch.tensor([3, 1], device=DEVICE),
                    end_positions=torch.tensor([5, 40], device=DEVICE))
    else:  # multiple choice: the two rows as one question's two choices
        model = RobertaForMultipleChoice(tiny_config(), kernels=kernels)
        call = dict(input_ids=ids[None], attention_mask=mask[None], labels=torch.tensor([1], device=DEVICE))
    return model.to(DEVICE).train(train), call


def graph_breaks(fn, *args, **kwargs):
    enable_dynamo_options()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    return explained.graph_break_count, [r.reason.splitlines()[0] for r in explained.break_reasons]


# Tracing only: no graph break anywhere --------------------------------------------------------------------

@pytest.mark.parametrize("kernels", ["triton", "torch"])
@pytest.mark.parametrize("kind", ["base", "mlm", "cls"])
def test_models_trace_without_graph_breaks(kind, kernels):
    model, call = model_and_call(kind, kernels, train=True)  # dropout on: the seeds are drawn in the graph
    # validate=True (the default) too: the value checks that read tensors are skipped while Dynamo traces.
    assert graph_breaks(model, **call) == (0, [])


@pytest.mark.parametrize("kernels", ["triton", "torch"])
@pytest.mark.parametrize("kind", ["qa", "mc"])
def test_question_answering_and_multiple_choice_trace_without_graph_breaks(kind, kernels):
    model, call = model_and_call(kind, kernels, train=True)
    assert graph_breaks(model, **call) == (0, [])
    if kernels == "torch":  # the unpadded layout's ops on the Triton path are traced by the MLM case above
        assert graph_breaks(model, **call, unpad=True, return_dict=False) == (0, [])


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_unpadded_and_varlen_forward_trace_without_graph_breaks(kernels):
    model, call = model_and_call("mlm", kernels, train=True)
    assert graph_breaks(model, **call, unpad=True) == (0, [])
    cu = torch.tensor([0, 7, 16, 26], dtype=torch.int32, device=DEVICE)
    assert graph_breaks(model, **call, cu_seqlens=cu, max_seqlen=10) == (0, [])


@pytest.mark.parametrize("kind", ["mlm", "cls"])
def test_tuple_outputs_and_autocast_trace_without_graph_breaks(kind):
    """return_dict=False (the outputs' to_tuple) and the autocast branches (fp32 LayerNorm, the MLM decoder in
    the autocast dtype) trace as one graph too."""
    model, call = model_and_call(kind, "torch", train=True)
    assert graph_breaks(model, **call, return_dict=False) == (0, [])

    def under_autocast():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            return model(**call)[0]
    assert graph_breaks(under_autocast) == (0, [])


def test_ops_trace_without_graph_breaks():
    x = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    w, b = torch.ones(32, device=DEVICE), torch.zeros(32, device=DEVICE)
    qkv = torch.randn(2, 16, 3, 2, 16, device=DEVICE, requires_grad=True)
    mask = torch.ones(2, 16, dtype=torch.bool, device=DEVICE)
    q, k, v = torch.randn(3, 24, 2, 16, device=DEVICE).unbind(0)
    cu = torch.tensor([0, 10, 24], dtype=torch.int32, device=DEVICE)
    labels = torch.tensor([1, -100, 3, 4], device=DEVICE)

    def step():
        y = layer_norm(x, w, b, residual=x, dropout_p=0.1)
        o = attention_packed(qkv, mask, dropout_p=0.1)
        o2 = attention(*_packed(qkv), mask)
        o3 = attention_varlen(q, k, v, cu, 12)  # validate=True: skipped while tracing
        loss = mlm_cross_entropy(y, torch.randn(50, 32, device=DEVICE), None, labels)
        return loss + o.sum() + o2.sum() + o3.sum()
    assert graph_breaks(step) == (0, [])


def _packed(qkv):
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


# The custom ops themselves -------------------------------------------------------------------------------

def test_ops_are_registered_custom_ops():
    for name in ("layer_norm", "layer_norm_backward", "attention", "attention_backward", "attention_packed",
                 "attention_packed_backward", "mlm_cross_entropy", "mlm_cross_entropy_backward",
                 "gelu_backward_bias_grad", "linear_gelu", "dgrad_gelu_bias_grad"):
        assert hasattr(torch.ops.fastroberta, name), name


@pytest.mark.parametrize("op", ["layer_norm", "attention_packed", "attention", "mlm_cross_entropy",
                                "gelu_backward_bias_grad", "linear_gelu", "dgrad_gelu_bias_grad"])
def test_opcheck(op):
    """torch.library.opcheck: schema, fake (meta) implementation against the real one, autograd registration."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, grad=True):
        return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_(grad)
    seed = torch.tensor([1234])
    mask = torch.ones(2, 16, dtype=torch.uint8, device=DEVICE)
    mask[1, 9:] = 0
    seqlens = torch.tensor([16, 9], dtype=torch.int32, device=DEVICE)
    if op == "layer_norm":
        cases = [(randn(3, 5, 32), randn(32), randn(32), randn(3, 5, 32), randn(32), 1e-5, 0.1, seed),
                 (randn(3, 5, 32), randn(32), randn(32), randn(3, 5, 32), None, 1e-5, 0.1, seed),
                 (randn(4, 32), None, None, None, randn(32), 1e-5, 0.0, None),
                 (randn(4, 32), None, None, None, None, 1e-5, 0.0, None)]
    elif op == "attention_packed":
        cases = [(randn(2, 16, 3, 2, 16), mask, seqlens, 0.1, 0.25, seed),
                 (randn(2, 16, 3, 2, 16), None, None, 0.0, 0.25, None)]
    elif op == "attention":
        cu = torch.tensor([0, 10, 24], dtype=torch.int32, device=DEVICE)
        cases = [(randn(24, 2, 16), randn(24, 2, 16), randn(24, 2, 16), None, None, cu, 14, 0.1, 0.25, seed),
                 (randn(2, 2, 16, 16), randn(2, 2, 16, 16), randn(2, 2, 16, 16), mask, seqlens, None, 16, 0.0,
                  0.25, None)]
    elif op == "gelu_backward_bias_grad":  # runs inside autograd's backward: no gradient of its own
        cases = [(randn(40, 136, grad=False), randn(40, 136, grad=False))]
    elif op == "linear_gelu":  # the FFN's ops run inside fused_linear's autograd function: no gradient of their own
        cases = [(randn(40, 24, grad=False), randn(56, 24, grad=False), randn(56, grad=False))]
    elif op == "dgrad_gelu_bias_grad":
        cases = [(randn(40, 24, grad=False), randn(24, 56, grad=False), randn(40, 56, grad=False))]
    else:
        targets = torch.tensor([3, 0, 49, 7], device=DEVICE)
        cases = [(randn(4, 32), randn(50, 32), randn(50), targets, 0),
                 (randn(4, 32), randn(50, 32), None, targets, 3)]
    for args in cases:
        torch.library.opcheck(getattr(torch.ops.fastroberta, op), args)


# Compiled = eager (Inductor; slow) -----------------------------------------------------------------------

def _step(model, call, train):
    """Outputs (and, in training, parameter gradients) of one forward (+ backward), from a fixed RNG state."""
    torch.manual_seed(7)
    params = getattr(model, "_orig_mod", model).named_parameters()  # a compiled module prefixes the names
    for p in model.parameters():
        p.grad = None
    if not train:
        with torch.no_grad():
            out = model(**call)
        return [t for t in vars(out).values() if isinstance(t, torch.Tensor)], {}
    out = model(**call)
    loss = out.loss if getattr(out, "loss", None) is not None else out.last_hidden_state.float().pow(2).mean()
    loss.backward()
    outs = [t.detach() for t in vars(out).values() if isinstance(t, torch.Tensor)]
    return outs, {n: p.grad.clone() for n, p in params if p.grad is not None}


@pytest.mark.slow  # two Inductor compiles (forward + backward) of a 2-layer model: ~40-90 s
@pytest.mark.parametrize("kind, kernels, train", [
    ("mlm", "triton", True),   # the custom ops, forward and backward, dropout on
    ("mlm", "torch", True),    # the eager twins under Inductor
    ("base", "triton", False),  # eval: no dropout, no grad
    ("cls", "triton", True),
])
def test_compiled_model_matches_eager(kind, kernels, train):
    model, call = model_and_call(kind, kernels, train)
    want_out, want_grads = _step(model, call, train)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):  # eager's RNG draws, so dropout masks match
        compiled = compile_model(model)
        got_out, got_grads = _step(compiled, call, train)
    assert len(got_out) == len(want_out) > 0
    for got, want in zip(got_out, want_out):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert got_grads.keys() == want_grads.keys()
    if train:
        assert len(got_grads) == len(list(model.parameters())) - (kind == "base")  # token-type row: no grad
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, atol=1e-5, rtol=1e-4, msg=name)


# The trainer -----------------------------------------------------------------------------------------------

@pytest.mark.slow  # five steps eager, five compiled (one compile for training, one for the final eval)
def test_train_compile_gives_eager_losses(small, tmp_path):  # noqa: F811
    # Dropout on, fp32: with Inductor drawing from torch's generator (fallback_random) the compiled steps draw
    # the same dropout seeds as eager ones, so the losses agree to fp32 rounding.
    extra = ["--steps", "5", "--micro-batch-size", "2", "--global-batch-size", "2", "--precision", "fp32",
             "--eval-batches", "1", "--kernels", "triton", "--seq-len", "16"]
    _, eager = run(small, tmp_path / "eager", *extra, config="dropout")
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        _, compiled = run(small, tmp_path / "compiled", *extra, "--compile", config="dropout")
    assert [r["step"] for r in compiled] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(losses(compiled), losses(eager), rtol=0, atol=1e-5)
    assert compiled[-1]["eval_loss"] == pytest.approx(eager[-1]["eval_loss"], abs=1e-5)
    assert len(set(losses(eager))) > 1  # the steps train: not one repeated number


def test_compile_flag_is_off_by_default_and_refuses_zero3(tmp_path):
    from fastroberta import finetune as ft
    from fastroberta.training.ds_config import ConfigError
    assert tr.build_parser().parse_args([]).compile is False
    assert ft.build_parser().parse_args([]).compile is False
    s = tr.resolve_settings(tr.build_parser().parse_args(["--compile", "--zero-stage", "2",
                                                          "--output", str(tmp_path / "a")]))
    assert s.zero_stage == 2
    with pytest.raises(ConfigError, match="--compile supports ZeRO stages 0-2"):
        tr.resolve_settings(tr.build_parser().parse_args(["--compile", "--zero-stage", "3",
                                                          "--output", str(tmp_path / "b")]))
