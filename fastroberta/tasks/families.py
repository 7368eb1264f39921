"""What ``fastroberta-finetune`` needs from a task family besides the classification one: which model class,
how the data is read and batched, what one evaluation row of logits becomes, the metrics, the best-model metric
and the test predictions. One object per family; ``FAMILY_TASKS`` maps each ``--task`` name to one, and
``for_run`` gives the object a run uses (with the run's flags where the family has some).

    question answering:    --task squad | squad_v2 (without --train: hf:squad, hf:squad_v2) | qa (SQuAD 2.0
                           rules when the data holds unanswerable questions; without --train the generated
                           swapped-words task: find the words out of order)

    multiple choice:       --task race | swag | multiple-choice (RACE or SWAG form, told apart by the fields;
                           without --train: hf:race:all, hf:swag:regular, the generated swapped-words task,
                           swapped_words.py)
    token classification:  --task ner (CoNLL-2003's nine tags; without --train hf:conll2003) |
                           token-classification (the training split's tags; without --train the generated
                           swapped-words task)
Files or ``hf:<dataset>[:<config>][@<split>]`` (with the ``datasets`` package) for either.
"""
import dataclasses

import numpy as np
import torch

from fastroberta.tasks import multiple_choice as mc
from fastroberta.tasks import token_tags as tt
from fastroberta.tasks.batching import collate
from fastroberta.tasks.classification import Task
from fastroberta.tasks.errors import DataError
from fastroberta.tasks.qa import QA_TASKS
from fastroberta.tasks.swapped_words import swapped_line_choices, swapped_word_tags


def logit_rows(out, batch):
    """Per row of a batch, the model's logits (float32 numpy)."""
    return list(out.logits.float().cpu().numpy())


class TaskFamily:
    """What the families share; each overrides what differs."""
    hf = None                                # the --train when none is given: a Hugging Face dataset[:config]
    predictions_file = "predictions.jsonl"
    default_max_seq_len = 128
    unit = "examples"                        # what one feature is, for the "data ready" line
    take = staticmethod(logit_rows)          # a batch's model output -> one array per row

    def for_run(self, args):
        """The family object a run uses."""
        return self

    def decide(self, splits):
        """What the read splits decide about the task (question answering: SQuAD 2.0 rules or not)."""

    def test_results(self, rows, data, names, kept):
        """(what the predictions file holds, the test metrics or None when the split has no labels); ``kept``:
        the kept model's validation metrics."""
        metrics = self.scores(rows, data, names) if data[1] is not None else None
        return self.prediction_rows(rows, data, names), metrics


class MultipleChoiceFamily(TaskFamily):
    model_class = "RobertaForMultipleChoice"
    collate = staticmethod(mc.collate_choices)
    metric = "accuracy"

    def __init__(self, name, form, hf=None):
        self.task = Task(name, (), metric=self.metric)
        self.form = form
        self.hf = hf  # the --train when none is given: a Hugging Face dataset[:config]

    def generated(self):
        rows = swapped_line_choices()
        return {k: mc.ChoiceSplit(k, f"{self.task.name}:{k}", [r["sent1"] for r in v],
                                  [[r[f] for f in mc.SWAG_ENDINGS] for r in v], [r["label"] for r in v],
                                  [f"{self.task.name}:{k} record {i + 1}" for i in range(len(v))])
                for k, v in rows.items()}

    def read(self, spec, split, need_labels):
        return mc.read_choices(spec, split, need_labels, self.form)

    def names(self, train):
        return None

    def model_overrides(self, names):
        return {}

    def features(self, split, tokenizer, max_seq_len, special, names):
        ids = mc.choice_features(split, tokenizer, max_seq_len, special)
        labels = None if split.labels[0] is None else np.asarray(split.labels, np.int64)
        return ids, labels, split

    def row(self, logits, ids):
        return logits.numpy()

    def describe(self, names, train_ids):
        return f"{len(train_ids[0])} choices"

    def scores(self, rows, data, names):
        return mc.choice_metrics(np.stack(rows), data[1])

    def prediction_rows(self, rows, data, names):
        out = []
        for i, scores in enumerate(rows):
            row = {"index": i, "prediction": int(np.argmax(scores))}
            if data[1] is not None:
                row["label"] = int(data[1][i])
            out.append(row)
        return out


class TokenFamily(TaskFamily):
    model_class = "RobertaForTokenClassification"
    collate = staticmethod(tt.collate_tags)
    metric = "f1"

    def __init__(self, name, preset=None, hf=None):
        self.task = Task(name, (), metric=self.metric, labels=preset)
        self.hf = hf

    def generated(self):
        return {k: tt.TagSplit(k, f"{self.task.name}:{k}", [r["tokens"] for r in v], [r["tags"] for r in v],
                               [[f"{self.task.name}:{k} record {i + 1} word {j + 1}" for j in range(len(r["tokens"]))]
                                for i, r in enumerate(v)])
                for k, v in swapped_word_tags().items()}

    def read(self, spec, split, need_labels):
        return tt.read_tags(spec, split, need_labels)

    def names(self, train):
        names = tt.tag_names(train, self.task.labels)
        if len(names) < 2:
            raise DataError(f"--train {train.source}: every word is tagged O; token classification needs tags")
        return names

    def model_overrides(self, names):
        return {"num_labels": len(names), "id2label": dict(enumerate(names))}

    def features(self, split, tokenizer, max_seq_len, special, names):
        feats = tt.tag_features(split, tokenizer, max_seq_len, special, tt.encode_tags(split, names))
        labels = None
        if feats.labels is not None:
            labels = np.empty(len(feats.labels), dtype=object)  # ragged: one label list per sentence
            labels[:] = feats.labels
        return feats.ids, labels, (split, feats)

    def row(self, logits, ids):
        return logits[:len(ids)].argmax(-1).numpy()

    def describe(self, names, train_ids):
        return f"{len(names)} tags"

    def scores(self, rows, data, names):
        split, feats = data[2]
        return tt.tag_metrics(tt.word_predictions(rows, feats.first, names), split.tags)

    def prediction_rows(self, rows, data, names):
        split, feats = data[2]
        out = []
        for i, (words, tags) in enumerate(zip(split.words, tt.word_predictions(rows, feats.first, names))):
            row = {"index": i, "tokens": words, "prediction": tags}
            if split.tags is not None:
                row["label"] = split.tags[i]
            out.append(row)
        return out


