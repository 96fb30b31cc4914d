"""`zoscale compare`: optimizers side by side on one task, model, batch order and set of seeds, at
an equal budget of forward passes.

    zoscale compare --optimizers mezo,conmezo,mezo_svrg,pseuzo --seeds 3 --steps 2000 --out DIR \\
        [--config FILE] [--evals 8] [--jobs 1] [key=value ...] [OPTIMIZER:key=value ...]

The budget is ``--steps`` MeZO steps: 2 x steps forward passes, each over one training batch.
Every optimizer runs the steps that fit it, by what it declares a step costs
(``ZOOptimizer.forward_passes``: SVRG's full-sample passes count, PseuZO's output forwards too);
each run counts what it spent (``forward_passes`` in its metrics). A run is `zoscale train` in a
process of its own, DIR/runs/OPTIMIZER-seedS, with run seed S (batch order and perturbation seeds)
shared by every optimizer; ``OPTIMIZER:key=value`` overrides one optimizer's runs only (its lr,
say). Stopped and started again with the same arguments, a comparison keeps its finished runs and
resumes the others from their checkpoints; other arguments with the same DIR are refused.
``--jobs N`` runs N at a time: one per GPU where there are N, else sharing the machine (on a CPU,
give each OMP_NUM_THREADS of its cores); the results do not depend on it, the step times do.

    DIR/plan.json      the arguments, each optimizer's steps and its resolved config
    DIR/report.json    every run's curves and summary; the table below, as numbers
    DIR/report.md      the table: final test accuracy, forward passes to reach MeZO's, step time, memory
    DIR/curves.png     test accuracy and training loss against forward passes and against training time
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zoscale.cli import positive_int
from zoscale.config import load, to_dict, validate_optimizer
from zoscale.errors import ConfigError
from zoscale.train.signals import EXIT_PREEMPTED, EXIT_WITH_PARENT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="experiment YAML (default: the quickstart)")
    parser.add_argument("--optimizers", help="comma-separated, the first the reference (default: every registered "
                        "optimizer, MeZO first)")
    parser.add_argument("--seeds", type=positive_int, default=3, help="run seeds: the config's seed and the next ones")
    parser.add_argument("--steps", type=positive_int, required=True,
                        help="the budget, in MeZO steps (2 forward passes over a training batch each)")
    parser.add_argument("--evals", type=positive_int, default=8, help="evaluations along each run")
    parser.add_argument("--out", type=Path, required=True, help="report directory (an interrupted one continues)")
    parser.add_argument("--jobs", type=positive_int, default=1,
                        help="runs at a time (the results do not depend on it; the step times do)")
    parser.epilog = ("key=value arguments override config keys for every run; OPTIMIZER:key=value for that "
                     "optimizer's runs only (conmezo:optim.lr=1e-6).")


def run(args) -> int:
    from zoscale.optim import REGISTRY

    optimizers = [m for m in (args.optimizers or ",".join(REGISTRY)).split(",") if m]
    plan = make_plan(args.config, optimizers, args.seeds, args.steps, args.evals, args.overrides)
    try:
        compare(plan, args.out, args.jobs)
    except RunFailed as e:
        print(f"zoscale: error: {e}", file=sys.stderr)
        return e.code
    print(f"report in {args.out}/report.md")
    return 0


@dataclass
class Plan:
    config: str | None
    optimizers: list[str]
    seeds: list[int]
    budget_steps: int  # in MeZO steps: 2 forward passes each
    evals: int
    overrides: list[str]
    per_optimizer: dict[str, list[str]]
    steps: dict[str, int] = field(default_factory=dict)  # each optimizer's steps within the budget
    resolved: dict[str, dict] = field(default_factory=dict)  # each optimizer's config as its runs read it

    @property
    def budget_passes(self) -> float:
        return 2.0 * self.budget_steps


def make_plan(config: Path | None, optimizers: list[str], seeds: int, budget_steps: int, evals: int,
              overrides: list[str]) -> Plan:
    """Checks every run's config before anything starts, and fits each optimizer's steps to the budget."""
    from zoscale.optim import REGISTRY
    from zoscale.quickstart import QUICKSTART
    from zoscale.train import data, tasks

    if not optimizers or len(set(optimizers)) != len(optimizers):
        raise ConfigError(f"--optimizers: give distinct names, got {optimizers}")
    shared, per_optimizer = [], {name: [] for name in optimizers}
    for item in overrides:
        prefix, colon, rest = item.partition(":")
        if colon and "=" not in prefix:
            if prefix not in per_optimizer:
                raise ConfigError(f"{item}: {prefix!r} is not one of --optimizers {optimizers}")
            per_optimizer[prefix].append(rest)
        else:
            shared.append(item)
    plan = Plan(str(config.resolve()) if config else None, optimizers, [], budget_steps, evals, shared, per_optimizer)
    for name in optimizers:
        cfg = load(config, run_overrides(plan, name), defaults=QUICKSTART)
        if cfg.backend != "local":
            raise ConfigError(f"backend: compare runs each optimizer in one process (local), got {cfg.backend}")
        try:
            task = tasks.get(cfg.data.task)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        # from this optimizer's own data: a per-optimizer data override changes what a full pass costs
        full_batches = len(data.sample(cfg.data, task)["train"]) / cfg.batch_size
        plan.seeds = plan.seeds or [cfg.seed + i for i in range(seeds)]
        plan.resolved[name] = to_dict(cfg)
        options = validate_optimizer(cfg.optim)
        spent, steps = 0.0, 0
        while spent + REGISTRY[name].forward_passes(options, steps, full_batches) <= plan.budget_passes:
            spent += REGISTRY[name].forward_passes(options, steps, full_batches)
            steps += 1
        if steps == 0:
            raise ConfigError(f"--steps {budget_steps}: {name}'s first step alone costs more than the budget of "
                              f"{plan.budget_passes:g} forward passes")
        plan.steps[name] = steps
    return plan


def run_overrides(plan: Plan, name: str) -> list[str]:
    return [*plan.overrides, *plan.per_optimizer.get(name, []), f"optim.name={name}"]


def run_name(name: str, seed: int) -> str:
    return f"{name}-seed{seed}"


def compare(plan: Plan, out: Path, jobs: int = 1) -> dict:
    """Runs what is not finished yet, ``jobs`` runs at a time, then writes the report."""
    from zoscale.train.rundir import LOCK, RunDirectory, read_json, refuse_links

    refuse_links(out, "--out")  # its reports, logs and runs are written inside it, never through a link
    saved = out / "plan.json"
    current = json.loads(json.dumps(asdict(plan)))  # as plan.json holds it
    if saved.is_file():
        recorded = read_json(saved)
        if recorded is None:
            raise ConfigError(f"--out: {saved} is unreadable (torn or not JSON): the comparison's arguments are "
                              f"unknown; use another --out")
        arguments = lambda plan_json: {k: v for k, v in plan_json.items() if k != "resolved"}  # noqa: E731
        if arguments(recorded) != arguments(current):
            raise ConfigError(f"--out: {out} holds a comparison with other arguments ({saved}); use another --out")
        changed = _changed_keys(recorded.get("resolved", {}), current["resolved"])
        if changed:
            raise ConfigError(f"--config: {plan.config or 'the quickstart'} resolves to another config than the "
                              f"one {out} began with ({', '.join(changed[:3])}); use another --out")
    elif out.exists() and any(p.name != LOCK for p in out.iterdir()):
        raise ConfigError(f"--out: {out} exists and is not a comparison (no plan.json); nothing is overwritten")
    out.mkdir(parents=True, exist_ok=True)
    with RunDirectory(out, fresh=False):  # one comparison writes here at a time, for its whole life
        return _run_plan(plan, out, saved, current, jobs)


def _run_plan(plan: Plan, out: Path, saved: Path, current: dict, jobs: int) -> dict:
    from zoscale.quickstart import QUICKSTART
    from zoscale.train import checkpoint
    from zoscale.train.rundir import read_json, write_atomic

    write_atomic(saved, json.dumps(current, indent=1) + "\n")
    (out / "runs").mkdir(exist_ok=True)
    first, pending = True, []
    for seed in plan.seeds:
        for name in plan.optimizers:
            run = out / "runs" / run_name(name, seed)
            steps = plan.steps[name]
            if read_json(run / "summary.json") is not None:
                first = False
                continue
            if run.exists() and checkpoint.find(run / "checkpoints", checksums=False).path is None:
                print(f"{run.name}: stopped before its first checkpoint; starting it again", flush=True)
                shutil.rmtree(run)
            every = max(1, steps // plan.evals)
            args = [*run_overrides(plan, name), f"seed={seed}", f"steps={steps}", f"eval_every={every}",
                    f"save_every={every}", "eval_test=true", "memory_profile=true",
                    f"eval_before={'true' if first else 'false'}"]  # the zero-shot row: once
            first = False
            pending.append((["--config", plan.config or str(QUICKSTART), "--out", str(run), "--auto-resume", *args],
                            out / "runs" / f"{run.name}.log", f"{run.name}: {steps} steps"))
    _train_all(pending, jobs)
    report = build_report(plan, out)
    write_atomic(out / "report.json", json.dumps(report, indent=1) + "\n")
    write_atomic(out / "report.md", markdown(report))
    plot(report, out / "curves.png")
    return report


def _changed_keys(before: dict, after: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested dicts. A key only one of them has
    is a zoscale version's new or retired key, not an edit: the arguments, compared as well,
    catch a new key set by an override."""
    keys = []
    for key in sorted(set(before) & set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


class RunFailed(RuntimeError):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _train_all(pending: list[tuple[list[str], Path, str]], jobs: int) -> None:
    """Each run is `zoscale train` in a child process, ``jobs`` at a time. SIGTERM or SIGINT to this
    process is passed on to every child, each checkpoints, and the comparison stops (the same command
    continues it); a failed run lets the others finish, then stops the comparison."""
    running: dict[subprocess.Popen, tuple[Path, int]] = {}  # a child: its log and its slot
    stopping, failed = False, []
    progress: dict[Path, int] = {}  # a run: how much of its metrics.jsonl was shown
    devices = _devices(jobs)

    def forward(signum, frame):
        nonlocal stopping
        stopping = True
        for child in running:
            child.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while running or (pending and not stopping and not failed):
            while pending and len(running) < jobs and not stopping and not failed:
                args, log, announce = pending.pop(0)
                slot = min(set(range(jobs)) - {s for _, s in running.values()})
                env = {**os.environ, EXIT_WITH_PARENT: "1"}
                if devices:
                    env["CUDA_VISIBLE_DEVICES"] = devices[slot]
                print(announce, flush=True)
                metrics = log.with_suffix("") / "metrics.jsonl"  # runs/NAME.log beside runs/NAME/
                progress[metrics] = metrics.stat().st_size if metrics.is_file() else 0
                with open(log, "a") as f:
                    running[subprocess.Popen([sys.executable, "-m", "zoscale", "train", *args], stdout=f,
                                             stderr=subprocess.STDOUT, env=env)] = (log, slot)
            time.sleep(0.2)
            for log, _ in running.values():
                _show_evaluations(log.with_suffix("") / "metrics.jsonl", progress)
            for child in [c for c in running if c.poll() is not None]:
                log, _ = running.pop(child)
                if child.returncode != 0:
                    failed.append((log, child.returncode))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if failed:
        log, code = failed[0]
        raise RunFailed(f"compare: {log.stem} ended with exit code {code}; its output is in {log} (run the same "
                        f"command again to continue)", code)
    if stopping:  # between two runs: nothing was running to checkpoint
        raise RunFailed("compare: stopped by a signal; run the same command again to continue", EXIT_PREEMPTED)


def _show_evaluations(metrics: Path, progress: dict[Path, int]) -> None:
    """A line for each evaluation a running run has logged since the last look."""
    if not metrics.is_file():
        return
    with open(metrics, "rb") as f:
        f.seek(progress.get(metrics, 0))
        text = f.read()
    whole = text[: text.rfind(b"\n") + 1]  # a line still being written waits for the next look
    progress[metrics] = progress.get(metrics, 0) + len(whole)
    for line in whole.decode(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("split"):
            scores = ", ".join(f"{k} {v:.3f}" for k, v in record.items()
                               if k not in ("step", "split", "examples") and isinstance(v, (int, float)))
            print(f"{metrics.parent.name}: step {record['step']}, {record['split']} {scores}", flush=True)


def _devices(jobs: int) -> list[str] | None:
    """A GPU for each of the ``jobs`` runs at a time where there are that many; else they share."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return ids if jobs > 1 and len(ids) >= jobs else None


def _lines(path: Path) -> list[dict]:
    from zoscale.train.runlog import read_records

    if not path.is_file():
        raise ConfigError(f"{path} is missing: the run's metrics are gone; remove {path.parent} to run it again")
    return [r for _, r in read_records(path, "compare")]


def run_record(run: Path) -> dict:
    """One finished run: its test curve against forward passes and training time, its losses, its summary."""
    from zoscale.train.evaluate import headline
    from zoscale.train.rundir import read_json

    summary = read_json(run / "summary.json")
    if summary is None:
        raise ConfigError(f"{run / 'summary.json'} is missing or unreadable; run the same command again to write it")
    metrics = _lines(run / "metrics.jsonl")
    steps = [m for m in metrics if "loss" in m]
    at = {m["step"] + 1: (m["forward_passes"], m["step_time"]) for m in steps}  # after that many steps
    wall, elapsed = {}, 0.0
    for m in steps:
        elapsed += m["step_time"]
        wall[m["step"] + 1] = elapsed
    tests = [(m["step"], headline(m)) for m in metrics if m.get("split") == "test"]
    tests.append((summary["steps"], headline(summary["eval_final"])))
    memory = summary.get("memory", {})
    return {"steps": summary["steps"], "forward_passes": summary["forward_passes"],
            "test": [{"step": s, "forward_passes": at[s][0], "seconds": wall[s], "score": v} for s, v in tests],
            "loss": [m["loss"] for m in steps], "loss_passes": [m["forward_passes"] for m in steps],
            "loss_seconds": [wall[m["step"] + 1] for m in steps],
            "final": headline(summary["eval_final"]), "best_dev_test": headline(summary["eval_after"]),
            "final_balanced": summary["eval_final"].get("balanced_accuracy", math.nan),
            "majority": summary["eval_final"].get("majority"),
            "best_dev": summary.get("best_dev", {}).get("score"), "eval_before": summary.get("eval_before"),
            "step_time_median": statistics.median(m["step_time"] for m in steps),
            "training_seconds": elapsed,
            "peak_memory_gib": memory.get("memory/nvml_process_used_peak_gib", memory.get("memory/host_rss_peak_gib"))}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def build_report(plan: Plan, out: Path) -> dict:
    from zoscale.train.evaluate import headline

    runs = {name: [run_record(out / "runs" / run_name(name, s)) for s in plan.seeds] for name in plan.optimizers}
    before = next((r["eval_before"] for rs in runs.values() for r in rs if r["eval_before"]), None)
    reference = plan.optimizers[0]
    target = _mean_sd([r["final"] for r in runs[reference]])[0]
    # the training loss, every step: a finer clock than the evaluations (moving averages over a tenth
    # of the reference's steps; the target is the reference's final average, over seeds)
    window = max(1, plan.steps[reference] // 10)
    loss_target = statistics.fmean(_moving_average(r["loss"], window)[-1] for r in runs[reference])
    rows = {}
    for name, records in runs.items():
        reached = [next((p["forward_passes"] for p in r["test"] if p["score"] >= target), None) for r in records]
        hits = [p for p in reached if p is not None]
        by_loss = [next((p for p, v in list(zip(r["loss_passes"], _moving_average(r["loss"], window)))[window - 1:]
                         if v <= loss_target), None) for r in records]  # full windows only
        loss_hits = [p for p in by_loss if p is not None]
        rows[name] = {"steps": plan.steps[name], "forward_passes": _mean_sd([r["forward_passes"] for r in records])[0],
                      "final": _mean_sd([r["final"] for r in records]),
                      "final_balanced": _mean_sd([r["final_balanced"] for r in records]),
                      "best_dev_test": _mean_sd([r["best_dev_test"] for r in records]),
                      "best_dev": _mean_sd([r["best_dev"] for r in records if r["best_dev"] is not None] or [math.nan]),
                      "passes_to_target": statistics.fmean(hits) if hits else None,
                      "reached": f"{len(hits)}/{len(records)}",
                      "passes_to_loss_target": statistics.fmean(loss_hits) if loss_hits else None,
                      "loss_reached": f"{len(loss_hits)}/{len(records)}",
                      "step_time_median": statistics.median(r["step_time_median"] for r in records),
                      "training_seconds": _mean_sd([r["training_seconds"] for r in records])[0],
                      "peak_memory_gib": max((r["peak_memory_gib"] or 0.0) for r in records) or None}
    base, loss_base = rows[reference]["passes_to_target"], rows[reference]["passes_to_loss_target"]
    zero_shot = headline(before) if before else None
    ceiling = _ceiling(rows)  # the best first-order baseline: backpropagation's result at this budget
    for row in rows.values():
        # a speedup only where every seed reached the target (a mean over the seeds that did would flatter)
        every, loss_every = (row[k].split("/")[0] == row[k].split("/")[1] for k in ("reached", "loss_reached"))
        row["speedup"] = base / row["passes_to_target"] if base and row["passes_to_target"] and every else None
        row["loss_speedup"] = loss_base / row["passes_to_loss_target"] \
            if loss_base and row["passes_to_loss_target"] and loss_every else None
        gain = None if ceiling is None or zero_shot is None else rows[ceiling]["final"][0] - zero_shot
        # FT that ended at or below zero-shot gained nothing to take a fraction of
        row["of_ft_gain"] = (row["final"][0] - zero_shot) / gain if gain and gain > 0 else None
    if ceiling is not None:  # how soon each optimizer reaches 90% of backpropagation's final score
        ft_target = 0.9 * rows[ceiling]["final"][0]
        for name, row in rows.items():
            reached = [next((p["forward_passes"] for p in r["test"] if p["score"] >= ft_target), None)
                       for r in runs[name]]
            hits = [p for p in reached if p is not None]
            row["passes_to_ft90"] = statistics.fmean(hits) if hits else None
            row["ft90_reached"] = f"{len(hits)}/{len(reached)}"
    return {"plan": asdict(plan), "reference": reference, "target": target, "loss_target": loss_target,
            "ceiling": ceiling,
            "loss_window": window,
            "zero_shot": zero_shot,
            "zero_shot_balanced": before.get("balanced_accuracy", math.nan) if before else math.nan,
            "majority": runs[reference][0]["majority"], "rows": rows, "runs": runs}


def _ceiling(rows: dict) -> str | None:
    """The first-order row (an optimizer that backpropagates) with the highest mean final score."""
    from zoscale.optim import REGISTRY

    first_order = [name for name in rows if "gradient" in REGISTRY[name].needs]
    return max(first_order, key=lambda name: rows[name]["final"][0], default=None)


def markdown(report: dict) -> str:
    plan, rows = report["plan"], report["rows"]
    lines = [f"# zoscale compare: {', '.join(plan['optimizers'])}", "",
             f"Budget: {2 * plan['budget_steps']:g} forward passes over a training batch ({plan['budget_steps']} MeZO "
             f"steps); seeds {plan['seeds']}; config {plan['config'] or 'the quickstart'}; overrides "
             f"{plan['overrides'] or '-'}" + "".join(f"; {k}: {v}" for k, v in plan["per_optimizer"].items() if v) + ".",
             f"Scores are the task's headline metric on the test sample (accuracy, or F1 for generation); "
             f"{'mean ± sd over seeds' if len(plan['seeds']) > 1 else 'one seed'}. 'final': the last parameters; 'best dev': the test score of the best "
             f"dev checkpoint (MeZO's protocol). Target: {report['reference']}'s mean final score, "
             f"{report['target']:.3f}, at the evaluations; and, on the training loss of every step (moving "
             f"averages over {report['loss_window']} steps), {report['reference']}'s mean final average, "
             f"{report['loss_target']:.4f}. Passes are the mean over the seeds that reached the target."
             + (f" The test sample's most common label is {report['majority']:.3f} of it: always answering it "
                f"scores that accuracy, and a balanced accuracy (mean recall over labels) of 1 / the number of labels."
                if report.get("majority") else "")
             + (f" FT ceiling: {report['ceiling']}'s mean final score (backpropagation on the same parameters, data "
                f"and budget, a backward counted as two forward passes); 'of FT's gain': (final - zero-shot) / "
                f"(FT's final - zero-shot); 'to 90% of FT': forward passes until the test score first reached 0.9 x "
                f"FT's mean final score, mean over the seeds that did." if report.get("ceiling") else ""), "",
             "| optimizer | steps | forward passes | final test | final balanced | best dev → test | dev (best) | "
             "passes to target score (reached) | speedup | passes to target loss (reached) | speedup | "
             "step time (median) | training time | peak memory | of FT's gain | to 90% of FT (reached) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    balanced = report.get("zero_shot_balanced", math.nan)
    if report["zero_shot"] is not None:
        lines.append(f"| zero-shot | 0 | 0 | {report['zero_shot']:.3f} | "
                     f"{'-' if math.isnan(balanced) else f'{balanced:.3f}'} | - | - | - | - | - | - | - | - | - | 0 | - |")
    for name, r in rows.items():
        sd = len(plan["seeds"]) > 1  # one seed has no spread to show
        fmt = lambda pair: "-" if math.isnan(pair[0]) else f"{pair[0]:.3f}" + (f" ± {pair[1]:.3f}" if sd else "")  # noqa: E731
        passes = lambda p, hits: f"{p:.0f} ({hits})" if p else f"- ({hits})"  # noqa: E731
        times = lambda x: f"{x:.2f}x" if x else "-"  # noqa: E731
        memory = f"{r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] else "-"
        lines.append(f"| {name} | {r['steps']} | {r['forward_passes']:.0f} | {fmt(r['final'])} | {fmt(r['final_balanced'])} | "
                     f"{fmt(r['best_dev_test'])} | {fmt(r['best_dev'])} | {passes(r['passes_to_target'], r['reached'])} | "
                     f"{times(r['speedup'])} | {passes(r['passes_to_loss_target'], r['loss_reached'])} | "
                     f"{times(r['loss_speedup'])} | {r['step_time_median']:.3f} s | {r['training_seconds']:.1f} s | "
                     f"{memory} | {'-' if r['of_ft_gain'] is None else format(r['of_ft_gain'], '.2f')} | "
                     f"{passes(r['passes_to_ft90'], r['ft90_reached']) if 'ft90_reached' in r else '-'} |")
    lines += ["", "Peak memory: the process's GPU memory (NVML) where there is a GPU, else its host RSS. "
              "Curves: curves.png; every run: runs/ and report.json.", ""]
    worse = {name: r["final"][0] for name, r in rows.items()
             if report["zero_shot"] is not None and r["final"][0] < report["zero_shot"]}
    if worse:
        named = ", ".join(f"{name} ({final:.3f})" for name, final in worse.items())
        lines += [f"Below zero-shot at the end: {named}. Training made the model worse, usually a learning rate too "
                  f"high for the budget (the runs' projected gradients, pg in runs/*/metrics.jsonl, swing wide)"
                  + (f"; the reference, {report['reference']}, is one of them, so its targets say little"
                     if report["reference"] in worse else "") + ".", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for name, records in report["runs"].items():
        for column, x in ((0, "forward_passes"), (1, "seconds")):
            points = list(zip(*[[p[x] for p in r["test"]] for r in records]))
            scores = list(zip(*[[p["score"] for p in r["test"]] for r in records]))
            xs = [statistics.fmean(p) for p in points]
            mean = [statistics.fmean(s) for s in scores]
            sd = [statistics.stdev(s) if len(s) > 1 else 0.0 for s in scores]
            if report["zero_shot"] is not None:
                xs, mean, sd = [0.0, *xs], [report["zero_shot"], *mean], [0.0, *sd]
            line, = axes[0][column].plot(xs, mean, marker="o", label=name)
            axes[0][column].fill_between(xs, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                                         color=line.get_color(), alpha=0.2)
            key = "loss_passes" if column == 0 else "loss_seconds"
            window = max(1, len(records[0]["loss"]) // 20)
            smooth = [_moving_average(r["loss"], window) for r in records]
            axes[1][column].plot([statistics.fmean(v) for v in zip(*[r[key] for r in records])],
                                 [statistics.fmean(v) for v in zip(*smooth)], label=name, color=line.get_color())
    for column in (0, 1):  # the lines a ZO curve is read against
        if report["zero_shot"] is not None:
            axes[0][column].axhline(report["zero_shot"], color="grey", linestyle="--", label="zero-shot")
        if report.get("ceiling"):
            axes[0][column].axhline(report["rows"][report["ceiling"]]["final"][0], color="black", linestyle=":",
                                    label=f"FT ({report['ceiling']}) final")
    for row, label in ((0, "test score (mean ± sd over seeds)"), (1, "training loss (moving average, mean)")):
        for column, x in ((0, "forward passes (one training batch each)"), (1, "training time (s)")):
            axes[row][column].set_xlabel(x)
            axes[row][column].set_ylabel(label)
            axes[row][column].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
