"""The pytest-benchmark face of the suite: ``pytest benchmarks/ --benchmark-only [--benchmark-json F]``.

Each bench module exposes one parametrized test (case x competitor x mode). The profile comes from
FASTROBERTA_BENCH_PROFILE (smoke | check | full), by default ``full`` on CUDA and ``smoke`` on CPU. A test
records the harness's own measurement (do_bench median, throughput, extra memory) in ``extra_info`` and lets
pytest-benchmark time the same call with a device synchronisation, so ``--benchmark-json`` holds both.
fastroberta's rows first assert the correctness check; a competitor that is not installed is skipped with
the reason.
"""
import functools
import os

import torch

from benchmarks import harness

try:
    import pytest
except ImportError:  # running as a script without pytest: no test functions, nothing else changes
    pytest = None


def profile():
    value = os.environ.get("FASTROBERTA_BENCH_PROFILE") or harness.default_profile()
    if value not in harness.PROFILES:
        raise ValueError(f"FASTROBERTA_BENCH_PROFILE must be one of {harness.PROFILES}, got {value!r}")
    return value


@functools.lru_cache(maxsize=1)
def environment():
    return harness.environment(profile() == "smoke")


_INPUTS = {}


def case_inputs(bench, case):
    """The case's inputs, kept while consecutive tests use them (tests are ordered case-major)."""
    key = (bench.NAME, case)
    if key not in _INPUTS:
        _INPUTS.clear()
        harness.free_memory()
        _INPUTS[key] = bench.make_inputs(case, harness.device())
    return _INPUTS[key]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_benchmark(benchmark, bench, case, comp, mode):
    prof = profile()
    status = comp.status()
    if status != "available":
        pytest.skip(status)
    inputs = case_inputs(bench, case)
    if comp.ours and comp.checked and mode == bench.MODES[0]:
        check_case = case.with_params(dropout_p=0.0) if case.p.get("dropout_p") else case
        records = harness.check_runner(comp.build(check_case, inputs), harness.TOLERANCE[case.p["dtype"]])
        failed = [r for r in records if not r["passed"]]
        assert not failed, f"{comp.name} differs from the fp32 reference on {case.id}: {failed}"
    runner = comp.build(case, inputs)
    rec = harness.measure_runner(runner, (mode,), harness.Timing.for_profile(prof),
                                 lambda m: bench.work(case, inputs, m))[mode]
    if rec["ms"] is None:
        pytest.fail(f"{comp.name} {mode} on {case.id}: {rec['status']}")
    env = environment()
    harness.add_throughput(rec, bench.METRIC, env)
    # pytest-benchmark titles each table with its group: in smoke mode the title says what the times are.
    benchmark.group = (f"SMOKE, interpreter times, not performance: " if prof == "smoke" else "") + \
        f"{bench.NAME} {case.id} {mode}"
    benchmark.extra_info.update({
        "bench": bench.NAME, "case": case.id, "params": case.p, "competitor": comp.name, "mode": mode,
        "profile": prof, "label": env["label"], "device": env["device"], "git_commit": env["git_commit"],
        "do_bench_median_ms": rec["ms"], "metric": bench.METRIC, "throughput": rec.get("throughput"),
        "pct_copy_bw": rec.get("pct_copy_bw"), "extra_mem_mb": rec["extra_mem_mb"],
    })
    rounds, warmup = (1, 0) if prof == "smoke" else (20, 3)
    if mode == "bwd":
        def setup():
            out = runner.forward()
            return (out, runner.grad_for(out)), {}

        def target(out, dout):
            out.backward(dout)
            _sync()
        benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
    else:
        fn, _ = harness._mode_fns(runner, mode)

        def target():
            fn()
            _sync()
        benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup, iterations=1)
    for t in runner.leaves:
        t.grad = None


def make_kernel_test(bench):
    """The parametrized pytest-benchmark test of one kernel bench module (None without pytest)."""
    if pytest is None:
        return None
    comps = bench.competitors(profile() == "smoke")
    pairs = [(case, comp) for case in bench.cases(profile()) for comp in comps if comp.applies(case)]

    @pytest.mark.parametrize("mode", bench.MODES)
    @pytest.mark.parametrize("case,comp", pairs, ids=[f"{case.id}-{comp.name}" for case, comp in pairs])
    def test(benchmark, case, comp, mode):
        run_benchmark(benchmark, bench, case, comp, mode)

    test.__doc__ = f"pytest-benchmark: {bench.TITLE}"
    return test
