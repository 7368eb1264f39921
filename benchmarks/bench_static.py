"""``python -m benchmarks static``: what the compiled kernels cost on an H100, measured without a GPU.

Every kernel is compiled for sm_90 at the GPU default config of each launch the training and eval paths make
(``benchmarks/sm90.py``, mode ``static``: fp16 and bf16; attention at head dims 64 and 128 in each layout, no
mask / key mask with holes / right-padded / varlen, with dropout 0 and 0.1; LayerNorm at 768 and 1024 with a
residual, with and without dropout, without and with the preceding linear's bias (``input_bias``: the encoder
layers' launch), and the launch that sums its parameter gradients' partial rows; the two cross-entropy row
kernels at vocab 50,265; the FFN's two GEMMs with GELU epilogues at 768 x 3072). The cubin gives the
registers and stack bytes per thread, the shared memory per block, and the SASS, from which
``benchmarks/sass.py`` finds the main loop and counts the instructions one warp issues per iteration by class.
Spill stores and loads are the STL / LDL instructions of the whole kernel (``local`` counts those inside the
main loop).

Instruction counts are static: they say how much issue work an iteration costs, not how long it takes (that
also depends on latency hiding and the tensor cores). Ratios between variants of one kernel (dropout on/off,
key mask vs none) are what they are for. Writes ``static.json`` and ``static.md`` under
``benchmarks/results/sm90/`` (or ``--out``).
"""
import json
import os
import platform
import re
import subprocess
import sys
import time
from itertools import product
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import sm90
from benchmarks.tables import markdown_table

OUT_DIR = sm90.REPO / "benchmarks" / "results" / "sm90"
ATTN_KERNELS = ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")
# Targets of issue 14 (each ratio is loop instructions of one variant over another of the same kernel).
TARGETS = {"attention_dropout_ratio": 1.6, "layer_norm_dropout_ratio": 1.5, "right_padded_fwd_ratio": 1.1}


