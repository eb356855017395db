"""Gradient features: LoGra's hooks give the projection of torch.func's per-example gradients (GPT-2's
Conv1D and Llama's Linear layouts); trak and identity projections; bad layer patterns and k."""

from __future__ import annotations

import pytest
import torch

from tda.errors import InfluenceError
from tda.influence.features import FactorSums, Projection, featurize, gaussian, linear_layers
from tda.models.causal_lm import CausalLM
from tda.models.tokenizer import IGNORE_INDEX


def _family(architecture: str) -> CausalLM:
    return CausalLM(
        architecture=architecture,
        vocab_size=50,
        pad_id=0,
        eos_id=1,
        n_layer=2,
        n_embd=16,
        n_head=2,
        n_positions=16,
        seed=0,
    )


def _examples(n: int = 7, length: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + response rows of different lengths, right-padded (labels −100 on prompt and pads)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.zeros(n, length, dtype=torch.long)
    y = torch.full((n, length), IGNORE_INDEX)
    for i in range(n):
        used = int(torch.randint(5, length + 1, (1,), generator=g))
        prompt = int(torch.randint(1, used - 1, (1,), generator=g))
        X[i, :used] = torch.randint(2, 50, (used,), generator=g)
        y[i, prompt:used] = X[i, prompt:used]
    return X, y


def _projected_torch_func(family: CausalLM, X, y, projection: Projection) -> torch.Tensor:
    """P_outᵀ ∇_W ℓ P_in per layer from full per-example gradients (torch.func), concatenated."""
    theta = family.init_params(0)
    G = family.per_example_grads(theta, X, y)  # (n, d)
    rows = []
    for g in G:
        named = family.unflatten(g)
        parts = []
        for layer in linear_layers(family.model, projection):
            grad_w = named[f"{layer.name}.weight"]
            grad_w = grad_w.T if layer.conv1d else grad_w  # (out, in)
            p_in = gaussian(layer.d_in, projection.k_in, projection.seed, f"{layer.name}/in")
            p_out = gaussian(layer.d_out, projection.k_out, projection.seed, f"{layer.name}/out")
            parts.append((p_out.T @ grad_w @ p_in).reshape(-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_logra_hooks_equal_the_projection_of_per_example_gradients(architecture):
    family = _family(architecture)
    X, y = _examples()
    projection = Projection("logra", seed=3, k_in=4, k_out=5)
    phi = featurize(family, family.init_params(0), X, y, projection, batch_size=3)
    expected = _projected_torch_func(family, X, y, projection)
    layers = linear_layers(family.model, projection)
    assert phi.shape == (7, len(layers) * 20) and "lm_head" not in [layer.name for layer in layers]
    assert torch.allclose(phi, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert all(p.requires_grad for p in family.model.parameters())  # restored after featurising


def test_logra_factor_sums_are_the_projected_kronecker_factors():
    family = _family("gpt2")
    X, y = _examples()
    projection = Projection("logra", seed=1, k_in=3, k_out=3, layers=("transformer.h.0.mlp.c_fc",))
    sums = FactorSums()
    featurize(family, family.init_params(0), X, y, projection, batch_size=2, sums=sums)
    (name,) = sums.A
    assert sums.A[name].shape == (3, 3) and sums.S[name].shape == (3, 3)
    assert torch.allclose(sums.A[name], sums.A[name].T) and torch.linalg.eigvalsh(sums.A[name]).min() > -1e-8
    assert sums.tokens == int(sum(int((row != IGNORE_INDEX).nonzero().max()) + 1 for row in y))


def test_identity_and_trak_projections_of_full_gradients():
    family = _family("gpt2")
    X, y = _examples(n=4)
    theta = family.init_params(0)
    G = family.per_example_grads(theta, X, y)
    identity = featurize(family, theta, X, y, Projection("identity"), batch_size=3)
    assert torch.allclose(identity, G, rtol=1e-5, atol=1e-7)  # batches of 3 are trimmed apart
    trak = featurize(family, theta, X, y, Projection("trak", k=64, seed=5), batch_size=3)
    R = gaussian(G.shape[1], 64, 5, "trak/0")  # one block: d < TRAK_ROWS
    assert trak.shape == (4, 64) and torch.allclose(trak, G @ R, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("projection", "message"),
    [
        (
            Projection("logra", layers=("nothing.*",)),
            r"match no linear layer of the model; its linear layers are: ",
        ),
        (Projection("logra", k_in=17), r"layer transformer\.h\.0\.attn\.c_attn is 16 → 48 but k_in=17"),
    ],
)
def test_a_pattern_matching_no_layer_or_k_beyond_a_layer_is_one_line(projection, message):
    with pytest.raises(InfluenceError, match=message) as info:
        linear_layers(_family("gpt2").model, projection)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_feature_shards_round_trip(tmp_path, dtype):
    """A shard written as binary rows reads back as the same values (float16: its rounding only), by
    row group and split, and a column that is not a features shard is one clear error."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tda.errors import DataError
    from tda.influence.feature_store import read_chunks, read_split, write_shard

    feats = torch.randn(5000, 24)
    ids = np.arange(5000)[::-1].copy()
    splits = ["target" if i % 7 == 0 else "train" for i in range(5000)]
    path = tmp_path / "part-00000.parquet"
    write_shard(path, ids, splits, feats, dtype)
    expect = feats.half().float() if dtype == "float16" else feats
    chunks = list(read_chunks([path]))
    assert len(chunks) == 2  # row groups of 4096
    assert np.array_equal(np.concatenate([c[0] for c in chunks]), ids)
    assert torch.equal(torch.cat([c[1] for c in chunks]), expect)
    train = torch.tensor([s == "train" for s in splits])
    assert torch.equal(torch.cat([c[1] for c in read_chunks([path], "train")]), expect[train])
    target_ids, target = read_split([path], "target")
    assert np.array_equal(target_ids, np.sort(ids[~train.numpy()]))
    assert torch.equal(target, expect[~train][torch.from_numpy(np.argsort(ids[~train.numpy()]))])
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"example_id": [1], "split": ["train"], "features": [[1.0, 2.0]]}), other)
    with pytest.raises(DataError, match="not a gradient_features shard"):
        list(read_chunks([other]))


def test_a_method_the_features_cannot_support_is_one_line():
    from tda.influence.feature_scores import check_method
    from tda.influence.feature_store import FeatureSet

    trak = FeatureSet([], {"projection": {"kind": "trak"}}, None)
    for method in ("kfac", "ekfac", "logra"):
        with pytest.raises(
            InfluenceError, match=f"method {method} needs features with projection logra"
        ) as info:
            check_method(method, trak, "trak_256")
        assert "\n" not in str(info.value) and "trak_256" in str(info.value)
    with pytest.raises(InfluenceError, match="does not score gradient features"):
        check_method("airrep", trak, "trak_256")
    check_method("trak", trak, "trak_256")  # fine
    check_method("graddot", trak, "trak_256")
