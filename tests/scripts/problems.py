"""Small deterministic problems shared by the rank programs and the tests that check them."""

import torch


def least_squares(examples: int = 23, d: int = 10):
    g = torch.Generator().manual_seed(0)
    params = {"weight": torch.randn(d // 2, 2, generator=g, dtype=torch.float64),
              "bias": torch.randn(3, generator=g, dtype=torch.float64)}
    features = torch.randn(examples, d, generator=g, dtype=torch.float64)
    targets = torch.randn(examples, generator=g, dtype=torch.float64)
    return params, features, targets


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """[a, b) ranges, the first n % parts one longer (so 3 ranks over 10 elements: 4, 3, 3)."""
    bounds, start = [], 0
    for i in range(parts):
        size = n // parts + (i < n % parts)
        bounds.append((start, start + size))
        start += size
    return bounds


def batch(step: int, kind: str, rank: int, world: int, n: int) -> list[int]:
    """This rank's share of step ``step``'s global minibatch (8 examples) or of the full set."""
    index = list(range(n)) if kind == "full" else [(5 * step + j) % n for j in range(8)]
    a, b = split_evenly(len(index), world)[rank]
    return index[a:b]


def run_steps(opt, predict, targets, rank: int, world: int, steps: int) -> list[list[float]]:
    """Step any zoscale optimizer on least squares; ``predict(index)`` evaluates the current
    parameters on examples ``index``. Returns every step's projected gradients."""
    n = len(targets)

    def loss(kind, step):
        index = batch(step, kind, rank, world, n)
        return lambda: (((predict(index) - targets[index]) ** 2).sum().item(), len(index))

    history = []
    for step in range(steps):
        if opt.name == "mezo_svrg":
            result = opt.step(loss("mini", step), full_closure=loss("full", step))
        elif opt.name == "pseuzo":
            index = batch(step, "mini", rank, world, n)
            result = opt.step(lambda: (predict(index), lambda o: (((o - targets[index]) ** 2).sum(), len(index))))
        else:
            result = opt.step(loss("mini", step))
        history.append(list(result.projected_grads))
    return history
