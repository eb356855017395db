"""`--set` overrides of the wrong type or shape: one line located at the override, exit status 2."""

from __future__ import annotations

import pytest

from pipelines import load_spec
from pipelines.cli import main
from pipelines.errors import SpecError

SPEC = "version: 1\nname: toy\nsteps:\n  base:\n    kind: numbers\n    n: 5\n"

CASES = {
    "steps.base.n=abc": "steps.base.n: Input should be a valid integer",
    "steps.base.n=[1, 2]": "steps.base.n: Input should be a valid integer",
    "steps.base.resources=[1, 2]": "steps.base.resources: Input should be a valid dictionary",
    "steps.base.resources.num_cpus=-1": (
        "steps.base.resources.num_cpus: Input should be greater than or equal to 0"
    ),
    "steps.base.bogus=1": "steps.base.bogus: unknown field 'bogus'",
    "steps.base.kind=[numbers]": "steps.base.kind: kind must be the name of a step kind (text), not a list",
    "steps.base.kind=nmbers": "steps.base.kind: unknown step kind 'nmbers'; did you mean 'numbers'?",
    "steps.base=3": "steps.base: a step must be a mapping with a `kind:` field",
    "steps.nosuch.n=1": "--set steps.nosuch.n=1: no step 'nosuch'; steps: base",
    "run.num_cpus=0": "run.num_cpus: Input should be greater than 0",
    "run=[a]": "run: Input should be a valid dictionary",
    "seed=1.5": "seed: Input should be a valid integer",
    "version=2": "version: Input should be 1",
    "steps.base.n": "expected PATH=VALUE",
}


@pytest.mark.parametrize("assignment", sorted(CASES))
def test_a_set_of_the_wrong_type_is_one_line_at_the_override(write_spec, capsys, assignment):
    path = write_spec(SPEC)
    with pytest.raises(SpecError) as info:
        load_spec(path, [assignment])
    (line,) = str(info.value).splitlines()
    assert line.startswith(str(path)) and CASES[assignment] in line, line
    if "=" in assignment and not assignment.startswith("steps.nosuch"):
        assert f"--set {assignment}" in line, line  # located at the override, not in the file
    capsys.readouterr()
    assert main(["validate", str(path), f"--set={assignment}"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == line and "Traceback" not in err
