"""fastroberta's fused kernels inside Hugging Face transformers' own encoders: ``apply_kernels``.

    import fastroberta
    model = transformers.AutoModelForSequenceClassification.from_pretrained("roberta-base")
    fastroberta.apply_kernels(model)          # this instance, in place (returns it)
    fastroberta.apply_kernels()               # or: every RoBERTa/XLM-R/CamemBERT/BERT/ELECTRA built from now on
    fastroberta.remove_kernels(model)         # undo (remove_kernels() undoes the class mode)
    with fastroberta.kernels_applied(model):  # apply for a block, undo after it
        ...

What is swapped (everything else stays transformers' code, parameters and state_dict keys are untouched):
- attention: when the model runs transformers' default attention (an implementation the user named, by argument
  or on the config, is kept: see ``_attention_is_default``), its ``config._attn_implementation`` becomes
  ``"fastroberta"``, a function registered in
  transformers' ``AttentionInterface`` (and a mask builder in ``AttentionMaskInterface``, which hands it the
  [B, L] key-padding mask instead of a [B, 1, L, L] bias) that runs ``fastroberta.kernels.attention``.
  ``attn_implementation="fastroberta"`` in ``from_pretrained`` works once this module is imported. It falls back
  to transformers' own functions when its kernel does not apply: eager when attention weights must be returned
  (``output_attentions``) or a ``head_mask`` reaches it, SDPA for masks that are not key-padding (causal decoders,
  cross-attention, a caller's own 4-D mask, a KV cache) and for head dims other than 16/32/64/128.
  ``config.output_attentions = True`` works on a patched model (transformers' config refuses it for anything but
  eager; the patched config's class accepts it for "fastroberta", whose function then hands over to eager).
- LayerNorm: the ``dense -> dropout -> + residual -> LayerNorm`` of every SelfOutput and Output block runs as one
  ``fastroberta.kernels.layer_norm`` call (dense's bias, dropout, residual add and LayerNorm fused; the dense
  runs without its bias when it is a plain nn.Linear), and the embeddings' LayerNorm runs through the same
  kernel.
- masked-LM loss (``*ForMaskedLM`` called with ``labels`` in train() mode): the head transform runs on the
  labelled rows only and ``fastroberta.kernels.mlm_cross_entropy`` computes the loss without [B, L, V] logits.
  The output's ``loss`` is the mean cross-entropy over labels != -100 (0.0 with zero gradients when no token is
  labelled, where transformers gives NaN); ``logits`` is None; ``hidden_states``/``attentions`` are as
  transformers returns them. In eval() mode or without labels the model's own forward runs and returns logits
  (with the loss when labels are given): evaluation needs them. ``cross_entropy=False`` keeps logits in train().

Numerics: with dropout off, patched and unpatched models agree at every real token (loss, logits, gradients) to
rounding. Padded query positions differ: our attention returns zeros there, transformers lets padded queries
attend to the real keys. Nothing real ever attends to a padded key, so no real output depends on them.

``kernels``: "triton" runs the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``), "torch" the eager
twins in ``fastroberta.kernels.reference``, "auto" Triton on CUDA and the reference elsewhere
(``FASTROBERTA_KERNELS=triton|torch`` overrides "auto"). Under ``torch.autocast`` the LayerNorms compute and
return fp32, as autocast makes ``nn.LayerNorm`` do, and the MLM decoder runs in the autocast dtype.

Needs a transformers release whose BERT-family models dispatch attention through ``AttentionInterface`` and build
masks through ``AttentionMaskInterface`` (the 5.x line); older releases get a clear error for ``attention=True``.
"""
import contextlib
import functools
import importlib
import inspect
import os
import types

import torch

try:
    import transformers
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("fastroberta.apply_kernels needs Hugging Face transformers: "
                      "pip install 'fastroberta[transformers]'") from e

from fastroberta import kernels as triton_ops
from fastroberta.kernels import reference as torch_ops

ATTN_NAME = "fastroberta"
KERNEL_CHOICES = ("auto", "triton", "torch")
HEAD_DIMS = (16, 32, 64, 128)
TASKS = ("Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
         "ForMultipleChoice")
