"""`zoscale train | export | replay` end to end on tiny models and shipped data."""

import json
from pathlib import Path

import pytest
import torch
from runs import lines, summary, zoscale

from zoscale.quickstart import QUICKSTART
from zoscale.train import checkpoint

# A fast variant of the quickstart: fewer steps and evaluation examples.
FAST = ["steps=40", "eval_every=20", "save_every=20", "data.num_dev=40", "data.num_test=60", "log_every=5"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "mezo"
    done = zoscale("train", "--out", run, *FAST)
    assert done.returncode == 0, done.stdout + done.stderr
    return run


def test_a_run_writes_its_directory(finished_run):
    assert {"config.yaml", "metrics.jsonl", "seeds.jsonl", "summary.json", "checkpoints", "best"} <= \
        {p.name for p in finished_run.iterdir()}
    s = summary(finished_run)
    assert s["steps"] == 40 and "accuracy" in s["eval_before"] and "accuracy" in s["eval_after"]
    assert s["param_sq_sum"] > 0 and s["nonfinite_steps"] == 0
    train = [m for m in lines(finished_run / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in train] == list(range(40))
    assert {"loss", "projected_grad", "lr", "step_time", "tokens_per_s"} <= set(train[0])
    header, *entries = lines(finished_run / "seeds.jsonl")
    assert header == {"header": {"stream": "v1", "distribution": "gaussian"}}
    assert [e["step"] for e in entries] == list(range(40))
    assert checkpoint.latest(finished_run / "checkpoints").name == "step-00000040"


def test_resumed_run_equals_the_uninterrupted_one(finished_run, tmp_path):
    run = tmp_path / "interrupted"
    first = zoscale("train", "--out", run, *[o if not o.startswith("steps=") else "steps=20" for o in FAST])
    assert first.returncode == 0, first.stderr
    second = zoscale("train", "--resume", run, "--steps", 40)
    assert second.returncode == 0, second.stderr
    a, b = summary(finished_run), summary(run)
    assert (a["param_sum"], a["param_sq_sum"]) == (b["param_sum"], b["param_sq_sum"])
    assert a["eval_after"] == b["eval_after"]
    assert lines(run / "seeds.jsonl") == lines(finished_run / "seeds.jsonl")


def test_export_loads_in_plain_transformers(finished_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    done = zoscale("export", finished_run, "--out", out)
    assert done.returncode == 0, done.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    saved = checkpoint.whole_params(checkpoint.latest(finished_run / "checkpoints"))
    for name, p in model.named_parameters():
        assert torch.equal(p.detach().flatten(), saved[name]), name
    again = zoscale("export", finished_run, "--out", out)
    assert again.returncode == 2 and "not empty" in again.stderr  # never overwritten


def test_weights_drawn_on_the_device_are_not_rebuilt_on_the_cpu(tmp_path):
    run = tmp_path / "run"
    done = zoscale("train", "--out", run, "steps=2", "eval_every=0", "data.num_dev=4", "data.num_test=8",
                   "model.init_device=device")
    assert done.returncode == 0, done.stderr
    for command in ("export", "replay"):
        refused = zoscale(command, run, "--out", tmp_path / command)
        assert refused.returncode == 2 and "model.init_device" in refused.stderr
        assert not (tmp_path / command).exists()


def test_replay_rebuilds_the_parameters_from_the_seed_log(finished_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "replayed"
    done = zoscale("replay", finished_run, "--out", out)
    assert done.returncode == 0, done.stderr
    assert "replayed 40 steps" in done.stdout
    saved = checkpoint.whole_params(checkpoint.latest(finished_run / "checkpoints"))
    replayed = AutoModelForCausalLM.from_pretrained(out)
    # training folds restore and update into one pass, replay applies each update alone: the same sums in
    # another order, a few fp32 ulps apart after 40 steps (1.07e-6 seen with torch 2.13)
    for name, p in replayed.named_parameters():
        torch.testing.assert_close(p.detach().flatten(), saved[name], rtol=0, atol=3e-6)
    size = (finished_run / "seeds.jsonl").stat().st_size
    assert size < 20_000  # the whole finetune, in kilobytes


def test_replay_reads_the_run_as_it_was(finished_run, tmp_path):
    """A torn last line of the seed log (a kill mid-append) is dropped, as --resume drops it; a
    config.yaml edited to another distribution is refused (the header says what the run used)."""
    import shutil

    import yaml

    torn = tmp_path / "torn"
    shutil.copytree(finished_run, torn)
    with open(torn / "seeds.jsonl", "a") as f:
        f.write('{"step": 40, "projected_grads": [0.1')
    done = zoscale("replay", torn, "--out", tmp_path / "replayed")
    assert done.returncode == 0 and "dropped a torn last line" in done.stdout and "replayed 40 steps" in done.stdout
    edited = tmp_path / "edited"
    shutil.copytree(finished_run, edited)
    config = yaml.safe_load((edited / "config.yaml").read_text())
    config["optim"]["distribution"] = "rademacher"
    (edited / "config.yaml").write_text(yaml.safe_dump(config))
    refused = zoscale("replay", edited, "--out", tmp_path / "refused")
    assert refused.returncode == 2 and "written with distribution gaussian, but config.yaml says rademacher" \
        in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("override,message", [
    ("optim.eps=0", "optim.eps: must be > 0"),
    ("optim.name=adam", "optim.name: unknown optimizer 'adam'"),
    ("optim.momentum=0.9", "unknown option(s) ['momentum']"),
    ("stepz=3", "stepz: unknown key"),
    ("steps=many", "steps: expected int"),
    ("data.task=imdb", "data.task: unknown task 'imdb'"),
    ("data.path=/nonexistent", "data.path: no such directory"),
    ("model.dtype=fp8", "model.dtype: must be one of"),
    ("backend=tpu", "backend: must be one of"),
    ("deepspeed_config=/nonexistent.json", "deepspeed_config: no such file"),
    ("collective_timeout_s=0", "collective_timeout_s: must be > 0"),
])
def test_bad_input_is_one_line_and_exit_2(override, message, tmp_path):
    done = zoscale("train", "--out", tmp_path / "run", override)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing was built or written


def test_missing_config_file_and_existing_run_directory(finished_run, tmp_path):
    done = zoscale("train", "--config", tmp_path / "missing.yaml")
    assert done.returncode == 2 and "no such file" in done.stderr
    before = (finished_run / "summary.json").read_text()
    done = zoscale("train", "--out", finished_run, *FAST)
    assert done.returncode == 2 and "not empty" in done.stderr
    assert (finished_run / "summary.json").read_text() == before


def test_quickstart_config_is_the_default_and_lives_in_configs():
    repo = Path(__file__).resolve().parents[1]
    assert (repo / "configs" / "quickstart.yaml").resolve() == QUICKSTART.resolve()


@pytest.mark.parametrize("optimizer", ["conmezo", "mezo_svrg", "pseuzo"])
def test_every_optimizer_trains_through_the_pipeline(optimizer, tmp_path):
    extra = {"mezo_svrg": ["optim.anchor_lr=1e-3", "optim.q=4", "data.num_train=64"]}.get(optimizer, [])
    done = zoscale("train", "--out", tmp_path / "run", "steps=8", "eval_every=0", "save_every=0",
                   "data.num_dev=8", "data.num_test=16", f"optim.name={optimizer}", *extra)
    assert done.returncode == 0, done.stdout + done.stderr
    s = summary(tmp_path / "run")
    assert s["optimizer"] == optimizer and s["steps"] == 8 and s["nonfinite_steps"] == 0


def test_every_shipped_config_validates():
    from zoscale.config import load

    repo = Path(__file__).resolve().parents[1]
    configs = sorted((repo / "configs").rglob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        if "accelerate" not in path.parts and "tasks" not in path.parts:  # accelerate's own; task files
            load(path)


def test_lora_trains_only_adapters_and_exports_merged(tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    run = tmp_path / "lora"
    done = zoscale("train", "--out", run, "steps=6", "eval_every=0", "save_every=0", "data.num_dev=4",
                   "data.num_test=8", "model.lora={r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}")
    assert done.returncode == 0, done.stderr
    saved = checkpoint.whole_params(checkpoint.latest(run / "checkpoints"))
    assert saved and all(".lora_" in name for name in saved)
    assert zoscale("export", run, "--out", tmp_path / "hf").returncode == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_training_starts_from_a_local_pretrained_directory(finished_run, tmp_path):
    """The from_pretrained path, on local files: continue from an exported model."""
    exported = tmp_path / "hf"
    assert zoscale("export", finished_run, "--out", exported).returncode == 0
    run = tmp_path / "continued"
    done = zoscale("train", "--out", run, "steps=4", "eval_every=0", "save_every=0", "data.num_dev=4",
                   "data.num_test=60", "model.config=null", f"model.name_or_path={exported}",
                   f"model.tokenizer={exported}")
    assert done.returncode == 0, done.stderr
    # it starts where the finished run ended: the same test accuracy before training
    assert summary(run)["eval_before"] == summary(finished_run)["eval_final"]


def test_eval_gives_the_runs_own_scores(finished_run, cli, tmp_path):
    """`zoscale eval` is the evaluation training runs: zero-shot is the run's eval_before, a run's
    latest checkpoint its eval_final, its best checkpoint its eval_after."""
    s = summary(finished_run)
    zero = cli("eval", *FAST, "--out", tmp_path / "zero.json")
    assert zero.returncode == 0, zero.stderr
    assert json.loads((tmp_path / "zero.json").read_text())["accuracy"] == s["eval_before"]["accuracy"]
    for which, key in (("latest", "eval_final"), ("best", "eval_after")):
        done = cli("eval", "--run", finished_run, "--checkpoint", which, "--out", tmp_path / f"{which}.json")
        assert done.returncode == 0, done.stderr
        assert json.loads((tmp_path / f"{which}.json").read_text())["accuracy"] == s[key]["accuracy"]
    again = cli("eval", "--run", finished_run, "--out", tmp_path / "best.json")
    assert again.returncode == 2 and "exists" in again.stderr  # nothing is overwritten


def test_eval_shows_solved_examples_before_each_one(cli, tmp_path):
    from zoscale.train.tasks import Example, with_demonstrations

    demos = [Example("good film It was", [" terrible", " great"], 1), Example("dull It was", [" terrible", " great"], 0)]
    shown = with_demonstrations(Example("fine It was", [" terrible", " great"], 1), demos)
    assert shown.prompt == "good film It was great\n\ndull It was terrible\n\nfine It was"
    assert shown.candidates == [" terrible", " great"] and shown.label == 1
    done = cli("eval", "--shots", 4, "data.num_test=20", "--out", tmp_path / "four.json")
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "four.json").read_text())
    assert result["shots"] == 4 and result["examples"] == 20 and "4-shot" in done.stdout
    assert result["prompts_cut"] == 0 and "warning" not in done.stdout
    cut = cli("eval", "--shots", 4, "data.num_test=20", "data.max_length=24")  # no room for 4 reviews
    assert cut.returncode == 0 and "warning: 20 of 20 prompts were longer than data.max_length 24" in cut.stdout
    # 8 reviews exceed the quickstart model's 64 positions: cut to them, with the warning, never an IndexError
    long = cli("eval", "--shots", 8, "data.num_test=20")
    assert long.returncode == 0 and "longer than the model's 64 positions" in long.stdout, long.stderr[-2000:]


@pytest.mark.parametrize("args,message", [
    (["--shots", "5", "data.num_train=4"], "--shots 5: the training sample holds 4"),
    (["--shots", "-1"], "--shots: must be >= 0"),
    (["--run", "/nonexistent"], "not a run directory"),
    (["--split", "dev", "data.num_dev=0"], "--split dev: the sample is empty"),
])
def test_eval_refuses_bad_input_in_one_line(args, message, cli):
    done = cli("eval", *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_outputs_are_checked_before_the_work_and_appear_whole(cli, finished_run, tmp_path, monkeypatch):
    """An --out that cannot be written is one line before anything is built; an export that fails
    midway (a full disk) leaves no directory, and the same command then succeeds."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for command in (["export", finished_run], ["replay", finished_run], ["eval"]):
        done = cli(*command, "--out", blocker / "out")
        assert done.returncode == 2 and "--out" in done.stderr and "cannot create" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    from transformers import PreTrainedTokenizerBase

    real = PreTrainedTokenizerBase.save_pretrained

    def full_disk(self, directory, *args, **kwargs):
        (Path(directory) / "tokenizer.json").write_text("")  # what a full disk leaves
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
    out = tmp_path / "exported"
    full = cli("export", finished_run, "--out", out)
    assert full.returncode == 1 and full.stderr.strip().endswith("zoscale: error: [Errno 28] No space left on device")
    assert "Traceback" not in full.stderr
    assert not out.exists() and not list(tmp_path.glob(".exported*"))
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", real)
    again = cli("export", finished_run, "--out", out)
    assert again.returncode == 0 and (out / "tokenizer.json").stat().st_size > 0, again.stderr


def test_eval_and_export_say_which_checkpoint_they_took_and_why(cli, finished_run, tmp_path):
    """A damaged newest checkpoint is skipped with a line saying why, and the output names the older one."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    newest, older = sorted((run / "checkpoints").glob("step-*"), reverse=True)[:2]
    shard = next(newest.glob("shards-rank0*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)  # same size, other bytes: the checksum differs
    done = cli("eval", "--run", run, "--out", tmp_path / "eval.json")
    assert done.returncode == 0, done.stderr
    assert f"eval: skipped {newest.name}: " in done.stdout and f"using {older.name}" in done.stdout
    assert json.loads((tmp_path / "eval.json").read_text())["checkpoint"] == older.name
    exported = cli("export", run, "--out", tmp_path / "hf")
    assert exported.returncode == 0 and f"export: skipped {newest.name}" in exported.stdout
    assert f"exporting {older.name}" in exported.stdout
