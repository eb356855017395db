"""Tabular classification data in the project's *tabular* layout, and the tensors models train on.

    example_id int64 | x_0 … x_{d-1} float64 | label int64 | group str (may be null)

Sources are scikit-learn's bundled datasets (`sklearn:digits`, `sklearn:breast_cancer`, `sklearn:wine`,
`sklearn:iris`; no download) or a `.parquet` / `.csv` file. Features are renamed x_0, x_1, … in the
order they were chosen (by default every numeric column, and every string column that holds a number:
one stray value in a numeric column is an error, not a dropped feature); string labels become class
indices in sorted order, integer labels are kept and must be 0, 1, …. Standardisation uses the
mean and (population) standard deviation of ALL rows, before any train/target split: attribution
studies retrain on many subsets of one fixed table, and a per-subset scaling would make every
retrained model see different inputs. Constant columns are centred and keep scale 1.

Every feature value must be a finite number: null, NaN and ±inf are refused wherever a feature matrix
is built (`load_tabular`, for files and sklearn sources alike, and `tabular_tensors`, for x_* columns
and a list column `x`), and so is a column whose standardisation is not finite in float64 (|x| near
1e308 overflows x² or the sum; a spread near 1e-200 underflows the variance): it must be rescaled.

Every problem a user can cause raises `DataError` with one line naming the source, the column (and
the row, counted from 0 without the header) and the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import Tensor

from tda.errors import DataError

SKLEARN_SOURCES = ("digits", "breast_cancer", "wine", "iris")
SOURCE_HINT = "use a .parquet or .csv file or one of sklearn:" + "|".join(SKLEARN_SOURCES)
FEATURE_COLUMN = re.compile(r"x_(\d+)")
STRING_TYPES = (pl.String, pl.Categorical, pl.Enum)


@dataclass(frozen=True)
class RawTable:
    """A source as read, before checks: the frame, its name for messages, and sklearn's class names."""

    frame: pl.DataFrame
    where: str
    class_names: list[str] | None = None


def load_tabular(
    source: str,
    features: list[str] | None = None,
    label: str = "label",
    group: str | None = None,
    standardize: bool = True,
) -> pl.DataFrame:
    """Read a classification table into the tabular layout.

    Args:
        source: `sklearn:digits|breast_cancer|wine|iris`, or the path of a .parquet or .csv file.
        features: the feature columns, in the order they become x_0, x_1, …; None = every numeric
            column but the label, `example_id` and the group column.
        label: the label column: non-negative integers (kept as they are) or strings (mapped to
            0, 1, … in sorted order). sklearn sources name theirs "label".
        group: a column whose values (as strings) become `group`. Without one, `group` holds the
            class name for sklearn sources ("setosa", "class_3"), the label for string labels, else null.
        standardize: centre every feature and divide by its standard deviation over all rows.

    Returns:
        The table: example_id int64 (a file's own `example_id` column, else 0..n-1), x_* float64,
        label int64, group str.

    Raises:
        DataError: a missing file or column, a non-numeric feature, a missing or infinite value, a column
            too large (or too finely spread) to standardise in float64, fewer than 2 classes.
    """
    raw = read_source(source)
    frame, where = raw.frame, raw.where
    if frame.height == 0:
        raise DataError(f"{where}: the table has no rows; point `source:` at a file with data")
    if label not in frame.columns:
        raise DataError(f"{where}: no label column {label!r}; columns are {_listing(frame)}; set `label:`")
    columns = _feature_columns(frame, where, features, label, group)
    X = feature_matrix(frame, where, columns)  # (n, d)
    y, label_names = _labels(frame[label], where)
    groups = _groups(raw, group, y, label_names)
    if standardize:
        X = standardized(X, where, columns)
    return _tabular_frame(_example_ids(frame, where), X, y, groups)


