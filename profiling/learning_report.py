"""Issue 26's CPU comparison, summarised (profiling/smollm2_learning.sh runs it).

    python profiling/learning_report.py DIR --choose norm   # main's per-optimizer rates from DIR/sweep
    python profiling/learning_report.py DIR                 # DIR/summary.md: the sweep and the main tables
    python profiling/learning_report.py DIR --publish REPORT  # and the files a report keeps, into REPORT

The sweep ran one compare per grid point (DIR/sweep/PARAMS-I); an optimizer's rate is the one
whose best dev score was highest (ties: the smaller rate). Each main compare (DIR/main/PROMPT-PARAMS)
wrote its own report.md and curves.png; the summary puts their headline numbers side by side. A
recheck (DIR/lower/PROMPT-PARAMS) reruns the optimizers whose chosen rate diverged over the main's
budget one grid point lower.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

RATE_KEYS = {"mezo_svrg": ("lr", "anchor_lr")}  # optim keys the sweep moved together
PROMPTS = {"tweets_sst2": "SST-2's prompt (\"<tweet> It was\" terrible / great)",
           "tweets": "instruction prompt (\"Is the sentiment ... negative or positive? Answer:\")"}


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def sweep(out: Path, params: str) -> dict[str, list[dict]]:
    """optimizer -> [{lr, best_dev, final}] over the grid points that finished."""
    table: dict[str, list[dict]] = {}
    for point in sorted((out / "sweep").glob(f"{params}-*")):
        report, plan = _json(point / "report.json"), _json(point / "plan.json")
        if report is None:
            continue
        for name, row in report["rows"].items():
            config = plan["resolved"][name]["optim"]
            moved = {f"optim.{k}": config[k] for k in RATE_KEYS.get(name, ("lr",))}
            table.setdefault(name, []).append({"lr": config["lr"], "best_dev": row["best_dev"][0],
                                               "final": row["final"][0], "steps": row["steps"], "overrides": moved})
    for points in table.values():
        points.sort(key=lambda p: p["lr"])
    return table


def choose(table: dict[str, list[dict]]) -> dict[str, dict]:
    return {name: max(points, key=lambda p: (p["best_dev"], -p["lr"])) for name, points in table.items()}


def _fmt(pair) -> str:
    mean, sd = pair
    return "-" if mean is None or math.isnan(mean) else f"{mean:.3f} ± {sd:.3f}"


def summary(out: Path) -> str:
    lines = ["# SmolLM2-135M-Instruct on balanced tweets: the sweep and the main comparison", ""]
    for params in ("norm", "lora"):
        table = sweep(out, params)
        if not table:
            continue
        chosen = choose(table)
        lines += [f"## Sweep, {params} (dev accuracy of the best checkpoint; 1 seed, 300 MeZO steps' budget)", "",
                  "| optimizer | " + " | ".join(f"lr {i + 1}" for i in range(max(map(len, table.values())))) +
                  " | chosen |", "| --- |" + " --- |" * (max(map(len, table.values())) + 1)]
        for name, points in table.items():
            cells = [f"{p['lr']:g}: {p['best_dev']:.3f}" for p in points]
            edge = " (the grid's edge: a wider grid may do better)" if chosen[name] in (points[0], points[-1]) else ""
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {chosen[name]['lr']:g}{edge} |")
        lines.append("")
    for main in [*sorted((out / "main").glob("*")), *sorted((out / "lower").glob("*"))]:
        report = _json(main / "report.json")
        if report is None:
            continue
        prompt, params = main.name.rsplit("-", 1)
        plan = _json(main / "plan.json")
        recheck = ", rechecked one grid point below the chosen rate" if main.parent.name == "lower" else ""
        lines += [f"## {PROMPTS.get(prompt, prompt)}, {params}{recheck}", "",
                  f"Zero-shot test accuracy {report['zero_shot']:.3f}; FT ceiling: {report['ceiling'] or 'none'}.", "",
                  "| optimizer | lr | steps | forward passes | final test | best dev → test | of FT's gain | "
                  "passes to 90% of FT (seeds) | training time | peak RSS |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, row in report["rows"].items():
            gain = "-" if row["of_ft_gain"] is None else f"{row['of_ft_gain']:.2f}"
            ft90 = f"{row['passes_to_ft90']:.0f}" if row.get("passes_to_ft90") else "-"
            memory = f"{row['peak_memory_gib']:.2f} GiB" if row["peak_memory_gib"] else "-"
            lines.append(f"| {name} | {plan['resolved'][name]['optim']['lr']:g} | {row['steps']} | "
                         f"{row['forward_passes']:.0f} | {_fmt(row['final'])} | {_fmt(row['best_dev_test'])} | "
                         f"{gain} | "
                         f"{ft90} ({row.get('ft90_reached', '-')}) | {row['training_seconds']:.0f} s | {memory} |")
        lines += ["", f"Curves: {main.parent.name}/{main.name}/curves.png.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--choose", choices=("norm", "lora"), help="print main's OPTIMIZER:key=value rates")
    parser.add_argument("--publish", type=Path, help="copy summary.md and each compare's report files here")
    args = parser.parse_args()
    if args.choose:
        chosen = choose(sweep(args.out, args.choose))
        if not chosen:
            raise SystemExit(f"{args.out}/sweep holds no finished {args.choose} grid point: run the sweep first")
        print(" ".join(f"{name}:{key}={value:g}" for name, point in chosen.items()
                       for key, value in point["overrides"].items()))
        return
    (args.out / "summary.md").write_text(summary(args.out))
    print(f"{args.out / 'summary.md'} written")
    if args.publish:
        publish(args.out, args.publish)


def publish(out: Path, report: Path) -> None:
    """summary.md; each main compare's report.md, report.json, plan.json and curves.png; each sweep
    point's report.md and plan.json (its numbers are in the summary)."""
    curves = ("report.md", "report.json", "plan.json", "curves.png")
    keep = {"main": curves, "lower": curves, "sweep": ("report.md", "plan.json")}
    shutil.copy(out / "summary.md", report / "summary.md")
    for stage, names in keep.items():
        for compare in sorted((out / stage).glob("*")):
            if (compare / "report.json").is_file():
                (report / stage / compare.name).mkdir(parents=True, exist_ok=True)
                for name in names:
                    shutil.copy(compare / name, report / stage / compare.name / name)


if __name__ == "__main__":
    main()
