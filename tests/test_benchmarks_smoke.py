"""The benchmark suite's smoke mode, as CI runs it on CPU: the harness end to end on tiny shapes through the
Triton interpreter (every fastroberta op checked against the fp32 reference on the benchmark inputs), the
end-to-end step through DeepSpeed, the report's target arithmetic, the trainer A/B comparison, and the GPU
check script's syntax. No timing here is a performance result, and none is asserted."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the repo, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import __main__ as cli  # noqa: E402
from benchmarks import bench_e2e, harness, report, train_check  # noqa: E402

ENV_KEYS = ("date", "device", "device_slug", "torch", "triton", "deepspeed", "git_commit", "source_digest", "smoke",
            "label", "copy_bandwidth_gbps")
KERNEL_BENCHES = {"layer_norm": ("x", "residual", "weight", "bias"), "attention": ("qkv",),
                  "cross_entropy": ("hidden", "weight", "bias")}


@pytest.fixture(scope="module")
def kernel_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = cli.build_parser().parse_args(["kernels", "--smoke", "--out", str(out)])
    ok = cli.run_kernels(args)
    return ok, out / harness.device_slug()


def test_kernel_smoke_runs_and_fastroberta_matches_the_reference(kernel_smoke):
    ok, out = kernel_smoke
    assert ok
    for bench, leaves in KERNEL_BENCHES.items():
        result = json.loads((out / f"{bench}.json").read_text())
        env = result["environment"]
        assert all(k in env for k in ENV_KEYS)
        assert env["smoke"] is True and result["label"] == harness.SMOKE_LABEL
        assert result["complete"] and result["cases"]
        # Every fastroberta row ran in every mode and has a positive time and a throughput.
        ours = [r for r in result["results"] if r["competitor"].startswith("fastroberta")]
        assert {r["mode"] for r in ours} == set(result["modes"])
        assert all(r["status"] == "ok" and r["ms"] > 0 and r["throughput"] > 0 for r in ours)
        # The eager baseline ran too, so speedups exist.
        assert any(r["competitor"] == result["baseline"] and r["ms"] for r in result["results"])
        # Correctness: output and every input gradient, for each fastroberta competitor and case.
        gating = [c for c in result["checks"] if c["gates"]]
        for comp in {r["competitor"] for r in ours}:
            tensors = {c["tensor"] for c in gating if c["competitor"] == comp}
            expected = {"out"} | {f"grad {n}" for n in (("q", "k", "v") if comp.endswith("varlen") else leaves)}
            assert tensors == expected, (bench, comp, tensors)
        assert all(c["passed"] and c["rel_err"] <= c["tol"] for c in gating)
        # Competitors that are absent here are reported with the reason, not silently dropped.
        for name, status in result["competitors"].items():
            assert status == "available" or status.startswith(("not installed", "skipped"))
            rows = [r for r in result["results"] if r["competitor"] == name]
            if status != "available":
                assert all(r["status"] == status and r["ms"] is None for r in rows)
        md = (out / f"{bench}.md").read_text()
        assert harness.SMOKE_LABEL in md and "| competitor |" in md and "Correctness" in md
        assert not (out / f"{bench}.png").exists()  # CPU times are never plotted


def test_smoke_output_is_refused_among_committed_results():
    env = {"smoke": True, "device_slug": "cpu-smoke"}
    with pytest.raises(ValueError, match="not performance results"):
        harness.results_dir(harness.RESULTS_ROOT, env)


def _child_env():
    """This process's environment for a benchmark child, without the MASTER_PORT that an in-process DeepSpeed
    run of an earlier test (the trainer's, test_compile's) left behind with its port still bound: the child
    picks a free port of its own."""
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    return {**env, "PYTHONPATH": str(REPO)}


def test_e2e_smoke_step_through_deepspeed(tmp_path):
    """The end-to-end harness on a micro model (fp32, CPU, DeepSpeed ZeRO-2), in its own process as on a GPU:
    the pretraining step on packed text and the fine-tuning step on padded classification batches."""
    cmd = [sys.executable, "-m", "benchmarks", "e2e", "--smoke", "--competitors", "fastroberta-torch,hf-sdpa",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=_child_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / harness.device_slug() / "e2e.json").read_text())
    assert result["label"] == harness.SMOKE_LABEL and result["complete"]
    rows = {(r["task"], r["competitor"]): r for r in result["results"]}
    assert set(rows) == {(t, c) for t in ("mlm", "finetune", "qa") for c in ("fastroberta-torch", "hf-sdpa")}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and math.isfinite(r["loss_last"])
    for comp in ("fastroberta-torch", "hf-sdpa"):
        mlm, ft = rows["mlm", comp], rows["finetune", comp]
        assert mlm["real_tokens_per_step"] == mlm["micro_batch"] * mlm["seq_len"]  # packed: no padding
        # Fine-tuning batches are padded (lengths in [seq/4, seq]), and tokens/s counts the real tokens.
        assert (ft["seq_len"], ft["micro_batch"]) == bench_e2e.FINETUNE_SMOKE_SHAPE
        assert ft["micro_batch"] * ft["seq_len"] // 4 <= ft["real_tokens_per_step"] < ft["micro_batch"] * ft["seq_len"]
        # A fresh head starts near the loss of a uniform guess: ln V for MLM, ln 2 for two labels.
        assert abs(mlm["loss_first"] - math.log(1000)) < 0.5
        assert abs(ft["loss_first"] - math.log(2)) < 0.3
        # Question answering: start and end over the row's positions, a uniform guess is ln(length) for each.
        qa = rows["qa", comp]
        assert (qa["seq_len"], qa["micro_batch"]) == bench_e2e.QA_SMOKE_SHAPE
        assert qa["real_tokens_per_step"] < qa["micro_batch"] * qa["seq_len"]
        assert math.log(qa["seq_len"] / 4) - 0.3 < qa["loss_first"] < math.log(qa["seq_len"]) + 0.3
    md = (tmp_path / harness.device_slug() / "e2e.md").read_text()
    assert "| fastroberta-torch |" in md and "## fine-tuning (sequence classification" in md
    assert "## fine-tuning (question answering" in md
    # The console: the smoke banner before the first figure, and the figures labelled as smoke.
    banner = proc.stdout.find("SMOKE RUN: a correctness check, NOT a performance result")
    first_figure = proc.stdout.find("smoke tok/s")
    assert 0 <= banner < first_figure, proc.stdout[:2000]
    assert " tokens/s" not in proc.stdout.replace("smoke tok/s", "")


def test_qa_batch_positions_lie_inside_each_rows_real_tokens():
    """The QA step's synthetic batch: padded rows, and a start <= end between <s> and </s> of each row."""
    import torch
    batch = bench_e2e.task_batch("qa", 64, 48, 1000, torch.device("cpu"))
    assert set(batch) == {"input_ids", "attention_mask", "start_positions", "end_positions"}
    lengths = batch["attention_mask"].sum(dim=1)
    start, end = batch["start_positions"], batch["end_positions"]
    assert (lengths < 48).any() and bool((1 <= start).all() and (start <= end).all() and (end <= lengths - 2).all())
    assert len(set(start.tolist())) > 10  # spread over the rows, not one position


