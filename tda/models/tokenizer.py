"""Byte-level BPE tokenizers for the causal-LM family, and the encoding of (prompt, response) examples.

An example is the text f"{prompt}\\n" + response + EOS (after a BOS token when the tokenizer starts
every sequence with one, as Llama's does). It becomes two int64 rows of one length L:

    x = input_ids   the token ids, right-padded with the pad id
    y = labels      the token id on response tokens (EOS included), -100 on prompt and pad tokens

so the loss is taken on the response only. With right padding and causal attention no attention mask
is needed: a real token never attends to the pads after it. A data set is X (n, L) and y (n, L).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor

from tda.errors import ModelError

if TYPE_CHECKING:  # transformers is imported where it is used: it takes seconds to import
    from transformers import PreTrainedTokenizerFast

PAD_TOKEN, EOS_TOKEN = "<|pad|>", "<|eos|>"
IGNORE_INDEX = -100  # the label of tokens that carry no loss (prompt and pad)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, folder: Path, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and save it as a transformers folder.

    The vocabulary holds `<|pad|>` (id 0) and `<|eos|>` (id 1), the 256 byte symbols, then merges up to
    `vocab_size` entries (fewer if the texts offer no more pairs seen `min_frequency` times). Any text
    is encodable, and training is deterministic for the same texts.

    Args:
        texts: the training texts (e.g. every prompt and response of a corpus).
        vocab_size: the largest vocabulary; at least 258 (2 special tokens + 256 bytes).
        folder: where `save_pretrained` writes it; `AutoTokenizer.from_pretrained(folder)` loads it.
        min_frequency: the fewest occurrences of a pair for it to be merged.

    Returns:
        The trained tokenizer, with pad and eos tokens set.
    """
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 258:
        raise ModelError(f"tokenizer: vocab_size={vocab_size} is below 258 (2 special tokens + 256 bytes)")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def load_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """The tokenizer saved in `folder` (by `train_tokenizer` or any transformers fast tokenizer).

    Raises:
        ModelError: the folder is missing, holds no tokenizer, or the tokenizer has no eos token.
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such tokenizer folder; check the path or train the tokenizer first")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"{folder}: not a tokenizer folder ({reason}); give a transformers tokenizer"
        ) from exc
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{folder}: the tokenizer has no eos token; set one and save it again")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels mask pads, so any id serves as padding
    return tokenizer


def encode_examples(
    tokenizer: PreTrainedTokenizerFast, prompts: list[str], responses: list[str], max_len: int
) -> tuple[Tensor, Tensor]:
    """Token ids and labels of each (prompt, response), right-padded to the longest (≤ max_len).

    Each example is at most `max_len` tokens. The response (with its EOS) is cut at the right; a
    prompt that leaves no room for a response token keeps only its last `max_len - 1` tokens, the
    ones nearest the response, so every example keeps at least one response token.

    Returns:
        X (n, L) int64 input ids padded with the pad id, y (n, L) int64 labels (-100 off the response).
    """
    if len(prompts) != len(responses):
        raise ModelError(f"encode_examples: {len(prompts)} prompts but {len(responses)} responses")
    if max_len < 2:
        raise ModelError(
            f"encode_examples: max_len={max_len}; need at least 2 (a prompt and a response token)"
        )
    pad_id, eos_id = _special_ids(tokenizer)
    bos = _bos(tokenizer)
    prompt_ids = [
        bos + ids for ids in tokenizer([f"{p}\n" for p in prompts], add_special_tokens=False)["input_ids"]
    ]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    rows = [
        _truncate(prompt, [*response, eos_id], max_len)
        for prompt, response in zip(prompt_ids, response_ids, strict=True)
    ]
    width = max((len(p) + len(r) for p, r in rows), default=1)
    X = torch.full((len(rows), width), pad_id, dtype=torch.int64)  # (n, L)
    y = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)  # (n, L)
    for i, (prompt, response) in enumerate(rows):
        ids = torch.tensor(prompt + response, dtype=torch.int64)
        X[i, : len(ids)] = ids
        y[i, len(prompt) : len(ids)] = ids[len(prompt) :]
    return X, y


def _truncate(prompt: list[int], response: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """(prompt, response) token lists cut to at most max_len tokens together, ≥ 1 response token."""
    prompt = prompt[-(max_len - 1) :] if len(prompt) >= max_len else prompt
    return prompt, response[: max_len - len(prompt)]


def _bos(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """[bos id] when the tokenizer starts every sequence with one (Llama's), else [] (GPT-2's, ours)."""
    bos_id = tokenizer.bos_token_id
    special = tokenizer("", add_special_tokens=True)["input_ids"]
    return [bos_id] if bos_id is not None and special[:1] == [bos_id] else []


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> tuple[int, int]:
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ModelError("encode_examples: the tokenizer has no eos token; load it with load_tokenizer")
    pad_id = tokenizer.pad_token_id
    return (eos_id if pad_id is None else pad_id), eos_id
