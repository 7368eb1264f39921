"""The results summary: the issues' targets checked against committed measurements.

    python -m benchmarks report                         # benchmarks/results/SUMMARY.md
    python -m benchmarks report --readme README.md      # also the README section between the markers
    python -m benchmarks report --results DIR --print   # print the targets table (the GPU check does this)

Reads ``<results>/<device>/{layer_norm,attention,cross_entropy,e2e,train}.json`` (smoke output is ignored) and
writes one section per device: the targets table (value measured, target, met or not), then links to each
benchmark's Markdown table and plot. The targets were set for an H100; on another device they are evaluated
the same way and marked as such. The README section sits between ``<!-- benchmarks:begin -->`` and
``<!-- benchmarks:end -->`` and is rewritten whole; a README without the markers is left alone.
"""
import argparse
import json
import os
from pathlib import Path

from benchmarks.tables import env_line, markdown_table, text_table

REPO = Path(__file__).resolve().parent.parent
RESULTS_ROOT = REPO / "benchmarks" / "results"
BENCHES = ("layer_norm", "attention", "cross_entropy", "e2e", "train")
README_BEGIN, README_END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
TARGET_DEVICE = "H100"


def add_arguments(p):
    p.add_argument("--results", default=str(RESULTS_ROOT), help="results root (default benchmarks/results)")
    p.add_argument("--summary", default=None, help="where SUMMARY.md goes (default <results>/SUMMARY.md)")
    p.add_argument("--readme", default=None, help="README whose benchmarks section is regenerated")
    p.add_argument("--print", dest="print_table", action="store_true", help="print the targets table(s)")
    p.add_argument("--include-smoke", action="store_true", help=argparse.SUPPRESS)  # for tests of the report


def load_device_results(results_root, include_smoke=False):
    """{device_dir: {bench: result}} for every device folder holding at least one result."""
    devices = {}
    root = Path(results_root)
    if not root.is_dir():
        return devices
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        found = {}
        for bench in BENCHES:
            path = sub / f"{bench}.json"
            if path.exists():
                data = json.loads(path.read_text())
                if data.get("environment", {}).get("smoke") and not include_smoke:
                    continue
                found[bench] = data
        if found:
            devices[sub] = found
    return devices


# -------------------------------------------------------------------------------------------------- targets
def _rows(result, **where):
    return [r for r in result["results"] if all(r.get(k) == v for k, v in where.items())]


def _case_params(result):
    return {c["id"]: c for c in result["cases"]}


def _ms(result, case, competitor, mode):
    rows = _rows(result, case=case, competitor=competitor, mode=mode)
    return rows[0]["ms"] if rows and rows[0].get("ms") else None


def _field(result, case, competitor, mode, name):
    rows = _rows(result, case=case, competitor=competitor, mode=mode)
    return rows[0].get(name) if rows else None


def _worst(pairs):
    """(min value, case id) over (value, case) pairs with a value; (None, None) if none."""
    pairs = [(v, c) for v, c in pairs if v is not None]
    return min(pairs) if pairs else (None, None)


def _target(name, value, goal, unit="x", where=None, note=""):
    met = None if value is None else value >= goal
    shown = "-" if value is None else (f"{value:.1f}%" if unit == "%" else f"{value:.2f}{unit}")
    goal_shown = f"≥ {goal:.0f}%" if unit == "%" else f"≥ {goal:g}{unit}"
    return {"target": name, "measured": shown, "goal": goal_shown, "met": met, "where": where or "",
            "note": note}


def _speedups(result, cases, ours, other, mode="fwd+bwd"):
    out = []
    for case in cases:
        a, b = _ms(result, case, ours, mode), _ms(result, case, other, mode)
        out.append((b / a if a and b else None, case))
    return out


