"""Non-finite losses and weights: when a run must stop instead of training on garbage."""
import math

import torch


class NonFiniteGuard:
    """Counts consecutive bad steps: a non-finite loss in any precision, whatever DeepSpeed did with the step;
    under fp16 also a step the loss scaler skipped while its scale sat at the minimum (it cannot recover).
    Ordinary fp16 overflow steps, skipped with a finite loss and a scale above the minimum, are normal."""

    def __init__(self, limit, streak=0):
        self.limit = limit
        self.streak = streak

    def update(self, loss, skipped=False, loss_scale=None, min_loss_scale=None):
        """Record one optimizer step; True when the run must stop."""
        stuck = skipped and loss_scale is not None and min_loss_scale is not None and loss_scale <= min_loss_scale
        if not math.isfinite(loss) or stuck:
            self.streak += 1
        else:
            self.streak = 0
        return self.limit > 0 and self.streak >= self.limit


def parameters_finite(module):
    """True when every parameter (this rank's ZeRO-3 partition of it) is finite; no collective."""
    for p in module.parameters():
        data = getattr(p, "ds_tensor", p)
        if data.numel() and not torch.isfinite(data.detach()).all():
            return False
    return True
