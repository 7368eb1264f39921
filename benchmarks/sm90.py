"""Compiling fastroberta's Triton kernels for an H100 (sm_90) ahead of time, on a machine without a GPU.

Used by ``tests/test_gpu_compile.py`` (does every launch compile, and fit an SM's shared memory?) and by
``benchmarks/bench_static.py`` (registers, spills and SASS instruction counts of every kernel's main loop).

Triton's interpreter, which runs the CPU suite, never lowers a kernel. This module lowers each kernel through
Triton's real pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin, with the ptxas that Triton bundles) for
GPUTarget("cuda", 90, 32). Under ``TRITON_INTERPRET=1`` ``@triton.jit`` builds interpreter objects that
``triton.compile`` cannot take, and the kernel modules choose interpreter-only block sizes at import, so the
compiling happens in worker subprocesses (``python -m benchmarks.sm90 CLAIM_DIR MODE``) with
TRITON_INTERPRET=0, where the modules import as on a GPU machine. Each launch's arguments are built the way
its launch site builds them (same tensor layouts and dtypes, RoBERTa's strides; tensors are allocated, never
touched) and bound by Triton's own argument binder, so the signature, the constexprs and the 16-byte
divisibility specialization are those of a real launch.

A case is (group, dtype, label, kernel, args, kwargs). The modes choose which cases are compiled:
- ``test``: what tests/test_gpu_compile.py compiles by default (its docstring lists it);
- ``full``: every autotune candidate at every flag combination (FASTROBERTA_GPU_COMPILE_FULL=1);
- ``static``: the GPU default config of every launch the training and eval paths make, fp16 and bf16, head
  dims 64 and 128, each attention layout (no mask, key mask, right-padded, varlen) with and without dropout,
  LayerNorm, cross-entropy and the FFN's GEMMs with GELU epilogues;
  the cubin is disassembled and its loops analysed (``benchmarks/sass.py``).
"""
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
H100_SHARED_BYTES = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin of an H100 (and H200): 227 KiB
SM90 = ("cuda", 90, 32)
DTYPES = ("fp16", "bf16", "fp32")
KERNELS = {  # group name: (module, kernel)
    "layer_norm_fwd": ("layer_norm", "_layer_norm_fwd_kernel"),
    "layer_norm_bwd": ("layer_norm", "_layer_norm_bwd_kernel"),
    "layer_norm_partials_sum": ("layer_norm", "_partials_sum_kernel"),
    "attn_fwd": ("attention", "_attn_fwd"),
    "attn_bwd_preprocess": ("attention", "_bwd_preprocess"),
    "attn_bwd_dkdv": ("attention", "_attn_bwd_dkdv"),
    "attn_bwd_dq": ("attention", "_attn_bwd_dq"),
    "ce_lse_forward": ("cross_entropy", "_lse_forward_kernel"),
    "ce_logits_grad": ("cross_entropy", "_logits_grad_kernel"),
    "gelu_bwd_bias_grad": ("gelu", "_gelu_backward_bias_grad_kernel"),
    "linear_gelu_fwd": ("linear_gelu", "_linear_gelu_fwd_tuned"),
    "dgrad_gelu_bias_grad": ("linear_gelu", "_dgrad_gelu_tuned"),
}
MODES = ("test", "full", "static")
# Attention layouts: how the launch site passes the batch's padding.
LAYOUTS = ("nomask", "mask", "right_padded", "varlen")


def _kernel_modules():
    # The package re-exports functions under the module names, so import the modules themselves.
    return {name: importlib.import_module(f"fastroberta.kernels.{name}")
            for name in ("layer_norm", "attention", "cross_entropy", "gelu", "linear_gelu")}


def _torch_dtype(name):
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


