"""Nothing the project reads can run code: no unpickling anywhere in pipelines/, tda/ or benchmarks/.

A store is shared and its paths are computable from a spec, so a pickle loaded from it is code anyone
with write access runs on the next reader. The check walks the syntax tree (a call split over lines,
an alias such as `import pickle as pk` or `from torch import load` is still caught; a mention in a
docstring is not a call) and names file:line of every call that can unpickle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "tda", "benchmarks")
UNPICKLERS = {
    f"{module}.{name}"
    for module in ("pickle", "_pickle", "cloudpickle", "dill", "marshal")
    for name in ("load", "loads", "Unpickler")
} | {"joblib.load", "pandas.read_pickle", "shelve.open", "torch.serialization.load"}


def aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin for every import (`import numpy as np`: np -> numpy)."""
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                found[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                found[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return found


def dotted(node: ast.expr, names: dict[str, str]) -> str:
    """The called name with its import resolved (`pk.loads` -> `pickle.loads`); '' if not a plain name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return "." + ".".join(reversed(parts)) if parts else ""
    return ".".join([names.get(node.id, node.id), *reversed(parts)])


def keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords
    )


def unpickling_calls(source: str) -> list[tuple[int, str]]:
    """(line, what) of every call in `source` that can unpickle."""
    tree = ast.parse(source)
    names = aliases(tree)
    found = []
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        name = dotted(call.func, names)
        if name in UNPICKLERS or name.endswith(".read_pickle"):
            found.append((call.lineno, name))
        elif name == "torch.load" and not keyword_is(call, "weights_only", True):
            found.append((call.lineno, "torch.load without weights_only=True"))
        elif keyword_is(call, "weights_only", False) or keyword_is(call, "allow_pickle", True):
            bad = "weights_only=False" if keyword_is(call, "weights_only", False) else "allow_pickle=True"
            found.append((call.lineno, f"{name or 'a call'} with {bad}"))
    return found


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load(p, weights_only=False)",
        "import torch\ntorch.load(\n    p,\n    map_location='cpu',\n)",
        "from torch import load\nload(p)",
        "import pickle\npickle.load(f)",
        "import pickle as pk\npk.loads(b)",
        "from pickle import loads\nloads(b)",
        "import cloudpickle\ncloudpickle.loads(b)",
        "import joblib\njoblib.load(p)",
        "import numpy as np\nnp.load(p, allow_pickle=True)",
        "import pandas as pd\npd.read_pickle(p)",
        "import dill\ndill.load(f)",
        "frame.read_pickle(p)",
    ],
)
def test_the_check_finds_unpickling(snippet):
    assert unpickling_calls(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load(p, weights_only=True)",
        "import numpy as np\nnp.load(p)",
        "import pickle\npickle.dumps(x)",
        '"""torch.load(p, weights_only=False) in a docstring"""',
        "from safetensors.torch import load_file\nload_file(p)",
    ],
)
def test_the_check_passes_safe_reads(snippet):
    assert not unpickling_calls(snippet), snippet


def test_no_code_unpickles():
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, what in unpickling_calls(path.read_text(encoding="utf-8")):
                found.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not found, (
        "unpickling can run code planted in a shared store; read safetensors/JSON/Parquet instead: "
        + "; ".join(found)
    )
