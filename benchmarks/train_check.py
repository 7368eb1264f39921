"""The trainer A/B check: the same short run with Triton kernels and with the torch kernels, compared.

    python -m benchmarks train                     # base, seq 512, fp16, ZeRO-2, 200 steps (needs a GPU)
    python -m benchmarks train --steps 50 --micro-batch-size 8

Both runs go through the real CLI (``python -m fastroberta.train``) on the bundled corpus with the same seed,
so they see the same data in the same order from the same initial weights; only the kernels (and therefore
the dropout random streams) differ. Compared from each run's ``metrics.jsonl``:
    loss curve      the training loss of every logged window (the mean over ``--log-every`` steps), relative
                    difference per window; passes when the mean difference and the final one (held-out
                    eval loss when logged, else the last window) are within ``--tolerance`` (1%)
    tokens/s        the median over the logged windows after the first (compilation, autotuning), as a ratio
    MFU             the same median, when the trainer logs it
Before the runs, the tokenizer and token shards they will use are prepared once here (``prepare_data``), so that
each run's time limit covers DeepSpeed's start and the training, not a first data preparation.
Writes ``train.json`` and ``train.md`` under ``<out>/<device>/``.
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = ("triton", "torch")


def add_arguments(p):
    p.add_argument("--model", default="base")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--precision", default="fp16")
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--steps", type=int, default=int(os.environ.get("TRAIN_STEPS", 200)))
    p.add_argument("--micro-batch-size", type=int, default=int(os.environ.get("TRAIN_MICRO_BATCH", 16)))
    p.add_argument("--global-batch-size", type=int, default=None, help="default: the micro-batch size")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--optimizer", default=os.environ.get("TRAIN_OPTIMIZER") or None,
                   help="passed to the trainer (e.g. torch_adamw to skip DeepSpeed's fused-Adam JIT build)")
    p.add_argument("--extra", default=os.environ.get("TRAIN_EXTRA_ARGS", ""),
                   help="more trainer flags, one string")
    p.add_argument("--eval-batches", type=int, default=20, help="held-out micro-batches evaluated at the end")
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--run-timeout", type=float, default=None, help="seconds per trainer run")
    p.add_argument("--time-budget", type=float, default=None, help="seconds for both runs together")
    p.add_argument("--work-dir", default=None, help="where the two runs write (default: a temporary folder)")
    p.add_argument("--out", default=None, help="results root (default benchmarks/results)")
    p.add_argument("--smoke", action="store_true", help="tiny model, a few steps (CPU: fp32)")


def trainer_command(args, kernels, output):
    cmd = [sys.executable, "-m", "fastroberta.train", "--model", args.model, "--seq-len", str(args.seq_len),
           "--precision", args.precision, "--zero-stage", str(args.zero_stage), "--steps", str(args.steps),
           "--micro-batch-size", str(args.micro_batch_size),
           "--global-batch-size", str(args.global_batch_size or args.micro_batch_size),
           "--kernels", kernels, "--output", str(output), "--log-every", str(args.log_every), "--seed", "0",
           "--eval-every", "0", "--eval-batches", str(args.eval_batches), "--save-every", str(10 ** 9), "--overwrite",
           "--no-progress"]
    if args.optimizer:
        cmd += ["--optimizer", args.optimizer]
    return cmd + args.extra.split()


def prepare_data(args):
    """Prepare the runs' data into the trainer's cache: the trainer's own --prepare-only on ``trainer_command``'s
    flags (corpus, tokenizer, vocabulary, held-out share, seed, cache folder) writes what both runs then find
    cached. Returns (status, seconds)."""
    from fastroberta import train
    t0 = time.monotonic()
    try:
        train.train(trainer_command(args, RUNS[0], "unused")[3:] + ["--prepare-only"])
        status = "ok"
    except train.ConfigError as e:  # the runs then fail with the same message
        status = f"error: {e}"
    except SystemExit as e:  # argparse has printed which flag
        status = f"error: the trainer rejected its flags (exit status {e.code})"
    return status, round(time.monotonic() - t0, 1)


def read_metrics(path):
    """The logged training windows (records with a loss) of one metrics.jsonl."""
    from fastroberta.training.metrics import read_metrics as read_records
    return [r for r in read_records(path) if r.get("step") is not None and r.get("loss") is not None]


def _median_after_first(values):
    values = [v for v in values if v is not None]
    if len(values) > 1:
        values = values[1:]
    return statistics.median(values) if values else None


def compare(a, b, tolerance=0.01):
    """Compare two runs' metric records (a = Triton, b = torch). Pure: no I/O."""
    by_step_b = {r["step"]: r for r in b}
    pairs = [(r, by_step_b[r["step"]]) for r in a if r["step"] in by_step_b]
    if not pairs:
        return {"passed": False, "reason": "no logged step in common", "windows": 0}
    diffs = [abs(ra["loss"] - rb["loss"]) / abs(rb["loss"]) for ra, rb in pairs]
    last_a, last_b = pairs[-1]
    if last_a.get("eval_loss") is not None and last_b.get("eval_loss") is not None:
        final_kind, fa, fb = "eval_loss", last_a["eval_loss"], last_b["eval_loss"]
    else:
        final_kind, fa, fb = "last window loss", last_a["loss"], last_b["loss"]
    final_diff = abs(fa - fb) / abs(fb)
    tps_a = _median_after_first([r.get("tokens_per_s") for r in a])
    tps_b = _median_after_first([r.get("tokens_per_s") for r in b])
    mfu_a = _median_after_first([r.get("mfu") for r in a])
    mfu_b = _median_after_first([r.get("mfu") for r in b])
    mean_diff = statistics.mean(diffs)
    return {
        "windows": len(pairs), "steps": pairs[-1][0]["step"],
        "loss_first": [pairs[0][0]["loss"], pairs[0][1]["loss"]],
        "loss_last": [last_a["loss"], last_b["loss"]],
        "mean_rel_diff": mean_diff, "max_rel_diff": max(diffs),
        "max_rel_diff_step": pairs[diffs.index(max(diffs))][0]["step"],
        "final_kind": final_kind, "final": [fa, fb], "final_rel_diff": final_diff,
        "tokens_per_s": [tps_a, tps_b], "tokens_per_s_ratio": tps_a / tps_b if tps_a and tps_b else None,
        "mfu": [mfu_a, mfu_b], "tolerance": tolerance,
        "passed": mean_diff <= tolerance and final_diff <= tolerance,
        "curve": [[ra["step"], ra["loss"], rb["loss"]] for ra, rb in pairs],
    }


