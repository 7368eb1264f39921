"""fastroberta-train: RoBERTa masked-LM pretraining under DeepSpeed.

    fastroberta-train                      # demo model on the bundled corpus: about 3 minutes on 2 CPU cores
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

import torch

from fastroberta.config import PRESETS, RobertaConfig
from fastroberta.data import PACKING_MODES
from fastroberta.training.ds_config import ConfigError, build_config, merge_with_user_config, write_config
from fastroberta.kernels.backend import KERNEL_CHOICES as KERNELS
from fastroberta.training.metrics import MetricsLog, Throughput, peak_memory_mib, peak_tflops, perplexity
from fastroberta.training.checkpoints import (CHECKPOINT_DIR, LATEST, find_checkpoint, intact_hint, latest_pointer,
                                              save_checkpoint)
from fastroberta.training.distributed import all_ranks_true, init_distributed, world
from fastroberta.training.errors import TrainingError, run_command
from fastroberta.training.nonfinite import NonFiniteGuard, parameters_finite
from fastroberta.training.output import OutputLock, atomic_write, check_output_folder
from fastroberta.training.rng import preserved_rng, rng_state, seed_everything, set_rng_state
from fastroberta.training.stop import StopRequest

from fastroberta import run_report  # baselines and the end-of-run report (issue 12)
from fastroberta.training.progress import progress_bar
from fastroberta.run_defaults import DEFAULT_PRESET, apply_run_defaults, help_for

PRECISIONS = ("auto", "fp16", "bf16", "fp32")
OPTIMIZERS = ("auto", "deepspeed_adam", "torch_adamw", "apex_adam")
MIN_SEQ_LEN = 3  # <s>, one token, </s>

# Peak learning rate by model size: (lr at the reference batch, reference batch). RoBERTa used 6e-4 (base)
# and 4e-4 (large) at 8K sequences; smaller batches scale it by sqrt(batch / reference), the rule that also
# links BERT's 1e-4 at batch 256 to RoBERTa's 6e-4 at 8K. Larger batches keep the reference value. The tiny
# model tolerates (and over a short run needs) a much higher rate; its reference is a small batch.
LR_RULE = {"demo": (4e-3, 32), "tiny": (2e-3, 64), "base": (6e-4, 8192), "large": (4e-4, 8192)}
WARMUP_FRACTION = 0.05  # RoBERTa: 24K warmup steps of 500K


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless its help already explains it or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(
        prog="fastroberta-train",
        description="RoBERTa masked-LM pretraining with Triton kernels under DeepSpeed. With no arguments: the "
                    "demo preset on the bundled corpus, about 3 minutes on 2 CPU cores, ending with its held-out "
                    "loss against the unigram baseline and a few fill-mask predictions.",
        formatter_class=_HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help=f"preset, one of {', '.join(PRESETS)} (default: {DEFAULT_PRESET}, "
                   "2 layers x 64; tiny is 4 x 256)")
    g.add_argument("--config", default=None, help="RobertaConfig / HF config.json instead of a preset")
    g.add_argument("--kernels", default="auto", choices=KERNELS,
                   help="auto: Triton on CUDA, the PyTorch reference on CPU")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute layers in backward")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (one graph, fullgraph=True) inside the DeepSpeed engine; off by "
                        "default until a GPU benchmark shows it faster (python -m benchmarks e2e)")
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
    g.add_argument("--packing", default="full", choices=PACKING_MODES,
                   help="full: FULL-SENTENCES (RoBERTa); doc: DOC-SENTENCES; varlen: documents packed into a row "
                        "without attending to each other")
    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help=f"sequences per process per forward pass ({help_for('micro_batch_size')})")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="sequences per optimizer step over all processes; accumulation is derived "
                        "(default: micro-batch size x world size)")
    g.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps; the LR schedule spans them ({help_for('steps')})")
    g.add_argument("--stop-at-step", type=int, default=None,
                   help="checkpoint and exit after this step, the schedule still spanning --steps "
                        "(for time-sliced jobs)")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: by model size and global batch: demo 4e-3 at batch 32, "
                        "tiny 2e-3 at batch 64, "
                        "base 6e-4 and large 4e-4 at batch 8192, times sqrt(batch / that batch) for smaller "
                        "batches)")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warmup (default: 5%% of --steps)")
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="auto", choices=OPTIMIZERS,
                   help="auto: DeepSpeed's fused Adam on CUDA, torch AdamW on CPU")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay (not on biases/LayerNorm)")
    g.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.98), metavar=("BETA1", "BETA2"),
                   help="AdamW betas (default: 0.9 0.98, RoBERTa's)")
    g.add_argument("--adam-eps", type=float, default=1e-6, help="AdamW epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0, help="gradient norm clipping (0 = off)")
    g = p.add_argument_group("DeepSpeed")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: fp16 with dynamic loss scaling on CUDA; on CPU bf16 when the CPU has native "
                        "bf16 (AVX512-BF16/AMX), else fp32")
    g.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3),
                   help="ZeRO: 1 partitions optimizer state, 2 also gradients, 3 also parameters")
    g.add_argument("--offload-optimizer", action="store_true", help="ZeRO-Offload of optimizer state to CPU")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON merged over the generated config (its values win; conflicts reported)")
    g.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # DeepSpeed's own flag: accepted
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    g = p.add_argument_group("output")
    g.add_argument("--output", default=None, help="run folder (default: runs/fastroberta-<model>)")
    g.add_argument("--resume", nargs="?", const=LATEST, default=None, metavar="PATH",
                   help="continue from the latest checkpoint in --output, or from PATH (a checkpoints folder "
                        "or one global_step<N> folder)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --output that holds a run; the earlier run is removed only once the "
                        "new one is ready to start (configuration checked, data prepared)")
    g.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep-last", type=int, default=3, help="checkpoints kept (0 = all)")
    g.add_argument("--eval-every", type=int, default=100, help="evaluate every N steps (and at the end; 0 = end)")
    g.add_argument("--eval-batches", type=int, default=20,
                   help="global batches of held-out data per evaluation (0 = the whole split)")
    g.add_argument("--log-every", type=int, default=None,
                   help="write metrics every N steps (default: 10, or steps/10 for short runs)")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars to <output>/tb")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak TFLOP/s for MFU (default: table by GPU name, env "
                        "FASTROBERTA_PEAK_TFLOPS)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress display (a bar on a terminal, otherwise a plain line every 15 s)")
    g.add_argument("--samples", type=int, default=3,
                   help="fill-mask predictions on held-out sentences shown at the end (0 = none)")
    g.add_argument("--seed", type=int, default=0, help="model init, dropout, data order and masks")
    g.add_argument("--max-nonfinite", type=int, default=5,
                   help="stop (exit 1) after this many consecutive non-finite losses, in any precision; under "
                        "fp16 also after this many steps skipped at the minimum loss scale (0 = never)")
    g.add_argument("--debug", action="store_true",
                   help="print the traceback of an error too (also: FASTROBERTA_DEBUG=1)")
    return p


# ----------------------------------------------------------------------------------------------------------
# Configuration checks: everything that can be known before any work starts
# ----------------------------------------------------------------------------------------------------------
def cpu_has_native_bf16():
    """True when the CPU computes bf16 matmuls natively; elsewhere they are emulated and ~100x slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def _check_positive(name, value, allow_zero=False):
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value}")


