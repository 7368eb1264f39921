"""fastroberta-finetune: sequence classification / regression (GLUE and your own data), extractive question
answering (SQuAD 1.1 / 2.0 and your own SQuAD .json / .jsonl data), multiple choice (RACE, SWAG) and token
classification (NER) fine-tuning under DeepSpeed.

    fastroberta-finetune                                   # the default pretraining run on the bundled word-order task
    fastroberta-finetune --model runs/fastroberta-base --task mrpc --train hf:glue:mrpc --output runs/mrpc
    fastroberta-finetune --model roberta-base --task classification --train train.csv --validation dev.csv \\
        --text-fields title,body --label-field topic --output runs/topics
    fastroberta-finetune --model roberta-base --task ner --train train.txt --validation valid.txt --test test.txt
    fastroberta-finetune --model runs/fastroberta-base --task squad_v2 --output runs/squad2   # with `datasets`
    fastroberta-finetune --task qa                         # the bundled swapped-words question-answering task
    deepspeed --num_gpus 8 --module fastroberta.finetune --model ... --zero-stage 2 ...

The same structure and flag policy as ``fastroberta-train``: check the configuration, read and tokenise the
data, build the model and the DeepSpeed engine, maybe resume, train with periodic evaluation on the validation
split and checkpoints, then predict the test split. The model with the best validation metric is kept.

Output folder: ``metrics.jsonl`` (one JSON object per logged step; evaluations add ``eval_<metric>``),
``hf/`` (the best model by the task's metric, with its tokenizer: loadable by
``transformers.AutoModelForSequenceClassification``, or the AutoModelFor... class of the task's family), ``best.json``
(its step and metrics), ``predictions.jsonl`` (for ``--test``; question answering: ``predictions.json``, {id: answer
text}, the official SQuAD scripts' input), ``checkpoints/`` (DeepSpeed checkpoints for ``--resume``),
``ds_config.json``, ``run.json``.
"""
import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fastroberta.config import PRESETS, RobertaConfig
from fastroberta.tasks import TASKS, DataError, Task, get_task, task_for_data  # noqa: F401  (Task: for callers)
from fastroberta.tasks.families import FAMILY_TASKS, logit_rows
from fastroberta.training.checkpoints import (CHECKPOINT_DIR, load_checkpoint, save_checkpoint,
                                              warn_changed_settings)
from fastroberta.training.cli import (HelpFormatter, add_shared_flags, announce_start, check_positive,
                                      check_shared_flags, parse_command_line, say)
from fastroberta.training.distributed import check_shared_output, init_distributed
from fastroberta.training.ds_config import write_config
from fastroberta.training.engine import build_engine, grad_norm_of
from fastroberta.training.errors import ConfigError, TrainingError, run_command
from fastroberta.training.metrics import MetricsLog, peak_memory_mib
from fastroberta.training.nonfinite import NonFiniteGuard
from fastroberta.training.output import OutputLock, atomic_write
from fastroberta.training.watchdog import watching
from fastroberta.training.progress import progress_bar
from fastroberta.training.rng import preserved_rng, rng_state, seed_everything
from fastroberta.training.schedule import lr_scheduler
from fastroberta.training.settings import (announced_on_resume, base_settings, resolve_engine_config,
                                          resolve_kernels, resolve_output)
from fastroberta.training.step import nonfinite_stop_message, optimizer_step
from fastroberta.training.stop import StopRequest

DEFAULT_MODEL = os.path.join("runs", "fastroberta-demo")  # where a plain `fastroberta-train` writes
PROG = "fastroberta-finetune"
MIN_DEFAULT_STEPS = 100  # the default epochs grow to at least this many steps on a small training split


def default_lr(hidden_size):
    """RoBERTa's GLUE sweep used 1e-5 to 3e-5 for base and large; small models need more: 1e-4 from a width
    of 256 and 1e-3 below (the 64-wide demo encoder stays at chance on the bundled task at 1e-4)."""
    if hidden_size >= 1024:
        return 1e-5
    if hidden_size >= 768:
        return 2e-5
    return 1e-4 if hidden_size >= 256 else 1e-3