def train_markdown(result):
    from benchmarks import harness
    env = result["environment"]
    lines = ["# Trainer A/B: Triton kernels vs torch kernels", ""]
    if env["smoke"]:
        lines += [f"**{harness.SMOKE_LABEL}**", ""]
    s = result["settings"]
    lines += [harness.env_line(env), "",
              f"`{s['model']}`, seq {s['seq_len']}, {s['precision']}, ZeRO-{s['zero_stage']}, {s['steps']} steps, "
              f"micro-batch {s['micro_batch_size']}, optimizer {s['optimizer'] or 'trainer default'}.", ""]
    rows = [[k, r["status"], harness.fmt(r.get("seconds"), 0)] for k, r in result["runs"].items()]
    if "prepare" in result:
        rows.insert(0, ["(data preparation, before both)", result["prepare"]["status"],
                        harness.fmt(result["prepare"]["seconds"], 0)])
    lines += [harness.markdown_table(["kernels", "run", "seconds"], rows), ""]
    c = result.get("comparison")
    if c and c.get("windows"):
        tps = c["tokens_per_s"]
        rows = [["first window loss", harness.fmt(c["loss_first"][0], 4), harness.fmt(c["loss_first"][1], 4), ""],
                ["last window loss", harness.fmt(c["loss_last"][0], 4), harness.fmt(c["loss_last"][1], 4),
                 f"{100 * c['final_rel_diff']:.2f}%" if c["final_kind"] != "eval_loss" else ""]]
        if c["final_kind"] == "eval_loss":
            rows.append(["held-out eval loss", harness.fmt(c["final"][0], 4), harness.fmt(c["final"][1], 4),
                         f"{100 * c['final_rel_diff']:.2f}%"])
        lines += [harness.markdown_table(["", "triton", "torch", "relative"], rows + [
            ["mean / max window diff", "", "", f"{100 * c['mean_rel_diff']:.2f}% / {100 * c['max_rel_diff']:.2f}% "
                                               f"(step {c['max_rel_diff_step']})"],
            ["tokens/s (median)", harness.fmt(tps[0], 0), harness.fmt(tps[1], 0),
             harness.fmt(c["tokens_per_s_ratio"], 2) + "x" if c["tokens_per_s_ratio"] else "-"],
            ["MFU (median)", *(harness.fmt(100 * m, 1) + "%" if m else "-" for m in c["mfu"]), ""],
        ]), "", f"Loss curves within {100 * c['tolerance']:.0f}% (mean and final): "
                f"**{'yes' if c['passed'] else 'NO'}**", ""]
    elif c:
        lines += [f"No comparison: {c.get('reason')}", ""]
    failed = [k for k, r in result["runs"].items() if r["status"] != "ok"]
    lines += [f"Check {'passed' if result['passed'] else 'FAILED'}"
              + (f" (run(s) that did not finish: {', '.join(failed)})" if failed else "") + ".", ""]
    return "\n".join(lines)


