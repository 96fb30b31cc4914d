"""`zoscale compare`: equal budgets of forward passes, shared batch order and seeds, a report, and an
interrupted comparison that continues."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from distributed import REPO
from runs import lines, zoscale

TINY = ["data.num_train=32", "data.num_dev=8", "data.num_test=16", "batch_size=8", "eval_batch_size=16",
        "log_every=1"]


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "four"
    done = zoscale("compare", "--optimizers", "mezo,conmezo,mezo_svrg,pseuzo", "--seeds", 1, "--steps", 12,
                   "--evals", 2, "--out", out, *TINY, "mezo_svrg:optim.q=3")
    assert done.returncode == 0, done.stdout + done.stderr
    (out.parent / "stdout.txt").write_text(done.stdout)
    return out, json.loads((out / "report.json").read_text())


def test_every_optimizer_spends_the_budget_it_declares(four):
    out, report = four
    # MeZO, ConMeZO and PseuZO: 2 passes a step; SVRG's anchor (every 3rd step) reads the full
    # sample (32 examples = 4 batches) twice: 8 + 4 + 4 = 16 passes per 3 steps, so 4 steps fit 24
    assert report["plan"]["steps"] == {"mezo": 12, "conmezo": 12, "mezo_svrg": 4, "pseuzo": 12}
    for name, steps in report["plan"]["steps"].items():
        counted = [m["forward_passes"] for m in lines(out / "runs" / f"{name}-seed0" / "metrics.jsonl") if "loss" in m]
        assert len(counted) == steps
        assert counted[-1] == report["rows"][name]["forward_passes"] <= 24
    svrg = [m["forward_passes"] for m in lines(out / "runs" / "mezo_svrg-seed0" / "metrics.jsonl") if "loss" in m]
    assert svrg == [8, 12, 16, 24]


def test_optimizers_share_the_batch_order_and_seeds(four):
    out, _ = four
    first = {name: lines(out / "runs" / f"{name}-seed0" / "metrics.jsonl")[0]["loss"] for name in ("mezo", "conmezo")}
    # ConMeZO's first direction (zero momentum) is MeZO's: the same batch and seed give the same loss
    assert first["mezo"] == first["conmezo"]


def test_the_report_has_the_table_curves_and_zero_shot_row(four):
    out, report = four
    assert {"plan.json", "report.json", "report.md", "curves.png", "runs"} <= {p.name for p in out.iterdir()}
    table = (out / "report.md").read_text()
    assert "| zero-shot | 0 | 0 |" in table and all(f"| {n} |" in table for n in report["rows"])
    assert "±" not in table  # one seed: no spread to show
    # each run's evaluations are shown while it trains
    assert "mezo-seed0: step 6, dev accuracy" in (out.parent / "stdout.txt").read_text()
    summary = json.loads((out / "runs" / "mezo-seed0" / "summary.json").read_text())
    assert report["zero_shot"] == summary["eval_before"]["accuracy"]
    assert report["target"] == summary["eval_final"]["accuracy"] == report["rows"]["mezo"]["final"][0]
    # label words: the balanced accuracy and the majority label's share beside accuracy
    assert report["rows"]["mezo"]["final_balanced"][0] == summary["eval_final"]["balanced_accuracy"]
    assert report["majority"] == summary["eval_final"]["majority"] >= 0.5 and "most common label" in table
    # a test evaluation every 6 steps, then the final one
    assert [p["step"] for p in report["runs"]["mezo"][0]["test"]] == [6, 12]
    # the finer clock: MeZO's training loss, averaged over full windows of a tenth of its steps (1)
    assert report["loss_target"] == pytest.approx(report["runs"]["mezo"][0]["loss"][-1])
    mezo = report["rows"]["mezo"]
    first = next(p for p, v in zip(report["runs"]["mezo"][0]["loss_passes"], report["runs"]["mezo"][0]["loss"])
                 if v <= report["loss_target"])
    assert mezo["passes_to_loss_target"] == first and mezo["loss_speedup"] == 1.0
    assert all(r["peak_memory_gib"] > 0 and r["step_time_median"] > 0 for r in report["rows"].values())


def test_rows_that_end_below_zero_shot_are_named_under_the_table(four):
    from zoscale.cli.compare import markdown

    _, report = four
    assert "Below zero-shot" not in markdown({**report, "zero_shot": 0.0})
    note = markdown({**report, "zero_shot": 1.0}).splitlines()[-1]
    assert note.startswith("Below zero-shot at the end: mezo (") and all(f"{n} (" in note for n in report["rows"])
    assert note.endswith("the reference, mezo, is one of them, so its targets say little.")


def test_a_comparison_begun_by_an_older_zoscale_continues(four, tmp_path):
    """Its plan.json lacks the config keys added since: not an edit of the config."""
    import shutil

    out = tmp_path / "four"
    shutil.copytree(four[0], out, ignore=shutil.ignore_patterns("curves.png"))
    plan = json.loads((out / "plan.json").read_text())
    for resolved in plan["resolved"].values():
        del resolved["replicate_small_params"]
    (out / "plan.json").write_text(json.dumps(plan))
    done = zoscale("compare", "--optimizers", "mezo,conmezo,mezo_svrg,pseuzo", "--seeds", 1, "--steps", 12,
                   "--evals", 2, "--out", out, *TINY, "mezo_svrg:optim.q=3")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (out / "curves.png").is_file() and "replicate_small_params" in (out / "plan.json").read_text()


def test_runs_side_by_side_give_the_same_results(four, tmp_path):
    sequential, _ = four
    out = tmp_path / "two"
    done = zoscale("compare", "--optimizers", "mezo,pseuzo", "--seeds", 1, "--steps", 12, "--evals", 2, "--jobs", 2,
                   "--out", out, *TINY)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("mezo", "pseuzo"):
        losses = [[m["loss"] for m in lines(d / "runs" / f"{name}-seed0" / "metrics.jsonl") if "loss" in m]
                  for d in (sequential, out)]
        assert losses[0] == losses[1] and len(losses[0]) == 12
    # the two runs overlapped in time
    started = (out / "runs" / "pseuzo-seed0" / "config.yaml").stat().st_mtime
    assert started < (out / "runs" / "mezo-seed0" / "summary.json").stat().st_mtime


def test_an_interrupted_comparison_continues_and_other_arguments_are_refused(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--optimizers", "mezo,conmezo", "--seeds", 1, "--steps", 300, "--evals", 2, "--out", out, *TINY]
    proc = subprocess.Popen([sys.executable, "-m", "zoscale", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = out / "runs" / "conmezo-seed0" / "metrics.jsonl"
    deadline = time.time() + 400  # a loaded machine starts processes slowly
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > 100):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    second = zoscale(*args)  # one writer at a time
    assert second.returncode == 2 and "is in use by another zoscale run" in second.stderr, second.stderr
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the comparison and its run both get it
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75 and "Traceback" not in output, output  # the run checkpointed and stopped
    assert "SIGINT received" in (out / "runs" / "conmezo-seed0.log").read_text()
    first = out / "runs" / "mezo-seed0" / "summary.json"
    kept = first.stat().st_mtime_ns
    assert not (out / "runs" / "conmezo-seed0" / "summary.json").exists()

    again = zoscale(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert first.stat().st_mtime_ns == kept  # finished runs are not run again
    log = (out / "runs" / "conmezo-seed0.log").read_text()
    assert "resumed" in log
    steps = [m["step"] for m in lines(metrics) if "loss" in m]
    assert steps == list(range(300))
    report = json.loads((out / "report.json").read_text())
    assert report["rows"]["conmezo"]["forward_passes"] == 600

    other = zoscale(*[a if a != 300 else 250 for a in args])
    assert other.returncode == 2 and "other arguments" in other.stderr


def test_a_run_ends_when_its_comparison_is_killed(tmp_path):
    """kill -9 of zoscale compare: its run notices it was orphaned and exits, training nothing on."""
    out = tmp_path / "cmp"
    proc = subprocess.Popen([sys.executable, "-m", "zoscale", "compare", "--optimizers", "mezo", "--seeds", "1",
                             "--steps", "100000", "--evals", "2", "--out", str(out), *TINY], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = out / "runs" / "mezo-seed0" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") > 5):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    deadline = time.time() + 30
    while subprocess.run(["pgrep", "-f", str(out)], capture_output=True).returncode == 0:
        assert time.time() < deadline, "the run trains on without its comparison"
        time.sleep(0.5)
    assert "its parent (zoscale compare)" in (out / "runs" / "mezo-seed0.log").read_text()


def test_bad_arguments_are_refused_before_anything_runs(tmp_path):
    for args, message in ((["--optimizers", "mezo,adam"], "unknown optimizer 'adam'"),
                          (["--optimizers", "mezo", "sgd:optim.lr=1"], "'sgd' is not one of"),
                          (["--optimizers", "mezo_svrg", "data.num_train=400"], "first step alone costs more")):
        done = zoscale("compare", "--steps", 10, "--out", tmp_path / "x", *args, *TINY[1:])
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert not (tmp_path / "x").exists()


def test_each_optimizer_fits_the_budget_from_its_own_data():
    """A per-optimizer data override changes what MeZO-SVRG's full passes cost: its steps follow."""
    from zoscale.cli.compare import make_plan
    from zoscale.optim import REGISTRY, optimizer_config

    budget = 200
    for num_train, override in ((32, []), (400, ["mezo_svrg:data.num_train=400"])):
        plan = make_plan(None, ["mezo", "mezo_svrg"], 1, budget // 2, 2, [*TINY, *override])
        options = optimizer_config("mezo_svrg", {k: v for k, v in plan.resolved["mezo_svrg"]["optim"].items()
                                                 if k != "name"})
        batches = num_train / 8
        spent = sum(REGISTRY["mezo_svrg"].forward_passes(options, s, batches) for s in range(plan.steps["mezo_svrg"]))
        following = REGISTRY["mezo_svrg"].forward_passes(options, plan.steps["mezo_svrg"], batches)
        assert spent <= budget < spent + following, (num_train, plan.steps)


def test_a_config_edited_between_invocations_is_refused(tmp_path):
    from dataclasses import asdict

    from zoscale.cli.compare import make_plan

    config = tmp_path / "run.yaml"
    quickstart = REPO / "zoscale" / "quickstart"
    config.write_text((quickstart / "quickstart.yaml").read_text().replace("tokenizer: tokenizer",
                      f"tokenizer: {quickstart / 'tokenizer'}").replace("path: sst2", f"path: {quickstart / 'sst2'}"))
    out = tmp_path / "cmp"
    out.mkdir()
    plan = make_plan(config, ["mezo"], 1, 10, 2, TINY)  # what the first invocation recorded
    (out / "plan.json").write_text(json.dumps(asdict(plan)))
    config.write_text(config.read_text().replace("lr: 1.0e-3", "lr: 1.0e-2"))
    done = zoscale("compare", "--optimizers", "mezo", "--seeds", 1, "--steps", 10, "--evals", 2, "--out", out,
                   "--config", config, *TINY)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "resolves to another config than the one" in done.stderr and "optim.lr" in done.stderr
    assert not (out / "runs").exists()


def test_a_link_planted_in_a_comparison_is_refused_before_anything_runs(tmp_path):
    out = tmp_path / "cmp"
    (out / "runs").mkdir(parents=True)
    outside = tmp_path / "outside.log"
    outside.write_text("precious\n")
    (out / "runs" / "mezo-seed0.log").symlink_to(outside)
    done = zoscale("compare", "--optimizers", "mezo", "--seeds", 1, "--steps", 4, "--out", out, *TINY)
    assert done.returncode == 2 and "runs/mezo-seed0.log is a symbolic link" in done.stderr, done.stderr
    assert outside.read_text() == "precious\n" and not (out / "plan.json").exists()


def test_a_torn_summary_or_plan_never_ends_in_a_traceback(four, tmp_path):
    """A full disk right after a run's last checkpoint leaves a 0-byte summary.json: the next
    invocation evaluates that checkpoint again and writes it; a torn plan.json is one line."""
    import shutil

    original, _ = four
    out = tmp_path / "four"
    shutil.copytree(original, out)
    summary = out / "runs" / "conmezo-seed0" / "summary.json"
    before = json.loads(summary.read_text())
    summary.write_text("")
    args = ["compare", "--optimizers", "mezo,conmezo,mezo_svrg,pseuzo", "--seeds", 1, "--steps", 12, "--evals", 2,
            "--out", out, *TINY, "mezo_svrg:optim.q=3"]
    done = zoscale(*args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "summary.json is missing or unreadable" in (out / "runs" / "conmezo-seed0.log").read_text()
    after = json.loads(summary.read_text())
    assert after["param_sq_sum"] == before["param_sq_sum"] and after["eval_final"] == before["eval_final"]
    rows, expected = (json.loads((d / "report.json").read_text())["rows"]["conmezo"] for d in (out, original))
    assert [rows[k] for k in ("final", "best_dev_test", "forward_passes")] == \
        [expected[k] for k in ("final", "best_dev_test", "forward_passes")]
    (out / "plan.json").write_text('{"config": nu')
    torn = zoscale(*args)
    assert torn.returncode == 2 and "plan.json is unreadable" in torn.stderr and "Traceback" not in torn.stderr
