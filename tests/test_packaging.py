"""The repository's layout never shadows an installed package: `python -m pytest`, `python -m benchmarks` and any
script run from the repository root put the root first on sys.path, so a top-level folder named like a dependency
(a `kernels/` beside Hugging Face's `kernels`, which transformers >= 5.25 imports) would replace it."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def top_level_names():
    """Names `import NAME` finds in the repository root: packages (folders with __init__.py) and modules."""
    names = {p.name for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    names |= {p.stem for p in REPO.glob("*.py")}
    return names


def test_the_kernels_are_a_subpackage_of_fastroberta():
    import fastroberta.kernels

    assert Path(fastroberta.kernels.__file__).resolve().parent == REPO / "fastroberta" / "kernels"
    assert "kernels" not in top_level_names()


def test_no_top_level_name_belongs_to_another_installed_distribution():
    owners = importlib.metadata.packages_distributions()
    clashes = {name: owners[name] for name in top_level_names()
               if name in owners and set(owners[name]) - {"fastroberta"}}
    assert not clashes, f"repository folders shadow installed packages: {clashes}"


def test_transformers_imports_from_the_repository_root():
    """What failed in CI when transformers 5.25 started importing `kernels`: run in a fresh interpreter whose
    sys.path starts with the repository root, as `python -m pytest` does."""
    pytest.importorskip("transformers")
    code = ("import importlib.util, sys; import transformers.integrations.hub_kernels; "
            "spec = importlib.util.find_spec('kernels'); "
            "print(spec.origin if spec else '')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    origin = out.stdout.strip()
    assert not origin.startswith(str(REPO) + "/kernels"), origin
