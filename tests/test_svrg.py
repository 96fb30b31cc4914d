"""MeZO-SVRG against its definition (algorithms.md 3.8)."""

import pytest
import torch

import zoscale
from zoscale.engine import rng


class LeastSquares:
    """f(theta) = mean_i (a_i . theta - y_i)^2 / 2 over n examples; minibatches by index."""

    def __init__(self, n=32, d=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.features = torch.randn(n, d, generator=g, dtype=torch.float64)
        self.targets = torch.randn(n, generator=g, dtype=torch.float64)
        self.model = torch.nn.Module()
        self.model.theta = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))

    @property
    def theta(self):
        return self.model.theta.detach()

    def loss(self, index=None, theta=None):
        theta = self.theta if theta is None else theta
        a, y = (self.features, self.targets) if index is None else (self.features[index], self.targets[index])
        return (0.5 * (a @ theta - y) ** 2).sum().item(), len(y)

    def grad(self, index, theta):
        a, y = self.features[index], self.targets[index]
        return a.T @ (a @ theta - y) / len(y)

    def hessian(self, index):
        a = self.features[index]
        return a.T @ a / len(index)


def noise(opt, seed, d):
    return rng.gaussian(seed, rng.stream_id("theta"), 0, d).double()


def build(problem, **kwargs):
    options = dict(lr=0.01, anchor_lr=0.05, eps=1e-3, q=4, seed=2)
    options.update(kwargs)
    return zoscale.build_optimizer("mezo_svrg", problem.model, **options)


def test_q_1_is_full_batch_zo_gradient_descent():
    svrg_problem, mezo_problem = LeastSquares(), LeastSquares()
    svrg = build(svrg_problem, q=1, anchor_lr=0.05)
    mezo = zoscale.build_optimizer("mezo", mezo_problem.model, lr=0.05, eps=1e-3, seed=2)
    for _ in range(10):
        a = svrg.step(full_closure=svrg_problem.loss)
        b = mezo.step(mezo_problem.loss)
        assert a.projected_grad == pytest.approx(b.projected_grad, rel=1e-10)
    torch.testing.assert_close(svrg_problem.theta, mezo_problem.theta, rtol=0, atol=1e-12)


def test_control_variate_cancels_at_the_anchor():
    """anchor_lr = 0 keeps theta = theta_bar: with a shared z the control variate is exactly 0 and
    the step is -lr * g."""
    p = LeastSquares()
    opt = build(p, anchor_lr=0.0)
    opt.step(full_closure=p.loss)
    before = p.theta.clone()
    index = torch.arange(4)
    result = opt.step(lambda: p.loss(index))
    current, reference, anchor = result.projected_grads
    assert current == reference
    expected = before - 0.01 * anchor * noise(opt, opt.anchor_seed, 8)
    torch.testing.assert_close(p.theta, expected, rtol=0, atol=1e-14)


def test_control_variate_is_exact_on_quadratics():
    """c = z z^T A_I (theta_t - theta_bar) exactly for quadratic f_I and a shared z."""
    p = LeastSquares()
    opt = build(p, q=100)
    opt.step(full_closure=p.loss)
    anchor = opt.anchor.tensors[0].clone()
    for step in range(1, 6):
        index = torch.arange(4 * step, 4 * step + 4)
        z = noise(opt, opt.seed_for(step, 0), 8)
        theta = p.theta.clone()
        current, reference, _ = opt.step(lambda: p.loss(index)).projected_grads
        assert current - reference == pytest.approx((z @ p.hessian(index) @ (theta - anchor)).item(), rel=1e-6,
                                                    abs=1e-12)
        assert current == pytest.approx((z @ p.grad(index, theta)).item(), rel=1e-9)


def estimator_samples(p, shared: bool, samples: int, offset: torch.Tensor):
    """SVRG estimates (c + g) at theta_bar + offset, and MeZO estimates at the same point."""
    opt = build(p, lr=0.0, anchor_lr=0.0, q=10**9, shared_direction=shared)
    opt.step(full_closure=p.loss)
    p.model.theta.data += offset
    g = opt.anchor_pg * noise(opt, opt.anchor_seed, 8)
    svrg, mezo = [], []
    gen = torch.Generator().manual_seed(5)
    for step in range(1, samples + 1):
        index = torch.randperm(32, generator=gen)[:4]
        current, reference, _ = opt.step(lambda: p.loss(index)).projected_grads
        z = noise(opt, opt.seed_for(step, 0), 8)
        z_ref = z if shared else noise(opt, opt.seed_for(step, 1), 8)
        svrg.append(current * z - reference * z_ref + g)
        mezo.append(current * z)
    return torch.stack(svrg), torch.stack(mezo)


def test_shared_direction_reduces_variance_independent_does_not():
    small = 1e-2 * torch.randn(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    shared, mezo = estimator_samples(LeastSquares(), True, 600, small)
    independent, _ = estimator_samples(LeastSquares(), False, 600, small)
    variance = lambda x: x.var(0).sum().item()  # noqa: E731
    assert variance(shared) < 0.01 * variance(mezo)
    assert 1.3 * variance(mezo) < variance(independent) < 3.0 * variance(mezo)


def test_one_anchor_buffer_and_the_closure_protocol():
    p = LeastSquares()
    opt = build(p)
    assert len(opt.anchor.tensors) == 1 and opt.anchor.tensors[0].shape == p.model.theta.shape
    assert opt.needs_full_batch()
    with pytest.raises(ValueError, match="full_closure"):
        opt.step(lambda: p.loss(torch.arange(4)))
    opt.step(full_closure=p.loss)
    assert not opt.needs_full_batch()
    with pytest.raises(ValueError, match="closure"):
        opt.step(full_closure=p.loss)


def test_learns_least_squares():
    p = LeastSquares()
    opt = build(p, lr=0.02, anchor_lr=0.05, q=4)
    start = p.loss()[0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(600):
        index = torch.randperm(32, generator=gen)[:4]
        opt.step(lambda: p.loss(index), full_closure=p.loss)
    optimum = torch.linalg.lstsq(p.features, p.targets.unsqueeze(1)).solution.squeeze(1)
    best = p.loss(theta=optimum)[0]
    assert p.loss()[0] - best < 0.2 * (start - best)


def test_state_dict_round_trip_continues_the_same_trajectory(tmp_path):
    p = LeastSquares()
    opt = build(p, shared_direction=False, weight_decay=0.1)
    batches = [torch.arange(i % 8 * 4, i % 8 * 4 + 4) for i in range(12)]
    for b in batches[:6]:
        opt.step(lambda: p.loss(b), full_closure=p.loss)
    torch.save({"model": p.model.state_dict(), "opt": opt.state_dict()}, tmp_path / "s.pt")
    straight = [opt.step(lambda: p.loss(b), full_closure=p.loss).projected_grads for b in batches[6:]]

    saved = torch.load(tmp_path / "s.pt")
    q = LeastSquares(seed=1)
    q.model.load_state_dict(saved["model"])
    q.features, q.targets = p.features, p.targets
    resumed = build(q, shared_direction=False, weight_decay=0.1)
    resumed.load_state_dict(saved["opt"])
    again = [resumed.step(lambda: q.loss(b), full_closure=q.loss).projected_grads for b in batches[6:]]
    assert again == straight and torch.equal(q.theta, p.theta)
