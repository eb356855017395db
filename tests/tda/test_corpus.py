"""load_corpus (JSONL, CSV, Parquet and Arrow shards, datasets' save_to_disk folders, column mapping,
ids, extra columns, split columns, every DataError) and synthetic_instructions (families,
determinism, balance, correct answers)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from tda.data.corpus import load_corpus
from tda.data.synthetic import CAPITALS, ELEMENTS, FAMILIES, WORDS, synthetic_instructions
from tda.errors import DataError

SCHEMA = {"example_id": pl.Int64, "prompt": pl.String, "response": pl.String, "group": pl.String}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def check_corpus(df: pl.DataFrame, n: int) -> None:
    assert dict(df.schema) == SCHEMA
    assert df.height == n


def raises_one_line(pattern: str, call, *args, **kwargs) -> str:
    """The DataError message of call(*args, **kwargs), checked against `pattern` and to be one line."""
    with pytest.raises(DataError, match=pattern) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


@pytest.fixture
def qa_records() -> list[dict]:
    return [
        {"prompt": "What is 2 + 2?", "response": "4", "group": "math"},
        {"prompt": "Capital of France?", "response": "Paris", "group": "facts"},
        {"prompt": "Reverse 'abc'.", "response": "cba", "group": None},
    ]


class TestValidSources:
    def test_jsonl_prompt_response(self, tmp_path, qa_records):
        df = load_corpus(write_jsonl(tmp_path / "qa.jsonl", qa_records))
        check_corpus(df, 3)
        assert df["example_id"].to_list() == [0, 1, 2]
        assert df["prompt"].to_list() == [r["prompt"] for r in qa_records]
        assert df["group"].to_list() == ["math", "facts", None]

    def test_jsonl_without_group_and_numeric_response(self, tmp_path):
        path = write_jsonl(
            tmp_path / "n.ndjson", [{"prompt": "2+2?", "response": 4}, {"prompt": "1+1?", "response": 2}]
        )
        df = load_corpus(path)
        check_corpus(df, 2)
        assert df["response"].to_list() == ["4", "2"] and df["group"].null_count() == 2

    def test_alpaca_mapped_through_columns(self, tmp_path):
        records = [
            {"instr": "Translate to French.", "ctx": "cat", "out": "chat", "task": "translate"},
            {"instr": "Name a color.", "ctx": "", "out": "blue", "task": "open"},
            {"instr": "Sum the list.", "ctx": None, "out": "6", "task": "math"},
        ]
        path = write_jsonl(tmp_path / "alpaca.jsonl", records)
        columns = {"instruction": "instr", "input": "ctx", "output": "out", "group": "task"}
        df = load_corpus(path, columns=columns)
        check_corpus(df, 3)
        assert df["prompt"].to_list() == ["Translate to French.\n\ncat", "Name a color.", "Sum the list."]
        assert df["response"].to_list() == ["chat", "blue", "6"]
        assert df["group"].to_list() == ["translate", "open", "math"]

    def test_alpaca_detected_without_columns(self, tmp_path):
        records = [
            {"instruction": "Say hi.", "input": "  ", "output": "hi"},
            {"instruction": "Add.", "output": "3"},
        ]
        df = load_corpus(write_jsonl(tmp_path / "a.jsonl", records))
        assert df["prompt"].to_list() == ["Say hi.", "Add."] and df["response"].to_list() == ["hi", "3"]

    def test_csv_keeps_numbers_as_text_and_multiline_fields(self, tmp_path):
        path = tmp_path / "qa.csv"
        path.write_text('question,answer,g\n"Line one\nline two",007,a\nHi?,hello,\n', encoding="utf-8")
        df = load_corpus(path, columns={"prompt": "question", "response": "answer", "group": "g"})
        check_corpus(df, 2)
        assert df["prompt"].to_list() == ["Line one\nline two", "Hi?"]
        assert df["response"].to_list() == ["007", "hello"] and df["group"].to_list() == ["a", None]

    def test_folder_of_parquet_shards(self, tmp_path):
        folder = tmp_path / "shards"
        folder.mkdir()
        for i, rows in enumerate([3, 2, 4]):  # written out of order: read in name order
            name = ["part-00000", "part-00001", "part-00002"][2 - i]
            pl.DataFrame(
                {"prompt": [f"{name} q{j}" for j in range(rows)], "response": ["a"] * rows}
            ).write_parquet(folder / f"{name}.parquet")
        (folder / "_SUCCESS").write_text("")
        (folder / "manifest.json").write_text("{}")
        df = load_corpus(folder)
        check_corpus(df, 9)
        assert df["example_id"].to_list() == list(range(9))
        assert df["prompt"].to_list()[:4] == [
            "part-00000 q0",
            "part-00000 q1",
            "part-00000 q2",
            "part-00000 q3",
        ]
        assert df["prompt"][4].startswith("part-00001") and df["prompt"][-1] == "part-00002 q2"
        assert load_corpus(folder).equals(df)  # stable

    def test_id_column(self, tmp_path, qa_records):
        records = [{**r, "uid": uid} for r, uid in zip(qa_records, [30, 10, 20], strict=True)]
        df = load_corpus(write_jsonl(tmp_path / "ids.jsonl", records), id_column="uid")
        assert df["example_id"].to_list() == [30, 10, 20]
        path = tmp_path / "ids.csv"
        path.write_text("id,prompt,response\n 5 ,p,r\n7,q,s\n", encoding="utf-8")
        assert load_corpus(path, id_column="id")["example_id"].to_list() == [5, 7]

    def test_format_overrides_suffix(self, tmp_path, qa_records):
        path = tmp_path / "qa.txt"
        path.write_text("".join(json.dumps(r) + "\n" for r in qa_records), encoding="utf-8")
        assert load_corpus(path, format="ndjson").height == 3

    def test_blank_lines_and_bom_in_jsonl(self, tmp_path):
        path = tmp_path / "b.jsonl"
        path.write_bytes(
            b'\xef\xbb\xbf{"prompt": "p1", "response": "r1"}\n\n{"prompt": "p2", "response": "r2"}\n'
        )
        assert load_corpus(path)["prompt"].to_list() == ["p1", "p2"]


class TestInvalidSources:
    def test_missing_path(self, tmp_path):
        raises_one_line(r"nope\.jsonl: no such file or folder", load_corpus, tmp_path / "nope.jsonl")

    def test_folder_without_supported_files(self, tmp_path):
        (tmp_path / "notes.txt").write_text("hi")
        raises_one_line(
            r"holds no \.jsonl/\.ndjson, \.parquet, \.csv or \.arrow files", load_corpus, tmp_path
        )

    def test_folder_mixing_formats(self, tmp_path, qa_records):
        write_jsonl(tmp_path / "a.jsonl", qa_records)
        pl.DataFrame(qa_records).write_csv(tmp_path / "b.csv")
        raises_one_line(r"mixes formats \(csv, jsonl\)", load_corpus, tmp_path)
        assert load_corpus(tmp_path, format="csv").height == 3

    def test_unsupported_suffix(self, tmp_path):
        (tmp_path / "x.txt").write_text("hi")
        raises_one_line(
            r"x\.txt: file type '\.txt' is not supported.*set format", load_corpus, tmp_path / "x.txt"
        )

    def test_missing_mapped_column(self, tmp_path, qa_records):
        path = write_jsonl(tmp_path / "qa.jsonl", qa_records)
        message = raises_one_line(
            r"qa\.jsonl: no column 'question' for the prompt; columns are 'prompt', 'response', 'group'; "
            r"set columns\.prompt",
            load_corpus,
            path,
            columns={"prompt": "question"},
        )
        assert str(path) in message

    def test_missing_default_column(self, tmp_path):
        path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "p", "answer": "a"}])
        raises_one_line(r"no column 'response' for the response.*set columns\.response", load_corpus, path)

    def test_bad_columns_argument(self, tmp_path, qa_records):
        path = write_jsonl(tmp_path / "qa.jsonl", qa_records)
        raises_one_line(r"columns: unknown field\(s\) 'promt'", load_corpus, path, columns={"promt": "p"})
        raises_one_line(
            r"mixes prompt/response with", load_corpus, path, columns={"prompt": "p", "output": "o"}
        )

    def test_empty_corpus(self, tmp_path):
        (tmp_path / "empty.jsonl").write_text("\n\n")
        raises_one_line(
            r"empty\.jsonl: the corpus is empty \(0 rows\)", load_corpus, tmp_path / "empty.jsonl"
        )
        (tmp_path / "header.csv").write_text("prompt,response\n")
        raises_one_line(r"header\.csv: the corpus is empty", load_corpus, tmp_path / "header.csv")

    def test_empty_folder_of_shards(self, tmp_path):
        for name in ("a", "b"):
            (tmp_path / f"{name}.jsonl").write_text("")
        raises_one_line(
            r"the corpus is empty: its shards \(a\.jsonl, b\.jsonl\) hold 0 rows", load_corpus, tmp_path
        )

    @pytest.mark.parametrize(
        ("value", "state"),
        [(None, "null"), ("", "empty"), ("  \t ", "empty")],
        ids=["null", "empty", "blank"],
    )
    def test_blank_text_in_jsonl_names_line(self, tmp_path, value, state):
        path = tmp_path / "t.jsonl"
        path.write_text(
            '{"prompt": "a", "response": "b"}\n\n' + json.dumps({"prompt": "c", "response": value}) + "\n",
            encoding="utf-8",
        )
        raises_one_line(rf"t\.jsonl:3: the response is {state}", load_corpus, path)

    def test_blank_prompt_in_csv_names_line_after_multiline_field(self, tmp_path):
        path = tmp_path / "t.csv"
        path.write_text('q,a\n"two\nlines",x\n,y\n', encoding="utf-8")
        raises_one_line(
            r"t\.csv:4: the prompt \(column 'q'\) is null",
            load_corpus,
            path,
            columns={"prompt": "q", "response": "a"},
        )

    def test_blank_text_in_parquet_names_row(self, tmp_path):
        path = tmp_path / "t.parquet"
        pl.DataFrame({"prompt": ["a", "b", " "], "response": ["x", "y", "z"]}).write_parquet(path)
        raises_one_line(r"t\.parquet: row 2: the prompt is empty", load_corpus, path)

    def test_blank_alpaca_instruction(self, tmp_path):
        path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "", "input": "x", "output": "y"}])
        raises_one_line(r"a\.jsonl:1: the instruction is empty", load_corpus, path)

    def test_duplicate_ids_across_shards(self, tmp_path):
        write_jsonl(
            tmp_path / "a.jsonl",
            [{"id": 1, "prompt": "p", "response": "r"}, {"id": 2, "prompt": "p", "response": "r"}],
        )
        write_jsonl(
            tmp_path / "b.jsonl",
            [{"id": 3, "prompt": "p", "response": "r"}, {"id": 2, "prompt": "p", "response": "r"}],
        )
        message = raises_one_line(
            r"example_id 2 is repeated, at \S*a\.jsonl:2 and at \S*b\.jsonl:2",
            load_corpus,
            tmp_path,
            id_column="id",
        )
        assert "leave id_column unset" in message

    def test_non_integer_and_missing_id_column(self, tmp_path):
        path = tmp_path / "ids.csv"
        path.write_text("id,prompt,response\n1,p,r\nx7,q,s\n", encoding="utf-8")
        raises_one_line(
            r"ids\.csv:3: id column 'id' holds 'x7', not an integer", load_corpus, path, id_column="id"
        )
        raises_one_line(
            r"no id column 'uid'; columns are 'id', 'prompt', 'response'", load_corpus, path, id_column="uid"
        )

    def test_non_utf8_bytes_name_line(self, tmp_path):
        for name in ("latin.jsonl", "latin.csv"):
            path = tmp_path / name
            first = b'{"prompt": "a", "response": "b"}\n' if name.endswith("jsonl") else b"prompt,response\n"
            bad = b'{"prompt": "caf\xe9", "response": "b"}\n' if name.endswith("jsonl") else b"caf\xe9,b\n"
            path.write_bytes(first + first.replace(b"prompt,response", b"p,r") + bad)
            raises_one_line(rf"{re.escape(name)}:3: byte 0xe9 is not valid UTF-8", load_corpus, path)

    def test_invalid_json_names_line(self, tmp_path):
        path = tmp_path / "bad.jsonl"
        path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": }\n', encoding="utf-8")
        raises_one_line(r"bad\.jsonl:2: invalid JSON", load_corpus, path)
        path.write_text('{"prompt": "a", "response": "b"}\n\n[1, 2]\n', encoding="utf-8")
        raises_one_line(r"bad\.jsonl:3: the line holds a JSON array, not an object", load_corpus, path)

    def test_ragged_csv_names_line(self, tmp_path):
        path = tmp_path / "r.csv"
        path.write_text("prompt,response\na,b\nc,d,e\n", encoding="utf-8")
        raises_one_line(r"r\.csv:3: 3 fields but the header has 2", load_corpus, path)


# --- synthetic_instructions -------------------------------------------------------------------
def ints(text: str) -> list[int]:
    return [int(v) for v in re.findall(r"\d+", text)]


UNIT_FACTORS = {
    ("kilometer", "meters"): 1000,
    ("meter", "centimeters"): 100,
    ("meter", "millimeters"): 1000,
    ("kilogram", "grams"): 1000,
    ("liter", "milliliters"): 1000,
    ("hour", "minutes"): 60,
    ("minute", "seconds"): 60,
    ("day", "hours"): 24,
    ("week", "days"): 7,
}


def conversion_factor(prompt: str) -> int:
    """How many target units make one source unit, read from a unit_conversion prompt."""
    source = re.search(r"\d+ ([a-z]+)", prompt).group(1).removesuffix("s")
    target = re.search(r"many ([a-z]+)|to ([a-z]+)\.|in ([a-z]+)\?", prompt)
    return UNIT_FACTORS[(source, next(g for g in target.groups() if g))]


def expected_answer(family: str, prompt: str) -> str:
    """The answer worked out independently from the prompt's text (and the module's fact tables)."""
    n = ints(prompt)
    quoted = re.findall(r"'([a-z])'|'([a-z]+)'", prompt)  # ('c', '') for a letter, ('', 'word') for a word
    letter = next((c for c, _ in quoted if c), "")
    word = next((w for _, w in quoted if w), "")
    numeric = {
        "addition": lambda: sum(n),
        "subtraction": lambda: max(n) - min(n),
        "multiplication": lambda: n[0] * n[1],
        "next_number": lambda: n[-1] + n[1] - n[0],
        "compare_numbers": lambda: max(n),
        "word_length": lambda: len(word),
        "count_letters": lambda: word.count(letter),
        "unit_conversion": lambda: n[0] * conversion_factor(prompt),
    }
    if family in numeric:
        return str(numeric[family]())
    if family == "capital_lookup":
        return next(c for k, c in CAPITALS.items() if re.search(rf"\b{k}[?.]$", prompt))
    if family == "element_symbol":
        return next(s for e, s in ELEMENTS.items() if re.search(rf"\b{e}\b", prompt))
    return {
        "sort_numbers": lambda: ", ".join(map(str, sorted(n))),
        "reverse_word": lambda: word[::-1],
        "uppercase_word": lambda: word.upper(),
        "first_letter": lambda: word[0],
    }[family]()


class TestSynthetic:
    def test_layout_size_and_families(self):
        df = synthetic_instructions(500, seed=0)
        check_corpus(df, 500)
        assert df["example_id"].to_list() == list(range(500))
        assert len(FAMILIES) >= 12 and set(df["group"].unique()) == set(FAMILIES)
        assert (
            len(WORDS) >= 100
            and len(set(WORDS)) == len(WORDS)
            and len(CAPITALS) >= 30
            and len(ELEMENTS) >= 30
        )
        for column in ("prompt", "response"):
            assert df[column].null_count() == 0 and (df[column].str.strip_chars() != "").all()

    def test_deterministic_per_seed(self):
        assert synthetic_instructions(200, seed=3).equals(synthetic_instructions(200, seed=3))
        assert not synthetic_instructions(200, seed=3).equals(synthetic_instructions(200, seed=4))

    @pytest.mark.parametrize("n", [1, 13, 100, 141])
    def test_balanced_groups(self, n):
        counts = synthetic_instructions(n, seed=1)["group"].value_counts()["count"]
        assert counts.sum() == n and counts.max() - counts.min() <= 1

    def test_groups_are_shuffled(self):
        groups = synthetic_instructions(140, seed=0)["group"].to_list()
        assert groups[: len(FAMILIES)] != FAMILIES

    def test_paraphrases_exist(self):
        df = synthetic_instructions(700, seed=0).filter(pl.col("group") == "addition")
        openings = {prompt.split()[0] for prompt in df["prompt"]}
        assert len(openings) >= 2

    def test_answers_are_correct(self):
        df = synthetic_instructions(1400, seed=7)
        for prompt, response, family in df.select("prompt", "response", "group").iter_rows():
            assert response == expected_answer(family, prompt), (family, prompt, response)

    def test_family_subset_and_bad_arguments(self):
        df = synthetic_instructions(10, families=["addition", "capital_lookup"])
        assert set(df["group"]) == {"addition", "capital_lookup"}
        raises_one_line(
            r"unknown family 'additon'; did you mean addition",
            synthetic_instructions,
            5,
            families=["additon"],
        )
        raises_one_line(r"families is empty", synthetic_instructions, 5, families=[])
        raises_one_line(r"n_examples=0", synthetic_instructions, 0)


# --- the source's own columns -----------------------------------------------------------------
def write_parquet(path: Path, columns: dict) -> Path:
    pl.DataFrame(columns).write_parquet(path)
    return path


class TestExtraColumns:
    def test_kept_after_the_corpus_columns_with_their_types(self, tmp_path):
        records = [
            {"source": "wiki", "prompt": "p0", "year": 2020, "response": "r0", "score": 0.5, "ok": True,
             "tags": ["a", "b"], "meta": {"lang": "en"}, "group": "g"},
            {"source": "web", "prompt": "p1", "year": 2021, "response": "r1", "score": 1.0, "ok": False,
             "tags": [], "meta": {"lang": "fr"}, "group": None},
        ]  # fmt: skip
        df = load_corpus(write_jsonl(tmp_path / "m.jsonl", records))
        assert df.columns == [*SCHEMA, "source", "year", "score", "ok", "tags", "meta"]
        assert {k: df.schema[k] for k in SCHEMA} == SCHEMA
        assert df.schema["year"] == pl.Int64 and df.schema["score"] == pl.Float64
        assert df.schema["ok"] == pl.Boolean and df.schema["tags"] == pl.List(pl.String)
        assert df["source"].to_list() == ["wiki", "web"] and df["meta"].struct.field("lang")[1] == "fr"

    def test_columns_read_as_texts_group_and_id_are_not_repeated(self, tmp_path):
        records = [{"uid": 7, "q": "p", "a": "r", "task": "t", "url": "https://x.org/7"}]
        columns = {"prompt": "q", "response": "a", "group": "task"}
        df = load_corpus(write_jsonl(tmp_path / "m.jsonl", records), columns=columns, id_column="uid")
        assert df.columns == [*SCHEMA, "url"] and df.row(0) == (7, "p", "r", "t", "https://x.org/7")

    def test_across_shards_missing_columns_are_null_and_numbers_widen(self, tmp_path):
        write_parquet(tmp_path / "a.parquet", {"prompt": ["a"], "response": ["r"], "src": ["x"], "n": [1]})
        write_parquet(tmp_path / "b.parquet", {"prompt": ["b"], "response": ["r"], "n": [2.5], "url": ["u"]})
        write_parquet(
            tmp_path / "c.parquet",
            {"prompt": ["c"], "response": ["r"], "src": pl.Series([None], dtype=pl.Null)},
        )
        df = load_corpus(tmp_path)
        assert df.columns == [*SCHEMA, "src", "n", "url"]
        assert df.schema["n"] == pl.Float64 and df.schema["src"] == pl.String
        assert df["src"].to_list() == ["x", None, None] and df["n"].to_list() == [1.0, 2.5, None]
        assert df["url"].to_list() == [None, "u", None]

    def test_csv_columns_are_text(self, tmp_path):
        path = tmp_path / "m.csv"
        path.write_text("prompt,response,year,Source URL\np,r,2020,https://x.org\n", encoding="utf-8")
        df = load_corpus(path)
        assert df.columns == [*SCHEMA, "year", "Source URL"] and df.row(0)[4:] == ("2020", "https://x.org")

    def test_keep_columns_list_picks_and_orders(self, tmp_path):
        records = [{"instruction": "Add.", "input": "1 2", "output": "3", "url": "u", "lic": "mit", "x": 1}]
        path = write_jsonl(tmp_path / "a.jsonl", records)
        df = load_corpus(path, keep_columns=["lic", "input"])  # a column read as a text may be kept too
        assert df.columns == [*SCHEMA, "lic", "input"] and df.row(0)[1:] == (
            "Add.\n\n1 2",
            "3",
            None,
            "mit",
            "1 2",
        )
        check_corpus(load_corpus(path, keep_columns=[]), 1)

    def test_the_split_step_keeps_them(self, tmp_path):
        from tda.data.split import split_table

        records = [{"prompt": f"p{i}", "response": "r", "source": f"s{i % 2}"} for i in range(10)]
        df = split_table(
            load_corpus(write_jsonl(tmp_path / "m.jsonl", records)), n_targets=2, stratify_by="source"
        )
        assert df.columns == [*SCHEMA, "source", "split"] and df.height == 10


class TestInvalidExtraColumns:
    def test_types_that_disagree_across_shards(self, tmp_path):
        write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r", "year": 2020}])
        write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "response": "r", "year": "2021"}])
        raises_one_line(
            r"b\.jsonl: column 'year' holds String values but \S*a\.jsonl holds Int64; give the column one "
            r"type in every shard, or leave it out with keep_columns",
            load_corpus,
            tmp_path,
        )
        assert load_corpus(tmp_path, keep_columns=[]).height == 2

    def test_names_that_clash_with_the_corpus_columns(self, tmp_path):
        records = [{"instruction": "i", "output": "o", "prompt": "old", "task": "t", "group": "g"}]
        path = write_jsonl(tmp_path / "a.jsonl", records)
        columns = {"instruction": "instruction", "output": "output", "group": "task"}
        raises_one_line(
            r"a\.jsonl: column 'prompt' would clash with the corpus's own 'prompt'; list the columns to "
            r"keep in keep_columns without it",
            load_corpus,
            path,
            columns=columns,
        )
        raises_one_line(
            r"column 'group' would clash", load_corpus, path, columns=columns, keep_columns=["group"]
        )
        assert load_corpus(path, columns=columns, keep_columns=[])["prompt"].to_list() == ["i"]
        path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "response": "r", "split": "train"}])
        raises_one_line(r"s\.jsonl: column 'split' would clash .*set split_column: split", load_corpus, path)
        path = write_jsonl(tmp_path / "e.jsonl", [{"example_id": 3, "prompt": "p", "response": "r"}])
        raises_one_line(
            r"e\.jsonl: column 'example_id' would clash .*set id_column: example_id", load_corpus, path
        )
        assert load_corpus(path, id_column="example_id")["example_id"].to_list() == [3]

    def test_blank_column_name(self, tmp_path):
        path = tmp_path / "b.csv"
        path.write_text("prompt,response,\np,r,x\n", encoding="utf-8")
        raises_one_line(r"b\.csv: a column has a blank name \(''\); name it", load_corpus, path)
        check_corpus(load_corpus(path, keep_columns=[]), 1)

    def test_bad_keep_columns(self, tmp_path, qa_records):
        path = write_jsonl(tmp_path / "qa.jsonl", qa_records)
        raises_one_line(r"keep_columns: no file has a column 'url'; columns are 'prompt'", load_corpus, path,
                        keep_columns=["url"])  # fmt: skip
        raises_one_line(
            r"keep_columns: 'group' is listed twice", load_corpus, path, keep_columns=["group", "group"]
        )


# --- pre-split corpora ------------------------------------------------------------------------
def split_records(values: list) -> list[dict]:
    return [{"prompt": f"p{i}", "response": "r", "part": v, "url": f"u{i}"} for i, v in enumerate(values)]


class TestSplitColumn:
    def test_default_values_and_the_split_column_after_group(self, tmp_path):
        path = write_jsonl(
            tmp_path / "s.jsonl", split_records(["train", "TEST", " validation ", "dev", "Train"])
        )
        df = load_corpus(path, split_column="part")
        assert df.columns == [*SCHEMA, "split", "url"]  # the split column is read, not repeated
        assert df["split"].to_list() == ["train", "target", "target", "target", "train"]

    def test_split_values_add_override_and_drop(self, tmp_path):
        path = write_jsonl(tmp_path / "s.jsonl", split_records(["train", "holdout", "validation", "test"]))
        df = load_corpus(path, split_column="part", split_values={"Holdout": "target", "validation": "drop"})
        assert df["example_id"].to_list() == [0, 1, 3]  # ids keep numbering the source rows
        assert df["split"].to_list() == ["train", "target", "target"]

    def test_a_column_named_split_and_boolean_values(self, tmp_path):
        records = [
            {"prompt": "p", "response": "r", "split": s, "is_test": t}
            for s, t in [("train", False), ("test", True)]
        ]
        df = load_corpus(write_jsonl(tmp_path / "s.jsonl", records), split_column="split")
        assert df["split"].to_list() == ["train", "target"] and df.columns[-1] == "is_test"
        df = load_corpus(
            tmp_path / "s.jsonl", split_column="is_test", split_values={"true": "target", "false": "train"},
            keep_columns=[],
        )  # fmt: skip
        assert df["split"].to_list() == ["train", "target"]

    def test_unknown_and_null_values(self, tmp_path):
        path = write_jsonl(tmp_path / "s.jsonl", split_records(["train", "train_sft"]))
        message = raises_one_line(
            r"s\.jsonl:2: split column 'part' holds 'train_sft', neither a training nor a target value; "
            r"map it with split_values, e\.g\. \{train_sft: target\}",
            load_corpus,
            path,
            split_column="part",
        )
        assert "drop" in message
        path = write_jsonl(tmp_path / "n.jsonl", split_records(["test", None]))
        raises_one_line(r"n\.jsonl:2: split column 'part' is null", load_corpus, path, split_column="part")

    def test_bad_split_arguments(self, tmp_path):
        path = write_jsonl(tmp_path / "s.jsonl", split_records(["train", "test"]))
        raises_one_line(
            r"s\.jsonl: no split column 'spilt'; columns are", load_corpus, path, split_column="spilt"
        )
        raises_one_line(
            r"split_values: there is no split_column", load_corpus, path, split_values={"a": "train"}
        )
        raises_one_line(r"split_values\.a: 'dev' is not train, target or drop", load_corpus, path,
                        split_column="part", split_values={"a": "dev"})  # fmt: skip
        raises_one_line(r"split_values drops every row", load_corpus, path, split_column="part",
                        split_values={"train": "drop", "test": "drop"})  # fmt: skip


# --- datasets' save_to_disk folders -----------------------------------------------------------
def arrow_features(schema: pa.Schema) -> dict:
    """`datasets` Features of plain columns, as `dataset_info.json` and the schema metadata hold them."""
    return {f.name: {"dtype": str(f.type).replace("double", "float64"), "_type": "Value"} for f in schema}


def save_to_disk(folder: Path, table: pa.Table, num_shards: int = 1, split: str | None = None) -> Path:
    """What `Dataset.save_to_disk` writes (datasets 2.x–4.x): Arrow *stream* shards
    `data-0000i-of-0000N.arrow` with the features in the schema metadata, `state.json` listing them,
    and `dataset_info.json`. Written here with pyarrow, as `datasets` is not a dependency."""
    folder.mkdir(parents=True)
    features = arrow_features(table.schema)
    schema = table.schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    names = [f"data-{i:05d}-of-{num_shards:05d}.arrow" for i in range(num_shards)]
    bounds = [table.num_rows * i // num_shards for i in range(num_shards + 1)]
    for name, start, stop in zip(names, bounds, bounds[1:], strict=False):
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_table(table.slice(start, stop - start).replace_schema_metadata(schema.metadata))
    state = {
        "_data_files": [{"filename": name} for name in names],
        "_fingerprint": "5f1c0a7d3e9b2c41",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": split,
    }
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    info = {"builder_name": None, "citation": "", "config_name": None, "dataset_name": None,
            "description": "", "features": features, "homepage": "", "license": "",
            "splits": None}  # fmt: skip
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return folder


def save_dict_to_disk(folder: Path, splits: dict[str, pa.Table]) -> Path:
    """What `DatasetDict.save_to_disk` writes: `dataset_dict.json` and one Dataset folder per split."""
    folder.mkdir(parents=True)
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    for name, table in splits.items():
        save_to_disk(folder / name, table, split=name)
    return folder


def qa_table(n: int, start: int = 0) -> pa.Table:
    rows = range(start, start + n)
    return pa.table({
        "prompt": [f"q{i}" for i in rows], "response": [f"a{i}" for i in rows],
        "source": [f"s{i % 3}" for i in rows], "stars": pa.array(list(rows), pa.int32()),
    })  # fmt: skip


class TestSavedDatasets:
    def test_dataset_folder_in_its_shard_order(self, tmp_path):
        folder = save_to_disk(tmp_path / "ds", qa_table(7), num_shards=3)
        df = load_corpus(folder)
        assert df.columns == [*SCHEMA, "source", "stars"] and df.schema["stars"] == pl.Int32
        assert df["prompt"].to_list() == [f"q{i}" for i in range(7)] and df["example_id"].to_list() == list(
            range(7)
        )
        assert load_corpus(folder, format="arrow").equals(df)

    def test_dataset_dict_split_names_are_the_split(self, tmp_path):
        splits = {"train": qa_table(4), "validation": qa_table(2, 4), "test": qa_table(3, 6)}
        folder = save_dict_to_disk(tmp_path / "dd", splits)
        df = load_corpus(folder)
        assert df.columns == [*SCHEMA, "split", "source", "stars"] and df.height == 9
        assert df["split"].to_list() == ["train"] * 4 + ["target"] * 5
        df = load_corpus(folder, split_values={"validation": "drop"})
        assert df["prompt"].to_list()[4:] == ["q6", "q7", "q8"] and df["example_id"][4] == 6
        one = load_corpus(folder / "test")  # one split alone: no split column
        assert one.columns == [*SCHEMA, "source", "stars"] and one["prompt"].to_list() == ["q6", "q7", "q8"]

    def test_dataset_dict_with_a_split_column_of_its_own(self, tmp_path):
        table = qa_table(4).append_column("fold", pa.array(["train", "test", "train", "test"]))
        df = load_corpus(save_dict_to_disk(tmp_path / "dd", {"all": table}), split_column="fold")
        assert df["split"].to_list() == ["train", "target", "train", "target"]

    def test_single_arrow_files_stream_or_file_format(self, tmp_path):
        table = qa_table(3)
        with pa.OSFile(str(tmp_path / "s.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        assert load_corpus(tmp_path / "s.arrow").equals(load_corpus(tmp_path / "f.arrow"))
        assert load_corpus(tmp_path).height == 6  # a folder of .arrow shards without state.json

    def test_unknown_dataset_dict_split(self, tmp_path):
        folder = save_dict_to_disk(tmp_path / "dd", {"train_sft": qa_table(2), "test_sft": qa_table(2, 2)})
        raises_one_line(
            r"dd/train_sft: DatasetDict split 'train_sft' is neither a training nor a target split; "
            r"map it with split_values, e\.g\. \{train_sft: target\}",
            load_corpus,
            folder,
        )
        df = load_corpus(folder, split_values={"train_sft": "train", "test_sft": "target"})
        assert df["split"].to_list() == ["train", "train", "target", "target"]

    def test_blank_text_names_the_arrow_row(self, tmp_path):
        table = pa.table({"prompt": ["a", " "], "response": ["x", "y"]})
        folder = save_to_disk(tmp_path / "ds", table)
        raises_one_line(r"data-00000-of-00001\.arrow: row 1: the prompt is empty", load_corpus, folder)

    def test_broken_folders(self, tmp_path):
        folder = save_to_disk(tmp_path / "ds", qa_table(2))
        state = json.loads((folder / "state.json").read_text())
        for entry, message in [
            ([{"filename": "data-9.arrow"}], r"data-9\.arrow: listed in \S*state\.json but missing"),
            ([{"filename": "../x.arrow"}], r"state\.json: `_data_files` entry .* is not a plain file name"),
            ([], r"state\.json: `_data_files` lists no Arrow files"),
        ]:  # fmt: skip
            (folder / "state.json").write_text(json.dumps({**state, "_data_files": entry}))
            raises_one_line(message, load_corpus, folder)
        (folder / "state.json").write_text(
            json.dumps({**state, "_indices_data_files": [{"filename": "i.arrow"}]})
        )
        raises_one_line(r"indices mapping .*flatten_indices\(\)", load_corpus, folder)
        (folder / "state.json").write_text("{")
        raises_one_line(r"state\.json: unreadable JSON", load_corpus, folder)
        (folder / "state.json").write_text(json.dumps(state))
        (folder / "data-00000-of-00001.arrow").write_bytes(b"not arrow")
        raises_one_line(r"data-00000-of-00001\.arrow: unreadable Arrow file", load_corpus, folder)
        raises_one_line(r"holds no \.parquet, \.pq files", load_corpus, folder, format="parquet")

    def test_broken_dataset_dict(self, tmp_path):
        folder = save_dict_to_disk(tmp_path / "dd", {"train": qa_table(2)})
        (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
        raises_one_line(
            r"dd/test: split 'test' of \S*dataset_dict\.json has no state\.json", load_corpus, folder
        )
        (folder / "dataset_dict.json").write_text(json.dumps({"splits": "train"}))
        raises_one_line(r"`splits` is not a list of split names", load_corpus, folder)
