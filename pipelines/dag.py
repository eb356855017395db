"""The graph of a spec: an edge from every `StepRef` field to the step it names.

Pure graph logic, no execution: unknown references and cycles are reported as spec errors at the
field that makes them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipelines.errors import SpecError
from pipelines.params import StepRef, find_values

Loc = tuple[str | int, ...]


def find_refs(value: Any) -> Iterator[tuple[Loc, str]]:
    """Every StepRef inside a params value, with its field path: (('inputs', 1), 'corpus')."""
    return ((loc, str(ref)) for loc, ref in find_values(value, StepRef))


@dataclass(frozen=True)
class Dag:
    """Steps in spec order, each step's upstream names, and a topological order."""

    steps: tuple[str, ...]
    upstream: dict[str, tuple[str, ...]]
    order: tuple[str, ...]

    def downstream(self, name: str) -> tuple[str, ...]:
        return tuple(s for s in self.steps if name in self.upstream[s])

    def descendants(self, names: set[str] | frozenset[str]) -> set[str]:
        """`names` and everything that depends on them, directly or not."""
        out = set(names)
        for step in self.order:
            if any(up in out for up in self.upstream[step]):
                out.add(step)
        return out

    def ancestors(self, name: str) -> set[str]:
        out: set[str] = set()
        todo = list(self.upstream[name])
        while todo:
            step = todo.pop()
            if step not in out:
                out.add(step)
                todo.extend(self.upstream[step])
        return out


def build_dag(spec: Any) -> Dag:
    """Derive the DAG of a validated spec; raise SpecError for unknown refs and cycles."""
    source = spec.source
    names = list(spec.steps)
    upstream: dict[str, tuple[str, ...]] = {}
    errors = []
    for name, params in spec.steps.items():
        deps: list[str] = []
        for loc, ref in find_refs(params):
            full = ("steps", name, *loc)
            if ref not in spec.steps:
                close = difflib.get_close_matches(ref, names, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                errors.append(
                    source.error(full, f"reference to unknown step {ref!r}{hint} (steps: {', '.join(names)})")
                )
            elif ref == name:
                errors.append(source.error(full, f"step {name!r} refers to itself"))
            elif ref not in deps:
                deps.append(ref)
        upstream[name] = tuple(deps)
    if errors:
        raise SpecError(errors)
    order = _topological_order(names, upstream)
    if order is None:
        cycle = _find_cycle(names, upstream)
        first = min(range(len(cycle)), key=lambda i: names.index(cycle[i]))
        cycle = cycle[first:] + cycle[:first]  # start at the member defined first
        where = source.error(("steps", cycle[0]), "")
        raise SpecError(f"{where}steps form a cycle: {' -> '.join([*cycle, cycle[0]])}")
    return Dag(steps=tuple(names), upstream=upstream, order=tuple(order))


def _topological_order(names: list[str], upstream: dict[str, tuple[str, ...]]) -> list[str] | None:
    """Kahn's algorithm, keeping spec order among ready steps; None if there is a cycle."""
    done: set[str] = set()
    order: list[str] = []
    while len(order) < len(names):
        ready = [n for n in names if n not in done and all(u in done for u in upstream[n])]
        if not ready:
            return None
        order.append(ready[0])
        done.add(ready[0])
    return order


def _find_cycle(names: list[str], upstream: dict[str, tuple[str, ...]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for up in upstream[node]:
            if state.get(up) == 1:
                return stack[stack.index(up) :]
            if up not in state and (found := visit(up)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for name in names:
        if name not in state and (cycle := visit(name)):
            return list(reversed(cycle))
    return []
