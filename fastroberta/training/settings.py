"""The settings every run resolves from its flags before any work starts: where it runs (rank, world, device
kind), which kernels, the DeepSpeed config (precision, batch, optimizer, learning rate) and the output folder
(resume or overwrite). Each function checks what it resolves and raises ConfigError with what is wrong."""
import argparse
import json
import os
import time

import torch

from fastroberta.kernels.backend import KERNEL_CHOICES
from fastroberta.training.checkpoints import CHECKPOINT_DIR, LATEST, find_checkpoint
from fastroberta.training.distributed import world
from fastroberta.training.ds_config import build_config, merge_with_user_config
from fastroberta.training.errors import ConfigError
from fastroberta.training.optimizer import optimizer_config, resolve_optimizer
from fastroberta.training.output import check_output_folder
from fastroberta.training.precision import resolve_precision


def _process_start():
    """time.perf_counter() at this process's start (its imports included), from /proc where Linux has it; else
    now."""
    now = time.perf_counter()
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return now
    return now - age if 0 <= age < 120 else now  # a long-lived process (a test session) runs many commands


def base_settings(args):
    """A settings namespace with when this process started, where it runs (on_cuda, rank, world_size,
    local_rank), the seed, and the warnings to say before start-up (first: the flags a --resume changes)."""
    rank, world_size = world()
    local_rank = args.local_rank if args.local_rank is not None else int(os.environ.get("LOCAL_RANK", "0"))
    return argparse.Namespace(started=_process_start(), on_cuda=torch.cuda.is_available(), rank=rank,
                              world_size=world_size, local_rank=local_rank, seed=args.seed,
                              warnings=[line for _, line in getattr(args, "changed_on_resume", [])])


def resolve_kernels(args, on_cuda):
    """Check --kernels (and FASTROBERTA_KERNELS behind "auto"): the Triton kernels need CUDA, or the interpreter
    switched on before fastroberta was imported."""
    kernels, source = args.kernels, "--kernels"
    env_kernels = os.environ.get("FASTROBERTA_KERNELS", "").strip()
    if kernels == "auto" and env_kernels:
        kernels, source = env_kernels, "FASTROBERTA_KERNELS"
        if kernels not in KERNEL_CHOICES:
            raise ConfigError(f"FASTROBERTA_KERNELS={env_kernels!r} is not one of {', '.join(KERNEL_CHOICES)}; "
                              "unset it or fix its value")
    if kernels == "triton" and not on_cuda:
        from fastroberta.kernels._checks import interpreter_active
        if not interpreter_active():
            what = "--kernels triton" if source == "--kernels" else "FASTROBERTA_KERNELS=triton"
            raise ConfigError(f"{what} needs a CUDA GPU; on CPU use --kernels torch (or, to test the kernels "
                              "slowly, set TRITON_INTERPRET=1 in the environment)")