def build_parser():
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Fine-tune a RoBERTa encoder for sequence classification or regression (GLUE or your own "
                    "CSV / TSV / JSONL data), extractive question answering (SQuAD 1.1 / 2.0 or your own SQuAD "
                    ".json / .jsonl data), multiple choice (RACE, SWAG) or token classification (NER: CoNLL, "
                    "JSONL) with the Triton kernels under DeepSpeed. With no arguments: the "
                    f"default pretraining run ({DEFAULT_MODEL}) on the bundled word-order task.",
        formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="a fastroberta run folder (its hf/ export is used), a Hugging Face RoBERTa folder "
                        "(transformers checkpoints included), a Hub name such as roberta-base when "
                        f"huggingface_hub is installed and online, or a preset ({', '.join(PRESETS)}) trained from "
                        f"scratch (needs --tokenizer) (default: {DEFAULT_MODEL})")
    g.add_argument("--from-scratch", action="store_true",
                   help="take only the architecture and tokenizer of --model, with freshly initialised weights "
                        "(a baseline of the same size)")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder or file (default: the model's)")
    g.add_argument("--dropout", type=float, default=None,
                   help="hidden, attention and classifier dropout (default: the model's config)")
    g = p.add_argument_group("task and data")
    g.add_argument("--task", default=None, choices=list(TASKS) + list(FAMILY_TASKS),
                   help="a GLUE task (fields, classes, metric preset), word-order (generated from the bundled "
                        "corpus), or classification / regression for your own data; extractive question "
                        "answering: squad, squad_v2 (unanswerable questions, no-answer threshold picked on "
                        "validation) or qa for SQuAD .json / .jsonl data (without --train the generated "
                        "swapped-words task: find the words out of order; SQuAD 2.0 rules when the data holds "
                        "unanswerable questions); multiple choice: race, swag (without --train: hf:race:all, "
                        "hf:swag:regular) or multiple-choice (either form; without --train the generated "
                        "swapped-words task: pick the line as written); token classification: ner (CoNLL-2003's "
                        "tags; without --train: hf:conll2003) or token-classification (the training split's tags; "
                        "without --train the generated swapped-words task: tag the swapped words). "
                        "Default: word-order when no "
                        "--train is given; with a .csv/.tsv/.jsonl --train, inferred from its labels "
                        "(classification for names or integers, regression for fractional numbers); with "
                        "hf:glue:<task>, that task")
    g.add_argument("--train", default=None,
                   help="training examples: a .csv, .tsv or .jsonl file (question answering: SQuAD .json or .jsonl "
                        "of id, context, question, answers{text, answer_start}; multiple choice: RACE .json / "
                        ".jsonl / folder or SWAG .csv / .jsonl; ner: CoNLL files or .jsonl of tokens, tags), or "
                        "hf:<dataset>[:<config>][@split] with the datasets package (default: hf:glue:<task> for "
                        "GLUE tasks, hf:squad, hf:squad_v2, hf:race:all, hf:swag:regular, hf:conll2003)")
    g.add_argument("--validation", default=None,
                   help="validation examples, same forms (default: the validation split of an hf: --train; "
                        "hf:...@<split> names another)")
    g.add_argument("--test", default=None,
                   help="examples to predict into predictions.jsonl, or predictions.json for question answering "
                        "(labels / answers optional: scored when present)")
    g.add_argument("--text-fields", default=None,
                   help="the text field, or two separated by a comma for sentence pairs (default: the task's; "
                        "text for custom tasks)")
    g.add_argument("--label-field", default=None, help="the label field (default: label)")
    g.add_argument("--metric", default=None,
                   help="metric choosing the best model: accuracy, f1, mcc, pearson or spearman (default: the "
                        "task's: MCC for CoLA, F1 for MRPC/QQP, Pearson for STS-B and regression, else accuracy)")
    g.add_argument("--max-seq-len", type=int, default=None,
                   help="longer inputs are truncated (pairs: longest first); batches pad to their longest row, "
                        "rounded up by --pad-to-multiple-of (default: 128, 384 for question answering, or the "
                        "model's limit if lower); question answering cuts longer contexts into windows instead")
    g.add_argument("--pad-to-multiple-of", type=int, default=None,
                   help="round each batch's length up to a multiple of this many tokens, never past "
                        "--max-seq-len (default: 8, or 64 with --compile, so that a compiled model meets few "
                        "distinct lengths; 1 pads to the longest row exactly)")
    g.add_argument("--group-by-length", action="store_true",
                   help="batch examples of similar length together (less padding, less randomness)")
    g = p.add_argument_group("question answering")
    g.add_argument("--doc-stride", type=int, default=128,
                   help="tokens shared by consecutive windows of a context longer than --max-seq-len allows")
    g.add_argument("--max-question-len", type=int, default=64, help="longer questions keep their first tokens")
    g.add_argument("--n-best", type=int, default=20,
                   help="start and end candidates per window paired when predicting an answer")
    g.add_argument("--max-answer-len", type=int, default=30, help="the longest answer predicted, in tokens")
    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, default=32, help="examples per process per forward pass")
    g.add_argument("--epochs", type=float, default=None,
                   help="passes over the training split (default: 3, and 10 for the small generated word-order, qa "
                        "and token-classification tasks (no --train); on a small split as many as make "
                        f"{MIN_DEFAULT_STEPS} steps; see --steps)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps, instead of --epochs")
    g.add_argument("--warmup-ratio", type=float, default=0.06, help="share of the steps in linear warmup")
    g.add_argument("--eval-batch-size", type=int, default=None, help="default: 2 x --micro-batch-size")
    add_shared_flags(p, defaults={"weight_decay": 0.1, "save_every": 0, "keep_last": 1, "eval_every": None}, helps={
        "compile": "torch.compile the model (fullgraph) inside the DeepSpeed engine, as fastroberta-train "
                   "--compile; batches of new lengths recompile until Dynamo marks the length dynamic (batch "
                   "lengths are rounded to multiples of 64 by default to keep them few)",
        "global_batch_size": "examples per optimizer step over all processes; accumulation is derived (default: "
                             "micro-batch size x world size)",
        "lr": "peak learning rate (default: 2e-5 for base-sized models, 1e-5 for large, 1e-4 down to a width of "
              "256, 1e-3 below)",
        "output": "run folder (default: runs/finetune-<task>)",
        "eval_every": "evaluate every N steps and at the end (default: once per epoch; 0 = only at the end)",
        "save_every": "checkpoint for --resume every N steps (0 = at the end and when stopped by a signal)",
        "seed": "head initialisation, dropout and data order"})
    return p


