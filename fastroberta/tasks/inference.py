"""Which kind of task a user's labels describe, for fastroberta-finetune runs given --train but no --task.

    infer_task(["pos", "neg", "pos"])    -> "classification"   (names)
    infer_task(["0", "1", 1, 2.0])       -> "classification"   (integers, as CSV text or JSON numbers)
    infer_task(["0.5", 3.25, "4"])       -> "regression"       (numbers, at least one not an integer)
    infer_task(["pos", "0.5"])           -> ConfigError asking for --task (names and fractions together)

Labels come as read: strings from CSV/TSV, or JSON values from JSONL (str, int, float, bool). A missing label
(None) says nothing and is skipped. A string that parses as a finite number counts as that number, so "1" and 1
are the same class id and "2.5" and 2.5 the same score.
"""
import math

from fastroberta.training.errors import ConfigError

__all__ = ["infer_task"]


def _number(value):
    """``value`` as a finite float, or None when it is not a number (names, booleans, nan, inf)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def infer_task(labels, field="label", source="--train"):
    """"classification" or "regression" for the training labels ``labels``; ConfigError (one line, naming
    ``field`` and ``source``) when they cannot tell."""
    fraction = name = None
    seen = False
    for value in labels:
        if value is None:
            continue
        seen = True
        number = _number(value)
        if number is None:
            name = value if name is None else name
        elif not number.is_integer():
            fraction = value if fraction is None else fraction
    hint = "pass --task classification or --task regression"
    if not seen:
        raise ConfigError(f"{source}: no example has a value in the label field {field!r}, so the task cannot be "
                          f"inferred; {hint}")
    if fraction is not None and name is not None:
        raise ConfigError(f"{source}: the label field {field!r} holds both names ({name!r}) and fractional numbers "
                          f"({fraction!r}), so it is neither classes nor scores; {hint}")
    return "regression" if fraction is not None else "classification"


def task_for_data(task, train, label_field=None):
    """The --task a fastroberta-finetune run means, and whether it was inferred: the one given; the bundled
    word-order demo when no data is given; the GLUE task that ``hf:glue:<task>`` names; otherwise what the training
    file's labels say (``infer_task``). ConfigError when a dataset of the hub cannot tell."""
    from fastroberta.tasks.classification import TASKS
    from fastroberta.tasks.readers import label_values
    if task is not None:
        return task, False
    if train is None:
        return "word-order", False
    if train.startswith("hf:"):
        parts = train[3:].partition("@")[0].split(":")
        if parts[0] == "glue" and len(parts) > 1 and parts[1] in TASKS:
            return parts[1], True
        raise ConfigError(f"--train {train}: pass --task (classification, regression or a GLUE task name); it is "
                          "inferred from the labels of .csv, .tsv and .jsonl files only")
    field = label_field or "label"
    return infer_task(label_values(train, field), field, f"--train {train}"), True