# model type -> (modeling module, class prefix)
ARCHITECTURES = {
    "roberta": ("transformers.models.roberta.modeling_roberta", "Roberta"),
    "xlm-roberta": ("transformers.models.xlm_roberta.modeling_xlm_roberta", "XLMRoberta"),
    "camembert": ("transformers.models.camembert.modeling_camembert", "Camembert"),
    "bert": ("transformers.models.bert.modeling_bert", "Bert"),
    "electra": ("transformers.models.electra.modeling_electra", "Electra"),
}
SUPPORTED = ("the RoBERTa, XLM-RoBERTa, CamemBERT, BERT and ELECTRA encoder classes (<Arch>" + ", <Arch>".join(TASKS)
             + ")")


class _Arch(types.SimpleNamespace):
    """The transformers classes of one architecture that apply_kernels touches."""


def _load_arch(name):
    module_name, prefix = ARCHITECTURES[name]
    mod = importlib.import_module(module_name)
    return _Arch(
        name=name, module=mod,
        tasks=tuple(getattr(mod, prefix + task) for task in TASKS),
        masked_lm=getattr(mod, prefix + "ForMaskedLM"),
        pretrained=getattr(mod, prefix + "PreTrainedModel"),
        embeddings=getattr(mod, prefix + "Embeddings"),
        output_blocks=(getattr(mod, prefix + "SelfOutput"), getattr(mod, prefix + "Output")),
        attentions=tuple(getattr(mod, prefix + kind) for kind in ("SelfAttention", "CrossAttention")
                         if hasattr(mod, prefix + kind)),
    )


@functools.lru_cache(maxsize=None)
def _archs():
    return tuple(_load_arch(name) for name in ARCHITECTURES)


def _arch_of(model):
    for arch in _archs():
        if isinstance(model, arch.tasks):
            return arch
    return None


# ------------------------------------------------------------------------------------------- kernel choice
def _interpreter_active():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_kernels(value, source):
    if value not in KERNEL_CHOICES:
        raise ValueError(f"{source} must be one of {', '.join(KERNEL_CHOICES)}, got {value!r}")
    return value


def _ops(kernels, device):
    """The op module for ``kernels`` on ``device``: fastroberta.kernels (Triton) or its reference twins."""
    if kernels == "auto":
        env = os.environ.get("FASTROBERTA_KERNELS", "").strip()
        kernels = _check_kernels(env, "FASTROBERTA_KERNELS") if env else "auto"
    if kernels == "auto":
        kernels = "triton" if device.type == "cuda" else "torch"
    if kernels == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and _interpreter_active()):
            raise ValueError(f"kernels='triton' needs CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 "
                             "before importing fastroberta, or use kernels='torch'")
        return triton_ops
    return torch_ops


def _autocast_dtype(device_type):
    """The autocast dtype in force for ``device_type``, or None."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, RuntimeError, AttributeError):  # torch < 2.4 signatures
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return None


def _no_autocast(device_type):
    """Our ops choose their own precisions (fp32 statistics); autocast must not recast inside them."""
    return torch.autocast(device_type=device_type, enabled=False)


# ---------------------------------------------------------------------------------------------- attention
def _registries():
    """transformers' (AttentionInterface, AttentionMaskInterface, masking_utils), or a clear error."""
    try:
        from transformers import masking_utils
        from transformers.modeling_utils import AttentionInterface
        mask_interface = masking_utils.AttentionMaskInterface
        masking_utils.bidirectional_mask_function, masking_utils.sdpa_mask  # noqa: B018
    except (ImportError, AttributeError):
        raise RuntimeError(f"transformers {transformers.__version__} has no attention-function registry "
                           "(AttentionInterface / AttentionMaskInterface) that its BERT-family models dispatch "
                           "through; upgrade transformers (5.x) or call apply_kernels(..., attention=False)") from None
    return AttentionInterface, mask_interface, masking_utils


def _key_padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                      attention_mask=None, **kwargs):
    """The mask builder registered as "fastroberta": a bidirectional self-attention mask stays the [B, L] bool
    key-padding mask (or None); anything else (causal, cross-attention, offsets) is SDPA's [B, 1, Q, K] bool mask,
    which sends the attention function to its fallback."""
    from transformers import masking_utils
    plain = (mask_function is masking_utils.bidirectional_mask_function and q_length == kv_length
             and isinstance(q_offset, int) and q_offset == 0 and isinstance(kv_offset, int) and kv_offset == 0)
    if plain and (attention_mask is None or (attention_mask.dim() == 2 and attention_mask.shape[-1] == kv_length)):
        return attention_mask
    return masking_utils.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                                   q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                                   attention_mask=attention_mask, **kwargs)


