"""ZOTrainer: a real transformers.Trainer loop with a ZO step, in one process and on gloo ranks."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import REPO, run_group, torchrun

sys.path.insert(0, str(REPO / "tests" / "scripts"))
import hf_trainer  # noqa: E402

SCRIPT = REPO / "tests" / "scripts" / "hf_trainer.py"


def run(out: Path, **options) -> dict:
    hf_trainer.main(out, {k: str(v) for k, v in options.items()})
    return json.loads((out / "rank0.json").read_text())


def steps(result: dict) -> list[tuple]:
    return [(r["step"], r["loss"], r["projected_grad"]) for r in result["log"] if "projected_grad" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process MeZO run the others are compared with (checkpoints at steps 3 and 6)."""
    out = tmp_path_factory.mktemp("single")
    return {**run(out, steps=6, save_steps=3, save_model=1), "dir": out}


@pytest.mark.parametrize("name, options", [("mezo", {}), ("conmezo", {}), ("pseuzo", {}),
                                           ("mezo_svrg", {"q": 2, "anchor_lr": 1e-2})])
def test_each_optimizer_reduces_the_loss(tmp_path, name, options):
    from transformers import DataCollatorForLanguageModeling, TrainingArguments

    from zoscale.integrations.transformers import ZOTrainer

    tok = hf_trainer.tokenizer()
    data = hf_trainer.dataset(tok, rows=16)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=25, per_device_train_batch_size=16,
                             per_device_eval_batch_size=16, learning_rate=1e-2, logging_steps=5, save_strategy="no",
                             report_to=[], use_cpu=True, dataloader_drop_last=True, disable_tqdm=True)
    trainer = ZOTrainer(model=hf_trainer.model(len(tok)), args=args, train_dataset=data, eval_dataset=data,
                        data_collator=DataCollatorForLanguageModeling(tok, mlm=False), zo_optimizer=name,
                        zo_options={"eps": 1e-3, **options})
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.05, (before, after)
    logged = [r for r in trainer.state.log_history if "projected_grad" in r]  # every 5 steps
    # the Trainer's default linear decay: the logged step s used lr 1e-2 (25 - (s - 1)) / 25
    assert [r["learning_rate"] for r in logged] == pytest.approx([1e-2 * (26 - r["step"]) / 25 for r in logged])


def test_mezo_follows_the_optimizer_api_step_for_step(single):
    """The same seed, batches and item-weighted loss through zoscale.build_optimizer by hand."""
    from transformers import DataCollatorForLanguageModeling

    import zoscale

    tok = hf_trainer.tokenizer()
    model = hf_trainer.model(len(tok))
    data, collate = hf_trainer.dataset(tok), DataCollatorForLanguageModeling(tok, mlm=False)
    opt = zoscale.build_optimizer("mezo", model, lr=1e-3, eps=1e-3, seed=0)
    expected = []
    for step in range(6):
        batch = collate([data[i] for i in range(8 * step, 8 * step + 8)])
        items = float(batch["labels"][:, 1:].ne(-100).sum())

        def loss():
            with torch.no_grad():
                return float(model(**batch).loss) * items, items

        result = opt.step(loss)
        expected.append((step + 1, result.loss, result.projected_grad))
    assert steps(single) == expected


