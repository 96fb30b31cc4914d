"""PseuZO (Yue et al., NeurIPS 2025): zeroth-order Jacobians of the model body, exact gradients of
the cheap loss head, averaged over a sliding window.

F(theta) = g(h(theta)): h is the body (last hidden state by default, or logits), g the head and
task loss. Per step, with a fresh seed s_t:

    o = h(theta);  e = dg/do by autograd through the head only
    o+ = h(theta + eps z_t);  push (s_t, o+ - o) into a window of the last k pairs
    a_i = w_i <o+_i - o_i, e> / eps          for every entry i (newest weight 1, then lambda, ...)
    theta <- (1 - lr wd) theta - lr sum_i a_i z(s_i)      (one pass for all k seeds and the restore)

Closure protocol: ``closure()`` runs the body on this rank's batch (no grad) and returns
``(output, head_loss)``, where ``head_loss(output)`` is this rank's loss: a scalar tensor, or
(loss_sum tensor, count) for a token-weighted global mean. The optimizer calls the closure twice
per step and ``head_loss`` once with autograd on ``output``; the window's dot products and the
loss go out in one all-reduce. ``result.loss`` is the unperturbed loss.

Defaults are the sound choices, options reproduce the authors' code: ``normalize=False`` sums the
k terms unnormalised (effective lr x k at lambda = 1), ``lambda_schedule="cyclic"`` is their
per-epoch hyperbola with plain MeZO steps while lambda = 0. Weight decay is applied once per step
(the authors' code applies it k times). Old output differences are paired with the current
batch's gradient, as in their code; outputs of different sequence lengths are right-aligned.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from zoscale.optim.base import StepResult, ZOConfig, ZOOptimizer, _check, all_finite, register


@dataclass
class PseuZOConfig(ZOConfig):
    lr: float = 1e-7
    window: int = 14
    decay: float = 0.9  # lambda: weight of the entry one step older
    normalize: bool = True  # weights sum to 1 (False: the authors' unnormalised sum)
    lambda_schedule: str = "constant"  # constant | cyclic (the authors' per-epoch schedule with MeZO phases)
    steps_per_epoch: int | None = None
    total_epochs: int | None = None
    window_dtype: str | None = None  # default: the body output's dtype
    output: str = "hidden"  # what the trainer's closure returns as the body output: hidden | logits

    def __post_init__(self):
        super().__post_init__()
        _check(self.window >= 1, "window", f"must be >= 1, got {self.window}")
        _check(0.0 <= self.decay <= 1.0, "decay", f"must be in [0, 1], got {self.decay}")
        _check(self.output in ("hidden", "logits"), "output", f"must be 'hidden' or 'logits', got {self.output!r}")
        _check(self.lambda_schedule in ("constant", "cyclic"), "lambda_schedule",
               f"must be 'constant' or 'cyclic', got {self.lambda_schedule!r}")
        if self.lambda_schedule == "cyclic":
            _check((self.steps_per_epoch or 0) >= 1, "steps_per_epoch", "is needed by the cyclic schedule")
            _check((self.total_epochs or 0) >= 2, "total_epochs", "must be >= 2 for the cyclic schedule")


@register("pseuzo")
class PseuZO(ZOOptimizer):
    Config = PseuZOConfig

    def __init__(self, shards, config: PseuZOConfig, comm=None, shard_comm=None):
        super().__init__(shards, config, comm, shard_comm)
        self.window: deque[tuple[int, torch.Tensor]] = deque(maxlen=config.window)

    def lambda_at(self, step: int) -> tuple[float, bool]:
        """(lambda, clear the window now). The cyclic schedule: two cycles of total_epochs // 2
        epochs; within a cycle, epoch r has lambda = 1 / (1 + 10 r) for r <= 10, else 0."""
        cfg = self.config
        if cfg.lambda_schedule == "constant":
            return cfg.decay, False
        epoch, first_step = divmod(step, cfg.steps_per_epoch)
        cycle = cfg.total_epochs // 2
        if epoch >= 2 * cycle:
            return 0.0, False
        r = epoch % cycle
        return (1.0 / (1 + 10 * r) if r <= 10 else 0.0), (r == 0 and first_step == 0)

    def step(self, closure) -> StepResult:
        cfg, step = self.config, self.step_count
        lr, seed = self.lr_at(step), self.seed_for(step, 0)
        lam, clear = self.lambda_at(step)
        if clear:
            self.window.clear()
        if lam == 0.0 and cfg.lambda_schedule == "cyclic":
            return self._mezo_step(closure, step, lr, seed)

        output, head_loss = closure()
        total, count, grad = self._head_gradient(output, head_loss)
        self.engine.perturb({seed: cfg.eps})
        output_plus, _ = closure()
        dtype = getattr(torch, cfg.window_dtype) if cfg.window_dtype else output.dtype
        self.window.append((seed, (output_plus - output).to(dtype)))

        dots = [_aligned_dot(diff, grad) for _, diff in self.window]
        reduced = self.comm.all_reduce_sum([total, count, *dots])
        loss, coefs = reduced[0] / reduced[1], [d / (reduced[1] * cfg.eps) for d in reduced[2:]]
        weights = [lam ** (len(coefs) - 1 - i) for i in range(len(coefs))]  # newest last, weight 1
        if cfg.normalize:
            weights = [w / sum(weights) for w in weights]
        skipped = not all_finite([loss, *coefs])
        if skipped:
            self.window.pop()
            self.engine.update({})
        else:
            terms: dict[int, float] = {}
            for (s, _), w, c in zip(self.window, weights, coefs):
                terms[s] = terms.get(s, 0.0) - lr * w * c
            self.engine.update(terms, decay=1.0 - lr * cfg.weight_decay)
        self.engine.flush()  # the restore of +eps z_t and all k updates in one pass
        self.step_count += 1
        return StepResult(step=step, loss=loss, projected_grad=coefs[-1], projected_grads=tuple(coefs), lr=lr,
                          skipped=skipped)

    def _head_gradient(self, output: torch.Tensor, head_loss) -> tuple[float, float, torch.Tensor]:
        """This rank's loss (sum, count) and d(loss sum)/d(output), by autograd through the head only."""
        leaf = output.detach().clone().requires_grad_(True)  # a normal tensor even if made in inference mode
        with torch.inference_mode(False), torch.enable_grad():
            value = head_loss(leaf)
            total, count = value if isinstance(value, tuple) else (value, 1)
            (grad,) = torch.autograd.grad(total, leaf)
        return float(total.detach()), float(count), grad

    def _mezo_step(self, closure, step: int, lr: float, seed: int) -> StepResult:
        """lambda = 0 phases of the cyclic schedule: a plain two-sided MeZO step."""
        def loss():
            output, head_loss = closure()
            with torch.no_grad():
                return head_loss(output)

        plus, minus = self.global_means(self.evaluate_pairs([{seed: 1.0}], loss))
        pg = (plus - minus) / (2 * self.config.eps)
        skipped = not all_finite([plus, minus])
        if skipped:
            self.engine.update({})
        else:
            self.engine.update({seed: -lr * pg}, decay=1.0 - lr * self.config.weight_decay)
        self.engine.flush()
        self.step_count += 1
        return StepResult(step=step, loss=plus, projected_grad=pg, projected_grads=(pg,), lr=lr, skipped=skipped)

    def state_dict(self, buffers: bool = True) -> dict:
        state = super().state_dict(buffers)
        state["window"] = [(s, d.detach().cpu().clone()) for s, d in self.window]
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.window = deque(((int(s), d) for s, d in state["window"]), maxlen=self.config.window)  # on the CPU


def _aligned_dot(diff: torch.Tensor, grad: torch.Tensor) -> float:
    """<diff, grad> in float64. Shapes (N, S, ...) may differ in S (older batches): the last
    min(S) positions are paired, as the authors' code does; N and the trailing dims must agree."""
    if diff.shape != grad.shape:
        if diff.dim() < 2 or diff.shape[0] != grad.shape[0] or diff.shape[2:] != grad.shape[2:]:
            raise ValueError(f"PseuZO pairs output differences of shape {tuple(diff.shape)} with a gradient of "
                             f"shape {tuple(grad.shape)}: batches need the same size (use drop_last)")
        keep = min(diff.shape[1], grad.shape[1])
        diff, grad = diff[:, -keep:], grad[:, -keep:]
    return torch.dot(diff.reshape(-1).to(grad.device, torch.float64), grad.reshape(-1).double()).item()

