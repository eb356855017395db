"""Spec files: YAML (safe loader only) → Pydantic models, with `FILE:LINE:COL: PATH: message` errors.

The Spec model is built from the registry: `steps` is a mapping name → a discriminated union on
`kind` of every registered Params model, so `tda schema` and validation always agree.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model

from pipelines import registry
from pipelines.errors import RegistryError, SpecError
from pipelines.params import StepParams

STEP_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
Loc = tuple[str | int, ...]


class RunSettings(BaseModel):
    """Where and how the spec runs; every field can be overridden on the command line."""

    model_config = ConfigDict(extra="forbid")

    store: str = Field(
        "./tda-store",
        description=(
            "Outputs, run records and the default MLflow database: a folder (relative to the spec), or a "
            "pyarrow filesystem URI (s3://bucket/prefix, gs://…, file:///abs/path), which needs "
            "run.tracking_uri."
        ),
    )
    ray_address: str | None = Field(
        None, description='null = embedded local Ray; "auto" or "ray://host:10001" = a cluster.'
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; null = sqlite:///<store>/mlflow.db (a store on a URI needs one).",
    )
    num_cpus: int | None = Field(
        None, gt=0, description="CPUs of the embedded Ray (null = all of this machine's)."
    )
    show: list[str] = Field(
        default_factory=list, description="Steps whose (small) tables `tda run` prints when the run ends."
    )


class SpecBase(BaseModel):
    """A whole study: named steps whose references to each other form a DAG."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = Field(description="Spec format version; always 1.")
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$", description="The study's name (MLflow experiment).")
    description: str | None = Field(None, description="Free text.")
    seed: int = Field(0, description="Default `seed` of every step that has one and leaves it null.")
    run: RunSettings = Field(default_factory=RunSettings, description="Where and how to run.")
    steps: dict[str, StepParams] = Field(description="Ordered mapping: step name → step.")

    _source: SpecSource | None = PrivateAttr(None)

    @property
    def source(self) -> SpecSource:
        """The file the spec came from and where each field sits in it."""
        return self._source or SpecSource(path="<spec>", text="")


@dataclass
class SpecSource:
    """Where a spec came from: the file, and `path → 'FILE:LINE:COL'` for every node in it."""

    path: str
    text: str
    locations: dict[Loc, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    nodes: int = 0  # values constructed from the YAML (a bound on alias expansion)

    @property
    def folder(self) -> Path:
        return Path(self.path).resolve().parent

    def where(self, loc: Loc) -> str:
        """The location of `loc`, or of its nearest ancestor that has one."""
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.locations:
                return self.locations[loc[:end]]
        return self.path

    def error(self, loc: Loc, message: str) -> str:
        return f"{self.where(loc)}: {dotted(loc)}: {message}" if loc else f"{self.where(loc)}: {message}"


def dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ---------------------------------------------------------------- YAML with locations


def _mark(path: str, mark: yaml.Mark | None) -> str:
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path


_PLAIN_TAGS = {"map", "seq", "str", "int", "float", "bool", "null", "timestamp"}


def _check_tag(node: yaml.Node, source: SpecSource, loc: Loc) -> None:
    tag = node.tag or ""
    if tag.startswith("tag:yaml.org,2002:") and tag.rsplit(":", 1)[1] in _PLAIN_TAGS:
        return
    shown = "!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml") else tag
    raise SpecError(
        f"{_mark(source.path, node.start_mark)}: {dotted(loc) or 'spec'}: the tag {shown!r} is not "
        "allowed: a spec is plain data and never executes code; remove the tag"
    )


MAX_NODES = 100_000  # a spec is a page of settings; aliases that expand past this are an attack


def _construct(loader: yaml.SafeLoader, node: yaml.Node, loc: Loc, source: SpecSource) -> Any:
    _check_tag(node, source, loc)
    source.nodes += 1
    if source.nodes > MAX_NODES:
        raise SpecError(
            f"{_mark(source.path, node.start_mark)}: {dotted(loc) or 'spec'}: the spec expands to more than "
            f"{MAX_NODES:,} values (aliases repeated inside aliases?); write it out without them"
        )
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _construct(loader, key_node, loc, source)
            here = _mark(source.path, key_node.start_mark)
            if isinstance(key, list | dict):  # unhashable: it could be no key of a mapping
                raise SpecError(
                    f"{here}: {dotted(loc) or 'spec'}: a key must be a plain value (text or a number), not "
                    f"a {type(key).__name__}; write the key as text"
                )
            if key in out:
                first = source.locations[(*loc, key)]
                what = "duplicate step name" if loc == ("steps",) else "duplicate key"
                raise SpecError(f"{here}: {dotted((*loc, key))}: {what} {key!r} (first at {first})")
            source.locations[(*loc, key)] = here
            out[key] = _construct(loader, value_node, (*loc, key), source)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            source.locations[(*loc, i)] = _mark(source.path, item.start_mark)
            items.append(_construct(loader, item, (*loc, i), source))
        return items
    return loader.construct_object(node, deep=True)


