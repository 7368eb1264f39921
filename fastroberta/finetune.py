"""fastroberta-finetune: sequence classification / regression fine-tuning (GLUE and your own data) under DeepSpeed.

    fastroberta-finetune                                   # the default pretraining run on the bundled word-order task
    fastroberta-finetune --model runs/fastroberta-base --task mrpc --train hf:glue:mrpc --output runs/mrpc
    fastroberta-finetune --model roberta-base --task classification --train train.csv --validation dev.csv \\
        --text-fields title,body --label-field topic --output runs/topics
    deepspeed --num_gpus 8 --module fastroberta.finetune --model ... --zero-stage 2 ...

The same structure and flag policy as ``fastroberta-train``: check the configuration, read and tokenise the
data, build the model and the DeepSpeed engine, maybe resume, train with periodic evaluation on the validation
split and checkpoints, then predict the test split. The model with the best validation metric is kept.

Output folder: ``metrics.jsonl`` (one JSON object per logged step; evaluations add ``eval_<metric>``),
``hf/`` (the best model by the task's metric, with its tokenizer: loadable by
``transformers.AutoModelForSequenceClassification``), ``best.json`` (its step and metrics), ``predictions.jsonl``
(for ``--test``), ``checkpoints/`` (DeepSpeed checkpoints for ``--resume``), ``ds_config.json``, ``run.json``.
"""
import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings

import numpy as np
import torch

from fastroberta import train as tr
from fastroberta.config import PRESETS, RobertaConfig
from fastroberta.training.ds_config import ConfigError, build_config, merge_with_user_config, write_config
from fastroberta.kernels.backend import KERNEL_CHOICES as KERNELS
from fastroberta.training.metrics import MetricsLog, peak_memory_mib
from fastroberta.tasks import TASKS, DataError, Task, get_task  # noqa: F401  (Task: for callers)

from fastroberta.training.checkpoints import CHECKPOINT_DIR, LATEST, find_checkpoint, save_checkpoint
from fastroberta.training.distributed import init_distributed, world
from fastroberta.training.errors import TrainingError, run_command
from fastroberta.training.output import OutputLock, atomic_write
from fastroberta.training.rng import preserved_rng, rng_state, seed_everything
from fastroberta.training.stop import StopRequest

# Shared with the pretraining trainer.
load_checkpoint, param_groups, warmup_linear_decay = tr.load_checkpoint, tr.param_groups, tr.warmup_linear_decay

DEFAULT_MODEL = os.path.join("runs", "fastroberta-demo")  # where a plain `fastroberta-train` writes
PROG = "fastroberta-finetune"


