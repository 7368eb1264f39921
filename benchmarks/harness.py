"""The measuring machinery shared by every benchmark: environment stamp, timing, memory, competitors,
correctness checks and the JSON / Markdown / PNG writers.

A kernel benchmark module (``bench_<op>.py``) describes *what* to measure and this file measures it:

    NAME, TITLE, METRIC ("GB/s" | "TFLOP/s"), MODES, BASELINE      what the tables show
    cases(profile) -> [Case]                                       shapes, dtypes, dropout per profile
    make_inputs(case, device) -> dict                              the tensors every competitor shares
    competitors() -> [Competitor]                                  each builds a Runner for a case
    work(case, inputs, mode) -> float                              bytes moved or FLOPs for a mode

Timing: on CUDA ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs) after one explicit warm-up
call (compilation and autotuning stay out of the numbers), median of the repeats. On CPU the suite only runs
in smoke mode: tiny shapes through Triton's interpreter, timed with a wall clock, labelled
``SMOKE_LABEL`` and never written under ``benchmarks/results/``.

Memory: ``extra_mem_mb`` is ``torch.cuda.max_memory_allocated()`` during one call minus what was allocated
before it (the shared inputs), so it is the op's own footprint: outputs, saved activations, gradients,
workspaces. Correctness: every case is also run with dropout 0 and each competitor's output and input gradients
are compared with the fp32 eager reference (``fastroberta.kernels.reference``) by relative norm error; the
fastroberta rows must pass the dtype's tolerance, the others are reported for context.
"""
import functools
import gc
import hashlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from benchmarks.tables import env_line, fmt, markdown_table  # noqa: F401  (re-exported for the bench modules)

# Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before fastroberta.kernels is
# imported; every bench module imports this file first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
RESULTS_ROOT = REPO / "benchmarks" / "results"
SMOKE_ROOT = REPO / "out" / "benchmarks-smoke"
SMOKE_LABEL = "smoke: not a performance result"
# Printed before any figure a CPU run shows: interpreter times are ~1000x slower than compiled code on a GPU.
SMOKE_BANNER = (
    "=" * 100 + "\n"
    "SMOKE RUN: a correctness check, NOT a performance result. No CUDA GPU here, so the Triton kernels run\n"
    "through Triton's CPU interpreter on tiny shapes: every time and rate printed below ('smoke ms', 'smoke\n"
    "tok/s') is an interpreter wall-clock figure that says nothing about speed on a GPU. Performance results\n"
    "come from a CUDA GPU: bash benchmarks/gpu_check.sh (see CONTRIBUTING.md).\n"
    + "=" * 100)


def print_smoke_banner(file=None):
    import sys
    print(SMOKE_BANNER, file=file or sys.stdout, flush=True)


def time_unit(smoke):
    """The label of a printed time: plain milliseconds only for a real measurement."""
    return "smoke ms" if smoke else "ms"
PROFILES = ("smoke", "check", "full")
MODES_ALL = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Relative norm error allowed against the fp32 reference (outputs and gradients). fp32 leaves room for TF32
# tensor-core dots; fp16/bf16 for rounding of the inputs, the output and the 16-bit matmul operands.
TOLERANCE = {"fp32": 2e-3, "fp16": 1e-2, "bf16": 5e-2}

def default_profile():
    return "full" if torch.cuda.is_available() else "smoke"


