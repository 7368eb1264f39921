"""The DeepSpeed config of a run: generated from the trainer's flags, then merged with a user JSON.

The user's ``--deepspeed_config`` is merged over the generated config key by key (nested objects merge,
anything else replaces), and every value it changes is reported as a conflict naming the key and both values.
Settings the trainer itself depends on (batch sizes, precision, ZeRO stage, optimizer) are read back from the
merged config, so a user JSON that changes them changes the run consistently instead of fighting the flags.
"""
import copy
import json
import os
from dataclasses import dataclass

from fastroberta.training.errors import ConfigError


FP16_DEFAULTS = {
    # loss_scale 0 = dynamic scaling; start at 2^16 and halve on overflow, double after 1000 clean steps.
    "enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
    "hysteresis": 2, "min_loss_scale": 1,
}
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def load_user_config(path):
    """The JSON object in ``path``; ConfigError when it is missing, unreadable or not a JSON object."""
    if path is None:
        return {}
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"--deepspeed_config {path!r} cannot be read: {e.strerror or e}") from None
    try:
        user = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path!r} is not valid JSON: {e}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"--deepspeed_config {path!r} must hold a JSON object, got {type(user).__name__}")
    return user


def build_config(*, micro_batch_size, grad_accum_steps, world_size, precision, zero_stage,
                 offload_optimizer=False, clip_grad=1.0, optimizer=None, on_cuda=False):
    """The generated DeepSpeed config.

    ``optimizer``: None when the trainer passes its own optimizer object to deepspeed.initialize, else a dict
    with lr, betas, eps, weight_decay and ``torch_adam`` (True selects torch.optim.AdamW instead of DeepSpeed's
    fused/CPU Adam).
    """
    cfg = {
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": float(clip_grad),
        # The trainer logs progress itself; DeepSpeed's own per-N-steps print would interleave with it.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": zero_stage},
    }
    if precision == "fp16":
        cfg["fp16"] = dict(FP16_DEFAULTS)
    elif precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    if offload_optimizer:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(on_cuda)}
    if optimizer is not None:
        params = {"lr": optimizer["lr"], "betas": list(optimizer["betas"]), "eps": optimizer["eps"],
                  "weight_decay": optimizer["weight_decay"]}
        if optimizer.get("torch_adam"):
            params["torch_adam"] = True
            if offload_optimizer:
                # ZeRO-Offload insists on DeepSpeedCPUAdam unless told that a torch optimizer is intended.
                cfg["zero_force_ds_cpu_optimizer"] = False
        cfg["optimizer"] = {"type": "AdamW", "params": params}
    else:
        # A client optimizer (apex FusedAdam) is not on ZeRO's tested list; it works, so say so.
        cfg["zero_allow_untested_optimizer"] = True
    return cfg


def merge_configs(generated, user, prefix=""):
    """``user`` merged over ``generated``; returns (merged, conflicts) where conflicts lists
    (dotted key, generated value, user value) for every generated value the user changed."""
    merged = copy.deepcopy(generated)
    conflicts = []
    for key, value in user.items():
        name = prefix + key
        if key in merged and isinstance(merged[key], dict) and isinstance(value, dict):
            merged[key], sub = merge_configs(merged[key], value, prefix=name + ".")
            conflicts += sub
            continue
        if key in merged and merged[key] != value:
            conflicts.append((name, merged[key], value))
        merged[key] = copy.deepcopy(value)
    return merged, conflicts


def format_conflict(key, generated, user):
    return (f"--deepspeed_config sets {key} = {json.dumps(user)}, overriding the value from the command line "
            f"{json.dumps(generated)}")


def _enabled(cfg, key):
    section = cfg.get(key)
    return isinstance(section, dict) and bool(section.get("enabled", False))