def default_lr(hidden_size):
    """RoBERTa's GLUE sweep used 1e-5 to 3e-5 for base and large; small models need more: 1e-4 from a width
    of 256 and 1e-3 below (the 64-wide demo encoder stays at chance on the bundled task at 1e-4)."""
    if hidden_size >= 1024:
        return 1e-5
    if hidden_size >= 768:
        return 2e-5
    return 1e-4 if hidden_size >= 256 else 1e-3


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Fine-tune a RoBERTa encoder for sequence classification or regression (GLUE or your own "
                    "CSV / TSV / JSONL data) with the Triton kernels under DeepSpeed. With no arguments: the "
                    f"default pretraining run ({DEFAULT_MODEL}) on the bundled word-order task.",
        formatter_class=tr._HelpFormatter)
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
    g.add_argument("--kernels", default="auto", choices=KERNELS,
                   help="auto: Triton on CUDA, the PyTorch reference on CPU")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (fullgraph) inside the DeepSpeed engine, as fastroberta-train "
                        "--compile; batches of new lengths recompile until Dynamo marks the length dynamic "
                        "(batch lengths are rounded to multiples of 64 by default to keep them few)")
    g.add_argument("--dropout", type=float, default=None,
                   help="hidden, attention and classifier dropout (default: the model's config)")
    g = p.add_argument_group("task and data")
    g.add_argument("--task", default="word-order", choices=list(TASKS),
                   help="a GLUE task (fields, classes, metric preset), word-order (generated from the bundled "
                        "corpus when --train is not given), or classification / regression for your own data")
    g.add_argument("--train", default=None,
                   help="training examples: a .csv, .tsv or .jsonl file, or hf:glue:<task> / hf:<dataset>[:<config>]"
                        "[@split] with the datasets package (default: hf:glue:<task> for GLUE tasks)")
    g.add_argument("--validation", default=None,
                   help="validation examples, same forms (default: the validation split of an hf: --train)")
    g.add_argument("--test", default=None,
                   help="examples to predict into predictions.jsonl (labels optional: scored when present)")
    g.add_argument("--text-fields", default=None,
                   help="the text field, or two separated by a comma for sentence pairs (default: the task's; "
                        "text for custom tasks)")
    g.add_argument("--label-field", default=None, help="the label field (default: label)")
    g.add_argument("--metric", default=None,
                   help="metric choosing the best model: accuracy, f1, mcc, pearson or spearman (default: the "
                        "task's: MCC for CoLA, F1 for MRPC/QQP, Pearson for STS-B and regression, else accuracy)")
    g.add_argument("--max-seq-len", type=int, default=None,
                   help="longer inputs are truncated (pairs: longest first); batches pad to their longest row, "
                        "rounded up by --pad-to-multiple-of (default: 128, or the model's limit if lower)")
    g.add_argument("--pad-to-multiple-of", type=int, default=None,
                   help="round each batch's length up to a multiple of this many tokens, never past "
                        "--max-seq-len (default: 8, or 64 with --compile, so that a compiled model meets few "
                        "distinct lengths; 1 pads to the longest row exactly)")
    g.add_argument("--group-by-length", action="store_true",
                   help="batch examples of similar length together (less padding, less randomness)")
    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, default=32, help="examples per process per forward pass")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="examples per optimizer step over all processes; accumulation is derived "
                        "(default: micro-batch size x world size)")
    g.add_argument("--epochs", type=float, default=None,
                   help="passes over the training split (default: 3, and 10 for the small bundled word-order "
                        "task; see --steps)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps, instead of --epochs")
    g.add_argument("--stop-at-step", type=int, default=None,
                   help="checkpoint and exit after this step, the schedule still spanning the whole run")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 2e-5 for base-sized models, 1e-5 for large, 1e-4 down to "
                        "a width of 256, 1e-3 below)")
    g.add_argument("--warmup-ratio", type=float, default=0.06, help="share of the steps in linear warmup")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay (not on biases/LayerNorm)")
    g.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.98), metavar=("BETA1", "BETA2"),
                   help="AdamW betas (default: 0.9 0.98, RoBERTa's)")
    g.add_argument("--adam-eps", type=float, default=1e-6, help="AdamW epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0, help="gradient norm clipping (0 = off)")
    g.add_argument("--seed", type=int, default=0, help="head initialisation, dropout and data order")
    g = p.add_argument_group("DeepSpeed")
    g.add_argument("--precision", default="auto", choices=tr.PRECISIONS,
                   help="auto: fp16 with dynamic loss scaling on CUDA; on CPU bf16 when the CPU has native bf16, "
                        "else fp32")
    g.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3),
                   help="ZeRO: 1 partitions optimizer state, 2 also gradients, 3 also parameters")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON merged over the generated config (its values win; conflicts reported)")
    g.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--debug", action="store_true", help="print the traceback of an error too "
                   "(also: FASTROBERTA_DEBUG=1)")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)
    g = p.add_argument_group("output")
    g.add_argument("--output", default=None, help="run folder (default: runs/finetune-<task>)")
    g.add_argument("--resume", nargs="?", const=LATEST, default=None, metavar="PATH",
                   help="continue from the latest checkpoint in --output, or from PATH")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --output that holds a run")
    g.add_argument("--eval-every", type=int, default=None,
                   help="evaluate every N steps and at the end (default: once per epoch; 0 = only at the end)")
    g.add_argument("--eval-batch-size", type=int, default=None, help="default: 2 x --micro-batch-size")
    g.add_argument("--save-every", type=int, default=0,
                   help="checkpoint for --resume every N steps (0 = at the end and when stopped by a signal)")
    g.add_argument("--keep-last", type=int, default=1, help="checkpoints kept (0 = all)")
    g.add_argument("--log-every", type=int, default=None,
                   help="write metrics every N steps (default: 10, or steps/10 for short runs)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--max-nonfinite", type=int, default=5, help="stop after this many consecutive non-finite losses")
    return p


