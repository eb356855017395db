"""Property-based fuzz of spec files: random YAML-able structures, with and without the real top-level
keys, real step kinds and real field names with values of every type. Loading and validating them
(`pipelines.load_spec`, and `tda validate` through `pipelines.cli.main`) either succeeds or raises the
project's SpecError / PipelineError, whose every line is one located message: never another exception,
never a traceback."""

from __future__ import annotations

import contextlib
import io
import itertools
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines import load_spec, registry
from pipelines.cli import main
from pipelines.errors import PipelineError, SpecError
from pipelines.spec import RunSettings, SpecBase

KINDS = sorted(registry.kinds())
FIELDS = sorted(
    {name for kind in registry.kinds().values() for name in kind.params.model_fields}
    | set(SpecBase.model_fields)
    | set(RunSettings.model_fields)
)
TOP = ["version", "name", "description", "seed", "run", "steps"]
NAMES = ["a", "b", "corpus", "data", "model", "x", "_1", "1a", "../x", "a b", "", "kind"]

text = st.text(max_size=12) | st.sampled_from([*NAMES, *KINDS, *FIELDS, "~nobody_here/x", "auto", "a\nb"])
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | text
)
keys = st.sampled_from([*FIELDS, *TOP, *NAMES]) | st.text(max_size=8) | st.integers(-3, 3) | st.booleans()
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def steps(draw):
    """A mapping of step names to steps: mostly a real kind with some of its real fields."""
    out = {}
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(NAMES) | st.text(max_size=6))
        if draw(st.integers(0, 9)) == 0:
            out[name] = draw(values)
            continue
        step = {} if draw(st.integers(0, 9)) == 0 else {"kind": draw(st.sampled_from(KINDS) | scalars)}
        fields = list(registry.kinds()[step["kind"]].params.model_fields) if step.get("kind") in KINDS else []
        for field in draw(st.lists(st.sampled_from(fields or FIELDS), max_size=5, unique=True)):
            step[field] = draw(values | st.sampled_from(list(out) or NAMES))
        out[name] = step
    return out


@st.composite
def specs(draw):
    """A whole spec: the real top-level keys (each possibly missing or of a wrong type), plus noise."""
    if draw(st.integers(0, 14)) == 0:
        return draw(values)
    spec: dict = {}
    for key in TOP:
        choice = draw(st.integers(0, 5))
        if choice == 0:
            continue
        if choice == 1:
            spec[key] = draw(values)
        elif key == "version":
            spec[key] = 1
        elif key == "name":
            spec[key] = draw(st.sampled_from(["fuzz", "a.b-c_1"]) | text)
        elif key == "seed":
            spec[key] = draw(st.integers(-5, 2**40))
        elif key == "run":
            spec[key] = draw(
                st.dictionaries(st.sampled_from(list(RunSettings.model_fields)), values, max_size=3)
            )
        elif key == "steps":
            spec[key] = draw(steps())
        else:
            spec[key] = draw(text)
    for key, value in draw(st.dictionaries(keys, values, max_size=2)).items():
        spec.setdefault(key, value)
    return spec


def _one_line_each(exc: PipelineError, path: Path) -> None:
    lines = str(exc).splitlines()
    assert lines, exc
    if isinstance(exc, SpecError):
        assert len(lines) == len(exc.messages), exc.messages  # no message spans two lines
        for line in lines:
            assert line.startswith(str(path)), line
    else:
        assert len(lines) == 1, lines


_counter = itertools.count()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    data=specs(),
    overrides=st.lists(
        st.sampled_from(
            [
                "steps.a.n=abc",
                "steps.a=[1, 2]",
                "run=3",
                "steps.a.kind=numbers",
                "name.x=1",
                "x=",
                "=1",
                "steps..n=1",
                "steps.a.resources.num_cpus=-1",
                "steps.a.bogus={x: 1}",
                "seed=[",
                "steps=[]",
            ]
        ),
        max_size=2,
    ),
)
def test_any_structure_loads_or_fails_in_located_lines(tmp_path_factory, data, overrides):
    folder = tmp_path_factory.getbasetemp() / "fuzz"
    folder.mkdir(exist_ok=True)
    path = folder / f"spec-{next(_counter)}.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    try:
        load_spec(path, overrides)
    except PipelineError as exc:
        _one_line_each(exc, path)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["validate", str(path), *(f"--set={o}" for o in overrides)])
    assert code in (0, 2), err.getvalue()
    assert "Traceback" not in err.getvalue()
    if code == 2:
        assert all(line.startswith(str(path)) for line in err.getvalue().splitlines()), err.getvalue()


RAW = {
    "recursive alias": "version: 1\nname: x\nsteps: &s {a: *s}\n",
    "recursive list": "a: &x [*x]\n",
    "alias bomb": "a: &a [1,1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
    "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f,*f]\nh: [*g,*g,*g,*g,*g,*g,*g,*g,*g,*g]\n",
    "deep nesting": "a: " + "[" * 1200 + "]" * 1200 + "\n",
    "a list as a key": "? [a, b]\n: 1\nversion: 1\n",
    "a mapping as a key": "steps:\n  ? {a: 1}\n  : {kind: numbers}\n",
    "a list as the kind": "version: 1\nname: x\nsteps:\n  a: {kind: [numbers]}\n",
    "a mapping as the kind": "version: 1\nname: x\nsteps:\n  a: {kind: {x: 1}}\n",
    "a newline in a key": 'version: 1\nname: x\nsteps:\n  a: {kind: numbers, n: 1, "b\\nc": 1}\n',
    "a line separator in a step name": 'version: 1\nname: x\nsteps:\n  "a\\u2028b": {kind: numbers, n: 1}\n',
    "a newline in an export": 'version: 1\nname: x\nsteps:\n  a: {kind: numbers, n: 1, export: "x\\n/.."}\n',
    "an unknown user's home": (
        "version: 1\nname: x\nsteps:\n  a: {kind: load_corpus, path: '~nobody_xyz/c.jsonl'}\n"
    ),
    "a NUL in a path": 'version: 1\nname: x\nsteps:\n  a: {kind: load_corpus, path: "c\\0.jsonl"}\n',
    "not UTF-8": b"version: 1\nname: \xff\xfe\n",
    "a BOM and tabs": "\ufeffversion: 1\n\tname: x\n",
    "an empty file": "",
    "a document stream": "version: 1\n---\nversion: 1\n",
}


@pytest.mark.parametrize("case", sorted(RAW))
def test_hostile_yaml_is_located_lines(tmp_path, capsys, case):
    path = tmp_path / "spec.yaml"
    raw = RAW[case]
    path.write_bytes(raw if isinstance(raw, bytes) else raw.encode("utf-8"))
    with pytest.raises(PipelineError) as info:
        load_spec(path)
    _one_line_each(info.value, path)
    capsys.readouterr()
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(line.startswith(str(path)) for line in err.splitlines()), err
