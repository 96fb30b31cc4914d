"""`zoscale bench quadratic`: ConMeZO's synthetic experiment (the ConMeZO paper's), run through
zoscale's own optimizers and perturbation engine.

f(x) = 1/2 x^T A x with A diagonal, eigenvalues geometric from 1/d^3 to 1; x_0 a random direction
of norm 10 (seed 42, the same for every trial); mu = eps = 0.01, lr = 0.01, ConMeZO theta = 1.30,
beta = 0.99 with zero initial momentum. Speedup = iterations MeZO's mean curve needs to first
reach its own final mean value / iterations ConMeZO's mean curve needs to reach that value.
"""

from __future__ import annotations

import datetime
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import zoscale
from zoscale.cli.bench import cpu_description

METHODS = {
    "mezo": {},
    "conmezo": {"cone_theta": 1.30, "beta": 0.99, "momentum_init": "zero", "buffer_dtype": "float64"},
}


@dataclass
class QuadraticConfig:
    dim: int = 1000
    iters: int = 100_000
    trials: int = 5
    lr: float = 0.01
    eps: float = 0.01
    x0_norm: float = 10.0
    x0_seed: int = 42
    first_trial_seed: int = 43
    curve_points: int = 400
    buffer_dtype: str = "float64"  # ConMeZO's momentum (x is float64)


def _problem(cfg: QuadraticConfig) -> tuple[torch.Tensor, torch.Tensor]:
    eigenvalues = torch.logspace(-3 * math.log10(cfg.dim), 0.0, cfg.dim, dtype=torch.float64)
    x0 = torch.randn(cfg.dim, generator=torch.Generator().manual_seed(cfg.x0_seed), dtype=torch.float64)
    return eigenvalues, x0 * (cfg.x0_norm / x0.norm())


def run_trial(cfg: QuadraticConfig, method: str, trial: int, progress: bool = True) -> list[float]:
    """f(x_t) for t = 0..iters of one optimizer run."""
    torch.set_num_threads(1)
    eigenvalues, x0 = _problem(cfg)
    model = torch.nn.Module()
    model.x = torch.nn.Parameter(x0.clone())
    x = model.x.data
    options = {**METHODS[method], **({"buffer_dtype": cfg.buffer_dtype} if method == "conmezo" else {})}
    opt = zoscale.build_optimizer(method, model, lr=cfg.lr, eps=cfg.eps, seed=cfg.first_trial_seed + trial, **options)
    value = lambda: 0.5 * torch.dot(eigenvalues, x * x).item()  # noqa: E731
    values = [value()]
    report_every = max(1, cfg.iters // 10)
    start = time.time()
    for t in range(1, cfg.iters + 1):
        opt.step(value)
        values.append(value())
        if progress and t % report_every == 0:
            print(f"  {method} trial {trial + 1}/{cfg.trials}: {t}/{cfg.iters} iterations, f = {values[-1]:.3e}, "
                  f"{time.time() - start:.0f} s", flush=True)
    return values


def first_reach(curve: list[float], target: float) -> int | None:
    return next((t for t, v in enumerate(curve) if v <= target), None)


def summarize(cfg: QuadraticConfig, curves: dict[str, list[list[float]]]) -> dict:
    means = {m: [sum(vals) / len(vals) for vals in zip(*runs)] for m, runs in curves.items()}
    target = means["mezo"][-1]
    reach = {m: first_reach(curve, target) for m, curve in means.items()}
    speedup = reach["mezo"] / reach["conmezo"] if reach["conmezo"] else None
    ticks = sorted({round(cfg.iters * k / cfg.curve_points) for k in range(cfg.curve_points + 1)})
    return {
        "config": asdict(cfg),
        "date": datetime.date.today().isoformat(),
        "hardware": cpu_description(),
        "initial_value": means["mezo"][0],
        "methods": {m: {"options": METHODS[m], "final_mean": means[m][-1],
                        "final_per_trial": [run[-1] for run in curves[m]],
                        "iterations_to_mezo_final": reach[m],
                        "curve": {"iteration": ticks, "mean_value": [means[m][t] for t in ticks]}}
                    for m in curves},
        "speedup": speedup,
    }


def write_report(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "quadratic.json").write_text(json.dumps(summary, indent=1))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, data in summary["methods"].items():
        ax.plot(data["curve"]["iteration"], data["curve"]["mean_value"], label=method)
    ax.axhline(summary["methods"]["mezo"]["final_mean"], color="gray", lw=0.8, ls="--", label="MeZO final")
    cfg = summary["config"]
    ax.set(yscale="log", xlabel="iteration", ylabel=f"mean f(x) over {cfg['trials']} trials",
           title=f"Quadratic, d={cfg['dim']}, kappa=d^3: speedup {summary['speedup'] or float('nan'):.2f}x")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "quadratic.png", dpi=120)
    plt.close(fig)
    rows = "\n".join(f"| {m} | {d['final_mean']:.3e} | {d['iterations_to_mezo_final']} |"
                     for m, d in summary["methods"].items())
    speedup = f"{summary['speedup']:.2f}x" if summary["speedup"] else "not reached"
    (out / "quadratic.md").write_text(f"""# Quadratic benchmark: MeZO vs ConMeZO

{summary['date']}, {summary['hardware']}; `zoscale bench quadratic --dim {cfg['dim']} --iters {cfg['iters']} \
--trials {cfg['trials']} --buffer-dtype {cfg['buffer_dtype']}`.

f(x) = x^T A x / 2, A diagonal with eigenvalues geometric from 1/d^3 to 1, |x_0| = 10 (f_0 = \
{summary['initial_value']:.3f}), eps = {cfg['eps']}, lr = {cfg['lr']}; ConMeZO theta = 1.30, beta = 0.99, \
zero initial momentum, momentum in {cfg['buffer_dtype']}. Trial seeds {cfg['first_trial_seed']}..{cfg['first_trial_seed'] + cfg['trials'] - 1} \
(zoscale's Philox streams, not the paper's numpy seeds).

| method | final mean f | iterations to reach MeZO's final mean |
| --- | --- | --- |
{rows}

**Speedup: {speedup}** (the ConMeZO paper reports 2.45x with its own seeds; a re-run of its code \
with fresh seeds gave about 2.3x).

![curves](quadratic.png)
""")


def run(cfg: QuadraticConfig, out: Path, workers: int = 1) -> dict:
    jobs = [(m, k) for m in METHODS for k in range(cfg.trials)]
    print(f"quadratic benchmark: {len(jobs)} runs of {cfg.iters} iterations, d = {cfg.dim}, {workers} worker(s)",
          flush=True)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(run_trial, [cfg] * len(jobs), *zip(*jobs)))
    else:
        results = [run_trial(cfg, m, k) for m, k in jobs]
    curves = {m: [r for (method, _), r in zip(jobs, results) if method == m] for m in METHODS}
    summary = summarize(cfg, curves)
    write_report(summary, out)
    return summary
