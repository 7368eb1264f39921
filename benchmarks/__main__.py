"""``python -m benchmarks {kernels,e2e,hf,train,all,report} [--smoke] [--profile P] [--out DIR] ...``

    kernels   layer_norm, attention and cross_entropy benchmarks (``--only`` picks some)
    e2e       the DeepSpeed ZeRO-2 training step, pretraining (MLM) and fine-tuning (classification, QA):
              fastroberta (Triton / torch kernels) vs HF transformers
    hf        transformers' own RoBERTa-base training step, fastroberta.apply_kernels vs eager and SDPA
    train     two short trainer runs, Triton vs torch kernels, loss curves and tokens/s compared
    all       kernels, then e2e
    report    benchmarks/results/SUMMARY.md from the committed results (+ the README section with --readme)
    static    every kernel compiled for sm_90 (no GPU needed): registers, spills, SASS per main-loop
              iteration, written to benchmarks/results/sm90/static.{json,md}
    model     one training step's per-op cost model (meta tensors, no GPU): benchmarks/results/model/
    host      the host (CPU) time per call of each fastroberta op, kernels not run: benchmarks/results/host/

Without CUDA everything runs in smoke mode (tiny shapes, Triton interpreter; a banner before any figure says it
is a correctness run, not a performance result, the console columns read "smoke ms" / "smoke tok/s", and the
files go to out/benchmarks-smoke/, never to benchmarks/results/). Exit status: 0 when
every fastroberta correctness check passed and nothing failed to run, 1 otherwise.
"""
import argparse
import signal
import sys
import time

# First of all: on a machine without CUDA, harness sets TRITON_INTERPRET before torch, Triton or any kernel module
# is imported (building the parser imports benchmark modules that import them).
from benchmarks import harness  # noqa: E402,F401

# How a --time-budget is split between the kernel benchmarks (attention has the most cases).
BUDGET_SHARE = {"layer_norm": 0.3, "attention": 0.45, "cross_entropy": 0.25}


def _profile(args):
    import torch

    if args.smoke:
        return "smoke"
    if args.profile:
        if args.profile != "smoke" and not torch.cuda.is_available():
            print(f"no CUDA device: profile {args.profile!r} needs a GPU; running the smoke profile instead",
                  file=sys.stderr)
            return "smoke"
        return args.profile
    return "full" if torch.cuda.is_available() else "smoke"


def _is_smoke(args):
    """Whether this command measures in smoke mode (its figures are then no performance result)."""
    import torch
    if not torch.cuda.is_available() or getattr(args, "smoke", False):
        return True
    return getattr(args, "profile", None) == "smoke"


def _out_root(args, profile):
    from benchmarks import harness
    if args.out:
        return args.out
    return harness.SMOKE_ROOT if profile == "smoke" else harness.RESULTS_ROOT


def run_kernels(args):
    from benchmarks import harness  # sets TRITON_INTERPRET on CPU before any kernel module is imported
    from benchmarks import bench_attention, bench_cross_entropy, bench_layer_norm

    benches = {"layer_norm": bench_layer_norm, "attention": bench_attention, "cross_entropy": bench_cross_entropy}
    only = [s.strip() for s in args.only.split(",")] if args.only else list(benches)
    unknown = [s for s in only if s not in benches]
    if unknown:
        raise SystemExit(f"--only: unknown benchmark(s) {unknown}; choose from {sorted(benches)}")
    profile = _profile(args)
    out_root = _out_root(args, profile)
    dtypes = args.dtypes.split(",") if args.dtypes else None
    start = time.monotonic()
    total_share = sum(BUDGET_SHARE[name] for name in only)
    spent_share = 0.0
    ok = True
    verdicts = []
    for name in only:
        # Each benchmark gets its share of the time budget (plus whatever earlier ones left unused), so one
        # slow benchmark cannot starve the others.
        spent_share += BUDGET_SHARE[name]
        deadline = start + args.time_budget * spent_share / total_share if args.time_budget else None
        result = harness.run_kernel_bench(benches[name], profile, out_root, deadline=deadline, dtypes=dtypes)
        passed = harness.checks_passed(result)
        errors = [r for r in result["results"] if r["status"].startswith("error")
                  and r["competitor"].startswith("fastroberta")]
        ok &= passed and not errors
        print(f"[{name}] correctness {'passed' if passed else 'FAILED'}; "
              f"{len(errors)} fastroberta rows failed to run; written to "
              f"{harness.results_dir(out_root, result['environment'])}/{name}.{{json,md}}")
        verdicts.append(f"{name} {'ok' if passed and not errors else 'FAILED'}"
                        + ("" if result["complete"] else f" ({len(result['skipped_cases'])} cases cut)"))
    print("kernels: " + ", ".join(verdicts))
    return ok


def run_e2e(args):
    from benchmarks import bench_e2e
    profile = _profile(args)
    result = bench_e2e.run(profile, _out_root(args, profile), models=args.models, seq_lens=args.seq_lens,
                           precisions=args.precisions, competitors=args.competitors, time_budget=args.time_budget,
                           max_batch=args.max_batch, steps=args.steps, tasks=args.tasks)
    return all(r["status"] == "ok" for r in result["results"] if r["competitor"].startswith("fastroberta"))