def resolve_batch(merged, user, *, micro_batch_size, global_batch_size, world_size):
    """Make the three batch keys of ``merged`` consistent, honouring those the user set: returns
    (micro_batch_size, grad_accum_steps, global_batch_size). Missing keys follow DeepSpeed's own rule
    (any two determine the third); a single user key keeps the command line's other value."""
    given = {k: user[k] for k in BATCH_KEYS if k in user}
    for k, v in given.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"--deepspeed_config: {k} must be a positive integer, got {v!r}")
    tb = given.get("train_batch_size")
    mb = given.get("train_micro_batch_size_per_gpu")
    ga = given.get("gradient_accumulation_steps")
    if len(given) == 0:
        tb, mb = global_batch_size, micro_batch_size
    elif len(given) == 1:
        # One key alone: the command line's global batch stays unless that key is the global batch itself,
        # in which case the command line's micro-batch does.
        if tb is None:
            tb = global_batch_size
        else:
            mb = micro_batch_size
    if ga is None:
        if tb % (mb * world_size):
            raise ConfigError(f"global batch size {tb} is not divisible by micro-batch size {mb} x world size "
                              f"{world_size}")
        ga = tb // (mb * world_size)
    if mb is None:
        if tb % (ga * world_size):
            raise ConfigError(f"global batch size {tb} is not divisible by gradient accumulation {ga} x world "
                              f"size {world_size}")
        mb = tb // (ga * world_size)
    if tb is None:
        tb = mb * ga * world_size
    if tb != mb * ga * world_size:
        raise ConfigError(f"inconsistent batch sizes: train_batch_size {tb} != micro-batch {mb} x accumulation "
                          f"{ga} x world size {world_size}")
    merged.update(train_batch_size=tb, train_micro_batch_size_per_gpu=mb, gradient_accumulation_steps=ga)
    return mb, ga, tb


def resolve_precision(merged, user, requested):
    """The precision of the merged config. A user JSON that enables fp16 or bf16 wins over the flag (the
    other half-precision mode is switched off); enabling both is an error."""
    user_fp16, user_bf16 = _enabled(user, "fp16"), _enabled(user, "bf16") or _enabled(user, "bfloat16")
    if user_fp16 and user_bf16:
        raise ConfigError("--deepspeed_config enables both fp16 and bf16; choose one")
    if user_fp16 and requested == "bf16":
        merged["bf16"] = {**merged.get("bf16", {}), "enabled": False}
    if user_bf16 and requested == "fp16":
        merged["fp16"] = {**merged.get("fp16", {}), "enabled": False}
    if _enabled(merged, "fp16"):
        return "fp16"
    if _enabled(merged, "bf16") or _enabled(merged, "bfloat16"):
        return "bf16"
    return "fp32"


def zero_stage_of(merged):
    stage = merged.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return stage


@dataclass
class MergedConfig:
    """The DeepSpeed config a run uses (generated from the flags, the user's JSON merged over it) and what it
    settles: batch split, precision, ZeRO stage; ``warnings`` reports every value the user's JSON changed."""
    ds: dict
    user: dict
    warnings: list
    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int
    precision: str
    zero_stage: int


def merge_with_user_config(generated, user_path, *, micro_batch_size, global_batch_size, world_size, precision,
                           on_cuda, compile=False):
    """Merge ``generated`` with the JSON at ``user_path`` (None: none) and resolve the merged config's batch,
    precision and ZeRO stage; ConfigError for a combination that cannot run (fp16 without CUDA, ``compile``
    with ZeRO-3)."""
    user = load_user_config(user_path)
    ds, conflicts = merge_configs(generated, user)
    micro, accum, global_batch = resolve_batch(ds, user, micro_batch_size=micro_batch_size,
                                               global_batch_size=global_batch_size, world_size=world_size)
    precision = resolve_precision(ds, user, precision)
    if precision == "fp16" and not on_cuda:
        raise ConfigError("fp16 (enabled in --deepspeed_config) needs a CUDA GPU; use bf16 or fp32 on CPU")
    zero_stage = zero_stage_of(ds)
    if compile and zero_stage == 3:
        raise ConfigError("--compile supports ZeRO stages 0-2: ZeRO-3 gathers parameters in hooks inside the "
                          "model's forward, which a single compiled graph cannot hold")
    return MergedConfig(ds=ds, user=user, warnings=[format_conflict(*c) for c in conflicts],
                        micro_batch_size=micro, grad_accum_steps=accum, global_batch_size=global_batch,
                        precision=precision, zero_stage=zero_stage)


def write_config(cfg, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
