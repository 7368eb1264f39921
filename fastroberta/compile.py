"""``torch.compile`` for fastroberta's models: ``compile_model(model)``.

Every fused op is a ``torch.library`` custom op (``fastroberta.kernels._library``), so Dynamo traces a whole
forward (and AOTAutograd its backward) without a graph break and Inductor fuses what the hand-written kernels
leave: bias + GELU, the embedding sums, the FFN's bias adds. The MLM loss runs its head on the labelled rows
only and the unpadded layout keeps the real tokens only: both selections have a size known only from the data,
which Dynamo captures when ``capture_dynamic_output_shape_ops`` is on (``capture_scalar_outputs`` too, for a
varlen batch without ``max_seqlen``). ``compile_model`` switches both on (process-wide Dynamo settings).
"""
import torch


def enable_dynamo_options():
    """Switch on the Dynamo options a fastroberta model needs to compile as one graph (idempotent)."""
    import torch._dynamo

    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    torch._dynamo.config.capture_scalar_outputs = True


def compile_model(model, fullgraph=True, **kwargs):
    """``torch.compile(model, fullgraph=True, **kwargs)`` after ``enable_dynamo_options()``. The compiled
    module shares ``model``'s parameters and state_dict keys (under ``_orig_mod.``)."""
    enable_dynamo_options()
    return torch.compile(model, fullgraph=fullgraph, **kwargs)
