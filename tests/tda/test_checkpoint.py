"""Checkpoints as users bring them: a transformers causal-LM folder with its own tokenizer, scored as it
is (GradDot checked against torch.func on the folder's own token ids), fine-tuned into a transformers
folder, and refused in one line at validation when it cannot work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from torch.func import functional_call, grad

import pipelines
from pipelines import load_spec
from pipelines.cli import main
from tda.data.synthetic import synthetic_instructions
from tda.errors import ModelError
from tda.models.checkpoint import check_checkpoint

N_EXAMPLES, N_TARGETS = 48, 6


def _tokenizer(folder: Path, texts: list[str], vocab_size: int, bos: bool):
    """A byte-level BPE tokenizer saved as a transformers folder; with `bos`, it starts every sequence
    with <s>, as Llama's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<s>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    if bos:
        bpe.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", eos_token="</s>", bos_token="<s>" if bos else None
    )
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def _model(architecture: str, vocab: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    ids = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    if architecture == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_layer=1, n_embd=32, n_head=2, n_positions=128, **ids)
    else:
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **ids,
        )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def _corpus() -> pl.DataFrame:
    return synthetic_instructions(N_EXAMPLES, seed=3)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT-2 and a tiny Llama, each saved with its own tokenizer; an encoder; a 2nd tokenizer."""
    root = tmp_path_factory.mktemp("checkpoints")
    texts = [f"{p}\n{r}" for p, r in _corpus().select("prompt", "response").iter_rows()]
    out = {}
    for architecture, vocab, bos in (("gpt2", 300, False), ("llama", 320, True)):
        folder = root / architecture
        tokenizer = _tokenizer(folder, texts, vocab, bos)
        _model(architecture, len(tokenizer)).save_pretrained(str(folder))
        out[architecture] = folder
    _tokenizer(root / "other_tokenizer", texts[:10], 2000, False)  # a much smaller vocabulary
    out["other_tokenizer"] = root / "other_tokenizer"
    return out


def _direct_graddot(folder: Path, train: pl.DataFrame, targets: pl.DataFrame) -> torch.Tensor:
    """∇ℓ_tᵀ∇ℓ_z with torch.func on the folder's model and the token ids its tokenizer makes (every
    example fits in the 128 positions, so nothing is cut)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    model.config.pad_token_id = None
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def rows(frame: pl.DataFrame) -> list[tuple[torch.Tensor, int]]:
        out = []
        for prompt, response in frame.select("prompt", "response").iter_rows():
            head = tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"]
            ids = head + tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            assert len(ids) <= 128
            out.append((torch.tensor(ids), len(head)))
        return out

    def loss(p: dict, ids: torch.Tensor, start: int) -> torch.Tensor:
        logits = functional_call(model, p, (ids[None],)).logits[0]  # (L, V)
        return torch.nn.functional.cross_entropy(logits[start - 1 : -1], ids[start:])

    def grads(frame: pl.DataFrame) -> torch.Tensor:
        flat = []
        for ids, start in rows(frame):
            g = grad(loss)(params, ids, start)
            flat.append(torch.cat([g[k].reshape(-1) for k in params]))
        return torch.stack(flat).double()  # (n, d)

    return grads(targets) @ grads(train).T  # (m, n)


