"""What pretraining buys on the bundled fine-tuning tasks: each generated task fine-tuned from a pretraining run
and from the same architecture at random initialisation (``--from-scratch``), same seed, same steps.

    fastroberta-train                                        # the default run: runs/fastroberta-demo
    python -m benchmarks.pretraining_gain                    # the four bundled tasks, seeds 0 and 1, on the CPU
    python -m benchmarks.pretraining_gain --model RUN --tasks qa --seeds 0,1,2 -- --epochs 4

Every run goes through the real CLI (``python -m fastroberta.finetune``) at its defaults for the task (flags
after ``--`` are passed on). Reported per task and seed: the best validation metric (the one the run keeps its
model by) and the kept model's test metric, pretrained against from scratch, and the mean gain over the seeds.
Writes ``pretraining_gain.json`` and ``pretraining_gain.md`` under ``--out``. A run takes a minute or two on two
CPU cores, so the default (4 tasks x 2 seeds x 2 models) takes about half an hour.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

TASKS = ("word-order", "multiple-choice", "token-classification", "qa")
# The metric each task keeps its best model by, as best.json and test_metrics.json name it.
METRIC = {"word-order": "accuracy", "multiple-choice": "accuracy", "token-classification": "f1", "qa": "f1"}


def finetune(model, task, seed, scratch, out, extra):
    """(best validation metric, test metric, seconds) of one fine-tuning run."""
    argv = [sys.executable, "-m", "fastroberta.finetune", "--model", model, "--task", task, "--seed", str(seed),
            "--output", out, "--overwrite", "--no-progress", *(["--from-scratch"] if scratch else []), *extra]
    t0 = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {done.returncode}):\n{done.stdout[-3000:]}")
    with open(os.path.join(out, "best.json")) as f:
        best = json.load(f)
    with open(os.path.join(out, "test_metrics.json")) as f:
        test = json.load(f)
    return best[METRIC[task]], test[METRIC[task]], time.perf_counter() - t0


def table(rows):
    lines = ["| task | metric | seed | pretrained val / test | from scratch val / test | gain val / test |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['metric']} | {r['seed']} | {r['pretrained'][0]:.3f} / "
                     f"{r['pretrained'][1]:.3f} | {r['scratch'][0]:.3f} / {r['scratch'][1]:.3f} | "
                     f"{r['pretrained'][0] - r['scratch'][0]:+.3f} / {r['pretrained'][1] - r['scratch'][1]:+.3f} |")
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        gain = [statistics.mean(r["pretrained"][i] - r["scratch"][i] for r in mine) for i in (0, 1)]
        lines.append(f"| {task} | {mine[0]['metric']} | mean | | | {gain[0]:+.3f} / {gain[1]:+.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/fastroberta-demo", help="the pretraining run (default: %(default)s)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated (default: %(default)s)")
    p.add_argument("--seeds", default="0,1", help="fine-tuning seeds, comma-separated (default: %(default)s)")
    p.add_argument("--out", default="out/pretraining-gain", help="run folders and the report (default: %(default)s)")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",")]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown}; choose from {', '.join(TASKS)}")
    if not os.path.isdir(args.model):
        raise SystemExit(f"--model {args.model}: no such run folder; `fastroberta-train` writes the default one")
    rows = []
    for task in tasks:
        for seed in (int(s) for s in args.seeds.split(",")):
            row = {"task": task, "metric": METRIC[task], "seed": seed}
            for kind, scratch in (("pretrained", False), ("scratch", True)):
                out = os.path.join(args.out, f"{task}-{kind}-seed{seed}")
                val, test, seconds = finetune(args.model, task, seed, scratch, out, extra)
                row[kind], row[f"{kind}_seconds"] = (val, test), round(seconds, 1)
                print(f"{task} seed {seed} {kind}: validation {METRIC[task]} {val:.4f}, test {test:.4f} "
                      f"({seconds:.0f}s)", flush=True)
            rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pretraining_gain.json"), "w") as f:
        json.dump({"model": args.model, "extra": extra, "rows": rows}, f, indent=1)
    report = table(rows)
    with open(os.path.join(args.out, "pretraining_gain.md"), "w") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    main()
