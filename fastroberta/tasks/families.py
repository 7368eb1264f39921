"""What ``fastroberta-finetune`` needs from a task family besides the classification one: which model class,
how the data is read and batched, what one evaluation row of logits becomes, the metrics, the best-model metric
and the rows of predictions.jsonl. One object per family; ``FAMILY_TASKS`` maps each ``--task`` name to one.

    multiple choice:       --task race | swag | multiple-choice (RACE or SWAG form, told apart by the fields;
                           without --train the generated swapped-words task, swapped_words.py)
    token classification:  --task ner (CoNLL-2003's nine tags) | token-classification (the training split's
                           tags; without --train the generated swapped-words task)
"""
import numpy as np

from fastroberta.tasks import multiple_choice as mc
from fastroberta.tasks import token_tags as tt
from fastroberta.tasks.classification import Task
from fastroberta.tasks.errors import DataError
from fastroberta.tasks.swapped_words import swapped_line_choices, swapped_word_tags


class MultipleChoiceFamily:
    model_class = "RobertaForMultipleChoice"
    collate = staticmethod(mc.collate_choices)
    metric = "accuracy"

    def __init__(self, name, form):
        self.task = Task(name, (), metric=self.metric)
        self.form = form

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


class TokenFamily:
    model_class = "RobertaForTokenClassification"
    collate = staticmethod(tt.collate_tags)
    metric = "f1"

    def __init__(self, name, preset=None):
        self.task = Task(name, (), metric=self.metric, labels=preset)

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


FAMILY_TASKS = {
    "race": MultipleChoiceFamily("race", "race"),
    "swag": MultipleChoiceFamily("swag", "swag"),
    "multiple-choice": MultipleChoiceFamily("multiple-choice", None),
    "ner": TokenFamily("ner", tt.CONLL2003_TAGS),
    "token-classification": TokenFamily("token-classification"),
}
