"""Sequence classification / regression tasks for ``fastroberta-finetune``: task presets (the eight GLUE tasks and
a small task generated from the bundled corpus), reading labelled examples from CSV / TSV / JSONL files or
Hugging Face ``datasets``, tokenising them into RoBERTa's single / pair format, batching with dynamic padding,
and the task metrics.

Every problem with the data raises ``DataError`` with one line that names the file, the row and the field.
"""
import csv
import json
import math
import os
import random
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch

from fastroberta.training.ds_config import ConfigError


class DataError(ConfigError):
    """Bad task data (missing field, unknown label, empty split, non-numeric regression label ...)."""


# ----------------------------------------------------------------------------------------------------------
# Task presets
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    name: str
    text_fields: tuple                # one field, or two for sentence pairs
    label_field: str = "label"
    labels: Optional[tuple] = None    # class names in id order; None: read from the training split
    regression: bool = False
    metric: str = "accuracy"          # the metric that picks the best checkpoint (higher is better)
    hf: Optional[tuple] = None        # (dataset, config) for hf:glue:<task>
    hf_splits: dict = field(default_factory=lambda: {"train": "train", "validation": "validation",
                                                      "test": "test"})

    @property
    def num_labels(self):
        return 1 if self.regression else len(self.labels)


# GLUE as distributed by Hugging Face datasets (field names) and by gluebenchmark.com (the same names in the
# TSVs for SST-2, CoLA has no header there). Class names are the integer ids as strings, except MNLI/QNLI/RTE
# whose files carry the words; HF datasets gives ids, mapped to these names.
GLUE = {
    "cola": Task("cola", ("sentence",), labels=("0", "1"), metric="mcc", hf=("glue", "cola")),
    "sst2": Task("sst2", ("sentence",), labels=("0", "1"), hf=("glue", "sst2")),
    "mrpc": Task("mrpc", ("sentence1", "sentence2"), labels=("0", "1"), metric="f1", hf=("glue", "mrpc")),
    "qqp": Task("qqp", ("question1", "question2"), labels=("0", "1"), metric="f1", hf=("glue", "qqp")),
    "stsb": Task("stsb", ("sentence1", "sentence2"), regression=True, metric="pearson", hf=("glue", "stsb")),
    "mnli": Task("mnli", ("premise", "hypothesis"), labels=("entailment", "neutral", "contradiction"),
                 hf=("glue", "mnli"), hf_splits={"train": "train", "validation": "validation_matched",
                                                 "test": "test_matched"}),
    "qnli": Task("qnli", ("question", "sentence"), labels=("entailment", "not_entailment"), hf=("glue", "qnli")),
    "rte": Task("rte", ("sentence1", "sentence2"), labels=("entailment", "not_entailment"), hf=("glue", "rte")),
}
WORD_ORDER = Task("word-order", ("text",), labels=("original", "shuffled"))
# Custom tasks: fields from --text-fields / --label-field, classes from the training split.
CUSTOM = {"classification": Task("classification", ("text",)),
          "regression": Task("regression", ("text",), regression=True, metric="pearson")}
TASKS = {**GLUE, "word-order": WORD_ORDER, **CUSTOM}
METRICS = ("accuracy", "f1", "mcc", "pearson", "spearman")


def get_task(name, text_fields=None, label_field=None, metric=None):
    """The preset ``name`` with the user's field / metric overrides applied."""
    if name not in TASKS:
        raise ConfigError(f"unknown --task {name!r}; choose one of {', '.join(TASKS)}")
    task = TASKS[name]
    changes = {}
    if text_fields:
        fields = tuple(f.strip() for f in text_fields.split(","))
        if not 1 <= len(fields) <= 2 or not all(fields):
            raise ConfigError(f"--text-fields takes one field or two separated by a comma, got {text_fields!r}")
        changes["text_fields"] = fields
    if label_field:
        changes["label_field"] = label_field
    if metric:
        if metric not in METRICS:
            raise ConfigError(f"unknown --metric {metric!r}; choose one of {', '.join(METRICS)}")
        if task.regression != (metric in ("pearson", "spearman")):
            kind = "regression" if task.regression else "classification"
            raise ConfigError(f"--metric {metric} does not fit a {kind} task")
        changes["metric"] = metric
    if changes:
        task = Task(**{**task.__dict__, **changes})
    return task


