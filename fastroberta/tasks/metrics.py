"""Task metrics; higher is better for all of them."""
import math

import numpy as np

METRICS = ("accuracy", "f1", "mcc", "pearson", "spearman")


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


def baseline_metrics(task, train_labels, labels):
    """What a model that ignores its input scores on ``labels``: the training split's majority class for every
    example (classification) or its mean (regression, whose correlations are then 0). Returns (what it predicts,
    in words; the task's metrics)."""
    train_labels = np.asarray(train_labels)
    if task.regression:
        preds = np.full(len(labels), float(train_labels.mean()))
        return "the mean predictor", compute_metrics(task, preds, labels)
    values, counts = np.unique(train_labels, return_counts=True)
    majority = values[counts.argmax()]
    return majority, compute_metrics(task, np.full(len(labels), majority), labels)