SPEC = """
version: 1
name: ckpt
steps:
  corpus:
    kind: synthetic_instructions
    n_examples: {n}
    seed: 3
  data:
    kind: split
    data: corpus
    n_targets: {m}
  lm:
    kind: checkpoint
    path: {folder}
    max_len: 128
  graddot:
    kind: influence_scores
    model: lm
    data: data
    method: graddot
  tuned:
    kind: train_model
    data: data
    family: causal_lm
    init: lm
    max_len: 128
    epochs: 1
    l2: 0
"""


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_a_checkpoint_is_scored_as_it_is_and_fine_tuned_into_a_transformers_folder(
    ray_session, tracking_uri, tmp_path, folders, architecture
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = folders[architecture]
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(n=N_EXAMPLES, m=N_TARGETS, folder=folder))
    run = pipelines.run(
        load_spec(spec), store=str(tmp_path / "store"), tracking_uri=tracking_uri, progress=False
    )
    data = run.table("data").collect().sort("example_id")
    train, targets = data.filter(pl.col("split") == "train"), data.filter(pl.col("split") == "target")
    scores = run.table("graddot").collect()
    got = torch.tensor(
        scores.sort("target_id", "example_id")["score"].to_numpy().reshape(N_TARGETS, -1), dtype=torch.float64
    )
    expected = _direct_graddot(folder, train, targets)
    assert got.shape == expected.shape == (N_TARGETS, N_EXAMPLES - N_TARGETS)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))

    reference = run.output("lm").model_dir
    assert sorted(p.name for p in reference.iterdir()) == ["tda_model.json"]  # referenced, not copied
    assert json.loads((reference / "tda_model.json").read_text())["weights"] == str(folder)
    tuned = run.output("tuned").model_dir  # an ordinary transformers folder with its tokenizer
    model = AutoModelForCausalLM.from_pretrained(str(tuned))
    assert model.config.model_type == architecture
    assert len(AutoTokenizer.from_pretrained(str(tuned))) == len(AutoTokenizer.from_pretrained(str(folder)))
    before = AutoModelForCausalLM.from_pretrained(str(folder)).state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- refused at validation, in one line


def _broken(folders: dict[str, Path], tmp_path: Path, case: str) -> tuple[Path, str | None]:
    """A folder that cannot be used (and a tokenizer argument) for each case."""
    from transformers import BertConfig, BertModel

    folder = tmp_path / case
    if case == "encoder":
        BertModel(
            BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
        ).save_pretrained(str(folder))
        return folder, None
    shutil.copytree(folders["gpt2"], folder)
    if case == "no_weights":
        (folder / "model.safetensors").unlink()
    elif case == "only_pickles":
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    elif case == "missing_shard":
        (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
        weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif case == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)
    elif case == "other_tokenizer":
        return folder, str(folders["other_tokenizer"])
    return folder, None


CASES = {
    "encoder": "holds a BertModel, not a causal LM",
    "no_weights": "no weights (model.safetensors)",
    "only_pickles": "only pickled pytorch_model.bin weights; convert them to safetensors",
    "missing_shard": "shard model-00002-of-00002.safetensors of 2 is missing",
    "no_tokenizer": "no tokenizer (tokenizer.json or tokenizer_config.json)",
    "other_tokenizer": "embedding rows; give the tokenizer the model was trained with",
    "too_long": "examples of max_len=200 tokens exceed the model's 128 positions",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_unusable_checkpoint_is_one_line_at_validation_and_nothing_is_written(
    folders, tmp_path, capsys, case
):
    folder, tokenizer = _broken(folders, tmp_path, "gpt2_copy" if case == "too_long" else case)
    max_len = 200 if case == "too_long" else 48
    lines = [f"    max_len: {max_len}", f"    path: {folder}"] + (
        [f"    tokenizer: {tokenizer}"] if tokenizer else []
    )
    spec = tmp_path / "spec.yaml"
    spec.write_text("version: 1\nname: bad\nsteps:\n  lm:\n    kind: checkpoint\n" + "\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(["run", str(spec), "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"{spec}:7:5: steps.lm.path: "), err
    assert CASES[case] in err, err
    assert not (tmp_path / "store").exists()


def test_a_tokenizer_of_another_vocabulary_is_refused_both_ways(folders):
    with pytest.raises(
        ModelError, match=r"the tokenizer has \d+ tokens but the model .* has 300 embedding rows"
    ):
        check_checkpoint(folders["gpt2"], folders["other_tokenizer"])
    info = check_checkpoint(folders["llama"])  # its own: 320 rows for 320 tokens
    assert (info.model_type, info.architecture, info.embedding_rows) == ("llama", "LlamaForCausalLM", 320)
