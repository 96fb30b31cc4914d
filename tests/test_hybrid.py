"""Hybrid sharding: FSDP2 shard groups with replicas across them, on 4 gloo ranks as 2 "nodes" x 2,
as 4 replicas (shard groups of 1) and as one flat group of 4, and ZeRO-3 in groups of 2 and 1,
give the single-process trajectory for all four optimizers; replicas exchange no parameter (the
communication ledger); a hybrid checkpoint resumes flat and a flat one hybrid. `dual_forward`
(both sides of a step in one forward) equals the two-forward step and gathers each layer once a
step; replica groups as a population take n-SPSA steps; small parameters kept whole give the
same trajectory with fewer gathers."""

import json
import sys
from pathlib import Path

import pytest
from distributed import launch, run_group

SCRIPT = str(Path(__file__).resolve().parent / "scripts" / "train_runs.py")
OPTIMIZERS = ("mezo", "conmezo", "mezo_svrg", "pseuzo")
COMMON = ["steps=4", "eval_every=0", "save_every=0", "eval_before=false", "data.num_train=64", "data.num_dev=16",
          "data.num_test=16", "batch_size=8", "eval_batch_size=8"]
# a float32 momentum: bf16 would round the ranks' loss-sum orders into the trajectory
EXTRA = {"conmezo": ["optim.buffer_dtype=float32"]}
LAYOUTS = {"hybrid": 2, "replicas": 1, "flat": 4}  # ranks per shard group, of 4
SMALL = "replicate_small_params=100"  # the quickstart's norms and biases (32 or 64 elements), not its matrices


def run(name: str, optimizer: str, *extra: str) -> list:
    return [name, [*COMMON, f"optim.name={optimizer}", *EXTRA.get(optimizer, []), *extra], False]


def summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