# ----------------------------------------------------------------------------------------------------------
# Metrics (higher is better for all of them)
# ----------------------------------------------------------------------------------------------------------
def accuracy(preds, labels):
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean()) if len(labels) else 0.0


def f1_score(preds, labels, positive=1):
    """F1 of the positive class (GLUE's MRPC / QQP convention: class 1)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    tp = int(((preds == positive) & (labels == positive)).sum())
    fp = int(((preds == positive) & (labels != positive)).sum())
    fn = int(((preds != positive) & (labels == positive)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews_corrcoef(preds, labels):
    """Matthews correlation (multi-class form, which is the usual one for two classes); 0 when undefined."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    classes = np.union1d(preds, labels)
    index = {c: i for i, c in enumerate(classes)}
    cm = np.zeros((len(classes), len(classes)), dtype=np.float64)
    for p, t in zip(preds, labels):
        cm[index[t], index[p]] += 1
    t_sum, p_sum = cm.sum(axis=1), cm.sum(axis=0)
    n, correct = cm.sum(), np.trace(cm)
    cov_tp = correct * n - (t_sum * p_sum).sum()
    denom = math.sqrt((n * n - (p_sum ** 2).sum()) * (n * n - (t_sum ** 2).sum()))
    return float(cov_tp / denom) if denom else 0.0


def pearson(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom else 0.0


def _ranks(x):
    """Ranks 1..n with ties given their average rank."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y):
    return pearson(_ranks(x), _ranks(y))


def compute_metrics(task, preds, labels):
    """The task's metrics: accuracy (+ F1 for F1 tasks, + MCC for MCC tasks) or Pearson and Spearman."""
    if task.regression:
        return {"pearson": pearson(preds, labels), "spearman": spearman(preds, labels)}
    out = {"accuracy": accuracy(preds, labels)}
    if task.metric == "f1":
        out["f1"] = f1_score(preds, labels)
    if task.metric == "mcc":
        out["mcc"] = matthews_corrcoef(preds, labels)
    return out


# ----------------------------------------------------------------------------------------------------------
# Reading examples
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Split:
    """Raw examples of one split: the texts (one or two per row), the labels as read (str / float / None) and
    where each row came from (for error messages)."""
    name: str
    source: str
    texts: List[tuple]
    labels: list
    rows: List[int]


def _read_table(path, delimiter):
    with open(path, newline="", encoding="utf-8") as f:
        # GLUE's TSVs hold unbalanced quotes in sentences: tab-separated files are read without quoting.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        try:
            header = next(reader)
        except StopIteration:
            return [], []
        rows = []
        for i, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path} line {i}: {len(row)} columns but the header has {len(header)}")
            rows.append((i, dict(zip(header, row))))
        return header, rows


