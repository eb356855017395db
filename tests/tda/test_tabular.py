"""load_tabular and tabular_tensors: sklearn sources, CSV and Parquet files, and every DataError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from tda.data.tabular import load_tabular, tabular_tensors
from tda.errors import DataError

SHAPES = {"digits": (1797, 64, 10), "breast_cancer": (569, 30, 2), "wine": (178, 13, 3), "iris": (150, 4, 3)}


def check_layout(df: pl.DataFrame, n: int, d: int) -> None:
    assert df.columns == ["example_id", *[f"x_{j}" for j in range(d)], "label", "group"]
    assert df.height == n
    assert df.schema["example_id"] == pl.Int64 and df.schema["label"] == pl.Int64
    assert df.schema["group"] == pl.String
    assert all(df.schema[f"x_{j}"] == pl.Float64 for j in range(d))


@pytest.fixture
def people() -> pl.DataFrame:
    """Two numeric features, a string feature, string labels, a group and an id column."""
    return pl.DataFrame(
        {
            "example_id": [10, 11, 12, 13, 14],
            "height": [1.5, 1.7, 1.9, 1.6, 1.8],
            "age": [30, 40, 50, 35, 45],
            "city": ["a", "b", "c", "d", "e"],
            "kind": ["cat", "dog", "cat", "bird", "dog"],
            "team": ["t1", "t1", "t2", "t2", None],
        }
    )


def write(frame: pl.DataFrame, path: Path) -> str:
    if path.suffix == ".csv":
        frame.write_csv(path)
    else:
        frame.write_parquet(path)
    return str(path)


class TestValidSklearn:
    @pytest.mark.parametrize("name", sorted(SHAPES))
    def test_layout_and_standardisation(self, name):
        n, d, n_classes = SHAPES[name]
        df = load_tabular(f"sklearn:{name}")
        check_layout(df, n, d)
        X = df.select(f"x_{j}" for j in range(d)).to_numpy()  # (n, d)
        np.testing.assert_allclose(X.mean(0), 0.0, atol=1e-12)
        stds = X.std(0)
        assert np.all(np.isclose(stds, 1.0) | np.isclose(stds, 0.0))  # digits has constant pixels
        assert df["label"].n_unique() == n_classes
        assert df["example_id"].to_list() == list(range(n))
        assert df["group"].null_count() == 0

    def test_class_names_become_groups(self):
        iris = load_tabular("sklearn:iris")
        assert sorted(iris["group"].unique()) == ["setosa", "versicolor", "virginica"]
        digits = load_tabular("sklearn:digits")
        assert set(digits.filter(pl.col("label") == 3)["group"]) == {"class_3"}

    def test_without_standardisation_keeps_the_values(self):
        from sklearn.datasets import load_wine

        df = load_tabular("sklearn:wine", standardize=False)
        np.testing.assert_array_equal(df.select(f"x_{j}" for j in range(13)).to_numpy(), load_wine().data)


class TestValidFiles:
    @pytest.mark.parametrize("suffix", [".csv", ".parquet"])
    def test_string_labels_ids_and_default_features(self, tmp_path, people, suffix):
        source = write(people, tmp_path / f"people{suffix}")
        df = load_tabular(source, label="kind", standardize=False)
        check_layout(df, 5, 2)
        assert df["example_id"].to_list() == [10, 11, 12, 13, 14]
        assert df["x_0"].to_list() == [1.5, 1.7, 1.9, 1.6, 1.8]  # city (a string) is left out
        assert df["label"].to_list() == [1, 2, 1, 0, 2]  # bird < cat < dog
        assert df["group"].to_list() == ["cat", "dog", "cat", "bird", "dog"]

    @pytest.mark.parametrize("suffix", [".csv", ".parquet"])
    def test_chosen_features_in_order_and_a_group_column(self, tmp_path, people, suffix):
        source = write(people, tmp_path / f"people{suffix}")
        df = load_tabular(source, features=["age", "height"], label="kind", group="team")
        check_layout(df, 5, 2)
        np.testing.assert_allclose(df["x_0"].to_numpy(), (np.array([30, 40, 50, 35, 45]) - 40) / np.sqrt(50))
        assert df["group"].to_list() == ["t1", "t1", "t2", "t2", None]

    def test_integer_labels_without_group_give_null_groups(self, tmp_path):
        frame = pl.DataFrame({"a": [1.0, 2.0, 3.0], "b": [5.0, 5.0, 5.0], "label": [0, 2, 2]})
        df = load_tabular(write(frame, tmp_path / "t.parquet"))
        assert df["label"].to_list() == [0, 2, 2]
        assert df["group"].null_count() == 3
        assert df["x_1"].to_list() == [0.0, 0.0, 0.0]  # a constant column is centred, scale 1

    def test_tabular_tensors_orders_features_numerically(self):
        d = 12
        columns = {f"x_{j}": [float(j), float(j) + 0.5] for j in range(d)}
        shuffled = {name: columns[name] for name in sorted(columns)}  # x_0, x_1, x_10, x_11, x_2, …
        df = pl.DataFrame({"example_id": [4, 7], **shuffled, "label": [0, 1], "group": ["a", None]})
        ids, X, y = tabular_tensors(df)
        assert ids.dtype == torch.int64 and X.dtype == torch.float64 and y.dtype == torch.int64
        assert ids.tolist() == [4, 7] and y.tolist() == [0, 1]
        assert X[0].tolist() == [float(j) for j in range(d)]

    def test_tabular_tensors_of_a_list_column(self):
        df = pl.DataFrame({"example_id": [0, 1], "x": [[1.0, 2.0], [3.0, 4.0]], "label": [1, 0]})
        _, X, _ = tabular_tensors(df)
        assert X.tolist() == [[1.0, 2.0], [3.0, 4.0]]


class TestInvalid:
    @pytest.fixture
    def csv(self, tmp_path, people) -> str:
        return write(people, tmp_path / "data.csv")

    def test_file_not_found(self, tmp_path):
        with pytest.raises(DataError, match=r"nope\.csv: no such file; check the path"):
            load_tabular(str(tmp_path / "nope.csv"))

    def test_unsupported_file_type(self, tmp_path):
        (tmp_path / "data.xlsx").write_text("x")
        with pytest.raises(DataError, match=r"file type '\.xlsx' is not supported"):
            load_tabular(str(tmp_path / "data.xlsx"))

    def test_unknown_sklearn_source(self):
        with pytest.raises(DataError, match=r"sklearn:mnist: unknown sklearn dataset 'mnist'.*digits"):
            load_tabular("sklearn:mnist")

    def test_missing_label_column(self, csv):
        message = r"data\.csv: no label column 'target'; columns are example_id, height, .*; set `label:`"
        with pytest.raises(DataError, match=message):
            load_tabular(csv, label="target")

    def test_missing_feature_columns(self, csv):
        with pytest.raises(
            DataError, match=r"data\.csv: no feature column\(s\) 'weight', 'size'; columns are"
        ):
            load_tabular(csv, features=["height", "weight", "size"], label="kind")

    def test_non_numeric_feature(self, tmp_path):
        frame = pl.DataFrame({"a": ["1.0", "2.5", "abc", "4"], "label": [0, 1, 0, 1]})
        source = write(frame, tmp_path / "data.csv")
        with pytest.raises(
            DataError, match=r"data\.csv: feature column 'a' is non-numeric: row 2 holds 'abc'"
        ):
            load_tabular(source, features=["a"])

    def test_non_numeric_value_in_a_default_feature(self, tmp_path):
        (tmp_path / "d.csv").write_text("a,b,label\n1,x,0\n3,4,1\n")
        with pytest.raises(DataError, match=r"d\.csv: feature column 'b' is non-numeric: row 0 holds 'x'"):
            load_tabular(str(tmp_path / "d.csv"))

    def test_nan_in_feature(self, tmp_path):
        frame = pl.DataFrame({"a": [1.0, 2.0, float("nan")], "label": [0, 1, 0]})
        source = write(frame, tmp_path / "data.parquet")
        with pytest.raises(
            DataError, match=r"feature column 'a' is missing a value \(null or NaN\) at row 2"
        ):
            load_tabular(source)

    @pytest.mark.parametrize("value", [float("inf"), float("-inf")])
    def test_infinite_feature(self, tmp_path, value):
        frame = pl.DataFrame({"a": [1.0, 2.0, 3.0], "b": [1.0, 2.0, value], "label": [0, 1, 0]})
        source = write(frame, tmp_path / "data.parquet")
        with pytest.raises(DataError) as info:
            load_tabular(source)
        assert str(info.value) == (
            f"{source}: feature column 'b' holds {value} at row 2; "
            "drop that row or replace the value with a finite number"
        )

    def test_infinite_feature_in_a_csv_and_unstandardised(self, tmp_path):
        (tmp_path / "data.csv").write_text("a,b,label\n1,2,0\n3,-inf,1\n")
        with pytest.raises(DataError, match=r"data\.csv: feature column 'b' holds -inf at row 1; drop"):
            load_tabular(str(tmp_path / "data.csv"), standardize=False)

    def test_infinite_feature_of_an_sklearn_source(self, monkeypatch):
        import sklearn.datasets

        original = sklearn.datasets.load_iris

        def broken_iris():
            bunch = original()
            bunch.data[5, 3] = np.inf
            return bunch

        monkeypatch.setattr(sklearn.datasets, "load_iris", broken_iris)
        with pytest.raises(
            DataError, match=r"sklearn:iris: feature column 'petal width \(cm\)' holds inf at row 5"
        ):
            load_tabular("sklearn:iris")

    @pytest.mark.parametrize(
        "values",
        [
            [1.0, 2.0, 1e308],  # x² overflows: std = inf would zero the column
            [1e308, 1e308, 1.0],  # the sum overflows: mean = inf
            [-1e308, 1e308, 0.0],  # x − mean overflows
            [0.0, 1e-200, 0.0],  # the variance underflows to 0: x / 0
        ],
    )
    def test_feature_that_cannot_be_standardised(self, tmp_path, values):
        frame = pl.DataFrame({"a": [1.0, 2.0, 3.0], "big": values, "label": [0, 1, 0]})
        source = write(frame, tmp_path / "data.parquet")
        with pytest.raises(DataError) as info:
            load_tabular(source)
        message = str(info.value)
        assert message.startswith(f"{source}: feature column 'big' cannot be standardised in float64"), (
            message
        )
        assert "rescale that column" in message and "\n" not in message
        row = int(np.argmax(np.abs(values)))
        assert f"at row {row}" in message
        kept = load_tabular(source, standardize=False)  # finite values are fine unscaled
        assert kept["x_1"].to_list() == values

    @pytest.mark.parametrize("value", [float("inf"), float("nan")])
    def test_tabular_tensors_refuse_non_finite_columns(self, value):
        df = pl.DataFrame({"example_id": [0, 1], "x_0": [1.0, 2.0], "x_1": [value, 0.0], "label": [0, 1]})
        with pytest.raises(
            DataError, match=r"table: feature column 'x_1' (holds inf|is missing a value .*) at row 0"
        ):
            tabular_tensors(df)

    @pytest.mark.parametrize(
        ("x", "message"),
        [
            ([[1.0, 2.0], [3.0, float("-inf")]], r"table: feature column 'x\[1\]' holds -inf at row 1"),
            (
                [[1.0, float("nan")], [3.0, 4.0]],
                r"table: feature column 'x\[1\]' is missing a value .* at row 0",
            ),
            ([[1.0, None], [3.0, 4.0]], r"table: feature column 'x\[1\]' is missing a value .* at row 0"),
            ([[1.0, 2.0], None], r"table: list column 'x' is missing a value at row 1"),
            ([[1.0, 2.0], [3.0]], r"table: list column 'x' holds 1 value\(s\) at row 1 but 2 at row 0"),
        ],
    )
    def test_tabular_tensors_refuse_bad_list_columns(self, x, message):
        df = pl.DataFrame({"example_id": [0, 1], "x": x, "label": [0, 1]})
        with pytest.raises(DataError, match=message):
            tabular_tensors(df)

    def test_null_in_feature(self, tmp_path):
        (tmp_path / "data.csv").write_text("a,b,label\n1,2,0\n3,,1\n")
        with pytest.raises(DataError, match=r"data\.csv: feature column 'b' is missing a value .* at row 1"):
            load_tabular(str(tmp_path / "data.csv"))

    def test_null_label(self, tmp_path):
        (tmp_path / "data.csv").write_text("a,label\n1,0\n2,1\n3,\n")
        with pytest.raises(DataError, match=r"data\.csv: label column 'label' is missing a value at row 2"):
            load_tabular(str(tmp_path / "data.csv"))

    def test_nan_label(self, tmp_path):
        frame = pl.DataFrame({"a": [1.0, 2.0, 3.0], "label": [0.0, float("nan"), 1.0]})
        with pytest.raises(DataError, match="label column 'label' is missing a value at row 1"):
            load_tabular(write(frame, tmp_path / "data.parquet"))

    def test_fewer_than_two_classes(self, tmp_path):
        frame = pl.DataFrame({"a": [1.0, 2.0], "label": ["yes", "yes"]})
        with pytest.raises(DataError, match=r"data\.csv: label column 'label' holds 1 class .*at least 2"):
            load_tabular(write(frame, tmp_path / "data.csv"))

    @pytest.mark.parametrize("value", [-1, 0.5])
    def test_labels_that_are_not_class_indices(self, tmp_path, value):
        frame = pl.DataFrame({"a": [1.0, 2.0, 3.0], "label": [0.0, 1.0, float(value)]})
        with pytest.raises(DataError, match=r"label column 'label' holds .* at row 2; numeric labels must"):
            load_tabular(write(frame, tmp_path / "data.parquet"))

    def test_missing_group_column(self, csv):
        with pytest.raises(DataError, match=r"data\.csv: no group column 'teem'; .*fix `group:`"):
            load_tabular(csv, label="kind", group="teem")

    def test_duplicate_example_ids(self, tmp_path):
        frame = pl.DataFrame({"example_id": [1, 1], "a": [1.0, 2.0], "label": [0, 1]})
        with pytest.raises(DataError, match="column 'example_id' must hold unique integers"):
            load_tabular(write(frame, tmp_path / "data.parquet"))

    def test_no_numeric_features(self, tmp_path):
        frame = pl.DataFrame({"name": ["a", "b"], "label": [0, 1]})
        with pytest.raises(DataError, match="no numeric feature columns; .*set `features:`"):
            load_tabular(write(frame, tmp_path / "data.parquet"))

    def test_empty_file(self, tmp_path):
        (tmp_path / "data.csv").write_text("a,label\n")
        with pytest.raises(DataError, match="has no rows"):
            load_tabular(str(tmp_path / "data.csv"))

    def test_tabular_tensors_of_another_layout(self):
        with pytest.raises(DataError, match="no column.*label.*expected the tabular layout"):
            tabular_tensors(pl.DataFrame({"example_id": [0], "x_0": [1.0]}))

    def test_messages_are_one_line(self, csv):
        with pytest.raises(DataError) as info:
            load_tabular(csv, label="target")
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("csv", "message"),
    [
        ("a,b,label\n1,2,0\n3,inf,1\n", "d.csv: feature column 'b' holds inf at row 1"),
        ("a,b,label\n1,2,0\n3,1e308,1\n", "d.csv: feature column 'b' cannot be standardised in float64"),
    ],
)
def test_a_step_refuses_non_finite_or_overflowing_features(failed_error, tmp_path, csv, message):
    """Through a real run: the data step fails with the one line, nothing downstream trains on NaN."""
    (tmp_path / "d.csv").write_text(csv)
    error = failed_error(
        "version: 1\nname: t\nsteps:\n  d:\n    kind: tabular_dataset\n    source: d.csv\n", "d"
    )
    assert error.startswith("DataError: ") and message in error, error
