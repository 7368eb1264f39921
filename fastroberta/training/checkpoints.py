"""DeepSpeed checkpoints that verify themselves.

Checkpoints: DeepSpeed writes ``<checkpoints>/global_step<N>.tmp``; every rank then checksums its share of the
files, rank 0 writes ``manifest.json`` (size and SHA-256 of each file) last, renames the folder to
``global_step<N>`` and only then moves ``latest``. A checkpoint is intact when its manifest exists and every file
matches it. ``--resume`` verifies before loading; when the newest checkpoint is damaged it warns and falls back to
the newest intact one (an explicitly named damaged checkpoint is an error that names the intact one instead).

Resume anywhere: every checkpoint carries ``universal_checkpoint_info``, so DeepSpeed's Universal Checkpointing
can reshard it. A ZeRO-partitioned checkpoint saved by another number of processes is converted once
(``ds_to_universal``) into ``<checkpoints>/universal/global_step<N>``, verified by its own manifest like every
checkpoint, and loaded with DeepSpeed's ``load_universal``; step, LR schedule, optimizer moments and loss scale
continue, and the data position is global (ARCHITECTURE.md, the data-order rule).
"""
import contextlib
import glob
import io
import os
import re
import shutil
from argparse import Namespace

import torch

from fastroberta.training.distributed import all_ranks_true
from fastroberta.training.errors import ConfigError, TrainingError, is_disk_full, no_space_text, os_error_text
from fastroberta.training.manifest import verify_checkpoint, write_manifest
from fastroberta.training.nonfinite import parameters_finite
from fastroberta.training.output import atomic_write
from fastroberta.training.rng import seed_everything, set_rng_state

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"  # DeepSpeed's own pointer file name, so engine.load_checkpoint(dir) and its tools agree
TAG_RE = re.compile(r"^global_step(\d+)$")
TMP_SUFFIX = ".tmp"  # a checkpoint being written
UNIVERSAL_DIR = "universal"  # <checkpoints>/universal/<tag>: a checkpoint converted for another world size
# What DeepSpeed's converter requires of a checkpoint (deepspeed.checkpoint.constants), saved in the client state.
UNIVERSAL_CHECKPOINT_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}


