"""``python -m benchmarks model``: one training step counted op by op, without a GPU, and its roofline time.

The step (forward, backward, optimizer) runs on ``meta`` tensors under ``OpCounter``, a ``TorchDispatchMode``
that records every aten op and every ``torch.ops.fastroberta`` custom op with its FLOPs and the bytes it reads
and writes; nothing is computed. Each fastroberta op says what its launch code would run on a GPU
(``fastroberta.kernels._library.COSTS``, next to each kernel); aten ops are costed here: matmul FLOPs from
``torch.utils.flop_counter``, bytes as every tensor argument read once and every output written once. Two
things that differ on meta from CUDA are routed to the CUDA choice (``CudaChoices``): ``F.dropout`` runs as
``native_dropout`` (one kernel each way on CUDA) and ``F.scaled_dot_product_attention`` as the flash kernel
(efficient attention when a mask is passed), not the math path meta would take.

The roofline time of a kernel is max(tensor-core FLOPs / dense fp16 peak, bytes / HBM bandwidth), a lower
bound; the step's is their sum. Competitors, same shapes, one run: transformers' class eager and SDPA,
fastroberta eager with its Triton ops (on meta their fakes run), and fastroberta under ``compile_model`` as
far as it can be counted (see ``compiled_estimate``). ``--measure`` (CUDA) runs the same step under
torch.profiler and puts the measured ms per class next to the modelled ones.

Output: ``benchmarks/results/model/step_model.{json,md}`` (``--out`` elsewhere).
"""
import collections
import json
import os
import re
import sys

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from fastroberta.kernels._library import COSTS, KernelCost, nbytes

CLASSES = ("GEMM", "attention", "norm", "elementwise", "embedding", "loss", "optimizer", "copies")
GPUS = ("H100 SXM", "H200")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "model")
HOST_US_PER_LAUNCH = 5.0  # eager PyTorch's host time per op launch (Python + dispatcher + launch), a rough floor
MASK_PROB = 0.15  # the share of tokens an MLM batch labels: the labelled-row selection's size on meta
CASES = {
    "pretrain-base-512": dict(task="mlm", model="base", seq_len=512, batch=32),
    "pretrain-large-512": dict(task="mlm", model="large", seq_len=512, batch=32),
    "finetune-base-128": dict(task="finetune", model="base", seq_len=128, batch=32),
    "finetune-qa-base-384": dict(task="qa", model="base", seq_len=384, batch=32),
}
MODEL_CLASSES = {"mlm": "RobertaForMaskedLM", "finetune": "RobertaForSequenceClassification",
                 "qa": "RobertaForQuestionAnswering"}
COMPETITORS = ("hf-eager", "hf-sdpa", "fastroberta", "fastroberta-compile")

_aten = torch.ops.aten
GEMMS = {"mm", "addmm", "_addmm_activation", "addmv", "_scaled_mm"}
ATTENTION = {"bmm", "baddbmm", "_softmax", "_softmax_backward_data", "_safe_softmax",
             "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward"}
NORMS = {"native_layer_norm", "native_layer_norm_backward"}
EMBEDDINGS = {"embedding", "embedding_dense_backward"}
LOSSES = {"_log_softmax", "_log_softmax_backward_data", "nll_loss_forward", "nll_loss_backward",
          "mse_loss", "mse_loss_backward", "binary_cross_entropy_with_logits"}
COPIES = {"clone", "copy_", "_to_copy", "cat", "stack", "index_select", "index_copy", "index_copy_", "gather",
          "index", "constant_pad_nd"}
# Ops that read only the rows they gather (plus the indices), not the whole source tensor.
GATHERS = {"embedding", "index_select", "gather", "index", "nll_loss_forward"}
# Ops whose first argument is overwritten, never read.
OVERWRITES = {"copy_", "fill_", "zero_", "bernoulli_", "normal_", "uniform_", "index_copy_"}
FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted",
        "lift_fresh", "_local_scalar_dense", "is_nonzero", "detach", "set_", "resize_", "_unsafe_view",
        "_reshape_alias"}
HOST_READS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero"}