def layer_norm_targets(res):
    cases = [c["id"] for c in res["cases"]]
    speed, where = _worst(_speedups(res, cases, "fastroberta", "eager"))
    bw, bw_where = _worst([(_field(res, c, "fastroberta", "fwd+bwd", "pct_copy_bw"), c) for c in cases])
    return [_target("LayerNorm fwd+bwd vs eager (worst case)", speed, 1.5, where=where),
            _target("LayerNorm fwd+bwd share of copy bandwidth (worst case)", bw, 70, unit="%", where=bw_where)]


def attention_targets(res):
    params = _case_params(res)
    sel = [c for c, p in params.items() if p.get("seqlen") == 512 and p.get("head_dim") == 64
           and p.get("dtype") == "fp16" and not p.get("dropout_p")]
    no_pad = [c for c in sel if not params[c].get("pad")]
    half_pad = [c for c in sel if params[c].get("pad") == 0.5]
    eager, e_where = _worst(_speedups(res, sel, "fastroberta", "eager"))
    sdpa, s_where = _worst(_speedups(res, sel, "fastroberta", "sdpa-mask"))
    tflops, t_where = _worst([(_field(res, c, "fastroberta", "fwd", "throughput"), c) for c in no_pad])
    varlen, v_where = _worst(_speedups(res, half_pad, "fastroberta-varlen", "fastroberta"))
    return [_target("Attention L512 fp16 fwd+bwd vs eager", eager, 3.0, where=e_where),
            _target("Attention L512 fp16 fwd+bwd vs SDPA with mask", sdpa, 1.0, where=s_where),
            _target("Attention L512 fp16 forward TFLOP/s (no padding)", tflops, 250, unit=" TFLOP/s",
                    where=t_where),
            _target("Attention varlen vs padded at 50% padding (fwd+bwd)", varlen, 1.6, where=v_where)]


def cross_entropy_targets(res):
    cases = [c["id"] for c in res["cases"]]

    def mem_ratio(other):
        out = []
        for c in cases:
            a = _field(res, c, "fastroberta", "fwd+bwd", "extra_mem_mb")
            b = _field(res, c, other, "fwd+bwd", "extra_mem_mb")
            out.append((b / a if a and b else None, c))
        return _worst(out)
    full, f_where = _worst(_speedups(res, cases, "fastroberta", "eager-full"))
    lab, l_where = _worst(_speedups(res, cases, "fastroberta", "eager-labelled"))
    full_mem, fm_where = mem_ratio("eager-full")
    lab_mem, lm_where = mem_ratio("eager-labelled")
    return [_target("MLM CE fwd+bwd vs eager full logits", full, 5.0, where=f_where),
            _target("MLM CE peak memory, less than eager full logits", full_mem, 8.0, where=fm_where),
            _target("MLM CE fwd+bwd vs eager labelled rows", lab, 1.3, where=l_where),
            _target("MLM CE peak memory, less than eager labelled rows", lab_mem, 2.0, where=lm_where)]


def e2e_targets(res):
    rows = {r["competitor"]: r for r in res["results"] if r.get("task", "mlm") == "mlm"
            and r["model"] == "base" and r["seq_len"] == 512 and r["precision"] == "fp16"}
    ours = rows.get("fastroberta-triton", {})

    def tps_ratio(other):
        a, b = ours.get("tokens_per_s"), rows.get(other, {}).get("tokens_per_s")
        return a / b if a and b else None
    mfu = ours.get("mfu")
    a_search = ours.get("max_batch_search")
    b_search = rows.get("hf-eager", {}).get("max_batch_search")
    batch_ratio, note = None, ""
    if a_search and b_search and b_search["max_micro_batch"]:
        batch_ratio = a_search["max_micro_batch"] / b_search["max_micro_batch"]
        note = f"{a_search['max_micro_batch']} vs {b_search['max_micro_batch']}"
        if not b_search["exact"]:
            note += " (hf-eager's is a lower bound: ratio uncertain)"
        elif not a_search["exact"]:
            note += " (fastroberta's is a lower bound)"
    where = "base, seq 512, fp16"
    return [_target("Training tokens/s vs HF eager", tps_ratio("hf-eager"), 2.0, where=where),
            _target("Training tokens/s vs HF SDPA", tps_ratio("hf-sdpa"), 1.3, where=where),
            _target("Training MFU", 100 * mfu if mfu else None, 45, unit="%", where=where),
            _target("Largest micro-batch at seq 512 vs HF eager", batch_ratio, 2.0, where=where, note=note)] \
        + finetune_rows(res)


