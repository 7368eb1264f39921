"""The learning-rate schedule both commands use: linear warmup, then linear decay to zero."""
import torch


def warmup_linear_decay(warmup_steps, total_steps):
    """LR multiplier for optimizer step s (0-based): linear rise to 1 over ``warmup_steps``, then linear decay
    reaching 0 at ``total_steps``. A plain function, so LambdaLR checkpoints its position but not the shape:
    a resumed run follows the schedule of its own command line."""
    def factor(s):
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        return max(0.0, (total_steps - s) / max(1, total_steps - warmup_steps))
    return factor


def lr_scheduler(warmup_steps, total_steps):
    """What deepspeed.initialize takes as ``lr_scheduler``: a function of the optimizer it builds."""
    factor = warmup_linear_decay(warmup_steps, total_steps)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
