import json
from collections import Counter
from pathlib import Path

import pytest

from zoscale.config import DataConfig
from zoscale.errors import ConfigError
from zoscale.train import data, tasks

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tasks"


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_every_task_loads_its_local_files_and_builds_prompts(name):
    task = tasks.TASKS[name]
    splits = data.sample(DataConfig(task=name, path=str(FIXTURES / name), num_train=5, num_dev=2, num_test=4,
                                    seed=13), task)
    assert len(splits["train"]) == 5 and len(splits["dev"]) == 2 and len(splits["test"]) >= 3
    for example in splits["train"] + splits["test"]:
        assert example.prompt
        if task.evaluation == "generate":
            assert example.answers and not example.candidates
        else:
            assert len(example.candidates) >= 2 and 0 <= example.label < len(example.candidates)


def test_sampling_is_seeded_and_train_dev_are_disjoint():
    cfg = DataConfig(task="sst2", path=str(FIXTURES / "sst2"), num_train=4, num_dev=4, num_test=2, seed=21)
    a, b = data.sample(cfg, tasks.TASKS["sst2"]), data.sample(cfg, tasks.TASKS["sst2"])
    assert a == b
    raw = data.load_raw(cfg, tasks.TASKS["sst2"])[0]
    assert len(a["train"]) + len(a["dev"]) == len(raw)  # 8 examples, none used twice


def test_snli_drops_examples_without_a_gold_label():
    task = tasks.TASKS["snli"]
    splits = data.sample(DataConfig(task="snli", path=str(FIXTURES / "snli"), num_train=100, num_dev=0, num_test=0),
                         task)
    assert len(splits["train"]) == 8  # 10 fixture examples, 2 labelled -1


@pytest.mark.parametrize("seed", range(8))
def test_dev_starts_after_the_rows_train_read_even_where_rows_are_dropped(tmp_path, seed):
    # 6 of 8 rows are labelled: 3 train and 3 dev examples use them all, none twice
    rows = [{"premise": "A dog runs.", "hypothesis": f"Claim {i}.", "label": -1 if i in (2, 5) else i % 3}
            for i in range(8)]
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = data.sample(DataConfig(task="snli", path=str(tmp_path), num_train=3, num_dev=3, num_test=0, seed=seed),
                         tasks.TASKS["snli"])
    assert len({e.prompt for e in splits["train"] + splits["dev"]}) == 6


def _skewed_sst2(tmp_path, positives=2, negatives=10):
    for split in ("train", "validation"):
        rows = [{"sentence": f"{split} {i}", "label": int(i < positives)} for i in range(positives + negatives)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_balance_samples_each_label_equally_in_every_split(tmp_path):
    path = _skewed_sst2(tmp_path, positives=4)
    cfg = DataConfig(task="sst2", path=str(path), num_train=5, num_dev=4, num_test=7, balance=True)
    splits = data.sample(cfg, tasks.TASKS["sst2"])
    # an odd count rounds down to a multiple of the number of labels
    assert [Counter(e.label for e in splits[s]) for s in ("train", "dev", "test")] == \
        [Counter({0: 2, 1: 2}), Counter({0: 2, 1: 2}), Counter({0: 3, 1: 3})]
    assert not {e.prompt for e in splits["train"]} & {e.prompt for e in splits["dev"]}
    assert data.sample(cfg, tasks.TASKS["sst2"]) == splits


@pytest.mark.parametrize("task, change, message", [
    ("sst2", {"num_train": 6}, r".*train.jsonl holds 2 examples of label 1, fewer than the 3 .* data.num_train"),
    ("squad", {}, "task squad is scored by generation: it has no labels to balance"),
])
def test_balance_that_cannot_be_met_is_a_clear_error(tmp_path, task, change, message):
    path = _skewed_sst2(tmp_path) if task == "sst2" else FIXTURES / task
    cfg = DataConfig(task=task, path=str(path), **{"num_train": 4, "num_dev": 0, "num_test": 2, **change},
                     balance=True)
    with pytest.raises(ConfigError, match=f"data.balance: {message}"):
        data.sample(cfg, tasks.TASKS[task])


def test_local_files_missing_a_field_are_a_clear_error(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "no label here"}\n')
    (tmp_path / "validation.jsonl").write_text('{"text": "no label here"}\n')
    with pytest.raises(ConfigError, match=r"lack field\(s\) \['label', 'sentence'\]"):
        data.sample(DataConfig(task="sst2", path=str(tmp_path)), tasks.TASKS["sst2"])


def test_user_defined_task_in_yaml(tmp_path):
    spec = tmp_path / "polarity.yaml"
    spec.write_text("template: '{review} Overall:'\ncandidates: [' bad', ' good']\nlabel_field: stars\n")
    task = tasks.get(str(spec))
    example = task.build({"review": "Loved it.", "stars": 1})
    assert (example.prompt, example.candidates, example.label) == ("Loved it. Overall:", [" bad", " good"], 1)
    (tmp_path / "bad.yaml").write_text("template: x\n")
    with pytest.raises(ValueError, match="either candidates"):
        tasks.get(str(tmp_path / "bad.yaml"))
    with pytest.raises(ValueError, match="unknown task"):
        tasks.get("imdb")


def test_batch_order_depends_only_on_seed_and_step():
    first_epoch = [i for step in range(5) for i in data.batch_indices(10, 2, step, seed=3)]
    assert sorted(first_epoch) == list(range(10))  # one epoch is a permutation
    assert data.batch_indices(10, 4, 7, 3) == data.batch_indices(10, 4, 7, 3)
    assert data.batch_indices(10, 4, 7, 3) != data.batch_indices(10, 4, 7, 4)
    assert len(data.batch_indices(10, 4, 2, 3)) == 4  # a batch that spans two epochs
    shares = [data.rank_share(list(range(11)), r, 3) for r in range(3)]
    assert shares == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