def tabular_tensors(df: pl.DataFrame) -> tuple[Tensor, Tensor, Tensor]:
    """(example_ids int64 (n,), X float64 (n, d), y int64 (n,)) of a tabular-layout table.

    The features are the x_* columns in numeric order (x_0, x_1, …, x_10), or a list column `x`.
    """
    missing = [name for name in ("example_id", "label") if name not in df.columns]
    columns = x_columns(df)
    if missing or not (columns or "x" in df.columns):
        absent = missing + ([] if columns or "x" in df.columns else ["x_0…"])
        raise DataError(
            f"table: no column(s) {', '.join(absent)}; columns are {_listing(df)}; "
            "expected the tabular layout (load it with load_tabular)"
        )
    if columns:
        X = df.select(columns).cast(pl.Float64).to_numpy()  # (n, d)
    else:
        X = _list_features(df["x"], "table")  # (n, d)
        columns = [f"x[{j}]" for j in range(X.shape[1])]
    check_finite(X, "table", columns)
    ids = torch.tensor(df["example_id"].cast(pl.Int64).to_numpy(), dtype=torch.int64)
    y = torch.tensor(df["label"].cast(pl.Int64).to_numpy(), dtype=torch.int64)
    return ids, torch.tensor(X, dtype=torch.float64), y


def x_columns(df: pl.DataFrame) -> list[str]:
    """The x_<i> columns sorted by i (x_2 before x_10)."""
    found = [(int(m.group(1)), name) for name in df.columns if (m := FEATURE_COLUMN.fullmatch(name))]
    return [name for _, name in sorted(found)]


def standardized(X: np.ndarray, where: str, columns: list[str]) -> np.ndarray:
    """(X − mean) / std per column over all rows; a constant column is centred and keeps scale 1.

    DataError naming the column when its mean, std or scaled values are not finite in float64.
    """
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        mean = X.mean(axis=0)  # (d,)
        scale = X.std(axis=0)  # (d,)
        scale[np.ptp(X, axis=0) == 0] = 1.0
        Z = (X - mean) / scale  # (n, d)
    bad = np.flatnonzero(~(np.isfinite(mean) & np.isfinite(scale) & (scale > 0) & np.isfinite(Z).all(axis=0)))
    if len(bad):
        j = int(bad[0])
        row = int(np.argmax(np.abs(X[:, j])))
        raise DataError(
            f"{where}: feature column {columns[j]!r} cannot be standardised in float64 (mean {mean[j]:.3g}, "
            f"std {scale[j]:.3g}; its largest |value| {abs(X[row, j]):.3g} is at row {row}); "
            "rescale that column to a moderate range (multiply or divide it by a power of 10)"
        )
    return Z


def check_finite(X: np.ndarray, where: str, columns: list[str]) -> None:
    """DataError naming the first column (in order) holding a null/NaN or ±inf, and its first such row."""
    finite = np.isfinite(X)  # (n, d)
    if finite.all():
        return
    j = int(np.flatnonzero(~finite.all(axis=0))[0])
    row = int(np.flatnonzero(~finite[:, j])[0])
    if np.isnan(X[row, j]):
        raise DataError(
            f"{where}: feature column {columns[j]!r} is missing a value (null or NaN) at row {row}; "
            "drop or impute that row"
        )
    raise DataError(
        f"{where}: feature column {columns[j]!r} holds {X[row, j]} at row {row}; "
        "drop that row or replace the value with a finite number"
    )


def _list_features(series: pl.Series, where: str) -> np.ndarray:
    """A list column of equal-length numeric lists as float64 (n, d); nulls inside become NaN."""
    rows = series.to_list()
    if missing := [i for i, row in enumerate(rows) if row is None]:
        raise DataError(
            f"{where}: list column {series.name!r} is missing a value at row {missing[0]}; drop that row"
        )
    lengths = [len(row) for row in rows]
    if odd := [i for i, k in enumerate(lengths) if k != lengths[0]]:
        raise DataError(
            f"{where}: list column {series.name!r} holds {lengths[odd[0]]} value(s) at row {odd[0]} but "
            f"{lengths[0]} at row 0; every row needs the same number of features"
        )
    try:
        return np.array(rows, dtype=np.float64).reshape(len(rows), -1)  # (n, d)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"{where}: list column {series.name!r} holds values that are not numbers "
            f"({' '.join(str(exc).split())}); store the features as lists of floats"
        ) from None


