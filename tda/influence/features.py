"""Per-example gradient features: a projection φ(z) ∈ R^K of ∇_θ ℓ(z, θ) that scoring can use in place
of the gradient, formed without holding n × d gradients (and, for LoGra, without any per-example one).

Three projections:

- `logra` (LoGra, Choe et al. 2024), causal LMs only. For each chosen linear layer l (an `nn.Linear`
  with weight (out, in), or GPT-2's `Conv1D` with weight (in, out)) two fixed random matrices
  P_in (in, k_in) and P_out (out, k_out) with N(0, 1/k) entries, seeded by (seed, layer name). A
  forward hook keeps the projected inputs x̃_t = x_t P_in (b, T, k_in) and a hook on the layer's output
  keeps the projected output gradients g̃_t = g_t P_out (b, T, k_out) of one batched backward of
  Σ_i ℓ(z_i); then

      φ_l(z) = Σ_t g̃_tᵀ x̃_t = P_outᵀ (Σ_t g_tᵀ x_t) P_in = P_outᵀ ∇_{W_l} ℓ(z) P_in      (k_out, k_in)

  (for Conv1D, ∇_W is the transpose). The per-example weight gradient is never formed; biases are
  not featurised. φ(z) concatenates the flattened φ_l in layer order: K = Σ_l k_out k_in. Only the
  activations' gradients are computed (no weight gradients): the backward is cheaper than training's.
  Over training rows the same pass sums the Kronecker factors of each layer in projected space,
  A_l = Σ_{z, t} x̃_t x̃_tᵀ and S_l = Σ_{z, t} g̃_t g̃_tᵀ, for K-FAC and EK-FAC.
- `trak` (TRAK, Park et al. 2023): the full per-example gradients of `rows` examples at a time
  (torch.func) times a dense random matrix R (d, k) with N(0, 1/k) entries, generated in row blocks
  from the seed and never held whole (drawing R costs more than the product, so it is drawn once per
  `rows` examples): for models small enough that rows × d gradients fit.
- `identity`: the full per-example gradient (K = d), for tests and tiny models.
"""

from __future__ import annotations

import fnmatch
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tda.errors import InfluenceError
from tda.models.causal_lm import trim_padding

PROJECTIONS = ("logra", "trak", "identity")
TRAK_ROWS = 1 << 16  # rows of R generated at once


@dataclass(frozen=True)
class Projection:
    """How features are made; recorded in the features' manifest (kind, seed, layers, k)."""

    kind: str
    seed: int = 0
    k: int = 256  # trak: the feature dimension
    k_in: int = 16  # logra: per layer
    k_out: int = 16  # logra: per layer
    layers: tuple[str, ...] = ("*",)  # logra: name patterns (fnmatch) of the linear layers
    exclude: tuple[str, ...] = ("lm_head",)  # logra: name patterns left out
    rows: int = 256  # trak: rows whose full gradients are projected together (R is drawn once per pass)

    def __post_init__(self) -> None:
        if self.kind not in PROJECTIONS:
            raise InfluenceError(
                f"projection {self.kind!r} is unknown; choose one of {', '.join(PROJECTIONS)}"
            )
        if min(self.k, self.k_in, self.k_out) < 1:
            raise InfluenceError(
                f"projection: k={self.k}, k_in={self.k_in}, k_out={self.k_out}; all must be ≥ 1"
            )


@dataclass(frozen=True)
class Layer:
    """A featurised linear layer: its name, module, input and output sizes, and weight layout."""

    name: str
    module: torch.nn.Module
    d_in: int
    d_out: int
    conv1d: bool  # GPT-2's Conv1D: weight (in, out)


def _seed(seed: int, name: str) -> int:
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


def gaussian(rows: int, cols: int, seed: int, name: str) -> Tensor:
    """A (rows, cols) matrix with N(0, 1/cols) entries, the same for the same (seed, name)."""
    generator = torch.Generator().manual_seed(_seed(seed, name))
    return torch.randn(rows, cols, generator=generator) / cols**0.5


# ---------------------------------------------------------------- LoGra


