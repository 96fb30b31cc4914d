import json
from pathlib import Path

from distributed import launch

TINY = Path(__file__).resolve().parents[1] / "configs" / "models" / "opt-tiny.json"
DEEPSPEED = TINY.parents[1] / "deepspeed"
ARGS = ["bench", "step", "--model", str(TINY), "--batch", "2", "--seq", "16", "--dtype", "float32", "--repeats", "2"]


def check(report: dict, reference: bool) -> None:
    for key in ("forward_ms", "zo_step_ms", "perturbation_pass_ms", "rademacher_pass_ms", "in_place_pass_ms"):
        assert report[key] > 0, key
    assert report["zo_step_over_two_forwards"] == report["zo_step_ms"] / (2 * report["forward_ms"])
    assert report["parameters"] > 100_000  # opt-tiny: 2 layers of width 64 and a 512-token vocabulary
    assert ("reference_mezo_step_ms" in report) == reference


def test_step_benchmark_on_cpu_writes_json_and_markdown(tmp_path, cli):
    done = cli(*ARGS, "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    check(json.loads((tmp_path / "step-opt-tiny-local-mezo.json").read_text()), reference=True)
    markdown = (tmp_path / "step-opt-tiny-local-mezo.md").read_text()
    assert "reference MeZO step" in markdown and "Rademacher perturbation pass" in markdown
    deferred = cli(*ARGS, "--defer-update", "--out", tmp_path)
    assert deferred.returncode == 0, deferred.stderr
    report = json.loads((tmp_path / "step-opt-tiny-local-mezo-deferred.json").read_text())
    check(report, reference=True)
    assert report["defer_update"]
    assert "(deferred update)" in (tmp_path / "step-opt-tiny-local-mezo-deferred.md").read_text()


def test_bytes_per_parameter_per_step_follow_the_passes(tmp_path, cli):
    """fp32 weights: MeZO reads and writes them 3 times a step (2 when deferred); ConMeZO's 3 passes
    also read its bf16 momentum, and the last writes it: 24, 16 and 2 x (8 + 2) + (8 + 4) = 32 bytes."""
    expected = {("mezo", ()): 24.0, ("mezo", ("--defer-update",)): 16.0, ("conmezo", ("--stream", "v2")): 32.0}
    for (optimizer, extra), bytes_per_parameter in expected.items():
        done = cli(*ARGS, "--optimizer", optimizer, *extra, "--out", tmp_path)
        assert done.returncode == 0, done.stderr
    for name, (key, bytes_per_parameter) in zip(("mezo", "mezo-deferred", "conmezo-v2"), expected.items()):
        report = json.loads((tmp_path / f"step-opt-tiny-local-{name}.json").read_text())
        assert report["bytes_per_parameter_per_step"] == bytes_per_parameter, name
    assert "stream v2" in (tmp_path / "step-opt-tiny-local-conmezo-v2.md").read_text()


def test_step_benchmark_under_fsdp_on_2_ranks(tmp_path):
    done = launch(2, "-m", "zoscale", *ARGS, "--backend", "fsdp", "--out", str(tmp_path), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    report = json.loads((tmp_path / "step-opt-tiny-fsdp-mezo.json").read_text())
    assert report["world_size"] == 2
    check(report, reference=False)


def test_a_model_directory_works_and_bad_input_fails_before_any_work(tmp_path, cli):
    from transformers import AutoConfig

    fields = json.loads(TINY.read_text())
    AutoConfig.for_model(fields.pop("model_type"), **fields).save_pretrained(tmp_path / "opt-dir")  # config only
    args = [a if a != str(TINY) else str(tmp_path / "opt-dir") for a in ARGS]
    done = cli(*args, "--out", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "r" / "step-opt-dir-local-mezo.json").read_text())["parameters"] > 100_000
    again = cli(*args, "--out", str(tmp_path / "r"))
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    missing = cli(*[a if a != str(TINY) else str(tmp_path / "none.json") for a in ARGS], "--out", tmp_path / "m")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1 and "--model" in missing.stderr
    local_offload = cli(*ARGS, "--out", tmp_path / "o", "--deepspeed-config", DEEPSPEED / "zero3_offload.json")
    assert local_offload.returncode == 2 and "only with --backend deepspeed" in local_offload.stderr
    assert not (tmp_path / "o").exists()
    nvme = cli(*ARGS, "--out", tmp_path / "n", "--backend", "deepspeed", "--deepspeed-config",
               DEEPSPEED / "zero3_offload_nvme.json")
    assert nvme.returncode == 2 and "not on NVMe" in nvme.stderr and not (tmp_path / "n").exists()
    conmezo = cli(*ARGS, "--out", tmp_path / "c", "--optimizer", "conmezo", "--defer-update")
    assert conmezo.returncode == 2 and "conmezo has no defer_update option" in conmezo.stderr
    assert not (tmp_path / "c").exists()