def run(args, log=print):
    from benchmarks import harness
    import torch
    smoke = args.smoke or not torch.cuda.is_available()
    if smoke:  # CPU: fp32 (DeepSpeed refuses fp16 there; the interpreter has no bf16), a few tiny steps
        args.model, args.seq_len, args.steps, args.micro_batch_size = "tiny", 32, min(args.steps, 2), 1
        args.precision, args.zero_stage, args.log_every, args.global_batch_size = "fp32", 0, 1, 1
        args.eval_batches = 1
    env = harness.environment(smoke)
    out_root = args.out or (harness.SMOKE_ROOT if smoke else harness.RESULTS_ROOT)
    out_dir = harness.results_dir(out_root, env)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fastroberta-train-check-"))
    deadline = time.monotonic() + args.time_budget if args.time_budget else None
    result = {"bench": "train", "environment": env, "label": env["label"], "settings": {
        k: getattr(args, k) for k in ("model", "seq_len", "precision", "zero_stage", "steps", "micro_batch_size",
                                      "global_batch_size", "log_every", "optimizer", "extra")}, "runs": {}}
    status, seconds = prepare_data(args)
    result["prepare"] = {"status": status, "seconds": seconds}
    log(f"[train] data prepared for both runs: {status}, {seconds:.0f} s")
    records = {}
    for i, kernels in enumerate(RUNS):
        output = work / f"train-{kernels}"
        cmd = trainer_command(args, kernels, output)
        limit = args.run_timeout
        if deadline is not None:
            # Split what is left evenly between the runs still to go.
            share = (deadline - time.monotonic()) / (len(RUNS) - i)
            limit = min(limit, share) if limit else share
        log(f"[train] {' '.join(cmd[1:])}" + (f"  (limit {limit:.0f} s)" if limit else ""))
        t0 = time.monotonic()
        env_vars = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join([str(harness.REPO), os.environ.get("PYTHONPATH", "")])}
        try:
            proc = subprocess.run(cmd, cwd=harness.REPO, env=env_vars, timeout=limit)
            status = "ok" if proc.returncode == 0 else f"error: exit status {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = f"error: timed out after {limit:.0f} s"
        metrics = output / "metrics.jsonl"
        records[kernels] = read_metrics(metrics) if metrics.exists() else []
        result["runs"][kernels] = {"status": status, "seconds": round(time.monotonic() - t0, 1),
                                   "command": cmd[1:], "logged_windows": len(records[kernels])}
        log(f"  {status}, {len(records[kernels])} logged windows")
    result["comparison"] = compare(records["triton"], records["torch"], args.tolerance)
    result["passed"] = result["comparison"]["passed"] and all(r["status"] == "ok" for r in result["runs"].values())
    harness.write_json(result, out_dir / "train.json")
    (out_dir / "train.md").write_text(train_markdown(result))
    log(f"[train] loss curves within {100 * args.tolerance:.0f}%: {result['passed']}; written to {out_dir}/train.md")
    return result


def main_from_args(args):
    return run(args)["passed"]
