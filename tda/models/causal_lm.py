"""Causal language models (GPT-2 or Llama from transformers) as a model family over one flat θ.

An example is x = input_ids (L,) and y = labels (L,) int64, right-padded (see `tda.models.tokenizer`):
labels hold the token id on response tokens and -100 on prompt and pad tokens. The loss of an example
is the mean cross-entropy of its response tokens, each predicted from the tokens before it:

    ℓ(z, θ) = −(1/|R|) Σ_{t ∈ R} log p_θ(x_t | x_<t),      R = {t : y_t ≠ −100}   (0 when R is empty)

No attention mask is passed: with causal attention a token never sees the pads to its right.

θ is one float32 vector: the tensors of `model.named_parameters()` in that order, each flattened
row-major. Tied tensors are counted once, under the first name (GPT-2's token embedding
`transformer.wte.weight` is also its LM head; Llama's `model.embed_tokens.weight` likewise), so a
gradient with respect to θ includes the embedding's use in both places. `unflatten` cuts θ into views
with one `split`, whose backward is a single concatenation, and `torch.func.functional_call` runs the
model on them, so the base class's `vmap(grad(example_loss))` gives per-example gradients.

Training is not the exact minimiser of the objective in `tda.models.base` but a fine-tuning recipe:
AdamW for `epochs` passes of shuffled minibatches, the decoupled weight decay l2_sum / n standing in
for the (l2_sum/2)‖θ‖² term. It is deterministic for a seed, which is what subset retraining needs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, vmap

from tda.errors import ModelError
from tda.models.base import FitResult, ModelFamily
from tda.models.tokenizer import IGNORE_INDEX

if TYPE_CHECKING:  # transformers is imported where it is used: it takes seconds to import
    from transformers import PretrainedConfig, PreTrainedModel

ARCHITECTURES = ("gpt2", "llama")
LOSS_CHUNK_ROWS = 64  # examples per batched forward in `losses`
GRAD_CHUNK_ROWS = 16  # examples per vmap call in `per_example_grads`


def response_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of each row's response tokens: logits (b, L, V), labels (b, L) -> (b,)."""
    logits, labels = logits[:, :-1], labels[:, 1:]  # position t predicts token t + 1
    vocab = logits.shape[-1]
    tokens = F.cross_entropy(
        logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).reshape(labels.shape)  # (b, L-1), 0 off the response
    counts = (labels != IGNORE_INDEX).sum(dim=-1).clamp_min(1)  # (b,)
    return tokens.sum(dim=-1) / counts


def trim_padding(X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the columns after the last response token of any row; they cannot change a loss."""
    used = (y != IGNORE_INDEX).any(dim=0).nonzero()  # (k, 1)
    width = int(used.max()) + 1 if len(used) else 1
    return X[:, :width], y[:, :width]  # (n, width)


def model_config(
    architecture: str, vocab_size: int, n_layer: int, n_embd: int, n_head: int, n_positions: int, eos_id: int
) -> PretrainedConfig:
    """A small transformers config without dropout, tied embeddings and no pad id (see `CausalLM`)."""
    from transformers import GPT2Config, LlamaConfig

    common = {"vocab_size": vocab_size, "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": None}
    common |= {"tie_word_embeddings": True, "use_cache": False}
    if architecture == "gpt2":
        return GPT2Config(
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            n_positions=n_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            **common,
        )
    return LlamaConfig(
        num_hidden_layers=n_layer,
        hidden_size=n_embd,
        intermediate_size=4 * n_embd,
        num_attention_heads=n_head,
        num_key_value_heads=n_head,
        max_position_embeddings=n_positions,
        attention_dropout=0.0,
        **common,
    )


def load_pretrained(folder: str | Path) -> PreTrainedModel:
    """The causal LM saved in a transformers folder, in float32 with eager attention, in eval mode.

    Raises:
        ModelError: the folder is missing, unreadable, or holds no causal LM (weights missing).
    """
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    path = Path(folder)
    if not path.is_dir():
        raise ModelError(f"{path}: not a causal LM (no such folder); give a transformers causal-LM folder")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path),
            attn_implementation="eager",
            dtype=torch.float32,
            local_files_only=True,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{path}: not a causal LM ({reason}); give a transformers causal-LM folder") from exc
    if info.get("missing_keys"):
        missing = ", ".join(sorted(info["missing_keys"])[:3])
        raise ModelError(
            f"{path}: not a causal LM (weights missing: {missing}); give a transformers causal-LM folder"
        )
    model.config.pad_token_id = None  # see CausalLM: a pad id makes transformers inspect the ids
    model.config.use_cache = False
    return model.eval()


def quiet_transformers() -> None:
    """No progress bars for loading or writing weights: a step reports its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def flatten_parameters(model: torch.nn.Module) -> Tensor:
    """The model's parameters as one float32 θ (d,), in `named_parameters()` order, tied ones once."""
    return torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()]).to(torch.float32)