def default_lr(size_class, global_batch):
    ref_lr, ref_batch = LR_RULE[size_class]
    return ref_lr * math.sqrt(min(1.0, global_batch / ref_batch))


def resolve_settings(args):
    """Check ``args`` and work out every derived setting; ConfigError says what is wrong. No heavy work."""
    on_cuda = torch.cuda.is_available()
    rank, world_size = world()
    local_rank = args.local_rank if args.local_rank is not None else int(os.environ.get("LOCAL_RANK", "0"))
    s = argparse.Namespace(on_cuda=on_cuda, rank=rank, world_size=world_size, local_rank=local_rank)
    apply_run_defaults(args)  # vocabulary, seq len, micro-batch and steps by preset (issue 12)

    if args.log_every is None:
        args.log_every = max(1, min(10, args.steps // 10))
    for name in ("steps", "micro_batch_size", "seq_len", "log_every", "vocab_size"):
        _check_positive("--" + name.replace("_", "-"), getattr(args, name))
    for name in ("global_batch_size", "stop_at_step"):
        _check_positive("--" + name.replace("_", "-"), getattr(args, name))
    for name in ("save_every", "keep_last", "eval_every", "eval_batches", "warmup_steps", "weight_decay",
                 "clip_grad", "max_nonfinite"):
        _check_positive("--" + name.replace("_", "-"), getattr(args, name), allow_zero=True)
    if args.lr is not None and not args.lr > 0:
        raise ConfigError(f"--lr must be positive, got {args.lr}")
    if not 0 < args.mask_prob < 1:
        raise ConfigError(f"--mask-prob must be in (0, 1), got {args.mask_prob}")
    if not 0 < args.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")

    # Model
    if args.model is not None and args.config is not None:
        raise ConfigError("give either --model or --config, not both")
    if args.config is not None:
        try:
            s.config = RobertaConfig.from_json(args.config)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"--config {args.config!r}: {e}") from None
        s.model_name = os.path.splitext(os.path.basename(args.config))[0]
        s.size_class = "tiny" if s.config.hidden_size <= 256 else "base" if s.config.hidden_size <= 768 else "large"
    else:
        s.model_name = args.model or DEFAULT_PRESET
        if s.model_name not in PRESETS:
            raise ConfigError(f"unknown model preset {s.model_name!r}; choose one of {', '.join(PRESETS)} "
                              "or pass --config")
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

    # Kernels: the Triton ones need CUDA, or the interpreter switched on before fastroberta was imported.
    kernels, source = args.kernels, "--kernels"
    env_kernels = os.environ.get("FASTROBERTA_KERNELS", "").strip()
    if kernels == "auto" and env_kernels:
        kernels, source = env_kernels, "FASTROBERTA_KERNELS"
        if kernels not in KERNELS:
            raise ConfigError(f"FASTROBERTA_KERNELS={env_kernels!r} is not one of {', '.join(KERNELS)}; unset it "
                              "or fix its value")
    if kernels == "triton" and not on_cuda:
        from fastroberta.kernels._checks import interpreter_active
        if not interpreter_active():
            what = "--kernels triton" if source == "--kernels" else "FASTROBERTA_KERNELS=triton"
            raise ConfigError(f"{what} needs a CUDA GPU; on CPU use --kernels torch (or, to test the kernels "
                              "slowly, set TRITON_INTERPRET=1 in the environment)")

    # Precision
    precision = args.precision
    if precision == "auto":
        precision = "fp16" if on_cuda else ("bf16" if cpu_has_native_bf16() else "fp32")
    if precision == "fp16" and not on_cuda:
        raise ConfigError("--precision fp16 needs a CUDA GPU (DeepSpeed's fp16 loss scaling is not supported on "
                          "CPU); use --precision bf16 or fp32")
    if args.offload_optimizer and args.zero_stage == 0:
        raise ConfigError("--offload-optimizer needs ZeRO: add --zero-stage 1, 2 or 3")

    # Batch
    micro = args.micro_batch_size
    global_batch = args.global_batch_size if args.global_batch_size is not None else micro * world_size
    if global_batch % (micro * world_size):
        raise ConfigError(f"--global-batch-size {global_batch} is not divisible by --micro-batch-size {micro} x "
                          f"world size {world_size} (= {micro * world_size})")

    # Optimizer
    optimizer = args.optimizer
    if optimizer == "auto":
        optimizer = "deepspeed_adam" if on_cuda else "torch_adamw"
    if optimizer == "apex_adam":
        try:
            from apex.optimizers import FusedAdam  # noqa: F401
        except Exception as e:  # ImportError, or apex built without its CUDA extensions
            raise ConfigError(f"--optimizer apex_adam needs NVIDIA apex built with its CUDA extensions "
                              f"(importing apex.optimizers.FusedAdam failed: {e}); use --optimizer "
                              "deepspeed_adam") from None
        if args.offload_optimizer:
            raise ConfigError("--optimizer apex_adam cannot run with --offload-optimizer (ZeRO-Offload steps "
                              "on the CPU); use --optimizer deepspeed_adam")
    s.optimizer = optimizer

    # Learning rate (revised below if the user's DeepSpeed JSON changes the batch or sets the rate)
    s.lr = args.lr if args.lr is not None else default_lr(s.size_class, global_batch)
    s.warmup_steps = args.warmup_steps if args.warmup_steps is not None else \
        max(1, round(WARMUP_FRACTION * args.steps))
    s.warmup_steps = min(s.warmup_steps, args.steps)

    # DeepSpeed config: generated from the flags, merged with the user's JSON.
    opt_spec = None if optimizer == "apex_adam" else {
        "lr": s.lr, "betas": tuple(args.adam_betas), "eps": args.adam_eps, "weight_decay": args.weight_decay,
        "torch_adam": optimizer == "torch_adamw"}
    generated = build_config(micro_batch_size=micro, grad_accum_steps=global_batch // (micro * world_size),
                             world_size=world_size, precision=precision, zero_stage=args.zero_stage,
                             offload_optimizer=args.offload_optimizer, clip_grad=args.clip_grad,
                             optimizer=opt_spec, on_cuda=on_cuda)
    merged = merge_with_user_config(generated, args.deepspeed_config, micro_batch_size=micro,
                                    global_batch_size=global_batch, world_size=world_size, precision=precision,
                                    on_cuda=on_cuda, compile=getattr(args, "compile", False))
    ds, user, s.warnings = merged.ds, merged.user, merged.warnings
    s.micro_batch_size, s.grad_accum_steps = merged.micro_batch_size, merged.grad_accum_steps
    s.global_batch_size, s.precision, s.zero_stage = merged.global_batch_size, merged.precision, merged.zero_stage
    if "optimizer" in user and optimizer == "apex_adam":
        raise ConfigError("--deepspeed_config defines an optimizer; it cannot be combined with --optimizer "
                          "apex_adam")
    s.use_ds_scheduler = "scheduler" in user
    if s.use_ds_scheduler:
        s.warnings.append("--deepspeed_config defines a scheduler: it replaces the built-in linear "
                          "warmup/decay")
    opt_params = ds["optimizer"].setdefault("params", {}) if "optimizer" in ds else {}
    if "lr" in user.get("optimizer", {}).get("params", {}):
        s.lr = opt_params["lr"]
    elif args.lr is None:
        s.lr = default_lr(s.size_class, s.global_batch_size)
        if "optimizer" in ds:
            opt_params["lr"] = s.lr
    s.weight_decay = opt_params.get("weight_decay", args.weight_decay)
    s.ds_config = ds

    # Output and resume
    s.output = args.output or os.path.join("runs", f"fastroberta-{s.model_name}")
    check_output_folder(s.output)
    s.ckpt_dir = os.path.join(s.output, CHECKPOINT_DIR)
    s.resume_from = None
    if args.resume is not None and args.overwrite:
        raise ConfigError("give either --resume or --overwrite, not both")
    if args.resume is not None:
        s.resume_from = find_checkpoint(s.ckpt_dir if args.resume == LATEST else args.resume,
                                        explicit=args.resume != LATEST, warn=s.warnings.append)
        if s.resume_from is None:
            s.warnings.append(f"--resume: no checkpoint in {s.ckpt_dir}; starting from scratch")
    elif not args.overwrite and (os.path.isfile(os.path.join(s.ckpt_dir, LATEST)) or
                                 os.path.isfile(os.path.join(s.output, "metrics.jsonl"))):
        raise ConfigError(f"{s.output} already holds a run; pass --resume to continue it, --overwrite to start "
                          "afresh, or choose another --output")

    if args.data is not None and not args.data.startswith("hf:") and not os.path.exists(args.data):
        raise ConfigError(f"--data {args.data!r} does not exist")
    if args.tokenizer is not None and not os.path.exists(args.tokenizer):
        raise ConfigError(f"--tokenizer {args.tokenizer!r} does not exist")
    if args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except Exception as e:
            raise ConfigError(f"--tensorboard needs the tensorboard package ({e})") from None
    return s


# ----------------------------------------------------------------------------------------------------------
# Model, optimizer, schedule
# ----------------------------------------------------------------------------------------------------------
def param_groups(model, weight_decay):
    """Weight decay on matrices (linear and embedding weights), none on biases and LayerNorm parameters."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_linear_decay(warmup_steps, total_steps):
    """LR multiplier for optimizer step s (0-based): linear rise to 1 over ``warmup_steps``, then linear decay
    reaching 0 at ``total_steps``. A plain function, so LambdaLR checkpoints its position but not the shape:
    a resumed run follows the schedule of its own command line."""
    def factor(s):
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        return max(0.0, (total_steps - s) / max(1, total_steps - warmup_steps))
    return factor


def compile_engine(engine):
    """torch.compile the model's forward inside the engine (``fullgraph=True``: a graph break is an error, not a
    silent slowdown), with the Dynamo options fastroberta's models need (``fastroberta.compile``). The module's
    ``forward`` is compiled, not the module: DeepSpeed's forward hooks (timers, ZeRO bookkeeping) run around it
    in eager mode, where they cannot break the graph. Compilation itself happens at the first forward (and once
    more for eval mode); parameters and state_dict keys do not change."""
    from fastroberta.compile import compile_model
    engine.module.forward = compile_model(engine.module.forward)


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


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------
def load_checkpoint(engine, s, loader):
    """Restore engine (model, optimizer, scheduler, loss scaler), data position and RNG; returns the
    client state saved with the checkpoint."""
    load_dir, tag = s.resume_from
    where = os.path.join(load_dir, tag)
    try:
        path, client = engine.load_checkpoint(load_dir, tag=tag)
    except Exception as e:  # DeepSpeed and torch.load raise anything from AssertionError to zip errors
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TrainingError(f"checkpoint {where} cannot be loaded ({type(e).__name__}: {first}); "
                            f"{intact_hint(load_dir, tag)}") from None
    if path is None:
        raise TrainingError(f"DeepSpeed could not load checkpoint {where}; {intact_hint(load_dir, tag)}")
    if not all_ranks_true(parameters_finite(engine.module), engine.device):
        raise TrainingError(f"checkpoint {where} holds non-finite weights; {intact_hint(load_dir, tag)}")
    own = os.path.join(load_dir, tag, f"trainer_state_rank{s.rank}.pt")
    if os.path.isfile(own):
        trainer = torch.load(own, map_location="cpu", weights_only=False)
        loader.load_state_dict(trainer["loader"])
        set_rng_state(trainer["rng"])
    else:
        # A different world size: no saved state for this rank. The data position is global; reseed dropout.
        loader.load_state_dict(client["loader"])
        seed_everything(s.seed + s.rank + 1000003 * client["step"])
    return client


def _data_error(args, e):
    text = str(e).strip("'\"") or type(e).__name__
    if args.data and args.data in text:
        return text  # it names the file (and line) already
    return f"--data {args.data or '(the bundled corpus)'}: {text}"


def last_good_checkpoint(ckpt_dir):
    """Words naming the checkpoint ``latest`` points to, for error messages."""
    tag = latest_pointer(ckpt_dir)
    if not tag:
        return "no checkpoint was saved"
    return f"the last good checkpoint is {os.path.join(ckpt_dir, tag)}"


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


# ----------------------------------------------------------------------------------------------------------
# Metrics helpers
# ----------------------------------------------------------------------------------------------------------
def loss_scale_of(engine):
    for attr in ("cur_scale", "loss_scale"):
        value = getattr(engine.optimizer, attr, None)
        if isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1):
            return float(value)
    return None


def grad_norm_of(engine, fallback):
    norm = engine.get_global_grad_norm()
    if norm is None:
        norm = fallback
    if isinstance(norm, torch.Tensor):
        norm = norm.item()
    return None if norm is None else float(norm)


def local_grad_norm(model):
    """2-norm of the (already all-reduced) gradients, for the one case where DeepSpeed reports none: fp32
    without ZeRO, where the engine clips with torch's helper and keeps the norm to itself."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm() if norms else 0.0  # read only when a step is logged


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


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------
def _say(s, msg, bar=None):
    if s.rank != 0:
        return
    if bar is not None:
        bar.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr, flush=True)


