"""``python -m benchmarks host``: the host (CPU) time each fastroberta op costs per call, with no kernel run.

A step whose kernels are short is host-bound: the GPU waits while Python and torch's dispatcher prepare the
next launch (the H200 run in ``benchmarks/results/nvidia-h200/NOTES.md`` measured every step that way). That
host time is CPU time, so it is measured here on CPU: the ops run on tiny CPU tensors under Triton's
interpreter with the interpreter's launch replaced by a no-op (``NoOpLaunches``), so what is timed is exactly
what the host does around a launch: argument checks, the ``torch.library`` custom-op dispatch and its autograd
node, allocations, the dropout seed draw, config choice, strides. Next to each op: the same computation in
eager PyTorch on the same tiny tensors (mostly dispatcher time: the floor a Python op pays), and the op
through its ``torch.library`` custom op (``_library.EAGER_DIRECT = False``, the path torch.compile traces)
against the direct autograd-Function path eager code takes. Then a whole tiny-model training step (forward +
backward) on the Triton path (no-op launches), the torch-kernel path and transformers eager, with the number
of ops it dispatches and kernels it launches.

What the no-op leaves out: Triton's own launcher (``JITFunction.run``: binding the arguments, the
specialization key, the compiled-kernel cache lookup, the C launch), which needs a GPU. It is not measured here.

Output: ``benchmarks/results/host/host_overhead.{json,md}`` (``--out`` elsewhere).
"""
import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported (see _checks)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "host")


class NoOpLaunches:
    """Replace the Triton interpreter's kernel run with a no-op that counts launches (outputs stay as
    allocated: their values are garbage, which timing does not read)."""

    def __init__(self):
        self.launches = 0

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction
        self._cls, self._run = InterpretedFunction, InterpretedFunction.run

        def run(fn, *args, grid, warmup, **kwargs):
            self.launches += 1
        InterpretedFunction.run = run
        return self

    def __exit__(self, *exc):
        self._cls.run = self._run


@contextlib.contextmanager
def eager_direct(on):
    from fastroberta.kernels import _library
    before = _library.EAGER_DIRECT
    _library.EAGER_DIRECT = on
    try:
        yield
    finally:
        _library.EAGER_DIRECT = before


def time_us(fn, min_time=0.2, batch_time=2e-3):
    """Microseconds of this thread's CPU time per call of ``fn()``: the least over short batches of calls
    filling ``min_time`` seconds in all, after a warm-up. CPU time, not wall time, and the least batch: other
    processes on a shared machine then add little (they can only add time)."""
    for _ in range(3):
        fn()
    n, start = 0, time.thread_time()
    while time.thread_time() - start < batch_time or n < 2:
        fn()
        n += 1
    best, spent = float("inf"), 0.0
    gc.collect()
    gc.disable()
    try:
        while spent < min_time:
            start = time.thread_time()
            for _ in range(n):
                fn()
            took = time.thread_time() - start
            best, spent = min(best, took / n), spent + took
    finally:
        gc.enable()
    return best * 1e6


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_(True)


def _fwd_bwd(forward, grad_of=None):
    """(forward only, forward + backward) callables; backward sums the first output."""
    def fwd():
        return forward()

    def fwd_bwd():
        out = forward()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out) if grad_of is None else grad_of)
    return fwd, fwd_bwd


