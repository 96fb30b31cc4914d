"""Prompted tasks of the MeZO suite: how a raw example becomes a prompt and its candidate answers.

Classification and multiple choice: the model scores each candidate appended to the prompt (mean
log-likelihood of its tokens) and is trained with cross-entropy over candidates. Generation tasks
(SQuAD, DROP) train on the answer tokens only and are evaluated by greedy decoding (F1, exact
match). COPA and ReCoRD train on the gold answer's tokens and are evaluated by candidate scoring,
as in MeZO. Each task names its hub dataset and the fields a local file must have (docs/tasks.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml


@dataclass
class Example:
    prompt: str
    candidates: list[str] = field(default_factory=list)  # answers appended to the prompt
    label: int | None = None  # index of the gold candidate
    answers: list[str] = field(default_factory=list)  # generation: gold answers (train on the first)
    columns: dict = field(default_factory=dict)  # the raw example's fields (what reward functions are given)


@dataclass(frozen=True)
class Task:
    name: str
    hub: tuple[str, ...]  # load_dataset arguments
    fields: tuple[str, ...]  # what each raw example (hub or local file) must have
    build: Callable[[dict], Example | None]  # None drops the example (e.g. unlabelled)
    train_split: str = "train"
    test_split: str = "validation"
    train_objective: str = "classification"  # classification | lm (loss on the gold answer's tokens)
    evaluation: str = "candidates"  # candidates (accuracy) | generate (F1 / exact match)


def with_demonstrations(example: Example, demonstrations: list[Example], separator: str = "\n\n") -> Example:
    """In-context learning (MeZO's ICL baseline): solved examples, each its prompt and gold answer,
    before the example's own prompt. Encoding keeps the prompt's last tokens, so when the whole
    exceeds data.max_length the oldest demonstrations are cut."""
    solved = "".join(d.prompt + (d.candidates[d.label] if d.candidates else d.answers[0]) + separator
                     for d in demonstrations)
    return replace(example, prompt=solved + example.prompt)


def _yes_no_question(context: str, question: str) -> str:
    return f"{context}\n{question} Yes or No?\n"


def _sst2(x):
    return Example(f"{x['sentence'].strip()} It was", [" terrible", " great"], x["label"])


def _sst5(x):
    return Example(f"{x['text'].strip()} It was", [" terrible", " bad", " okay", " good", " great"], x["label"])


def _trec(x):
    words = [" abbreviation", " entity", " description", " person", " location", " number"]
    return Example(f"{x['text'].strip()} Answer type:", words, x["coarse_label"])


def _rte(x):
    return Example(_yes_no_question(x["premise"], f'Does this mean that "{x["hypothesis"]}" is true?'),
                   ["Yes", "No"], x["label"])


def _cb(x):
    prompt = f'{x["premise"]}\nDoes this mean that "{x["hypothesis"]}" is true? Yes, No, or Maybe?\n'
    return Example(prompt, ["Yes", "No", "Maybe"], x["label"])


def _boolq(x):
    return Example(f"{x['passage']} {x['question']}?", [" No", " Yes"], x["label"])


def _wsc(x):
    question = f'In the previous sentence, does the pronoun "{x["span2_text"].lower()}" refer to {x["span1_text"]}?'
    return Example(_yes_no_question(x["text"], question), ["No", "Yes"], x["label"])


def _wic(x):
    prompt = (f'Does the word "{x["word"]}" mean the same in these two sentences? Yes or No?\n'
              f"{x['sentence1']}\n{x['sentence2']}\n")
    return Example(prompt, ["No", "Yes"], x["label"])


def _multirc(x):
    question = f'Question: {x["question"]}\nI found this answer: "{x["answer"]}". Is that correct?'
    return Example(_yes_no_question(x["paragraph"], question), ["No", "Yes"], x["label"])


def _copa(x):
    connector = " because" if x["question"] == "cause" else " so"
    lower = lambda s: " " + s[0].lower() + s[1:]  # noqa: E731
    return Example(x["premise"].rstrip(".") + connector, [lower(x["choice1"]), lower(x["choice2"])], x["label"])


def _record(x):
    passage = x["passage"].replace("@highlight\n", "- ")
    entities = sorted(set(x["entities"]))
    gold = [i for i, e in enumerate(entities) if e in x["answers"]]
    if not gold:
        return None
    return Example(f"{passage}\n", [x["query"].replace("@placeholder", e) for e in entities], gold[0])


def _squad(x):
    prompt = f"Title: {x['title']}\nContext: {x['context']}\nQuestion: {x['question']}\nAnswer:"
    return Example(prompt, answers=[" " + a for a in x["answers"]["text"]])


def _drop(x):
    answers = x["answers_spans"]["spans"]
    return Example(f"Passage: {x['passage']}\nQuestion: {x['question']}\nAnswer:", answers=[" " + a for a in answers])


def _nli(x):
    if x["label"] not in (0, 1, 2):
        return None  # SNLI marks examples without a gold label with -1
    return Example(f"{x['premise']}\nQuestion: {x['hypothesis']} True, False or Neither?\nAnswer:",
                   [" True", " Neither", " False"], x["label"])


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("sst2", ("glue", "sst2"), ("sentence", "label"), _sst2),
    Task("sst5", ("SetFit/sst5",), ("text", "label"), _sst5, test_split="test"),
    Task("trec", ("trec",), ("text", "coarse_label"), _trec, test_split="test"),
    Task("rte", ("super_glue", "rte"), ("premise", "hypothesis", "label"), _rte),
    Task("cb", ("super_glue", "cb"), ("premise", "hypothesis", "label"), _cb),
    Task("boolq", ("super_glue", "boolq"), ("passage", "question", "label"), _boolq),
    Task("wsc", ("super_glue", "wsc.fixed"), ("text", "span1_text", "span2_text", "label"), _wsc),
    Task("wic", ("super_glue", "wic"), ("word", "sentence1", "sentence2", "label"), _wic),
    Task("multirc", ("super_glue", "multirc"), ("paragraph", "question", "answer", "label"), _multirc),
    Task("copa", ("super_glue", "copa"), ("premise", "choice1", "choice2", "question", "label"), _copa,
         train_objective="lm"),
    Task("record", ("super_glue", "record"), ("passage", "query", "entities", "answers"), _record,
         train_objective="lm"),
    Task("squad", ("squad",), ("title", "context", "question", "answers"), _squad, train_objective="lm",
         evaluation="generate"),
    Task("drop", ("drop",), ("passage", "question", "answers_spans"), _drop, train_objective="lm",
         evaluation="generate"),
    Task("mnli", ("glue", "mnli"), ("premise", "hypothesis", "label"), _nli, test_split="validation_matched"),
    Task("snli", ("snli",), ("premise", "hypothesis", "label"), _nli),
)}


def from_yaml(path: Path) -> Task:
    """A user-defined task: ``template`` (str.format over the example's fields) and either
    ``candidates`` + ``label_field`` (classification) or ``answer_field`` (generation)."""
    spec = yaml.safe_load(Path(path).read_text()) or {}
    known = {"name", "template", "candidates", "label_field", "answer_field", "hub", "fields",
             "train_split", "test_split"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"task file {path}: unknown key(s) {unknown}; valid: {sorted(known)}")
    if "template" not in spec or ("candidates" in spec) == ("answer_field" in spec):
        raise ValueError(f"task file {path}: needs a template and either candidates (+ label_field) or answer_field")
    template = spec["template"]
    if "candidates" in spec:
        label = spec.get("label_field", "label")
        build = lambda x: Example(template.format(**x), list(spec["candidates"]), int(x[label]))  # noqa: E731
        kind = {}
    else:
        answer = spec["answer_field"]
        build = lambda x: Example(template.format(**x), answers=[" " + str(x[answer]).strip()])  # noqa: E731
        kind = {"train_objective": "lm", "evaluation": "generate"}
    return Task(spec.get("name", Path(path).stem), tuple(spec.get("hub", ())), tuple(spec.get("fields", ())), build,
                spec.get("train_split", "train"), spec.get("test_split", "validation"), **kind)


def get(name_or_path: str) -> Task:
    if name_or_path in TASKS:
        return TASKS[name_or_path]
    if name_or_path.endswith((".yaml", ".yml")):
        if not Path(name_or_path).is_file():
            raise ValueError(f"data.task: no such task file {name_or_path}")
        return from_yaml(Path(name_or_path))
    raise ValueError(f"data.task: unknown task {name_or_path!r}; choose one of {sorted(TASKS)} or a .yaml task file")
