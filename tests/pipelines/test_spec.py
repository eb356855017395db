"""Spec loading: every error class is one line `FILE:LINE:COL: PATH: message`."""

from __future__ import annotations

import json

import pytest

from pipelines import SpecError, load_spec
from pipelines.cli import main
from pipelines.params import StepRef
from pipelines.spec import json_schema

GOOD = """
version: 1
name: toy
seed: 7
steps:
  base:
    kind: numbers
    n: 5
  plus:
    kind: add
    data: base
    amount: 2
"""


def errors_of(write_spec, text: str, overrides=()) -> list[str]:
    path = write_spec(text)
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides)
    return [line.replace(str(path), "SPEC") for line in str(info.value).splitlines()]


class TestValid:
    def test_loads_steps_in_order_with_refs_and_seed(self, write_spec):
        spec = load_spec(write_spec(GOOD))
        assert list(spec.steps) == ["base", "plus"]
        assert isinstance(spec.steps["plus"].data, StepRef)
        assert spec.steps["base"].seed == 7  # the spec seed fills a step's null seed

    def test_set_overrides_a_field(self, write_spec):
        spec = load_spec(write_spec(GOOD), ["steps.plus.amount=5", "steps.base.resources.num_cpus=2"])
        assert spec.steps["plus"].amount == 5
        assert spec.steps["base"].resources.num_cpus == 2.0

    def test_merge_keys_and_anchors_are_plain_yaml(self, write_spec):
        spec = load_spec(
            write_spec("""
            version: 1
            name: toy
            steps:
              a: &common
                kind: numbers
                n: 3
              b:
                <<: *common
                start: 10
            """)
        )
        assert spec.steps["b"].n == 3 and spec.steps["b"].start == 10

    def test_schema_has_every_kind_and_step_refs(self):
        schema = json_schema()
        text = json.dumps(schema)
        for kind in ("read", "sql", "numbers", "add"):
            assert f'"const": "{kind}"' in text
        assert '"x-step-ref": true' in text
        assert (
            schema["properties"]["steps"]["additionalProperties"]["discriminator"]["propertyName"] == "kind"
        )


