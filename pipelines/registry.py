"""Step kinds: a Params model plus a function, found through the entry-point group `pipelines.steps`.

A package adds kinds without touching this one:

    [project.entry-points."pipelines.steps"]
    my_kind = "my_package.steps:STEP"        # STEP = StepKind("my_kind", MyParams, my_fn)

`PIPELINES_PLUGINS="pkg.module,other.module:ATTR"` adds kinds from modules that are not installed as
entry points (each names a `StepKind`, or a module whose `STEP` or `STEPS` attribute does).
"""

from __future__ import annotations

import difflib
import importlib
import os
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from pipelines.errors import RegistryError
from pipelines.params import StepParams

ENTRY_POINT_GROUP = "pipelines.steps"
PLUGINS_ENV = "PIPELINES_PLUGINS"


@dataclass(frozen=True)
class StepKind:
    """One step kind.

    Attributes:
        name: the `kind:` value in a spec.
        params: the Pydantic model of the step's fields (a `StepParams` subclass whose `kind` field
            is `Literal[name]`).
        fn: `fn(params, ctx) -> table | None`; a returned Polars/Arrow table becomes the step's
            output table; a step may instead write files under `ctx.output_dir`.
        version: the code version; bump it when the function's output changes for the same params,
            so cached outputs are recomputed.
        fingerprint: optional `fingerprint(params) -> str` of external state the output depends on
            (the engine already fingerprints `InputPath` fields).
    """

    name: str
    params: type[StepParams]
    fn: Callable[..., Any]
    version: str = "1"
    fingerprint: Callable[[StepParams], str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        declared = self.params.model_fields.get("kind")
        allowed = typing.get_args(declared.annotation) if declared else ()
        if allowed != (self.name,):
            raise RegistryError(
                f'step kind {self.name!r}: {self.params.__name__}.kind must be `kind: Literal["{self.name}"]`'
            )

    @property
    def summary(self) -> str:
        """The first line of the Params model's docstring."""
        return (self.params.__doc__ or "").strip().splitlines()[0] if self.params.__doc__ else ""


_registered: dict[str, StepKind] = {}
_loaded: dict[str, StepKind] | None = None


def register(kind: StepKind) -> StepKind:
    """Add a kind from code (tests, notebooks); wins over an entry point of the same name."""
    _registered[kind.name] = kind
    return kind


def _kinds_in(obj: Any, origin: str) -> Iterable[StepKind]:
    if isinstance(obj, StepKind):
        return [obj]
    for attr in ("STEPS", "STEP"):
        found = getattr(obj, attr, None)
        if found is not None:
            return list(found) if isinstance(found, list | tuple) else [found]
    raise RegistryError(f"{origin}: expected a StepKind, or a module with STEP or STEPS")


def _load_plugin(spec: str) -> Iterable[StepKind]:
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name.strip())
    except ImportError as exc:
        raise RegistryError(f"{PLUGINS_ENV}: cannot import {module_name!r}: {exc}") from exc
    return _kinds_in(getattr(obj, attr) if attr else obj, f"{PLUGINS_ENV} {spec}")


def installed_kinds() -> dict[str, StepKind]:
    """The kinds of installed packages' entry points only (no plugins from the environment)."""
    kinds: dict[str, StepKind] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
        except Exception as exc:
            raise RegistryError(f"step kind {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
        for kind in _kinds_in(loaded, f"entry point {ep.name} = {ep.value}"):
            kinds[kind.name] = kind
    return dict(sorted(kinds.items()))


def _discover() -> dict[str, StepKind]:
    kinds = installed_kinds()
    for spec in filter(None, os.environ.get(PLUGINS_ENV, "").split(",")):
        kinds.update({k.name: k for k in _load_plugin(spec)})
    return kinds


def kinds() -> dict[str, StepKind]:
    """Every known kind, name → StepKind, sorted by name."""
    global _loaded
    if _loaded is None:
        _loaded = _discover()
    merged = {**_loaded, **_registered}
    return dict(sorted(merged.items()))


def get(name: str) -> StepKind:
    """The kind called `name`; an unknown name raises with the closest known names."""
    known = kinds()
    if name not in known:
        raise RegistryError(unknown_kind_message(name, known))
    return known[name]


def unknown_kind_message(name: str, known: Iterable[str]) -> str:
    known = list(known)
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"unknown step kind {name!r}; {hint}known kinds: {', '.join(known)}"
