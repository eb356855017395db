"""The layers stay visible: the engine never imports the science; only the runner (and the Jobs API
client, `pipelines.jobs`) imports Ray and only the tracking module imports MLflow; the science outside
`tda.steps` imports neither, and `tda.report` (which reads runs) imports the engine but not Ray or MLflow."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def top(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def test_pipelines_never_imports_tda():
    for path in (ROOT / "pipelines").rglob("*.py"):
        assert "tda" not in top(imported_modules(path)), path


def test_only_the_runner_imports_ray_and_only_tracking_imports_mlflow():
    for path in (ROOT / "pipelines").rglob("*.py"):
        mods = top(imported_modules(path))
        if path.name not in ("runner.py", "jobs.py"):
            assert "ray" not in mods, f"{path} imports ray"
        if path.name != "tracking.py":
            assert "mlflow" not in mods, f"{path} imports mlflow"


def test_science_imports_neither_engine_ray_nor_mlflow():
    for path in (ROOT / "tda").rglob("*.py"):
        part = path.relative_to(ROOT / "tda").parts[0]
        if part == "steps":
            continue
        forbidden = {"ray", "mlflow"} if part == "report" else {"pipelines", "ray", "mlflow"}
        assert not top(imported_modules(path)) & forbidden, path


def test_import_linter_contracts_hold():
    """The same rules as import-linter contracts in pyproject.toml, checked by the tool itself."""
    import subprocess
    import sys

    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_new_engine_module_is_covered_by_the_contracts(tmp_path):
    """The contracts name whole packages: a module added to `pipelines` (here a copy of the code with a
    probe module) that imports mlflow, ray or tda breaks them without any list being edited."""
    import os
    import shutil
    import subprocess
    import sys

    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("pipelines", "tda"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "pipelines" / "steps" / "probe.py").write_text("import mlflow\nimport ray\nimport tda\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    for target in ("mlflow", "ray", "tda"):
        assert f"pipelines.steps.probe -> {target}" in done.stdout, done.stdout
