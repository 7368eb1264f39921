"""Extractive question answering, reading and features: SQuAD-format JSON or JSONL into examples, and examples into
model inputs, question first (``<s> question </s></s> context </s>``), a long context cut into overlapping windows.

    examples = read_qa("dev-v2.0.json")           # or a .jsonl of {id, context, question, answers{text, answer_start}}
    features = qa_features(examples, tokenizer, special, max_seq_len=384, doc_stride=128)
    features.input_ids[f], features.start_positions[f], features.offsets[f], features.example_index[f]

A window's answer positions come from the tokenizer's character offsets; an answer not wholly inside a window points
at position 0 (``<s>``), as Hugging Face's ``run_qa.py`` does, and so does an unanswerable question. Post-processing
and the SQuAD metrics: ``qa_eval.py``.
"""
import json
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from fastroberta.tasks.errors import DataError
from fastroberta.tasks.readers import hf_source, json_lines, load_hf
from fastroberta.training.errors import ConfigError


@dataclass
class QAExample:
    """One question on one context. ``answers`` holds (text, character start) pairs, empty for an unanswerable
    question (SQuAD 2.0); None when the data gives no answers at all (a test split). ``where`` names the record for
    error messages."""
    id: str
    question: str
    context: str
    answers: Optional[List[tuple]]
    where: str

    @property
    def is_impossible(self):
        return self.answers is not None and not self.answers


def _check_answers(path, where, context, answers):
    """The (text, start) answers of one question, each checked against the context."""
    out = []
    for k, (text, start) in enumerate(answers):
        if not isinstance(text, str) or not text:
            raise DataError(f"{path} {where}: answer {k} has no text (field 'text')")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise DataError(f"{path} {where}: answer {k} has answer_start {start!r}; it must be an integer >= 0")
        found = context[start:start + len(text)]
        if found != text:
            raise DataError(f"{path} {where}: answer {k} {text!r} does not match the context at answer_start "
                            f"{start} (the context there reads {found!r})")
        out.append((text, start))
    return out


def _text_field(path, where, record, name):
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path} {where}: no {name} (field {name!r} is missing or empty)")
    return value