# --- reading ------------------------------------------------------------------------------
def read_source(source: str) -> RawTable:
    """The raw frame of an sklearn dataset or a .parquet/.csv file."""
    if source.startswith("sklearn:"):
        return _read_sklearn(source)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{source}: no such file; check the path, or {SOURCE_HINT}")
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".pq", ".csv"):
        raise DataError(f"{source}: file type {suffix or '(none)'!r} is not supported; {SOURCE_HINT}")
    try:
        frame = pl.read_csv(path, infer_schema_length=None) if suffix == ".csv" else pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{source}: unreadable {suffix[1:]} file ({reason}); fix or re-export it") from exc
    return RawTable(frame, source)


def _read_sklearn(source: str) -> RawTable:
    """A bundled scikit-learn dataset: its features, `label` (int64), and its class names."""
    import sklearn.datasets

    name = source.removeprefix("sklearn:")
    if name not in SKLEARN_SOURCES:
        raise DataError(f"{source}: unknown sklearn dataset {name!r}; {SOURCE_HINT}")
    bunch = getattr(sklearn.datasets, f"load_{name}")()
    frame = pl.DataFrame(
        np.asarray(bunch.data, dtype=np.float64), schema=[str(f) for f in bunch.feature_names]
    )
    frame = frame.with_columns(pl.Series("label", np.asarray(bunch.target, dtype=np.int64)))
    names = [n if isinstance(n, str) else f"class_{n}" for n in bunch.target_names.tolist()]
    return RawTable(frame, source, names)


# --- checks and conversions -----------------------------------------------------------------
def _listing(frame: pl.DataFrame) -> str:
    return ", ".join(frame.columns)


def _feature_columns(
    frame: pl.DataFrame, where: str, features: list[str] | None, label: str, group: str | None
) -> list[str]:
    """The chosen feature columns, checked to exist; if None, every non-reserved column that is numeric
    or a string column holding at least one number (a numeric column with a stray value, which
    `feature_matrix` then reports, rather than a silently dropped feature)."""
    if features is None:
        reserved = {label, "example_id", group}
        chosen = [n for n in frame.columns if n not in reserved and _looks_numeric(frame[n])]
        if not chosen:
            raise DataError(
                f"{where}: no numeric feature columns; columns are {_listing(frame)}; set `features:`"
            )
        return chosen
    missing = [name for name in features if name not in frame.columns]
    if missing:
        raise DataError(
            f"{where}: no feature column(s) {', '.join(map(repr, missing))}; "
            f"columns are {_listing(frame)}; fix `features:`"
        )
    if not features:
        raise DataError(f"{where}: `features:` is empty; name at least one column or leave it out")
    return list(features)


def _looks_numeric(series: pl.Series) -> bool:
    if series.dtype.is_numeric():
        return True
    if not isinstance(series.dtype, STRING_TYPES):
        return False
    return series.cast(pl.String).cast(pl.Float64, strict=False).is_not_null().any()


def feature_matrix(frame: pl.DataFrame, where: str, columns: list[str]) -> np.ndarray:
    """The feature columns as float64 (n, d), rejecting non-numeric values, nulls/NaNs and ±inf."""
    numeric = [_numeric(frame[name], where) for name in columns]
    X = pl.DataFrame(numeric).to_numpy().astype(np.float64)  # (n, d); nulls become NaN
    check_finite(X, where, columns)
    return X


