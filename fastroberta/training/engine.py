"""The DeepSpeed engine around a model: built with the run's optimizer, parameter groups and schedule, optionally
compiled; and what a run reads back from it (gradient norm, fp16 loss scale)."""
import torch

from fastroberta.training.optimizer import client_optimizer, param_groups


def build_engine(model, s, args, lr_scheduler):
    """deepspeed.initialize with the settings' optimizer (DeepSpeed builds it from the config, except apex's),
    weight decay on matrices only, and ``lr_scheduler`` (None: the config's scheduler); --compile compiles the
    model inside it."""
    import deepspeed
    groups = param_groups(model, s.weight_decay)
    optimizer = client_optimizer(s.optimizer, groups, s.lr, args.adam_betas, args.adam_eps, s.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           model_parameters=groups if optimizer is None else None,
                                           lr_scheduler=lr_scheduler, config=s.ds_config)
    if args.compile:
        compile_engine(engine)
    return engine


def compile_engine(engine):
    """torch.compile the model's forward inside the engine (``fullgraph=True``: a graph break is an error, not a
    silent slowdown), with the Dynamo options fastroberta's models need (``fastroberta.compile``). The module's
    ``forward`` is compiled, not the module: DeepSpeed's forward hooks (timers, ZeRO bookkeeping) run around it
    in eager mode, where they cannot break the graph. Compilation itself happens at the first forward (and once
    more for eval mode); parameters and state_dict keys do not change."""
    from fastroberta.compile import compile_model
    engine.module.forward = compile_model(engine.module.forward)


def loss_scale_of(engine):
    for attr in ("cur_scale", "loss_scale"):
        value = getattr(engine.optimizer, attr, None)
        if isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1):
            return float(value)
    return None


def grad_norm_of(engine, fallback=None):
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
