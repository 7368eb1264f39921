"""Fine-tuning tasks for ``fastroberta-finetune``, one family or step per module:

    classification.py  the sequence classification / regression family: GLUE presets, word-order, custom tasks;
                       class names and label ids
    readers.py         labelled examples from CSV / TSV / JSONL files or Hugging Face datasets (Split)
    batching.py        tokenising (single / pair), dynamic padding, TaskLoader, evaluation batches
    metrics.py         accuracy, F1, MCC, Pearson, Spearman; the baseline that ignores the input
    word_order.py      the bundled task generated from the corpus
    multiple_choice.py the multiple-choice family: RACE / SWAG readers, [C, L] features, [B, C, L] batches,
                       accuracy
    token_tags.py      the token-classification (NER) family: CoNLL / JSONL readers, first-sub-word labels,
                       per-word predictions, seqeval-style entity P/R/F1
    qa.py              question answering: SQuAD JSON / JSONL examples, windowed features, answer positions
    qa_eval.py         question answering: window logits back to answer text, SQuAD exact match / F1
    swapped_words.py   the bundled multiple-choice, token-classification and question-answering tasks: corpus
                       lines with neighbouring words swapped (which is the line as written, which words moved)
    errors.py          DataError: one line naming the file, the row and the field

A new family (question answering, token tagging, ...) is a new module beside classification.py.
"""
from fastroberta.tasks.batching import (TaskLoader, collate, eval_batches, padded_length, tokenize,
                                        truncate_pair)
from fastroberta.tasks.classification import (CUSTOM, GLUE, TASKS, WORD_ORDER, Task, encode_labels, get_task,
                                              label_names)
from fastroberta.tasks.errors import DataError
from fastroberta.tasks.inference import infer_task, task_for_data
from fastroberta.tasks.metrics import (METRICS, accuracy, baseline_metrics, compute_metrics, f1_score,
                                       matthews_corrcoef, pearson, spearman)
from fastroberta.tasks.readers import Split, label_values, read_file, read_hf, read_split, write_jsonl
from fastroberta.tasks.word_order import word_order_task

__all__ = ["TaskLoader", "collate", "eval_batches", "padded_length", "tokenize", "truncate_pair", "CUSTOM", "GLUE",
           "TASKS", "WORD_ORDER", "Task", "encode_labels", "get_task", "label_names", "DataError", "METRICS",
           "accuracy", "baseline_metrics", "compute_metrics", "f1_score", "matthews_corrcoef", "pearson",
           "spearman", "Split", "read_file", "read_hf", "read_split", "write_jsonl", "word_order_task", "infer_task",
           "task_for_data", "label_values"]
