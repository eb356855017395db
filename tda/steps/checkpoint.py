"""`checkpoint`: a local transformers causal-LM folder with its own tokenizer, used as it is.

Scoring a released model is the most common use: `influence_scores` (gradient methods) take it as
`model`, `train_model` fine-tunes it with `init:`, `subset_effects` starts each subset's fine-tune from
it with `base:`. The folder is checked when the spec is validated (see `tda.models.checkpoint`) and is
referenced, never copied: the step's output records the folder, its tokenizer and their fingerprint
(every file's name, size and modification time), which also enters the cache key, so an edited
checkpoint re-runs every step that used it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from pipelines import InputPath, StepContext, StepKind, StepParams


class CheckpointParams(StepParams):
    """A causal LM as it is: a local transformers folder (GPT-2, Llama, GPT-NeoX, Qwen2, … layouts)."""

    kind: Literal["checkpoint"] = "checkpoint"
    tokenizer: InputPath | None = Field(
        None, description="A tokenizer folder (null = the model folder's own tokenizer)."
    )
    max_len: int = Field(
        128, gt=1, description="Tokens per example (prompt + response, cut to this); ≤ the model's positions."
    )
    path: InputPath = Field(
        description="A transformers causal-LM folder (config.json, model.safetensors or its shards), "
        "relative to the spec; checked with its tokenizer when the spec is validated."
    )

    @field_validator("path")
    @classmethod
    def _usable(cls, path: InputPath, info: ValidationInfo) -> InputPath:
        from tda.models.checkpoint import check_checkpoint

        if "://" not in path and "max_len" in info.data:
            check_checkpoint(path, info.data.get("tokenizer"), info.data["max_len"])
        return path


def checkpoint_step(params: CheckpointParams, ctx: StepContext) -> None:
    from tda.models import save_reference
    from tda.models.checkpoint import check_checkpoint, fingerprint
    from tda.models.tokenizer import load_tokenizer
    from tda.steps.train_model import lm_family

    info = check_checkpoint(params.path, params.tokenizer, params.max_len)
    family = lm_family(load_tokenizer(info.tokenizer), params.max_len, pretrained=str(info.folder))
    meta = {"max_len": params.max_len, "model_type": info.model_type, "architecture": info.architecture}
    meta |= {"l2": 0.0, "l2_sum": 0.0}  # trained elsewhere: no regulariser is known (influence: damping)
    save_reference(ctx.model_dir, family, meta, info.folder, info.tokenizer, fingerprint(info.folder))
    ctx.log_metrics(
        {"parameters": family.n_params, "vocabulary": info.vocabulary, "embedding_rows": info.embedding_rows}
    )


STEP = StepKind("checkpoint", CheckpointParams, checkpoint_step, version="1")
