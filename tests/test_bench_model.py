"""The step cost model (``python -m benchmarks model``): its op counter on cases computed by hand, the command on
a tiny config, and the grouping of profiler events that ``--measure`` uses (fed a recorded event list)."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import __main__ as cli  # noqa: E402
from benchmarks import bench_model  # noqa: E402
import fastroberta.kernels.layer_norm  # noqa: E402,F401

layer_norm = sys.modules["fastroberta.kernels.layer_norm"]


def _meta(*shape, dtype=torch.float16, grad=False):
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)


def _by_op(counter):
    return {r.op: r for r in counter.records}


def test_one_linear_layer_forward_and_backward_by_hand():
    t, i, o = 64, 32, 48
    x, w, b = _meta(t, i, grad=True), _meta(o, i, grad=True), _meta(o, grad=True)
    counter = bench_model.OpCounter()
    with counter:
        y = F.linear(x, w, b)
        counter.phase = "backward"
        y.backward(_meta(t, o))
    fwd = [r for r in counter.records if r.phase == "forward"]
    assert [(r.op, r.kind) for r in fwd] == [("addmm", "GEMM")]
    assert fwd[0].flops == 2 * t * i * o
    assert fwd[0].read == 2 * (t * i + o * i + o) and fwd[0].written == 2 * t * o
    bwd = sorted((r.op, r.flops, r.read, r.written) for r in counter.records if r.phase == "backward")
    # dx = dy W, dW = dy^T x (two GEMMs) and db = the column sums of dy (one reduction).
    assert bwd == sorted([("mm", 2 * t * o * i, 2 * (t * o + o * i), 2 * t * i),
                          ("mm", 2 * t * o * i, 2 * (t * o + t * i), 2 * o * i),
                          ("sum", 0, 2 * t * o, 2 * o)])
    assert {r.kind for r in counter.records if r.op == "sum"} == {"elementwise"}


def test_layer_norm_aten_and_fastroberta_op_by_hand():
    n, e = 128, 64
    x, w, b = _meta(n, e, dtype=torch.float32), _meta(e, dtype=torch.float32), _meta(e, dtype=torch.float32)
    counter = bench_model.OpCounter()
    with counter:
        F.layer_norm(x, (e,), w, b)
    (rec,) = counter.records
    assert (rec.op, rec.kind, rec.flops) == ("native_layer_norm", "norm", 0)
    assert rec.read == 4 * (n * e + 2 * e) and rec.written == 4 * (n * e + 2 * n)  # y, mean, rstd

    x16, r16 = _meta(n, e, grad=True), _meta(n, e, grad=True)
    w16, b16 = _meta(e, grad=True), _meta(e, grad=True)
    counter = bench_model.OpCounter()
    with counter:
        y = layer_norm.layer_norm(x16, w16, b16, residual=r16, dropout_p=0.1)
        counter.phase = "backward"
        y.backward(_meta(n, e))
    recs = _by_op(counter)
    fwd = recs["fastroberta.layer_norm_fwd"]
    assert fwd.read == 2 * (2 * n * e + 2 * e) and fwd.written == 2 * n * e + 8 * n
    bwd = recs["fastroberta.layer_norm_bwd"]
    programs = min(n, layer_norm.H100_BACKWARD_PROGRAMS)
    # dy, x, residual, weight, mean and rstd in; dx, dresidual (dropout on) and fp32 partial rows out.
    assert bwd.read == 2 * (3 * n * e + e) + 8 * n
    assert bwd.written == 2 * 2 * n * e + 2 * programs * e * 4
    # One launch sums the two fp32 partial rows per program into dweight and dbias, written in their fp16.
    psum = recs["fastroberta.layer_norm_partials_sum"]
    assert psum.read == 2 * programs * e * 4 and psum.written == 2 * 2 * e
    assert sum(r.op.startswith("fastroberta.layer_norm") for r in counter.records) == 3
    assert not [r for r in counter.records if r.op in ("sum", "_to_copy")]
    assert {r.kind for r in counter.records if r.op.startswith("fastroberta.")} == {"norm"}
    assert not [r for r in counter.records if r.op == "native_layer_norm"]  # the custom op, not aten's
    # mean and rstd take no gradient: autograd hands the backward None for them, no zeros tensors to launch
    assert not [r for r in counter.records if r.op in ("zeros", "zeros_like", "fill_", "zero_")]


def test_layer_norm_with_input_bias_by_hand():
    """The preceding linear's bias read by the forward (fp32 here), recomputed with and summed by the backward: a
    third fp32 partial row per program, and the one partial-sum launch writes three gradients."""
    n, e = 600, 64
    x, r = _meta(n, e, grad=True), _meta(n, e, grad=True)
    w, b, ib = _meta(e, grad=True), _meta(e, grad=True), _meta(e, dtype=torch.float32, grad=True)
    counter = bench_model.OpCounter()
    with counter:
        y = layer_norm.layer_norm(x, w, b, residual=r, dropout_p=0.1, input_bias=ib)
        counter.phase = "backward"
        y.backward(_meta(n, e))
    recs = _by_op(counter)
    assert recs["fastroberta.layer_norm_fwd"].read == 2 * (2 * n * e + 2 * e) + 4 * e
    programs = min(n, layer_norm.H100_BACKWARD_PROGRAMS)
    bwd = recs["fastroberta.layer_norm_bwd"]
    assert bwd.read == 2 * (3 * n * e + e) + 4 * e + 8 * n  # dy, x, residual, weight, input_bias, mean, rstd
    assert bwd.written == 2 * 2 * n * e + 3 * programs * e * 4
    psum = recs["fastroberta.layer_norm_partials_sum"]
    assert psum.read == 3 * programs * e * 4 and psum.written == 2 * e + 2 * e + 4 * e
    assert [r.op for r in counter.records if r.phase == "backward"] == [
        "fastroberta.layer_norm_bwd", "fastroberta.layer_norm_partials_sum"]


def test_encoder_layer_backward_has_no_bias_gradient_pass_before_its_layer_norms():
    """attn_out's and ffn_out's biases are summed inside the LayerNorm backward: what one more encoder layer adds to
    a step holds a single [tokens, *] bias-gradient `sum` (the QKV projection's, over [tokens, 3E]), and each of its
    two LayerNorm backwards is two launches (the kernel and the partial sum: no dweight/dbias sums, no casts)."""
    import dataclasses
    from collections import Counter
    cfg, b, l = bench_model._configs("tiny"), 2, 64

    def step(layers):
        counter, _ = bench_model.count_step("fastroberta", "mlm", dataclasses.replace(cfg, num_hidden_layers=layers),
                                            b, l)
        return counter.records
    one, two = step(1), step(2)
    per_layer = Counter((r.phase, r.op) for r in two) - Counter((r.phase, r.op) for r in one)
    assert per_layer[("backward", "sum")] == 1
    sums = Counter(r.read for r in two if r.phase == "backward" and r.op == "sum") - \
        Counter(r.read for r in one if r.phase == "backward" and r.op == "sum")
    assert sums == Counter({b * l * 3 * cfg.hidden_size * 2: 1})  # the QKV bias's gradient, fp16
    assert per_layer[("backward", "fastroberta.layer_norm_bwd")] == 2
    assert per_layer[("backward", "fastroberta.layer_norm_partials_sum")] == 2
    # The one cast left per layer is the FFN's first bias gradient (fp32 epilogue sums -> fp16), not a LayerNorm's.
    assert per_layer[("backward", "_to_copy")] <= 1
    assert sum(per_layer.values()) <= 35  # 41 before the biases moved into the LayerNorm


def test_roofline_is_the_slower_of_compute_and_memory():
    peak, bw = bench_model.gpu_specs("H100 SXM")
    assert (peak, bw) == (989e12, 3.35e12)
    gemm = bench_model.Record("mm", "GEMM", "forward", 989e12, 1.0, 1.0)
    copy = bench_model.Record("copy_", "copies", "forward", 0.0, 3.35e12, 3.35e12)
    assert bench_model.roofline_s(gemm, "H100 SXM") == 1.0
    assert bench_model.roofline_s(copy, "H100 SXM") == 2.0


def test_command_runs_on_a_tiny_config(tmp_path):
    args = cli.build_parser().parse_args(["model", "--cases", "tiny", "--out", str(tmp_path)])
    assert cli.run_model(args)
    result = json.loads((tmp_path / "step_model.json").read_text())
    (case,) = result["results"]
    assert set(case["competitors"]) == set(bench_model.COMPETITORS)
    for comp in case["competitors"].values():
        for summary in comp["gpus"].values():
            assert summary["total_ms"] > 0
            assert summary["host_floor_ms"] == summary["launches"] * bench_model.HOST_US_PER_LAUNCH / 1e3
            assert abs(sum(c["share"] for c in summary["classes"].values()) - 1) < 1e-9
    fast = case["competitors"]["fastroberta"]["gpus"]["H100 SXM"]["classes"]
    assert fast["attention"]["tflop"] > 0 and fast["norm"]["launches"] > 0  # the custom ops were counted
    assert "Assumptions" in (tmp_path / "step_model.md").read_text()


def test_question_answering_step_counts_the_span_head_and_both_losses():
    """The finetune-qa case's step: the 2-wide qa_outputs GEMM and a start and an end cross-entropy, the same in
    fastroberta and transformers (the encoder is what differs)."""
    cfg = bench_model._configs("tiny")
    b, l = 2, 64
    for comp in ("fastroberta", "hf-sdpa"):
        counter, n_params = bench_model.count_step(comp, "qa", cfg, b, l)
        forward = [r for r in counter.records if r.phase == "forward"]
        assert [r.op for r in forward if r.kind == "loss"] == ["_log_softmax", "nll_loss_forward"] * 2
        head = [r for r in forward if r.kind == "GEMM"][-1]
        assert head.flops == 2 * b * l * cfg.hidden_size * 2
        assert n_params == bench_model.count_step("fastroberta", "qa", cfg, b, l)[1]
    assert bench_model.CASES["finetune-qa-base-384"] == dict(task="qa", model="base", seq_len=384, batch=32)


def test_unknown_case_is_one_clear_line(capsys):
    args = cli.build_parser().parse_args(["model", "--cases", "nope"])
    assert not cli.run_model(args)
    assert "unknown case" in capsys.readouterr().err


def test_measured_events_are_grouped_by_class():
    events = [("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64", 100.0),
              ("ampere_fp16_s16816gemm_fp16_128x128_ldg8_f2f_stages_32x5_tn", 50.0),
              ("_attn_fwd", 40.0), ("_attn_bwd_dkdv", 60.0),
              ("_layer_norm_fwd_kernel", 10.0), ("_lse_forward_kernel", 5.0),
              ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl", 20.0),
              ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", 30.0),
              ("void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>", 7.0),
              ("void at::native::indexSelectLargeIndex<c10::Half>", 3.0)]
    grouped = bench_model.group_measured(events)
    expected = dict(GEMM=(0.15, 2), attention=(0.1, 2), norm=(0.01, 1), loss=(0.005, 1), elementwise=(0.02, 1),
                    optimizer=(0.03, 1), copies=(0.007, 1), embedding=(0.003, 1))
    assert {c: (pytest.approx(g["ms"]), g["launches"]) for c, g in grouped.items()} == expected