def _read_jsonl(path):
    rows, columns = [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {i} is not valid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {i} must hold a JSON object, got {type(row).__name__}")
            for k in row:
                if k not in columns:
                    columns.append(k)
            rows.append((i, row))
    return columns, rows


def read_file(path, split, task, need_labels):
    """A Split from a .csv / .tsv / .jsonl (or .json lines) file."""
    if not os.path.isfile(path):
        raise DataError(f"--{split} {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        columns, rows = _read_table(path, ",")
    elif ext == ".tsv":
        columns, rows = _read_table(path, "\t")
    elif ext in (".jsonl", ".json", ".ndjson"):
        columns, rows = _read_jsonl(path)
    else:
        raise DataError(f"--{split} {path!r}: unknown format {ext or '(no extension)'}; use .csv, .tsv or .jsonl")
    if not rows:
        raise DataError(f"--{split} {path!r} holds no examples")
    has_labels = need_labels or any(task.label_field in r for _, r in rows)
    texts, labels, lines = [], [], []
    for line, row in rows:
        missing = [f for f in task.text_fields + ((task.label_field,) if has_labels else ()) if row.get(f) is None]
        if missing:
            raise DataError(f"{path} line {line}: no field {missing[0]!r} (fields there: {', '.join(map(str, row))}); "
                            "set --text-fields / --label-field")
        texts.append(tuple(str(row[f]) for f in task.text_fields))
        labels.append(row[task.label_field] if has_labels else None)
        lines.append(line)
    return Split(split, path, texts, labels, lines)


def read_hf(spec, split, task, need_labels):
    """A Split from ``hf:glue:<task>`` or ``hf:<dataset>[:<config>]``, with ``@<split>`` to pick a split."""
    name, _, hf_split = spec[3:].partition("@")
    try:
        import datasets
    except ImportError:
        raise DataError(f"--{split} {spec}: reading Hugging Face datasets needs the `datasets` package "
                        "(pip install datasets), or give CSV / TSV / JSONL files") from None
    parts = name.split(":")
    path, config = parts[0], (parts[1] if len(parts) > 1 else None)
    if not hf_split:
        hf_split = task.hf_splits.get(split, split) if task.hf == (path, config) else split
    try:
        ds = datasets.load_dataset(path, config, split=hf_split)
    except Exception as e:  # network, unknown dataset / split: all end the run the same way
        raise DataError(f"--{split} {spec}: loading split {hf_split!r} failed: {str(e).splitlines()[0]}") from None
    missing = [f for f in task.text_fields + (task.label_field,) if f not in ds.column_names]
    if missing and (need_labels or missing != [task.label_field]):
        raise DataError(f"--{split} {spec}: no field {missing[0]!r} (fields: {', '.join(ds.column_names)}); "
                        "set --text-fields / --label-field")
    names = None
    feature = ds.features.get(task.label_field)
    if feature is not None and hasattr(feature, "names"):
        names = task.labels if task.labels and len(task.labels) == len(feature.names) else feature.names
    texts, labels = [], []
    for row in ds:
        texts.append(tuple(str(row[f]) for f in task.text_fields))
        label = row.get(task.label_field)
        if names is not None and label is not None:
            label = None if label < 0 else names[label]  # GLUE's test splits carry -1
        labels.append(label)
    if all(label is None for label in labels):
        labels = [None] * len(labels)
    return Split(split, spec, texts, labels, list(range(len(texts))))


def read_split(spec, split, task, need_labels=True):
    if spec.startswith("hf:"):
        out = read_hf(spec, split, task, need_labels)
    else:
        out = read_file(spec, split, task, need_labels)
    if not out.texts:
        raise DataError(f"--{split} {spec!r} holds no examples")
    return out


def label_names(task, train):
    """The class names in id order: the preset's, or the sorted distinct labels of the training split."""
    if task.regression:
        return None
    if task.labels is not None:
        return list(task.labels)
    values = sorted({str(v) for v in train.labels}, key=lambda v: (0, float(v), v) if _is_number(v) else (1, 0, v))
    if len(values) < 2:
        raise DataError(f"--train {train.source}: the label field {task.label_field!r} takes only one value "
                        f"({values[0]!r}); classification needs at least two classes")
    return values


def _is_number(v):
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def encode_labels(task, split, names):
    """The split's labels as class ids (int64) or floats (regression); None when the split has none."""
    if all(v is None for v in split.labels):
        return None
    if task.regression:
        out = []
        for v, row in zip(split.labels, split.rows):
            if not _is_number(v):
                raise DataError(f"{split.source} line {row}: label {v!r} in {task.label_field!r} is not a number; "
                                "a regression task needs numeric labels")
            out.append(float(v))
        return np.asarray(out, np.float32)
    index = {n: i for i, n in enumerate(names)}
    out = []
    for v, row in zip(split.labels, split.rows):
        key = str(v)
        if key not in index and isinstance(v, float) and v.is_integer():
            key = str(int(v))  # JSON 1.0 for class "1"
        if key not in index:
            raise DataError(f"{split.source} line {row}: unknown label {v!r} in {task.label_field!r}; the classes "
                            f"are {', '.join(map(repr, names))}")
        out.append(index[key])
    return np.asarray(out, np.int64)


# ----------------------------------------------------------------------------------------------------------
# Tokenising and batching
# ----------------------------------------------------------------------------------------------------------
def truncate_pair(a, b, budget):
    """Longest-first: drop tokens from the end of the longer of ``a`` / ``b`` until both fit ``budget``."""
    la, lb = len(a), len(b)
    while la + lb > budget:
        if la > lb:
            la -= 1
        else:
            lb -= 1
    return a[:la], b[:lb]


def tokenize(split, tokenizer, max_seq_len, special):
    """Lists of ids in RoBERTa's format: ``<s> A </s>`` or ``<s> A </s></s> B </s>``, truncated to
    ``max_seq_len`` (pairs longest-first)."""
    bos, eos = special["bos"], special["eos"]
    columns = list(zip(*split.texts))
    encoded = [[e.ids for e in tokenizer.encode_batch(list(col), add_special_tokens=False)] for col in columns]
    out = []
    if len(encoded) == 1:
        for a in encoded[0]:
            out.append([bos] + a[:max_seq_len - 2] + [eos])
    else:
        for a, b in zip(*encoded):
            a, b = truncate_pair(a, b, max_seq_len - 4)
            out.append([bos] + a + [eos, eos] + b + [eos])
    return out


def padded_length(longest, multiple=1, limit=None):
    """The batch length for a longest row of ``longest`` tokens: rounded up to a multiple of ``multiple``, but
    never past ``limit`` (the run's --max-seq-len) unless the row itself is longer."""
    length = -(-longest // multiple) * multiple
    if limit is not None:
        length = min(length, max(limit, longest))
    return length


def collate(ids_list, pad_id, labels=None, multiple=1, limit=None):
    """Right-pad to the longest row of the batch (dynamic padding), rounded up to a multiple of ``multiple``
    tokens (at most ``limit``): fewer distinct shapes for torch.compile and the kernels' autotuner, and
    tensor-core friendly sizes on a GPU. Padding never changes a real token's output."""
    length = padded_length(max(len(x) for x in ids_list), multiple, limit)
    input_ids = torch.full((len(ids_list), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids_list), length), dtype=torch.long)
    for i, x in enumerate(ids_list):
        input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, :len(x)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = torch.as_tensor(labels)
    return batch


class TaskLoader:
    """Training batches: each epoch a seeded shuffle of the examples (optionally grouped by length: chunks of
    50 global batches sorted by length, then the batches shuffled), cut into global batches (the last partial
    one dropped), each split into micro-batches per rank. Its position (epoch, step in epoch) is its state."""

    def __init__(self, ids, labels, pad_id, micro_batch_size, global_batch_size, rank=0, world_size=1, seed=0,
                 group_by_length=False, pad_multiple=1, pad_limit=None):
        self.ids, self.labels, self.pad_id = ids, labels, pad_id
        self.pad_multiple, self.pad_limit = pad_multiple, pad_limit
        self.micro, self.global_batch = micro_batch_size, global_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.group_by_length = group_by_length
        self.steps_per_epoch = len(ids) // global_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"the training split holds {len(ids)} examples, fewer than one global batch "
                            f"({global_batch_size}); lower --global-batch-size")
        self.epoch, self.position = 0, 0

    def order(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.ids))
        if self.group_by_length:
            lengths = np.array([len(x) for x in self.ids])
            chunk = 50 * self.global_batch
            order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")]
                                    for c in np.array_split(order, range(chunk, len(order), chunk))])
            n = self.steps_per_epoch * self.global_batch
            batches = order[:n].reshape(self.steps_per_epoch, self.global_batch)
            order = batches[rng.permutation(self.steps_per_epoch)].reshape(-1)
        return order[:self.steps_per_epoch * self.global_batch]

    def __iter__(self):
        while True:
            order = self.order(self.epoch)
            while self.position < self.steps_per_epoch:
                batch = order[self.position * self.global_batch:(self.position + 1) * self.global_batch]
                self.position += 1
                per_micro = self.micro * self.world_size
                for m in range(self.global_batch // per_micro):
                    part = batch[m * per_micro + self.rank * self.micro:m * per_micro + (self.rank + 1) * self.micro]
                    yield collate([self.ids[i] for i in part], self.pad_id, self.labels[part],
                                  self.pad_multiple, self.pad_limit)
            self.epoch += 1
            self.position = 0

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": len(self.ids)}

    def load_state_dict(self, state):
        if state["size"] != len(self.ids):
            raise DataError(f"the checkpoint was trained on {state['size']} examples, this training split has "
                            f"{len(self.ids)}")
        self.epoch, self.position = state["epoch"], state["position"]


def eval_batches(ids, batch_size, pad_id, rank=0, world_size=1, pad_multiple=1, pad_limit=None):
    """(example indices, batch) for this rank's share of an evaluation split; every rank yields the same
    number of batches (a rank short of examples repeats its last ones, flagged by index -1)."""
    per_rank = -(-len(ids) // world_size)
    mine = list(range(rank, len(ids), world_size))
    for s in range(-(-per_rank // batch_size)):
        idx = mine[s * batch_size:(s + 1) * batch_size]
        if not idx:
            yield [-1], collate([ids[0]], pad_id, None, pad_multiple, pad_limit)
        else:
            yield idx, collate([ids[i] for i in idx], pad_id, None, pad_multiple, pad_limit)


# ----------------------------------------------------------------------------------------------------------
# The bundled task: is a line of Shakespeare in its own word order, or shuffled?
# ----------------------------------------------------------------------------------------------------------
def word_order_task(corpus_path=None, n_train=2000, n_validation=500, n_test=500, seed=1234):
    """{"train" | "validation" | "test": list of {"text", "label"}} built deterministically from the bundled
    corpus: spoken lines of 6 to 14 words, half of them with the words between the first and the last shuffled
    (never left unchanged).
    Distinguishing the two needs word-order knowledge, which masked-LM pretraining provides; a bag of words
    cannot do better than chance. Splits come from disjoint thirds of the corpus lines."""
    if corpus_path is None:
        corpus_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "tinyshakespeare.txt")
    with open(corpus_path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f]
    # Spoken lines only (speaker names end with ':'), 6-14 words, distinct.
    seen, candidates = set(), []
    for ln in lines:
        words = ln.split()
        if 6 <= len(words) <= 14 and len(set(words[1:-1])) > 1 and not ln.endswith(":") and ln not in seen:
            seen.add(ln)
            candidates.append(ln)
    rng = random.Random(seed)
    # Contiguous blocks keep the splits from sharing scenes: train, validation and test take every third block.
    block = 50
    blocks = [candidates[i:i + block] for i in range(0, len(candidates), block)]
    pools = {"train": [], "validation": [], "test": []}
    for i, b in enumerate(blocks):
        pools[("train", "train", "train", "train", "validation", "test")[i % 6]].extend(b)
    out = {}
    for name, n in (("train", n_train), ("validation", n_validation), ("test", n_test)):
        pool = pools[name][:]
        rng.shuffle(pool)
        if len(pool) < n:
            raise DataError(f"the corpus has only {len(pool)} usable lines for the {name} split, {n} asked")
        rows = []
        for i, text in enumerate(pool[:n]):
            if i % 2:
                # The first and last words stay: a capital at the start and punctuation at the end give
                # nothing away; the words between are shuffled into a different order.
                words = text.split()
                middle = words[1:-1]
                while middle == words[1:-1]:
                    rng.shuffle(middle)
                rows.append({"text": " ".join([words[0], *middle, words[-1]]), "label": "shuffled"})
            else:
                rows.append({"text": text, "label": "original"})
        rng.shuffle(rows)
        out[name] = rows
    return out


def write_jsonl(rows, path):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")

