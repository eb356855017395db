"""`sql`: a table from a Polars SQL query over other steps' tables."""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import Field

from pipelines.context import StepContext
from pipelines.params import StepParams, StepRef
from pipelines.query import run_sql
from pipelines.registry import StepKind


class SqlParams(StepParams):
    """Query other steps' tables with SQL (Polars SQL); each input is a view named after its step."""

    kind: Literal["sql"] = "sql"
    inputs: list[StepRef] = Field(min_length=1, description="The steps whose tables the query reads.")
    query: str = Field(min_length=1, description="A SELECT (or WITH … SELECT) statement.")


def sql_table(params: SqlParams, ctx: StepContext) -> pl.DataFrame:
    return run_sql(params.query, {name: ctx.table(name) for name in params.inputs})


STEP = StepKind("sql", SqlParams, sql_table, version="1")
