"""No silent failures: a run that stopped learning stops with a one-line error and a non-zero exit
(zoscale train and ZOTrainer), one that made the model worse says so, and model.config keys are
checked against the model type's config."""

import sys

import pytest
from distributed import run_group

from zoscale.config import load
from zoscale.errors import ConfigError
from zoscale.quickstart import QUICKSTART
from zoscale.train.stall import StalledRun

QUICK = ["steps=40", "eval_every=0", "save_every=0", "eval_before=false", "data.num_train=64", "data.num_test=16",
         "data.num_dev=16", "batch_size=8"]
# an eps that bf16 weights cannot resolve: every perturbed loss equals the unperturbed one, pg is exactly 0
DEAD = ["model.dtype=bfloat16", "optim.eps=1e-10"]


def train(tmp_path, *overrides):
    return run_group([sys.executable, "-m", "zoscale", "train", "--out", str(tmp_path / "run"), *QUICK, *overrides])


def test_a_run_that_changes_nothing_warns_then_stops_with_exit_1(tmp_path):
    done = train(tmp_path, *DEAD, "max_stalled_steps=20")
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 1, done.stdout[-2000:]
    assert any(line.startswith("warning: 10 consecutive steps up to step 9 changed nothing") for line in lines)
    assert lines[-1].startswith("zoscale: error: the run stopped learning: 20 consecutive steps up to step 19")
    assert not (tmp_path / "run" / "summary.json").exists()  # it did not end "done"


def test_the_check_can_be_turned_off_and_a_learning_run_never_trips_it(tmp_path):
    off = train(tmp_path / "off", *DEAD, "max_stalled_steps=0")
    assert off.returncode == 0 and "changed nothing" in off.stdout
    learning = train(tmp_path / "learning", "max_stalled_steps=3")
    assert learning.returncode == 0 and "changed nothing" not in learning.stdout, learning.stdout[-2000:]


def test_a_run_that_ends_worse_than_it_started_says_so(tmp_path):
    """A rate too high for the quickstart (0.03) takes its test accuracy from 0.516 to 0.469."""
    done = train(tmp_path, "steps=30", "eval_before=true", "data.num_test=64", "optim.lr=0.03")
    assert done.returncode == 0, done.stdout[-2000:]
    note = next(line for line in done.stdout.splitlines() if line.startswith("note: the test accuracy ended below"))
    after, before = map(float, note.split("(", 1)[1].split(")", 1)[0].split(" < "))
    assert after < before == 0.516, note


def test_zotrainer_stops_a_run_that_changes_nothing(tmp_path):
    from transformers import DataCollatorForLanguageModeling, TrainingArguments

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent / "scripts"))
    import hf_trainer

    from zoscale.integrations.transformers import ZOTrainer

    tok = hf_trainer.tokenizer()
    data = hf_trainer.dataset(tok, rows=16)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8,
                             learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = ZOTrainer(model=hf_trainer.model(len(tok)).bfloat16(), args=args, train_dataset=data,
                        data_collator=DataCollatorForLanguageModeling(tok, mlm=False), zo_options={"eps": 1e-10},
                        zo_max_stalled_steps=12)
    with pytest.raises(StalledRun, match=r"12 consecutive steps up to step \d+ changed nothing"):
        trainer.train()


@pytest.mark.parametrize("overrides,message", [
    (["model.config.ffn_dimm=64"], "model.config.ffn_dimm: not a field of opt's config; did you mean ffn_dim?"),
    (["model.config.model_type=llama"], "model.config.ffn_dim: not a field of llama's config"),
    (["model.config.tie_word_embeddings=1"], "model.config.tie_word_embeddings: must be true or false, got 1"),
    (["model.config.num_attention_heads=0"], "model.config.num_attention_heads: must be a positive integer, got 0"),
])
def test_model_config_keys_are_fields_of_their_type(overrides, message):
    with pytest.raises(ConfigError) as error:
        load(None, overrides, defaults=QUICKSTART)
    assert str(error.value).startswith(message)


def test_a_tied_model_can_be_built_from_a_config():
    cfg = load(None, ["model.config.tie_word_embeddings=true"], defaults=QUICKSTART)
    assert cfg.model.config["tie_word_embeddings"] is True
