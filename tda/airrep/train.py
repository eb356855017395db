"""Training AirRep from subset experiments: episodes, the weighted RankNet loss, validation, the loop.

The experiments (texts, subsets, roles and labels) come from `tda.airrep.experiments`.

A step is `episodes_per_step` episodes. An episode samples `targets_per_episode` fit targets and
`subsets_per_episode` train subsets (with `own_split`: of one split); member scores s = e(t)·e(z)
are pooled per subset with attention (Σ softmax(|s|) s; the temperature τ lives in e, see
`tda.airrep.model`), and for every target each pair of subsets (j, k) with y_j > y_k adds
w·softplus(−(ĝ_j − ĝ_k)), w = clamp(y_j − y_k, 0, 10); an episode's loss is the w-weighted mean.
The untrained model (step 0) is validated too and kept when nothing after it validates better.
Episodes are drawn from an RNG seeded by (seed, step, episode), so the run is the same
on any number of workers: with W workers, worker r takes episodes r, r+W, …, and the gradients are
summed across workers (torch.distributed all_reduce) and divided by the global episode count, which is
the 1-worker gradient exactly.

Frozen body. `trainable: projection` caches the encoder's pooled features once; `last_n_layers`
caches the hidden states entering the last n layers once and runs only those layers per step.

Checkpoints (`checkpoint_dir`, every `checkpoint_every` steps, written by rank 0; `checkpoint.py`):
the trained parameters, the optimizer state, the step, the loss/validation history and the best
parameters so far, as data only — one folder per checkpoint, `step-0000020/` holding
`tensors.safetensors` and `state.json`, written under a hidden name and renamed into place; the last
two are kept. A (re)started run resumes from the latest one and continues identically. A checkpoint
that is unreadable, corrupt or foreign stops the run with a one-line DataError saying to delete it;
pickle checkpoints of earlier versions (`step-*.pt`) are never loaded (unpickling would run whatever
code someone planted in the store): the run says so and starts without them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tda.airrep.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    legacy_checkpoints,
    read_checkpoint,
    unreadable,
    write_checkpoint,
)
from tda.airrep.experiments import Experiments
from tda.airrep.model import AirRep, attention_pool
from tda.errors import DataError

WEIGHT_CLIP = 10.0


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe (see the module docstring)."""

    trainable: str = "last_n_layers"
    n_layers: int = 1
    steps: int = 200
    lr: float = 1e-4
    projection_lr: float | None = None  # null = lr
    warmup_steps: int = 20
    weight_decay: float = 0.01
    anchor: float = 0.0  # L2 pull of the trained parameters towards their starting values (L2-SP)
    grad_clip: float = 1.0
    episodes_per_step: int = 2
    targets_per_episode: int = 16
    subsets_per_episode: int = 8
    eval_every: int = 25
    checkpoint_every: int = 25
    batch_size: int = 128  # examples per encoder forward
    labels: str = "all"  # all | own_split (see tda.airrep.experiments)
    temperature: float = 1.0  # τ of the attention over f(t)·f(z): its start when learned
    learn_temperature: bool = False
    normalize: bool = False  # L2-normalise f before the scale
    seed: int = 0  # episodes (the roles have their own seed)


# --------------------------------------------------------------------------- features


