"""The shipped quickstart: a tiny OPT config, sentiment data and a tokenizer (generate.py made them)."""

from importlib import resources
from pathlib import Path

QUICKSTART = Path(str(resources.files("zoscale.quickstart") / "quickstart.yaml"))
