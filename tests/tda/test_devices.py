"""`device: auto | cpu | cuda` and `precision` on the LM steps, tested on a machine without a GPU: auto
and cpu compute on the CPU with the same results, cuda without GPUs reserved or present is one line,
bf16 is refused off cuda, and GPU reservations enter the steps' demands."""

from __future__ import annotations

import pytest
import torch

import pipelines
from pipelines import SpecError, load_spec
from pipelines.cli import main
from tda.errors import ModelError
from tda.steps.common import resolve_device
from tests.tda.test_lm_steps import LM


def test_auto_and_cpu_resolve_to_the_cpu_and_cuda_is_one_line_without_a_gpu():
    assert resolve_device("cpu", 1.0) == torch.device("cpu")
    assert resolve_device("auto", 0.0) == torch.device("cpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto", 1.0) == torch.device("cpu")  # reserved, but none is visible
    with pytest.raises(ModelError, match=r"device cuda: no CUDA device is visible to this task"):
        resolve_device("cuda", 1.0)


def test_a_causal_lm_moves_to_a_device_and_refuses_bf16_off_cuda():
    from tda.models.causal_lm import CausalLM

    family = CausalLM(vocab_size=40, pad_id=0, eos_id=1, n_layer=1, n_embd=16, n_head=2, n_positions=16)
    theta = family.init_params(0)
    X = torch.randint(2, 40, (3, 8))
    y = X.clone()
    before = family.losses(theta, X, y)
    assert family.to("cpu") is family and torch.equal(family.losses(theta, X, y), before)
    with pytest.raises(ModelError, match="bf16 autocast needs a CUDA device"):
        family.to("cpu", bf16=True)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("steps.base.device=cuda", "steps.base: device cuda needs resources.num_gpus > 0"),
        ("steps.effects.device=cuda", "steps.effects: device cuda needs task_gpus > 0"),
        ("steps.graddot.device=cuda", "steps.graddot: device cuda needs resources.num_gpus > 0"),
        ("steps.base.precision=bf16", None),  # auto may find a GPU: allowed
    ],
)
def test_device_fields_are_checked_at_validation(write_spec, capsys, override, message):
    spec = write_spec(LM)
    extra = ["--set", "steps.base.device=cpu"] if override.endswith("bf16") else []
    code = main(["validate", str(spec), "--set", override, *extra])
    err = capsys.readouterr().err.strip()
    if message is None:  # bf16 with device cpu is refused, with auto it is not
        assert code == 2 and "precision bf16 is an autocast on cuda" in err and len(err.splitlines()) == 1
        assert main(["validate", str(spec), "--set", override]) == 0
        return
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_gpus_asked_of_a_cluster_without_any_stop_the_run_before_a_step(ray_session, write_spec, tmp_path):
    spec = write_spec(LM)
    overrides = ["steps.effects.device=cuda", "steps.effects.task_gpus=0.25"]
    with pytest.raises(
        SpecError, match=r"steps\.effects\.task_gpus: the step needs 0\.25 GPU but the Ray cluster has 0"
    ):
        pipelines.run(load_spec(spec, overrides), store=str(tmp_path / "store"), progress=False)
    assert not (tmp_path / "store" / "objects").exists() or not any(
        (tmp_path / "store" / "objects").iterdir()
    )


def test_device_cpu_gives_the_same_tables_and_the_same_cache(ray_session, tracking_uri, tmp_path, write_spec):
    spec = write_spec(LM)
    store = str(tmp_path / "store")
    first = pipelines.run(load_spec(spec), store=store, tracking_uri=tracking_uri, progress=False)
    cpu = ["steps.base.device=cpu", "steps.effects.device=cpu", "steps.graddot.device=cpu"]
    again = pipelines.run(load_spec(spec, cpu), store=store, tracking_uri=tracking_uri, progress=False)
    assert {i["status"] for i in again.steps.values()} == {"cached"}  # where it ran is not what it made
    forced = pipelines.run(
        load_spec(spec, cpu), store=store, tracking_uri=tracking_uri, progress=False, force=("base",)
    )
    for table in ("effects", "graddot"):
        assert forced.table(table).collect().equals(first.table(table).collect())
