"""What a run writes as it goes, from rank 0 only (other ranks hold a RunLog that writes nothing):

    config.yaml     the resolved config (what `--resume` reloads)
    metrics.jsonl   one line per step (and per evaluation); TensorBoard scalars beside it if asked
    seeds.jsonl     a header (the perturbation stream), then each step's updates as seeds and
                    coefficients (`zoscale replay`)
    comm.json       the collectives of the first steps, per process group and kind (calls, bytes)
    summary.json    evaluations and parameter statistics at the end
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from zoscale.engine import print0
from zoscale.errors import ConfigError
from zoscale.train.rundir import write_atomic


class RunLog:
    def __init__(self, run_dir: Path, main: bool, tensorboard: bool = False):
        self.run_dir, self.main = run_dir, main
        self.writer = None
        if main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(run_dir / "tensorboard")

    def start(self, config: dict, header: dict) -> None:
        """A new run: its config, and the seed log's header."""
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            (self.run_dir / "seeds.jsonl").write_text(json.dumps({"header": header}) + "\n")

    def resume(self, step: int) -> None:
        """Drop what was logged after the checkpoint at ``step``: those steps run again."""
        if self.main:
            for name in ("metrics.jsonl", "seeds.jsonl"):
                truncate_log(self.run_dir / name, step)

    def metrics(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            prefix = f"{record.get('split', 'train')}/"
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.writer.add_scalar(prefix + key, value, record["step"])

    def seeds(self, step: int, projected_grads, updates) -> None:
        """A step's updates as the engine received them: (seed terms, decay), None for one that used a buffer."""
        if not self.main:
            return
        entry = {"step": step, "projected_grads": list(projected_grads),
                 "updates": [None if u is None else {"terms": [[s, c] for s, c in u[0].items()], "decay": u[1]}
                             for u in updates]}
        with open(self.run_dir / "seeds.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def comm(self, ledger: dict) -> None:
        if self.main:
            (self.run_dir / "comm.json").write_text(json.dumps(ledger, indent=1))

    def summary(self, summary: dict) -> None:
        """Written last and atomically: a run is finished when its summary.json is readable."""
        if self.main:
            write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=1))


def read_records(path: Path, flag: str) -> list[tuple[str, dict]]:
    """A JSON-lines log as (line, record) pairs. A torn last line (what a kill or a full disk leaves
    mid-append) is dropped, with a line saying so; a bad line before it is an error naming it."""
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ConfigError(f"{flag}: {path} line {number} is not valid JSON (only a torn last line is "
                                  f"dropped)") from None
            print0(f"{flag}: dropped a torn last line of {path}")
    return records


def truncate_log(path: Path, step: int) -> None:
    """Keep what was logged before the checkpoint at ``step``; a torn last line is dropped."""
    if not path.exists():
        return
    keep = [line for line, r in read_records(path, "--resume")
            if "step" not in r or r["step"] < step or (r.get("split") and r["step"] <= step)]  # a header stays
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)