# ---------------------------------------------------------------------------------------------------------
# Launch arguments, built as the launch sites build them
# ---------------------------------------------------------------------------------------------------------
def layer_norm_launches(ln, dtype_name, n, has_residual, has_dropout, affine=(True, True), param_dtype=None,
                        input_bias=False):
    """(group, label, kernel, args, kwargs) of the forward and backward launch, as ``_layer_norm_forward`` and
    ``_layer_norm_backward`` pass them: [rows, n] activations, parameters in x's dtype unless ``param_dtype``;
    ``input_bias``: the preceding linear's bias (in the parameters' dtype) added by the kernel, as the encoder
    layers' two LayerNorms run."""
    import torch
    dtype = _torch_dtype(dtype_name)
    param_dtype = param_dtype or dtype
    rows = 16384  # 32 x 512 tokens
    programs = 4 * 132  # four per SM of an H100 SXM, as _backward_programs picks
    block, num_warps = ln._launch_config(n)
    x = torch.empty(rows, n, dtype=dtype)
    r = torch.empty(rows, n, dtype=dtype) if has_residual else None
    w = torch.empty(n, dtype=param_dtype) if affine[0] else None
    b = torch.empty(n, dtype=param_dtype) if affine[1] else None
    ib = torch.empty(n, dtype=param_dtype) if input_bias else None
    stats = torch.empty(rows, dtype=torch.float32)
    p = 0.1 if has_dropout else 0.0
    scale = 1.0 / (1.0 - p)
    seed = torch.zeros(1, dtype=torch.int64) if has_dropout else None  # the kernels read it from memory
    label = f"N={n} residual={int(has_residual)} dropout={int(has_dropout)}"
    if affine != (True, True):
        label += f" weight={int(affine[0])} bias={int(affine[1])}"
    if input_bias:
        label += " input_bias=1"
    if param_dtype != dtype:
        label += " fp32 params"
    flags = dict(HAS_RESIDUAL=has_residual, HAS_DROPOUT=has_dropout, HAS_WEIGHT=affine[0],
                 HAS_BIAS=affine[1], HAS_INPUT_BIAS=input_bias, BLOCK=block, num_warps=num_warps)
    yield ("layer_norm_fwd", label, ln._layer_norm_fwd_kernel,
           (x, ib, r, w, b, torch.empty_like(x), stats, stats, n, n if has_residual else 0, n,
            n, 1e-5, p, scale, seed), flags)
    store_dr = has_residual and has_dropout
    k = affine[0] + affine[1] + input_bias
    partials = torch.empty(programs, k, n, dtype=torch.float32) if k else None
    yield ("layer_norm_bwd", label, ln._layer_norm_bwd_kernel,
           (x, ib, r, w, torch.empty_like(x), torch.empty_like(x), torch.empty_like(x) if store_dr else None,
            partials, stats, stats,
            n, n if has_residual else 0, n, n, n if store_dr else 0,
            rows, n, p, scale, seed, -(-rows // programs)),
           dict(flags, STORE_DRESIDUAL=store_dr))


def layer_norm_partials_launch(ln, dtype_name, n, affine=(True, True), input_bias=True):
    """(group, label, kernel, args, kwargs) of the launch that sums the backward's [programs, k, n] fp32 partials
    into gradients in the parameters' dtype (``dtype_name``), as ``_layer_norm_backward`` passes it."""
    import torch
    dtype = _torch_dtype(dtype_name)
    programs = 4 * 132
    has = (affine[0], affine[1], input_bias)
    partials = torch.empty(programs, sum(has), n, dtype=torch.float32)
    grads = [torch.empty(n, dtype=dtype) if on else None for on in has]
    label = f"N={n} weight={int(has[0])} bias={int(has[1])} input_bias={int(has[2])}"
    yield ("layer_norm_partials_sum", label, ln._partials_sum_kernel, (partials, *grads, programs, n),
           dict(HAS_WEIGHT=has[0], HAS_BIAS=has[1], HAS_INPUT_BIAS=has[2], BLOCK_P=ln.PARTIALS_BLOCK_P,
                BLOCK_N=ln.PARTIALS_BLOCK_N, num_warps=4))


def _layer_norm_cases(ln, dtype_name, full):
    import torch
    dtype = _torch_dtype(dtype_name)
    # (residual, dropout, (weight, bias), parameter dtype, input_bias); the first is the superset of the code.
    variants = [(True, True, (True, True), dtype, True), (False, False, (True, True), dtype, False),
                (True, False, (True, True), dtype, False), (False, True, (True, True), dtype, False)]
    param_variants = [(True, True, (False, False), dtype, False), (True, True, (True, False), dtype, False)]
    if dtype != torch.float32:
        param_variants.append((True, True, (True, True), torch.float32, True))  # fp32 master weights
    for n in (768, 1024, 4096, 8192):
        for has_residual, has_dropout, affine, param_dtype, input_bias in variants + param_variants:
            superset = has_residual and has_dropout and input_bias and affine == (True, True) \
                and param_dtype == dtype
            if (affine, param_dtype) != ((True, True), dtype):
                if not (full and n == 768):
                    continue  # parameter variants: one width, and only in the full grid
            elif not (superset or full or (n == 768 and dtype_name != "fp32")):
                continue
            yield from layer_norm_launches(ln, dtype_name, n, has_residual, has_dropout, affine, param_dtype,
                                           input_bias)
    yield from layer_norm_partials_launch(ln, dtype_name, 768)
    if full:
        yield from layer_norm_partials_launch(ln, dtype_name, 1000, affine=(True, False), input_bias=False)


def attention_launches(attn, dtype_name, head_dim, layout, dropout):
    """(group, kernel, args, kwargs) of the four launches of one forward + backward, built as
    ``_attention_forward`` and ``_attention_backward`` build them: q, k, v strided views of one fused QKV
    projection, outputs laid out [B, L, H, D]. ``layout`` is one of LAYOUTS."""
    import torch
    import triton
    dtype = _torch_dtype(dtype_name)
    varlen = layout == "varlen"
    has_mask = layout in ("mask", "right_padded")
    heads = max(768 // head_dim, 1)
    batch, seq_len = 2, 512
    if varlen:
        total = 1000  # the batch's real tokens, packed: not a multiple of 16
        q, k, v = torch.empty(total, 3, heads, head_dim, dtype=dtype).unbind(1)
        max_seqlen, seq_len = seq_len, 0
        lse = torch.empty(heads, total, dtype=torch.float32)
        lse_strides = (0, lse.stride(0))
        cu_seqlens = torch.empty(batch + 1, dtype=torch.int32)
    else:
        q, k, v = torch.empty(batch, seq_len, 3, heads, head_dim, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)
        max_seqlen = seq_len
        lse = torch.empty(batch, heads, seq_len, dtype=torch.float32)
        lse_strides = (lse.stride(0), lse.stride(1))
        cu_seqlens = None
    seqlens = torch.empty(batch, dtype=torch.int32) if has_mask else None
    # Right-padded rows run on their lengths alone (HAS_SEQLENS without HAS_MASK) where the kernels have that
    # path; kernels without it take the mask.
    fast_path = "HAS_SEQLENS" in _jit_fn(attn._attn_fwd).arg_names
    key_mask = (torch.empty(batch, seq_len, dtype=torch.uint8)
                if layout == "mask" or (layout == "right_padded" and not fast_path) else None)
    mask_stride = key_mask.stride(0) if key_mask is not None else 0
    o, do = attn._empty_out(q, varlen), attn._empty_out(q, varlen)
    dq, dk, dv = attn._empty_out(q, varlen), attn._empty_out(k, varlen), attn._empty_out(v, varlen)
    delta = torch.empty_like(lse)

    def st(t):
        return attn._strides(t, varlen)
    run = dict(num_heads=heads, seq_len=seq_len, max_seqlen=max_seqlen,
               seqlen_bucket=triton.next_power_of_2(max_seqlen),
               HEAD_DIM=head_dim, VARLEN=varlen, HAS_MASK=key_mask is not None,
               **(dict(HAS_SEQLENS=has_mask) if fast_path else {}), DROPOUT=dropout, PRECISION="tf32",
               softmax_scale=head_dim ** -0.5, dropout_p=0.1 if dropout else 0.0,
               Seed=torch.zeros(1, dtype=torch.int64) if dropout else None)
    yield ("attn_fwd", attn._attn_fwd,
           (q, k, v, o, lse, key_mask, seqlens, cu_seqlens, *st(q), *st(k), *st(v), *st(o), *lse_strides,
            mask_stride), run)
    yield ("attn_bwd_preprocess", attn._bwd_preprocess,
           (o, do, delta, seqlens, cu_seqlens, *st(o), *st(do), *lse_strides, heads, seq_len, max_seqlen,
            0.9 if dropout else 1.0),
           dict(HEAD_DIM=head_dim, VARLEN=varlen, BLOCK_M=64,
                **(dict(HAS_SEQLENS=has_mask) if fast_path else dict(HAS_MASK=has_mask))))
    yield ("attn_bwd_dkdv", attn._attn_bwd_dkdv,
           (q, k, v, do, dk, dv, lse, delta, key_mask, seqlens, cu_seqlens, *st(q), *st(k), *st(v), *st(do),
            *st(dk), *st(dv), *lse_strides, mask_stride), run)
    yield ("attn_bwd_dq", attn._attn_bwd_dq,
           (q, k, v, do, dq, lse, delta, key_mask, seqlens, cu_seqlens, *st(q), *st(k), *st(v), *st(do),
            *st(dq), *lse_strides, mask_stride), run)


# (head dim, layout, dropout) compiled by tests/test_gpu_compile.py by default, and whether all autotune
# candidates are compiled too. Candidates go without dropout: their shared memory does not depend on the
# flags, dropout's code is compiled with the default config, and a dropout variant takes longer to compile.
_ATTN_TEST = {"fp16": [((64, "mask", True), False), ((64, "mask", False), True),
                       ((64, "right_padded", True), False),
                       ((32, "mask", False), False), ((128, "varlen", False), False)],
              "bf16": [((64, "mask", True), False), ((32, "mask", False), False),
                       ((128, "varlen", False), False)],
              # fp32 (TF32 dots, what torch's allow_tf32 gives; its own small tiles): the smallest head dim only.
              "fp32": [((32, "mask", False), False)]}
_ATTN_FULL = [((d, layout, dropout), True) for d in (32, 64, 128) for layout in LAYOUTS for dropout in (True, False)]


def launch_configs(kernel, args, kwargs):
    """The configs the autotuner would consider for this launch: its list after the kernel's own pruning,
    called as Autotuner.run calls it (positional arguments by name, keyword arguments as given); the first
    is the launch's default (the only one under FASTROBERTA_AUTOTUNE=0)."""
    if len(kernel.configs) > 1 and getattr(kernel, "early_config_prune", None):
        return kernel.early_config_prune(kernel.configs, dict(zip(kernel.arg_names, args)), **kwargs)
    return kernel.configs


def _attention_cases(attn, dtype_name, selection):
    for (head_dim, layout, dropout), candidates in selection:
        flags = f"D={head_dim} {layout} dropout={int(dropout)}"
        for group, kernel, args, kwargs in attention_launches(attn, dtype_name, head_dim, layout, dropout):
            if not hasattr(kernel, "configs"):
                yield group, flags, kernel, args, kwargs
                continue
            tried = launch_configs(kernel, args, kwargs)
            configs = [("default", tried[0])] + ([("candidate", c) for c in tried[1:]] if candidates else [])
            for kind, cfg in configs:
                opts = ", ".join(f"{k}={v}" for k, v in cfg.all_kwargs().items() if k != "num_ctas")
                yield group, f"{flags} {kind}({opts})", kernel, args, dict(kwargs, **cfg.all_kwargs())


def cross_entropy_launches(ce, dtype_name, vocab=50265):
    """Arguments as ``_mlm_cross_entropy_forward`` passes them: one chunk of [rows, V] logits, int64 labels."""
    import torch
    dtype = _torch_dtype(dtype_name)
    rows = 1024
    block, num_warps = ce._launch_config(vocab)
    stride = ce._row_stride(vocab) if hasattr(ce, "_row_stride") else vocab
    z = torch.empty(rows, stride, dtype=dtype)[:, :vocab]
    labels = torch.empty(rows, dtype=torch.int64)
    lse = torch.empty(rows, dtype=torch.float32)
    label = f"V={vocab} BLOCK_V={block} row stride {stride}"
    yield ("ce_lse_forward", label, ce._lse_forward_kernel,
           (z, labels, lse, torch.empty_like(lse), torch.empty(rows, dtype=torch.int32), z.stride(0), vocab),
           dict(BLOCK_V=block, num_warps=num_warps))
    yield ("ce_logits_grad", label, ce._logits_grad_kernel,
           (z, labels, lse, torch.empty(1, dtype=torch.float32), z.stride(0), vocab),
           dict(BLOCK_V=block, num_warps=num_warps))


def gelu_launches(gm, dtype_name, rows=16384, n=3072):
    """Arguments as ``_gelu_backward_bias_grad_launch`` passes them: the base FFN's [tokens, 3072] gradient."""
    import torch
    dtype = _torch_dtype(dtype_name)
    t = torch.empty(rows, n, dtype=dtype)
    partial = torch.empty(-(-rows // gm.ROWS_PER_PROGRAM), n, dtype=torch.float32)
    yield ("gelu_bwd_bias_grad", f"N={n}", gm._gelu_backward_bias_grad_kernel,
           (t, t, torch.empty_like(t), partial, n, n, n, rows, n, gm.ROWS_PER_PROGRAM),
           dict(BLOCK_M=gm.BLOCK_M, BLOCK_N=gm.BLOCK_N, num_warps=4))


def linear_gelu_launches(lg, dtype_name, rows=16384, e=768, n=3072, candidates=False):
    """Arguments as ``_linear_gelu_launch`` and ``_dgrad_gelu_launch`` pass them: the base FFN's first linear
    (x [tokens, 768] W1^T, W1 [3072, 768]) and its second linear's dgrad (dout [tokens, 768] W2, W2 [768, 3072]),
    each with the launch's default config (and the autotune candidates if ``candidates``)."""
    import torch
    dtype = _torch_dtype(dtype_name)
    x, pre = torch.empty(rows, e, dtype=dtype), torch.empty(rows, n, dtype=dtype)
    w1, w2 = torch.empty(n, e, dtype=dtype), torch.empty(e, n, dtype=dtype)
    partial = torch.empty(-(-rows // lg.DGRAD_BLOCK_M), n, dtype=torch.float32)
    launches = [("linear_gelu_fwd", lg._linear_gelu_fwd_tuned,
                 (x, w1, torch.empty(n, dtype=dtype), pre, torch.empty_like(pre), e, e, n, rows, n, e),
                 dict(PRECISION="tf32", BLOCK_M=lg.FWD_BLOCK_M)),
                ("dgrad_gelu_bias_grad", lg._dgrad_gelu_tuned,
                 (x, w2, pre, torch.empty_like(pre), partial, e, n, n, n, rows, n, e),
                 dict(PRECISION="tf32", BLOCK_M=lg.DGRAD_BLOCK_M))]
    for group, kernel, args, kwargs in launches:
        configs = launch_configs(kernel, args, kwargs)
        configs = configs if candidates else configs[:1]
        for kind, cfg in zip(["default"] + ["candidate"] * len(configs), configs):
            opts = ", ".join(f"{k}={v}" for k, v in cfg.all_kwargs().items() if k != "num_ctas")
            yield group, f"K={e} N={n} {kind}({opts})", kernel, args, dict(kwargs, **cfg.all_kwargs())


def all_cases(mods, mode):
    """(group, dtype, label, kernel, args, kwargs) in a fixed order, the slow attention kernels first so that
    the workers finish together."""
    cases = []
    if mode == "static":
        for dtype_name in ("fp16", "bf16"):
            for head_dim in (64, 128):
                for layout in LAYOUTS:
                    for dropout in (False, True):
                        flags = f"D={head_dim} {layout} dropout={int(dropout)}"
                        for g, kern, args, kw in attention_launches(mods["attention"], dtype_name, head_dim,
                                                                    layout, dropout):
                            if hasattr(kern, "configs"):  # the GPU default config of this launch
                                kw = dict(kw, **launch_configs(kern, args, kw)[0].all_kwargs())
                            cases.append((g, dtype_name, flags, kern, args, kw))
        for dtype_name in ("fp16", "bf16"):
            for n in (768, 1024):
                # Without input_bias: the embeddings' LayerNorm; with it: the encoder layers' two.
                for input_bias in (False, True):
                    for dropout in (False, True):
                        cases += [(g, dtype_name, *rest) for g, *rest in
                                  layer_norm_launches(mods["layer_norm"], dtype_name, n, True, dropout,
                                                      input_bias=input_bias)]
                cases += [(g, dtype_name, *rest) for g, *rest in
                          layer_norm_partials_launch(mods["layer_norm"], dtype_name, n)]
            cases += [(g, dtype_name, *rest) for g, *rest in cross_entropy_launches(mods["cross_entropy"], dtype_name)]
            cases += [(g, dtype_name, *rest) for g, *rest in linear_gelu_launches(mods["linear_gelu"], dtype_name)]
        return cases
    full = mode == "full"
    for dtype_name in ("fp32", "fp16", "bf16"):
        selection = _ATTN_FULL if full else _ATTN_TEST[dtype_name]
        cases += [(g, dtype_name, *rest) for g, *rest in _attention_cases(mods["attention"], dtype_name, selection)]
    for dtype_name in DTYPES:
        cases += [(g, dtype_name, *rest) for g, *rest in _layer_norm_cases(mods["layer_norm"], dtype_name, full)]
        cases += [(g, dtype_name, *rest) for g, *rest in cross_entropy_launches(mods["cross_entropy"], dtype_name)]
        cases += [(g, dtype_name, *rest) for g, *rest in gelu_launches(mods["gelu"], dtype_name)]
        cases += [(g, dtype_name, *rest) for g, *rest in
                  linear_gelu_launches(mods["linear_gelu"], dtype_name, candidates=full or dtype_name == "fp16")]
    return cases


def launched_kernels(mods):
    """The jitted kernels each module launches (``name[grid](...)``, or ``_launch(name, grid, ...)`` in
    attention.py): a new one must be compiled here too."""
    from triton.runtime import KernelInterface
    found = set()
    for mod_name, mod in mods.items():
        with open(mod.__file__) as f:
            src = f.read()
        for name in set(re.findall(r"\b(_\w+)\[", src)) | set(re.findall(r"\b_launch\((_\w+),", src)):
            if isinstance(getattr(mod, name, None), KernelInterface):
                found.add(f"{mod_name}.{name}")
    return sorted(found)


# ---------------------------------------------------------------------------------------------------------
# Compiling and reading the cubin
# ---------------------------------------------------------------------------------------------------------
def _run_on_cubin(tool, flags, cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, *flags, f.name], capture_output=True, text=True).stdout


def resource_usage(cubin, cuobjdump):
    """(registers, stack bytes) per thread of the cubin's kernel; (None, None) without cuobjdump."""
    if cuobjdump is None:
        return None, None
    out = _run_on_cubin(cuobjdump, ["--dump-resource-usage"], cubin)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def disassemble(cubin, cuobjdump):
    """The cubin's SASS as ``cuobjdump -sass`` prints it."""
    return _run_on_cubin(cuobjdump, ["-sass"], cubin)


def _jit_fn(kernel):
    from triton.runtime.jit import JITFunction
    fn = kernel
    while not isinstance(fn, JITFunction):  # @triton.autotune / @triton.heuristics wrap the JITFunction
        fn = fn.fn
    return fn


def compile_case(kernel, args, kwargs, target, backend):
    """Bind ``kernel[grid](*args, **kwargs)`` as a launch does, and compile that specialization for target."""
    import triton
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature
    from fastroberta.kernels._compile_options import COMPILE_OPTIONS
    kwargs = {**COMPILE_OPTIONS, **kwargs}  # the options every launch passes
    fn = _jit_fn(kernel)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _worker(claim_dir, mode, only):
    """Compile every case that no other worker has claimed yet; print one JSON line per case."""
    try:
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.compiler import make_backend
        target = GPUTarget(*SM90)
        backend = make_backend(target)
        get_ptxas(target.arch).path  # noqa: B018 - raises when Triton finds no ptxas
    except Exception as e:  # no NVIDIA backend or no ptxas: nothing here can compile for a GPU
        print(json.dumps({"unavailable": f"{type(e).__name__}: {e}"}), flush=True)
        return
    try:
        cuobjdump = knobs.nvidia.cuobjdump.path
    except Exception:
        cuobjdump = None
    if mode == "static" and cuobjdump is None:
        print(json.dumps({"unavailable": "no cuobjdump (Triton bundles one) to disassemble the cubin"}), flush=True)
        return
    from benchmarks import sass

    import triton
    try:
        ptxas = subprocess.run([get_ptxas(target.arch).path, "--version"], capture_output=True, text=True).stdout
        ptxas = ptxas.strip().splitlines()[-1]
    except Exception:
        ptxas = None
    print(json.dumps({"toolchain": {"triton": triton.__version__, "triton_path": os.path.dirname(triton.__file__),
                                    "ptxas": ptxas}}), flush=True)
    mods = _kernel_modules()
    print(json.dumps({"launched": launched_kernels(mods)}), flush=True)
    for i, (group, dtype_name, label, kernel, args, kwargs) in enumerate(all_cases(mods, mode)):
        if only and not re.search(only, f"{group} {dtype_name} {label}"):
            continue
        try:
            os.close(os.open(os.path.join(claim_dir, str(i)), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue  # another worker has it
        result = {"index": i, "group": group, "dtype": dtype_name, "label": label}
        start = time.perf_counter()
        try:
            # Keep this process's stdout for the JSON lines, whatever the compiler prints.
            stdout, sys.stdout = sys.stdout, io.StringIO()
            try:
                compiled = compile_case(kernel, args, kwargs, target, backend)
            finally:
                sys.stdout = stdout
            cubin = compiled.asm["cubin"]
            regs, stack = resource_usage(cubin, cuobjdump)
            result.update(ok=True, shared=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                          regs=regs, stack=stack, enable_fp_fusion=compiled.metadata.enable_fp_fusion)
            if mode == "static":
                config = {k: kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK", "BLOCK_V") if k in kwargs}
                result.update(config=config, num_stages=compiled.metadata.num_stages,
                              sass=sass.analyse(disassemble(cubin, cuobjdump)))
        except Exception as e:
            # A CompilationError points at the outer call; the cause chain holds what actually failed.
            chain = []
            while e is not None and len(chain) < 8:
                chain.append("".join(traceback.format_exception_only(type(e), e)))
                e = e.__cause__ or e.__context__
            result.update(ok=False, error="\n".join(chain)[-3000:])
        result["seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps(result), flush=True)


class Unavailable(Exception):
    """This machine cannot compile for sm_90 (no NVIDIA backend in Triton, or no ptxas)."""


def run_workers(mode, workers, timeout_s, only=None, triton_site=None, toolchain=None):
    """Run ``workers`` compile workers over the mode's cases; returns (results sorted by case, launched
    kernels). ``triton_site``: a folder with another Triton install (``pip install --target DIR
    triton==X``) that the workers import instead of this environment's; ``toolchain``, a dict, receives the
    workers' Triton version, its folder and ptxas. Raises Unavailable, or RuntimeError when a worker crashes."""
    assert mode in MODES
    env = dict(os.environ, TRITON_INTERPRET="0", FASTROBERTA_AUTOTUNE="1")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    first = [str(Path(triton_site).resolve())] if triton_site else []
    env["PYTHONPATH"] = os.pathsep.join(first + [str(REPO)]
                                        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    with tempfile.TemporaryDirectory() as claim_dir:
        # Output to files, not pipes: a worker must never wait for the parent to read another one's pipe.
        logs = [(open(os.path.join(claim_dir, f"out{i}"), "w+"), open(os.path.join(claim_dir, f"err{i}"), "w+"))
                for i in range(workers)]
        cmd = [sys.executable, "-m", "benchmarks.sm90", claim_dir, mode] + ([only] if only else [])
        procs = [subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=str(REPO))
                 for out, err in logs]
        try:
            for proc in procs:
                proc.wait(timeout=timeout_s)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        outputs = []
        for proc, (out, err) in zip(procs, logs):
            out.seek(0)
            err.seek(0)
            outputs.append((proc, out.read(), err.read()))
            out.close()
            err.close()
    results, launched = [], None
    for proc, out, err in outputs:
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        for line in lines:
            if "unavailable" in line:
                raise Unavailable(line["unavailable"])
        if proc.returncode != 0:
            raise RuntimeError(f"compile worker failed (exit {proc.returncode}):\n{err[-4000:]}")
        for line in lines:
            if "launched" in line:
                launched = line["launched"]
            elif "toolchain" in line:
                if toolchain is not None:
                    toolchain.update(line["toolchain"])
            else:
                results.append(line)
    results.sort(key=lambda r: r["index"])
    return results, launched


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
