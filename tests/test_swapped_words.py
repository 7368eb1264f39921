"""The bundled multiple-choice, token-classification and question-answering tasks (tasks/swapped_words.py): each
family's reader accepts them, labels are in their set, answers stand in the context at answer_start, the splits are
disjoint, the same seed gives the same task; and a changed line holds the same words, capitals and punctuation as
the line as written, so only word order tells them apart."""
import os
import random

import numpy as np
import pytest

from fastroberta.tasks.errors import DataError
from fastroberta.tasks.multiple_choice import read_choices
from fastroberta.tasks.qa import read_qa
from fastroberta.tasks.readers import write_jsonl
from fastroberta.tasks.swapped_words import (QUESTION, TAGS, movable_runs, reverse_runs, swapped_line_choices,
                                             swapped_span_questions, swapped_word_tags)
from fastroberta.tasks.token_tags import encode_tags, entities, read_tags, tag_names

CORPUS = os.path.join(os.path.dirname(__file__), "..", "fastroberta", "corpus", "tinyshakespeare.txt")
SIZES = dict(n_train=300, n_validation=60, n_test=60)


def _shape(words):
    """What a line shows besides its word order: its words, its first word, where its punctuation stands."""
    return sorted(words), words[0], [w[-1].isalpha() for w in words]


def test_only_plain_inner_words_move():
    words = "Now, good Romeo, know't well the king's man away!".split()
    # Not the first or last word, nor one carrying punctuation ("Romeo,"); "know't" and "king's" are plain words.
    assert movable_runs(words, 2) == [3, 4, 5, 6]
    assert movable_runs("So so so it is".split(), 2) == [2]  # reversing "so so" changes nothing
    assert reverse_runs(words, [[3, 4], [5, 6, 7]]) == "Now, good Romeo, well know't man king's the away!".split()


def test_multiple_choice_task_reads_as_swag_and_its_choices_differ_only_in_order(tmp_path):
    task = swapped_line_choices(**SIZES)
    assert task == swapped_line_choices(**SIZES) and task != swapped_line_choices(**SIZES, seed=1)
    assert not {r["sent1"] for r in task["train"]} & {r["sent1"] for r in task["test"]}
    path = str(tmp_path / "train.jsonl")
    write_jsonl(task["train"], path)
    split = read_choices(path)
    assert split.labels == [r["label"] for r in task["train"]] and split.num_choices == 4
    assert np.bincount(split.labels, minlength=4).min() > 50  # the line as written is anywhere among the four
    for row in task["train"]:
        endings = [row[f"ending{c}"].split() for c in range(4)]
        truth = endings[row["label"]]
        assert len({" ".join(e) for e in endings}) == 4
        for c, e in enumerate(endings):
            assert _shape(e) == _shape(truth)
            moved = [i for i, (a, b) in enumerate(zip(e, truth)) if a != b]
            assert len(moved) == (0 if c == row["label"] else 4)  # two swapped pairs


def test_token_task_reads_as_iob2_with_swapped_pairs_as_entities(tmp_path):
    task = swapped_word_tags(**SIZES)
    assert task == swapped_word_tags(**SIZES) and task != swapped_word_tags(**SIZES, seed=1)
    texts = {name: {" ".join(r["tokens"]) for r in rows} for name, rows in task.items()}
    assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"]
    path = str(tmp_path / "train.jsonl")
    write_jsonl(task["train"], path)
    split = read_tags(path)
    assert tag_names(split) == list(TAGS)
    encode_tags(split, list(TAGS))  # every tag in the label set
    spans = entities(split.tags)
    assert {e - b for _, _, b, e in spans} == {1} and {t for t, _, _, _ in spans} == {"SWAP"}
    assert 0.1 < sum(all(t == "O" for t in tags) for tags in split.tags) / len(split.tags) < 0.3
    for words, tags in zip(split.words, split.tags):
        assert tags[0] == tags[-1] == "O"
        for _, _, b, e in (s for s in spans if split.tags[s[1]] is tags):
            assert words[b].isalpha() or "'" in words[b]  # plain words only: punctuation never moves


def test_qa_task_reads_as_squad_with_answers_at_their_start(tmp_path):
    task = swapped_span_questions(**SIZES, unanswerable=True)
    assert task == swapped_span_questions(**SIZES, unanswerable=True)
    assert task != swapped_span_questions(**SIZES, unanswerable=True, seed=1)
    contexts = {name: {r["context"] for r in rows} for name, rows in task.items()}
    assert not contexts["train"] & contexts["validation"] and not contexts["train"] & contexts["test"]
    path = str(tmp_path / "train.jsonl")
    write_jsonl(task["train"], path)
    examples = read_qa(path)  # the reader checks every answer's text against the context at answer_start
    assert 0.15 < sum(e.is_impossible for e in examples) / len(examples) < 0.35
    for e in examples:
        assert e.question == QUESTION and e.context.count("\n") == 1
        for text, start in e.answers:
            assert e.context[start:start + len(text)] == text and len(text.split()) in (3, 4)
            assert "\n" not in text and all(w.isalpha() or "'" in w for w in text.split())
    answerable = swapped_span_questions(n_train=100, n_validation=10, n_test=10)["train"]
    assert all(len(r["answers"]["text"]) == 1 for r in answerable)


def test_reversing_the_answer_again_gives_the_lines_as_written():
    with open(CORPUS, encoding="utf-8") as f:
        written = {" ".join(line.split()) for line in f}
    rows = swapped_span_questions(n_train=50, n_validation=10, n_test=10, seed=3)["train"]
    for r in random.Random(0).sample(rows, 10):
        (text,), (start,) = r["answers"]["text"], r["answers"]["answer_start"]
        restored = r["context"][:start] + " ".join(reversed(text.split())) + r["context"][start + len(text):]
        assert not set(r["context"].split("\n")) <= written and set(restored.split("\n")) <= written


@pytest.mark.parametrize("make", [swapped_line_choices, swapped_word_tags, swapped_span_questions])
def test_asking_for_more_than_the_corpus_holds_is_one_line(make):
    with pytest.raises(DataError, match=r"the corpus has only \d+ usable .* for the train split, 1000000 asked"):
        make(n_train=10 ** 6)


@pytest.mark.parametrize("task,epochs", [("multiple-choice", 3.0), ("token-classification", 10.0)])
def test_finetune_without_train_takes_the_generated_task(tmp_path, task, epochs):
    from fastroberta import finetune as ft
    from test_multiple_choice import tiny_model
    rows = swapped_line_choices(n_train=50, n_validation=10, n_test=10)["train"]
    model = tiny_model(tmp_path / "model", [r["sent1"] for r in rows])
    args = ft.build_parser().parse_args(["--model", str(model), "--task", task, "--precision", "fp32",
                                         "--max-seq-len", "64", "--output", str(tmp_path / "out")])
    s = ft.resolve_settings(args)
    assert args.train is None and args.epochs == epochs
    tokenizer, special = ft.load_checked_tokenizer(s)
    data, names = ft.load_data(args, s, tokenizer, special)
    assert [len(data[n][0]) for n in ("train", "validation", "test")] == [2000, 500, 500]
    if task == "multiple-choice":
        assert names is None and set(data["train"][1]) == {0, 1, 2, 3}
    else:
        assert names == list(TAGS)
