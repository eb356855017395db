"""subset_effects resumes after a crash: finished subsets are not retrained (no Ray: steps in-process)."""

from __future__ import annotations

import pytest

from pipelines import load_spec
from pipelines.context import Executor, execute_step
from pipelines.runner import plan
from pipelines.store import Store

SPEC = """
version: 1
name: resume
steps:
  wine:
    kind: tabular_dataset
    source: sklearn:wine
  data:
    kind: split
    data: wine
    n_targets: 20
  model:
    kind: train_model
    data: data
  subsets:
    kind: sample_subsets
    data: data
    n_subsets: 12
    fraction: 0.5
  effects:
    kind: subset_effects
    model: model
    data: data
    subsets: subsets
    subsets_per_task: 3
"""


class Crash(Exception):
    pass


class CrashAfter(Executor):
    """Runs tasks serially and dies after `n` finished tasks, like a killed run."""

    def __init__(self, n: int) -> None:
        self.n = n

    def imap_unordered(self, fn, items, **options):  # noqa: ANN001, ANN201
        for i, item in enumerate(items):
            if i == self.n:
                raise Crash
            yield fn(item)


def metric(outcome, name: str) -> float:
    return next(v for k, v, _ in outcome.metrics if k == name)


LM_SPEC = """
version: 1
name: resume_lm
steps:
  wine:
    kind: synthetic_instructions
    n_examples: 140
  data:
    kind: split
    data: wine
    n_targets: 20
  tokenizer:
    kind: train_tokenizer
    corpus: data
    vocab_size: 300
  model:
    kind: train_model
    data: data
    family: causal_lm
    tokenizer: tokenizer
    n_layer: 1
    n_embd: 32
    max_len: 48
    epochs: 1
    l2: 0
  subsets:
    kind: sample_subsets
    data: data
    n_subsets: 12
    subset_size: 30
  effects:
    kind: subset_effects
    model: model
    data: data
    subsets: subsets
    subsets_per_task: 3
"""


@pytest.mark.parametrize("text", [SPEC, LM_SPEC], ids=["logistic", "causal_lm"])
def test_rerun_after_a_crash_trains_only_the_missing_subsets(write_spec, tmp_path, text):
    store = Store(tmp_path / "store")
    _, planned = plan(load_spec(write_spec(text)), store)
    for name in [n for n in planned if n != "effects"]:
        assert execute_step(planned[name].job).ok
    job = planned["effects"].job
    with pytest.raises(Crash):
        execute_step(job, CrashAfter(2))
    assert not store.has(job.key) and len(list(store.scratch_dir(job.key).glob("batch-*.parquet"))) == 2
    outcome = execute_step(job)
    assert metric(outcome, "subsets_resumed") == 6 and metric(outcome, "subsets_trained") == 6
    effects = store.get(job.key).table().collect()
    assert effects.height == 12 * 20 and effects["subset_id"].n_unique() == 12
    assert not (store.root / "scratch" / job.key).exists()  # removed once committed