def test_gradient_accumulation_is_one_larger_zo_batch(tmp_path, single):
    accumulated = run(tmp_path, steps=6, accumulation=2)
    for (_, loss, pg), (_, loss_a, pg_a) in zip(steps(single), steps(accumulated), strict=True):
        assert loss_a == pytest.approx(loss, rel=1e-6) and pg_a == pytest.approx(pg, rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("name, options", [("conmezo", {}), ("mezo_svrg", {}),  # a momentum buffer, an anchor
                                           ("mezo", {"dtype": "bfloat16", "master": 1})])  # fp32 master copies
def test_resume_from_checkpoint_continues_the_same_trajectory(tmp_path, name, options):
    whole = run(tmp_path / "whole", steps=6, save_steps=3, optimizer=name, **options)
    saved = tmp_path / "whole" / "run" / "checkpoint-3"
    assert (saved / "zoscale" / "checkpoints" / "step-00000003" / "manifest.json").is_file()
    resumed = run(tmp_path / "resumed", steps=6, optimizer=name, resume=saved, **options)
    assert steps(resumed) == steps(whole) and resumed["param_sum"] == whole["param_sum"]


def test_dual_forward_follows_the_two_forward_trajectory(tmp_path, single):
    """zo_dual_forward: both sides from one forward of the batch taken twice (the loss computed by
    ZOTrainer itself rather than by the model: rounding apart)."""
    dual = run(tmp_path, steps=6, dual=1)
    for (step, loss, pg), (_, loss_d, pg_d) in zip(steps(single), steps(dual), strict=True):
        assert loss_d == pytest.approx(loss, rel=1e-5) and pg_d == pytest.approx(pg, rel=2e-3, abs=2e-3), step
    assert dual["param_sum"] == pytest.approx(single["param_sum"], rel=1e-6)


def test_resume_from_the_last_checkpoint_skips_one_whose_save_was_interrupted(tmp_path, single, caplog):
    """A kill during a save leaves the newest checkpoint without its state: True takes the previous one."""
    import shutil

    shutil.copytree(single["dir"] / "run", tmp_path / "run")
    for part in ("trainer_state.json", "zoscale"):  # as a kill -9 between the Trainer's files leaves it
        target = tmp_path / "run" / "checkpoint-6" / part
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    with caplog.at_level("WARNING"):
        resumed = run(tmp_path, steps=6, resume="last")
    assert "skipping checkpoint-6, no readable trainer_state.json" in caplog.text
    assert steps(resumed) == steps(single) and resumed["param_sum"] == single["param_sum"]


def loaded_sum(model_dir: Path) -> float:
    """The parameters of a saved model as plain transformers loads them (tied weights once, as in the shards)."""
    from transformers import AutoModelForCausalLM

    return sum(p.double().sum().item() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())


def test_save_model_output_loads_in_plain_transformers(single):
    assert loaded_sum(single["dir"] / "model") == pytest.approx(single["param_sum"], rel=1e-12)


@pytest.mark.slow  # 300 steps of a learning run, twice started
def test_the_example_script_lowers_the_validation_loss(tmp_path):
    """examples/hf_trainer_sst2.py as the README runs it on a CPU, at a short budget."""
    def example(*args) -> dict:
        out = run_group([sys.executable, str(REPO / "examples" / "hf_trainer_sst2.py"), "--report_to", "none",
                         "--save_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "100", *args],
                        timeout=300)
        assert out.returncode == 0, out.stdout[-2000:]
        # the script's last words are trainer.evaluate()'s dict
        last_dict = next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{'eval_"))
        return ast.literal_eval(last_dict)

    untrained = example("--output_dir", str(tmp_path / "untrained"), "--max_steps", "1", "--learning_rate", "0")
    trained = example("--output_dir", str(tmp_path / "trained"), "--max_steps", "300", "--learning_rate", "1e-3")
    assert trained["eval_loss"] < untrained["eval_loss"] - 0.1  # 4.06 -> 3.77 on 2026-12-04
    assert loaded_sum(tmp_path / "trained") != loaded_sum(tmp_path / "untrained")


@pytest.mark.parametrize("backend", ["none", "fsdp", "deepspeed", "trainer-deepspeed"])
def test_two_gloo_ranks_follow_the_single_process_trajectory(tmp_path, single, backend):
    """Replicas (no DDP), FSDP2 shards (norms and biases kept whole) and ZeRO-3 partitions by
    zoscale's backends, the Trainer running the loop; and ZeRO-3 by the Trainer's own DeepSpeed integration
    (TrainingArguments(deepspeed=...), its persistence threshold "auto": the norms and biases are
    kept whole on every rank). The ZeRO-3 runs resume the
    single-process checkpoint at step 3. The sharded runs end with load_best_model_at_end: each rank
    reads its elements of the best checkpoint (chosen as the worst eval loss, so not the last)."""
    resumed = "deepspeed" in backend
    resume = (f"resume={single['dir'] / 'run' / 'checkpoint-3'}",) if resumed else ()
    best = ("best=1", "save_steps=2") if backend != "none" else ()
    small = ("small=100",) if backend == "fsdp" else ()
    ranks = torchrun(SCRIPT, 2, tmp_path, "steps=6", f"backend={backend}", "save_model=1", *resume, *best, *small,
                     timeout=240)
    assert steps(ranks[0]) == steps(ranks[1])
    for (step, loss, pg), (_, loss_2, pg_2) in zip(steps(single), steps(ranks[0]), strict=True):
        assert loss_2 == pytest.approx(loss, rel=1e-5) and pg_2 == pytest.approx(pg, rel=2e-3, abs=2e-3), step
    final = ranks[0]["saved"]["6"] if best else ranks[0]["param_sum"]
    assert final == pytest.approx(single["param_sum"], rel=1e-6)
    if best:
        best_step = ranks[0]["best"].rsplit("-", 1)[1]
        assert best_step == ("4" if resumed else "2") and ranks[1]["best"] == ranks[0]["best"]
        assert ranks[0]["param_sum"] == pytest.approx(ranks[0]["saved"][best_step], rel=1e-12)
    if backend in ("fsdp", "trainer-deepspeed"):  # small=100, and the JSON's threshold: norms and biases kept whole
        whole = set(ranks[1]["kept_whole"])
        assert whole and all(name.endswith(("bias", "norm.weight")) for name in whole), whole
    if backend != "none":  # the gathered shards, saved by rank 0
        assert loaded_sum(tmp_path / "model") == pytest.approx(ranks[0]["param_sum"], rel=1e-12)
        step_dir = "zoscale/checkpoints/step-00000006"
        files = {f for f in ranks[0]["files"] if f.startswith(f"run/checkpoint-6/{step_dir}/shards-rank")}
        assert files == {f"run/checkpoint-6/{step_dir}/shards-rank{r}.safetensors" for r in (0, 1)}


@pytest.mark.parametrize("change, message", [
    ({"optim": "adafactor"}, "TrainingArguments.optim=adafactor"),
    ({"gradient_checkpointing": True}, "TrainingArguments.gradient_checkpointing"),
    ({"fsdp": "full_shard"}, "TrainingArguments.fsdp_config: ZOTrainer needs FSDP2"),
    ({"fsdp": "full_shard", "fsdp_config": {"version": 2, "reshard_after_forward": True}}, "needs CUDA"),
    ({"deepspeed": {"zero_optimization": {"stage": 2}}}, "ZeRO stage 2"),
    ({"deepspeed": str(hf_trainer.ZERO3), "zo_backend": "deepspeed"}, "both shard the model"),
    ({"gradient_accumulation_steps": 2, "zo": "pseuzo"}, "gradient_accumulation_steps"),
    ({"zo_options": {"epsilon": 1}}, "unknown option"),
    ({"zo_options": {"eps": "abc"}}, "eps: expected a number, got 'abc'"),  # the validator of zoscale train's config
    ({"zo_options": {"eps": True}}, "eps: expected a number, got True"),
    ({"zo_options": {"lr": "1e-3"}}, "lr: expected a number, got '1e-3'"),
    ({"zo_fsdp_shard_size": 2}, "zo_fsdp_shard_size: shard groups are FSDP2's"),
    ({"zo_zero3_shard_size": 2, "zo_backend": "fsdp"}, "zo_zero3_shard_size: shard groups of ZeRO-3"),
    ({"zo_replicate_small_params": 100}, "zo_replicate_small_params: needs zo_backend"),
    ({"zo": "adamw"}, "zo_optimizer: adamw is a first-order baseline"),
    ({"zo_backend": "megatron"}, "zo_backend"),
    ({"optimizers": (torch.optim.SGD([torch.zeros(1, requires_grad=True)]), None)}, "optimizers"),
    ({"max_grad_norm": 0.5}, "max_grad_norm=0.5: a ZO step has no gradient to clip"),
    ({"adam_beta2": 0.95}, "adam_beta2=0.95: it configures the first-order optimizer"),
    ({"warmup_steps": 10, "zo_options": {"lr": 1e-3}}, "warmup_steps: zo_options' lr/schedule replace"),
    ({"lr_scheduler_type": "cosine", "zo_options": {"schedule": "linear", "total_steps": 10}}, "lr_scheduler_type"),
    ({"weight_decay": 0.5, "zo_options": {"weight_decay": 0.1}}, "weight_decay=0.5 and zo_options weight_decay=0.1"),
    ({"zo_options": {"lr": "1e-3"}}, "lr: expected a number, got '1e-3'"),
    ({"zo_dual_forward": True, "zo": "conmezo"}, "zo_dual_forward: conmezo does not take its losses as"),
])
def test_combinations_a_zo_step_cannot_honour_are_refused(tmp_path, change, message):
    from transformers import TrainingArguments

    from zoscale.integrations.transformers import ZOTrainer

    change = dict(change)
    trainer_keys = {k: change.pop(k) for k in list(change) if k.startswith("zo_") or k == "optimizers"}
    name = change.pop("zo", "mezo")
    try:
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, dataloader_drop_last=True,
                                 **change)
    except ValueError as e:  # some combinations TrainingArguments refuses on CPU itself
        pytest.skip(f"TrainingArguments refuses {change} on its own: {e}")
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    tok = hf_trainer.tokenizer()
    try:
        with pytest.raises(ValueError, match=message) as caught:
            ZOTrainer(model=hf_trainer.model(len(tok)), args=args, train_dataset=hf_trainer.dataset(tok, 8),
                      zo_optimizer=name, **trainer_keys)
        assert "\n" not in str(caught.value)
    finally:
        # args' ZeRO-3 config is a process-wide setting while anything holds it (the traceback does):
        # later from_pretrained calls in this process would build under deepspeed.zero.Init
        unset_hf_deepspeed_config()


@pytest.mark.parametrize("hook", ["_prepare_for_training", "_loss_shifts_labels"])
def test_a_transformers_without_the_trainer_hooks_zotrainer_overrides_is_named(tmp_path, monkeypatch, hook):
    """Older transformers (4.57: no _loss_shifts_labels; 5.0: no _prepare_for_training) would
    bypass the ZO step's pieces silently; ZOTrainer says which hook is missing and what to install."""
    from transformers import Trainer, TrainingArguments

    from zoscale.integrations.transformers import ZOTrainer

    if hasattr(Trainer, hook):
        monkeypatch.delattr(Trainer, hook)
    else:  # an attribute Trainer.__init__ sets
        original = Trainer.__init__

        def without(self, *args, **kwargs):
            original(self, *args, **kwargs)
            delattr(self, hook)

        monkeypatch.setattr(Trainer, "__init__", without)
    tok = hf_trainer.tokenizer()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(RuntimeError, match=rf"lacks Trainer\(?\)?\.{hook}: install 'transformers>=5\.10'"):
        ZOTrainer(model=hf_trainer.model(len(tok)), args=args, train_dataset=hf_trainer.dataset(tok, rows=8))


def test_weight_decay_from_the_training_arguments_is_applied(tmp_path):
    """ZO's decoupled decay (1 - lr wd) on matrices, as AdamW's Trainer decays all but biases and norms."""
    plain, decayed = run(tmp_path / "plain", steps=3), run(tmp_path / "decayed", steps=3, weight_decay=0.5)
    assert steps(decayed)[0] == steps(plain)[0]  # the decay comes with the first update
    assert steps(decayed)[1:] != steps(plain)[1:] and decayed["param_sum"] != plain["param_sum"]
    from transformers import TrainingArguments

    from zoscale.integrations.transformers import ZOTrainer

    tok = hf_trainer.tokenizer()
    args = TrainingArguments(output_dir=str(tmp_path / "t"), report_to=[], use_cpu=True, weight_decay=0.5)
    trainer = ZOTrainer(model=hf_trainer.model(len(tok)), args=args, train_dataset=hf_trainer.dataset(tok, 8))
    trainer.create_optimizer()
    assert trainer.zo.config.weight_decay == 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_trainers_fsdp2_on_a_gpu_follows_the_single_process_trajectory(tmp_path, single):
    """TrainingArguments(fsdp=..., fsdp_config={"version": 2, ...}): the Trainer's accelerate
    plugin shards the model (on CUDA: on CPU it would fall back to DDP), the ZO optimizer takes
    the shards it made."""
    ranks = torchrun(SCRIPT, 1, tmp_path, "steps=6", "backend=trainer-fsdp", "save_model=1", timeout=300)
    for (step, loss, pg), (_, loss_gpu, pg_gpu) in zip(steps(single), steps(ranks[0]), strict=True):
        assert loss_gpu == pytest.approx(loss, rel=1e-4) and pg_gpu == pytest.approx(pg, rel=2e-2, abs=2e-2), step
    assert loaded_sum(tmp_path / "model") == pytest.approx(ranks[0]["param_sum"], rel=1e-6)
