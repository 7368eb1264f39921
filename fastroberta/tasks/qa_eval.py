"""Extractive question answering, evaluation: window logits back to answer text, and SQuAD's exact match and F1.

    best = postprocess_qa(examples, features, start_logits, end_logits, n_best=20, max_answer_len=30)
    best[example.id] -> Answer(text, score, null_score)
    squad_metrics(examples, {id: text})                              # SQuAD 1.1
    squad_metrics(examples, {id: text}, no_answer_scores(best))      # SQuAD 2.0: + HasAns/NoAns, best thresholds

The metrics follow the official evaluation scripts: answers normalised (lower case, ASCII punctuation removed, the
articles a/an/the removed, whitespace collapsed), each prediction scored against its best gold answer, figures in
percent. For SQuAD 2.0 a question is answered "" when its no-answer score (the null score minus the best span's)
is above a threshold; the official script's best_f1_thresh is the threshold that maximises F1 on the split it sees,
picked on validation and then applied to the test split.
"""
import collections
import json
import re
import string
from dataclasses import dataclass

import numpy as np

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass
class Answer:
    """An example's best span: its context text and start + end logit (``text`` "" and ``score`` -inf when no
    window has a valid span), and the lowest null score (start + end logit of ``<s>``) over its windows."""
    text: str
    score: float
    null_score: float


def postprocess_qa(examples, features, start_logits, end_logits, n_best=20, max_answer_len=30):
    """{example id: Answer}: in each window the ``n_best`` highest start and end logits are paired, pairs that end
    before they start, run longer than ``max_answer_len`` tokens or touch a non-context token are dropped, and the
    best-scoring pair over all windows of an example gives its text. ``start_logits[f]`` / ``end_logits[f]`` are
    the logits of feature f (at least as long as its input ids; padding past them is ignored)."""
    best = {e.id: Answer("", float("-inf"), float("inf")) for e in examples}
    for f, n in enumerate(features.example_index):
        example = examples[n]
        offsets = features.offsets[f]
        length = len(offsets)
        start = np.asarray(start_logits[f], np.float64)[:length]
        end = np.asarray(end_logits[f], np.float64)[:length]
        answer = best[example.id]
        answer.null_score = min(answer.null_score, start[0] + end[0])
        top_start = np.argsort(-start, kind="stable")[:n_best]
        top_end = np.argsort(-end, kind="stable")[:n_best]
        for i in top_start:
            if offsets[i][0] < 0:
                continue
            for j in top_end:
                if j < i or j - i + 1 > max_answer_len or offsets[j][0] < 0:
                    continue
                score = start[i] + end[j]
                if score > answer.score:
                    answer.score = score
                    answer.text = example.context[offsets[i][0]:offsets[j][1]]
    return best


def no_answer_scores(best):
    """{id: null score - best span score}: the higher, the surer the model is that there is no answer."""
    return {qid: a.null_score - a.score for qid, a in best.items()}


def answer_texts(best, scores=None, threshold=0.0):
    """{id: answer text}, predictions.json's content; with no-answer ``scores`` (SQuAD 2.0) a question whose score
    is above ``threshold`` is answered ""."""
    if scores is None:
        return {qid: a.text for qid, a in best.items()}
    return {qid: ("" if scores[qid] > threshold else a.text) for qid, a in best.items()}


def normalize_answer(text):
    """The official SQuAD normalisation: lower case, ASCII punctuation removed, articles removed, whitespace
    collapsed. Unicode punctuation (curly quotes, dashes) is kept, as the official script keeps it."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction, gold):
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction, gold):
    """Token-level F1 of the normalised answers; when either is empty, 1 if both are and 0 otherwise."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    same = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def gold_answers(example):
    """The gold texts scored against: those that normalise to something, or [""] for an unanswerable question."""
    golds = [text for text, _ in example.answers if normalize_answer(text)]
    return golds or [""]


def _scores(examples, predictions):
    """Per-example (exact, f1) of ``predictions``, each the best over the example's gold answers."""
    out = {}
    for e in examples:
        golds, pred = gold_answers(e), predictions[e.id]
        out[e.id] = (max(exact_match(pred, g) for g in golds), max(f1(pred, g) for g in golds))
    return out


def _mean(values):
    return 100.0 * sum(values) / len(values) if values else 0.0


def best_threshold(examples, predictions, scores, which):
    """(best score in percent, threshold) as the official SQuAD 2.0 script's find_best_thresh computes them: every
    question starts unanswered; walking the questions by rising no-answer score, answering one gains its
    ``which`` score (0 exact, 1 F1) if it has an answer and loses 1 if not; the threshold is the no-answer score
    where the running total peaks (0.0 when answering nothing is best)."""
    per_example = _scores(examples, predictions)
    total = best_total = sum(1 for e in examples if e.is_impossible)
    threshold = 0.0
    for e in sorted(examples, key=lambda e: scores[e.id]):
        if e.is_impossible:
            total += -1 if predictions[e.id] else 0
        else:
            total += per_example[e.id][which]
        if total > best_total:
            best_total, threshold = total, scores[e.id]
    return 100.0 * best_total / len(examples), threshold


def squad_metrics(examples, predictions, scores=None):
    """exact and f1 (percent) of ``predictions`` ({id: text}) over ``examples``; with no-answer ``scores`` (SQuAD
    2.0, where ``predictions`` hold the best spans) also the HasAns / NoAns splits at threshold 0 and best_exact,
    best_exact_thresh, best_f1, best_f1_thresh. Examples must carry answers."""
    at_zero = predictions if scores is None else {
        qid: ("" if scores[qid] > 0.0 else text) for qid, text in predictions.items()}
    per_example = _scores(examples, at_zero)
    out = {"exact": _mean([per_example[e.id][0] for e in examples]),
           "f1": _mean([per_example[e.id][1] for e in examples]), "total": len(examples)}
    if scores is None:
        return out
    for name, subset in (("HasAns", [e for e in examples if not e.is_impossible]),
                         ("NoAns", [e for e in examples if e.is_impossible])):
        if subset:
            out[f"{name}_exact"] = _mean([per_example[e.id][0] for e in subset])
            out[f"{name}_f1"] = _mean([per_example[e.id][1] for e in subset])
            out[f"{name}_total"] = len(subset)
    out["best_exact"], out["best_exact_thresh"] = best_threshold(examples, predictions, scores, 0)
    out["best_f1"], out["best_f1_thresh"] = best_threshold(examples, predictions, scores, 1)
    return out


def write_predictions(predictions, path):
    """predictions.json in the official scripts' input format: {id: answer text}."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(predictions, f, ensure_ascii=False, indent=1)
        f.write("\n")
