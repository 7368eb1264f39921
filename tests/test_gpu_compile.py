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

How: the compiling machinery lives in ``benchmarks/sm90.py`` (shared with ``python -m benchmarks static``,
which also reads each cubin's SASS): compile workers run as subprocesses with TRITON_INTERPRET=0, where the
kernel modules import as on a GPU machine, and each launch's arguments are built the way its launch site
builds them and bound by Triton's own argument binder, so the signature, the constexprs and the 16-byte
divisibility specialization are those of a real launch.

What is compiled by default (about a minute on two idle cores with an empty Triton cache):
- LayerNorm forward and backward at hidden 768, 1024, 4096 and 8192 with residual, dropout and input_bias (the
  superset of the kernel's code) in fp16, bf16 and fp32; the other residual/dropout combinations at 768 in fp16
  and bf16; the partial-gradient sum at 768 with all three gradients, writing each dtype;
- the four attention kernels with the GPU default config, fp16 and bf16: head dim 64 padded with key mask
  and dropout (RoBERTa training), 32 padded with mask (eval), 128 varlen (packed) without dropout; in fp16
  also head dim 64 right-padded with dropout (the kernels' mask-free path for prefix masks); fp32
  (TF32 dots on their own small tiles) at head dim 32 only;
- every autotune candidate left after the kernel's pruning at head dim 64, fp16, padded with mask, without
  dropout (RoBERTa eval; shared memory does not depend on the flags, and dropout doubles compile time);
- the two cross-entropy row kernels at the GPU block size, vocab 50265, fp16, bf16 and fp32;
- the FFN's two GEMMs with GELU epilogues (``linear_gelu.py``) at base's 768 x 3072, the default config in
  fp16, bf16 and fp32 (TF32 dots) and every autotune candidate in fp16.
Left out by default, for time: bf16 candidates, fp32 attention at head dims 64 and 128, and the other head
dim x mask/varlen/dropout x config combinations. ``FASTROBERTA_GPU_COMPILE_FULL=1`` compiles all of them
(every surviving candidate at head dims 32, 64 and 128 in fp16, bf16 and fp32, all eight layout (no mask,
mask, right-padded, varlen) x dropout combinations, every LayerNorm flag combination at every width,
LayerNorm without affine parameters and with fp32 parameters), one worker per core: about an hour of CPU,
not for CI.
"""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the repo, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import sm90  # noqa: E402  (the compiling machinery, shared with `python -m benchmarks static`)
from benchmarks.sm90 import DTYPES, H100_SHARED_BYTES, KERNELS  # noqa: E402

FULL = os.environ.get("FASTROBERTA_GPU_COMPILE_FULL", "0") not in ("", "0")
WORKER_TIMEOUT_S = 4 * 3600 if FULL else 900


# ---------------------------------------------------------------------------------------------------------
# Test side
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled():
    """Run the workers (one per core; two unless FULL) and gather their results by (group, dtype)."""
    workers = max(1, os.cpu_count() or 1) if FULL else max(1, min(2, os.cpu_count() or 1))
    try:
        lines, launched = sm90.run_workers("full" if FULL else "test", workers, WORKER_TIMEOUT_S)
    except sm90.Unavailable as e:
        pytest.skip(f"cannot compile for sm_90 on this machine: {e}")
    results = {}
    for line in lines:
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