def resolve_engine_config(args, s, default_lr, user_scheduler_allowed):
    """Precision, optimizer, batch and learning rate, and the DeepSpeed config they make (merged with the user's
    --deepspeed_config, whose values win). ``default_lr(global_batch)`` is the rate when --lr is not given.
    Sets on ``s``: precision, optimizer, micro_batch_size, grad_accum_steps, global_batch_size, zero_stage, lr,
    weight_decay, ds_config, use_ds_scheduler; adds the merge's warnings to s.warnings."""
    on_cuda, world_size = s.on_cuda, s.world_size
    precision = resolve_precision(args.precision, on_cuda)
    if args.offload_optimizer and args.zero_stage == 0:
        raise ConfigError("--offload-optimizer needs ZeRO: add --zero-stage 1, 2 or 3")
    micro = args.micro_batch_size
    global_batch = args.global_batch_size if args.global_batch_size is not None else micro * world_size
    if global_batch % (micro * world_size):
        raise ConfigError(f"--global-batch-size {global_batch} is not divisible by --micro-batch-size {micro} x "
                          f"world size {world_size} (= {micro * world_size})")
    s.optimizer = resolve_optimizer(args.optimizer, on_cuda, args.offload_optimizer)
    s.lr = args.lr if args.lr is not None else default_lr(global_batch)

    generated = build_config(micro_batch_size=micro, grad_accum_steps=global_batch // (micro * world_size),
                             world_size=world_size, precision=precision, zero_stage=args.zero_stage,
                             offload_optimizer=args.offload_optimizer, clip_grad=args.clip_grad,
                             optimizer=optimizer_config(s.optimizer, s.lr, args.adam_betas, args.adam_eps,
                                                        args.weight_decay),
                             on_cuda=on_cuda)
    merged = merge_with_user_config(generated, args.deepspeed_config, micro_batch_size=micro,
                                    global_batch_size=global_batch, world_size=world_size, precision=precision,
                                    on_cuda=on_cuda, compile=args.compile)
    ds, user = merged.ds, merged.user
    s.warnings.extend(merged.warnings)
    s.micro_batch_size, s.grad_accum_steps = merged.micro_batch_size, merged.grad_accum_steps
    s.global_batch_size, s.precision, s.zero_stage = merged.global_batch_size, merged.precision, merged.zero_stage
    if "optimizer" in user and s.optimizer == "apex_adam":
        raise ConfigError("--deepspeed_config defines an optimizer; it cannot be combined with --optimizer "
                          "apex_adam")
    s.use_ds_scheduler = "scheduler" in user
    if s.use_ds_scheduler:
        if not user_scheduler_allowed:
            raise ConfigError("--deepspeed_config defines a scheduler; this command uses its own linear "
                              "warmup/decay")
        s.warnings.append("--deepspeed_config defines a scheduler: it replaces the built-in linear "
                          "warmup/decay")
    # The user's JSON may change the batch (so the default rate) or set the rate itself.
    opt_params = ds["optimizer"].setdefault("params", {}) if "optimizer" in ds else {}
    if "lr" in user.get("optimizer", {}).get("params", {}):
        s.lr = opt_params["lr"]
    elif args.lr is None:
        s.lr = default_lr(s.global_batch_size)
        if "optimizer" in ds:
            opt_params["lr"] = s.lr
    s.weight_decay = opt_params.get("weight_decay", args.weight_decay)
    s.ds_config = ds


def resolve_output(args, s, default_output):
    """The run folder and what --resume / --overwrite make of it: sets s.output, s.ckpt_dir and s.resume_from
    ((checkpoints folder, tag) or None)."""
    s.output = args.output or default_output
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


# Flags that --resume never takes from run.json: where and how this invocation runs, not what the run is.
NOT_RESTORED = {"resume", "overwrite", "output", "stop_at_step", "local_rank", "deepspeed", "debug", "no_progress",
                "prepare_only", "changed_on_resume"}
# Flags that change no step of the run: typing another value on --resume is not worth a line.
OUTSIDE_THE_RUN = NOT_RESTORED | {"save_every", "keep_last", "log_every", "eval_every", "eval_batches", "samples",
                                  "tensorboard", "peak_tflops", "cache_dir", "max_nonfinite", "test",
                                  "eval_batch_size", "compile", "kernels"}


def _same(a, b):
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 (JSON turns tuples into lists)
    return norm(a) == norm(b)


def restore_run_args(args, typed, output):
    """--resume continues the run as it was started: every flag not in ``typed`` (the dests the user gave) takes
    its value from ``<output>/run.json``; a typed flag that changes the run (steps, batch, lr, model, precision...)
    is listed in ``args.changed_on_resume`` with the value the run had, to be said before start-up. Without a
    run.json (a run stopped before its first checkpoint, or another folder) nothing is restored."""
    path = os.path.join(output, "run.json")
    try:
        with open(path) as f:
            saved = json.load(f)["args"]
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--resume: {path} cannot be read ({e}); give the run's flags again, or start afresh "
                          "with --overwrite") from None
    for dest, value in saved.items():
        if dest in NOT_RESTORED or not hasattr(args, dest):
            continue
        if dest not in typed:
            setattr(args, dest, tuple(value) if isinstance(getattr(args, dest), tuple) else value)
        elif dest not in OUTSIDE_THE_RUN and not _same(getattr(args, dest), value):
            flag = "--" + dest.replace("_", "-")
            had = "its default" if value is None else value
            args.changed_on_resume.append((dest, f"--resume with {flag} {getattr(args, dest)} (the run had "
                                                 f"{had}): the run will not match an uninterrupted one"))


def announced_on_resume(args, run_info):
    """``run_info`` without the settings already named before start-up (args.changed_on_resume), so that the
    comparison with the checkpoint does not say them twice."""
    named = {dest for dest, _ in getattr(args, "changed_on_resume", [])}
    if named & {"steps", "epochs"}:
        named.add("total_steps")
    return {k: v for k, v in run_info.items() if k not in named}
