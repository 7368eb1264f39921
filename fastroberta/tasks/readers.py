"""Reading labelled examples: CSV / TSV / JSONL files or Hugging Face ``datasets``, into a Split."""
import csv
import json
import os
from dataclasses import dataclass
from typing import List

from fastroberta.data.documents import json_error_place
from fastroberta.tasks.errors import DataError


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


def json_lines(path):
    """(``line n``, object) for each non-blank line of a JSON-lines file; DataError names the line of one that
    is not valid JSON or not an object."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            line = line.rstrip("\r\n")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {i} is not valid JSON: {json_error_place(e, line)}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {i} must hold a JSON object, got {type(row).__name__}")
            yield f"line {i}", row


def _read_jsonl(path):
    rows, columns = [], []
    for where, row in json_lines(path):
        for k in row:
            if k not in columns:
                columns.append(k)
        rows.append((int(where.split()[1]), row))
    return columns, rows


def _read_rows(path, split):
    """The (line, row dict) pairs of a .csv / .tsv / .jsonl (or .json lines) file; DataError names the problem."""
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
    return rows


def label_values(path, label_field, split="train"):
    """The values of ``label_field`` in a data file, as read (None where a row lacks it): what
    ``tasks.inference.infer_task`` looks at when no --task is given."""
    return [row.get(label_field) for _, row in _read_rows(path, split)]


def read_file(path, split, task, need_labels):
    """A Split from a .csv / .tsv / .jsonl (or .json lines) file."""
    rows = _read_rows(path, split)
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


def parse_hf_spec(spec):
    """(dataset, config or None, split or None) of ``hf:<dataset>[:<config>][@<split>]``."""
    name, _, hf_split = spec[len("hf:"):].partition("@")
    path, _, config = name.partition(":")
    return path, config or None, hf_split or None


def load_hf(spec, split, files, hf_split=None):
    """(rows, split name) of ``hf:<dataset>[:<config>][@<split>]`` through ``datasets.load_dataset``: the split
    the spec names, else ``hf_split``, else --<split>'s own name. DataError in one line when the ``datasets``
    package is missing (``files`` says what to give instead) or the load fails."""
    path, config, named = parse_hf_spec(spec)
    hf_split = named or hf_split or split
    try:
        import datasets
    except ImportError:
        raise DataError(f"--{split} {spec}: reading Hugging Face datasets needs the `datasets` package "
                        f"(pip install datasets), or give {files}") from None
    try:
        rows = datasets.load_dataset(path, config, split=hf_split)
    except Exception as e:  # network, unknown dataset / split: all end the run the same way
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "scripts are no longer supported" in first:  # datasets >= 4 with a script-based dataset (conll2003)
            first += "; name a copy stored as data files instead (hf:<owner>/<name>, e.g. hf:lhoestq/conll2003)"
        raise DataError(f"--{split} {spec}: loading split {hf_split!r} failed: {first}") from None
    return rows, hf_split


def hf_source(spec, hf_split):
    """How errors name a Hugging Face split, ``hf:<dataset>[:<config>]@<split>``; its rows are ``row <i>``
    (from 0, the dataset's own index)."""
    return f"{spec.partition('@')[0]}@{hf_split}"


def read_hf(spec, split, task, need_labels):
    """A Split from ``hf:glue:<task>`` or ``hf:<dataset>[:<config>]``, with ``@<split>`` to pick a split."""
    path, config, _ = parse_hf_spec(spec)
    default = task.hf_splits.get(split, split) if task.hf == (path, config) else split
    ds, _ = load_hf(spec, split, "CSV / TSV / JSONL files", default)
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


def write_jsonl(rows, path):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