def device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()})"


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_slug():
    return slug(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "cpu-smoke"


def peak_tflops(name=None):
    """The device's dense 16-bit peak (for MFU), or None when the device is not in the table."""
    override = os.environ.get("FASTROBERTA_PEAK_TFLOPS")
    if override:
        return float(override)
    from fastroberta.training.metrics import GPU_PEAK_TFLOPS  # the one table, shared with the trainer's MFU
    name = name or device_name()
    for key, (half, _tf32, _fp32) in GPU_PEAK_TFLOPS:
        if key in name:
            return half
    return None


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit():
    """The commit the results belong to. The GPU machine gets a copy of the tree without .git, so
    FASTROBERTA_GIT_COMMIT (set by whoever starts the run) wins; "+dirty" marks uncommitted changes."""
    if os.environ.get("FASTROBERTA_GIT_COMMIT"):
        return os.environ["FASTROBERTA_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_digest():
    """A short hash of the measured code (fastroberta/, fastroberta/kernels/, benchmarks/ sources): ties a result to the code
    even where no git commit is known."""
    h = hashlib.sha256()
    for folder in ("fastroberta", "fastroberta/kernels", "benchmarks"):
        for path in sorted((REPO / folder).glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


_COPY_BW = None


def copy_bandwidth_gbps():
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written (a 512 MiB copy_):
    the ceiling a memory-bound kernel such as LayerNorm is compared with. None without CUDA."""
    global _COPY_BW
    if _COPY_BW is None and torch.cuda.is_available():
        src = torch.empty(2 ** 27, dtype=torch.float32, device="cuda").uniform_()
        dst = torch.empty_like(src)
        ms = gpu_ms(lambda: dst.copy_(src), warmup_ms=10, rep_ms=50)
        _COPY_BW = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
        del src, dst
        free_memory()
    return _COPY_BW


def environment(smoke):
    """The stamp every result file carries."""
    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "smoke": bool(smoke),
        "label": SMOKE_LABEL if smoke else "performance result",
        "device": device_name(),
        "device_slug": device_slug(),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "deepspeed": _version("deepspeed"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "source_digest": source_digest(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "peak_tflops_16bit": peak_tflops(),
        "copy_bandwidth_gbps": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu_memory_gb"] = round(props.total_memory / 1e9, 1)
        env["sm_count"] = props.multi_processor_count
        env["copy_bandwidth_gbps"] = round(copy_bandwidth_gbps(), 1)
    return env


def results_dir(out_root, env):
    """``<out_root>/<device-slug>/``; refuses to put smoke output among the committed results."""
    out_root = Path(out_root).resolve()
    if env["smoke"] and (out_root == RESULTS_ROOT or RESULTS_ROOT in out_root.parents):
        raise ValueError(f"smoke runs are not performance results and are not written under {RESULTS_ROOT}; "
                         f"pass --out elsewhere (default {SMOKE_ROOT})")
    path = out_root / env["device_slug"]
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ timing
@dataclass
class Timing:
    """do_bench's warm-up and repeat budgets in milliseconds (GPU); wall-clock repeats on CPU."""
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_reps: int = 1
    warm_calls: int = 1  # untimed calls first: compilation and autotuning (0 in smoke mode, where time is moot)

    @classmethod
    def for_profile(cls, profile):
        return {"smoke": cls(5, 20, 1, 0), "check": cls(10, 40, 1, 1), "full": cls(25, 100, 3, 1)}[profile]


def gpu_ms(fn, warmup_ms, rep_ms, grad_to_none=None):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                   return_mode="median")


def time_ms(fn, timing, grad_to_none=None):
    """Median milliseconds of ``fn`` (already warmed up by the caller)."""
    if torch.cuda.is_available():
        return gpu_ms(fn, timing.warmup_ms, timing.rep_ms, grad_to_none)
    times = []
    for _ in range(max(1, timing.cpu_reps)):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def extra_memory_mb(fn, leaves=()):
    """Peak memory of one call above what was allocated before it (CUDA only; None on CPU)."""
    if not torch.cuda.is_available():
        return None
    for t in leaves:
        t.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


# ----------------------------------------------------------------------------------- cases and competitors
@dataclass(frozen=True)
class Case:
    """One benchmark configuration; ``params`` hold the shape, ``dtype`` and ``dropout_p``."""
    id: str
    params: tuple  # sorted (key, value) pairs, so a Case is hashable and its id stable

    @classmethod
    def make(cls, case_id, **params):
        return cls(case_id, tuple(sorted(params.items())))

    @property
    def p(self):
        return dict(self.params)

    @property
    def dtype(self):
        return DTYPES[self.p["dtype"]]

    def with_params(self, **changes):
        return Case.make(self.id, **{**self.p, **changes})


@dataclass
class Runner:
    """One competitor ready to run on one case's inputs.

    ``fn(*leaves)`` returns one tensor (output or loss); ``leaves`` are the differentiable inputs;
    ``dout`` the gradient fed to backward (None: ones for a scalar loss); ``ref_fn`` the fp32 eager reference
    with the same signature; ``compare_mask`` (broadcastable to the output) selects the rows whose output is
    defined the same way by every competitor (attention: real query tokens)."""
    fn: Callable
    leaves: Sequence[torch.Tensor]
    leaf_names: Sequence[str]
    ref_fn: Optional[Callable] = None
    dout: Optional[torch.Tensor] = None
    compare_mask: Optional[torch.Tensor] = None

    def forward(self):
        return self.fn(*self.leaves)

    def grad_for(self, out):
        if self.dout is None:
            return torch.ones_like(out)
        return self.dout.to(out.dtype)


@dataclass
class Competitor:
    name: str
    build: Callable                     # (case, inputs) -> Runner
    status: Callable = lambda: "available"
    applies: Callable = lambda case: True
    ours: bool = False                  # fastroberta's own: its correctness check gates the run
    checked: bool = True                # False: no correctness record (torch.compile of the eager code)


def import_status(module, attr=None):
    """"available" when ``module`` (and ``attr`` in it) imports, else "not installed: <why>"."""
    try:
        mod = __import__(module, fromlist=[attr] if attr else [])
        if attr is not None:
            getattr(mod, attr)
        return "available"
    except Exception as e:  # an ImportError, or a broken install that fails while importing
        return f"not installed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}".rstrip(": ")


def compile_status(smoke):
    if smoke:
        return "skipped: smoke mode (torch.compile on CPU takes minutes)"
    if not hasattr(torch, "compile"):
        return "not installed: torch.compile needs torch >= 2.0"
    return "available"


# --------------------------------------------------------------------------------------- correctness checks
def rel_err(a, b):
    """||a - b|| / ||b|| in fp32 (inf for NaN/inf, 0 for two zero tensors)."""
    a, b = a.detach().float(), b.detach().float()
    if not torch.isfinite(a).all():
        return math.inf
    num = (a - b).norm().item()
    den = b.norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def check_runner(runner, tol):
    """Compare a runner's output and input gradients with its fp32 reference; one record per tensor."""
    out = runner.forward()
    dout = runner.grad_for(out)
    grads = torch.autograd.grad(out, list(runner.leaves), dout, allow_unused=True)
    leaves32 = [t.detach().float().requires_grad_(t.requires_grad) for t in runner.leaves]
    ref = runner.ref_fn(*leaves32)
    ref_grads = torch.autograd.grad(ref, leaves32, dout.float(), allow_unused=True)
    if runner.compare_mask is not None:
        out, ref = out * runner.compare_mask, ref * runner.compare_mask
    records = [("out", rel_err(out, ref))]
    for name, g, rg in zip(runner.leaf_names, grads, ref_grads):
        if rg is None:
            continue
        records.append((f"grad {name}", math.inf if g is None else rel_err(g, rg)))
    return [{"tensor": name, "rel_err": err, "tol": tol, "passed": err <= tol} for name, err in records]


# ---------------------------------------------------------------------------------------- the kernel loop
def _mode_fns(runner, mode):
    """(callable to time, leaves whose .grad is reset between runs) for one mode."""
    leaves = list(runner.leaves)
    if mode == "fwd":
        return runner.forward, []
    if mode == "fwd+bwd":
        def fwd_bwd():
            out = runner.forward()
            out.backward(runner.grad_for(out))
        return fwd_bwd, leaves
    if mode == "bwd":
        out = runner.forward()
        dout = runner.grad_for(out)
        return (lambda: out.backward(dout, retain_graph=True)), leaves
    raise ValueError(f"unknown mode {mode!r}")


def measure_runner(runner, modes, timing, work):
    """Time and size each mode; ``work(mode)`` gives bytes or FLOPs. Returns {mode: record}."""
    records = {}
    for mode in [m for m in ("fwd", "fwd+bwd", "bwd") if m in modes]:
        rec = {"mode": mode, "ms": None, "extra_mem_mb": None, "status": "ok"}
        try:
            fn, grad_leaves = _mode_fns(runner, mode)
            for _ in range(timing.warm_calls):
                fn()
            for t in grad_leaves:
                t.grad = None
            if mode != "bwd":
                rec["extra_mem_mb"] = extra_memory_mb(fn, grad_leaves)
            rec["ms"] = time_ms(fn, timing, grad_to_none=grad_leaves)
            del fn
        except Exception as e:  # a competitor failing (e.g. retain_graph unsupported) must not stop the run
            if mode == "bwd" and records.get("fwd", {}).get("ms") and records.get("fwd+bwd", {}).get("ms"):
                rec["ms"] = max(records["fwd+bwd"]["ms"] - records["fwd"]["ms"], 0.0)
                rec["status"] = f"derived (fwd+bwd - fwd): {type(e).__name__}"
            else:
                rec["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        for t in runner.leaves:
            t.grad = None
        if rec["ms"]:
            rec["work"] = work(mode)
        records[mode] = rec
    return records


def run_kernel_bench(bench, profile, out_root, timing=None, deadline=None, dtypes=None, log=print):
    """Run one kernel benchmark module over the profile's cases; write JSON + Markdown after every case (a
    run stopped by a time limit keeps what it measured) and a PNG at the end. Returns the result dict."""
    smoke = profile == "smoke"
    timing = timing or Timing.for_profile(profile)
    env = environment(smoke)
    out_dir = results_dir(out_root, env)
    dev = device()
    competitors = bench.competitors(smoke)
    status = {c.name: c.status() for c in competitors}
    cases = [c for c in bench.cases(profile) if dtypes is None or c.p["dtype"] in dtypes]
    result = {
        "bench": bench.NAME, "title": bench.TITLE, "metric": bench.METRIC, "baseline": bench.BASELINE,
        "modes": list(bench.MODES), "profile": profile, "environment": env, "label": env["label"],
        "competitors": status, "cases": [{"id": c.id, **c.p} for c in cases],
        "results": [], "checks": [], "skipped_cases": [], "complete": False,
    }
    started = time.monotonic()
    unit = time_unit(smoke)
    if smoke:
        log(f"[{bench.NAME}] columns: competitor, then per mode the {unit} (interpreter wall time: {SMOKE_LABEL})")
    for case in cases:
        if deadline is not None and time.monotonic() > deadline:
            result["skipped_cases"].append(case.id)
            continue
        log(f"[{bench.NAME}] {case.id}")
        inputs = bench.make_inputs(case, dev)
        check_case = case.with_params(dropout_p=0.0) if case.p.get("dropout_p") else case
        tol = TOLERANCE[case.p["dtype"]]
        for comp in competitors:
            if not comp.applies(case):
                continue
            if status[comp.name] != "available":
                for mode in bench.MODES:
                    result["results"].append({"case": case.id, "competitor": comp.name, "mode": mode, "ms": None,
                                              "extra_mem_mb": None, "status": status[comp.name]})
                continue
            if deadline is not None and time.monotonic() > deadline:
                for mode in bench.MODES:
                    result["results"].append({"case": case.id, "competitor": comp.name, "mode": mode, "ms": None,
                                              "extra_mem_mb": None, "status": "skipped: time budget"})
                continue
            try:
                if comp.checked:
                    runner = comp.build(check_case, inputs)
                    for rec in check_runner(runner, tol):
                        result["checks"].append({"case": case.id, "competitor": comp.name, "gates": comp.ours,
                                                 "dropout_p": 0.0, **rec})
                    del runner
                runner = comp.build(case, inputs)
                records = measure_runner(runner, bench.MODES, timing, functools.partial(bench.work, case, inputs))
                del runner
            except Exception as e:
                msg = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                log(f"  {comp.name}: {msg}")
                records = {m: {"mode": m, "ms": None, "extra_mem_mb": None, "status": msg} for m in bench.MODES}
                if comp.ours:
                    result["checks"].append({"case": case.id, "competitor": comp.name, "gates": True,
                                             "tensor": "run", "rel_err": None, "tol": tol, "passed": False,
                                             "error": msg})
            free_memory()
            for mode in bench.MODES:
                rec = {"case": case.id, "competitor": comp.name, **records[mode]}
                add_throughput(rec, bench.METRIC, env)
                result["results"].append(rec)
            summary = ", ".join(f"{m} {records[m]['ms']:.3f} {unit}" if records[m]["ms"] else f"{m} -"
                                for m in bench.MODES)
            log(f"  {comp.name:<22} {summary}")
        del inputs
        free_memory()
        result["elapsed_s"] = round(time.monotonic() - started, 1)
        write_kernel_result(result, out_dir, plot=False)
    result["complete"] = not result["skipped_cases"]
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    write_kernel_result(result, out_dir, plot=True)
    return result


def add_throughput(rec, metric, env):
    """TFLOP/s or GB/s from the record's work and time; for GB/s also the share of the copy bandwidth."""
    if not rec.get("ms") or not rec.get("work"):
        rec["throughput"] = None
        return
    rate = rec["work"] / (rec["ms"] * 1e-3)
    rec["throughput"] = rate / (1e12 if metric == "TFLOP/s" else 1e9)
    if metric == "GB/s" and env.get("copy_bandwidth_gbps"):
        rec["pct_copy_bw"] = 100.0 * rec["throughput"] / env["copy_bandwidth_gbps"]


def checks_passed(result):
    """True when every gating correctness check (fastroberta's rows) passed."""
    gating = [c for c in result["checks"] if c.get("gates")]
    return bool(gating) and all(c["passed"] for c in gating)


# ---------------------------------------------------------------------------------------------- writers
def write_json(obj, path):
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def kernel_markdown(result):
    env = result["environment"]
    metric = result["metric"]
    modes = result["modes"]
    main_mode = "fwd+bwd" if "fwd+bwd" in modes else modes[-1]
    lines = [f"# {result['title']}", ""]
    if env["smoke"]:
        lines += [f"**{SMOKE_LABEL}** — tiny shapes on {env['device']}"
                  f"{' through the Triton interpreter' if env['triton_interpret'] else ''}; the times only show "
                  "that the harness runs.", ""]
    lines += [env_line(env), "", f"Profile `{result['profile']}`; time = median ms; {metric} counted as "
              f"documented in `benchmarks/bench_{result['bench']}.py`; speedup = {result['baseline']} time / "
              f"competitor time ({main_mode}); extra mem = peak allocated above the inputs ({main_mode}).", ""]
    by_key = {(r["case"], r["competitor"], r["mode"]): r for r in result["results"]}
    competitors = list(result["competitors"])
    for case in result["cases"]:
        rows = []
        for comp in competitors:
            recs = [by_key.get((case["id"], comp, m)) for m in modes]
            if all(r is None for r in recs):
                continue
            if all(r is None or r["ms"] is None for r in recs):
                status = next(r["status"] for r in recs if r is not None)
                rows.append([comp] + ["-"] * (len(modes) + 3) + [status])
                continue
            main = by_key.get((case["id"], comp, main_mode)) or {}
            base = by_key.get((case["id"], result["baseline"], main_mode)) or {}
            speedup = base["ms"] / main["ms"] if base.get("ms") and main.get("ms") else None
            tput = fmt(main.get("throughput"), 1)
            if main.get("pct_copy_bw") is not None:
                tput += f" ({main['pct_copy_bw']:.0f}% copy)"
            notes = sorted({r["status"] for r in recs if r is not None and r["status"] != "ok"})
            rows.append([comp] + [fmt(r["ms"]) if r else "-" for r in recs]
                        + [tput, fmt(speedup, 2) + ("x" if speedup else ""), fmt(main.get("extra_mem_mb"), 1),
                           "; ".join(notes)])
        if not rows:
            continue
        params = ", ".join(f"{k}={v}" for k, v in case.items() if k != "id")
        lines += [f"## {case['id']}", "", params, ""]
        lines += [markdown_table(["competitor"] + [f"{m} ms" for m in modes]
                                 + [f"{main_mode} {metric}", "speedup", "extra mem MB", "note"], rows), ""]
    if result["skipped_cases"]:
        lines += [f"Not run (time budget): {', '.join(result['skipped_cases'])}", ""]
    failed = [c for c in result["checks"] if not c["passed"]]
    gating = [c for c in result["checks"] if c.get("gates")]
    lines += ["## Correctness (dropout 0, against the fp32 reference, relative norm error)", "",
              f"{sum(c['passed'] for c in gating)}/{len(gating)} fastroberta checks passed; "
              f"{len(failed)} checks above tolerance in total (non-fastroberta rows are context).", ""]
    rows = [[c["case"], c["competitor"], c["tensor"], fmt(c["rel_err"], 5), fmt(c["tol"], 4),
             "pass" if c["passed"] else ("FAIL" if c.get("gates") else "above tol")] for c in result["checks"]]
    lines += [markdown_table(["case", "competitor", "tensor", "rel err", "tol", ""], rows), ""]
    return "\n".join(lines)


def write_kernel_result(result, out_dir, plot=True):
    out_dir = Path(out_dir)
    write_json(result, out_dir / f"{result['bench']}.json")
    (out_dir / f"{result['bench']}.md").write_text(kernel_markdown(result))
    if plot:
        plot_kernel_result(result, out_dir / f"{result['bench']}.png")


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def plot_kernel_result(result, path):
    """Grouped bars: each competitor's fwd+bwd speedup over the baseline, per case. Skipped without matplotlib
    and in smoke mode (CPU times mean nothing). Returns the path written or None."""
    plt = _pyplot()
    if plt is None or result["environment"]["smoke"]:
        return None
    mode = "fwd+bwd" if "fwd+bwd" in result["modes"] else result["modes"][-1]
    times = {(r["case"], r["competitor"]): r["ms"] for r in result["results"] if r["mode"] == mode and r["ms"]}
    cases = [c["id"] for c in result["cases"] if (c["id"], result["baseline"]) in times]
    comps = [c for c in result["competitors"] if any((case, c) in times for case in cases)]
    if not cases or not comps:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases) * max(1, len(comps)) / 3), 4))
    width = 0.8 / len(comps)
    for i, comp in enumerate(comps):
        ys = [times[(case, result["baseline"])] / times[(case, comp)] if (case, comp) in times else 0
              for case in cases]
        ax.bar([x + i * width for x in range(len(cases))], ys, width, label=comp)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))])
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(f"{mode} speedup over {result['baseline']}")
    ax.set_title(f"{result['title']} — {result['environment']['device']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
