"""How biased is PseuZO's expected update when every step draws a fresh batch? (issue 14 item 5)

A composite problem in float64: a tanh body o_n = tanh(W x_n) on N examples whose features have a
non-zero mean, a softmax cross-entropy head on o_n, batches of B drawn afresh each step. W stays
fixed (lr = 0), so the mean of the per-step updates sum_i w_i a_i z_i over T steps estimates the
expected update at W; its cosine with the full-sample gradient is the measure (1 = unbiased, up to
the sampling error of T steps, which window 1 shows).

    python profiling/pseuzo_pairing.py [--steps T] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import zoscale
from zoscale.engine import rng


class Composite:
    def __init__(self, n=64, features=6, width=4, classes=3, batch=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, features, generator=g, dtype=torch.float64) + 1.0  # non-zero mean
        self.head_weight = torch.randn(classes, width, generator=g, dtype=torch.float64)
        self.labels = torch.randint(0, classes, (n,), generator=g)
        self.model = torch.nn.Module()
        self.model.w = torch.nn.Parameter(torch.randn(width, features, generator=g, dtype=torch.float64) * 0.5)
        self.batch, self.order = batch, torch.Generator().manual_seed(seed + 1)

    def outputs(self, index):
        """PseuZO's closure on one batch: the body output and the summed head loss on it."""
        def run():
            def head_loss(o):
                return torch.nn.functional.cross_entropy(o @ self.head_weight.T, self.labels[index],
                                                         reduction="sum"), len(index)
            return torch.tanh(self.x[index] @ self.model.w.detach().T), head_loss
        return run

    def gradient(self) -> torch.Tensor:
        w = self.model.w.detach().clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(torch.tanh(self.x @ w.T) @ self.head_weight.T, self.labels)
        return torch.autograd.grad(loss, w)[0].flatten()

    def fresh_batch(self) -> torch.Tensor:
        return torch.randperm(len(self.x), generator=self.order)[: self.batch]


def expected_update_cosine(steps: int, **options) -> float:
    problem = Composite()
    opt = zoscale.build_optimizer("pseuzo", problem.model, lr=0.0, eps=1e-4, seed=3, **options)
    d, total = problem.model.w.numel(), torch.zeros(problem.model.w.numel(), dtype=torch.float64)
    for _ in range(steps):
        result = opt.step(problem.outputs(problem.fresh_batch()))
        seeds = [s for s, _ in opt.window]
        weights = [opt.config.decay ** (len(seeds) - 1 - i) for i in range(len(seeds))]
        weights = [w / sum(weights) for w in weights]
        for s, w, c in zip(seeds, weights, result.projected_grads):
            total += w * c * rng.gaussian(s, rng.stream_id("w"), 0, d).double()
    grad = problem.gradient()
    return float(total @ grad / (total.norm() * grad.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    modes = {"window 1": {"window": 1}, "own, window 14": {"pairing": "own"},
             "current, window 14 (the authors')": {"pairing": "current"},
             "current, window 14, lambda 1": {"pairing": "current", "decay": 1.0}}
    rows = []
    for name, options in modes.items():
        start = time.time()
        rows.append({"mode": name, "options": options, "steps": args.steps,
                     "cosine": expected_update_cosine(args.steps, **options), "seconds": time.time() - start})
        print(f"{name}: cosine {rows[-1]['cosine']:.3f} ({rows[-1]['seconds']:.0f} s)", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "pseuzo-pairing.json").write_text(json.dumps(rows, indent=1))
        lines = [f"# PseuZO pairing bias ({time.strftime('%Y-%m-%d')}, `python profiling/pseuzo_pairing.py --steps "
                 f"{args.steps}`; float64, deterministic)", "",
                 "| mode | cosine of the mean update with the gradient |", "| --- | --- |"]
        lines += [f"| {r['mode']} | {r['cosine']:.3f} |" for r in rows]
        (args.out / "pseuzo-pairing.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