def run_hf(args):
    from benchmarks import bench_hf
    profile = _profile(args)
    split = (lambda v: [s.strip() for s in v.split(",") if s.strip()] if v else None)
    result = bench_hf.run(profile, _out_root(args, profile), workloads=split(args.workloads),
                          precisions=split(args.precisions), competitors=split(args.competitors),
                          time_budget=args.time_budget)
    return bench_hf.checks_passed(result)


def run_train(args):
    from benchmarks import train_check
    return train_check.main_from_args(args)


def run_report(args):
    from benchmarks import report
    return report.main_from_args(args)


def run_static(args):
    from benchmarks import bench_static
    return bench_static.main_from_args(args)


def run_model(args):
    from benchmarks import bench_model
    return bench_model.main_from_args(args)


def run_host(args):
    from benchmarks import bench_host
    return bench_host.main_from_args(args)


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="fastroberta's benchmark suite",
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")

    def common(p):
        p.add_argument("--smoke", action="store_true", help="tiny shapes, checks only (default without CUDA)")
        p.add_argument("--profile", choices=("smoke", "check", "full"),
                       help="check = the subset gpu_check.sh runs; full = every shape of the issues (CUDA default)")
        p.add_argument("--out", help="results root; files go to OUT/<device>/ (default benchmarks/results, "
                       "or out/benchmarks-smoke in smoke mode)")
        p.add_argument("--time-budget", type=float, default=None,
                       help="seconds; cases not started by then are recorded as skipped")

    k = sub.add_parser("kernels", help="kernel benchmarks")
    common(k)
    k.add_argument("--only", help="comma list of layer_norm,attention,cross_entropy")
    k.add_argument("--dtypes", help="comma list of fp16,bf16,fp32 (default: the profile's)")

    def e2e_flags(p):
        p.add_argument("--tasks", help="comma list of mlm (pretraining step), finetune (sequence "
                       "classification, seq 128, batch 32) and qa (question answering, seq 384, batch 32); "
                       "default: all three")
        p.add_argument("--models", help="comma list of base,large (default: the profile's)")
        p.add_argument("--seq-lens", help="comma list, e.g. 128,512 (the mlm task's; finetune is seq 128, qa 384)")
        p.add_argument("--precisions", help="comma list of fp16,bf16")
        p.add_argument("--competitors", help="comma list of fastroberta-triton,fastroberta-torch,hf-eager,"
                       "hf-sdpa,hf-sdpa-compile,fastroberta-triton-compile (every task; default: the "
                       "profile's)")
        p.add_argument("--max-batch", help="competitors whose largest micro-batch at seq 512 is searched "
                       "(comma list, 'all' or 'none'; default: the profile's)")
        p.add_argument("--steps", type=int, help="timed steps per configuration")

    e = sub.add_parser("e2e", help="end-to-end training-step benchmark")
    common(e)
    e2e_flags(e)

    a = sub.add_parser("all", help="kernels then e2e")
    common(a)
    a.add_argument("--only", help=argparse.SUPPRESS)
    a.add_argument("--dtypes", help=argparse.SUPPRESS)
    e2e_flags(a)

    h = sub.add_parser("hf", help="Hugging Face drop-in: transformers RoBERTa-base step, apply_kernels vs not")
    common(h)
    h.add_argument("--workloads", help="comma list of finetune,mlm")
    h.add_argument("--precisions", help="comma list of fp16,bf16 (smoke: fp32)")
    h.add_argument("--competitors", help="comma list of hf-eager,hf-sdpa,hf+fastroberta")

    t = sub.add_parser("train", help="trainer A/B run: Triton vs torch kernels")
    from benchmarks import train_check
    train_check.add_arguments(t)

    r = sub.add_parser("report", help="write SUMMARY.md from committed results")
    from benchmarks import report
    report.add_arguments(r)

    s = sub.add_parser("static", help="sm_90 static report (registers, spills, SASS loop counts), no GPU")
    from benchmarks import bench_static
    bench_static.add_arguments(s)

    m = sub.add_parser("model", help="per-op cost model of one training step (meta tensors, no GPU)")
    from benchmarks import bench_model
    bench_model.add_arguments(m)

    o = sub.add_parser("host", help="host (CPU) time per fastroberta op call, kernel launches made no-ops")
    from benchmarks import bench_host
    bench_host.add_arguments(o)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    # report reads committed results and static compiles for sm_90 without running anything: no smoke figures.
    if args.command not in ("report", "static", "model", "host") and _is_smoke(args):
        from benchmarks import harness
        harness.print_smoke_banner()
    # `timeout` sends SIGTERM: turn it into an exception so partial results are still written.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt("SIGTERM")))
    if args.command == "kernels":
        ok = run_kernels(args)
    elif args.command == "e2e":
        ok = run_e2e(args)
    elif args.command == "all":
        ok = run_kernels(args)
        ok = run_e2e(args) and ok
    elif args.command == "hf":
        ok = run_hf(args)
    elif args.command == "train":
        ok = run_train(args)
    elif args.command == "static":
        ok = run_static(args)
    elif args.command == "model":
        ok = run_model(args)
    elif args.command == "host":
        ok = run_host(args)
    else:
        ok = run_report(args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
