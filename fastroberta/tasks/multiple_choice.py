"""The multiple-choice family (RACE, SWAG, a user's own data): readers, features ``[C, L]`` per example, batches
``[B, C, L]`` for RobertaForMultipleChoice and accuracy (the bundled task is in swapped_words.py).

Each choice is one pair in RoBERTa's format, ``<s> context </s></s> question + option </s>``: SWAG's context is
``sent1`` and its second segment ``sent2 + " " + ending``; RACE's context is the article and its second segment
the question with the option filling its blank ``_`` (a cloze question) or after it. When a pair is too long the
context loses tokens from its end first: the question and the option are what the choice is about.
"""
import csv
import json
import os
from dataclasses import dataclass
from typing import List

import numpy as np
import torch

from fastroberta.tasks.batching import padded_length
from fastroberta.tasks.errors import DataError
from fastroberta.tasks.metrics import accuracy
from fastroberta.tasks.readers import hf_source, json_lines, load_hf

SWAG_ENDINGS = ("ending0", "ending1", "ending2", "ending3")


@dataclass
class ChoiceSplit:
    """Raw examples of one split: a context and the second segment of every choice per example, the index of the
    right choice (None where unlabelled) and where each example came from (for error messages)."""
    name: str
    source: str
    contexts: List[str]
    choices: List[List[str]]
    labels: list
    rows: List[str]

    @property
    def num_choices(self):
        return len(self.choices[0])


def race_second(question, option):
    """The second segment of a RACE choice: the option fills a cloze question's blank, else follows the
    question."""
    return question.replace("_", option) if "_" in question else f"{question} {option}".strip()


def _letter_index(answer, n, where):
    """The index of answer letter ``A``.. (or an integer index) among ``n`` options."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
        index = ord(answer.strip().upper()) - ord("A")
    else:
        raise DataError(f"{where}: answer {answer!r} is not a letter A-{chr(ord('A') + n - 1)}")
    if not 0 <= index < n:
        raise DataError(f"{where}: answer {answer!r} is out of range for {n} options "
                        f"(A-{chr(ord('A') + n - 1)})")
    return index


def _race_record(record, where, need_labels, out):
    """Append the questions of one RACE record: HF's form (``article``, ``question``, ``options``, ``answer``) or
    the original per-article form (``article``, ``questions``, ``options`` lists, ``answers``)."""
    if not isinstance(record, dict):
        raise DataError(f"{where} must hold a JSON object, got {type(record).__name__}")
    if "article" not in record:
        raise DataError(f"{where}: no field 'article' (fields there: {', '.join(map(str, record))})")
    if "questions" in record:
        questions, options = record["questions"], record.get("options")
        answers = record.get("answers")
        if not isinstance(options, list) or len(options) != len(questions):
            raise DataError(f"{where}: 'options' must hold one list of options per question "
                            f"({len(questions)} questions)")
        if answers is not None and (not isinstance(answers, list) or len(answers) != len(questions)):
            raise DataError(f"{where}: 'answers' must hold one letter per question ({len(questions)} questions)")
        items = [(q, o, None if answers is None else answers[i], f"{where} question {i + 1}")
                 for i, (q, o) in enumerate(zip(questions, options))]
    else:
        for f in ("question", "options"):
            if f not in record:
                raise DataError(f"{where}: no field {f!r} (fields there: {', '.join(map(str, record))})")
        items = [(record["question"], record["options"], record.get("answer"), where)]
    for question, options, answer, at in items:
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise DataError(f"{at}: 'options' must be a list of at least two strings")
        if answer is None and need_labels:
            raise DataError(f"{at}: no field 'answer' (a letter A-{chr(ord('A') + len(options) - 1)})")
        out.contexts.append(str(record["article"]))
        out.choices.append([race_second(str(question), o) for o in options])
        out.labels.append(None if answer is None else _letter_index(answer, len(options), at))
        out.rows.append(at)


def _json_records(path):
    """(where, record) of a JSON file (one object, or a list of them) or a JSON-lines file (.jsonl / .ndjson, or
    a .json that does not parse as a whole)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    whole = None
    if not path.lower().endswith((".jsonl", ".ndjson")):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            pass
    if isinstance(whole, dict):
        return [(path, whole)]
    if isinstance(whole, list):
        return [(f"{path} record {i + 1}", r) for i, r in enumerate(whole)]
    return [(f"{path} {where}", record) for where, record in json_lines(path)]