def _numeric(series: pl.Series, where: str) -> pl.Series:
    """A column cast to float64; DataError naming the first value that is not a number."""
    if series.dtype.is_numeric():
        return series.cast(pl.Float64)
    try:
        cast = series.cast(pl.Float64, strict=False)
    except pl.exceptions.PolarsError as exc:
        raise DataError(
            f"{where}: feature column {series.name!r} has type {series.dtype}, not numeric; "
            "drop it from `features:`"
        ) from exc
    bad = (cast.is_null() & series.is_not_null()).arg_true()
    if len(bad):
        row = int(bad[0])
        raise DataError(
            f"{where}: feature column {series.name!r} is non-numeric: row {row} holds {series[row]!r}; "
            "fix the value or drop the column from `features:`"
        )
    return cast


def _labels(series: pl.Series, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Class indices (n,) int64, and the sorted label strings when the labels were strings."""
    nulls = series.is_null() | series.is_nan() if series.dtype.is_float() else series.is_null()
    if len(bad := nulls.arg_true()):
        raise DataError(
            f"{where}: label column {series.name!r} is missing a value at row {bad[0]}; drop that row"
        )
    names = None
    if isinstance(series.dtype, STRING_TYPES):
        values = series.cast(pl.String).to_numpy().astype(str)
        names = np.unique(values)  # sorted
        y = np.searchsorted(names, values).astype(np.int64)
    elif series.dtype.is_numeric() or series.dtype == pl.Boolean:
        y = _integer_labels(series, where)
    else:
        raise DataError(
            f"{where}: label column {series.name!r} has type {series.dtype}; use integers or strings"
        )
    classes = np.unique(y)
    if len(classes) < 2:
        raise DataError(
            f"{where}: label column {series.name!r} holds {len(classes)} class ({series[0]!r}); "
            "classification needs at least 2 classes"
        )
    return y, names


def _integer_labels(series: pl.Series, where: str) -> np.ndarray:
    """Numeric labels as int64 (n,); they must be whole and non-negative (they index classes)."""
    values = series.cast(pl.Float64).to_numpy()
    bad = np.flatnonzero((values != np.round(values)) | (values < 0))
    if len(bad):
        row = int(bad[0])
        raise DataError(
            f"{where}: label column {series.name!r} holds {series[row]!r} at row {row}; "
            "numeric labels must be class indices 0, 1, … (or use string labels)"
        )
    return series.cast(pl.Int64).to_numpy()


def _groups(raw: RawTable, group: str | None, y: np.ndarray, label_names: np.ndarray | None) -> pl.Series:
    """The `group` column: the named column as strings, else class names, else null."""
    frame, where = raw.frame, raw.where
    if group is not None:
        if group not in frame.columns:
            raise DataError(
                f"{where}: no group column {group!r}; columns are {_listing(frame)}; fix `group:`"
            )
        return frame[group].cast(pl.String).alias("group")
    if raw.class_names is not None:
        return pl.Series("group", np.asarray(raw.class_names, dtype=object)[y], dtype=pl.String)
    if label_names is not None:
        return pl.Series("group", label_names[y], dtype=pl.String)
    return pl.Series("group", [None] * len(y), dtype=pl.String)


def _example_ids(frame: pl.DataFrame, where: str) -> np.ndarray:
    """The file's own `example_id` column (unique integers) if it has one, else 0..n-1."""
    if "example_id" not in frame.columns:
        return np.arange(frame.height, dtype=np.int64)
    ids = frame["example_id"]
    if not ids.dtype.is_integer() or ids.null_count() or ids.n_unique() != len(ids):
        raise DataError(
            f"{where}: column 'example_id' must hold unique integers without nulls; "
            "fix it or drop the column to number the rows 0..n-1"
        )
    return ids.cast(pl.Int64).to_numpy()


def _tabular_frame(ids: np.ndarray, X: np.ndarray, y: np.ndarray, groups: pl.Series) -> pl.DataFrame:
    features = pl.DataFrame(X, schema=[f"x_{j}" for j in range(X.shape[1])], orient="row")
    return pl.concat(
        [
            pl.DataFrame({"example_id": pl.Series(ids, dtype=pl.Int64)}),
            features.cast(pl.Float64),
            pl.DataFrame({"label": pl.Series(y, dtype=pl.Int64)}),
            groups.to_frame(),
        ],
        how="horizontal",
    )
