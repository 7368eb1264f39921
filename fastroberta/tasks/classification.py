"""The sequence classification / regression family: its task presets (the eight GLUE tasks, the bundled
word-order task, custom classification and regression), and its labels (class names, label ids)."""
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from fastroberta.tasks.errors import DataError
from fastroberta.training.errors import ConfigError
from fastroberta.tasks.metrics import METRICS


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
