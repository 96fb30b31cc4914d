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


def test_cluster_layouts_put_only_scalars_on_the_network_unless_a_shard_group_spans_nodes():
    from zoscale.cli.layouts import layouts

    found = layouts(str(MODELS / "opt-13b.json"), nodes=2, gpus_per_node=8, gpu_memory_gib=80, intra_gbps=3600,
                    inter_gbps=400, batch=32)
    by = {(lay.shard_size, lay.dual, lay.name == "offload"): lay for lay in found}
    assert sorted({lay.shard_size for lay in found}) == [1, 2, 4, 8, 16]
    model_bytes = 12.85e9 * 2
    for size in (1, 2, 4, 8):  # within a node: the losses alone cross it
        assert by[size, False, False].inter_bytes <= 1024
    flat = by[16, False, False]
    # two forwards, each half from the other node
    assert flat.inter_bytes == pytest.approx(2 * 8 / 16 * model_bytes, rel=0.01)
    for size in (2, 4, 8, 16):  # dual_forward gathers each layer once a step
        assert by[size, True, False].intra_bytes == pytest.approx(by[size, False, False].intra_bytes / 2)
    assert by[16, False, True].host_bytes > 0 and by[16, False, True].memory_gib < flat.memory_gib
    assert [lay.fits for lay in found if lay.fastest] == [True]
    small = layouts(str(MODELS / "opt-13b.json"), 2, 8, 10, 3600, 400, batch=32)  # 10 GiB: no whole replica
    assert next(lay for lay in small if lay.fastest).shard_size > 1
    assert not next(lay for lay in small if lay.shard_size == 1).fits


def test_plan_command_lists_a_clusters_layouts_with_its_constants():
    done = subprocess.run([sys.executable, "-m", "zoscale", "plan", "--model", str(MODELS / "opt-13b.json"),
                           "--nodes", "2", "--batch", "32"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("**fastest**") == 1 and "| flop_rate |" in done.stdout
    done = subprocess.run([sys.executable, "-m", "zoscale", "plan", "--model", str(MODELS / "opt-13b.json"),
                           "--nodes", "4"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == ("zoscale: error: --batch: 16 sequences do not give each "
                                                            "of the 32 GPUs one")
