"""PseuZO against its definition (algorithms.md 4.10)."""

import pytest
import torch

import zoscale
from zoscale.engine import rng


class Linear:
    """h(x) = X x (a linear body), g(o) = |o - y|^2 / 2 (a loss head): F is a quadratic."""

    def __init__(self, n=12, d=7, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.X = torch.randn(n, d, generator=g, dtype=torch.float64)
        self.y = torch.randn(n, generator=g, dtype=torch.float64)
        self.model = torch.nn.Module()
        self.model.x = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))

    def closure(self):
        head = lambda o: 0.5 * ((o - self.y) ** 2).sum()  # noqa: E731
        return self.X @ self.model.x.detach(), head

    def loss(self):
        output, head = self.closure()
        return head(output).item()

    def grad(self):
        return self.X.T @ (self.X @ self.model.x.detach() - self.y)


def z_of(opt, seed, d):
    return rng.gaussian(seed, rng.stream_id("x"), 0, d).double()


def test_linear_body_with_window_1_is_mezo_on_the_quadratic():
    a, b = Linear(), Linear()
    pseuzo = zoscale.build_optimizer("pseuzo", a.model, lr=0.01, eps=1e-3, window=1, seed=4)
    mezo = zoscale.build_optimizer("mezo", b.model, lr=0.01, eps=1e-3, seed=4)
    for _ in range(15):
        expected = z_of(pseuzo, pseuzo.seed_for(pseuzo.step_count, 0), 7) @ a.grad()
        got = pseuzo.step(a.closure).projected_grad
        assert got == pytest.approx(expected.item(), rel=1e-8)  # <h(x+eps z) - h(x), e>/eps = z . grad F
        assert mezo.step(b.loss).projected_grad == pytest.approx(got, rel=1e-8)
    torch.testing.assert_close(a.model.x, b.model.x, rtol=0, atol=1e-10)