class Record:
    __slots__ = ("op", "kind", "phase", "flops", "read", "written")

    def __init__(self, op, kind, phase, flops, read, written):
        self.op, self.kind, self.phase, self.flops, self.read, self.written = op, kind, phase, flops, read, written


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _is_view(func):
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def classify(name, out, seq_len):
    """The class of an aten op by name; pointwise ops on [..., L, L] attention-score tensors count as attention."""
    if name in GEMMS:
        return "GEMM"
    if name in ATTENTION:
        return "attention"
    if name in NORMS:
        return "norm"
    if name in EMBEDDINGS:
        return "embedding"
    if name in LOSSES:
        return "loss"
    if name in COPIES:
        return "copies"
    shaped = [t for t in _tensors(out)]
    if seq_len and shaped and shaped[0].dim() >= 3 and tuple(shaped[0].shape[-2:]) == (seq_len, seq_len):
        return "attention"
    return "elementwise"


class OpCounter(TorchDispatchMode):
    """Records every op dispatched meanwhile as ``Record``s (one per kernel launch). Host reads of a value
    (``.item()``, ``bool()``) answer True: on meta there is no value (the models here only ask whether an
    attention mask is all ones). ``nonzero`` answers ``nonzero_rows`` rows (the MLM labelled-row selection)."""

    def __init__(self, seq_len=None, nonzero_rows=None):
        super().__init__()
        self.records, self.phase, self.seq_len, self.nonzero_rows = [], "forward", seq_len, nonzero_rows
        self.host_reads = 0

    def add(self, op, kind, flops, read, written):
        self.records.append(Record(op, kind, self.phase, float(flops), float(read), float(written)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        namespace = func.namespace
        if name in HOST_READS:
            self.host_reads += 1
            if name == "nonzero":
                x = args[0]
                rows = self.nonzero_rows if self.nonzero_rows is not None else x.numel()
                return torch.empty((rows, x.dim()), dtype=torch.long, device=x.device)
            if name in ("_local_scalar_dense", "is_nonzero", "equal"):
                return True
        out = func(*args, **kwargs)
        if namespace == "fastroberta":
            cost = COSTS.get(func._schema.name)
            if cost is None:
                raise RuntimeError(f"{func._schema.name} has no cost function (fastroberta.kernels._library.COSTS)")
            for k in cost(*args, **kwargs):
                self.add(f"fastroberta.{k.name}", k.kind, k.flops, k.read, k.written)
            return out
        if name in FREE or _is_view(func):
            return out
        inputs = list(_tensors((args, kwargs)))
        outputs = list(_tensors(out))
        if name in OVERWRITES:
            inputs = inputs[1:]
        if name in GATHERS:
            read = sum(nbytes(t) for t in inputs[1:] if not t.is_floating_point()) + sum(nbytes(t) for t in outputs)
        else:
            read = sum(nbytes(t) for t in inputs)
        written = sum(nbytes(t) for t in outputs)
        if name == "_addmm_activation":
            flops = flop_registry[_aten.addmm](*args[:3], out_val=outputs[0])
        else:
            counter = flop_registry.get(func.overloadpacket)
            flops = counter(*args, **kwargs, out_val=out) if counter else 0
        self.add(name, classify(name, out, self.seq_len), flops, read, written)
        return out


class CudaChoices(TorchFunctionMode):
    """Routes the calls whose meta implementation differs from CUDA's to what CUDA runs (see the module
    docstring): dropout as ``native_dropout``, SDPA as the flash (no mask) or efficient (mask) kernel."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            x, p, training = _bind(args, kwargs, ("input", "p", "training"), (None, 0.5, True))
            if training and p > 0.0:
                return torch.native_dropout(x, p, True)[0]
            return x
        if func is F.scaled_dot_product_attention:
            q, k, v, mask, p, causal, scale = _bind(
                args, kwargs, ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"),
                (None, None, None, None, 0.0, False, None))
            if mask is None:
                return _aten._scaled_dot_product_flash_attention(q, k, v, p, causal, False, scale=scale)[0]
            bias = mask if mask.is_floating_point() else torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
            return _aten._scaled_dot_product_efficient_attention(
                q, k, v, bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]), True, p, causal,
                scale=scale)[0]
        return func(*args, **kwargs)


def _bind(args, kwargs, names, defaults):
    values = list(args) + [None] * (len(names) - len(args))
    return [kwargs.get(n, values[i] if i < len(args) else d) for i, (n, d) in enumerate(zip(names, defaults))]


def optimizer_costs(n_params):
    """What a mixed-precision AdamW step does to ``n_params`` parameters (DeepSpeed's fp16 path, FusedAdam over
    fp32 master weights; the same for every competitor): fp16 gradients into the fp32 partition, one read for
    the gradient norm and overflow check, one fused Adam pass (gradient, master, m and v in; master, m and v
    out), and the fp16 weights written back from the masters."""
    n = n_params
    return [KernelCost("grads_fp16_to_fp32", "optimizer", 0, 2 * n, 4 * n),
            KernelCost("grad_norm_overflow_check", "optimizer", 0, 4 * n, 0),
            KernelCost("fused_adamw", "optimizer", 0, 16 * n, 12 * n),
            KernelCost("master_to_fp16_weights", "optimizer", 0, 4 * n, 2 * n)]


def gpu_specs(gpu):
    """(dense fp16 tensor-core FLOP/s, HBM bytes/s) of ``gpu`` from the metrics tables."""
    from fastroberta.training.metrics import GPU_HBM_TBPS, GPU_PEAK_TFLOPS
    key = gpu.replace(" SXM", "")
    half, _tf32, _fp32 = next(v for k, v in GPU_PEAK_TFLOPS if k in key)
    bw = next(v for k, v in GPU_HBM_TBPS if k in key)
    return half * 1e12, bw * 1e12


def roofline_s(record, gpu):
    peak, bw = gpu_specs(gpu)
    return max(record.flops / peak, (record.read + record.written) / bw)


def summarize(records, gpu, tokens):
    """Per-class ms, FLOPs, bytes and launches of ``records`` on ``gpu``, and the totals."""
    by_class = {c: dict(ms=0.0, tflop=0.0, gbytes=0.0, launches=0) for c in CLASSES}
    for r in records:
        c = by_class[r.kind]
        c["ms"] += 1e3 * roofline_s(r, gpu)
        c["tflop"] += r.flops / 1e12
        c["gbytes"] += (r.read + r.written) / 1e9
        c["launches"] += 1
    total = sum(c["ms"] for c in by_class.values())
    for c in by_class.values():
        c["share"] = c["ms"] / total if total else 0.0
    elementwise_bytes = sum(r.read + r.written for r in records if r.kind in ("elementwise", "copies"))
    return dict(classes=by_class, total_ms=total, launches=len(records),
                host_floor_ms=len(records) * HOST_US_PER_LAUNCH / 1e3,
                tflop=sum(r.flops for r in records) / 1e12,
                gbytes=sum(r.read + r.written for r in records) / 1e9,
                elementwise_copies_bytes_per_token=elementwise_bytes / tokens)


def _configs(model):
    from fastroberta.config import RobertaConfig
    return RobertaConfig(**TINY) if model == "tiny" else RobertaConfig.preset(model)


TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=70)


def model_class(competitor, task):
    """transformers' or fastroberta's class for ``task`` (both use the same names)."""
    import importlib
    return getattr(importlib.import_module("transformers" if competitor.startswith("hf") else "fastroberta.model"),
                   MODEL_CLASSES[task])


def new_model(competitor, task, cfg):
    """The competitor's randomly initialised model for ``task``, fp32 (question answering: 2 labels)."""
    if task == "qa":
        import dataclasses
        cfg = dataclasses.replace(cfg, num_labels=2)
    cls = model_class(competitor, task)
    if competitor.startswith("hf"):
        import transformers
        return cls._from_config(transformers.RobertaConfig(**cfg.to_dict()),
                                attn_implementation=competitor.split("-")[1])
    return cls(cfg, kernels="triton")


def task_targets(task, ids, generator=None):
    """The loss inputs of a ``task`` batch: MLM labels (on meta: ``ids`` itself, only shapes matter there), a
    class per row, or a start and an end position per row (question answering)."""
    b, l = ids.shape
    if task == "mlm":
        chosen = ids if ids.device.type == "meta" else \
            torch.where(torch.rand(b, l, device=ids.device, generator=generator) < MASK_PROB, ids, -100)
        return {"labels": chosen}
    if task == "qa":
        start = torch.randint(1, l // 2, (b,), device=ids.device, generator=generator)
        return {"start_positions": start, "end_positions": start + 3}
    return {"labels": torch.randint(0, 2, (b,), device=ids.device, generator=generator)}


def build(competitor, task, cfg):
    """The competitor's model for ``task`` on meta, fp16 weights (DeepSpeed's fp16), training mode."""
    with torch.device("meta"):
        model = new_model(competitor, task, cfg)
    return model.half().train()


def count_step(competitor, task, cfg, batch, seq_len):
    """OpCounter records of one training step of ``competitor`` and its parameter count."""
    model = build(competitor, task, cfg)
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    mask = torch.ones_like(ids)
    kwargs = dict(input_ids=ids, attention_mask=mask, **task_targets(task, ids))
    if not competitor.startswith("hf"):
        kwargs["validate"] = False  # the trainer's setting: its loader checks every batch on the host
    counter = OpCounter(seq_len=seq_len, nonzero_rows=round(MASK_PROB * batch * seq_len))
    with CudaChoices(), counter:
        loss = model(**kwargs).loss
        counter.phase = "backward"
        loss.backward()
    n_params = sum(p.numel() for p in model.parameters())
    counter.phase = "optimizer"
    for k in optimizer_costs(n_params):
        counter.add(k.name, k.kind, k.flops, k.read, k.written)
    return counter, n_params


def compiled_estimate(records):
    """fastroberta under ``compile_model``, estimated from its eager records: Inductor fuses every chain of
    pointwise ops and reductions between two extern kernels (GEMMs, custom ops) into one kernel, so the
    estimate keeps the GEMMs, the custom ops and the optimizer as they are and counts each maximal run of
    consecutive elementwise/copies records as one kernel that reads the run's first input and writes its
    last output: at best, what Inductor's fusion saves (a lower bound, like the roofline)."""
    out, run = [], []

    def flush():
        if not run:
            return
        first, last = run[0], run[-1]
        read = max(r.read for r in run) if len(run) > 1 else first.read
        out.append(Record("inductor_fused(" + "+".join(r.op for r in run)[:60] + ")", "elementwise",
                          first.phase, 0.0, read, last.written))
        run.clear()
    for r in records:
        if r.kind in ("elementwise", "copies") and r.phase != "optimizer" and not r.op.startswith("fastroberta."):
            if run and run[-1].phase != r.phase:
                flush()
            run.append(r)
        else:
            flush()
            out.append(r)
    flush()
    return out


def run_case(name, case, competitors, gpus):
    cfg = _configs(case["model"])
    tokens = case["batch"] * case["seq_len"]
    result = dict(case=name, **case, tokens=tokens, competitors={})
    eager_records = None
    for comp in competitors:
        if comp == "fastroberta-compile":
            if eager_records is None:
                eager_records = count_step("fastroberta", case["task"], cfg, case["batch"], case["seq_len"])[0].records
            records, host_reads = compiled_estimate(eager_records), None
        else:
            counter, _ = count_step(comp, case["task"], cfg, case["batch"], case["seq_len"])
            records, host_reads = counter.records, counter.host_reads
            if comp == "fastroberta":
                eager_records = records
        result["competitors"][comp] = dict(
            host_reads=host_reads,
            gpus={g: summarize(records, g, tokens) for g in gpus},
            top_ops=top_ops(records, gpus[0]))
    return result


def top_ops(records, gpu, n=12):
    """The ``n`` costliest ops on ``gpu`` (records of one op name summed), for the report."""
    agg = collections.defaultdict(lambda: [0.0, 0, 0.0, ""])
    for r in records:
        a = agg[(r.op, r.kind)]
        a[0] += 1e3 * roofline_s(r, gpu)
        a[1] += 1
        a[2] += (r.read + r.written) / 1e9
    rows = sorted(agg.items(), key=lambda kv: -kv[1][0])[:n]
    return [dict(op=op, kind=kind, ms=v[0], launches=v[1], gbytes=v[2]) for (op, kind), v in rows]


ASSUMPTIONS = """\
- **A model, not a measurement.** Each op's time is its roofline: max(tensor-core FLOPs / dense fp16 peak,
  bytes / HBM bandwidth), a lower bound per kernel (no efficiency factor: real GEMMs reach ~60-75% of peak,
  attention kernels less, small kernels are launch-bound). The step's time is the sum over kernels. Peaks:
  `fastroberta.training.metrics.GPU_PEAK_TFLOPS` (H100 SXM / H200: 989 TFLOP/s dense fp16), bandwidth:
  `metrics.GPU_HBM_TBPS` (H100 SXM 3.35 TB/s, H200 4.8 TB/s).
- Counted on meta tensors by a TorchDispatchMode (`benchmarks/bench_model.py`): every aten op and every
  fastroberta custom op (its cost function next to its kernel: `_library.COSTS`). Bytes: each tensor argument read
  once and each output written once (gathers read only the rows they gather); views and allocations are free;
  one launch per op (a few aten ops launch more). FLOPs: matmuls only (the vector work beside them is not
  counted; attention's dropout RNG is real work the roofline misses). The host floor is launches x 5 µs (eager
  PyTorch's Python, dispatcher and launch time per op, roughly): where it nears the step's modelled time the
  step is host-bound and a CUDA graph of the whole step (fixed shapes: fine-tuning) would pay.
- CUDA's choices on meta: dropout is `native_dropout` (one kernel), SDPA is the flash kernel (no mask) or the
  efficient one (mask); with every token real (no padding, the pretraining packer's batches) transformers drops
  the mask. Pointwise ops on [.., L, L] score tensors count as attention; `bmm` is attention's.
- The weights are fp16 (DeepSpeed fp16); the optimizer step is modelled, the same for every competitor: fp16 grads
  copied to the fp32 partition, a norm/overflow read, one fused AdamW pass over fp32 master/m/v, fp16 weights
  written back (44 bytes per parameter).
- MLM: fastroberta's head runs on the labelled rows only, 15% of tokens; transformers' on every token.
  `fastroberta-compile` is an estimate from the eager records: each run of elementwise/copies ops between two
  extern kernels (GEMMs, custom ops) counted as one kernel reading the run's largest input and writing its last
  output (what Inductor's fusion could save at best). Inductor's own graph is not counted: lowering for CUDA
  needs a CUDA build of torch and a device (the machine that regenerates this file has neither); `--measure` on
  a GPU runs the compiled model for real.
- fastroberta's FFN GEMMs are its own Triton kernels (`kernels/linear_gelu.py`: GELU in the forward GEMM's
  epilogue, GELU' and the bias gradient in the second linear's dgrad epilogue), modelled at the same roofline as
  cuBLAS's GEMMs; the extra tensor each reads or writes (pre-activation) counts in its bytes, in the GEMM class.
  Their speed on a GPU is unmeasured (no GPU was lent): a Triton GEMM may fall short of cuBLAS's efficiency.
"""


def render_md(results, gpus):
    lines = ["# One training step, modelled (roofline) per op class", "",
             "Regenerate: `python -m benchmarks model --baseline "
             "benchmarks/results/model/step_model-baseline-a84f558.json --baseline-label "
             "'a84f558 (the start of issue 26)'` (no GPU needed; meta tensors; about a minute on 2 cores).", "", "## Assumptions", "",
             ASSUMPTIONS]
    for res in results:
        lines += [f"## {res['case']}: {res['model']}, seq {res['seq_len']}, batch {res['batch']}, fp16 "
                  f"({res['task']})", ""]
        for gpu in gpus:
            lines += [f"### {gpu}: modelled ms per class", "",
                      "| competitor | " + " | ".join(CLASSES) + " | step ms | vs hf-eager | vs hf-sdpa | launches "
                      f"| host floor ms ({HOST_US_PER_LAUNCH:.0f} µs/launch) | elementwise+copies B/token |",
                      "|---" * (len(CLASSES) + 7) + "|"]
            base = res["competitors"]
            for comp, r in base.items():
                s = r["gpus"][gpu]
                ratio = (lambda k: f"{s['total_ms'] / base[k]['gpus'][gpu]['total_ms']:.2f}x" if k in base else "-")
                lines.append(f"| {comp} | " + " | ".join(
                    f"{s['classes'][c]['ms']:.2f} ({100 * s['classes'][c]['share']:.0f}%)" for c in CLASSES)
                    + f" | **{s['total_ms']:.2f}** | {ratio('hf-eager')} | {ratio('hf-sdpa')} | {s['launches']} "
                    f"| {s['host_floor_ms']:.2f} | {s['elementwise_copies_bytes_per_token']:.0f} |")
            lines.append("")
        for comp in ("fastroberta", "hf-eager"):
            if comp not in res["competitors"]:
                continue
            lines += [f"Costliest ops, {comp}, {gpus[0]}:", "", "| op | class | ms | launches | GB |",
                      "|---|---|---|---|---|"]
            for t in res["competitors"][comp]["top_ops"]:
                lines.append(f"| {t['op']} | {t['kind']} | {t['ms']:.3f} | {t['launches']} | {t['gbytes']:.2f} |")
            lines.append("")
    return "\n".join(lines)


# --measure: the same step on CUDA under torch.profiler, measured ms per class.
KERNEL_CLASSES = [
    ("attention", r"attn|flash|fmha|softmax|_bwd_preprocess|_bwd_dkdv|_bwd_dq"),
    ("loss", r"_lse_forward|_logits_grad|nll_loss|log_softmax|cross_entropy"),
    ("norm", r"layer_norm|layernorm"),
    ("GEMM", r"gemm|cutlass|xmma|sm90_|sm80_|cublas|matmul|splitK"),
    ("optimizer", r"adam|multi_tensor|l2norm"),
    ("embedding", r"embedding|indexSelectLargeIndex|krn_partial|compute_grad_weight|sum_and_scatter"),
    ("copies", r"copy|cat_|transpose|CatArray|index_copy|Memcpy"),
]


def classify_kernel(name):
    """The class of a CUDA kernel by its (mangled or demangled) name; anything else is elementwise."""
    for cls, pattern in KERNEL_CLASSES:
        if re.search(pattern, name, re.IGNORECASE):
            return cls
    return "elementwise"


def group_measured(events):
    """``events``: (kernel name, duration in microseconds) pairs from the profiler -> ms and launches per class."""
    out = {c: dict(ms=0.0, launches=0) for c in CLASSES}
    for name, us in events:
        c = out[classify_kernel(name)]
        c["ms"] += us / 1e3
        c["launches"] += 1
    return out


def measure(case, competitor, steps=3):
    """Measured ms per class of one step of ``competitor`` on CUDA (the mean of ``steps`` profiled steps)."""
    from torch.profiler import ProfilerActivity, profile
    from fastroberta.config import RobertaConfig
    cfg = RobertaConfig.preset(case["model"])
    model = new_model("fastroberta" if competitor == "fastroberta-compile" else competitor, case["task"], cfg)
    if competitor == "fastroberta-compile":
        from fastroberta.compile import compile_model
        model = compile_model(model)
    model = model.cuda().half().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    b, l = case["batch"], case["seq_len"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(5, cfg.vocab_size, (b, l), device="cuda", generator=gen)
    mask = torch.ones_like(ids)
    kwargs = dict(input_ids=ids, attention_mask=mask, **task_targets(case["task"], ids, gen))
    if not competitor.startswith("hf"):
        kwargs["validate"] = False

    def step():
        model(**kwargs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [(e.name, e.device_time) for e in prof.events() if e.device_type.name == "CUDA"]
    grouped = group_measured(events)
    for c in grouped.values():
        c["ms"] /= steps
        c["launches"] //= steps
    return grouped


def add_arguments(p):
    p.add_argument("--cases", help=f"comma list of {','.join(CASES)} (default: all); 'tiny' for a smoke run")
    p.add_argument("--competitors", help=f"comma list of {','.join(COMPETITORS)} (default: all)")
    p.add_argument("--gpus", help=f"comma list of {','.join(GPUS)} (default: both)")
    p.add_argument("--out", help=f"directory for step_model.{{json,md}} (default {RESULTS_DIR})")
    p.add_argument("--baseline", help="an earlier step_model.json: adds a before/after table of fastroberta's "
                   "modelled step and elementwise bytes (--baseline-label names it, e.g. its commit)")
    p.add_argument("--baseline-label", default="baseline", help="what the baseline is (e.g. a commit hash)")
    p.add_argument("--measure", action="store_true", help="CUDA: also run the step under torch.profiler and "
                   "put measured ms per class next to the modelled ones")


def main_from_args(args):
    split = (lambda v: [s.strip() for s in v.split(",") if s.strip()] if v else None)
    names = split(args.cases) or list(CASES)
    cases = dict(CASES, tiny=dict(task="mlm", model="tiny", seq_len=64, batch=2))
    unknown = [n for n in names if n not in cases]
    competitors = split(args.competitors) or list(COMPETITORS)
    gpus = split(args.gpus) or list(GPUS)
    bad = [c for c in competitors if c not in COMPETITORS] + [g for g in gpus if g not in GPUS]
    if unknown or bad:
        print(f"model: unknown case/competitor/gpu {unknown + bad}; cases {sorted(cases)}, competitors "
              f"{list(COMPETITORS)}, gpus {list(GPUS)}", file=sys.stderr)
        return False
    if args.measure and not torch.cuda.is_available():
        print("model: --measure needs a CUDA device", file=sys.stderr)
        return False
    results = []
    for name in names:
        res = run_case(name, cases[name], competitors, gpus)
        if args.measure:
            for comp in competitors:
                try:
                    classes = measure(cases[name], comp)
                except Exception as e:  # one competitor's failure (memory, compile) must not lose the others
                    print(f"[{name}] {comp}: measuring failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    continue
                finally:
                    torch.cuda.empty_cache()
                res["competitors"][comp]["measured"] = dict(device=torch.cuda.get_device_name(), classes=classes)
        results.append(res)
        for comp, r in res["competitors"].items():
            s = r["gpus"][gpus[0]]
            print(f"[{name}] {comp:20s} {gpus[0]} modelled {s['total_ms']:8.2f} ms, {s['launches']} launches, "
                  f"elementwise+copies {s['elementwise_copies_bytes_per_token']:.0f} B/token")
    out_dir = args.out or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "step_model.json"), "w") as f:
        json.dump(dict(assumptions=ASSUMPTIONS, gpus=gpus, results=results), f, indent=1)
    md = render_md(results, gpus)
    if args.baseline:
        with open(args.baseline) as f:
            md += "\n" + render_before_after(json.load(f), results, gpus[0], args.baseline_label)
    if args.measure:
        md += "\n" + render_measured(results, gpus[0])
    with open(os.path.join(out_dir, "step_model.md"), "w") as f:
        f.write(md + "\n")
    print(f"written to {out_dir}/step_model.{{json,md}}")
    return True


def render_before_after(baseline, results, gpu, label):
    """fastroberta's modelled step and elementwise+copies bytes per token, ``baseline`` (an earlier run) vs now."""
    before = {r["case"]: r["competitors"].get("fastroberta") for r in baseline["results"]}
    lines = [f"## Before/after: fastroberta against {label} ({gpu}, modelled)", "",
             "| case | step ms before | after | elementwise+copies B/token before | after | ratio | launches before "
             "| after |", "|---|---|---|---|---|---|---|---|"]
    for res in results:
        old, new = before.get(res["case"]), res["competitors"].get("fastroberta")
        if not old or not new:
            continue
        o, n = old["gpus"][gpu], new["gpus"][gpu]
        ob, nb = o["elementwise_copies_bytes_per_token"], n["elementwise_copies_bytes_per_token"]
        lines.append(f"| {res['case']} | {o['total_ms']:.2f} | {n['total_ms']:.2f} | {ob:.0f} | {nb:.0f} | "
                     f"{nb / ob:.2f}x | {o['launches']} | {n['launches']} |")
    return "\n".join(lines) + "\n"


def render_measured(results, gpu):
    lines = ["## Measured (torch.profiler, CUDA) next to modelled", "",
             "Measured: the mean of 3 profiled steps after 3 warm-up steps, kernels grouped by name "
             "(`classify_kernel`); the optimizer there is torch's AdamW(fused=True) on the fp16 weights, not "
             "DeepSpeed's fp32-master step the model counts.", ""]
    for res in results:
        lines += [f"### {res['case']}", "", "| competitor | class | modelled ms | measured ms | measured launches |",
                  "|---|---|---|---|---|"]
        for comp, r in res["competitors"].items():
            meas = r.get("measured")
            if not meas:
                continue
            for c in CLASSES:
                lines.append(f"| {comp} | {c} | {r['gpus'][gpu]['classes'][c]['ms']:.2f} | "
                             f"{meas['classes'][c]['ms']:.2f} | {meas['classes'][c]['launches']} |")
        lines.append("")
    return "\n".join(lines)