def _environment(toolchain):
    """Where and with what the report was compiled: ``toolchain`` is what the compile workers imported (their
    Triton version and folder, their ptxas), which ``--triton`` may point elsewhere than this process's."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=sm90.REPO, capture_output=True,
                                text=True).stdout.strip() or None
    except Exception:
        commit = None
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "target": "sm_90 (H100/H200)",
            "triton": toolchain.get("triton"), "triton_path": toolchain.get("triton_path"),
            "ptxas": toolchain.get("ptxas"), "git_commit": commit, "host": platform.machine()}


def _row(r):
    s = r["sass"]
    opcodes = s["opcodes"]
    return {"kernel": r["group"], "dtype": r["dtype"], "case": r["label"], "config": r.get("config", {}),
            "num_warps": r["num_warps"], "num_stages": r.get("num_stages"), "registers": r["regs"],
            "stack_bytes": r["stack"], "shared_bytes": r["shared"], "enable_fp_fusion": r.get("enable_fp_fusion"),
            "spill_stores": s["spill_stores"], "spill_loads": s["spill_loads"],
            "counted": s["counted"], "loop_instructions": s["instructions"], "classes": s["classes"],
            "inner_branches": s["inner_branches"], "loops": len(s["loops"]),
            "mma_loops": sorted(lp["instructions"] for lp in s["loops"] if lp["classes"]["mma"] > 0),
            "total_instructions": s["total_instructions"],
            "loads_16bit": sum(n for op, n in opcodes.items() if op.startswith("LDG") and op.endswith(".U16")),
            "opcodes": opcodes, "compile_seconds": r["seconds"]}


def _find(rows, kernel, dtype, case_prefix):
    for r in rows:
        if r["kernel"] == kernel and r["dtype"] == dtype and r["case"] == case_prefix:
            return r
    return None


def ratios(rows):
    """The target ratios, one row per (kernel, dtype, head dim / width)."""
    out = []
    for dtype in ("fp16", "bf16"):
        for d in (64, 128):
            for kernel in ATTN_KERNELS:
                for layout in sm90.LAYOUTS:
                    off = _find(rows, kernel, dtype, f"D={d} {layout} dropout=0")
                    on = _find(rows, kernel, dtype, f"D={d} {layout} dropout=1")
                    if off and on:
                        out.append({"what": "attention dropout", "kernel": kernel, "dtype": dtype,
                                    "case": f"D={d} {layout}", "base": off["loop_instructions"],
                                    "variant": on["loop_instructions"],
                                    "ratio": round(on["loop_instructions"] / off["loop_instructions"], 3),
                                    "target": TARGETS["attention_dropout_ratio"]})
                # The key-mask kernel also holds the loop its prefix (right-padded) rows take: its smallest
                # tensor-core loop. That is what a right-padded batch runs when passed as a mask.
                base = _find(rows, kernel, dtype, f"D={d} nomask dropout=0")
                masked = _find(rows, kernel, dtype, f"D={d} mask dropout=0")
                if base and masked and len(masked.get("mma_loops", [])) > 1:
                    out.append({"what": "mask kernel, prefix-row loop vs no mask", "kernel": kernel, "dtype": dtype,
                                "case": f"D={d}", "base": base["loop_instructions"],
                                "variant": masked["mma_loops"][0],
                                "ratio": round(masked["mma_loops"][0] / base["loop_instructions"], 3),
                                "target": TARGETS["right_padded_fwd_ratio"] if kernel == "attn_fwd" else None})
                for layout in ("mask", "right_padded", "varlen"):
                    base = _find(rows, kernel, dtype, f"D={d} nomask dropout=0")
                    var = _find(rows, kernel, dtype, f"D={d} {layout} dropout=0")
                    if base and var:
                        target = TARGETS["right_padded_fwd_ratio"] if (layout, kernel) == ("right_padded",
                                                                                          "attn_fwd") else None
                        out.append({"what": f"{layout} vs no mask", "kernel": kernel, "dtype": dtype,
                                    "case": f"D={d}", "base": base["loop_instructions"],
                                    "variant": var["loop_instructions"],
                                    "ratio": round(var["loop_instructions"] / base["loop_instructions"], 3),
                                    "target": target})
        for n in (768, 1024):
            for kernel, suffix in product(("layer_norm_fwd", "layer_norm_bwd"), ("", " input_bias=1")):
                off = _find(rows, kernel, dtype, f"N={n} residual=1 dropout=0{suffix}")
                on = _find(rows, kernel, dtype, f"N={n} residual=1 dropout=1{suffix}")
                if off and on:
                    out.append({"what": "layer norm dropout", "kernel": kernel, "dtype": dtype,
                                "case": f"N={n}{suffix}",
                                "base": off["loop_instructions"], "variant": on["loop_instructions"],
                                "ratio": round(on["loop_instructions"] / off["loop_instructions"], 3),
                                "target": TARGETS["layer_norm_dropout_ratio"]})
    return out


def verdicts(rows, ratio_rows):
    """Each target: (name, met, detail)."""
    out = []
    for what, key in (("attention dropout", "attention_dropout_ratio"), ("layer norm dropout",
                                                                         "layer_norm_dropout_ratio")):
        rs = [r for r in ratio_rows if r["what"] == what]
        worst = max(rs, key=lambda r: r["ratio"]) if rs else None
        out.append((f"{what}: loop with dropout <= {TARGETS[key]}x without",
                    bool(rs) and worst["ratio"] <= TARGETS[key],
                    f"worst {worst['ratio']}x ({worst['kernel']} {worst['dtype']} {worst['case']})" if worst else "-"))
    rp = [r for r in ratio_rows if r["kernel"] == "attn_fwd" and r["what"] in (
        "right_padded vs no mask", "mask kernel, prefix-row loop vs no mask")]
    worst = max(rp, key=lambda r: r["ratio"]) if rp else None
    out.append((f"right-padded forward loop <= {TARGETS['right_padded_fwd_ratio']}x the no-mask loop",
                bool(rp) and worst["ratio"] <= TARGETS["right_padded_fwd_ratio"],
                f"worst {worst['ratio']}x ({worst['dtype']} {worst['case']})" if worst else "-"))
    in_loop = [r for r in rows if r["counted"] == "main loop" and r["classes"]["local"] > 0]
    out.append(("no local-memory load or store in any main loop", not in_loop,
                ", ".join(f"{r['kernel']} {r['dtype']} {r['case']}: {r['classes']['local']}" for r in in_loop)
                or "none"))
    ce = [r for r in rows if r["kernel"].startswith("ce_")]
    narrow = [r for r in ce if r["loads_16bit"]]
    out.append(("cross-entropy row loop: no 2-byte loads", bool(ce) and not narrow,
                ", ".join(f"{r['kernel']} {r['dtype']}: {r['loads_16bit']} LDG.U16" for r in narrow) or "none"))
    return out


def _classes_cell(c):
    return " / ".join(str(c[k]) for k in ("mma", "int", "float", "memory", "local"))


def _triton_comparison(result, other):
    """Markdown lines comparing this report with ``other``, the same kernels compiled by another Triton version:
    the kernels whose stack, spills or main-loop local-memory traffic differ (in a table), the spread of the
    main-loop instruction counts, and the other version's targets."""
    this_v, other_v = result["environment"]["triton"], other["environment"]["triton"]
    table, ratios = [], []
    for r in result["rows"]:
        o = _find(other["rows"], r["kernel"], r["dtype"], r["case"])
        if o is None:
            continue
        if r["loop_instructions"]:
            ratios.append(o["loop_instructions"] / r["loop_instructions"])
        if any(r[k] != o[k] for k in ("stack_bytes", "spill_stores", "spill_loads")) \
                or r["classes"]["local"] != o["classes"]["local"]:
            table.append((r["kernel"], r["dtype"], r["case"],
                          *(f"{r[k]} / {o[k]}" for k in ("registers", "stack_bytes", "spill_stores", "spill_loads")),
                          f"{r['classes']['local']} / {o['classes']['local']}",
                          f"{r['loop_instructions']} / {o['loop_instructions']}"))
    ratios.sort()
    lines = ["", f"## Triton {this_v} vs {other_v}", "",
             f"The same kernels compiled by Triton {other_v} ({other['environment']['ptxas'] or 'ptxas'}, commit "
             f"`{other['environment']['git_commit']}`; its full report sits beside this one in "
             f"`triton-{other_v.rsplit('.', 1)[0]}/static.md`): {len(ratios)} kernels compared."]
    if ratios:
        lines[-1] += (f" Main-loop instructions under {other_v} / under {this_v}: median "
                      f"{ratios[len(ratios) // 2]:.2f}x, from {ratios[0]:.2f}x to {ratios[-1]:.2f}x.")
    lines += ["", f"Targets under {other_v}: " + "; ".join(
        f"{name}: {'yes' if ok else 'NO'} ({detail})" for name, ok, detail in other.get("verdicts", [])) + ".", ""]
    if table:
        lines += [f"Where stack or spills differ (each cell: {this_v} / {other_v}):", "",
                  markdown_table(["kernel", "dtype", "case", "regs", "stack B", "spill st", "spill ld",
                                  "local in loop", "loop instr"], table)]
    else:
        lines.append("Stack and spills are the same under both versions.")
    return lines


