import json
import subprocess
import sys

import pytest

from zoscale.train.memory import GIB, MemorySampler, aggregate


def test_aggregate_recorded_nvml_samples():
    """Samples as a GPU run records them: peaks overall and per phase, in GiB."""
    samples = [
        {"t": 0.0, "phase": "idle", "host_rss": 1 * GIB, "device_used": 10 * GIB, "process_used": 8 * GIB},
        {"t": 0.1, "phase": "perturbation", "host_rss": 1 * GIB, "device_used": 12 * GIB, "process_used": 9 * GIB},
        {"t": 0.2, "phase": "forward", "host_rss": 2 * GIB, "device_used": 15 * GIB, "process_used": 13 * GIB},
        {"t": 0.3, "phase": "forward", "host_rss": 1 * GIB, "device_used": 14 * GIB, "process_used": 12 * GIB},
    ]
    peaks = aggregate(samples)
    assert peaks["memory/nvml_device_used_peak_gib"] == 15
    assert peaks["memory/nvml_process_used_peak_gib"] == 13
    assert peaks["memory/nvml_process_used_peak_perturbation_gib"] == 9
    assert peaks["memory/host_rss_peak_forward_gib"] == 2
    assert "memory/allocated_peak_gib" not in peaks  # not measured, not reported
    assert aggregate([]) == {}


def test_sampler_without_nvml_keeps_host_memory_and_phases():
    sampler = MemorySampler(interval_s=0.005).start()
    with sampler.phase("forward"):
        block = bytearray(64 * 2**20)  # 64 MiB the host must hold
        sampler.sample()
        del block
    sampler.stop()
    if sampler.handle is None:
        assert sampler.nvml_missing  # said once, nothing crashed
        assert all("device_used" not in s for s in sampler.samples)
    assert {s["phase"] for s in sampler.samples} >= {"idle", "forward"}
    summary = sampler.summary()
    assert summary["memory/host_rss_peak_forward_gib"] > 0.06
    assert summary["memory/host_rss_peak_gib"] >= summary["memory/host_rss_peak_forward_gib"]


def test_training_records_memory_metrics(tmp_path):
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "zoscale", "train", "--out", str(run), "steps=4", "eval_every=0",
                           "save_every=0", "data.num_dev=4", "data.num_test=8", "memory_profile=true"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    step = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert step["memory/host_rss_gib"] > 0
    memory = json.loads((run / "summary.json").read_text())["memory"]
    assert {"memory/host_rss_peak_perturbation_gib", "memory/host_rss_peak_forward_gib",
            "memory/host_rss_peak_update_gib"} <= set(memory)


def test_profile_command_writes_the_report(tmp_path):
    out = tmp_path / "profile"
    cmd = [sys.executable, "-m", "zoscale", "profile", "--optimizers", "conmezo,adamw", "--steps", "2", "--seq", "40",
           "--out", str(out), "data.num_dev=0", "data.num_test=0", "data.num_train=64", "optim.buffer_dtype=bfloat16"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "[2/2] adamw:" in done.stdout  # a progress line per method
    report = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in report["results"]] == ["conmezo", "adamw"]
    for r in report["results"]:
        assert not r.get("failed") and r["steps"] == 2 and r["peaks"]["memory/host_rss_peak_gib"] > 0
    assert "| conmezo |" in (out / "report.md").read_text()
    assert "buffer_dtype: bfloat16" in (out / "conmezo" / "run" / "config.yaml").read_text()  # ConMeZO's own option
    assert "random batches of 40 tokens" in (out / "report.md").read_text() and report["seq"] == 40
    for png in ("memory_over_time.png", "peaks.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists; pass --force" in again.stderr


@pytest.mark.parametrize("args,message", [(["--optimizers", "mezo,lion"], "unknown ['lion']"),
                                          (["--config", "/nonexistent.yaml"], "no such file"),
                                          (["optim.eps=0"], "optim.eps: must be > 0"),
                                          (["--seq", "512"], "at most 64 positions"),
                                          (["--optimizers", "mezo", "optim.buffer_dtype=bfloat16"],
                                           "unknown option(s) ['buffer_dtype'] for mezo")])
def test_profile_refuses_bad_input(args, message, tmp_path):
    done = subprocess.run([sys.executable, "-m", "zoscale", "profile", "--out", str(tmp_path / "p"), *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr and not (tmp_path / "p").exists()


def test_profile_on_two_ranks_reports_every_rank(tmp_path):
    out = tmp_path / "profile"
    cmd = [sys.executable, "-m", "zoscale", "profile", "--nproc", "2", "--optimizers", "mezo,adamw", "--steps", "2",
           "--out", str(out), "backend=fsdp", "data.num_dev=0", "data.num_test=0", "data.num_train=64"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                                 "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    for result in report["results"]:
        assert not result.get("failed"), result
        assert [r["rank"] for r in result["ranks"]] == [0, 1]
        assert result["peaks"]["memory/host_rss_peak_gib"] == max(r["peaks"]["memory/host_rss_peak_gib"]
                                                                  for r in result["ranks"])
    assert "| mezo, rank 1 |" in (out / "report.md").read_text()
