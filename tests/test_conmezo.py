"""ConMeZO against its definition (algorithms.md 2.10)."""

import math

import pytest
import torch

import zoscale
from zoscale.engine import PerturbationEngine, Shard, host, rng


def diagonal_quadratic(d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Module()
    model.x = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
    scales = torch.linspace(0.1, 1.0, d, dtype=torch.float64)
    value = lambda v: 0.5 * (scales * v * v).sum().item()  # noqa: E731
    return model, scales, value


def run(name, steps=25, **kwargs):
    model, _, value = diagonal_quadratic()
    opt = zoscale.build_optimizer(name, model, **{"lr": 0.05, "eps": 1e-3, "seed": 3, **kwargs})
    pgs = [opt.step(lambda: value(model.x.detach())).projected_grad for _ in range(steps)]
    return pgs, model.x.detach().clone(), opt


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_half_angle_pi_over_2_is_mezo(beta):
    mezo = run("mezo")
    cone = run("conmezo", cone_theta=math.pi / 2, beta=beta)
    assert cone[0] == mezo[0] and torch.equal(cone[1], mezo[1])


def test_beta_one_with_zero_momentum_is_mezo():
    mezo = run("mezo")
    cone = run("conmezo", beta=1.0, momentum_init="zero")
    assert cone[0] == mezo[0] and torch.equal(cone[1], mezo[1])


def test_beta_zero_is_not_mezo():
    """With beta = 0 the next cone is centred on the previous direction: not MeZO."""
    assert run("conmezo", beta=0.0)[0][1:] != run("mezo")[0][1:]


@pytest.mark.parametrize("noise", ["unprojected", "projected"])
def test_trajectory_and_momentum_match_a_materialised_float64_implementation(noise):
    theta, beta, lr, eps = 1.2, 0.9, 0.05, 1e-3
    model, scales, value = diagonal_quadratic()
    opt = zoscale.build_optimizer("conmezo", model, lr=lr, eps=eps, cone_theta=theta, beta=beta, seed=3,
                                  noise=noise, buffer_dtype="float64")
    x, m, d = model.x.detach().clone(), torch.zeros_like(model.x), model.x.numel()
    for t in range(30):
        u = rng.gaussian(opt.seed_for(t, 0), rng.stream_id("x"), 0, d).double()
        if m.norm() < 1e-8:
            z = u
        elif noise == "unprojected":
            z = math.sqrt(d) * (math.cos(theta) * m / m.norm()) + math.sin(theta) * u
        else:
            axis = m / m.norm()
            perp = u - (u @ axis) * axis
            z = math.sqrt(d) * (math.cos(theta) * axis + math.sin(theta) * perp / perp.norm())
        pg = (value(x + eps * z) - value(x - eps * z)) / (2 * eps)
        x, m = x - lr * pg * z, beta * m + (1 - beta) * pg * z
        assert opt.step(lambda: value(model.x.detach())).projected_grad == pytest.approx(pg, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(model.x.detach(), x, rtol=0, atol=1e-10)
    torch.testing.assert_close(opt.buffer.tensors[0], m, rtol=0, atol=1e-10)
    assert opt.momentum_norm == pytest.approx(m.norm().item(), rel=1e-12)


def with_fixed_momentum(d, momentum, **kwargs):
    """An optimizer whose momentum is ``momentum`` and stays there (beta = 1, lr = 0)."""
    model = torch.nn.Module()
    model.x = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
    opt = zoscale.build_optimizer("conmezo", model, lr=0.0, eps=1e-3, beta=1.0, seed=1,
                                  buffer_dtype="float64", **kwargs)
    opt.buffer.tensors[0].copy_(momentum)
    opt.momentum_norm = momentum.norm().item()
    return model, opt


@pytest.mark.parametrize("noise", ["unprojected", "projected"])
def test_cone_geometry(noise):
    d, theta, samples = 200, 1.35, 2000
    axis = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    axis /= axis.norm()
    _, opt = with_fixed_momentum(d, 3.0 * axis, cone_theta=theta, noise=noise)
    along, sq_norm, across = [], [], []
    other = torch.randn(d, dtype=torch.float64)
    other -= (other @ axis) * axis
    other /= other.norm()
    for t in range(samples):
        seed = opt.seed_for(t, 0)
        direction = opt._direction(seed)  # z = a m + b u, formed by the passes that use it
        u = rng.gaussian(seed, rng.stream_id("x"), 0, d).double()
        z = direction[opt.buffer] * opt.buffer.tensors[0] + direction[seed] * u
        along.append((z @ axis).item())
        across.append((z @ other).item())
        sq_norm.append((z @ z).item() / d)
    along, across, sq_norm = map(torch.tensor, (along, across, sq_norm))
    cos, sin = math.cos(theta), math.sin(theta)
    if noise == "projected":  # exactly on the cone, exactly of norm sqrt(d)
        torch.testing.assert_close(along, torch.full_like(along, math.sqrt(d) * cos), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(sq_norm, torch.ones_like(sq_norm), rtol=1e-10, atol=1e-10)
    else:  # on average: E<z, m^> = sqrt(d) cos, E|z|^2 = d
        assert abs(along.mean().item() - math.sqrt(d) * cos) < 4 * sin / samples**0.5
        assert abs(sq_norm.mean().item() - 1.0) < 0.01
    # E[z z^T] = d cos^2 m^ m^T + sin^2 I, probed along m^ and across it
    assert (along**2).mean().item() == pytest.approx(d * cos**2 + (sin**2 if noise == "unprojected" else 0), rel=0.02)
    assert (across**2).mean().item() == pytest.approx(sin**2 * (d / (d - 1) if noise == "projected" else 1), rel=0.1)
    assert torch.equal(opt.buffer.tensors[0], 3.0 * axis) or torch.allclose(opt.buffer.tensors[0], 3.0 * axis,
                                                                            rtol=0, atol=1e-12)


def test_expected_estimate_is_biased_towards_the_momentum():
    """E[pg z] = sin^2 grad + d cos^2 (m^ . grad) m^ on a quadratic (central differences are exact)."""
    d, theta, samples = 6, 1.2, 4000
    g = torch.Generator().manual_seed(1)
    axis = torch.randn(d, generator=g, dtype=torch.float64)
    axis /= axis.norm()
    point = torch.randn(d, generator=g, dtype=torch.float64)
    model, opt = with_fixed_momentum(d, 2.0 * axis, cone_theta=theta)
    model.x.data.copy_(point)
    scales = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    grad = scales * point
    estimates = []
    for t in range(samples):
        u = rng.gaussian(opt.seed_for(t, 0), rng.stream_id("x"), 0, d).double()
        z = math.sqrt(d) * math.cos(theta) * axis + math.sin(theta) * u
        pg = opt.step(lambda: 0.5 * (scales * model.x.detach() ** 2).sum().item()).projected_grad
        estimates.append(pg * z)
    est = torch.stack(estimates)
    expected = math.sin(theta) ** 2 * grad + d * math.cos(theta) ** 2 * (axis @ grad) * axis
    assert ((est.mean(0) - expected).abs() < 4.5 * est.std(0) / samples**0.5).all()
    assert not ((est.mean(0) - grad).abs() < 4.5 * est.std(0) / samples**0.5).all()  # biased, not grad


def test_sharded_shards_match_whole_parameters():
    whole = run("conmezo", buffer_dtype="float64", noise="projected")
    model, _, value = diagonal_quadratic()
    flat = model.x.data
    shards = [Shard("x", flat[a:b], offset=a, global_numel=40) for a, b in ((0, 17), (17, 18), (18, 40))]
    opt = zoscale.build_optimizer("conmezo", shards, lr=0.05, eps=1e-3, seed=3, buffer_dtype="float64",
                                  noise="projected")
    pgs = [opt.step(lambda: value(flat)).projected_grad for _ in range(25)]
    assert pgs == pytest.approx(whole[0], rel=1e-10)
    torch.testing.assert_close(flat, whole[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("buffer_dtype,ratio", [("bfloat16", 5 / 3), ("float32", 7 / 3)])
def test_three_passes_per_step_over_parameters_and_momentum(buffer_dtype, ratio, monkeypatch):
    """Perturb, perturb, restore+update+advance: u drawn once a pass, the momentum read by all
    three and written by the last, its norm summed there (no norm pass). Bytes per parameter per
    step on bf16 weights: 6 for each perturbation (weights read and written, momentum read) and
    the last pass's momentum write: (6 + 2b) / 6 of MeZO's three weight passes (b: 2 or 4 bytes)."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.x = torch.nn.Parameter(torch.randn(3000, dtype=torch.bfloat16))
    value = lambda: float((model.x.detach().float() ** 2).sum())  # noqa: E731
    opt = zoscale.build_optimizer("conmezo", model, lr=1e-3, eps=1e-3, buffer_dtype=buffer_dtype)
    assert len(opt.buffer.tensors) == 1 and opt.buffer.tensors[0].dtype == getattr(torch, buffer_dtype)
    opt.step(value)  # step 0 has no momentum yet: a plain seeded step
    draws, passes = [], []
    real_draw, real_apply = host.generate_segments, PerturbationEngine.apply
    monkeypatch.setattr(host, "generate_segments", lambda *a, **k: draws.append(a[1]) or real_draw(*a, **k))
    monkeypatch.setattr(PerturbationEngine, "apply",
                        lambda self, *a, **k: passes.append(1) or real_apply(self, *a, **k))
    monkeypatch.setattr(PerturbationEngine, "norm2", lambda *a: pytest.fail("a separate norm pass"))
    before = opt.engine.traffic
    for _ in range(5):
        opt.step(value)
    assert len(passes) == len(draws) == 3 * 5
    conmezo = (opt.engine.traffic - before) / (5 * 3000)
    assert opt.momentum_norm == pytest.approx(opt.buffer.tensors[0].double().norm().item(), rel=1e-6)
    mezo = zoscale.build_optimizer("mezo", model, lr=1e-3, eps=1e-3)
    before = mezo.engine.traffic
    mezo.step(value)
    assert conmezo / ((mezo.engine.traffic - before) / 3000) == pytest.approx(ratio)


def test_beta_warmup_schedule():
    _, _, opt = run("conmezo", steps=0, beta=0.99, beta_warmup=(200, 2000))
    assert opt.beta_at(0) == opt.beta_at(200) == 0.1
    assert opt.beta_at(2001) == 0.99
    ramp = [opt.beta_at(t) for t in range(200, 2001, 50)]
    assert all(a <= b for a, b in zip(ramp, ramp[1:]))
    assert ramp[-1] == pytest.approx(0.99 - 0.89 / 9**3)  # the reference ramp ends just below beta


def test_predicted_norm_tracks_the_true_norm():
    d = 1000
    scales = torch.logspace(-2, 0, d, dtype=torch.float64)
    model = torch.nn.Module()
    model.x = torch.nn.Parameter(torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    opt = zoscale.build_optimizer("conmezo", model, lr=1e-3, eps=1e-3, beta=0.9, seed=3, buffer_dtype="float64",
                                  norm="predicted", momentum_init="random")
    for _ in range(100):
        opt.step(lambda: 0.5 * (scales * model.x.detach() ** 2).sum().item())
    assert opt.momentum_norm == pytest.approx(opt.buffer.tensors[0].norm().item(), rel=0.02)


@pytest.mark.parametrize("kwargs", [dict(), dict(momentum_init="random", norm="predicted"),
                                    dict(noise="projected", weight_decay=0.1)])
def test_state_dict_round_trip_continues_the_same_trajectory(kwargs, tmp_path):
    model, _, value = diagonal_quadratic()
    options = dict(lr=0.05, eps=1e-3, seed=3, **kwargs)
    opt = zoscale.build_optimizer("conmezo", model, **options)
    for _ in range(8):
        opt.step(lambda: value(model.x.detach()))
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "state.pt")
    straight = [opt.step(lambda: value(model.x.detach())).projected_grad for _ in range(8)]

    saved = torch.load(tmp_path / "state.pt")
    resumed_model, _, _ = diagonal_quadratic(seed=99)
    resumed_model.load_state_dict(saved["model"])
    resumed = zoscale.build_optimizer("conmezo", resumed_model, **options)
    resumed.load_state_dict(saved["opt"])
    again = [resumed.step(lambda: value(resumed_model.x.detach())).projected_grad for _ in range(8)]
    assert again == straight
    assert torch.equal(resumed_model.x, model.x)


@pytest.mark.parametrize("kwargs,message", [
    (dict(cone_theta=0.0), "cone_theta"), (dict(cone_theta=2.0), "cone_theta"), (dict(beta=1.5), "beta"),
    (dict(noise="projected", norm="predicted"), "needs norm='exact'"), (dict(buffer_dtype="int8"), "buffer_dtype"),
    (dict(beta_warmup=(10, 5)), "beta_warmup"),
])
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run("conmezo", steps=0, **kwargs)
