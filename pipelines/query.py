"""Reading a run back: its record, its tables as Polars LazyFrames, and SQL over them (read-only).

Each table of a run is a view named after its step; queries go through Polars' SQLContext over lazy
Parquet scans, so only the columns and row groups a query touches are read. A query sees those tables
and nothing else: Polars' file-reading table functions (`read_csv(…)` and the like) are refused.
"""

from __future__ import annotations

import re
import unicodedata
from itertools import pairwise
from typing import NamedTuple

import polars as pl

from pipelines.errors import QueryError, StoreError
from pipelines.status import RunStatus, StepRecord
from pipelines.store import RunRecord, Store, StoredObject


class Run:
    """A pipeline run as recorded in the store."""

    def __init__(self, store: Store, record: RunRecord) -> None:
        self.store = store
        self.record = record

    def __repr__(self) -> str:
        return f"Run({self.run_id!r}, status={str(self.status)!r}, steps={len(self.steps)})"

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def status(self) -> RunStatus:
        return self.record.status

    @property
    def steps(self) -> dict[str, StepRecord]:
        return self.record.steps

    def output(self, step: str) -> StoredObject:
        """The stored output of `step` in this run."""
        info = self.steps.get(step)
        if info is None:
            raise StoreError(f"run {self.run_id} has no step {step!r}; steps: {', '.join(self.steps)}")
        if not self.store.has(info.key):
            raise StoreError(f"run {self.run_id}: step {step!r} has no output ({info.status})")
        return self.store.get(info.key)

    def table(self, step: str) -> pl.LazyFrame:
        """The table of `step` as a lazy Parquet scan."""
        return self.output(step).table()

    def table_names(self) -> list[str]:
        """The steps of the run that have a table (from their manifests: nothing is fetched)."""
        names = []
        for name, info in self.steps.items():
            manifest = self.store.manifest(info.key)
            if manifest is not None and manifest.get("schema"):
                names.append(name)
        return names

    def sql(self, query: str) -> pl.DataFrame:
        """Run a SQL query where each table of the run is a view named after its step. Only the
        tables whose names the query mentions are opened (fetched, and checked against their
        manifests' checksums); the others are empty views, enough for SHOW TABLES."""
        frames = {
            name: self.table(name) if _mentions(query, name) else pl.LazyFrame()
            for name in self.table_names()
        }
        return run_sql(query, frames)


def _mentions(query: str, name: str) -> bool:
    """Does `name` occur in `query` as a word (in any case, quoted or not)?"""
    return re.search(rf"(?<![\w$]){re.escape(name)}(?![\w$])", query, re.IGNORECASE) is not None


def open_run(store: Store | str, run_id: str | None = None) -> Run:
    """The run `run_id` (a unique prefix works) of a store (a folder, a URI or a Store), or its latest run."""
    store = store if isinstance(store, Store) else Store.open(store)
    return Run(store, store.read_run(run_id))


# ---------------------------------------------------------------- SQL over a run's tables
#
# Polars SQL can read any file through table functions (`FROM read_csv('/etc/passwd')`, also spelled
# "read_csv"(…), READ_CSV (…) or 'read_csv'(…)), and it has no switch to turn them off. So a query is
# tokenized here first, the way Polars' parser (sqlparser, generic dialect) tokenizes it, and any
# name of a file-reading function followed by `(` is refused. Lexical forms on which a mismatch could
# hide code from this check are refused too (a quote glued to a name, as in E'…' or q'[…]'; `$`, as in
# $$…$$), and Polars runs the query with its comments blanked, so that only what was checked runs.

READING = ("SELECT", "WITH", "VALUES", "SHOW", "EXPLAIN", "DESCRIBE", "DESC")
_EXPLAIN_OPTIONS = {"ANALYZE", "VERBOSE", "QUERY", "PLAN"}
_FILE_FUNCTION = re.compile(r"(?:read|scan)(?:_\w*)?|\w*_scan")
_TOKEN = re.compile(
    r"""(?P<space>\s+)
    | (?P<comment>--[^\n]*)
    | (?P<string>'[^']*+(?:''[^']*+)*+')
    | (?P<name>"[^"]*+(?:""[^"]*+)*+"|`[^`]*+(?:``[^`]*+)*+`)
    | (?P<word>[A-Za-z0-9_]+)
    | (?P<other>.)""",
    re.VERBOSE | re.DOTALL,
)


class _Token(NamedTuple):
    kind: str  # space | comment | string | name (a quoted identifier) | word | other
    text: str
    start: int

    @property
    def value(self) -> str:
        """The text a string or quoted identifier stands for; a word or symbol as written."""
        if self.kind in ("string", "name"):
            quote = self.text[0]
            return self.text[1:-1].replace(quote * 2, quote)
        return self.text

    @property
    def code(self) -> bool:
        """Whether the token is more than whitespace, a comment or an invisible character."""
        invisible = self.kind == "other" and unicodedata.category(self.text)[0] in "CZ"
        return self.kind not in ("space", "comment") and not invisible


