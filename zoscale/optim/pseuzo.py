"""PseuZO (Yue et al., NeurIPS 2025): zeroth-order Jacobians of the model body, exact gradients of
the cheap loss head, averaged over a sliding window.

F(theta) = g(h(theta)): h is the body (last hidden state by default, or logits), g the head and
task loss. Per step, with a fresh seed s_t:

    o = h(theta);  e_t = dg/do by autograd through the head only
    o+ = h(theta + eps z_t);  c_t = <o+ - o, e_t> / eps
    a_i = w_i c_i        for the last k steps i (newest weight 1, then lambda, ...; normalised)
    theta <- (1 - lr wd) theta - lr sum_i a_i z(s_i)      (one pass for all k seeds and the restore)

``pairing="own"`` (the default) pairs each output difference with its own batch's gradient e_i,
so the window holds k coefficients. ``pairing="current"`` is the authors': the window holds the k
output differences and pairs every one with this step's e_t; when each step draws a new batch,
that pairs one batch's Jacobian with another's gradient, and the expected update leans away from
the gradient (cosine 0.80 against 0.99 for "own": profiling/reports/pseuzo-pairing-2026-12-02-cpu/).

Objective: ``outputs(kind)`` runs the body on this rank's batch (no grad) and returns
``(output, head_loss)``, where ``head_loss(output)`` is this rank's loss: a scalar tensor, or
(loss_sum tensor, count) for a token-weighted global mean; ``kind`` is the ``output`` option. A
bare callable ``closure()`` returning the pair also works. The optimizer calls it twice per step
and ``head_loss`` once with autograd on ``output``; the window's dot products and the loss go out
in one all-reduce. ``result.loss`` is the unperturbed loss.

Defaults are the sound choices, options reproduce the authors' code: ``normalize=False`` sums the
k terms unnormalised (effective lr x k at lambda = 1), ``lambda_schedule="cyclic"`` is their
per-epoch hyperbola with plain MeZO steps while lambda = 0, ``pairing="current"`` their pairing.
Weight decay is applied once per step (the authors' code applies it k times). Outputs are
(sequence, position, ...) tensors; under "current", outputs of different lengths are right-aligned.
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
    output: str = "hidden"  # the body output asked of the objective's outputs(kind): hidden | logits
    pairing: str = "own"  # own: each output difference with its own batch's gradient | current: the authors'

    def __post_init__(self):
        super().__post_init__()
        _check(self.window >= 1, "window", f"must be >= 1, got {self.window}")
        _check(0.0 <= self.decay <= 1.0, "decay", f"must be in [0, 1], got {self.decay}")
        _check(self.output in ("hidden", "logits"), "output", f"must be 'hidden' or 'logits', got {self.output!r}")
        _check(self.pairing in ("own", "current"), "pairing", f"must be 'own' or 'current', got {self.pairing!r}")
        _check(self.lambda_schedule in ("constant", "cyclic"), "lambda_schedule",
               f"must be 'constant' or 'cyclic', got {self.lambda_schedule!r}")
        if self.lambda_schedule == "cyclic":
            _check((self.steps_per_epoch or 0) >= 1, "steps_per_epoch", "is needed by the cyclic schedule")
            _check((self.total_epochs or 0) >= 2, "total_epochs", "must be >= 2 for the cyclic schedule")


@register("pseuzo")
class PseuZO(ZOOptimizer):
    Config = PseuZOConfig
    needs = ("outputs",)

    def __init__(self, shards, config: PseuZOConfig, comm=None, shard_comm=None, phase=None):
        super().__init__(shards, config, comm, shard_comm, phase)
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

    def _step(self, objective) -> StepResult:
        outputs = self.objective(objective).outputs
        cfg, step = self.config, self.step_count
        closure = lambda: outputs(cfg.output)  # noqa: E731
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
        if cfg.pairing == "own":  # the newest coefficient, from this batch's own pair; older ones as they were
            reduced = self.comm.all_reduce_sum([total, count, _aligned_dot(output_plus - output, grad)])
            newest = (seed, torch.tensor(reduced[2] / (reduced[1] * cfg.eps), dtype=torch.float64))
            entries = [*self.window, newest][-cfg.window:]  # the window after this step, if not skipped
            loss, coefs = reduced[0] / reduced[1], [float(c) for _, c in entries]
        else:  # every stored output difference with this step's gradient
            dtype = getattr(torch, cfg.window_dtype) if cfg.window_dtype else output.dtype
            newest = (seed, (output_plus - output).to(dtype))
            entries = [*self.window, newest][-cfg.window:]
            dots = [_aligned_dot(diff, grad) for _, diff in entries]
            reduced = self.comm.all_reduce_sum([total, count, *dots])
            loss, coefs = reduced[0] / reduced[1], [d / (reduced[1] * cfg.eps) for d in reduced[2:]]
        weights = [lam ** (len(coefs) - 1 - i) for i in range(len(coefs))]  # newest last, weight 1
        if cfg.normalize:
            weights = [w / sum(weights) for w in weights]
        skipped = not all_finite([loss, *coefs])
        if not skipped:  # else the window stays as it was, its oldest entry included
            self.window.append(newest)
            terms: dict[int, float] = {}
            for (s, _), w, c in zip(entries, weights, coefs):
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
        if not skipped:
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

