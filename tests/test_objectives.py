"""Objectives beyond the loss (zoscale/train/objectives.py): accuracy, F1 and exact match of
generations, and reward functions; on one process and on gloo ranks of every backend."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from distributed import launch, run_group, torchrun
from runs import REPO, lines, summary, zoscale

from zoscale.quickstart import QUICKSTART
from zoscale.train.data import Encoded
from zoscale.train.evaluate import generate
from zoscale.train.losses import Batch
from zoscale.train.objectives import Measure

sys.path.insert(0, str(REPO / "tests" / "scripts"))
import hf_trainer  # noqa: E402

REWARDS = Path(__file__).resolve().parent / "fixtures" / "rewards"
SENTIMENT_WORD = "objective=zoscale.quickstart.rewards:sentiment_word"
QUICK = ["eval_every=0", "save_every=0", "data.num_dev=0"]


@pytest.mark.slow  # 2,000 steps: a learning run (the trajectory tests below check the objective on every backend)
def test_accuracy_as_the_objective_raises_test_accuracy_on_the_quickstart(tmp_path):
    done = zoscale("train", "--out", tmp_path / "run", "objective=accuracy", "optim.eps=0.03", "optim.lr=1e-3",
                   "steps=2000", *QUICK)
    assert done.returncode == 0, done.stderr[-2000:]
    result = summary(tmp_path / "run")
    assert result["objective"] == "accuracy"
    assert result["eval_after"]["accuracy"] > result["eval_before"]["accuracy"] + 0.15
    losses = [m["loss"] for m in lines(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    assert all(-1 <= v <= 0 and (v * 16).is_integer() for v in losses)  # minus the batch's accuracy, in 16ths


@pytest.mark.slow  # 3,000 steps: a learning run
def test_a_reward_function_alone_teaches_the_quickstart_a_word_of_the_right_sentiment(tmp_path):
    """configs/quickstart_reward.yaml's setting, shortened (a larger lr): no label word is scored."""
    done = zoscale("train", "--out", tmp_path / "run", SENTIMENT_WORD, "objective.max_new_tokens=1",
                   "optim.eps=0.03", "optim.lr=3e-3", "steps=3000", *QUICK)
    assert done.returncode == 0, done.stderr[-2000:]
    result = summary(tmp_path / "run")
    assert result["eval_after"]["reward"] > result["eval_before"]["reward"] + 0.15


def test_f1_and_exact_match_are_minus_the_scores_of_the_greedy_generations():
    tokenizer = hf_trainer.tokenizer()
    model = hf_trainer.model(len(tokenizer))
    prompts = ["the movie was", "overall the plot is really", "a dull film and a"]
    encode = lambda p, answers: Encoded(tokenizer(p)["input_ids"], [], None, [], answers, p)  # noqa: E731
    texts, ids = generate(model, tokenizer, [encode(p, []) for p in prompts], 3, "cpu", stop=("\n",))
    assert all(1 <= len(t.split()) <= 3 for t in texts) and all(len(i) <= 3 for i in ids)

    def value(name, answers):
        examples = [encode(p, a) for p, a in zip(prompts, answers)]
        measure = Measure(name, tokenizer, "cpu", synced=False, max_new_tokens=3)
        return measure.value(model, Batch(examples, "lm", tokenizer.pad_token_id, "cpu"))

    for name in ("f1", "exact_match"):
        assert value(name, [[t] for t in texts]) == (-3.0, 3)  # gold = what the model writes: a perfect score
        assert value(name, [["nothing like it"]] * 3) == (0.0, 3)
    first_words = [[t.split()[0]] for t in texts]
    f1 = value("f1", first_words)[0]  # one of several words right: partial credit
    assert value("exact_match", first_words)[0] >= f1 > -3.0 or all(len(t.split()) == 1 for t in texts)