def _attentions_requested(kwargs):
    """True when the caller wants attention weights back: ``output_attentions`` among the arguments, or (in
    transformers 5, where the argument need not travel down) an active output collector asking for them."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
        collected = _active_collector.get()
    except (ImportError, AttributeError, LookupError):
        return False
    return bool(collected) and ("attentions" in collected or "cross_attentions" in collected)


def _fallback(module, query, key, value, attention_mask, scaling, dropout, eager, **kwargs):
    """transformers' own eager or SDPA attention, given the mask in the form each expects."""
    mask = attention_mask
    if mask is not None and mask.dim() == 2:
        mask = mask.bool()[:, None, None, :]
    if eager:
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min)
        fn = getattr(importlib.import_module(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__module__} has no eager_attention_forward to fall back to")
    else:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        fn = ALL_ATTENTION_FUNCTIONS["sdpa"]
    return fn(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)


def fastroberta_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function registered under "fastroberta": q, k, v [B, H, L, D]; attention_mask the [B, L]
    bool key-padding mask from ``_key_padding_mask`` (or None); returns ([B, L, H, D], None) as transformers'
    attention functions do."""
    fall_back_eager = _attentions_requested(kwargs) or kwargs.get("head_mask") is not None
    fall_back_sdpa = (
        (attention_mask is not None and attention_mask.dim() != 2)
        or getattr(module, "is_causal", False) or kwargs.get("is_causal")
        or query.shape[2] != key.shape[2] or query.shape != key.shape or key.shape != value.shape
        or query.shape[-1] not in HEAD_DIMS or query.dtype not in (torch.float32, torch.float16, torch.bfloat16)
    )
    if fall_back_eager or fall_back_sdpa:
        return _fallback(module, query, key, value, attention_mask, scaling, dropout, fall_back_eager, **kwargs)
    ops = _ops(getattr(module, "_fastroberta_kernels", "auto"), query.device)
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask != 0  # a [B, L] mask is 1 = real token in transformers too
    if key.dtype != query.dtype or value.dtype != query.dtype:
        key, value = key.to(query.dtype), value.to(query.dtype)
    with _no_autocast(query.device.type):
        out = ops.attention(query, key, value, attention_mask=attention_mask, dropout_p=float(dropout),
                            softmax_scale=scaling)
    # [B, H, L, D] laid out as [B, L, H, D] (Triton) or contiguous (reference): the callers reshape either.
    return out.transpose(1, 2), None


def register():
    """Register the "fastroberta" attention function and mask builder with transformers (done on import)."""
    attention_interface, mask_interface, _ = _registries()
    attention_interface.register(ATTN_NAME, fastroberta_attention)
    mask_interface.register(ATTN_NAME, _key_padding_mask)


# --------------------------------------------------------------------------------------------- LayerNorm
def _norm_dtype(*tensors):
    """The dtype nn.LayerNorm would compute and return in: fp32 under autocast, else the promoted input dtype."""
    if _autocast_dtype(tensors[0].device.type) is not None:
        return torch.float32
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _ln_param(p, dtype):
    """The kernel reads parameters in the input's dtype or fp32 (e.g. bf16 weights under autocast: fp32)."""
    return p if p is None or p.dtype in (dtype, torch.float32) else p.to(dtype)


def _plain_linear(module):
    """Whether ``module`` computes exactly ``F.linear(x, weight, bias)``: a plain nn.Linear, no hooks (a wrapped or
    quantized layer, e.g. PEFT's, runs its own forward)."""
    return type(module) is torch.nn.Linear and not (module._forward_hooks or module._forward_pre_hooks)


def _fused_output_forward(self, hidden_states, input_tensor):
    """SelfOutput / Output: LayerNorm(dropout(dense(h)) + input_tensor) as one fused kernel call. A plain
    nn.Linear dense runs without its bias, which the kernel adds (``input_bias``) and whose gradient its backward
    sums, as fastroberta's own encoder layers do."""
    fold = _plain_linear(self.dense)
    x = torch.nn.functional.linear(hidden_states, self.dense.weight) if fold else self.dense(hidden_states)
    ops = _ops(self._fastroberta_kernels, x.device)
    dtype = _norm_dtype(x, input_tensor)
    p = float(self.dropout.p) if self.training else 0.0
    ln = self.LayerNorm
    with _no_autocast(x.device.type):
        return ops.layer_norm(x.to(dtype), _ln_param(ln.weight, dtype), _ln_param(ln.bias, dtype), eps=ln.eps,
                              residual=input_tensor.to(dtype), dropout_p=p,
                              input_bias=self.dense.bias if fold else None)


def _fused_layer_norm_forward(self, x):
    """The embeddings' nn.LayerNorm through the fused kernel (no residual, no dropout)."""
    ops = _ops(self._fastroberta_kernels, x.device)
    dtype = _norm_dtype(x)
    with _no_autocast(x.device.type):
        return ops.layer_norm(x.to(dtype), _ln_param(self.weight, dtype), _ln_param(self.bias, dtype),
                              eps=self.eps)


# ----------------------------------------------------------------------------------------- masked-LM loss
def _mlm_head(model):
    """(transform of the last hidden states up to the decoder, decoder nn.Linear) of a *ForMaskedLM."""
    if hasattr(model, "lm_head"):  # RoBERTa, XLM-R, CamemBERT: dense -> gelu -> layer_norm -> decoder
        head = model.lm_head

        def transform(h):
            return head.layer_norm(torch.nn.functional.gelu(head.dense(h)))
        return transform, head.decoder
    if hasattr(model, "cls"):  # BERT
        return model.cls.predictions.transform, model.cls.predictions.decoder
    return model.generator_predictions, model.generator_lm_head  # ELECTRA's generator


def _unpatched_forward(module):
    """The forward that apply_kernels replaced: an instance attribute it found (an accelerate hook, say), else
    the class's own."""
    saved = module.__dict__.get("_fastroberta_saved_forward")
    return saved if saved is not None else types.MethodType(type(module).forward, module)


@functools.lru_cache(maxsize=None)
def _mlm_forward_for(cls):
    """A *ForMaskedLM forward that, given labels in train() mode, runs the head on the labelled rows and the
    fused loss (no logits); in eval() mode, or without labels, transformers' own forward runs. It
    carries ``cls.forward``'s signature (Trainer reads it to pick dataset columns) and is bound to each model,
    so deep copies of a patched model stay self-contained."""
    signature = inspect.signature(cls.forward)

    @functools.wraps(cls.forward)
    def forward(self, *args, **kwargs):
        original = _unpatched_forward(self)
        bound = signature.bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop("self", None)
        labels = arguments.pop("labels", None)
        if labels is None or not self.training:  # evaluation gets transformers' [B, L, V] logits with the loss
            return original(*args, **kwargs)
        for name, param in signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
        return_dict = arguments.pop("return_dict", None)
        if return_dict is None:  # as transformers' can_return_tuple decides (use_return_dict is deprecated)
            return_dict = getattr(self.config, "return_dict", True)
        outputs = self.base_model(**arguments, return_dict=True)
        hidden = outputs[0]
        labels = labels.to(hidden.device).reshape(-1)
        rows = (labels != -100).nonzero().squeeze(1)
        transform, decoder = _mlm_head(self)
        h = transform(hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows))
        weight, bias = decoder.weight, decoder.bias
        dtype = _autocast_dtype(h.device.type) or weight.dtype
        ops = _ops(self._fastroberta_kernels, h.device)
        with _no_autocast(h.device.type):
            loss = ops.mlm_cross_entropy(h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                                         labels.index_select(0, rows).long())
        from transformers.modeling_outputs import MaskedLMOutput
        result = MaskedLMOutput(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                attentions=outputs.attentions)
        return result if return_dict else result.to_tuple()

    return forward


