"""Writes specs/data/instructions_meta.jsonl, the corpus of specs/corpus_metadata.yaml: 360 synthetic
instructions (tda.data.synthetic, seed 11) with the columns a real corpus brings along: `id`, `task`,
the `source` collection it came from, a `url` per row, the source's `license`, the `year` it was
collected and a `split` (train | test, 40 test rows). Sources follow task families (arithmetic,
words, facts) except `forum-scrape`, a random 15% of every family under a proprietary license.
Deterministic: `.venv/bin/python specs/data/make_instructions_meta.py` rewrites the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tda.data.synthetic import synthetic_instructions

SOURCES = {
    "mathdrill": ("CC-BY-4.0", ("addition", "subtraction", "multiplication", "sort_numbers",
                                "next_number", "compare_numbers", "unit_conversion")),
    "wordplay": ("MIT", ("reverse_word", "uppercase_word", "count_letters", "first_letter", "word_length")),
    "factbook": ("CC-BY-SA-4.0", ("capital_lookup", "element_symbol")),
}  # fmt: skip
SCRAPE = ("forum-scrape", "proprietary")


def rows(n: int = 360, n_test: int = 40, seed: int = 11) -> list[dict]:
    corpus = synthetic_instructions(n, seed=seed)
    rng = np.random.default_rng(seed)
    scraped = rng.random(n) < 0.15
    test = set(rng.choice(n, size=n_test, replace=False).tolist())
    family_source = {family: name for name, (_, families) in SOURCES.items() for family in families}
    out = []
    for i, (prompt, response, family) in enumerate(corpus.select("prompt", "response", "group").iter_rows()):
        source, license = SCRAPE if scraped[i] else (family_source[family], SOURCES[family_source[family]][0])
        uid = 10_000 + i
        out.append({
            "id": uid, "prompt": prompt, "response": response, "task": family, "source": source,
            "url": f"https://data.example.org/{source}/{uid}", "license": license,
            "year": int(2019 + rng.integers(0, 6)), "split": "test" if i in test else "train",
        })  # fmt: skip
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("instructions_meta.jsonl")
    path.write_text("".join(json.dumps(row) + "\n" for row in rows()), encoding="utf-8")