def test_kernel_console_output_opens_with_the_smoke_banner(tmp_path, capsys):
    """`python -m benchmarks kernels` on CPU: the banner comes before any time, and times read 'smoke ms'."""
    status = cli.main(["kernels", "--smoke", "--only", "layer_norm", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0
    banner = out.find(harness.SMOKE_BANNER.splitlines()[1])
    first_time = out.find(" smoke ms")
    assert 0 <= banner < first_time, out[:2000]
    assert " ms," not in out.replace("smoke ms,", "") and "columns:" in out


def test_pytest_benchmark_session_header_says_smoke():
    """`pytest benchmarks/ --benchmark-only` on CPU: the session header carries the banner."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_conftest", REPO / "benchmarks" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    header = conftest.pytest_report_header(None)
    assert header and "NOT a performance result" in "\n".join(header)


# ------------------------------------------------------------------------------------------ the report
def _env(device="NVIDIA H100 80GB HBM3", smoke=False):
    return {"date": "2026-11-27T00:00:00+00:00", "smoke": smoke, "label": "x", "device": device,
            "device_slug": harness.slug(device), "torch": "2.11", "triton": "3.6", "deepspeed": "0.19.8",
            "git_commit": "abc123", "source_digest": "d", "copy_bandwidth_gbps": 3000.0}


def _kernel(bench, cases, rows, checks=(), baseline="eager"):
    results = []
    for case, comp, mode, ms, extra in rows:
        results.append({"case": case, "competitor": comp, "mode": mode, "ms": ms, "status": "ok", **extra})
    return {"bench": bench, "cases": cases, "results": results, "baseline": baseline, "modes": ["fwd", "fwd+bwd"],
            "competitors": {}, "checks": list(checks), "complete": True, "environment": _env()}


def _write_device(root, device="NVIDIA H100 80GB HBM3", smoke=False):
    d = root / harness.slug(device)
    d.mkdir(parents=True)
    ln = _kernel("layer_norm", [{"id": "a"}, {"id": "b"}], [
        ("a", "fastroberta", "fwd+bwd", 1.0, {"pct_copy_bw": 80.0}), ("a", "eager", "fwd+bwd", 2.0, {}),
        ("b", "fastroberta", "fwd+bwd", 1.0, {"pct_copy_bw": 65.0}), ("b", "eager", "fwd+bwd", 1.4, {})],
        checks=[{"gates": True, "passed": True, "case": "a", "competitor": "fastroberta", "tensor": "out"}])
    att_cases = [{"id": "p0", "seqlen": 512, "head_dim": 64, "dtype": "fp16", "dropout_p": 0.0, "pad": 0.0},
                 {"id": "p50", "seqlen": 512, "head_dim": 64, "dtype": "fp16", "dropout_p": 0.0, "pad": 0.5},
                 {"id": "drop", "seqlen": 512, "head_dim": 64, "dtype": "fp16", "dropout_p": 0.1, "pad": 0.0}]
    att = _kernel("attention", att_cases, [
        ("p0", "fastroberta", "fwd", 0.5, {"throughput": 300.0}), ("p0", "fastroberta", "fwd+bwd", 1.0, {}),
        ("p0", "eager", "fwd+bwd", 4.0, {}), ("p0", "sdpa-mask", "fwd+bwd", 1.2, {}),
        ("p50", "fastroberta", "fwd+bwd", 1.0, {}), ("p50", "fastroberta-varlen", "fwd+bwd", 0.5, {}),
        ("p50", "eager", "fwd+bwd", 2.5, {}), ("p50", "sdpa-mask", "fwd+bwd", 0.9, {}),
        ("drop", "fastroberta", "fwd+bwd", 9.0, {}), ("drop", "eager", "fwd+bwd", 1.0, {})])
    ce = _kernel("cross_entropy", [{"id": "c"}], [
        ("c", "fastroberta", "fwd+bwd", 1.0, {"extra_mem_mb": 100.0}),
        ("c", "eager-full", "fwd+bwd", 6.0, {"extra_mem_mb": 1000.0}),
        ("c", "eager-labelled", "fwd+bwd", 1.5, {"extra_mem_mb": 250.0})], baseline="eager-full")
    e2e_rows = [{"model": "base", "seq_len": 512, "precision": "fp16", "competitor": c, "tokens_per_s": t,
                 "mfu": m, "status": "ok", "max_batch_search": s} for c, t, m, s in [
        ("fastroberta-triton", 300000.0, 0.5, {"max_micro_batch": 256, "exact": True}),
        ("hf-eager", 100000.0, 0.17, {"max_micro_batch": 96, "exact": True}),
        ("hf-sdpa", 250000.0, 0.42, None)]]
    # The fine-tuning step, tagged with its task, must not be mistaken for the pretraining rows above.
    e2e_rows += [{"task": "finetune", "model": "base", "seq_len": 128, "micro_batch": 32, "precision": "fp16",
                  "competitor": c, "tokens_per_s": t, "mfu": 0.1, "status": "ok"} for c, t in [
        ("fastroberta-triton", 90000.0), ("hf-eager", 60000.0), ("hf-sdpa", 100000.0)]]
    e2e_rows += [{"task": "qa", "model": "base", "seq_len": 384, "micro_batch": 32, "precision": "fp16",
                  "competitor": c, "tokens_per_s": t, "mfu": 0.1, "status": "ok"} for c, t in [
        ("fastroberta-triton", 80000.0), ("hf-eager", 32000.0)]]
    e2e = {"bench": "e2e", "results": e2e_rows, "complete": True, "environment": _env(device, smoke)}
    for name, data in (("layer_norm", ln), ("attention", att), ("cross_entropy", ce), ("e2e", e2e)):
        data["environment"] = _env(device, smoke)
        (d / f"{name}.json").write_text(json.dumps(data))
    return d


def test_report_evaluates_the_targets_and_rewrites_the_readme_section(tmp_path):
    root = tmp_path / "results"
    _write_device(root)
    _write_device(root, device="CPU (x86_64)", smoke=True)  # smoke output never reaches the summary
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_BEGIN}\nold\n{report.README_END}\noutro\n")
    args = cli.build_parser().parse_args(["report", "--results", str(root), "--readme", str(readme)])
    assert report.main_from_args(args)

    devices = report.load_device_results(root)
    assert [d.name for d in devices] == ["nvidia-h100-80gb-hbm3"]
    rows = {r["target"]: r for r in report.targets(next(iter(devices.values())))}
    assert rows["LayerNorm fwd+bwd vs eager (worst case)"]["measured"] == "1.40x"
    assert rows["LayerNorm fwd+bwd vs eager (worst case)"]["met"] is False
    assert rows["LayerNorm fwd+bwd share of copy bandwidth (worst case)"]["measured"] == "65.0%"
    # Dropout cases are outside the attention targets; the worst no-dropout case counts.
    assert rows["Attention L512 fp16 fwd+bwd vs eager"]["measured"] == "2.50x"
    assert rows["Attention L512 fp16 fwd+bwd vs SDPA with mask"]["met"] is False
    assert rows["Attention L512 fp16 forward TFLOP/s (no padding)"]["met"] is True
    assert rows["Attention varlen vs padded at 50% padding (fwd+bwd)"]["measured"] == "2.00x"
    assert rows["MLM CE fwd+bwd vs eager full logits"]["met"] is True
    assert rows["MLM CE peak memory, less than eager full logits"]["measured"] == "10.00x"
    assert rows["MLM CE peak memory, less than eager labelled rows"]["measured"] == "2.50x"
    assert rows["Training tokens/s vs HF eager"]["measured"] == "3.00x"
    assert rows["Training tokens/s vs HF SDPA"]["measured"] == "1.20x"
    assert rows["Training MFU"]["measured"] == "50.0%"
    assert rows["Largest micro-batch at seq 512 vs HF eager"]["measured"] == "2.67x"
    assert rows["Fine-tuning tokens/s vs HF eager (no target)"]["measured"] == "1.50x"
    assert rows["Fine-tuning tokens/s vs HF sdpa (no target)"]["measured"] == "0.90x"
    assert rows["Fine-tuning tokens/s vs HF sdpa (no target)"]["where"] == "base, seq 128, batch 32, fp16, padded"
    assert rows["QA fine-tuning tokens/s vs HF eager (no target)"]["measured"] == "2.50x"
    assert rows["QA fine-tuning tokens/s vs HF sdpa (no target)"]["measured"] == "-"  # not measured
    assert rows["QA fine-tuning tokens/s vs HF eager (no target)"]["where"] == "base, seq 384, batch 32, fp16, padded"
    assert rows["Kernel outputs and gradients match the fp32 reference"]["met"] is True

    summary = (root / "SUMMARY.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in summary and "CPU" not in summary
    assert "(nvidia-h100-80gb-hbm3/e2e.md)" in summary
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert "Training MFU" in text and "results/SUMMARY.md" in text

    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert not report.update_readme(plain, "x") and plain.read_text() == "no markers\n"


def test_report_without_results_says_so(tmp_path):
    assert report.main_from_args(cli.build_parser().parse_args(["report", "--results", str(tmp_path)]))
    assert "No GPU results are committed yet" in (tmp_path / "SUMMARY.md").read_text()


# ----------------------------------------------------------------------------------- the trainer A/B check
def _records(losses, tps=(100.0,), start=10):
    return [{"step": start * (i + 1), "loss": loss, "tokens_per_s": tps[min(i, len(tps) - 1)]}
            for i, loss in enumerate(losses)]


def test_train_comparison_within_and_beyond_tolerance(tmp_path):
    base = [10.8, 9.0, 7.5, 7.0]
    same = train_check.compare(_records(base, tps=(10.0, 300.0, 310.0, 290.0)),
                               _records(base, tps=(10.0, 100.0, 100.0, 100.0)))
    assert same["passed"] and same["mean_rel_diff"] == 0 and same["windows"] == 4
    assert same["tokens_per_s_ratio"] == pytest.approx(3.0)  # the first (compiling) window is left out
    off = train_check.compare(_records([x * 1.03 for x in base]), _records(base))
    assert not off["passed"] and off["final_rel_diff"] == pytest.approx(0.03)
    assert not train_check.compare([], _records(base))["passed"]
    # metrics.jsonl: records without a loss (e.g. eval-only lines) are skipped.
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 10, "loss": 9.5}) + "\n\n" + json.dumps({"step": 20, "eval_loss": 9}) + "\n")
    assert train_check.read_metrics(path) == [{"step": 10, "loss": 9.5}]


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], check=True)


def test_e2e_summary_line_names_each_task():
    """The same competitor names run in both tasks: the summary says which figures are pretraining and which
    fine-tuning."""
    rows = [{"task": "mlm", "competitor": "fastroberta-torch", "tokens_per_s": 1200.4},
            {"task": "mlm", "competitor": "hf-sdpa", "status": "out of memory"},
            {"task": "finetune", "competitor": "fastroberta-torch", "tokens_per_s": 800.0}]
    assert bench_e2e.summary_line(rows, "smoke tok/s") == (
        "e2e: pretraining (MLM): fastroberta-torch 1200 smoke tok/s, hf-sdpa out of memory; "
        "fine-tuning (classification): fastroberta-torch 800 smoke tok/s")
