"""fastroberta-train: RoBERTa masked-LM pretraining under DeepSpeed.

    fastroberta-train                      # demo model on the bundled corpus: about 3 min of training on 2 cores
    fastroberta-train --model base --data corpus/ --global-batch-size 2048 --steps 100000 --output runs/base
    deepspeed --num_gpus 8 --module fastroberta.train --model base --data corpus/ --zero-stage 2 ...

One process or many (the ``deepspeed`` launcher sets RANK/WORLD_SIZE/...; a plain process starts a group of
one), CUDA or CPU (DeepSpeed's CPU accelerator and gloo when no GPU exists). The run reads as a straight line:
check the configuration, prepare the data, build the model and the DeepSpeed engine, maybe resume, train with
periodic logging / evaluation / checkpoints, then save a final checkpoint and a Hugging Face export.

Output folder: ``metrics.jsonl`` (one JSON object per logged step), ``checkpoints/`` (DeepSpeed checkpoints
``global_step<N>`` plus a ``latest`` pointer that moves only once a checkpoint is complete), ``hf/`` (model +
tokenizer loadable by ``transformers``), ``ds_config.json`` and ``run.json`` (the resolved settings),
``loss.png`` (with matplotlib installed). A finished run ends with its held-out loss against the unigram and
uniform baselines and a few fill-mask predictions (``fastroberta.run_report``).
"""
import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch

from fastroberta import run_report  # baselines and the end-of-run report (issue 12)
from fastroberta.config import PRESETS, RobertaConfig
from fastroberta.data.packing import PACKING_MODES
from fastroberta.run_defaults import DEFAULT_PRESET, apply_run_defaults, help_for
from fastroberta.training.checkpoints import (CHECKPOINT_DIR, last_good_checkpoint, load_checkpoint,
                                              save_checkpoint, warn_changed_settings)
from fastroberta.training.cli import (HelpFormatter, add_shared_flags, announce_start, check_positive,
                                      check_shared_flags, parse_command_line, say)
from fastroberta.training.distributed import all_ranks_true, check_shared_output, init_distributed
from fastroberta.training.ds_config import write_config
from fastroberta.training.engine import build_engine, grad_norm_of
from fastroberta.training.errors import ConfigError, TrainingError, run_command
from fastroberta.training.metrics import MetricsLog, Throughput, peak_memory_mib, peak_tflops, perplexity
from fastroberta.training.nonfinite import NonFiniteGuard, parameters_finite
from fastroberta.training.output import OutputLock
from fastroberta.training.watchdog import watching
from fastroberta.training.progress import progress_bar
from fastroberta.training.rng import preserved_rng, rng_state, seed_everything
from fastroberta.training.schedule import lr_scheduler
from fastroberta.training.settings import (announced_on_resume, base_settings, resolve_engine_config,
                                          resolve_kernels, resolve_output)
from fastroberta.training.step import nonfinite_stop_message, optimizer_step
from fastroberta.training.stop import StopRequest

PROG = "fastroberta-train"
MIN_SEQ_LEN = 3  # <s>, one token, </s>

# Peak learning rate by model size: (lr at the reference batch, reference batch). RoBERTa used 6e-4 (base)
# and 4e-4 (large) at 8K sequences; smaller batches scale it by sqrt(batch / reference), the rule that also
# links BERT's 1e-4 at batch 256 to RoBERTa's 6e-4 at 8K. Larger batches keep the reference value. The tiny
# model tolerates (and over a short run needs) a much higher rate; its reference is a small batch.
LR_RULE = {"demo": (4e-3, 32), "tiny": (2e-3, 64), "base": (6e-4, 8192), "large": (4e-4, 8192)}
WARMUP_FRACTION = 0.05  # RoBERTa: 24K warmup steps of 500K