# ------------------------------------------------------------------------------------------------ patching
def _set_forward(module, fn):
    """Bind ``fn`` as ``module``'s forward, remembering what it replaced: an instance attribute (an accelerate
    hook, say) or None for the class's forward."""
    if "_fastroberta_saved_forward" not in module.__dict__:
        module._fastroberta_saved_forward = module.__dict__.get("forward")
    module.forward = types.MethodType(fn, module)


def _restore_forward(module):
    if "_fastroberta_saved_forward" not in module.__dict__:
        return
    saved = module.__dict__.pop("_fastroberta_saved_forward")
    if saved is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = saved


def _attention_is_default(model):
    """Whether ``model`` runs transformers' default attention, the only one apply_kernels takes over: an
    implementation the user named (``attn_implementation=`` in from_pretrained / _from_config, or on the config)
    is kept. Models built in class mode remember what was requested before transformers resolved it; for others,
    transformers' default ("sdpa") stands for "nothing was requested"."""
    current = model.config._attn_implementation
    if current == ATTN_NAME:  # a config shared with a model patched before
        return True
    requested = model.__dict__.get("_fastroberta_requested_attn", _MISSING)
    if requested is not _MISSING:
        return requested in (None, ATTN_NAME)
    return current in (None, "sdpa")


@functools.lru_cache(maxsize=None)
def _config_class_for(base):
    """``base`` (a transformers config class) whose ``output_attentions`` may be switched on while the
    attention is "fastroberta": our attention function hands such calls to transformers' eager one, as it does
    for the ``output_attentions`` argument. transformers' own setter refuses anything but "eager". The class
    keeps ``base``'s name (transformers' Auto classes look configs up by class name) and is a module global
    (models holding its configs still pickle)."""
    if "_fastroberta_base" in base.__dict__:  # a copy of a config patched before
        return base

    def set_output_attentions(self, value):
        if value and self._attn_implementation == ATTN_NAME:
            self._output_attentions = value
        else:
            base.output_attentions.fset(self, value)

    def validate_output_attentions(self):
        if self._attn_implementation != ATTN_NAME and hasattr(base, "validate_output_attentions"):
            base.validate_output_attentions(self)

    qualname = f"_FastRoberta{base.__name__}"
    cls = type(base.__name__, (base,), {
        "output_attentions": property(base.output_attentions.fget, set_output_attentions),
        "validate_output_attentions": validate_output_attentions,
        "_fastroberta_base": base, "__module__": __name__, "__qualname__": qualname})
    globals()[qualname] = cls
    return cls


