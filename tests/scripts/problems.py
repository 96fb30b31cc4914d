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