def build_parser():
    p = argparse.ArgumentParser(
        prog=PROG,
        description="RoBERTa masked-LM pretraining with Triton kernels under DeepSpeed. With no arguments: the "
                    "demo preset on the bundled corpus, about 3 minutes of training on 2 quiet CPU cores, ending "
                    "with its held-out loss against the unigram baseline and a few fill-mask predictions.",
        formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help=f"preset, one of {', '.join(PRESETS)} (default: {DEFAULT_PRESET}, "
                   "2 layers x 64; tiny is 4 x 256)")
    g.add_argument("--config", default=None, help="RobertaConfig / HF config.json instead of a preset")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute layers in backward")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="the corpus: a text file (documents separated by "
                        "blank lines; .txt, .text, .md, .rst or any other name), a .jsonl file (one document per "
                        "line in its \"text\" field), either of them gzipped (.gz), a folder (its .txt/.text/.md/"
                        ".rst/.jsonl files, optionally .gz, recursively), or a Hugging Face dataset "
                        "hf:NAME[:CONFIG][:SPLIT] (needs the datasets package; split default train). Default: the "
                        "bundled Tiny Shakespeare")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or file (default: train a byte-level BPE on --data)")
    g.add_argument("--vocab-size", type=int, default=None,
                   help=f"vocabulary of a tokenizer trained on --data ({help_for('vocab_size')})")
    g.add_argument("--cache-dir", default=None, help="where prepared data is cached (default: the data module's)")
    g.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of the corpus")
    g.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens per sequence, at most 512 ({help_for('seq_len')})")
    g.add_argument("--mask-prob", type=float, default=0.15, help="share of tokens chosen for prediction")
    g.add_argument("--prepare-only", action="store_true",
                   help="prepare the tokenizer and token shards into the cache and exit: no model, no output "
                        "folder. Run it once, in one process, before a multi-node launch with the same --data, "
                        "--tokenizer, --vocab-size (or --model), --val-fraction, --seed and --cache-dir as the run, "
                        "so that no node builds them")
    g.add_argument("--packing", default="full", choices=PACKING_MODES,
                   help="full: FULL-SENTENCES (RoBERTa); doc: DOC-SENTENCES; varlen: documents packed into a row "
                        "without attending to each other")
    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help=f"sequences per process per forward pass ({help_for('micro_batch_size')})")
    g.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps; the LR schedule spans them ({help_for('steps')})")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warmup (default: 5%% of --steps)")
    g = p.add_argument_group("pretraining output")
    g.add_argument("--eval-batches", type=int, default=20,
                   help="global batches of held-out data per evaluation (0 = the whole split)")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars to <output>/tb")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak TFLOP/s for MFU (default: table by GPU name, env "
                        "FASTROBERTA_PEAK_TFLOPS)")
    g.add_argument("--samples", type=int, default=3,
                   help="fill-mask predictions on held-out sentences shown at the end (0 = none)")
    add_shared_flags(p, helps={
        "compile": "torch.compile the model (one graph, fullgraph=True) inside the DeepSpeed engine; off by "
                   "default until a GPU benchmark shows it faster (python -m benchmarks e2e)",
        "global_batch_size": "sequences per optimizer step over all processes; accumulation is derived "
                             "(default: micro-batch size x world size)",
        "stop_at_step": "checkpoint and exit after this step, the schedule still spanning --steps (for "
                        "time-sliced jobs)",
        "lr": "peak learning rate (default: by model size and global batch: demo 4e-3 at batch 32, tiny 2e-3 at "
              "batch 64, base 6e-4 and large 4e-4 at batch 8192, times sqrt(batch / that batch) for smaller "
              "batches)",
        "output": "run folder (default: runs/fastroberta-<model>)"})
    return p


def default_lr(size_class, global_batch):
    ref_lr, ref_batch = LR_RULE[size_class]
    return ref_lr * math.sqrt(min(1.0, global_batch / ref_batch))


def default_output_of(args):
    """The run folder when --output is not given (resolve_settings names it the same way)."""
    name = os.path.splitext(os.path.basename(args.config))[0] if args.config else args.model or DEFAULT_PRESET
    return os.path.join("runs", f"fastroberta-{name}")


