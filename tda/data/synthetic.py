"""A seeded synthetic instruction corpus for tests, demos and attribution studies.

Fourteen task families (arithmetic, string edits, lists, unit conversion and two small real fact
tables) share vocabulary on purpose ("the number", "the word", "the list", digits), so that a model
trained on one family is helped or hurt by others, and each family has 2–4 prompt templates, so
paraphrases of one task exist. Every response is short and correct. `group` is the family name.
Examples are spread evenly over the chosen families (round robin, then shuffled with the seed).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence

import numpy as np
import polars as pl

from tda.errors import DataError

Example = tuple[str, str]  # (prompt, response)

WORDS = (
    "apple", "river", "house", "table", "green", "water", "light", "music", "paper", "stone",
    "cloud", "train", "horse", "bread", "chair", "plant", "smile", "dream", "night", "sugar",
    "ocean", "tiger", "lemon", "piano", "money", "watch", "glass", "grass", "beach", "storm",
    "forest", "garden", "window", "pencil", "rabbit", "orange", "yellow", "silver", "winter", "summer",
    "school", "friend", "market", "bottle", "butter", "castle", "doctor", "letter", "mirror", "number",
    "pepper", "planet", "rocket", "spring", "street", "ticket", "turtle", "valley", "wonder", "little",
    "cat", "dog", "sun", "sky", "car", "book", "tree", "fish", "bird", "door",
    "rain", "snow", "moon", "star", "milk", "rice", "game", "song", "road", "ship",
    "kitten", "banana", "cherry", "dragon", "island", "jacket", "ladder", "monkey", "needle", "puzzle",
    "bubble", "coffee", "engine", "finger", "hammer", "pillow", "candle", "basket", "button", "carpet",
)  # fmt: skip

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa",
    "Australia": "Canberra", "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Mexico": "Mexico City",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Nigeria": "Abuja", "Russia": "Moscow", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens",
    "Turkey": "Ankara", "Ireland": "Dublin", "Austria": "Vienna", "Belgium": "Brussels",
    "South Korea": "Seoul", "Thailand": "Bangkok", "Peru": "Lima", "Chile": "Santiago",
    "Vietnam": "Hanoi", "Indonesia": "Jakarta",
}  # fmt: skip

ELEMENTS = {
    "hydrogen": "H", "helium": "He", "lithium": "Li", "beryllium": "Be", "boron": "B", "carbon": "C",
    "nitrogen": "N", "oxygen": "O", "fluorine": "F", "neon": "Ne", "sodium": "Na", "magnesium": "Mg",
    "aluminium": "Al", "silicon": "Si", "phosphorus": "P", "sulfur": "S", "chlorine": "Cl",
    "argon": "Ar", "potassium": "K", "calcium": "Ca", "iron": "Fe", "nickel": "Ni", "copper": "Cu",
    "zinc": "Zn", "silver": "Ag", "tin": "Sn", "iodine": "I", "platinum": "Pt", "gold": "Au",
    "mercury": "Hg", "lead": "Pb", "uranium": "U",
}  # fmt: skip

# (unit, plural, smaller unit's plural, how many of the smaller unit make one)
UNITS = (
    ("kilometer", "kilometers", "meters", 1000),
    ("meter", "meters", "centimeters", 100),
    ("meter", "meters", "millimeters", 1000),
    ("kilogram", "kilograms", "grams", 1000),
    ("liter", "liters", "milliliters", 1000),
    ("hour", "hours", "minutes", 60),
    ("minute", "minutes", "seconds", 60),
    ("day", "days", "hours", 24),
    ("week", "weeks", "days", 7),
)


def _pick(rng: np.random.Generator, options: Sequence):
    """One element of `options`, uniformly."""
    return options[int(rng.integers(len(options)))]


def _numbers(rng: np.random.Generator, low: int, high: int, size: int) -> list[int]:
    """`size` integers in [low, high] (inclusive), as Python ints."""
    return [int(v) for v in rng.integers(low, high + 1, size=size)]


def _joined(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


# --- the families -------------------------------------------------------------------------------
def _addition(rng: np.random.Generator) -> Example:
    a, b = _numbers(rng, 0, 50, 2)
    template = _pick(
        rng,
        (
            "What is the sum of the numbers {a} and {b}?",
            "Add the number {a} to the number {b}.",
            "Compute {a} + {b}.",
            "What is {a} plus {b}?",
        ),
    )
    return template.format(a=a, b=b), str(a + b)


def _subtraction(rng: np.random.Generator) -> Example:
    small, big = sorted(_numbers(rng, 0, 50, 2))
    template = _pick(
        rng,
        (
            "What is {big} minus {small}?",
            "Subtract the number {small} from the number {big}.",
            "Compute {big} - {small}.",
        ),
    )
    return template.format(big=big, small=small), str(big - small)


def _multiplication(rng: np.random.Generator) -> Example:
    a, b = _numbers(rng, 2, 12, 2)
    template = _pick(
        rng,
        (
            "What is {a} times {b}?",
            "Multiply the number {a} by the number {b}.",
            "Compute {a} * {b}.",
            "What is the product of the numbers {a} and {b}?",
        ),
    )
    return template.format(a=a, b=b), str(a * b)


def _reverse_word(rng: np.random.Generator) -> Example:
    word = _pick(rng, WORDS)
    template = _pick(
        rng,
        (
            "Reverse the word '{w}'.",
            "Write the letters of the word '{w}' in reverse order.",
            "Spell the word '{w}' backwards.",
        ),
    )
    return template.format(w=word), word[::-1]


def _uppercase_word(rng: np.random.Generator) -> Example:
    word = _pick(rng, WORDS)
    template = _pick(
        rng,
        (
            "Write the word '{w}' in uppercase.",
            "Convert the word '{w}' to capital letters.",
            "Give the word '{w}' with every letter in upper case.",
        ),
    )
    return template.format(w=word), word.upper()


def _sort_numbers(rng: np.random.Generator) -> Example:
    values = _numbers(rng, 0, 99, int(rng.integers(3, 6)))
    template = _pick(
        rng,
        (
            "Sort the list {v} in ascending order.",
            "Put the numbers in the list [{v}] from smallest to largest.",
            "Order the numbers {v} from the smallest to the largest.",
        ),
    )
    return template.format(v=_joined(values)), _joined(sorted(values))


def _count_letters(rng: np.random.Generator) -> Example:
    word = _pick(rng, WORDS)
    # mostly a letter of the word, sometimes any letter (so that 0 is an answer too)
    letter = _pick(rng, word) if rng.random() < 0.8 else _pick(rng, "abcdefghijklmnopqrstuvwxyz")
    template = _pick(
        rng,
        (
            "How many times does the letter '{c}' appear in the word '{w}'?",
            "Count the letter '{c}' in the word '{w}'.",
            "In the word '{w}', how many letters are '{c}'?",
        ),
    )
    return template.format(c=letter, w=word), str(word.count(letter))


def _unit_conversion(rng: np.random.Generator) -> Example:
    singular, plural, smaller, factor = _pick(rng, UNITS)
    value = int(rng.integers(1, 21))
    unit = singular if value == 1 else plural
    template = _pick(
        rng,
        (
            "How many {s} are in {v} {u}?",
            "Convert {v} {u} to {s}.",
            "What is {v} {u} in {s}? Give the number.",
        ),
    )
    return template.format(s=smaller, v=value, u=unit), str(value * factor)


def _capital_lookup(rng: np.random.Generator) -> Example:
    country = _pick(rng, list(CAPITALS))
    template = _pick(
        rng,
        (
            "What is the capital of {c}?",
            "Name the capital city of {c}.",
            "Which city is the capital of {c}?",
        ),
    )
    return template.format(c=country), CAPITALS[country]


def _element_symbol(rng: np.random.Generator) -> Example:
    element = _pick(rng, list(ELEMENTS))
    template = _pick(
        rng,
        (
            "What is the chemical symbol of {e}?",
            "Give the symbol for the element {e}.",
            "Which symbol does the element {e} have in the periodic table?",
        ),
    )
    return template.format(e=element), ELEMENTS[element]


def _next_number(rng: np.random.Generator) -> Example:
    start, step = int(rng.integers(0, 21)), int(rng.integers(1, 10))
    values = [start + step * i for i in range(int(rng.integers(4, 6)))]
    template = _pick(
        rng,
        (
            "What is the next number in the list {v}?",
            "Continue the sequence {v} with one more number.",
            "Give the number that comes next: {v}.",
        ),
    )
    return template.format(v=_joined(values)), str(values[-1] + step)


def _compare_numbers(rng: np.random.Generator) -> Example:
    a = int(rng.integers(0, 100))
    b = (a + int(rng.integers(1, 100))) % 100  # any other number in 0..99
    template = _pick(
        rng,
        (
            "Which number is larger, {a} or {b}?",
            "Of the numbers {a} and {b}, which is the larger one?",
            "Pick the larger number: {a} or {b}.",
        ),
    )
    return template.format(a=a, b=b), str(max(a, b))


def _first_letter(rng: np.random.Generator) -> Example:
    word = _pick(rng, WORDS)
    template = _pick(
        rng,
        ("What is the first letter of the word '{w}'?", "Give the first letter of the word '{w}'."),
    )
    return template.format(w=word), word[0]


def _word_length(rng: np.random.Generator) -> Example:
    word = _pick(rng, WORDS)
    template = _pick(
        rng,
        (
            "How many letters are in the word '{w}'?",
            "What is the length of the word '{w}'?",
            "Count the letters of the word '{w}'.",
        ),
    )
    return template.format(w=word), str(len(word))


GENERATORS: dict[str, Callable[[np.random.Generator], Example]] = {
    "addition": _addition,
    "subtraction": _subtraction,
    "multiplication": _multiplication,
    "reverse_word": _reverse_word,
    "uppercase_word": _uppercase_word,
    "sort_numbers": _sort_numbers,
    "count_letters": _count_letters,
    "unit_conversion": _unit_conversion,
    "capital_lookup": _capital_lookup,
    "element_symbol": _element_symbol,
    "next_number": _next_number,
    "compare_numbers": _compare_numbers,
    "first_letter": _first_letter,
    "word_length": _word_length,
}
FAMILIES: list[str] = list(GENERATORS)


def synthetic_instructions(n_examples: int, seed: int = 0, families: list[str] | None = None) -> pl.DataFrame:
    """A deterministic instruction corpus in the corpus layout.

    Args:
        n_examples: how many examples (rows).
        seed: seeds the numpy Generator that assigns families, picks templates and draws values.
        families: which families to use (names from `FAMILIES`); None = all of them.

    Returns:
        example_id int64 (0..n-1), prompt str, response str, group str (the family name). Family sizes
        differ by at most one.

    Raises:
        DataError: n_examples < 1, an empty `families`, or an unknown family name.
    """
    if n_examples < 1:
        raise DataError(f"synthetic_instructions: n_examples={n_examples}; set it to 1 or more")
    chosen = _checked_families(families)
    rng = np.random.default_rng(seed)
    assigned = [chosen[i % len(chosen)] for i in range(n_examples)]  # round robin
    order = rng.permutation(n_examples)
    groups = [assigned[i] for i in order]
    prompts, responses = zip(*(GENERATORS[family](rng) for family in groups), strict=True)
    return pl.DataFrame(
        {
            "example_id": pl.Series(np.arange(n_examples), dtype=pl.Int64),
            "prompt": pl.Series(prompts, dtype=pl.String),
            "response": pl.Series(responses, dtype=pl.String),
            "group": pl.Series(groups, dtype=pl.String),
        }
    )


def disjoint_draw(
    n_examples: int, seed: int, families: list[str] | None, exclude: pl.DataFrame, tries: int = 8
) -> pl.DataFrame:
    """`n_examples` examples of another draw (`seed`) none of whose (prompt, response) pairs is in
    `exclude`: draws of 2n, 4n, … examples are filtered until n remain (the first n, ids 0..n-1).

    Raises:
        DataError: the families cannot make n examples outside `exclude` (e.g. a small fact table).
    """
    pairs = exclude.select("prompt", "response").unique()
    size, kept = 2 * n_examples, pl.DataFrame()
    for _ in range(tries):
        drawn = synthetic_instructions(size, seed, families)
        kept = drawn.join(pairs, on=["prompt", "response"], how="anti").unique(
            ["prompt", "response"], keep="first", maintain_order=True
        )
        if kept.height >= n_examples:
            out = kept.head(n_examples).with_columns(
                pl.int_range(n_examples, dtype=pl.Int64).alias("example_id")
            )
            return out
        size *= 2
    raise DataError(
        f"synthetic_instructions: only {kept.height} of {n_examples} examples are outside `exclude`; "
        "lower n_examples or choose families with more distinct examples"
    )


def _checked_families(families: list[str] | None) -> list[str]:
    """The chosen families in the given order; unknown names suggest the closest known ones."""
    if families is None:
        return list(FAMILIES)
    if not families:
        raise DataError(f"synthetic_instructions: families is empty; name some of {', '.join(FAMILIES)}")
    for name in families:
        if name not in GENERATORS:
            close = difflib.get_close_matches(name, FAMILIES, n=3)
            hint = f"did you mean {' or '.join(close)}?" if close else f"use one of {', '.join(FAMILIES)}"
            raise DataError(f"synthetic_instructions: unknown family {name!r}; {hint}")
    return list(dict.fromkeys(families))