def train(argv=None):
    """Run training; returns a summary dict (final step, last logged metrics, paths). Raises ConfigError for
    a configuration that cannot work (before any work) and TrainingError when a run must stop."""
    parser = build_parser()
    args = parser.parse_args(argv)
    s = resolve_settings(args)
    s.seed = args.seed
    # One run per output folder: rank 0 holds the lock for the run's lifetime, taken before anything is read
    # or written there. A second run on the folder refuses at once.
    lock = OutputLock(s.output).acquire() if s.rank == 0 else None
    try:
        return _train(args, s)
    finally:
        if lock is not None:
            lock.release()


def _train(args, s):
    for w in s.warnings:
        _say(s, f"fastroberta-train: warning: {w}")

    device, s.threads = init_distributed(s.on_cuda, s.local_rank)
    if s.threads:
        _say(s, f"cpu threads: {s.threads[1]}")
    import deepspeed
    import torch.distributed as dist

    from fastroberta.data import MLMDataLoader, prepare_dataset
    # DeepSpeed's INFO lines (its whole config, every step's bookkeeping) would bury the progress bar.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    t0 = time.perf_counter()

    # Data: one process per node prepares (tokenizer training, pretokenisation); the others read its cache.
    def prepare():
        kw = dict(data=args.data, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                  val_fraction=args.val_fraction, seed=args.seed,
                  show_progress=s.rank == 0 and not args.no_progress and sys.stderr.isatty())  # bars: terminals only
        if args.cache_dir is not None:
            kw["cache_dir"] = args.cache_dir
        try:
            return prepare_dataset(**kw)
        except (ValueError, FileNotFoundError, ImportError, UnicodeError) as e:
            raise ConfigError(_data_error(args, e)) from None
    if s.local_rank == 0:
        prepared = prepare()
    dist.barrier()
    if s.local_rank != 0:
        prepared = prepare()
    base = run_report.baselines(prepared)  # issue 12: what context-blind guessing scores on the held-out split
    _say(s, f"data ready: vocab {prepared.vocab_size}; held-out baselines: unigram {base['unigram']:.3f}, uniform "
            f"{base['uniform']:.3f} nats ({time.perf_counter() - t0:.1f}s)")

    # Model: the same initial weights on every rank; then per-rank streams for dropout.
    seed_everything(args.seed)
    model = build_model(s, args, prepared)
    model_config = model.config
    seed_everything(args.seed + s.rank)
    if s.zero_stage == 3:
        # The MLM head reads the tied decoder weight and its bias in the top-level forward, outside the
        # modules that own them; ZeRO-3 must gather them around that forward.
        embeddings = model.roberta.embeddings
        deepspeed.zero.register_external_parameter(model, embeddings.word_embeddings.weight)
        deepspeed.zero.register_external_parameter(model, model.lm_head.bias)
        deepspeed.zero.register_external_parameter(embeddings, embeddings.token_type_embeddings.weight)

    groups = param_groups(model, s.weight_decay)
    client_optimizer = None
    if s.optimizer == "apex_adam":
        from apex.optimizers import FusedAdam
        client_optimizer = FusedAdam(groups, lr=s.lr, betas=tuple(args.adam_betas), eps=args.adam_eps,
                                     weight_decay=s.weight_decay, adam_w_mode=True)
    schedule = None
    if not s.use_ds_scheduler:
        factor = warmup_linear_decay(s.warmup_steps, args.steps)
        schedule = lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client_optimizer,
                                           model_parameters=groups if client_optimizer is None else None,
                                           lr_scheduler=schedule, config=s.ds_config)
    if args.compile:
        compile_engine(engine)
    _say(s, f"engine ready: {model.num_parameters() / 1e6:.1f}M parameters, {s.precision}, ZeRO {s.zero_stage}, "
            f"world {s.world_size}, global batch {s.global_batch_size} = {s.micro_batch_size} x "
            f"{s.grad_accum_steps} accumulation x {s.world_size}, peak lr {s.lr:.2e}, warmup {s.warmup_steps} "
            f"({time.perf_counter() - t0:.1f}s)")

    def make_val_loader():
        return MLMDataLoader(prepared, split="val", seq_len=args.seq_len, micro_batch_size=s.micro_batch_size,
                             global_batch_size=s.global_batch_size, rank=s.rank, world_size=s.world_size,
                             seed=args.seed, packing=args.packing, mask_prob=args.mask_prob, infinite=False)

    try:
        loader = MLMDataLoader(prepared, split="train", seq_len=args.seq_len,
                               micro_batch_size=s.micro_batch_size, global_batch_size=s.global_batch_size,
                               rank=s.rank, world_size=s.world_size, seed=args.seed, packing=args.packing,
                               mask_prob=args.mask_prob, infinite=True)
        make_val_loader().steps_per_epoch  # the held-out split must hold a batch too
    except ValueError as e:
        raise ConfigError(_data_error(args, e)) from None
    if loader.grad_accum_steps != s.grad_accum_steps:
        raise TrainingError(f"data loader accumulates {loader.grad_accum_steps} micro-batches per step but "
                            f"DeepSpeed expects {s.grad_accum_steps}")

    run_info = {"seq_len": args.seq_len, "global_batch_size": s.global_batch_size,
                "micro_batch_size": s.micro_batch_size, "world_size": s.world_size, "steps": args.steps,
                "seed": args.seed, "precision": s.precision, "zero_stage": s.zero_stage, "lr": s.lr}
    step, tokens_seen, samples_seen = 0, 0, 0
    guard = NonFiniteGuard(args.max_nonfinite)
    min_loss_scale = s.ds_config.get("fp16", {}).get("min_loss_scale", 1)
    if s.resume_from is not None:
        client = load_checkpoint(engine, s, loader)
        step = client["step"]
        tokens_seen, samples_seen = client["tokens_seen"], client["samples_seen"]
        guard.streak = client.get("nonfinite_streak", 0)
        load_dir, tag = s.resume_from
        if s.rank == 0 and os.path.abspath(load_dir) == os.path.abspath(s.ckpt_dir) and \
                latest_pointer(s.ckpt_dir) != tag:
            atomic_write(os.path.join(s.ckpt_dir, LATEST), tag)  # repair the pointer: it names what we run from
        changed = {k: (client["run"].get(k), v) for k, v in run_info.items() if client["run"].get(k) != v}
        for k, (old, new) in changed.items():
            _say(s, f"fastroberta-train: warning: resuming with {k}={new} (checkpoint had {old}); the run will "
                    "not match an uninterrupted one")
        _say(s, f"resumed from {os.path.join(*s.resume_from)} at step {step}")

    if s.rank == 0:
        if args.overwrite:
            # Only now, with the configuration checked, the data prepared and the engine built, does the
            # earlier run give way.
            remove_previous_run(s.output)
        write_config(s.ds_config, os.path.join(s.output, "ds_config.json"))
        with open(os.path.join(s.output, "run.json"), "w") as f:
            json.dump({"args": vars(args), "settings": run_info, "model": model_config.to_dict(),
                       "optimizer": s.optimizer, "warmup_steps": s.warmup_steps}, f, indent=2, default=str)
    log = MetricsLog(os.path.join(s.output, "metrics.jsonl"), enabled=s.rank == 0,
                     tensorboard_dir=os.path.join(s.output, "tb") if args.tensorboard else None,
                     resume_step=step if s.resume_from is not None else None)
    flops_per_token = model.flops_per_token(args.seq_len, args.mask_prob)
    meter = Throughput(flops_per_token, peak_tflops(device, s.precision, args.peak_tflops), s.world_size)
    end_step = args.stop_at_step or args.steps
    bar = progress_bar(total=args.steps, initial=step, desc="train", disable=s.rank != 0 or args.no_progress,
                       file=sys.stderr)  # a tqdm bar on a terminal, plain lines in a log (issue 12)

    def client_state():
        return {"step": step, "tokens_seen": tokens_seen, "samples_seen": samples_seen,
                "nonfinite_streak": guard.streak, "loader": loader.state_dict(), "run": run_info}

    saved_step = step if s.resume_from is not None else None

    def stop_run(message):
        bar.close()
        log.close()
        raise TrainingError(message)

    def checkpoint():
        nonlocal saved_step
        if step == saved_step:
            return  # this state is already on disk
        if not all_ranks_true(parameters_finite(engine.module), device):
            stop_run(f"the weights are non-finite at step {step} (lr {lr:.3e}); not saving them. Lower --lr or "
                     f"keep --clip-grad on; {last_good_checkpoint(s.ckpt_dir)}.")
        saved_step = step
        meter.pause()
        with preserved_rng():
            path = save_checkpoint(engine, s.ckpt_dir, step, s.rank, s.world_size,
                                   {"rng": rng_state(), "loader": loader.state_dict()}, client_state(),
                                   args.keep_last)
        meter.resume()
        _say(s, f"checkpoint saved: {path}", bar)

    window = {"loss": 0.0, "correct": 0.0, "labels": 0.0, "steps": 0}
    lr = engine.get_lr()[0]
    last, first_loss = {}, None
    stopped_by_signal = False
    batches = iter(loader)
    engine.train()
    meter.resume()
    with StopRequest() as stop:
        while step < end_step:
            lr = engine.get_lr()[0]  # the rate this step's update uses; the scheduler moves on inside step()
            skipped_before = engine.skipped_steps
            # Summed on the device over the micro-steps and read once, after the step's all-reduce.
            stats = torch.zeros(6, dtype=torch.float64, device=device)
            fallback_norm = None
            n_samples = 0
            for micro in range(s.grad_accum_steps):
                batch = next(batches)
                inputs = model_inputs(batch, device)
                out = engine(**inputs)
                engine.backward(out.loss)
                if micro == s.grad_accum_steps - 1 and s.precision == "fp32" and s.zero_stage == 0:
                    fallback_norm = local_grad_norm(engine.module)
                try:
                    engine.step()
                except Exception as e:  # DeepSpeed gives up when the fp16 loss scale cannot shrink further
                    if "loss scale already at minimum" not in str(e):
                        raise
                    stop_run(f"fp16 gradients overflow even at the minimum loss scale at step {step + 1} (lr "
                             f"{lr:.3e}); lower --lr or use --precision bf16; {last_good_checkpoint(s.ckpt_dir)}.")
                stats[:4] += torch.stack([out.loss.detach().double(), out.num_correct.double(),
                                          out.num_labels.double(), inputs["attention_mask"].sum().double()])
                n_samples += batch["input_ids"].shape[0]
            stats[4] = float(n_samples)  # host numbers go in as kernel arguments, not blocking copies
            stats[5] = float(stop.requested)
            # One collective per step: every rank sees the same loss (and so stops together).
            dist.all_reduce(stats)
            loss_sum, correct, n_labels, n_tokens, n_samples, stop_votes = stats.tolist()
            step += 1
            loss = loss_sum / (s.grad_accum_steps * s.world_size)
            tokens_seen += int(n_tokens)
            samples_seen += int(n_samples)
            meter.add(n_tokens, n_samples)
            skipped = engine.skipped_steps > skipped_before
            scale = loss_scale_of(engine) if s.precision == "fp16" else None
            # Every precision: a non-finite loss counts whatever DeepSpeed did with the step (the bf16 and
            # fp16 paths skip such updates, fp32 applies them).
            if guard.update(loss, skipped=skipped, loss_scale=scale, min_loss_scale=min_loss_scale):
                what = f"the loss was non-finite ({loss})" if not math.isfinite(loss) else \
                    f"the fp16 loss scale stayed at its minimum ({scale:g}) with every step skipped"
                advice = "Lower --lr, keep --clip-grad on" + \
                    (", or use bf16/fp32 instead of fp16" if s.precision == "fp16" else "")
                stop_run(f"{what} for {guard.streak} consecutive steps, up to step {step} (lr {lr:.3e}); "
                         f"stopping rather than training on. {advice}; {last_good_checkpoint(s.ckpt_dir)}.")
            if math.isfinite(loss):
                window["loss"] += loss
                window["steps"] += 1
            window["correct"] += correct
            window["labels"] += n_labels
            accuracy = correct / n_labels if n_labels else 0.0
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.3f}", tok_s=f"{meter.tokens_per_s():.0f}",
                            refresh=False)

            do_eval = step == end_step or (args.eval_every and step % args.eval_every == 0)
            do_log = do_eval or step % args.log_every == 0 or step == end_step or stop_votes > 0
            if do_log:
                rates = meter.read()
                record = {"step": step,
                          "loss": window["loss"] / window["steps"] if window["steps"] else None,
                          "mlm_accuracy": window["correct"] / window["labels"] if window["labels"] else None,
                          "lr": lr, "grad_norm": grad_norm_of(engine, fallback_norm), **rates,
                          "peak_mem_mib": peak_memory_mib(device), "epoch": loader.epoch,
                          "tokens_seen": tokens_seen, "elapsed_s": time.perf_counter() - t0}
                if s.precision == "fp16":
                    record.update(loss_scale=loss_scale_of(engine), skipped_steps=engine.skipped_steps)
                if do_eval:
                    record.update(evaluate(engine, make_val_loader, args.eval_batches, device))
                    if "eval_loss" in record and not math.isfinite(record["eval_loss"]) and step == end_step:
                        log.log(record)
                        stop_run(f"the held-out loss is non-finite ({record['eval_loss']}) at step {step} (lr "
                                 f"{lr:.3e}); not saving or exporting these weights. Lower --lr or keep "
                                 f"--clip-grad on; {last_good_checkpoint(s.ckpt_dir)}.")
                    if "eval_loss" in record:
                        record.update(unigram_baseline=base["unigram"], uniform_baseline=base["uniform"])
                        _say(s, f"step {step}: eval loss {record['eval_loss']:.4f} (unigram baseline "
                                f"{base['unigram']:.3f}), accuracy {record['eval_accuracy']:.4f}, perplexity "
                                f"{record['eval_perplexity']:.1f}", bar)
                log.log(record)
                last = record
                if first_loss is None:
                    first_loss = record["loss"]
                window = {"loss": 0.0, "correct": 0.0, "labels": 0.0, "steps": 0}
                meter.resume()
            if stop_votes > 0:
                stopped_by_signal = True
                break
            if args.save_every and step % args.save_every == 0 and step != end_step:
                checkpoint()
        checkpoint()
    bar.close()

    hf_dir = None
    if not stopped_by_signal and step >= args.steps:
        hf_dir = os.path.join(s.output, "hf")
        meter.pause()
        if not all_ranks_true(parameters_finite(engine.module), device):
            raise TrainingError(f"the final weights are non-finite; no Hugging Face export was written. "
                                f"{last_good_checkpoint(s.ckpt_dir)}.")
        export_hf(engine, s, model_config, prepared, hf_dir)
        _say(s, f"exported Hugging Face model and tokenizer to {hf_dir}")
    elif stopped_by_signal:
        _say(s, f"stopped by signal at step {step}; resume with --resume")
    log.close()
    summary = {"step": step, "output": s.output, "checkpoint": os.path.join(s.ckpt_dir, f"global_step{step}"),
               "hf": hf_dir, "metrics": last, "stopped_by_signal": stopped_by_signal,
               "elapsed_s": time.perf_counter() - t0}
    if s.rank == 0:  # issue 12: the loss against the baselines, fill-mask samples, loss.png
        summary["report"] = run_report.end_of_run(lambda msg: _say(s, msg), s.output, last, base, prepared,
                                                  hf_dir, args.samples)
    if first_loss is not None and last.get("loss") is not None:
        _say(s, f"done: step {step}, loss {first_loss:.3f} -> {last['loss']:.3f} in {summary['elapsed_s']:.0f}s; "
                f"outputs in {s.output}")
    engine.destroy()
    return summary


def main(argv=None):
    """Console entry point: 0 on success (also after a signal-requested stop), 2 for bad input (a flag, a file,
    the output folder), 1 when the run itself failed; either error is one line on stderr (training.errors.run_command)."""
    return run_command("fastroberta-train", train, argv)


if __name__ == "__main__":
    sys.exit(main())