def resolve_settings(args):
    """Check ``args`` and work out every derived setting; ConfigError says what is wrong. No heavy work."""
    s = base_settings(args)
    apply_run_defaults(args)  # vocabulary, seq len, micro-batch and steps by preset (issue 12)
    if args.log_every is None:
        args.log_every = max(1, min(10, args.steps // 10))
    for name in ("steps", "micro_batch_size", "seq_len"):
        check_positive("--" + name.replace("_", "-"), getattr(args, name))
    for name in ("eval_batches", "warmup_steps"):
        check_positive("--" + name.replace("_", "-"), getattr(args, name), allow_zero=True)
    check_shared_flags(args)
    if not 0 < args.mask_prob < 1:
        raise ConfigError(f"--mask-prob must be in (0, 1), got {args.mask_prob}")
    check_data_flags(args)
    # Model
    check_model_flags(args)
    if args.config is not None:
        try:
            s.config = RobertaConfig.from_json(args.config)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"--config {args.config!r}: {e}") from None
        s.model_name = os.path.splitext(os.path.basename(args.config))[0]
        s.size_class = "tiny" if s.config.hidden_size <= 256 else "base" if s.config.hidden_size <= 768 else "large"
    else:
        s.model_name = args.model or DEFAULT_PRESET
        s.config = RobertaConfig.preset(s.model_name)
        s.size_class = s.model_name
    if args.seq_len < MIN_SEQ_LEN:
        raise ConfigError(f"--seq-len {args.seq_len} is too short: a sequence needs at least {MIN_SEQ_LEN} tokens "
                          "(<s>, one token, </s>); RoBERTa used 512")
    if args.seq_len > s.config.max_seq_len:
        raise ConfigError(f"--seq-len {args.seq_len} exceeds the position table: at most {s.config.max_seq_len} "
                          f"tokens with max_position_embeddings={s.config.max_position_embeddings}")
    if args.stop_at_step is not None and args.stop_at_step > args.steps:
        raise ConfigError(f"--stop-at-step {args.stop_at_step} is beyond --steps {args.steps}")

    resolve_kernels(args, s.on_cuda)
    resolve_engine_config(args, s, default_lr=lambda global_batch: default_lr(s.size_class, global_batch),
                          user_scheduler_allowed=True)
    s.warmup_steps = args.warmup_steps if args.warmup_steps is not None else \
        max(1, round(WARMUP_FRACTION * args.steps))
    s.warmup_steps = min(s.warmup_steps, args.steps)
    resolve_output(args, s, default_output_of(args))
    if args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except Exception as e:
            raise ConfigError(f"--tensorboard needs the tensorboard package ({e})") from None
    return s


def check_model_flags(args):
    """ConfigError for --model with --config, or a preset that does not exist."""
    if args.model is not None and args.config is not None:
        raise ConfigError("give either --model or --config, not both")
    if args.config is None and (args.model or DEFAULT_PRESET) not in PRESETS:
        raise ConfigError(f"unknown model preset {args.model!r}; choose one of {', '.join(PRESETS)} "
                          "or pass --config")


def check_data_flags(args):
    """ConfigError for a data flag that cannot work (after apply_run_defaults)."""
    check_positive("--vocab-size", args.vocab_size)
    if not 0 < args.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.data is not None and not args.data.startswith("hf:") and not os.path.exists(args.data):
        raise ConfigError(f"--data {args.data!r} does not exist")
    if args.tokenizer is not None and not os.path.exists(args.tokenizer):
        raise ConfigError(f"--tokenizer {args.tokenizer!r} does not exist")


def prepare_only(args):
    """--prepare-only: the tokenizer and token shards into the cache, in this one process, then exit. A run with
    the same data flags finds them there (the cache is keyed by them) and starts training at once."""
    s = base_settings(args)
    if s.world_size > 1:
        raise ConfigError(f"--prepare-only runs in one process, not {s.world_size}: start it without a launcher, "
                          "once, before the run")
    check_model_flags(args)
    apply_run_defaults(args)
    check_data_flags(args)
    say(s, f"preparing data: {args.data or 'the bundled corpus'} (tokenizer and token shards)")
    prepared = _prepare_dataset(args, s)
    sizes = "; ".join(f"{split} {prepared.num_tokens(split):,} tokens in {prepared.num_documents(split):,} "
                      f"documents" for split in ("train", "val"))
    say(s, f"data ready in {prepared.path}: vocab {prepared.vocab_size}; {sizes} "
           f"({time.perf_counter() - s.started:.1f}s since start). A run with the same --data, --tokenizer, "
           "--vocab-size, --val-fraction, --seed and --cache-dir reads it from there.")
    return {"prepared": prepared.path, "vocab_size": prepared.vocab_size}


def _data_error(args, e):
    text = str(e).strip("'\"") or type(e).__name__
    if args.data and args.data in text:
        return text  # it names the file (and line) already
    return f"--data {args.data or '(the bundled corpus)'}: {text}"


def _prepare_dataset(args, s):
    from fastroberta.data import prepare_dataset
    kw = dict(data=args.data, tokenizer=args.tokenizer, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
              seed=args.seed,
              show_progress=s.rank == 0 and not args.no_progress and sys.stderr.isatty())  # bars: terminals only
    if args.cache_dir is not None:
        kw["cache_dir"] = args.cache_dir
    try:
        return prepare_dataset(**kw)
    except (ValueError, FileNotFoundError, ImportError, UnicodeError) as e:
        raise ConfigError(_data_error(args, e)) from None


def prepare_data(args, s):
    """Tokenizer and token shards (cached) and the held-out baselines (what context-blind guessing scores): local
    rank 0 of each node prepares them before DeepSpeed starts, so that a corpus that cannot work is said at once;
    the other ranks get (None, None) and read its cache in share_data."""
    if s.local_rank != 0:
        return None, None
    prepared = _prepare_dataset(args, s)
    return prepared, run_report.baselines(prepared)


def share_data(args, s, prepared, base):
    """After the process group started: the other ranks read what local rank 0 prepared."""
    import torch.distributed as dist
    dist.barrier()
    if prepared is None:
        prepared = _prepare_dataset(args, s)
        base = run_report.baselines(prepared)
    return prepared, base


def build_model(s, args, prepared):
    from fastroberta.model import RobertaForMaskedLM
    config = s.config
    specials = prepared.special_ids
    if args.config is None:
        # A preset takes its vocabulary and special ids from the tokenizer.
        config = RobertaConfig.from_dict({**config.to_dict(), "vocab_size": prepared.vocab_size,
                                          "pad_token_id": specials["pad"], "bos_token_id": specials["bos"],
                                          "eos_token_id": specials["eos"]})
    else:
        try:
            prepared.check_vocab(config)
        except ValueError as e:
            raise TrainingError(f"--config {args.config} does not fit the tokenizer: {e}") from None
    model = RobertaForMaskedLM(config, kernels=args.kernels)
    model.gradient_checkpointing = args.activation_checkpointing
    return model


def build_mlm_model(s, args, prepared):
    """The model with the same initial weights on every rank, then per-rank RNG streams for dropout."""
    import deepspeed
    seed_everything(args.seed)
    model = build_model(s, args, prepared)
    seed_everything(args.seed + s.rank)
    if s.zero_stage == 3:
        # The MLM head reads the tied decoder weight and its bias in the top-level forward, outside the
        # modules that own them; ZeRO-3 must gather them around that forward.
        embeddings = model.roberta.embeddings
        deepspeed.zero.register_external_parameter(model, embeddings.word_embeddings.weight)
        deepspeed.zero.register_external_parameter(model, model.lm_head.bias)
        deepspeed.zero.register_external_parameter(embeddings, embeddings.token_type_embeddings.weight)
    return model


def make_loader(args, s, prepared, split):
    """The MLM loader of ``split``: "train" repeats forever, "val" is one pass."""
    from fastroberta.data import MLMDataLoader
    return MLMDataLoader(prepared, split=split, seq_len=args.seq_len, micro_batch_size=s.micro_batch_size,
                         global_batch_size=s.global_batch_size, rank=s.rank, world_size=s.world_size,
                         seed=args.seed, packing=args.packing, mask_prob=args.mask_prob, infinite=split == "train")


def make_train_loader(args, s, prepared):
    try:
        loader = make_loader(args, s, prepared, "train")
        make_loader(args, s, prepared, "val").steps_per_epoch  # the held-out split must hold a batch too
    except ValueError as e:
        raise ConfigError(_data_error(args, e)) from None
    if loader.grad_accum_steps != s.grad_accum_steps:
        raise TrainingError(f"data loader accumulates {loader.grad_accum_steps} micro-batches per step but "
                            f"DeepSpeed expects {s.grad_accum_steps}")
    return loader


def remove_previous_run(output):
    """--overwrite: clear what an earlier run left in ``output`` (called once the new run is ready to start)."""
    for name in (CHECKPOINT_DIR, "hf", "tb"):
        path = os.path.join(output, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
    for name in ("metrics.jsonl", "run.json", "ds_config.json"):
        path = os.path.join(output, name)
        if os.path.isfile(path):
            os.remove(path)


@dataclass
class RunState:
    """Where a run stands; what a checkpoint saves beside the engine (``client_state``)."""
    run: dict                  # the settings a resumed run must match
    step: int = 0
    tokens_seen: int = 0
    samples_seen: int = 0
    guard: NonFiniteGuard = None
    saved_step: int = None     # the step whose state is on disk
    last: dict = field(default_factory=dict)   # the last logged record
    first_loss: float = None

    def client_state(self, loader):
        return {"step": self.step, "tokens_seen": self.tokens_seen, "samples_seen": self.samples_seen,
                "nonfinite_streak": self.guard.streak, "loader": loader.state_dict(), "run": self.run}


def start_or_resume(args, s, engine, loader, model_config):
    """A fresh RunState, or the checkpoint's; then, on rank 0, the run folder's settings files (after --overwrite
    has cleared the earlier run, only now that the configuration is checked, the data prepared and the engine
    built)."""
    run_info = {"seq_len": args.seq_len, "global_batch_size": s.global_batch_size,
                "micro_batch_size": s.micro_batch_size, "world_size": s.world_size, "steps": args.steps,
                "seed": args.seed, "precision": s.precision, "zero_stage": s.zero_stage, "lr": s.lr}
    state = RunState(run=run_info, guard=NonFiniteGuard(args.max_nonfinite))
    if s.resume_from is not None:
        client = load_checkpoint(engine, s, loader)
        state.step = state.saved_step = client["step"]
        state.tokens_seen, state.samples_seen = client["tokens_seen"], client["samples_seen"]
        state.guard.streak = client.get("nonfinite_streak", 0)
        warn_changed_settings(lambda msg: say(s, msg), PROG, client["run"],
                              announced_on_resume(args, run_info))
        say(s, f"resumed from {os.path.join(*s.resume_from)} at step {state.step}")
    if s.rank == 0:
        if args.overwrite:
            remove_previous_run(s.output)
        write_config(s.ds_config, os.path.join(s.output, "ds_config.json"))
        with open(os.path.join(s.output, "run.json"), "w") as f:
            json.dump({"args": vars(args), "settings": run_info, "model": model_config.to_dict(),
                       "optimizer": s.optimizer, "warmup_steps": s.warmup_steps}, f, indent=2, default=str)
    return state


def save_run(engine, s, args, state, loader, device, lr, meter, bar):
    """Checkpoint the run unless this step is on disk already; never non-finite weights."""
    if state.step == state.saved_step:
        return
    if not all_ranks_true(parameters_finite(engine.module), device):
        raise TrainingError(f"the weights are non-finite at step {state.step} (lr {lr:.3e}); not saving them. "
                            f"Lower --lr or keep --clip-grad on; {last_good_checkpoint(s.ckpt_dir)}.")
    state.saved_step = state.step
    meter.pause()
    with preserved_rng():
        path = save_checkpoint(engine, s.ckpt_dir, state.step, s.rank, s.world_size,
                               {"rng": rng_state(), "loader": loader.state_dict()}, state.client_state(loader),
                               args.keep_last)
    meter.resume()
    say(s, f"checkpoint saved: {path}", bar)


def model_inputs(batch, device):
    """The loader's batch as the model's keyword arguments on ``device``. The loader pins its batches on CUDA
    hosts, so the non_blocking copies return at once; max_seqlen is read from the host copy of cu_seqlens
    (no device sync), and validate=False because the loader checked the batch on the host."""
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()
              if k in ("input_ids", "attention_mask", "labels", "cu_seqlens")}
    cu = batch.get("cu_seqlens")
    if cu is not None:
        inputs["max_seqlen"] = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    inputs["validate"] = False
    return inputs


def mlm_sums(out):
    return out.num_correct, out.num_labels


def evaluate(engine, make_val_loader, max_batches, device):
    """Token-weighted MLM loss and accuracy on the held-out split (its first ``max_batches`` global batches,
    0 = all), summed over all ranks. The val loader has the training global batch, so every world size and
    micro-batch split evaluates the same samples."""
    import torch.distributed as dist
    loader = make_val_loader()
    steps = min(loader.steps_per_epoch, max_batches) if max_batches else loader.steps_per_epoch
    n = steps * loader.grad_accum_steps
    # ZeRO-3 gathers weights collectively inside forward: every rank must run the same number of batches.
    count = torch.tensor([n], dtype=torch.long, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MIN)
    n = int(count.item())
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    was_training = engine.module.training
    engine.eval()
    with torch.no_grad(), preserved_rng():
        for i, batch in enumerate(loader):
            if i >= n:
                break
            out = engine(**model_inputs(batch, device))
            labels = out.num_labels.double()
            sums += torch.stack([out.loss.double() * labels, out.num_correct.double(), labels])
    if was_training:
        engine.train()
    dist.all_reduce(sums)
    loss_sum, correct, labels = sums.tolist()
    if labels == 0:
        return {}
    loss = loss_sum / labels
    return {"eval_loss": loss, "eval_accuracy": correct / labels, "eval_perplexity": perplexity(loss)}


def train_loop(args, s, engine, loader, prepared, base, device, state, t0):
    """Train from ``state.step`` to --stop-at-step or --steps, with periodic logging, evaluation and checkpoints;
    a stop signal checkpoints and ends the loop. Returns True when a signal stopped it."""
    log = MetricsLog(os.path.join(s.output, "metrics.jsonl"), enabled=s.rank == 0,
                     tensorboard_dir=os.path.join(s.output, "tb") if args.tensorboard else None,
                     resume_step=state.step if s.resume_from is not None else None)
    flops_per_token = engine.module.flops_per_token(args.seq_len, args.mask_prob)
    meter = Throughput(flops_per_token, peak_tflops(device, s.precision, args.peak_tflops), s.world_size)
    end_step = args.stop_at_step or args.steps
    bar = progress_bar(total=args.steps, initial=state.step, desc="train", disable=s.rank != 0 or args.no_progress,
                       file=sys.stderr)  # a tqdm bar on a terminal, plain lines in a log (issue 12)
    window = {"loss": 0.0, "correct": 0.0, "labels": 0.0, "steps": 0}
    lr = engine.get_lr()[0]
    stopped_by_signal = False
    batches = iter(loader)
    engine.train()
    meter.resume()
    try:
        with StopRequest() as stop:
            while state.step < end_step:
                lr = engine.get_lr()[0]  # the rate this step's update uses; the scheduler moves on inside step()
                result = optimizer_step(engine, batches, s, device, model_inputs, mlm_sums, stop.requested,
                                        step=state.step + 1, last_good=last_good_checkpoint(s.ckpt_dir))
                correct, n_labels = result.extra
                state.step += 1
                state.tokens_seen += result.tokens
                state.samples_seen += result.samples
                meter.add(result.tokens, result.samples)
                # Every precision: a non-finite loss counts whatever DeepSpeed did with the step (the bf16 and
                # fp16 paths skip such updates, fp32 applies them).
                if state.guard.update(result.loss, skipped=result.skipped, loss_scale=result.loss_scale,
                                      min_loss_scale=s.ds_config.get("fp16", {}).get("min_loss_scale", 1)):
                    raise TrainingError(f"{nonfinite_stop_message(result, state.guard, state.step, lr, s.precision)}"
                                        f"; {last_good_checkpoint(s.ckpt_dir)}.")
                if math.isfinite(result.loss):
                    window["loss"] += result.loss
                    window["steps"] += 1
                window["correct"] += correct
                window["labels"] += n_labels
                accuracy = correct / n_labels if n_labels else 0.0
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.3f}", acc=f"{accuracy:.3f}",
                                tok_s=f"{meter.tokens_per_s():.0f}", refresh=False)

                step = state.step
                do_eval = step == end_step or (args.eval_every and step % args.eval_every == 0)
                if do_eval or step % args.log_every == 0 or step == end_step or result.stop_requested:
                    rates = meter.read()
                    record = {"step": step,
                              "loss": window["loss"] / window["steps"] if window["steps"] else None,
                              "mlm_accuracy": window["correct"] / window["labels"] if window["labels"] else None,
                              "lr": lr, "grad_norm": grad_norm_of(engine, result.fallback_norm), **rates,
                              "peak_mem_mib": peak_memory_mib(device), "epoch": loader.epoch,
                              "tokens_seen": state.tokens_seen, "elapsed_s": time.perf_counter() - t0}
                    if s.precision == "fp16":
                        record.update(loss_scale=result.loss_scale, skipped_steps=engine.skipped_steps)
                    if do_eval:
                        record.update(evaluate(engine, lambda: make_loader(args, s, prepared, "val"),
                                               args.eval_batches, device))
                        if "eval_loss" in record and not math.isfinite(record["eval_loss"]) and step == end_step:
                            log.log(record)
                            raise TrainingError(
                                f"the held-out loss is non-finite ({record['eval_loss']}) at step {step} (lr "
                                f"{lr:.3e}); not saving or exporting these weights. Lower --lr or keep "
                                f"--clip-grad on; {last_good_checkpoint(s.ckpt_dir)}.")
                        if "eval_loss" in record:
                            record.update(unigram_baseline=base["unigram"], uniform_baseline=base["uniform"])
                            say(s, f"step {step}: eval loss {record['eval_loss']:.4f} (unigram baseline "
                                   f"{base['unigram']:.3f}), accuracy {record['eval_accuracy']:.4f}, perplexity "
                                   f"{record['eval_perplexity']:.1f}", bar)
                    log.log(record)
                    state.last = record
                    if state.first_loss is None:
                        state.first_loss = record["loss"]
                    window = {"loss": 0.0, "correct": 0.0, "labels": 0.0, "steps": 0}
                    meter.resume()
                if result.stop_requested:
                    stopped_by_signal = True
                    break
                if args.save_every and step % args.save_every == 0 and step != end_step:
                    save_run(engine, s, args, state, loader, device, lr, meter, bar)
            save_run(engine, s, args, state, loader, device, lr, meter, bar)
    finally:
        bar.close()
        log.close()
    return stopped_by_signal


