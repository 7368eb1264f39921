"""benchmarks/gpu_check.sh and what it relies on, on a machine without a GPU: the tests stage's time budget and
test order (tests/time_budget.py) and a dry run of every stage in its smoke mode."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def test_time_budget_skips_what_is_left_and_pytest_prints_its_summary(tmp_path):
    (tmp_path / "test_two.py").write_text(
        "import time\n\n"
        "def test_slow():\n    time.sleep(2.5)\n\n"
        "def test_left_out():\n    pass\n")
    env = dict(os.environ, FASTROBERTA_TEST_BUDGET_S="2", PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "time_budget", "-p", "no:cacheprovider",
                          "-rs", str(tmp_path / "test_two.py")], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed, 1 skipped" in run.stdout
    assert "time budget: 1 tests not run (FASTROBERTA_TEST_BUDGET_S=2)" in run.stdout
    assert "not run: FASTROBERTA_TEST_BUDGET_S=2 s spent" in run.stdout


def test_tests_first_runs_the_named_tests_first_in_that_order(tmp_path):
    (tmp_path / "test_order.py").write_text(
        "import pytest\n\n"
        "def test_a():\n    pass\n\n"
        "@pytest.mark.parametrize('x', [1, 2])\ndef test_b(x):\n    pass\n\n"
        "def test_c():\n    pass\n")
    env = dict(os.environ, FASTROBERTA_TESTS_FIRST="test_order.py::test_c test_order.py::test_b",
               PYTHONPATH=str(TESTS))
    run = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "time_budget", "-p", "no:cacheprovider",
                          "test_order.py"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    ran = [line.split(" ")[0] for line in run.stdout.splitlines() if " PASSED" in line]
    assert ran == ["test_order.py::test_c", "test_order.py::test_b[1]", "test_order.py::test_b[2]",
                   "test_order.py::test_a"]


def test_time_budget_rejects_a_bad_value(tmp_path):
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    env = dict(os.environ, FASTROBERTA_TEST_BUDGET_S="soon", PYTHONPATH=str(TESTS))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "time_budget", "-p", "no:cacheprovider",
                          str(tmp_path / "test_one.py")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode != 0
    assert "FASTROBERTA_TEST_BUDGET_S must be a number of seconds, got 'soon'" in run.stdout + run.stderr


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_stage_in_smoke_mode(tmp_path):
    """``GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh``: setup, tests, kernels, e2e, train, hf and the report
    end to end on CPU (each stage's smoke mode, a few minutes on two cores), so the script is tested here and
    not first on a GPU."""
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_SMOKE="1", GPU_CHECK_SKIP_INSTALL="1", PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("OUT", None)
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out)], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert "SMOKE DRY RUN" in summary
    stages = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in summary.splitlines()
              if line.startswith("| ") and not line.startswith("| stage")}
    assert stages == {name: "ok" for name in ("setup", "tests", "kernels", "e2e", "model", "train", "hf")}, summary
    assert "3 passed" in summary  # the tests stage's note is pytest's closing line
    files = {p.name for p in out.iterdir()}
    assert {"summary.md", "gpu_check.log", "results.tar.gz", "layer_norm.md", "e2e.md", "train.md"} <= files
    assert "SMOKE DRY RUN" in run.stdout