def same_trajectory(got: Path, expected: Path) -> None:
    # the batch is split over ranks: only the order of the fp32 loss sums differs
    assert summary(got)["param_sq_sum"] == pytest.approx(summary(expected)["param_sq_sum"], rel=1e-6), got.name
    assert summary(got)["param_sum"] == pytest.approx(summary(expected)["param_sum"], rel=1e-6, abs=1e-6), got.name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    local = [run(f"local-{o}", o) for o in OPTIMIZERS] + [run("local-conmezo-8", "conmezo", "steps=8"),
                                                            run("local-dual", "mezo", "dual_forward=true"),
                                                            run("local-n2", "mezo", "optim.n_directions=2"),
                                                            run("local-n4", "mezo", "optim.n_directions=4")]
    done = run_group([sys.executable, SCRIPT, str(out), json.dumps(local)], timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    sharded = [run(f"{layout}-{o}", o, "backend=fsdp", f"fsdp_shard_size={size}")
               for layout, size in LAYOUTS.items() for o in OPTIMIZERS]
    sharded += [run("hybrid-to-flat", "conmezo", "backend=fsdp", "fsdp_shard_size=2"),
                run("flat-to-hybrid", "conmezo", "backend=fsdp"),
                ["hybrid-to-flat", {"steps": 8, "fsdp_shard_size": None}, True],
                ["flat-to-hybrid", {"steps": 8, "fsdp_shard_size": 2}, True],
                run("hybrid-dual", "mezo", "backend=fsdp", "fsdp_shard_size=2", "dual_forward=true"),
                run("flat-dual", "mezo", "backend=fsdp", "dual_forward=true"),
                run("hybrid-population", "mezo", "backend=fsdp", "fsdp_shard_size=2", "optim.n_directions=2",
                    "optim.population=true"),
                run("replicas-population", "mezo", "backend=fsdp", "fsdp_shard_size=1", "optim.n_directions=4",
                    "optim.population=true")]
    sharded += [run(f"zero3-{o}", o, "backend=deepspeed", "zero3_shard_size=2") for o in OPTIMIZERS]
    sharded += [run("zero3-replicas", "mezo", "backend=deepspeed", "zero3_shard_size=1"),
                run("zero3-dual", "mezo", "backend=deepspeed", "zero3_shard_size=2", "dual_forward=true"),
                run("zero3-to-flat", "conmezo", "backend=deepspeed", "zero3_shard_size=2"),
                ["zero3-to-flat", {"steps": 8, "backend": "fsdp", "zero3_shard_size": None}, True],
                run("zero3-small", "conmezo", "backend=deepspeed", "zero3_shard_size=2", SMALL),
                run("hybrid-small", "conmezo", "backend=fsdp", "fsdp_shard_size=2", SMALL),
                ["hybrid-small", {"steps": 8, "fsdp_shard_size": None, "replicate_small_params": 0}, True]]
    done = launch(4, SCRIPT, str(out), json.dumps(sharded), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_follows_the_single_process_trajectory(layout, runs):
    for optimizer in OPTIMIZERS:
        same_trajectory(runs / f"{layout}-{optimizer}", runs / f"local-{optimizer}")


def test_zero3_in_shard_groups_follows_the_single_process_trajectory(runs):
    """ZeRO-3 partitions within groups of 2 (DeepSpeed's data-parallel group set to the shard
    group), replicas across them: the same trajectory, all-gathers within the group only."""
    for optimizer in OPTIMIZERS:
        same_trajectory(runs / f"zero3-{optimizer}", runs / f"local-{optimizer}")
        step = json.loads((runs / f"zero3-{optimizer}" / "comm.json").read_text())["1"]
        assert "replica" not in step and "all_gather" not in step["world"], step
        assert step["shard"]["all_gather"]["calls"] > 0
    same_trajectory(runs / "zero3-replicas", runs / "local-mezo")
    same_trajectory(runs / "zero3-dual", runs / "local-dual")
    dual, two = (json.loads((runs / name / "comm.json").read_text())["1"]["shard"]["all_gather"]
                 for name in ("zero3-dual", "zero3-mezo"))
    assert 2 * dual["calls"] == two["calls"] and 2 * dual["bytes"] == two["bytes"]


def test_a_hybrid_checkpoint_resumes_flat_and_a_flat_one_hybrid(runs):
    for name in ("hybrid-to-flat", "flat-to-hybrid", "zero3-to-flat"):
        assert summary(runs / name)["steps"] == 8
        same_trajectory(runs / name, runs / "local-conmezo-8")


def test_the_ledger_shows_only_scalars_between_replicas(runs):
    """RUN/comm.json: per step, the collectives on each group as issued (FSDP2's own included)."""
    for layout, size in LAYOUTS.items():
        for optimizer in OPTIMIZERS:
            step = json.loads((runs / f"{layout}-{optimizer}" / "comm.json").read_text())["1"]
            assert "replica" not in step, (layout, optimizer, step)  # no parameter crosses replicas
            assert step["world"]["all_reduce"]["bytes"] <= 1024  # the losses and the stop flag
            if size == 1:  # whole replicas: nothing is gathered at all
                assert not any("all_gather" in kinds for kinds in step.values()), step
                continue
            gathers = step["world" if size == 4 else "shard"]["all_gather"]
            assert gathers["calls"] > 0 and gathers["bytes"] > 0
    hybrid, flat = (json.loads((runs / f"{name}-mezo" / "comm.json").read_text())["1"] for name in ("hybrid", "flat"))
    # a shard group of 2 gathers the same layers as one of 4 (padded to the group's size)
    assert hybrid["shard"]["all_gather"]["calls"] == flat["world"]["all_gather"]["calls"]
    assert hybrid["shard"]["all_gather"]["bytes"] == pytest.approx(flat["world"]["all_gather"]["bytes"], rel=0.05)


def test_small_parameters_kept_whole_keep_the_trajectory_with_fewer_gathers(runs):
    """Norms and biases kept whole on every rank (ZeRO-3's persistence threshold, FSDP2's ignored
    parameters): the same trajectory, a checkpoint (each element once) that resumes under flat
    FSDP2 without them, and under ZeRO-3 the final norm's all-gather gone: a forward gathers each decoder
    layer once, the two embeddings and the head."""
    same_trajectory(runs / "zero3-small", runs / "local-conmezo")
    assert summary(runs / "hybrid-small")["steps"] == 8
    same_trajectory(runs / "hybrid-small", runs / "local-conmezo-8")
    from zoscale.train.checkpoint import PieceReader

    with PieceReader(runs / "zero3-small" / "checkpoints" / "step-00000004") as saved:
        for (kind, name), pieces in saved.pieces.items():
            assert sum(numel for _, numel, _, _ in pieces) == saved.numel(name, kind), (kind, name)
    small, plain = (json.loads((runs / name / "comm.json").read_text())["1"]["shard"]["all_gather"]
                    for name in ("zero3-small", "zero3-conmezo"))
    layers = 2
    assert small["calls"] == 2 * (layers + 3) == plain["calls"] - 2 and small["bytes"] < plain["bytes"], (small, plain)


def test_replica_groups_as_a_population_take_n_spsa_steps(runs):
    """Each replica group evaluates its own directions on the whole batch: the step of n-SPSA in
    one process, with only the losses between groups."""
    for name, local in (("hybrid-population", "local-n2"), ("replicas-population", "local-n4")):
        same_trajectory(runs / name, runs / local)
        step = json.loads((runs / name / "comm.json").read_text())["1"]
        assert "replica" not in step and step["world"]["all_reduce"]["bytes"] <= 1024, step


def losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (path / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_dual_forward_equals_the_two_forward_step(runs):
    """Its first step reads the same perturbed values (the same losses, bit for bit); the update
    then lands on theta itself, not on theta after the +eps/-2eps/+eps round trip: rounding apart."""
    dual, two = runs / "local-dual", runs / "local-mezo"
    assert losses(dual)[0] == losses(two)[0]
    assert losses(dual) == pytest.approx(losses(two), rel=1e-6)
    same_trajectory(dual, two)
    for layout in ("hybrid", "flat"):
        same_trajectory(runs / f"{layout}-dual", dual)


def test_dual_forward_gathers_each_layer_once_a_step(runs):
    for layout, group in (("hybrid", "shard"), ("flat", "world")):
        dual, two = (json.loads((runs / f"{layout}-{o}" / "comm.json").read_text()) for o in ("dual", "mezo"))
        gathers, twice = dual["1"][group]["all_gather"], two["1"][group]["all_gather"]
        assert 2 * gathers["calls"] == twice["calls"] and 2 * gathers["bytes"] == twice["bytes"], (dual, two)
        assert "replica" not in dual["1"]
        # the work it adds: every rank draws z for whole gathered parameters, both sides
        work = dual["dual_forward"]
        assert work["z_elements_per_step"] >= 2 * work["shard_elements"] * LAYOUTS[layout]


def test_the_slurm_scripts_default_shard_size_applies_only_where_none_is_named(monkeypatch):
    from zoscale.config import load
    from zoscale.quickstart import QUICKSTART

    monkeypatch.setenv("ZOSCALE_SHARD_SIZE", "auto")
    assert load(None, ["backend=fsdp"], defaults=QUICKSTART).fsdp_shard_size == "auto"
    assert load(None, ["backend=fsdp", "fsdp_shard_size=4"], defaults=QUICKSTART).fsdp_shard_size == 4
    assert load(None, ["backend=deepspeed"], defaults=QUICKSTART).zero3_shard_size == "auto"
    assert load(None, ["backend=ddp"], defaults=QUICKSTART).fsdp_shard_size is None


@pytest.mark.parametrize("overrides,message", [
    (["backend=fsdp", "fsdp_shard_size=2"], "fsdp_shard_size: 2 ranks per shard group do not divide the 1 ranks"),
    (["backend=fsdp", "fsdp_shard_size=0"], "fsdp_shard_size: must be a positive integer or auto, got 0"),
    (["backend=deepspeed", "fsdp_shard_size=2"], "fsdp_shard_size: shard groups of backend fsdp; backend deepspeed "
                                                 "takes zero3_shard_size"),
    (["backend=deepspeed", "zero3_shard_size=2"], "zero3_shard_size: 2 ranks per shard group do not divide the 1"),
    (["optim.name=pseuzo", "dual_forward=true"], "dual_forward: pseuzo does not take its losses as (+eps, -eps) pairs"),
    (["dual_forward=true", "objective=accuracy"], "dual_forward: the objective must be the loss"),
])
def test_bad_shard_sizes_are_refused_in_one_line(overrides, message, tmp_path):
    done = run_group([sys.executable, "-m", "zoscale", "train", "--out", str(tmp_path / "run"), *COMMON, *overrides])
    last = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 2 and last.startswith(f"zoscale: error: {message}"), done.stdout[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides,message", [
    (["replicate_small_params=100"], "replicate_small_params: backend local holds every parameter whole already"),
    (["backend=deepspeed", "replicate_small_params=100", "deepspeed_config=configs/deepspeed/zero3.json"],
     "replicate_small_params: the DeepSpeed JSON sets it"),
    (["backend=fsdp", "replicate_small_params=100", "fsdp_compute_dtype=bfloat16"],
     "replicate_small_params: not with fsdp_compute_dtype"),
])
def test_small_parameters_kept_whole_where_they_cannot_be_are_refused(overrides, message):
    from zoscale.config import load
    from zoscale.errors import ConfigError
    from zoscale.quickstart import QUICKSTART

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load(None, overrides, defaults=QUICKSTART)