def export_hf(engine, s, model_config, prepared, out_dir):
    """Write the trained weights (upcast to fp32) and the tokenizer as a Hugging Face folder. Under ZeRO-3
    the partitioned parameters are gathered on every rank first; rank 0 writes."""
    import deepspeed
    from fastroberta.model import RobertaForMaskedLM
    module = engine.module
    params = list(module.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if s.zero_stage == 3 \
        else contextlib.nullcontext()
    with gather:
        state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} \
            if s.rank == 0 else None
    if s.rank == 0:
        export = RobertaForMaskedLM(model_config, kernels="torch")
        export.load_state_dict(state, strict=True)
        export.save_pretrained(out_dir)
        prepared.save_tokenizer(out_dir)


def export_finished(engine, s, args, prepared, stopped_by_signal, step):
    """The Hugging Face export of a finished run (None for a stopped or time-sliced one); never non-finite
    weights."""
    if stopped_by_signal:
        say(s, f"stopped by signal at step {step}; resume with --resume")
        return None
    if step < args.steps:
        return None
    hf_dir = os.path.join(s.output, "hf")
    if not all_ranks_true(parameters_finite(engine.module), engine.device):
        raise TrainingError(f"the final weights are non-finite; no Hugging Face export was written. "
                            f"{last_good_checkpoint(s.ckpt_dir)}.")
    export_hf(engine, s, engine.module.config, prepared, hf_dir)
    say(s, f"exported Hugging Face model and tokenizer to {hf_dir}")
    return hf_dir