def op_cases():
    """(name, fastroberta forward callable, eager PyTorch forward callable) on tiny CPU tensors, training
    settings (dropout on, inputs requiring grad)."""
    from fastroberta import fused_linear
    from fastroberta.kernels import attention_packed, layer_norm, mlm_cross_entropy, reference
    from fastroberta.kernels.linear_gelu import dgrad_gelu_bias_grad, linear_gelu

    x, r, w, b = _leaf(4, 32), _leaf(4, 32), _leaf(32), _leaf(32)
    qkv = _leaf(2, 16, 3, 2, 16)
    h, emb, vbias = _leaf(8, 32), _leaf(64, 32), _leaf(64)
    labels = torch.randint(0, 64, (8,))
    w1, b1, w2, b2 = _leaf(64, 32), _leaf(64), _leaf(32, 64), _leaf(32)

    def sdpa():
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)

    return [
        ("layer_norm (residual, dropout 0.1) [4, 32]",
         lambda: layer_norm(x, w, b, residual=r, dropout_p=0.1),
         lambda: F.layer_norm(F.dropout(x, 0.1) + r, (32,), w, b)),
        ("layer_norm (no residual, no dropout) [4, 32]",
         lambda: layer_norm(x, w, b),
         lambda: F.layer_norm(x, (32,), w, b)),
        ("attention_packed (dropout 0.1) [2, 16, 3, 2, 16]",
         lambda: attention_packed(qkv, None, dropout_p=0.1), sdpa),
        ("mlm_cross_entropy (labelled rows) [8, 32] x V 64",
         lambda: mlm_cross_entropy(h, emb, vbias, labels, validate=False, labelled_rows_only=True),
         lambda: F.cross_entropy(F.linear(h, emb, vbias), labels)),
        ("feed_forward_and_input (linear_gelu + dgrad_gelu_bias_grad) [4, 32] -> 64",
         lambda: fused_linear.feed_forward_and_input(x, w1, b1, w2, b2, linear_gelu, dgrad_gelu_bias_grad),
         lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)),
        ("feed_forward_and_input, torch ops [4, 32] -> 64",
         lambda: fused_linear.feed_forward_and_input(x, w1, b1, w2, b2, reference.linear_gelu,
                                                     reference.dgrad_gelu_bias_grad),
         lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)),
        ("linear_and_input [4, 32] -> 64",
         lambda: fused_linear.linear_and_input(x, w1, b1),
         lambda: F.linear(x, w1, b1)),
    ]


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def single_calls():
    """Calls timed alone (no autograd): the pieces the ops are made of."""
    import importlib

    from fastroberta.kernels import _checks
    ln = importlib.import_module("fastroberta.kernels.layer_norm")
    from fastroberta.kernels.linear_gelu import dgrad_gelu_bias_grad, linear_gelu

    x, w, b = torch.randn(4, 32), torch.randn(32), torch.randn(32)
    w1, b1, w2, pre, dout = torch.randn(64, 32), torch.randn(64), torch.randn(32, 64), torch.randn(4, 64), \
        torch.randn(4, 32)
    return [
        ("new_dropout_seed (torch.randint, 1 element)", lambda: _checks.new_dropout_seed(x.device)),
        ("layer_norm input checks (_check_inputs)", lambda: ln._check_inputs(x, w, b, 1e-5, x, 0.1)),
        ("layer_norm launch function (_layer_norm_forward)",
         lambda: ln._layer_norm_forward(x, w, b, x, None, 1e-5, 0.0, None)),
        ("layer_norm custom op, no grad (torch.ops.fastroberta.layer_norm)",
         lambda: torch.ops.fastroberta.layer_norm(x, w, b, x, None, 1e-5, 0.0, None)),
        ("layer_norm(x, w, b) under torch.no_grad() (eval)", _no_grad(lambda: ln.layer_norm(x, w, b))),
        ("linear_gelu, no grad", lambda: linear_gelu(x, w1, b1)),
        ("dgrad_gelu_bias_grad, no grad", lambda: dgrad_gelu_bias_grad(dout, w2, pre)),
        ("eager floor: F.layer_norm [4, 32], no grad", lambda: F.layer_norm(x, (32,), w, b)),
        ("eager floor: torch.add [4, 32]", lambda: torch.add(x, x)),
    ]