def markdown(result, baseline=None, other=None):
    rows, env = result["rows"], result["environment"]
    lines = ["# Static sm_90 report: registers, spills and SASS per main-loop iteration", "",
             f"Compiled for {env['target']} without a GPU · triton {env['triton']} · {env['ptxas'] or 'ptxas'} · "
             f"commit `{env['git_commit']}` · {env['date']}" + (" · FP fusion (FMA contraction) on in every kernel"
             if rows and all(r.get("enable_fp_fusion") for r in rows) else ""), "",
             "Instructions are SASS instructions one warp issues per iteration of the kernel's main loop (the "
             "whole kernel for loop-free kernels: LayerNorm forward, attention preprocess). Classes: tensor-core "
             "MMA / integer / float / memory / local (LDL+STL). Spills: STL / LDL in the whole kernel. "
             "`python -m benchmarks static` regenerates this file; see benchmarks/bench_static.py.", "",
             "## Targets (issue 14)", ""]
    lines.append(markdown_table(["target", "met", "detail"],
                                [(n, "yes" if ok else "**no**", d) for n, ok, d in result["verdicts"]]))
    lines += ["", "## Ratios", ""]
    lines.append(markdown_table(["what", "kernel", "dtype", "case", "base", "variant", "ratio", "target"],
                                [(r["what"], r["kernel"], r["dtype"], r["case"], r["base"], r["variant"],
                                  f"{r['ratio']:.2f}x", f"<= {r['target']}x" if r["target"] else "")
                                 for r in result["ratios"]]))
    if baseline:
        lines += ["", f"## Before and after (baseline commit `{baseline['environment']['git_commit']}`)", "",
                  "Main-loop instructions per warp (registers, stack bytes) of the baseline and of this build.", ""]
        table = []
        for r in rows:
            b = _find(baseline["rows"], r["kernel"], r["dtype"], r["case"])
            if b is None:
                continue
            table.append((r["kernel"], r["dtype"], r["case"],
                          f"{b['loop_instructions']} ({b['registers']}, {b['stack_bytes']})",
                          f"{r['loop_instructions']} ({r['registers']}, {r['stack_bytes']})",
                          f"{r['loop_instructions'] / b['loop_instructions']:.2f}x"))
        lines.append(markdown_table(["kernel", "dtype", "case", "before", "after", "after/before"], table))
    if other:
        lines += _triton_comparison(result, other)
    lines += ["", "## Every kernel", ""]
    lines.append(markdown_table(
        ["kernel", "dtype", "case", "config", "warps", "regs", "stack B", "shared B", "spill st/ld", "counted",
         "instr", "mma/int/float/mem/local"],
        [(r["kernel"], r["dtype"], r["case"], " ".join(f"{k}={v}" for k, v in r["config"].items()),
          r["num_warps"], r["registers"], r["stack_bytes"], r["shared_bytes"],
          f"{r['spill_stores']}/{r['spill_loads']}", r["counted"], r["loop_instructions"],
          _classes_cell(r["classes"])) for r in rows]))
    return "\n".join(lines) + "\n"