class CausalLM(ModelFamily):
    """A GPT-2 or Llama causal LM trained on the response tokens of (prompt, response) examples.

    The model is built from a small config (`architecture`, sizes) with the seed's own initialisation,
    or loaded from `pretrained`, a local transformers folder (then the sizes are the folder's and the
    size arguments are ignored). Attention is "eager" and dropout is off, as torch.func needs; the
    model's config carries no pad id, because transformers would otherwise inspect the input ids for
    pads, which vmap cannot do. `pad_id` and `eos_id` are written by `save_pretrained`.
    """

    name = "causal_lm"

    def __init__(
        self,
        architecture: str = "gpt2",
        *,
        vocab_size: int,
        pad_id: int,
        eos_id: int,
        n_layer: int = 2,
        n_embd: int = 128,
        n_head: int = 2,
        n_positions: int = 128,
        epochs: int = 2,
        lr: float = 3e-4,
        batch_size: int = 16,
        seed: int = 0,
        pretrained: str | None = None,
    ) -> None:
        self.architecture, self.vocab_size = architecture, vocab_size
        self.pad_id, self.eos_id = pad_id, eos_id
        self.n_layer, self.n_embd, self.n_head, self.n_positions = n_layer, n_embd, n_head, n_positions
        self.epochs, self.lr, self.batch_size, self.seed = epochs, lr, batch_size, seed
        self.pretrained = None if pretrained is None else str(pretrained)
        self._check_arguments()
        self.model = load_pretrained(self.pretrained) if self.pretrained else self._build(seed)
        if self.pretrained:  # the folder's own architecture (gpt2, llama, gpt_neox, qwen2, …)
            self.architecture = str(self.model.config.model_type)
        self._check_vocabulary()
        self.specs = [(name, p.shape) for name, p in self.model.named_parameters()]
        self.n_params = sum(shape.numel() for _, shape in self.specs)
        self.device, self.bf16 = torch.device("cpu"), False

    def to(self, device: torch.device | str, bf16: bool = False) -> CausalLM:
        """Compute on `device` (the model's buffers move there; θ and examples are moved per call, and
        results come back to the CPU); `bf16` = bfloat16 autocast of the forward passes on CUDA, with
        weights, gradients and the optimizer in float32. Returns self."""
        self.device = torch.device(device)
        if bf16 and self.device.type != "cuda":
            raise ModelError(f"{self.name}: bf16 autocast needs a CUDA device, not {self.device}; use fp32")
        self.bf16 = bf16
        self.model.to(self.device)
        return self

    def _check_arguments(self) -> None:
        if self.pretrained is None and self.architecture not in ARCHITECTURES:
            raise ModelError(
                f"{self.name}: architecture {self.architecture!r} is unknown; use one of {ARCHITECTURES}"
            )
        shape = [self.vocab_size, self.n_layer, self.n_embd, self.n_head, self.n_positions]
        sizes = [*shape, self.epochs, self.batch_size]
        if min(sizes) < 1 or self.n_embd % self.n_head:
            raise ModelError(
                f"{self.name}: vocab_size, n_layer, n_embd, n_head, n_positions, epochs, batch_size = "
                f"{sizes}; all must be positive and n_embd a multiple of n_head"
            )
        if self.lr <= 0:
            raise ModelError(f"{self.name}: lr={self.lr}; give a positive learning rate")

    def _check_vocabulary(self) -> None:
        """The tokenizer (`vocab_size` entries, its pad and eos ids) must be the model's: see
        `tda.models.checkpoint.check_vocabulary` for the padding of embedding rows it allows."""
        from tda.models.checkpoint import check_vocabulary

        rows = self.model.get_input_embeddings().num_embeddings
        if not (0 <= self.pad_id < rows and 0 <= self.eos_id < rows):
            raise ModelError(
                f"{self.name}: pad_id={self.pad_id}, eos_id={self.eos_id} do not fit the model's {rows} "
                "embeddings; give the tokenizer's ids"
            )
        where = self.pretrained or self.name
        check_vocabulary(self.vocab_size, self.vocab_size - 1, rows, where, "tokenizer")

    def _build(self, seed: int) -> PreTrainedModel:
        """A freshly initialised model from the config; the global RNG is left as it was."""
        from transformers import AutoModelForCausalLM

        sizes = (self.n_layer, self.n_embd, self.n_head, self.n_positions)
        config = model_config(self.architecture, self.vocab_size, *sizes, self.eos_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        return model.eval()

    @property
    def max_positions(self) -> int:
        """The longest sequence the model takes."""
        config = self.model.config
        return int(getattr(config, "n_positions", None) or config.max_position_embeddings)

    # --- the model -------------------------------------------------------------------
    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Views of θ (d,) as the model's named parameters, float32 on the family's device."""
        parts = theta.to(self.device, torch.float32).split([shape.numel() for _, shape in self.specs])
        return {name: part.view(shape) for (name, shape), part in zip(self.specs, parts, strict=True)}

    def logits(self, theta: Tensor, X: Tensor) -> Tensor:
        """Next-token logits in float32 on the family's device: X (b, L) int64 -> (b, L, V)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            output = functional_call(
                self.model, self.unflatten(theta), (X.to(self.device),), {"use_cache": False}
            )
        return output.logits.float()

    def row_losses(self, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
        """ℓ of each row of X (b, L), y (b, L) in one differentiable forward: (b,) on the device."""
        return response_losses(self.logits(theta, X), y.to(self.device))

    def module_losses(self, X: Tensor, y: Tensor) -> Tensor:
        """ℓ of each row computed by the module with its own weights, so hooks on its layers see the
        forward and backward (gradient features): (b,) on the device."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(X.to(self.device), use_cache=False).logits
        return response_losses(logits.float(), y.to(self.device))

    def example_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return self.row_losses(theta, x[None], y[None])[0]

    def init_params(self, seed: int) -> Tensor:
        """The model's own initialisation under `torch.manual_seed(seed)`, flattened (d,); for a
        `pretrained` model, its weights (the seed is then unused)."""
        if self.pretrained or seed == self.seed:
            return flatten_parameters(self.model).cpu()  # functional calls never change self.model
        return flatten_parameters(self._build(seed))

    def check_examples(self, X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """X, y as int64 (n, L); ModelError when the shapes, the length or the token ids do not fit."""
        if X.dim() != 2 or X.shape != y.shape:
            raise ModelError(
                f"{self.name}: X {tuple(X.shape)} and y {tuple(y.shape)} must both be (n, L); "
                "encode them with tda.models.tokenizer.encode_examples"
            )
        if X.shape[1] > self.max_positions:
            raise ModelError(
                f"{self.name}: examples are {X.shape[1]} tokens but the model takes {self.max_positions}; "
                "encode with a smaller max_len or build the model with a larger n_positions"
            )
        rows = self.model.get_input_embeddings().num_embeddings
        if X.numel() and (int(X.min()) < 0 or int(X.max()) >= rows):
            raise ModelError(
                f"{self.name}: token ids span [{int(X.min())}, {int(X.max())}] but the model has {rows}; "
                "use the tokenizer the model was built for"
            )
        return X.long(), y.long()

    # --- derived, batched --------------------------------------------------------------
    def losses(self, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
        """ℓ of every example (n,), float32, by batched forwards of LOSS_CHUNK_ROWS rows.

        No graph is built unless θ requires one (as inside torch.func.grad), so gradients and HVPs of
        the base class that go through `losses` stay correct.
        """
        X, y = self.check_examples(X, y)
        X, y = trim_padding(X, y)
        with torch.set_grad_enabled(torch.is_grad_enabled() and theta.requires_grad):
            parts = [
                self.row_losses(theta, X[lo : lo + LOSS_CHUNK_ROWS], y[lo : lo + LOSS_CHUNK_ROWS])
                for lo in range(0, len(X), LOSS_CHUNK_ROWS)
            ]
        return torch.cat(parts).cpu() if parts else theta.new_zeros(0, dtype=torch.float32).cpu()

    def per_example_grads(
        self, theta: Tensor, X: Tensor, y: Tensor, chunk_size: int = GRAD_CHUNK_ROWS
    ) -> Tensor:
        """∇_θ ℓ(z_i, θ) of every example (n, d), all parameters included; vmap over `chunk_size` rows
        at a time bounds the memory of the intermediate activations."""
        X, y = self.check_examples(X, y)
        if not len(X):
            return theta.new_zeros(0, self.n_params)
        X, y = trim_padding(X, y)
        per_row = vmap(grad(self.example_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)
        on = self.device
        return per_row(theta.detach().to(on, torch.float32), X.to(on), y.to(on)).cpu()  # (n, d)

    # --- training ----------------------------------------------------------------------
    def fit(
        self, X: Tensor, y: Tensor, l2_sum: float, init: Tensor | None = None, seed: int | None = None
    ) -> FitResult:
        """Fine-tune from `init` (else `init_params(seed)`): AdamW(lr, weight_decay = l2_sum / n),
        `epochs` passes over the rows in minibatches of `batch_size`, shuffled by a generator seeded
        with `seed` (default: the family's); the loss of a minibatch is the mean of its examples' ℓ.

        Returns:
            θ (d,) float32, the number of optimizer steps, the norm of the last minibatch's gradient,
            and converged=True (a fixed recipe has nothing to converge to).
        """
        X, y = self.check_examples(X, y)
        start = self.init_params(self.seed) if init is None else init.detach()
        theta = start.to(self.device, torch.float32).clone().requires_grad_(True)
        n = len(X)
        weight_decay = l2_sum / n if l2_sum > 0 and n else 0.0
        optimizer = torch.optim.AdamW([theta], lr=self.lr, weight_decay=weight_decay)
        generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        steps, grad_norm = 0, 0.0
        for _ in range(self.epochs if n else 0):
            for rows in torch.randperm(n, generator=generator).split(self.batch_size):
                X_batch, y_batch = trim_padding(X[rows], y[rows])  # (b, width)
                optimizer.zero_grad(set_to_none=True)
                self.row_losses(theta, X_batch, y_batch).mean().backward()
                grad_norm = float(theta.grad.norm())
                optimizer.step()
                steps += 1
        return FitResult(theta.detach().cpu(), steps, grad_norm, True)

    # --- configuration and export ------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "family": self.name,
            "architecture": self.architecture,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "eos_id": self.eos_id,
            "n_layer": self.n_layer,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "n_positions": self.n_positions,
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "pretrained": self.pretrained,
        }

    RECIPE = ("epochs", "lr", "batch_size", "seed")

    def with_recipe(self, **recipe: Any) -> CausalLM:
        """The same model with another training recipe (epochs, lr, batch_size, seed), without loading
        or building it again: the copy shares `self.model`, which functional calls never change."""
        unknown = sorted(set(recipe) - set(self.RECIPE))
        if unknown:
            raise ModelError(f"{self.name}: {unknown[0]!r} is not part of the recipe {self.RECIPE}")
        out = copy.copy(self)
        for key, value in recipe.items():
            setattr(out, key, value)
        out._check_arguments()
        return out

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CausalLM:
        return cls(**{key: value for key, value in config.items() if key != "family"})

    def save_pretrained(self, theta: Tensor, folder: Path) -> None:
        """Write θ as an ordinary transformers folder (config.json + model.safetensors), loadable with
        `AutoModelForCausalLM.from_pretrained(folder)` or as this family's `pretrained`. The tokenizer
        is not written; save it beside with its own `save_pretrained`."""
        if theta.shape != (self.n_params,):
            raise ModelError(
                f"{self.name}: theta has shape {tuple(theta.shape)}; expected ({self.n_params},)"
            )
        model = copy.deepcopy(self.model)
        params = self.unflatten(theta.detach())
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(params[name])
        model.config.pad_token_id, model.config.eos_token_id = self.pad_id, self.eos_id
        quiet_transformers()
        model.save_pretrained(str(folder))
