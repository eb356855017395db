"""Ground truth by retraining: leave-group-out effects and per-subset target losses."""

from __future__ import annotations

from typing import Any


def check_finite_losses(effects: Any, what: str, fix: str) -> None:
    """DataError (one line) unless every `loss` of an effects table (subset_id, target_id, loss) is a
    finite number: a NaN or ±inf loss (a diverged fine-tune) would turn every rank and z-score it enters
    into NaN. `what` names the table, `fix` says what to do."""
    import polars as pl

    from tda.errors import DataError

    loss = pl.col("loss").cast(pl.Float64, strict=False)
    bad = effects.filter(loss.is_null() | ~loss.is_finite())
    if bad.height:
        row = bad.row(0, named=True)
        raise DataError(
            f"{what}: the loss of subset {row.get('subset_id')} on target {row.get('target_id')} is "
            f"{row['loss']} ({bad.height} of {effects.height} losses are not finite numbers); {fix}"
        )
