import math

import pytest
import torch

import zoscale
from zoscale.optim.schedule import lr_at


class Quadratic(torch.nn.Module):
    """f(x, y) = 1/2 [x;y]^T A [x;y] + b^T [x;y]: a matrix parameter (decayed) and a bias (not)."""

    def __init__(self, d=12, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.A = m @ m.T / d + torch.eye(d, dtype=torch.float64)
        self.b = torch.randn(d, generator=g, dtype=torch.float64)
        self.weight = torch.nn.Parameter(torch.randn(d // 4, 3, generator=g, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.randn(d - 3 * (d // 4), generator=g, dtype=torch.float64))

    def theta(self):
        return torch.cat([self.weight.view(-1), self.bias.view(-1)])

    def forward(self):
        t = self.theta()
        return 0.5 * t @ self.A @ t + self.b @ t

    def value_at(self, t):
        return (0.5 * t @ self.A @ t + self.b @ t).item()

    def grad(self, t=None):
        return self.A @ (self.theta() if t is None else t) + self.b


def noise(opt, seed):
    """The optimizer's z(seed) over all parameters, concatenated like Quadratic.theta()."""
    return torch.cat([opt.engine.noise_like(s, seed, torch.float64).view(-1) for s in opt.shards])


def loss_of(model):
    return lambda: model().item()


@pytest.mark.parametrize("eps", [1e-3, 1e-1, 10.0])
def test_projected_gradient_is_exact_on_a_quadratic(eps):
    """Central differences are exact on quadratics: pg == z^T grad f for every eps."""
    model = Quadratic()
    opt = zoscale.build_optimizer("mezo", model, lr=0.0, eps=eps, seed=3)
    for step in range(5):
        expected = (noise(opt, opt.seed_for(step, 0)) @ model.grad()).item()
        result = opt.step(loss_of(model))
        assert result.projected_grad == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_update_identity_with_weight_decay_only_on_matrices():
    model = Quadratic()
    opt = zoscale.build_optimizer("mezo", model, lr=0.05, eps=1e-3, weight_decay=0.1, seed=1)
    for step in range(3):
        w, b = model.weight.detach().clone(), model.bias.detach().clone()
        z = noise(opt, opt.seed_for(step, 0))
        pg = opt.step(loss_of(model)).projected_grad
        zw, zb = z[: w.numel()].view_as(w), z[w.numel():]
        torch.testing.assert_close(model.weight.detach(), w - 0.05 * (pg * zw + 0.1 * w), rtol=0, atol=1e-13)
        torch.testing.assert_close(model.bias.detach(), b - 0.05 * pg * zb, rtol=0, atol=1e-13)


def test_regeneration_is_deterministic_and_seeded():
    def trajectory(seed):
        model = Quadratic()
        opt = zoscale.build_optimizer("mezo", model, lr=0.01, eps=1e-3, seed=seed)
        pgs = [opt.step(loss_of(model)).projected_grad for _ in range(20)]
        return pgs, model.theta().detach()

    a, b, c = trajectory(5), trajectory(5), trajectory(6)
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert a[0] != c[0]


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_estimator_is_unbiased_with_the_expected_second_moment(distribution):
    """E[pg z] = grad f; E||pg z||^2 = (d+2)||grad||^2 (Gaussian) or d||grad||^2 (Rademacher)."""
    model = Quadratic(d=8)
    opt = zoscale.build_optimizer("mezo", model, lr=0.0, eps=1e-2, distribution=distribution, seed=9)
    grad, d, samples = model.grad(), 8, 2000
    estimates = []
    for step in range(samples):
        z = noise(opt, opt.seed_for(step, 0))
        estimates.append(opt.step(loss_of(model)).projected_grad * z)
    g = torch.stack(estimates)
    stderr = g.std(0) / samples**0.5
    assert ((g.mean(0) - grad).abs() < 4.5 * stderr).all()
    second = (g**2).sum(1).mean() / grad.norm() ** 2
    expected = d + 2 if distribution == "gaussian" else d
    assert abs(second.item() - expected) < 0.1 * expected


def test_n_spsa_averages_n_directions_at_the_same_point():
    model = Quadratic()
    opt = zoscale.build_optimizer("mezo", model, lr=0.1, eps=1e-3, n_directions=3, seed=2)
    theta = model.theta().detach().clone()
    zs = [noise(opt, opt.seed_for(0, j)) for j in range(3)]
    result = opt.step(loss_of(model))
    assert len(result.projected_grads) == 3 and len(set(result.projected_grads)) == 3
    for z, pg in zip(zs, result.projected_grads):
        assert pg == pytest.approx((z @ model.grad(theta)).item(), rel=1e-9)
    expected = theta - 0.1 / 3 * sum(pg * z for pg, z in zip(result.projected_grads, zs))
    torch.testing.assert_close(model.theta().detach(), expected, rtol=0, atol=1e-13)


def test_deferred_update_waits_for_the_next_pass_and_flush():
    eager, lazy = Quadratic(), Quadratic()
    opt_e = zoscale.build_optimizer("mezo", eager, lr=0.02, eps=1e-3, weight_decay=0.5, seed=4)
    opt_l = zoscale.build_optimizer("mezo", lazy, lr=0.02, eps=1e-3, weight_decay=0.5, seed=4, defer_update=True)
    for _ in range(10):
        re, rl = opt_e.step(loss_of(eager)), opt_l.step(loss_of(lazy))
        assert rl.projected_grad == pytest.approx(re.projected_grad, rel=1e-8)
    assert opt_l.engine.pending and not opt_e.engine.pending
    assert not torch.allclose(lazy.theta(), eager.theta())  # the last update is still pending
    opt_l.flush()
    torch.testing.assert_close(lazy.theta(), eager.theta(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("defer", [False, True])
def test_state_dict_round_trip_continues_the_same_trajectory(defer, tmp_path):
    kwargs = dict(lr=0.02, eps=1e-3, weight_decay=0.1, seed=8, defer_update=defer, schedule="cosine",
                  warmup_steps=3, total_steps=30)
    model = Quadratic()
    opt = zoscale.build_optimizer("mezo", model, **kwargs)
    for _ in range(10):
        opt.step(loss_of(model))
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    straight = [opt.step(loss_of(model)).projected_grad for _ in range(10)]
    opt.flush()

    saved = torch.load(tmp_path / "ckpt.pt")
    resumed_model = Quadratic()
    resumed_model.load_state_dict(saved["model"])
    resumed = zoscale.build_optimizer("mezo", resumed_model, **kwargs)
    resumed.load_state_dict(saved["opt"])
    again = [resumed.step(loss_of(resumed_model)).projected_grad for _ in range(10)]
    resumed.flush()
    assert again == straight
    assert torch.equal(resumed_model.theta(), model.theta())

    other = zoscale.build_optimizer("mezo", Quadratic(), **{**kwargs, "seed": 9})
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(saved["opt"])


def test_non_finite_loss_skips_the_step_and_restores_parameters():
    model = Quadratic()
    opt = zoscale.build_optimizer("mezo", model, lr=0.1, eps=1e-3, seed=0)
    before = model.theta().detach().clone()
    result = opt.step(lambda: float("nan"))
    assert result.skipped and math.isnan(result.loss)
    torch.testing.assert_close(model.theta(), before, rtol=0, atol=1e-15)
    assert not opt.step(loss_of(model)).skipped and opt.step_count == 2


def test_sum_count_closure_gives_the_count_weighted_mean():
    model = Quadratic()
    opt = zoscale.build_optimizer("mezo", model, lr=0.0, eps=1e-3, seed=0)
    plus = model.theta() + 1e-3 * noise(opt, opt.seed_for(0, 0))
    r = opt.step(lambda: (model().item() * 7, 7))  # a loss summed over 7 tokens
    assert r.loss == pytest.approx(model.value_at(plus), rel=1e-9)


def test_mezo_minimises_a_quadratic():
    model = Quadratic()
    opt = zoscale.build_optimizer("mezo", model, lr=0.05, eps=1e-3, seed=0)
    optimum = (-0.5 * model.b @ torch.linalg.solve(model.A, model.b)).item()
    start = model().item()
    for _ in range(1500):
        opt.step(loss_of(model))
    assert model().item() - optimum < 1e-3 * (start - optimum)


def test_lr_schedules():
    assert lr_at(0, lr=1.0, warmup_steps=4) == 0.25 and lr_at(3, lr=1.0, warmup_steps=4) == 1.0
    assert lr_at(50, lr=1.0) == 1.0
    assert lr_at(5, lr=1.0, schedule="linear", total_steps=10) == pytest.approx(0.5)
    assert lr_at(10, lr=1.0, schedule="linear", total_steps=10) == 0.0
    assert lr_at(5, lr=1.0, schedule="cosine", total_steps=10) == pytest.approx(0.5)
    assert lr_at(10, lr=1.0, schedule="cosine", total_steps=10, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(2, lr=1.0, schedule="cosine", warmup_steps=2, total_steps=12) == 1.0


@pytest.mark.parametrize("kwargs,message", [
    (dict(eps=0.0), "eps: must be > 0"),
    (dict(eps=-1e-3), "eps: must be > 0"),
    (dict(lr=-1.0), "lr: must be >= 0"),
    (dict(n_directions=0), "n_directions"),
    (dict(distribution="uniform"), "distribution: must be one of"),
    (dict(schedule="cosine"), "total_steps"),
    (dict(momentum=0.9), r"unknown option\(s\) \['momentum'\]"),
])
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        zoscale.build_optimizer("mezo", Quadratic(), **kwargs)


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown optimizer 'adam'; choose one of \[.*'mezo'"):
        zoscale.build_optimizer("adam", Quadratic())


def test_master_copies_travel_with_the_state(tmp_path):
    """bf16 parameters with fp32 masters: a resumed run continues from the masters, not from their
    bf16 roundings."""
    def make():
        model = torch.nn.Module()
        model.weight = torch.nn.Parameter(torch.linspace(-1, 1, 64).view(8, 8).to(torch.bfloat16))
        return model, zoscale.build_optimizer("mezo", model, lr=1e-3, eps=1e-3, seed=1, master_dtype=torch.float32)

    loss = lambda m: lambda: m.weight.float().pow(2).sum().item()  # noqa: E731
    model, opt = make()
    for _ in range(5):
        opt.step(loss(model))
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "s.pt")
    straight = [opt.step(loss(model)).projected_grad for _ in range(5)]
    master = opt.shards[0].master.clone()

    saved = torch.load(tmp_path / "s.pt")
    again_model, again = make()
    again_model.load_state_dict(saved["model"])
    again.load_state_dict(saved["opt"])
    assert [again.step(loss(again_model)).projected_grad for _ in range(5)] == straight
    assert torch.equal(again.shards[0].master, master)
