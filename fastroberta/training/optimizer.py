"""The optimizer of a run: which AdamW implementation, with which parameter groups."""
from fastroberta.training.errors import ConfigError

OPTIMIZERS = ("auto", "deepspeed_adam", "torch_adamw", "apex_adam")


def resolve_optimizer(requested, on_cuda, offload_optimizer=False):
    """auto: DeepSpeed's fused Adam on CUDA, torch AdamW on CPU. ConfigError when apex is asked for and cannot
    run."""
    optimizer = requested
    if optimizer == "auto":
        optimizer = "deepspeed_adam" if on_cuda else "torch_adamw"
    if optimizer == "apex_adam":
        try:
            from apex.optimizers import FusedAdam  # noqa: F401
        except Exception as e:  # ImportError, or apex built without its CUDA extensions
            raise ConfigError(f"--optimizer apex_adam needs NVIDIA apex built with its CUDA extensions "
                              f"(importing apex.optimizers.FusedAdam failed: {e}); use --optimizer "
                              "deepspeed_adam") from None
        if offload_optimizer:
            raise ConfigError("--optimizer apex_adam cannot run with --offload-optimizer (ZeRO-Offload steps "
                              "on the CPU); use --optimizer deepspeed_adam")
    return optimizer


def optimizer_config(optimizer, lr, betas, eps, weight_decay):
    """The DeepSpeed config's optimizer parameters for ``optimizer`` (None for apex: the client builds it)."""
    if optimizer == "apex_adam":
        return None
    return {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
            "torch_adam": optimizer == "torch_adamw"}


def param_groups(model, weight_decay):
    """Weight decay on matrices (linear and embedding weights), none on biases and LayerNorm parameters."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def client_optimizer(optimizer, groups, lr, betas, eps, weight_decay):
    """The optimizer object handed to DeepSpeed, or None when DeepSpeed builds it from its config."""
    if optimizer != "apex_adam":
        return None
    from apex.optimizers import FusedAdam
    return FusedAdam(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, adam_w_mode=True)