class OpCount(TorchDispatchMode):
    """Ops dispatched meanwhile: aten ops, and fastroberta custom ops (whose insides it does not see)."""

    def __init__(self):
        super().__init__()
        self.aten = self.fastroberta = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastroberta":
            self.fastroberta += 1
        else:
            self.aten += 1
        return func(*args, **(kwargs or {}))


def step_cases():
    """(name, step callable) for one tiny MLM training step (forward + backward), dropout on."""
    import transformers

    from fastroberta.config import RobertaConfig
    from fastroberta.model import RobertaForMaskedLM

    cfg = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=40)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 120, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.long)
    labels = torch.where(torch.rand(2, 16, generator=g) < 0.3, ids, torch.full_like(ids, -100))
    labels[0, 3] = ids[0, 3]
    torch.manual_seed(0)
    models = {kernels: RobertaForMaskedLM(RobertaConfig(**cfg), kernels=kernels).train()
              for kernels in ("triton", "torch")}
    hf_cfg = transformers.RobertaConfig(**cfg, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1)
    hf = transformers.RobertaForMaskedLM._from_config(hf_cfg, attn_implementation="eager").train()

    def ours(model):
        def step():
            model(input_ids=ids, attention_mask=mask, labels=labels, validate=False).loss.backward()
        return step

    def hf_step():
        hf(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    return [("fastroberta, Triton path (no-op launches)", ours(models["triton"])),
            ("fastroberta, torch kernels", ours(models["torch"])),
            ("transformers RobertaForMaskedLM, eager attention", hf_step)], cfg


def machine():
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import triton
    return dict(cpu=name, logical_cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                python=platform.python_version(), torch=torch.__version__, triton=triton.__version__)


def run(min_time=0.2):
    from fastroberta.kernels._checks import interpreter_active
    if not interpreter_active():
        raise SystemExit("benchmarks host: needs TRITON_INTERPRET=1 set before fastroberta.kernels is imported "
                         "(it times the ops on CPU tensors); run it as `python -m benchmarks host` in a fresh "
                         "process")
    result = dict(machine=machine(), ops=[], calls=[], steps=[])
    with NoOpLaunches() as launches:
        for name, ours, eager in op_cases():
            row = dict(op=name)
            for label, forward in (("eager", eager), ("direct", ours), ("custom_op", ours)):
                fwd, fwd_bwd = _fwd_bwd(forward)
                with eager_direct(label != "custom_op"):
                    row[f"{label}_fwd_us"] = time_us(fwd, min_time)
                    row[f"{label}_fwd_bwd_us"] = time_us(fwd_bwd, min_time)
            print(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k != "op"), flush=True)
            result["ops"].append(row)
        for name, fn in single_calls():
            row = dict(call=name, direct_us=None, custom_op_us=None)
            for label in ("direct", "custom_op"):
                with eager_direct(label == "direct"):
                    row[f"{label}_us"] = time_us(fn, min_time)
            print(f"{name}: {row['direct_us']:.1f} / {row['custom_op_us']:.1f} µs", flush=True)
            result["calls"].append(row)
        steps, cfg = step_cases()
        result["step_config"] = dict(cfg, batch=2, seq_len=16)
        for name, step in steps:
            row = dict(step=name)
            for label in ("direct", "custom_op"):
                with eager_direct(label == "direct"):
                    row[f"{label}_ms"] = time_us(step, min_time * 5) / 1e3
            counter = OpCount()
            before = launches.launches
            with eager_direct(False), counter:  # a dispatch mode sees the custom ops as one op each
                step()
            row.update(aten_ops=counter.aten, fastroberta_ops=counter.fastroberta,
                       triton_launches=launches.launches - before)
            print(f"{name}: {row}", flush=True)
            result["steps"].append(row)
    return result


