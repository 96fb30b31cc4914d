"""The package's layout as docs/architecture.md describes it: the engine stands alone, the command
line is a table of verbs."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from zoscale import cli

PACKAGE = Path(__file__).resolve().parents[1] / "zoscale"
# what the engine may import: the standard library, torch, triton and itself
ENGINE_MAY_IMPORT = ("torch", "triton", "zoscale.engine")
ENGINE_MUST_NOT = ("zoscale.config", "zoscale.train", "zoscale.cli", "zoscale.backends", "zoscale.optim",
                   "zoscale.models", "zoscale.integrations", "transformers", "deepspeed", "accelerate", "datasets")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((PACKAGE / "engine").rglob("*.py")), ids=lambda p: p.name)
def test_the_engine_imports_only_torch_triton_and_itself(path):
    for name in imported_modules(path):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top == "__future__":
            continue
        assert name.startswith(ENGINE_MAY_IMPORT), f"{path.relative_to(PACKAGE)} imports {name}"


def test_importing_the_engine_loads_nothing_of_the_pipeline():
    """Run-time too: the package's public API loads the optimizers, but nothing of the config, the
    pipeline, the tools or the libraries that models and sharding come from."""
    unwanted = tuple(m for m in ENGINE_MUST_NOT if m != "zoscale.optim")
    probe = f"import sys, zoscale.engine; print([m for m in sys.modules if m.startswith({unwanted!r})])"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.mark.parametrize("verb", sorted(cli.VERBS))
def test_every_verb_is_a_module_whose_help_lists_its_arguments(verb, capsys):
    module = cli._module(verb)
    assert callable(module.add_arguments) and callable(module.run)
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser(verb).parse_args([verb, "--help"])
    assert exit_.value.code == 0 and "--" in capsys.readouterr().out