def linear_layers(model: torch.nn.Module, projection: Projection) -> list[Layer]:
    """The linear layers (nn.Linear, GPT-2's Conv1D) whose names match `layers` and not `exclude`;
    InfluenceError, naming the patterns and the layers there are, if none matches or k is too large."""
    candidates = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear):
            candidates.append(Layer(name, module, module.in_features, module.out_features, False))
        elif type(module).__name__ == "Conv1D" and weight is not None and weight.dim() == 2:
            candidates.append(Layer(name, module, weight.shape[0], weight.shape[1], True))
    chosen = [
        layer
        for layer in candidates
        if any(fnmatch.fnmatchcase(layer.name, p) for p in projection.layers)
        and not any(fnmatch.fnmatchcase(layer.name, p) for p in projection.exclude)
    ]
    if not chosen:
        known = ", ".join(layer.name for layer in candidates[:8]) + (", …" if len(candidates) > 8 else "")
        raise InfluenceError(
            f"layers {list(projection.layers)} (excluding {list(projection.exclude)}) match no linear layer "
            f"of the model; its linear layers are: {known or 'none'}"
        )
    for layer in chosen:
        if projection.k_in > layer.d_in or projection.k_out > layer.d_out:
            raise InfluenceError(
                f"layer {layer.name} is {layer.d_in} → {layer.d_out} but k_in={projection.k_in}, "
                f"k_out={projection.k_out}; give k_in ≤ {layer.d_in} and k_out ≤ {layer.d_out}, or exclude it"
            )
    return chosen


@dataclass
class FactorSums:
    """Σ x̃x̃ᵀ and Σ g̃g̃ᵀ per layer (projected Kronecker factors) and the tokens counted."""

    A: dict[str, Tensor] = field(default_factory=dict)  # (k_in, k_in)
    S: dict[str, Tensor] = field(default_factory=dict)  # (k_out, k_out)
    tokens: int = 0

    def add(self, other: FactorSums) -> None:
        for mine, theirs in ((self.A, other.A), (self.S, other.S)):
            for name, value in theirs.items():
                mine[name] = mine[name] + value if name in mine else value.clone()
        self.tokens += other.tokens