def _check_options(attention, layer_norm, cross_entropy, kernels):
    for name, value in (("attention", attention), ("layer_norm", layer_norm), ("cross_entropy", cross_entropy)):
        if not isinstance(value, bool):
            raise TypeError(f"apply_kernels: {name} must be True or False, got {value!r}")
    _check_kernels(kernels, "apply_kernels: kernels")
    return {"attention": attention, "layer_norm": layer_norm, "cross_entropy": cross_entropy, "kernels": kernels}


def _patch_instance(model, arch, options):
    kernels = options["kernels"]
    for module in model.modules():
        if isinstance(module, arch.attentions):
            module._fastroberta_kernels = kernels
        if options["layer_norm"] and isinstance(module, arch.output_blocks):
            module._fastroberta_kernels = kernels
            _set_forward(module, _fused_output_forward)
        if options["layer_norm"] and isinstance(module, arch.embeddings) and \
                isinstance(getattr(module, "LayerNorm", None), torch.nn.LayerNorm):
            module.LayerNorm._fastroberta_kernels = kernels
            _set_forward(module.LayerNorm, _fused_layer_norm_forward)
    if options["attention"] and _attention_is_default(model):
        # Nested models share one config: remember the implementation from before any of them was patched.
        original = next((m._fastroberta_original_attn for m in model.modules()
                         if "_fastroberta_original_attn" in m.__dict__), model.config._attn_implementation)
        # A config copied from a patched model names us: what removing the kernels restores is the default.
        model._fastroberta_original_attn = "sdpa" if original == ATTN_NAME else original
        model.config._attn_implementation = ATTN_NAME
        model.config.__class__ = _config_class_for(type(model.config))
    if options["cross_entropy"] and isinstance(model, arch.masked_lm):
        model._fastroberta_kernels = kernels
        _set_forward(model, _mlm_forward_for(type(model)))
    model._fastroberta_options = dict(options)