def _squad_style(directory: Path) -> Path:
    """SQuAD's schema over the quickstart's reviews: the answer is the review's sentiment word."""
    for split, count in (("train", 48), ("validation", 12)):
        rows = [json.loads(line) for line in (QUICKSTART.parent / "sst2" / f"{split}.jsonl").read_text().splitlines()]
        out = [{"id": str(i), "title": "review", "context": r["sentence"], "question": "was it great or terrible",
                "answers": {"text": [["terrible", "great"][r["label"]]], "answer_start": [0]}} for i, r in
               enumerate(rows[:count])]
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
    return directory


def test_f1_trains_on_a_local_squad_style_file(tmp_path):
    data = _squad_style(tmp_path)
    done = zoscale("train", "--out", tmp_path / "run", "data.task=squad", f"data.path={data}", "data.num_train=48",
                   "data.num_test=12", "data.max_new_tokens=2", "objective=f1", "objective.max_new_tokens=2",
                   "batch_size=8", "steps=20", "max_stalled_steps=0", *QUICK)
    assert done.returncode == 0, done.stderr[-2000:]
    result = summary(tmp_path / "run")
    assert result["objective"] == "f1" and 0 <= result["eval_after"]["f1"] <= 1
    losses = [m["loss"] for m in lines(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    assert len(losses) == 20 and all(-1 <= v <= 0 for v in losses)


def test_reward_functions_get_prompts_completions_and_the_datasets_columns(tmp_path):
    # the reward asserts its arguments line up, and returns the gold labels: minus their batch mean is the loss
    done = zoscale("train", "--out", tmp_path / "run", f"objective={REWARDS / 'rewards.py'}:columns_seen",
                   "steps=5", "max_stalled_steps=0", "eval_before=false", *QUICK)
    assert done.returncode == 0, done.stderr[-2000:]
    losses = [m["loss"] for m in lines(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    assert all(-1 <= v <= 0 and (v * 16).is_integer() for v in losses) and any(v < 0 for v in losses)


@pytest.mark.parametrize("objective,message", [
    (f"{REWARDS / 'broken.py'}:reward", "importing"),
    (f"{REWARDS / 'rewards.py'}:absent", "has no function absent"),
    ("no_such_module_anywhere:reward", "importing no_such_module_anywhere failed (ModuleNotFoundError"),
    ("reward", "name the reward functions"),
    ("bogus", "is neither one of"),
    ("accuracy optim.name=pseuzo", "pseuzo differentiates the loss"),
    ("accuracy optim.name=adamw", "adamw differentiates the loss"),
    ("f1 model.kind=masked", "a masked LM (model.kind masked) does not generate"),
])
def test_objectives_that_cannot_run_are_config_errors(objective, message):
    from zoscale.config import load
    from zoscale.errors import ConfigError

    name, *more = objective.split()
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(QUICKSTART, [f"objective={name}", *more])


def test_the_task_must_offer_what_the_objective_measures():
    from zoscale.config import ObjectiveConfig
    from zoscale.errors import ConfigError
    from zoscale.train import tasks
    from zoscale.train.objectives import check_task

    with pytest.raises(ConfigError, match="task sst2 has candidates"):
        check_task(ObjectiveConfig(name="f1"), tasks.TASKS["sst2"])
    with pytest.raises(ConfigError, match="task squad is scored by generation"):
        check_task(ObjectiveConfig(name="accuracy"), tasks.TASKS["squad"])
    check_task(ObjectiveConfig(name="exact_match"), tasks.TASKS["drop"])


def test_reward_functions_that_return_the_wrong_thing_are_named():
    from zoscale.errors import ConfigError
    from zoscale.train.objectives import rewards_of

    too_few, words, raises = rewards_of([f"{REWARDS / 'rewards.py'}:{n}" for n in ("too_few", "words", "raises")],
                                        [1.0, 1.0, 1.0])
    args = (["p", "q"], [" a", " b"], [[1], [2]], {"label": [0, 1]})
    for reward, message in ((too_few, "too_few returned 1 values for 2 completions"),
                            (words, "words returned ' a'; rewards are floats"),
                            (raises, "raises raised KeyError")):
        with pytest.raises(ConfigError, match=message):
            reward(*args)
    weighted = rewards_of([lambda prompts, completions, **c: [None, 2]], [0.5])[0]
    assert weighted(*args) == [0.0, 1.0]  # None: the function does not apply (TRL's convention)


@pytest.mark.parametrize("reward,code,message", [
    ("too_few", 2, "too_few returned 15 values for 16 completions"),
    ("not_a_number", 1, "consecutive non-finite losses"),
])
def test_a_reward_that_fails_mid_run_is_one_line(tmp_path, reward, code, message):
    done = zoscale("train", "--out", tmp_path / "run", f"objective={REWARDS / 'rewards.py'}:{reward}",
                   "max_nonfinite=2", "steps=10", "eval_before=false", *QUICK, timeout=300)
    assert done.returncode == code, done.stderr[-2000:]
    error = [line for line in done.stderr.splitlines() if line.startswith("zoscale: error:")]
    assert len(error) == 1 and message in error[0] and "Traceback" not in done.stderr


RUN = ["steps=6", "data.num_train=48", "data.num_dev=0", "data.num_test=29", "batch_size=12", "eval_batch_size=7",
       "save_every=0", "eval_every=0", "optim.eps=0.03", "optim.lr=1e-3"]
OBJECTIVES = {"accuracy": ["objective=accuracy"], "reward": [SENTIMENT_WORD, "objective.max_new_tokens=2"]}


BACKENDS = ("ddp", "fsdp", "deepspeed")
TRAIN_RUNS = str(REPO / "tests" / "scripts" / "train_runs.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every objective in one process, then on 2 ranks under each backend (one launch for all)."""
    out = tmp_path_factory.mktemp("objectives")
    alone = [[f"local-{name}", [*RUN, *objective], False] for name, objective in OBJECTIVES.items()]
    done = run_group([sys.executable, TRAIN_RUNS, str(out), json.dumps(alone)], timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    ranks = [[f"{backend}-{name}", [*RUN, *objective, f"backend={backend}"], False]
             for backend in BACKENDS for name, objective in OBJECTIVES.items()]
    done = launch(2, TRAIN_RUNS, str(out), json.dumps(ranks), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_two_ranks_follow_the_single_process_trajectory(backend, objective, runs):
    """Each rank scores (or generates for) its share of the batch; the 29 test examples split 15 / 14,
    so in batches of 7 one rank has a batch more, which a sharded rank mirrors."""
    run, alone_run = runs / f"{backend}-{objective}", runs / f"local-{objective}"
    alone, ranks = summary(alone_run), summary(run)
    assert ranks["eval_after"] == alone["eval_after"] and ranks["eval_before"] == alone["eval_before"]
    assert ranks["param_sq_sum"] == pytest.approx(alone["param_sq_sum"], rel=1e-6)
    steps = lambda r: [(m["loss"], m["projected_grad"]) for m in lines(r / "metrics.jsonl") if "loss" in m]  # noqa: E731
    assert steps(run) == steps(alone_run)  # counts of right answers and rewards: exact


def _zo_trainer(out: Path, objective, steps: int = 6, train_dataset=None, **arguments):
    from transformers import TrainingArguments

    from zoscale.integrations.transformers import ZOTrainer

    tok, data = hf_trainer.tokenizer(), train_dataset or hf_trainer.prompts()
    arguments = {"remove_unused_columns": False, **arguments}
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=8,
                             per_device_eval_batch_size=16, learning_rate=1e-3, lr_scheduler_type="constant",
                             logging_steps=1, save_steps=3, save_strategy="steps", report_to=[], use_cpu=True,
                             train_sampling_strategy="sequential", seed=0, disable_tqdm=True, **arguments)
    return ZOTrainer(model=hf_trainer.model(len(tok)), args=args, train_dataset=data, eval_dataset=data,
                     processing_class=tok, zo_objective=objective, zo_options={"eps": 0.03}, zo_max_new_tokens=1,
                     zo_max_stalled_steps=0)


def test_zotrainer_trains_on_a_reward_function_and_resumes_bit_exact(tmp_path):
    from zoscale.quickstart.rewards import sentiment_word

    whole = _zo_trainer(tmp_path / "whole", [sentiment_word, "zoscale.quickstart.rewards:sentiment_word"])
    before = whole.evaluate()["eval_loss"]
    whole.train()
    logged = [(r["step"], r["loss"], r["projected_grad"]) for r in whole.state.log_history if "projected_grad" in r]
    assert len(logged) == 6 and all(-2 <= loss <= 2 for _, loss, _ in logged)  # minus two rewards in [-1, 1]
    assert any(pg != 0 for _, _, pg in logged)
    # eval_loss: minus the mean reward of the eval rows, here recomputed one prompt at a time
    tok, model, rows = whole.processing_class, whole.model, whole.eval_dataset
    whole.zo.flush()
    with torch.no_grad():
        words = [tok.decode(model.generate(**tok(r["prompt"], return_tensors="pt"), max_new_tokens=1, do_sample=False,
                                           pad_token_id=tok.pad_token_id)[0, -1:]) for r in rows]
    expected = -2 * sum(sentiment_word(rows["prompt"], words, rows["label"])) / len(words)
    assert whole.evaluate()["eval_loss"] == pytest.approx(expected) and before <= 0

    resumed = _zo_trainer(tmp_path / "resumed", [sentiment_word, "zoscale.quickstart.rewards:sentiment_word"])
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    again = [(r["step"], r["loss"], r["projected_grad"]) for r in resumed.state.log_history if "projected_grad" in r]
    assert again == logged  # the first 3 from checkpoint-3's history, the last 3 run again
    whole.zo.flush(), resumed.zo.flush()
    assert all(torch.equal(a.tensor, b.tensor) for a, b in zip(whole.zo.shards, resumed.zo.shards))


def test_zotrainer_on_f1_and_on_token_accuracy(tmp_path):
    from transformers import DataCollatorForLanguageModeling, TrainingArguments

    from zoscale.integrations.transformers import ZOTrainer

    rows = hf_trainer.prompts().map(lambda r: {"answers": [["terrible", "great"][r["label"]]]})
    trainer = _zo_trainer(tmp_path / "f1", "f1", train_dataset=rows)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "projected_grad" in r]
    assert len(losses) == 6 and all(-1 <= v <= 0 for v in losses)

    tok = hf_trainer.tokenizer()
    data = hf_trainer.dataset(tok, rows=32)
    args = TrainingArguments(output_dir=str(tmp_path / "accuracy"), max_steps=4, per_device_train_batch_size=8,
                             per_device_eval_batch_size=32, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True)
    collate = DataCollatorForLanguageModeling(tok, mlm=False)
    trainer = ZOTrainer(model=hf_trainer.model(len(tok)), args=args, train_dataset=data, eval_dataset=data,
                        data_collator=collate, zo_objective="accuracy", zo_options={"eps": 0.03},
                        zo_max_stalled_steps=0)
    trainer.train()
    batch = collate([data[i] for i in range(32)])  # minus the share of next tokens the argmax predicts
    with torch.no_grad():
        predicted = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    right = ((predicted[:, :-1].argmax(-1) == labels) & labels.ne(-100)).sum() / labels.ne(-100).sum()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(-float(right))


# zoscale's FSDP2 and ZeRO-3 generate through the same code in zoscale train (test_two_ranks_follow_...)
@pytest.mark.parametrize("backend", ["none", "trainer-deepspeed"])
def test_zotrainer_with_a_reward_on_two_ranks_follows_one_process(tmp_path, backend):
    """Replicas and the Trainer's ZeRO-3: each rank generates for its rows."""
    hf_trainer.main(tmp_path / "single", {"objective": "reward", "steps": "4"})
    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    ranks = torchrun(REPO / "tests" / "scripts" / "hf_trainer.py", 2, tmp_path / "ranks", "objective=reward",
                     f"backend={backend}", "steps=4", timeout=300)
    steps = lambda r: [(e["loss"], e["projected_grad"]) for e in r["log"] if "projected_grad" in e]  # noqa: E731
    assert len(steps(single)) == 4 and any(pg for _, pg in steps(single))
    for rank in ranks:
        assert steps(rank) == steps(single)  # counts of words: exactly
        assert rank["param_sum"] == pytest.approx(single["param_sum"], rel=1e-9)


@pytest.mark.parametrize("objective,arguments,message", [
    ("reward", {}, "neither one of"),
    (["no_module_here:f"], {}, "importing no_module_here failed"),
    ("accuracy", {"optim_name": "pseuzo"}, "pseuzo differentiates the loss"),
    ("zoscale.quickstart.rewards:sentiment_word", {"remove_unused_columns": True}, "remove_unused_columns"),
])
def test_zotrainer_refuses_objectives_it_cannot_run(tmp_path, objective, arguments, message):
    from transformers import TrainingArguments

    from zoscale.integrations.transformers import ZOTrainer

    optimizer = arguments.pop("optim_name", "mezo")
    with pytest.raises(ValueError, match=message):
        if optimizer != "mezo":
            ZOTrainer(model=torch.nn.Linear(2, 2), args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]),
                      zo_optimizer=optimizer, zo_objective=objective)
        _zo_trainer(tmp_path, objective, **arguments)


def test_shaping_normalizes_or_ranks_a_steps_values():
    from zoscale.optim.base import shape

    assert shape([1.0, 3.0], "normalize") == [-1.0, 1.0]  # one direction: the sign of the difference
    assert shape([2.0, 2.0], "normalize") == [0.0, 0.0] == shape([2.0, 2.0], "centered_ranks")
    assert shape([1.0, 3.0, 3.0, 0.0], "centered_ranks") == pytest.approx([-1 / 6, 1 / 3, 1 / 3, -0.5])
    assert shape([10.0, -7.0, 1e9, 0.5], "centered_ranks") == shape([1.0, -1.0, 2.0, 0.0], "centered_ranks")
    values = [0.25, -1.0, 0.5, 2.0, 7.0, -3.0]
    normalized = shape(values, "normalize")
    assert sum(normalized) == pytest.approx(0.0, abs=1e-12) and sum(v * v for v in normalized) == pytest.approx(6)
    assert shape([1.0, float("nan")], "normalize")[0] == 1.0  # a non-finite step is skipped as it is


@pytest.mark.parametrize("optimizer", ["mezo", "conmezo"])
def test_shaped_reward_runs_apply_the_shaped_values_and_replay(tmp_path, optimizer):
    from transformers import AutoModelForCausalLM

    from zoscale.train import checkpoint

    run = tmp_path / "run"
    extra = ["optim.n_directions=4", "optim.shaping=centered_ranks"] if optimizer == "mezo" else \
        ["optim.shaping=normalize", "optim.buffer_dtype=float32"]
    done = zoscale("train", "--out", run, SENTIMENT_WORD, "objective.max_new_tokens=1", f"optim.name={optimizer}",
                   *extra, "optim.eps=0.03", "optim.lr=1e-3", "steps=30", "data.num_train=64", "data.num_test=16",
                   "max_stalled_steps=0", "eval_before=false", *QUICK)
    assert done.returncode == 0, done.stderr[-2000:]
    pgs = [m["projected_grad"] for m in lines(run / "metrics.jsonl") if "loss" in m]
    if optimizer == "conmezo":  # normalized pairs: +-1/eps, or 0 where the two values are equal
        assert {round(abs(pg) * 0.03, 9) for pg in pgs} <= {0.0, 1.0} and any(pgs)
        return  # its momentum is not a function of seeds: `zoscale replay` refuses ConMeZO runs
    replayed = zoscale("replay", run, "--out", tmp_path / "replayed")
    assert replayed.returncode == 0, replayed.stderr[-2000:]
    saved = checkpoint.whole_params(checkpoint.latest(run / "checkpoints"))
    for name, p in AutoModelForCausalLM.from_pretrained(tmp_path / "replayed").named_parameters():
        torch.testing.assert_close(p.detach().flatten(), saved[name], rtol=0, atol=3e-6)