def parse_yaml(text: str, path: str) -> tuple[Any, SpecSource]:
    """Parse YAML text with the safe loader, recording each node's location."""
    source = SpecSource(path=path, text=text)
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        source.locations[()] = _mark(path, root.start_mark if root else None)
        data = _construct(loader, root, (), source) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        raise SpecError(f"{_mark(path, mark)}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:  # e.g. a character YAML does not allow, without a mark
        raise SpecError(f"{path}: YAML error: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    except RecursionError:  # nesting thousands deep, or an alias inside its own anchor
        raise SpecError(
            f"{path}: the YAML nests too deeply (or an alias refers to the value that contains it); "
            "a spec is a few levels of mappings and lists"
        ) from None
    finally:
        loader.dispose()
    return data, source


# ---------------------------------------------------------------- overrides


def apply_override(data: dict[str, Any], assignment: str, source: SpecSource) -> None:
    """Apply `steps.x.field=value` (value parsed as YAML) to the raw spec data."""
    dotted_path, sep, raw = assignment.partition("=")
    if not sep or not dotted_path.strip():
        raise SpecError(f"{source.path}: --set {assignment!r}: expected PATH=VALUE, e.g. steps.x.n=3")
    parts = dotted_path.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        mark = getattr(exc, "problem_mark", None)
        at = f" at column {mark.column + 1}" if mark is not None else ""
        raise SpecError(
            f"{source.path}: --set {assignment!r}: the value is not valid YAML ({problem}{at}); "
            "quote it, e.g. --set 'steps.x.field=\"text\"'"
        ) from None
    node = data
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            if parts[0] == "steps" and i == 1:
                steps = data.get("steps")
                known = ", ".join(map(str, steps)) if isinstance(steps, dict) and steps else "none"
                raise SpecError(f"{source.path}: --set {assignment}: no step {part!r}; steps: {known}")
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    source.locations[tuple(parts)] = f"{source.path}: --set {assignment}"
    source.overrides.append(assignment)


# ---------------------------------------------------------------- validation


def spec_model(kinds: dict[str, registry.StepKind] | None = None) -> type[SpecBase]:
    """The Spec model for `kinds` (default: all registered now), a discriminated union on `kind`."""
    models = tuple(kind.params for kind in (kinds or registry.kinds()).values())
    if not models:
        step_type: Any = StepParams
    elif len(models) == 1:
        step_type = models[0]
    else:
        step_type = Annotated[Union[models], Field(discriminator="kind")]  # noqa: UP007
    return create_model(
        "Spec",
        __base__=SpecBase,
        __doc__=SpecBase.__doc__,
        steps=(dict[str, step_type], Field(description="Ordered mapping: step name → step.")),
    )


def _precheck_steps(data: dict[str, Any], source: SpecSource) -> list[str]:
    """Errors pydantic would phrase poorly: bad step names, missing or unknown kinds."""
    errors: list[str] = []
    steps = data.get("steps")
    if not isinstance(steps, dict):
        return errors
    known = registry.kinds()
    for name, step in steps.items():
        loc: Loc = ("steps", name)
        if not isinstance(name, str) or not STEP_NAME.match(name):
            errors.append(
                source.error(
                    loc,
                    f"step name {name!r} is not allowed: names become table "
                    "names and must stay inside the store; use letters, digits and _ "
                    "(starting with a letter or _, at most 64)",
                )
            )
        elif not isinstance(step, dict):
            errors.append(source.error(loc, "a step must be a mapping with a `kind:` field"))
        elif "kind" not in step:
            errors.append(
                source.error(loc, f"missing required field 'kind'; known kinds: {', '.join(known)}")
            )
        elif not isinstance(step["kind"], str):
            errors.append(
                source.error(
                    (*loc, "kind"),
                    f"kind must be the name of a step kind (text), not a {type(step['kind']).__name__}; "
                    f"known kinds: {', '.join(known)}",
                )
            )
        elif step["kind"] not in known:
            errors.append(source.error((*loc, "kind"), registry.unknown_kind_message(step["kind"], known)))
    return errors


def _pydantic_errors(
    exc: ValidationError, data: dict[str, Any], model: type[BaseModel], source: SpecSource
) -> list[str]:
    out = []
    for err in exc.errors():
        loc: Loc = tuple(err["loc"])
        if len(loc) > 2 and loc[0] == "steps":  # drop the union's tag from the path
            step = (data.get("steps") or {}).get(loc[1]) or {}
            if isinstance(step, dict) and loc[2] == step.get("kind"):
                loc = loc[:2] + loc[3:]
        msg = err["msg"]
        if err["type"] == "value_error" and "error" in err.get("ctx", {}):
            msg = str(err["ctx"]["error"])  # the validator's own sentence, without "Value error, "
        elif err["type"] == "extra_forbidden":
            msg = _unknown_field_message(loc, data, model)
        elif err["type"] == "missing":  # point at the mapping that lacks the field
            out.append(f"{source.where(loc[:-1])}: {dotted(loc)}: missing required field {loc[-1]!r}")
            continue
        out.append(source.error(loc, msg))
    return out


def _unknown_field_message(loc: Loc, data: dict[str, Any], model: type[BaseModel]) -> str:
    fields: list[str] = []
    if len(loc) == 3 and loc[0] == "steps":
        name = ((data.get("steps") or {}).get(loc[1]) or {}).get("kind")
        kind = registry.kinds().get(name) if isinstance(name, str) else None
        fields = list(kind.params.model_fields) if kind else []
    elif len(loc) == 1:
        fields = list(model.model_fields)
    elif len(loc) == 2 and loc[0] == "run":
        fields = list(RunSettings.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    valid = f" valid fields: {', '.join(fields)}" if fields else ""
    return f"unknown field {loc[-1]!r}{hint}{valid}"


def validate(data: Any, source: SpecSource) -> SpecBase:
    """Validate parsed spec data; every problem found becomes one line of a SpecError."""
    if not isinstance(data, dict):
        raise SpecError(source.error((), "a spec must be a mapping with version, name and steps"))
    errors = _precheck_steps(data, source)
    if errors:
        raise SpecError(errors)
    try:
        model = spec_model()
    except RegistryError as exc:
        raise SpecError(f"{source.path}: {exc}") from None
    try:
        spec = model.model_validate(data, context={"spec_dir": str(source.folder)})
    except ValidationError as exc:
        raise SpecError(_pydantic_errors(exc, data, model, source)) from None
    spec = _fill_seeds(spec)
    spec._source = source
    from pipelines.dag import build_dag

    build_dag(spec)  # unknown references and cycles are spec errors too
    problems = [
        source.error(("steps", name, *loc), message)
        for name, step in spec.steps.items()
        for loc, message in step.check_references(spec.steps)
    ]
    if problems:
        raise SpecError(problems)
    unknown = [(i, name) for i, name in enumerate(spec.run.show) if name not in spec.steps]
    if unknown:
        raise SpecError(
            [
                source.error(("run", "show", i), f"no step named {name!r}; name a step of this spec")
                for i, name in unknown
            ]
        )
    return spec


def _fill_seeds(spec: SpecBase) -> SpecBase:
    """Every step field named `seed` or `*_seed` that is null takes the spec's seed."""
    steps = {}
    for name, step in spec.steps.items():
        fields = [f for f in type(step).model_fields if f == "seed" or f.endswith("_seed")]
        update = {f: spec.seed for f in fields if getattr(step, f) is None}
        steps[name] = step.model_copy(update=update) if update else step
    return spec.model_copy(update={"steps": steps})


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SpecBase:
    """Read, override and validate a spec file. Raises SpecError with one line per problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read the spec: {exc}") from None
    data, source = parse_yaml(text, str(path))
    for assignment in overrides:
        if not isinstance(data, dict):
            break
        apply_override(data, assignment, source)
    return validate(data, source)


def loads_spec(text: str, path: str = "<spec>", spec_dir: str | None = None) -> SpecBase:
    """Validate a spec given as YAML text (tests, notebooks)."""
    data, source = parse_yaml(text, path)
    if spec_dir is not None:
        source.path = str(Path(spec_dir) / Path(path).name)
    return validate(data, source)


def json_schema(kinds: dict[str, registry.StepKind] | None = None) -> dict[str, Any]:
    """The JSON Schema of a spec file with `kinds` (default: every registered kind)."""
    schema = spec_model(kinds).model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "tda pipeline spec"
    return schema