def read_race(path, split="train", need_labels=True):
    """A ChoiceSplit from RACE data: a JSON / JSONL file of HF-form rows, one original per-article JSON file, or
    a folder of them (RACE's own ``train/high/*.txt`` layout, read recursively in sorted order)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                       if f.endswith((".txt", ".json", ".jsonl")))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"--{split} {path!r} does not exist")
    out = ChoiceSplit(split, path, [], [], [], [])
    for file in files:
        for where, record in _json_records(file):
            _race_record(record, where, need_labels, out)
    return _checked(out, split)


def _swag_row(row, where, need_labels, out):
    missing = [f for f in SWAG_ENDINGS if row.get(f) is None]
    if missing:
        raise DataError(f"{where}: no field {missing[0]!r} (fields there: {', '.join(map(str, row))})")
    if row.get("sent1") is not None:
        context, lead = str(row["sent1"]), str(row.get("sent2") or "")
    elif row.get("startphrase") is not None:
        context, lead = str(row["startphrase"]), ""
    else:
        raise DataError(f"{where}: no field 'sent1' or 'startphrase' (fields there: {', '.join(map(str, row))})")
    label = row.get("label")
    if label in (None, "") and need_labels:
        raise DataError(f"{where}: no field 'label' (the index 0-3 of the right ending)")
    if label not in (None, ""):
        try:
            label = int(float(label))
        except (TypeError, ValueError):
            raise DataError(f"{where}: label {row['label']!r} is not an ending index 0-3") from None
        if not 0 <= label < len(SWAG_ENDINGS):
            raise DataError(f"{where}: label {row['label']!r} is out of range (0-3)")
    else:
        label = None
    out.contexts.append(context)
    out.choices.append([f"{lead} {row[f]}".strip() for f in SWAG_ENDINGS])
    out.labels.append(label)
    out.rows.append(where)


def read_swag(path, split="train", need_labels=True):
    """A ChoiceSplit from SWAG data: a CSV (SWAG's own files, HF's columns) or a JSONL file with ``sent1``,
    ``sent2`` (or ``startphrase`` alone), ``ending0`` .. ``ending3`` and ``label``."""
    if not os.path.isfile(path):
        raise DataError(f"--{split} {path!r} does not exist")
    out = ChoiceSplit(split, path, [], [], [], [])
    if path.lower().endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            for i, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path} line {i}: {len(row)} columns but the header has {len(header)}")
                _swag_row(dict(zip(header, row)), f"{path} line {i}", need_labels, out)
    else:
        for where, record in _json_records(path):
            if not isinstance(record, dict):
                raise DataError(f"{where} must hold a JSON object, got {type(record).__name__}")
            _swag_row(record, where, need_labels, out)
    return _checked(out, split)


def read_choices_hf(spec, split="train", need_labels=True, form=None):
    """A ChoiceSplit from ``hf:race:all`` (RACE's rows: example_id, article, question, options, answer letter),
    ``hf:swag:regular`` (SWAG's: sent1, sent2, ending0..3, label; -1 on the unlabelled test split) or another
    ``hf:<dataset>[:<config>][@<split>]`` in either form (``form`` None: SWAG when the rows have ``ending0``)."""
    rows, hf_split = load_hf(spec, split, "RACE or SWAG files")
    source = hf_source(spec, hf_split)
    if form is None:
        form = "swag" if "ending0" in rows.column_names else "race"
    out = ChoiceSplit(split, source, [], [], [], [])
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        if form == "race":
            _race_record(row, where, need_labels, out)
        else:
            _swag_row({**row, "label": None} if row.get("label") == -1 else row, where, need_labels, out)
    return _checked(out, split)


def read_choices(path, split="train", need_labels=True, form=None):
    """A ChoiceSplit in RACE or SWAG form, from files or ``hf:`` (``read_choices_hf``); ``form`` None tells them
    apart by the first record's fields."""
    if path.startswith("hf:"):
        return read_choices_hf(path, split, need_labels, form)
    if form is None:
        if os.path.isdir(path) or not path.lower().endswith(".csv"):
            first = None
            if os.path.isfile(path):
                records = _json_records(path)
                first = records[0][1] if records else None
            form = "swag" if isinstance(first, dict) and "ending0" in first else "race"
        else:
            form = "swag"
    return read_race(path, split, need_labels) if form == "race" else read_swag(path, split, need_labels)


def _checked(out, split):
    if not out.contexts:
        raise DataError(f"--{split} {out.source!r} holds no examples")
    n = len(out.choices[0])
    for choices, where in zip(out.choices, out.rows):
        if len(choices) != n:
            raise DataError(f"{where}: {len(choices)} options, but the first example has {n}; every example of a "
                            "split needs the same number")
    if all(label is None for label in out.labels):
        out.labels = [None] * len(out.labels)
    elif any(label is None for label in out.labels):
        where = out.rows[out.labels.index(None)]
        raise DataError(f"{where}: no answer, while other examples of the split have one")
    return out


def truncate_context_first(context, second, budget):
    """Fit a pair into ``budget`` tokens: drop the context's last tokens first, then, if the second segment
    alone is too long, its last tokens."""
    keep = max(budget - len(second), 0)
    return context[:keep], second[:budget - min(len(context), keep)]


def choice_features(split, tokenizer, max_seq_len, special):
    """Per example, C lists of ids ``<s> context </s></s> second </s>`` within ``max_seq_len``."""
    bos, eos = special["bos"], special["eos"]
    contexts = [e.ids for e in tokenizer.encode_batch(split.contexts, add_special_tokens=False)]
    flat = [c for choices in split.choices for c in choices]
    seconds = [e.ids for e in tokenizer.encode_batch(flat, add_special_tokens=False)]
    n, out = split.num_choices, []
    for i, context in enumerate(contexts):
        example = []
        for second in seconds[i * n:(i + 1) * n]:
            a, b = truncate_context_first(context, second, max_seq_len - 4)
            example.append([bos] + a + [eos, eos] + b + [eos])
        out.append(example)
    return out


def collate_choices(features, pad_id, labels=None, multiple=1, limit=None):
    """``input_ids`` / ``attention_mask`` ``[B, C, L]``, right-padded to the longest choice of the batch (rounded
    up as ``batching.collate`` does), and ``labels`` ``[B]`` (the right choice)."""
    n = len(features[0])
    length = padded_length(max(len(x) for ex in features for x in ex), multiple, limit)
    input_ids = torch.full((len(features), n, length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), n, length), dtype=torch.long)
    for i, ex in enumerate(features):
        for c, x in enumerate(ex):
            input_ids[i, c, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, c, :len(x)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = torch.as_tensor(np.asarray(labels, np.int64))
    return batch


def choice_metrics(logits, labels):
    """{"accuracy"}: the share of examples whose highest-scoring choice is the right one."""
    return {"accuracy": accuracy(np.asarray(logits).argmax(-1), labels)}