# ----------------------------------------------------------------------------------------------------------
# Configuration checks
# ----------------------------------------------------------------------------------------------------------
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
    on_cuda = torch.cuda.is_available()
    rank, world_size = world()
    local_rank = args.local_rank if args.local_rank is not None else int(os.environ.get("LOCAL_RANK", "0"))
    s = argparse.Namespace(on_cuda=on_cuda, rank=rank, world_size=world_size, local_rank=local_rank,
                           seed=args.seed)
    for name in ("micro_batch_size", "max_seq_len", "global_batch_size", "steps", "stop_at_step",
                 "eval_batch_size", "log_every", "pad_to_multiple_of"):
        tr._check_positive("--" + name.replace("_", "-"), getattr(args, name))
    for name in ("eval_every", "save_every", "keep_last", "weight_decay", "clip_grad", "max_nonfinite"):
        tr._check_positive("--" + name.replace("_", "-"), getattr(args, name), allow_zero=True)
    if args.epochs is not None and not args.epochs > 0:
        raise ConfigError(f"--epochs must be positive, got {args.epochs}")
    if args.lr is not None and not args.lr > 0:
        raise ConfigError(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.warmup_ratio < 1:
        raise ConfigError(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise ConfigError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.max_seq_len is not None and args.max_seq_len < 8:
        raise ConfigError(f"--max-seq-len must be at least 8, got {args.max_seq_len}")

    s.task = get_task(args.task, args.text_fields, args.label_field, args.metric)
    if args.train is None and args.task in TASKS and TASKS[args.task].hf is not None:
        args.train = f"hf:{':'.join(TASKS[args.task].hf)}"
    if args.train is None and args.task != "word-order":
        raise ConfigError(f"--task {args.task} needs --train (a .csv, .tsv or .jsonl file, or hf:<dataset>)")
    if args.epochs is None:
        # The generated word-order task is small (2,000 lines): ten passes, about 15 s for the demo encoder.
        args.epochs = 10.0 if args.task == "word-order" and args.train is None else 3.0
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
        args.max_seq_len = min(128, s.config.max_seq_len)
    if args.max_seq_len > s.config.max_seq_len:
        raise ConfigError(f"--max-seq-len {args.max_seq_len} exceeds the model's position table "
                          f"({s.config.max_seq_len} tokens)")
    if args.pad_to_multiple_of is None:
        args.pad_to_multiple_of = 64 if args.compile else 8

    if args.kernels == "triton" and not on_cuda:
        from fastroberta.kernels._checks import interpreter_active
        if not interpreter_active():
            raise ConfigError("--kernels triton needs a CUDA GPU; on CPU use --kernels torch")
    precision = args.precision
    if precision == "auto":
        precision = "fp16" if on_cuda else ("bf16" if tr.cpu_has_native_bf16() else "fp32")
    if precision == "fp16" and not on_cuda:
        raise ConfigError("--precision fp16 needs a CUDA GPU; use --precision bf16 or fp32")

    micro = args.micro_batch_size
    global_batch = args.global_batch_size if args.global_batch_size is not None else micro * world_size
    if global_batch % (micro * world_size):
        raise ConfigError(f"--global-batch-size {global_batch} is not divisible by --micro-batch-size {micro} x "
                          f"world size {world_size} (= {micro * world_size})")
    s.lr = args.lr if args.lr is not None else default_lr(s.config.hidden_size)
    optimizer = {"lr": s.lr, "betas": tuple(args.adam_betas), "eps": args.adam_eps,
                 "weight_decay": args.weight_decay, "torch_adam": not on_cuda}
    generated = build_config(micro_batch_size=micro, grad_accum_steps=global_batch // (micro * world_size),
                             world_size=world_size, precision=precision, zero_stage=args.zero_stage,
                             clip_grad=args.clip_grad, optimizer=optimizer, on_cuda=on_cuda)
    merged = merge_with_user_config(generated, args.deepspeed_config, micro_batch_size=micro,
                                    global_batch_size=global_batch, world_size=world_size, precision=precision,
                                    on_cuda=on_cuda, compile=args.compile)
    ds, user, s.warnings = merged.ds, merged.user, merged.warnings
    s.micro_batch_size, s.grad_accum_steps = merged.micro_batch_size, merged.grad_accum_steps
    s.global_batch_size, s.precision, s.zero_stage = merged.global_batch_size, merged.precision, merged.zero_stage
    if "scheduler" in user:
        raise ConfigError("--deepspeed_config defines a scheduler; fine-tuning uses its own linear warmup/decay "
                          "(--warmup-ratio)")
    params = ds.get("optimizer", {}).get("params", {})
    s.lr = params.get("lr", s.lr)
    s.weight_decay = params.get("weight_decay", args.weight_decay)
    s.ds_config = ds
    s.eval_batch_size = args.eval_batch_size or 2 * s.micro_batch_size

    s.output = args.output or os.path.join("runs", f"finetune-{args.task}")
    s.ckpt_dir = os.path.join(s.output, CHECKPOINT_DIR)
    s.resume_from = None
    if args.resume is not None:
        s.resume_from = find_checkpoint(s.ckpt_dir if args.resume == LATEST else args.resume,
                                        explicit=args.resume != LATEST, warn=s.warnings.append)
        if s.resume_from is None:
            s.warnings.append(f"--resume: no checkpoint in {s.ckpt_dir}; starting from scratch")
    elif not args.overwrite and (os.path.isfile(os.path.join(s.ckpt_dir, LATEST))
                                 or os.path.isfile(os.path.join(s.output, "metrics.jsonl"))):
        raise ConfigError(f"{s.output} already holds a run; pass --resume to continue it, --overwrite to start "
                          "afresh, or choose another --output")
    return s


# ----------------------------------------------------------------------------------------------------------
# Data and model
# ----------------------------------------------------------------------------------------------------------
def load_data(args, s, tokenizer, special):
    """{"train" | "validation" | "test": (ids, labels or None, Split)} and the class names (None: regression)."""
    from fastroberta.tasks import (Split, encode_labels, label_names, read_split, tokenize, word_order_task)
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


def build_model(args, s, names):
    from fastroberta.model import RobertaForSequenceClassification
    overrides = {"num_labels": 1 if names is None else len(names),
                 "problem_type": "regression" if s.task.regression else "single_label_classification",
                 "id2label": None if names is None else dict(enumerate(names))}
    if args.dropout is not None:
        overrides.update(hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout,
                         classifier_dropout=args.dropout)
    if s.model_kind == "pretrained":
        import dataclasses
        # Load with the checkpoint's own head size; a head of another size (a checkpoint fine-tuned for another
        # task) is then dropped: its out_proj is initialised afresh, like transformers' ignore_mismatched_sizes.
        keep = {k: v for k, v in overrides.items() if k not in ("num_labels", "id2label", "problem_type")}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                loaded = RobertaForSequenceClassification.from_pretrained(s.model_path, kernels=args.kernels, **keep)
            except (OSError, ValueError, RuntimeError) as e:
                raise ConfigError(f"--model {args.model!r} cannot be loaded: {str(e).splitlines()[0]}") from None
        new_head = any("newly initialised" in str(w.message) for w in caught)
        if loaded.config.num_labels == overrides["num_labels"]:
            loaded.config = dataclasses.replace(loaded.config, **overrides)
            loaded.num_labels = overrides["num_labels"]
            return loaded, ("a new classification head" if new_head else "the checkpoint's classification head")
        model = RobertaForSequenceClassification(dataclasses.replace(loaded.config, **overrides), kernels=args.kernels)
        state = {k: v for k, v in loaded.state_dict().items() if not k.startswith("classifier.out_proj.")}
        model.load_state_dict(state, strict=False)
        return model, ("a new classification head" if new_head else
                       f"the checkpoint's classification head with a new {overrides['num_labels']}-way output layer")
    import dataclasses
    config = dataclasses.replace(s.config, **overrides)
    return RobertaForSequenceClassification(config, kernels=args.kernels), "random initialisation (from scratch)"


def model_inputs(batch, device):
    """The batch on the device, with validate=False: ids come from the run's tokenizer (checked against the
    model's vocabulary at start) and labels from encode_labels (checked per split on the host), so the model
    skips its per-step host reads of them."""
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    inputs["validate"] = False
    return inputs


def predict(module_call, ids, batch_size, pad_id, device, rank, world_size, pad_multiple=1, pad_limit=None):
    """Logits (float32 numpy, one row per example, in order) of the whole split, every rank evaluating its
    share and the shares gathered on all ranks; batches padded as ``tasks.collate`` says."""
    import torch.distributed as dist
    from fastroberta.tasks import eval_batches
    idx, rows = [], []
    with torch.no_grad(), preserved_rng():
        for real, batch in eval_batches(ids, batch_size, pad_id, rank, world_size, pad_multiple, pad_limit):
            logits = module_call(**model_inputs(batch, device)).logits.float().cpu()
            for i, row in zip(real, logits):
                if i >= 0:
                    idx.append(i)
                    rows.append(row.numpy())
    parts = [(idx, rows)]
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, (idx, rows))
    out = [None] * len(ids)
    for part_idx, part_rows in parts:
        for i, row in zip(part_idx, part_rows):
            out[i] = row
    return np.stack(out)


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


def export_model(state, config, tokenizer, max_seq_len, out_dir):
    """Write ``state`` as a Hugging Face folder with the tokenizer, replacing ``out_dir`` only once complete."""
    from fastroberta.model import RobertaForSequenceClassification
    from fastroberta.data.tokenizer import save_tokenizer
    tmp, old = out_dir + ".tmp", out_dir + ".old"
    for d in (tmp, old):
        if os.path.isdir(d):
            shutil.rmtree(d)
    model = RobertaForSequenceClassification(config, kernels="torch")
    model.load_state_dict(state, strict=True)
    model.save_pretrained(tmp)
    save_tokenizer(tokenizer, tmp, model_max_length=config.max_seq_len)
    if os.path.isdir(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if os.path.isdir(old):
        shutil.rmtree(old)


def _say(s, msg, bar=None):
    tr._say(s, msg.replace("fastroberta-train", PROG), bar)


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------
def finetune(argv=None):
    """Run fine-tuning; returns a summary dict. Raises ConfigError (DataError) for a configuration or data that
    cannot work (before training starts) and TrainingError when a run must stop."""
    args = build_parser().parse_args(argv)
    s = resolve_settings(args)
    for w in s.warnings:
        _say(s, f"{PROG}: warning: {w}")
    # One run per output folder: rank 0 holds the lock before anything is read or written there.
    lock = OutputLock(s.output).acquire() if s.rank == 0 else None
    try:
        return _run(args, s)
    finally:
        if lock is not None:
            lock.release()


def _run(args, s):
    from fastroberta.data.tokenizer import load_tokenizer, special_ids
    t0 = time.perf_counter()
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
    data, names = load_data(args, s, tokenizer, special)
    train_ids, train_labels, _ = data["train"]
    steps_per_epoch = len(train_ids) // s.global_batch_size
    if steps_per_epoch == 0:
        raise DataError(f"the training split holds {len(train_ids)} examples, fewer than one global batch "
                        f"({s.global_batch_size}); lower --global-batch-size")
    total_steps = args.steps if args.steps is not None else max(1, round(args.epochs * steps_per_epoch))
    if args.stop_at_step is not None and args.stop_at_step > total_steps:
        raise ConfigError(f"--stop-at-step {args.stop_at_step} is beyond the run's {total_steps} steps")
    eval_every = steps_per_epoch if args.eval_every is None else args.eval_every
    log_every = args.log_every or max(1, min(10, total_steps // 10))
    warmup = min(total_steps, round(args.warmup_ratio * total_steps))

    device, s.threads = init_distributed(s.on_cuda, s.local_rank)
    import deepspeed
    import torch.distributed as dist
    from tqdm.auto import tqdm

    from fastroberta.tasks import TaskLoader
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if s.rank == 0:
        os.makedirs(s.output, exist_ok=True)
        if args.overwrite and s.resume_from is None:
            for name in (CHECKPOINT_DIR, "hf", "best.json", "predictions.jsonl"):
                path = os.path.join(s.output, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.isfile(path):
                    os.remove(path)
    _say(s, f"data ready: {', '.join(f'{k} {len(v[0])}' for k, v in data.items())} examples, "
            f"{'regression' if names is None else f'{len(names)} classes'} ({time.perf_counter() - t0:.1f}s)")

    seed_everything(args.seed)
    model, origin = build_model(args, s, names)
    config = model.config
    n_params = model.num_parameters()  # before ZeRO-3 partitions the parameters
    seed_everything(args.seed + s.rank)
    if s.zero_stage == 3:
        emb = model.roberta.embeddings
        deepspeed.zero.register_external_parameter(emb, emb.token_type_embeddings.weight)
    groups = param_groups(model, s.weight_decay)
    factor = warmup_linear_decay(warmup, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=groups, config=s.ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
    if args.compile:
        tr.compile_engine(engine)
    _say(s, f"engine ready: {n_params / 1e6:.1f}M parameters from {s.model_path} ({origin}), "
            f"{s.precision}, ZeRO {s.zero_stage}, world {s.world_size}, global batch {s.global_batch_size}, "
            f"{total_steps} steps ({steps_per_epoch}/epoch), peak lr {s.lr:.2e}, warmup {warmup}")

    loader = TaskLoader(train_ids, train_labels, special["pad"], s.micro_batch_size, s.global_batch_size, s.rank,
                        s.world_size, args.seed, args.group_by_length, args.pad_to_multiple_of, args.max_seq_len)
    run_info = {"task": args.task, "total_steps": total_steps, "global_batch_size": s.global_batch_size,
                "seed": args.seed, "precision": s.precision, "zero_stage": s.zero_stage, "lr": s.lr,
                "max_seq_len": args.max_seq_len}
    step, best = 0, {"step": None, "metric": None, "metrics": None}
    nonfinite = 0
    if s.resume_from is not None:
        client = load_checkpoint(engine, s, loader)
        step, best, nonfinite = client["step"], client["best"], client.get("nonfinite", 0)
        for k, v in run_info.items():
            if client["run"].get(k) != v:
                _say(s, f"{PROG}: warning: resuming with {k}={v} (checkpoint had {client['run'].get(k)}); the run "
                        "will not match an uninterrupted one")
        _say(s, f"resumed from {os.path.join(*s.resume_from)} at step {step}")
    if s.rank == 0:
        write_config(s.ds_config, os.path.join(s.output, "ds_config.json"))
        with open(os.path.join(s.output, "run.json"), "w") as f:
            json.dump({"args": vars(args), "settings": run_info, "model": config.to_dict(),
                       "model_source": s.model_path, "init": origin, "labels": names}, f, indent=2, default=str)
    log = MetricsLog(os.path.join(s.output, "metrics.jsonl"), enabled=s.rank == 0,
                     resume_step=step if s.resume_from is not None else None)
    end_step = args.stop_at_step or total_steps
    bar = tqdm(total=total_steps, initial=step, desc="finetune", unit="step", dynamic_ncols=True,
               disable=s.rank != 0 or args.no_progress, file=sys.stderr)
    hf_dir = os.path.join(s.output, "hf")
    val = data.get("validation")
    metric = s.task.metric

    def evaluate():
        was_training = engine.module.training
        engine.eval()
        logits = predict(engine, val[0], s.eval_batch_size, special["pad"], device, s.rank, s.world_size,
                         args.pad_to_multiple_of, args.max_seq_len)
        if was_training:
            engine.train()
        return scores(s.task, logits, val[1])[1]

    saved_step = step if s.resume_from is not None else None

    def checkpoint():
        nonlocal saved_step
        if step == saved_step:
            return
        saved_step = step
        client = {"step": step, "best": best, "nonfinite": nonfinite, "run": run_info,
                  "loader": loader.state_dict()}
        with preserved_rng():
            path = save_checkpoint(engine, s.ckpt_dir, step, s.rank, s.world_size,
                                   {"rng": rng_state(), "loader": loader.state_dict()}, client, args.keep_last)
        _say(s, f"checkpoint saved: {path}", bar)

    batches = iter(loader)
    window = {"loss": 0.0, "n": 0, "tokens": 0, "samples": 0, "t": time.perf_counter()}
    last, stopped = {}, False
    engine.train()
    with StopRequest() as stop:
        while step < end_step:
            lr = engine.get_lr()[0]
            skipped_before = engine.skipped_steps
            stats = torch.zeros(4, dtype=torch.float64, device=device)
            for _ in range(s.grad_accum_steps):
                batch = next(batches)
                out = engine(**model_inputs(batch, device))
                engine.backward(out.loss)
                engine.step()
                stats[0] += out.loss.detach().double()
                stats[1] += batch["attention_mask"].sum().item()
                stats[2] += batch["input_ids"].shape[0]
            stats[3] = float(stop.requested)
            dist.all_reduce(stats)
            loss_sum, n_tokens, n_samples, stop_votes = stats.tolist()
            loss = loss_sum / (s.grad_accum_steps * s.world_size)
            step += 1
            skipped = engine.skipped_steps > skipped_before  # fp16 overflow: the loss scaler skipped the update
            if not math.isfinite(loss) and not skipped:
                nonfinite += 1
                if nonfinite >= args.max_nonfinite:
                    bar.close()
                    log.close()
                    raise TrainingError(f"the loss was non-finite for {nonfinite} consecutive steps, up to step "
                                        f"{step} (lr {lr:.3e}); lower --lr or use bf16/fp32")
            elif math.isfinite(loss):
                nonfinite = 0
                window["loss"] += loss
                window["n"] += 1
            window["tokens"] += n_tokens
            window["samples"] += n_samples
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

            do_eval = val is not None and (step == total_steps or (eval_every and step % eval_every == 0))
            if do_eval or step % log_every == 0 or step == end_step or stop_votes > 0:
                elapsed = time.perf_counter() - window["t"]
                record = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                          "loss": window["loss"] / window["n"] if window["n"] else None, "lr": lr,
                          "grad_norm": tr.grad_norm_of(engine, None),
                          "samples_per_s": window["samples"] / elapsed, "tokens_per_s": window["tokens"] / elapsed,
                          "peak_mem_mib": peak_memory_mib(device)}
                if do_eval:
                    metrics = evaluate()
                    record.update({f"eval_{k}": v for k, v in metrics.items()})
                    improved = best["metric"] is None or metrics[metric] > best["metric"]
                    _say(s, f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                            + (" (best so far)" if improved else ""), bar)
                    if improved:
                        best = {"step": step, "metric": metrics[metric], "metrics": metrics}
                        state = gathered_state(engine, s)
                        if s.rank == 0:
                            export_model(state, config, tokenizer, args.max_seq_len, hf_dir)
                            atomic_write(os.path.join(s.output, "best.json"),
                                             json.dumps({"step": step, "metric": metric, **metrics}, indent=2))
                        dist.barrier()
                log.log(record)
                last = record
                window = {"loss": 0.0, "n": 0, "tokens": 0, "samples": 0, "t": time.perf_counter()}
            if stop_votes > 0:
                stopped = True
                break
            if args.save_every and step % args.save_every == 0 and step != end_step:
                checkpoint()
        checkpoint()
    bar.close()

    summary = {"step": step, "output": s.output, "best": best, "metrics": last, "stopped_by_signal": stopped,
               "hf": None, "test": None}
    if step >= total_steps and not stopped:
        if val is None:  # nothing to choose by: the final model is the result
            state = gathered_state(engine, s)
            if s.rank == 0:
                export_model(state, config, tokenizer, args.max_seq_len, hf_dir)
        summary["hf"] = hf_dir
        if "test" in data:
            summary["test"] = write_predictions(args, s, data["test"], names, hf_dir, device, special)
        _say(s, f"done: step {step}" + (f", best {metric} {best['metric']:.4f} at step {best['step']}"
                                          if best["metric"] is not None else "")
             + f" in {time.perf_counter() - t0:.0f}s; the model is in {hf_dir}")
    elif stopped:
        _say(s, f"stopped by signal at step {step}; resume with --resume")
    log.close()
    dist.barrier()
    engine.destroy()
    return summary


def write_predictions(args, s, test, names, hf_dir, device, special):
    """Rank 0 predicts the test split with the kept model (hf/) into predictions.jsonl; returns the test metrics
    when the split has labels, else None."""
    import torch.distributed as dist
    result = None
    if s.rank == 0:
        from fastroberta.model import RobertaForSequenceClassification
        model = RobertaForSequenceClassification.from_pretrained(hf_dir, kernels=args.kernels).to(device).eval()
        ids, labels, split = test
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(s.precision) if s.on_cuda else None
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            logits = predict(model, ids, s.eval_batch_size, special["pad"], device, 0, 1,
                             args.pad_to_multiple_of, args.max_seq_len)
        preds, metrics = scores(s.task, logits, labels if labels is not None else np.zeros(len(ids)))
        tmp = os.path.join(s.output, "predictions.jsonl.tmp")
        with open(tmp, "w") as f:
            for i, p in enumerate(preds):
                row = {"index": i, "prediction": float(p) if names is None else names[int(p)]}
                if labels is not None:
                    row["label"] = float(labels[i]) if names is None else names[int(labels[i])]
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, os.path.join(s.output, "predictions.jsonl"))
        if labels is not None:
            result = metrics
            _say(s, "test: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            with open(os.path.join(s.output, "test_metrics.json"), "w") as f:
                json.dump(metrics, f, indent=2)
    dist.barrier()
    return result


def main(argv=None):
    """Console entry point: 0 on success (also after a signal-requested stop), 2 for bad input (a flag, a file,
    the output folder), 1 when the run itself failed; either error is one line on stderr (training.errors.run_command)."""
    return run_command(PROG, finetune, argv)


if __name__ == "__main__":
    sys.exit(main())