def markdown(result):
    m = result["machine"]
    lines = [
        "# Host time per op call (CPU, no kernel run)", "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch threads {m['torch_threads']}; Python "
        f"{m['python']}, torch {m['torch']}, Triton {m['triton']}. Regenerate: `python -m benchmarks host`.", "",
        "Assumptions:",
        "- This is **CPU host time on this machine**, not GPU speed: the time Python and torch's dispatcher spend "
        "per call before and after the kernel launch. A GPU host's CPU differs (the H200 host's per-op times "
        "scale by its single-thread speed), so read the ratios, not the absolute µs.",
        "- The ops run on tiny CPU tensors under Triton's interpreter with its kernel run replaced by a no-op "
        "(`bench_host.NoOpLaunches`). What that leaves out: Triton's own launcher on a GPU (`JITFunction.run`: "
        "argument binding, specialization key, compiled-kernel cache lookup, the C launch), not measured here; "
        "it is paid once per Triton launch (column 'launches').",
        "- *eager*: the same computation in eager PyTorch on the same tensors (F.layer_norm, SDPA, "
        "F.cross_entropy, F.linear + F.gelu): the floor a Python-level op pays, plus the small real CPU work.",
        "- *custom op*: fastroberta's op through its `torch.library` custom op (what torch.compile traces; "
        "`_library.EAGER_DIRECT = False`). *direct*: the same launch code reached through a plain "
        "`torch.autograd.Function`, the path eager code takes since this report.",
        "- Times: this thread's CPU time (`time.thread_time`), the least per call over ~2 ms batches of calls "
        "(a shared machine only adds time). fwd+bwd includes the backward of the summed first output (so one "
        "`ones_like` and autograd engine time).", "",
        "## Per op (µs per call)", "",
        "| op | eager fwd | direct fwd | custom op fwd | eager fwd+bwd | direct fwd+bwd | custom op fwd+bwd |",
        "|---|---|---|---|---|---|---|"]
    for r in result["ops"]:
        lines.append(f"| {r['op']} | {r['eager_fwd_us']:.1f} | {r['direct_fwd_us']:.1f} | "
                     f"{r['custom_op_fwd_us']:.1f} | {r['eager_fwd_bwd_us']:.1f} | {r['direct_fwd_bwd_us']:.1f} | "
                     f"{r['custom_op_fwd_bwd_us']:.1f} |")
    lines += ["", "## Pieces (µs per call, no autograd)", "", "| call | direct | custom op |", "|---|---|---|"]
    for r in result["calls"]:
        lines.append(f"| {r['call']} | {r['direct_us']:.1f} | {r['custom_op_us']:.1f} |")
    s = result["step_config"]
    lines += ["", f"## One tiny MLM training step, forward + backward (ms per step)", "",
              f"Model: {s['num_hidden_layers']} layers, hidden {s['hidden_size']}, {s['num_attention_heads']} "
              f"heads, FFN {s['intermediate_size']}, vocab {s['vocab_size']}; batch {s['batch']} x seq "
              f"{s['seq_len']}, dropout on. Counts: aten ops dispatched outside the fastroberta ops, fastroberta "
              "custom-op calls, and Triton launches (each also pays Triton's launcher on a GPU).", "",
              "| step | direct ms | custom op ms | aten ops | fastroberta ops | Triton launches |",
              "|---|---|---|---|---|---|"]
    for r in result["steps"]:
        lines.append(f"| {r['step']} | {r['direct_ms']:.2f} | {r['custom_op_ms']:.2f} | {r['aten_ops']} | "
                     f"{r['fastroberta_ops']} | {r['triton_launches']} |")
    return "\n".join(lines) + "\n"


def add_arguments(p):
    p.add_argument("--out", default=RESULTS_DIR, help="output folder (default benchmarks/results/host)")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of calls timed per figure")


def main_from_args(args):
    torch.set_num_threads(1)
    result = run(args.min_time)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "host_overhead.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "host_overhead.md"), "w") as f:
        f.write(markdown(result))
    print(f"written to {args.out}/host_overhead.{{json,md}}")
    return True


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sys.exit(0 if main_from_args(parser.parse_args()) else 1)