def run_sql(query: str, frames: dict[str, pl.LazyFrame]) -> pl.DataFrame:
    """Polars SQL over named LazyFrames: reading statements only, and no table but `frames`."""
    tables = f"(tables: {', '.join(frames) or 'none'})"
    tokens = _tokenize(query, tables)
    code = [token for token in tokens if token.code]
    _refuse_file_functions(code, tables)
    head = _statement_head(code)
    try:
        if head in ("DESCRIBE", "DESC"):
            return _describe(code, frames, tables)
        with pl.SQLContext(frames=frames) as ctx:
            return ctx.execute(_blank_comments(tokens), eager=True)
    except QueryError:
        raise
    except (Exception, pl.exceptions.PanicException) as exc:  # a Rust panic is a BaseException
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QueryError(f"{first} {tables}") from exc


def _tokenize(query: str, tables: str) -> list[_Token]:
    """The query's tokens; QueryError for what could tokenize differently in Polars, or not at all."""
    tokens: list[_Token] = []
    at = 0
    while at < len(query):
        if query.startswith("/*", at):
            end = _block_comment_end(query, at, tables)
            tokens.append(_Token("comment", query[at:end], at))
            at = end
            continue
        match = _TOKEN.match(query, at)
        assert match is not None and match.lastgroup is not None  # `other` matches any character
        token = _Token(match.lastgroup, match.group(), at)
        _refuse_ambiguous(query, token, tables)
        tokens.append(token)
        at = match.end()
    return tokens


def _block_comment_end(query: str, start: int, tables: str) -> int:
    """Where the /* … */ comment at `start` ends; such comments nest, as in Polars."""
    depth, at = 0, start
    while at < len(query):
        if query.startswith("/*", at):
            depth, at = depth + 1, at + 2
        elif query.startswith("*/", at):
            depth, at = depth - 1, at + 2
            if depth == 0:
                return at
        else:
            at += 1
    raise QueryError(f"the comment at character {start + 1} is not closed: end it with */ {tables}")


def _refuse_ambiguous(query: str, token: _Token, tables: str) -> None:
    """QueryError for a token that Polars could read as more, or other, than a plain token."""
    where = f"at character {token.start + 1}"
    if token.kind == "other" and token.text in "'\"`":
        raise QueryError(f"the quote {where} is not closed {tables}")
    if token.kind == "other" and token.text == "$":
        raise QueryError(f"`$` {where} is not supported (dollar-quoted strings, placeholders) {tables}")
    glued = token.start > 0 and (query[token.start - 1].isalnum() or query[token.start - 1] in "_$#@&")
    if token.kind in ("string", "name") and glued:
        raise QueryError(
            f"a quote right after a name {where} (as in E'…', N'…', X'…') is not supported: "
            f"put a space before it {tables}"
        )


def _refuse_file_functions(code: list[_Token], tables: str) -> None:
    """QueryError for a call of a function that reads files (`read_csv(…)`, `"READ_PARQUET"(…)`)."""
    for token, after in pairwise(code):
        name = unicodedata.normalize("NFKC", token.value).casefold().strip().rsplit(".", 1)[-1]
        if token.kind != "other" and after.text == "(" and _FILE_FUNCTION.fullmatch(name):
            shown = token.value.strip().rsplit(".", 1)[-1]
            raise QueryError(f"{shown}(...) is not allowed: a query sees only the run's tables {tables}")


def _statement_head(code: list[_Token]) -> str:
    """The statement's first keyword (after any opening parentheses); QueryError unless it reads."""
    words = [token for token in code if token.text != "("]
    head = words[0].text.upper() if words else ""
    if head == "EXPLAIN":
        _statement_head([token for token in words[1:] if token.text.upper() not in _EXPLAIN_OPTIONS])
    if head not in READING:
        shown = "nothing" if not words else words[0].text if words[0].kind == "word" else repr(words[0].value)
        raise QueryError(f"only reading queries ({', '.join(READING[:-1])}) are allowed, not {shown}")
    return head


def _describe(code: list[_Token], frames: dict[str, pl.LazyFrame], tables: str) -> pl.DataFrame:
    """`DESCRIBE [TABLE] name`: one row per column of the table, with its type."""
    rest = [token for token in code if token.text not in ("(", ")", ";")][1:]
    if rest and rest[0].kind == "word" and rest[0].text.upper() == "TABLE":
        rest = rest[1:]
    if len(rest) != 1 or rest[0].kind == "other":
        example = next(iter(frames), "step")
        raise QueryError(f"DESCRIBE takes one table name, as in DESCRIBE {example} {tables}")
    name = _frame_name(rest[0].value, frames)
    if name is None:
        raise QueryError(f"DESCRIBE: there is no table {rest[0].value!r} {tables}")
    schema = frames[name].collect_schema()
    return pl.DataFrame(
        {"column": schema.names(), "type": [str(dtype) for dtype in schema.dtypes()]},
        schema={"column": pl.String, "type": pl.String},
    )


def _frame_name(name: str, frames: dict[str, pl.LazyFrame]) -> str | None:
    """The frame `name` refers to: its exact name, or else the one name equal to it but for case."""
    if name in frames:
        return name
    same = [frame for frame in frames if frame.casefold() == name.casefold()]
    return same[0] if len(same) == 1 else None


def _blank_comments(tokens: list[_Token]) -> str:
    """The query with each comment turned into spaces (its line breaks kept, so positions hold)."""
    return "".join(re.sub(r"[^\n]", " ", t.text) if t.kind == "comment" else t.text for t in tokens)