def finetune_rows(res):
    """The fine-tuning steps against transformers' classifier and question-answering model: measured, no target
    set yet."""
    out = []
    for task, what in (("finetune", "Fine-tuning"), ("qa", "QA fine-tuning")):
        rows = {r["competitor"]: r for r in res["results"] if r.get("task") == task and r["model"] == "base"
                and r["precision"] == "fp16"}
        if not rows:
            continue
        ours = rows.get("fastroberta-triton", {}).get("tokens_per_s")
        r = next(iter(rows.values()))
        for other in ("hf-eager", "hf-sdpa"):
            theirs = rows.get(other, {}).get("tokens_per_s")
            out.append({"target": f"{what} tokens/s vs HF {other[3:]} (no target)",
                        "measured": f"{ours / theirs:.2f}x" if ours and theirs else "-", "goal": "", "met": None,
                        "where": f"base, seq {r['seq_len']}, batch {r['micro_batch']}, fp16, padded", "note": ""})
    return out


def train_targets(res):
    c = res.get("comparison") or {}
    t = {"target": "Trainer loss curves Triton vs torch within "
                   f"{100 * c.get('tolerance', 0.01):.0f}% (mean and final)",
         "measured": "-" if not c.get("windows") else
         f"mean {100 * c['mean_rel_diff']:.2f}%, final {100 * c['final_rel_diff']:.2f}%",
         "goal": f"≤ {100 * c.get('tolerance', 0.01):.0f}%", "met": res.get("passed") if c.get("windows") else None,
         "where": f"{res['settings']['model']}, seq {res['settings']['seq_len']}, {res['settings']['precision']}, "
                  f"{c.get('steps', res['settings']['steps'])} steps",
         "note": ""}
    ratio = c.get("tokens_per_s_ratio")
    info = {"target": "Trainer tokens/s Triton vs torch kernels (no target)",
            "measured": f"{ratio:.2f}x" if ratio else "-", "goal": "", "met": None, "where": t["where"], "note": ""}
    return [t, info]


def correctness_target(results):
    checks = [c for b in ("layer_norm", "attention", "cross_entropy") if b in results
              for c in results[b]["checks"] if c.get("gates")]
    if not checks:
        return []
    failed = [c for c in checks if not c["passed"]]
    where = "; ".join(f"{c['case']} {c['competitor']} {c['tensor']}" for c in failed[:3])
    return [{"target": "Kernel outputs and gradients match the fp32 reference", "goal": "all",
             "measured": f"{len(checks) - len(failed)}/{len(checks)}", "met": not failed, "where": where,
             "note": ""}]


def targets(results):
    """Every target row that the available results allow."""
    rows = correctness_target(results)
    for bench, fn in (("layer_norm", layer_norm_targets), ("attention", attention_targets),
                      ("cross_entropy", cross_entropy_targets), ("e2e", e2e_targets), ("train", train_targets)):
        if bench in results:
            rows += fn(results[bench])
    return rows


def _met(value):
    return {True: "yes", False: "**no**", None: "-"}[value]


def targets_markdown(rows):
    return markdown_table(["target", "measured", "goal", "met", "where / note"],
                          [[r["target"], r["measured"], r["goal"], _met(r["met"]),
                            "; ".join(x for x in (r["where"], r["note"]) if x)] for r in rows])


# ---------------------------------------------------------------------------------------------- documents
def _environment(results):
    return next(iter(results.values()))["environment"]