def checkpoint_tags(ckpt_dir):
    """Tag folders in ``ckpt_dir``, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [(int(m.group(1)), name) for name in os.listdir(ckpt_dir)
            if (m := TAG_RE.match(name)) and os.path.isdir(os.path.join(ckpt_dir, name))]
    return [name for _, name in sorted(tags)]


def newest_intact(ckpt_dir, below=None, exclude=None):
    """The newest intact tag in ``ckpt_dir`` (older than step ``below`` when given, other than ``exclude``), or
    None."""
    for tag in reversed(checkpoint_tags(ckpt_dir)):
        if tag == exclude or (below is not None and int(TAG_RE.match(tag).group(1)) >= below):
            continue
        if verify_checkpoint(os.path.join(ckpt_dir, tag)) is None:
            return tag
    return None


def latest_pointer(ckpt_dir):
    """What ``<ckpt_dir>/latest`` says, as written ("" when it is missing or empty)."""
    try:
        with open(os.path.join(ckpt_dir, LATEST)) as f:
            return f.read().strip()
    except OSError:
        return ""


def _read_latest(ckpt_dir):
    """The tag ``latest`` names, or None; a pointer left on a renamed ``.tmp`` folder names the final one."""
    tag = latest_pointer(ckpt_dir)
    if not tag:
        return None
    if tag.endswith(TMP_SUFFIX) and not os.path.isdir(os.path.join(ckpt_dir, tag)):
        tag = tag[:-len(TMP_SUFFIX)]  # the save was interrupted between its rename and the pointer update
    return tag


def find_checkpoint(path, explicit, warn):
    """(checkpoints folder, tag) to resume from, verified. ``path`` is a checkpoints folder or one
    global_step<N> folder. A damaged newest checkpoint of a folder falls back to the newest intact one with
    a warning; a damaged checkpoint named explicitly is an error naming the newest intact one. None when a
    plain --resume finds no checkpoint at all."""
    norm = os.path.normpath(path)
    if TAG_RE.match(os.path.basename(norm)) or os.path.basename(norm).endswith(TMP_SUFFIX):
        ckpt_dir, tag = os.path.dirname(norm), os.path.basename(norm)
        if not os.path.isdir(norm):
            raise ConfigError(f"--resume {path!r} does not exist")
        problem = verify_checkpoint(norm)
        if problem is not None:
            raise TrainingError(f"checkpoint {norm} is damaged: {problem}; {intact_hint(ckpt_dir, tag)}")
        return ckpt_dir, tag
    ckpt_dir = norm
    tags = checkpoint_tags(ckpt_dir)
    has_latest = os.path.isfile(os.path.join(ckpt_dir, LATEST))
    if not has_latest and not tags:
        if explicit:
            raise ConfigError(f"--resume {path!r} is neither a checkpoints folder with a '{LATEST}' file nor a "
                              "global_step<N> checkpoint folder")
        return None
    tag = _read_latest(ckpt_dir) if has_latest else None
    if not tag:
        problem = f"{os.path.join(ckpt_dir, LATEST)} is empty or unreadable"
    elif not TAG_RE.match(tag):
        problem = f"{os.path.join(ckpt_dir, LATEST)} names {tag!r}, not a global_step<N> checkpoint"
    else:
        problem = verify_checkpoint(os.path.join(ckpt_dir, tag))
        if problem is None:
            return ckpt_dir, tag
        problem = f"checkpoint {os.path.join(ckpt_dir, tag)} is damaged: {problem}"
    fallback = newest_intact(ckpt_dir)
    if fallback is None:
        raise TrainingError(f"{problem}, and {ckpt_dir} holds no intact checkpoint to resume from; start afresh "
                            "with --overwrite")
    warn(f"{problem}; resuming from the newest intact checkpoint, {os.path.join(ckpt_dir, fallback)}")
    return ckpt_dir, fallback


def intact_hint(ckpt_dir, tag):
    """Words for an error about checkpoint ``tag``: the newest intact checkpoint to resume from instead, an older
    one first, never ``tag`` itself."""
    m = TAG_RE.match(tag.removesuffix(TMP_SUFFIX))
    intact = (newest_intact(ckpt_dir, below=int(m.group(1))) if m else None) or \
        newest_intact(ckpt_dir, exclude=tag)
    if intact is None:
        return f"{ckpt_dir} holds no other intact checkpoint; start afresh with --overwrite"
    return f"the newest intact one is {os.path.join(ckpt_dir, intact)}: pass it to --resume"


def remove_partial_checkpoints(ckpt_dir):
    """Delete the ``*.tmp`` folders of saves that never completed (they only take space)."""
    if not os.path.isdir(ckpt_dir):
        return
    for name in os.listdir(ckpt_dir):
        if name.endswith(TMP_SUFFIX) and os.path.isdir(os.path.join(ckpt_dir, name)):
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def save_checkpoint(engine, ckpt_dir, step, rank, world_size, trainer_state, client_state, keep_last):
    """DeepSpeed checkpoint ``global_step<step>`` plus each rank's ``trainer_state`` (RNG, data position).
    Written under a temporary tag, checksummed into a manifest, renamed once complete, and only then does
    ``latest`` move to it: at every instant ``latest`` names a complete checkpoint. A write that fails (a full
    disk above all) removes the partial folder and raises TrainingError; ``latest`` stays where it was."""
    import torch.distributed as dist
    tag = f"global_step{step}"
    tmp_tag = tag + TMP_SUFFIX
    final_dir, tmp_dir = os.path.join(ckpt_dir, tag), os.path.join(ckpt_dir, tmp_tag)
    if rank == 0:
        remove_partial_checkpoints(ckpt_dir)  # debris of attempts that never completed
    dist.barrier()
    failed = None
    try:
        os.makedirs(tmp_dir, exist_ok=True)
        torch.save(trainer_state, os.path.join(tmp_dir, f"trainer_state_rank{rank}.pt"))
        engine.save_checkpoint(ckpt_dir, tag=tmp_tag, client_state={**client_state, **UNIVERSAL_CHECKPOINT_INFO},
                               save_latest=False)
    except (OSError, RuntimeError) as e:
        failed = e
    ok = all_ranks_true(failed is None, torch.device("cpu") if not torch.cuda.is_available()
                        else torch.device("cuda", torch.cuda.current_device()))
    if not ok:
        if rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        dist.barrier()
        raise _save_failure(failed, ckpt_dir, step)
    try:
        write_manifest(tmp_dir, rank, world_size)
    except OSError as e:
        if rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise _save_failure(e, ckpt_dir, step) from None
    dist.barrier()
    if rank == 0:
        latest = os.path.join(ckpt_dir, LATEST)
        if os.path.isdir(final_dir):
            # Only when re-saving a step (resumed from an older checkpoint of this folder): point at the
            # complete temporary copy while the old one is replaced.
            atomic_write(latest, tmp_tag)
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
        atomic_write(latest, tag)
        if keep_last:
            tags = [t for t in checkpoint_tags(ckpt_dir) if int(TAG_RE.match(t).group(1)) <= step]
            for old in tags[:-keep_last]:
                shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
                shutil.rmtree(os.path.join(ckpt_dir, UNIVERSAL_DIR, old), ignore_errors=True)
    dist.barrier()
    return final_dir


def _save_failure(exc, ckpt_dir, step):
    latest = _read_latest(ckpt_dir)
    kept = f"{LATEST} still names {os.path.join(ckpt_dir, latest)}" if latest else "no earlier checkpoint exists"
    if exc is None:
        return TrainingError(f"saving the checkpoint of step {step} failed on another rank; {kept}")
    if is_disk_full(exc):
        what = no_space_text(ckpt_dir)
    elif isinstance(exc, OSError):
        what = os_error_text(exc)
    else:
        what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return TrainingError(f"could not save the checkpoint of step {step}: {what}; the partial checkpoint was "
                         f"removed and {kept}")


def last_good_checkpoint(ckpt_dir):
    """Words naming the checkpoint ``latest`` points to, for error messages."""
    tag = latest_pointer(ckpt_dir)
    if not tag:
        return "no checkpoint was saved"
    return f"the last good checkpoint is {os.path.join(ckpt_dir, tag)}"


def load_checkpoint(engine, s, loader):
    """Restore engine (model, optimizer, scheduler, loss scaler), data position and RNG from ``s.resume_from``;
    returns the client state saved with the checkpoint."""
    load_dir, tag = s.resume_from
    where = os.path.join(load_dir, tag)
    saved = saved_world_size(where)
    universal = saved != s.world_size and is_partitioned(where)
    engine_dir = load_dir
    if universal:
        engine_dir = convert_to_universal(load_dir, tag, s.rank, engine.device)
        if s.rank == 0:
            print(f"resuming checkpoint {where} of {saved} process{'es' if saved > 1 else ''} on {s.world_size}: "
                  f"converted once into {os.path.join(engine_dir, tag)} (DeepSpeed Universal Checkpointing)",
                  flush=True)
        # DeepSpeed reads this flag of its config at load time only; a later save is an ordinary checkpoint.
        engine._config.load_universal_checkpoint = True
    inner = getattr(engine.optimizer, "optimizer", None)
    decay = [g.get("weight_decay") for g in inner.param_groups] if universal and inner is not None else None
    try:
        path, client = engine.load_checkpoint(engine_dir, tag=tag)
        if universal and inner is not None:
            repair_zero3_universal_load(inner, decay)
    except Exception as e:  # DeepSpeed and torch.load raise anything from AssertionError to zip errors
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TrainingError(f"checkpoint {where} cannot be loaded ({type(e).__name__}: {first}); "
                            f"{intact_hint(load_dir, tag)}") from None
    finally:
        engine._config.load_universal_checkpoint = False
    if path is None:
        raise TrainingError(f"DeepSpeed could not load checkpoint {where}; {intact_hint(load_dir, tag)}")
    if not all_ranks_true(parameters_finite(engine.module), engine.device):
        raise TrainingError(f"checkpoint {where} holds non-finite weights; {intact_hint(load_dir, tag)}")
    own = os.path.join(load_dir, tag, f"trainer_state_rank{s.rank}.pt")
    if os.path.isfile(own) and saved == s.world_size:
        trainer = torch.load(own, map_location="cpu", weights_only=False)
        loader.load_state_dict(trainer["loader"])
        set_rng_state(trainer["rng"])
    else:
        # A different world size: no saved state for this rank. The data position is global; reseed dropout.
        loader.load_state_dict(client["loader"])
        seed_everything(s.seed + s.rank + 1000003 * client["step"])
    if s.rank == 0 and os.path.abspath(load_dir) == os.path.abspath(s.ckpt_dir) and latest_pointer(s.ckpt_dir) != tag:
        atomic_write(os.path.join(s.ckpt_dir, LATEST), tag)  # repair the pointer: it names what we run from
    return client


def repair_zero3_universal_load(optimizer, decay):
    """Undo two things DeepSpeed's ZeRO-3 universal load (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_
    stage3, 0.19.8) does to ``optimizer`` that an uninterrupted run does not have. It copies the first parameter
    group's settings onto every group, which would decay the biases and LayerNorm weights: each group gets its own
    ``decay`` back (the run's, not the checkpoint's). And it gives every group's state one and the same ``step``
    tensor, which torch's Adam increments in place once per group: with two groups the bias correction ran two
    steps per step (the resumed losses drifted about 2e-4 relative from the second step on). Each state gets its
    own copy. ZeRO 1 and 2 load each group's own step and settings; there this changes nothing."""
    for group, value in zip(optimizer.param_groups, decay):
        group["weight_decay"] = value
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def saved_world_size(folder):
    """How many processes wrote the checkpoint in ``folder`` (each saves its own trainer state)."""
    return len(glob.glob(os.path.join(folder, "trainer_state_rank*.pt")))


