import pytest
import torch

from zoscale.engine import PerturbationEngine, Shard, canonical_name, decays, local_shards, rng


def ulp(v: torch.Tensor) -> torch.Tensor:
    v = v.abs()
    return torch.nextafter(v, torch.full_like(v, float("inf"))) - v


def split_shards(params: dict[str, torch.Tensor], parts: int) -> list[Shard]:
    """Each parameter cut into ``parts`` uneven contiguous pieces, as a sharded backend would."""
    shards = []
    for name, p in params.items():
        flat, n = p.view(-1), p.numel()
        cuts = sorted({0, n, *[min(n, (n * k) // parts + k) for k in range(1, parts)]})
        for a, b in zip(cuts, cuts[1:]):
            shards.append(Shard(name, flat[a:b], offset=a, global_numel=n, weight_decay=decays(name, p.shape)))
    return shards


def make_params(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    shapes = {"layers.0.weight": (37, 11), "layers.0.bias": (37,), "norm.weight": (11,), "emb.weight": (101, 7)}
    return {k: torch.randn(*s, generator=g, dtype=dtype) for k, s in shapes.items()}


def run_engine(shards):
    """A fixed sequence exercising every path: perturb, fused update, decay, deferral, several seeds."""
    e = PerturbationEngine(shards, chunk_numel=100)  # small chunks: pieces span chunk boundaries
    e.perturb({1: 1e-2})
    e.perturb({1: -1e-2})
    e.update({1: -3e-3}, decay=0.99)
    e.perturb({2: 1e-2})  # deferred update folded into this pass
    e.update({2: 5e-3, 3: -1e-3}, decay=0.9)
    e.flush()
    return e


@pytest.mark.parametrize("parts", [2, 3, 5])
def test_sharded_engine_equals_whole_parameters(parts):
    whole = make_params()
    split = {k: v.clone() for k, v in whole.items()}
    run_engine([Shard(k, v, weight_decay=decays(k, v.shape)) for k, v in whole.items()])
    run_engine(split_shards(split, parts))
    for k in whole:
        assert torch.equal(whole[k], split[k]), k


def test_update_identity_against_materialised_noise():
    params = make_params(torch.float64)
    before = {k: v.clone() for k, v in params.items()}
    shards = [Shard(k, v, weight_decay=decays(k, v.shape)) for k, v in params.items()]
    e = PerturbationEngine(shards)
    e.update({7: -0.5, 8: 0.25}, decay=0.9)
    e.flush()
    for s in shards:
        z7, z8 = e.noise_like(s, 7, torch.float64), e.noise_like(s, 8, torch.float64)
        d = 0.9 if s.weight_decay else 1.0
        torch.testing.assert_close(s.tensor, d * before[s.name] - 0.5 * z7 + 0.25 * z8, rtol=0, atol=1e-15)
    assert not e.pending


def test_fp32_cycle_returns_within_one_ulp_of_the_largest_intermediate():
    x0 = torch.randn(200_000) * 0.02
    x = x0.clone()
    e = PerturbationEngine([Shard("w", x)])
    z = rng.gaussian(1, e.shards[0].stream, 0, x.numel())
    largest = torch.stack([x0.abs(), (x0 + 1e-3 * z).abs(), (x0 - 1e-3 * z).abs()]).max(0).values
    e.perturb({1: 1e-3})
    e.perturb({1: -1e-3})
    e.flush()
    err = (x - x0).abs()
    assert (err <= ulp(largest)).all()
    assert (err == 0).float().mean() > 0.4  # most elements come back exactly


def test_master_copy_makes_the_cycle_exact_in_half_precision():
    p = (torch.randn(5000) * 0.02).to(torch.bfloat16)
    master = p.float()
    original = p.clone()
    e = PerturbationEngine([Shard("w", p, master=master)])
    e.perturb({1: 1e-3})
    assert not torch.equal(p, original)  # the forward sees the perturbation
    assert torch.equal(master, original.float())  # the master never does
    e.perturb({1: -1e-3})
    e.flush()
    assert torch.equal(p, original)


def test_dot_is_sharding_invariant():
    params = make_params()
    whole = PerturbationEngine([Shard(k, v) for k, v in params.items()]).dot(11)
    split = PerturbationEngine(split_shards(params, 3), chunk_numel=64).dot(11)
    explicit = sum(torch.dot(v.double().view(-1), rng.gaussian(11, rng.stream_id(k), 0, v.numel()).double())
                   for k, v in params.items())
    assert abs(whole - explicit.item()) < 1e-9 and abs(split - explicit.item()) < 1e-9


def test_names_and_weight_decay_rule():
    assert canonical_name("module._orig_mod.model.layers.0.weight") == "model.layers.0.weight"
    assert canonical_name("_fsdp_wrapped_module.model.module_list.0.w") == "model.module_list.0.w"
    assert decays("fc1.weight", (4, 4)) and not decays("fc1.bias", (4,))
    assert not decays("final_layer_norm.weight", (4,)) and not decays("norm.weight", (4, 4))
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)
    shards = local_shards(model)
    assert [s.name for s in shards] == ["0.weight", "0.bias", "1.bias"]
    assert [s.weight_decay for s in shards] == [True, False, False]
    assert all(s.tensor.data_ptr() == p.data_ptr() for s, p in zip(shards, [model[0].weight, model[0].bias,
                                                                             model[1].bias]))


def test_shard_validation():
    with pytest.raises(ValueError, match="outside"):
        Shard("w", torch.zeros(4), offset=8, global_numel=10)
    with pytest.raises(ValueError, match="contiguous"):
        Shard("w", torch.zeros(4, 4).t())
    with pytest.raises(ValueError, match="distribution"):
        PerturbationEngine([Shard("w", torch.zeros(4))], distribution="uniform")