def train(argv=None):
    """Run training; returns a summary dict (final step, last logged metrics, paths). Raises ConfigError for
    a configuration that cannot work (before any work) and TrainingError when a run must stop."""
    args = parse_command_line(build_parser(), argv, default_output_of)
    if args.prepare_only:
        return prepare_only(args)
    s = resolve_settings(args)
    # One run per output folder: rank 0 holds the lock for the run's lifetime, taken before anything is read
    # or written there. A second run on the folder refuses at once.
    lock = OutputLock(s.output).acquire() if s.rank == 0 else None
    try:
        with watching(s, args.dist_timeout, PROG):  # a lost rank ends the run in bounded time, named
            return run(args, s)
    finally:
        if lock is not None:
            lock.release()


def run(args, s):
    """The run as a straight line: process group, data, model, engine, resume, loop, export, report."""
    t0 = s.started  # the run's clock includes start-up: Python's imports and DeepSpeed's start
    for w in s.warnings:
        say(s, f"{PROG}: warning: {w}")
    say(s, f"preparing data: {args.data or 'the bundled corpus'} (tokenizer and token shards, cached for later "
           "runs)")
    prepared, base = prepare_data(args, s)
    if prepared is not None:
        say(s, f"data ready: vocab {prepared.vocab_size}; held-out baselines: unigram {base['unigram']:.3f}, "
               f"uniform {base['uniform']:.3f} nats ({time.perf_counter() - t0:.1f}s since start)")
    announce_start(s)
    device, s.threads = init_distributed(s.on_cuda, s.local_rank, args.dist_timeout)
    check_shared_output(s.output, s.rank, s.world_size)
    if s.threads:
        say(s, f"cpu threads: {s.threads[1]}")
    # DeepSpeed's INFO lines (its whole config, every step's bookkeeping) would bury the progress bar.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    prepared, base = share_data(args, s, prepared, base)
    model = build_mlm_model(s, args, prepared)
    engine = build_engine(model, s, args, None if s.use_ds_scheduler else lr_scheduler(s.warmup_steps, args.steps))
    say(s, f"engine ready: {model.num_parameters() / 1e6:.1f}M parameters, {s.precision}, ZeRO {s.zero_stage}, "
           f"world {s.world_size}, global batch {s.global_batch_size} = {s.micro_batch_size} x "
           f"{s.grad_accum_steps} accumulation x {s.world_size}, peak lr {s.lr:.2e}, warmup {s.warmup_steps} "
           f"({time.perf_counter() - t0:.1f}s since start)")
    loader = make_train_loader(args, s, prepared)
    state = start_or_resume(args, s, engine, loader, model.config)
    stopped_by_signal = train_loop(args, s, engine, loader, prepared, base, device, state, t0)
    hf_dir = export_finished(engine, s, args, prepared, stopped_by_signal, state.step)

    summary = {"step": state.step, "output": s.output,
               "checkpoint": os.path.join(s.ckpt_dir, f"global_step{state.step}"), "hf": hf_dir,
               "metrics": state.last, "stopped_by_signal": stopped_by_signal, "elapsed_s": time.perf_counter() - t0}
    if s.rank == 0:  # issue 12: the loss against the baselines, fill-mask samples, loss.png
        summary["report"] = run_report.end_of_run(lambda msg: say(s, msg), s.output, state.last, base, prepared,
                                                  hf_dir, args.samples)
    if state.first_loss is not None and state.last.get("loss") is not None:
        say(s, f"done: step {state.step}, loss {state.first_loss:.3f} -> {state.last['loss']:.3f} in "
               f"{summary['elapsed_s']:.0f}s; outputs in {s.output}")
    engine.destroy()
    return summary


def main(argv=None):
    """Console entry point: 0 on success (also after a signal-requested stop), 2 for bad input (a flag, a file,
    the output folder), 1 when the run itself failed; either error is one line on stderr (training/errors.py)."""
    return run_command(PROG, train, argv)


if __name__ == "__main__":
    sys.exit(main())