def is_partitioned(folder):
    """Whether the checkpoint's optimizer state is split over its ranks (ZeRO 1-3, DeepSpeed's bf16 optimizer);
    ZeRO 0's optimizer state is whole in the model-state file and loads on any world size as it is."""
    return bool(glob.glob(os.path.join(folder, "*zero_pp_rank_*_optim_states.pt")))


def convert_to_universal(ckpt_dir, tag, rank, device):
    """Convert checkpoint ``tag`` into a universal one under ``<ckpt_dir>/universal`` (rank 0, once: an intact
    earlier conversion is reused) and return that folder; TrainingError names a case DeepSpeed cannot convert."""
    import deepspeed
    from deepspeed.checkpoint import ds_to_universal
    out_dir = os.path.join(ckpt_dir, UNIVERSAL_DIR)
    target = os.path.join(out_dir, tag)
    failed = None
    if rank == 0 and verify_checkpoint(target) is not None:
        tmp = target + TMP_SUFFIX
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        try:
            # The converter narrates every step and draws progress bars; its outcome is what matters here.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                ds_to_universal.main(Namespace(input_folder=os.path.join(ckpt_dir, tag), output_folder=tmp,
                                               num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                               strict=True, inject_missing_state=True))
            write_manifest(tmp)
            os.replace(tmp, target)
        except Exception as e:  # the converter asserts, raises NotImplementedError, ValueError, OSError...
            shutil.rmtree(tmp, ignore_errors=True)
            failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    if not all_ranks_true(failed is None, device):
        raise TrainingError(f"DeepSpeed {deepspeed.__version__} cannot convert checkpoint "
                            f"{os.path.join(ckpt_dir, tag)} for another number of processes ({failed or 'see rank 0'}"
                            f"); resume it on {saved_world_size(os.path.join(ckpt_dir, tag))} processes")
    return out_dir


def warn_changed_settings(say, prog, saved_run, run_info):
    """Tell the user which of the run's settings differ from the checkpoint's. The number of processes and the
    micro-batch split do not count: the global batches are the same whatever they are (the data-order rule)."""
    for k, v in run_info.items():
        if k in ("world_size", "micro_batch_size"):
            continue
        if saved_run.get(k) != v:
            say(f"{prog}: warning: resuming with {k}={v} (checkpoint had {saved_run.get(k)}); the run will not "
                "match an uninterrupted one")
