"""Several `zoscale train` runs in one process group (saves starting a job per run). The plan is a
list of (name, overrides, resume): a new run is the quickstart config with the overrides (key=value
strings); a resumed one continues OUT/NAME with top-level keys replaced ({key: value}: steps, the
layout). Plain python runs them in one process, torchrun on its ranks."""

import dataclasses
import json
import os
import sys
from pathlib import Path

from zoscale.config import load
from zoscale.quickstart import QUICKSTART
from zoscale.train.resume import resumed_config
from zoscale.train.trainer import Trainer

out, plan = Path(sys.argv[1]), json.loads(sys.argv[2])
trainer = None
for name, overrides, resume in plan:
    if resume:
        cfg = dataclasses.replace(resumed_config(out / name, None), **overrides)
    else:
        cfg = load(None, overrides, defaults=QUICKSTART)
    trainer = Trainer(cfg, out / name, resume=resume)
    trainer.run()
if trainer is not None:
    trainer.backend.teardown()
if os.environ.get("WORLD_SIZE", "1") != "1":  # as zoscale train: no abort in interpreter teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
