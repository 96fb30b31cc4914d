import subprocess
import sys
from pathlib import Path

import pytest

from zoscale.cli.plan import plan

MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"


def test_parameter_counts_of_the_opt_family():
    # the published sizes: 12.85B, 29.97B, 65.7B, 175B
    for name, billions in (("opt-13b", 12.85), ("opt-30b", 29.97), ("opt-66b", 65.7), ("opt-175b", 174.6)):
        assert plan(str(MODELS / f"{name}.json"), "fsdp", 8).parameters / 1e9 == pytest.approx(billions, rel=0.01)


def test_sharding_divides_the_shard_and_buffers_and_adds_gathered_layers():
    path = str(MODELS / "opt-13b.json")
    ddp, fsdp8, fsdp16 = plan(path, "ddp", 8), plan(path, "fsdp", 8), plan(path, "fsdp", 16)
    assert ddp.parameter_shard_gib == pytest.approx(12.85e9 * 2 / 2**30, rel=0.01)  # bf16, whole
    assert fsdp8.parameter_shard_gib == pytest.approx(ddp.parameter_shard_gib / 8)
    assert fsdp16.parameter_shard_gib == pytest.approx(fsdp8.parameter_shard_gib / 2)
    assert ddp.gathered_layers_gib == 0 and fsdp8.gathered_layers_gib > 0
    conmezo = plan(path, "deepspeed", 8, optimizer="conmezo")
    assert conmezo.optimizer_buffers_gib == pytest.approx(fsdp8.parameter_shard_gib)  # a bf16 momentum
    assert plan(path, "fsdp", 8, optimizer="mezo").optimizer_buffers_gib == 0


def test_plan_command_prints_a_table_and_refuses_a_missing_model():
    done = subprocess.run([sys.executable, "-m", "zoscale", "plan", "--model", str(MODELS / "opt-30b.json"),
                           "--world-size", "8", "16"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("| opt-30b | fsdp |") == 2
    done = subprocess.run([sys.executable, "-m", "zoscale", "plan", "--model", "/nonexistent/config.json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("zoscale: error: --model")
