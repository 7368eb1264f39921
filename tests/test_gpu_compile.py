"""Every Triton kernel of fastroberta compiled ahead of time for an H100 (sm_90), on a machine without a GPU.

Triton's interpreter, which runs the CPU suite, never lowers a kernel, so it cannot see what only breaks on the
way to a GPU: tl.dot's shape and dtype rules, bf16 (the interpreter has none), tiles that need more shared
memory than an SM has, ptxas errors. This file lowers each kernel through Triton's real pipeline (TTIR ->
TTGIR -> LLVM IR -> PTX -> cubin, with the ptxas that Triton bundles) for GPUTarget("cuda", 90, 32), at the
configurations the GPU path launches, and asserts that

- compilation succeeds, and
- the block's shared memory (``metadata.shared``) fits an H100's 227 KiB per block. A config over it raises
  OutOfResources at launch; for an autotune candidate that means a compile wasted on the first step, so a
  candidate that cannot fit must be pruned by the kernel's ``early_config_prune`` (which this file applies
  as the autotuner does) or not be listed at all. The GPU default config (the first of each list, the only
  one under FASTROBERTA_AUTOTUNE=0, where no pruning happens) must always fit.

Registers and stack bytes per thread (where ptxas puts spilled registers) come from the cubin through the
``cuobjdump`` that Triton bundles; no GPU is needed. They are printed (``pytest -rP`` shows them), not
asserted: how many registers ptxas picks changes between releases.

How: under ``TRITON_INTERPRET=1`` (conftest.py sets it without CUDA) ``@triton.jit`` builds interpreter
objects that ``triton.compile`` cannot take, and the kernel modules choose interpreter-only block sizes at
import. So the compiling happens in subprocesses (this file run as a script) with TRITON_INTERPRET=0, where
the modules import as on a GPU machine. Each launch's arguments are built the way its launch site builds
them (same tensor layouts and dtypes, RoBERTa's strides; tensors are allocated, never touched) and bound by
Triton's own argument binder, so the signature, the constexprs and the 16-byte divisibility specialization
are those of a real launch.

What is compiled by default (about a minute on two idle cores with an empty Triton cache):
- LayerNorm forward and backward at hidden 768, 1024, 4096 and 8192 with residual and dropout (the superset
  of the kernel's code) in fp16, bf16 and fp32; the other residual/dropout combinations at 768 in fp16 and
  bf16;
- the four attention kernels with the GPU default config, fp16 and bf16: head dim 64 padded with key mask
  and dropout (RoBERTa training), 32 padded with mask (eval), 128 varlen (packed) without dropout; fp32
  (exact fp32 dots, 5-100 s a kernel to compile) at head dim 32 only;
- every autotune candidate left after the kernel's pruning at head dim 64, fp16, padded with mask, without
  dropout (RoBERTa eval; shared memory does not depend on the flags, and dropout doubles compile time);
- the two cross-entropy row kernels at the GPU block size, vocab 50265, fp16, bf16 and fp32.
Left out by default, for time: bf16 candidates, fp32 attention at head dims 64 and 128, and the other head
dim x mask/varlen/dropout x config combinations. ``FASTROBERTA_GPU_COMPILE_FULL=1`` compiles all of them
(every surviving candidate at head dims 32, 64 and 128 in fp16, bf16 and fp32, all six mask/varlen/dropout
combinations, every LayerNorm flag combination at every width, LayerNorm without affine parameters and with
fp32 parameters), one worker per core: about an hour of CPU, not for CI.
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

import pytest
import torch
import triton

H100_SHARED_BYTES = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin of an H100 (and H200): 227 KiB
SM90 = ("cuda", 90, 32)
DTYPES = ("fp16", "bf16", "fp32")
KERNELS = {  # group name: (module, kernel)
    "layer_norm_fwd": ("layer_norm", "_layer_norm_fwd_kernel"),
    "layer_norm_bwd": ("layer_norm", "_layer_norm_bwd_kernel"),
    "attn_fwd": ("attention", "_attn_fwd"),
    "attn_bwd_preprocess": ("attention", "_bwd_preprocess"),
    "attn_bwd_dkdv": ("attention", "_attn_bwd_dkdv"),
    "attn_bwd_dq": ("attention", "_attn_bwd_dq"),
    "ce_lse_forward": ("cross_entropy", "_lse_forward_kernel"),
    "ce_logits_grad": ("cross_entropy", "_logits_grad_kernel"),
}
FULL = os.environ.get("FASTROBERTA_GPU_COMPILE_FULL", "0") not in ("", "0")
WORKER_TIMEOUT_S = 4 * 3600 if FULL else 900
SEED = 123457  # a typical dropout seed: not a multiple of 16, so it is specialized as a plain i32


# ---------------------------------------------------------------------------------------------------------
# Worker side: ``python tests/test_gpu_compile.py CLAIM_DIR FULL``, with TRITON_INTERPRET=0
# ---------------------------------------------------------------------------------------------------------
def _kernel_modules():
    # The package re-exports functions under the module names, so import the modules themselves.
    return {name: importlib.import_module(f"fastroberta.kernels.{name}")
            for name in ("layer_norm", "attention", "cross_entropy")}


def _torch_dtype(name):
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _layer_norm_cases(ln, dtype_name, full):
    """Arguments as ``_LayerNormFunction`` passes them: [rows, n] activations, parameters in x's dtype."""
    dtype = _torch_dtype(dtype_name)
    rows = 16384  # 32 x 512 tokens
    programs = 4 * 132  # four per SM of an H100 SXM, as _backward_programs picks
    # (residual, dropout, (weight, bias), parameter dtype); the first is the superset of the kernel's code.
    variants = [(True, True, (True, True), dtype), (False, False, (True, True), dtype),
                (True, False, (True, True), dtype), (False, True, (True, True), dtype)]
    param_variants = [(True, True, (False, False), dtype), (True, True, (True, False), dtype)]
    if dtype != torch.float32:
        param_variants.append((True, True, (True, True), torch.float32))  # fp32 master weights
    for n in (768, 1024, 4096, 8192):
        block, num_warps = ln._launch_config(n)
        for has_residual, has_dropout, affine, param_dtype in variants + param_variants:
            superset = has_residual and has_dropout and affine == (True, True) and param_dtype == dtype
            if (affine, param_dtype) != ((True, True), dtype):
                if not (full and n == 768):
                    continue  # parameter variants: one width, and only in the full grid
            elif not (superset or full or (n == 768 and dtype_name != "fp32")):
                continue
            x = torch.empty(rows, n, dtype=dtype)
            r = torch.empty(rows, n, dtype=dtype) if has_residual else None
            w = torch.empty(n, dtype=param_dtype) if affine[0] else None
            b = torch.empty(n, dtype=param_dtype) if affine[1] else None
            stats = torch.empty(rows, dtype=torch.float32)
            p = 0.1 if has_dropout else 0.0
            scale = 1.0 / (1.0 - p)
            seed = SEED if has_dropout else 0
            label = f"N={n} residual={int(has_residual)} dropout={int(has_dropout)}"
            if affine != (True, True):
                label += f" weight={int(affine[0])} bias={int(affine[1])}"
            if param_dtype != dtype:
                label += " fp32 params"
            flags = dict(HAS_RESIDUAL=has_residual, HAS_DROPOUT=has_dropout, HAS_WEIGHT=affine[0],
                         HAS_BIAS=affine[1], BLOCK=block, num_warps=num_warps)
            yield ("layer_norm_fwd", label, ln._layer_norm_fwd_kernel,
                   (x, r, w, b, torch.empty_like(x), stats, stats, n, n if has_residual else 0, n,
                    n, 1e-5, p, scale, seed), flags)
            store_dr = has_residual and has_dropout
            partial = torch.empty(programs, n, dtype=torch.float32)
            yield ("layer_norm_bwd", label, ln._layer_norm_bwd_kernel,
                   (x, r, w, torch.empty_like(x), torch.empty_like(x), torch.empty_like(x) if store_dr else None,
                    partial if affine[0] else None, partial if affine[1] else None, stats, stats,
                    n, n if has_residual else 0, n, n, n if store_dr else 0,
                    rows, n, p, scale, seed, -(-rows // programs)),
                   dict(flags, STORE_DRESIDUAL=store_dr))


def _attention_launches(attn, dtype_name, head_dim, varlen, has_mask, dropout):
    """(group, kernel, args, kwargs) of the four launches of one forward + backward, built as
    ``_FlashAttention`` builds them: q, k, v strided views of one fused QKV projection, outputs laid out
    [B, L, H, D]."""
    dtype = _torch_dtype(dtype_name)
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
    key_mask = torch.empty(batch, seq_len, dtype=torch.uint8) if has_mask else None
    seqlens = torch.empty(batch, dtype=torch.int32) if has_mask else None
    mask_stride = key_mask.stride(0) if has_mask else 0
    o, do = attn._empty_out(q, varlen), attn._empty_out(q, varlen)
    dq, dk, dv = attn._empty_out(q, varlen), attn._empty_out(k, varlen), attn._empty_out(v, varlen)
    delta = torch.empty_like(lse)

    def st(t):
        return attn._strides(t, varlen)
    run = dict(num_heads=heads, seq_len=seq_len, max_seqlen=max_seqlen,
               seqlen_bucket=triton.next_power_of_2(max_seqlen),
               HEAD_DIM=head_dim, VARLEN=varlen, HAS_MASK=has_mask, DROPOUT=dropout,
               PRECISION="ieee" if dtype == torch.float32 else "tf32",
               softmax_scale=head_dim ** -0.5, dropout_p=0.1 if dropout else 0.0, seed=SEED if dropout else 0)
    yield ("attn_fwd", attn._attn_fwd,
           (q, k, v, o, lse, key_mask, seqlens, cu_seqlens, *st(q), *st(k), *st(v), *st(o), *lse_strides,
            mask_stride), run)
    yield ("attn_bwd_preprocess", attn._bwd_preprocess,
           (o, do, delta, seqlens, cu_seqlens, *st(o), *st(do), *lse_strides, heads, seq_len, max_seqlen),
           dict(HEAD_DIM=head_dim, VARLEN=varlen, HAS_MASK=has_mask, BLOCK_M=64))
    yield ("attn_bwd_dkdv", attn._attn_bwd_dkdv,
           (q, k, v, do, dk, dv, lse, delta, key_mask, seqlens, cu_seqlens, *st(q), *st(k), *st(v), *st(do),
            *st(dk), *st(dv), *lse_strides, mask_stride), run)
    yield ("attn_bwd_dq", attn._attn_bwd_dq,
           (q, k, v, do, dq, lse, delta, key_mask, seqlens, cu_seqlens, *st(q), *st(k), *st(v), *st(do),
            *st(dq), *lse_strides, mask_stride), run)


# (head dim, varlen, key mask, dropout) compiled by default, and whether all candidates are compiled too.
# Candidates go without dropout: their shared memory does not depend on the flags, dropout's code is compiled
# with the default config, and a dropout variant takes about twice as long to compile.
_ATTN_DEFAULT = {"fp16": [((64, False, True, True), False), ((64, False, True, False), True),
                          ((32, False, True, False), False), ((128, True, False, False), False)],
                 "bf16": [((64, False, True, True), False), ((32, False, True, False), False),
                          ((128, True, False, False), False)],
                 # The exact fp32 dots (PRECISION="ieee") are the slowest to compile: the smallest head dim only.
                 "fp32": [((32, False, True, False), False)]}
_ATTN_FULL = [((d, varlen, mask, dropout), True) for d in (32, 64, 128) for varlen, mask in
              ((False, False), (False, True), (True, False)) for dropout in (True, False)]


def _attention_cases(attn, dtype_name, full):
    for (head_dim, varlen, has_mask, dropout), candidates in (_ATTN_FULL if full else _ATTN_DEFAULT[dtype_name]):
        flags = f"D={head_dim} {'varlen' if varlen else 'padded'} mask={int(has_mask)} dropout={int(dropout)}"
        for group, kernel, args, kwargs in _attention_launches(attn, dtype_name, head_dim, varlen, has_mask,
                                                               dropout):
            if not hasattr(kernel, "configs"):
                yield group, flags, kernel, args, kwargs
                continue
            configs = [("default", kernel.configs[0])]
            if candidates:
                # What the autotuner would try: the list after the kernel's own pruning, called as
                # Autotuner.run calls it (positional arguments by name, keyword arguments as given).
                tried = kernel.configs
                if getattr(kernel, "early_config_prune", None):
                    tried = kernel.early_config_prune(kernel.configs, dict(zip(kernel.arg_names, args)), **kwargs)
                configs += [("candidate", c) for c in tried if c is not kernel.configs[0]]
            for kind, cfg in configs:
                opts = ", ".join(f"{k}={v}" for k, v in cfg.all_kwargs().items() if k != "num_ctas")
                yield group, f"{flags} {kind}({opts})", kernel, args, dict(kwargs, **cfg.all_kwargs())


def _cross_entropy_cases(ce, dtype_name):
    """Arguments as ``_MaskedLMCrossEntropy`` passes them: one chunk of [rows, V] logits, int64 labels."""
    dtype = _torch_dtype(dtype_name)
    vocab, rows = 50265, 1024
    block, num_warps = ce._launch_config(vocab)
    z = torch.empty(rows, vocab, dtype=dtype)
    labels = torch.empty(rows, dtype=torch.int64)
    lse = torch.empty(rows, dtype=torch.float32)
    label = f"V={vocab} BLOCK_V={block}"
    yield ("ce_lse_forward", label, ce._lse_forward_kernel,
           (z, labels, lse, torch.empty_like(lse), torch.empty(rows, dtype=torch.int32), z.stride(0), vocab),
           dict(BLOCK_V=block, num_warps=num_warps))
    yield ("ce_logits_grad", label, ce._logits_grad_kernel,
           (z, labels, lse, torch.empty(1, dtype=torch.float32), z.stride(0), vocab),
           dict(BLOCK_V=block, num_warps=num_warps))


def _all_cases(mods, full):
    """(group, dtype, label, kernel, args, kwargs) in a fixed order, the slow attention kernels first so that
    the workers finish together."""
    cases = []
    for dtype_name in ("fp32", "fp16", "bf16"):
        cases += [(g, dtype_name, *rest) for g, *rest in _attention_cases(mods["attention"], dtype_name, full)]
    for dtype_name in DTYPES:
        cases += [(g, dtype_name, *rest) for g, *rest in _layer_norm_cases(mods["layer_norm"], dtype_name, full)]
        cases += [(g, dtype_name, *rest) for g, *rest in _cross_entropy_cases(mods["cross_entropy"], dtype_name)]
    return cases


def _launched_kernels(mods):
    """The jitted kernels each module launches (``name[grid](...)``): a new one must be compiled here too."""
    from triton.runtime import KernelInterface
    found = set()
    for mod_name, mod in mods.items():
        with open(mod.__file__) as f:
            src = f.read()
        for name in set(re.findall(r"\b(_\w+)\[", src)):
            if isinstance(getattr(mod, name, None), KernelInterface):
                found.add(f"{mod_name}.{name}")
    return sorted(found)


def _resource_usage(cubin, cuobjdump):
    """(registers, stack bytes) per thread of the cubin's kernel; (None, None) without cuobjdump."""
    if cuobjdump is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def _compile(kernel, args, kwargs, target, backend):
    """Bind ``kernel[grid](*args, **kwargs)`` as a launch does, and compile that specialization for target."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction, create_function_from_signature
    fn = kernel
    while not isinstance(fn, JITFunction):  # @triton.autotune / @triton.heuristics wrap the JITFunction
        fn = fn.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _worker(claim_dir, full):
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

    mods = _kernel_modules()
    print(json.dumps({"launched": _launched_kernels(mods)}), flush=True)
    for i, (group, dtype_name, label, kernel, args, kwargs) in enumerate(_all_cases(mods, full)):
        try:
            os.close(os.open(os.path.join(claim_dir, str(i)), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue  # another worker has it
        result = {"group": group, "dtype": dtype_name, "label": label}
        start = time.perf_counter()
        try:
            # Keep this process's stdout for the JSON lines, whatever the compiler prints.
            stdout, sys.stdout = sys.stdout, io.StringIO()
            try:
                compiled = _compile(kernel, args, kwargs, target, backend)
            finally:
                sys.stdout = stdout
            regs, stack = _resource_usage(compiled.asm["cubin"], cuobjdump)
            result.update(ok=True, shared=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                          regs=regs, stack=stack)
        except Exception as e:
            # A CompilationError points at the outer call; the cause chain holds what actually failed.
            chain = []
            while e is not None and len(chain) < 8:
                chain.append("".join(traceback.format_exception_only(type(e), e)))
                e = e.__cause__ or e.__context__
            result.update(ok=False, error="\n".join(chain)[-3000:])
        result["seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------------
# Test side
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled():
    """Run the workers (one per core; two unless FULL) and gather their results by (group, dtype)."""
    workers = max(1, os.cpu_count() or 1) if FULL else max(1, min(2, os.cpu_count() or 1))
    env = dict(os.environ, TRITON_INTERPRET="0", FASTROBERTA_AUTOTUNE="1")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    with tempfile.TemporaryDirectory() as claim_dir:
        # Output to files, not pipes: a worker must never wait for the parent to read another one's pipe.
        logs = [(open(os.path.join(claim_dir, f"out{i}"), "w+"), open(os.path.join(claim_dir, f"err{i}"), "w+"))
                for i in range(workers)]
        procs = [subprocess.Popen([sys.executable, __file__, claim_dir, "1" if FULL else "0"],
                                  stdout=out, stderr=err, text=True, env=env) for out, err in logs]
        try:
            for proc in procs:
                proc.wait(timeout=WORKER_TIMEOUT_S)
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
    results, launched = {}, None
    for proc, out, err in outputs:
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        for line in lines:
            if "unavailable" in line:
                pytest.skip(f"cannot compile for sm_90 on this machine: {line['unavailable']}")
        assert proc.returncode == 0, f"compile worker failed (exit {proc.returncode}):\n{err[-4000:]}"
        for line in lines:
            if "launched" in line:
                launched = line["launched"]
            else:
                results.setdefault((line["group"], line["dtype"]), []).append(line)
    return results, launched


def test_every_launched_kernel_is_compiled_here(compiled):
    _, launched = compiled
    covered = sorted(f"{mod}.{name}" for mod, name in KERNELS.values())
    assert launched == covered, (f"the kernel modules launch {launched} but this file compiles {covered}: "
                                 "add the new kernel's launches to it")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", KERNELS)
def test_compiles_for_h100(compiled, group, dtype):
    results, _ = compiled
    cases = results.get((group, dtype), [])
    assert cases, f"no {group} launch in {dtype} was compiled"
    failed = [f"{r['label']}:\n{r['error']}" for r in cases if not r["ok"]]
    assert not failed, (f"{len(failed)} of {len(cases)} {group} {dtype} configs fail to compile for sm_90:\n"
                        + "\n\n".join(failed))
    too_big = [f"{r['label']}: {r['shared']} bytes" for r in cases if r["shared"] > H100_SHARED_BYTES]
    assert not too_big, (f"{group} {dtype} configs need more shared memory than an H100 block has "
                         f"({H100_SHARED_BYTES} bytes) and cannot launch:\n" + "\n".join(too_big))


def test_resource_usage_table(compiled):
    """Prints shared memory, registers and stack (spill) bytes of every compiled config: ``pytest -rP``."""
    results, _ = compiled
    rows = [r for key in sorted(results) for r in results[key] if r["ok"]]
    assert rows
    print(f"{'kernel':<20} {'dtype':<5} {'shared':>7} {'regs':>4} {'stack':>6} {'warps':>5} {'compile s':>9}  config")
    for r in rows:
        print(f"{r['group']:<20} {r['dtype']:<5} {r['shared']:>7} {r['regs']!s:>4} {r['stack']!s:>6} "
              f"{r['num_warps']:>5} {r['seconds']:>9}  {r['label']}")


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2] == "1")