def apply_kernels(model=None, *, attention=True, layer_norm=True, cross_entropy=True, kernels="auto"):
    """Put fastroberta's fused kernels into a transformers RoBERTa / XLM-RoBERTa / CamemBERT / BERT / ELECTRA.

    With ``model``: patches that instance in place and returns it. Without: patches the transformers classes so
    every supported model constructed afterwards (``from_pretrained`` included) is patched the same way, and
    returns None. Calling it again with the same options changes nothing; with other options it re-patches.
    ``attention``, ``layer_norm``, ``cross_entropy`` choose what is swapped (see the module docstring);
    ``kernels``: "auto" | "triton" | "torch". Raises TypeError for a model it does not support.
    """
    options = _check_options(attention, layer_norm, cross_entropy, kernels)
    if attention:
        register()
    if model is None:
        _patch_classes(options)
        return None
    arch = _arch_of(model)
    if arch is None:
        raise TypeError(f"apply_kernels does not support {type(model).__name__}; supported: {SUPPORTED}")
    if getattr(model, "_fastroberta_options", None) == options:
        return model
    if getattr(model, "_fastroberta_options", None) is not None:
        remove_kernels(model)
    _patch_instance(model, arch, options)
    return model


def remove_kernels(model=None):
    """Undo ``apply_kernels(model)`` (the model's own forwards and attention implementation come back), or with
    no model undo the class mode (models built afterwards are plain; patched instances stay patched). Returns
    the model."""
    if model is None:
        _unpatch_classes()
        return None
    if _arch_of(model) is None:
        raise TypeError(f"remove_kernels does not support {type(model).__name__}; supported: {SUPPORTED}")
    original_attn = next((m.__dict__["_fastroberta_original_attn"] for m in model.modules()
                          if "_fastroberta_original_attn" in m.__dict__), None)
    for module in model.modules():
        _restore_forward(module)
        for name in ("_fastroberta_kernels", "_fastroberta_options", "_fastroberta_original_attn"):
            module.__dict__.pop(name, None)
    if original_attn is not None:
        if model.config._attn_implementation == ATTN_NAME:
            model.config._attn_implementation = original_attn
        base = type(model.config).__dict__.get("_fastroberta_base")
        if base is not None:
            model.config.__class__ = base
    return model


@contextlib.contextmanager
def kernels_applied(model=None, **options):
    """``with kernels_applied(model, **options):`` patches on entry and removes everything on exit."""
    patched = apply_kernels(model, **options)
    try:
        yield patched
    finally:
        remove_kernels(model)


# --------------------------------------------------------------------------------------------- class mode
_CLASS_OPTIONS = None
_SAVED_POST_INIT = {}
_MISSING = object()


def _init_recording_attention(original):
    """PreTrainedModel.__init__ that remembers the attention implementation the config asked for before
    transformers resolved it (None: nothing asked, the default), so that class mode takes over only the default."""
    @functools.wraps(original)
    def __init__(self, config, *args, **kwargs):
        requested = getattr(config, "_attn_implementation_internal", None)
        original(self, config, *args, **kwargs)
        self._fastroberta_requested_attn = requested
    __init__._fastroberta = True
    return __init__


def _post_init_with_kernels(original):
    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if _CLASS_OPTIONS is not None and _arch_of(self) is not None:
            apply_kernels(self, **_CLASS_OPTIONS)
        return result
    post_init._fastroberta = True
    return post_init


def _patch_classes(options):
    global _CLASS_OPTIONS
    _CLASS_OPTIONS = dict(options)
    for arch in _archs():
        cls = arch.pretrained
        if cls in _SAVED_POST_INIT:
            continue
        _SAVED_POST_INIT[cls] = (cls.__dict__.get("post_init", _MISSING), cls.__dict__.get("__init__", _MISSING))
        cls.post_init = _post_init_with_kernels(cls.post_init)
        cls.__init__ = _init_recording_attention(cls.__init__)


def _unpatch_classes():
    global _CLASS_OPTIONS
    _CLASS_OPTIONS = None
    for cls, saved in list(_SAVED_POST_INIT.items()):
        for name, method in zip(("post_init", "__init__"), saved):
            if method is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, method)
        del _SAVED_POST_INIT[cls]


try:
    register()
except RuntimeError:  # an old transformers: apply_kernels(attention=True) explains it when asked
    pass