def span_rows(out, batch):
    """Per row, its [length, 2] start and end logits, cut to the row's real tokens."""
    both = torch.stack([out.start_logits, out.end_logits], dim=-1).float().cpu().numpy()
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    return [row[:n] for row, n in zip(both, lengths)]


def collate_spans(ids_list, pad_id, labels=None, multiple=1, limit=None):
    """``batching.collate``'s batch, with [N, 2] labels as the model's ``start_positions`` / ``end_positions``."""
    batch = collate(ids_list, pad_id, None, multiple, limit)
    if labels is not None:
        positions = torch.as_tensor(np.asarray(labels, np.int64))
        batch["start_positions"], batch["end_positions"] = positions[:, 0], positions[:, 1]
    return batch


class QuestionAnsweringFamily(TaskFamily):
    """Extractive question answering: each context cut into windows (the features), [N, 2] start / end token
    positions as labels, start / end logits per window, answers and the SQuAD metrics per question;
    predictions.json is {id: answer text}, the official scripts' input."""
    model_class = "RobertaForQuestionAnswering"
    collate = staticmethod(collate_spans)
    take = staticmethod(span_rows)
    predictions_file = "predictions.json"
    default_max_seq_len = 384
    unit = "windows"

    def __init__(self, task, doc_stride=128, max_question_len=64, n_best=20, max_answer_len=30):
        self.task, self.hf = task, task.hf
        self.doc_stride, self.max_question_len = doc_stride, max_question_len
        self.n_best, self.max_answer_len = n_best, max_answer_len

    def for_run(self, args):
        return QuestionAnsweringFamily(self.task, args.doc_stride, args.max_question_len, args.n_best,
                                       args.max_answer_len)

    def generated(self):
        from fastroberta.tasks.qa import QAExample
        from fastroberta.tasks.swapped_words import swapped_span_questions
        if self.task.name != "qa":
            return {}
        return {name: [QAExample(r["id"], r["question"], r["context"],
                                 list(zip(r["answers"]["text"], r["answers"]["answer_start"])),
                                 f"swapped-span:{name} {r['id']}") for r in rows]
                for name, rows in swapped_span_questions().items()}

    def read(self, spec, split, need_labels):
        from fastroberta.tasks.qa import read_qa
        return read_qa(spec, split, need_answers=need_labels)

    def decide(self, splits):
        if self.task.version_2 is None:  # --task qa: SQuAD 2.0 rules when the data holds unanswerable questions
            unanswerable = any(e.is_impossible for name in ("train", "validation") for e in splits.get(name, ()))
            self.task = dataclasses.replace(self.task, version_2=unanswerable)

    def names(self, train):
        return None

    def model_overrides(self, names):
        return {"num_labels": 2, "id2label": None, "problem_type": None}

    def features(self, split, tokenizer, max_seq_len, special, names):
        from fastroberta.tasks.qa import qa_features
        feats = qa_features(split, tokenizer, special, max_seq_len, self.doc_stride, self.max_question_len)
        positions = None
        if feats.start_positions is not None:
            positions = np.stack([feats.start_positions, feats.end_positions], axis=1)
        return feats.input_ids, positions, (split, feats)

    def row(self, logits, ids):
        return logits.numpy()

    def describe(self, names, train_ids):
        return "question answering (SQuAD 2.0 rules)" if self.task.version_2 else "question answering"

    def answers(self, rows, data, threshold=None):
        """(predictions {id: text}, SQuAD metrics or None without answers) of a split's window logits; SQuAD 2.0
        answers "" above the no-answer ``threshold`` (default: the best_f1_thresh found on this split)."""
        from fastroberta.tasks.qa_eval import answer_texts, no_answer_scores, postprocess_qa, squad_metrics
        examples, features = data[2]
        best = postprocess_qa(examples, features, [r[:, 0] for r in rows], [r[:, 1] for r in rows], self.n_best,
                              self.max_answer_len)
        scores = no_answer_scores(best) if self.task.version_2 else None
        has_answers = all(e.answers is not None for e in examples)
        metrics = squad_metrics(examples, answer_texts(best), scores) if has_answers else None
        if scores is not None and threshold is None:
            threshold = metrics["best_f1_thresh"] if metrics is not None else 0.0
        return answer_texts(best, scores, threshold), metrics

    def scores(self, rows, data, names):
        return self.answers(rows, data)[1]

    def test_results(self, rows, data, names, kept):
        # SQuAD 2.0: the test split is answered with the kept model's no-answer threshold from validation.
        return self.answers(rows, data, kept.get("best_f1_thresh", 0.0) if self.task.version_2 else None)


FAMILY_TASKS = {
    **{name: QuestionAnsweringFamily(task) for name, task in QA_TASKS.items()},
    "race": MultipleChoiceFamily("race", "race", "race:all"),
    "swag": MultipleChoiceFamily("swag", "swag", "swag:regular"),
    "multiple-choice": MultipleChoiceFamily("multiple-choice", None),
    "ner": TokenFamily("ner", tt.CONLL2003_TAGS, "conll2003"),
    "token-classification": TokenFamily("token-classification"),
}