class Featurizer:
    """Embeds rows of `texts` with the trainable part of the model; the frozen part is cached once."""

    def __init__(
        self, model: AirRep, texts: list[str], config: TrainConfig, device: torch.device | None = None
    ) -> None:
        self.model, self.config = model, config
        self.device = device or torch.device("cpu")
        self.mode, self.n_layers = config.trainable, config.n_layers
        self.texts = texts
        self.cache: list[Any] = []
        with torch.no_grad():
            for i in range(0, len(texts), config.batch_size):
                batch = {
                    k: v.to(self.device) for k, v in model.tokenize(texts[i : i + config.batch_size]).items()
                }
                if self.mode == "projection":
                    self.cache.append(model.pooled(**batch))
                elif self.mode == "last_n_layers":
                    states = model.body_states(**batch, n_layers=self.n_layers)
                    lengths = batch["attention_mask"].sum(1)
                    self.cache.extend(s[:k].clone() for s, k in zip(states, lengths.tolist(), strict=True))
                else:
                    ids, mask = batch["input_ids"], batch["attention_mask"]
                    self.cache.extend(row[: int(k)].clone() for row, k in zip(ids, mask.sum(1), strict=True))
        if self.mode == "projection":
            self.features = torch.cat(self.cache)

    def __call__(self, rows: np.ndarray) -> Tensor:
        """Embeddings of `rows` (len(rows), d), differentiable in the trainable parameters."""
        if self.mode == "projection":
            return self.model.head(self.features[torch.as_tensor(rows, device=self.device)])
        # batches of similar length pad little: rows sorted by length, the output put back in order
        order = np.argsort([len(self.cache[int(r)]) for r in rows], kind="stable")
        out = []
        for i in range(0, len(rows), self.config.batch_size):
            chunk = [self.cache[int(r)] for r in rows[order[i : i + self.config.batch_size]]]
            mask = _mask(chunk).to(self.device)
            padded = torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True)
            if self.mode == "last_n_layers":
                out.append(self.model.tail(padded, mask, self.n_layers))
            else:
                out.append(self.model(padded, mask))
        emb = torch.cat(out)
        return emb[torch.as_tensor(np.argsort(order), device=emb.device)]