def _read_squad_json(path, need_answers):
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON (line {e.lineno}): {e.msg}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"{path}: a SQuAD file holds {{\"data\": [{{\"paragraphs\": [...]}}, ...]}}; no 'data' list")
    examples = []
    for i, article in enumerate(doc["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise DataError(f"{path} data[{i}]: no 'paragraphs' list")
        for j, paragraph in enumerate(paragraphs):
            where = f"data[{i}].paragraphs[{j}]"
            if not isinstance(paragraph, dict):
                raise DataError(f"{path} {where}: must be an object with 'context' and 'qas'")
            context = _text_field(path, where, paragraph, "context")
            qas = paragraph.get("qas")
            if not isinstance(qas, list):
                raise DataError(f"{path} {where}: no 'qas' list")
            for k, qa in enumerate(qas):
                where_q = f"{where}.qas[{k}]"
                if not isinstance(qa, dict):
                    raise DataError(f"{path} {where_q}: must be an object with 'id', 'question' and 'answers'")
                raw = qa.get("answers")
                if raw is not None and not isinstance(raw, list):
                    raise DataError(f"{path} {where_q}: 'answers' must be a list of {{text, answer_start}}")
                if raw is not None and not all(isinstance(a, dict) for a in raw):
                    raise DataError(f"{path} {where_q}: 'answers' must be a list of {{text, answer_start}}")
                pairs = None if raw is None else [(a.get("text"), a.get("answer_start")) for a in raw]
                examples.append(_example(path, where_q, qa, context, pairs, qa.get("is_impossible"), need_answers))
    return examples


def _row_example(path, where, row, need_answers):
    """The example of one JSONL line or Hugging Face row: ``context``, ``question``, ``id`` and ``answers`` as
    {"text": [...], "answer_start": [...]}."""
    context = _text_field(path, where, row, "context")
    raw = row.get("answers")
    pairs = None
    if raw is not None:
        texts = raw.get("text") if isinstance(raw, dict) else None
        starts = raw.get("answer_start") if isinstance(raw, dict) else None
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise DataError(f"{path} {where}: 'answers' must be {{\"text\": [...], \"answer_start\": [...]}} "
                            "with one start per text")
        pairs = list(zip(texts, starts))
    return _example(path, where, row, context, pairs, row.get("is_impossible"), need_answers)


def _read_qa_jsonl(path, need_answers):
    return [_row_example(path, where, row, need_answers) for where, row in json_lines(path)]


def _example(path, where, record, context, pairs, is_impossible, need_answers):
    qid = record.get("id")
    if isinstance(qid, bool) or not isinstance(qid, (str, int)) or str(qid) == "":
        raise DataError(f"{path} {where}: no id (field 'id'); predictions.json is keyed by it")
    question = _text_field(path, where, record, "question")
    if pairs is None:
        if need_answers:
            raise DataError(f"{path} {where}: no answers (field 'answers'); give an empty list for an unanswerable "
                            "question")
        answers = None
    else:
        answers = _check_answers(path, where, context, pairs)
        if is_impossible and answers:
            raise DataError(f"{path} {where}: is_impossible is true but the question has answers")
    return QAExample(str(qid), question, context, answers, where)


def _read_qa_hf(spec, split, need_answers):
    """``hf:squad`` / ``hf:squad_v2`` / ``hf:<dataset>[:<config>]``, ``@<split>`` to pick a split: rows with the
    JSONL fields (``answers`` as {"text": [...], "answer_start": [...]}, empty lists for an unanswerable
    question)."""
    rows, hf_split = load_hf(spec, split, "SQuAD .json / .jsonl files")
    source = hf_source(spec, hf_split)
    return [_row_example(source, f"row {i}", row, need_answers) for i, row in enumerate(rows)]


def read_qa(path, split="train", need_answers=True):
    """The examples of a SQuAD-format .json file, a .jsonl file (one question per line) or ``hf:<dataset>``;
    DataError naming the file, the record (``data[i].paragraphs[j].qas[k]``, ``line n`` or ``row n``) and the
    field on any problem."""
    if path.startswith("hf:"):
        examples = _read_qa_hf(path, split, need_answers)
    elif not os.path.isfile(path):
        raise DataError(f"--{split} {path!r} does not exist")
    else:
        ext = os.path.splitext(path)[1].lower()
        if ext == ".json":
            examples = _read_squad_json(path, need_answers)
        elif ext in (".jsonl", ".ndjson"):
            examples = _read_qa_jsonl(path, need_answers)
        else:
            raise DataError(f"--{split} {path!r}: unknown format {ext or '(no extension)'}; question answering "
                            "reads SQuAD .json or .jsonl")
    if not examples:
        raise DataError(f"--{split} {path!r} holds no questions")
    seen = {}
    for e in examples:
        if e.id in seen:
            raise DataError(f"{path} {e.where}: id {e.id!r} repeats the one at {seen[e.id]}; ids must be unique")
        seen[e.id] = e.where
    return examples


@dataclass(frozen=True)
class QATask:
    """A question-answering preset of fastroberta-finetune. ``version_2``: unanswerable questions exist (SQuAD
    2.0: the no-answer threshold is picked on validation and the best model chosen by best_f1); None: decided by
    the data (any unanswerable question in the training or validation split)."""
    name: str
    version_2: Optional[bool]
    hf: Optional[str] = None
    regression = False

    @property
    def metric(self):
        return "best_f1" if self.version_2 else "f1"


QA_TASKS = {"squad": QATask("squad", False, "squad"), "squad_v2": QATask("squad_v2", True, "squad_v2"),
            "qa": QATask("qa", None)}


@dataclass
class QAFeatures:
    """One row per window. ``offsets[f]`` is an int32 [len(input_ids[f]), 2] array of each token's character span
    in its example's context, (-1, -1) for question and special tokens; ``start_positions`` / ``end_positions``
    are None when the examples carry no answers."""
    input_ids: List[list]
    offsets: List[np.ndarray]
    example_index: np.ndarray
    start_positions: Optional[np.ndarray]
    end_positions: Optional[np.ndarray]


def context_windows(n_tokens, budget, doc_stride):
    """(first, end) token ranges covering ``n_tokens`` context tokens, ``budget`` at a time, consecutive windows
    overlapping by ``doc_stride`` tokens (Hugging Face's meaning of the stride)."""
    windows, first = [], 0
    while True:
        end = min(first + budget, n_tokens)
        windows.append((first, end))
        if end == n_tokens:
            return windows
        first += budget - doc_stride


def answer_tokens(offsets, start_char, end_char):
    """(first, last) indices into ``offsets`` (one window's context tokens) of the tokens that cover the characters
    [start_char, end_char): the first token ending after the start and the last one starting before the end, so
    spaces around an answer (which the tokenizer's offsets leave out) are skipped. None when the answer is not
    wholly inside the window."""
    if not len(offsets) or offsets[0][0] > start_char or offsets[-1][1] < end_char:
        return None
    first = next(i for i, (_, b) in enumerate(offsets) if b > start_char)
    last = max(i for i, (a, _) in enumerate(offsets) if a < end_char)
    return first, max(first, last)


def qa_features(examples, tokenizer, special, max_seq_len=384, doc_stride=128, max_question_len=64):
    """Windows of every example as model inputs (see the module docstring). A question longer than
    ``max_question_len`` tokens keeps its first ones; the context gets the rest of ``max_seq_len``."""
    if max_seq_len - max_question_len - 4 <= doc_stride:
        raise ConfigError(f"--max-seq-len {max_seq_len} leaves at most {max_seq_len - max_question_len - 4} context "
                          f"tokens per window after a {max_question_len}-token question, not more than --doc-stride "
                          f"{doc_stride}; raise --max-seq-len or lower --doc-stride")
    bos, eos = special["bos"], special["eos"]
    questions = tokenizer.encode_batch([e.question for e in examples], add_special_tokens=False)
    contexts = tokenizer.encode_batch([e.context for e in examples], add_special_tokens=False)
    with_answers = all(e.answers is not None for e in examples)
    ids, offsets, example_index, starts, ends = [], [], [], [], []
    for n, (example, q, c) in enumerate(zip(examples, questions, contexts)):
        q_ids = q.ids[:max_question_len]
        head = [bos] + q_ids + [eos, eos]
        budget = max_seq_len - len(head) - 1
        c_offsets = c.offsets
        for first, end in context_windows(len(c.ids), budget, doc_stride):
            ids.append(head + c.ids[first:end] + [eos])
            window_offsets = np.full((len(ids[-1]), 2), -1, np.int32)
            if end > first:
                window_offsets[len(head):len(head) + end - first] = c_offsets[first:end]
            offsets.append(window_offsets)
            example_index.append(n)
            if with_answers:
                span = None
                if example.answers:
                    text, start = example.answers[0]
                    span = answer_tokens(c_offsets[first:end], start, start + len(text))
                starts.append(len(head) + span[0] if span else 0)
                ends.append(len(head) + span[1] if span else 0)
    return QAFeatures(ids, offsets, np.asarray(example_index, np.int64),
                      np.asarray(starts, np.int64) if with_answers else None,
                      np.asarray(ends, np.int64) if with_answers else None)
