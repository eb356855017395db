"""Ground truth by retraining: leave-group-out effects and per-subset target losses."""