def _mask(chunk: list[Tensor]) -> Tensor:
    lengths = torch.tensor([len(c) for c in chunk])
    return (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()


# --------------------------------------------------------------------------- loss


def ranknet_loss(pred: Tensor, labels: Tensor) -> Tensor:
    """Weighted pairwise RankNet over subsets, per target; pred and labels (B, J), NaN labels skipped.

    Σ w_jk softplus(−(ĝ_j − ĝ_k)) / Σ w_jk with w_jk = clamp(y_j − y_k, 0, 10).
    """
    known = torch.isfinite(labels)
    y = torch.nan_to_num(labels, nan=0.0)
    w = (y[:, :, None] - y[:, None, :]).clamp(0.0, WEIGHT_CLIP)
    w = w * (known[:, :, None] & known[:, None, :])
    total = w.sum()
    if total <= 0:
        return pred.sum() * 0.0
    return (w * F.softplus(-(pred[:, :, None] - pred[:, None, :]))).sum() / total


def pooled_predictions(target_emb: Tensor, member_emb: Tensor, index: Tensor, mask: Tensor) -> Tensor:
    """Attention-pooled group scores (B, J): index/mask (J, kmax) into member_emb's rows."""
    scores = target_emb @ member_emb.T  # (B, U)
    return attention_pool(scores[:, index], mask[None, :, :].expand(scores.shape[0], -1, -1))


def padded_members(members: list[np.ndarray]) -> tuple[np.ndarray, Tensor, Tensor]:
    """(unique rows, index (J, kmax) into them, mask (J, kmax)) for a list of member-row arrays."""
    unique, inverse = np.unique(np.concatenate(members), return_inverse=True)
    kmax = max(len(m) for m in members)
    index = torch.zeros(len(members), kmax, dtype=torch.long)
    mask = torch.zeros(len(members), kmax, dtype=torch.bool)
    start = 0
    for j, m in enumerate(members):
        index[j, : len(m)] = torch.as_tensor(inverse[start : start + len(m)])
        mask[j, : len(m)] = True
        start += len(m)
    return unique, index, mask


# --------------------------------------------------------------------------- episodes


@dataclass(frozen=True)
class Episode:
    targets: np.ndarray  # target positions
    subsets: np.ndarray  # subset positions


def episode(exp: Experiments, config: TrainConfig, step: int, number: int) -> Episode:
    """The `number`-th episode of `step`: the same on every worker and on a resumed run."""
    rng = np.random.default_rng([config.seed, step, number])
    fit_targets = exp.target_role == "fit"
    train_subsets = exp.subset_role == "train"
    if config.labels == "own_split":  # one split's targets and subsets
        splits = np.unique(exp.subset_split[train_subsets])
        splits = [s for s in splits if fit_targets[exp.target_split == s].any()]
        split = splits[int(rng.integers(len(splits)))]
        fit_targets = fit_targets & (exp.target_split == split)
        train_subsets = train_subsets & (exp.subset_split == split)
    targets, subsets = np.flatnonzero(fit_targets), np.flatnonzero(train_subsets)
    targets = rng.choice(targets, size=min(config.targets_per_episode, len(targets)), replace=False)
    subsets = rng.choice(subsets, size=min(config.subsets_per_episode, len(subsets)), replace=False)
    return Episode(np.sort(targets), np.sort(subsets))


def episode_loss(exp: Experiments, embed: Featurizer, ep: Episode) -> Tensor:
    unique, index, mask = padded_members([exp.members[j] for j in ep.subsets])
    rows = np.concatenate([exp.target_rows(ep.targets), unique])
    emb = embed(rows)
    index, mask = index.to(emb.device), mask.to(emb.device)
    pred = pooled_predictions(emb[: len(ep.targets)], emb[len(ep.targets) :], index, mask)
    labels = torch.as_tensor(exp.labels[np.ix_(ep.subsets, ep.targets)].T, device=emb.device)  # (B, J)
    return ranknet_loss(pred, labels)


# --------------------------------------------------------------------------- validation


@torch.no_grad()
def validation_lds(exp: Experiments, embed: Featurizer, role: str = "val", subset_role: str = "val") -> float:
    """Mean Spearman over `role` targets between attention-pooled predictions and the measured −loss
    over the `subset_role` subsets (of every split: the effects measure each subset on every target).
    NaN when there are none."""
    from scipy.stats import spearmanr

    targets = np.flatnonzero(exp.target_role == role)
    subsets = np.flatnonzero(exp.subset_role == subset_role)
    if len(targets) == 0 or len(subsets) < 3:
        return float("nan")
    unique, index, mask = padded_members([exp.members[j] for j in subsets])
    emb = embed(np.concatenate([exp.target_rows(targets), unique]))
    index, mask = index.to(emb.device), mask.to(emb.device)
    pred = pooled_predictions(emb[: len(targets)], emb[len(targets) :], index, mask).cpu().numpy()  # (m, J)
    source = exp.measured if exp.measured is not None else exp.labels
    labels = source[np.ix_(subsets, targets)].T
    rhos = []
    for p, y in zip(pred, labels, strict=True):
        ok = np.isfinite(y)
        if ok.sum() >= 3 and np.ptp(y[ok]) > 0:
            rhos.append(spearmanr(p[ok], y[ok]).statistic)
    return float(np.nanmean(rhos)) if rhos else float("nan")


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainState:
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_lds: float = -math.inf
    best_step: int = -1
    best_params: dict[str, Tensor] | None = None
    resumed_from: list[int] = field(default_factory=list)  # checkpoint steps this run restarted from


@dataclass
class Loop:
    """What every step of `train` uses: the experiments, the features, the trained parameters and their
    optimizer, and this worker's place among the workers."""

    model: AirRep
    exp: Experiments
    config: TrainConfig
    embed: Featurizer
    optimizer: torch.optim.Optimizer
    names: list[str]  # the trained parameters' names, in `params` order
    params: list[torch.nn.Parameter]
    start: dict[str, Tensor]  # the anchor's starting values ({} without an anchor)
    rank: int = 0
    world: int = 1
    distributed: bool = False


def trained_parameters(model: AirRep) -> dict[str, Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def train(
    model: AirRep,
    exp: Experiments,
    config: TrainConfig,
    *,
    checkpoint_dir: Path | None = None,
    report: Callable[[dict[str, float]], None] | None = None,
    log: Callable[[str], None] | None = None,
    device: torch.device | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> TrainState:
    """Train `model` in place (on every rank of torch.distributed when it is initialised); at the end
    the model holds the best validation parameters (the last ones when there is no validation).
    `on_step` receives rank 0's record of every step (step, loss, grad_norm, lr, val_lds when
    validated; step 0's validation too) as it happens, for live progress and metrics."""
    loop = _setup(model, exp, config, device, log)
    state = _resumed(checkpoint_dir, model, loop.optimizer, loop.names, log)
    if state.step == 0 and not state.history and config.eval_every and loop.rank == 0:
        record: dict[str, float] = {"step": 0}
        _validate(loop, state, record)  # the untrained model is a candidate too
        state.history.append(record)
        if on_step is not None:
            on_step(record)
    while state.step < config.steps:
        record = _step(loop, state.step)
        state.step += 1
        if config.eval_every and _at(state.step, config.eval_every, config) and loop.rank == 0:
            _validate(loop, state, record)
        state.history.append(record)
        if on_step is not None and loop.rank == 0:
            on_step(record)
        if loop.rank == 0 and checkpoint_dir is not None and _at(state.step, config.checkpoint_every, config):
            _save(checkpoint_dir, state, model, loop.optimizer, loop.names)
        if report is not None and _at(state.step, config.checkpoint_every, config):
            report(record)
        if log and (state.step % max(1, config.steps // 10) == 0 or state.step == 1):
            extra = f" val_lds {record['val_lds']:.3f}" if "val_lds" in record else ""
            log(f"step {state.step}/{config.steps} loss {record['loss']:.4f}{extra}")
    if state.best_params is not None:
        _load_params(model, state.best_params)
    return state


def _setup(
    model: AirRep,
    exp: Experiments,
    config: TrainConfig,
    device: torch.device | None,
    log: Callable[[str], None] | None,
) -> Loop:
    """Find the workers, make the recipe's parameters trainable, cache the frozen features, build the
    optimizer and keep the anchor's starting values."""
    rank, world, distributed = _workers(config)
    model.set_temperature(config.temperature, config.normalize)
    params = model.set_trainable(config.trainable, config.n_layers, config.learn_temperature)
    t0 = time.perf_counter()
    embed = Featurizer(model, exp.texts, config, device)
    if log:
        log(
            f"cached {config.trainable} features of {len(exp.texts)} texts in {time.perf_counter() - t0:.1f}s"
        )
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    optimizer = _optimizer(model, config)
    start = trained_parameters(model) if config.anchor > 0 else {}
    return Loop(model, exp, config, embed, optimizer, names, params, start, rank, world, distributed)


def _workers(config: TrainConfig) -> tuple[int, int, bool]:
    """(rank, world size, distributed) of this worker; every worker takes the same share of episodes."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if config.episodes_per_step % world:
        raise DataError(
            f"episodes_per_step {config.episodes_per_step} must be a multiple of num_workers {world}"
        )
    return rank, world, distributed


def _optimizer(model: AirRep, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trained parameters: the head (projection, scale) at projection_lr, the body at lr;
    each group keeps its `base_lr` for the schedule."""
    head = ("projection.", "log_scale")
    proj = [p for k, p in model.named_parameters() if p.requires_grad and k.startswith(head)]
    body = [p for k, p in model.named_parameters() if p.requires_grad and not k.startswith(head)]
    groups = [{"params": proj, "lr": config.projection_lr or config.lr}]
    if body:
        groups.append({"params": body, "lr": config.lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    for g in optimizer.param_groups:
        g["base_lr"] = g["lr"]
    return optimizer


def _step(loop: Loop, step: int) -> dict[str, float]:
    """One optimizer step (number `step`, from 0): schedule, this worker's episodes, the anchor, the
    all-reduce, clipping; returns its record (step + 1, loss, grad_norm, lr)."""
    config = loop.config
    factor = _lr_factor(step, config)
    for g in loop.optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    loop.optimizer.zero_grad(set_to_none=False)
    local = 0.0
    for number in range(loop.rank, config.episodes_per_step, loop.world):
        loss = episode_loss(loop.exp, loop.embed, episode(loop.exp, config, step, number))
        loss = loss / config.episodes_per_step
        loss.backward()
        local += float(loss.detach())
    if loop.start and loop.rank == 0:  # the penalty's gradient enters once, before the all-reduce
        drift = sum(((p - loop.start[k]) ** 2).sum() for k, p in zip(loop.names, loop.params, strict=True))
        (config.anchor * drift).backward()
    loss_value = _all_reduce(loop.params, local, loop.distributed)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(loop.params, config.grad_clip))
    loop.optimizer.step()
    return {"step": step + 1, "loss": loss_value, "grad_norm": grad_norm, "lr": config.lr * factor}


def _lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then linear decay to 0."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    rest = max(1, config.steps - config.warmup_steps)
    return max(0.0, 1.0 - (step - config.warmup_steps) / rest)


def _at(step: int, every: int, config: TrainConfig) -> bool:
    """Whether `step` is a multiple of `every` or the last one."""
    return step % every == 0 or step == config.steps


def _validate(loop: Loop, state: TrainState, record: dict[str, float]) -> None:
    """Validation LDS into `record`; the parameters become the best so far when it beats the best."""
    val = validation_lds(loop.exp, loop.embed)
    record["val_lds"] = val
    if math.isfinite(val) and val > state.best_lds:
        state.best_lds, state.best_step = val, int(record["step"])
        state.best_params = trained_parameters(loop.model)


def _all_reduce(params: list[Tensor], loss: float, distributed: bool) -> float:
    """Sum gradients and the loss over workers (each holds its episodes' share already)."""
    if not distributed:
        return loss
    import torch.distributed as dist

    flat = torch.cat(
        [p.grad.reshape(-1) for p in params]
        + [torch.tensor([loss], dtype=params[0].dtype, device=params[0].device)]
    )
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return float(flat[-1])


# --------------------------------------------------------------------------- checkpoints


def _resumed(
    folder: Path | None, model: AirRep, optimizer: Any, names: list[str], log: Callable[[str], None] | None
) -> TrainState:
    """The state to start from: the latest checkpoint's (loaded into model and optimizer), else fresh."""
    legacy = legacy_checkpoints(folder)
    if legacy and log:
        log(
            f"ignored {len(legacy)} old pickle checkpoint(s) in {folder} (step-*.pt, never loaded: "
            "unpickling runs code); delete them"
        )
    latest = latest_checkpoint(folder)
    if latest is None:
        return TrainState()
    state = _restore(latest, model, optimizer, names)
    state.resumed_from.append(state.step)
    if log:
        log(f"resumed from {latest.name} (step {state.step})")
    return state


def _save(folder: Path, state: TrainState, model: AirRep, optimizer: Any, names: list[str]) -> Path:
    fields = {k: v for k, v in asdict(state).items() if k != "best_params"}
    saved = Checkpoint(names, fields, trained_parameters(model), state.best_params, optimizer.state_dict())
    return write_checkpoint(folder, state.step, saved)


def _restore(path: Path, model: AirRep, optimizer: Any, names: list[str]) -> TrainState:
    saved = read_checkpoint(path)
    named = dict(model.named_parameters())
    stored = [saved.params] + ([saved.best_params] if saved.best_params is not None else [])
    if saved.names != names or any(d[k].shape != named[k].shape for d in stored for k in names):
        raise DataError(
            f"checkpoint {path}: it trains other parameters than this config; delete it or restore the config"
        )
    try:
        state = TrainState(**saved.state)
        optimizer.load_state_dict(saved.optimizer)
    except (KeyError, TypeError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise unreadable(path, f"its training or optimizer state does not fit ({reason})") from None
    if not isinstance(state.step, int) or not isinstance(state.history, list):
        raise unreadable(path, "its step or history is not of the right type")
    _check_optimizer_state(path, optimizer)
    _load_params(model, saved.params)
    state.best_params = saved.best_params
    return state


def _check_optimizer_state(path: Path, optimizer: Any) -> None:
    """Every per-parameter tensor (exp_avg, …; the scalar `step` aside) has its parameter's shape."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor) and value.dim() and value.shape != p.shape:
                    raise unreadable(path, f"optimizer state {key!r} has shape {tuple(value.shape)}")


def _load_params(model: AirRep, values: dict[str, Tensor]) -> None:
    named = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in values.items():
            named[k].copy_(v)