def resolve_model_source(model, from_scratch, tokenizer):
    """(kind, folder or preset, tokenizer path): kind is "pretrained", "scratch-folder" or "preset"."""
    if os.path.isdir(model):
        folder = model
        if os.path.isfile(os.path.join(model, "hf", "config.json")):
            folder = os.path.join(model, "hf")  # a fastroberta run folder
        elif not os.path.isfile(os.path.join(model, "config.json")):
            hint = " (a fastroberta-train run writes hf/ when it finishes)" if \
                os.path.isdir(os.path.join(model, CHECKPOINT_DIR)) else ""
            raise ConfigError(f"--model {model!r} holds neither hf/config.json nor config.json{hint}")
        return ("scratch-folder" if from_scratch else "pretrained"), folder, tokenizer or folder
    if model in PRESETS:
        if tokenizer is None:
            raise ConfigError(f"--model {model} (a preset trained from scratch) needs --tokenizer")
        return "preset", model, tokenizer
    if model == DEFAULT_MODEL:
        raise ConfigError(f"--model: {DEFAULT_MODEL} does not exist; run fastroberta-train first, or name a "
                          "model folder")
    if model.startswith((".", os.path.sep, "~")):
        raise ConfigError(f"--model {model!r} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(f"--model {model!r} is not a folder or a preset ({', '.join(PRESETS)}); to fetch it "
                          "from the Hugging Face Hub install huggingface_hub") from None
    try:
        folder = snapshot_download(model, allow_patterns=["*.json", "*.txt", "*.safetensors"])
        if not any(f.endswith(".safetensors") for f in os.listdir(folder)):
            folder = snapshot_download(model, allow_patterns=["*.json", "*.txt", "pytorch_model.bin"])
    except Exception as e:
        raise ConfigError(f"--model {model!r} is not a local folder and could not be fetched from the Hub: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return ("scratch-folder" if from_scratch else "pretrained"), folder, tokenizer or folder


def resolve_settings(args):
    """Check ``args`` and work out every derived setting; ConfigError says what is wrong. No heavy work."""
    s = base_settings(args)
    for name in ("micro_batch_size", "max_seq_len", "steps", "eval_batch_size", "pad_to_multiple_of",
                 "max_question_len", "n_best", "max_answer_len"):
        check_positive("--" + name.replace("_", "-"), getattr(args, name))
    check_shared_flags(args)
    if args.epochs is not None and not args.epochs > 0:
        raise ConfigError(f"--epochs must be positive, got {args.epochs}")
    if not 0 <= args.warmup_ratio < 1:
        raise ConfigError(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise ConfigError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.max_seq_len is not None and args.max_seq_len < 8:
        raise ConfigError(f"--max-seq-len must be at least 8, got {args.max_seq_len}")

    if args.doc_stride < 0:
        raise ConfigError(f"--doc-stride must be >= 0, got {args.doc_stride}")

    s.family = FAMILY_TASKS.get(args.task)
    if s.family is not None:
        for flag in ("text_fields", "label_field", "metric"):
            if getattr(args, flag) is not None:
                raise ConfigError(f"--{flag.replace('_', '-')} does not apply to --task {args.task}: it reads "
                                  f"fixed fields and is judged by {s.family.task.metric}")
        s.family = s.family.for_run(args)
        s.task_inferred, s.task = False, s.family.task
        if args.train is None and s.family.hf is not None:
            args.train = f"hf:{s.family.hf}"
    else:
        args.task, s.task_inferred = task_for_data(args.task, args.train, args.label_field)
        s.task = get_task(args.task, args.text_fields, args.label_field, args.metric)
        if args.train is None and args.task in TASKS and TASKS[args.task].hf is not None:
            args.train = f"hf:{':'.join(TASKS[args.task].hf)}"
        if args.train is None and args.task != "word-order":
            raise ConfigError(f"--task {args.task} needs --train (a .csv, .tsv or .jsonl file, or hf:<dataset>)")
    s.epochs_given = args.epochs is not None
    if args.epochs is None:
        # The generated tasks are small (2,000 training examples): ten passes, where three leave the demo encoder's
        # tagger predicting only O and six leave qa short of its gain (README); multiple choice learns in three.
        generated = args.train is None and args.task in ("word-order", "qa", "token-classification")
        args.epochs = 10.0 if generated else 3.0
    if args.validation is None and args.train is not None and args.train.startswith("hf:"):
        args.validation = args.train.partition("@")[0]

    s.model_kind, s.model_path, s.tokenizer_path = resolve_model_source(args.model, args.from_scratch, args.tokenizer)
    if not os.path.exists(s.tokenizer_path):
        raise ConfigError(f"--tokenizer {s.tokenizer_path!r} does not exist")
    try:
        if s.model_kind == "preset":
            s.config = RobertaConfig.preset(s.model_path)
        else:
            from fastroberta.hf import read_config
            s.config = read_config(s.model_path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {args.model!r}: {e}") from None
    if args.max_seq_len is None:
        args.max_seq_len = min(s.family.default_max_seq_len if s.family else 128, s.config.max_seq_len)
    if args.max_seq_len > s.config.max_seq_len:
        raise ConfigError(f"--max-seq-len {args.max_seq_len} exceeds the model's position table "
                          f"({s.config.max_seq_len} tokens)")
    if args.pad_to_multiple_of is None:
        args.pad_to_multiple_of = 64 if args.compile else 8

    resolve_kernels(args, s.on_cuda)
    resolve_engine_config(args, s, default_lr=lambda global_batch: default_lr(s.config.hidden_size),
                          user_scheduler_allowed=False)
    s.eval_batch_size = args.eval_batch_size or 2 * s.micro_batch_size
    resolve_output(args, s, default_output_of(args))
    return s


def load_checked_tokenizer(s):
    """The run's tokenizer and its special ids, checked against the model's vocabulary and pad id."""
    from fastroberta.data.tokenizer import load_tokenizer, special_ids
    try:
        tokenizer = load_tokenizer(s.tokenizer_path)
        special = special_ids(tokenizer)
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenizer: {e}") from None
    if tokenizer.get_vocab_size() > s.config.vocab_size:
        raise ConfigError(f"the tokenizer ({tokenizer.get_vocab_size()} entries) does not fit the model's "
                          f"vocabulary ({s.config.vocab_size})")
    if special["pad"] != s.config.pad_token_id:
        raise ConfigError(f"the tokenizer's <pad> is {special['pad']} but the model's pad_token_id is "
                          f"{s.config.pad_token_id}")
    return tokenizer, special


def load_data(args, s, tokenizer, special):
    """{"train" | "validation" | "test": (ids, labels or None, Split)} and the class names (None: regression or
    a family without names)."""
    from fastroberta.tasks import (Split, encode_labels, label_names, read_split, tokenize, word_order_task)
    if s.family is not None:
        return load_family_data(args, s, tokenizer, special)
    splits = {}
    if args.task == "word-order" and args.train is None:
        generated = word_order_task()
        for name in ("train", "validation", "test"):
            if name == "train" or getattr(args, name) is None:
                rows = generated[name]
                splits[name] = Split(name, f"word-order:{name}", [(r["text"],) for r in rows],
                                     [r["label"] for r in rows], list(range(1, len(rows) + 1)))
    for name in ("train", "validation", "test"):
        spec = getattr(args, name)
        if spec is not None:
            splits[name] = read_split(spec, name, s.task, need_labels=name != "test")
    names = label_names(s.task, splits["train"])
    out = {}
    for name, split in splits.items():
        labels = encode_labels(s.task, split, names)
        if labels is None and name != "test":
            raise DataError(f"--{name} {split.source}: no labels in field {s.task.label_field!r}")
        out[name] = (tokenize(split, tokenizer, args.max_seq_len, special), labels, split)
    return out, names


def load_family_data(args, s, tokenizer, special):
    """load_data for a task family of tasks/families.py: (features, labels or None, what its metrics read)."""
    family = s.family
    splits = {}
    if args.train is None:
        splits = {k: v for k, v in family.generated().items() if k == "train" or getattr(args, k) is None}
    for name in ("train", "validation", "test"):
        spec = getattr(args, name)
        if spec is not None:
            splits[name] = family.read(spec, name, need_labels=name != "test")
    family.decide(splits)
    s.task = family.task
    names = family.names(splits["train"])
    out = {}
    for name, split in splits.items():
        out[name] = family.features(split, tokenizer, args.max_seq_len, special, names)
        if out[name][1] is None and name != "test":
            raise DataError(f"--{name} {split.source}: no labels")
    return out, names


def model_class(s):
    import fastroberta.model as models
    return getattr(models, s.family.model_class if s.family is not None else "RobertaForSequenceClassification")


def head_config(s, names):
    """The config fields of the run's head: a family's, or the classes (or one output for regression) of
    sequence classification."""
    if s.family is not None:
        return s.family.model_overrides(names)
    return {"num_labels": 1 if names is None else len(names),
            "problem_type": "regression" if s.task.regression else "single_label_classification",
            "id2label": None if names is None else dict(enumerate(names))}


def build_model(args, s, names):
    """The run's model and where its weights came from: --model's encoder, with the checkpoint's head for this
    task when it has one of this size (one of another size, from a checkpoint fine-tuned for another task, is
    initialised afresh, like transformers' ignore_mismatched_sizes), or the config's architecture from scratch."""
    import dataclasses
    from fastroberta.hf import from_hf_state_dict, load_state
    cls = model_class(s)
    overrides = head_config(s, names)
    if args.dropout is not None:
        overrides.update(hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout,
                         classifier_dropout=args.dropout)
    model = cls(dataclasses.replace(s.config, **overrides), kernels=args.kernels)
    if s.model_kind != "pretrained":
        return model, "random initialisation (from scratch)"
    try:
        state, missing, _ = from_hf_state_dict(model, load_state(s.model_path))
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"--model {args.model!r} cannot be loaded as {cls.__name__}: "
                          f"{str(e).splitlines()[0]}") from None
    own = model.state_dict()
    resized = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    model.load_state_dict({k: v for k, v in state.items() if k not in resized}, strict=False)
    if resized:
        return model, f"the checkpoint's head resized: {', '.join(resized)} initialised afresh"
    return model, ("a new head" if missing else "the checkpoint's head")


def plan_schedule(args, s, train_examples):
    """Steps per epoch, total steps, warmup, evaluation and logging intervals, from the training split's size;
    set on ``s``."""
    s.steps_per_epoch = train_examples // s.global_batch_size
    if s.steps_per_epoch == 0:
        raise DataError(f"the training split holds {train_examples} examples, fewer than one global batch "
                        f"({s.global_batch_size}); lower --global-batch-size")
    if args.steps is None and not s.epochs_given and args.epochs * s.steps_per_epoch < MIN_DEFAULT_STEPS:
        # A small training split at the default 3 epochs is a few dozen steps, too few to learn from (300 rows:
        # 27 steps, every prediction the majority class); the default takes enough epochs for MIN_DEFAULT_STEPS.
        # run.json records the epochs taken, so a --resume plans the same schedule.
        epochs = math.ceil(MIN_DEFAULT_STEPS / s.steps_per_epoch)
        say(s, f"{PROG}: {train_examples} training examples make {s.steps_per_epoch} steps per epoch at global "
               f"batch {s.global_batch_size}: {args.epochs:g} epochs would be {round(args.epochs * s.steps_per_epoch)}"
               f" steps, too few to learn from; taking {epochs} epochs ({epochs * s.steps_per_epoch} steps). "
               "--epochs or --steps sets it")
        args.epochs = float(epochs)
    s.total_steps = args.steps if args.steps is not None else max(1, round(args.epochs * s.steps_per_epoch))
    if s.total_steps < MIN_DEFAULT_STEPS:
        say(s, f"{PROG}: warning: the run takes {s.total_steps} steps, few for fine-tuning; the summary compares "
               "the result with the majority-class baseline")
    if args.stop_at_step is not None and args.stop_at_step > s.total_steps:
        raise ConfigError(f"--stop-at-step {args.stop_at_step} is beyond the run's {s.total_steps} steps")
    s.eval_every = s.steps_per_epoch if args.eval_every is None else args.eval_every
    s.log_every = args.log_every or max(1, min(10, s.total_steps // 10))
    s.warmup_steps = min(s.total_steps, round(args.warmup_ratio * s.total_steps))


def clear_previous_run(args, s):
    """--overwrite (not resuming): remove what an earlier run left in the output folder."""
    if s.rank != 0:
        return
    os.makedirs(s.output, exist_ok=True)
    if args.overwrite and s.resume_from is None:
        for name in (CHECKPOINT_DIR, "hf", "best.json", "predictions.jsonl", "predictions.json"):
            path = os.path.join(s.output, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.isfile(path):
                os.remove(path)


def build_task_model(args, s, names):
    """The model with the same initial weights (and head) on every rank, then per-rank RNG streams for dropout;
    returns (model, where its weights came from, parameter count)."""
    import deepspeed
    seed_everything(args.seed)
    model, origin = build_model(args, s, names)
    n_params = model.num_parameters()  # before ZeRO-3 partitions the parameters
    seed_everything(args.seed + s.rank)
    if s.zero_stage == 3:
        emb = model.roberta.embeddings
        deepspeed.zero.register_external_parameter(emb, emb.token_type_embeddings.weight)
    return model, origin, n_params


def model_inputs(batch, device):
    """The batch on the device, with validate=False: ids come from the run's tokenizer (checked against the
    model's vocabulary at start) and labels from encode_labels (checked per split on the host), so the model
    skips its per-step host reads of them."""
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    inputs["validate"] = False
    return inputs


def predict(module_call, ids, batch_size, pad_id, device, rank, world_size, pad_multiple=1, pad_limit=None,
            family=None):
    """Logits (float32 numpy, one row per example, in order) of the whole split, every rank evaluating its
    share and the shares gathered on all ranks; batches padded as ``tasks.collate`` says. With a task
    ``family``: its batches, and a list of what its ``row`` makes of each example's output (its ``take``)."""
    import torch.distributed as dist
    from fastroberta.tasks import eval_batches
    idx, rows = [], []
    take = family.take if family is not None else logit_rows
    with torch.no_grad(), preserved_rng():
        for real, batch in eval_batches(ids, batch_size, pad_id, rank, world_size, pad_multiple, pad_limit,
                                        family.collate if family is not None else None):
            logits = take(module_call(**model_inputs(batch, device)), batch)
            for i, row in zip(real, logits):
                if i >= 0:
                    idx.append(i)
                    rows.append(row if family is None else family.row(torch.from_numpy(row), ids[i]))
    parts = [(idx, rows)]
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, (idx, rows))
    out = [None] * len(ids)
    for part_idx, part_rows in parts:
        for i, row in zip(part_idx, part_rows):
            out[i] = row
    return out if family is not None else np.stack(out)


def scores(task, logits, labels):
    from fastroberta.tasks import compute_metrics
    preds = logits[:, 0] if task.regression else logits.argmax(-1)
    return preds, compute_metrics(task, preds, labels)


def gathered_state(engine, s):
    """The full fp32 state dict on rank 0 (None elsewhere); ZeRO-3 parameters are gathered first."""
    import contextlib
    import deepspeed
    module = engine.module
    gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None) \
        if s.zero_stage == 3 else contextlib.nullcontext()
    with gather:
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} if s.rank == 0 else None


def export_model(state, config, tokenizer, max_seq_len, out_dir, cls=None):
    """Write ``state`` as a Hugging Face folder with the tokenizer, replacing ``out_dir`` only once complete;
    ``cls`` is the model class (default: RobertaForSequenceClassification)."""
    from fastroberta.model import RobertaForSequenceClassification
    from fastroberta.data.tokenizer import save_tokenizer
    cls = cls or RobertaForSequenceClassification
    tmp, old = out_dir + ".tmp", out_dir + ".old"
    for d in (tmp, old):
        if os.path.isdir(d):
            shutil.rmtree(d)
    model = cls(config, kernels="torch")
    model.load_state_dict(state, strict=True)
    model.save_pretrained(tmp)
    save_tokenizer(tokenizer, tmp, model_max_length=config.max_seq_len)
    if os.path.isdir(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if os.path.isdir(old):
        shutil.rmtree(old)


@dataclass
class RunState:
    """Where a run stands; what a checkpoint saves beside the engine (``client_state``)."""
    run: dict                  # the settings a resumed run must match
    guard: NonFiniteGuard
    step: int = 0
    best: dict = field(default_factory=lambda: {"step": None, "metric": None, "metrics": None})
    saved_step: int = None     # the step whose state is on disk
    last: dict = field(default_factory=dict)   # the last logged record

    def client_state(self, loader):
        return {"step": self.step, "best": self.best, "nonfinite_streak": self.guard.streak, "run": self.run,
                "loader": loader.state_dict()}


def start_or_resume(args, s, engine, loader, config, origin, names):
    """A fresh RunState, or the checkpoint's; then, on rank 0, the run folder's settings files."""
    run_info = {"task": args.task, "total_steps": s.total_steps, "global_batch_size": s.global_batch_size,
                "seed": args.seed, "precision": s.precision, "zero_stage": s.zero_stage, "lr": s.lr,
                "max_seq_len": args.max_seq_len}
    state = RunState(run=run_info, guard=NonFiniteGuard(args.max_nonfinite))
    if s.resume_from is not None:
        client = load_checkpoint(engine, s, loader)
        state.step = state.saved_step = client["step"]
        state.best = client["best"]
        # "nonfinite": the key checkpoints written before the shared training core used.
        state.guard.streak = client.get("nonfinite_streak", client.get("nonfinite", 0))
        warn_changed_settings(lambda msg: say(s, msg), PROG, client["run"],
                              announced_on_resume(args, run_info))
        say(s, f"resumed from {os.path.join(*s.resume_from)} at step {state.step}")
    if s.rank == 0:
        write_config(s.ds_config, os.path.join(s.output, "ds_config.json"))
        with open(os.path.join(s.output, "run.json"), "w") as f:
            json.dump({"args": vars(args), "settings": run_info, "model": config.to_dict(),
                       "model_source": s.model_path, "init": origin, "labels": names}, f, indent=2, default=str)
    return state


def save_run(engine, s, args, state, loader, bar):
    """Checkpoint the run unless this step is on disk already."""
    if state.step == state.saved_step:
        return
    state.saved_step = state.step
    with preserved_rng():
        path = save_checkpoint(engine, s.ckpt_dir, state.step, s.rank, s.world_size,
                               {"rng": rng_state(), "loader": loader.state_dict()}, state.client_state(loader),
                               args.keep_last)
    say(s, f"checkpoint saved: {path}", bar)


def evaluate(engine, s, args, val, pad_id, device):
    """The task's metrics on the validation split (every rank predicts its share)."""
    was_training = engine.module.training
    engine.eval()
    logits = predict(engine, val[0], s.eval_batch_size, pad_id, device, s.rank, s.world_size,
                     args.pad_to_multiple_of, args.max_seq_len, s.family)
    if was_training:
        engine.train()
    if s.family is not None:
        return s.family.scores(logits, val, s.names)
    return scores(s.task, logits, val[1])[1]


def keep_if_best(engine, s, args, state, metrics, config, tokenizer, hf_dir):
    """Export the model to hf/ (and best.json) when ``metrics`` beat the best so far; True when they did."""
    import torch.distributed as dist
    metric = s.task.metric
    improved = state.best["metric"] is None or metrics[metric] > state.best["metric"]
    if improved:
        state.best = {"step": state.step, "metric": metrics[metric], "metrics": metrics}
        weights = gathered_state(engine, s)
        if s.rank == 0:
            export_model(weights, config, tokenizer, args.max_seq_len, hf_dir, model_class(s))
            atomic_write(os.path.join(s.output, "best.json"),
                         json.dumps({"step": state.step, "metric": metric, **metrics}, indent=2))
        dist.barrier()
    return improved


def finetune_loop(args, s, engine, loader, val, special, config, tokenizer, device, state):
    """Train from ``state.step`` to --stop-at-step or the run's end, logging, evaluating (keeping the best model)
    and checkpointing; a stop signal checkpoints and ends the loop. Returns True when a signal stopped it."""
    log = MetricsLog(os.path.join(s.output, "metrics.jsonl"), enabled=s.rank == 0,
                     resume_step=state.step if s.resume_from is not None else None)
    end_step = args.stop_at_step or s.total_steps
    bar = progress_bar(total=s.total_steps, initial=state.step, desc="finetune",
                       disable=s.rank != 0 or args.no_progress, file=sys.stderr)
    hf_dir = os.path.join(s.output, "hf")
    batches = iter(loader)
    window = {"loss": 0.0, "n": 0, "tokens": 0, "samples": 0, "t": time.perf_counter()}
    stopped = False
    engine.train()
    try:
        with StopRequest() as stop:
            while state.step < end_step:
                lr = engine.get_lr()[0]
                result = optimizer_step(engine, batches, s, device, model_inputs,
                                        stop_requested=stop.requested,
                                        step=state.step + 1, last_good="resume from the last checkpoint")
                state.step += 1
                step = state.step
                if state.guard.update(result.loss, skipped=result.skipped, loss_scale=result.loss_scale,
                                      min_loss_scale=s.ds_config.get("fp16", {}).get("min_loss_scale", 1)):
                    raise TrainingError(nonfinite_stop_message(result, state.guard, step, lr, s.precision) + ".")
                if math.isfinite(result.loss):
                    window["loss"] += result.loss
                    window["n"] += 1
                window["tokens"] += result.tokens
                window["samples"] += result.samples
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}", refresh=False)

                do_eval = val is not None and (step == s.total_steps or (s.eval_every and step % s.eval_every == 0))
                if do_eval or step % s.log_every == 0 or step == end_step or result.stop_requested:
                    elapsed = time.perf_counter() - window["t"]
                    record = {"step": step, "epoch": round(step / s.steps_per_epoch, 4),
                              "loss": window["loss"] / window["n"] if window["n"] else None, "lr": lr,
                              "grad_norm": grad_norm_of(engine, result.fallback_norm),
                              "samples_per_s": window["samples"] / elapsed,
                              "tokens_per_s": window["tokens"] / elapsed, "peak_mem_mib": peak_memory_mib(device)}
                    if do_eval:
                        metrics = evaluate(engine, s, args, val, special["pad"], device)
                        record.update({f"eval_{k}": v for k, v in metrics.items()})
                        improved = keep_if_best(engine, s, args, state, metrics, config, tokenizer, hf_dir)
                        say(s, f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                               + (" (best so far)" if improved else ""), bar)
                    log.log(record)
                    state.last = record
                    window = {"loss": 0.0, "n": 0, "tokens": 0, "samples": 0, "t": time.perf_counter()}
                if result.stop_requested:
                    stopped = True
                    break
                if args.save_every and step % args.save_every == 0 and step != end_step:
                    save_run(engine, s, args, state, loader, bar)
            save_run(engine, s, args, state, loader, bar)
    finally:
        bar.close()
        log.close()
    return stopped


def finish(args, s, engine, data, names, config, tokenizer, special, device, state, stopped, t0):
    """A finished run: the final model when there was nothing to choose by, the test predictions, the summary."""
    hf_dir = os.path.join(s.output, "hf")
    summary = {"step": state.step, "output": s.output, "best": state.best, "metrics": state.last,
               "stopped_by_signal": stopped, "hf": None, "test": None}
    best, metric = state.best, s.task.metric
    if state.step >= s.total_steps and not stopped:
        if data.get("validation") is None:  # nothing to choose by: the final model is the result
            weights = gathered_state(engine, s)
            if s.rank == 0:
                export_model(weights, config, tokenizer, args.max_seq_len, hf_dir, model_class(s))
        summary["hf"] = hf_dir
        if "test" in data:
            summary["test"] = write_predictions(args, s, data["test"], names, hf_dir, device, special, state)
        say(s, f"done: step {state.step}" + (f", best {metric} {best['metric']:.4f} at step {best['step']}"
                                              if best["metric"] is not None else "")
            + f" in {time.perf_counter() - t0:.0f}s (start-up included); the model is in {hf_dir}")
        if s.family is None:  # the majority class / mean of sequence labels
            summary["baseline"] = report_baseline(s, data, names, best["metrics"], summary["test"])
        if s.rank == 0:
            from fastroberta.plot import draw_run
            summary["loss_png"] = draw_run(s.output, lambda msg: say(s, msg))
    elif stopped:
        say(s, f"stopped by signal at step {state.step}; resume with --resume")
    return summary


def report_baseline(s, data, names, validation, test):
    """The result next to what ignoring the input scores (the training split's majority class, or its mean for
    regression), on validation and on a labelled test split; says plainly when the model did not beat it.
    Returns {"predicts": ..., "<split>": baseline metrics, "beaten": bool or None}."""
    from fastroberta.tasks import baseline_metrics
    metric = s.task.metric
    result = {"predicts": None, "beaten": None}
    parts, verdict = [], None
    for split, model_metrics in (("validation", validation), ("test", test)):
        if model_metrics is None or data.get(split) is None or data[split][1] is None:
            continue
        predicts, base = baseline_metrics(s.task, data["train"][1], data[split][1])
        result["predicts"] = predicts if names is None else names[int(predicts)]
        result[split] = base
        parts.append(f"{base[metric]:.4f} on {split} (the model: {model_metrics[metric]:.4f})")
        if verdict is None:  # validation decides when there is one: the kept model was chosen on it
            beaten = model_metrics[metric] > base[metric]
            result["beaten"] = beaten
            verdict = (f"the model beats it on {split} by {model_metrics[metric] - base[metric]:+.4f}" if beaten else
                       f"the model did NOT beat it on {split}: it learned nothing it can use from the text; train "
                       "longer (--epochs, --steps), try another --lr, or give more data")
    if not parts:
        return result
    what = "the mean predictor (the training labels' mean for every example)" if names is None else \
        f"always {result['predicts']!r} (the training split's majority class)"
    say(s, f"baseline, {what}: {metric} " + ", ".join(parts) + f"; {verdict}")
    return result


def prediction_autocast(s, device):
    """The fp32 export predicts under autocast in the run's precision, on any device (a CPU bf16 run takes the
    path a GPU fp16/bf16 one does)."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(s.precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def report_test_metrics(s, metrics):
    """Say the test split's metrics and write them to test_metrics.json; returns them."""
    say(s, "test: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    with open(os.path.join(s.output, "test_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def write_predictions(args, s, test, names, hf_dir, device, special, state=None):
    """Rank 0 predicts the test split with the kept model (hf/) into predictions.jsonl (a family's predictions
    file: question answering writes predictions.json, {id: answer text}, the official SQuAD scripts' input, with
    SQuAD 2.0's no-answer threshold from the kept model's validation); returns the test metrics when the split
    has labels, else None."""
    import torch.distributed as dist
    result = None
    if s.rank == 0:
        model = model_class(s).from_pretrained(hf_dir, kernels=args.kernels).to(device).eval()
        ids, labels, split = test
        with prediction_autocast(s, device):
            logits = predict(model, ids, s.eval_batch_size, special["pad"], device, 0, 1,
                             args.pad_to_multiple_of, args.max_seq_len, s.family)
        if s.family is not None:
            kept = (state.best["metrics"] if state is not None else None) or {}
            predictions, metrics = s.family.test_results(logits, test, names, kept)
            name = s.family.predictions_file
        else:
            preds, metrics = scores(s.task, logits, labels if labels is not None else np.zeros(len(ids)))
            metrics = metrics if labels is not None else None
            predictions, name = [], "predictions.jsonl"
            for i, p in enumerate(preds):
                row = {"index": i, **dict(zip(("text", "text_pair"), split.texts[i])),
                       "prediction": float(p) if names is None else names[int(p)]}
                if labels is not None:
                    row["label"] = float(labels[i]) if names is None else names[int(labels[i])]
                predictions.append(row)
        tmp = os.path.join(s.output, name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            if name.endswith(".jsonl"):
                f.writelines(json.dumps(row) + "\n" for row in predictions)
            else:
                json.dump(predictions, f, ensure_ascii=False, indent=1)
                f.write("\n")
        os.replace(tmp, os.path.join(s.output, name))
        if metrics is not None:
            result = report_test_metrics(s, metrics)
    dist.barrier()
    return result


def default_output_of(args):
    """The run folder when --output is not given: runs/finetune-<task>, with the task as resolve_settings will
    decide it (given, the word-order demo without --train, or inferred from --train), so that ``--resume`` without
    --output or --task finds the run's run.json."""
    task = task_for_data(args.task, args.train, args.label_field)[0]
    return os.path.join("runs", f"finetune-{task}")


def finetune(argv=None):
    """Run fine-tuning; returns a summary dict. Raises ConfigError (DataError) for a configuration or data that
    cannot work (before training starts) and TrainingError when a run must stop."""
    args = parse_command_line(build_parser(), argv, default_output_of)
    s = resolve_settings(args)
    for w in s.warnings:
        say(s, f"{PROG}: warning: {w}")
    if s.task_inferred:
        say(s, f"task: {args.task} (inferred from the labels of --train {args.train}; --task sets it)")
    # One run per output folder: rank 0 holds the lock before anything is read or written there.
    lock = OutputLock(s.output).acquire() if s.rank == 0 else None
    try:
        with watching(s, args.dist_timeout, PROG):  # a lost rank ends the run in bounded time, named
            return run(args, s)
    finally:
        if lock is not None:
            lock.release()


def run(args, s):
    """The run as a straight line: tokenizer and data, schedule, process group, model, engine, resume, loop,
    test predictions."""
    import torch.distributed as dist
    from fastroberta.tasks import TaskLoader
    t0 = s.started  # the run's clock includes start-up: Python's imports and DeepSpeed's start
    tokenizer, special = load_checked_tokenizer(s)
    data, names = load_data(args, s, tokenizer, special)
    s.names = names
    train_ids, train_labels, _ = data["train"]
    plan_schedule(args, s, len(train_ids))
    # Every input is read and checked by now, before DeepSpeed starts.
    if s.family is not None:
        kind = s.family.describe(names, train_ids)
    else:
        kind = "regression" if names is None else f"{len(names)} classes"
    say(s, f"data ready: {', '.join(f'{k} {len(v[0])}' for k, v in data.items())} "
           f"{s.family.unit if s.family else 'examples'}, {kind} ({time.perf_counter() - t0:.1f}s since start)")
    announce_start(s)
    device, s.threads = init_distributed(s.on_cuda, s.local_rank, args.dist_timeout)
    check_shared_output(s.output, s.rank, s.world_size)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    clear_previous_run(args, s)

    model, origin, n_params = build_task_model(args, s, names)
    engine = build_engine(model, s, args, lr_scheduler(s.warmup_steps, s.total_steps))
    say(s, f"engine ready: {n_params / 1e6:.1f}M parameters from {s.model_path} ({origin}), "
           f"{s.precision}, ZeRO {s.zero_stage}, world {s.world_size}, global batch {s.global_batch_size}, "
           f"{s.total_steps} steps ({s.steps_per_epoch}/epoch), peak lr {s.lr:.2e}, warmup {s.warmup_steps}")
    loader = TaskLoader(train_ids, train_labels, special["pad"], s.micro_batch_size, s.global_batch_size, s.rank,
                        s.world_size, args.seed, args.group_by_length, args.pad_to_multiple_of, args.max_seq_len,
                        s.family.collate if s.family is not None else None)
    state = start_or_resume(args, s, engine, loader, model.config, origin, names)
    stopped = finetune_loop(args, s, engine, loader, data.get("validation"), special, model.config, tokenizer,
                            device, state)
    summary = finish(args, s, engine, data, names, model.config, tokenizer, special, device, state, stopped, t0)
    dist.barrier()
    engine.destroy()
    return summary


def main(argv=None):
    """Console entry point: 0 on success (also after a signal-requested stop), 2 for bad input (a flag, a file,
    the output folder), 1 when the run itself failed; either error is one line on stderr (training/errors.py)."""
    return run_command(PROG, finetune, argv)


if __name__ == "__main__":
    sys.exit(main())
