"""One optimizer step of a DeepSpeed run: its micro-batches forward and backward, the update, and the step's
sums read once after one all-reduce; then the non-finite guard's verdict."""
import math
from dataclasses import dataclass

import torch

from fastroberta.training.engine import local_grad_norm, loss_scale_of
from fastroberta.training.errors import TrainingError


@dataclass
class StepResult:
    loss: float           # mean over micro-batches and ranks (non-finite when any was)
    tokens: int           # real tokens over all ranks
    samples: int
    extra: list           # the model's own sums (extra_sums), over all ranks
    stop_requested: bool  # some rank got a stop signal
    skipped: bool         # DeepSpeed skipped the update (fp16 overflow)
    loss_scale: float     # fp16 only, else None
    fallback_norm: object  # a device tensor when DeepSpeed reports no gradient norm (fp32 without ZeRO)


def optimizer_step(engine, batches, s, device, to_inputs, extra_sums=None, stop_requested=False, step=0,
                   last_good=""):
    """Run ``s.grad_accum_steps`` micro-batches from ``batches`` through ``engine`` and step it. ``to_inputs(batch,
    device)`` makes the model's keyword arguments; ``extra_sums(out)`` (optional) is a tensor of further per-step
    sums (MLM: correct predictions, labels). Everything is summed on the device and read once, after the step's
    single all-reduce, so every rank sees the same loss (and so stops together). ``step`` (the one being run)
    and ``last_good`` (where the last good checkpoint is) word the error when fp16 cannot go on."""
    import torch.distributed as dist
    lr = engine.get_lr()[0]
    skipped_before = engine.skipped_steps
    sums, fallback_norm, n_samples = None, None, 0
    for micro in range(s.grad_accum_steps):
        batch = next(batches)
        inputs = to_inputs(batch, device)
        out = engine(**inputs)
        engine.backward(out.loss)
        if micro == s.grad_accum_steps - 1 and s.precision == "fp32" and s.zero_stage == 0:
            fallback_norm = local_grad_norm(engine.module)
        try:
            engine.step()
        except Exception as e:  # DeepSpeed gives up when the fp16 loss scale cannot shrink further
            if "loss scale already at minimum" not in str(e):
                raise
            raise TrainingError(f"fp16 gradients overflow even at the minimum loss scale at step {step} (lr "
                                f"{lr:.3e}); lower --lr or use --precision bf16; {last_good}.") from None
        parts = [out.loss.detach().double(), inputs["attention_mask"].sum().double()]
        if extra_sums is not None:
            parts.extend(t.double() for t in extra_sums(out))
        micro_sums = torch.stack(parts)
        sums = micro_sums if sums is None else sums + micro_sums
        n_samples += batch["input_ids"].shape[0]
    # Host numbers go in as kernel arguments, not blocking copies.
    stats = torch.cat([sums, torch.tensor([0.0, 0.0], dtype=torch.float64, device=device)])
    stats[-2] = float(n_samples)
    stats[-1] = float(stop_requested)
    dist.all_reduce(stats)
    values = stats.tolist()
    skipped = engine.skipped_steps > skipped_before
    return StepResult(loss=values[0] / (s.grad_accum_steps * s.world_size), tokens=int(values[1]),
                      samples=int(values[-2]), extra=values[2:-2], stop_requested=values[-1] > 0, skipped=skipped,
                      loss_scale=loss_scale_of(engine) if s.precision == "fp16" else None,
                      fallback_norm=fallback_norm)


def nonfinite_stop_message(result, guard, step, lr, precision):
    """Why the guard stops the run, in words (the caller adds where the last good checkpoint is)."""
    what = f"the loss was non-finite ({result.loss})" if not math.isfinite(result.loss) else \
        f"the fp16 loss scale stayed at its minimum ({result.loss_scale:g}) with every step skipped"
    advice = "Lower --lr, keep --clip-grad on" + (", or use bf16/fp32 instead of fp16" if precision == "fp16" else "")
    return f"{what} for {guard.streak} consecutive steps, up to step {step} (lr {lr:.3e}); stopping rather than " \
           f"training on. {advice}"
