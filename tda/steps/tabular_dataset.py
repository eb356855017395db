"""`tabular_dataset`: a bundled scikit-learn data set or a Parquet/CSV file → the tabular table."""

from __future__ import annotations

from typing import ClassVar, Literal

import polars as pl
from pydantic import Field

from pipelines import InputPath, StepContext, StepKind, StepParams


class DataSource(InputPath):
    """A file path, or `sklearn:NAME` for a data set bundled with scikit-learn."""

    virtual_prefixes: ClassVar[tuple[str, ...]] = ("sklearn:",)


class TabularDatasetParams(StepParams):
    """Load tabular data (features + an integer class label) into the tabular layout."""

    kind: Literal["tabular_dataset"] = "tabular_dataset"
    source: DataSource = Field(
        description="sklearn:digits | sklearn:breast_cancer | sklearn:wine | sklearn:iris, or a Parquet/CSV "
        "path (relative to the spec file)."
    )
    features: list[str] | None = Field(
        None, description="Feature columns of a file (null = every numeric column but the label)."
    )
    label: str = Field("label", description="The label column of a file (integers or strings).")
    group: str | None = Field(None, description="A column copied to `group` (null = the class name).")
    standardize: bool = Field(True, description="Scale every feature to zero mean and unit variance.")


def tabular_dataset(params: TabularDatasetParams, ctx: StepContext) -> pl.DataFrame:
    from tda.data.tabular import load_tabular

    table = load_tabular(str(params.source), params.features, params.label, params.group, params.standardize)
    ctx.log_metrics(
        {"features": sum(c.startswith("x_") for c in table.columns), "classes": table["label"].n_unique()}
    )
    return table


STEP = StepKind("tabular_dataset", TabularDatasetParams, tabular_dataset, version="1")