class TestInvalid:
    def test_yaml_syntax(self, write_spec):
        errs = errors_of(write_spec, "version: 1\nname: toy\nsteps:\n  a:\n    kind: [numbers\n")
        assert len(errs) == 1 and errs[0].startswith("SPEC:6:1: YAML syntax error:")

    def test_unknown_kind_suggests_closest(self, write_spec):
        errs = errors_of(write_spec, GOOD.replace("kind: numbers", "kind: numbrs"))
        assert len(errs) == 1
        head, known = errs[0].split(" known kinds: ")
        assert head == "SPEC:6:5: steps.base.kind: unknown step kind 'numbrs'; did you mean 'numbers'?"
        assert {"add", "numbers", "read", "sql"} <= set(known.split(", "))

    def test_unknown_field(self, write_spec):
        errs = errors_of(write_spec, GOOD.replace("    amount: 2", "    amout: 2"))
        assert errs[0].startswith(
            "SPEC:11:5: steps.plus.amout: unknown field 'amout'; did you mean 'amount'?"
        )

    def test_wrong_type(self, write_spec):
        errs = errors_of(write_spec, GOOD.replace("n: 5", "n: five"))
        assert errs == [
            "SPEC:7:5: steps.base.n: Input should be a valid integer, unable to parse string as an integer"
        ]

    def test_out_of_range(self, write_spec):
        errs = errors_of(write_spec, GOOD.replace("n: 5", "n: 0"))
        assert errs == ["SPEC:7:5: steps.base.n: Input should be greater than 0"]

    def test_missing_required_field(self, write_spec):
        errs = errors_of(write_spec, GOOD.replace("    n: 5\n", ""))
        assert errs == ["SPEC:5:3: steps.base.n: missing required field 'n'"]

    def test_missing_top_level_field(self, write_spec):
        errs = errors_of(write_spec, GOOD.replace("version: 1\n", ""))
        assert errs == ["SPEC:1:1: version: missing required field 'version'"]

    def test_several_errors_one_line_each(self, write_spec):
        errs = errors_of(write_spec, GOOD.replace("n: 5", "n: 0").replace("amount: 2", "amount: x"))
        assert [e.split(": ")[0:2] for e in errs] == [
            ["SPEC:7:5", "steps.base.n"],
            ["SPEC:11:5", "steps.plus.amount"],
        ]

    def test_reference_to_unknown_step(self, write_spec):
        errs = errors_of(write_spec, GOOD.replace("data: base", "data: bse"))
        assert errs == [
            "SPEC:10:5: steps.plus.data: reference to unknown step 'bse'; did you mean 'base'? "
            "(steps: base, plus)"
        ]

    def test_reference_in_a_list(self, write_spec):
        errs = errors_of(
            write_spec, GOOD + "  q:\n    kind: sql\n    inputs: [base, nope]\n    query: SELECT 1\n"
        )
        assert errs[0].startswith("SPEC:14:20: steps.q.inputs[1]: reference to unknown step 'nope'")

    def test_cycle_names_its_members(self, write_spec):
        text = """
        version: 1
        name: toy
        steps:
          a:
            kind: add
            data: c
          b:
            kind: add
            data: a
          c:
            kind: add
            data: b
        """
        errs = errors_of(write_spec, text)
        assert len(errs) == 1
        assert errs[0].startswith("SPEC:4:3: steps.a: steps form a cycle: ")
        assert set(errs[0].split("cycle: ")[1].split(" -> ")) == {"a", "b", "c"}

    def test_duplicate_step_names(self, write_spec):
        errs = errors_of(write_spec, GOOD + "  base:\n    kind: numbers\n    n: 1\n")
        assert errs == ["SPEC:12:3: steps.base: duplicate step name 'base' (first at SPEC:5:3)"]

    @pytest.mark.parametrize("name", ["../evil", "a/b", "..", "9lives"])
    def test_step_name_that_would_escape_the_store(self, write_spec, name):
        errs = errors_of(
            write_spec, GOOD.replace("  base:", f"  '{name}':").replace("data: base", f"data: '{name}'")
        )
        assert errs[0].startswith(f"SPEC:5:3: steps.{name}: step name {name!r} is not allowed")

    @pytest.mark.parametrize(
        "target", ["../outside.csv", "/etc/passwd.csv", "a/../../b.csv", ".", "./", "a/..", "a/../b"]
    )
    def test_path_that_would_escape_the_store(self, write_spec, target):
        errs = errors_of(write_spec, GOOD + f"    export: '{target}'\n")
        assert errs == [
            f"SPEC:12:5: steps.plus.export: path {target!r} would escape its folder in the store or "
            "replace all of it: give a relative path to a file or folder below it, without '.' or '..'"
        ]

    def test_python_tag_is_refused(self, write_spec):
        errs = errors_of(write_spec, GOOD.replace("n: 5", "n: !!python/object/apply:os.system ['echo hi']"))
        assert errs == [
            "SPEC:7:8: steps.base.n: the tag '!!python/object/apply:os.system' is not allowed: "
            "a spec is plain data and never executes code; remove the tag"
        ]

    def test_python_tag_on_a_mapping_is_refused(self, write_spec):
        errs = errors_of(write_spec, GOOD.replace("  plus:", "  plus: !!python/object:os.Foo"))
        assert errs[0].startswith("SPEC:8:9: steps.plus: the tag '!!python/object:os.Foo' is not allowed")

    def test_override_error_names_the_override(self, write_spec):
        errs = errors_of(write_spec, GOOD, ["steps.base.n=-3"])
        assert errs == ["SPEC: --set steps.base.n=-3: steps.base.n: Input should be greater than 0"]

    def test_override_of_unknown_step(self, write_spec):
        errs = errors_of(write_spec, GOOD, ["steps.nope.n=3"])
        assert errs == ["SPEC: --set steps.nope.n=3: no step 'nope'; steps: base, plus"]

    def test_missing_input_file_is_a_spec_error_at_plan_time(self, write_spec, tmp_path):
        from pipelines.runner import plan, resolve_store

        path = write_spec("version: 1\nname: r\nsteps:\n  raw:\n    kind: read\n    path: nothere.csv\n")
        spec = load_spec(path)
        with pytest.raises(
            SpecError, match=r"spec.yaml:6:5: steps.raw.path: no such file or folder: .*nothere.csv"
        ):
            plan(spec, resolve_store(spec, str(tmp_path / "store")))


class TestCli:
    def test_validate_exit_codes(self, write_spec, capsys):
        assert main(["validate", str(write_spec(GOOD))]) == 0
        assert "valid; 2 steps in order: base → plus" in capsys.readouterr().out
        assert main(["validate", str(write_spec(GOOD.replace("n: 5", "n: 0")))]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith("spec.yaml:7:5: steps.base.n: Input should be greater than 0")
        assert "Traceback" not in err and len(err.splitlines()) == 1

    def test_schema_command_prints_json_schema(self, capsys):
        assert main(["schema"]) == 0
        assert json.loads(capsys.readouterr().out)["title"] == "tda pipeline spec"
