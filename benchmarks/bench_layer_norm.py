"""LayerNorm(dropout(x) + residual): fastroberta's fused kernel against eager PyTorch, torch.compile and apex.

Shapes: [16384, 768] and [16384, 1024] (32 x 512 tokens of base / large), fp16 and bf16, dropout 0.1 as in
RoBERTa's post-LN sites (full profile also 0.0). Competitors:
    fastroberta    fastroberta.kernels.layer_norm(x, w, b, residual=r, dropout_p=p)
    eager          F.dropout(x) + r, then F.layer_norm: three kernels, a stored dropout mask, a stored sum
    torch.compile  the eager function through Inductor
    apex           F.dropout(x) + r, then apex.normalization.FusedLayerNorm (when the real apex is installed)

GB/s counts the least traffic the op needs, the same for every competitor: forward reads x and the residual and
writes y (3 N·E elements); backward reads dy and one saved activation and writes dx and d(residual)
(4 N·E); weight/bias traffic is negligible but counted. Compare it with the measured copy bandwidth
(``environment.copy_bandwidth_gbps``, also counting read + write): the target is >= 70% of it.
"""
import sys

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.harness import Case, Competitor, Runner
from benchmarks.pytest_support import make_kernel_test
from fastroberta.kernels import layer_norm, reference

NAME = "layer_norm"
TITLE = "Fused dropout + residual-add + LayerNorm"
METRIC = "GB/s"
MODES = ("fwd", "bwd", "fwd+bwd")
BASELINE = "eager"
EPS = 1e-5


def cases(profile):
    if profile == "smoke":
        specs = [(8, 100, "fp16", 0.1)]
    elif profile == "check":
        specs = [(16384, 768, "fp16", 0.1), (16384, 768, "bf16", 0.1), (16384, 1024, "fp16", 0.1)]
    else:
        specs = [(16384, e, dt, p) for e in (768, 1024) for dt in ("fp16", "bf16") for p in (0.1, 0.0)]
    # Inductor compiles each shape and dtype afresh (tens of seconds): the GPU check compiles the first case only.
    return [Case.make(f"{rows}x{hidden}-{dt}-p{p}", rows=rows, hidden=hidden, dtype=dt, dropout_p=p,
                      residual=True, compile=profile != "check" or i == 0)
            for i, (rows, hidden, dt, p) in enumerate(specs)]


def make_inputs(case, device):
    p = case.p
    g = torch.Generator(device="cpu").manual_seed(0)
    n, e, dt = p["rows"], p["hidden"], case.dtype

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dt)

    return {
        "x": rand(n, e), "residual": rand(n, e), "weight": rand(e, scale=0.1, shift=1.0),
        "bias": rand(e, scale=0.1), "dout": rand(n, e),
    }


def work(case, inputs, mode):
    """Bytes moved (see the module docstring)."""
    p = case.p
    size = torch.tensor([], dtype=case.dtype).element_size()
    act = p["rows"] * p["hidden"] * size
    par = p["hidden"] * size
    fwd = (3 if p["residual"] else 2) * act + 2 * par
    bwd = (4 if p["residual"] else 3) * act + 4 * par
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _leaves(inputs):
    return [inputs[k].detach().clone().requires_grad_(True) for k in ("x", "residual", "weight", "bias")]


def _ref(p):
    return lambda x, r, w, b: reference.layer_norm(x, w, b, EPS, residual=r, dropout_p=0.0)


def _runner(case, inputs, fn):
    return Runner(fn=fn, leaves=_leaves(inputs), leaf_names=("x", "residual", "weight", "bias"),
                  ref_fn=_ref(case.p), dout=inputs["dout"])


def eager_fn(p):
    def fn(x, r, w, b):
        h = F.dropout(x, p, training=True) if p > 0 else x
        return F.layer_norm(h + r, (x.shape[-1],), w, b, EPS)
    return fn


def build_fastroberta(case, inputs):
    p = case.p["dropout_p"]
    return _runner(case, inputs, lambda x, r, w, b: layer_norm(x, w, b, EPS, residual=r, dropout_p=p))


def build_eager(case, inputs):
    return _runner(case, inputs, eager_fn(case.p["dropout_p"]))


def build_compile(case, inputs):
    return _runner(case, inputs, torch.compile(eager_fn(case.p["dropout_p"]), dynamic=False))


def build_apex(case, inputs):
    from apex.normalization import FusedLayerNorm

    p = case.p["dropout_p"]
    module = FusedLayerNorm(case.p["hidden"], eps=EPS).to(device=inputs["x"].device, dtype=case.dtype)

    def fn(x, r, w, b):
        h = F.dropout(x, p, training=True) if p > 0 else x
        return torch.func.functional_call(module, {"weight": w, "bias": b}, (h + r,))
    return _runner(case, inputs, fn)


def competitors(smoke=False):
    return [
        Competitor("fastroberta", build_fastroberta, ours=True),
        Competitor("eager", build_eager),
        Competitor("torch.compile", build_compile, status=lambda: harness.compile_status(smoke), checked=False,
                   applies=lambda case: case.p["compile"]),
        Competitor("apex", build_apex, status=lambda: harness.import_status("apex.normalization", "FusedLayerNorm")),
    ]


# `pytest benchmarks/ --benchmark-only` collects this (benchmarks/conftest.py collects bench_*.py).
test_layer_norm = make_kernel_test(sys.modules[__name__])
