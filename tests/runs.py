"""`zoscale` commands as the tests run them, and what their run directories hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from distributed import REPO, communicate


def zoscale(*args, timeout: float = 600, cwd=REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m zoscale ARGS`` in a process group of its own, killed whole on a timeout."""
    proc = subprocess.Popen([sys.executable, "-m", "zoscale", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=env, start_new_session=True)
    return communicate(proc, timeout)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def summary(run: Path) -> dict:
    return json.loads((Path(run) / "summary.json").read_text())
