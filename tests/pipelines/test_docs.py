"""The step-kind docs and the spec JSON Schema are generated from the Params models and kept current."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.docs import step_docs
from pipelines.registry import installed_kinds, kinds
from pipelines.spec import json_schema

ROOT = Path(__file__).resolve().parents[2]


def test_committed_step_docs_are_current():
    for name, text in step_docs(installed_kinds()).items():
        committed = ROOT / "docs" / "steps" / name
        assert committed.is_file() and committed.read_text() == text, f"run `make docs` ({committed})"


def test_committed_schema_is_current():
    committed = json.loads((ROOT / "spec.schema.json").read_text())
    assert committed == json_schema(installed_kinds()), "run `make docs` to regenerate spec.schema.json"


def test_every_field_of_every_kind_has_a_description():
    for kind in kinds().values():
        for name, field in kind.params.model_fields.items():
            assert name == "kind" or field.description, f"{kind.name}.{name} has no description"


def test_a_kind_page_lists_its_fields_with_types_and_bounds():
    page = step_docs(kinds())["numbers.md"]
    assert "| `n` | integer | required | How many rows. (> 0) |" in page
