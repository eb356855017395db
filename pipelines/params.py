"""What a step kind declares: its Params model, and the field types the engine gives meaning to.

- `StepRef`: the name of another step; fields of this type (alone, in lists, dicts or optionals) are
  the edges of the DAG, and the referenced step's cache key (not its name) enters the cache key.
- `InputPath`: a file or folder a step reads (a local path, relative to the spec file, or a pyarrow
  filesystem URI); its size and modification time enter the cache key, so an edited file re-runs.
- `StorePath`: a location written inside the store; absolute paths and `..` are refused.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import PydanticCustomError, core_schema

Loc = tuple[str | int, ...]


def find_values(value: Any, cls: type, loc: Loc = ()) -> Iterator[tuple[Loc, Any]]:
    """Every instance of `cls` inside a params value (models, dicts, lists), with its field path."""
    if isinstance(value, cls):
        yield loc, value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from find_values(getattr(value, name), cls, (*loc, name))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from find_values(item, cls, (*loc, key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from find_values(item, cls, (*loc, i))


_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: str | Path) -> bool:
    """True for `scheme://…` locations (s3://, gs://, hdfs://, file://), False for a plain path."""
    return isinstance(location, str) and bool(_URI.match(location))


class StepRef(str):
    """The name of another step in the same spec."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> Any:
        return core_schema.no_info_after_validator_function(cls, core_schema.str_schema())

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: GetJsonSchemaHandler) -> Any:
        return {"type": "string", "x-step-ref": True, "description": "the name of another step"}


class InputPath(str):
    """A path the step reads; a relative local path is resolved against the spec file's folder.

    A subclass may name `virtual_prefixes` (e.g. "sklearn:") for sources that are not files: such
    values are kept as written and not fingerprinted.
    """

    virtual_prefixes: ClassVar[tuple[str, ...]] = ()

    @property
    def is_virtual(self) -> bool:
        return any(self.startswith(prefix) for prefix in self.virtual_prefixes)

    @classmethod
    def _resolve(cls, value: str, info: core_schema.ValidationInfo) -> InputPath:
        if is_uri(value) or cls(value).is_virtual or not info.context or "spec_dir" not in info.context:
            return cls(value)
        try:
            path = Path(value).expanduser()
        except RuntimeError:  # `~user/…` of a user this machine does not know
            raise ValueError(
                f"{value!r}: cannot expand '~' (no such user here); give the full path"
            ) from None
        if not path.is_absolute():
            path = Path(info.context["spec_dir"]) / path
        return cls(str(path.resolve()))

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> Any:
        return core_schema.with_info_after_validator_function(
            cls._resolve, core_schema.str_schema(min_length=1)
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: GetJsonSchemaHandler) -> Any:
        return {"type": "string", "format": "path", "x-input-path": True}


class StorePath(str):
    """A relative location inside the store; it can never escape it."""

    @classmethod
    def _check(cls, value: str) -> StorePath:
        raw = value.replace("\\", "/")
        norm = posixpath.normpath(raw)
        if is_uri(value) or norm.startswith("/") or norm == "." or ".." in raw.split("/"):
            raise PydanticCustomError(
                "escapes_store",
                "path '{path}' would escape its folder in the store or replace all of it: give a "
                "relative path to a file or folder below it, without '.' or '..'",
                {"path": value},
            )
        return cls(norm)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> Any:
        return core_schema.no_info_after_validator_function(cls._check, core_schema.str_schema(min_length=1))

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: GetJsonSchemaHandler) -> Any:
        return {"type": "string", "x-store-path": True}


class Resources(BaseModel):
    """What one task of the step reserves on the Ray cluster."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(1.0, ge=0, description="CPU cores reserved by the step's task.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved by the step's task.")
    memory: int | None = Field(
        None, gt=0, description="Bytes of memory reserved (Ray schedules on it; null = none)."
    )
    custom: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources, e.g. {accelerator_type:H100: 1}."
    )


class StepParams(BaseModel):
    """Base of every step kind's Params model: the fields every step accepts.

    Subclasses declare `kind: Literal["name"]` and their own fields, each with a description.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Fields that never change a step's output, so they stay out of its cache key.
    non_semantic: ClassVar[frozenset[str]] = frozenset({"resources", "retries", "export", "description"})
    #: The step uses Ray Train, whose controller queries the Ray dashboard's state API: an embedded
    #: Ray starts its dashboard (about 4 s more) only when a step to execute says so.
    needs_ray_dashboard: ClassVar[bool] = False

    kind: str = Field(description="The step kind; selects the fields below.")
    description: str | None = Field(None, description="Free text shown by `tda show`.")
    resources: Resources = Field(
        default_factory=Resources, description="Ray resources reserved by the step's task."
    )
    retries: int = Field(
        0, ge=0, le=20, description="Times the step is re-run after an exception or a lost worker."
    )
    export: StorePath | None = Field(
        None,
        description="Also copy the step's table to <store>/exports/<export> (a relative path).",
    )

    def demands(self) -> dict[str, tuple[float, str]]:
        """Ray resources the step needs at its peak → (amount, the field that sets it). The runner
        refuses a run whose step needs more of a resource than the whole cluster has, before any step
        starts. A step that fans out (e.g. Ray Train workers) overrides this to add its workers."""
        res = self.resources
        out = {"CPU": (res.num_cpus, "resources.num_cpus"), "GPU": (res.num_gpus, "resources.num_gpus")}
        out.update({name: (amount, f"resources.custom.{name}") for name, amount in res.custom.items()})
        return out

    def check_references(self, steps: Mapping[str, StepParams]) -> list[tuple[Loc, str]]:
        """Spec-time checks against the other steps of the spec (e.g. that a step this one reads was
        made from the same model): (field path in this step, message) per problem, reported at that
        field when the spec is validated, before anything runs. `steps` is every step of the spec,
        each reference already known to exist. Default: none."""
        return []

    def semantic_params(self) -> dict[str, Any]:
        """The params that determine the output, as JSON-ready data."""
        return self.model_dump(mode="json", exclude=set(self.non_semantic))