def device_section(device_dir, results, relative_to):
    env = _environment(results)
    rel = os.path.relpath(device_dir, relative_to)
    on_target = TARGET_DEVICE in env["device"]
    lines = [f"## {env['device']}", "", env_line(env), ""]
    if not on_target:
        lines += [f"The targets were set for an {TARGET_DEVICE}; this device is measured against them as is.", ""]
    lines += [targets_markdown(targets(results)), ""]
    links = [f"[{b}]({rel}/{b}.md)" for b in BENCHES if b in results]
    lines += ["Full tables: " + " · ".join(links), ""]
    for b in BENCHES:
        if b in results and (device_dir / f"{b}.png").exists():
            lines += [f"![{b}]({rel}/{b}.png)", ""]
    incomplete = [b for b in ("layer_norm", "attention", "cross_entropy", "e2e")
                  if b in results and not results[b].get("complete", True)]
    if incomplete:
        lines += [f"Cut short by the time budget: {', '.join(incomplete)} (see their tables).", ""]
    return "\n".join(lines)


def summary_markdown(devices, relative_to):
    lines = ["# Benchmark results", "",
             "Generated by `python -m benchmarks report` from the JSON files beside it — do not edit by hand. "
             "How to produce them: `benchmarks/results/README.md`.", ""]
    if not devices:
        lines += ["No GPU results are committed yet. Run `bash benchmarks/gpu_check.sh` on a GPU "
                  "(CONTRIBUTING.md) and commit its `benchmarks/results/<device>/` folder.", ""]
    for device_dir, results in devices.items():
        lines.append(device_section(device_dir, results, relative_to))
    return "\n".join(lines)


def readme_section(devices, readme_dir, summary_path):
    rel_summary = os.path.relpath(summary_path, readme_dir)
    if not devices:
        return (f"No GPU measurements are committed yet; `bash benchmarks/gpu_check.sh` produces them "
                f"(see [{rel_summary}]({rel_summary})).")
    # The newest measurement leads; the summary holds every device.
    device_dir, results = max(devices.items(), key=lambda kv: _environment(kv[1])["date"])
    env = _environment(results)
    rel = os.path.relpath(device_dir, readme_dir)
    lines = [f"Measured on {env['device']}, {env['date'][:10]}, commit `{env['git_commit'][:12]}` "
             f"(torch {env['torch']}, triton {env['triton']}, deepspeed {env['deepspeed']}).", "",
             targets_markdown(targets(results)), ""]
    for b in ("e2e", "attention"):
        if (device_dir / f"{b}.png").exists():
            lines += [f"![{b}]({rel}/{b}.png)", ""]
    lines.append(f"All devices and full tables: [{rel_summary}]({rel_summary}).")
    return "\n".join(lines)


def update_readme(readme_path, section):
    """Replace the text between the markers; returns False when the README has no markers."""
    text = Path(readme_path).read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    Path(readme_path).write_text(f"{head}{README_BEGIN}\n{section}\n{README_END}{tail}")
    return True


def print_tables(devices):
    for device_dir, results in devices.items():
        env = _environment(results)
        print(f"\n{env['device']} · {env['date']} · commit {env['git_commit']} · {device_dir}")
        print(text_table(["target", "measured", "goal", "met", "where / note"],
                         [[r["target"], r["measured"], r["goal"], {True: "yes", False: "NO", None: "-"}[r["met"]],
                           "; ".join(x for x in (r["where"], r["note"]) if x)] for r in targets(results)]))


def main_from_args(args):
    root = Path(args.results)
    devices = load_device_results(root, include_smoke=args.include_smoke)
    summary = Path(args.summary) if args.summary else root / "SUMMARY.md"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(summary_markdown(devices, summary.parent))
    print(f"wrote {summary} ({len(devices)} device(s))")
    if args.readme:
        readme = Path(args.readme)
        if update_readme(readme, readme_section(devices, readme.resolve().parent, summary.resolve())):
            print(f"updated the benchmarks section of {readme}")
        else:
            print(f"{readme} has no {README_BEGIN} / {README_END} markers: left unchanged")
    if args.print_table:
        print_tables(devices)
    return True