class NoMatch(ValueError):
    """--only selects no case (or is not a regular expression)."""


def run(out_dir=OUT_DIR, only=None, workers=None, baseline=None, timeout_s=4 * 3600, triton_site=None, compare=None):
    """Compile, analyse, write static.json and static.md; returns the result dict. ``triton_site``: compile
    with the Triton installed there (``sm90.run_workers``); ``compare``: a static.json made with another Triton
    version, whose differences static.md lists."""
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    if only is not None:
        try:
            re.compile(only)
        except re.error as e:
            raise NoMatch(f"--only {only!r} is not a regular expression ({e})") from None
    start = time.monotonic()
    toolchain = {}
    results, _ = sm90.run_workers("static", workers, timeout_s, only=only, triton_site=triton_site,
                                  toolchain=toolchain)
    if only is not None and not results:  # before anything is written: the committed report stays as it is
        raise NoMatch(f"--only {only!r} matches no kernel case; cases read 'kernel dtype case', e.g. "
                      "'attn_fwd fp16 D=64' or 'layer_norm_bwd fp16 N=768' (see static.md)")
    failed = [r for r in results if not r["ok"]]
    rows = [_row(r) for r in results if r["ok"]]
    ratio_rows = ratios(rows)
    result = {"environment": _environment(toolchain), "seconds": round(time.monotonic() - start, 1),
              "failed": [{k: r[k] for k in ("group", "dtype", "label", "error")} for r in failed],
              "rows": rows, "ratios": ratio_rows, "verdicts": verdicts(rows, ratio_rows),
              "targets": TARGETS}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "static.json").write_text(json.dumps(result, indent=1) + "\n")
    base = json.loads(Path(baseline).read_text()) if baseline else None
    other = json.loads(Path(compare).read_text()) if compare else None
    (out_dir / "static.md").write_text(markdown(result, base, other))
    return result


def add_arguments(p):
    p.add_argument("--out", default=str(OUT_DIR), help="folder for static.json and static.md "
                   "(default benchmarks/results/sm90)")
    p.add_argument("--only", help="regular expression over 'kernel dtype case' (e.g. 'attn_fwd fp16 D=64')")
    p.add_argument("--workers", type=int, help="compile processes (default: 2, or 1 on one core)")
    p.add_argument("--baseline", help="an earlier static.json: adds a before/after table to static.md")
    p.add_argument("--triton", metavar="DIR", help="compile with the Triton installed in DIR (e.g. pip install "
                   "--target DIR triton==3.6.0 'numpy<2.4') instead of this environment's; the report records "
                   "which version compiled it")
    p.add_argument("--compare", metavar="STATIC_JSON", help="a static.json from another Triton version: "
                   "static.md lists the kernels whose registers, stack, spills or loop instructions differ")


def main_from_args(args):
    site = getattr(args, "triton", None)
    if site and not (Path(site) / "triton" / "__init__.py").is_file():
        print(f"static: --triton {site}: no Triton there (expected {Path(site) / 'triton' / '__init__.py'}; "
              f"pip install --target {site} triton==VERSION)", file=sys.stderr)
        return False
    try:
        result = run(args.out, only=args.only, workers=args.workers, baseline=args.baseline,
                     triton_site=getattr(args, "triton", None), compare=getattr(args, "compare", None))
    except sm90.Unavailable as e:
        print(f"static: cannot compile for sm_90 on this machine: {e}", file=sys.stderr)
        return False
    except NoMatch as e:
        print(f"static: error: {e}", file=sys.stderr)
        return False
    for name, ok, detail in result["verdicts"]:
        print(f"[{'ok' if ok else 'MISSED'}] {name}: {detail}")
    for f in result["failed"]:
        print(f"FAILED to compile: {f['group']} {f['dtype']} {f['label']}\n{f['error']}", file=sys.stderr)
    print(f"static: {len(result['rows'])} kernels compiled by Triton {result['environment']['triton']} in "
          f"{result['seconds']} s; written to "
          f"{args.out}/static.{{json,md}}")
    return not result["failed"]