class LoGra:
    """Hooks that turn one batched backward into the projected per-example gradients of `layers`."""

    def __init__(self, model: torch.nn.Module, projection: Projection) -> None:
        self.model, self.projection = model, projection
        self.layers = linear_layers(model, projection)
        device = next(model.parameters()).device
        seed, k_in, k_out = projection.seed, projection.k_in, projection.k_out
        self.p_in = {ly.name: gaussian(ly.d_in, k_in, seed, f"{ly.name}/in").to(device) for ly in self.layers}
        self.p_out = {
            ly.name: gaussian(ly.d_out, k_out, seed, f"{ly.name}/out").to(device) for ly in self.layers
        }
        self.x: dict[str, Tensor] = {}
        self.g: dict[str, Tensor] = {}

    @property
    def dim(self) -> int:
        return len(self.layers) * self.projection.k_in * self.projection.k_out

    def _hooks(self) -> list[Any]:
        handles = []
        for layer in self.layers:
            handles.append(layer.module.register_forward_hook(self._forward(layer.name)))
        embeddings = self.model.get_input_embeddings()
        handles.append(embeddings.register_forward_hook(lambda m, i, out: out.requires_grad_(True)))
        return handles

    def _forward(self, name: str) -> Any:
        def hook(module: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            self.x[name] = inputs[0].detach().float() @ self.p_in[name]  # (b, T, k_in)

            def keep(grad: Tensor) -> None:
                self.g[name] = grad.detach().float() @ self.p_out[name]  # (b, T, k_out)

            if output.requires_grad:
                output.register_hook(keep)

        return hook

    def features(self, loss_fn: Any, X: Tensor, y: Tensor, sums: FactorSums | None = None) -> Tensor:
        """φ of each row of X (b, L): (b, K) float32 on the CPU; adds the factor sums when given.

        `loss_fn(X, y)` runs the model and returns the per-example losses (b,) on its device."""
        handles = self._hooks()
        try:
            with torch.enable_grad():
                losses = loss_fn(X, y)  # (b,)
                torch.autograd.backward(losses.sum())
        finally:
            for handle in handles:
                handle.remove()
        mask = _token_mask(y).to(losses.device)  # (b, T): the tokens before the last response token
        parts = []
        for layer in self.layers:
            x, g = self.x.pop(layer.name), self.g.pop(layer.name)  # (b, T, k_in), (b, T, k_out)
            parts.append(torch.einsum("bto,bti->boi", g, x).reshape(len(X), -1))  # (b, k_out k_in)
            if sums is not None:
                xm = x * mask[..., None]
                _accumulate(sums.A, layer.name, torch.einsum("bti,btj->ij", xm, xm))
                _accumulate(sums.S, layer.name, torch.einsum("bto,btp->op", g, g))
        if sums is not None:
            sums.tokens += int(mask.sum())
        return torch.cat(parts, dim=1).cpu()


def _accumulate(store: dict[str, Tensor], name: str, value: Tensor) -> None:
    value = value.double().cpu()
    store[name] = store[name] + value if name in store else value


def _token_mask(y: Tensor) -> Tensor:
    """(b, T) bool: positions up to each row's last response token (the rest is padding)."""
    labelled = y != -100
    last = torch.where(
        labelled.any(1), labelled.float().cumsum(1).argmax(1), torch.zeros(len(y), dtype=torch.long)
    )
    return torch.arange(y.shape[1])[None, :] <= last[:, None]


# ---------------------------------------------------------------- full gradients: trak, identity


def full_gradient_features(
    family: Any, theta: Tensor, X: Tensor, y: Tensor, projection: Projection
) -> Tensor:
    """φ of each row: the full per-example gradient (identity) or its dense random projection (trak)."""
    G = family.per_example_grads(theta, X, y).float()  # (b, d)
    if projection.kind == "identity":
        return G
    out = torch.zeros(len(G), projection.k)
    for j, lo in enumerate(range(0, G.shape[1], TRAK_ROWS)):
        block = G[:, lo : lo + TRAK_ROWS]
        out += block @ gaussian(block.shape[1], projection.k, projection.seed, f"trak/{j}")
    return out


def featurize(
    family: Any,
    theta: Tensor,
    X: Tensor,
    y: Tensor,
    projection: Projection,
    batch_size: int = 32,
    sums: FactorSums | None = None,
) -> Tensor:
    """φ of every row of X (n, L) or (n, d): (n, K) float32, `batch_size` rows per backward; with
    `sums`, LoGra's projected Kronecker factors of these rows are added to it.

    LoGra runs the family's module with its own weights (θ of a loaded model is those weights)."""
    if projection.kind != "logra":  # trak draws R once per `rows` rows: the cost of drawing dominates
        size = max(batch_size, projection.rows) if projection.kind == "trak" else batch_size
        parts = [full_gradient_features(family, theta, X[s], y[s], projection) for s in batches(len(X), size)]
        return torch.cat(parts) if parts else torch.zeros(0, feature_dim(family, projection))
    logra = LoGra(family.model, projection)
    frozen = [(p, p.requires_grad) for p in family.model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)  # gradients of the activations only
    try:
        parts = []
        for s in batches(len(X), batch_size):
            Xb, yb = family.check_examples(X[s], y[s])
            parts.append(logra.features(family.module_losses, *trim_padding(Xb, yb), sums))
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    return torch.cat(parts) if parts else torch.zeros(0, logra.dim)


def feature_dim(family: Any, projection: Projection) -> int:
    """K of the features `projection` makes for `family`."""
    if projection.kind == "identity":
        return int(family.init_params(0).numel())
    if projection.kind == "trak":
        return projection.k
    layers = linear_layers(family.model, projection)
    return len(layers) * projection.k_in * projection.k_out


def batches(n: int, size: int) -> Iterator[slice]:
    for lo in range(0, n, size):
        yield slice(lo, min(n, lo + size))
