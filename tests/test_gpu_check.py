"""benchmarks/gpu_check.sh and what it relies on, on a machine without a GPU: the tests stage's time budget
(tests/time_budget.py) and a dry run of every stage in its smoke mode."""
import os
import subprocess
import sys
from pathlib import Path

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


def test_time_budget_rejects_a_bad_value(tmp_path):
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    env = dict(os.environ, FASTROBERTA_TEST_BUDGET_S="soon", PYTHONPATH=str(TESTS))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "time_budget", "-p", "no:cacheprovider",
                          str(tmp_path / "test_one.py")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode != 0
    assert "FASTROBERTA_TEST_BUDGET_S must be a number of seconds, got 'soon'" in run.stdout + run.stderr