class Tanh:
    """A nonlinear body h(x) = tanh(W x) and a softmax cross-entropy head."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(5, 6, generator=g, dtype=torch.float64)
        self.head_weight = torch.randn(3, 5, generator=g, dtype=torch.float64)
        self.labels = torch.tensor([2])
        self.model = torch.nn.Module()
        self.model.x = torch.nn.Parameter(torch.randn(6, generator=g, dtype=torch.float64))

    def head(self, o):
        return torch.nn.functional.cross_entropy((self.head_weight @ o).unsqueeze(0), self.labels)

    def closure(self):
        return torch.tanh(self.W @ self.model.x.detach()), self.head

    def grad(self):
        x = self.model.x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(self.head(torch.tanh(self.W @ x)), x)
        return g


def test_head_gradient_equals_a_full_backward():
    p = Tanh()
    opt = zoscale.build_optimizer("pseuzo", p.model, lr=0.0, eps=1e-3)
    output, head = p.closure()
    _, count, grad = opt._head_gradient(output, head)
    o = torch.tanh(p.W @ p.model.x.detach()).requires_grad_(True)
    p.head(o).backward()
    assert count == 1.0
    torch.testing.assert_close(grad, o.grad, rtol=1e-12, atol=1e-14)


def test_forward_difference_error_is_first_order_in_eps():
    errors = []
    for eps in (1e-2, 1e-3):
        p = Tanh()
        opt = zoscale.build_optimizer("pseuzo", p.model, lr=0.0, eps=eps, window=1, seed=1)
        z = z_of(opt, opt.seed_for(0, 0), 6)
        errors.append(abs(opt.step(p.closure).projected_grad - (z @ p.grad()).item()))
    assert 5 < errors[0] / errors[1] < 20  # O(eps): ten times smaller eps, about ten times smaller error


@pytest.mark.parametrize("normalize", [False, True])
def test_window_weights_and_update(normalize):
    p = Linear()
    lam, k = 0.5, 3
    opt = zoscale.build_optimizer("pseuzo", p.model, lr=0.01, eps=1e-3, window=k, decay=lam, normalize=normalize,
                                  seed=7)
    for _ in range(5):
        before = p.model.x.detach().clone()
        result = opt.step(p.closure)
        seeds = [s for s, _ in opt.window]
        assert seeds == [opt.seed_for(t, 0) for t in range(max(0, opt.step_count - k), opt.step_count)]
        weights = [lam ** (len(seeds) - 1 - i) for i in range(len(seeds))]
        if normalize:
            weights = [w / sum(weights) for w in weights]
        step = sum(w * c * z_of(opt, s, 7) for w, c, s in zip(weights, result.projected_grads, seeds))
        torch.testing.assert_close(p.model.x.detach(), before - 0.01 * step, rtol=0, atol=1e-12)
    assert len(opt.window) == k  # the oldest entries were evicted


def test_lambda_zero_keeps_only_the_newest_term():
    a, b = Linear(), Linear()
    only_newest = zoscale.build_optimizer("pseuzo", a.model, lr=0.01, eps=1e-3, window=5, decay=0.0, seed=4)
    window_one = zoscale.build_optimizer("pseuzo", b.model, lr=0.01, eps=1e-3, window=1, seed=4)
    for _ in range(6):
        only_newest.step(a.closure)
        window_one.step(b.closure)
    torch.testing.assert_close(a.model.x, b.model.x, rtol=0, atol=1e-13)


def test_window_memory_is_k_outputs_independent_of_the_parameter_count():
    for d in (7, 70):
        p = Linear(n=12, d=d)
        current = zoscale.build_optimizer("pseuzo", p.model, lr=0.0, eps=1e-3, window=4, window_dtype="float16",
                                          pairing="current")
        own = zoscale.build_optimizer("pseuzo", p.model, lr=0.0, eps=1e-3, window=4)
        for _ in range(6):
            current.step(p.closure)
            own.step(p.closure)
        assert sum(diff.nbytes for _, diff in current.window) == 4 * 12 * 2  # k output differences
        assert sum(c.nbytes for _, c in own.window) == 4 * 8  # k coefficients


def test_own_pairing_keeps_each_coefficient_as_its_batch_gave_it():
    """pairing="own": an entry's coefficient is <o+ - o, e>/eps of its own step, later batches
    leave it alone (what makes the expected update unbiased when every step draws a new batch)."""
    problems = [Linear(seed=s) for s in range(5)]  # a different batch (X, y) each step, one parameter
    for p in problems[1:]:
        p.model = problems[0].model
    opt = zoscale.build_optimizer("pseuzo", problems[0].model, lr=0.01, eps=1e-3, window=3, seed=2)
    newest = []
    for step, p in enumerate(problems):
        expected = z_of(opt, opt.seed_for(step, 0), 7) @ p.grad()  # the linear body: exact
        result = opt.step(p.closure)
        newest.append(result.projected_grads[-1])
        assert newest[-1] == pytest.approx(expected.item(), rel=1e-6)
        assert list(result.projected_grads) == newest[-3:]


def test_cyclic_schedule_and_its_mezo_phases():
    p = Linear()
    opt = zoscale.build_optimizer("pseuzo", p.model, lr=0.01, eps=1e-3, lambda_schedule="cyclic",
                                  steps_per_epoch=1, total_epochs=40, seed=4)
    assert opt.lambda_at(0) == (1.0, True)
    assert opt.lambda_at(1) == (1 / 11, False) and opt.lambda_at(10) == (1 / 101, False)
    assert opt.lambda_at(11) == (0.0, False) and opt.lambda_at(19) == (0.0, False)
    assert opt.lambda_at(20) == (1.0, True)  # the second cycle starts afresh
    assert opt.lambda_at(40) == (0.0, False)
    # a lambda = 0 epoch is exactly a MeZO step with the same seed
    q = Linear()
    mezo = zoscale.build_optimizer("mezo", q.model, lr=0.01, eps=1e-3, seed=4)
    opt.step_count = mezo.step_count = 11
    a, b = opt.step(p.closure), mezo.step(q.loss)
    assert a.projected_grad == b.projected_grad and torch.equal(p.model.x, q.model.x)


def test_state_dict_round_trip_continues_the_same_trajectory(tmp_path):
    p = Linear()
    options = dict(lr=0.01, eps=1e-3, window=3, decay=0.8, seed=2, weight_decay=0.1)
    opt = zoscale.build_optimizer("pseuzo", p.model, **options)
    for _ in range(5):
        opt.step(p.closure)
    torch.save({"model": p.model.state_dict(), "opt": opt.state_dict()}, tmp_path / "s.pt")
    straight = [opt.step(p.closure).projected_grads for _ in range(5)]
    saved = torch.load(tmp_path / "s.pt")
    q = Linear()
    q.model.load_state_dict(saved["model"])
    resumed = zoscale.build_optimizer("pseuzo", q.model, **options)
    resumed.load_state_dict(saved["opt"])
    assert [resumed.step(q.closure).projected_grads for _ in range(5)] == straight
    assert torch.equal(q.model.x, p.model.x)


def test_mismatched_batches_are_a_clear_error_only_where_outputs_are_paired_across_batches():
    for pairing in ("current", "own"):
        p = Linear()
        opt = zoscale.build_optimizer("pseuzo", p.model, lr=0.0, eps=1e-3, pairing=pairing)
        opt.step(p.closure)
        p.X, p.y = p.X[:6], p.y[:6]
        if pairing == "current":
            with pytest.raises(ValueError, match="drop_last"):
                opt.step(p.closure)
        else:
            assert not opt.step(p.closure).skipped


@pytest.mark.parametrize("kwargs,message", [(dict(window=0), "window"), (dict(decay=1.5), "decay"),
                                            (dict(lambda_schedule="cyclic"), "steps_per_epoch")])
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        zoscale.build_optimizer("pseuzo", Linear().model, **kwargs)


def test_a_skipped_step_leaves_a_full_window_as_it_was():
    p = Linear()
    opt = zoscale.build_optimizer("pseuzo", p.model, lr=0.01, eps=1e-3, window=3, seed=4)
    for _ in range(3):
        opt.step(p.closure)
    window, before = [(s, d.clone()) for s, d in opt.window], p.model.x.detach().clone()
    nan_head = lambda: (p.closure()[0], lambda o: p.closure()[1](o) * float("nan"))  # noqa: E731
    assert opt.step(nan_head).skipped
    assert [s for s, _ in opt.window] == [s for s, _ in window]  # the oldest entry is still there
    assert all(torch.equal(d, e) for (_, d), (_, e) in zip(opt.window, window))
    torch.testing.assert_close(p.model.x.detach(), before, rtol=0, atol=0)
